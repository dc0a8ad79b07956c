"""OpenTelemetry: one trace per run across steps and orgs, and metrics per step.

The worker wraps each step execution in a CONSUMER span whose parent comes from
the event's ``traceparent`` header, with child spans for the module call, each
host-function call and each publish (PRODUCER); the output events carry the
step's span context on, so a run is one trace even across NATS accounts.

The library only uses the OpenTelemetry API (a no-op until configured); the CLI
calls :func:`configure`, which picks exporters from the standard ``OTEL_*``
environment variables.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from deadlift.errors import ConfigError

TRACER = trace.get_tracer("deadlift")
METER = metrics.get_meter("deadlift")
_PROPAGATOR = TraceContextTextMapPropagator()


class _Instruments:
    """The metric instruments, created once per process."""

    def __init__(self) -> None:
        self.events_in = METER.create_counter(
            "deadlift.events.in", unit="{event}", description="events a step received"
        )
        self.events_out = METER.create_counter(
            "deadlift.events.out", unit="{event}", description="events a step produced"
        )
        self.filtered = METER.create_counter(
            "deadlift.events.filtered", unit="{event}", description="runs a step ended (no output)"
        )
        self.failed = METER.create_counter(
            "deadlift.events.failed", unit="{event}", description="failed attempts, by kind"
        )
        self.dead_lettered = METER.create_counter(
            "deadlift.events.dead_lettered", unit="{event}", description="events dead-lettered"
        )
        self.step_duration = METER.create_histogram(
            "deadlift.step.duration", unit="s", description="time to process one event"
        )
        self.module_duration = METER.create_histogram(
            "deadlift.module.duration", unit="s", description="time inside the module call"
        )
        self.in_flight = METER.create_up_down_counter(
            "deadlift.events.in_flight", unit="{event}", description="events being processed"
        )
        self.log_dropped = METER.create_counter(
            "deadlift.module.log_dropped",
            unit="By",
            description="module log bytes dropped over DEADLIFT_MODULE_LOG_BYTES per call",
        )


_instruments: _Instruments | None = None


def instruments() -> _Instruments:
    """The process's metric instruments."""
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by message headers (``traceparent``)."""
    return _PROPAGATOR.extract(dict(headers or {}))


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span, for an outgoing event."""
    return traceparent_of(None)


def traceparent_of(context: Context | None) -> str | None:
    """The ``traceparent`` of a span context (the current one if None)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier.get("traceparent")


def tracing_enabled() -> bool:
    """Whether an SDK tracer provider is set (else spans are skipped, not just no-ops)."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


