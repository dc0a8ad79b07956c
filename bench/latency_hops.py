"""Where a 3-step event's latency goes: the server's timestamps of every hop.

One ``deadlift worker --processes 1`` on the bench's 3-step chain, 300 events at
100/s. Each event's trigger and each step's output are stored with the server's
time, so every hop (a step's stored input → its stored output) is measured on
one clock. From the repository root::

    .venv/bin/python bench/latency_hops.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from deadlift.model.topology import Stream
from deadlift.ops import benchmark
from deadlift.ops.bench_gate import serving
from deadlift.ops.bench_support import Processes, worker_command, worker_env
from deadlift.ops.server import EmbeddedServer
from deadlift.wire import events

EVENTS, RATE = 300, 100.0
ON_THE_WAY = [
    ("publish → stored", None, benchmark.TRIGGER),
    ("step s0", benchmark.TRIGGER, "deadlift.step.bench.bench.s1"),
    ("step s1", "deadlift.step.bench.bench.s1", "deadlift.step.bench.bench.s2"),
    ("step s2", "deadlift.step.bench.bench.s2", benchmark.OUTPUT),
]


def run_of(msg: Any) -> str:
    return events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-").run


async def main() -> None:
    with EmbeddedServer() as server:
        nc, _ = await benchmark._setup(server, 3)
        js = nc.jetstream()
        sent: dict[str, float] = {}
        arrived: dict[str, float] = {}

        async def on_output(msg: Any) -> None:
            arrived[run_of(msg)] = time.time()

        await nc.subscribe(benchmark.OUTPUT, cb=on_output)
        with Processes([worker_command(1)], worker_env(server.url)) as workers:
            await serving(nc, lambda: 1, workers.check)
            began = time.perf_counter()
            for n in range(EVENTS):
                event = events.new_event({"value": n}, source="bench", type="bench")
                headers, body = events.encode(event)
                headers[events.MSG_ID] = event.id
                sent[event.id] = time.time()
                await js.publish(benchmark.TRIGGER, body, headers=headers)
                await asyncio.sleep(max(0.0, began + (n + 1) / RATE - time.perf_counter()))
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
        values.sort()
        p50, p90 = statistics.median(values) * 1000, values[int(len(values) * 0.9)] * 1000
        print(f"{name:22s} n={len(values)}  p50 {p50:.2f} ms  p90 {p90:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
