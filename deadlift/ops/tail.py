"""Watching events as they arrive: which subjects a workflow uses, and subscribing to them.

Received messages become records with :func:`deadlift.ops.records.decode_record`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from deadlift import bus
from deadlift.model import names, topology
from deadlift.model.workflow import Workflow, minimal_subjects


def workflow_subjects(workflow: Workflow) -> list[str]:
    """Every subject a workflow's events travel on: triggers, step inputs, outputs, DLQ."""
    every_step = ">"  # a wildcard token standing for each step of the workflow
    return minimal_subjects(
        [
            *workflow.event_subjects(),
            topology.step_subject(workflow.org, workflow.name, every_step),
            topology.dlq_subject(workflow.org, workflow.name, every_step),
        ]
    )


async def subscribe_all(
    nc: Client, subjects: Sequence[str], cb: Callable[[Msg], Awaitable[None]]
) -> list[Any]:
    """Subscribe to every subject with one callback; raise if the server refuses one.

    Raises:
        ConfigError: a subject is not valid (checked before any subscription).
        PermissionDeniedError: the server refused one.
    """
    for subject in subjects:
        names.check_subject(subject, field="subject", wildcards=True)
    subs = [await nc.subscribe(s, cb=cb) for s in subjects]
    if isinstance(nc, bus.DeadliftClient):
        await asyncio.gather(*(nc.check_allowed(s) for s in subjects))
    return subs
