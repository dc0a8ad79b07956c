"""Codecs: event data into a real module (echo) and back, filters, and what a codec refuses."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from deadlift.errors import EventEncodeError, StepError
from deadlift.wasm.codecs import from_module, to_module
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall

ECHO = (Path(__file__).resolve().parents[2] / "workers" / "dist" / "echo.wasm").read_bytes()
SPEC = PluginSpec(
    sha256=hashlib.sha256(ECHO).hexdigest(), org="acme", timeout_ms=1000, max_pages=256
)
NESTED = {
    "name": "Zoë 🚀 — 東京",
    "items": [1, -2.5, True, None, {"deep": ["a", {"deeper": []}]}],
    "empty": {},
}


@pytest.fixture(scope="module")
def host() -> ModuleHost:
    host = ModuleHost()
    host.add_binary(SPEC.sha256, ECHO)
    return host


def echo(host: ModuleHost, data: bytes) -> bytes:
    context = HostCall(org="acme", workflow="wf", step="echo", run="r1", event_id="e1", granted={})
    return host.call(SPEC, "echo", data, context)


def through_echo(host: ModuleHost, data: Any, codec: str) -> Any:
    return from_module(echo(host, to_module(data, codec)), codec)


@pytest.mark.parametrize("codec", ["json", "msgpack"])
@pytest.mark.parametrize("data", [NESTED, "ünïcødé ✓", 42, 0.5, [1, "two", [3]], False])
def test_structured_round_trip(host: ModuleHost, codec: str, data: Any) -> None:
    assert through_echo(host, data, codec) == data


def test_json_input_is_utf8_not_escaped() -> None:
    assert to_module({"name": "Zoë"}, "json") == '{"name":"Zoë"}'.encode()


def test_msgpack_preserves_bytes(host: ModuleHost) -> None:
    data = {"blob": b"\x00\xff\xfe binary", "text": "t"}
    assert through_echo(host, data, "msgpack") == data


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"\x00\xffraw bytes", b"\x00\xffraw bytes"), ("héllo", "héllo".encode())],
)
def test_raw_carries_bytes_and_strings(host: ModuleHost, data: Any, expected: bytes) -> None:
    assert through_echo(host, data, "raw") == expected


def test_json_codec_hands_foreign_bytes_over_as_is(host: ModuleHost) -> None:
    assert through_echo(host, b'{"already":"json"}', "json") == {"already": "json"}


@pytest.mark.parametrize("codec", ["json", "msgpack", "raw"])
def test_empty_output_ends_the_run(host: ModuleHost, codec: str) -> None:
    assert from_module(echo(host, b""), codec) is None  # echo of nothing writes no output


def test_null_ends_the_run(host: ModuleHost) -> None:
    assert through_echo(host, None, "json") is None
    assert through_echo(host, None, "msgpack") is None


@pytest.mark.parametrize(
    ("output", "codec"),
    [
        (b"{not json", "json"),
        (b"\xff\xfe", "json"),
        (b'{"a":1} trailing', "json"),
        (b"\xc1", "msgpack"),  # a reserved msgpack byte
        (b"\x92\x01", "msgpack"),  # an array of two with one element
    ],
)
def test_undecodable_output_is_a_decode_failure(output: bytes, codec: str) -> None:
    with pytest.raises(StepError, match=f"not valid {codec}") as caught:
        from_module(output, codec)
    assert caught.value.kind == "decode"
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("data", "codec", "message"),
    [
        ({"a": 1}, "raw", "bytes or strings only, not dict"),
        ({1, 2}, "json", "cannot be encoded as JSON"),
        ({1, 2}, "msgpack", "cannot be encoded as msgpack"),
        ({1, 2}, "raw", "not set"),
        (float("nan"), "json", "cannot be encoded as JSON"),  # NaN is not JSON
        ({"x": 1}, "xml", "unknown codec 'xml'"),
    ],
)
def test_data_a_codec_cannot_carry(data: Any, codec: str, message: str) -> None:
    with pytest.raises(EventEncodeError, match=message):
        to_module(data, codec)


def test_unknown_codec_on_output_is_refused() -> None:
    with pytest.raises(StepError, match="unknown codec") as caught:
        from_module(b"\x01", "xml")
    assert caught.value.kind == "decode"
