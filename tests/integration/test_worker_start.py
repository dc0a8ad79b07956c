"""A worker starting many steps lists their consumers once, and still updates stale ones."""

from __future__ import annotations

from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows
from deadlift.runtime.worker import LIST_CONSUMERS_FROM, Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import eventually, module_path, stored, triggers_made

FLOWS = LIST_CONSUMERS_FROM  # one step each: enough for the listing


def flow(i: int) -> str:
    return f"""
name: w{i}
org: acme
trigger: w{i}.in
steps:
  - {{name: add, module: add_ten, function: add_ten, publish: [w{i}.out]}}
"""


async def test_a_worker_starting_many_steps_updates_consumers_configured_otherwise(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    js = nc.jetstream()
    await registry.push_module(module_path("add_ten").read_bytes(), name="add_ten")
    applied = settings.model_copy(update={"ack_wait_s": 5.0})
    await apply_workflows(
        js, registry, applied, [(parse_workflow(flow(i)), f"w{i}.yaml") for i in range(FLOWS)]
    )
    await triggers_made(nc, applied)  # by an earlier worker, configured so
    worker_nc = await bus.connect(settings)
    wanted = settings.model_copy(update={"ack_wait_s": 7.0})
    try:
        async with Worker(worker_nc, settings=wanted, advertise=False) as worker:
            assert len(worker.steps) == FLOWS
            for i in (0, FLOWS - 1):
                info = await js.consumer_info(Stream.EVENTS, f"acme--w{i}--add--trigger")
                assert info.config.ack_wait == 7.0
            headers, body = events.encode(events.new_event({"value": 1}, source="t", type="t"))
            await js.publish(f"w{FLOWS - 1}.in", body, headers=headers)
            await eventually(lambda: stored(nc, f"w{FLOWS - 1}.out"), message="served")
    finally:
        await worker_nc.close()


async def test_consumers_listed_are_configured_as_apply_made_them(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    js = nc.jetstream()
    await registry.push_module(module_path("add_ten").read_bytes(), name="add_ten")
    [workflow] = await apply_workflows(
        js, registry, settings, [(parse_workflow(flow(0)), "w.yaml")]
    )
    step = workflow.steps[0]
    # Apply makes none: the trigger's by the first worker to find an event, the entry
    # step's own by a replay.
    assert not [w for w in bus.step_inputs(workflow, step) if bus.made_at_apply(w, settings)]
    await triggers_made(nc, settings)
    listed = await bus.list_consumers(js, {Stream.STEPS, Stream.EVENTS})
    [made] = bus.trigger_inputs(workflow)
    config = bus.consumer_config(made.consumer, list(made.filters), step, settings)
    assert bus.configured_as(listed[(made.stream, made.consumer)].config, config)
    other = bus.consumer_config("x", ["elsewhere.>"], step, settings)
    trigger = (Stream.EVENTS, "acme--w0--add--trigger")
    assert not bus.configured_as(listed[trigger].config, other)
