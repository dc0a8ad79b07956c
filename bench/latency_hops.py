"""Where a 3-step event's latency goes: the server's timestamps of every hop.

One ``deadlift worker --processes 1`` on the bench's 3-step chain, 300 events at
100/s. Each event's trigger and each step's output are stored with the server's
time, so every hop (a step's stored input → its stored output) is measured on
one clock. From the repository root::

    .venv/bin/python bench/latency_hops.py            # the hops
    .venv/bin/python bench/latency_hops.py --trace    # and inside each step

``--trace`` loads ``bench/hoptrace/sitecustomize.py`` into the worker, which
stamps every event on its way through a step (delivery read, queued, fetched,
batch, module thread in and out, Extism call, back on the loop, published,
written, PubAck, ack); the stamps are time.time(), the server's clock here. The
tracing costs a few µs per stamp: compare traced runs with traced runs.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from deadlift.model.topology import Stream
from deadlift.ops import benchmark
from deadlift.ops.bench_gate import serving
from deadlift.ops.bench_support import Processes, worker_command, worker_env
from deadlift.ops.server import EmbeddedServer
from deadlift.wire import events

EVENTS, RATE = 300, 100.0
S1, S2 = "deadlift.step.bench.bench.s1", "deadlift.step.bench.bench.s2"
ON_THE_WAY = [
    ("publish → stored", None, benchmark.TRIGGER),
    ("step s0", benchmark.TRIGGER, S1),
    ("step s1", S1, S2),
    ("step s2", S2, benchmark.OUTPUT),
]
NEXT = {benchmark.TRIGGER: S1, S1: S2, S2: benchmark.OUTPUT}
TRACER = Path(__file__).resolve().parent / "hoptrace"
# A step's stamps in order, to the server's timestamp of its output (see --trace).
INSIDE = (
    *("srv_in", "read", "queued", "fetched", "batch", "submit", "thread_in", "plugin_in"),
    *("plugin_out", "thread_out", "back", "publish", "published", "written", "srv_out"),
)


def run_of(msg: Any) -> str:
    return events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-").run


def show(name: str, values: list[float]) -> None:
    values.sort()
    p50, p90 = statistics.median(values) * 1000, values[int(len(values) * 0.9)] * 1000
    print(f"{name:26s} n={len(values)}  p50 {p50:.3f} ms  p90 {p90:.3f} ms")


async def main(trace: bool) -> None:
    prefix = tempfile.mktemp(prefix="deadlift-hoptrace-")
    extra = {}
    if trace:
        path = os.pathsep.join(p for p in (str(TRACER), os.environ.get("PYTHONPATH")) if p)
        extra = {"PYTHONPATH": path, "DEADLIFT_HOPTRACE": prefix}
    with EmbeddedServer() as server:
        nc, _ = await benchmark._setup(server, 3)
        js = nc.jetstream()
        sent: dict[str, float] = {}
        arrived: dict[str, float] = {}

        async def on_output(msg: Any) -> None:
            arrived[run_of(msg)] = time.time()

        await nc.subscribe(benchmark.OUTPUT, cb=on_output)
        with Processes([worker_command(1)], worker_env(server.url, **extra)) as workers:
            await serving(nc, lambda: 1, workers.check)
            # time.time(): the server's clock on this machine, as its timestamps.
            await benchmark.publish_paced(js, EVENTS, RATE, sent, clock=time.time)
            await asyncio.sleep(2)
        stored: dict[str, dict[str, float]] = {}
        for stream in (Stream.EVENTS, Stream.STEPS):
            info = await js.stream_info(stream)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                stored.setdefault(run_of(msg), {})[msg.subject] = msg.time.timestamp()
        await nc.close()
    hops: dict[str, list[float]] = {name: [] for name, _, _ in ON_THE_WAY}
    hops["stored → subscriber"], hops["total"] = [], []
    for run, at in sent.items():
        times = {None: at, **stored.get(run, {})}
        if not all(end in times for _, _, end in ON_THE_WAY) or run not in arrived:
            continue
        for name, start, end in ON_THE_WAY:
            hops[name].append(times[end] - times[start])
        hops["stored → subscriber"].append(arrived[run] - times[benchmark.OUTPUT])
        hops["total"].append(arrived[run] - at)
    for name, values in hops.items():
        show(name, values)
    if trace:
        inside(prefix, stored)


def inside(prefix: str, stored: dict[str, dict[str, float]]) -> None:
    """Each step's time between its stamps, every step together (see ``--trace``)."""
    parts: dict[str, list[float]] = {}
    for path in glob.glob(f"{prefix}.*"):
        with open(path) as lines:
            for line in lines:
                stamps = json.loads(line)
                output = stored.get(stamps.get("run", ""), {}).get(NEXT.get(stamps["subject"], ""))
                if output is None or stamps.get("srv_in") is None:
                    continue
                stamps["srv_out"] = output
                stamps.setdefault("written", stamps.get("published"))
                known = [name for name in INSIDE if stamps.get(name) is not None]
                for a, b in itertools.pairwise(known):
                    parts.setdefault(f"{a} → {b}", []).append(stamps[b] - stamps[a])
                for a, b in (("srv_out", "puback"), ("puback", "acked")):
                    if stamps.get(b) is not None:
                        parts.setdefault(f"{a} → {b}", []).append(stamps[b] - stamps[a])
        os.unlink(path)
    print("inside a step (every step):")
    for name, values in parts.items():
        show("  " + name, values)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", action="store_true", help="stamp every event inside a step")
    asyncio.run(main(parser.parse_args().trace))
