"""Hostile module logs: forged host lines and floods, with the real hostile module.

A guest's log text is escaped (one log call is one line, which cannot look like
a host line or drive a terminal) and capped per call (DEADLIFT_MODULE_LOG_BYTES,
16 KiB), with one host line per call saying how much was dropped. Through a
worker on a real server: tests/integration/test_attack_logs.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from deadlift.errors import StepError
from deadlift.settings import Settings
from deadlift.wasm import logs
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall
from tests.conftest import ROOT, module_path

WASM = module_path("hostile").read_bytes()
SHA = hashlib.sha256(WASM).hexdigest()
HOSTILE = PluginSpec(sha256=SHA, org="acme", timeout_ms=20_000, max_pages=256)
PREFIX = "[acme/attack/logs] "
FORGED = "2026-11-30 ERROR deadlift.worker: forged"
TEN_MIB = {"lines": 10 * 1024, "size": 1024}  # 10 MiB of log text in one call
# The CLI's text log format (deadlift.telemetry.configure_logging).
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
HOST_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR)\s+deadlift\.[a-z.]+: ")


@pytest.fixture
def host() -> ModuleHost:
    host = ModuleHost()
    host.add_binary(SHA, WASM)
    return host


class Records:
    """The log records of the test so far: module lines (deadlift.module) and host lines."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    @classmethod
    def capture(cls, caplog: pytest.LogCaptureFixture) -> Records:
        """Capture module and host lines from INFO up."""
        caplog.set_level(logging.INFO, logger="deadlift.module")
        caplog.set_level(logging.INFO, logger="deadlift.host")
        return cls(caplog)

    def __iter__(self) -> Iterator[logging.LogRecord]:
        return iter(self.caplog.records)

    def last(self) -> logging.LogRecord:
        return self.caplog.records[-1]


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Records:
    return Records.capture(caplog)


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """What a terminal running ``deadlift worker`` shows: the CLI's text format."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT, "%H:%M:%S"))
    deadlift = logging.getLogger("deadlift")
    level = deadlift.level
    deadlift.addHandler(handler)
    deadlift.setLevel(logging.INFO)
    yield out
    deadlift.removeHandler(handler)
    deadlift.setLevel(level)


def context(run: str = "run-1", limit: int | None = None) -> HostCall:
    return HostCall(
        org="acme",
        workflow="attack",
        step="logs",
        run=run,
        event_id=run,
        granted={},
        log_limit=limit,
    )


def call(host: ModuleHost, function: str, data: Any, ctx: HostCall) -> bytes:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return host.call(HOSTILE, function, raw, ctx)


def module_lines(records: Records, run: str) -> list[str]:
    """The guest text of a run's module lines, without the ``[org/workflow/step]`` prefix."""
    found = []
    for r in records:
        if r.name == "deadlift.module" and getattr(r, "run", None) == run:
            message = r.getMessage()
            assert message.startswith(PREFIX), message
            found.append(message.removeprefix(PREFIX))
    return found


def summaries(records: Records, run: str) -> list[logging.LogRecord]:
    return [
        r
        for r in records
        if r.name == "deadlift.host" and getattr(r, "run", None) == run and "dropped" in r.msg
    ]


def size(lines: list[str]) -> int:
    return sum(len(line.encode()) for line in lines)


# -- escaping --------------------------------------------------------------------------------


def test_a_logged_newline_cannot_forge_a_host_line(
    host: ModuleHost, text_log: io.StringIO, records: Records
) -> None:
    payload = (
        f"charge ok\n{FORGED}\r{FORGED} again\r\n{FORGED} by crlf"
        "\x1b[2K\x1b[1A\x1b]0;owned\x07\u2028" + FORGED + "\u202egnp.exe\x0b\x0c\x1c\x85 end"
    )
    assert call(host, "say", payload.encode(), context()) == b""
    shown = text_log.getvalue()
    lines = shown.splitlines()  # str.splitlines also breaks at \r, \v, \f, \x1c, \x85, \u2028
    assert len(lines) == 1, lines
    assert all(HOST_LINE.match(line) for line in lines), lines
    assert not any(line.startswith(FORGED) for line in lines)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202e]", shown.rstrip("\n"))
    [text] = module_lines(records, "run-1")
    assert text.startswith(f"charge ok\\n{FORGED}\\r{FORGED} again\\r\\n{FORGED} by crlf")
    assert "\\x1b[2K" in text and "\\x07" in text and "\\u2028" in text and "\\u202e" in text
    assert "\\x0b" in text and "\\x1c" in text and text.endswith(" end")


