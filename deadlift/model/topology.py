"""The names of everything Deadlift puts on NATS, spelled once.

Streams, subjects, consumers, buckets, ``Nats-Msg-Id`` values and the ids of
events derived from other events: every other module asks here. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum


class Stream(StrEnum):
    """Deadlift's streams in each org's account."""

    EVENTS = "DEADLIFT_EVENTS"  # triggers and publish/emit subjects of the org's own
    STEPS = "DEADLIFT_STEPS"  # step-to-step traffic: deadlift.step.>
    DLQ = "DEADLIFT_DLQ"  # dead letters: deadlift.dlq.>
    REGISTRY = "DEADLIFT_REGISTRY"  # modules and workflows (deadlift.bus.registry_store)


# Integrations (deadlift.model.integrations): a host keeps the modules a guest offers
# it, one stream per guest (its republished receipts tell the guest it has them);
# a guest keeps the run records of its modules at every host.
OFFERS_STREAM_PREFIX = "DEADLIFT_OFFERS_"
GUEST_RUNS_STREAM = "DEADLIFT_GUEST_RUNS"

# Events another org exports to this one are captured per exporter, apart from
# the org's own: a stream's duplicate window is keyed by Nats-Msg-Id, which the
# sender chooses, so a shared stream would let an exporter pre-occupy (and so
# silently drop) the ids of the org's own events, or of another exporter's.
IMPORT_STREAM_PREFIX = "DEADLIFT_IN_"


class Bucket(StrEnum):
    """The registry's buckets (KV and Object Store) in each org's account."""

    # The registry's key spaces, all in the stream Stream.REGISTRY (in an earlier
    # version's layout: an Object Store and two KV buckets of these names).
    BINARIES = "deadlift_modules"  # module binaries by sha256
    MODULES = "deadlift_module_meta"  # module metadata, NAME@VERSION → meta
    WORKFLOWS = "deadlift_workflows"  # applied workflows, ORG.NAME → workflow
    DEAD_LETTERS = "deadlift_dead_letters"  # Object Store: dead letters too large to be messages


class Outcome(StrEnum):
    """What happened to one event at one step."""

    OK = "ok"
    FILTERED = "filtered"  # the module returned nothing: the run ends here
    RETRY = "retry"  # failed; delivered again after the step's backoff
    DEAD = "dead"  # dead-lettered


class ErrorKind(StrEnum):
    """Why a step failed: in dead letters, spans, metrics and reports."""

    DECODE = "decode"
    ENCODE = "encode"
    TIMEOUT = "timeout"
    OOM = "oom"
    TRAP = "trap"
    ERROR = "error"
    HOST_FUNCTION = "host_function"
    MISSING_EXPORT = "missing_export"
    OUTPUT_TOO_LARGE = "output_too_large"
    PUBLISH = "publish"
    EXHAUSTED = "exhausted"
    PROVENANCE = "provenance"
    HOPS = "hops"  # the run passed through more steps than its hop limit: a loop or a storm
    SCHEMA = "schema"  # an output for another org breaks the integration's JSON Schema


# Workers advertise themselves as the NATS micro service WORKER_SERVICE; each answers
# "describe" on WORKER_DESCRIBE_PREFIX.<service id>.
WORKER_SERVICE = "deadlift-worker"
WORKER_DESCRIBE_PREFIX = "deadlift.workers"
WORKER_INFO_SUBJECT = f"$SRV.INFO.{WORKER_SERVICE}"

STEP_PREFIX = "deadlift.step"
DLQ_PREFIX = "deadlift.dlq"
STATE_BUCKET_PREFIX = "deadlift_state_"
# NATS's request/reply inboxes (``_INBOX.<random>``, ``_INBOX.<random>.<token>``): a
# stream capturing them stores reply traffic, its own PubAcks included, and feeds itself.
INBOX_PREFIX = "_INBOX"
# Subjects no workflow may trigger on, publish or emit to: Deadlift's and NATS's own.
# Integration control subjects (offers, receipts, run records) are Deadlift's too.
SHARE_PREFIX = "deadlift.share"
FROM_PREFIX = "deadlift.from"
RESERVED_PREFIXES = (
    f"{STEP_PREFIX}.",
    f"{DLQ_PREFIX}.",
    f"{SHARE_PREFIX}.",
    f"{FROM_PREFIX}.",
    "$",
    f"{INBOX_PREFIX}.",
)
RESERVED_PATTERNS = (
    f"{STEP_PREFIX}.>",
    f"{DLQ_PREFIX}.>",
    f"{SHARE_PREFIX}.>",
    f"{FROM_PREFIX}.>",
)


def import_stream(exporter_account: str) -> str:
    """The stream capturing what the org with NATS account ``exporter_account`` sends."""
    return IMPORT_STREAM_PREFIX + exporter_account


def step_subject(org: str, workflow: str, step: str) -> str:
    """The subject a step's input events are published on."""
    return f"{STEP_PREFIX}.{org}.{workflow}.{step}"


