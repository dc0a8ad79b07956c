"""Deadlift events: CloudEvents attributes in NATS headers, msgpack body.

This is the binary content mode of the CloudEvents NATS binding. The module
knows nothing about NATS connections: it turns an :class:`Event` into
``(headers, body)`` and back.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import msgpack

from deadlift.errors import EventDecodeError, EventEncodeError
from deadlift.wire.headers import FixedHeaders, Headers

SPECVERSION = "1.0"
MSGPACK = "application/msgpack"
JSON = "application/json"
PREFIX = "ce-"
MSG_ID = "Nats-Msg-Id"
TRACEPARENT = "traceparent"

# Deadlift's own attributes, as CloudEvents extensions (lowercase alphanumeric).
RUN = "deadliftrun"
ORG = "deadliftorg"
WORKFLOW = "deadliftworkflow"
STEP = "deadliftstep"
# The org a run came from when it entered this org through an import. Stamped by
# the receiving worker from the import the event arrived on; a value sent by the
# producer is never trusted.
ORIGIN = "deadliftorigin"
# How many step outputs and emitted events the run went through to reach this event:
# absent (0) on an event from outside, one more on each event a step produces. A
# step refuses an event over its hop limit, so a loop or storm of workflows ends.
HOPS = "deadlifthops"
HOPS_HEADER = PREFIX + HOPS
_MAX_HOPS_DIGITS = 9

_REQUIRED = ("specversion", "id", "source", "type")
_KNOWN = frozenset({*_REQUIRED, "time", "subject", "datacontenttype", "dataschema"})
# CloudEvents extension names: lowercase ASCII letters and digits (also a valid header token).
_EXTENSION_NAME = re.compile(r"[a-z0-9]+")
# What the NATS binding percent-encodes in a ``ce-`` value: ``%`` and anything not
# ASCII. Everything else (the common case) travels byte-identical, unencoded.
_KEEP = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_value(value: str) -> str:
    """A ``ce-`` header value as the CloudEvents NATS binding sends it.

    Non-ASCII characters (as UTF-8) and ``%`` are percent-encoded; an ASCII
    value without ``%`` is returned unchanged.
    """
    if value.isascii() and "%" not in value:
        return value
    return urllib.parse.quote(value, safe=_KEEP, errors="surrogatepass")


def decode_value(value: str) -> str:
    """A received ``ce-`` header value, percent-decoded (see :func:`encode_value`).

    A ``%`` not followed by two hex digits stays as it is, and so does a value
    whose escapes are not UTF-8 (a foreign producer's literal text).
    """
    if "%" not in value:
        return value
    try:
        return urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        return value


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its data plus CloudEvents attributes.

    Attributes:
        data: any msgpack-encodable value (dicts, lists, str, bytes, numbers, None).
        id: unique per ``source``; Deadlift derives it deterministically from the input event.
        source: URI-reference naming the producer, e.g. ``deadlift://acme/calculator/add``.
        type: the kind of event, e.g. ``deadlift.step.output``.
        time: RFC 3339 timestamp.
        extensions: extension attributes such as ``deadliftrun``.
        foreign: True when the message carried no CloudEvents headers at all.
    """

    data: Any
    id: str
    source: str
    type: str
    time: str = ""
    subject: str | None = None
    datacontenttype: str = MSGPACK
    extensions: Mapping[str, str] = field(default_factory=dict)
    traceparent: str | None = None
    foreign: bool = False

    @property
    def run(self) -> str:
        """The run this event belongs to (its own id if it starts a run)."""
        return self.extensions.get(RUN) or self.id

    @property
    def origin(self) -> str | None:
        """The org this run came from through an import (as stamped on arrival), if any."""
        return self.extensions.get(ORIGIN) or None

    def with_data(self, data: Any) -> Event:
        """A copy carrying other data."""
        return replace(self, data=data)


def hop_count(event: Event) -> int:
    """The event's hop count: 0 for an event from outside Deadlift.

    Raises:
        EventDecodeError: ``ce-deadlifthops`` is not a decimal number of at most 9 digits.
    """
    value = event.extensions.get(HOPS)
    if value is None:
        return 0
    if len(value) <= _MAX_HOPS_DIGITS and value.isascii() and value.isdigit():
        return int(value)
    raise EventDecodeError(
        f"{HOPS_HEADER} must be a hop count (a decimal number of at most "
        f"{_MAX_HOPS_DIGITS} digits), not {value[:32]!r}"
    )


def now_rfc3339() -> str:
    """The current UTC time in RFC 3339 form with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id() -> str:
    """A random 32-hex-digit id."""
    return os.urandom(16).hex()


def new_event(
    data: Any,
    *,
    source: str,
    type: str,
    id: str | None = None,
    subject: str | None = None,
    extensions: Mapping[str, str] | None = None,
    traceparent: str | None = None,
) -> Event:
    """Build an event with a fresh id and time unless given."""
    return Event(
        data=data,
        id=id or new_id(),
        source=source,
        type=type,
        time=now_rfc3339(),
        subject=subject,
        extensions=dict(extensions or {}),
        traceparent=traceparent,
    )


def pack(data: Any) -> bytes:
    """msgpack-encode event data, with a clear error for values msgpack cannot carry."""
    try:
        return msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EventEncodeError(
            f"event data of type {type(data).__name__} cannot be encoded as msgpack: {exc}"
        ) from exc


def unpack(body: bytes) -> Any:
    """Decode a msgpack body; an empty body is ``None``."""
    if not body:
        return None
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise EventDecodeError(
            f"event body is not valid msgpack ({len(body)} bytes): {exc}"
        ) from exc


def encode(event: Event) -> tuple[dict[str, str], bytes]:
    """Encode an event as NATS headers and a body (binary content mode).

    Raises:
        EventEncodeError: an attribute cannot travel as a NATS header unchanged
            (not a string, empty where required, a line break, surrounding
            whitespace), an extension name is not lowercase alphanumeric or
            shadows a CloudEvents attribute, or the data is not msgpack-encodable.
    """
    headers = {
        f"{PREFIX}specversion": SPECVERSION,
        f"{PREFIX}id": event.id,
        f"{PREFIX}source": event.source,
        f"{PREFIX}type": event.type,
        f"{PREFIX}time": event.time or now_rfc3339(),
        f"{PREFIX}datacontenttype": MSGPACK,
    }
    for name in ("id", "source", "type"):
        value = headers[f"{PREFIX}{name}"]
        if not isinstance(value, str) or not value:
            raise EventEncodeError(f"event attribute {name!r} must be a non-empty string")
    if event.subject:
        headers[f"{PREFIX}subject"] = event.subject
    for name, value in event.extensions.items():
        if not isinstance(name, str) or not _EXTENSION_NAME.fullmatch(name):
            raise EventEncodeError(
                f"invalid extension attribute name {name!r}: "
                "use lowercase ASCII letters and digits only"
            )
        if name in _KNOWN:
            raise EventEncodeError(
                f"extension attribute {name!r} would overwrite the CloudEvents attribute"
            )
        headers[f"{PREFIX}{name}"] = value
    for name, value in headers.items():
        _check_header_value(name, value)
    headers = {name: encode_value(value) for name, value in headers.items()}
    if event.traceparent:
        _check_header_value(TRACEPARENT, event.traceparent)
        headers[TRACEPARENT] = event.traceparent
    return headers, pack(event.data)


def _check_header_value(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise EventEncodeError(
            f"event attribute {name!r} must be a string, not {type(value).__name__}"
        )
    if "\r" in value or "\n" in value:
        raise EventEncodeError(f"event attribute {name!r} contains a line break")
    if value != value.strip():
        # NATS strips header values in transit: the receiver would see another value.
        raise EventEncodeError(f"event attribute {name!r} has leading or trailing whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EventEncodeError(
            f"event attribute {name!r} is not valid Unicode text: {exc}"
        ) from exc


def attributes(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The CloudEvents attributes of a message's headers, by lowercase name without ``ce-``.

    Values are percent-decoded. Empty for a message of a foreign producer (no
    ``ce-`` headers at all).
    """
    return _attributes(headers)[0]


def _attributes(headers: Mapping[str, str] | None) -> tuple[dict[str, str], str | None]:
    """:func:`attributes` and the first ``traceparent`` (any case), in one pass."""
    found = {}
    traceparent = None
    for name, value in (headers or {}).items():
        lowered = name.lower()
        if lowered.startswith(PREFIX):
            found[lowered[3:]] = value if "%" not in value else decode_value(value)
        elif traceparent is None and lowered == TRACEPARENT:
            traceparent = value
    return found, traceparent


def decode(
    headers: Mapping[str, str] | None,
    body: bytes,
    *,
    fallback_id: str | Callable[[], str],
    fallback_source: str,
) -> Event:
    """Decode a NATS message into an event.

    A message with no CloudEvents headers comes from a foreign producer: its
    body is the data (parsed as JSON when it is JSON, else kept as bytes), and
    its id is ``fallback_id`` (Deadlift passes one derived from the stream
    sequence, so redeliveries keep it; a callable is called only then).

    Raises:
        EventDecodeError: required attributes are missing or the body does not
            match its content type.
    """
    ce, traceparent = _attributes(headers)
    if not ce:
        return Event(
            data=_foreign_data(body),
            id=fallback_id if isinstance(fallback_id, str) else fallback_id(),
            source=fallback_source,
            type="deadlift.foreign",
            time=now_rfc3339(),
            datacontenttype="",
            traceparent=traceparent,
            foreign=True,
        )
    missing = [name for name in _REQUIRED if not ce.get(name)]
    if missing:
        raise EventDecodeError(
            "message has CloudEvents headers but lacks "
            + ", ".join(f"{PREFIX}{name}" for name in missing)
            + "; send all of ce-specversion, ce-id, ce-source, ce-type, or no ce- headers at all"
        )
    if ce["specversion"] != SPECVERSION:
        raise EventDecodeError(
            f"unsupported ce-specversion {ce['specversion']!r}; Deadlift reads {SPECVERSION!r}"
        )
    content_type = ce.get("datacontenttype", MSGPACK)
    return Event(
        data=_decode_body(content_type, body),
        id=ce["id"],
        source=ce["source"],
        type=ce["type"],
        time=ce.get("time", ""),
        subject=ce.get("subject"),
        datacontenttype=content_type,
        extensions={k: v for k, v in ce.items() if k not in _KNOWN},
        traceparent=traceparent,
    )


def _decode_body(content_type: str, body: bytes) -> Any:
    media = content_type.split(";", 1)[0].strip().lower()
    if media in (MSGPACK, "application/x-msgpack"):
        return unpack(body)
    if media == JSON or media.endswith("+json"):
        if not body:
            return None
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise EventDecodeError(
                f"event body is not valid JSON although ce-datacontenttype is "
                f"{content_type!r}: {exc}"
            ) from exc
    return bytes(body)


def _foreign_data(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return bytes(body)


class OutputEncoder:
    """Encodes one producer's events fast: the attributes that never change are rendered once.

    A step's source, type and its org/workflow/step extensions are the same for
    every output; only the id, time, run and ``traceparent`` vary. The result is
    what :func:`encode` gives for the same event.
    """

    def __init__(self, *, source: str, type: str, extensions: Mapping[str, str]) -> None:
        per_event = sorted({RUN, ORIGIN, HOPS} & set(extensions))
        if per_event:
            raise EventEncodeError(
                f"extension attribute(s) {', '.join(per_event)} are set per event, not per producer"
            )
        template = Event(
            data=None, id="-", source=source, type=type, time="-", extensions=dict(extensions)
        )
        static, _ = encode(template)  # validates the fixed attributes once
        for name in ("id", "time"):
            static.pop(f"{PREFIX}{name}")
        # Rendered once as the NATS header block's first lines (see wire.headers).
        self._static = FixedHeaders(static)

    @classmethod
    def for_step(cls, org: str, workflow: str, step: str, *, kind: str = "") -> OutputEncoder:
        """The encoder of a step's events: source ``deadlift://org/workflow/step``,
        type ``deadlift.org.workflow.step`` (plus ``.kind``, e.g. ``emit``)."""
        return cls(
            source=f"deadlift://{org}/{workflow}/{step}",
            type=f"deadlift.{org}.{workflow}.{step}" + (f".{kind}" if kind else ""),
            extensions={ORG: org, WORKFLOW: workflow, STEP: step},
        )

    def encode(
        self,
        data: Any,
        *,
        id: str,
        time: str,
        run: str,
        traceparent: str | None,
        origin: str | None = None,
        hops: int | None = None,
    ) -> tuple[Headers, bytes]:
        """Headers and body of one output event (``hops``: its hop count, see :data:`HOPS`).

        The headers read as :func:`encode`'s dict; their fixed part is rendered already.
        """
        headers = {f"{PREFIX}id": id, f"{PREFIX}time": time}
        _check_header_value(f"{PREFIX}{RUN}", run)
        headers[f"{PREFIX}{RUN}"] = encode_value(run)
        if hops is not None:
            headers[HOPS_HEADER] = str(hops)
        if origin:
            headers[f"{PREFIX}{ORIGIN}"] = encode_value(
                origin
            )  # an org name: validated by the manifest
        if traceparent:
            _check_header_value(TRACEPARENT, traceparent)
            headers[TRACEPARENT] = traceparent
        return Headers(self._static, headers), pack(data)


# Headers the server sets on what a stream writes itself: a republish, or a message
# sourced from another stream. An import delivers what the exporter published,
# without them; with them, a stream of the importing account put it there.
SERVER_RELAY_HEADERS = frozenset({"Nats-Stream", "Nats-Stream-Source"})


def relayed_by_server(headers: Mapping[str, str] | None) -> bool:
    """Whether a stream of this account, not a client (or an import), wrote the message."""
    return bool(headers) and not SERVER_RELAY_HEADERS.isdisjoint(headers or ())
