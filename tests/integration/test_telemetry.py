"""OpenTelemetry: one trace per run across steps and orgs; metrics after a known run."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.client import Client
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from tests.conftest import publish

SPANS = InMemorySpanExporter()
METRICS = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def providers() -> Iterator[None]:
    """Route the API to in-memory exporters (set once per process: OTel allows no reset)."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(SPANS))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[METRICS]))
    yield


@pytest.fixture(autouse=True)
def fresh() -> None:
    SPANS.clear()


def spans_of_run(run: str) -> list[ReadableSpan]:
    """Every span of the trace that the run's first step span belongs to."""
    spans = SPANS.get_finished_spans()
    first = next(s for s in spans if s.attributes.get("deadlift.run") == run)
    trace_id = first.context.trace_id
    return [s for s in spans if s.context.trace_id == trace_id]


async def test_a_cross_org_run_is_one_trace_with_steps_chained() -> None:
    from deadlift.demo import run_demo

    assert await run_demo(verbose=False)
    spans = spans_of_run("ch_001")  # alice: a discount, so the run crosses to Acme
    by_name = {s.name: s for s in spans}
    # Messaging conventions: "process <destination>", the step's trigger or input subject.
    before = by_name["process stripe.charges.acme"]
    notice = by_name["process deadlift.step.stripe.acme-charges.notice"]
    aggregate = by_name["process acme.in.stripe.discounts"]
    # One trace: each step's span is the child of the step before, across accounts.
    assert before.parent is None
    assert notice.parent.span_id == before.context.span_id
    assert aggregate.parent.span_id == notice.context.span_id
    for span in (before, notice, aggregate):
        assert span.kind is SpanKind.CONSUMER
        assert span.attributes["messaging.system"] == "nats"
        assert span.attributes["deadlift.run"] == "ch_001"
        assert span.attributes["deadlift.attempt"] == 1
        assert len(str(span.attributes["deadlift.module.sha256"])) == 64
        assert span.attributes["messaging.operation.name"] == "process"
        assert span.attributes["messaging.message.body.size"] > 0
        assert span.attributes["messaging.message.id"]
        assert span.attributes["server.address"] == "127.0.0.1"
    assert before.attributes["messaging.message.id"] == "ch_001"
    assert before.attributes["messaging.consumer.group.name"] == (
        "stripe--acme-charges--before-charge--trigger"
    )
    assert notice.attributes["messaging.consumer.group.name"] == "stripe--acme-charges--notice"
    assert aggregate.attributes["deadlift.org"] == "acme"
    assert before.attributes["deadlift.org"] == "stripe"
    assert aggregate.attributes["messaging.destination.name"] == "acme.in.stripe.discounts"
    # The module call and its host functions are children of the step's span.
    module = by_name["module before_charge_action"]
    assert module.parent.span_id == before.context.span_id
    under_module = {
        s.name for s in spans if s.parent and s.parent.span_id == module.context.span_id
    }
    assert under_module == {"host_function past_purchases", "host_function send_email"}
    assert "host_function kv_incr" in {s.name for s in spans}  # Acme's step, same trace
    publishes = [s for s in spans if s.kind is SpanKind.PRODUCER]
    assert "publish stripe.out.acme.discounts" in {s.name for s in publishes}


def points(name: str) -> dict[tuple[Any, ...], float]:
    """Sum of a metric's data points by (step, kind/outcome) attributes."""
    totals: dict[tuple[Any, ...], float] = defaultdict(float)
    data = METRICS.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    a = point.attributes
                    key = (
                        a.get("deadlift.workflow"),
                        a.get("deadlift.step"),
                        a.get("deadlift.error.kind") or a.get("deadlift.outcome"),
                    )
                    totals[key] += getattr(point, "value", None) or getattr(point, "count", 0)
    return totals


async def test_metrics_count_a_known_run(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    for name in ("filter_even", "multiply_by_five", "hostile"):
        await push(name)
    await apply("""
name: metered
org: acme
trigger: metered.in
steps:
  - {name: keep-even, module: filter_even, function: filter_even, next: [times]}
  - {name: times, module: multiply_by_five, function: multiply_by_five, publish: [metered.out]}
""")
    await apply("""
name: doomed
org: acme
trigger: doomed.in
steps:
  - {name: fail, module: hostile, function: fail, retry: {max_attempts: 2, backoff: [0.05]}}
""")
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:
        for n in range(6):
            await publish(nc, "metered.in", {"value": n})
        await publish(nc, "doomed.in", {})
        await worker.drain()
    assert len(reports) == 6 + 3 + 2, "all reports"
    ins, outs = points("deadlift.events.in"), points("deadlift.events.out")
    assert ins[("metered", "keep-even", None)] == 6
    assert ins[("metered", "times", None)] == 3
    assert outs[("metered", "keep-even", None)] == 3
    assert outs[("metered", "times", None)] == 3
    assert points("deadlift.events.filtered")[("metered", "keep-even", None)] == 3
    assert points("deadlift.events.failed")[("doomed", "fail", "error")] == 2
    assert points("deadlift.events.dead_lettered")[("doomed", "fail", "error")] == 1
    durations = points("deadlift.step.duration")
    assert durations[("metered", "keep-even", "filtered")] == 3  # histogram counts
    assert durations[("metered", "times", "ok")] == 3
    assert points("deadlift.module.duration")[("metered", "times", None)] == 3
    assert points("deadlift.events.in_flight")[("metered", "times", None)] == 0
    failed = [s for s in SPANS.get_finished_spans() if s.name == "process doomed.in"]
    assert failed and all(s.status.status_code is StatusCode.ERROR for s in failed)
    assert {s.attributes["deadlift.error.kind"] for s in failed} == {"error"}


def test_module_logs_carry_the_step_context(caplog: pytest.LogCaptureFixture) -> None:
    """Plugin log lines reach Python logging with org/workflow/step/run as record fields."""
    import asyncio

    from deadlift.demo import run_demo

    with caplog.at_level(logging.INFO, logger="deadlift.module"):
        assert asyncio.run(run_demo(verbose=False))
    records = [r for r in caplog.records if r.name == "deadlift.module"]
    assert records, "the module logged nothing"
    decision = next(r for r in records if "ch_002" in r.getMessage())
    assert (decision.org, decision.workflow, decision.step) == (  # type: ignore[attr-defined]
        "stripe",
        "acme-charges",
        "before-charge",
    )
    assert decision.run == "ch_002"  # type: ignore[attr-defined]
