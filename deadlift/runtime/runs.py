"""Run records: what a host tells a guest about every call of the guest's module.

When a step of a host's workflow runs a module owned by another org (a guest's
module, ``acme/before_charge_action@1``) under an integration, the step's runner
keeps a :class:`RunRecorder`. Each outcome of each event at the step (``ok``,
``filtered``, ``retry``, ``dead``) becomes one small JSON record, published with a
core NATS publish on ``deadlift.share.<guest>.runs.<workflow>.<step>``. The
integration's export carries it into the guest's account, where it arrives on
``deadlift.from.<host>.runs.<workflow>.<step>`` and the guest's
``DEADLIFT_GUEST_RUNS`` stream keeps it (:mod:`deadlift.ops.guest` reads them).

A record holds what the guest's code did and how it went: outcome, timing,
attempt, error kind and message, trace and span ids, and, when the integration
lets the guest see them (``guest_sees``), the module's own log lines and the
event's payloads. Never the requests or responses of the host's functions; an
error the host's side produced (a host function, a schema, a publish) is told
by its kind with a fixed message, since its text may quote the host's data.

Publishing never fails nor slows a step: records are queued (bounded) and sent
by one task per step; no PubAck exists across accounts, so a record the guest
has no stream for (or a lost one) is gone, counted in the worker's stats
(``run_records`` sent, ``run_records_lost`` not).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from typing import Any

from opentelemetry.trace import Span

from deadlift.bus.publisher import Sender
from deadlift.errors import StepError
from deadlift.model import integrations as links
from deadlift.model.contracts import module_owner
from deadlift.model.topology import ErrorKind
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime.context import StepContext
from deadlift.wasm.hostfns import HostCall
from deadlift.wire import events

log = logging.getLogger("deadlift.runs")

# A record stays small: at most this many bytes of the module's log text (the
# lines that do not fit are counted in ``logs_dropped``), of an error message, and
# of the whole record (over it, the payloads go first, then the logs).
RECORD_LOG_BYTES = 8 * 1024
RECORD_ERROR_BYTES = 1024
RECORD_MAX_BYTES = 64 * 1024
# Records waiting to be sent per step; over it (NATS stalled) new ones are lost, counted.
MAX_QUEUED = 10_000

# Errors whose text is the host's, not the module's: it may quote the host's
# event, a host function's data or its subjects. The guest sees the kind and this.
HOST_SIDE = {
    ErrorKind.DECODE: "the input event could not be decoded",
    ErrorKind.ENCODE: "the input or the output could not be encoded",
    ErrorKind.HOST_FUNCTION: "a host function failed",
    ErrorKind.PUBLISH: "the host could not store the output",
    ErrorKind.PROVENANCE: "the input event was refused as a forged import",
    ErrorKind.SCHEMA: "the output breaks the integration's JSON Schema for its event",
}
WITHHELD = " (the host keeps the details)"


class RunRecorder:
    """Builds the run records of one step running a guest's module, and sends them."""

    def __init__(
        self,
        sender: Sender,
        *,
        stats: Any,
        host: str,
        guest: str,
        integration: str,
        workflow: Workflow,
        step: Step,
        module_sha256: str,
        logs: bool,
        payloads: bool,
    ) -> None:
        self.sender = sender
        self.stats = stats
        self.logs = logs
        self.payloads = payloads
        self.grants = frozenset(step.host_functions)
        self.subject = links.share_subject(guest, links.RUNS, workflow.name, step.name)
        # What every record of this step says the same way.
        self.fixed = {
            "host": host,
            "integration": integration,
            "workflow": workflow.name,
            "step": step.name,
            "module": step.module,
            "module_sha256": module_sha256,
        }
        self._queue: deque[bytes] = deque()
        self._task: asyncio.Task[None] | None = None

    def capture(self) -> list[tuple[str, str]] | None:
        """Where a call keeps its own log lines (``HostCall.log_lines``): if the guest sees them."""
        return [] if self.logs else None

    def note(
        self,
        event: events.Event | None,
        outcome: str,
        started: float,
        attempt: int,
        output: Any = None,
        error: StepError | None = None,
        span: Span | None = None,
        call: HostCall | None = None,
    ) -> None:
        """Record one outcome of one event; sending happens later, on the loop."""
        try:
            body = self.encode(
                self.record(
                    event,
                    outcome,
                    (time.perf_counter() - started) * 1000,
                    attempt,
                    output=output,
                    error=error,
                    span=span,
                    call=call,
                )
            )
        except Exception:  # a record must never fail the step
            log.debug("run record of %s not built", self.subject, exc_info=True)
            self.stats["run_records_lost"] += 1
            return
        if len(self._queue) >= MAX_QUEUED:
            self.stats["run_records_lost"] += 1
            return
        self._queue.append(body)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._send_queued())

    def record(
        self,
        event: events.Event | None,
        outcome: str,
        latency_ms: float,
        attempt: int,
        *,
        output: Any = None,
        error: StepError | None = None,
        span: Span | None = None,
        call: HostCall | None = None,
    ) -> dict[str, Any]:
        """The record of one outcome (see the module docstring for what it may hold)."""
        trace_id, span_id = trace_ids(span, event.traceparent if event else None)
        record: dict[str, Any] = {
            **self.fixed,
            "outcome": outcome,
            "attempt": attempt,
            "latency_ms": round(latency_ms, 3),
            "error_kind": error.kind if error else None,
            "error": self.error_text(error) if error else None,
            "run": event.run if event else "",
            "event_id": event.id if event else "",
            "trace_id": trace_id,
            "span_id": span_id,
            "time": events.now_rfc3339(),
        }
        if self.logs:
            lines = call.log_lines if call is not None and call.log_lines is not None else []
            dropped = (call.log_lines_over + call.log_dropped_lines) if call is not None else 0
            record["logs"], record["logs_dropped"] = cap_logs(lines, dropped)
        if self.payloads:
            record["input"] = event.data if event else None
            if output is not None:
                record["output"] = output
        return record

    def error_text(self, error: StepError) -> str:
        """The message the guest sees: the module's own, or a fixed one for the host's errors."""
        text = str(error)
        if error.kind in HOST_SIDE and not self.payloads:
            fixed = HOST_SIDE[ErrorKind(error.kind)]
            name = text.partition(":")[0].strip()
            if error.kind == ErrorKind.HOST_FUNCTION and name in self.grants:
                fixed = f"host function {name} failed"
            return fixed + WITHHELD
        return _cut(text, RECORD_ERROR_BYTES)

    def encode(self, record: dict[str, Any]) -> bytes:
        """JSON, at most :data:`RECORD_MAX_BYTES`: payloads, then logs, give way."""
        body = _json(record)
        for fields, note in (
            (("input", "output"), "payloads_omitted"),
            (("logs",), "logs_omitted"),
        ):
            if len(body) <= RECORD_MAX_BYTES or not any(f in record for f in fields):
                continue
            for f in fields:
                record.pop(f, None)
            record[note] = f"the record was over {RECORD_MAX_BYTES} bytes"
            body = _json(record)
        return body

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                body = self._queue.popleft()
                try:
                    await self.sender.send(self.subject, body)
                except Exception as exc:  # the guest's view is best effort; the step goes on
                    self.stats["run_records_lost"] += 1
                    log.debug("run record for %s not sent: %s", self.subject, exc)
                else:
                    self.stats["run_records"] += 1
        finally:
            self._task = None


