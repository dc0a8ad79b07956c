"""Run records without a server: what a host's step tells a guest about its module's runs.

A step of stripe's workflow runs acme's module (``acme/before_charge_action@1``)
under the integration ``acme-at-stripe``; the runner is handed delivered
messages (``tests/unit/fakes.py``) and a memory publisher, whose ``sent`` list
holds the core publishes: the run records on their way to acme.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from deadlift.bus.publisher import MemoryPublisher
from deadlift.bus.streams import StepBinding
from deadlift.model import topology
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.runtime import runs
from deadlift.runtime.context import StepContext, StepReport
from deadlift.runtime.step import StepRunner
from deadlift.runtime.watchdog import Watchdog
from deadlift.settings import Settings
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall, HostFunction, host_function
from deadlift.wasm.logs import CAPTURE_LINES
from deadlift.wire import events
from tests.manifests import integration, logins
from tests.unit import step_harness
from tests.unit.fakes import FakeMsg, delivered

KEY = "UBA5VKKOGUIAHM6DF7GL4R2CSGTITX6A4HJXMRO2QJWESFMXVLMUNXG4"
RUNS_SUBJECT = "deadlift.share.acme.runs.charges.loyalty"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRET = "card 4242-4242 of customer cus_42"  # the host's data: never in a record


def manifest(*, logs: bool = True, payloads: bool = False) -> OrgManifest:
    modules = {"before_charge_action": {"grants": ["past_purchases", "send_email"]}, "hostile": {}}
    sees = {"logs": logs, "payloads": payloads}
    return OrgManifest.model_validate(
        {
            "orgs": logins("acme", "stripe", "globex"),
            "integrations": {"acme-at-stripe": integration(KEY, modules, guest_sees=sees)},
        }
    )


def charges(
    module: str = "acme/before_charge_action@1", function: str = "before_charge_action"
) -> str:
    grants = "[past_purchases, send_email]" if "before_charge" in module else "[]"
    return f"""
name: charges
org: stripe
trigger: stripe.charges
steps:
  - name: loyalty
    module: {module}
    function: {function}
    host_functions: {grants}
    publish: [stripe.out.acme.discounts]
    timeout_ms: 500
    retry: {{max_attempts: 3, backoff: [0.5, 2]}}
