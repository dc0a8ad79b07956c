"""Bad input and hostile modules: each is recorded, nothing is lost, everything else flows."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus import dlq
from deadlift.errors import PayloadTooLargeError
from deadlift.model.topology import Stream
from deadlift.ops import dead_letters
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostCall, host_function
from tests.conftest import eventually, publish, stored

CALCULATOR = """
name: calculator
org: acme
trigger: calc.in
steps:
  - {name: add, module: add_ten, function: add_ten, next: [multiply]}
  - {name: multiply, module: multiply_by_five, function: multiply_by_five, publish: [calc.out]}
"""


def hostile_workflow(
    function: str, module: str = "hostile", grants: str = "[]", pages: int = 64
) -> str:
    return f"""
name: hostile-{function.replace("_", "-")}
org: evil
trigger: hostile.{function}
steps:
  - name: run
    module: {module}
    function: {function}
    timeout_ms: 200
    max_memory_pages: {pages}
    host_functions: {grants}
    publish: [hostile.out.{function}]
    retry: {{max_attempts: 2, backoff: [0.05]}}
"""


@host_function
def send_email(call: HostCall, request: Any) -> Any:
    return {"id": "never reached with garbage"}


@pytest.mark.parametrize(
    ("function", "data", "kind", "attempts"),
    [
        ("spin", {}, "timeout", 2),
        ("bomb", {}, "oom", 1),
        ("trap", {}, "trap", 2),
        ("fail", {}, "error", 2),
        ("huge", {"bytes": 600_000}, "output_too_large", 1),
        ("bad_host_call", {}, "host_function", 2),
    ],
)
async def test_hostile_module_is_dead_lettered_while_others_flow(
    nc: Client,
    settings: Settings,
    push: Any,
    apply: Any,
    function: str,
    data: Any,
    kind: str,
    attempts: int,
) -> None:
    for name in ("hostile", "bad_host", "add_ten", "multiply_by_five"):
        await push(name)
    if function == "bad_host_call":
        await apply(hostile_workflow(function, "bad_host", "[send_email]"))
    else:
        await apply(hostile_workflow(function))
    await apply(CALCULATOR)
    reports: list[StepReport] = []
    worker = Worker(
        nc, settings=settings, host_functions={"send_email": send_email}, observers=[reports.append]
    )
    async with worker:
        await publish(nc, f"hostile.{function}", data)
        for n in range(20):
            await publish(nc, "calc.in", {"value": n})
        await worker.drain()
        values = [e.data["value"] for e in await stored(nc, "calc.out")]
        letters = await dlq.letters(nc.jetstream())
        # The failed instance was dropped and a fresh one serves the next call.
        await publish(nc, f"hostile.{function}", data)
        await worker.drain()
    assert len(await dlq.letters(nc.jetstream())) == 2
    assert sorted(values) == [(n + 10) * 5 for n in range(20)]
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.org, letter.workflow, letter.step) == (
        "evil",
        f"hostile-{function}".replace("_", "-"),
        "run",
    )
    assert letter.kind == kind, letter.error
    assert letter.attempts == attempts
    assert letter.module and letter.subject == f"hostile.{function}"
    created = [c for spec, (_, c) in worker.host.pool_sizes().items() if spec.org == "evil"]
    assert created == [2 * attempts]  # one fresh instance per failed call


async def test_output_over_max_payload_fails_the_step_not_the_connection(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("hostile")
    await apply(hostile_workflow("huge", pages=512))
    roomy = settings.model_copy(update={"max_output_bytes": 4 * 1024 * 1024})
    async with Worker(nc, settings=roomy) as worker:
        await publish(nc, "hostile.huge", {"bytes": 1_200_000})  # over the 1 MiB max_payload
        await worker.drain()
        letters = await dlq.letters(nc.jetstream())
        assert worker.nc.is_connected
    assert letters[0].kind == "output_too_large"
    assert "max_payload" in letters[0].error


async def test_oversized_publish_is_refused_before_sending(
    nc: Client, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    await apply(CALCULATOR)
    with pytest.raises(PayloadTooLargeError, match=r"calc\.in.*max_payload"):
        await publish(nc, "calc.in", {"blob": "x" * (2 * 1024 * 1024)})
    assert nc.is_connected  # nats-py would have closed the client had the server rejected it
    await publish(nc, "calc.in", {"value": 1})


async def test_slow_step_reports_progress_and_is_not_redelivered(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """A call longer than ack_wait sends in_progress, so no other worker gets the event."""
    import time

    await push("before_charge_action")
    await apply("""
