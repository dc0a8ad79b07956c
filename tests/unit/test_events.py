"""Events: CloudEvents attributes in NATS headers, msgpack body, ids."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deadlift.errors import DeadliftError, EventDecodeError, EventEncodeError
from deadlift.model.topology import derive_id
from deadlift.wire import events
from deadlift.wire.events import Event, decode, encode, new_event

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def roundtrip(event: Event) -> Event:
    headers, body = encode(event)
    return decode(headers, body, fallback_id="fallback", fallback_source="nats:x")


def ce_headers(**overrides: str | None) -> dict[str, str]:
    """Complete CloudEvents headers; an override of None removes that header."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "id-1",
        "ce-source": "deadlift://acme/calc/add",
        "ce-type": "deadlift.step.output",
    }
    for name, value in overrides.items():
        key = "ce-" + name
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    return headers


# --- encode / decode --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"a": 1, "b": [1, 2, {"c": None}]},
        [1, "two", 3.5, None, True, False],
        "héllo wörld — 你好 🎉",
        b"\x00\xff raw bytes",
        0,
        -(2**63),
        2**64 - 1,
        1.5e-300,
        None,
        {"nested": {"deeper": {"list": [[], {}, [b"x", {"k": "v"}]]}}},
        {1: "int keys", 2: "also"},
        "",
        {},
        [],
    ],
    ids=repr,
)
def test_roundtrip_preserves_data(data: Any) -> None:
    event = new_event(data, source="deadlift://acme/calc/add", type="deadlift.step.output")
    assert roundtrip(event).data == data


def test_roundtrip_preserves_every_attribute() -> None:
    event = Event(
        data={"n": 1},
        id="0123abcd",
        source="deadlift://acme/calculator/add",
        type="deadlift.step.output",
        time="2024-05-01T12:00:00.000001Z",
        subject="customer/42",
        extensions={events.RUN: "run-7", events.ORG: "acme", events.STEP: "add"},
        traceparent=TRACEPARENT,
    )
    decoded = roundtrip(event)
    assert decoded == event
    assert decoded.foreign is False
    assert decoded.run == "run-7"


def test_encode_uses_cloudevents_nats_binding_headers_and_msgpack_body() -> None:
    event = Event(
        data={"x": [1, 2]},
        id="abc",
        source="deadlift://acme/wf/s",
        type="t.output",
        time="2024-01-01T00:00:00Z",
        subject="sub",
        extensions={"deadliftrun": "r1"},
        traceparent=TRACEPARENT,
    )
    headers, body = encode(event)
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "abc",
        "ce-source": "deadlift://acme/wf/s",
        "ce-type": "t.output",
        "ce-time": "2024-01-01T00:00:00Z",
        "ce-datacontenttype": "application/msgpack",
        "ce-subject": "sub",
        "ce-deadliftrun": "r1",
        "traceparent": TRACEPARENT,
    }
    assert msgpack.unpackb(body, raw=False) == {"x": [1, 2]}


def test_encode_fills_in_missing_time_and_omits_absent_optional_headers() -> None:
    headers, _ = encode(Event(data=None, id="i", source="s", type="t"))
    assert headers["ce-time"].endswith("Z")
    assert "ce-subject" not in headers
    assert "traceparent" not in headers


def test_new_event_gives_fresh_ids_and_run_defaults_to_own_id() -> None:
    a = new_event(1, source="s", type="t")
    b = new_event(1, source="s", type="t")
    assert a.id != b.id
    assert len(a.id) == 32
    assert a.run == a.id
    assert new_event(1, source="s", type="t", id="given").id == "given"


def test_decode_reads_header_names_case_insensitively() -> None:
    headers = {k.upper(): v for k, v in ce_headers().items()} | {"TraceParent": TRACEPARENT}
    event = decode(headers, msgpack.packb(5), fallback_id="f", fallback_source="s")
    assert (event.id, event.data, event.traceparent) == ("id-1", 5, TRACEPARENT)


def test_decode_without_content_type_assumes_msgpack_and_empty_body_is_none() -> None:
    headers = ce_headers()
    assert decode(headers, msgpack.packb([1]), fallback_id="f", fallback_source="s").data == [1]
    assert decode(headers, b"", fallback_id="f", fallback_source="s").data is None


