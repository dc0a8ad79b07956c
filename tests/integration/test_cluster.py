"""Beyond one server: a 3-node JetStream cluster losing its stream leader, many worker
processes of two orgs losing one of them, and orgs on their own servers joined by leaf nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.model.orgs import load_orgs
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.cluster import LocalCluster
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.leafnodes import LeafTopology
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import ROOT, eventually, module_path, share_module, stored, workers_serving

pytestmark = pytest.mark.slow
CALCULATOR = (ROOT / "config" / "workflows" / "calculator.yaml").read_text()
ORGS_FILE = ROOT / "config" / "orgs.yaml"
FROM_STRIPE = bus.import_stream("stripe")  # where Acme's stream captures Stripe's events


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
        [sys.executable, "-m", "deadlift.cli", *globals_, "worker", "--processes", "1", *args],
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


def deadlift_cli(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "--server", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def log_tail(log: str, chars: int = 3000) -> str:
    """The end of a worker log, without the fetch warnings of an election."""
    return "\n".join(line for line in log.splitlines() if "fetch for" not in line)[-chars:]


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


async def count_outputs(
    nc: Client, subject: str, count: int, stream: str = Stream.EVENTS
) -> list[events.Event] | None:
    try:
        found = await stored(nc, subject, stream)
    except (nats.errors.Error, TimeoutError):
        return None  # the stream is electing a leader: ask again
    return found if len(found) >= count else None


async def setup_calculator(nc: Client, settings: Settings) -> None:
    registry = await Registry.open(nc.jetstream())
    for name in ("add_ten", "multiply_by_five"):
        await push_module_file(registry, module_path(name))
    workflow = parse_workflow(CALCULATOR, source="calculator.yaml")
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
    # The dead-letter stream comes with the first dead letter, replicated the same.
    assert not await dlq.stream_exists(js)
    await dlq.ensure_stream(js, settings)
    await bus.ensure_steps_stream(js, settings)  # else made by the first step's output
    for stream in (Stream.EVENTS, Stream.STEPS, Stream.DLQ):
        assert (await js.stream_info(stream)).config.num_replicas == 3

    total = 300
    worker = start_worker(settings, "--concurrency", "8")
    waits: list[float] = []
    failure: AssertionError | None = None
    try:
        await eventually(
            lambda: workers_serving(nc),
            timeout=20,
            message="worker serving",
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
        leader = await cluster.stream_leader(js, Stream.EVENTS)
        killed_at = time.monotonic()
        cluster.kill(leader)  # SIGKILL: no goodbye to the cluster or the clients
        await asyncio.wait_for(producer, 45)
        await eventually(
            lambda: count_outputs(nc, "calc.out", total), timeout=40, message="all outputs"
        )
        recovered = time.monotonic() - killed_at
        new_leader = await cluster.stream_leader(js, Stream.EVENTS)
        await asyncio.sleep(0.5)  # a late duplicate would show up here
        found = await stored(nc, "calc.out")
        letters = await dlq.letters(js)
    except AssertionError as exc:
        failure = exc
    finally:
        log = stop_worker(worker)
        await nc.close()
    if failure is not None:
        raise AssertionError(f"{failure}\n--- worker log ---\n{log_tail(log)}")
    assert new_leader != leader
    exactly_once(found, [(n + 10) * 5 for n in range(total)])
    assert letters == [], f"dead letters: {letters[:3]}\n{log_tail(log)}"
    stats = worker_stats(log)
    assert stats["ok"] >= 2 * total and stats["dead"] == 0, stats  # it rode through
    stall = max(waits)
    print(f"\nelection stall seen by the producer: {stall:.1f} s; all done {recovered:.1f} s after")
    assert stall < 15

    # The killed node comes back with its store and catches up as a follower.
    cluster.restart(leader)
    nc = await bus.connect(settings, name="deadlift-test")
    try:

        async def caught_up() -> bool:
            info = await nc.jetstream().stream_info(Stream.EVENTS)
            replicas = info.cluster.replicas or [] if info.cluster else []
            return len(replicas) == 2 and all(r.current and not r.offline for r in replicas)

        await eventually(caught_up, timeout=20, message="restarted node current again")
    finally:
        await nc.close()


# -- 2. many worker processes of two orgs, one of each killed --------------------------


async def org_session(url: str, org: str) -> tuple[Client, Settings, Registry]:
    settings = Settings(nats_url=url, org=org, orgs_file=str(ORGS_FILE), ack_wait_s=5.0)
    nc = await bus.connect(settings, name=f"deadlift-test-{org}")
    return nc, settings, await Registry.open(nc.jetstream())


async def prepare(
    nc: Client,
    settings: Settings,
    registry: Registry,
    modules: list[str],
    workflows: set[str] | None = None,
) -> None:
    """Push modules to the org's own registry and apply the org's workflows from config/."""
    for name in modules:
        await push_module_file(registry, module_path(name))
    flows = []
    for path in sorted((ROOT / "config" / "workflows").glob("*.yaml")):
        workflow = parse_workflow(path.read_text(), source=str(path))
        if workflow.org == settings.org and (workflows is None or workflow.name in workflows):
            flows.append((workflow, path.name))
    await apply_workflows(nc.jetstream(), registry, settings, flows)


def charge(n: int) -> dict[str, Any]:
    """A coffee charge for alice: ten similar purchases in 30 days → a discount each time."""
    return {
        "charge_id": f"ch_{n:04d}",
        "customer": "alice",
        "email": "alice@acme.example",
        "amount": 4.5,
        "category": "coffee",
        "ts": int(time.time()),
    }


def once_per(found: list[events.Event], key: str, expected: set[str]) -> None:
    counts = Counter(e.data[key] for e in found)
    assert set(counts) == expected, f"missing {sorted(expected - set(counts))[:5]}"
    assert max(counts.values()) == 1, f"twice: {[k for k, c in counts.items() if c > 1][:5]}"


@pytest.fixture
def org_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(orgs=load_orgs(ORGS_FILE)) as server:
        yield server


async def test_four_workers_of_two_orgs_share_steps_and_a_sigkill_loses_nothing(
    org_server: EmbeddedServer,
) -> None:
    acme, acme_settings, acme_registry = await org_session(org_server.url, "acme")
    stripe, stripe_settings, stripe_registry = await org_session(org_server.url, "stripe")
    await prepare(
        acme,
        acme_settings,
        acme_registry,
        ["add_ten", "multiply_by_five", "aggregate_discounts", "before_charge_action"],
    )
    # Acme's module reaches Stripe as the shipped integration says: signed, offered, accepted.
    await share_module(
        (acme, acme_registry),
        (stripe, stripe_registry),
        load_orgs(ORGS_FILE),
        "before_charge_action",
    )
    await prepare(stripe, stripe_settings, stripe_registry, ["discount_notice"])
    host_functions = ("--host-functions", "deadlift.demo.stripe")
    workers = {
        "acme": [start_worker(acme_settings, "-c", "4", org="acme") for _ in range(2)],
        "stripe": [
            start_worker(stripe_settings, "-c", "4", *host_functions, org="stripe")
            for _ in range(2)
        ],
    }
    total, charges = 200, 60
    try:
        await eventually(
            lambda: workers_serving(acme, 2),
            timeout=30,
            message="both acme workers serving",
        )
        await eventually(
            lambda: workers_serving(stripe, 2),
            timeout=30,
            message="both stripe workers serving",
        )
        deadline = time.monotonic() + 30

        async def produce() -> None:
            for n in range(total):
                await publish_until_acked(
                    acme, "calc.in", {"value": n}, f"c-{n}", deadline=deadline
                )
                await asyncio.sleep(0.005)

        async def charge_alice() -> None:
            for i in range(charges):
                await publish_until_acked(
                    stripe, "stripe.charges.acme", charge(i), f"ch-{i}", deadline=deadline
                )
                await asyncio.sleep(0.02)

        producer = asyncio.gather(produce(), charge_alice())
        await eventually(lambda: count_outputs(acme, "calc.out", 40), timeout=30)
        await eventually(lambda: count_outputs(stripe, "stripe.out.acme.discounts", 5), timeout=30)
        healthy = await asyncio.to_thread(
            deadlift_cli, org_server.url, "--org", "acme", "health", "--worker", "--streams"
        )
        assert healthy.returncode == 0, healthy.stderr
        victims = [workers["acme"][0], workers["stripe"][0]]
        for victim in victims:
            victim.kill()  # SIGKILL mid-stream: in-flight events come back after ack_wait
        for victim in victims:
            victim.wait(10)
        await asyncio.wait_for(producer, 40)
        calc = await eventually(
            lambda: count_outputs(acme, "calc.out", total), timeout=40, message="calc outputs"
        )
        notices = await eventually(
            lambda: count_outputs(stripe, "stripe.out.acme.discounts", charges),
            timeout=40,
            message="stripe discount notices",
        )
        received = await eventually(
            lambda: count_outputs(acme, "acme.in.stripe.discounts", charges, FROM_STRIPE),
            timeout=20,
            message="notices received by acme",
        )
        updated = await eventually(
            lambda: count_outputs(acme, "acme.loyalty.updated", charges),
            timeout=20,
            message="acme loyalty updates",
        )
        await asyncio.sleep(0.5)  # late duplicates would show up here
        calc = await stored(acme, "calc.out")
        notices = await stored(stripe, "stripe.out.acme.discounts")
        received = await stored(acme, "acme.in.stripe.discounts", FROM_STRIPE)
        updated = await stored(acme, "acme.loyalty.updated")
        letters = await dlq.letters(acme.jetstream()) + await dlq.letters(stripe.jetstream())
    finally:
        logs = {org: [stop_worker(w) for w in procs[1:]] for org, procs in workers.items()}
        for procs in workers.values():
            procs[0].kill()
            procs[0].communicate()
        await acme.close()
        await stripe.close()
    exactly_once(calc, [(n + 10) * 5 for n in range(total)])
    ids = {f"ch_{i:04d}" for i in range(charges)}
    once_per(notices, "charge_id", ids)  # in Stripe's account
    once_per(received, "charge_id", ids)  # crossed into Acme's account, once each
    assert len(updated) == charges  # Acme's own step ran on each, its output stored once
    assert letters == []
    for org, org_logs in logs.items():
        for log in org_logs:
            assert worker_stats(log)["dead"] == 0, (org, log[-2000:])


# -- 3. each org on its own NATS server, leaf nodes of a hub ----------------------------


async def test_an_event_published_on_stripes_server_reaches_acmes_server_through_the_hub() -> None:
    manifest = load_orgs(ORGS_FILE)
    with LeafTopology(manifest, ["acme", "stripe"]) as topology:
        acme, acme_settings, acme_registry = await org_session(topology.url("acme"), "acme")
        stripe, stripe_settings, _ = await org_session(topology.url("stripe"), "stripe")
        try:
            # Acme's own server: its registry, its loyalty workflow, its stream, its worker.
            await prepare(acme, acme_settings, acme_registry, ["aggregate_discounts"], {"loyalty"})
            seen: list[Any] = []

            async def on_message(msg: Any) -> None:
                seen.append(msg)

            sub = await acme.subscribe("acme.in.stripe.>", cb=on_message)
            # Stripe's own server keeps its own durable copy of what it publishes.
            await bus.ensure_streams(stripe.jetstream(), stripe_settings, ["stripe.out.acme.>"])
            notice = {
                "kind": "loyalty_discount",
                "issuer": "stripe",
                "charge_id": "ch_leaf_1",
                "customer": "alice",
                "email": "alice@acme.example",
                "discount_percent": 10,
                "similar_purchases": 12,
            }
            from deadlift.runtime.worker import Worker

            async with Worker(acme, settings=acme_settings, orgs=manifest):
                deadline = time.monotonic() + 20

                async def arrived() -> list[events.Event] | None:
                    # Interest crosses the leaf connections asynchronously: publish (same
                    # id, deduplicated on both sides) until Acme's stream has it.
                    await publish_until_acked(
                        stripe, "stripe.out.acme.discounts", notice, "leaf-1", deadline=deadline
                    )
                    return await count_outputs(acme, "acme.in.stripe.discounts", 1, FROM_STRIPE)

                [event] = await eventually(arrived, timeout=20, message="event on acme's server")
                [update] = await eventually(
                    lambda: count_outputs(acme, "acme.loyalty.updated", 1),
                    timeout=20,
                    message="acme's workflow ran on it",
                )
            await sub.unsubscribe()
            stripe_copy = await stored(stripe, "stripe.out.acme.discounts")
        finally:
            await acme.close()
            await stripe.close()
    assert event.id == "leaf-1" and event.data == notice  # the Deadlift event, intact
    assert len(stripe_copy) == 1  # every retry above was one event on Stripe's side too
    assert update.data == {"customer": "alice", "discounts": 1, "total": 1}
    assert seen and all(m.subject == "acme.in.stripe.discounts" for m in seen)
    assert seen[0].headers and seen[0].headers.get("ce-id") == "leaf-1"


# -- 4. the CLI: deadlift cluster and deadlift health ------------------------------------


def run_cluster(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadlift.cli",
            "cluster",
            "--port",
            "0",
            "--store-dir",
            str(tmp_path / "cluster"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_cluster_command_runs_three_nodes_with_org_accounts_until_sigterm_and_health_probes_them(
    tmp_path: Path,
) -> None:
    process = run_cluster(tmp_path)
    try:
        assert process.stdout is not None
        urls = process.stdout.readline().strip()  # the first line: --server material
        assert len(urls.split(",")) == 3 and all(
            u.startswith("nats://127.0.0.1:") for u in urls.split(",")
        )
        probe = deadlift_cli(urls, "--org", "acme", "health", "--json")
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout)["ok"] is True
        # One account per org by default: a client without credentials is refused.
        anonymous = deadlift_cli(urls, "health", "--timeout", "3")
        assert anonymous.returncode == 1 and "authoriz" in anonymous.stderr.lower()
        no_worker = deadlift_cli(urls, "--org", "acme", "health", "--worker", "--timeout", "2")
        assert no_worker.returncode == 1 and "no live worker" in no_worker.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "single-tenant" not in err.lower()
    assert "accounts: acme, stripe, globex" in err
    assert "routes: mutual TLS" in err
    # Monitoring (no authentication) is on loopback only.
    monitors = re.findall(r"monitor (\S+)", err)
    assert len(monitors) == 3 and all(m.startswith("http://127.0.0.1:") for m in monitors)
    cluster_dir = tmp_path / "cluster"
    assert {p.name for p in cluster_dir.iterdir()} == {"n1", "n2", "n3", "tls"}
    assert all((cluster_dir / n / "store" / "jetstream").is_dir() for n in ("n1", "n2", "n3"))
    for n in ("n1", "n2", "n3"):  # the configs hold the route and org passwords
        assert stat.S_IMODE((cluster_dir / n / f"{n}.conf").stat().st_mode) == 0o600
    down = deadlift_cli(urls, "--org", "acme", "health", "--timeout", "2")
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_cluster_command_single_tenant_is_explicit_and_says_so_loudly(tmp_path: Path) -> None:
    process = run_cluster(tmp_path, "--size", "1", "--single-tenant")
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        anonymous = deadlift_cli(url, "health", "--timeout", "3")
        assert anonymous.returncode == 0, anonymous.stderr  # no authentication at all
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "single-tenant development mode" in err.lower()
    assert "no authentication" in err.lower()


async def test_registry_and_state_buckets_get_the_streams_replicas(cluster: LocalCluster) -> None:
    settings = Settings(nats_url=",".join(cluster.urls), stream_replicas=3)
    nc = await bus.connect(settings)
    try:
        await Registry.open(nc.jetstream(), replicas=settings.stream_replicas)
        for stream in (Stream.REGISTRY,):
            info = await nc.jetstream().stream_info(stream)
            assert info.config.num_replicas == 3, stream
    finally:
        await nc.drain()
