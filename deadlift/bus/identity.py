"""Who a connection is: the org a worker or command acts for comes from its NATS account.

An ``org:`` field in a workflow, a module's metadata or an event header is a
claim to check against this, never a source of rights or secrets. The server
says which account a client's credentials belong to (``$SYS.REQ.USER.INFO``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client

from deadlift import bus
from deadlift.errors import DeadliftError, PermissionDeniedError
from deadlift.model.orgs import SYSTEM_ACCOUNT, account_name
from deadlift.settings import Settings

USER_INFO = "$SYS.REQ.USER.INFO"
# The account of a server without accounts: one trust domain, every client equal.
GLOBAL_ACCOUNT = "$G"


@dataclass(frozen=True, slots=True)
class Identity:
    """The account a connection belongs to, and so the org it may act for."""

    account: str
    user: str = ""

    @property
    def single_tenant(self) -> bool:
        """A server without accounts: every client shares one account (development)."""
        return self.account == GLOBAL_ACCOUNT

    def admits(self, org: str) -> bool:
        """Whether this connection may act for ``org`` (its own account's org)."""
        return self.single_tenant or account_name(org) == self.account

    def check(self, org: str, *, what: str) -> None:
        """Refuse a document that claims an org this connection is not.

        Raises:
            PermissionDeniedError: naming the claim and the connection's account.
        """
        if not self.admits(org):
            raise PermissionDeniedError(
                f"{what}: org: claims org {org!r}, but these credentials belong to NATS "
                f"account {self.account}; an org acts only in its own account (connect "
                f"with {org}'s credentials, e.g. --org {org})"
            )


async def whoami(nc: Client, *, timeout: float = 2.0) -> Identity:
    """Ask the server which account ``nc``'s credentials belong to.

    Raises:
        DeadliftError: the server does not answer (the user may lack permission
            to publish on ``$SYS.REQ.USER.INFO``; ``deadlift nats-config`` grants it).
    """
    try:
        reply = await nc.request(USER_INFO, b"", timeout=timeout)
        info = json.loads(reply.data)["data"]
        return Identity(account=str(info["account"]), user=str(info.get("user") or ""))
    except (nats.errors.Error, TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise DeadliftError(
            f"cannot tell which org these credentials belong to (no answer on {USER_INFO}: "
            f"{exc!r}); the server must be nats-server 2.10 or newer and the user allowed "
            "to publish on it (re-render the accounts with `deadlift nats-config`)"
        ) from None


def as_system(settings: Settings) -> Settings:
    """The same server, with the system account's credentials instead of an org's."""
    return settings.model_copy(
        update={
            "org": None,
            "creds": settings.system_creds,
            "user": settings.system_user,
            "password": settings.system_password,
            "token": None,
        }
    )


async def require_operator(settings: Settings, *, command: str) -> Identity:
    """Prove the caller is the deployment's operator before a command that spans orgs.

    An operator holds the system account's credentials (``DEADLIFT_SYSTEM_CREDS``,
    or ``DEADLIFT_SYSTEM_USER`` / ``DEADLIFT_SYSTEM_PASSWORD``); an org's user does
    not. On a single-tenant development server every client is equal, so the
    check passes there.

    Raises:
        PermissionDeniedError: naming the command and what to pass.
    """
    refusal = (
        f"{command} is an operator command: it reads every org's account. Pass the "
        "system account's credentials (--system-creds FILE, or DEADLIFT_SYSTEM_USER and "
        "DEADLIFT_SYSTEM_PASSWORD; declare the user under `system:` in the org manifest)"
    )
    try:
        nc = await bus.connect(as_system(settings), name="deadlift-operator")
    except DeadliftError as exc:
        raise PermissionDeniedError(f"{refusal} ({exc})") from None
    try:
        identity = await whoami(nc)
    finally:
        await nc.close()
    if identity.single_tenant:
        return identity
    if identity.account != SYSTEM_ACCOUNT or not (settings.system_creds or settings.system_user):
        raise PermissionDeniedError(refusal)
    return identity