def recorder_for(
    context: StepContext, workflow: Workflow, step: Step, module_sha256: str
) -> RunRecorder | None:
    """The recorder of a step running a guest's module under an integration, else None."""
    owner = module_owner(step.module)
    if owner is None or owner == workflow.org or context.orgs is None:
        return None
    found = context.orgs.hosting(workflow.org, owner)
    if found is None or not isinstance(context.publisher, Sender):
        return None
    key, integration = found
    return RunRecorder(
        context.publisher,
        stats=context.stats,
        host=workflow.org,
        guest=owner,
        integration=key,
        workflow=workflow,
        step=step,
        module_sha256=module_sha256,
        logs=integration.guest_sees.logs,
        payloads=integration.guest_sees.payloads,
    )


def trace_ids(span: Span | None, traceparent: str | None) -> tuple[str | None, str | None]:
    """The trace and span ids of the step's span; else those of the input's ``traceparent``."""
    if span is not None:
        ctx = span.get_span_context()
        if ctx.is_valid:
            return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return None, None


def cap_logs(lines: list[tuple[str, str]], dropped: int) -> tuple[list[dict[str, str]], int]:
    """At most :data:`RECORD_LOG_BYTES` of log text, as ``{"level", "text"}``, and how
    many lines were left out (``dropped`` of them already before)."""
    kept: list[dict[str, str]] = []
    room = RECORD_LOG_BYTES
    for level, text in lines:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > room:
            if room > 64:  # a useful head of the line
                kept.append({"level": level, "text": _cut(text, room)})
            break
        room -= size
        kept.append({"level": level, "text": text})
    return kept, dropped + len(lines) - len(kept)


def _cut(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[: limit - 12].decode("utf-8", "ignore") + " [truncated]"


def _json(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    return text.encode("utf-8", "replace")  # a lone surrogate (from a payload) becomes "?"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    return str(value)
