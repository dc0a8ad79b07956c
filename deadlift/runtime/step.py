"""The step loop: pull → decode → call the module → publish → ack, bounded in flight.

Per step: pull a batch → decode the event → call the module (in a thread: Extism
releases the GIL) → publish the output to the next steps and publish subjects
with a deterministic ``Nats-Msg-Id`` → await the PubAcks → ack. A crash anywhere
before the ack redelivers the event; the re-published output is dropped by the
stream's duplicate window, so each output is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from opentelemetry.trace import Span

from deadlift import bus
from deadlift.bus import direct
from deadlift.bus.acksubject import delivery
from deadlift.bus.checks import ConsumerChecks
from deadlift.bus.flushes import Flushes
from deadlift.bus.pull import Pull
from deadlift.bus.streams import StepBinding
from deadlift.errors import DeadliftError, EventDecodeError, EventEncodeError, StepError
from deadlift.model import topology
from deadlift.model.topology import ErrorKind, Outcome, Stream, step_subject
from deadlift.model.workflow import Step, TriggerStart, Workflow
from deadlift.runtime import crossings, runs, telemetry
from deadlift.runtime import hops as hops_guard
from deadlift.runtime.calls import ModuleCalls
from deadlift.runtime.context import (
    SERVER_RELAY_HEADERS,
    StepContext,
    StepReport,
    provenance_headers,
    relayed_by_server,
    stamp_origin,
    step_signature,
)
from deadlift.runtime.letters import dead_letter
from deadlift.runtime.letters import settle as _settle
from deadlift.runtime.outputs import Outputs
from deadlift.runtime.pulling import Puller
from deadlift.wasm.codecs import to_module
from deadlift.wasm.host import PluginSpec
from deadlift.wasm.hostfns import HostCall
from deadlift.wire import events

log = logging.getLogger("deadlift.worker")
_HOST_LOG = logging.getLogger("deadlift.host")  # HostCall's logger, looked up once

# Deliveries beyond the step's attempts that still run the step. A redelivery
# after a worker died or an ack was lost counts as a delivery but is no failure:
# the step runs again (its outputs are deduplicated) rather than being
# dead-lettered; only a failed run on or after the last attempt is.
CRASH_LOOP_DELIVERIES = 10
# NATS trouble while publishing (a stream with no leader during an election answers
# "no responders" at once; 4-8 s on a 3-node cluster) is not the module's failure:
# publish again in place (same Nats-Msg-Id: deduplicated) for at most this long,
# instead of spending the step's retry attempts on it.
OUTAGE_RETRY_S = 30.0


@dataclass(slots=True)
class _Job:
    """One event on its way through a batch."""

    msg: Msg
    event: events.Event
    attempt: int
    started: float
    span: Span
    data: bytes = b""
    call: HostCall | None = None
    output: Any = None
    error: StepError | None = None
    acks: list[asyncio.Future[Any]] = field(default_factory=list)
    targets: tuple[str, ...] = ()
    hops: int = 0  # the input's hop count; its outputs carry one more


class StepRunner:
    """Pulls one step's events from its consumer and runs them, bounded in flight."""

    def __init__(
        self,
        context: StepContext,
        workflow: Workflow,
        step: Step,
        spec: PluginSpec,
        binding: StepBinding,
        services: dict[str, Any],
    ) -> None:
        self.context = context
        self.workflow = workflow
        self.step = step
        self.spec = spec
        self.binding = binding
        self.services, self.crossings = crossings.of_step(services, context.orgs, workflow, step)
        self.signature = step_signature(workflow, step)
        self.concurrency = step.concurrency or context.concurrency
        self.granted = {n: context.functions[n] for n in step.host_functions}
        self.telemetry = telemetry.StepTelemetry(
            org=workflow.org,
            workflow=workflow.name,
            step=step.name,
            module_sha256=spec.sha256,
            destination=(
                ",".join(workflow.trigger)
                if binding.stream != Stream.STEPS
                else step_subject(workflow.org, workflow.name, step.name)
            ),
            consumer=binding.consumer,
            server=context.server,
        )
        self.calls = ModuleCalls(
            context=context, workflow=workflow, step=step, spec=spec, telemetry=self.telemetry
        )
        self.outputs = Outputs(
            workflow=workflow,
            step=step,
            telemetry=self.telemetry,
            crossings=self.crossings,
            stats=context.stats,
        )
        # A trigger's provenance comes from where it arrived (an import's own stream),
        # never from its headers; a step input carries the run's, stamped on entry.
        self.is_trigger = binding.stream != Stream.STEPS
        # A guest's module (another org's, under an integration): the guest sees its runs.
        self.runs = runs.recorder_for(context, workflow, step, spec.sha256)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._pull: Pull | None = None
        self.puller: Puller | None = None
        # The next steps' input consumers are made on demand: by the first output sent.
        self._next_made = not step.next

    @property
    def in_flight(self) -> int:
        """Batches being processed now."""
        return len(self._inflight)

    async def start(self) -> None:
        """Bind to the durable consumer and start pulling."""
        js = self.context.js
        nc, api = js._nc, js._prefix  # the JetStream context's connection and API prefix
        self._pull = Pull(nc, self.binding.stream, self.binding.consumer, api)  # subscribes lazily
        size = max(1, min(self.context.settings.fetch_batch, self.concurrency // 2))
        self.puller = Puller(
            self._pull,
            nc,
            js,
            self.binding,
            self.context.settings,
            size,
            checks=ConsumerChecks.of(js),  # one per connection: checks asked together
            make=self._make_trigger,
        )
        self._task = asyncio.create_task(
            self._loop(), name=f"deadlift-step-{self.binding.consumer}"
        )

    async def _make_trigger(self, start: TriggerStart) -> None:
        """Make this trigger's consumer (not made by apply), delivering from ``start``."""
        await bus.ensure_trigger(
            self.context.js, self.context.settings, self.step, self.binding, start
        )

    async def stop(self) -> None:
        """Stop pulling; finish in-flight events and those already delivered (acked or nak'd)."""
        self._stopping = True
        if self.puller is not None:
            self.puller.stop()
        try:
            if self._task is not None:
                if self.puller is not None and self.puller.waiting:
                    # Nothing to finish: end the long pull now rather than when it expires.
                    self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            await self._finish_delivered()
        finally:
            # Also when the wait is given up (a stuck call): a pull subscription left
            # behind makes the connection's drain wait out its whole drain_timeout.
            if self._pull is not None:
                await self._hand_back()
                await self._pull.stop()

    async def _finish_delivered(self) -> None:
        """Run the events the server delivered after the last fetch returned.

        A batch fetch returns when its short wait ends while the server may still
        be sending the rest of the batch. Those events are this runner's (the
        server counts them delivered): running them now acks them. A nak instead
        would be lost if the server restarts before redelivering (naks are not
        stored), leaving them to wait out ack_wait — what a Ctrl-C of
        ``deadlift dev`` did to about a batch per step.
        """
        for _ in range(3):  # a batch's rest arrives at once; more would be a server's retry
            msgs = await self._delivered()
            if not msgs:
                return
            await self._handle_batch(msgs)

    async def _hand_back(self) -> None:
        """Nak what was delivered but not run (the stop was cut short): another worker's now."""
        for msg in await self._delivered():
            await _settle(msg.nak(), "nak")

    async def _delivered(self) -> list[Msg]:
        """The events waiting in this runner's subscription, taken from it.

        A flush (PING/PONG) first: the server answers it only after everything it
        sent this client before, so all of it is queued by then, however busy the
        event loop is.
        """
        if self._pull is None or not self._pull.subscribed:
            return []  # never pulled: a round trip per cold step made a big stop slow
        try:
            await Flushes.of(self._pull.nc).flush(timeout=2)  # shared by steps stopping together
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("flush before taking delivered events failed: %s", exc)
        return self._pull.delivered()

    async def _loop(self) -> None:
        # Two batches in flight: while one publishes and waits for PubAcks, the
        # next one runs its modules. Each batch costs one executor hop per thread.
        assert self.puller is not None
        slots = asyncio.Semaphore(2)
        while not self._stopping:
            await slots.acquire()
            if self._stopping:
                slots.release()
                break
            try:
                msgs = await self.puller.next()
            except nats.errors.ConnectionClosedError:
                slots.release()
                return
            except Exception as exc:  # reconnecting, no responders…: retry shortly
                slots.release()
                log.warning("fetch for %s failed: %s", self.binding.consumer, exc)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                slots.release()
                continue
            task = asyncio.create_task(self._handle_batch(msgs))
            self._inflight.add(task)
            task.add_done_callback(self._done)
            task.add_done_callback(lambda _: slots.release())

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "step %s crashed on a batch", self.binding.consumer, exc_info=task.exception()
            )

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Process one batch of delivered messages until each is acked, nak'd or termed.

        What the pull loop does with every fetch; a test can hand it messages
        directly (no server, with a :class:`~deadlift.bus.publisher.MemoryPublisher`).
        """
        await self._handle_batch(list(msgs))

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        """Run a batch: admit, call the module, publish, confirm, then ack each event."""
        jobs = [job for msg in msgs if (job := await self._admit(msg)) is not None]
        if not jobs:
            return
        heartbeat = self._keep_alive([job.msg for job in jobs])
        try:
            await self._call_all(jobs)
            await self._publish_through_outages(jobs)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        for job in jobs:
            await self._finish(job)

    async def _admit(self, msg: Msg) -> _Job | None:
        """Decode a message into a job; fail it now if it cannot run at all."""
        started = time.perf_counter()
        attempt, stream, seq = delivery(msg)
        attempt = attempt or 1
        try:
            event = events.decode(
                msg.headers,
                msg.data,
                fallback_id=lambda: topology.foreign_event_id(stream or "", seq),
                fallback_source=f"nats:{msg.subject}",
            )
            hops = events.hop_count(event)
        except EventDecodeError as exc:
            error = StepError(str(exc), kind=ErrorKind.DECODE, retryable=False)
            await self._fail(msg, None, attempt, started, error)
            return None
        if self.binding.origin and relayed_by_server(msg.headers):
            error = StepError(
                f"event on {msg.subject} was written by a stream of this org's own account "
                f"(it carries {', '.join(sorted(SERVER_RELAY_HEADERS & set(msg.headers or {})))}"
                f"), not sent by {self.binding.origin}: refused as a forged import",
                kind=ErrorKind.PROVENANCE,
                retryable=False,
            )
            await self._fail(msg, None, attempt, started, error)
            return None
        if self.is_trigger and event.origin != self.binding.origin:
            event = stamp_origin(event, self.binding.origin)
        span = self.telemetry.start_execution(
            msg.headers, msg.subject, attempt, event.run, message_id=event.id, size=len(msg.data)
        )
        job = _Job(msg, event, attempt, started, span, hops=hops)
        # A loop, or workflows feeding each other: the run stops here (one dead letter).
        if (
            stop := hops_guard.over_limit(hops, self.step, self.context.settings.max_hops)
        ) is not None:
            job.error = stop
            await self._finish(job)
            return None
        if attempt > self.step.retry.max_attempts + CRASH_LOOP_DELIVERIES:
            # Delivered again and again without a worker ever finishing it: most
            # likely it crashes the worker process. Stop the crash loop.
            job.error = StepError(
                f"delivered {attempt} times without completing (it may crash workers)",
                kind=ErrorKind.EXHAUSTED,
                retryable=False,
            )
            await self._finish(job)
            return None
        try:
            job.data = to_module(event.data, self.step.codec or "json")
        except EventEncodeError as exc:
            job.error = StepError(str(exc), kind=ErrorKind.ENCODE, retryable=False)
            await self._finish(job)
            return None
        job.call = HostCall(
            org=self.workflow.org,
            workflow=self.workflow.name,
            step=self.step.name,
            run=event.run,
            event_id=event.id,
            granted=self.granted,
            loop=asyncio.get_running_loop(),
            logger=_HOST_LOG,
            services=hops_guard.call_services(
                self.services, self.workflow, self.step, self.context.publisher, hops
            ),
            traceparent=event.traceparent,
            origin=event.origin,
            log_limit=self.context.settings.module_log_bytes,
            log_lines=self.runs.capture() if self.runs else None,
            host_timeout_s=self.spec.timeout_ms / 1000,
        )
        return job

    def _keep_alive(self, msgs: list[Msg]) -> asyncio.Task[None] | None:
        """Keep calls that may outlast ack_wait from being redelivered meanwhile."""
        interval = self.binding.ack_wait / 2
        longest = self.spec.timeout_ms / 1000 * max(1, len(msgs) // self.context.threads)
        if longest + 1.0 < interval:
            return None  # the batch will be done long before the server would redeliver

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                for msg in msgs:
                    await _settle(msg.in_progress(), "in_progress")

        return asyncio.create_task(beat())

    async def _call_all(self, jobs: list[_Job]) -> None:
        """Call the module for every job: one executor hop per chunk, chunks in parallel."""
        await self.calls.call_all(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        """Module calls, in an executor thread (Extism releases the GIL)."""
        self.calls.run(jobs)

    async def _publish_through_outages(self, jobs: list[_Job]) -> None:
        """Publish and confirm; publish again while NATS cannot store the outputs."""
        await self._publish_all(jobs)
        await self._confirm(jobs)
        deadline = time.monotonic() + OUTAGE_RETRY_S
        delay = 0.25
        while not self._stopping:
            stuck = [j for j in jobs if j.error is not None and j.error.kind == "publish"]
            if not stuck or time.monotonic() + delay > deadline:
                return
            log.warning(
                "%s: %d output(s) not stored (%s); publishing again in %.2f s",
                self.binding.consumer,
                len(stuck),
                stuck[0].error,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            for job in stuck:
                job.error, job.acks = None, []
                await _settle(job.msg.in_progress(), "in_progress")
            await self._publish_all(stuck)
            await self._confirm(stuck)

    async def _publish_all(self, jobs: list[_Job]) -> None:
        """Start publishing every output (PubAcks are awaited in :meth:`_confirm`)."""
        if not self._next_made and any(j.error is None and j.output is not None for j in jobs):
            try:
                await self._make_next_inputs()
            except (DeadliftError, nats.errors.Error) as exc:
                # NATS trouble is an outage (published again in place); a refusal (a
                # full account) fails the event, retried then dead-lettered, saying why.
                outage = not isinstance(exc, DeadliftError)
                kind = ErrorKind.PUBLISH if outage else ErrorKind.ERROR
                for job in jobs:
                    if job.error is None and job.output is not None:
                        job.error = StepError(str(exc), kind=kind, retryable=True)
                return
        await self.outputs.publish_all(jobs, self.context.publisher)

    async def _make_next_inputs(self) -> None:
        """Make the next steps' input consumers if missing, before their first event."""
        js, settings = self.context.js, self.context.settings
        if js is not None:  # None: no JetStream (a memory publisher's run), nothing to make
            steps = {s.name: s for s in self.workflow.steps}
            for name in self.step.next:
                await bus.ensure_on_demand(js, settings, self.workflow, steps[name])
        self._next_made = True

    async def _confirm(self, jobs: list[_Job]) -> None:
        """Wait for every PubAck; a job whose output was not stored fails (and is retried)."""
        await self.outputs.confirm(jobs)

    async def _finish(self, job: _Job) -> None:
        """Ack a job that succeeded or fail it; report; end its span."""
        try:
            if job.error is not None:
                await self._fail(
                    job.msg, job.event, job.attempt, job.started, job.error, job.span, job.call
                )
                return
            await _settle(direct.ack(job.msg), "ack")
            outcome = Outcome.FILTERED if job.output is None else Outcome.OK
            self._report(
                job.event,
                outcome,
                job.started,
                job.attempt,
                output=job.output,
                targets=job.targets if job.output is not None else (),
                span=job.span,
                call=job.call,
            )
        finally:
            self.telemetry.end_execution(job.span)

    async def _fail(
        self,
        msg: Msg,
        event: events.Event | None,
        attempt: int,
        started: float,
        error: StepError,
        span: Span | None = None,
        call: HostCall | None = None,
    ) -> None:
        retry = self.step.retry
        if error.retryable and attempt < retry.max_attempts:
            await _settle(msg.nak(delay=retry.delay(attempt)), "nak")
            self._report(event, Outcome.RETRY, started, attempt, error=error, span=span, call=call)
            return
        headers = (
            provenance_headers(msg.headers, self.binding.origin) if self.is_trigger else msg.headers
        )
        where = (self.workflow, self.step, self.spec.sha256, self.binding.consumer)
        if not await dead_letter(self.context, where, msg, headers, event, attempt, error):
            return
        self._report(event, Outcome.DEAD, started, attempt, error=error, span=span, call=call)

    def _report(
        self,
        event: events.Event | None,
        outcome: str,
        started: float,
        attempt: int,
        *,
        output: Any = None,
        targets: tuple[str, ...] = (),
        error: StepError | None = None,
        span: Span | None = None,
        call: HostCall | None = None,
    ) -> None:
        self.context.stats[outcome] += 1
        if self.runs is not None:
            self.runs.note(event, outcome, started, attempt, output, error, span, call)
        self.telemetry.record(
            outcome,
            time.perf_counter() - started,
            outputs=len(targets),
            kind=error.kind if error else None,
        )
        if error is not None and span is not None:
            telemetry.fail_span(span, error.kind, str(error))
        if self.context.on_report is None:
            return
        self.context.on_report(
            StepReport(
                org=self.workflow.org,
                workflow=self.workflow.name,
                step=self.step.name,
                module=self.step.module,
                run=event.run if event else "",
                event_id=event.id if event else "",
                outcome=outcome,
                latency_ms=(time.perf_counter() - started) * 1000,
                attempt=attempt,
                output=output,
                targets=targets,
                error=str(error) if error else None,
                error_kind=error.kind if error else None,
                origin=event.origin if event else None,
            )
        )
