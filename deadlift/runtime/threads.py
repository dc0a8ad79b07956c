"""The threads module calls run in: a worker's own pool, or one lent to it by a fleet.

Extism releases the GIL, so a thread per core runs modules in parallel. A worker
makes its own pool unless it is given one; a :class:`~deadlift.runtime.fleet.Fleet`
serving many orgs in one process lends the same pool to each org's worker, and
only the fleet shuts it down.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar

from deadlift.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")


def default_threads(settings: Settings) -> int:
    """Threads running modules: ``DEADLIFT_THREADS``, else one per core (2 to 8)."""
    return settings.threads or min(8, max(2, os.cpu_count() or 2))


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
