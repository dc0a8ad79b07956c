"""``deadlift bench``: Deadlift's throughput and latency against two baselines, in one run.

Scenarios (each run on its own embedded nats-server, file store, one tiny module):

* **bare loop** — the baseline to beat: a plain nats-py pull consumer → Extism
  call → ``publish_async`` with ``Nats-Msg-Id`` → await the PubAcks → ack,
  written without Deadlift (:mod:`deadlift.ops.bench_bare`);
* **per-message instantiation** — the same loop creating an Extism plugin per
  message, as the original Deadlift proof of concept did;
* **deadlift worker** with default settings (one process per core), **deadlift
  worker --processes 1**, and **two** ``--processes 1`` processes started by hand,
  each on a 1-step workflow; **3 steps**, a 3-step chain;
* **3-step latency at 100 events/s** — end-to-end p50 / p99;
* **worker RSS with 20 modules loaded**;
* **1 step, guest module** against the same step with the host's own module, on a
  server with accounts: the cost of run records (:mod:`deadlift.ops.bench_guest`).

Every worker is the real CLI process, and every throughput run is timed from
when all its processes are pulling to the server's timestamp of the last output,
with the backlog stored beforehand (:mod:`deadlift.ops.bench_gate`): processing,
not start-up, and nothing of the bench process's inside the window.

Scenarios compared are interleaved (:mod:`deadlift.ops.bench_pairs`): ``pairs``
rounds of bare loop / ``deadlift worker``, then of bare loop / ``--processes 1`` /
two processes, then of own / guest module; each ratio is the median of the
rounds' ratios, given with its spread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import extism

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops import bench_bare
from deadlift.ops.bench_gate import Gate, hold, serving, window
from deadlift.ops.bench_guest import guest_throughput
from deadlift.ops.bench_pairs import Comparison, Plan, Progress, compare, summary
from deadlift.ops.bench_support import (
    Processes,
    Result,
    prefill,
    rss_mb,
    stored,
    until,
    worker_children,
    worker_command,
    worker_env,
)
from deadlift.ops.bench_support import module_wasm as _wasm
from deadlift.ops.control import apply_workflows
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events

BARE = "bare loop"
PER_MESSAGE = "per-message instantiation"
DEFAULT = "deadlift worker"
ONE = "deadlift worker --processes 1"
TWO = "2 x deadlift worker --processes 1"
THREE_STEPS = "deadlift worker, 3 steps"
OWN = "1 step, own module (accounts)"
GUEST = "1 step, guest module + run records"
TRIGGER = "bench.in"
OUTPUT = "bench.out"


# -- baselines -------------------------------------------------------------------


async def bare_loop(count: int, *, per_message_plugin: bool = False) -> Result:
    """Events/s of the bare loop (:mod:`deadlift.ops.bench_bare`), a process of its own."""
    with EmbeddedServer() as server:
        nc = await bus.connect(Settings(nats_url=server.url), name="bench-bare")
        js = nc.jetstream()
        await bench_bare.setup(js)
        await hold(js, bench_bare.GATE)
        await prefill(js, bench_bare.INPUT, count)
        command = bench_bare.command(server.url, count, per_message=per_message_plugin)
        with Processes([command], worker_env(server.url)) as bare:
            seconds = await window(
                js, bench_bare.GATE, count=count, processes=lambda: 1, check=bare.check
            )
        await nc.drain()
    return Result(PER_MESSAGE if per_message_plugin else BARE, count, seconds)


# -- Deadlift ---------------------------------------------------------------------

CHAIN = """
name: bench
org: bench
trigger: bench.in
steps:
{steps}
"""


def _chain(length: int) -> str:
    lines = []
    for i in range(length):
        nxt = f", next: [s{i + 1}]" if i + 1 < length else f", publish: [{OUTPUT}]"
        lines.append(f"  - {{name: s{i}, module: add_ten, function: add_ten{nxt}}}")
    return CHAIN.format(steps="\n".join(lines))


async def _setup(server: EmbeddedServer, length: int) -> tuple[Any, Workflow]:
    settings = Settings(nats_url=server.url)
    nc = await bus.connect(settings, name="bench")
    registry = await Registry.open(nc.jetstream())
    await registry.push_module(_wasm(), name="add_ten")
    workflow = parse_workflow(_chain(length))
    await apply_workflows(nc.jetstream(), registry, settings, [(workflow, "bench.yaml")])
    return nc, workflow


def _pulling_processes(workers: Processes, specs: Sequence[int | None]) -> int:
    """How many processes pull: ``--processes 1`` is one; a supervisor, its children."""
    return sum(
        1 if spec == 1 else max(1, worker_children(pid))
        for spec, pid in zip(specs, workers.pids, strict=True)
    )


async def deadlift_throughput(
    count: int, *, steps: int = 1, processes: Sequence[int | None] = (None,), name: str = DEFAULT
) -> Result:
    """Events/s of ``deadlift worker`` processes on a chain of ``steps`` steps.

    ``processes`` lists the processes started by hand, each ``deadlift worker``
    with ``--processes N``, or with no flag (None: the default).
    """
    with EmbeddedServer() as server:
        nc, workflow = await _setup(server, steps)
        js = nc.jetstream()
        gate = Gate.of(workflow, OUTPUT)
        await hold(js, gate)
        await prefill(js, TRIGGER, count)
        commands = [worker_command(p) for p in processes]
        with Processes(commands, worker_env(server.url)) as workers:
            seconds = await window(
                js,
                gate,
                count=count,
                processes=lambda: _pulling_processes(workers, processes),
                check=workers.check,
            )
            running = _pulling_processes(workers, processes)
        await nc.drain()
    return Result(name, count, seconds, extra={"processes": running})


async def publish_paced(
    js: Any,
    count: int,
    rate: float,
    sent: dict[str, float],
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Publish ``count`` events to the trigger at ``rate``/s, each one's ``clock()`` in
    ``sent`` by event id; return when the first went (``time.perf_counter``)."""
    started = time.perf_counter()
    for n in range(count):
        event = events.new_event({"value": n}, source="bench", type="bench")
        headers, body = events.encode(event)
        headers[events.MSG_ID] = event.id
        sent[event.id] = clock()
        await js.publish(TRIGGER, body, headers=headers)
        await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))
    return started


