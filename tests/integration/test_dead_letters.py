"""Dead letters on a real server: any failed event is kept, and replay neither loses nor crashes.

An event close to ``max_payload`` is dead-lettered by reference (its body in
the ``deadlift_dead_letters`` object store); ``dlq show``/``replay``/``purge``
follow the reference. Replay refuses letters whose workflow or step is gone
(and keeps them), carries non-ASCII headers, and is idempotent under races.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.model.topology import Bucket, Stream, step_subject
from deadlift.ops import dead_letters
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import raw_messages
from tests.integration.conftest import cli

FLOW = """
name: fragile
org: acme
trigger: fragile.in
steps:
  - {name: run, module: hostile, function: trap, publish: [fragile.out],
     retry: {max_attempts: 1}}
"""
STEP = step_subject("acme", "fragile", "run")


def event(data: Any, *, id: str, **headers: str) -> tuple[dict[str, str], bytes]:
    """A Deadlift event's headers (with its ``Nats-Msg-Id``, and ``headers`` added) and body."""
    encoded, body = events.encode(events.new_event(data, source="test", type="t", id=id))
    return {**encoded, events.MSG_ID: id, **headers}, body


async def dead_letter(
    nc: Client, settings: Settings, *messages: tuple[dict[str, str], bytes]
) -> list[dlq.DeadLetter]:
    """Publish events the step fails on (one attempt); return their dead letters in order."""
    publisher = bus.JetStreamPublisher(nc)
    async with Worker(nc, settings=settings) as worker:
        for headers, body in messages:
            await publisher.publish("fragile.in", body, headers)
        await worker.drain()
    found = {d.headers["ce-id"]: d for d in await dlq.letters(nc.jetstream())}
    assert len(found) == len(messages), found
    return [found[headers["ce-id"]] for headers, _ in messages]  # in the order published


async def replayed_messages(nc: Client) -> list[Any]:
    return await raw_messages(nc, Stream.STEPS, STEP)


@pytest.fixture
async def fragile(push: Any, apply: Any) -> None:
    await push("hostile")
    await apply(FLOW)


@pytest.mark.usefixtures("fragile")
async def test_an_event_near_max_payload_is_dead_lettered_by_reference_and_replayed(
    nc: Client, settings: Settings, registry: Registry
) -> None:
    js = nc.jetstream()
    limit = nc.max_payload
    headers, body = event({"pad": ""}, id="big-1")
    pad = limit - 300 - dlq.letter_size(headers, body)
    big = [event({"pad": c * pad}, id=f"big-{c}") for c in "ab"]
    assert all(limit - 512 < dlq.letter_size(h, b) <= limit for h, b in big)

    kept, purged = await dead_letter(nc, settings, *big)  # before: nak'd every 1 s forever

    for letter in (kept, purged):
        assert letter.body == b"" and letter.ref
        assert letter.kind == "trap"
    shown = await dlq.get(js, kept.id)
    assert shown.body == big[0][1]
    assert shown.headers["ce-id"] == "big-a"

    [result] = await dead_letters.replay(js, bus.JetStreamPublisher(nc), registry, [kept.id])
    assert (result.outcome, result.subject) == ("replayed", STEP)
    [replayed] = await replayed_messages(nc)
    assert replayed.data == big[0][1]  # the original body, restored from the object store
    assert dlq.stored_headers(replayed)["ce-id"] == "big-a"
    bodies = dlq.ObjectBodies(js)
    assert await bodies.get(kept.ref) is None  # replayed: its object is gone
    assert await bodies.get(purged.ref) is not None

    assert await dead_letters.purge(js) == 1
    assert await dlq.letters(js) == []
    assert await bodies.get(purged.ref) is None  # purged: its object too
    assert Bucket.DEAD_LETTERS == "deadlift_dead_letters"


@pytest.mark.usefixtures("fragile", "restore_logging")
async def test_replay_refuses_and_keeps_letters_of_a_removed_workflow_or_step(
    nc: Client, settings: Settings, registry: Registry, apply: Any
) -> None:
    js = nc.jetstream()
    [letter] = await dead_letter(nc, settings, event({"v": 1}, id="e1"))

    renamed = FLOW.replace("{name: run,", "{name: renamed,")
    await apply(renamed)  # the step "run" is gone
    result = await cli(settings, "dlq", "replay", "--all", "--json")
    assert result.exit_code == 1, result.output
    [report] = json.loads(result.stdout)
    assert (report["id"], report["outcome"]) == (letter.id, "refused")
    assert "no step 'run'" in report["reason"]

    await registry.delete_workflow("acme.fragile")  # the whole workflow is gone
    [refused] = await dead_letters.replay(js, bus.JetStreamPublisher(nc), registry, [letter.id])
    assert refused.outcome == "refused" and "not applied" in refused.reason

    assert [d.id for d in await dlq.letters(js)] == [letter.id]  # kept
    assert await replayed_messages(nc) == []  # nothing parked where nothing consumes


