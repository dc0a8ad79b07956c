"""Dead letters: events a step could not process, kept with why, and replayable.

A dead letter is the original message (body and headers) on
``deadlift.dlq.<org>.<workflow>.<step>`` in stream ``DEADLIFT_DLQ``, plus
``Deadlift-*`` headers saying where it came from and what went wrong. Its id is
its sequence number in that stream.

The stream is created by the org's first dead letter (:func:`ensure_stream`), not
when a workflow is applied: most orgs never have one, and an idle stream costs the
server memory. Without it an org simply has no dead letters.

A letter that would not fit in a message (an event close to the server's
``max_payload`` plus the ``Deadlift-*`` headers) keeps the original body and
headers by reference: in the Object Store bucket ``deadlift_dead_letters``,
created on first use, under the name in its ``Deadlift-Body-Ref`` header; the
letter's own body is then empty. :func:`get`, :func:`replay` and :func:`purge`
follow the reference.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType

from deadlift.bus.publisher import MSG_ID, Publisher
from deadlift.bus.streams import STREAM_NAME_IN_USE, STREAM_NOT_FOUND, dead_letter_config
from deadlift.errors import (
    ConfigError,
    DeadliftError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from deadlift.model import names, topology
from deadlift.model.topology import Bucket, Stream, step_subject
from deadlift.settings import Settings
from deadlift.wire import events

H_ORG = "Deadlift-Org"
H_WORKFLOW = "Deadlift-Workflow"
H_STEP = "Deadlift-Step"
H_MODULE = "Deadlift-Module"
H_SUBJECT = "Deadlift-Subject"
H_STREAM = "Deadlift-Stream"
H_SEQ = "Deadlift-Stream-Seq"
H_ATTEMPTS = "Deadlift-Attempts"
H_KIND = "Deadlift-Error-Kind"
H_ERROR = "Deadlift-Error"
H_TIME = "Deadlift-Time"
H_BODY_REF = "Deadlift-Body-Ref"  # the Object Store name holding the original body and headers
MAX_ERROR_CHARS = 1000
CHUNK_BYTES = 128 * 1024  # object store chunk size, when the server's max_payload allows


async def ensure_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the dead-letter stream ``DEADLIFT_DLQ`` unless it is there.

    Writers call it when a dead letter finds no stream (:func:`record`). Writers
    racing are fine: creating a stream with the configuration it has is a no-op,
    and one created meanwhile with another (older settings) is kept as it is.

    Raises:
        DeadliftError: the server refused it (the account's ``max_streams``, say).
    """
    try:
        await js.add_stream(dead_letter_config(settings))
    except nats.js.errors.APIError as exc:
        if exc.err_code == STREAM_NAME_IN_USE:
            return
        raise DeadliftError(
            f"cannot create the dead-letter stream {Stream.DLQ}: {exc.description or exc}; "
            "dead letters are kept back (redelivered) until it can be: raise the org's "
            "limits.max_streams in the org manifest if it is full"
        ) from None


