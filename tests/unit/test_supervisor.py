"""The supervisor of ``deadlift worker --processes N``: backoff, ``auto``, and its children.

The children here are tiny Python programs (no server): what matters is what the
supervisor does when they exit, crash, or are asked to stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deadlift.cli import main
from deadlift.cli import worker as worker_cli
from deadlift.errors import ConfigError
from deadlift.runtime import supervisor as supervisor_module
from deadlift.runtime.supervisor import (
    PID_ENV,
    SLOT_ENV,
    Backoff,
    Supervised,
    Supervisor,
    available_cpus,
    exit_status,
    resolve_processes,
    supervised,
)
from deadlift.runtime.watchdog import EXIT_STUCK
from tests.conftest import eventually
from tests.unit.test_fleet import MANIFEST

# -- backoff ----------------------------------------------------------------------


def test_backoff_doubles_up_to_its_ceiling_and_resets_after_a_steady_run() -> None:
    backoff = Backoff()
    delays = [backoff.after(1.0) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.after(60.0) == 0.5  # it ran a minute: a fresh start
    assert backoff.after(59.0) == 1


# -- how many processes -----------------------------------------------------------


def test_auto_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert resolve_processes("auto") == resolve_processes("AUTO") == available_cpus()
    assert available_cpus(tmp_path) == affinity  # no cgroup quota at all
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one process
    assert available_cpus(tmp_path) == 1


def test_a_cgroup_v1_quota_caps_auto_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_a_count_is_taken_as_it_is_and_nonsense_refused() -> None:
    assert resolve_processes("3") == resolve_processes(3) == 3
    for bad in ("0", "-2", "many", 0):
        with pytest.raises(ConfigError, match="at least 1, or auto"):
            resolve_processes(bad)


def test_a_child_knows_its_supervisor_from_its_environment() -> None:
    me = supervised({PID_ENV: "42", SLOT_ENV: "2/4"})
    assert me == Supervised(pid=42, slot=2, processes=4)
    assert supervised({}) is None
    assert supervised({PID_ENV: "42", SLOT_ENV: "two"}) is None


def test_exit_statuses_read_as_words() -> None:
    assert exit_status(70) == "exited with status 70"
    assert exit_status(-9) == "killed by SIGKILL"


# -- the command line of the children -----------------------------------------------


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``deadlift ARGS`` in-process; returns what it would supervise (command, processes)."""
    seen: dict[str, Any] = {}

    async def fake_supervisor(settings: Any, *, command: list[str], processes: int) -> int:
        seen.update(command=command, processes=processes)
        return 0

    monkeypatch.setattr(worker_cli, "run_supervisor", fake_supervisor)

    def invoke(*args: str, **env: str) -> dict[str, Any]:
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            result = CliRunner().invoke(main, list(args), env=env)
        finally:
            root.handlers[:], root.level = handlers, level
        assert result.exit_code == 0, result.output
        return seen

    return invoke


def test_children_run_the_same_command_line_with_one_process(spawned: Any) -> None:
    seen = spawned(
        *("--server", "nats://127.0.0.1:1", "--log-level", "debug", "worker"),
        *("-w", "calc", "--workflow", "other", "-c", "4", "--processes", "3"),
        DEADLIFT_PROCESSES="7",
    )
    assert seen["processes"] == 3  # the flag wins over DEADLIFT_PROCESSES
    assert seen["command"] == [
        *(sys.executable, "-m", "deadlift.cli"),
        *("--server", "nats://127.0.0.1:1", "--log-level", "debug", "worker"),
        *("--workflow", "calc", "--workflow", "other", "--concurrency", "4"),
        *("--processes", "1"),
    ]


def test_each_child_serves_the_same_orgs(spawned: Any, tmp_path: Path) -> None:
    orgs = tmp_path / "orgs.yaml"
    orgs.write_text(MANIFEST)
    seen = spawned("--orgs", str(orgs), "worker", "--all-orgs", DEADLIFT_PROCESSES="2")
    assert seen["processes"] == 2
    assert seen["command"][3:] == [
        *("--orgs", str(orgs), "worker", "--all-orgs", "--processes", "1"),
    ]


def test_a_bad_process_count_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["worker", "--processes", "0"])
    assert result.exit_code == 2
    assert "at least 1, or auto" in result.output


# -- supervising --------------------------------------------------------------------


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


QUICK = Backoff(first_s=0.01, max_s=0.05, steady_s=60)


async def test_children_that_exit_are_restarted_until_stopped(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # The first six starts crash; the next ones run until stopped.
    starts = tmp_path / "starts"
    code = (
        f"import sys, time\nwith open({str(starts)!r}, 'a+') as f: f.write('.'); f.seek(0); n = "
        "len(f.read())\nif n <= 6: sys.exit(3)\ntime.sleep(60)"
    )
    supervisor = Supervisor(child(code), processes=2, stop_timeout_s=5, backoff=QUICK)
    running = asyncio.create_task(supervisor.run())
    await eventually(
        lambda: supervisor.restarts == 6 and len(supervisor.children) == 2,
        message="six restarts, then two children running",
    )
    supervisor.stop()
    assert await asyncio.wait_for(running, 10) == 0
    restarts = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    assert len(restarts) == supervisor.restarts == 6 and "exited with status 3" in restarts[0]


async def test_a_child_usage_error_stops_every_child_and_no_restart() -> None:
    first_fails = "import os, sys, time\nif os.environ['{}'].startswith('1/'): sys.exit(2)\n"
    code = first_fails.format(SLOT_ENV) + "time.sleep(60)"
    supervisor = Supervisor(child(code), processes=2, stop_timeout_s=5, backoff=QUICK)
    assert await asyncio.wait_for(supervisor.run(), 10) == 2
    assert supervisor.restarts == 0 and supervisor.children == {}


async def test_stop_forwards_sigterm_and_kills_what_outlives_the_bound() -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    supervisor = Supervisor(child(stubborn), processes=2, stop_timeout_s=0.5)
    running = asyncio.create_task(supervisor.run())
    await eventually(lambda: len(supervisor.children) == 2, message="two children")
    await asyncio.sleep(0.5)  # their SIGTERM handlers are installed
    supervisor.stop()
    assert await asyncio.wait_for(running, 10) == EXIT_STUCK


async def test_children_see_their_slot_and_supervisor(tmp_path: Path) -> None:
    # Each child writes its supervisor's pid to a file named after its slot.
    code = (
        "import os, time\n"
        f"name = os.environ['{SLOT_ENV}'].replace('/', '-')\n"
        f"open(os.path.join({str(tmp_path)!r}, name), 'w').write(os.environ['{PID_ENV}'])\n"
        "time.sleep(60)"
    )
    supervisor = Supervisor(child(code), processes=3, stop_timeout_s=5, stagger_s=0)
    running = asyncio.create_task(supervisor.run())
    await eventually(lambda: len(list(tmp_path.iterdir())) == 3, message="three children")
    supervisor.stop()
    assert await asyncio.wait_for(running, 10) == 0  # killed by SIGTERM: a clean stop
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert written == {f"{slot}-3": str(os.getpid()) for slot in (1, 2, 3)}
    assert supervisor_module.supervised() is None  # the supervisor itself is not supervised
