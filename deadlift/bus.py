"""NATS and JetStream plumbing: connect, streams, consumers, durable publish.

The bus moves bytes and headers; :mod:`deadlift.events` knows how to encode them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from deadlift import names
from deadlift.errors import ConfigError, DeadliftError, PayloadTooLargeError, PermissionDeniedError
from deadlift.orgs import account_name
from deadlift.settings import Settings
from deadlift.workflow import (
    STEP_PREFIX,
    Step,
    Workflow,
    consumer_name,
    minimal_subjects,
    step_subject,
)

log = logging.getLogger("deadlift.bus")

STEPS_STREAM = "DEADLIFT_STEPS"
EVENTS_STREAM = "DEADLIFT_EVENTS"
DLQ_STREAM = "DEADLIFT_DLQ"
DLQ_PREFIX = "deadlift.dlq"
# Events another org exports to this one are captured per exporter, apart from
# the org's own: a stream's duplicate window is keyed by Nats-Msg-Id, which the
# sender chooses, so a shared stream would let an exporter pre-occupy (and so
# silently drop) the ids of the org's own events, or of another exporter's.
IMPORT_STREAM_PREFIX = "DEADLIFT_IN_"


def import_stream(exporter: str) -> str:
    """The stream capturing the events ``exporter`` sends to this org."""
    return IMPORT_STREAM_PREFIX + account_name(exporter)


@dataclass(frozen=True, slots=True)
class StepInput:
    """One durable consumer feeding a step: its stream, name, subjects, and provenance."""

    stream: str
    consumer: str
    filters: tuple[str, ...]
    origin: str | None = None  # the exporting org, for a trigger arriving through an import


def step_inputs(workflow: Workflow, step: Step) -> list[StepInput]:
    """The consumers of a step: its own input subject, and for an entry step its triggers.

    Every step reads ``deadlift.step.<org>.<workflow>.<step>`` (fed by the steps
    before it and by ``dlq replay``). Entry steps also read the workflow's own
    triggers from the events stream, and each import's triggers from that
    import's stream, so the org that sent an event is known from where it arrived.
    """
    name = consumer_name(workflow.org, workflow.name, step.name)
    inputs = [
        StepInput(STEPS_STREAM, name, (step_subject(workflow.org, workflow.name, step.name),))
    ]
    if step not in workflow.entry_steps():
        return inputs
    own = [t for t in workflow.trigger if t not in workflow.imports]
    if own:
        inputs.append(StepInput(EVENTS_STREAM, f"{name}--trigger", tuple(minimal_subjects(own))))
    for exporter, subjects in sorted(workflow.imported_triggers().items()):
        inputs.append(
            StepInput(
                import_stream(exporter),
                f"{name}--from-{exporter}",
                tuple(minimal_subjects(subjects)),
                origin=exporter,
            )
        )
    return inputs


@dataclass(frozen=True, slots=True)
class StepBinding:
    """Where a step's input comes from: a stream and the durable consumer on it."""

    stream: str
    consumer: str
    ack_wait: float = 30.0
    origin: str | None = None  # set for an import's trigger: the exporting org


class DeadliftClient(Client):
    """A NATS client that remembers permission violations.

    The server reports them asynchronously (only to ``error_cb``): a denied
    publish or subscription otherwise looks like silence.
    """

    def __init__(self) -> None:
        super().__init__()
        self.permission_errors: deque[str] = deque(maxlen=100)
        self.errors: deque[str] = deque(maxlen=10)

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
        log.error("NATS error: %s", exc)

    async def disconnected_cb() -> None:
        if not (client.is_closed or client.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def reconnected_cb() -> None:
        log.info("reconnected to NATS")

    options: dict[str, Any] = {
        "servers": [s.strip() for s in settings.nats_url.split(",") if s.strip()],
        "name": name,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
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
        auth = [e for e in client.errors if "authoriz" in e.lower() or "authent" in e.lower()]
        cause = (auth or list(client.errors) or [str(exc) or type(exc).__name__])[-1]
        if "maximum account active connections" in cause:
            advice = "the org's max_connections limit is reached (org manifest, limits:)"
        elif auth:
            advice = "check the credentials (--org, --creds, --user/--password)"
        else:
            advice = (
                "start one with `deadlift server`, set --server / DEADLIFT_NATS_URL, "
                "and check the credentials"
            )
        raise DeadliftError(
            f"cannot connect to NATS at {settings.nats_url}{who}: {cause}; {advice}"
        ) from None


def with_org_credentials(settings: Settings) -> Settings:
    """Fill in the credentials of ``settings.org`` from the org manifest, if none are set."""
    if not settings.org or settings.user or settings.creds or settings.token:
        return settings
    from deadlift.orgs import load_orgs

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


async def ensure_streams(
    js: JetStreamContext,
    settings: Settings,
    event_subjects: list[str],
    imported: Mapping[str, list[str]] | None = None,
) -> None:
    """Create or extend Deadlift's streams so every subject it uses is captured durably.

    ``imported`` maps an exporting org to the trigger subjects that arrive from it
    through an import; each exporter gets its own stream (see ``import_stream``).
    """

    def config(name: str, subjects: list[str]) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.stream_max_age_s,
            duplicate_window=settings.duplicate_window_s,
            num_replicas=settings.stream_replicas,
        )

    await _ensure_stream(js, config(STEPS_STREAM, [f"{STEP_PREFIX}.>"]))
    await _ensure_stream(js, config(DLQ_STREAM, [f"{DLQ_PREFIX}.>"]))
    if event_subjects:
        await _ensure_stream(js, config(EVENTS_STREAM, event_subjects), merge=True)
    for exporter, subjects in sorted((imported or {}).items()):
        await _ensure_stream(js, config(import_stream(exporter), subjects), merge=True)


async def _ensure_stream(
    js: JetStreamContext, config: StreamConfig, *, merge: bool = False
) -> None:
    assert config.name and config.subjects is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config.evolve(subjects=minimal_subjects(config.subjects)))
        except nats.js.errors.APIError as exc:
            raise _stream_conflict(config, exc) from None
        return
    current = list(info.config.subjects or [])
    wanted = minimal_subjects([*current, *config.subjects]) if merge else list(config.subjects)
    changed = (
        sorted(wanted) != sorted(current)
        or info.config.duplicate_window != config.duplicate_window
        or info.config.max_age != config.max_age
        # Replicas are raised, never lowered: a client with the default (1) must
        # not scale down a cluster's R3 streams. Lower them with the nats CLI.
        or (config.num_replicas or 1) > (info.config.num_replicas or 1)
    )
    if changed:
        try:
            await js.update_stream(
                info.config.evolve(
                    subjects=wanted,
                    duplicate_window=config.duplicate_window,
                    max_age=config.max_age,
                    num_replicas=max(config.num_replicas or 1, info.config.num_replicas or 1),
                )
            )
        except nats.js.errors.APIError as exc:
            raise _stream_conflict(config, exc) from None


