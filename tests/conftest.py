"""Helpers every test shares: paths of the real Wasm modules, publishing, reading streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.ops.discovery import discover_workers
from deadlift.settings import Settings
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "workers" / "dist"


def module_path(name: str) -> Path:
    """A built module from workers/dist."""
    return MODULES / f"{name}.wasm"


async def publish(nc: Client, subject: str, data: Any, *, id: str | None = None) -> events.Event:
    """Publish a Deadlift event durably; return it."""
    event = events.new_event(data, source="test", type="test.event", id=id)
    headers, body = events.encode(event)
    headers[events.MSG_ID] = event.id
    await bus.JetStreamPublisher(nc).publish(subject, body, headers)
    return event


async def raw_messages(nc: Client, stream: str, subject: str) -> list[Any]:
    """Every raw message (headers and body) stored on ``subject`` in ``stream``, in order."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return []
    found: list[Any] = []
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        found.append(msg)
        seq = msg.seq + 1
    return found


async def consumer_names(nc: Client, stream: str) -> set[str]:
    """The names of ``stream``'s consumers (none if the stream is not there)."""
    try:
        return {str(c.name) for c in await nc.jetstream().consumers_info(stream)}
    except nats.js.errors.NotFoundError:
        return set()


async def triggers_made(nc: Client, settings: Settings | None = None) -> None:
    """Make the triggers' consumers of every stored workflow, as a worker finding their
    first events would: for a test acting on one (as a crashed worker) before any has."""
    js = nc.jetstream()
    for workflow in await (await Registry.open(js)).workflows():
        await bus.ensure_triggers(js, settings or Settings(), workflow)


async def stored(nc: Client, subject: str, stream: str = Stream.EVENTS) -> list[events.Event]:
    """Every event stored on ``subject`` in ``stream``, decoded, in order."""
    return [
        events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
        for msg in await raw_messages(nc, stream, subject)
    ]


async def workers_serving(nc: Client, count: int = 1) -> bool:
    """Whether ``count`` workers of ``nc``'s account answer: each has started its steps.

    Not whether they pull: an idle step waits cold, with no pull request (see
    ``deadlift.runtime.pulling``); an event published now rings it.
    """
    try:
        return len(await discover_workers(nc, timeout=0.5)) >= count
    except (nats.errors.Error, TimeoutError):
        return False


async def eventually(
    condition: Callable[[], Any], *, timeout: float = 10.0, message: str = "condition"
) -> Any:
    """Poll ``condition`` (sync or async) until it is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{message} not met within {timeout} s (last value: {last!r})")


async def recreated(make: Callable[[], Awaitable[Any]], attempts: int = 40) -> Any:
    """Create a stream (or bucket) whose namesake was just deleted.

    nats-server removes a deleted stream's store a moment later; creating the same
    name meanwhile fails with "error creating store for stream" (500, 10049).
    """
    for _ in range(attempts - 1):
        try:
            return await make()
        except nats.js.errors.ServerError:
            await asyncio.sleep(0.05)
    return await make()


async def share_module(
    guest: tuple[Any, Any], host: tuple[Any, Any], manifest: Any, name: str
) -> str:
    """The guest signs and offers its module ``name`` (already pushed) to the host, which
    accepts it; returns the accepted ``owner/name@version``.

    ``guest`` and ``host`` are ``(client, registry)``; the integration between them is
    the manifest's, the guest's key the development seed in ``config/keys``.
    """
    from deadlift.bus.identity import whoami
    from deadlift.bus.integration_streams import ensure_integration_streams
    from deadlift.bus.offers import accept_offer, offer_module

    (guest_nc, guest_registry), (host_nc, host_registry) = guest, host
    owner = manifest.org_of_account((await whoami(guest_nc)).account)
    hosting = manifest.org_of_account((await whoami(host_nc)).account)
    await ensure_integration_streams(host_nc.jetstream(), manifest, hosting)
    seed = (ROOT / "config" / "keys" / f"{owner}.seed").read_text().strip()
    meta = await guest_registry.resolve(name)
    offer = await offer_module(
        guest_nc, guest_registry, manifest, owner=owner, ref=meta.ref, host=hosting, seed=seed
    )
    accepted, _ = await accept_offer(
        host_nc.jetstream(), host_registry, manifest, host=hosting, ref=offer.ref
    )
    return str(accepted.ref)