class BodyStore(Protocol):
    """Where letters too large to be messages keep their original body and headers."""

    async def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` (replacing what was there)."""
        ...

    async def get(self, name: str) -> bytes | None:
        """What ``name`` holds (None: no such object)."""
        ...

    async def delete(self, name: str) -> None:
        """Remove ``name`` (nothing happens when it is gone already)."""
        ...


class ObjectBodies:
    """:class:`BodyStore` on the JetStream Object Store bucket ``deadlift_dead_letters``.

    The bucket is opened on first use and created then if missing, so a worker
    that never meets an oversized letter never touches it.
    """

    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self.js = js
        self.replicas = replicas
        self._bucket: Any = None

    async def _open(self, *, create: bool) -> Any:
        if self._bucket is None:
            try:
                self._bucket = await self.js.object_store(Bucket.DEAD_LETTERS)
            except nats.js.errors.NotFoundError:
                if not create:
                    return None
                config = ObjectStoreConfig(storage=StorageType.FILE, replicas=self.replicas)
                try:
                    self._bucket = await self.js.create_object_store(
                        Bucket.DEAD_LETTERS, config=config
                    )
                except nats.js.errors.BadRequestError:  # created meanwhile by another worker
                    self._bucket = await self.js.object_store(Bucket.DEAD_LETTERS)
        return self._bucket

    async def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, creating the bucket on first use."""
        bucket = await self._open(create=True)
        # Chunks must fit max_payload too (nats-py's default is 128 KiB per chunk).
        max_payload = int(getattr(getattr(self.js, "_nc", None), "max_payload", 0) or 0)
        chunk = min(CHUNK_BYTES, max(1024, max_payload - 1024)) if max_payload else CHUNK_BYTES
        options = ObjectMetaOptions(max_chunk_size=chunk)
        await bucket.put(name, data, meta=ObjectMeta(name=name, options=options))

    async def get(self, name: str) -> bytes | None:
        """What ``name`` holds (None: no bucket or no such object)."""
        bucket = await self._open(create=False)
        if bucket is None:
            return None
        try:
            result = await bucket.get(name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        return bytes(result.data or b"")

    async def delete(self, name: str) -> None:
        """Remove ``name``; nothing happens when it (or the bucket) is gone already."""
        bucket = await self._open(create=False)
        if bucket is None:
            return
        gone = (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError)
        with contextlib.suppress(*gone):
            await bucket.delete(name)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered event."""

    id: int
    org: str
    workflow: str
    step: str
    subject: str
    attempts: int
    kind: str
    error: str
    module: str
    time: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    ref: str = ""  # the Object Store name keeping the body and headers ("": in the letter)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields, without the body."""
        data = asdict(self)
        data.pop("body")
        data["size"] = len(self.body)
        data["headers"] = dict(self.headers)
        if not self.ref:
            data.pop("ref")
        return data

    def original_headers(self) -> dict[str, str]:
        """The headers the event arrived with."""
        return {
            k: v for k, v in self.headers.items() if not k.startswith("Deadlift-") and k != MSG_ID
        }


async def record(
    publisher: Publisher,
    *,
    org: str,
    workflow: str,
    step: str,
    module: str,
    subject: str,
    headers: Mapping[str, str] | None,
    body: bytes,
    stream: str,
    seq: int,
    attempts: int,
    kind: str,
    error: str,
    store: BodyStore | None = None,
    create_stream: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Store a dead letter durably (deduplicated per original message and step).

    A letter that would not fit within the publisher's ``max_payload`` keeps the
    original body (and the original headers, when even they do not fit) in
    ``store`` and carries a :data:`H_BODY_REF` to it instead; the error text is
    shortened until the letter fits.

    A letter no stream takes (the org's first: the stream is created lazily) calls
    ``create_stream`` (:func:`ensure_stream`) and is published once more.

    Raises:
        PayloadTooLargeError: the letter does not fit and there is no ``store``,
            or ``max_payload`` cannot hold even the letter's names.
        DeadliftError: it could not be stored (the caller keeps the event).
    """
    # An event's own Deadlift-* headers are dropped: one could forge a body reference.
    original = {
        k: v for k, v in (headers or {}).items() if k != MSG_ID and not k.startswith("Deadlift-")
    }
    msg_id = topology.dlq_msg_id(stream, seq, org, workflow, step)
    about = {
        H_ORG: org,
        H_WORKFLOW: workflow,
        H_STEP: step,
        H_MODULE: module,
        H_SUBJECT: subject,
        H_STREAM: stream,
        H_SEQ: str(seq),
        H_ATTEMPTS: str(attempts),
        H_KIND: kind,
        H_ERROR: " ".join(error.split())[:MAX_ERROR_CHARS],
        H_TIME: events.now_rfc3339(),
    }
    letter_subject = topology.dlq_subject(org, workflow, step)
    limit = publisher.max_payload
    letter = {**original, **about}
    if not _fits(limit, letter, body, msg_id):
        if store is None:
            raise PayloadTooLargeError(
                f"dead letter for {letter_subject} is over the server's max_payload of {limit} "
                "and no store was given to keep its body by reference"
            )
        ref = topology.dead_letter_object(msg_id)
        await store.put(ref, _envelope(original, body))
        body = b""
        letter = {**original, **about, H_BODY_REF: ref}
        if not _fits(limit, letter, body, msg_id):
            letter = {**about, H_BODY_REF: ref}  # the original headers are in the object
        letter[H_ERROR] = _shortened(limit, letter, msg_id)
    try:
        await publisher.publish(letter_subject, body, letter, msg_id=msg_id)
    except (ConfigError, PermissionDeniedError, PayloadTooLargeError):
        raise  # refused for what it is: a stream would not change that
    except DeadliftError:
        # No stream took it (or no answer came): create the stream, then publish again.
        # The same Nats-Msg-Id makes a letter stored by the first try no duplicate.
        if create_stream is None:
            raise
        await create_stream()
        await publisher.publish(letter_subject, body, letter, msg_id=msg_id)


def letter_size(headers: Mapping[str, str], body: bytes) -> int:
    """Bytes a message takes against ``max_payload``: body plus the encoded header block."""
    block = sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
    return len(body) + block + 12  # "NATS/1.0\r\n" and the closing "\r\n"


def _fits(limit: int, headers: Mapping[str, str], body: bytes, msg_id: str) -> bool:
    return not limit or letter_size({**headers, MSG_ID: msg_id}, body) <= limit


def _shortened(limit: int, letter: dict[str, str], msg_id: str) -> str:
    """The letter's error text, cut until the letter fits (``limit`` 0: no limit)."""
    error = letter[H_ERROR]
    if not limit:
        return error
    without = letter_size({**letter, H_ERROR: "", MSG_ID: msg_id}, b"")
    room = limit - without
    if room < 0:
        raise PayloadTooLargeError(
            f"the server's max_payload of {limit} bytes cannot hold a dead letter's "
            f"headers ({without} bytes); raise max_payload"
        )
    return error.encode()[:room].decode("utf-8", "ignore")  # never half a character


def _envelope(headers: Mapping[str, str], body: bytes) -> bytes:
    return json.dumps({"headers": dict(headers), "body": base64.b64encode(body).decode()}).encode()


def _unwrap(data: bytes, ref: str) -> tuple[dict[str, str], bytes]:
    try:
        envelope = json.loads(data)
        return dict(envelope["headers"]), base64.b64decode(envelope["body"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DeadliftError(
            f"dead letter body {ref!r} in bucket {Bucket.DEAD_LETTERS} is corrupt ({exc})"
        ) from None


def parse(seq: int, headers: Mapping[str, str] | None, body: bytes | None = b"") -> DeadLetter:
    """A dead letter from a stored message: its sequence in the DLQ stream, headers and body."""
    h = dict(headers or {})
    attempts = h.get(H_ATTEMPTS, "0")
    return DeadLetter(
        id=seq,
        org=h.get(H_ORG, ""),
        workflow=h.get(H_WORKFLOW, ""),
        step=h.get(H_STEP, ""),
        subject=h.get(H_SUBJECT, ""),
        attempts=int(attempts) if attempts.isdigit() else 0,
        kind=h.get(H_KIND, ""),
        error=h.get(H_ERROR, ""),
        module=h.get(H_MODULE, ""),
        time=h.get(H_TIME, ""),
        headers=h,
        body=body or b"",
        ref=h.get(H_BODY_REF, ""),
    )


def step_of(subject: str) -> tuple[str, str, str] | None:
    """``(org, workflow, step)`` of a dead-letter subject (None for any other subject)."""
    prefix = f"{topology.DLQ_PREFIX}."
    parts = subject[len(prefix) :].split(".") if subject.startswith(prefix) else []
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def stored_headers(msg: Any) -> dict[str, str]:
    """The headers of a message read with ``get_msg``, as text.

    nats-py parses them with the e-mail parser, which turns a non-ASCII value
    into an ``email.header.Header`` that cannot be published again; so they are
    read from the raw header block instead (UTF-8, as they were sent).
    """
    raw = getattr(msg, "hdrs", None)
    if not raw:
        return {k: str(v) for k, v in (msg.headers or {}).items()}
    block = base64.b64decode(raw)
    found: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:  # the first line is "NATS/1.0"
        name, sep, value = line.partition(b":")
        if sep and name.strip():
            found[name.strip().decode("ascii", "replace")] = value.strip().decode(
                "utf-8", "replace"
            )
    return found


async def stream_exists(js: JetStreamContext) -> bool:
    """Whether the org has its dead-letter stream (created with its first dead letter)."""
    try:
        await js.stream_info(Stream.DLQ)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def letters(
    js: JetStreamContext,
    *,
    org: str | None = None,
    workflow: str | None = None,
    step: str | None = None,
    limit: int = 10_000,
) -> list[DeadLetter]:
    """Dead letters, oldest first, optionally of one org, workflow or step.

    A letter kept by reference is listed without its body (see :func:`get`). An org
    without a dead-letter stream (it never had a dead letter) has none.

    Raises:
        ConfigError: ``org``, ``workflow`` or ``step`` is not a valid name.
    """
    for label, value in (("org", org), ("workflow", workflow), ("step", step)):
        if value is not None:
            names.check_name(value, field=label)
    filter_subject = topology.dlq_subject(org or "*", workflow or "*", step or "*")
    try:
        info = await js.stream_info(Stream.DLQ)
    except nats.js.errors.NotFoundError:
        return []
    found: list[DeadLetter] = []
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq and len(found) < limit:
        try:
            msg = await js.get_msg(Stream.DLQ, seq=seq, subject=filter_subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        if msg.seq is None:
            break
        found.append(parse(msg.seq, stored_headers(msg), msg.data))
        seq = msg.seq + 1
    return found


async def get(
    js: JetStreamContext, letter_id: int, *, store: BodyStore | None = None
) -> DeadLetter:
    """One dead letter by id, with its original body and headers (following a reference).

    Raises:
        NotFoundError: no such dead letter (maybe replayed or purged already).
    """
    try:
        msg = await js.get_msg(Stream.DLQ, seq=letter_id)
    except nats.js.errors.APIError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            raise NotFoundError(
                f"no dead letter {letter_id}: this org has no dead letters (its stream "
                f"{Stream.DLQ} is created with the first)"
            ) from None
        raise NotFoundError(
            f"no dead letter {letter_id}; `deadlift dlq ls` lists them (replayed ones are removed)"
        ) from None
    letter = parse(letter_id, stored_headers(msg), msg.data)
    return await load(store or ObjectBodies(js), letter)


async def load(store: BodyStore, letter: DeadLetter) -> DeadLetter:
    """``letter`` with the body and headers it keeps by reference (itself when it has none).

    Raises:
        NotFoundError: the referenced body is gone (the letter was replayed or purged).
    """
    if not letter.ref or letter.body:
        return letter
    data = await store.get(letter.ref)
    if data is None:
        raise NotFoundError(
            f"dead letter {letter.id}'s body {letter.ref!r} is gone from bucket "
            f"{Bucket.DEAD_LETTERS} (replayed or purged meanwhile)"
        )
    headers, body = _unwrap(data, letter.ref)
    return replace(letter, headers={**headers, **letter.headers}, body=body)


@dataclass(frozen=True, slots=True)
class Reinjected:
    """What replaying one letter did."""

    subject: str
    duplicate: bool  # the replay was published before (another replay of the same letter)


async def reinject(
    js: JetStreamContext,
    publisher: Publisher,
    letter: DeadLetter,
    *,
    store: BodyStore | None = None,
) -> Reinjected:
    """Re-inject a dead letter into its step's input, then remove it (and its stored body).

    A step's input consumer is made on demand: make it first
    (``bus.ensure_on_demand``, as ``ops.dead_letters.replay`` does), or nothing
    reads the event. Idempotent: the replay's ``Nats-Msg-Id`` is derived from the letter, so two
    replays of one letter publish one event (the second sees ``duplicate``), and
    a letter or body removed meanwhile by someone else is no error.

    Raises:
        NotFoundError: the letter's body kept by reference is gone already.
    """
    store = store or ObjectBodies(js)
    letter = await load(store, letter)
    subject = step_subject(letter.org, letter.workflow, letter.step)
    msg_id = topology.replay_msg_id(letter.id, letter.time)
    ack = await publisher.publish(subject, letter.body, letter.original_headers(), msg_id=msg_id)
    await _delete(js, store, letter)
    return Reinjected(subject, bool(ack.duplicate))


async def _delete(js: JetStreamContext, store: BodyStore, letter: DeadLetter) -> bool:
    """Remove a letter, then its stored body; False when the letter was gone already."""
    try:
        await js.delete_msg(Stream.DLQ, letter.id)
        gone = False
    except nats.js.errors.APIError:
        gone = True  # removed meanwhile (another replay or purge)
    if letter.ref:
        await store.delete(letter.ref)
    return not gone


async def purge(
    js: JetStreamContext,
    *,
    org: str | None = None,
    workflow: str | None = None,
    step: str | None = None,
) -> int:
    """Delete dead letters (all, or of one org, workflow or step) and their stored bodies.

    Returns how many this call deleted (those removed meanwhile by someone else
    are not counted).
    """
    store = ObjectBodies(js)
    chosen = await letters(js, org=org, workflow=workflow, step=step)
    return sum([await _delete(js, store, letter) for letter in chosen])
