"""Plugin logs into Python logging, with org/workflow/step context.

libextism buffers log lines process-wide (``set_log_custom`` may be set once);
each line names the plugin instance by uuid, which we map back to the call it
was serving.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import extism

logger = logging.getLogger("deadlift.module")

# The plugin's uuid is in the trailer; a module's own message may hold other uuids.
_PLUGIN = re.compile(r'plugin="([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"')
_LEVEL = re.compile(r"\b(TRACE|DEBUG|INFO|WARN|ERROR)\b")
# libextism's format: `<time>  INFO extism::pdk: <message> plugin="<uuid>"`
_LINE = re.compile(r"^\S+\s+[A-Z]+\s+[\w:]+: (?P<message>.*?)(?: plugin=\"[0-9a-f-]+\")?\s*$", re.S)
_LEVELS = {
    "TRACE": 5,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
}

_lock = threading.Lock()
_bound: dict[str, Any] = {}
_errors: dict[str, str] = {}  # plugin uuid -> the last call error libextism logged for it
_custom: Any = None
_CALL_ERROR = "encountered an error: "


def install(level: str = "info") -> None:
    """Route libextism's log lines to the ``deadlift.module`` logger (idempotent)."""
    global _custom
    with _lock:
        if _custom is None:
            _custom = extism.set_log_custom(_emit, level)


def plugin_id(plugin: extism.Plugin) -> str:
    """The instance's uuid as libextism logs it (cached: reading it is an FFI call)."""
    cached: str | None = getattr(plugin, "_deadlift_id", None)
    if cached is None:
        cached = str(plugin.id)
        plugin._deadlift_id = cached
    return cached


def bind(plugin: extism.Plugin, context: Any) -> None:
    """Attribute the plugin's next log lines to ``context`` (a HostCall)."""
    with _lock:
        _bound[plugin_id(plugin)] = context


def unbind(plugin: extism.Plugin) -> None:
    """Forget a plugin that is being dropped."""
    with _lock:
        _bound.pop(plugin_id(plugin), None)
        _errors.pop(plugin_id(plugin), None)


def take_error(plugin: extism.Plugin) -> str | None:
    """The error libextism logged for the plugin's last failed call, if any.

    It holds more than ``extism.Error`` does: for a trap, the cause
    (``Caused by: wasm trap: ...``) after the wasm backtrace.
    """
    flush()
    with _lock:
        return _errors.pop(plugin_id(plugin), None)


def flush() -> None:
    """Deliver buffered lines now (called after each module call)."""
    custom = _custom
    if custom is not None:
        custom.drain()


def _emit(line: str) -> None:
    plugins = _PLUGIN.findall(line)
    plugin = plugins[-1] if plugins else None
    level_match = _LEVEL.search(line)
    level = _LEVELS[level_match.group(1)] if level_match else logging.INFO
    parsed = _LINE.match(line)
    text = parsed.group("message") if parsed else line.rstrip()
    # With RUST_BACKTRACE set, libextism appends the host's Rust stack: noise to module authors.
    text = text.split("\nStack backtrace:", 1)[0].rstrip()
    with _lock:
        context = _bound.get(plugin) if plugin else None
        if plugin and context is not None and _CALL_ERROR in text:
            _errors[plugin] = text.split(_CALL_ERROR, 1)[1]
    if context is None:
        logger.log(level, "%s", text)
        return
    logger.log(
        level,
        "[%s/%s/%s] %s",
        context.org,
        context.workflow,
        context.step,
        text,
        extra={
            "org": context.org,
            "workflow": context.workflow,
            "step": context.step,
            "run": context.run,
        },
    )
