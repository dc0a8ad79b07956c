"""``scale.py --orgs N --worker-processes P``: P worker processes serving N orgs (issue 15).

After the orgs bench applied N orgs (one 3-step workflow each), one event is
published to every org's trigger (``o{i}.in``, with that org's credentials), then P
real ``deadlift worker --orgs o{k},o{k+P},…`` processes are started (each a Fleet:
a worker per org on its own connection, credentials from the manifest's users;
``DEADLIFT_PROCESSES=1``: no supervisor). Measured:

ready          from their start until each had logged ``serving k of m org(s)``.
serving        from their start until every org's output was stored: the EVENTS
               stream of each org holds its trigger and its output; ``/jsz`` gives
               every account's streams in one request, with the time the last
               message was stored (the output's), so this is exact, not polled.
workers RSS    ``VmRSS`` summed over the P processes once every org was served (in
               brackets: once idle).
idle CPU       user+system CPU over ``--idle`` s once steps went cold
               (``DEADLIFT_IDLE_COLD_S`` + 1 s + 5 s after the last output), in % of
               one core: the workers' summed, and the server's in the same window,
               with the server's RSS then.

A process that exits, or orgs not served within ``--fleet-timeout``, are reported
(per process: how many of its orgs were served, and its log's last lines); the
processes get SIGTERM at the end (SIGKILL after 60 s) and their exit codes are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from scale_common import ROOT, cpu_seconds, fmt, monitor, note, rss_mb

from deadlift import bus
from deadlift.model.orgs import account_name
from deadlift.model.topology import Stream
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.pulling import SETTLE_S
from deadlift.settings import Settings
from deadlift.wire import events

AT_ONCE = 8
COLD_MARGIN_S = 5.0
SERVING = re.compile(r"serving (\d+) of (\d+) org")
LOG_TAIL = 1500


@dataclass
class Fleet:
    """What P processes serving the N orgs measured; None where a phase did not run."""

    processes: int
    publish_s: float | None = None  # one event to every org's trigger, before the start
    ready_s: float | None = None
    serve_s: float | None = None
    served: int = 0
    workers_rss_mb: float | None = None  # summed, once every org was served
    workers_idle_rss_mb: float | None = None  # summed, at the idle window's end
    workers_rss_each_mb: list[float | None] = field(default_factory=list)
    workers_idle_cpu_pct: float | None = None  # summed, % of one core
    server_rss_mb: float | None = None
    server_idle_cpu_pct: float | None = None
    connections: int | None = None  # the server's, in the idle window
    exits: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Process:
    """One worker process and the orgs it serves."""

    orgs: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    def serving(self) -> bool:
        with contextlib.suppress(OSError):
            return SERVING.search(self.log.read_text(errors="replace")) is not None
        return False

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        return ""


async def publish_trigger(url: str, path: Path, org: str, password: str) -> None:
    """One event on ``org``'s trigger, as that org."""
    settings = Settings(nats_url=url, org=org, user=org, password=password, orgs_file=str(path))
    nc = await bus.connect(settings, name="deadlift-bench-scale")
    try:
        event_id = f"first-{org}"
        event = events.new_event(
            {"value": 0}, source="deadlift://bench", type="bench.in", id=event_id
        )
        headers, body = events.encode(event)
        await bus.JetStreamPublisher(nc, timeout=30.0).publish(
            f"{org}.in", body, headers, msg_id=event_id
        )
    finally:
        await nc.close()