"""


def purchases(count: int) -> HostFunction:
    def past_purchases(call: HostCall, request: Any) -> Any:
        return {"purchases": [{"category": "shoes", "ts": 1000 - i} for i in range(count)]}

    return host_function(past_purchases)


@host_function
def send_email(call: HostCall, request: Any) -> Any:
    return {"id": "email-1"}


@host_function(name="past_purchases")
def purchases_down(call: HostCall, request: Any) -> Any:
    raise RuntimeError(f"lookup failed for {SECRET}")


CHARGE = {
    "charge_id": "ch_1",
    "customer": "cus_42",
    "email": "bob@example.com",
    "amount": 120,
    "category": "shoes",
    "ts": 1000,
}


class Harness(step_harness.Harness):
    """The shared harness, waiting for the run records a delivery sends."""

    async def deliver(self, *msgs: FakeMsg) -> None:
        await self.runner.handle(cast(Any, list(msgs)))
        for _ in range(100):  # records are sent by a task of their own, on the loop
            if self.runner.runs is None or self.runner.runs._task is None:
                break
            await asyncio.sleep(0)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.publisher.sent]


@pytest.fixture
def make(host: ModuleHost, executor: ThreadPoolExecutor) -> Any:
    def make_(
        text: str,
        *,
        orgs: OrgManifest | None = None,
        functions: dict[str, HostFunction] | None = None,
        publisher: MemoryPublisher | None = None,
    ) -> Harness:
        workflow = parse_workflow(text, source="test.yaml")
        step = workflow.steps[0]
        settings = Settings()
        name = step.module.partition("@")[0].rpartition("/")[2]
        spec = PluginSpec(
            sha256=step_harness.SHA[name],
            org=workflow.org,
            workflow=workflow.name,
            step=step.name,
            timeout_ms=step.timeout_ms or settings.default_timeout_ms,
            max_pages=settings.default_max_pages,
            host_functions=tuple(sorted(step.host_functions)),
            max_output_bytes=settings.max_output_bytes,
        )
        reports: list[StepReport] = []
        stats: Counter[str] = Counter()
        memory = publisher or MemoryPublisher()
        context = StepContext(
            js=cast(Any, None),
            publisher=memory,
            host=host,
            executor=executor,
            threads=2,
            settings=settings,
            watchdog=Watchdog(),
            functions=functions or {"past_purchases": purchases(12), "send_email": send_email},
            concurrency=8,
            stats=stats,
            on_report=reports.append,
            orgs=orgs if orgs is not None else manifest(),
        )
        binding = StepBinding(
            stream=Stream.EVENTS,
            consumer=topology.trigger_consumer(workflow.org, workflow.name, step.name),
        )
        return Harness(
            StepRunner(context, workflow, step, spec, binding, {}), memory, reports, stats
        )

    return make_


def charge_msg(data: Any, *, attempt: int = 1, id: str = "ev-1") -> FakeMsg:
    event = events.Event(
        data=data,
        id=id,
        source="test",
        type="charge",
        time="2024-01-01T00:00:00Z",
        traceparent=TRACEPARENT,
    )
    headers, body = events.encode(event)
    return delivered("stripe.charges", body, headers, attempt=attempt, seq=7)


# ------------------------------------------------------------------ one per outcome


async def test_an_ok_run_sends_one_record_with_the_run_and_the_modules_log(make: Any) -> None:
    h = make(charges())
    msg = charge_msg(CHARGE)
    await h.deliver(msg)

    assert msg.outcome == "ack"
    [sent] = h.publisher.sent
    assert sent.subject == RUNS_SUBJECT
    [record] = h.records()
    assert {k: record[k] for k in ("host", "integration", "workflow", "step", "module")} == {
        "host": "stripe",
        "integration": "acme-at-stripe",
        "workflow": "charges",
        "step": "loyalty",
        "module": "acme/before_charge_action@1",
    }
    assert record["module_sha256"] == step_harness.SHA["before_charge_action"]
    assert (record["outcome"], record["attempt"]) == ("ok", 1)
    assert (record["error_kind"], record["error"]) == (None, None)
    assert record["latency_ms"] > 0
    assert (record["run"], record["event_id"]) == ("ev-1", "ev-1")
    # The run's trace (the input's); the span is the step's own when a tracer is
    # installed (another test may have), else the input's.
    assert record["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert re.fullmatch(r"[0-9a-f]{16}", record["span_id"])
    assert record["time"].endswith("Z")
    [line] = record["logs"]
    assert line["level"] == "INFO"
    assert "12 similar purchase(s)" in line["text"] and "email email-1 sent" in line["text"]
    assert record["logs_dropped"] == 0
    assert "input" not in record and "output" not in record  # payloads: false
    assert h.stats["run_records"] == 1


async def test_a_filtered_run_is_recorded_as_filtered(make: Any) -> None:
    h = make(charges(), functions={"past_purchases": purchases(2), "send_email": send_email})
    await h.deliver(charge_msg(CHARGE))
    [record] = h.records()
    assert record["outcome"] == "filtered"
    assert "-> no discount" in record["logs"][0]["text"]


async def test_a_failing_run_is_recorded_per_attempt_and_dead_at_the_last(make: Any) -> None:
    h = make(charges())
    broken = {**CHARGE, "customer": 42}  # the module refuses a non-string customer
    msg = charge_msg(broken)
    await h.deliver(msg)
    await h.deliver(second := msg.redelivered())
    await h.deliver(second.redelivered())

    records = h.records()
    assert [(r["outcome"], r["attempt"]) for r in records] == [
        ("retry", 1),
        ("retry", 2),
        ("dead", 3),
    ]
    for record in records:
        assert record["error_kind"] == "error"
        assert "customer" in record["error"]  # the module's own message
        assert record["run"] == "ev-1"
    # The host's dead letter stays with the host, on its own DLQ stream.
    [letter] = h.publisher.messages
    assert letter.subject == topology.dlq_subject("stripe", "charges", "loyalty")
    assert all(m.subject == RUNS_SUBJECT for m in h.publisher.sent)


async def test_a_host_function_failure_tells_its_name_not_the_hosts_text(make: Any) -> None:
    h = make(charges(), functions={"past_purchases": purchases_down, "send_email": send_email})
    await h.deliver(charge_msg(CHARGE))
    [record] = h.records()
    assert (record["outcome"], record["error_kind"]) == ("retry", "host_function")
    assert record["error"] == "host function past_purchases failed (the host keeps the details)"
    assert SECRET not in h.publisher.sent[0].body.decode()
    # The host's own report keeps the whole message.
    assert SECRET in (h.reports[0].error or "")


async def test_an_undecodable_event_is_recorded_dead_without_its_content(make: Any) -> None:
    h = make(charges())
    msg = delivered("stripe.charges", SECRET.encode(), {"ce-specversion": "1.0"})
    await h.deliver(msg)
    assert msg.outcome == "term"
    [record] = h.records()
    assert (record["outcome"], record["error_kind"]) == ("dead", "decode")
    assert SECRET not in h.publisher.sent[0].body.decode()


# ------------------------------------------------------------- what the guest sees


async def test_payloads_only_when_the_integration_allows_them(make: Any) -> None:
    h = make(charges(), orgs=manifest(payloads=True))
    await h.deliver(charge_msg(CHARGE))
    [record] = h.records()
    assert record["input"] == CHARGE
    assert record["output"]["discount_percent"] == 10


async def test_no_logs_when_the_integration_hides_them(make: Any) -> None:
    h = make(charges(), orgs=manifest(logs=False))
    await h.deliver(charge_msg(CHARGE))
    [record] = h.records()
    assert "logs" not in record and record["outcome"] == "ok"


async def test_only_the_modules_own_lines_escaped_and_capped(make: Any) -> None:
    # The host's own line about a failed call ("call to fail encountered an error") is
    # not the module's.
    h = make(charges("acme/hostile@1", "fail"))
    await h.deliver(charge_msg({}))
    [failed] = h.records()
    assert failed["logs"] == [] and failed["error"].endswith("hostile: asked to fail")

    h = make(charges("acme/hostile@1", "say"))
    await h.deliver(charge_msg("fake\u2028line\u202e"))  # JSON keeps these as they are
    [said] = h.records()
    assert [line["text"] for line in said["logs"]] == ['"fake\\u2028line\\u202e"']

    h = make(charges("acme/hostile@1", "flood"))
    await h.deliver(charge_msg({"lines": CAPTURE_LINES + 30, "size": 10}))
    [flood] = h.records()
    assert len(flood["logs"]) == CAPTURE_LINES and flood["logs_dropped"] == 30

    h = make(charges("acme/hostile@1", "flood"))
    await h.deliver(charge_msg({"lines": 3, "size": 5000}))
    [big] = h.records()
    assert sum(len(line["text"]) for line in big["logs"]) <= runs.RECORD_LOG_BYTES
    assert big["logs"][-1]["text"].endswith("[truncated]") and big["logs_dropped"] == 1


# ------------------------------------------------------------------- never in the way


async def test_no_recorder_for_an_orgs_own_module_or_without_an_integration(make: Any) -> None:
    own = charges("add_ten", "add_ten")
    h = make(own)
    await h.deliver(charge_msg({"value": 1}))
    assert h.runner.runs is None and h.publisher.sent == []

    h = make(charges(), orgs=manifest().model_copy(update={"integrations": {}}))
    assert h.runner.runs is None


async def test_a_failed_record_never_fails_the_step(make: Any) -> None:
    class Unreachable(MemoryPublisher):
        async def send(self, subject: str, body: bytes) -> None:
            raise ConnectionError("nats: connection closed")

    h = make(charges(), publisher=Unreachable())
    msg = charge_msg(CHARGE)
    await h.deliver(msg)
    assert msg.outcome == "ack" and [r.outcome for r in h.reports] == ["ok"]
    assert len(h.publisher.messages) == 1  # the discount event was stored
    assert (h.stats["run_records"], h.stats["run_records_lost"]) == (0, 1)


def test_an_oversized_record_drops_payloads_then_logs() -> None:
    recorder = runs.RunRecorder(
        MemoryPublisher(),
        stats=Counter(),
        host="stripe",
        guest="acme",
        integration="acme-at-stripe",
        workflow=parse_workflow(charges(), source="t"),
        step=parse_workflow(charges(), source="t").steps[0],
        module_sha256="0" * 64,
        logs=True,
        payloads=True,
    )
    record = {"outcome": "ok", "input": "x" * 100_000, "output": "y", "logs": []}
    body = recorder.encode(dict(record))
    decoded = json.loads(body)
    assert "input" not in decoded and "output" not in decoded
    assert "payloads_omitted" in decoded and decoded["logs"] == []
    assert len(body) <= runs.RECORD_MAX_BYTES


def test_without_a_step_span_the_ids_are_the_inputs() -> None:
    assert runs.trace_ids(None, TRACEPARENT) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    )
    assert runs.trace_ids(None, "garbage") == (None, None)
