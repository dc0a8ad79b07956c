"""Starting a worker as a service: wait out a server that is not up yet, never bad credentials.

A worker process often starts next to its server (a deployment, a reboot, a
restart): the server may refuse connections, or JetStream may not answer yet,
for a few seconds. These retry for a while; refused credentials fail at once.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from deadlift import bus
from deadlift.errors import DeadliftError
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings

log = logging.getLogger("deadlift.worker")

STARTUP_S = 60.0
"""How long a worker (a service) waits for NATS at start."""


def refused(exc: BaseException) -> bool:
    """Whether a connection failed because the server refused the credentials."""
    text = str(exc).lower()
    return "authoriz" in text or "authent" in text


async def connect_patiently(
    settings: Settings, *, name: str = "deadlift-worker", within_s: float = STARTUP_S
) -> bus.DeadliftClient:
    """Connect, retrying for ``within_s`` while the server is unreachable.

    Raises:
        DeadliftError: the server refused the credentials, or stayed unreachable.
    """
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            return await bus.connect(settings, name=name)
        except DeadliftError as exc:
            if refused(exc) or asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("%s; retrying", exc)
            await asyncio.sleep(1.0)


async def start_patiently(worker: Worker, *, within_s: float = STARTUP_S) -> None:
    """Start ``worker``, retrying for ``within_s`` while JetStream does not answer (a restart).

    Raises:
        DeadliftError: JetStream did not answer in time.
    """
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            await worker.start()
            return
        except (TimeoutError, nats.errors.Error) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise DeadliftError(f"JetStream did not answer at start: {exc}") from None
            log.warning("JetStream not ready (%s); retrying", exc or type(exc).__name__)
            await asyncio.sleep(1.0)