def metrics_enabled() -> bool:
    """Whether an SDK meter provider is set."""
    provider = metrics.get_meter_provider()
    return type(provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider")


class StepTelemetry:
    """Spans and metrics of one step, with its attributes computed once.

    When no SDK is configured the work is skipped altogether — not handed to
    no-op objects — because it sits on the per-event hot path. An incoming
    ``traceparent`` is still passed on unchanged.
    """

    def __init__(
        self,
        *,
        org: str,
        workflow: str,
        step: str,
        module_sha256: str,
        destination: str = "",
        consumer: str = "",
        server: tuple[str, int] | None = None,
    ) -> None:
        self.attributes = {
            "deadlift.org": org,
            "deadlift.workflow": workflow,
            "deadlift.step": step,
        }
        self.span_attributes: dict[str, Any] = {
            **self.attributes,
            "messaging.system": "nats",
            "deadlift.module.sha256": module_sha256,
        }
        if server is not None:
            self.span_attributes["server.address"], self.span_attributes["server.port"] = server
        # OpenTelemetry messaging conventions: "process <destination>", where the
        # destination is the step's (low-cardinality) input: its subject or triggers.
        self.destination = destination or f"{org}.{workflow}.{step}"
        self.consumer = consumer
        self.name = self.destination
        self.metrics = instruments()
        self.tracing = tracing_enabled()
        self.metering = metrics_enabled()

    def start_execution(
        self,
        headers: Mapping[str, str] | None,
        subject: str,
        attempt: int,
        run: str,
        *,
        message_id: str = "",
        size: int = 0,
    ) -> Span:
        """Start the CONSUMER span of one step execution; end it with :meth:`end_execution`."""
        if self.metering:
            self.metrics.events_in.add(1, self.attributes)
            self.metrics.in_flight.add(1, self.attributes)
        if not self.tracing:
            return INVALID_SPAN
        return TRACER.start_span(
            f"process {self.name}",
            context=extract(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                **self.span_attributes,
                "messaging.operation.name": "process",
                "messaging.operation.type": "process",
                "messaging.destination.name": subject,
                "messaging.consumer.group.name": self.consumer,
                "messaging.message.id": message_id,
                "messaging.message.body.size": size,
                "deadlift.attempt": attempt,
                "deadlift.run": run,
            },
        )

    def end_execution(self, span: Span) -> None:
        """End a step execution's span."""
        if self.metering:
            self.metrics.in_flight.add(-1, self.attributes)
        span.end()

    def traceparent(self, span: Span) -> str | None:
        """The ``traceparent`` for events this span produces (None when not tracing)."""
        return traceparent_of(trace.set_span_in_context(span)) if self.tracing else None

    def context_of(self, span: Span) -> Context | None:
        """A context holding ``span``, for spans made in another thread."""
        return trace.set_span_in_context(span) if self.tracing else None

    @contextmanager
    def module_call(self, function: str, parent: Span) -> Iterator[Span]:
        """The span of one module call (usable from the module's thread)."""
        if not self.tracing:
            yield INVALID_SPAN
            return
        with TRACER.start_as_current_span(
            f"module {function}",
            context=trace.set_span_in_context(parent),
            attributes={**self.span_attributes, "deadlift.function": function},
        ) as span:
            yield span

    @contextmanager
    def publish(
        self, subject: str, parent: Span, *, message_id: str = "", size: int = 0
    ) -> Iterator[Span]:
        """A PRODUCER span for one publish."""
        if not self.tracing:
            yield INVALID_SPAN
            return
        with TRACER.start_as_current_span(
            f"publish {subject}",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.PRODUCER,
            attributes={
                **self.span_attributes,
                "messaging.operation.name": "publish",
                "messaging.operation.type": "send",
                "messaging.destination.name": subject,
                "messaging.message.id": message_id,
                "messaging.message.body.size": size,
            },
        ) as span:
            yield span

    def record(
        self, outcome: str, seconds: float, *, outputs: int = 0, kind: str | None = None
    ) -> None:
        """Count an outcome (ok, filtered, retry, dead) and its duration."""
        if not self.metering:
            return
        m = self.metrics
        m.step_duration.record(seconds, {**self.attributes, "deadlift.outcome": outcome})
        if outcome == "ok":
            m.events_out.add(outputs, self.attributes)
        elif outcome == "filtered":
            m.filtered.add(1, self.attributes)
        else:
            m.failed.add(1, {**self.attributes, "deadlift.error.kind": kind or "error"})
            if outcome == "dead":
                m.dead_lettered.add(1, {**self.attributes, "deadlift.error.kind": kind or "error"})

    def record_module_time(self, seconds: float) -> None:
        """The time spent inside one module call."""
        if self.metering:
            self.metrics.module_duration.record(seconds, self.attributes)


def fail_span(span: Span, kind: str, message: str) -> None:
    """Mark a span failed with Deadlift's error kind."""
    span.set_status(Status(StatusCode.ERROR, message))
    span.set_attribute("deadlift.error.kind", kind)
    span.set_attribute("error.type", kind)


@contextmanager
def host_function_span(context: Any, name: str) -> Iterator[Span]:
    """A span for one host-function call, made in the module's thread."""
    if context is None:  # not tracing
        yield INVALID_SPAN
        return
    with TRACER.start_as_current_span(
        f"host_function {name}",
        context=context,
        attributes={"deadlift.host_function": name},
    ) as span:
        yield span


def configure(service_name: str = "deadlift-worker") -> Any:
    """Set up exporters from ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``.

    ``console`` prints to stderr (development), ``otlp`` sends to a collector
    (needs ``pip install deadlift[otlp]``; endpoint from ``OTEL_EXPORTER_OTLP_*``),
    ``none`` or unset disables. Returns a callable that flushes and shuts down.
    """
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    closers = []
    span_exporter = _span_exporter(os.environ.get("OTEL_TRACES_EXPORTER", "none"))
    if span_exporter is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
        closers.append(provider.shutdown)
    metric_exporter = _metric_exporter(os.environ.get("OTEL_METRICS_EXPORTER", "none"))
    if metric_exporter is not None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        interval = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
        reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=interval)
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        closers.append(meter_provider.shutdown)

    def shutdown() -> None:
        for close in closers:
            close()

    return shutdown


# OTEL_EXPORTER_OTLP_PROTOCOL (or its per-signal variant) picks the OTLP transport.
_OTLP = {
    ("traces", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "otlp"),
    ("traces", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "otlp-grpc"),
    ("metrics", "http/protobuf"): (
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        "otlp",
    ),
    ("metrics", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "otlp-grpc"),
}


def _otlp(signal: str) -> Any:
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    protocol = os.environ.get(variable) or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or "http/protobuf").strip().lower()
    if (signal, protocol) not in _OTLP:
        raise ConfigError(
            f"{variable} / OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use http/protobuf or grpc"
        )
    module_name, extra = _OTLP[(signal, protocol)]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"OTLP over {protocol} needs its exporter: pip install 'deadlift[{extra}]'"
        ) from None
    kind = "OTLPSpanExporter" if signal == "traces" else "OTLPMetricExporter"
    return getattr(module, kind)()


def _span_exporter(name: str) -> Any:
    name = name.strip().lower()
    if name in ("", "none"):
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        return _otlp("traces")
    raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r}: use console, otlp or none")


def _metric_exporter(name: str) -> Any:
    name = name.strip().lower()
    if name in ("", "none"):
        return None
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if name == "otlp":
        return _otlp("metrics")
    raise ConfigError(f"OTEL_METRICS_EXPORTER={name!r}: use console, otlp or none")


_CONTEXT_FIELDS = ("org", "workflow", "step", "run")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with Deadlift's context fields when a record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Python logging for the CLI: readable text, or JSON lines (``--log-format json``)."""
    if fmt not in ("text", "json"):
        raise ConfigError(f"log format {fmt!r}: use text or json")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
