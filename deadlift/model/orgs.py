"""The org manifest: who the organizations are, and what crosses between them.

One YAML file (``config/orgs.yaml``) declares every org — its NATS users, the
subjects it exports to whom, what it imports, its config values and secrets —
and :func:`render_nats_config` turns it into the nats-server accounts
configuration, so there is no second hand-kept copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deadlift.errors import ConfigError
from deadlift.model import integrations as links
from deadlift.model.integrations import Integration
from deadlift.model.workflow import NAME_PATTERN, check_subject, subject_covers

DEFAULT_FILE = "config/orgs.yaml"
SYSTEM_ACCOUNT = "SYS"
# What every org user may use besides its own subjects: Deadlift's internal
# subjects (private to the account), JetStream's API and acks, KV, object store,
# inboxes for replies, and NATS micro services.
INTERNAL_PUBLISH = [
    "deadlift.>",
    "$JS.API.>",
    "$JS.ACK.>",
    "$JS.FC.>",
    "$KV.>",
    "$O.>",
    "_INBOX.>",
    "$SRV.>",
    # The server tells a client which account (so which org) it is: identity
    # comes from the connection, never from a document.
    "$SYS.REQ.USER.INFO",
]
# The workflows bucket's subjects: a worker learns of an applied workflow there,
# at no cost while none changes (deadlift.bus.watch). Its own account's only.
INTERNAL_SUBSCRIBE = ["deadlift.>", "_INBOX.>", "$SRV.>", "$KV.deadlift_workflows.>"]
# Control messages from another org arrive here through an integration's import;
# no user may publish here, so their sender is always the account they came from.
SERVER_WRITTEN = [f"{links.FROM}.>"]


class User(BaseModel):
    """A NATS user of an org: a password for development, an nkey for production.

    ``role: admin`` (the default) runs workers and manages the org's account
    (JetStream: streams, consumers, the registry). ``role: publisher`` may only
    publish events on the org's own subjects (a partner system, a web hook
    relay): it cannot touch JetStream's API, so it cannot make the server write
    on its behalf (a stream that republishes or sources into an import, say).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str | None = None
    password: str | None = None
    nkey: str | None = Field(None, pattern=r"^U[A-Z2-7]{55}$")
    role: Literal["admin", "publisher"] = "admin"

    @model_validator(mode="after")
    def _one_kind(self) -> User:
        if not self.nkey and not (self.user and self.password):
            raise ValueError("a user needs user + password (development) or nkey (production)")
        return self


class Export(BaseModel):
    """Subjects an org lets other orgs receive."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: str
    to: list[str] = Field(min_length=1)

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        return check_subject(value, wildcards=True)


class Import(BaseModel):
    """Subjects an org receives from another org's export, optionally renamed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    org: str
    subject: str
    to: str | None = None

    @field_validator("subject", "to")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else check_subject(value, wildcards=True)

    @property
    def local_subject(self) -> str:
        """The subject the importing org sees."""
        return self.to or self.subject


class Secret(BaseModel):
    """Where a secret comes from: an environment variable, a file, or (dev only) a value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: str | None = None
    value: str | None = Field(None, repr=False)

    def resolve(self, name: str) -> str | None:
        """The secret's value, or None when its source is absent."""
        if self.env and os.environ.get(self.env) is not None:
            return os.environ[self.env]
        if self.file:
            try:
                return Path(self.file).read_text(encoding="utf-8").rstrip("\n")
            except OSError:
                return self.value
        return self.value


class Limits(BaseModel):
    """What one org may take of the shared server, so one org cannot starve another.

    Enforced by nats-server per account: JetStream storage, streams and consumers,
    and client connections. Sizes accept units (``512MiB``, ``2GB``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_storage: ByteSize = Field(ByteSize(1 << 30), gt=0, description="JetStream file storage")
    max_memory: ByteSize = Field(ByteSize(64 << 20), gt=0, description="JetStream memory storage")
    max_streams: int = Field(64, gt=0)
    max_consumers: int = Field(10_000, gt=0)
    max_connections: int = Field(256, gt=0)

    def jetstream(self) -> dict[str, int]:
        """The account's ``jetstream`` block."""
        return {
            "max_file": int(self.max_storage),
            "max_mem": int(self.max_memory),
            "max_streams": self.max_streams,
            "max_consumers": self.max_consumers,
        }


