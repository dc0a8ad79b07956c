"""The hop guard: how far a run has gone, and where it must stop.

Every event a step produces (an output or an emitted event) carries its run's
hop count plus one (``ce-deadlifthops``; an event from outside has none: 0). A
step runs an event only while its count is at most the step's limit — its
``loop.max_hops`` when it declares a bounded loop, else ``DEADLIFT_MAX_HOPS`` —
and dead-letters it (kind ``hops``) beyond, so workflows that feed each other
cannot turn one event into a storm. ``workflow apply`` refuses such cycles
unless a step on them declares ``loop``; this is the guard at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deadlift.bus.publisher import Publisher, Stamping
from deadlift.errors import StepError
from deadlift.model.topology import ErrorKind
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime.builtins import EMIT_SERVICE, EmitTarget
from deadlift.runtime.crossings import CONTRACTS_SERVICE, EmitContracts
from deadlift.runtime.services import emitter
from deadlift.wire import events


def over_limit(hops: int, step: Step, default_limit: int) -> StepError | None:
    """The error dead-lettering an event that arrived after ``hops`` hops, if it is too many."""
    limit = step.loop.max_hops if step.loop else default_limit
    if hops <= limit:
        return None
    what = "the step's loop.max_hops" if step.loop else "DEADLIFT_MAX_HOPS"
    return StepError(
        f"the run reached this step after {hops} hops, over the limit of {limit} ({what}): "
        "stopped as a loop or event storm; raise the limit and replay if the run is legitimate",
        kind=ErrorKind.HOPS,
        retryable=False,
    )


def call_services(
    services: dict[str, Any], workflow: Workflow, step: Step, publisher: Publisher, hops: int
) -> dict[str, Any]:
    """The services of one call of a step whose input has ``hops``: its emits carry one more.

    An emit crossing an integration is held to the event's schema first (see
    :mod:`deadlift.runtime.crossings`).
    """
    if not step.emit:
        return services
    contracts: EmitContracts | None = services.get(CONTRACTS_SERVICE)
    stamped = emitter(workflow, step, HopStamp(publisher, hops + 1, contracts))
    if contracts is not None:
        stamped = contracts.checked(stamped)
    return {**services, EMIT_SERVICE: EmitTarget(tuple(step.emit), stamped)}


@dataclass(frozen=True, slots=True)
class HopStamp(Stamping):
    """A publisher setting the hop count of what it publishes (``emit`` of one call).

    With ``contracts``, an event crossing an integration also gets ``ce-dataschema``.
    """

    publisher: Publisher
    hops: int
    contracts: EmitContracts | None = None

    def stamp(self, subject: str, headers: Mapping[str, str]) -> dict[str, str]:
        """The headers with the hop count (and the schema of a crossing event)."""
        stamped = {**headers, events.HOPS_HEADER: str(self.hops)}
        if self.contracts is not None:
            stamped.update(self.contracts.headers(subject))
        return stamped
