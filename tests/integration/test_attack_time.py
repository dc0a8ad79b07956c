"""Time attacks (issue 11, class 2): nothing a module does can wedge a worker or the CLI forever.

A module's start function runs while it is instantiated, and nothing bounds it;
a host function blocked in Python cannot be interrupted by Extism's timeout.
So: ``module push`` and a worker's first load probe the binary in a child
process with a deadline; a watchdog reports a worker whose module thread is
stuck and makes it exit (its events go to another worker); SIGTERM always ends
a worker within its shutdown bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

import deadlift.bus.registry
from deadlift.bus.registry import Registry
from deadlift.errors import ModuleError
from deadlift.ops.control import push_module_file
from deadlift.ops.health import check_health
from deadlift.runtime.watchdog import EXIT_STUCK
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostCall, host_function
from tests.conftest import ROOT, eventually, module_path, publish, stored

LOOP = module_path("hostile_start_loop")
KERNEL = module_path("hostile_start_kernel")

CHARGES = """
name: charges
org: acme
trigger: stuck.charges
steps:
  - name: check
    module: before_charge_action
    function: before_charge_action
    host_functions: [past_purchases, send_email]
    timeout_ms: 500
    publish: [stuck.out]
"""
CHARGE = {
    "charge_id": "ch_1",
    "customer": "alice",
    "email": "alice@example.com",
    "amount": 4.5,
    "category": "coffee",
    "ts": int(time.time()),
}
CALCULATOR = """
name: calculator
org: acme
trigger: calc.in
steps:
  - {name: add, module: add_ten, function: add_ten, next: [multiply]}
  - {name: multiply, module: multiply_by_five, function: multiply_by_five, publish: [calc.out]}
"""


def cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "--server", settings.nats_url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def start_worker(settings: Settings, env: dict[str, str]) -> subprocess.Popen[str]:
    """A real ``deadlift worker`` process offering stuck_pack.py's host functions."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadlift.cli",
            "--server",
            settings.nats_url,
            "worker",
            "--processes",
            "1",  # one process: its exit status is the worker's
            "--host-functions",
            "tests.integration.stuck_pack",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DEADLIFT_ACK_WAIT_S": "5", **env},
    )


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[int, str]:
    """Wait for the process to exit on its own; (exit code, stderr). Killed if it does not."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(
            f"process {process.pid} did not exit within {timeout} s:\n{err}"
        ) from None
    return process.returncode, err


# -- push -------------------------------------------------------------------------


async def test_push_of_a_module_whose_start_loops_ends_at_the_deadline(
    registry: Registry,
) -> None:
    started = time.monotonic()
    with pytest.raises(ModuleError) as caught:
        await push_module_file(registry, LOOP, probe_timeout_s=2)
    took = time.monotonic() - started
    message = str(caught.value)
    assert "hostile_start_loop.wasm" in message, "the error names the file"
    assert "module start did not finish within 2 s (its start function may loop)" in message
    assert 2 <= took < 5, f"push took {took:.1f} s"
    assert await registry.modules() == []


async def test_push_of_a_module_whose_start_calls_the_kernel_does_not_crash_the_pusher(
    registry: Registry,
) -> None:
    # In-process this instantiation is a SIGSEGV of the whole Python process
    # (this test run included); the probe's child takes it instead.
    with pytest.raises(ModuleError) as caught:
        await push_module_file(registry, KERNEL, probe_timeout_s=5)
    message = str(caught.value)
    assert "hostile_start_kernel.wasm" in message
    assert "crashed the process instantiating it (SIGSEGV)" in message
    assert "kernel functions" in message and "exported function" in message
    assert await registry.modules() == []


@pytest.mark.slow
async def test_cli_push_of_hostile_starts_exits_2_with_a_clear_message(
    nc: Client, settings: Settings, registry: Registry
) -> None:
    started = time.monotonic()
    looping = cli(settings, "module", "push", str(LOOP), env={"DEADLIFT_PROBE_TIMEOUT_S": "2"})
    took = time.monotonic() - started
    assert looping.returncode == 2, looping.stderr
    assert "did not finish within 2 s (its start function may loop)" in looping.stderr
    assert "hostile_start_loop.wasm" in looping.stderr
    assert "Traceback" not in looping.stderr
    assert took < 2 + 8, f"push took {took:.1f} s"  # the deadline plus the CLI's start-up

    crashing = cli(settings, "module", "push", str(KERNEL))
    assert crashing.returncode == 2, (crashing.returncode, crashing.stderr)
    assert "SIGSEGV" in crashing.stderr and "hostile_start_kernel.wasm" in crashing.stderr
    assert "Traceback" not in crashing.stderr
    assert await registry.modules() == []

    fine = cli(settings, "module", "push", str(module_path("add_ten")))
    assert fine.returncode == 0 and "pushed add_ten@1" in fine.stdout, fine.stderr


# -- the worker's first load ---------------------------------------------------------


def _hostile_flow(module: str) -> str:
    return f"""
