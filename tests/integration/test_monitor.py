"""Seeing a live system: workers, status, traces and tails against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from nats.aio.client import Client
from rich.console import Console

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.cli import main
from deadlift.cli.monitor import status_table, trace_table, workers_table
from deadlift.model.orgs import load_orgs
from deadlift.model.topology import Stream
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.discovery import NoWorkersError, discover_workers, live_workers
from deadlift.ops.server import EmbeddedServer
from deadlift.ops.status import StatusMonitor, dead_letter_counts, status_once, step_counts
from deadlift.ops.trace import RunNotFoundError, as_org, trace_across_orgs, trace_run
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import ROOT, eventually, module_path, publish, stored

CALCULATOR = (ROOT / "config" / "workflows" / "calculator.yaml").read_text()
STRICT = """
name: strict
org: acme
trigger: strict.in
steps:
  - {name: add, module: add_ten, function: add_ten, retry: {max_attempts: 1}}
"""
STEPS = ["acme.calculator.add", "acme.calculator.multiply"]


def deadlift(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI against the test server (blocking: call it through ``cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "--server", settings.nats_url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


async def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a thread, so in-process workers keep answering meanwhile."""
    return await asyncio.to_thread(deadlift, settings, *args)


@pytest.fixture
async def calculator(push: Any, apply: Any) -> Workflow:
    await push("add_ten")
    await push("multiply_by_five")
    workflow: Workflow = await apply(CALCULATOR)
    return workflow


@contextlib.asynccontextmanager
async def running(settings: Settings, *selections: tuple[str, ...]) -> AsyncIterator[list[Worker]]:
    """One in-process worker per selection, each on its own connection."""
    connections = [await bus.connect(settings, name="deadlift-worker") for _ in selections]
    workers = [
        Worker(nc, settings=settings, workflows=s)
        for nc, s in zip(connections, selections, strict=True)
    ]
    try:
        for worker in workers:
            await worker.start()
        yield workers
    finally:
        for worker, nc in zip(workers, connections, strict=True):
            await worker.shutdown()
            await nc.drain()


def rendered(table: Any) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    console.file.close()
    return text


async def idle(nc: Client, workflow: Workflow) -> bool:
    """No step of ``workflow`` has anything pending or in flight."""
    counts = await step_counts(nc.jetstream(), [workflow])
    return all(c.pending == 0 and c.ack_pending == 0 for c in counts.values())


async def dead(nc: Client, count: int) -> bool:
    return sum((await dead_letter_counts(nc.jetstream())).values()) >= count


# -- workers ----------------------------------------------------------------------


@pytest.mark.slow  # runs the CLI as processes
async def test_workers_lists_live_workers_with_their_steps(
    nc: Client, settings: Settings, calculator: Workflow
) -> None:
    with pytest.raises(NoWorkersError, match="no workers answered"):
        await live_workers(nc)

    async with running(settings, (), ("calculator",)) as workers:
        found = await discover_workers(nc, timeout=2)
        assert {w.id for w in found} == {w._service.id for w in workers}
        assert [w.steps for w in found] == [STEPS, STEPS]
        assert all(w.error is None and w.orgs == ["acme"] for w in found)
        assert "acme.calculator.add" in rendered(workers_table(found))

        result = await cli(settings, "workers", "--json", "--timeout", "2")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert len(listed) == 2 and len({w["id"] for w in listed}) == 2
    assert all(w["steps"] == STEPS and w["in_flight"] == 0 for w in listed)
    assert all(w["host"] and w["pid"] and w["uptime_s"] is not None for w in listed)


async def watch_status(settings: Settings, reports: int = 2) -> list[dict[str, Any]]:
    """``status --watch --json``: the first reports, then Ctrl-C (a clean exit)."""
    args = ["status", "--watch", "--json", "--interval", "0.2"]
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "deadlift.cli", "--server", settings.nats_url, *args],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    try:
        lines = [await asyncio.wait_for(process.stdout.readline(), 20) for _ in range(reports)]
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    assert process.returncode == 0, err.decode()
    return [json.loads(line) for line in lines]


# -- status -----------------------------------------------------------------------


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{s['workflow']}/{s['step']}": s for s in report["steps"]}


