"""The step loop without a server: real modules, a memory publisher, fake deliveries.

Each test hands a :class:`StepRunner` delivered messages (``tests/unit/fakes.py``)
and checks what a user would see: what was published where with which ids, and
whether the event was acked, nak'd with the step's backoff, or dead-lettered and termed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import nats.errors
import pytest

from deadlift.bus import dlq
from deadlift.bus.publisher import MSG_ID, MemoryPublisher, Published
from deadlift.bus.pull import Pull
from deadlift.bus.streams import StepBinding
from deadlift.model import topology
from deadlift.model.topology import Stream, step_subject
from deadlift.model.workflow import parse_workflow
from deadlift.runtime import step as step_module
from deadlift.runtime.context import StepContext, StepReport
from deadlift.runtime.step import CRASH_LOOP_DELIVERIES, StepRunner
from deadlift.runtime.watchdog import Watchdog
from deadlift.settings import Settings
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall, HostFunction, host_function
from deadlift.wire import events
from tests.unit import step_harness
from tests.unit.fakes import FakeCoreSub, FakeMsg, delivered

CALCULATOR = """
name: calc
org: acme
trigger: calc.in
steps:
  - {name: add, module: add_ten, function: add_ten, next: [times], publish: [calc.out]}
  - {name: times, module: multiply_by_five, function: multiply_by_five}
"""
TARGETS = (step_subject("acme", "calc", "times"), "calc.out")


def flaky(function: str, module: str = "hostile", **step: Any) -> str:
    """A one-step workflow running ``module``'s ``function`` with 3 attempts, backoff 0.5, 2."""
    fields = {
        "name": "fails",
        "module": module,
        "function": function,
        "timeout_ms": 100,
        "retry": {"max_attempts": 3, "backoff": [0.5, 2]},
        "publish": ["flaky.out"],
        **step,
    }
    return json.dumps({"name": "flaky", "org": "acme", "trigger": "flaky.in", "steps": [fields]})


class Harness(step_harness.Harness):
    """The shared harness, with the views these tests read."""

    def outcomes(self) -> list[str]:
        return [r.outcome for r in self.reports]


@pytest.fixture
def make(host: ModuleHost, executor: ThreadPoolExecutor) -> Any:
    """Build a :class:`Harness` for one step of a workflow given as YAML."""

    def make_(
        text: str,
        step: str | None = None,
        *,
        binding: StepBinding | None = None,
        publisher: MemoryPublisher | None = None,
        functions: dict[str, HostFunction] | None = None,
    ) -> Harness:
        workflow = parse_workflow(text, source="test.yaml")
        chosen = workflow.step(step) if step else workflow.steps[0]
        settings = Settings()
        spec = PluginSpec(
            sha256=step_harness.SHA[chosen.module],
            org=workflow.org,
            workflow=workflow.name,
            step=chosen.name,
            timeout_ms=chosen.timeout_ms or settings.default_timeout_ms,
            max_pages=settings.default_max_pages,
            host_functions=tuple(sorted(chosen.host_functions)),
            max_output_bytes=settings.max_output_bytes,
        )
        reports: list[StepReport] = []
        stats: Counter[str] = Counter()
        memory = publisher or MemoryPublisher()
        context = StepContext(
            js=cast(Any, None),  # only start() binds to a consumer; these tests never pull
            publisher=memory,
            host=host,
            executor=executor,
            threads=2,
            settings=settings,
            watchdog=Watchdog(),
            functions=functions or {},
            concurrency=8,
            stats=stats,
            on_report=reports.append,
        )
        binding = binding or StepBinding(
            stream=Stream.EVENTS,
            consumer=topology.trigger_consumer(workflow.org, workflow.name, chosen.name),
        )
        runner = StepRunner(context, workflow, chosen, spec, binding, services={})
        return Harness(runner, memory, reports, stats)

    return make_


def event_msg(
    data: Any,
    subject: str = "calc.in",
    *,
    id: str = "ev-1",
    extensions: dict[str, str] | None = None,
    extra_headers: dict[str, str] | None = None,
    **delivery: Any,
) -> FakeMsg:
    """A Deadlift event as delivered from a stream."""
    event = events.Event(
        data=data,
        id=id,
        source="test",
        type="test.event",
        time="2024-01-01T00:00:00Z",
        extensions=extensions or {},
    )
    headers, body = events.encode(event)
    return delivered(subject, body, {**headers, **(extra_headers or {})}, **delivery)


