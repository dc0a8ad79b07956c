"""Choosing dead letters by id, or by workflow (``ORG.NAME`` or ``NAME``) and step.

What ``deadlift dlq`` lists, replays and purges; storing and replaying one
letter is :mod:`deadlift.bus.dlq`'s.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext

from deadlift.bus import dlq


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
