"""Watching a KV bucket for changes, with no cost while nothing changes.

nats-py's KV watch is an ordered push consumer: nats-server sends it a heartbeat
every 5 s and nats-py wakes a flow-control task for it 4 times a second, whether
or not anything changes. A host's worker holds one per org it serves (250 idle
watches: 3.0 % of a core in the client, 1.2 % in nats-server; a worker process
serving 250 orgs idled at 3.7 %). Here a bucket is watched through a core
subscription to its subjects, where every put and delete is published, which
costs nothing while nothing changes.

Such a message is not taken as the value: a put the stream refused (a failed
revision check, a full account) is published all the same, and a message may
arrive before the stream has stored it. It only names a key, which is then read
from the stream, now and again :data:`SETTLE_S` later; a value is reported when
its revision is newer than the last reported for its key.

The current entries are read at the start and after each reconnect (core
messages sent while disconnected are lost) by an ordered watch, stopped once it
has delivered them. Where the account may not subscribe to the bucket's subjects
(its permissions were rendered before this), the ordered watch is kept on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from deadlift.bus import buckets

log = logging.getLogger("deadlift.bus")

SETTLE_S = 1.0
MAX_NAMED = 10_000  # keys waiting to be read; beyond, every entry is read again instead
GONE = ("DEL", "PURGE")


@dataclass(frozen=True, slots=True)
class Change:
    """A key's current value (None: deleted or purged) and its revision (stream sequence)."""

    key: str
    value: bytes | None
    revision: int


async def watch_bucket(
    js: JetStreamContext, kv: KeyValue, stop: asyncio.Event | None = None
) -> AsyncIterator[Change]:
    """Every current entry of KV bucket ``kv``, then each change, until ``stop`` is set."""
    nc = js._nc
    keys = _Keys(buckets.prefix_of(kv))
    # Unbounded: a burst of applies must not be dropped as a slow consumer's.
    sub = await nc.subscribe(
        f"{keys.prefix}>", cb=keys.named_key, pending_msgs_limit=0, pending_bytes_limit=0
    )
    listeners: list[Any] | None = None
    stopper: asyncio.Task[None] | None = None
    try:
        await nc.flush()
        # The bucket's stream must be there; the round trip also gives the server's
        # -ERR for a denied subscription (sent before the flush's PONG) time to reach
        # the error callback, which nats-py runs in a task of its own.
        await js.stream_info(buckets.stream_of(kv))
        refusal = _refusal(nc, f"{keys.prefix}>")
        if refusal is not None:
            log.warning(
                "cannot subscribe to %s> (%s): watching bucket %s with a JetStream consumer, "
                "which costs idle CPU; render the accounts again (`deadlift nats-config`) "
                "to allow it",
                keys.prefix,
                refusal,
                kv._name,
            )
            async for change in _entries(kv, stop, initial_only=False):
                yield change
            return
        listeners = getattr(nc, "on_reconnect", None)
        if listeners is not None:
            listeners.append(keys.reconnected)
        if stop is not None:
            stopper = asyncio.get_running_loop().create_task(_set_when(stop, keys.wake))
        seen: dict[str, int] = {}
        while stop is None or not stop.is_set():
            key = await keys.next()
            if key is not None:
                stored = await _read(js, kv, key)
                found = [stored] if stored is not None else []
            elif stop is None or not stop.is_set():  # a resync: the entries as they are now
                keys.resynced()
                found = [c async for c in _entries(kv, stop, initial_only=True)]
            else:
                break
            for change in found:
                if change.revision > seen.get(change.key, 0):
                    seen[change.key] = change.revision
                    yield change
    finally:
        if listeners is not None:
            with contextlib.suppress(ValueError):
                listeners.remove(keys.reconnected)
        if stopper is not None:
            stopper.cancel()
        with contextlib.suppress(Exception):  # the connection is gone, or closing
            await sub.unsubscribe()


class _Keys:
    """The keys to read: those a message named (now), then each again ``SETTLE_S`` later."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.wake = asyncio.Event()
        self._named: dict[str, None] = {}  # an ordered set
        self._due: dict[str, float] = {}  # key → when to read it again (monotonic)
        self._resync = True  # read every entry: at the start, and after a reconnect

    async def named_key(self, msg: Msg) -> None:
        if len(self._named) >= MAX_NAMED:
            # Messages name keys faster than they are read (anyone in the account may
            # publish here, stored or not): read what is stored instead, bounded.
            self.reconnected()
            return
        self._named[msg.subject[len(self.prefix) :]] = None
        self.wake.set()

    def reconnected(self) -> None:
        self._resync = True
        self.wake.set()

    def resynced(self) -> None:
        self._resync = False
        self._named.clear()  # the entries read now include them

    async def next(self) -> str | None:
        """The next key to read; None for a resync (or when woken to stop)."""
        while True:
            if self._resync:
                return None
            now = time.monotonic()
            if self._named:
                key = next(iter(self._named))
                del self._named[key]
                self._due[key] = now + SETTLE_S  # read again: the stream may not have it yet
                return key
            if self._due:
                soonest = min(self._due, key=self._due.__getitem__)
                if self._due[soonest] <= now:
                    del self._due[soonest]
                    return soonest
            self.wake.clear()
            timeout = min(self._due.values()) - now if self._due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
            if timeout is None and not self._named and not self._resync:
                return None  # woken with nothing to read: to stop


def _refusal(nc: Any, subject: str) -> str | None:
    """The server's permission error for a subscription to ``subject``, if it sent one."""
    denied = getattr(nc, "denied", None)
    return denied(subject) if denied is not None else None


async def _read(js: JetStreamContext, kv: KeyValue, key: str) -> Change | None:
    """The stored state of ``key``; None if the stream has nothing for it."""
    try:
        msg = await js.get_last_msg(buckets.stream_of(kv), f"{buckets.prefix_of(kv)}{key}")
    except nats.js.errors.NotFoundError:
        return None
    operation = (msg.headers or {}).get("KV-Operation")
    value = None if operation in GONE or not msg.data else msg.data
    return Change(key, value, msg.seq or 0)


async def _entries(
    kv: Any, stop: asyncio.Event | None, *, initial_only: bool
) -> AsyncIterator[Change]:
    """The bucket's entries through nats-py's ordered watch: the current ones, then
    (unless ``initial_only``) each change until ``stop`` is set."""
    watcher = await kv.watchall()
    stopper = None
    if stop is not None and not initial_only:

        async def stop_when_asked() -> None:
            await stop.wait()
            with contextlib.suppress(Exception):
                await watcher.stop()  # the iteration then ends

        stopper = asyncio.get_running_loop().create_task(stop_when_asked())
    try:
        async for entry in watcher:
            if entry is None:  # every current entry delivered
                if initial_only:
                    return
                continue
            value = None if entry.operation in GONE or not entry.value else entry.value
            yield Change(entry.key, value, entry.revision)
    finally:
        if stopper is not None:
            stopper.cancel()
        with contextlib.suppress(Exception):  # stopped already, or the connection is gone
            await watcher.stop()
        if initial_only:
            # nats-py leaves the consumer to the server, which deletes it 5 s later.
            with contextlib.suppress(Exception):
                await kv._js.delete_consumer(kv._stream, watcher._sub._consumer)


async def _set_when(stop: asyncio.Event, wake: asyncio.Event) -> None:
    await stop.wait()
    wake.set()