def decoded(message: Published) -> events.Event:
    return events.decode(message.headers, message.body, fallback_id="-", fallback_source="-")


def letters(publisher: MemoryPublisher) -> list[Published]:
    return [m for m in publisher.messages if m.subject.startswith(f"{topology.DLQ_PREFIX}.")]


# ------------------------------------------------------------------- success


async def test_an_output_is_published_once_per_target_with_deterministic_ids(make: Any) -> None:
    h = make(CALCULATOR, "add")
    msg = event_msg({"value": 1})
    await h.deliver(msg)

    assert msg.settled == [("ack", None)]
    assert [m.subject for m in h.publisher.messages] == list(TARGETS)
    out_id = topology.output_id("test", "ev-1", "acme.calc", "add")
    for message in h.publisher.messages:
        assert message.headers[MSG_ID] == topology.output_msg_id(out_id, message.subject)
        out = decoded(message)
        assert out.data == {"value": 11}
        assert (out.id, out.run, out.source) == (out_id, "ev-1", "deadlift://acme/calc/add")
    [report] = h.reports
    assert (report.outcome, report.output, report.targets) == ("ok", {"value": 11}, TARGETS)


@pytest.mark.parametrize(
    ("function", "value"), [("filter_even", 3), ("only_odd_null", 2)], ids=["empty", "null"]
)
async def test_a_filter_acks_and_publishes_nothing(make: Any, function: str, value: int) -> None:
    h = make(
        "{name: evens, org: acme, trigger: evens.in, steps: "
        f"[{{name: keep, module: filter_even, function: {function}, publish: [evens.out]}}]}}"
    )
    msg = event_msg({"value": value}, "evens.in")
    await h.deliver(msg)
    assert msg.settled == [("ack", None)]
    assert h.publisher.messages == []
    assert h.outcomes() == ["filtered"]


async def test_a_redelivered_event_publishes_the_same_ids_and_is_stored_once(make: Any) -> None:
    h = make(CALCULATOR, "add")
    first = event_msg({"value": 1})
    await h.deliver(first)
    stored = list(h.publisher.messages)
    again = first.redelivered()  # the ack was lost: the server delivers it again
    await h.deliver(again)

    assert (first.outcome, again.outcome) == ("ack", "ack")
    assert h.publisher.messages == stored  # same Nats-Msg-Id: deduplicated
    assert h.stats["duplicate"] == len(TARGETS)
    assert h.outcomes() == ["ok", "ok"]


async def test_a_headerless_message_gets_an_id_from_where_it_is_stored(make: Any) -> None:
    h = make(CALCULATOR, "add")
    first = delivered("calc.in", b'{"value": 2}', seq=41)  # a plain NATS publish
    await h.deliver(first)
    await h.deliver(first.redelivered())
    [out, _] = h.publisher.messages
    assert decoded(out).run == topology.foreign_event_id(
        Stream.EVENTS, 41
    )  # the input's derived id
    assert decoded(out).data == {"value": 12}
    assert h.stats["duplicate"] == len(TARGETS)  # the redelivery derived the same ids


async def test_each_event_of_a_batch_is_settled_on_its_own(make: Any) -> None:
    h = make(CALCULATOR, "add")
    good = event_msg({"value": 1}, id="good", seq=1)
    broken = delivered("calc.in", b"{}", {"ce-specversion": "1.0"}, seq=2)
    bad_input = event_msg({"value": "x"}, id="bad", seq=3)  # add_ten fails on it
    await h.deliver(good, broken, bad_input)
    assert (good.outcome, broken.outcome, bad_input.outcome) == ("ack", "term", "nak")
    assert {m.subject for m in h.publisher.messages if m.subject in TARGETS} == set(TARGETS)
    assert [m.headers[dlq.H_KIND] for m in letters(h.publisher)] == ["decode"]


# ---------------------------------------------------------- retry, dead letter


def charges_fail(call: HostCall, request: Any) -> Any:
    raise RuntimeError("database is down")