def start(url: str, path: Path, orgs: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``deadlift worker --orgs …`` as an operator starts it (one process: no supervisor)."""
    command = [sys.executable, "-m", "deadlift.cli", "--server", url, "--orgs", str(path)]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*command, "worker", "--orgs", ",".join(orgs)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "DEADLIFT_PROCESSES": "1"},
            start_new_session=True,  # a Ctrl-C is for the bench, which stops them
        )


def stored_at(value: str) -> float:
    """An RFC 3339 time of the server (nanoseconds) as epoch seconds."""
    head, _, rest = value.rstrip("Z").partition(".")
    digits = re.match(r"\d*", rest)
    fraction = (digits.group(0) if digits else "")[:6].ljust(6, "0")
    zone = rest[len(digits.group(0)) :] if digits else ""
    stamp = datetime.datetime.fromisoformat(f"{head}.{fraction}{zone or '+00:00'}")
    return stamp.timestamp()


def outputs(server: EmbeddedServer, accounts: dict[str, str]) -> dict[str, float]:
    """Org -> when its output was stored (epoch s), for the orgs whose output is there."""
    jsz = monitor(server, "jsz?accounts=true&streams=true&limit=1000000")
    found = {}
    for account in jsz.get("account_details") or []:
        org = accounts.get(account.get("name", ""))
        for stream in account.get("stream_detail") or []:
            state = stream.get("state") or {}
            if org and stream.get("name") == Stream.EVENTS and state.get("messages", 0) >= 2:
                found[org] = stored_at(state["last_ts"])
    return found


async def wait_served(
    server: EmbeddedServer, processes: list[Process], fleet: Fleet, began: float, timeout: float
) -> bool:
    """Until every org's output is stored (True), a process exits, or ``timeout``."""
    accounts = {account_name(org): org for p in processes for org in p.orgs}
    wall, last_note = time.time() - (time.monotonic() - began), time.monotonic()
    while True:
        now = time.monotonic()
        if fleet.ready_s is None and all(p.serving() for p in processes):
            fleet.ready_s = now - began
        done = await asyncio.to_thread(outputs, server, accounts)
        fleet.served = len(done)
        if len(done) == len(accounts):
            fleet.serve_s = max(done.values()) - wall
            return True
        exited = [p for p in processes if p.popen.poll() is not None]
        if exited or now - began > timeout:
            for k, p in enumerate(processes):
                mine = sum(org in done for org in p.orgs)
                code = p.popen.poll()
                state = f"exited with {code}" if code is not None else "running"
                fleet.problems.append(
                    f"process {k} ({state}): {mine} of its {len(p.orgs)} orgs served after "
                    f"{now - began:.0f} s; its log ends:\n{p.tail()}"
                )
            return False
        if now - last_note > 15:
            last_note = now
            ready = sum(p.serving() for p in processes)
            note(f"  {len(done)} of {len(accounts)} orgs served; {ready} processes serving")
        await asyncio.sleep(1.0)


def stop(processes: list[Process], fleet: Fleet) -> None:
    """SIGTERM every process, then wait for each (SIGKILL after 60 s)."""
    for p in processes:
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for k, p in enumerate(processes):
        try:
            p.popen.wait(60)
        except subprocess.TimeoutExpired:
            fleet.problems.append(f"process {k} did not exit within 60 s of SIGTERM; killed")
            p.popen.kill()
            p.popen.wait()
        fleet.exits.append(p.popen.returncode)
        if p.popen.returncode != 0:
            fleet.problems.append(f"process {k} exited with {p.popen.returncode}:\n{p.tail()}")


def summed(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v or 0.0 for v in values)


async def run_fleet(
    server: EmbeddedServer,
    path: Path,
    orgs: list[str],
    fleet: Fleet,
    args: argparse.Namespace,
    work: Path,
    *,
    password: str,
) -> None:
    """Measure ``fleet.processes`` worker processes serving ``orgs`` (problems in ``fleet``);
    each org's user is named after it, with ``password``."""
    n, count = len(orgs), fleet.processes
    note(f"N={n} orgs: one event to each trigger, then {count} worker processes")
    slots, began = asyncio.Semaphore(AT_ONCE), time.monotonic()

    async def trigger(org: str) -> None:
        async with slots:
            await publish_trigger(server.url, path, org, password)

    try:
        async with asyncio.TaskGroup() as group:
            for org in orgs:
                group.create_task(trigger(org))
    except Exception as exc:
        first = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
        fleet.problems.append(f"publishing the triggers failed: {first}")
        return
    fleet.publish_s = time.monotonic() - began
    processes: list[Process] = []
    try:
        began = time.monotonic()
        for k in range(count):
            mine, log = orgs[k::count], work / f"fleet-{k}.log"
            processes.append(Process(mine, log, start(server.url, path, mine, log)))
        served = await wait_served(server, processes, fleet, began, args.fleet_timeout)
        each = [rss_mb(p.popen.pid) for p in processes]
        fleet.workers_rss_each_mb, fleet.workers_rss_mb = each, summed(each)
        if not served:
            return
        note(f"N={n} orgs: served after {fleet.serve_s:.1f} s by {count} processes")
        cold = Settings().idle_cold_s + SETTLE_S + COLD_MARGIN_S
        note(f"N={n} orgs: {cold:.0f} s for steps to go cold, then idle {args.idle:.0f} s")
        await asyncio.sleep(cold)
        await measure_idle(server, processes, fleet, args.idle)
    finally:
        if processes:
            note(f"N={n} orgs: stopping the {count} worker processes (SIGTERM)")
            await asyncio.to_thread(stop, processes, fleet)


async def measure_idle(
    server: EmbeddedServer, processes: list[Process], fleet: Fleet, seconds: float
) -> None:
    assert server.process is not None
    pids = [p.popen.pid for p in processes]
    workers, own = [cpu_seconds(pid) for pid in pids], cpu_seconds(server.process.pid)
    began = time.monotonic()
    await asyncio.sleep(seconds)
    took = time.monotonic() - began
    used = sum(cpu_seconds(pid) - before for pid, before in zip(pids, workers, strict=True))
    fleet.workers_idle_cpu_pct = used / took * 100
    fleet.server_idle_cpu_pct = (cpu_seconds(server.process.pid) - own) / took * 100
    fleet.workers_idle_rss_mb = summed([rss_mb(pid) for pid in pids])
    fleet.server_rss_mb = rss_mb(server.process.pid)
    fleet.connections = monitor(server, "varz").get("connections")


def fleet_cells(f: Fleet) -> dict[str, str]:
    """The fleet's columns of the orgs table."""
    rss = fmt(f.workers_rss_mb, ",.0f", " MB")
    if f.workers_idle_rss_mb is not None:
        rss += f" ({f.workers_idle_rss_mb:,.0f} MB)"
    return {
        "worker processes": str(f.processes),
        "ready / serving": f"{fmt(f.ready_s, unit=' s')} / {fmt(f.serve_s, unit=' s')}",
        "workers RSS": rss,
        "idle CPU: workers / server": (
            f"{fmt(f.workers_idle_cpu_pct, unit='%')} / {fmt(f.server_idle_cpu_pct, unit='%')}"
        ),
        "server RSS (fleet idle)": fmt(f.server_rss_mb, ",.0f", " MB"),
    }
