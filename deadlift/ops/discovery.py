"""Finding live workers.

Each worker registers the NATS micro service ``deadlift-worker`` (``$SRV.PING``,
``$SRV.INFO``, ``$SRV.STATS``) with a ``describe`` endpoint on
``deadlift.workers.<service id>`` that answers :meth:`Worker.describe` as JSON
(see :mod:`deadlift.runtime.advertise`). This module only asks: it prints
nothing and installs no signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from deadlift import bus
from deadlift.errors import DeadliftError, PermissionDeniedError
from deadlift.model.topology import WORKER_INFO_SUBJECT, WORKER_SERVICE

DISCOVERY_TIMEOUT_S = 0.5
STAT_NAMES = ("ok", "filtered", "retry", "dead")


class NoWorkersError(DeadliftError):
    """No live worker answered the discovery request."""


def describe_payload(data: bytes) -> dict[str, Any]:
    """Decode a worker's ``describe`` answer (raises ValueError if it is not an object)."""
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError(f"describe answered {type(result).__name__}, not an object")
    return result


async def request_many(
    nc: Client, subject: str, payload: bytes = b"", *, timeout: float = DISCOVERY_TIMEOUT_S
) -> list[bytes]:
    """Publish one request and gather every reply that arrives within ``timeout``.

    Returns at once when the server says nobody listens (a no-responders status).
    """
    replies: list[bytes] = []
    nobody = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status"):
            nobody.set()  # 503: no subscriber at all on the subject
        else:
            replies.append(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, payload, reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nobody.wait(), timeout)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    if not replies and isinstance(nc, bus.DeadliftClient) and nc.denied(subject):
        raise PermissionDeniedError(f"permission denied: this user may not publish to {subject}")
    return replies


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One live worker, from its service info and its ``describe`` answer."""

    id: str
    version: str
    host: str
    pid: int | None
    orgs: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    uptime_s: float | None = None
    describe_subject: str | None = None
    error: str | None = None
    healthy: bool = True  # false once its watchdog found a module call stuck
    problems: list[str] = field(default_factory=list)
    supervisor: dict[str, int] | None = None  # pid, slot, processes: `worker --processes N`

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return asdict(self)


async def discover_workers(nc: Client, *, timeout: float = DISCOVERY_TIMEOUT_S) -> list[WorkerInfo]:
    """The live workers this connection can see (its account's), described."""
    infos: dict[str, dict[str, Any]] = {}
    for data in await request_many(nc, WORKER_INFO_SUBJECT, timeout=timeout):
        with contextlib.suppress(ValueError, TypeError):
            info = json.loads(data)
            if isinstance(info, dict) and info.get("name") == WORKER_SERVICE and info.get("id"):
                infos[info["id"]] = info
    described = await asyncio.gather(*(_describe(nc, i, timeout) for i in infos.values()))
    # A supervisor's processes side by side, in slot order.
    return sorted(described, key=lambda w: (w.host, *_group(w), w.pid or 0, w.id))


def _group(worker: WorkerInfo) -> tuple[int, int]:
    if worker.supervisor:
        return worker.supervisor["pid"], worker.supervisor["slot"]
    return worker.pid or 0, 0


async def _describe(nc: Client, info: dict[str, Any], timeout: float) -> WorkerInfo:
    """Ask one worker's ``describe`` endpoint (named in its service info)."""
    metadata = info.get("metadata") or {}
    pid = str(metadata.get("pid", ""))
    base = WorkerInfo(
        id=info["id"],
        version=str(info.get("version", "")),
        host=str(metadata.get("host", "")),
        pid=int(pid) if pid.isdigit() else None,
    )
    endpoints = info.get("endpoints") or []
    subject = next((e.get("subject") for e in endpoints if e.get("name") == "describe"), None)
    if not subject:
        return replace(base, error="no describe endpoint")
    try:
        reply = await nc.request(subject, b"", timeout=max(timeout, 1.0))
        described = describe_payload(reply.data)
    except (nats.errors.Error, TimeoutError, ValueError) as exc:
        return replace(base, describe_subject=subject, error=f"describe failed: {exc!r}")
    return replace(
        base,
        describe_subject=subject,
        host=str(described.get("host", base.host)),
        pid=described.get("pid", base.pid),
        orgs=list(described.get("orgs", [])),
        steps=list(described.get("steps", [])),
        stats={k: int(v) for k, v in (described.get("stats") or {}).items()},
        in_flight=int(described.get("in_flight", 0)),
        uptime_s=described.get("uptime_s"),
        healthy=bool(described.get("healthy", True)),
        problems=[str(p) for p in described.get("problems") or []],
        supervisor=_supervisor(described.get("supervisor")),
    )


def _supervisor(value: Any) -> dict[str, int] | None:
    """A describe answer's ``supervisor`` (None when absent or malformed)."""
    try:
        return {key: int(value[key]) for key in ("pid", "slot", "processes")}
    except (KeyError, TypeError, ValueError):
        return None


async def live_workers(nc: Client, *, timeout: float = DISCOVERY_TIMEOUT_S) -> list[WorkerInfo]:
    """Like :func:`discover_workers`, but no answer at all is an error.

    Raises:
        NoWorkersError: naming the subject asked and what to check.
    """
    found = await discover_workers(nc, timeout=timeout)
    if not found:
        raise NoWorkersError(
            f"no workers answered on {WORKER_INFO_SUBJECT} within {timeout:g} s; start one with "
            "`deadlift worker` (a worker is visible only to its own org: use --org)"
        )
    return found