def _stream_conflict(config: StreamConfig, exc: Exception) -> ConfigError:
    replicas = config.num_replicas or 1
    hint = (
        f"; or the server is not a cluster of at least {replicas} JetStream nodes "
        "(DEADLIFT_STREAM_REPLICAS)"
        if replicas > 1
        else ""
    )
    return ConfigError(
        f"cannot capture subjects {', '.join(config.subjects or [])} in stream {config.name}: "
        f"{exc}; another stream may already capture one of them{hint}"
    )


async def ensure_consumers(
    js: JetStreamContext, settings: Settings, workflow: Workflow, step: Step
) -> list[StepBinding]:
    """Create or update the durable pull consumers a step's workers share (``step_inputs``)."""
    bindings = []
    for wanted in step_inputs(workflow, step):
        config = consumer_config(wanted.consumer, list(wanted.filters), step, settings)
        try:
            info = await js.add_consumer(wanted.stream, config)
        except nats.js.errors.APIError as exc:
            raise ConfigError(
                f"workflow {workflow.key} step {step.name!r}: cannot create consumer "
                f"{wanted.consumer}: {exc}"
            ) from None
        ack_wait = info.config.ack_wait or settings.ack_wait_s
        bindings.append(
            StepBinding(wanted.stream, wanted.consumer, ack_wait=ack_wait, origin=wanted.origin)
        )
    return bindings


def consumer_config(
    name: str, filters: list[str], step: Step, settings: Settings
) -> ConsumerConfig:
    """The consumer configuration for a step (durable, explicit ack).

    Deliveries are unlimited: the worker, not the server, decides when an event
    is dead, so an event is never dropped silently (a server that gives up
    after ``max_deliver`` just stops delivering — no output, no dead letter).
    """
    return ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"deadlift step {name}",
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max(1000, settings.concurrency * 64),
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


async def delete_consumers(js: JetStreamContext, workflow: Workflow, step: Step) -> None:
    """Remove a step's consumers (ignoring ones already gone)."""
    for wanted in step_inputs(workflow, step):
        await delete_consumer(js, wanted.stream, wanted.consumer)


async def delete_consumer(js: JetStreamContext, stream: str, consumer: str) -> None:
    """Remove one consumer (ignoring one already gone, or its stream)."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(stream, consumer)


def check_size(nc: Client, subject: str, headers: Mapping[str, str], body: bytes) -> None:
    """Refuse a message the server would reject: nats-py closes the whole connection then.

    Raises:
        PayloadTooLargeError: naming the subject, the size and the limit.
    """
    limit = nc.max_payload
    size = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
    if limit and size > limit:
        raise PayloadTooLargeError(
            f"message for {subject} is {size} bytes, over the server's max_payload of {limit}; "
            "send a reference (e.g. an object store key) instead of the data"
        )


async def publish(
    js: JetStreamContext,
    nc: Client,
    subject: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float = 5.0,
) -> PubAck:
    """Publish durably (awaiting the PubAck), refusing bad input before nats-py sees it.

    Raises:
        ConfigError: the subject is not one a message can be published to
            (see :func:`deadlift.names.check_subject`: a newline would corrupt the
            protocol, an over-long subject would make the server drop the
            connection) or a header would break the header block.
        PayloadTooLargeError: over the server's max_payload (which closes the connection).
    """
    names.check_subject(subject, field="subject", wildcards=False)
    names.check_headers(headers)
    check_size(nc, subject, headers, body)
    try:
        return await js.publish(subject, body, headers=headers, timeout=timeout)
    except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError, TimeoutError):
        if isinstance(nc, DeadliftClient):
            await nc.check_allowed(subject)
        raise DeadliftError(
            f"no stream captures {subject} (or the server did not answer in {timeout:.0f} s); "
            "apply a workflow that triggers on or publishes to it"
        ) from None