@pytest.mark.parametrize(
    ("module", "function", "kind", "data", "granted"),
    [
        ("hostile", "trap", "trap", {}, {}),
        ("hostile", "spin", "timeout", {}, {}),
        ("hostile", "fail", "error", {}, {}),
        (
            "before_charge_action",
            "before_charge_action",
            "host_function",
            {
                "charge_id": "c",
                "customer": "x",
                "email": "e@x",
                "amount": 1,
                "category": "c",
                "ts": 0,
            },
            {
                "past_purchases": host_function(charges_fail, name="past_purchases"),
                "send_email": host_function(lambda call, request: {}, name="send_email"),
            },
        ),
    ],
    ids=["trap", "timeout", "guest-error", "host-function"],
)
async def test_a_failing_call_is_retried_with_backoff_then_dead_lettered(
    make: Any, module: str, function: str, kind: str, data: Any, granted: dict[str, Any]
) -> None:
    text = flaky(function, module, host_functions=sorted(granted), timeout_ms=200)
    h = make(text, functions=granted)
    msg = event_msg(data, "flaky.in", seq=9)

    await h.deliver(msg)
    assert msg.settled == [("nak", 0.5)]  # backoff[0]
    second = msg.redelivered()
    await h.deliver(second)
    assert second.settled == [("nak", 2.0)]  # backoff[1]
    assert h.publisher.messages == []
    last = second.redelivered()
    await h.deliver(last)

    assert last.settled == [("term", None)]
    assert h.outcomes() == ["retry", "retry", "dead"]
    assert {r.error_kind for r in h.reports} == {kind}
    [letter] = h.publisher.messages
    assert letter.subject == topology.dlq_subject("acme", "flaky", "fails")
    assert letter.body == msg.data
    assert letter.headers[MSG_ID] == topology.dlq_msg_id(Stream.EVENTS, 9, "acme", "flaky", "fails")
    assert {k: letter.headers[k] for k in (dlq.H_ORG, dlq.H_WORKFLOW, dlq.H_STEP)} == {
        dlq.H_ORG: "acme",
        dlq.H_WORKFLOW: "flaky",
        dlq.H_STEP: "fails",
    }
    assert letter.headers[dlq.H_KIND] == kind
    assert letter.headers[dlq.H_ATTEMPTS] == "3"
    assert letter.headers[dlq.H_SUBJECT] == "flaky.in"
    assert letter.headers[dlq.H_STREAM] == Stream.EVENTS
    assert letter.headers[dlq.H_SEQ] == "9"
    assert letter.headers[dlq.H_MODULE] == step_harness.SHA[module]
    assert letter.headers["ce-id"] == "ev-1"  # the original headers travel with it


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ce-specversion": "1.0"}, b"{}"),  # required attributes missing
        ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "s", "ce-type": "t"}, b"\xc1"),
    ],
    ids=["missing-attributes", "corrupt-body"],
)
async def test_an_undecodable_event_is_dead_lettered_at_once(
    make: Any, headers: dict[str, str], body: bytes
) -> None:
    h = make(CALCULATOR, "add")
    msg = delivered("calc.in", body, headers)
    await h.deliver(msg)
    assert msg.settled == [("term", None)]
    [letter] = h.publisher.messages
    assert letter.subject == topology.dlq_subject("acme", "calc", "add")
    assert (letter.headers[dlq.H_KIND], letter.headers[dlq.H_ATTEMPTS]) == ("decode", "1")
    assert letter.body == body
    assert h.outcomes() == ["dead"]


async def test_redeliveries_without_a_failure_run_until_the_crash_loop_bound(make: Any) -> None:
    h = make(CALCULATOR, "add")  # max_attempts 3 (the default)
    bound = 3 + CRASH_LOOP_DELIVERIES
    still_runs = event_msg({"value": 1}, attempt=bound)
    await h.deliver(still_runs)
    assert still_runs.outcome == "ack"
    assert len(h.publisher.messages) == len(TARGETS)

    crash_loop = still_runs.redelivered()
    await h.deliver(crash_loop)
    assert crash_loop.settled == [("term", None)]
    [letter] = letters(h.publisher)
    assert letter.headers[dlq.H_KIND] == "exhausted"
    assert letter.headers[dlq.H_ATTEMPTS] == str(bound + 1)
    assert h.outcomes() == ["ok", "dead"]


async def test_an_output_over_max_payload_is_dead_lettered_not_sent(make: Any) -> None:
    h = make(flaky("huge"), publisher=MemoryPublisher(max_payload=4096))
    msg = event_msg({"bytes": 5000}, "flaky.in")
    await h.deliver(msg)
    assert msg.settled == [("term", None)]  # not retryable: the same output again
    [letter] = h.publisher.messages
    assert letter.subject == topology.dlq_subject("acme", "flaky", "fails")
    assert letter.headers[dlq.H_KIND] == "output_too_large"
    assert "max_payload" in letter.headers[dlq.H_ERROR]


