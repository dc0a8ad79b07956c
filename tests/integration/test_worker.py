"""Workers running real modules on a real JetStream: chains, filters, fan-out, failures."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client

from deadlift.bus import dlq
from deadlift.model.topology import Stream
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import eventually, publish, raw_messages, stored

CALCULATOR = """
name: calculator
org: acme
trigger: calc.in
steps:
  - name: add
    module: add_ten
    function: add_ten
    next: [multiply]
  - name: multiply
    module: multiply_by_five
    function: multiply_by_five
    publish: [calc.out]
"""


async def push_all(push: Any, *names: str) -> None:
    for name in names:
        await push(name)


async def test_three_step_chain_publishes_the_composed_result(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply("""
name: chain
org: acme
trigger: chain.in
steps:
  - {name: add, module: add_ten, function: add_ten, next: [times]}
  - {name: times, module: multiply_by_five, function: multiply_by_five, next: [again]}
  - {name: again, module: add_ten, function: add_ten, publish: [chain.out]}
""")
    async with Worker(nc, settings=settings) as worker:
        sent = await publish(nc, "chain.in", {"value": 1})
        await worker.drain()
    out = await stored(nc, "chain.out")
    assert [e.data for e in out] == [{"value": 65}]  # (1 + 10) * 5 + 10
    result = out[0]
    assert result.run == sent.id
    assert result.source == "deadlift://acme/chain/again"
    assert result.extensions[events.WORKFLOW] == "chain"
    assert result.extensions[events.STEP] == "again"


async def test_filter_ends_the_run_for_empty_and_null_output(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "filter_even", "multiply_by_five")
    await apply("""
name: evens
org: acme
trigger: evens.in
steps:
  - {name: keep-even, module: filter_even, function: filter_even, next: [times]}
  - {name: times, module: multiply_by_five, function: multiply_by_five, publish: [evens.out]}
""")
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:
        for n in range(1, 7):
            await publish(nc, "evens.in", {"value": n})
        await worker.drain()
    assert len([r for r in reports if r.step == "times"]) == 3
    out = await stored(nc, "evens.out")
    assert sorted(e.data["value"] for e in out) == [10, 20, 30]
    filtered = [r for r in reports if r.outcome == "filtered"]
    assert len(filtered) == 3 and all(r.step == "keep-even" for r in filtered)


async def test_json_null_output_is_a_filter(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("filter_even")
    await apply("""
name: odds
org: acme
trigger: odds.in
steps:
  - {name: only-odd, module: filter_even, function: only_odd_null, publish: [odds.out]}
""")
    async with Worker(nc, settings=settings) as worker:
        for n in (1, 2, 3):
            await publish(nc, "odds.in", {"value": n})
        await worker.drain()
    out = [e.data["value"] for e in await stored(nc, "odds.out")]
    assert sorted(out) == [1, 3]


async def test_fan_out_to_two_next_steps(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply("""
name: fan
org: acme
trigger: fan.in
steps:
  - {name: start, module: add_ten, function: add_ten, next: [left, right]}
  - {name: left, module: multiply_by_five, function: multiply_by_five, publish: [fan.left]}
  - {name: right, module: add_ten, function: add_ten, publish: [fan.right]}
