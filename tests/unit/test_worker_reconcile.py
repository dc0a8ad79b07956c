"""A registry change touches only its own workflow's steps, however many run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client

from deadlift.bus.identity import GLOBAL_ACCOUNT, Identity
from deadlift.model.workflow import Step, Workflow, parse_workflow
from deadlift.runtime.context import step_signature
from deadlift.runtime.worker import Worker

FLOW = """
name: w{i}
org: acme
trigger: w{i}.in
steps:
  - {{name: a, module: m, function: f, module_sha256: "{sha}", next: [b]}}
  - {{name: b, module: m, function: f, module_sha256: "{sha}", publish: [w{i}.out]}}
"""
SHA = "0" * 64


@dataclass
class Running:
    """What the reconcile reads of a running step."""

    step: Step
    signature: Any
    stopped: bool = False

    async def stop(self) -> None:
        self.stopped = True


class NoScans(dict[Any, Any]):
    """The runners; a look at all of them fails the test (it is O(steps) per change)."""

    def items(self) -> Any:
        raise AssertionError("a change scanned every running step")

    def keys(self) -> Any:
        raise AssertionError("a change scanned every running step")

    def values(self) -> Any:
        raise AssertionError("a change scanned every running step")

    def __iter__(self) -> Any:
        raise AssertionError("a change scanned every running step")


def flow(i: int) -> Workflow:
    return parse_workflow(FLOW.format(i=i, sha=SHA))


async def test_a_replayed_unchanged_workflow_looks_only_at_its_own_steps() -> None:
    """The registry watch replays every workflow at start: with 10,000 workflows each
    replay scanned all 30,000 running steps, blocking the event loop for tens of
    seconds until nats-server cut the worker off as a slow consumer."""
    worker = Worker(Client(), advertise=False)
    worker.identity = Identity(GLOBAL_ACCOUNT)
    runners = NoScans()
    for i in range(2000):
        workflow = flow(i)
        for step in workflow.steps:
            runners[(workflow.key, step.name)] = [Running(step, step_signature(workflow, step))]
            worker._running.setdefault(workflow.key, set()).add(step.name)
    worker._runners = runners
    await worker._reconcile_many({flow(7).key: flow(7)})  # unchanged: nothing to do
    assert dict.__len__(runners) == 4000

    removed = dict.__getitem__(runners, (flow(8).key, "a"))[0]
    await worker._reconcile_many({flow(8).key: None})  # removed: only its steps stop
    assert removed.stopped
    assert (flow(8).key, "a") not in runners and (flow(9).key, "a") in runners
    assert flow(8).key not in worker._running or not worker._running[flow(8).key]
