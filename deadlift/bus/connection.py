"""Connecting to NATS: credentials, a first connection that fails fast, permission errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from deadlift.errors import ConfigError, DeadliftError, PermissionDeniedError
from deadlift.model.orgs import load_orgs
from deadlift.settings import Settings, missing_orgs_file

log = logging.getLogger("deadlift.bus")


class DeadliftClient(Client):
    """A NATS client that remembers permission violations.

    The server reports them asynchronously (only to ``error_cb``): a denied
    publish or subscription otherwise looks like silence.
    """

    def __init__(self) -> None:
        super().__init__()
        self.permission_errors: deque[str] = deque(maxlen=100)
        self.errors: deque[str] = deque(maxlen=10)
        # Called after every reconnect: pull requests did not survive it (cold steps re-check).
        self.on_reconnect: list[Callable[[], None]] = []

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        """nats-py's header-block parser, same result in half the time (every delivery's
        CloudEvents headers pass through it, on the event loop).

        The same rules: ``Name: value`` lines, names stripped and ASCII with no
        whitespace inside (str.isspace), values stripped and decoded with
        ``replace``. Only the whitespace check differs: one ``split`` instead of a
        generator over the name's characters.
        """
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if key and key.split() != [key]:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out

    async def reconnected(self) -> None:
        """nats-py's ``reconnected_cb``: tell the listeners."""
        log.info("reconnected to NATS")
        for listener in list(self.on_reconnect):
            listener()

    def denied(self, subject: str) -> str | None:
        """The violation reported for ``subject``, if any."""
        wanted = f'"{subject}"'.lower()  # nats-py lowercases the server's -ERR text
        for message in reversed(self.permission_errors):
            if wanted in message.lower():
                return message
        return None

    async def check_allowed(self, subject: str) -> None:
        """Raise if the server refused a subscription or publish on ``subject``."""
        await self.flush()
        # The server sends -ERR before the PONG that ends the flush, but nats-py
        # reports it through a task that may run a little later: give it time.
        message = None
        for _ in range(20):
            message = self.denied(subject)
            if message:
                break
            await asyncio.sleep(0.025)
        if message:
            raise PermissionDeniedError(
                f"permission denied: {message.removeprefix('nats: ')}; this org's users may "
                "not use that subject (see the org manifest, config/orgs.yaml)"
            )


async def connect(settings: Settings, *, name: str = "deadlift") -> DeadliftClient:
    """Connect to NATS with the settings' URL and credentials; reconnect forever.

    With ``settings.org`` and no explicit credentials, the org's first user in
    the org manifest is used (development setups).
    """
    settings = with_org_credentials(settings)
    client = DeadliftClient()

    async def error_cb(exc: Exception) -> None:
        text = str(exc)
        client.errors.append(text or type(exc).__name__)
        if "permissions violation" in text.lower():
            client.permission_errors.append(text)
        # Before the first connection, the error raised below names the cause once.
        log.log(logging.ERROR if client.is_connected else logging.DEBUG, "NATS error: %s", exc)

    async def disconnected_cb() -> None:
        if not (client.is_closed or client.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    options: dict[str, Any] = {
        "servers": [s.strip() for s in settings.nats_url.split(",") if s.strip()],
        "name": name,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": client.reconnected,
        # Give up on the *first* connection after a few tries (a wrong URL or
        # password must be an error, not a hang); reconnect forever once connected.
        "max_reconnect_attempts": 2,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "allow_reconnect": True,
    }
    if settings.creds:
        options["user_credentials"] = settings.creds
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password or ""
    if settings.token:
        options["token"] = settings.token
    try:
        await client.connect(**options)
        client.options["max_reconnect_attempts"] = -1
        return client
    except (TimeoutError, OSError, nats.errors.NoServersError, nats.errors.Error) as exc:
        who = f" as {settings.user}" if settings.user else ""
        # The server closes the socket after refusing a login; name the refusal.
        said = [*client.errors, str(exc)]
        auth = [e for e in said if "authoriz" in e.lower() or "authent" in e.lower()]
        # What the server said (-ERR) explains more than the socket error after it.
        told = [e for e in client.errors if e.startswith("nats: '")]
        cause = (auth or told or list(client.errors) or [str(exc) or type(exc).__name__])[-1]
        if "maximum account active connections" in cause:
            advice = "the org's max_connections limit is reached (org manifest, limits:)"
        elif auth:
            advice = _credentials_advice(settings)
        else:
            advice = (
                "start one with `deadlift server`, set --server / DEADLIFT_NATS_URL, "
                "and check the credentials"
            )
        raise DeadliftError(
            f"cannot connect to NATS at {settings.nats_url}{who}: {cause}; {advice}"
        ) from None


def _credentials_advice(settings: Settings) -> str:
    """What to do when the server refused the connection's credentials."""
    if settings.creds or settings.user or settings.token:
        given = "the credentials file" if settings.creds else "the user and password"
        if settings.token:
            given = "the token"
        return (
            f"the server refused {given}; check them, or act as an org with --org NAME "
            "(development credentials from the org manifest) or --creds FILE"
        )
    orgs = ""
    if missing_orgs_file(settings.orgs_file) is None:
        with contextlib.suppress(ConfigError):
            orgs = f" (one of: {', '.join(load_orgs(settings.orgs_file).orgs)})"
    return (
        "the server requires credentials (one account per org): pass --org NAME"
        f"{orgs} or DEADLIFT_ORG for an org's development credentials from the org "
        "manifest, or --creds FILE"
    )


def with_org_credentials(settings: Settings) -> Settings:
    """Fill in the credentials of ``settings.org`` from the org manifest, if none are set."""
    if not settings.org or settings.user or settings.creds or settings.token:
        return settings
    missing = missing_orgs_file(settings.orgs_file)
    if missing:
        raise ConfigError(f"--org {settings.org}: {missing}; or pass --creds FILE")
    manifest = load_orgs(settings.orgs_file)
    users = sorted(  # an admin first: commands and workers manage the account
        (u for u in manifest.org(settings.org).users if u.user and u.password),
        key=lambda u: u.role != "admin",
    )
    if not users:
        raise ConfigError(
            f"org {settings.org!r} has no password users in {settings.orgs_file}; "
            "pass --creds FILE instead"
        )
    return settings.model_copy(update={"user": users[0].user, "password": users[0].password})
