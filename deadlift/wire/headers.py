"""A message's NATS header block, byte for byte what nats-py writes, its fixed part rendered once.

nats-py serialises a message's headers on every publish, one header at a time
(strip, check the key, strip and clean the value, encode). A step's outputs share
most of theirs (source, type, org, workflow, step…): :class:`FixedHeaders`
renders those once, and a :class:`Headers` adds only the message's own. The bytes
are nats-py's, header for header (a unit test compares them with nats-py's own
serialisation), so what a receiver sees does not change.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import nats.errors

HEADER_LINE = b"NATS/1.0\r\n"
CRLF = b"\r\n"
# nats-py's rules (nats/aio/client.py): a key is an RFC 7230 token; a value is
# stripped, and CR/LF in it become spaces so it cannot end the header line.
_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
# Keys seen to be tokens (bounded: a producer's header names are few).
_KEYS: set[str] = set()
_MAX_KEYS = 1024


def _lines(headers: Mapping[str, str]) -> bytes:
    """The header lines of ``headers`` as nats-py renders them (no status line, no blank line).

    Raises:
        nats.errors.BadHeaderError: a key that is not an RFC 7230 token.
    """
    if _KEYS.issuperset(headers):
        # Known-good keys (RFC 7230 tokens: nothing to strip). If no value has
        # whitespace at either end or CR/LF in it, nats-py's cleaning changes
        # nothing: render the lines at once (checking CR/LF on the result).
        lines = [f"{k}: {v}\r\n" for k, v in headers.items() if v.strip() == v]
        count = len(headers)
        if len(lines) == count:
            text = "".join(lines)
            if text.count("\r") == count and text.count("\n") == count:
                return text.encode()
    out = []
    for k, v in headers.items():
        key = k.strip()
        if not key:
            continue  # nats-py skips empty keys
        if not _KEY.fullmatch(key):
            raise nats.errors.BadHeaderError(key)
        if key == k and len(_KEYS) < _MAX_KEYS:
            _KEYS.add(key)
        out.append(f"{key}: {v.strip().translate(_NEWLINES)}\r\n")
    return "".join(out).encode()


def render(headers: Mapping[str, str]) -> bytes:
    """The whole header block of a message with ``headers``, as nats-py sends it.

    Raises:
        nats.errors.BadHeaderError: a key that is not an RFC 7230 token.
    """
    if isinstance(headers, Headers):
        return headers.render()
    return HEADER_LINE + _lines(headers) + CRLF


class FixedHeaders:
    """Headers every message of a producer carries, with the same values: rendered once."""

    __slots__ = ("items", "lines")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.items: dict[str, str] = dict(headers)
        self.lines = HEADER_LINE + _lines(self.items)


class Headers(Mapping[str, str]):
    """One message's headers: a producer's :class:`FixedHeaders`, then its own.

    Reads like the dict ``{**fixed, **own}`` (the own ones never repeat a fixed
    name); :meth:`render` gives the header block without serialising the fixed
    part again.
    """

    __slots__ = ("fixed", "own")

    def __init__(self, fixed: FixedHeaders, own: dict[str, str]) -> None:
        self.fixed = fixed
        self.own = own

    def __getitem__(self, name: str) -> str:
        own = self.own.get(name)
        return own if own is not None else self.fixed.items[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.fixed.items
        yield from self.own

    def __len__(self) -> int:
        return len(self.fixed.items) + len(self.own)

    def __repr__(self) -> str:
        return f"Headers({dict(self)!r})"

    def with_header(self, name: str, value: str) -> Headers:
        """A copy with ``name`` set to ``value`` (``{**self, name: value}``, kept fast)."""
        if name in self.fixed.items:
            raise ValueError(f"header {name!r} is fixed for this producer")
        return Headers(self.fixed, {**self.own, name: value})

    def render(self, name: str | None = None, value: str = "") -> bytes:
        """The header block, with ``name: value`` appended (``Nats-Msg-Id``), if given.

        Raises:
            nats.errors.BadHeaderError: a key that is not an RFC 7230 token.
        """
        if name is None:
            return self.fixed.lines + _lines(self.own) + CRLF
        if name in self.fixed.items:  # replaces a fixed one, in its place: render all
            return HEADER_LINE + _lines({**self, name: value}) + CRLF
        return self.fixed.lines + _lines({**self.own, name: value}) + CRLF