class Org(BaseModel):
    """One organization: its users, subjects, exports, imports, config, secrets and limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    users: list[User] = Field(min_length=1)
    subjects: list[str] = Field(default_factory=list)
    exports: list[Export] = Field(default_factory=list)
    imports: list[Import] = Field(default_factory=list)
    config: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, Secret] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: list[str]) -> list[str]:
        return [check_subject(s, wildcards=True) for s in value]


class OrgManifest(BaseModel):
    """Every org of a deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # No system user unless declared (an nkey in production): nothing ships a
    # system password, and Deadlift itself never needs one.
    system: User | None = None
    orgs: dict[str, Org] = Field(min_length=1)
    integrations: dict[str, Integration] = Field(default_factory=dict)

    @field_validator("orgs")
    @classmethod
    def _names(cls, value: dict[str, Org]) -> dict[str, Org]:
        for name in value:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"org name {name!r}: use lowercase letters, digits, _ and -")
        return value

    @model_validator(mode="after")
    def _links(self) -> OrgManifest:
        accounts = [account_name(name) for name in self.orgs]
        if len(accounts) != len(set(accounts)):
            raise ValueError(
                "two org names map to one NATS account (names differing only in - and _); "
                "rename one"
            )
        users = [u.user for org in self.orgs.values() for u in org.users if u.user]
        if len(users) != len(set(users)):
            raise ValueError("a user name is used twice; every user belongs to one org")
        for name, org in self.orgs.items():
            for export in org.exports:
                for target in export.to:
                    if target not in self.orgs:
                        raise ValueError(
                            f"org {name}: exports {export.subject} to unknown org {target!r}"
                        )
        self._check_integrations()
        for name, org in self.orgs.items():
            for imp in org.imports:
                if imp.org not in self.orgs:
                    raise ValueError(f"org {name}: imports from unknown org {imp.org!r}")
                if not any(
                    subject_covers(e.subject, imp.subject) and name in e.to
                    for e in self.exports_of(imp.org)
                ):
                    raise ValueError(
                        f"org {name}: imports {imp.subject} from {imp.org}, which exports no "
                        f"subject covering it to {name}; add an export to org {imp.org}"
                    )
        return self

    def _check_integrations(self) -> None:
        seen: dict[tuple[str, str], str] = {}
        for key, item in self.integrations.items():
            if not re.fullmatch(NAME_PATTERN, key):
                raise ValueError(
                    f"integration name {key!r}: use lowercase letters, digits, _ and -"
                )
            where = f"integration {key}"
            for role in ("host", "guest"):
                if getattr(item, role) not in self.orgs:
                    raise ValueError(f"{where}: {role} {getattr(item, role)!r} is not an org")
            if item.host == item.guest:
                raise ValueError(
                    f"{where}: host and guest are one org; an org runs its own modules"
                )
            pair = (item.host, item.guest)
            if pair in seen:
                raise ValueError(
                    f"{where}: {item.host} already hosts {item.guest} in integration "
                    f"{seen[pair]}; declare one integration per host and guest"
                )
            seen[pair] = key
            for name, event in item.events.items():
                if event.sender not in pair:
                    raise ValueError(
                        f"{where}: event {name}: from {event.sender!r} must be "
                        f"{item.host} or {item.guest}"
                    )
                if not any(subject_covers(own, event.subject) for own in self._own(event.sender)):
                    raise ValueError(
                        f"{where}: event {name}: {event.subject} is not a subject of "
                        f"{event.sender} (its own are {', '.join(self._own(event.sender))})"
                    )

    def _own(self, name: str) -> list[str]:
        return [f"{name}.>", *self.orgs[name].subjects]

    def exports_of(self, name: str) -> list[Export]:
        """What ``name`` exports: declared, and each event it sends in an integration."""
        derived = [
            Export(subject=event.subject, to=[item.receiver(event)])
            for item in self.integrations.values()
            for event in item.events.values()
            if event.sender == name
        ]
        return [*self.org(name).exports, *derived]

    def imports_of(self, name: str) -> list[Import]:
        """What ``name`` imports: declared, and each event it receives in an integration."""
        derived = [
            Import(org=event.sender, subject=event.subject, to=event.to)
            for item in self.integrations.values()
            for event in item.events.values()
            if name in (item.host, item.guest) and event.sender != name
        ]
        return [*self.org(name).imports, *derived]

    def integrations_of(self, name: str) -> dict[str, Integration]:
        """The integrations ``name`` takes part in, as host or guest."""
        return {k: i for k, i in self.integrations.items() if name in (i.host, i.guest)}

    def hosting(self, host: str, guest: str) -> tuple[str, Integration] | None:
        """The integration in which ``host`` runs ``guest``'s modules, if any."""
        for key, item in self.integrations.items():
            if (item.host, item.guest) == (host, guest):
                return key, item
        return None

    def org(self, name: str) -> Org:
        """The org called ``name``."""
        try:
            return self.orgs[name]
        except KeyError:
            raise ConfigError(
                f"org {name!r} is not in the org manifest (orgs: {', '.join(self.orgs)})"
            ) from None

    def org_of_user(self, user: str) -> str | None:
        """Which org a user belongs to."""
        for name, org in self.orgs.items():
            if any(u.user == user for u in org.users):
                return name
        return None

    def own_subjects(self, name: str) -> list[str]:
        """Subjects the org's users may publish and subscribe to (besides Deadlift's own)."""
        org = self.org(name)
        local_imports = [i.local_subject for i in self.imports_of(name)]
        return [f"{name}.>", *org.subjects, *local_imports]

    def import_subjects(self, name: str) -> list[str]:
        """Where other orgs' events arrive in ``name``'s account: only the server writes here.

        An org's own users may subscribe to them but never publish on them, so an
        event on one of these subjects came through the import, from its exporter.
        """
        return [i.local_subject for i in self.imports_of(name)]

    def org_of_account(self, account: str) -> str | None:
        """The org whose NATS account is ``account``."""
        for name in self.orgs:
            if account_name(name) == account:
                return name
        return None

    def origin_of(self, org: str, subject: str) -> str | None:
        """The org an event on ``subject`` came from, by ``org``'s import, or None (its own)."""
        for imp in self.imports_of(org):
            if subject_covers(imp.local_subject, subject):
                return imp.org
        return None