name: {module.replace("_", "-")}
org: evil
trigger: hostile.{module}
steps:
  - {{name: run, module: {module}, function: ok, publish: [hostile.out.{module}]}}
"""


async def test_worker_never_instantiates_a_module_whose_start_hangs_or_crashes(
    nc: Client,
    settings: Settings,
    push: Any,
    apply: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Binaries stored without the push probe (an older Deadlift, a direct write)."""

    async def no_probe(*args: Any, **kwargs: Any) -> None:
        return None

    with monkeypatch.context() as patched:
        patched.setattr(deadlift.bus.registry, "probe_module", no_probe)
        await push("hostile_start_loop")
        await push("hostile_start_kernel")
    for name in ("add_ten", "multiply_by_five"):
        await push(name)
    await apply(_hostile_flow("hostile_start_loop"))
    await apply(_hostile_flow("hostile_start_kernel"))
    await apply(CALCULATOR)
    quick = settings.model_copy(update={"probe_timeout_s": 1.5})
    caplog.set_level(logging.ERROR, logger="deadlift.worker")
    async with Worker(nc, settings=quick) as worker:
        # This process is alive (no SIGSEGV) and its threads are free: other steps run.
        assert worker.steps == ["acme.calculator.add", "acme.calculator.multiply"]
        await publish(nc, "calc.in", {"value": 1})
        await worker.drain()
        found = await stored(nc, "calc.out")
        assert [e.data for e in found] == [{"value": 55}]
        assert worker.describe()["healthy"] is True
    errors = [r.getMessage() for r in caplog.records if "not started" in r.getMessage()]
    loop = next(e for e in errors if "hostile_start_loop" in e)
    assert "step 'run'" in loop and "module hostile_start_loop" in loop
    assert "did not finish within 1.5 s" in loop and "push a new version" in loop
    kernel = next(e for e in errors if "hostile_start_kernel" in e)
    assert "SIGSEGV" in kernel and "move that code into an exported function" in kernel


TURNS_SLOW = """
name: turns-slow
org: acme
trigger: slow.in
steps:
  - {name: count, module: hostile, function: loop, timeout_ms: 5000, publish: [slow.out]}
"""


