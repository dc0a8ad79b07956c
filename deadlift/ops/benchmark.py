"""``deadlift bench``: Deadlift's throughput and latency against two baselines, in one run.

Scenarios (each on its own embedded nats-server, file store, one tiny module):

* **bare loop** — the baseline to beat: a plain nats-py pull consumer → Extism
  call → ``publish_async`` with ``Nats-Msg-Id`` → await the PubAcks → ack,
  written without Deadlift.
* **per-message instantiation** — the same loop creating an Extism plugin per
  message, as the original Deadlift proof of concept did.
* **deadlift 1 step**, **deadlift 3 steps** — a durable workflow run by a worker.
* **3-step latency at 100 events/s** — end-to-end p50 / p99.
* **2 worker processes** against one.
* **worker RSS with 20 modules loaded**.
* **1 step, guest module** against the same step with the host's own module, on a
  server with accounts: the cost of run records (:mod:`deadlift.ops.bench_guest`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import extism
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.bench_guest import guest_throughput
from deadlift.ops.bench_support import Result
from deadlift.ops.bench_support import done as _done
from deadlift.ops.bench_support import module_wasm as _wasm
from deadlift.ops.bench_support import prefill as _prefill
from deadlift.ops.bench_support import until as _until
from deadlift.ops.control import apply_workflows
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import events


def _manifest(wasm: bytes) -> dict[str, Any]:
    return {"wasm": [{"data": wasm}], "timeout_ms": 1000, "memory": {"max_pages": 256}}


# -- baselines -------------------------------------------------------------------


async def bare_loop(count: int, *, per_message_plugin: bool = False) -> Result:
    """The plain loop: fetch → Extism → publish_async(+Msg-Id) → await PubAcks → ack."""
    wasm = _wasm()
    with EmbeddedServer() as server:
        nc = await bus.connect(Settings(nats_url=server.url), name="bench-bare")
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="BARE", subjects=["bare.in", "bare.out"]))
        await js.add_consumer(
            "BARE",
            ConsumerConfig(
                durable_name="bare",
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject="bare.in",
                max_ack_pending=-1,
            ),
        )
        await _prefill(js, "bare.in", count)
        sub = await js.pull_subscribe_bind(durable="bare", stream="BARE")
        plugin = None if per_message_plugin else extism.Plugin(_manifest(wasm), functions=[])
        done = 0
        started = time.perf_counter()
        while done < count:
            msgs = await sub.fetch(256, timeout=5)
            acks = []
            for msg in msgs:
                event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
                runner = plugin or extism.Plugin(_manifest(wasm), functions=[])
                out = runner.call("add_ten", _json(event.data))
                headers = {events.MSG_ID: f"{event.id}:out"}
                acks.append(await js.publish_async("bare.out", out, headers=headers))
            await asyncio.gather(*acks)
            for msg in msgs:
                await msg.ack()
            done += len(msgs)
        seconds = time.perf_counter() - started
        await nc.drain()
    name = "per-message instantiation" if per_message_plugin else "bare loop"
    return Result(name, count, seconds)


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


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
        nxt = f", next: [s{i + 1}]" if i + 1 < length else ", publish: [bench.out]"
        lines.append(f"  - {{name: s{i}, module: add_ten, function: add_ten{nxt}}}")
    return CHAIN.format(steps="\n".join(lines))


async def _setup(server: EmbeddedServer, length: int, wasm: bytes | None = None) -> Any:
    settings = Settings(nats_url=server.url)
    nc = await bus.connect(settings, name="bench")
    registry = await Registry.open(nc.jetstream())
    await registry.push_module(wasm or _wasm(), name="add_ten")
    workflow = parse_workflow(_chain(length))
    await apply_workflows(nc.jetstream(), registry, settings, [(workflow, "bench.yaml")])
    return nc, settings


async def _stored(js: Any, subject: str) -> int:
    """Messages stored on subjects matching ``subject`` (``state.messages`` counts all)."""
    info = await js.stream_info(Stream.EVENTS, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def deadlift_throughput(count: int, *, steps: int = 1) -> Result:
    """Events/s through a worker for a chain of ``steps`` steps (backlog pre-published)."""
    with EmbeddedServer() as server:
        nc, settings = await _setup(server, steps)
        js = nc.jetstream()
        await _prefill(js, "bench.in", count)
        worker = Worker(nc, settings=settings, advertise=False)
        started = time.perf_counter()
        await worker.start()
        await _until(lambda: _done(worker, count * steps), timeout=300)
        seconds = time.perf_counter() - started
        await worker.shutdown()
        await nc.drain()
    return Result(f"deadlift {steps} step{'s' if steps > 1 else ''}", count, seconds)


async def deadlift_latency(count: int, *, rate: float = 100.0, steps: int = 3) -> Result:
    """End-to-end latency of a ``steps``-step chain at a steady ``rate`` of events/s."""
    with EmbeddedServer() as server:
        nc, settings = await _setup(server, steps)
        js = nc.jetstream()
        sent: dict[str, float] = {}
        latencies: list[float] = []

        async def on_output(msg: Any) -> None:
            event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
            latencies.append((time.perf_counter() - sent[event.run]) * 1000)

        await nc.subscribe("bench.out", cb=on_output)
        async with Worker(nc, settings=settings, advertise=False):
            await asyncio.sleep(0.5)  # steps pulling
            started = time.perf_counter()
            for n in range(count):
                event = events.new_event({"value": n}, source="bench", type="bench")
                headers, body = events.encode(event)
                headers[events.MSG_ID] = event.id
                sent[event.id] = time.perf_counter()
                await js.publish("bench.in", body, headers=headers)
                await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.perf_counter()))
            await _until(lambda: _counted(latencies, count), timeout=30)
            seconds = time.perf_counter() - started
        await nc.drain()
    latencies.sort()
    return Result(
        f"deadlift {steps} steps @ {rate:.0f}/s",
        count,
        seconds,
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )


async def _counted(values: list[float], count: int) -> bool:
    return len(values) >= count


async def worker_processes(count: int, processes: int) -> Result:
    """Events/s of a 1-step workflow shared by ``processes`` worker processes."""
    with EmbeddedServer() as server:
        nc, _ = await _setup(server, 1)
        js = nc.jetstream()
        env = {**os.environ, "DEADLIFT_NATS_URL": server.url, "DEADLIFT_ORGS_FILE": "/nonexistent"}
        workers = [
            subprocess.Popen(  # noqa: ASYNC220 (a child process, started once)
                [
                    sys.executable,
                    "-m",
                    "deadlift.cli",
                    "--log-level",
                    "WARNING",
                    "worker",
                ],
                env=env,
            )
            for _ in range(processes)
        ]
        try:
            # Every process pulling before the events arrive: start-up is not measured.
            await _until(lambda: _pulling(js, "bench--bench--s0--trigger", processes), 120)
            started = time.perf_counter()
            await _prefill(js, "bench.in", count)
            await _until(lambda: _full(js, count), timeout=300)
            seconds = time.perf_counter() - started
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(30)
        await nc.drain()
    return Result(f"deadlift 1 step, {processes} processes", count, seconds)


async def _pulling(js: Any, consumer: str, workers: int) -> bool:
    info = await js.consumer_info(Stream.EVENTS, consumer)
    return (info.num_waiting or 0) >= workers


async def _full(js: Any, count: int) -> bool:
    return await _stored(js, "bench.out") >= count


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
    """Resident memory of a worker process running ``modules`` distinct modules."""
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
            await _prefill(nc.jetstream(), f"rss.{i}", 50)
        env = {**os.environ, "DEADLIFT_NATS_URL": server.url, "DEADLIFT_ORGS_FILE": "/nonexistent"}
        worker = subprocess.Popen(  # noqa: ASYNC220 (a child process, started once)
            [sys.executable, "-m", "deadlift.cli", "--log-level", "WARNING", "worker"], env=env
        )
        try:
            js = nc.jetstream()
            await _until(lambda: _all_out(js, modules, 50), timeout=120)
            await asyncio.sleep(3.0)  # steady state: quiet steps give instances back
            rss_mb = _rss_mb(worker.pid)
        finally:
            worker.terminate()
            worker.wait(30)
        await nc.drain()
    return Result(f"worker RSS, {modules} modules", modules * 50, 0.0, extra={"rss_mb": rss_mb})


async def _all_out(js: Any, modules: int, each: int) -> bool:
    return await _stored(js, "rss.out.>") >= modules * each


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the run ---------------------------------------------------------------------


Progress = Callable[[int, int, str, Result | None], None]
"""Told ``(number, of, scenario, None)`` as a scenario starts and ``(…, result)`` as it ends."""

SCENARIOS = 10


async def _scenario(
    progress: Progress | None, number: int, label: str, work: Awaitable[Result]
) -> Result:
    if progress is not None:
        progress(number, SCENARIOS, label, None)
    result = await work
    if progress is not None:
        progress(number, SCENARIOS, label, result)
    return result


async def run(
    events_count: int = 20_000, latency_events: int = 500, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Every scenario, with ratios and the targets checked.

    ``progress``, if given, is called as each scenario starts and ends.
    """
    few = max(500, events_count // 20)
    bare = await _scenario(progress, 1, "bare loop", bare_loop(events_count))
    per_message = await _scenario(
        progress, 2, "per-message instantiation", bare_loop(few, per_message_plugin=True)
    )
    one = await _scenario(
        progress, 3, "deadlift 1 step", deadlift_throughput(events_count, steps=1)
    )
    three = await _scenario(
        progress, 4, "deadlift 3 steps", deadlift_throughput(events_count // 2, steps=3)
    )
    latency = await _scenario(
        progress, 5, "deadlift 3-step latency", deadlift_latency(latency_events)
    )
    single = await _scenario(progress, 6, "1 worker process", worker_processes(events_count, 1))
    double = await _scenario(progress, 7, "2 worker processes", worker_processes(events_count, 2))
    rss = await _scenario(progress, 8, "worker RSS, 20 modules", worker_rss(20))
    own = await _scenario(
        progress,
        9,
        "1 step, own module (accounts)",
        guest_throughput(events_count, guest=False, wasm=_wasm()),
    )
    guest = await _scenario(
        progress,
        10,
        "1 step, guest module + run records",
        guest_throughput(events_count, guest=True, wasm=_wasm()),
    )
    results = [bare, per_message, one, three, latency, single, double, rss, own, guest]
    targets = {
        "1-step >= 1.0x bare loop": one.rate >= bare.rate,
        "1-step >= 10x per-message instantiation": one.rate >= 10 * per_message.rate,
        "3-step p50 <= 5 ms at 100/s": (latency.p50_ms or 1e9) <= 5.0,
        "2 processes >= 1.3x one": double.rate >= 1.3 * single.rate,
        "worker RSS <= 150 MB with 20 modules": rss.extra["rss_mb"] <= 150,
    }
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "extism": extism.extism_version(),
        },
        "results": [{**asdict(r), "rate": r.rate} for r in results],
        "ratios": {
            "deadlift 1 step / bare loop": one.rate / bare.rate,
            "deadlift 1 step / per-message instantiation": one.rate / per_message.rate,
            "2 processes / 1 process": double.rate / single.rate,
            "guest module (run records) / own module": guest.rate / own.rate,
        },
        "targets": targets,
    }


def fingerprint() -> str:
    """The module benchmarked, for the record."""
    return hashlib.sha256(_wasm()).hexdigest()[:12]