# --- foreign producers (no headers) -----------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {}, {"Nats-Msg-Id": "m1"}])
def test_message_without_ce_headers_is_foreign_with_json_body_as_data(
    headers: dict[str, str] | None,
) -> None:
    event = decode(headers, b'{"amount": 42}', fallback_id="seq-9", fallback_source="nats:calc.in")
    assert event.foreign is True
    assert event.data == {"amount": 42}
    assert event.id == "seq-9"
    assert event.source == "nats:calc.in"
    assert event.run == "seq-9"


def test_foreign_non_json_body_is_kept_as_bytes() -> None:
    body = b"\x89PNG not json \xff"
    event = decode(None, body, fallback_id="f", fallback_source="s")
    assert event.foreign is True
    assert event.data == body
    assert isinstance(event.data, bytes)


def test_foreign_message_keeps_its_traceparent() -> None:
    event = decode({"traceparent": TRACEPARENT}, b"1", fallback_id="f", fallback_source="s")
    assert event.foreign is True
    assert event.traceparent == TRACEPARENT


def test_foreign_deeply_nested_json_is_kept_as_bytes_not_a_crash() -> None:
    body = b"[" * 100_000
    assert decode(None, body, fallback_id="f", fallback_source="s").data == body


# --- JSON content type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/ld+json"]
)
def test_json_content_type_body_is_decoded_as_json(content_type: str) -> None:
    headers = ce_headers(datacontenttype=content_type)
    body = json.dumps({"ü": [1, None]}).encode()
    event = decode(headers, body, fallback_id="f", fallback_source="s")
    assert event.data == {"ü": [1, None]}
    assert event.datacontenttype == content_type


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\xfa", b"[" * 100_000])
def test_invalid_json_body_with_json_content_type_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(EventDecodeError, match="not valid JSON"):
        decode(
            ce_headers(datacontenttype="application/json"),
            body,
            fallback_id="f",
            fallback_source="s",
        )


def test_unknown_content_type_body_is_kept_as_bytes() -> None:
    headers = ce_headers(datacontenttype="application/octet-stream")
    assert decode(headers, b"\x01\x02", fallback_id="f", fallback_source="s").data == b"\x01\x02"


# --- decode errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["specversion", "id", "source", "type"])
def test_missing_required_attribute_is_named_in_the_error(missing: str) -> None:
    with pytest.raises(EventDecodeError, match=f"ce-{missing}"):
        decode(ce_headers(**{missing: None}), b"", fallback_id="f", fallback_source="s")


def test_every_missing_attribute_is_named_and_empty_counts_as_missing() -> None:
    headers = {"ce-type": "t", "ce-id": ""}
    with pytest.raises(EventDecodeError) as info:
        decode(headers, b"", fallback_id="f", fallback_source="s")
    lacks = str(info.value).split(";")[0]
    assert all(f"ce-{name}" in lacks for name in ("specversion", "id", "source"))
    assert "ce-type" not in lacks


@pytest.mark.parametrize("version", ["0.3", "2.0", "1"])
def test_unsupported_specversion_is_a_decode_error(version: str) -> None:
    with pytest.raises(EventDecodeError, match="specversion"):
        decode(ce_headers(specversion=version), b"", fallback_id="f", fallback_source="s")


@pytest.mark.parametrize(
    "body", [b"\xc1", b"\x92\x01", msgpack.packb(1) + b"extra", b"\xa3\xff\xfe\xfd"]
)
def test_corrupt_msgpack_body_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(EventDecodeError, match="msgpack"):
        decode(ce_headers(), body, fallback_id="f", fallback_source="s")


def test_decode_errors_are_deadlift_errors_and_value_errors() -> None:
    assert issubclass(EventDecodeError, DeadliftError)
    assert issubclass(EventDecodeError, ValueError)


# --- encode errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"id": "a\nb"},
        {"source": "a\r\nInjected: yes"},
        {"type": "t\r"},
        {"subject": "s\nx"},
        {"traceparent": "00-\n"},
        {"extensions": {"deadliftrun": "r\n1"}},
    ],
    ids=repr,
)
def test_header_value_with_line_break_is_an_encode_error(change: dict[str, Any]) -> None:
    base = {"data": 1, "id": "i", "source": "s", "type": "t"}
    with pytest.raises(EventEncodeError, match="line break"):
        encode(Event(**(base | change)))


