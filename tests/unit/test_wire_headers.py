"""Header blocks rendered by Deadlift are the bytes nats-py would send for the same headers."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from deadlift.errors import EventEncodeError
from deadlift.wire import events
from deadlift.wire.headers import FixedHeaders, Headers, render


class Capture(Client):
    """A client that records the commands it would write (no server)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self._status = Client.CONNECTED

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(bytes(cmd))


async def nats_py_block(headers: dict[str, str]) -> bytes:
    """The header block nats-py writes for ``headers``."""
    nc = Capture()
    await nc.publish("subject", b"body", headers=headers)
    command = nc.sent[-1]
    size = int(command.split(b"\r\n", 1)[0].split()[-2])
    return command.split(b"\r\n", 1)[1][:size]


async def same_as_nats_py(headers: dict[str, str]) -> None:
    try:
        expected: Any = await nats_py_block(headers)
    except nats.errors.BadHeaderError as exc:
        expected = ("BadHeaderError", str(exc))
    try:
        got: Any = render(headers)
    except nats.errors.BadHeaderError as exc:
        got = ("BadHeaderError", str(exc))
    assert got == expected


TOKENS = st.text(alphabet="abcXYZ019-_.!#$%&'*+^`|~", min_size=1, max_size=12)
KEYS = st.one_of(
    TOKENS,
    TOKENS.map(lambda k: f" {k}\t"),  # nats-py strips keys
    st.just(""),
    st.just("  "),  # skipped once stripped
    st.sampled_from(["bad key", "bad:key", "ké", "a\r\nb"]),  # not tokens: refused
)
VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " a", "a ", "\u00a0a\u2003", "a\rb", "a\nb", "\r\n", "é%20", "x\x0by"]),
)


@settings(max_examples=300, deadline=None)
@given(headers=st.dictionaries(KEYS, VALUES, max_size=6))
async def test_render_is_nats_pys_serialisation(headers: dict[str, str]) -> None:
    await same_as_nats_py(headers)
    await same_as_nats_py(headers)  # again, with the keys that passed known to be tokens


@pytest.mark.parametrize(
    "headers",
    [
        {"ce-id": "a", "Nats-Msg-Id": "m"},
        {"ce-id": " padded ", "traceparent": "00-1-2-01"},
        {"k": "line\r\nbreak"},
        {"k": "tab\tinside", "other": ""},
        {"ce-deadliftrun": "r %C3%A9"},
    ],
)
async def test_render_of_known_headers_is_nats_pys(headers: dict[str, str]) -> None:
    await same_as_nats_py(headers)
    await same_as_nats_py(headers)  # and again, with its keys known to be tokens


async def test_an_output_events_block_is_the_one_nats_py_writes_for_its_dict() -> None:
    encoder = events.OutputEncoder.for_step("acme", "calc", "add")
    headers, _ = encoder.encode(
        {"v": 1},
        id="out-1",
        time="2024-01-01T00:00:00Z",
        run="run é",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        origin="stripe",
        hops=2,
    )
    crossing = headers.with_header(events.HOPS_HEADER, "3")
    assert dict(crossing) == {**headers, events.HOPS_HEADER: "3"}
    for sent in (headers, crossing):
        expected = await nats_py_block({**sent, "Nats-Msg-Id": "out-1:calc.out"})
        assert sent.render("Nats-Msg-Id", "out-1:calc.out") == expected
        assert sent.render() == await nats_py_block(dict(sent))
        assert render(sent) == sent.render()


def test_headers_read_as_the_dict_they_stand_for() -> None:
    fixed = FixedHeaders({"a": "1", "b": "2"})
    headers = Headers(fixed, {"c": "3"})
    assert headers == {"a": "1", "b": "2", "c": "3"}
    assert list(headers) == ["a", "b", "c"] and len(headers) == 3
    assert headers["a"] == "1" and headers["c"] == "3" and "d" not in headers
    assert headers.with_header("c", "4") == {"a": "1", "b": "2", "c": "4"}
    assert headers == {"a": "1", "b": "2", "c": "3"}  # unchanged
    with pytest.raises(ValueError, match="fixed"):
        headers.with_header("a", "x")


async def test_a_rendered_extra_header_replacing_a_fixed_one_keeps_its_place() -> None:
    headers = Headers(FixedHeaders({"a": "1", "b": "2"}), {"c": "3"})
    assert headers.render("a", "9") == await nats_py_block({"a": "9", "b": "2", "c": "3"})


def test_an_output_encoder_refuses_extensions_set_per_event() -> None:
    for name in (events.RUN, events.ORIGIN, events.HOPS):
        with pytest.raises(EventEncodeError, match="per event"):
            events.OutputEncoder(source="s", type="t", extensions={name: "x"})