@pytest.mark.slow  # runs the CLI as processes
async def test_status_counts_a_backlog_and_dead_letters(
    nc: Client, settings: Settings, registry: Registry, apply: Any, calculator: Workflow
) -> None:
    for n in range(30):
        await publish(nc, "calc.in", {"value": n})
    result, watched = await asyncio.gather(
        cli(settings, "status", "--json", "--interval", "0.2"), watch_status(settings)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["steps"][0]["rate"] for r in watched] == [None, 0.0]  # rates from the 2nd on
    assert all(rows(r)["calculator/add"]["pending"] == 30 for r in watched)
    add, multiply = rows(report)["calculator/add"], rows(report)["calculator/multiply"]
    # No consumer yet: the trigger's is made by the first worker to find an event, a
    # step's own by the first event sent to it. The 30 wait in the stream all the same.
    assert (add["pending"], add["consumers"], add["workers"], add["rate"]) == (30, 0, 0, 0.0)
    assert (multiply["pending"], multiply["consumers"], multiply["dead_letters"]) == (0, 0, 0)
    assert report["workers"] == 0 and report["workers_source"] == "num_waiting"

    await apply(STRICT)
    async with running(settings, ("strict",)):
        for text in ("one", "two", "three"):
            await publish(nc, "strict.in", {"text": text})
        await eventually(lambda: dead(nc, 3), message="three dead letters")
        status = await status_once(nc, registry, interval=0.1)
    got = rows(status.to_json())
    assert (got["strict/add"]["dead_letters"], got["strict/add"]["workers"]) == (3, 1)
    assert (got["calculator/add"]["pending"], got["calculator/add"]["workers"]) == (30, 0)
    assert status.workers == 1 and status.workers_source == "describe"
    assert "strict" in rendered(status_table(status))


async def test_status_rate_counts_the_events_acked_between_samples(
    nc: Client, settings: Settings, registry: Registry, calculator: Workflow
) -> None:
    for n in range(100):
        await publish(nc, "calc.in", {"value": n})
    status = StatusMonitor(nc.jetstream(), registry)
    await status.report([])  # the first sample: no rates yet
    async with running(settings, ()):
        await eventually(lambda: idle(nc, calculator), message="backlog processed")
        report = await status.report([])
    for row in report.steps:
        assert row.rate is not None and report.interval_s
        assert abs(row.rate * report.interval_s - 100) < 1, row  # one ack per event and step


# -- trace ------------------------------------------------------------------------


def shape(entries: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["stream"], e["subject"], e["step"]) for e in entries]


TWO_STEPS = [
    (Stream.EVENTS, "calc.in", ""),
    (Stream.STEPS, "deadlift.step.acme.calculator.multiply", "add"),
    (Stream.EVENTS, "calc.out", "multiply"),
]


@pytest.mark.slow  # runs the CLI as processes
async def test_trace_shows_a_run_in_order_across_its_steps(
    nc: Client, settings: Settings, apply: Any, calculator: Workflow
) -> None:
    await apply(STRICT)
    async with running(settings, ()):
        run = await publish(nc, "calc.in", {"value": 1})
        await publish(nc, "calc.in", {"value": 2})  # another run: not in the trace
        failed = await publish(nc, "strict.in", {"text": "x"})
        await eventually(lambda: _count(stored(nc, "calc.out"), 2), message="two outputs")
        await eventually(lambda: dead(nc, 1), message="a dead letter")

    entries = [e.to_json() for e in await trace_run(nc.jetstream(), run.id)]
    assert shape(entries) == TWO_STEPS
    assert [e["data"] for e in entries] == [{"value": 1}, {"value": 11}, {"value": 55}]
    offsets = [e["offset_ms"] for e in entries]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert all(e["org"] == "acme" and e["workflow"] == "calculator" for e in entries[1:])

    [trigger, letter] = await trace_run(nc.jetstream(), failed.id)
    assert trigger.subject == "strict.in" and letter.stream == Stream.DLQ
    assert letter.dead and (letter.dead["step"], letter.dead["kind"]) == ("add", "error")
    assert "dead at acme/strict/add [error]" in rendered(trace_table(failed.id, [trigger, letter]))

    with pytest.raises(RunNotFoundError, match="--all-orgs"):
        await trace_run(nc.jetstream(), "no-such-run")

    # --all-orgs: every org of the manifest on this one-account server sees the
    # same messages; they are shown once.
    for result in await asyncio.gather(
        cli(settings, "trace", run.id, "--json"),
        cli(settings, "trace", run.id, "--json", "--all-orgs"),
    ):
        assert result.returncode == 0, result.stderr
        assert shape(json.loads(result.stdout)) == TWO_STEPS


async def _count(found: Any, count: int) -> bool:
    return len(await found) >= count


# -- tail -------------------------------------------------------------------------