def test_invalid_utf8_in_a_log_line_is_reported_not_raised(
    host: ModuleHost, text_log: io.StringIO, records: Records
) -> None:
    assert call(host, "say", b"bad \xff\xfe\nbytes", context()) == b""
    lines = text_log.getvalue().splitlines()
    assert len(lines) == 1 and HOST_LINE.match(lines[0]), lines
    [text] = module_lines(records, "run-1")
    assert "unable to log message" in text and "invalid utf-8" in text


# -- the per-call cap --------------------------------------------------------------------------


def test_a_10mib_flood_passes_at_most_the_cap_and_one_summary(
    host: ModuleHost, records: Records
) -> None:
    ctx = context()
    output = call(host, "flood", TEN_MIB, ctx)
    assert json.loads(output) == {"logged": 10 * 1024 * 1024}  # the call itself is unharmed
    cap = logs.default_limit()
    assert cap == 16 * 1024
    passed = module_lines(records, "run-1")
    assert size(passed) == cap  # 16 whole lines of 1 KiB, then nothing
    assert passed == ["x" * 1024] * 16
    [summary] = summaries(records, "run-1")
    assert records.last() is summary  # after every line the call logged
    dropped = 10 * 1024 * 1024 - cap
    assert summary.levelno == logging.WARNING
    assert summary.getMessage() == (
        f"[acme/attack/logs] module logs over the limit of {cap} bytes per call "
        f"(DEADLIFT_MODULE_LOG_BYTES): dropped {10 * 1024 - 16} line(s) and {dropped} byte(s)"
    )
    assert (summary.log_dropped_lines, summary.log_dropped_bytes) == (10 * 1024 - 16, dropped)  # type: ignore[attr-defined]
    assert (summary.org, summary.workflow, summary.step) == ("acme", "attack", "logs")  # type: ignore[attr-defined]
    assert (ctx.log_bytes, ctx.log_dropped_bytes) == (cap, dropped)


def test_one_huge_line_is_cut_at_the_cap(host: ModuleHost, records: Records) -> None:
    call(host, "flood", {"lines": 3, "size": 1024 * 1024}, context(limit=4096))
    [text] = module_lines(records, "run-1")
    assert len(text.encode()) == 4096 and text.endswith("x [truncated]")
    [summary] = summaries(records, "run-1")
    dropped = 3 * 1024 * 1024 - (4096 - len(" [truncated]"))
    assert f"dropped 2 line(s) and {dropped} byte(s)" in summary.getMessage()


def test_a_quiet_call_logs_no_summary(host: ModuleHost, records: Records) -> None:
    call(host, "flood", {"lines": 3, "size": 10}, context())
    assert module_lines(records, "run-1") == ["x" * 10] * 3
    assert summaries(records, "run-1") == []
    assert not [r for r in records if r.name == "deadlift.host"]


def test_each_call_has_its_own_budget_under_concurrency(host: ModuleHost, records: Records) -> None:
    def one(i: int) -> HostCall:
        ctx = context(f"run-{i}", limit=1000)
        if i % 2:
            call(host, "say", f"normal call {i}".encode(), ctx)
        else:
            call(host, "flood", {"lines": 2000, "size": 100}, ctx)
        return ctx

    with ThreadPoolExecutor(8) as pool:
        calls = list(pool.map(one, range(32)))
    for i, ctx in enumerate(calls):
        lines = module_lines(records, f"run-{i}")
        if i % 2:
            assert lines == [f"normal call {i}"]
            assert summaries(records, f"run-{i}") == []
        else:
            assert lines == ["x" * 100] * 10  # exactly its own 1000 bytes
            [summary] = summaries(records, f"run-{i}")
            assert "dropped 1990 line(s) and 199000 byte(s)" in summary.getMessage()
            assert ctx.log_dropped_bytes == 199_000


def test_the_trap_cause_survives_a_spent_log_budget(host: ModuleHost, records: Records) -> None:
    with pytest.raises(StepError) as caught:
        call(host, "trap", b"", context(limit=0))
    # The host's error line went over the (zero) budget, yet the cause is intact.
    assert caught.value.kind == "trap"
    assert "wasm `unreachable` instruction executed" in str(caught.value)
    assert module_lines(records, "run-1") == []
    [summary] = summaries(records, "run-1")
    assert "dropped 1 line(s)" in summary.getMessage()


def test_module_log_bytes_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().module_log_bytes == 16 * 1024
    monkeypatch.setenv("DEADLIFT_MODULE_LOG_BYTES", "1000")
    logs.default_limit.cache_clear()
    try:
        assert Settings().module_log_bytes == 1000
        assert logs.default_limit() == 1000
    finally:
        monkeypatch.delenv("DEADLIFT_MODULE_LOG_BYTES")
        logs.default_limit.cache_clear()
    assert "`DEADLIFT_MODULE_LOG_BYTES` | 16384" in (ROOT / "README.md").read_text()