def dlq_subject(org: str, workflow: str, step: str) -> str:
    """The subject of a step's dead letters."""
    return f"{DLQ_PREFIX}.{org}.{workflow}.{step}"


def state_bucket(org: str) -> str:
    """The KV bucket holding an org's module state (``kv_*`` built-ins)."""
    return f"{STATE_BUCKET_PREFIX}{org}"


def consumer_name(org: str, workflow: str, step: str) -> str:
    """The durable consumer of a step's own input, shared by every worker running it.

    Names never hold ``--`` (see the name rule), so the join is unambiguous.
    """
    return f"{org}--{workflow}--{step}"


def trigger_consumer(org: str, workflow: str, step: str) -> str:
    """The durable consumer of an entry step on the org's own trigger subjects."""
    return f"{consumer_name(org, workflow, step)}--trigger"


def import_consumer(org: str, workflow: str, step: str, exporter: str) -> str:
    """The durable consumer of an entry step on the triggers arriving from ``exporter``."""
    return f"{consumer_name(org, workflow, step)}--from-{exporter}"


def derive_id(*parts: str) -> str:
    """A stable 32-hex-digit id from its parts (same parts, same id).

    Each part is length-prefixed, so no choice of part contents makes two
    different part lists hash the same input.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        raw = str(part).encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()


def foreign_event_id(stream: str, seq: int | str) -> str:
    """The id of a header-less message: from where it is stored, so redeliveries keep it."""
    return derive_id(stream, str(seq))


def output_id(
    source: str, event_id: str, workflow_key: str, step: str, origin: str | None = None
) -> str:
    """The id of a step's output: the same for every delivery of the same input.

    A run that came through an import derives its ids apart (the exporter chose
    the input's id and source), so it can never produce an id of the org's own.
    """
    if origin:
        return derive_id(origin, source, event_id, workflow_key, step)
    return derive_id(source, event_id, workflow_key, step)


def emitted_id(
    event_id: str, workflow_key: str, step: str, index: int, origin: str | None = None
) -> str:
    """The id of the ``index``-th event a step's call emits (a retry emits the same ids)."""
    scope = (origin,) if origin else ()
    return derive_id(*scope, event_id, workflow_key, step, str(index))


def output_msg_id(event_id: str, subject: str) -> str:
    """``Nats-Msg-Id`` of an event published to ``subject``: one event, one id per subject."""
    return f"{event_id}:{subject}"


def dlq_msg_id(stream: str, seq: int, org: str, workflow: str, step: str) -> str:
    """``Nats-Msg-Id`` of a dead letter: one letter per original message and step."""
    return f"dlq:{stream}:{seq}:{org}.{workflow}.{step}"


def dead_letter_object(letter_msg_id: str) -> str:
    """The Object Store name of a dead letter's body kept by reference (one per letter)."""
    return derive_id("dead-letter", letter_msg_id)


def replay_msg_id(letter_id: int, letter_time: str) -> str:
    """``Nats-Msg-Id`` of a dead letter's replay: replaying the same letter twice is one event."""
    return f"replay:{letter_id}:{letter_time}"
