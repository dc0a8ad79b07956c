"""Beyond one server: a 3-node JetStream cluster losing its stream leader, many worker
processes of two orgs losing one of them, and orgs on their own servers joined by leaf nodes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from deadlift import bus, dlq, events
from deadlift.cluster import LeafTopology, LocalCluster
from deadlift.control import apply_workflows, push_module_file
from deadlift.orgs import load_orgs
from deadlift.registry import Registry
from deadlift.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.workflow import parse_workflow
from tests.conftest import ROOT, eventually, module_path, stored

pytestmark = pytest.mark.slow
CALCULATOR = (ROOT / "config" / "workflows" / "calculator.yaml").read_text()
ORGS_FILE = ROOT / "config" / "orgs.yaml"


# -- helpers ----------------------------------------------------------------------


def start_worker(settings: Settings, *args: str, org: str | None = None) -> subprocess.Popen[str]:
    """A ``deadlift worker`` process (its stderr is the log; read it after stopping)."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DEADLIFT_STREAM_REPLICAS": str(settings.stream_replicas),
        "DEADLIFT_ACK_WAIT_S": str(settings.ack_wait_s),
    }
    globals_ = ["--server", settings.nats_url, *(["--org", org] if org else [])]
    return subprocess.Popen(
        [sys.executable, "-m", "deadlift.cli", *globals_, "worker", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def stop_worker(process: subprocess.Popen[str]) -> str:
    """SIGTERM, wait for the drain, return the log."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, log = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, log = process.communicate()
    return log


def worker_stats(log: str) -> dict[str, int]:
    lines = [line for line in log.splitlines() if "worker stopped:" in line]
    assert lines, f"worker did not stop cleanly:\n{log[-3000:]}"
    parts = lines[-1].split("worker stopped:")[1].split()
    return {k: int(v) for k, v in (p.split("=") for p in parts)}


def exactly_once(found: list[events.Event], values: list[int]) -> None:
    """Every expected output value stored once: none missing, none twice."""
    counts = Counter(e.data["value"] for e in found)
    missing = sorted(set(values) - set(counts))
    twice = sorted(v for v, c in counts.items() if c > 1)
    assert not missing, f"{len(missing)} output(s) missing, e.g. {missing[:5]}"
    assert not twice, f"{len(twice)} output(s) stored twice, e.g. {twice[:5]}"
    assert sorted(counts) == sorted(values)


async def publish_until_acked(
    nc: Client, subject: str, data: Any, event_id: str, *, deadline: float
) -> float:
    """Publish a Deadlift event, retrying with the *same id* until a PubAck comes back.

    During a leader election the stream answers nothing (no responders, or a
    timeout when the PubAck was lost); a retry with the same ``Nats-Msg-Id`` is
    stored at most once. Returns the seconds spent.
    """
    started = time.monotonic()
    event = events.new_event(data, source="test", type="test.event", id=event_id)
    headers, body = events.encode(event)
    headers[events.MSG_ID] = event.id
    while True:
        try:
            await nc.jetstream().publish(subject, body, headers=headers, timeout=1.0)
            return time.monotonic() - started
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def count_outputs(nc: Client, subject: str, count: int) -> list[events.Event] | None:
    try:
        found = await stored(nc, subject)
    except (nats.errors.Error, TimeoutError):
        return None  # the stream is electing a leader: ask again
    return found if len(found) >= count else None


async def pulling(nc: Client, stream: str, consumer: str, workers: int = 1) -> bool:
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
    except (nats.errors.Error, TimeoutError):
        return False
    return (info.num_waiting or 0) >= workers


async def setup_calculator(nc: Client, settings: Settings, text: str = CALCULATOR) -> None:
    registry = await Registry.open(nc.jetstream())
    for name in ("add_ten", "multiply_by_five"):
        await push_module_file(registry, module_path(name))
    workflow = parse_workflow(text, source="calculator.yaml")
    await apply_workflows(nc.jetstream(), registry, settings, [(workflow, "calculator.yaml")])


# -- 1. the stream leader dies mid-stream -------------------------------------------


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3) as running:
        yield running


async def test_sigkill_of_the_stream_leader_loses_nothing_and_stores_every_output_once(
    cluster: LocalCluster,
) -> None:
    settings = Settings(nats_url=cluster.url, stream_replicas=3, ack_wait_s=5.0)
    nc = await bus.connect(settings, name="deadlift-test")
    js = nc.jetstream()
    await setup_calculator(nc, settings)
    for stream in (bus.EVENTS_STREAM, bus.STEPS_STREAM, bus.DLQ_STREAM):
        assert (await js.stream_info(stream)).config.num_replicas == 3

    total = 300
    worker = start_worker(settings, "--concurrency", "8")
    waits: list[float] = []
    try:
        await eventually(
            lambda: pulling(nc, bus.EVENTS_STREAM, "acme--calculator--add--trigger"),
            timeout=20,
            message="worker pulling",
        )

        async def produce() -> None:
            deadline = time.monotonic() + 40
            for n in range(total):
                waits.append(
                    await publish_until_acked(
                        nc, "calc.in", {"value": n}, f"leader-kill-{n}", deadline=deadline
                    )
                )
                await asyncio.sleep(0.01)  # a steady stream, so the kill lands mid-way

        producer = asyncio.create_task(produce())
        await eventually(lambda: count_outputs(nc, "calc.out", 50), timeout=20)
        leader = await cluster.stream_leader(js, bus.EVENTS_STREAM)
        killed_at = time.monotonic()
        cluster.kill(leader)  # SIGKILL: no goodbye to the cluster or the clients
        await asyncio.wait_for(producer, 45)
        found = await eventually(
            lambda: count_outputs(nc, "calc.out", total), timeout=40, message="all outputs"
        )
        recovered = time.monotonic() - killed_at
        new_leader = await cluster.stream_leader(js, bus.EVENTS_STREAM)
        await asyncio.sleep(0.5)  # a late duplicate would show up here
        found = await stored(nc, "calc.out")
        letters = await dlq.letters(js)
    finally:
        log = stop_worker(worker)
        await nc.close()
    assert new_leader != leader
    exactly_once(found, [(n + 10) * 5 for n in range(total)])
    assert letters == [], f"dead letters: {letters[:3]}"
    stats = worker_stats(log)
    assert stats["ok"] >= 2 * total and stats["dead"] == 0, stats
    stall = max(waits)
    print(f"\nelection stall seen by the producer: {stall:.1f} s; all done {recovered:.1f} s after")
    assert stall < 15