name: slow
org: stripe
trigger: slow.in
steps:
  - name: check
    module: before_charge_action
    function: before_charge_action
    host_functions: [past_purchases, send_email]
    timeout_ms: 6000
    publish: [slow.out]
""")

    @host_function
    def past_purchases(call: HostCall, request: Any) -> Any:
        time.sleep(2.5)  # a slow lookup: well over the 1 s ack_wait below
        return {"purchases": [{"category": "tea", "amount": 1, "ts": 0}] * 10}

    @host_function
    def send_email(call: HostCall, request: Any) -> Any:
        return {"id": "em_1"}

    quick = settings.model_copy(update={"ack_wait_s": 1.0})
    # The consumer's ack_wait comes from whoever created it: the worker below, which
    # makes the trigger's consumer for the first event it finds (not the apply).
    reports: list[StepReport] = []
    functions = {"past_purchases": past_purchases, "send_email": send_email}
    async with Worker(
        nc, settings=quick, host_functions=functions, observers=[reports.append]
    ) as worker:
        charge = {
            "charge_id": "c1",
            "customer": "x",
            "email": "x@y.z",
            "amount": 1,
            "category": "tea",
            "ts": 30 * 86400,
        }
        await publish(nc, "slow.in", charge)
        await worker.drain(timeout=20)
    out = await stored(nc, "slow.out")
    info = await nc.jetstream().consumer_info(Stream.EVENTS, "stripe--slow--check--trigger")
    assert info.config.ack_wait == 1.0
    assert len(out) == 1
    assert [(r.outcome, r.attempt) for r in reports] == [("ok", 1)]
    assert info.num_redelivered == 0


async def test_replay_runs_the_steps_current_module_version(
    nc: Client, settings: Settings, registry: Any, apply: Any
) -> None:
    from deadlift.ops.control import push_module_file
    from tests.conftest import module_path

    # Version 1 of "normalize" cannot handle the input; version 2 (a fix) can.
    await push_module_file(registry, module_path("add_ten"), name="normalize", version="1")
    flow = """
name: normalizer
org: acme
trigger: norm.in
steps:
  - {name: norm, module: normalize, function: _main, publish: [norm.out],
     retry: {max_attempts: 1}}
"""
    await apply(flow)
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "norm.in", {"text": "héllo"})
        await worker.drain()
        [letter] = await dlq.letters(nc.jetstream())
        assert letter.kind == "error" and "value" in letter.error

        fixed, _ = await push_module_file(
            registry, module_path("echo"), name="normalize", version="2"
        )
        await apply(flow)  # re-pins the step to normalize@2; the worker reloads it
        await eventually(
            lambda: worker.modules.get("acme.normalizer.norm") == fixed.sha256,
            message="worker runs normalize@2",
        )
        publisher = bus.JetStreamPublisher(nc)
        [done] = await dead_letters.replay(nc.jetstream(), publisher, registry, [letter.id])
        subject = done.subject
        await eventually(lambda: _any_stored(nc, "norm.out"), message="the replay ran")
        await worker.drain()
    out = await stored(nc, "norm.out")
    assert subject == "deadlift.step.acme.normalizer.norm"
    assert out[0].data == {"text": "héllo"}
    assert out[0].run == letter.headers["ce-id"]
    assert await dlq.letters(nc.jetstream()) == []  # replayed letters leave the queue


async def test_apply_refuses_retries_that_outlast_the_duplicate_window(
    push: Any, apply: Any
) -> None:
    from deadlift.errors import ConfigError

    await push("add_ten")
    with pytest.raises(ConfigError, match=r"step 'slow-retry': retry: .*duplicate window"):
        await apply("""
name: patient
org: acme
trigger: patient.in
steps:
  - {name: slow-retry, module: add_ten, function: add_ten,
     retry: {max_attempts: 3, backoff: [60, 90]}}
""")


async def _any_stored(nc: Client, subject: str) -> bool:
    return bool(await stored(nc, subject))
