"""Integrations: what a host org and a guest org promised each other, declared once.

An integration in the org manifest names a host (it runs the code), a guest (it
owns the code), the guest's modules and the host functions the host grants
them, the events each side sends the other with a JSON Schema for each payload,
and what the guest sees of its runs at the host. Everything that crosses
between the two accounts is derived from it: the event exports and imports,
and the control subjects (offers, receipts, run records) below.

Control subjects: an org publishes on ``deadlift.share.<peer>.<kind>.…``
(exported to ``peer`` only) and receives on ``deadlift.from.<sender>.<kind>.…``,
which only the server writes (no user may publish there), so the sending org
of a control message is always the account it came from.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from deadlift.model import names, topology
from deadlift.model.workflow import check_subject, subject_covers

SHARE = topology.SHARE_PREFIX
FROM = topology.FROM_PREFIX
# The control kinds: offers go guest → host; receipts and runs go host → guest.
OFFERS = "offers"
RECEIPTS = "receipts"
RUNS = "runs"
GUEST_TO_HOST = (OFFERS,)
HOST_TO_GUEST = (RECEIPTS, RUNS)
SCHEMA_URN = "urn:deadlift:contract"


def share_subject(peer: str, kind: str, *rest: str) -> str:
    """Where an org publishes a control message for ``peer``."""
    return ".".join((SHARE, peer, kind, *rest))


def from_subject(sender: str, kind: str, *rest: str) -> str:
    """Where a control message from ``sender`` arrives (written only by the server)."""
    return ".".join((FROM, sender, kind, *rest))


class EventContract(BaseModel):
    """An event one side of an integration sends the other."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    sender: str = Field(alias="from")
    subject: str
    to: str | None = None
    description: str = ""
    # A JSON Schema (draft 2020-12) for the payload; a string in the file names a
    # JSON or YAML file next to the manifest, read by `load_orgs`.
    payload_schema: dict[str, Any] | None = Field(None, alias="schema")

    @field_validator("subject", "to")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else check_subject(value, wildcards=True)

    @field_validator("payload_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                Draft202012Validator.check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value

    @property
    def local_subject(self) -> str:
        """The subject the receiving org sees."""
        return self.to or self.subject


class GuestModule(BaseModel):
    """A guest module the host agrees to run, and what it is granted there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    grants: list[str] = Field(default_factory=list)
    # Subjects (patterns allowed) the module may publish or emit on at the host,
    # besides the integration's events; by default only those.
    publish: list[str] = Field(default_factory=list)

    @field_validator("publish")
    @classmethod
    def _subjects(cls, value: list[str]) -> list[str]:
        return [check_subject(s, wildcards=True) for s in value]


class GuestSees(BaseModel):
    """What run records at the host tell the guest, besides outcome, timing and errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    logs: bool = True  # the module's own log lines
    payloads: bool = False  # the event the module got and what it returned


class Integration(BaseModel):
    """A host runs a guest's modules; both send each other declared events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    host: str
    guest: str
    # The guest's public nkey (``U…``): every module it offers is signed with it,
    # and the host verifies the signature on accept and on every load.
    signing_key: str = Field(pattern=r"^U[A-Z2-7]{55}$")
    modules: dict[str, GuestModule] = Field(default_factory=dict)
    events: dict[str, EventContract] = Field(default_factory=dict)
    guest_sees: GuestSees = Field(default_factory=GuestSees)

    @field_validator("modules", "events")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            names.check_name(name, field="name")
        return value

    def peer(self, org: str) -> str:
        """The other side of the integration."""
        return self.guest if org == self.host else self.host

    def receiver(self, event: EventContract) -> str:
        """The org an event is for."""
        return self.peer(event.sender)

    def event_on(self, sender: str, subject: str) -> tuple[str, EventContract] | None:
        """The declared event ``sender`` sends when publishing on ``subject``."""
        for name, event in self.events.items():
            if event.sender == sender and subject_covers(event.subject, subject):
                return name, event
        return None


def schema_uri(integration: str, event: str) -> str:
    """The ``ce-dataschema`` of an integration event."""
    return f"{SCHEMA_URN}:{integration}:{event}"


@cache
def _validator(schema_json: str) -> Draft202012Validator:
    import json

    return Draft202012Validator(json.loads(schema_json))


def schema_problem(schema: dict[str, Any], data: Any) -> str | None:
    """Why ``data`` does not satisfy ``schema`` (the first problem, with its path), or None."""
    import json

    return validation_problem(_validator(json.dumps(schema, sort_keys=True)), data)


def schema_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of ``schema``: build it once to check many payloads."""
    return Draft202012Validator(schema)


def validation_problem(validator: Draft202012Validator, data: Any) -> str | None:
    """Like :func:`schema_problem`, with a validator built before (see :func:`schema_validator`)."""
    error = next(iter(validator.iter_errors(data)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"
