"""A step's module calls for a batch: in the executor's threads, one hop per thread.

Extism releases the GIL while a module runs, so the calls of a batch are split
into one chunk per thread and each chunk is one executor hop (a hop costs more
than a small call). Calling a fast module on the loop thread instead was
measured slower: the loop thread is the worker's bottleneck, and the threads
overlap the calls with its work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from opentelemetry.trace import Span

from deadlift.errors import StepError
from deadlift.model.topology import ErrorKind
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime.context import StepContext
from deadlift.runtime.telemetry import StepTelemetry
from deadlift.wasm.codecs import from_module
from deadlift.wasm.host import PluginSpec
from deadlift.wasm.hostfns import HostCall

log = logging.getLogger("deadlift.worker")


class Job(Protocol):
    """What a call needs of a step's job (``deadlift.runtime.step``)."""

    span: Span
    data: bytes
    call: HostCall | None
    output: Any
    error: StepError | None


class ModuleCalls:
    """Calls one step's module function for the jobs of a batch."""

    def __init__(
        self,
        *,
        context: StepContext,
        workflow: Workflow,
        step: Step,
        spec: PluginSpec,
        telemetry: StepTelemetry,
    ) -> None:
        self.context = context
        self.spec = spec
        self.telemetry = telemetry
        self.function = step.function
        self.codec = step.codec or "json"
        # A call stuck past its timeout + grace (nothing interrupts a blocked host
        # function) makes the watchdog report the worker unhealthy and stop it.
        self.limit_s = spec.timeout_ms / 1000
        self.what = f"step {workflow.org}/{workflow.name}/{step.name} (module {step.module})"

    async def call_all(self, jobs: Sequence[Job]) -> None:
        """Call the module for every job: one executor hop per chunk, chunks in parallel.

        The last chunk to finish wakes the loop once, straight into this coroutine
        (``run_in_executor`` and ``gather`` would take three turns of the loop to
        get here: a step's latency pays each hop of every event).
        """
        loop = asyncio.get_running_loop()
        threads, executor = self.context.threads, self.context.executor
        chunks = [chunk for i in range(threads) if (chunk := jobs[i::threads])]
        done: asyncio.Future[None] = loop.create_future()
        left = len(chunks)
        failures: list[BaseException] = []

        def finished(failure: BaseException | None) -> None:  # on the loop
            nonlocal left
            left -= 1
            if failure is not None:
                failures.append(failure)
            if left == 0 and not done.done():
                if failures:
                    done.set_exception(failures[0])
                else:
                    done.set_result(None)

        def run(chunk: Sequence[Job]) -> None:  # in a module thread
            failure = None
            try:
                self.run(chunk)
            except BaseException as exc:  # a bug of ours: the batch sees it, as with gather
                failure = exc
            loop.call_soon_threadsafe(finished, failure)

        submitted = [executor.submit(run, chunk) for chunk in chunks]
        try:
            await done
        except asyncio.CancelledError:
            for future in submitted:
                future.cancel()  # not started yet: never started
            raise

    def run(self, jobs: Sequence[Job]) -> None:
        """Module calls, in an executor thread (Extism releases the GIL)."""
        telemetry = self.telemetry
        for job in jobs:
            assert job.call is not None
            if not telemetry.tracing:  # no span to make: skip its context manager
                self._call(job, job.call)
                continue
            with telemetry.module_call(self.function, job.span) as span:
                job.call.trace_context = telemetry.context_of(span)
                self._call(job, job.call)

    def _call(self, job: Job, call: HostCall) -> None:
        begun = time.perf_counter()
        try:
            with self.context.watchdog.track(self.what, self.limit_s):
                raw = self.context.host.call(self.spec, self.function, job.data, call)
            job.output = from_module(raw, self.codec)
        except StepError as exc:
            job.error = exc
        except Exception as exc:  # a bug of ours must not take the batch down
            log.exception("module call failed unexpectedly")
            job.error = StepError(f"internal error: {exc!r}", kind=ErrorKind.ERROR)
        finally:
            self.telemetry.record_module_time(time.perf_counter() - begun)
