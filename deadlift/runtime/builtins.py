"""Deadlift's built-in host functions, scoped to the calling org.

``kv_get`` / ``kv_set`` / ``kv_incr`` work on the org's own KV bucket
(``deadlift_state_<org>``); keys are free text for the module, escaped into
NATS's key alphabet here. ``emit`` publishes an extra event, only to subjects
the step declares. ``config_get`` / ``secret_get`` read the org's values from
the org manifest; secret values are never logged. ``http_request`` reaches only
the step's ``allowed_hosts`` (see :mod:`deadlift.http`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.js.errors

from deadlift.errors import HostFunctionError
from deadlift.model.workflow import check_subject, subject_covers
from deadlift.runtime.http import (
    HTTP_SERVICE as HTTP_SERVICE,  # services key: the step's HttpPolicy
)
from deadlift.runtime.http import http_request
from deadlift.wasm.hostfns import HostCall, HostFunction, host_function

STATE_SERVICE = "state"
EMIT_SERVICE = "emit"
CONFIG_SERVICE = "config"
SECRETS_SERVICE = "secrets"
_SAFE = set("-_/.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def state_bucket(org: str) -> str:
    """The KV bucket holding an org's module state."""
    return f"deadlift_state_{org}"


def encode_key(key: str) -> str:
    """Escape free text into NATS KV's key alphabet (``=XX`` per UTF-8 byte)."""
    if not key or len(key) > 512:
        raise HostFunctionError("kv key must be 1 to 512 characters")
    out = []
    for char in key:
        if char in _SAFE:
            out.append(char)
        else:
            out.extend(f"={b:02X}" for b in char.encode())
    escaped = "".join(out)
    if escaped.startswith(".") or escaped.endswith(".") or ".." in escaped:
        escaped = escaped.replace(".", "=2E")
    return escaped


def decode_key(escaped: str) -> str:
    """Inverse of :func:`encode_key`."""
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "=":
            raw.append(int(escaped[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(escaped[i].encode())
            i += 1
    return raw.decode()


def _kv(call: HostCall) -> Any:
    kv = call.services.get(STATE_SERVICE)
    if kv is None:
        raise HostFunctionError(f"no state bucket for org {call.org!r}")
    return kv


def _key(request: Any) -> str:
    if not isinstance(request, dict) or not isinstance(request.get("key"), str):
        raise HostFunctionError('request must be {"key": "..."}')
    return encode_key(request["key"])


@host_function
async def kv_get(call: HostCall, request: Any) -> Any:
    """Read a key of the org's state: ``{"key"}`` → ``{"value": str | null}``."""
    try:
        entry = await _kv(call).get(_key(request))
    except nats.js.errors.KeyNotFoundError:
        return {"value": None}
    return {"value": entry.value.decode() if entry.value is not None else None}


@host_function
async def kv_set(call: HostCall, request: Any) -> Any:
    """Write a key of the org's state: ``{"key", "value": str}`` → ``{}``."""
    value = request.get("value") if isinstance(request, dict) else None
    if not isinstance(value, str):
        raise HostFunctionError('kv_set request must be {"key": "...", "value": "..."}')
    await _kv(call).put(_key(request), value.encode())
    return {}


@host_function
async def kv_incr(call: HostCall, request: Any) -> Any:
    """Atomically add to an integer key: ``{"key", "by": int}`` → ``{"value": int}``."""
    by = request.get("by", 1) if isinstance(request, dict) else None
    if not isinstance(by, int) or isinstance(by, bool):
        raise HostFunctionError('kv_incr request must be {"key": "...", "by": integer}')
    kv, key = _kv(call), _key(request)
    for _ in range(50):  # compare-and-set; retry when another call got in first
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            try:
                await kv.create(key, str(by).encode())
                return {"value": by}
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        try:
            value = int(entry.value or b"0") + by
        except ValueError:
            raise HostFunctionError(
                f"kv_incr: key {request['key']!r} does not hold an integer"
            ) from None
        try:
            await kv.update(key, str(value).encode(), last=entry.revision)
            return {"value": value}
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
    raise HostFunctionError("kv_incr: too much contention on the key")


@dataclass(frozen=True, slots=True)
class EmitTarget:
    """What ``emit`` may do for a step: where, and how to publish."""

    patterns: tuple[str, ...]
    publish: Callable[[HostCall, str, Any], Awaitable[None]]


@host_function
async def emit(call: HostCall, request: Any) -> Any:
    """Publish an extra event: ``{"subject", "data"}`` → ``{}`` (declared subjects only)."""
    if not isinstance(request, dict) or not isinstance(request.get("subject"), str):
        raise HostFunctionError('emit request must be {"subject": "...", "data": ...}')
    subject = request["subject"]
    target: EmitTarget | None = call.services.get(EMIT_SERVICE)
    try:
        check_subject(subject, wildcards=False)
    except ValueError as exc:
        raise HostFunctionError(f"emit: {exc}") from None
    if target is None or not any(subject_covers(p, subject) for p in target.patterns):
        declared = ", ".join(target.patterns) if target else "none"
        raise HostFunctionError(
            f"emit to {subject!r} is not allowed: step {call.step!r} declares emit: [{declared}]"
        )
    await target.publish(call, subject, request.get("data"))
    return {}


def _lookup(call: HostCall, service: str, request: Any, what: str) -> Any:
    if not isinstance(request, dict) or not isinstance(request.get("key"), str):
        raise HostFunctionError(f'{what} request must be {{"key": "..."}}')
    values: Mapping[str, str] = call.services.get(service) or {}
    return {"value": values.get(request["key"])}


@host_function
def config_get(call: HostCall, request: Any) -> Any:
    """A config value of the calling org: ``{"key"}`` → ``{"value": str | null}``."""
    return _lookup(call, CONFIG_SERVICE, request, "config_get")


@host_function
def secret_get(call: HostCall, request: Any) -> Any:
    """A secret of the calling org: ``{"key"}`` → ``{"value": str | null}`` (never logged)."""
    return _lookup(call, SECRETS_SERVICE, request, "secret_get")


BUILTINS: dict[str, HostFunction] = {
    f.name: f for f in (kv_get, kv_set, kv_incr, emit, config_get, secret_get, http_request)
}
