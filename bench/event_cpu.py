"""CPU per event of the bare loop and of one ``deadlift worker --processes 1``, in pairs.

Each run is timed as ``deadlift bench`` times it (a fresh server, the backlog stored
first, the window opened once the process is pulling) and also reads the CPU time
the process and nats-server used inside the window (``/proc/PID/stat``), per event.
``bench`` is the benchmark's own CPU per event (it polls the output count): the
same work in every run, so it shows how fast the machine was at the time.

    python bench/event_cpu.py --events 20000 --pairs 6
    python bench/event_cpu.py --scenarios one --pairs 12   # e.g. an A/B with --env

The worker runs from the current directory's ``deadlift`` (``python -m`` imports it
from there first): run it from another checkout to compare code trees.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deadlift import bus
from deadlift.ops import bench_bare
from deadlift.ops import benchmark as bench
from deadlift.ops.bench_gate import Gate, finished_at, hold, pulling, release
from deadlift.ops.bench_support import (
    Processes,
    prefill,
    stored,
    until,
    worker_command,
    worker_env,
)
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def run(kind: str, count: int, env: dict[str, str]) -> dict[str, float]:
    """One timed run of ``kind`` (``bare`` or ``one``): events/s and CPU µs per event."""
    with EmbeddedServer() as server:
        processes: Callable[[Processes], int]
        if kind == "bare":
            nc: Any = await bus.connect(Settings(nats_url=server.url), name="bench-cpu")
            js = nc.jetstream()
            await bench_bare.setup(js)
            gate = bench_bare.GATE
            await hold(js, gate)
            await prefill(js, bench_bare.INPUT, count)
            command = bench_bare.command(server.url, count)
            processes = lambda _: 1  # noqa: E731
        else:
            nc, workflow = await bench._setup(server, 1)
            js = nc.jetstream()
            gate = Gate.of(workflow, bench.OUTPUT)
            await hold(js, gate)
            await prefill(js, bench.TRIGGER, count)
            command = worker_command(1)
            processes = lambda w: bench._pulling_processes(w, [1])  # noqa: E731
        assert server.process is not None
        with Processes([command], worker_env(server.url, **env)) as workers:
            await pulling(js, gate.pulls, lambda: processes(workers), workers.check)
            pid, spid = workers.pids[0], server.process.pid
            before = cpu_s(pid), cpu_s(spid), time.process_time()
            opened = await release(js, gate)

            async def done() -> bool:
                workers.check()
                return await stored(js, gate.output, gate.output_stream) >= count

            await until(done, 600, every=0.05)
            after = cpu_s(pid), cpu_s(spid), time.process_time()
            seconds = await finished_at(js, gate) - opened
        await nc.drain()
    per_event = [1e6 * (b - a) / count for a, b in zip(before, after, strict=True)]
    return {"rate": count / seconds, "client": per_event[0], "server": per_event[1],
            "bench": per_event[2]}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--scenarios", default="bare,one", help="comma-separated: bare, one")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for the processes (repeatable)"
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    kinds = args.scenarios.split(",")
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.pairs):
        for kind in kinds:
            r = await run(kind, args.events, env)
            results[kind].append(r)
            print(
                f"{kind:5s} {r['rate']:7,.0f}/s  client {r['client']:6.1f} µs/event  "
                f"nats-server {r['server']:5.1f} µs/event  bench {r['bench']:4.1f}",
                flush=True,
            )
    for kind, rows in results.items():
        print(
            f"median {kind}: {statistics.median(r['rate'] for r in rows):,.0f}/s, client "
            f"{statistics.median(r['client'] for r in rows):.1f} µs/event, nats-server "
            f"{statistics.median(r['server'] for r in rows):.1f} µs/event"
        )
    if "bare" in results and "one" in results:
        ratios = sorted(
            o["rate"] / b["rate"] for b, o in zip(results["bare"], results["one"], strict=True)
        )
        print(f"one / bare, per pair: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    asyncio.run(main())
