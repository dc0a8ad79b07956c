"""The threads module calls run in: a worker's own pool, or one lent to it by a fleet.

Extism releases the GIL, so a thread per core runs modules in parallel. A worker
makes its own pool unless it is given one; a :class:`~deadlift.runtime.fleet.Fleet`
serving many orgs in one process lends the same pool to each org's worker, and
only the fleet shuts it down. And what keeps the event loop from starving them
(and itself) when thousands of steps start: a short GIL switch interval, and no
garbage collection while a start builds its heap.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar

from deadlift.settings import Settings

SWITCH_INTERVAL_S = 0.0005
"""How long a thread holding the GIL keeps it while another waits (Python's default: 5 ms)."""

P = ParamSpec("P")
T = TypeVar("T")


def default_threads(settings: Settings) -> int:
    """Threads running modules: ``DEADLIFT_THREADS``, else one per core (2 to 8)."""
    return settings.threads or min(8, max(2, os.cpu_count() or 2))


def quick_handoff() -> None:
    """Let a module thread coming back from Extism have the GIL within 0.5 ms, not 5.

    Extism releases the GIL around every libextism call, and a call is several of
    them (create the instance, call, read the error, the output's length and data,
    drain the logs, free): a module thread takes the GIL back after each. While the
    event loop is busy (a worker starting thousands of steps, a burst of events), it
    keeps the GIL until the switch interval forces it out, so each of those costs up
    to 5 ms: a step's first event took its module thread ~8 ms instead of ~2 ms of
    CPU. Measured: 2 threads creating, calling and dropping 1,000 instances beside
    a thread busy 90 % of the time in Python, 11.6 ms per instance at 5 ms, 8.2 ms
    at 1 ms, 5.6 ms at 0.5 ms (no better below). Process-wide; never raises an
    interval set lower.
    """
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


class LentExecutor(Executor):
    """An executor lent by its owner: work goes to the owner's, shutting it down does not.

    A worker shuts its executor down when it stops; with a lent one, that leaves
    the pool running for the owner's other borrowers (and their in-flight calls).
    """

    def __init__(self, owner: Executor) -> None:
        self.owner = owner

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run ``fn`` on the owner's executor."""
        return self.owner.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing: the pool is its owner's to shut down."""


_pauses = 0  # workers starting now (a fleet starts many in one process)
_resume_collector = True


@contextlib.contextmanager
def collector_paused(*, freeze: bool = True) -> Iterator[None]:
    """No garbage collection while a worker starts its steps; then freeze what it made.

    A start builds a heap of long-lived objects (1,000 workflows: ~450,000), and
    Python's collector walks it again and again as it grows: 7 full collections (up
    to 350 ms each, the event loop stopped) and 950 young ones took 2 s of the 8 s
    start. Paused instead, then ``gc.freeze()``: the steps' objects are never walked
    again, so later collections cost what the traffic allocates, not what runs. A
    cycle made during the start and dropped is only reclaimed after a later
    reconcile stops steps (it unfreezes): memory bounded by the start's heap.
    Nested and concurrent starts count: the collector resumes after the last.
    ``freeze=False`` (a stop: what it leaves is garbage, not a heap that stays):
    paused only.
    """
    global _pauses, _resume_collector
    if _pauses == 0:
        _resume_collector = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0:
            if freeze:
                gc.freeze()
            if _resume_collector:
                gc.enable()
