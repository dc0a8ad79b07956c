"""Whole processes: the CLI against a real server, and several workers sharing a step."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from deadlift.bus import dlq
from deadlift.ops.server import free_port
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import ROOT, eventually, module_path, publish, stored, workers_serving

pytestmark = pytest.mark.slow


def deadlift(
    settings: Settings, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the CLI against the test server."""
    return subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "--server", settings.nats_url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def start_worker(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadlift.cli",
            "--server",
            settings.nats_url,
            "worker",
            "--processes",
            "1",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, wait for a clean exit, return stderr."""
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return err


async def test_cli_push_apply_publish_and_inspect(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    for name in ("add_ten", "multiply_by_five"):
        result = deadlift(settings, "module", "push", str(module_path(name)))
        assert result.returncode == 0, result.stderr
        assert f"pushed {name}@1" in result.stdout
    again = deadlift(settings, "module", "push", str(module_path("add_ten")))
    assert "unchanged add_ten@1" in again.stdout

    listed = json.loads(deadlift(settings, "module", "ls", "--json").stdout)
    assert {m["name"]: m["exports"] for m in listed}["add_ten"] == ["_main", "add_ten"]

    flow = ROOT / "config" / "workflows" / "calculator.yaml"
    applied = deadlift(settings, "workflow", "apply", str(flow))
    assert applied.returncode == 0, applied.stderr
    assert "acme.calculator" in applied.stdout
    assert (
        json.loads(deadlift(settings, "workflow", "ls", "--json").stdout)[0]["name"] == "calculator"
    )
    graph = deadlift(settings, "workflow", "graph", "calculator").stdout
    assert graph.startswith("flowchart LR") and "calc.in" in graph and "calc.out" in graph
    assert "add_ten:add_ten" in graph and "multiply_by_five:multiply_by_five" in graph

    worker = start_worker(settings, "--workflow", "calculator")
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadlift.cli",
            "--server",
            settings.nats_url,
            "tail",
            "calc.out",
            "--json",
            "--count",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert "tailing calc.out" in tail.stderr.readline()  # type: ignore[union-attr]
        await eventually(lambda: workers_serving(nc), message="worker serving")
        sent = deadlift(settings, "publish", "calc.in", '{"value": 4}')
        assert sent.returncode == 0, sent.stderr
        out, _ = tail.communicate(timeout=30)
        assert json.loads(out)["data"] == {"value": 70}
    finally:
        tail.kill()
        stop(worker)


async def test_cli_errors_name_the_file_step_and_field(
    nc: Client, settings: Settings, tmp_path: Path
) -> None:
    assert deadlift(settings, "module", "push", str(module_path("add_ten"))).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\norg: acme\ntrigger: x.in\n"
        "steps:\n  - {name: s, module: add_ten, function: nope}\n"
    )
    result = deadlift(settings, "workflow", "apply", str(bad))
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "'s'" in result.stderr and "nope" in result.stderr
    assert "add_ten" in result.stderr  # lists what it does export

    not_wasm = tmp_path / "junk.wasm"
    not_wasm.write_bytes(b"hello")
    result = deadlift(settings, "module", "push", str(not_wasm))
    assert (
        result.returncode == 2 and "junk.wasm" in result.stderr and "WebAssembly" in result.stderr
    )

    result = deadlift(settings, "publish", "nowhere.at.all", '{"a": 1}')
    assert result.returncode == 1 and "no stream captures nowhere.at.all" in result.stderr


async def test_two_worker_processes_share_a_step_without_duplicates(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    await apply((ROOT / "config" / "workflows" / "calculator.yaml").read_text())
    workers = [start_worker(settings, "--concurrency", "4") for _ in range(2)]
    total = 300
    try:
        await eventually(
            lambda: workers_serving(nc, 2),
            timeout=30,
            message="both workers serving",
        )
        for n in range(total):
            await publish(nc, "calc.in", {"value": n})
        out = await eventually(lambda: _all(nc, total), timeout=60, message=f"{total} outputs")
    finally:
        logs = [stop(w) for w in workers]
    values = sorted(e.data["value"] for e in out)
    assert values == sorted((n + 10) * 5 for n in range(total))  # each exactly once
    oks = [int(re.search(r"ok=(\d+)", log).group(1)) for log in logs]  # type: ignore[union-attr]
    assert sum(oks) == 2 * total  # two steps per event, across both processes
    assert all(ok > 0 for ok in oks), oks  # both processes did work


async def _all(nc: Client, count: int) -> Any:
    found = await stored(nc, "calc.out")
    return found if len(found) >= count else None


async def test_worker_loads_a_host_function_pack_by_module_path(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("before_charge_action")
    await push("discount_notice")
    # Stripe's shipped workflow, with the module as Stripe's own (a single-tenant
    # server has no accounts, so no integration to accept Acme's through).
    shipped = (ROOT / "config" / "workflows" / "stripe-charges.yaml").read_text()
    await apply(shipped.replace("acme/before_charge_action", "before_charge_action"))
    worker = start_worker(settings, "--host-functions", "deadlift.demo.stripe")
    try:
        charge = {
            "charge_id": "ch_9",
            "customer": "alice",
            "email": "alice@acme.example",
            "amount": 4.5,
            "category": "coffee",
            "ts": int(time.time()),
        }
        await publish(nc, "stripe.charges.acme", charge)
        out = await eventually(lambda: stored(nc, "stripe.out.acme.discounts"), timeout=30)
    finally:
        stop(worker)
    assert out[0].data["customer"] == "alice" and out[0].data["discount_percent"] == 10


def test_server_command_serves_jetstream_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadlift.cli",
            "server",
            "--port",
            str(port),
            "--store-dir",
            str(tmp_path / "store"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert f"127.0.0.1:{port}" in process.stdout.readline()  # type: ignore[union-attr]

        async def account() -> Any:
            # One account per org by default: connect as one (the shipped manifest's).
            client = await nats.connect(
                f"nats://127.0.0.1:{port}", user="acme", password="acme-dev"
            )
            try:
                return await client.jetstream().account_info()
            finally:
                await client.close()

        assert asyncio.run(account()).limits is not None
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0
    assert (tmp_path / "store" / "jetstream").is_dir()


async def test_cli_dead_letters_show_replay_and_purge(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await apply("""
name: strict
org: acme
trigger: strict.in
steps:
  - {name: add, module: add_ten, function: add_ten, retry: {max_attempts: 1}}
""")
    async with Worker(nc, settings=settings):
        for text in ("one", "two", "three"):
            await publish(nc, "strict.in", {"text": text})
        await eventually(lambda: _dead(nc, 3), message="three dead letters")
    listed = json.loads(deadlift(settings, "dlq", "ls", "--json").stdout)
    assert [(d["workflow"], d["step"], d["kind"]) for d in listed] == [
        ("strict", "add", "error")
    ] * 3
    first = listed[0]["id"]
    shown = json.loads(deadlift(settings, "dlq", "show", str(first), "--json").stdout)
    # Events run concurrently, so the first dead letter may be any of the three.
    assert shown["data"] in ({"text": t} for t in ("one", "two", "three"))
    assert "value" in shown["error"]

    replayed = deadlift(settings, "dlq", "replay", str(first))
    assert replayed.returncode == 0 and "deadlift.step.acme.strict.add" in replayed.stdout
    async with Worker(nc, settings=settings):  # fails again: back in the queue, as a new letter
        await eventually(lambda: _dead(nc, 3), message="replayed letter dead again")
    purged = deadlift(settings, "dlq", "purge", "--workflow", "acme.strict", "--yes")
    assert "3 dead letter(s) purged" in purged.stdout
    assert json.loads(deadlift(settings, "dlq", "ls", "--json").stdout) == []
    missing = deadlift(settings, "dlq", "show", "999")
    assert missing.returncode == 1 and "no dead letter 999" in missing.stderr


async def _dead(nc: Client, count: int) -> bool:
    return len(await dlq.letters(nc.jetstream())) >= count