async def test_a_failing_dead_letter_is_not_lost_but_retried(make: Any) -> None:
    h = make(flaky("trap"), publisher=MemoryPublisher())
    last = event_msg({}, "flaky.in", attempt=3)
    h.publisher.fail_with = nats.errors.NoRespondersError()
    await h.deliver(last)
    assert last.settled == [("nak", 1.0)]
    assert h.publisher.messages == []


# ------------------------------------------------------------------ outages


async def test_a_publish_outage_is_retried_in_place(make: Any) -> None:
    h = make(CALCULATOR, "add")
    msg = event_msg({"value": 1})
    h.publisher.fail_with = nats.errors.NoRespondersError()  # e.g. a leader election
    task = asyncio.ensure_future(h.deliver(msg))
    await asyncio.wait_for(msg.progressed.wait(), 5)  # kept alive while waiting
    h.publisher.fail_with = None
    await asyncio.wait_for(task, 10)

    assert msg.outcome == "ack"
    assert ("nak", 0.5) not in msg.settled and h.reports[0].attempt == 1
    assert [m.subject for m in h.publisher.messages] == list(TARGETS)
    assert h.outcomes() == ["ok"]


async def test_a_publish_outage_longer_than_the_window_spends_an_attempt(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_module, "OUTAGE_RETRY_S", 0.3)
    h = make(flaky("ok"))
    msg = event_msg({"value": 1}, "flaky.in")
    h.publisher.fail_with = nats.errors.NoRespondersError()
    await h.deliver(msg)
    assert msg.outcome == "nak"
    assert msg.settled[-1] == ("nak", 0.5)  # the step's backoff
    assert ("in_progress", None) in msg.settled  # published again once in place
    assert h.publisher.messages == []
    [report] = h.reports
    assert (report.outcome, report.error_kind) == ("retry", "publish")


# --------------------------------------------------------------- provenance


def stripe_import() -> StepBinding:
    return StepBinding(
        stream=topology.import_stream("STRIPE"),
        consumer=topology.import_consumer("acme", "calc", "add", "stripe"),
        origin="stripe",
    )


@pytest.mark.parametrize("relay", ["Nats-Stream", "Nats-Stream-Source"])
async def test_a_forged_import_is_dead_lettered_with_kind_provenance(make: Any, relay: str) -> None:
    h = make(CALCULATOR, "add", binding=stripe_import())
    msg = event_msg({"value": 1}, extra_headers={relay: "DEADLIFT_EVENTS"})
    await h.deliver(msg)
    assert msg.settled == [("term", None)]
    [letter] = h.publisher.messages  # the module never ran: nothing else was published
    assert letter.headers[dlq.H_KIND] == "provenance"
    assert "forged import" in letter.headers[dlq.H_ERROR]
    assert h.reports[0].outcome == "dead"


@pytest.mark.parametrize("claimed", [None, "globex", "stripe"])
async def test_an_imports_provenance_comes_from_the_binding_not_headers(
    make: Any, claimed: str | None
) -> None:
    h = make(CALCULATOR, "add", binding=stripe_import())
    ext = {events.ORIGIN: claimed} if claimed else {}
    await h.deliver(event_msg({"value": 1}, extensions=ext))
    out_id = topology.output_id("test", "ev-1", "acme.calc", "add", "stripe")
    for message in h.publisher.messages:
        out = decoded(message)
        assert out.origin == "stripe"
        assert out.id == out_id
        assert message.headers[MSG_ID] == topology.output_msg_id(out_id, message.subject)
    assert h.reports[0].origin == "stripe"


async def test_an_own_trigger_drops_a_claimed_origin(make: Any) -> None:
    h = make(CALCULATOR, "add")
    await h.deliver(event_msg({"value": 1}, extensions={events.ORIGIN: "stripe"}))
    for message in h.publisher.messages:
        assert decoded(message).origin is None
        assert decoded(message).id == topology.output_id("test", "ev-1", "acme.calc", "add")
    assert h.reports[0].origin is None


