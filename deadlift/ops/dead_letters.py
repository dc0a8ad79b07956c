"""Choosing dead letters by id, or by workflow (``ORG.NAME`` or ``NAME``) and step.

What ``deadlift dlq`` lists, replays and purges, and whether a letter may be
replayed at all (its workflow and step must still be applied); storing and
replaying one letter is :mod:`deadlift.bus.dlq`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from nats.js import JetStreamContext

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.publisher import Publisher
from deadlift.bus.registry import Registry
from deadlift.errors import DeadliftError, NotFoundError
from deadlift.model import topology
from deadlift.model.workflow import Workflow
from deadlift.settings import Settings


def scope(workflow: str | None) -> tuple[str | None, str | None]:
    """``ORG.NAME`` or ``NAME`` → ``(org, name)`` (the org None when not named)."""
    if workflow and "." in workflow:
        org, name = workflow.split(".", 1)
        return org, name
    return None, workflow


async def find(
    js: JetStreamContext, *, workflow: str | None = None, step: str | None = None
) -> list[dlq.DeadLetter]:
    """Dead letters, oldest first, of every step or of one workflow or step.

    Raises:
        ConfigError: ``workflow`` or ``step`` is not a valid name.
    """
    org, name = scope(workflow)
    return await dlq.letters(js, org=org, workflow=name, step=step)


async def select(
    js: JetStreamContext,
    ids: Iterable[int] = (),
    *,
    workflow: str | None = None,
    step: str | None = None,
) -> list[dlq.DeadLetter]:
    """The dead letters named by ``ids``, or else those of ``workflow`` and ``step``.

    Raises:
        NotFoundError: an id names no dead letter (maybe replayed or purged already).
    """
    ids = list(ids)
    if ids:
        return [await dlq.get(js, i) for i in ids]
    return await find(js, workflow=workflow, step=step)


async def purge(
    js: JetStreamContext, *, workflow: str | None = None, step: str | None = None
) -> int:
    """Delete dead letters (all, or of one workflow or step); return how many."""
    org, name = scope(workflow)
    return await dlq.purge(js, org=org, workflow=name, step=step)


class Outcome(StrEnum):
    """What ``dlq replay`` did with one letter."""

    REPLAYED = "replayed"
    SKIPPED = "skipped"  # replayed or purged already (by someone else, maybe right now)
    REFUSED = "refused"  # kept: replaying it would park the event where nothing runs it


@dataclass(frozen=True, slots=True)
class Replay:
    """The fate of one dead letter in a replay."""

    id: int
    outcome: Outcome
    subject: str = ""
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "id": self.id,
            "outcome": str(self.outcome),
            "subject": self.subject,
            "reason": self.reason,
        }


async def replay(
    js: JetStreamContext,
    publisher: Publisher,
    registry: Registry,
    ids: Iterable[int] = (),
    *,
    workflow: str | None = None,
    step: str | None = None,
    settings: Settings | None = None,
) -> list[Replay]:
    """Replay the dead letters named by ``ids``, or else those of ``workflow`` and ``step``.

    Each letter is read again just before it is replayed, and replayed only when
    its workflow is still applied and still has its step; otherwise it is
    refused and kept. Letters gone meanwhile, or replayed by a concurrent
    replay, are skipped: running this twice, or twice at once, replays each
    letter once.

    A step's input consumer is made by the first event sent to it, a replay too
    (``bus.step_inputs``), with ``settings`` (the environment's when None).

    Raises:
        ConfigError: ``workflow`` or ``step`` is not a valid name.
    """
    ids = list(ids)
    chosen = ids or [letter.id for letter in await find(js, workflow=workflow, step=step)]
    flows = {flow.key: flow for flow in await registry.workflows()}
    store = dlq.ObjectBodies(js)
    settings = settings or Settings()
    return [
        await _replay_one(js, publisher, store, flows, letter_id, settings) for letter_id in chosen
    ]


async def _replay_one(
    js: JetStreamContext,
    publisher: Publisher,
    store: dlq.BodyStore,
    flows: Mapping[str, Workflow],
    letter_id: int,
    settings: Settings,
) -> Replay:
    try:
        letter = await dlq.get(js, letter_id, store=store)
    except NotFoundError:
        return Replay(letter_id, Outcome.SKIPPED, reason="gone: replayed or purged already")
    key = f"{letter.org}.{letter.workflow}"
    flow = flows.get(key)
    subject = topology.step_subject(letter.org, letter.workflow, letter.step)
    if flow is None:
        why = (
            f"workflow {key} is not applied (removed?); nothing would run the event: "
            "apply it again and replay, or purge the letter"
        )
        return Replay(letter_id, Outcome.REFUSED, subject, why)
    if letter.step not in {s.name for s in flow.steps}:
        why = (
            f"workflow {key} has no step {letter.step!r} now; nothing would run the event: "
            "apply a version with that step and replay, or purge the letter"
        )
        return Replay(letter_id, Outcome.REFUSED, subject, why)
    try:
        [step] = [s for s in flow.steps if s.name == letter.step]
        await bus.ensure_on_demand(js, settings, flow, step)
        done = await dlq.reinject(js, publisher, letter, store=store)
    except NotFoundError:
        return Replay(letter_id, Outcome.SKIPPED, subject, "gone: replayed or purged meanwhile")
    except DeadliftError as exc:
        return Replay(letter_id, Outcome.REFUSED, subject, f"could not replay: {exc}")
    if done.duplicate:
        return Replay(letter_id, Outcome.SKIPPED, done.subject, "replayed already (same replay id)")
    return Replay(letter_id, Outcome.REPLAYED, done.subject)
