"""Plugin logs into Python logging, with org/workflow/step context, escaped and capped.

libextism buffers log lines process-wide (``set_log_custom`` may be set once);
each line names the plugin instance by uuid, which we map back to the call it
was serving (:func:`bind`). Lines are delivered by :func:`flush`, which the host
calls after every module call, from the thread that made it.

A module's log text is untrusted:

* **Escaped.** Control characters (newlines, carriage returns, tabs, ANSI escape
  sequences, every other C0/C1 control) and Unicode line separators and bidi
  controls are written as ``\\n``, ``\\r``, ``\\t``, ``\\x1b``, ``\\u2028``…, so
  one log call is one line, and it cannot forge a line that looks like the
  host's or repaint the terminal.
* **Capped.** At most ``HostCall.log_limit`` bytes of (escaped) text per call
  reach logging — ``DEADLIFT_MODULE_LOG_BYTES``, 16 KiB by default; the line
  that crosses the limit is cut, later lines are dropped. What was dropped is
  counted on the HostCall (``log_dropped_lines``, ``log_dropped_bytes``), and
  once the call is over one WARNING line from the host says how much (plus the
  ``deadlift.module.log_dropped`` counter when metrics are on).

The host's own lines about a call (``call to X encountered an error: ...``) are
escaped and counted the same way, but the error text is kept whole, unescaped,
for :func:`take_error`.

A call whose ``HostCall.log_lines`` is a list also keeps the module's own lines
that passed (escaped, cut as above; at most :data:`CAPTURE_LINES`, the rest
counted in ``log_lines_over``): the run record a guest sees of its module's call.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

import extism

from deadlift.runtime import telemetry

logger = logging.getLogger("deadlift.module")

# The plugin's uuid is in the trailer; a module's own message may hold other uuids.
_PLUGIN = re.compile(r'plugin="([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"')
_LEVEL = re.compile(r"\b(TRACE|DEBUG|INFO|WARN|ERROR)\b")
# libextism's format: `<time>  INFO extism::pdk: <message> plugin="<uuid>"`
_LINE = re.compile(
    r"^\S+\s+[A-Z]+\s+(?P<target>[\w:]+): (?P<message>.*?)(?: plugin=\"[0-9a-f-]+\")?\s*$", re.S
)
# The target of the lines a module logs itself (``Host.log``); the host's own
# lines about a call (``extism::plugin``) are not the module's.
_MODULE_TARGET = "extism::pdk"
# At most this many of a call's own lines are kept for its run record (when the
# HostCall asks for them with ``log_lines``); the byte budget above caps their text.
CAPTURE_LINES = 50
_LEVELS = {
    "TRACE": 5,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
}
# What module text may not hold as is: C0 and C1 controls (newlines, ESC, ...),
# DEL, Unicode line/paragraph separators, bidi embeddings/overrides/isolates.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_TRUNCATED = " [truncated]"

_lock = threading.Lock()
_bound: dict[str, Any] = {}
_errors: dict[str, str] = {}  # plugin uuid -> the last call error libextism logged for it
_custom: Any = None
_CALL_ERROR = "encountered an error: "
_local = threading.local()  # .call: the HostCall this thread's current module call serves


def install(level: str = "info") -> None:
    """Route libextism's log lines to the ``deadlift.module`` logger (idempotent)."""
    global _custom
    with _lock:
        if _custom is None:
            _custom = extism.set_log_custom(_emit, level)


@functools.cache
def default_limit() -> int:
    """Module log bytes per call when the HostCall sets none: ``DEADLIFT_MODULE_LOG_BYTES``."""
    from deadlift.settings import Settings

    default: int = Settings.model_fields["module_log_bytes"].default
    try:
        return Settings().module_log_bytes
    except ValueError:  # another DEADLIFT_ variable is invalid: that fails loudly elsewhere
        return default


def escape(text: str) -> str:
    """``text`` with every control character written out (``\\n``, ``\\x1b``, ``\\u2028``)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plugin_id(plugin: extism.Plugin) -> str:
    """The instance's uuid as libextism logs it (cached: reading it is an FFI call)."""
    cached: str | None = getattr(plugin, "_deadlift_id", None)
    if cached is None:
        cached = str(plugin.id)
        plugin._deadlift_id = cached
    return cached


def bind(plugin: extism.Plugin, context: Any) -> None:
    """Attribute the plugin's next log lines to ``context`` (a HostCall).

    Called by the thread about to make the call: its next :func:`flush` ends the
    call's log accounting (see :func:`finish`).
    """
    with _lock:
        _bound[plugin_id(plugin)] = context
    _local.call = context


def unbind(plugin: extism.Plugin) -> None:
    """Forget a plugin that is being dropped."""
    with _lock:
        _bound.pop(plugin_id(plugin), None)
        _errors.pop(plugin_id(plugin), None)