""")
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "fan.in", {"value": 0})
        await worker.drain()
    left = await stored(nc, "fan.left")
    right = await stored(nc, "fan.right")
    assert left[0].data == {"value": 50}
    assert right[0].data == {"value": 20}
    assert left[0].run == right[0].run


async def test_publish_subject_reaches_another_subscriber(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply(CALCULATOR)
    received: list[events.Event] = []

    async def on_msg(msg: Any) -> None:
        received.append(events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-"))

    sub = await nc.subscribe("calc.out", cb=on_msg)
    async with Worker(nc, settings=settings):
        await publish(nc, "calc.in", {"value": 3})
        await eventually(lambda: received, message="subscriber got the output")
    await sub.unsubscribe()
    assert received[0].data == {"value": 65}
    assert received[0].extensions[events.ORG] == "acme"


async def test_headerless_foreign_trigger_is_accepted(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply(CALCULATOR)
    async with Worker(nc, settings=settings) as worker:
        await nc.publish("calc.in", b'{"value": 2}')  # plain NATS, no headers at all
        # Not acknowledged: wait until the stream has it, then until the worker is done.
        await eventually(lambda: raw_messages(nc, Stream.EVENTS, "calc.in"), message="stored")
        await worker.drain()
    out = await stored(nc, "calc.out")
    assert out[0].data == {"value": 60}
    assert out[0].run  # a run id is derived from the stream sequence


async def test_redelivered_input_does_not_duplicate_outputs(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply(CALCULATOR)
    async with Worker(nc, settings=settings) as worker:
        first = await publish(nc, "calc.in", {"value": 1})
        await worker.drain()
    # The same event published again (a producer retry) is dropped by Nats-Msg-Id…
    await publish(nc, "calc.in", {"value": 1}, id=first.id)
    # …and a re-run of the steps on the same input publishes with the same ids.
    async with Worker(nc, settings=settings) as worker:
        await worker.drain()
    assert [e.data for e in await stored(nc, "calc.out")] == [{"value": 55}]


async def test_failing_step_is_retried_then_dead_lettered(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("hostile")
    await apply("""
name: flaky
org: acme
trigger: flaky.in
steps:
  - name: fails
    module: hostile
    function: fail
    retry: {max_attempts: 3, backoff: [0.05]}
""")
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:
        await publish(nc, "flaky.in", {"x": 1})
        await worker.drain()
    assert [r.outcome for r in reports] == ["retry", "retry", "dead"]
    letters = await dlq.letters(nc.jetstream())
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.workflow, letter.step, letter.attempts) == ("flaky", "fails", 3)
    assert letter.kind == "error" and "asked to fail" in letter.error


async def test_endless_loop_times_out_and_other_steps_keep_flowing(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "hostile", "add_ten", "multiply_by_five")
    await apply("""
name: spinner
org: acme
trigger: spin.in
steps:
  - {name: spin, module: hostile, function: spin, timeout_ms: 100, retry: {max_attempts: 1}}
""")
    await apply(CALCULATOR)
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:
        await publish(nc, "spin.in", {})
        for n in range(5):
            await publish(nc, "calc.in", {"value": n})
        await worker.drain()
    out = [e.data["value"] for e in await stored(nc, "calc.out")]
    dead = [r for r in reports if r.outcome == "dead"]
    assert sorted(out) == [50, 55, 60, 65, 70]
    assert dead[0].error_kind == "timeout"


async def test_malformed_event_is_dead_lettered_not_fatal(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply(CALCULATOR)
    js = nc.jetstream()
    async with Worker(nc, settings=settings) as worker:
        await js.publish(
            "calc.in",
            b"\xc1",
            headers={"ce-specversion": "1.0", "ce-id": "x", "ce-source": "s", "ce-type": "t"},
        )
        await js.publish("calc.in", b"{}", headers={"ce-specversion": "1.0"})
        await publish(nc, "calc.in", {"value": 0})
        await worker.drain()
    assert [e.data for e in await stored(nc, "calc.out")] == [{"value": 50}]
    letters = await dlq.letters(nc.jetstream())
    assert len(letters) == 2
    assert {d.kind for d in letters} == {"decode"}
    assert any("ce-id" in d.error for d in letters)


async def test_step_needing_an_absent_host_function_is_not_started(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("before_charge_action")
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
    async with Worker(nc, settings=settings) as worker:
        assert worker.steps == []


async def test_shutdown_finishes_in_flight_events(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push_all(push, "add_ten", "multiply_by_five")
    await apply(CALCULATOR)
    worker = Worker(nc, settings=settings)
    await worker.start()
    for n in range(50):
        await publish(nc, "calc.in", {"value": n})
    await eventually(lambda: stored(nc, "calc.out"))
    await worker.shutdown()
    await worker.shutdown()  # idempotent
    info = await nc.jetstream().consumer_info(Stream.EVENTS, "acme--calculator--add--trigger")
    assert info.num_ack_pending == 0
