"""``deadlift worker --processes N``: one supervisor, N worker processes sharing the steps.

Against a real nats-server: the children share the step consumer (every event
runs exactly once), a child killed with SIGKILL is restarted while the other
keeps the events flowing, SIGTERM stops them all within the shutdown bound, and
a usage error ends the supervisor with status 2 instead of a restart loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from deadlift.ops.discovery import WorkerInfo, discover_workers
from deadlift.settings import Settings
from tests.conftest import ROOT, eventually, publish, stored

pytestmark = pytest.mark.slow

WORKFLOW = """
name: spread
org: acme
trigger: spread.in
steps:
  - {name: add, module: add_ten, function: add_ten, publish: [spread.out]}
"""
DEADLIFT = [sys.executable, "-m", "deadlift.cli"]
CONSUMER = "acme--spread--add--trigger"
SHUTDOWN_S = 2.0  # DEADLIFT_SHUTDOWN_TIMEOUT_S of the workers; the bound is this + 5 s
BOUND_S = SHUTDOWN_S + 5.0


class Supervisor:
    """A ``deadlift worker`` process with its log in a file (children write to it too)."""

    def __init__(self, settings: Settings, log: Path, *args: str, **env: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*DEADLIFT, "--server", settings.nats_url, "worker", *args],
                stdout=subprocess.DEVNULL,
                stderr=out,
                cwd=ROOT,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "DEADLIFT_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
                    **env,
                },
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text()

    async def children(self, nc: Client) -> list[WorkerInfo]:
        """Its worker processes that answer, in slot order."""
        found = await discover_workers(nc, timeout=0.5)
        return [w for w in found if w.supervisor and w.supervisor["pid"] == self.pid]

    async def serving(self, nc: Client, count: int) -> list[WorkerInfo] | None:
        """Its children once ``count`` of them answer (each has started its steps)."""
        children = await self.children(nc)
        return children if len(children) == count else None

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.text()}") from None

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit status and how long it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return self.wait(BOUND_S + 5), time.monotonic() - started


@pytest.fixture
def supervisors(tmp_path: Path, settings: Settings) -> Iterator[Any]:
    """Start supervisors; any left running at the end is killed (its children follow)."""
    started: list[Supervisor] = []

    def start(*args: str, **env: str) -> Supervisor:
        supervisor = Supervisor(settings, tmp_path / f"worker-{len(started)}.log", *args, **env)
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        if supervisor.process.poll() is None:
            supervisor.process.kill()
            supervisor.process.wait()


@pytest.fixture
async def spread(nc: Client, push: Any, apply: Any) -> None:
    await push("add_ten")
    await apply(WORKFLOW)


async def outputs(nc: Client, count: int) -> list[int] | None:
    found = sorted(e.data["value"] for e in await stored(nc, "spread.out"))
    return found if len(found) >= count else None


def gone(pid: int | None) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


async def test_two_processes_share_the_step_and_stop_together_on_sigterm(
    nc: Client, settings: Settings, spread: None, supervisors: Any
) -> None:
    supervisor = supervisors("--processes", "2", "--concurrency", "2")
    children = await eventually(
        lambda: supervisor.serving(nc, 2), timeout=20, message="two worker processes serving"
    )
    assert sorted(w.supervisor["slot"] for w in children) == [1, 2]
    assert supervisor.pid not in {w.pid for w in children}  # the supervisor runs no steps
    total = 200
    for n in range(total):
        await publish(nc, "spread.in", {"value": n})
    done = await eventually(lambda: outputs(nc, total), timeout=20, message=f"{total} outputs")
    assert done == [n + 10 for n in range(total)]  # each event exactly once
    counts = [w.stats.get("ok", 0) for w in await supervisor.children(nc)]
    assert sum(counts) == total and all(counts), counts  # both processes did work
    # The liveness probe of the container sees both processes, healthy.
    probe = subprocess.run(
        [*DEADLIFT, "--server", settings.nats_url, "health", "--worker", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    here = json.loads(probe.stdout)["workers_here"]
    assert sorted(w["supervisor"]["slot"] for w in here) == [1, 2]

    status, took = supervisor.terminate()
    assert status == 0, supervisor.text()
    assert took < BOUND_S
    assert all(gone(w.pid) for w in children)
    assert supervisor.text().count("worker stopped: ok=") == 2


async def test_a_killed_process_is_restarted_and_nothing_is_lost(
    nc: Client, spread: None, supervisors: Any
) -> None:
    # Events the server hands the killed process's pull request before it notices the
    # closed connection come back after ack_wait: short here.
    supervisor = supervisors("--processes", "2", DEADLIFT_ACK_WAIT_S="2")
    children = await eventually(
        lambda: supervisor.serving(nc, 2), timeout=20, message="two worker processes serving"
    )
    for n in range(20):
        await publish(nc, "spread.in", {"value": n})
    await eventually(lambda: outputs(nc, 20), timeout=10, message="the first 20 outputs")

    victim = children[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    for n in range(20, 40):  # while it is down: the other process runs them
        await publish(nc, "spread.in", {"value": n})
    done = await eventually(lambda: outputs(nc, 40), timeout=10, message="40 outputs")
    assert done == [n + 10 for n in range(40)]

    async def replaced() -> bool:
        now = {w.supervisor["slot"]: w.pid for w in await supervisor.children(nc)}
        return len(now) == 2 and now[victim.supervisor["slot"]] not in (None, victim.pid)

    await eventually(replaced, timeout=20, message="the killed process restarted")
    log = supervisor.text()
    assert f"(pid {victim.pid}) killed by SIGKILL" in log and "restarting it in 0.5 s" in log
    for n in range(40, 60):
        await publish(nc, "spread.in", {"value": n})
    done = await eventually(lambda: outputs(nc, 60), timeout=10, message="60 outputs")
    assert done == [n + 10 for n in range(60)]

    # A supervisor killed outright takes its processes with it (they stop gracefully).
    pids = [w.pid for w in await supervisor.children(nc)]
    assert len(pids) == 2
    supervisor.process.kill()
    await eventually(lambda: all(gone(pid) for pid in pids), message="its processes gone")


async def test_a_usage_error_stops_the_supervisor_with_status_2(supervisors: Any) -> None:
    # Found by the supervisor itself, before any process starts.
    refused = supervisors("--processes", "2", "--orgs", "acme", "--all-orgs")
    assert refused.wait(20) == 2
    assert "--orgs and --all-orgs exclude each other" in refused.text()
    assert "running 2 worker processes" not in refused.text()
    assert supervisors("--processes", "none").wait(20) == 2

    # Found by each child: no restart loop, the supervisor exits 2 as they do.
    broken = supervisors("--processes", "2", "--host-functions", "no_such.pack")
    assert broken.wait(30) == 2, broken.text()
    log = broken.text()
    assert "cannot import" in log and "a usage or configuration error" in log
    assert "restarting" not in log
