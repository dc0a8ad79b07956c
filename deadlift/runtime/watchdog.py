"""Notice module calls that are stuck past any limit, so a wedged worker says so and goes.

Extism bounds a call's Wasm code with ``timeout_ms``, but nothing can interrupt
a thread blocked *outside* Wasm: a host function that never returns, or a
module's start function (instantiation has no timeout at all). Such a thread
never comes back, and since :class:`~concurrent.futures.ThreadPoolExecutor`
threads are joined at interpreter exit, it also keeps the process from exiting.

Every module call registers itself while it runs::

    with worker.watchdog.track("acme/calculator/add (module add_ten)", timeout_s):
        host.call(...)

and instantiation inside it is a nested *phase* (its own allowance; the call's
clock stops meanwhile, since Extism's timeout only starts with the call)::

    with watchdog.phase("instantiating module 3f2a…"):
        extism.Plugin(compiled)

One monitor thread per process (a daemon, so it works even if the event loop
is blocked) checks every watchdog each ``interval_s``. A call still running ``grace_s``
after its own limit is *stuck*: the watchdog marks the worker unhealthy
(``problems``), logs an error naming the step and module, schedules the
worker's shutdown (it stops
pulling; the stuck events are never acked, so they are redelivered to another
worker after ``ack_wait``), and calls ``on_stuck`` — where ``deadlift worker``
exits the process (the library never does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

log = logging.getLogger("deadlift.watchdog")

EXIT_STUCK = 70  # EX_SOFTWARE: the process exits because a module thread is stuck


@dataclass(frozen=True, slots=True)
class Stuck:
    """A tracked call running past its deadline."""

    what: str
    thread: str
    running_s: float
    deadline_s: float

    def __str__(self) -> str:
        return (
            f"{self.what} has been running for {self.running_s:.1f} s in thread {self.thread}, "
            f"past its {self.deadline_s:.1f} s deadline"
        )


class _Frame:
    """One tracked call or phase on a thread's stack; also its context manager."""

    __slots__ = ("deadline", "limit_s", "owner", "started", "what")

    def __init__(self, owner: Watchdog, what: str, limit_s: float) -> None:
        self.owner = owner
        self.what = what
        self.limit_s = limit_s
        self.started = 0.0
        self.deadline = 0.0

    def __enter__(self) -> None:
        frames = _frames()
        if frames:
            self.what = f"{frames[-1].what}: {self.what}"
        self.started = time.monotonic()
        self.deadline = self.started + self.limit_s + self.owner.grace_s
        frames.append(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frames = _frames()
        frames.pop()
        if frames:  # a phase: the enclosing call's clock did not run meanwhile
            frames[-1].deadline += time.monotonic() - self.started


class _Untracked:
    """A phase outside any tracked call: nothing to do."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_UNTRACKED = _Untracked()
_local = threading.local()
_stacks: dict[int, tuple[threading.Thread, list[_Frame]]] = {}
_stacks_lock = threading.Lock()


def _frames() -> list[_Frame]:
    try:
        frames: list[_Frame] = _local.frames
    except AttributeError:
        frames = _local.frames = []
        with _stacks_lock:
            for ident in [i for i, (t, _) in _stacks.items() if not t.is_alive()]:
                del _stacks[ident]
            _stacks[threading.get_ident()] = (threading.current_thread(), frames)
    return frames


def phase(what: str, limit_s: float | None = None) -> _Frame | _Untracked:
    """Track a phase (e.g. instantiation) of the call tracked on this thread, if any.

    ``limit_s`` defaults to the watchdog's ``phase_s``; the grace is added.
    """
    frames = getattr(_local, "frames", None)
    if not frames:
        return _UNTRACKED
    owner = frames[-1].owner
    return _Frame(owner, what, owner.phase_s if limit_s is None else limit_s)


class Watchdog:
    """Tracks module calls per thread and notices those stuck past their deadline.

    Args:
        grace_s: how long past its own limit a call may run before it counts as stuck.
        phase_s: the default limit of a :func:`phase` (instantiation).
        on_stuck: called once, in the monitor thread, with what is stuck.
        interval_s: how often the monitor looks.
    """

    def __init__(
        self,
        *,
        grace_s: float = 5.0,
        phase_s: float = 10.0,
        on_stuck: Callable[[list[Stuck]], None] | None = None,
        interval_s: float = 0.25,
    ) -> None:
        self.grace_s = grace_s
        self.phase_s = phase_s
        self.interval_s = interval_s
        self.on_stuck = on_stuck
        self.stuck: list[Stuck] = []  # what made it fire (empty: healthy)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: Callable[[], Awaitable[Any]] | None = None
        self._stopping: asyncio.Future[Any] | None = None

    def track(self, what: str, limit_s: float) -> _Frame:
        """A context manager around one call whose own limit is ``limit_s`` seconds."""
        return _Frame(self, what, limit_s)

    @property
    def healthy(self) -> bool:
        """False once a call was found stuck (it stays false: the worker is going away)."""
        return not self.stuck

    @property
    def problems(self) -> list[str]:
        """What is wrong, for ``describe()`` and ``deadlift health --worker``."""
        return [f"stuck: {s}" for s in self.stuck]

    def running(self) -> list[str]:
        """Every call of this watchdog running now (its innermost phase), described."""
        now = time.monotonic()
        return [
            f"{frame.what} (running {now - frame.started:.1f} s in thread {thread})"
            for thread, frame in self._tops()
        ]

    def check(self) -> list[Stuck]:
        """The calls of this watchdog running past their deadline now."""
        now = time.monotonic()
        return [
            Stuck(frame.what, thread, now - frame.started, frame.deadline - frame.started)
            for thread, frame in self._tops()
            if now > frame.deadline
        ]

    def _tops(self) -> list[tuple[str, _Frame]]:
        with _stacks_lock:
            stacks = list(_stacks.values())
        tops = []
        for thread, frames in stacks:
            try:
                top = frames[-1]
            except IndexError:  # nothing running, or it just finished
                continue
            if top.owner is self:
                tops.append((thread.name, top))
        return tops

    def start(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        shutdown: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Start watching; when a call is stuck, run ``shutdown()`` on ``loop``."""
        self._loop, self._shutdown = loop, shutdown
        _MONITOR.add(self)

    def stop(self) -> None:
        """Stop watching (tracking keeps working)."""
        _MONITOR.discard(self)

    def _begin_shutdown(self) -> None:
        if self._shutdown is not None:
            self._stopping = asyncio.ensure_future(self._shutdown())

    def _fire(self, stuck: list[Stuck]) -> None:
        self.stuck = stuck
        for entry in stuck:
            log.error(
                "module call stuck: %s (timeout + %g s grace); nothing can interrupt it, so "
                "this worker is unhealthy and stops taking events; its unacked events are "
                "redelivered to other workers after ack_wait",
                entry,
                self.grace_s,
            )
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to stop
                self._loop.call_soon_threadsafe(self._begin_shutdown)
        if self.on_stuck is not None:
            try:
                self.on_stuck(stuck)
            except Exception:
                log.exception("on_stuck failed")


class _Monitor:
    """One thread for every watchdog of the process.

    A process serving 250 orgs has a watchdog per org; a thread each, waking four
    times a second, cost about a third of such a process's idle CPU.
    """

    def __init__(self) -> None:
        self._watched: set[Watchdog] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, watchdog: Watchdog) -> None:
        with self._lock:
            self._watched.add(watchdog)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="deadlift-watchdog", daemon=True
                )
                self._thread.start()
        self._wake.set()  # a shorter interval may apply now

    def discard(self, watchdog: Watchdog) -> None:
        with self._lock:
            self._watched.discard(watchdog)

    def _run(self) -> None:
        while True:
            with self._lock:
                watched = list(self._watched)
                if not watched:
                    self._thread = None
                    return
            self._wake.wait(min(w.interval_s for w in watched))
            self._wake.clear()
            for watchdog in watched:
                stuck = watchdog.check()
                if stuck:
                    self.discard(watchdog)  # it fires once
                    watchdog._fire(stuck)


_MONITOR = _Monitor()
