"""Attack by a guest module: state left in an instance never reaches another workflow or step.

``echo.count`` answers how many calls its instance has served (a module-level
global): a guest could as well keep the last input there and hand it to the next
caller. The same binary runs in two workflows and in two steps of one workflow;
each must see only its own calls.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client

from deadlift.runtime.step import StepReport
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import publish

FLOW = """
name: {name}
org: acme
trigger: acme.{name}.in
steps:
  - {{name: first, module: echo, function: count, next: [second]}}
  - {{name: second, module: echo, function: count}}
"""


async def test_instances_never_carry_state_between_workflows_or_steps(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("echo")
    for name in ("alpha", "beta"):
        await apply(FLOW.format(name=name))
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:
        for i in range(3):  # one at a time: the same instance serves each call of a step
            await publish(nc, "acme.alpha.in", {"i": i})
            await worker.drain()
            assert len(reports) == 2 * (i + 1), f"alpha run {i}"
        await publish(nc, "acme.beta.in", {"i": 0})
        await worker.drain()
    assert len(reports) == 8, "beta run"
    # Per step, in the order of its calls (a step reports after its output's PubAck:
    # the next step may report first).
    calls = sorted(((r.workflow, r.step, r.output["calls"]) for r in reports), key=lambda c: c[:2])
    assert calls == [
        ("alpha", "first", 1),
        ("alpha", "first", 2),
        ("alpha", "first", 3),
        ("alpha", "second", 1),
        ("alpha", "second", 2),
        ("alpha", "second", 3),
        # Same binary, same limits: still a fresh instance of its own.
        ("beta", "first", 1),
        ("beta", "second", 1),
    ]
