"""Scale benchmark (issue 15): N workflows of 3 steps in one org and one worker process.

Each N gets a fresh nats-server (single-tenant, temp store); ``add_ten.wasm`` is
pushed once; N workflows ``w0``..``wN-1`` (org ``bench``, trigger ``bench.w{i}.in``,
add_ten -> add_ten -> add_ten, the last step publishing ``bench.w{i}.out``) are
applied in ONE ``apply_workflows`` call; then a real ``deadlift worker`` runs. Columns:

apply (all)           wall time of that one ``apply_workflows`` call.
worker start          from spawning the worker until the event published to EVERY
                      trigger right after the spawn has come out on every
                      ``bench.w{i}.out`` (it serves every workflow); in brackets,
                      until its log said ``started`` for all 3N steps.
settle                then until the worker's CPU over two consecutive 2 s windows is
                      steady (within 2 points or 25 %) and under 90 % of a core: the
                      reconcile after start is over (4 s at the least).
idle CPU (worker)     its user+system CPU (``/proc/PID/stat``) over 10 s of no
                      traffic, in % of one core, once idle steps have gone cold
                      (``idle_cold_s`` + 3 s after the CPU settled).
idle pull requests/s  messages its connection (``deadlift-worker``) sent the server
                      per second over those 10 s (``/connz`` ``in_msgs``): idle, its
                      pull requests. The JSON also has the server's ``/varz`` total.
3-step p50 / p90      200 events at 50/s to ``w0`` only, the other N-1 idle: from just
                      before the publish to the output's arrival on a core
                      subscription to ``bench.w0.out`` (matched by run id).
worker RSS            its ``VmRSS`` after the idle window.
busy w0               then ``--busy`` events (5,000) to ``w0`` as fast as they are acked,
                      the other N-1 idle: events/s from the first publish to the last
                      output (``scale_busy.py``). Issue 15 wants N=1,000 at least 80 %
                      of N=1: with both in one run, the ratio is printed under the table.

``--start-only`` stops after *worker start* and notes where the CPU went meanwhile
(each worker thread's, the server's, the whole machine's: on a shared machine a busy
neighbour shows there), the JetStream API requests, the messages the server took in,
and when 10/50/90/99 % of the workflows were served. ``--profile FILE`` records the
worker with ``py-spy`` from its spawn until it serves (``.json``: speedscope;
``BENCH_PYSPY=--gil``: only the thread holding the GIL). ``--worker-code DIR`` runs
the worker from another copy of the package (``DIR/deadlift``), to compare two
versions in interleaved runs.

``--orgs N[,N…]`` measures what orgs cost the server instead (``scale_orgs.py``), then
``--worker-processes P`` (default 4; 0: not) worker processes serving them
(``scale_fleet.py``).

Every phase has a timeout; one that runs out is listed under the table (``not
serving after X s (k of N workflows, s of 3N steps started)``) and the rest of that
N is skipped. The worker is stopped with SIGTERM (SIGKILL after 60 s), the server
when its N is done. From the repository root (table on stdout, progress on stderr)::

    .venv/bin/python bench/scale.py --workflows 1,100,300,1000 [--json] [--out FILE]
    .venv/bin/python bench/scale.py --workflows 1000 --start-only [--profile /tmp/w.json]
    .venv/bin/python bench/scale.py --orgs 10,100,1000 [--worker-processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from scale_busy import BUSY, busy_rate
from scale_common import (
    ROOT,
    STEPS,
    TICK,
    WASM,
    cpu_seconds,
    fmt,
    monitor,
    note,
    rss_mb,
    table,
    workflow_yaml,
)
from scale_orgs import org_cells, run_orgs

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.pulling import SETTLE_S
from deadlift.settings import Settings
from deadlift.wire import events

STARTED = re.compile(r"started workflow \S+ step \S+ \(module ")
STARTED_MANY = re.compile(r"started (\d+) step\(s\) of \d+ workflow")  # the start's summary


@dataclass
class Row:
    """What one N of workflows measured; None where a phase did not run."""

    workflows: int
    apply_s: float | None = None
    start_s: float | None = None
    steps_started_s: float | None = None
    served_s: list[float] = field(default_factory=list)  # 10/50/90/99 % of workflows served
    settle_s: float | None = None
    idle_cpu_pct: float | None = None
    idle_worker_msgs_per_s: float | None = None
    idle_server_msgs_per_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    latency_lost: int = 0
    worker_rss_mb: float | None = None
    busy_per_s: float | None = None  # w0 alone busy, the others idle (scale_busy.py)
    server_rss_mb: float | None = None
    worker_stop_s: float | None = None
    worker_exit: int | None = None
    load_avg: list[float] = field(default_factory=list)  # 1-min, at the start and the end
    problems: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.workflows


# -- the worker process and the server ---------------------------------------


def in_msgs(server: EmbeddedServer) -> tuple[int, int]:
    """Messages sent to the server: by ``deadlift-worker`` connections, and in all."""
    conns = monitor(server, "connz?limit=100000").get("connections") or []
    worker = sum(c.get("in_msgs", 0) for c in conns if c.get("name") == "deadlift-worker")
    return worker, int(monitor(server, "varz").get("in_msgs", 0))


def steps_started(log: Path) -> int:
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace")
        return len(STARTED.findall(text)) + sum(int(n) for n in STARTED_MANY.findall(text))
    return 0


def start_worker(url: str, log: Path, code: Path = ROOT) -> subprocess.Popen[bytes]:
    """A ``deadlift worker`` process, as an operator starts one, logging to ``log``.

    ``code``: the directory whose ``deadlift`` package it runs (its working directory
    comes first on ``sys.path``): another copy compares two versions in turn.
    """
    with open(log, "ab") as out:
        return subprocess.Popen(
            # One process (issue 15 measures one): the default would run one per core.
            [sys.executable, "-m", "deadlift.cli", "--server", url, "worker", "--processes", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=code,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # a Ctrl-C is for the bench, which stops it
        )


def stop_worker(process: subprocess.Popen[bytes], row: Row) -> None:
    """SIGTERM and wait (SIGKILL after 60 s); record how long and the exit code."""
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        row.problems.append("worker did not exit within 60 s of SIGTERM; killed")
        process.kill()
        process.wait()
    row.worker_stop_s, row.worker_exit = time.monotonic() - began, process.returncode


def profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of the worker (every thread, idle too; not pausing it) until stopped."""
    spy = Path(sys.executable).with_name("py-spy")
    form = ["--format", "speedscope"] if out.suffix == ".json" else []
    # BENCH_PYSPY="--gil": only the thread holding the GIL (default --idle: every one).
    how = ["--nonblocking", "--threads", "--rate", "100"]
    how += os.environ.get("BENCH_PYSPY", "--idle").split()
    return subprocess.Popen(
        [str(spy), "record", *how, "-o", str(out), *form, "--pid", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def thread_cpu(pid: int) -> list[float]:
    """User + system CPU seconds of the threads of ``pid`` (the main thread first)."""
    seconds: list[float] = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda t: int(t.name)):
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            seconds.append(round((int(fields[11]) + int(fields[12])) / TICK, 2))
    return seconds


def machine_busy() -> tuple[float, float]:
    """CPU seconds the machine was busy, and in all (every core), since boot."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / TICK, sum(ticks) / TICK


def stop_profile(profiler: subprocess.Popen[bytes]) -> None:
    """End the recording (SIGINT: py-spy writes its file) and wait for the file."""
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


# -- the workflow phases ------------------------------------------------------------------------


class Outputs:
    """Arrival times of outputs on ``bench.*.out``, by run id."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        now = time.monotonic()
        event = events.decode(msg.headers, msg.data or b"", fallback_id="-", fallback_source="-")
        self.arrived.setdefault(event.run, now)
        self.changed.set()

    async def wait(self, ids: list[str], timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not all(i in self.arrived for i in ids):
                    self.changed.clear()
                    await self.changed.wait()


async def publish(publisher: bus.JetStreamPublisher, subject: str, event_id: str) -> None:
    event = events.new_event({"value": 0}, source="deadlift://bench", type="bench.in", id=event_id)
    headers, body = events.encode(event)
    await publisher.publish(subject, body, headers, msg_id=event_id)


async def wait_serving(
    n: int, process: subprocess.Popen[bytes], log: Path, outputs: Outputs, row: Row, timeout: float
) -> bool:
    """Until every start event's output arrived (True), the worker exits or ``timeout``."""
    began = last_note = time.monotonic()
    ids = [f"start-{i}" for i in range(n)]
    while True:
        now = time.monotonic()
        if row.steps_started_s is None and steps_started(log) >= n * STEPS:
            row.steps_started_s = now - began
        done = sum(i in outputs.arrived for i in ids)
        if done == n:
            row.start_s = max(outputs.arrived[i] for i in ids) - began
            served = sorted(outputs.arrived[i] - began for i in ids)
            row.served_s = [round(served[int(q * (n - 1))], 2) for q in (0.1, 0.5, 0.9, 0.99)]
            return True
        progress = f"{done} of {n} workflows, {{}} of {n * STEPS} steps started"
        if process.poll() is not None or now - began > timeout:
            code = process.poll()
            exited = f", worker exited with {code}" if code is not None else ""
            progress = progress.format(steps_started(log))
            row.problems.append(f"not serving after {now - began:.0f} s ({progress}{exited})")
            return False
        if now - last_note > 15:
            last_note = now
            note("  " + progress.format(steps_started(log)))
        await asyncio.sleep(0.05)


async def settle(pid: int, timeout: float, window: float = 2.0) -> float | None:
    """Seconds until the worker's CPU is steady (see the module docstring); None: never."""
    began, previous = time.monotonic(), None
    while time.monotonic() - began < timeout:
        before = cpu_seconds(pid)
        await asyncio.sleep(window)
        pct = (cpu_seconds(pid) - before) / window * 100
        if previous is not None and pct < 90 and abs(pct - previous) <= max(2.0, previous / 4):
            return time.monotonic() - began
        previous = pct
    return None


async def measure_idle(server: EmbeddedServer, pid: int, row: Row, seconds: float) -> None:
    cpu, (worker, total), began = cpu_seconds(pid), in_msgs(server), time.monotonic()
    await asyncio.sleep(seconds)
    (worker_after, total_after), took = in_msgs(server), time.monotonic() - began
    row.idle_cpu_pct = (cpu_seconds(pid) - cpu) / took * 100
    row.idle_worker_msgs_per_s = (worker_after - worker) / took
    row.idle_server_msgs_per_s = (total_after - total) / took


async def measure_latency(
    publisher: bus.JetStreamPublisher, outputs: Outputs, row: Row, count: int, rate: float
) -> None:
    sent: dict[str, float] = {}
    began = time.monotonic()
    for k in range(count):
        await asyncio.sleep(max(0.0, began + k / rate - time.monotonic()))
        sent[f"lat-{k}"] = time.monotonic()
        await publish(publisher, "bench.w0.in", f"lat-{k}")
    await outputs.wait(list(sent), 30.0)
    took = sorted((outputs.arrived[i] - t) * 1000 for i, t in sent.items() if i in outputs.arrived)
    row.latency_lost = count - len(took)
    if len(took) >= 2:
        row.p50_ms = statistics.median(took)
        row.p90_ms = statistics.quantiles(took, n=10, method="inclusive")[8]


async def run_workflows(n: int, args: argparse.Namespace, work: Path) -> Row:
    row = Row(workflows=n, load_avg=[os.getloadavg()[0]])
    with EmbeddedServer(store_dir=work / "store") as server:
        settings = Settings(nats_url=server.url)
        nc = await bus.connect(settings, name="deadlift-bench-scale")
        process: subprocess.Popen[bytes] | None = None
        try:
            js = nc.jetstream()
            registry = await Registry.open(js)
            await push_module_file(registry, WASM, name="add_ten")
            loaded = [
                (parse_workflow(workflow_yaml(f"w{i}", "bench", f"bench.w{i}")), f"w{i}.yaml")
                for i in range(n)
            ]
            note(f"N={n}: applying {n} workflows in one call")
            began = time.monotonic()
            try:
                apply = apply_workflows(js, registry, settings, loaded)
                await asyncio.wait_for(apply, args.apply_timeout)
            except Exception as exc:  # reported; the next N still runs
                why = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
                row.problems.append(f"apply {why} after {time.monotonic() - began:.0f} s")
                return row
            row.apply_s = time.monotonic() - began
            note(f"N={n}: applied in {row.apply_s:.1f} s; starting the worker")
            outputs = Outputs()
            await nc.subscribe("bench.*.out", cb=outputs.on_msg, pending_msgs_limit=1_000_000)
            await nc.flush()
            publisher = bus.JetStreamPublisher(nc, timeout=10.0)
            log = work / "worker.log"
            process = start_worker(server.url, log, args.worker_code)
            profiler = profile(process.pid, args.profile) if args.profile else None
            server_pid = server.process.pid if server.process else os.getpid()
            machine, server_cpu = machine_busy(), cpu_seconds(server_pid)
            api, msgs = monitor(server, "jsz").get("api", {}).get("total", 0), in_msgs(server)[1]
            for first in range(0, n, 100):  # acked in batches of 100
                batch = range(first, min(first + 100, n))
                await asyncio.gather(
                    *(publish(publisher, f"bench.w{i}.in", f"start-{i}") for i in batch)
                )
            serving = await wait_serving(n, process, log, outputs, row, args.start_timeout)
            row.worker_rss_mb = rss_mb(process.pid)
            if profiler is not None:
                stop_profile(profiler)
            busy = machine_busy()
            note(
                f"N={n}: CPU s when serving: worker's threads {thread_cpu(process.pid)}, "
                f"server {cpu_seconds(server_pid) - server_cpu:.1f}, "
                f"machine {busy[0] - machine[0]:.1f} of {busy[1] - machine[1]:.1f}; JetStream API "
                f"requests {monitor(server, 'jsz').get('api', {}).get('total', 0) - api:,}, "
                f"messages in {in_msgs(server)[1] - msgs:,}; 10/50/90/99 % of the workflows "
                f"served after {row.served_s} s"
            )
            if not serving or args.start_only:
                return row
            note(f"N={n}: serving after {row.start_s:.1f} s; waiting for the CPU to settle")
            row.settle_s = await settle(process.pid, args.settle_timeout)
            if row.settle_s is None:
                row.problems.append(f"worker CPU not steady after {args.settle_timeout:.0f} s")
            # Idle steps go cold after idle_cold_s (no pull requests): measure that state,
            # the one a host's mostly idle workflows are in.
            cold_after = settings.idle_cold_s + SETTLE_S + 2.0
            note(f"N={n}: {cold_after:.0f} s for steps to go cold, then idle {args.idle:.0f} s")
            await asyncio.sleep(cold_after)
            await measure_idle(server, process.pid, row, args.idle)
            row.worker_rss_mb = rss_mb(process.pid)
            row.server_rss_mb = rss_mb(server.process and server.process.pid)
            note(f"N={n}: latency, {args.events} events at {args.rate:g}/s to w0")
            await measure_latency(publisher, outputs, row, args.events, args.rate)
            if args.busy:
                note(f"N={n}: {args.busy:,} events to w0 as fast as they are acked")
                row.busy_per_s, lost = await busy_rate(
                    lambda subject, i: publish(publisher, subject, i), outputs, args.busy
                )
                if lost:
                    row.problems.append(f"busy w0: {lost} of {args.busy} outputs missing")
            return row
        finally:
            if process is not None and process.poll() is None:
                note(f"N={n}: stopping the worker (SIGTERM)")
                await asyncio.to_thread(stop_worker, process, row)
            row.worker_exit = process and process.returncode
            if process is not None and process.returncode != 0:
                tail = (work / "worker.log").read_text(errors="replace")[-1500:]
                row.problems.append(f"worker exited with {process.returncode}; log ends:\n{tail}")
            with contextlib.suppress(Exception):
                await nc.close()
            row.load_avg.append(os.getloadavg()[0])


# -- output ---------------------------------------------------------------------------------------


def workflow_cells(r: Row) -> dict[str, str]:
    latency = f"{fmt(r.p50_ms)} / {fmt(r.p90_ms)} ms" if r.p50_ms is not None else "—"
    rate = r.idle_worker_msgs_per_s
    return {
        "workflows": f"{r.workflows:,}",
        "apply (all)": fmt(r.apply_s, unit=" s"),
        "worker start": fmt(r.start_s, unit=" s")
        + (f" ({r.steps_started_s:.1f} s)" if r.steps_started_s is not None else ""),
        "settle": fmt(r.settle_s, unit=" s"),
        "idle CPU (worker)": fmt(r.idle_cpu_pct, unit="%"),
        "idle pull requests/s": fmt(rate, ",.1f" if rate is not None and rate < 10 else ",.0f"),
        "3-step p50 / p90": latency + (f" ({r.latency_lost} lost)" if r.latency_lost else ""),
        "worker RSS": fmt(r.worker_rss_mb, ",.0f", " MB"),
        "busy w0": fmt(r.busy_per_s, ",.0f", "/s"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--workflows", default="1,100,300", help="comma-separated Ns")
    parser.add_argument("--orgs", help="comma-separated numbers of orgs (instead of workflows)")
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=4,
        help="with --orgs: worker processes serving the orgs after the apply (0: none)",
    )
    parser.add_argument(
        "--fleet-timeout", type=float, default=900.0, help="with --orgs: seconds to serve all"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--apply-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--settle-timeout", type=float, default=180.0, help="seconds")
    parser.add_argument(
        "--idle", type=float, default=10.0, help="idle window, seconds (>= DEADLIFT_IDLE_PULL_S)"
    )
    parser.add_argument(
        "--worker-code",
        type=Path,
        default=ROOT,
        help="run the worker from this directory's deadlift package (e.g. an older copy)",
    )
    parser.add_argument(
        "--start-only",
        action="store_true",
        help="stop once the worker serves every workflow (the start's figures only)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy record the worker from its spawn until it serves (.svg; .json: speedscope)",
    )
    parser.add_argument(
        "--busy", type=int, default=BUSY, help="events to w0 for its busy rate (0: not measured)"
    )
    parser.add_argument("--events", type=int, default=200, help="latency events")
    parser.add_argument("--rate", type=float, default=50.0, help="latency events per second")
    args = parser.parse_args(argv)
    try:
        args.ns = [int(n) for n in (args.orgs or args.workflows).split(",") if n.strip()]
    except ValueError:
        parser.error("--workflows and --orgs take comma-separated integers, e.g. 1,100,300")
    if not args.ns or min(args.ns) < 1 or args.events < 2 or args.rate <= 0:
        parser.error("Ns must be positive, --events at least 2, --rate positive")
    if args.worker_processes < 0:
        parser.error("--worker-processes must be 0 or more")
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run: Callable[..., Any] = run_orgs if args.orgs else run_workflows
    cells: Callable[..., dict[str, str]] = org_cells if args.orgs else workflow_cells
    rows: list[Any] = []
    for n in args.ns:
        with tempfile.TemporaryDirectory(prefix="deadlift-scale-") as work:
            rows.append(await run(n, args, Path(work)))
        note(f"N={n} done: " + " | ".join(cells(rows[-1]).values()))
    result = [asdict(r) for r in rows]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    problems = [f"N={r.n}: {p}" for r in rows for p in r.problems]
    print(json.dumps(result, indent=2) if args.json else table([cells(r) for r in rows], problems))
    alone = next((r.busy_per_s for r in rows if not args.orgs and r.n == 1), None)
    for r in rows if alone and not args.json else []:
        if r.n > 1 and r.busy_per_s:
            print(f"busy w0 with {r.n - 1:,} idle workflows: {r.busy_per_s / alone:.0%} of N=1")
    return 1 if problems else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
    sys.exit(130)
