"""How event data crosses into a module and back: ``json`` (default), ``msgpack`` or ``raw``."""

from __future__ import annotations

import json
from typing import Any, Literal

from deadlift.errors import EventEncodeError, StepError
from deadlift.wire.events import pack, unpack

Codec = Literal["json", "msgpack", "raw"]
CODECS: tuple[Codec, ...] = ("json", "msgpack", "raw")
# What json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# builds on every call; built once (encode is reentrant: no state between calls).
# allow_nan=False: NaN/Infinity are not JSON, and strict module parsers reject them.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def to_module(data: Any, codec: str) -> bytes:
    """Encode event data as a module's input.

    Raises:
        EventEncodeError: the data cannot be carried by the codec (e.g. bytes in JSON).
    """
    if codec == "json":
        if isinstance(data, bytes | bytearray):
            # A foreign producer's non-JSON body: hand it over as-is.
            return bytes(data)
        try:
            return _JSON.encode(data).encode()
        except (TypeError, ValueError) as exc:
            raise EventEncodeError(
                f"event data cannot be encoded as JSON for the module: {exc}"
            ) from exc
    if codec == "msgpack":
        return pack(data)
    if codec == "raw":
        if isinstance(data, bytes | bytearray):
            return bytes(data)
        if isinstance(data, str):
            return data.encode()
        raise EventEncodeError(
            f"codec 'raw' carries bytes or strings only, not {type(data).__name__}"
        )
    raise EventEncodeError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")


def from_module(output: bytes, codec: str) -> Any:
    """Decode a module's output; ``None`` means "end the run here".

    Raises:
        StepError: the output does not decode (kind ``decode``, not retryable).
    """
    if codec not in CODECS:
        raise StepError(
            f"unknown codec {codec!r}; use one of {', '.join(CODECS)}",
            kind="decode",
            retryable=False,
        )
    if not output:
        return None
    if codec == "raw":
        return bytes(output)
    try:
        if codec == "json":
            return json.loads(output)
        return unpack(bytes(output))
    except Exception as exc:
        raise StepError(
            f"module output is not valid {codec}: {exc}", kind="decode", retryable=False
        ) from exc
