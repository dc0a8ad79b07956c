"""Events crossing an integration: held to the declared JSON Schema before they leave.

A step output published on a subject that is one of its org's integration
events (:func:`deadlift.model.contracts.outgoing_event`) must satisfy the
event's schema. One that does not is dead-lettered on the sender's side (kind
``schema``) and published nowhere, not even to the next steps: all or nothing
per event. One that does travels with ``ce-dataschema`` naming the schema. An
``emit`` on such a subject is checked the same way and fails the call.

The subjects are looked up when a step starts (publish) or once per emitted
subject: a step with no integration event pays nothing per event.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from deadlift.bus.publisher import Publisher, Stamping
from deadlift.errors import HostFunctionError, StepError
from deadlift.model.contracts import EventSchema, outgoing_event
from deadlift.model.integrations import schema_validator, validation_problem
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import ErrorKind
from deadlift.model.workflow import Step, Workflow, subjects_overlap
from deadlift.wasm.hostfns import HostCall
from deadlift.wire import events

DATASCHEMA_HEADER = f"{events.PREFIX}dataschema"
# The services key of a step's :class:`EmitContracts` (absent: nothing it emits crosses).
CONTRACTS_SERVICE = "contracts"
_EMIT_CACHE = 1024  # emitted subjects remembered per step (a module chooses them)

Emit = Callable[[HostCall, str, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Crossing:
    """An integration event outputs become on one subject, its schema's validator built once."""

    event: EventSchema
    validator: Any  # a jsonschema validator of event.schema
    headers: Mapping[str, str]  # what names the schema on the wire

    @classmethod
    def of(cls, event: EventSchema | None) -> Crossing | None:
        """The crossing of a schema-bearing event; None for no event or one without a schema."""
        if event is None or event.schema is None:
            return None
        return cls(event, schema_validator(event.schema), {DATASCHEMA_HEADER: event.uri})

    def problem(self, data: Any) -> str | None:
        """Why ``data`` breaks the event's schema (the first problem, with its path), or None.

        Raw bytes (a ``raw`` codec's output) are read as JSON; bytes that are not
        JSON break any schema, which describes JSON.
        """
        if isinstance(data, bytes | bytearray):
            try:
                data = json.loads(data)
            except ValueError:
                return f"(root): {len(data)} bytes that are not JSON; the schema describes JSON"
        return validation_problem(self.validator, data)


def publish_crossings(
    manifest: OrgManifest | None, org: str, subjects: list[str]
) -> dict[str, Crossing]:
    """The schema-bearing integration events among a step's ``publish`` subjects."""
    if manifest is None or org not in manifest.orgs:
        return {}
    found = {s: Crossing.of(outgoing_event(manifest, org, s)) for s in subjects}
    return {s: c for s, c in found.items() if c is not None}


def output_refusal(crossings: Mapping[str, Crossing], data: Any) -> StepError | None:
    """The error dead-lettering an output that breaks one of the events it becomes, or None."""
    for subject, crossing in crossings.items():
        problem = crossing.problem(data)
        if problem is not None:
            event = crossing.event
            return StepError(
                f"output for {event.receiver} on {subject} breaks the "
                f"{event.integration}/{event.event} schema: {problem}",
                kind=ErrorKind.SCHEMA,
                retryable=False,
            )
    return None


class Output(Protocol):
    """A step's job as far as the check goes: its output, or why it failed."""

    output: Any
    error: StepError | None


def gate(
    jobs: Iterable[Output], crossings: Mapping[str, Crossing], publisher: Publisher
) -> Publisher:
    """Fail every job whose output breaks an event it would become, before anything is sent;
    return the publisher to send the others with (stamping ``ce-dataschema``).

    A step with no crossing subject gets ``publisher`` back at once.
    """
    if not crossings:
        return publisher
    for job in jobs:
        if job.error is None and job.output is not None:
            job.error = output_refusal(crossings, job.output)
    return SchemaStamp(publisher, crossings)


@dataclass(frozen=True, slots=True)
class SchemaStamp(Stamping):
    """A publisher adding the header naming the schema of what crosses an integration."""

    publisher: Publisher
    crossings: Mapping[str, Crossing]

    def stamp(self, subject: str, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The headers, with ``ce-dataschema`` on a crossing subject."""
        crossing = self.crossings.get(subject)
        return headers if crossing is None else {**headers, **crossing.headers}


class EmitContracts:
    """The integration events one step's ``emit`` calls may become, looked up once per subject."""

    def __init__(self, manifest: OrgManifest, org: str) -> None:
        self._manifest = manifest
        self._org = org
        self._seen: dict[str, Crossing | None] = {}

    def crossing(self, subject: str) -> Crossing | None:
        """The schema-bearing integration event an emit on ``subject`` becomes, if any."""
        try:
            return self._seen[subject]
        except KeyError:
            pass
        found = Crossing.of(outgoing_event(self._manifest, self._org, subject))
        if len(self._seen) >= _EMIT_CACHE:
            self._seen.clear()
        self._seen[subject] = found
        return found

    def check(self, subject: str, data: Any) -> None:
        """Refuse an emit whose data breaks the event it becomes.

        Raises:
            HostFunctionError: naming the event, the schema and the problem.
        """
        crossing = self.crossing(subject)
        problem = None if crossing is None else crossing.problem(data)
        if crossing is not None and problem is not None:
            event = crossing.event
            raise HostFunctionError(
                f"emit to {subject!r} for {event.receiver} breaks the "
                f"{event.integration}/{event.event} schema: {problem}"
            )

    def checked(self, publish: Emit) -> Emit:
        """``publish`` (an emitter) refusing data that breaks a crossing event's schema."""

        async def publish_checked(call: HostCall, subject: str, data: Any) -> None:
            self.check(subject, data)
            await publish(call, subject, data)

        return publish_checked

    def headers(self, subject: str) -> Mapping[str, str]:
        """The ``ce-dataschema`` header of an event emitted on ``subject`` (empty: none)."""
        crossing = self.crossing(subject)
        return {} if crossing is None else crossing.headers


def emit_contracts(
    manifest: OrgManifest | None, workflow: Workflow, step: Step
) -> EmitContracts | None:
    """What a step's emits are held to; None when none of its emit subjects can cross."""
    if manifest is None or not step.emit or workflow.org not in manifest.orgs:
        return None
    sent = [
        event.subject
        for item in manifest.integrations_of(workflow.org).values()
        for event in item.events.values()
        if event.sender == workflow.org and event.payload_schema is not None
    ]
    if not any(subjects_overlap(p, s) for p in step.emit for s in sent):
        return None
    return EmitContracts(manifest, workflow.org)


def of_step(
    services: dict[str, Any], manifest: OrgManifest | None, workflow: Workflow, step: Step
) -> tuple[dict[str, Any], dict[str, Crossing]]:
    """What a step's outputs and emits crossing an integration are held to, looked up once.

    Returns the step's services (with its :class:`EmitContracts` when an emit may
    cross) and the integration events among its ``publish`` subjects, for :func:`gate`.
    """
    contracts = emit_contracts(manifest, workflow, step)
    if contracts is not None:
        services = {**services, CONTRACTS_SERVICE: contracts}
    return services, publish_crossings(manifest, workflow.org, step.publish)