def account_name(org: str) -> str:
    """The NATS account of an org."""
    return org.upper().replace("-", "_")


# Parsed manifests by path and content: a process connecting as a thousand orgs (a
# fleet, a benchmark) parses and validates the file once. (A schema file it names
# is read with it; a process sees a changed schema file with a changed manifest.)
_LOADED: dict[tuple[str, str], OrgManifest] = {}


def load_orgs(path: str | Path) -> OrgManifest:
    """Read and validate an org manifest (parsed again only when its text changed).

    Raises:
        ConfigError: naming the file and what is wrong.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError:
        return _read_orgs(path)  # says what is wrong with the file
    key = (str(path.resolve()), hashlib.sha256(text).hexdigest())
    if key not in _LOADED:
        manifest = _read_orgs(path)
        _LOADED.clear()  # one version of one manifest is what a process uses
        _LOADED[key] = manifest
    return _LOADED[key]


def _read_orgs(path: Path) -> OrgManifest:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read org manifest: {exc.strerror}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    _read_schema_files(raw, path.parent, source=path)
    try:
        return OrgManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"{path}: invalid org manifest: {problems}") from None


def _read_schema_files(raw: Any, base: Path, *, source: Path) -> None:
    """Replace each event's ``schema: FILE`` by the schema read from FILE (next to the manifest)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("integrations"), dict):
        return
    for key, item in raw["integrations"].items():
        events = item.get("events") if isinstance(item, dict) else None
        for name, event in (events or {}).items() if isinstance(events, dict) else ():
            if not isinstance(event, dict) or not isinstance(event.get("schema"), str):
                continue
            file = base / event["schema"]
            where = f"{source}: integrations.{key}.events.{name}.schema"
            try:
                event["schema"] = yaml.safe_load(file.read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read {file}: {exc.strerror}") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where}: {file} is not JSON or YAML: {exc}") from None