@pytest.mark.slow  # runs the CLI as processes
async def test_tail_workflow_shows_the_events_of_all_its_steps(
    nc: Client, settings: Settings, calculator: Workflow
) -> None:
    both = CliRunner().invoke(main, ["tail", "calc.in", "--workflow", "calculator"])
    assert both.exit_code == 2 and "one of them" in both.output
    unknown = asyncio.create_task(cli(settings, "tail", "--workflow", "nope"))
    args = ["tail", "--workflow", "calculator", "--json", "--count", "3"]
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "deadlift.cli", "--server", settings.nats_url, *args],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
        assert "tailing workflow acme.calculator" in line and "deadlift.step.acme" in line
        async with running(settings, ()):
            run = await publish(nc, "calc.in", {"value": 3})
            out, _ = await asyncio.wait_for(process.communicate(), 20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    failed = await unknown
    assert failed.returncode == 1 and "no workflow 'nope'" in failed.stderr
    records = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted((r["subject"], r["step"]) for r in records) == sorted(
        (subject, step) for _, subject, step in TWO_STEPS
    )
    assert {r["run"] for r in records} == {run.id}


# -- across orgs ------------------------------------------------------------------

ORGS = ROOT / "config" / "orgs.yaml"
RELAY = """
name: relay
org: stripe
trigger: stripe.charges.relay
steps:
  - {name: echo, module: echo, function: echo, publish: [stripe.out.acme.relayed]}
"""
INBOX = """
name: inbox
org: acme
trigger: acme.in.stripe.relayed
steps:
  - {name: echo, module: echo, function: echo, publish: [acme.done]}
"""


@pytest.fixture(scope="module")
def operator_orgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped manifest plus a system-account user: following a run across
    orgs is the operator's job."""
    manifest = yaml.safe_load(ORGS.read_text())
    manifest["system"] = {"user": "operator", "password": "operator-test"}
    # The relay's event, declared like the shipped discounts (no schema).
    manifest["integrations"]["acme-at-stripe"]["events"]["relayed"] = {
        "from": "stripe",
        "subject": "stripe.out.acme.relayed",
        "to": "acme.in.stripe.relayed",
    }
    path = tmp_path_factory.mktemp("orgs") / "orgs.yaml"
    path.write_text(yaml.safe_dump(manifest))
    shutil.copytree(ORGS.parent / "schemas", path.parent / "schemas")  # the event schemas
    return path


@pytest.fixture(scope="module")
def accounts_server(operator_orgs: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(orgs=load_orgs(operator_orgs)) as server:
        yield server


async def test_trace_follows_a_run_across_orgs(
    accounts_server: EmbeddedServer, operator_orgs: Path
) -> None:
    base = Settings(
        nats_url=accounts_server.url,
        orgs_file=str(operator_orgs),
        ack_wait_s=5.0,
        system_user="operator",
        system_password="operator-test",
    )
    clients = {}
    for org, text in (("stripe", RELAY), ("acme", INBOX)):
        settings = as_org(base, org)
        nc = clients[org] = await bus.connect(settings)
        registry = await Registry.open(nc.jetstream())
        await push_module_file(registry, module_path("echo"))
        flow = parse_workflow(text)
        await apply_workflows(nc.jetstream(), registry, settings, [(flow, f"{org}.yaml")])
    workers = [Worker(nc, settings=as_org(base, org)) for org, nc in clients.items()]
    try:
        for worker in workers:
            await worker.start()
        run = await publish(clients["stripe"], "stripe.charges.relay", {"n": 1})
        await eventually(lambda: stored(clients["acme"], "acme.done"), message="acme's output")
        own, _ = await trace_run(clients["stripe"].jetstream(), run.id), None
        entries, warnings = await trace_across_orgs(base, run.id)
    finally:
        for worker in workers:
            await worker.shutdown()
        for nc in clients.values():
            await nc.drain()
    assert [e.subject for e in own] == ["stripe.charges.relay", "stripe.out.acme.relayed"]
    assert warnings == []
    seen = [(e.account, e.subject, e.org, e.step) for e in entries]
    assert seen[0] == ("stripe", "stripe.charges.relay", "", "")
    assert seen[-1] == ("acme", "acme.done", "acme", "echo")
    assert sorted(seen[1:3]) == [
        ("acme", "acme.in.stripe.relayed", "stripe", "echo"),
        ("stripe", "stripe.out.acme.relayed", "stripe", "echo"),
    ]
    assert all(e.data == {"n": 1} for e in entries)


def test_durations_and_request_timeouts_are_readable() -> None:
    from deadlift.cli.monitor import _duration

    assert [_duration(s) for s in (None, 3.25, 125, 7300)] == ["-", "3.2s", "2m05s", "2h01m"]


async def test_discovery_returns_at_once_when_nobody_listens(nc: Client) -> None:
    started = time.monotonic()
    assert await discover_workers(nc, timeout=5) == []
    assert time.monotonic() - started < 1  # the server's no-responders status ends the wait