async def test_a_step_input_keeps_the_runs_provenance(make: Any) -> None:
    h = make(CALCULATOR, "times", binding=StepBinding(Stream.STEPS, "acme--calc--times"))
    await h.deliver(
        event_msg(
            {"value": 11},
            step_subject("acme", "calc", "times"),
            extensions={events.ORIGIN: "stripe", events.RUN: "run-7"},
            stream=Stream.STEPS,
        )
    )
    [report] = h.reports
    assert (report.outcome, report.origin, report.run) == ("ok", "stripe", "run-7")
    assert report.output == {"value": 55}


async def test_a_dead_lettered_import_keeps_its_stamped_provenance(make: Any) -> None:
    binding = StepBinding(
        stream=topology.import_stream("STRIPE"),
        consumer=topology.import_consumer("acme", "flaky", "fails", "stripe"),
        origin="stripe",
    )
    h = make(flaky("fail"), binding=binding)
    msg = event_msg({}, "flaky.in", extensions={events.ORIGIN: "globex"}, attempt=3)
    await h.deliver(msg)
    [letter] = h.publisher.messages  # replayed into the step's input, it stays stripe's
    assert letter.headers[f"{events.PREFIX}{events.ORIGIN}"] == "stripe"


# -------------------------------------------------------------- the fast lane