def take_error(plugin: extism.Plugin) -> str | None:
    """The error libextism logged for the plugin's last failed call, if any.

    It holds more than ``extism.Error`` does: for a trap, the cause
    (``Caused by: wasm trap: ...``) after the wasm backtrace. It is the host's
    text, kept whole and unescaped (not cut by the log limit).
    """
    flush()
    with _lock:
        return _errors.pop(plugin_id(plugin), None)


def flush() -> None:
    """Deliver buffered lines now; then end this thread's call, if it made one.

    The host calls it after each module call, from the thread that made it.
    libextism drains under its buffer's lock, so when this returns every line
    the call logged has been delivered (here or by another thread's flush), and
    the one summary line of :func:`finish` comes after all of them.
    """
    custom = _custom
    if custom is not None:
        custom.drain()
    call = getattr(_local, "call", None)
    if call is not None:
        _local.call = None
        finish(call)


def finish(call: Any) -> None:
    """Report what the limit dropped from a call's logs: one WARNING line, and a metric.

    Nothing is logged when nothing was dropped.
    """
    with _lock:
        lines, size = call.log_dropped_lines, call.log_dropped_bytes
    if not (lines or size):
        return
    limit = _limit(call)
    call.logger.warning(
        "[%s/%s/%s] module logs over the limit of %d bytes per call "
        "(DEADLIFT_MODULE_LOG_BYTES): dropped %d line(s) and %d byte(s)",
        call.org,
        call.workflow,
        call.step,
        limit,
        lines,
        size,
        extra={
            "org": call.org,
            "workflow": call.workflow,
            "step": call.step,
            "run": call.run,
            "log_dropped_lines": lines,
            "log_dropped_bytes": size,
        },
    )
    if telemetry.metrics_enabled():
        telemetry.instruments().log_dropped.add(
            size,
            {
                "deadlift.org": call.org,
                "deadlift.workflow": call.workflow,
                "deadlift.step": call.step,
            },
        )


def _limit(call: Any) -> int:
    limit: int | None = getattr(call, "log_limit", None)
    return default_limit() if limit is None else limit


def _admit(call: Any, message: str) -> str | None:
    """The part of ``message`` the call's log budget lets through (None: nothing).

    Called with ``_lock`` held: another thread's flush may deliver this call's lines.
    """
    size = len(message.encode("utf-8", "surrogatepass"))
    room = _limit(call) - call.log_bytes
    if size <= room:
        call.log_bytes += size
        return message
    if room <= len(_TRUNCATED):
        call.log_bytes = max(call.log_bytes, _limit(call))
        call.log_dropped_lines += 1
        call.log_dropped_bytes += size
        return None
    head = message.encode("utf-8", "surrogatepass")[: room - len(_TRUNCATED)]
    kept = head.decode("utf-8", "ignore")  # never half a character
    call.log_bytes = _limit(call)  # the budget is spent: whatever follows is dropped
    call.log_dropped_bytes += size - len(kept.encode("utf-8"))
    return kept + _TRUNCATED


def _capture(call: Any, level: str, message: str) -> None:
    """Keep one of the module's own lines for the call's run record (``_lock`` held)."""
    if len(call.log_lines) < CAPTURE_LINES:
        call.log_lines.append((level, message))
    else:
        call.log_lines_over += 1


def _emit(line: str) -> None:
    plugins = _PLUGIN.findall(line)
    plugin = plugins[-1] if plugins else None
    level_match = _LEVEL.search(line)
    level = _LEVELS[level_match.group(1)] if level_match else logging.INFO
    parsed = _LINE.match(line)
    text = parsed.group("message") if parsed else line.rstrip()
    own = parsed is not None and parsed.group("target") == _MODULE_TARGET
    # With RUST_BACKTRACE set, libextism appends the host's Rust stack: noise to module authors.
    text = text.split("\nStack backtrace:", 1)[0].rstrip()
    escaped = escape(text)
    message: str | None = escaped
    with _lock:
        context = _bound.get(plugin) if plugin else None
        if plugin is not None and context is not None:
            if _CALL_ERROR in text:
                _errors[plugin] = text.split(_CALL_ERROR, 1)[1]
            message = _admit(context, escaped)
            if own and message is not None and getattr(context, "log_lines", None) is not None:
                _capture(context, level_match.group(1) if level_match else "INFO", message)
    if message is None:
        return
    if context is None:
        logger.log(level, "%s", message)
        return
    logger.log(
        level,
        "[%s/%s/%s] %s",
        context.org,
        context.workflow,
        context.step,
        message,
        extra={
            "org": context.org,
            "workflow": context.workflow,
            "step": context.step,
            "run": context.run,
        },
    )