async def test_a_module_turning_slow_on_the_fast_lane_holds_the_loop_for_milliseconds(
    nc: Client, settings: Settings, push: Any, apply: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quick module's lone events run on the event loop's thread (the fast lane);
    one that then counts for a second is cut off there within ~3 ms and finishes in
    a module thread, while the loop goes on serving."""
    await push("hostile")
    await apply(TURNS_SLOW)
    async with Worker(nc, settings=settings) as worker:
        submits: list[int] = []
        submit = worker.executor.submit

        def counted(*args: Any, **kwargs: Any) -> Any:
            submits.append(1)
            return submit(*args, **kwargs)

        monkeypatch.setattr(worker.executor, "submit", counted)
        on_loop = 0
        for _ in range(200):  # one at a time, as a caught-up step gets them
            before = len(submits)
            await publish(nc, "slow.in", {"loops": 100})
            await worker.drain()
            on_loop = on_loop + 1 if len(submits) == before else 0
            if on_loop == 2:
                break
        assert on_loop == 2, "a quick module's lone events run on the loop"
        stalls: list[float] = []

        async def tick() -> None:
            while True:
                began = time.perf_counter()
                await asyncio.sleep(0.001)
                stalls.append(time.perf_counter() - began)

        ticker = asyncio.create_task(tick())
        submits.clear()
        began = time.perf_counter()
        await publish(nc, "slow.in", {"loops": 500_000_000})  # ~1 s of counting
        await worker.drain(timeout=30)
        took = time.perf_counter() - began
        ticker.cancel()
        outputs = [e.data for e in await stored(nc, "slow.out")]
        assert outputs[-1] == {"loops": 500_000_000}
        assert took > 0.5, "the slow call ran whole"
        assert len(submits) == 1, "cut off on the loop, run again in a module thread"
        assert max(stalls) < 0.2, f"the loop stalled {max(stalls) * 1e3:.0f} ms"
        [runner] = [r for r in worker._runners[("acme.turns-slow", "count")] if r.is_trigger]
        assert not runner.calls.fast and runner.calls.strikes == 1


# -- the watchdog -------------------------------------------------------------------


INSTANTIATE = """
import hashlib, os, sys
from deadlift.runtime.watchdog import Watchdog
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall

wasm = open(sys.argv[1], "rb").read()
sha = hashlib.sha256(wasm).hexdigest()

def stuck(found):
    print("stuck:", found[0], flush=True)
    os._exit(70)

dog = Watchdog(grace_s=0.5, phase_s=1.0, on_stuck=stuck, interval_s=0.05)
dog.start()
host = ModuleHost()
host.add_binary(sha, wasm)
spec = PluginSpec(sha256=sha, org="evil", timeout_ms=200, max_pages=64)
call = HostCall(org="evil", workflow="w", step="s", run="r", event_id="e", granted={})
with dog.track("step evil/w/s (module hostile_start_loop)", 0.2):
    host.call(spec, "ok", b"{}", call)
print("returned", flush=True)
"""


@pytest.mark.slow
def test_instantiation_in_the_worker_is_bounded_by_the_watchdog() -> None:
    """If a hanging start ever gets past the probe, ModuleHost's instantiation is tracked."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", INSTANTIATE, str(LOOP)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    took = time.monotonic() - started
    assert result.returncode == EXIT_STUCK, result.stderr
    assert "stuck: step evil/w/s (module hostile_start_loop): instantiating module a1b0" in (
        result.stdout
    )
    assert "past its 1.5 s deadline" in result.stdout  # the phase's 1 s + 0.5 s grace
    assert took < 1.5 + 5


async def test_library_worker_with_a_stuck_call_reports_unhealthy_and_stops_pulling(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """In-process: unhealthy and shut down, but the library never exits the process."""
    release = threading.Event()
    entered = threading.Event()

    @host_function
    def past_purchases(call: HostCall, request: Any) -> Any:
        entered.set()
        release.wait(30)
        return {"purchases": []}

    @host_function
    def send_email(call: HostCall, request: Any) -> Any:
        return {"id": "x"}

    await push("before_charge_action")
    await apply(CHARGES)
    quick = settings.model_copy(update={"watchdog_grace_s": 0.5, "shutdown_timeout_s": 1.0})
    functions = {"past_purchases": past_purchases, "send_email": send_email}
    worker = Worker(nc, settings=quick, host_functions=functions)
    try:
        await worker.start()
        await publish(nc, "stuck.charges", CHARGE)
        await eventually(entered.is_set, message="the host function was called")
        assert worker.describe()["healthy"] is True  # within timeout + grace: not stuck yet
        await eventually(lambda: not worker.describe()["healthy"], timeout=5, message="unhealthy")
        [problem] = worker.describe()["problems"]
        assert "step acme/charges/check (module before_charge_action)" in problem
        # It shuts itself down (stops pulling) within the shutdown timeout.
        await asyncio.wait_for(worker.run_until_shutdown(), timeout=5)
        assert worker.steps == []
    finally:
        release.set()
        await worker.shutdown()


# -- whole worker processes ---------------------------------------------------------


@pytest.mark.slow
async def test_stuck_worker_reports_unhealthy_exits_and_its_event_is_processed_elsewhere(
    nc: Client, settings: Settings, push: Any, apply: Any, tmp_path: Path
) -> None:
    await push("before_charge_action")
    await apply(CHARGES)
    marker = tmp_path / "hanging"
    grace, shutdown = 1.5, 6.0
    first = start_worker(
        settings,
        {
            "DEADLIFT_TEST_HANG": "1",
            "DEADLIFT_TEST_HANG_MARKER": str(marker),
            "DEADLIFT_WATCHDOG_GRACE_S": str(grace),
            "DEADLIFT_SHUTDOWN_TIMEOUT_S": str(shutdown),
        },
    )
    second: subprocess.Popen[str] | None = None
    try:
        await eventually(lambda: _healthy_worker(settings), timeout=20, message="worker up")
        await publish(nc, "stuck.charges", CHARGE)
        await eventually(marker.exists, timeout=10, message="the call is under way")
        hung_at = time.monotonic()

        # Stuck past 0.5 s timeout + grace: `deadlift health --worker` says so, naming it.
        await eventually(lambda: _unhealthy(settings), timeout=10, message="reported unhealthy")
        probe = cli(settings, "health", "--worker", "--timeout", "1")
        assert probe.returncode == 1, probe.stderr
        assert "stuck: step acme/charges/check (module before_charge_action)" in probe.stderr

        code, log = finish(first, timeout=0.5 + grace + shutdown + 10)
        took = time.monotonic() - hung_at
        assert code == EXIT_STUCK, log
        assert took < 0.5 + grace + shutdown + 4, f"exited {took:.1f} s after the call hung"
        assert "module call stuck: step acme/charges/check (module before_charge_action)" in log
        assert "Traceback" not in log

        # Never acked: redelivered after ack_wait to a healthy worker, which runs it.
        second = start_worker(settings, {})
        found = await eventually(
            lambda: stored(nc, "stuck.out"), timeout=30, message="processed elsewhere"
        )
        assert [e.data["charge_id"] for e in found] == ["ch_1"]
        assert found[0].data["discount_percent"] == 10
        second.send_signal(signal.SIGTERM)
        code, log = finish(second, timeout=20)
        assert code == 0, log
        assert "ok=1" in log
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm", "sigterm-twice"])
async def test_sigterm_ends_a_worker_with_a_stuck_thread_within_its_bound(
    nc: Client, settings: Settings, push: Any, apply: Any, tmp_path: Path, signals: int
) -> None:
    await push("before_charge_action")
    await apply(CHARGES)
    marker = tmp_path / "hanging"
    shutdown = 2.0
    worker = start_worker(
        settings,
        {
            "DEADLIFT_TEST_HANG": "1",
            "DEADLIFT_TEST_HANG_MARKER": str(marker),
            "DEADLIFT_WATCHDOG_GRACE_S": "120",  # the watchdog stays out of it
            "DEADLIFT_SHUTDOWN_TIMEOUT_S": str(shutdown),
        },
    )
    try:
        await eventually(lambda: _healthy_worker(settings), timeout=20, message="worker up")
        await publish(nc, "stuck.charges", CHARGE)
        await eventually(marker.exists, timeout=10, message="the call is under way")
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        if signals == 2:
            await asyncio.sleep(0.3)
            worker.send_signal(signal.SIGTERM)
        code, log = finish(worker, timeout=shutdown + 15)
        took = time.monotonic() - started
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert "Traceback" not in log
    if signals == 1:
        assert code == EXIT_STUCK, log
        assert took < shutdown + 4, f"SIGTERM took {took:.1f} s"
        assert "module calls left running" in log and "acme/charges/check" in log
    else:
        assert code == 128 + signal.SIGTERM, log
        assert took < 2, f"the second SIGTERM took {took:.1f} s"
        assert "second signal (SIGTERM): exiting now" in log


async def _healthy_worker(settings: Settings) -> bool:
    report = await check_health(settings, worker=True, streams=False, timeout=0.5)
    return bool(report["ok"])


async def _unhealthy(settings: Settings) -> list[str] | None:
    report = await check_health(settings, worker=True, streams=False, timeout=0.5)
    stuck = [p for p in report["problems"] if "stuck:" in p]
    return stuck or None
