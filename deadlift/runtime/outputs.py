"""A step's outputs: encoded once per event, published to every target, their PubAcks confirmed.

Per event whose module returned something: an output id derived from the input
(the same on every delivery), the CloudEvents headers (their fixed part rendered
once per step, see :mod:`deadlift.wire.headers`), and one publish per target with
a deterministic ``Nats-Msg-Id``. Then every PubAck is awaited: an event whose
output was not stored fails with a retryable publish error, and its re-publish is
deduplicated by the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import nats.errors
from opentelemetry.trace import Span

from deadlift.bus.publisher import Publisher
from deadlift.errors import DeadliftError, EventEncodeError, PayloadTooLargeError, StepError
from deadlift.model import topology
from deadlift.model.topology import ErrorKind, step_subject
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime import crossings
from deadlift.runtime.crossings import Crossing
from deadlift.runtime.telemetry import StepTelemetry
from deadlift.wire import events

PUBACK_WAIT_S = 10.0


class Job(Protocol):
    """What publishing needs of a step's job (``deadlift.runtime.step``)."""

    event: events.Event
    span: Span
    output: Any
    error: StepError | None
    acks: list[asyncio.Future[Any]]
    targets: tuple[str, ...]
    hops: int


def publish_error(exc: object) -> StepError:
    """NATS trouble while publishing: retried later; the output is deduplicated."""
    return StepError(f"publish failed: {exc or type(exc).__name__}", kind=ErrorKind.PUBLISH)


class Outputs:
    """Publishes one step's outputs to its next steps and publish subjects."""

    def __init__(
        self,
        *,
        workflow: Workflow,
        step: Step,
        telemetry: StepTelemetry,
        crossings: Mapping[str, Crossing],
        stats: Counter[str],
    ) -> None:
        self.encoder = events.OutputEncoder.for_step(workflow.org, workflow.name, step.name)
        self.targets = (
            *(step_subject(workflow.org, workflow.name, n) for n in step.next),
            *step.publish,
        )
        self.publishes = frozenset(step.publish)
        self.crossings = crossings
        self.telemetry = telemetry
        self.stats = stats
        self._workflow_key = workflow.key
        self._step = step.name

    async def publish_all(self, jobs: Sequence[Job], publisher: Publisher) -> None:
        """Start publishing every output (PubAcks are awaited in :meth:`confirm`)."""
        publisher = crossings.gate(jobs, self.crossings, publisher)
        now = events.now_rfc3339()  # one occurrence time per batch
        tracing = self.telemetry.tracing
        for job in jobs:
            if job.error is not None or job.output is None:
                continue
            event = job.event
            origin = event.origin
            out_id = topology.output_id(
                event.source, event.id, self._workflow_key, self._step, origin
            )
            # The next steps' spans are children of this one: one trace per run.
            traceparent = (
                self.telemetry.traceparent(job.span) if tracing else None
            ) or event.traceparent
            try:
                headers, body = self.encoder.encode(
                    job.output,
                    id=out_id,
                    time=now,
                    run=event.run,
                    traceparent=traceparent,
                    origin=origin,
                    # A hop is a crossing onto a subject that may trigger a workflow
                    # (publish, emit); the next steps of a workflow (acyclic) keep the count.
                    hops=job.hops or None,
                )
                crossing = (
                    headers.with_header(events.HOPS_HEADER, str(job.hops + 1))
                    if self.publishes
                    else headers
                )
                for subject in self.targets:
                    msg_id = topology.output_msg_id(out_id, subject)
                    sent = crossing if subject in self.publishes else headers
                    if not tracing:
                        job.acks.append(
                            await publisher.publish_async(subject, body, sent, msg_id=msg_id)
                        )
                        continue
                    with self.telemetry.publish(
                        subject, job.span, message_id=out_id, size=len(body)
                    ):
                        job.acks.append(
                            await publisher.publish_async(subject, body, sent, msg_id=msg_id)
                        )
            except EventEncodeError as exc:
                job.error = StepError(str(exc), kind=ErrorKind.ENCODE, retryable=False)
            except PayloadTooLargeError as exc:
                job.error = StepError(str(exc), kind=ErrorKind.OUTPUT_TOO_LARGE, retryable=False)
            except (TimeoutError, DeadliftError, nats.errors.Error) as exc:
                job.error = publish_error(exc)
            job.targets = self.targets

    async def confirm(self, jobs: Sequence[Job]) -> None:
        """Wait for every PubAck; a job whose output was not stored fails (and is retried)."""
        pending = [ack for job in jobs for ack in job.acks if not ack.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait(pending), timeout=PUBACK_WAIT_S)
        for job in jobs:
            for ack in job.acks:
                if not ack.done():
                    ack.cancel()
                    job.error = job.error or publish_error(
                        TimeoutError(f"no PubAck in {PUBACK_WAIT_S:.0f} s")
                    )
                elif ack.cancelled() or ack.exception() is not None:
                    problem = ack.exception() if not ack.cancelled() else "cancelled"
                    job.error = job.error or publish_error(problem)
                elif ack.result().duplicate:  # published before (a redelivery): stored once
                    self.stats["duplicate"] += 1
