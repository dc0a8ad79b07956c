"""Delivered headers parse exactly as nats-py parses them, hostile blocks included."""

from __future__ import annotations

import random

import pytest
from nats.aio.client import Client

from deadlift.bus.connection import DeadliftClient

CLOUDEVENT = (
    b"ce-specversion: 1.0\r\nce-id: 0f3c\r\nce-source: deadlift://acme/flow/s0\r\n"
    b"ce-type: orders.created\r\ncontent-type: application/msgpack\r\n"
    b"Nats-Msg-Id: 0f3c:s0\r\ntraceparent: 00-0af7-b7ad-01\r\n\r\n"
)
# Every byte class the rules tell apart: separators, ASCII and Unicode whitespace
# (str.isspace: \x1c-\x1f, not bytes.isspace), non-ASCII, invalid UTF-8.
ALPHABET = [b"a", b"Z", b"-", b":", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\x0b", b"\x0c"]
ALPHABET += [b"\x1c", b"\x1f", b"\x85", b"\xa0", b"\xc3\xa9", b"\xff", b"\x00", b"1"]


@pytest.mark.parametrize(
    "raw",
    [
        CLOUDEVENT,
        b"",
        b"\r\n",
        b"no colon\r\n",
        b": empty name\r\n",
        b"a b: inner space\r\n",
        b"a\x1cb: file separator\r\n",
        b"\x1c: only a separator\r\n",
        b" padded :\tvalue \r\n",
        b"caf\xc3\xa9: non-ASCII name\r\n",
        b"k: caf\xc3\xa9 \xff\r\n",
        b"k: first\r\nk: second\r\n",
    ],
)
def test_known_blocks_parse_as_nats_py_parses_them(raw: bytes) -> None:
    assert DeadliftClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_random_blocks_parse_as_nats_py_parses_them() -> None:
    rng = random.Random(16)
    for _ in range(20_000):
        raw = b"".join(rng.choice(ALPHABET) for _ in range(rng.randrange(40)))
        assert DeadliftClient._parse_header_lines(raw) == Client._parse_header_lines(raw), raw