@pytest.mark.parametrize(
    "change",
    [
        {"id": ""},
        {"source": ""},
        {"id": 5},
        {"id": " padded"},
        {"type": "trailing\t"},
        {"extensions": {"deadliftrun": 7}},
        {"extensions": {"Upper": "x"}},
        {"extensions": {"bad-name": "x"}},
        {"extensions": {"": "x"}},
        {"extensions": {"id": "hijack"}},
        {"extensions": {"specversion": "0.3"}},
        {"source": "\ud800"},
    ],
    ids=repr,
)
def test_attributes_that_cannot_travel_unchanged_are_encode_errors(change: dict[str, Any]) -> None:
    base = {"data": 1, "id": "i", "source": "s", "type": "t"}
    with pytest.raises(EventEncodeError):
        encode(Event(**(base | change)))


@pytest.mark.parametrize(
    "data",
    [object(), {1, 2}, {"ok": {"nested": frozenset()}}, 2**64, -(2**63) - 1, 1j],
    ids=repr,
)
def test_unencodable_data_is_an_encode_error(data: Any) -> None:
    with pytest.raises(EventEncodeError, match="msgpack"):
        encode(Event(data=data, id="i", source="s", type="t"))


def test_self_referencing_data_is_an_encode_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EventEncodeError):
        encode(Event(data=loop, id="i", source="s", type="t"))


def test_encode_errors_are_deadlift_errors_and_value_errors() -> None:
    with pytest.raises(DeadliftError):
        encode(Event(data={1, 2}, id="i", source="s", type="t"))
    with pytest.raises(ValueError):
        encode(Event(data=1, id="a\nb", source="s", type="t"))


# --- ids ----------------------------------------------------------------------------------------


def test_derive_id_is_deterministic_32_hex() -> None:
    a = derive_id("events", "17")
    assert a == derive_id("events", "17")
    assert len(a) == 32
    int(a, 16)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("ab", "c"), ("a", "bc")),
        (("a\x1fb",), ("a", "b")),
        (("a", ""), ("a",)),
        (("",), ()),
        (("a", "b"), ("b", "a")),
        (("events", "1"), ("events", "2")),
    ],
    ids=repr,
)
def test_derive_id_differs_for_different_parts(
    left: tuple[str, ...], right: tuple[str, ...]
) -> None:
    assert derive_id(*left) != derive_id(*right)


def test_derive_id_accepts_any_text() -> None:
    assert derive_id("\ud800", "🎉") == derive_id("\ud800", "🎉")


# --- properties -------------------------------------------------------------------------------

header_names = st.one_of(
    st.text(max_size=12),
    st.text(max_size=12).map(lambda s: "ce-" + s),
    st.sampled_from(
        ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-datacontenttype", "CE-ID"]
    ),
)
header_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["1.0", "application/json", "application/msgpack", "application/x-msgpack", "text/plain"]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(header_names, header_values, max_size=8), body=st.binary(max_size=64)
)
def test_decode_never_raises_anything_but_event_decode_error(
    headers: dict[str, str], body: bytes
) -> None:
    try:
        event = decode(headers, body, fallback_id="f", fallback_source="s")
    except EventDecodeError:
        return
    assert isinstance(event, Event)
    assert event.foreign == (not any(k.lower().startswith("ce-") for k in headers))


def reference_decode(content_type: str, body: bytes) -> Any:
    if not body:
        return None
    if content_type == "application/json":
        return json.loads(body)
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=64),
    content_type=st.sampled_from(["application/msgpack", "application/json"]),
)
def test_body_decodes_like_its_content_type_or_raises_decode_error(
    body: bytes, content_type: str
) -> None:
    headers = ce_headers(datacontenttype=content_type)
    try:
        expected = reference_decode(content_type, body)
    except Exception:
        with pytest.raises(EventDecodeError):
            decode(headers, body, fallback_id="f", fallback_source="s")
        return
    data = decode(headers, body, fallback_id="f", fallback_source="s").data
    assert repr(data) == repr(expected)  # repr: NaN equals NaN


msgpack_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text() | st.integers(-1000, 1000), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(data=msgpack_data)
def test_any_msgpack_data_roundtrips(data: Any) -> None:
    assert roundtrip(Event(data=data, id="i", source="s", type="t")).data == data


@settings(max_examples=100, deadline=None)
@given(x=st.floats(allow_nan=True))
def test_floats_roundtrip_bit_for_bit(x: float) -> None:
    back = roundtrip(Event(data=x, id="i", source="s", type="t")).data
    assert back == x or (math.isnan(x) and math.isnan(back))


