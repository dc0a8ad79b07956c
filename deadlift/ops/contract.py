"""Integrations as both sides see them: the contract, and the applied workflows checked against it.

:func:`show` describes integrations from the org manifest alone; :func:`check`
reads each side's applied workflows from its own account (with the manifest's
development credentials where it has them) and holds every step to the
contract; :func:`asyncapi` is an org's AsyncAPI document. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deadlift import bus
from deadlift.bus.identity import whoami
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError, DeadliftError
from deadlift.model import asyncapi as asyncapi_document
from deadlift.model.contracts import event_users, step_problems
from deadlift.model.integrations import EventContract, Integration, schema_uri
from deadlift.model.orgs import OrgManifest, account_name
from deadlift.model.workflow import Workflow
from deadlift.settings import Settings


def select(manifest: OrgManifest, *, org: str | None, name: str | None) -> dict[str, Integration]:
    """The integrations ``org`` takes part in (every one without ``org``), or just ``name``.

    Raises:
        ConfigError: ``org`` is not in the manifest, or ``name`` is not one of its integrations.
    """
    if org is None:
        scope = manifest.integrations
    else:
        manifest.org(org)  # an unknown org is a ConfigError naming the manifest's orgs
        scope = manifest.integrations_of(org)
    if name is None:
        return dict(scope)
    if name not in scope:
        whose = f"org {org}'s" if org else "the manifest's"
        raise ConfigError(
            f"integration {name!r} is not one of {whose} integrations "
            f"({', '.join(scope) or 'none'}); see `deadlift contract show`"
        )
    return {name: scope[name]}


def show(
    manifest: OrgManifest, *, org: str | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    """Each selected integration as ``contract show`` prints it (see :func:`describe`)."""
    return [describe(key, item) for key, item in select(manifest, org=org, name=name).items()]


def describe(key: str, item: Integration) -> dict[str, Any]:
    """One integration: sides, signing key, modules and grants, events with their schemas,
    and what the guest sees of its runs."""
    return {
        "name": key,
        "description": item.description,
        "host": item.host,
        "guest": item.guest,
        "signing_key": item.signing_key,
        "modules": [
            {
                "module": f"{item.guest}/{module}",
                "description": declared.description,
                "grants": list(declared.grants),
                "publish": list(declared.publish),
            }
            for module, declared in item.modules.items()
        ],
        "events": [_event(key, item, name, event) for name, event in item.events.items()],
        "guest_sees": item.guest_sees.model_dump(),
    }


def _event(key: str, item: Integration, name: str, event: EventContract) -> dict[str, Any]:
    schema = event.payload_schema
    return {
        "name": name,
        "from": event.sender,
        "to": item.receiver(event),
        "subject": event.subject,
        "arrives_on": event.local_subject,
        "description": event.description,
        "schema": None
        if schema is None
        else {
            "uri": schema_uri(key, name),
            "title": schema.get("title"),
            "required": list(schema.get("required") or []),
            "properties": list(schema.get("properties") or {}),
        },
    }


@dataclass(slots=True)
class Side:
    """One org's applied workflows, held to the contract."""

    org: str
    checked: bool = False
    note: str | None = None  # why it was not checked
    workflows: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    """What ``contract check`` found: per side problems, per integration event warnings."""

    sides: list[Side]
    integrations: list[dict[str, Any]]

    @property
    def problems(self) -> int:
        """How many problems, over every side."""
        return sum(len(side.problems) for side in self.sides)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``ok``: no problem found)."""
        return {
            "ok": self.problems == 0,
            "sides": [asdict(side) for side in self.sides],
            "integrations": self.integrations,
        }


async def check(settings: Settings, manifest: OrgManifest, *, name: str | None = None) -> Report:
    """Check each side's applied workflows of the selected integrations against the contract.

    The org acting (``settings.org``, or the account of the given credentials)
    is read with its own credentials; the other side with the manifest's
    development credentials when it has them, else it is reported not checked.
    Without an acting org, every integration of the manifest is checked.

    Raises:
        ConfigError: an unknown org or integration.
        DeadliftError: the acting org cannot connect, or no side could be checked.
    """
    acting = settings.org or await _acting_org(settings, manifest)
    selected = select(manifest, org=acting, name=name)
    orgs = sorted({org for item in selected.values() for org in (item.host, item.guest)})
    sides = {org: Side(org) for org in orgs}
    shared: list[Workflow] | None = None  # a single-tenant server: one registry for all
    applied: list[Workflow] = []
    for org in orgs:
        side = sides[org]
        if shared is None:
            side.note, found, single = await _read_side(settings, manifest, org, acting)
            if single:
                shared = found
        if shared is not None:
            found, side.note = shared, None
        if side.note is not None:
            continue
        side.checked = True
        mine = [w for w in found if w.org == org]
        side.workflows = [w.key for w in mine]
        side.problems = [
            f"{w.key}: step {s.name!r}: {p}"
            for w in mine
            for s in w.steps
            for p in step_problems(manifest, w, s)
        ]
        applied.extend(mine)
    if sides and not any(side.checked for side in sides.values()):
        notes = "; ".join(f"{s.org}: {s.note}" for s in sides.values())
        raise DeadliftError(f"no side of the integrations could be checked ({notes})")
    return Report(
        sides=list(sides.values()),
        integrations=[
            _usage(manifest, key, item, sides, applied) for key, item in selected.items()
        ],
    )


async def _acting_org(settings: Settings, manifest: OrgManifest) -> str | None:
    """The org of explicitly given credentials (None without any, or on a single-tenant server)."""
    if not (settings.user or settings.creds or settings.token):
        return None
    nc = await bus.connect(settings, name="deadlift-contract")
    try:
        identity = await whoami(nc)
    finally:
        await nc.close()
    return None if identity.single_tenant else manifest.org_of_account(identity.account)


async def _read_side(
    settings: Settings, manifest: OrgManifest, org: str, acting: str | None
) -> tuple[str | None, list[Workflow], bool]:
    """Why ``org`` cannot be read (or None), its registry's workflows, and whether the server
    is single-tenant (one registry holds every org's workflows)."""
    if org == acting:
        as_side = settings
    elif any(u.user and u.password for u in manifest.org(org).users):
        as_side = settings.model_copy(
            update={"org": org, "user": None, "password": None, "creds": None, "token": None}
        )
    else:
        return (
            f"not checked: no credentials for org {org} here; "
            f"run `deadlift --org {org} contract check`",
            [],
            False,
        )
    try:
        nc = await bus.connect(as_side, name="deadlift-contract")
    except DeadliftError as exc:
        if org == acting:
            raise
        return f"not checked: cannot connect as org {org}: {exc}", [], False
    try:
        identity = await whoami(nc)
        if not identity.single_tenant and identity.account != account_name(org):
            return (
                f"not checked: the credentials used for org {org} belong to account "
                f"{identity.account}",
                [],
                False,
            )
        registry = await Registry.open(nc.jetstream(), replicas=settings.stream_replicas)
        return None, await registry.workflows(), identity.single_tenant
    finally:
        await nc.drain()


def _usage(
    manifest: OrgManifest,
    key: str,
    item: Integration,
    sides: dict[str, Side],
    applied: list[Workflow],
) -> dict[str, Any]:
    """Per event of one integration: who sends it and what it triggers; warnings for the unused."""
    users = event_users(manifest, key, applied)
    events: dict[str, Any] = {}
    warnings: list[str] = []
    for name, event in item.events.items():
        receiver = item.receiver(event)
        sender_known, receiver_known = sides[event.sender].checked, sides[receiver].checked
        sent_by = users[name]["sent_by"] if sender_known else None
        triggers = users[name]["triggers"] if receiver_known else None
        events[name] = {"sent_by": sent_by, "triggers": triggers}
        if sent_by == []:
            warnings.append(
                f"event {name}: declared but never sent: no applied workflow of {event.sender} "
                f"publishes or emits on {event.subject}"
            )
        if triggers == []:
            warnings.append(
                f"event {name}: declared but never consumed: no applied workflow of {receiver} "
                f"triggers on {event.local_subject}"
            )
    return {
        "name": key,
        "host": item.host,
        "guest": item.guest,
        "events": events,
        "warnings": warnings,
    }


def asyncapi(manifest: OrgManifest, org: str) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``org``'s subjects and integration events.

    Raises:
        ConfigError: ``org`` is not in the manifest.
    """
    return asyncapi_document.document(manifest, org)
