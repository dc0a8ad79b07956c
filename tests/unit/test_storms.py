"""Event storms and oversized workflows (issue 14), without a server.

Workflows that feed each other through publish/emit → trigger are refused at
apply unless a step declares a bounded loop; NATS's internal subjects are
refused; a run carries a hop count and is dead-lettered (kind ``hops``) over its
limit; a workflow too large to store is refused naming its field; a 1,500-step
chain validates (no recursion limit anywhere).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest

from deadlift.bus import dlq
from deadlift.bus.publisher import MemoryPublisher
from deadlift.bus.streams import StepBinding
from deadlift.errors import ConfigError, EventDecodeError
from deadlift.model import topology
from deadlift.model.topology import Stream, step_subject
from deadlift.model.workflow import (
    Workflow,
    check_org_graph,
    find_cycle,
    mermaid,
    parse_workflow,
)
from deadlift.ops.control import check_stored_size, stored_size_limit
from deadlift.runtime.builtins import BUILTINS
from deadlift.runtime.context import StepContext, StepReport
from deadlift.runtime.step import StepRunner
from deadlift.runtime.watchdog import Watchdog
from deadlift.settings import Settings
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wire import events
from tests.conftest import module_path
from tests.unit.fakes import FakeMsg, delivered


def flow(name: str, trigger: str, *steps: dict[str, Any]) -> Workflow:
    """A workflow of org acme from its steps (module add_ten unless given)."""
    full = [{"module": "add_ten", **s} for s in steps]
    text = json.dumps({"name": name, "org": "acme", "trigger": trigger, "steps": full})
    return parse_workflow(text, source=f"{name}.yaml")


PING = flow("ping", "ping.in", {"name": "send", "publish": ["pong.in"]})
PONG = flow("pong", "pong.in", {"name": "reply", "publish": ["ping.in"]})


# ---------------------------------------------------------- the org's graph


def test_two_workflows_publishing_to_each_others_trigger_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        check_org_graph([(PING, "ping.yaml"), (PONG, "pong.yaml")], [])
    message = str(caught.value)
    assert message.startswith("ping.yaml, pong.yaml: workflows acme.ping, acme.pong form a cycle")
    assert "acme.ping step 'send' publishes pong.in, trigger pong.in of acme.pong" in message
    assert "acme.pong step 'reply' publishes ping.in, trigger ping.in of acme.ping" in message
    assert "loop: {max_hops: N}" in message


def test_a_cycle_closed_by_a_stored_workflow_is_refused_naming_the_applied_file() -> None:
    check_org_graph([(PING, "ping.yaml")], [])  # alone: no cycle
    with pytest.raises(ConfigError, match=r"^pong.yaml: workflows acme.ping, acme.pong form"):
        check_org_graph([(PONG, "pong.yaml")], [PING])


def test_a_cycle_through_next_steps_wildcards_and_emit_is_found() -> None:
    a = flow(
        "a",
        "orders.*",
        {"name": "first", "next": ["second"]},
        {"name": "second", "emit": ["audit.>"]},
    )
    b = flow("b", "audit.orders", {"name": "log", "publish": ["orders.new"]})
    with pytest.raises(ConfigError) as caught:
        check_org_graph([(a, "a.yaml"), (b, "b.yaml")], [])
    message = str(caught.value)
    assert "acme.a step 'first' next: second (step 'second')" in message
    assert "acme.a step 'second' emits audit.>, trigger audit.orders of acme.b" in message
    assert "acme.b step 'log' publishes orders.new, trigger orders.* of acme.a" in message


def test_a_replaced_workflow_no_longer_counts() -> None:
    fixed = flow("pong", "pong.in", {"name": "reply", "publish": ["done.out"]})
    check_org_graph([(fixed, "pong.yaml")], [PING, PONG])  # the stored pong is replaced


def test_workflows_that_do_not_close_a_cycle_are_accepted() -> None:
    a = flow("a", "x.in", {"name": "s", "publish": ["y.in"]})
    b = flow("b", "y.in", {"name": "s", "publish": ["z.in"]})
    c = flow("c", "z.*", {"name": "s", "emit": ["w.>"]})
    check_org_graph([(a, "a.yaml"), (b, "b.yaml"), (c, "c.yaml")], [])


@pytest.mark.parametrize("bounded", ["send", "reply"])
def test_a_declared_loop_on_a_step_of_the_cycle_allows_it(bounded: str) -> None:
    loop = {"loop": {"max_hops": 10}}
    ping = flow("ping", "ping.in", {"name": "send", "publish": ["pong.in"], **loop})
    pong = flow("pong", "pong.in", {"name": "reply", "publish": ["ping.in"], **loop})
    applied = [(ping, "p.yaml"), (PONG, "q.yaml")] if bounded == "send" else [(PING, "p.yaml")]
    check_org_graph(applied, [] if bounded == "send" else [pong])


def test_a_workflow_feeding_its_own_trigger_needs_a_declared_loop() -> None:
    with pytest.raises(ConfigError, match=r"forever \(or bound it: loop: \{max_hops: N\}\)"):
        flow("retry", "retry.in", {"name": "again", "publish": ["retry.in"]})
    looped = flow(
        "retry", "retry.in", {"name": "again", "publish": ["retry.in"], "loop": {"max_hops": 3}}
    )
    assert looped.steps[0].loop is not None and looped.steps[0].loop.max_hops == 3
    check_org_graph([(looped, "retry.yaml")], [])


@pytest.mark.parametrize("loop", [{"max_hops": 0}, {"max_hops": -1}, {"max_hops": 5, "x": 1}, {}])
def test_a_loop_must_declare_a_positive_bound(loop: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"step \[0\] \(again\).loop"):
        flow("retry", "retry.in", {"name": "again", "loop": loop})


# ------------------------------------------------------- internal subjects


@pytest.mark.parametrize(
    ("field", "subject"),
    [
        ("trigger", "_INBOX.>"),
        ("trigger", "_INBOX.*"),
        ("trigger", "_INBOX.abc.def"),
        ("trigger", "_INBOX"),
        ("trigger", "*.*"),
        ("trigger", "*.*.*"),
        ("trigger", "*.>"),
        ("trigger", "$SYS.>"),
        ("publish", "_INBOX.reply"),
        ("publish", "$JS.API.INFO"),
        ("emit", "_INBOX.>"),
        ("emit", "*.*"),
    ],
)
def test_nats_internal_subjects_are_refused(field: str, subject: str) -> None:
    step: dict[str, Any] = {"name": "s"}
    trigger = "ok.in"
    if field == "trigger":
        trigger = subject
    else:
        step[field] = [subject]
    with pytest.raises(ConfigError, match="NATS internals"):
        flow("w", trigger, step)


@pytest.mark.parametrize("trigger", ["*.orders", "orders.*.*", "x.>", "*", "inbox.>"])
def test_ordinary_wildcard_triggers_are_still_accepted(trigger: str) -> None:
    assert flow("w", trigger, {"name": "s"}).trigger == [trigger]


# ------------------------------------------------------------- size limits


def chain(n: int, *, closed: bool = False) -> str:
    steps = [
        {"name": f"s{i}", "module": "add_ten", "next": [f"s{i + 1}"] if i < n - 1 else []}
        for i in range(n)
    ]
    if closed:
        steps[-1]["next"] = ["s0"]
    return json.dumps({"name": "long", "org": "acme", "trigger": "long.in", "steps": steps})


def test_a_1500_step_chain_validates_and_fits_the_registry() -> None:
    workflow = parse_workflow(chain(1500), source="long.yaml")  # was: RecursionError
    assert [s.name for s in workflow.entry_steps()] == ["s0"]
    check_org_graph([(workflow, "long.yaml")], [])
    check_stored_size(workflow, stored_size_limit(1024 * 1024), source="long.yaml")
    assert mermaid(workflow).count("-->") == 1500  # the trigger edge plus 1,499 next edges


def test_a_1500_step_cycle_is_found_without_recursion() -> None:
    with pytest.raises(ConfigError, match=r"steps form a cycle: s0 -> s1 -> .* -> s1499 -> s0;"):
        parse_workflow(chain(1500, closed=True), source="long.yaml")
    graph = {i: [(i + 1) % 5000] for i in range(5000)}
    found = find_cycle(graph)
    assert found is not None and len(found) == 5000


def test_a_workflow_too_large_to_store_is_refused_naming_file_and_field() -> None:
    big = flow("big", "big.in", {"name": "s"}).model_copy(update={"description": "x" * 2_000_000})
    with pytest.raises(ConfigError) as caught:
        check_stored_size(big, stored_size_limit(1024 * 1024), source="big.yaml")
    assert str(caught.value).startswith("big.yaml: description: the workflow is 200")
    assert "over the 1044480 bytes the registry can hold" in str(caught.value)
    assert "shorten description" in str(caught.value)


def test_an_oversized_step_field_is_named() -> None:
    config = {f"k{i}": "v" * 1000 for i in range(1100)}
    big = flow("big", "big.in", {"name": "a"}, {"name": "fat", "config": config})
    with pytest.raises(ConfigError, match=r"^big.yaml: step 'fat': config: .* shorten config,"):
        check_stored_size(big, stored_size_limit(1024 * 1024), source="big.yaml")


# ------------------------------------------------------- the hop count


@pytest.mark.parametrize(
    ("value", "hops"), [(None, 0), ("0", 0), ("7", 7), ("123456789", 123456789)]
)
def test_the_hop_count_of_an_event(value: str | None, hops: int) -> None:
    extensions = {} if value is None else {events.HOPS: value}
    assert (
        events.hop_count(events.new_event(1, source="s", type="t", extensions=extensions)) == hops
    )


@pytest.mark.parametrize(
    "value", ["-1", "+1", "1e3", "abc", "", " 1", "1_0", "\uff11", "1234567890"]
)
def test_a_malformed_hop_count_is_a_decode_error(value: str) -> None:
    event = events.new_event(1, source="s", type="t", extensions={events.HOPS: value})
    with pytest.raises(EventDecodeError, match="ce-deadlifthops must be a hop count"):
        events.hop_count(event)


def test_max_hops_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_hops == 100
    monkeypatch.setenv("DEADLIFT_MAX_HOPS", "7")
    assert Settings().max_hops == 7


MODULES = ("add_ten", "emitter")
SHA = {name: hashlib.sha256(module_path(name).read_bytes()).hexdigest() for name in MODULES}


@pytest.fixture(scope="module")
def host() -> ModuleHost:
    host = ModuleHost()
    for name in MODULES:
        host.add_binary(SHA[name], module_path(name).read_bytes())
    return host


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-wasm") as pool:
        yield pool


class Harness:
    """One step of a workflow run on fake deliveries, publishing into memory."""

    def __init__(self, host: ModuleHost, executor: ThreadPoolExecutor, workflow: Workflow) -> None:
        step = workflow.steps[0]
        settings = Settings(max_hops=5)
        self.publisher = MemoryPublisher()
        self.reports: list[StepReport] = []
        context = StepContext(
            js=cast(Any, None),
            publisher=self.publisher,
            host=host,
            executor=executor,
            threads=2,
            settings=settings,
            watchdog=Watchdog(),
            functions=dict(BUILTINS),
            concurrency=8,
            stats=Counter(),
            on_report=self.reports.append,
        )
        spec = PluginSpec(
            sha256=SHA[step.module],
            org="acme",
            workflow=workflow.name,
            step=step.name,
            timeout_ms=1000,
            max_pages=settings.default_max_pages,
            host_functions=tuple(sorted(step.host_functions)),
            max_output_bytes=settings.max_output_bytes,
        )
        binding = StepBinding(
            Stream.EVENTS, topology.trigger_consumer("acme", workflow.name, step.name)
        )
        self.runner = StepRunner(context, workflow, step, spec, binding, services={})

    async def deliver(self, data: Any, hops: str | None) -> FakeMsg:
        extensions = {} if hops is None else {events.HOPS: hops}
        event = events.Event(data=data, id="ev-1", source="test", type="t", extensions=extensions)
        headers, body = events.encode(event)
        msg = delivered(self.runner.workflow.trigger[0], body, headers)
        await self.runner.handle(cast(Any, [msg]))
        return msg

    def published(self) -> list[tuple[str, str | None]]:
        return [(m.subject, m.headers.get(events.HOPS_HEADER)) for m in self.publisher.messages]


CALC = flow(
    "calc",
    "calc.in",
    {"name": "add", "next": ["times"], "publish": ["calc.out"]},
    {"name": "times"},
)


@pytest.mark.parametrize(
    ("hops", "kept", "out"), [(None, None, "1"), ("0", None, "1"), ("4", "4", "5"), ("5", "5", "6")]
)
async def test_a_publish_crossing_carries_one_hop_more_and_next_steps_keep_the_count(
    host: ModuleHost, executor: ThreadPoolExecutor, hops: str | None, kept: str | None, out: str
) -> None:
    """A hop is a crossing onto a subject that may trigger a workflow; a workflow's own
    next steps (acyclic) keep the count, so a long chain is not a storm."""
    h = Harness(host, executor, CALC)
    msg = await h.deliver({"value": 1}, hops)
    assert msg.outcome == "ack"
    assert h.published() == [(step_subject("acme", "calc", "times"), kept), ("calc.out", out)]


async def test_an_event_over_the_hop_limit_is_dead_lettered_without_running(
    host: ModuleHost, executor: ThreadPoolExecutor
) -> None:
    h = Harness(host, executor, CALC)  # DEADLIFT_MAX_HOPS=5
    msg = await h.deliver({"value": 1}, "6")
    assert msg.settled == [("term", None)]
    [letter] = h.publisher.messages
    assert letter.subject == topology.dlq_subject("acme", "calc", "add")
    assert letter.headers[dlq.H_KIND] == "hops"
    assert "after 6 hops, over the limit of 5 (DEADLIFT_MAX_HOPS)" in letter.headers[dlq.H_ERROR]
    assert [(r.outcome, r.error_kind, r.output) for r in h.reports] == [("dead", "hops", None)]


async def test_a_declared_loop_bound_replaces_the_default_limit(
    host: ModuleHost, executor: ThreadPoolExecutor
) -> None:
    looped = flow(
        "again", "again.in", {"name": "add", "publish": ["again.in"], "loop": {"max_hops": 8}}
    )
    h = Harness(host, executor, looped)
    assert (await h.deliver({"value": 1}, "8")).outcome == "ack"  # over 5, within 8
    assert h.published() == [("again.in", "9")]
    msg = await h.deliver({"value": 1}, "9")
    assert msg.outcome == "term"
    assert h.reports[-1].error_kind == "hops"
    assert "over the limit of 8 (the step's loop.max_hops)" in (h.reports[-1].error or "")


async def test_a_malformed_hop_count_is_dead_lettered_as_undecodable(
    host: ModuleHost, executor: ThreadPoolExecutor
) -> None:
    h = Harness(host, executor, CALC)
    msg = await h.deliver({"value": 1}, "-3")
    assert msg.outcome == "term"
    assert h.publisher.messages[0].headers[dlq.H_KIND] == "decode"


async def test_emitted_events_carry_one_hop_more(
    host: ModuleHost, executor: ThreadPoolExecutor
) -> None:
    fan = flow(
        "fan",
        "fan.in",
        {
            "name": "emit",
            "module": "emitter",
            "function": "emit_many",
            "host_functions": ["emit"],
            "emit": ["fan.audit.>"],
        },
    )
    h = Harness(host, executor, fan)
    msg = await h.deliver({"subjects": ["fan.audit.a", "fan.audit.b"], "data": 1}, "3")
    assert msg.outcome == "ack", h.reports
    assert h.published() == [("fan.audit.a", "4"), ("fan.audit.b", "4")]