attribute_text = st.text(min_size=1).filter(
    lambda s: s == s.strip() and "\r" not in s and "\n" not in s
)


@settings(max_examples=200, deadline=None)
@given(
    id=attribute_text,
    source=attribute_text,
    type=attribute_text,
    extensions=st.dictionaries(
        st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True).filter(
            lambda n: (
                n not in {"specversion", "id", "source", "type", "time", "subject"}
                and n not in {"datacontenttype", "dataschema"}
            )
        ),
        st.text(max_size=10).filter(lambda s: s == s.strip() and "\r" not in s and "\n" not in s),
        max_size=4,
    ),
)
def test_any_valid_attributes_roundtrip(
    id: str, source: str, type: str, extensions: dict[str, str]
) -> None:
    event = Event(data=None, id=id, source=source, type=type, time="t", extensions=extensions)
    try:
        decoded = roundtrip(event)
    except EventEncodeError:
        # Only lone surrogates (not UTF-8 encodable) may be refused.
        assert any(
            "\ud800" <= c <= "\udfff" for c in id + source + type + "".join(extensions.values())
        )
        return
    assert (decoded.id, decoded.source, decoded.type) == (id, source, type)
    assert decoded.extensions == extensions


# --- OutputEncoder: a step's outputs, fast ------------------------------------------------------


def step_event(data: Any, *, origin: str | None = None, traceparent: str | None = None) -> Event:
    """The output event of step acme/calc/add as :func:`encode` would take it."""
    extensions = {
        events.ORG: "acme",
        events.WORKFLOW: "calc",
        events.STEP: "add",
        events.RUN: "run-1",
    }
    if origin:
        extensions[events.ORIGIN] = origin
    return Event(
        data=data,
        id="out-1",
        source="deadlift://acme/calc/add",
        type="deadlift.acme.calc.add",
        time="2024-01-01T00:00:00Z",
        extensions=extensions,
        traceparent=traceparent,
    )


@pytest.mark.parametrize("origin", [None, "stripe"])
@pytest.mark.parametrize("traceparent", [None, TRACEPARENT])
@pytest.mark.parametrize("data", [{"value": 11}, None, b"\x00raw", ["é", 1.5]], ids=repr)
def test_output_encoder_gives_what_encode_gives(
    data: Any, origin: str | None, traceparent: str | None
) -> None:
    encoder = events.OutputEncoder.for_step("acme", "calc", "add")
    fast = encoder.encode(
        data,
        id="out-1",
        time="2024-01-01T00:00:00Z",
        run="run-1",
        traceparent=traceparent,
        origin=origin,
    )
    assert fast == encode(step_event(data, origin=origin, traceparent=traceparent))
    decoded = decode(*fast, fallback_id="-", fallback_source="-")
    assert (decoded.data, decoded.run, decoded.origin) == (data, "run-1", origin)


def test_output_encoder_kind_extends_the_type() -> None:
    encoder = events.OutputEncoder.for_step("acme", "calc", "add", kind="emit")
    headers, _ = encoder.encode(1, id="i", time="t", run="r", traceparent=None)
    assert headers["ce-type"] == "deadlift.acme.calc.add.emit"
    assert headers["ce-source"] == "deadlift://acme/calc/add"


@pytest.mark.parametrize(
    "change",
    [{"run": "a\r\nb"}, {"traceparent": "x\ny"}, {"data": object()}],
    ids=["run", "traceparent", "data"],
)
def test_output_encoder_refuses_what_encode_refuses(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"run": "r", "traceparent": None, "data": 1, **change}
    encoder = events.OutputEncoder.for_step("acme", "calc", "add")
    with pytest.raises(EventEncodeError):
        encoder.encode(
            fields["data"], id="i", time="t", run=fields["run"], traceparent=fields["traceparent"]
        )
    with pytest.raises(EventEncodeError):
        encode(
            Event(
                data=fields["data"],
                id="i",
                source="s",
                type="t",
                extensions={events.RUN: fields["run"]},
                traceparent=fields["traceparent"],
            )
        )


def test_output_encoder_refuses_an_invalid_step_source_at_once() -> None:
    with pytest.raises(EventEncodeError):
        events.OutputEncoder(source="", type="t", extensions={})