@pytest.mark.usefixtures("fragile", "restore_logging")
async def test_replay_carries_non_ascii_headers_and_reports_each_letter(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    first, second = await dead_letter(
        nc,
        settings,
        event({"v": 1}, id="e1", **{"X-Note": "café ☕", "ce-type": "tëst.évent"}),
        event({"v": 2}, id="e2"),
    )
    assert first.headers["X-Note"] == "café ☕"

    result = await cli(settings, "dlq", "replay", "--all", "--json")  # before: TypeError

    assert result.exit_code == 0, result.output
    assert sorted((r["id"], r["outcome"]) for r in json.loads(result.stdout)) == sorted(
        [(first.id, "replayed"), (second.id, "replayed")]
    )
    stored = [dlq.stored_headers(m) for m in await replayed_messages(nc)]
    assert sorted((h["ce-id"], h.get("X-Note", ""), h["ce-type"]) for h in stored) == [
        ("e1", "café ☕", "tëst.évent"),
        ("e2", "", "t"),
    ]
    assert await dlq.letters(js) == []

    again = await cli(settings, "dlq", "replay", str(first.id))  # gone: skipped, not an error
    assert again.exit_code == 0, again.output
    assert "skipped" in again.stdout and "Traceback" not in again.output


@pytest.mark.usefixtures("fragile")
async def test_racing_replays_replay_each_letter_once(
    nc: Client, settings: Settings, registry: Registry
) -> None:
    js = nc.jetstream()
    found = await dead_letter(nc, settings, *(event({"v": i}, id=f"e{i}") for i in range(4)))
    ids = [d.id for d in found]

    async def replay() -> list[dead_letters.Replay]:
        return await dead_letters.replay(js, bus.JetStreamPublisher(nc), registry, ids)

    one, other = await asyncio.gather(replay(), replay())

    for letter_id, mine, theirs in zip(ids, one, other, strict=True):
        assert mine.id == theirs.id == letter_id
        assert sorted([mine.outcome, theirs.outcome]) == ["replayed", "skipped"]
    assert sorted(dlq.stored_headers(m)["ce-id"] for m in await replayed_messages(nc)) == [
        f"e{i}" for i in range(4)
    ]
    assert await dlq.letters(js) == []


# -- the dead-letter stream comes with the org's first dead letter ---------------------------


@pytest.mark.usefixtures("fragile")
async def test_the_first_dead_letter_creates_the_stream_and_is_kept(
    nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    assert not await dlq.stream_exists(js)  # apply made none: most orgs never need one

    [letter] = await dead_letter(nc, settings, event({"v": 1}, id="first"))

    assert (letter.kind, letter.headers["ce-id"], letter.step) == ("trap", "first", "run")
    config = (await js.stream_info(Stream.DLQ)).config
    assert config.subjects == ["deadlift.dlq.>"]
    assert config.duplicate_window == settings.duplicate_window_s


async def test_first_dead_letters_racing_to_create_the_stream_are_all_kept(
    nc: Client, settings: Settings
) -> None:
    js, publisher = nc.jetstream(), bus.JetStreamPublisher(nc)
    create = functools.partial(dlq.ensure_stream, js, settings)

    async def record(i: int) -> None:
        await dlq.record(
            publisher,
            org="acme",
            workflow="fragile",
            step=f"s{i}",
            module="0" * 64,
            subject="fragile.in",
            headers={"ce-id": f"e{i}"},
            body=b"{}",
            stream=Stream.EVENTS,
            seq=i + 1,
            attempts=1,
            kind="trap",
            error="boom",
            create_stream=create,
        )

    await asyncio.gather(*(record(i) for i in range(8)))

    assert sorted(d.headers["ce-id"] for d in await dlq.letters(js)) == [f"e{i}" for i in range(8)]


async def test_dlq_commands_treat_an_org_without_dead_letters_as_having_none(
    nc: Client, settings: Settings
) -> None:
    listed = await cli(settings, "dlq", "ls")
    assert listed.exit_code == 0, listed.output
    assert "no dead letters: this org has had none yet" in listed.output
    as_json = await cli(settings, "dlq", "ls", "--json", "--workflow", "acme.fragile")
    assert (as_json.exit_code, json.loads(as_json.stdout)) == (0, [])
    replayed = await cli(settings, "dlq", "replay", "--all")
    assert replayed.exit_code == 0 and "0 replayed" in replayed.output, replayed.output
    purged = await cli(settings, "dlq", "purge", "--yes")
    assert purged.exit_code == 0 and "0 dead letter(s) purged" in purged.output, purged.output
    shown = await cli(settings, "dlq", "show", "1")
    assert shown.exit_code != 0 and "this org has no dead letters" in shown.output, shown.output
    assert not await dlq.stream_exists(nc.jetstream())  # looking created nothing


async def test_apply_brings_an_existing_dead_letter_stream_to_the_settings(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    js = nc.jetstream()
    await dlq.ensure_stream(js, settings.model_copy(update={"duplicate_window_s": 60.0}))
    await push("hostile")
    await apply(FLOW)
    config = (await js.stream_info(Stream.DLQ)).config
    assert config.duplicate_window == settings.duplicate_window_s
