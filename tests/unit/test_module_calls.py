"""A batch's module calls: in the module threads, and their end reaches the step
straight from the last thread (one wake-up of the loop, not three turns)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from deadlift.runtime.calls import ModuleCalls


class Job:
    def __init__(self, n: int) -> None:
        self.n = n
        self.thread = ""


class Calls(ModuleCalls):
    """Module calls whose ``run`` only notes where each job ran (or fails, if told to)."""

    def __init__(self, threads: int, executor: Any, fail: bool = False) -> None:
        self.context = type("Context", (), {"threads": threads, "executor": executor})()
        self.fast_spec = None  # never on the loop
        self.quick = 0  # never proven quick: batches split over the threads
        self.fail = fail
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, jobs: Any, **_: Any) -> None:
        self.started.set()
        if self.fail:
            raise RuntimeError("a bug of ours")
        self.release.wait(5)
        for job in jobs:
            job.thread = threading.current_thread().name


async def test_calls_run_in_the_threads_and_return_when_all_are_done() -> None:
    with ThreadPoolExecutor(2, thread_name_prefix="t") as executor:
        calls = Calls(2, executor)
        calls.release.set()
        jobs = [Job(n) for n in range(5)]
        await asyncio.wait_for(calls.call_all(jobs), 5)
    assert all(job.thread.startswith("t") for job in jobs)


async def test_a_bug_in_a_chunk_reaches_the_batch() -> None:
    with ThreadPoolExecutor(2) as executor, pytest.raises(RuntimeError, match="a bug of ours"):
        await asyncio.wait_for(Calls(2, executor, fail=True).call_all([Job(1), Job(2)]), 5)


async def test_a_cancelled_batch_drops_the_chunks_not_started() -> None:
    with ThreadPoolExecutor(1) as executor:
        calls = Calls(2, executor)  # two chunks, one thread: the second waits
        jobs = [Job(1), Job(2)]
        task = asyncio.create_task(calls.call_all(jobs))
        await asyncio.get_running_loop().run_in_executor(None, calls.started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        calls.release.set()
    assert [bool(job.thread) for job in jobs] == [True, False]
