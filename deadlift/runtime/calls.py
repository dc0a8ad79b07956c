"""A step's module calls for a batch: in the executor's threads, one hop per thread.

Extism releases the GIL while a module runs, so the calls of a batch are split
into one chunk per thread and each chunk is one executor hop (a hop costs more
than a small call). Calling a fast module on the loop thread instead was
measured slower for batches: the loop thread is the worker's bottleneck, and the
threads overlap the calls with its work.

A lone event (a caught-up step pulls one at a time) is different: its hop to a
module thread and back costs ~0.3 ms of wake-ups on this VM, ten times a small
call, on every step of a run. Once a step's module has proved quick, its lone
events run on the loop thread (*the fast lane*), under a timeout of
:data:`FAST_TIMEOUT_MS` instead of the step's: one guest can then hold up the
loop (and every other step and org of the process) for ~3 ms at most. A call that
hits it is run again in a module thread with the step's own timeout (only modules
with no host function run there: a call without side effects can run again), and
the step must prove itself for twice as long before its next time on the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from deadlift.wasm.host import NoIdleInstance, PluginSpec
from deadlift.wasm.hostfns import HostCall

log = logging.getLogger("deadlift.worker")

FAST_TIMEOUT_MS = 2  # a fast-lane call is interrupted after this (~3 ms: wasmtime's epochs)
FAST_CALL_S = 0.001  # a call this quick counts towards the fast lane (a thread woken from idle
# takes 0.3-0.9 ms for what takes 0.04 ms warm)
FAST_STREAK = 16  # quick calls in a row before the fast lane (doubled by each timeout there)
MAX_STRIKES = 10  # the streak a step needs stops doubling here (16 x 1,024 calls)


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
        # Host functions may block, or wait on the loop itself: never on the loop.
        self.fast_spec = (
            dataclasses.replace(spec, timeout_ms=FAST_TIMEOUT_MS)
            if context.settings.fast_lane
            and not spec.host_functions
            and spec.timeout_ms > FAST_TIMEOUT_MS
            else None
        )
        self.quick = 0  # quick calls in a row (module threads update it: a hint, racy)
        self.strikes = 0  # fast-lane calls that timed out

    @property
    def fast(self) -> bool:
        """Whether a lone event runs on the fast lane now."""
        return self.fast_spec is not None and self.quick >= FAST_STREAK << self.strikes

    async def call_all(self, jobs: Sequence[Job]) -> None:
        """Call the module for every job: one executor hop per chunk, chunks in parallel.

        The last chunk to finish wakes the loop once, straight into this coroutine
        (``run_in_executor`` and ``gather`` would take three turns of the loop to
        get here: a step's latency pays each hop of every event).
        """
        if len(jobs) == 1 and self.fast and self._on_loop(jobs[0]):
            return
        lone = len(jobs) == 1 and self.fast  # not after a timeout on the loop just now
        loop = asyncio.get_running_loop()
        threads, executor = self.context.threads, self.context.executor
        if self.quick >= FAST_STREAK:
            # A quick module's batch goes to one thread whole: the GIL is held around
            # each call, so a split gains little, and costs a thread wake and GIL
            # hand-offs (fewer CPU-µs per event, measured). One slow call ends it.
            chunks = [jobs]
        else:
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
                # A lone event with no idle fast-lane instance: made here, off the loop.
                self.run(chunk, fast=lone)
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

    def _on_loop(self, job: Job) -> bool:
        """Call the module for ``job`` on the loop thread, on an idle fast-lane instance.

        False: not done (no idle instance; or the call timed out, and is undone).
        """
        try:
            self.run([job], fast=True, instantiate=False)
        except NoIdleInstance:
            return False
        return not self._timed_out(job)

    def run(self, jobs: Sequence[Job], *, fast: bool = False, instantiate: bool = True) -> None:
        """Module calls, in an executor thread (Extism releases the GIL); ``fast``: a lone
        event's on the fast lane (again on the step's own terms if that times out)."""
        telemetry = self.telemetry
        spec = self.fast_spec if fast and self.fast_spec is not None else self.spec
        # Making the fast lane's instance (its first call takes ~0.8 ms more): that
        # call says nothing about the module's speed.
        counts = spec is self.spec or not instantiate
        for job in jobs:
            assert job.call is not None
            if not telemetry.tracing:  # no span to make: skip its context manager
                self._call(job, job.call, spec, instantiate, counts)
            else:
                with telemetry.module_call(self.function, job.span) as span:
                    job.call.trace_context = telemetry.context_of(span)
                    self._call(job, job.call, spec, instantiate, counts)
            if not counts and self._timed_out(job):
                self.run([job])

    def _timed_out(self, job: Job) -> bool:
        """Whether a fast-lane call hit the lane's timeout: then it is undone, and the
        step must prove itself quick for twice as long before its next time there."""
        if job.error is None or job.error.kind != ErrorKind.TIMEOUT:
            return False
        job.error = job.output = None
        if job.call is not None:
            job.call.forget_logs()  # the run shows the attempt that counts, with its budget
        self.strikes = min(self.strikes + 1, MAX_STRIKES)
        self.quick = 0
        log.debug("%s: a call took over %d ms on the fast lane", self.what, FAST_TIMEOUT_MS)
        return True

    def _call(
        self, job: Job, call: HostCall, spec: PluginSpec, instantiate: bool, counts: bool
    ) -> None:
        begun = time.perf_counter()
        try:
            with self.context.watchdog.track(self.what, self.limit_s):
                raw = self.context.host.call(
                    spec, self.function, job.data, call, instantiate=instantiate
                )
            job.output = from_module(raw, self.codec)
        except StepError as exc:
            job.error = exc
        except NoIdleInstance:
            raise  # no call was made
        except Exception as exc:  # a bug of ours must not take the batch down
            log.exception("module call failed unexpectedly")
            job.error = StepError(f"internal error: {exc!r}", kind=ErrorKind.ERROR)
        took = time.perf_counter() - begun
        if counts:
            self.quick = self.quick + 1 if took <= FAST_CALL_S else 0
        self.telemetry.record_module_time(took)