async def deadlift_latency(
    count: int, *, rate: float = 100.0, steps: int = 3, processes: int | None = None
) -> Result:
    """End-to-end latency of a ``steps``-step chain at a steady ``rate`` of events/s."""
    with EmbeddedServer() as server:
        nc, _ = await _setup(server, steps)
        js = nc.jetstream()
        sent: dict[str, float] = {}
        latencies: list[float] = []

        async def on_output(msg: Any) -> None:
            event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
            latencies.append((time.perf_counter() - sent[event.run]) * 1000)

        await nc.subscribe(OUTPUT, cb=on_output)
        specs = [processes]
        with Processes([worker_command(processes)], worker_env(server.url)) as workers:
            await serving(nc, lambda: _pulling_processes(workers, specs), workers.check)
            started = await publish_paced(js, count, rate, sent)
            await until(lambda: _counted(latencies, count), timeout=30)
            seconds = time.perf_counter() - started
        await nc.drain()
    latencies.sort()
    return Result(
        f"deadlift worker, {steps} steps @ {rate:.0f}/s",
        count,
        seconds,
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )


async def _counted(values: list[float], count: int) -> bool:
    return len(values) >= count


def module_variant(wasm: bytes, index: int) -> bytes:
    """The same code with a different custom section: a distinct module (sha256)."""
    name = b"deadlift-bench"
    payload = bytes([len(name)]) + name + index.to_bytes(4, "little")
    return wasm + b"\x00" + _leb(len(payload)) + payload


def _leb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def worker_rss(modules: int = 20) -> Result:
    """Resident memory of one worker process (``--processes 1``) running ``modules`` modules."""
    wasm = _wasm()
    with EmbeddedServer() as server:
        settings = Settings(nats_url=server.url)
        nc = await bus.connect(settings, name="bench")
        registry = await Registry.open(nc.jetstream())
        flows = []
        for i in range(modules):
            variant = module_variant(wasm, i)
            await registry.push_module(variant, name=f"m{i}")
            flows.append(
                (
                    parse_workflow(
                        f"name: w{i}\norg: bench\ntrigger: rss.{i}\nsteps:\n"
                        f"  - {{name: s, module: m{i}, function: add_ten, "
                        f"publish: [rss.out.{i}]}}\n"
                    ),
                    f"w{i}.yaml",
                )
            )
        await apply_workflows(nc.jetstream(), registry, settings, flows)
        for i in range(modules):
            await prefill(nc.jetstream(), f"rss.{i}", 50)
        with Processes([worker_command(1)], worker_env(server.url)) as worker:
            js = nc.jetstream()

            async def all_out() -> bool:
                worker.check()
                return await stored(js, "rss.out.>") >= modules * 50

            await until(all_out, timeout=120, every=0.1)
            await asyncio.sleep(3.0)  # steady state: quiet steps give instances back
            rss = rss_mb(worker.pids[0])
        await nc.drain()
    return Result(f"worker RSS, {modules} modules", modules * 50, 0.0, extra={"rss_mb": rss})


# -- the run ---------------------------------------------------------------------