def _control_links(manifest: OrgManifest, name: str) -> tuple[list[Any], list[Any]]:
    """The exports and imports of ``name`` for its integrations' control messages."""
    exports: dict[str, Any] = {}
    imports: dict[str, Any] = {}
    for item in manifest.integrations_of(name).values():
        peer = item.peer(name)
        sends, receives = (
            (links.HOST_TO_GUEST, links.GUEST_TO_HOST)
            if name == item.host
            else (links.GUEST_TO_HOST, links.HOST_TO_GUEST)
        )
        for kind in sends:
            subject = links.share_subject(peer, kind, ">")
            exports[subject] = {"stream": subject, "accounts": [account_name(peer)]}
        for kind in receives:
            imports[links.from_subject(peer, kind, ">")] = {
                "stream": {
                    "account": account_name(peer),
                    "subject": links.share_subject(name, kind, ">"),
                },
                "to": links.from_subject(peer, kind, ">"),
            }
    return list(exports.values()), list(imports.values())


def _user_entry(
    user: User, allow_pub: list[str], allow_sub: list[str], deny_pub: list[str]
) -> dict[str, Any]:
    entry: dict[str, Any] = (
        {"nkey": user.nkey} if user.nkey else {"user": user.user, "password": user.password}
    )
    publish: dict[str, Any] = {"allow": allow_pub}
    if deny_pub:
        publish["deny"] = deny_pub
    entry["permissions"] = {"publish": publish, "subscribe": {"allow": allow_sub}}
    return entry


def nats_accounts(manifest: OrgManifest) -> dict[str, Any]:
    """The ``accounts`` and ``system_account`` blocks of a nats-server config."""
    accounts: dict[str, Any] = {}
    for name, org in manifest.orgs.items():
        own = manifest.own_subjects(name)
        # Import subjects: readable, never writable by the org's own users.
        imported = [*manifest.import_subjects(name), *SERVER_WRITTEN]
        account: dict[str, Any] = {
            "jetstream": org.limits.jetstream(),
            "limits": {"max_connections": org.limits.max_connections},
            "users": [
                _user_entry(u, [*own, *INTERNAL_PUBLISH], [*own, *INTERNAL_SUBSCRIBE], imported)
                if u.role == "admin"
                # A publisher: its own subjects, and an inbox for the PubAcks.
                else _user_entry(u, own, ["_INBOX.>"], imported)
                for u in org.users
            ],
        }
        control_exports, control_imports = _control_links(manifest, name)
        exports = [
            {"stream": e.subject, "accounts": [account_name(t) for t in e.to]}
            for e in manifest.exports_of(name)
        ]
        imports = [
            {
                "stream": {"account": account_name(i.org), "subject": i.subject},
                **({"to": i.to} if i.to else {}),
            }
            for i in manifest.imports_of(name)
        ]
        if exports or control_exports:
            account["exports"] = [*exports, *control_exports]
        if imports or control_imports:
            account["imports"] = [*imports, *control_imports]
        accounts[account_name(name)] = account
    system = manifest.system
    accounts[SYSTEM_ACCOUNT] = {}
    if system is not None:
        accounts[SYSTEM_ACCOUNT]["users"] = [
            {"nkey": system.nkey}
            if system.nkey
            else {"user": system.user, "password": system.password}
        ]
    return {"accounts": accounts, "system_account": SYSTEM_ACCOUNT}


def render_nats_config(manifest: OrgManifest) -> str:
    """A nats-server configuration (JSON is valid nats-server config syntax)."""
    header = "# Generated by `deadlift nats-config` from the org manifest; do not edit.\n"
    return header + json.dumps(nats_accounts(manifest), indent=2) + "\n"
