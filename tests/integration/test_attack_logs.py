"""Hostile module logs through a worker on a real server and as a metric: a flooding step
is capped, a normal module's lines still arrive with their org/workflow/step/run fields,
and the dropped bytes are counted.

The escaping and the per-call cap, with the module host alone, are in tests/unit/test_logs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from nats.aio.client import Client

from deadlift.runtime.step import StepReport
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm import logs
from deadlift.wasm.hostfns import HostCall, host_function
from tests.conftest import module_path, publish, stored
from tests.unit.test_logs import TEN_MIB, Records, summaries


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Records:
    return Records.capture(caplog)


@pytest.mark.slow  # a fresh interpreter with an OpenTelemetry SDK
def test_dropped_bytes_are_counted_as_a_metric() -> None:
    script = textwrap.dedent(
        f"""
        import hashlib, json
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        from deadlift.wasm.host import ModuleHost, PluginSpec
        from deadlift.wasm.hostfns import HostCall
        wasm = open({str(module_path("hostile"))!r}, "rb").read()
        sha = hashlib.sha256(wasm).hexdigest()
        host = ModuleHost()
        host.add_binary(sha, wasm)
        spec = PluginSpec(sha256=sha, org="acme", timeout_ms=10000, max_pages=256)
        for run in ("a", "b"):
            ctx = HostCall(org="acme", workflow="attack", step="logs", run=run, event_id=run,
                           granted={{}}, log_limit=1000)
            host.call(spec, "flood", b'{{"lines": 100, "size": 100}}', ctx)
        found = []
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "deadlift.module.log_dropped":
                        found += [(dict(p.attributes), p.value) for p in m.data.data_points]
        print(json.dumps({{"unit": "By", "points": found}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DEADLIFT_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    attributes = {"deadlift.org": "acme", "deadlift.workflow": "attack", "deadlift.step": "logs"}
    assert result["points"] == [[attributes, 2 * 9000]]  # 9000 bytes dropped per call


@host_function
def past_purchases(call: HostCall, request: Any) -> Any:
    return {"purchases": [{"category": "shoes", "amount": 10, "ts": 1_700_000_000}] * 3}


@host_function
def send_email(call: HostCall, request: Any) -> Any:
    return {"id": "em_1"}


async def test_a_worker_caps_a_flooding_step_and_normal_logs_keep_their_context(
    nc: Client,
    settings: Settings,
    push: Any,
    apply: Any,
    records: Records,
) -> None:
    await push("hostile")
    await push("before_charge_action")
    await apply("""
name: noisy
org: acme
trigger: noisy.in
steps:
  - {name: flood, module: hostile, function: flood, publish: [noisy.out], timeout_ms: 20000,
     retry: {max_attempts: 1}}
""")
    await apply("""
name: charges
org: stripe
trigger: charges.in
steps:
  - name: check
    module: before_charge_action
    function: before_charge_action
    host_functions: [past_purchases, send_email]
""")
    reports: list[StepReport] = []
    functions = {"past_purchases": past_purchases, "send_email": send_email}
    async with Worker(
        nc, settings=settings, host_functions=functions, observers=[reports.append]
    ) as worker:
        flood = await publish(nc, "noisy.in", TEN_MIB)
        charge = await publish(
            nc,
            "charges.in",
            {
                "charge_id": "ch_1",
                "customer": "cus_42",
                "email": "zoë@example.com",
                "amount": 99.5,
                "category": "shoes",
                "ts": 1_700_000_000,
            },
        )
        await worker.drain(timeout=30)
    out = await stored(nc, "noisy.out")
    assert [e.data for e in out] == [{"logged": 10 * 1024 * 1024}]
    assert [r.outcome for r in reports if r.run == charge.id] == ["filtered"]

    flooded = [
        r for r in records if r.name == "deadlift.module" and getattr(r, "run", None) == flood.id
    ]
    assert sum(len(r.getMessage().removeprefix("[acme/noisy/flood] ")) for r in flooded) == (
        logs.default_limit()
    )
    [summary] = summaries(records, flood.id)
    assert summary.getMessage().startswith("[acme/noisy/flood] module logs over the limit")
    assert summary.log_dropped_bytes == 10 * 1024 * 1024 - logs.default_limit()  # type: ignore[attr-defined]

    [line] = [r for r in records if "similar purchase" in r.getMessage()]
    assert (line.org, line.workflow, line.step, line.run) == (  # type: ignore[attr-defined]
        "stripe",
        "charges",
        "check",
        charge.id,
    )
    assert line.getMessage().startswith("[stripe/charges/check] before_charge_action: ")
    assert summaries(records, charge.id) == []