def counting_submits(executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the batches handed to the module threads (one list item per submit)."""
    submits: list[int] = []
    submit = executor.submit

    def counted(*args: Any, **kwargs: Any) -> Any:
        submits.append(1)
        return submit(*args, **kwargs)

    monkeypatch.setattr(executor, "submit", counted)
    return submits


async def deliver_until_fast(h: Harness, data: Any, limit: int = 300) -> int:
    """Deliver lone events (as a caught-up step pulls them) until the fast lane opens."""
    for n in range(limit):
        await h.deliver(event_msg(data, id=f"warm-{n}"))
        if h.runner.calls.fast:
            return n + 1
    raise AssertionError(f"the fast lane never opened in {limit} quick calls")


async def deliver_until_on_loop(h: Harness, submits: list[int], data: Any) -> None:
    """Deliver lone events until one runs on the loop (its fast-lane instance made)."""
    await deliver_until_fast(h, data)
    for n in range(50):
        before = len(submits)
        await h.deliver(event_msg(data, id=f"lane-{n}"))
        if len(submits) == before:
            return
    raise AssertionError("no lone event ran on the loop")


async def test_a_quick_modules_lone_events_run_on_the_loop_once_it_proved_quick(
    make: Any, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(CALCULATOR, "add")
    submits = counting_submits(executor, monkeypatch)
    warmed = await deliver_until_fast(h, {"value": 1})
    assert len(submits) == warmed  # until then, each in a module thread
    for n in range(20):
        await h.deliver(event_msg({"value": n}, id=f"ev-{n}"))
    assert len(submits) <= warmed + 2  # at most one more (its fast-lane instance), not 20
    assert [r.output for r in h.reports[-20:]] == [{"value": n + 10} for n in range(20)]
    assert {r.outcome for r in h.reports} == {"ok"}


async def test_a_batch_still_runs_in_the_module_threads(
    make: Any, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(CALCULATOR, "add")
    submits = counting_submits(executor, monkeypatch)
    await h.deliver(*(event_msg({"value": n}, id=f"first-{n}") for n in range(4)))
    assert len(submits) == 2  # not yet known to be quick: split over both threads
    await deliver_until_fast(h, {"value": 1})
    submits.clear()
    await h.deliver(*(event_msg({"value": n}, id=f"ev-{n}") for n in range(4)))
    assert len(submits) == 1  # quick: whole, to one thread (fewer wakes and GIL hand-offs)
    assert [r.output for r in h.reports[-4:]] == [{"value": n + 10} for n in range(4)]


async def test_a_module_turning_slow_holds_the_loop_for_milliseconds_then_leaves_it(
    make: Any, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(flaky("loop", timeout_ms=5000))
    submits = counting_submits(executor, monkeypatch)
    await deliver_until_on_loop(h, submits, {"loops": 100})
    submits.clear()
    stalls: list[float] = []

    async def tick() -> None:  # how long the loop goes without a turn
        while True:
            began = time.perf_counter()
            await asyncio.sleep(0)
            stalls.append(time.perf_counter() - began)

    ticker = asyncio.create_task(tick())
    slow = event_msg({"loops": 50_000_000}, id="slow")  # ~100 ms of counting
    began = time.perf_counter()
    await h.deliver(slow)
    took = time.perf_counter() - began
    ticker.cancel()
    # Cut off on the loop at the fast lane's timeout, then run whole in a thread.
    assert slow.settled == [("ack", None)]
    assert h.reports[-1].output == {"loops": 50_000_000}
    assert len(submits) == 1
    stalled = max(stalls)
    assert stalled < took / 4, f"the loop stalled {stalled * 1e3:.1f} ms of {took * 1e3:.1f}"
    assert not h.runner.calls.fast
    # Back to the threads until it proves quick for twice as long.
    await h.deliver(event_msg({"loops": 100}, id="after"))
    assert len(submits) == 2
    assert h.runner.calls.strikes == 1


async def test_a_step_granting_host_functions_never_runs_on_the_loop(
    make: Any, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(
        flaky("echo", module="echo", host_functions=["send_email"]),
        functions={"send_email": host_function(lambda call, request: {}, name="send_email")},
    )
    submits = counting_submits(executor, monkeypatch)
    for n in range(60):
        await h.deliver(event_msg("hi", id=f"ev-{n}"))
    assert len(submits) == 60
    assert {r.outcome for r in h.reports} == {"ok"}


# --- stopping -------------------------------------------------------------------


class FlushCountingNats:
    """A connection that counts flushes (PING/PONG round trips) and delivers nothing."""

    def __init__(self) -> None:
        self.flushes = 0

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def flush(self, timeout: float = 2) -> None:
        self.flushes += 1

    async def subscribe(self, subject: str, **_: Any) -> Any:
        sub = FakeCoreSub()
        sub._pending_queue = asyncio.Queue()  # type: ignore[attr-defined]
        return sub


@pytest.mark.parametrize("pulled", [False, True])
async def test_stopping_a_step_that_never_pulled_costs_no_round_trip(
    make: Any, pulled: bool
) -> None:
    # 10,000 workflows stopping: a PING per cold step was 30,000 round trips (~30 s).
    h = make(CALCULATOR, "add")
    nc = FlushCountingNats()
    h.runner._pull = Pull(cast(Any, nc), "S", "c")
    if pulled:
        await h.runner._pull.start()
    await h.runner.stop()
    if pulled:  # events the server sent may be on their way: wait for them
        assert nc.flushes >= 1
    else:
        assert nc.flushes == 0


async def test_steps_stopping_together_share_a_round_trip(make: Any) -> None:
    # 10,000 workflows: 60,000 PINGs at once outran their 2 s timeout, and SIGTERM
    # ran out of its 25 s (exit 70). A PING sent after every stop asked covers them all.
    nc = FlushCountingNats()
    harnesses = [make(CALCULATOR, "add") for _ in range(50)]
    for h in harnesses:
        h.runner._pull = Pull(cast(Any, nc), "S", "c")
        await h.runner._pull.start()
    await asyncio.gather(*(h.runner.stop() for h in harnesses))
    assert 1 <= nc.flushes <= 4


class RecordedLogs:
    """A run recorder keeping, per event, the module's log lines its record would show."""

    def __init__(self) -> None:
        self.lines: dict[str, list[tuple[str, str]]] = {}
        self.dropped: dict[str, int] = {}

    def capture(self) -> list[tuple[str, str]]:
        return []

    def note(self, event: Any, outcome: str, *args: Any) -> None:
        call = args[-1]
        self.lines[event.id] = list(call.log_lines)
        self.dropped[event.id] = call.log_lines_over + call.log_dropped_lines


async def test_a_call_undone_on_the_fast_lane_leaves_no_log_lines_in_the_run(
    make: Any, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run record (and the log budget) must show one attempt, the one that counted.
    h = make(flaky("flood", timeout_ms=5000))
    submits = counting_submits(executor, monkeypatch)
    await deliver_until_on_loop(h, submits, {"lines": 1, "size": 1})
    records = RecordedLogs()
    h.runner.runs = records
    submits.clear()
    many = event_msg({"lines": 200_000, "size": 1}, id="many")  # well over 2 ms of logging
    await h.deliver(many)
    assert len(submits) == 1  # cut off on the loop, run again in a thread
    assert many.settled == [("ack", None)]
    alone = make(flaky("flood", timeout_ms=5000))  # the same event, straight in a thread
    alone.runner.runs = records
    await alone.deliver(event_msg({"lines": 200_000, "size": 1}, id="alone"))
    assert records.lines["many"] == records.lines["alone"]
    assert records.dropped["many"] == records.dropped["alone"]
