"""Workflows checked against the integrations they take part in.

Pure functions of the org manifest and a workflow: ``workflow apply`` refuses
what they refuse, a worker refuses to start such a step whatever client stored
it, and ``deadlift contract check`` reports them for both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deadlift.errors import ConfigError
from deadlift.model.integrations import Integration, schema_uri
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Step, Workflow, subject_covers, subjects_overlap


def module_owner(ref: str) -> str | None:
    """The org owning a module reference ``OWNER/NAME[@VERSION]``; None for the org's own."""
    head = ref.partition("@")[0]
    return head.partition("/")[0] if "/" in head else None


def module_name(ref: str) -> str:
    """``NAME`` of ``[OWNER/]NAME[@VERSION]``."""
    return ref.partition("@")[0].rpartition("/")[2]


@dataclass(frozen=True, slots=True)
class EventSchema:
    """The contract an output on one subject must satisfy."""

    integration: str
    event: str
    receiver: str
    schema: dict[str, Any] | None

    @property
    def uri(self) -> str:
        """The ``ce-dataschema`` it is sent with."""
        return schema_uri(self.integration, self.event)


def outgoing_event(manifest: OrgManifest, sender: str, subject: str) -> EventSchema | None:
    """The declared integration event ``sender`` sends by publishing on ``subject``, if any."""
    for key, item in manifest.integrations_of(sender).items():
        found = item.event_on(sender, subject)
        if found is not None:
            name, event = found
            return EventSchema(key, name, item.receiver(event), event.payload_schema)
    return None


def step_problems(manifest: OrgManifest, workflow: Workflow, step: Step) -> list[str]:
    """Why ``step`` breaks an integration of ``workflow.org`` (empty: it keeps them all)."""
    problems = _received_problems(manifest, workflow, step)
    owner = module_owner(step.module)
    if owner is None:
        return problems
    return problems + _guest_problems(manifest, workflow, step, owner)


def _received_problems(manifest: OrgManifest, workflow: Workflow, step: Step) -> list[str]:
    """A step may not publish or emit where a peer's integration events arrive.

    Only the peer's export delivers there (the org's users may not publish on
    an import): such a step would fail on every event.
    """
    org = workflow.org
    problems: list[str] = []
    for key, item in manifest.integrations_of(org).items():
        for name, event in item.events.items():
            if event.sender == org:
                continue
            for field, subjects in (("publish", step.publish), ("emit", step.emit)):
                problems.extend(
                    f"{field}: {subject}: {event.local_subject} is where {event.sender}'s event "
                    f"{name} of integration {key} arrives; only {event.sender} sends there, so "
                    "publish to one of the org's own subjects"
                    for subject in subjects
                    if subjects_overlap(event.local_subject, subject)
                )
    return problems


def _guest_problems(manifest: OrgManifest, workflow: Workflow, step: Step, owner: str) -> list[str]:
    """Why a step running ``owner``'s module breaks the integration hosting it."""
    org = workflow.org
    name = module_name(step.module)
    if owner == org:
        return [f"module: {step.module}: name the org's own modules without {org}/"]
    found = manifest.hosting(org, owner)
    if found is None:
        return [
            f"module: {step.module} belongs to {owner}, and no integration in the org "
            f"manifest has {org} hosting {owner}'s modules; declare one under integrations:"
        ]
    key, item = found
    declared = item.modules.get(name)
    if declared is None:
        return [
            f"module: integration {key} does not list {owner}'s module {name!r} "
            f"(it lists: {', '.join(item.modules) or 'none'}); add it under modules:"
        ]
    problems = []
    extra = sorted(set(step.host_functions) - set(declared.grants))
    if extra:
        problems.append(
            f"host_functions: {', '.join(extra)} not granted to {owner}/{name} by integration "
            f"{key} (grants: {', '.join(declared.grants) or 'none'})"
        )
    for field, subjects in (("publish", step.publish), ("emit", step.emit)):
        for subject in subjects:
            if not _allowed_for_guest(item, org, declared.publish, subject):
                problems.append(
                    f"{field}: {subject}: {owner}/{name} may publish only the events {org} sends "
                    f"in integration {key} ({_sent(item, org)}) and its declared publish subjects"
                )
    return problems


def _allowed_for_guest(item: Integration, host: str, extra: list[str], subject: str) -> bool:
    sent = [e.subject for e in item.events.values() if e.sender == host]
    return any(subject_covers(pattern, subject) for pattern in [*sent, *extra])


def _sent(item: Integration, org: str) -> str:
    return ", ".join(e.subject for e in item.events.values() if e.sender == org) or "none"


def check_workflow(manifest: OrgManifest, workflow: Workflow, *, source: str) -> None:
    """Refuse a workflow that breaks one of its org's integrations.

    Raises:
        ConfigError: naming the source, the step and the field.
    """
    if workflow.org not in manifest.orgs:
        return
    for step in workflow.steps:
        problems = step_problems(manifest, workflow, step)
        if problems:
            raise ConfigError(f"{source}: step {step.name!r}: " + "; ".join(problems))


def event_users(
    manifest: OrgManifest, key: str, workflows: list[Workflow]
) -> dict[str, dict[str, list[str]]]:
    """Per event of integration ``key``: the steps that send it and the workflows it triggers."""
    item = manifest.integrations[key]
    found: dict[str, dict[str, list[str]]] = {}
    for name, event in item.events.items():
        receiver = item.receiver(event)
        senders = [
            f"{w.key}/{s.name}"
            for w in workflows
            if w.org == event.sender
            for s in w.steps
            if any(subjects_overlap(event.subject, p) for p in [*s.publish, *s.emit])
        ]
        triggered = [
            w.key
            for w in workflows
            if w.org == receiver
            and any(subjects_overlap(event.local_subject, t) for t in w.trigger)
        ]
        found[name] = {"sent_by": senders, "triggers": triggered}
    return found