def runs(pairs: int) -> int:
    """How many runs :func:`run` makes with ``pairs`` rounds per comparison."""
    return 7 * pairs + 4


async def run(
    events_count: int = 20_000,
    latency_events: int = 500,
    *,
    pairs: int = 3,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every scenario, with ratios of interleaved pairs and the targets checked.

    ``progress``, if given, is called as each run starts and ends.
    """
    few = max(500, events_count // 20)
    wasm = _wasm()
    load_before = os.getloadavg()[0]
    plan = Plan(runs(pairs), progress)
    first = await plan.rounds(
        {BARE: lambda: bare_loop(events_count), DEFAULT: lambda: deadlift_throughput(events_count)},
        pairs,
    )
    second = await plan.rounds(
        {
            BARE: lambda: bare_loop(events_count),
            ONE: lambda: deadlift_throughput(events_count, processes=[1], name=ONE),
            TWO: lambda: deadlift_throughput(events_count, processes=[1, 1], name=TWO),
        },
        pairs,
    )
    three = await plan.once(
        THREE_STEPS, lambda: deadlift_throughput(events_count // 2, steps=3, name=THREE_STEPS)
    )
    latency = await plan.once(
        "deadlift worker, 3-step latency", lambda: deadlift_latency(latency_events)
    )
    per_message = await plan.once(PER_MESSAGE, lambda: bare_loop(few, per_message_plugin=True))
    rss = await plan.once("worker RSS, 20 modules", lambda: worker_rss(20))
    guests = await plan.rounds(
        {
            OWN: lambda: guest_throughput(events_count, guest=False, wasm=wasm),
            GUEST: lambda: guest_throughput(events_count, guest=True, wasm=wasm),
        },
        pairs,
    )
    pairs_of = {
        "deadlift worker / bare loop": compare(first[DEFAULT], first[BARE]),
        "deadlift worker --processes 1 / bare loop": compare(second[ONE], second[BARE]),
        "2 processes / 1 process": compare(second[TWO], second[ONE]),
        "guest module (run records) / own module": compare(guests[GUEST], guests[OWN]),
    }
    one = summary(second[ONE])
    results = [
        summary(first[BARE] + second[BARE]),
        summary(first[DEFAULT]),
        one,
        summary(second[TWO]),
        three,
        latency,
        per_message,
        rss,
        summary(guests[OWN]),
        summary(guests[GUEST]),
    ]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "extism": extism.extism_version(),
            # 1-minute load average before and after: others' work shows in the spread.
            "load_average": [load_before, os.getloadavg()[0]],
        },
        "events": events_count,
        "pairs": pairs,
        "results": [{**asdict(r), "rate": r.rate} for r in results],
        "comparisons": {name: c.to_json() for name, c in pairs_of.items()},
        "ratios": {
            **{name: c.median_ratio for name, c in pairs_of.items()},
            "deadlift worker --processes 1 / per-message instantiation": (
                one.rate / per_message.rate
            ),
        },
        **_targets(pairs_of, latency, rss, one.rate / per_message.rate),
    }


def _targets(
    pairs_of: dict[str, Comparison], latency: Result, rss: Result, per_message_ratio: float
) -> dict[str, dict[str, Any]]:
    """Issue 16's targets: ``targets`` (met or not) and ``measured`` (what was)."""
    default = pairs_of["deadlift worker / bare loop"]
    single = pairs_of["deadlift worker --processes 1 / bare loop"]
    double = pairs_of["2 processes / 1 process"]
    p50, p99 = latency.p50_ms or float("inf"), latency.p99_ms or float("inf")
    checks = {
        "deadlift worker (default) >= 2.0x bare loop": (
            default.median_ratio >= 2.0,
            default.describe(),
        ),
        "deadlift worker --processes 1 >= 1.2x bare loop": (
            single.median_ratio >= 1.2,
            single.describe(),
        ),
        "3-step p50 <= 4 ms and p99 <= 10 ms at 100/s": (
            p50 <= 4.0 and p99 <= 10.0,
            f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
        ),
        "2 processes >= 1.7x one": (double.median_ratio >= 1.7, double.describe()),
        "worker RSS <= 150 MB with 20 modules (per process)": (
            rss.extra["rss_mb"] <= 150,
            f"{rss.extra['rss_mb']:.0f} MB",
        ),
        "--processes 1 >= 10x per-message instantiation": (
            per_message_ratio >= 10,
            f"{per_message_ratio:.1f}x",
        ),
    }
    return {
        "targets": {name: met for name, (met, _) in checks.items()},
        "measured": {name: figure for name, (_, figure) in checks.items()},
    }


def fingerprint() -> str:
    """The module benchmarked, for the record."""
    return hashlib.sha256(_wasm()).hexdigest()[:12]
