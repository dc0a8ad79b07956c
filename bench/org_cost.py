"""What each kind of per-org resource costs nats-server (issue 15, item 5).

N orgs (one account each, ``scale_orgs.LIMITS``), one nats-server. Each phase adds
one kind of resource to every org, 8 orgs at a time, each org on its own connection
(kept open until the last phase); after each phase the server is read:

* ``RSS``: its ``VmRSS`` (what ``scale.py --orgs`` reports);
* ``heap``: the Go heap in use after a forced GC (``HeapAlloc`` from
  ``/debug/pprof/heap?gc=1``, the server's ``prof_port``): what the objects take,
  without the garbage and the free pages that RSS also counts; ``stacks``: the
  goroutines' stacks (live too);
* streams and consumers (``/jsz``).

Phases: accounts only; a connection per org; the registry (``Registry.open``: one
stream, ``DEADLIFT_REGISTRY``); ``add_ten`` pushed; the events stream; the workflow
applied (3 steps: what ``workflow apply`` makes, the workflow in KV and no
consumer); what the workflow's first run makes (the trigger's consumer, made by
the worker that finds the first event, the steps stream and the consumers of
steps 2 and 3, made by the first event sent to each); the dead-letter
stream (made by an org's first dead letter); the connections closed. The table
shows each phase's growth per org. From the repository root::

    .venv/bin/python bench/org_cost.py --orgs 200 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from scale_common import WASM, monitor, note, rss_mb, workflow_yaml
from scale_orgs import LIMITS, PASSWORD

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.bus.streams import dead_letter_config, stream_config
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer, free_port
from deadlift.settings import Settings

AT_ONCE = 8
SETTLE_S = 15.0  # after a phase, before reading: written blocks' caches expire (10 s)
HEAP_LINE = re.compile(r"^# (HeapAlloc|HeapInuse|Stack|Sys) = (\d+)", re.MULTILINE)


@dataclass
class Reading:
    """The server after one phase."""

    phase: str
    rss_mb: float
    heap_mb: float
    heap_inuse_mb: float
    stack_mb: float  # goroutine stacks (3 goroutines per stream, 4 per consumer)
    sys_mb: float
    streams: int
    consumers: int
    seconds: float


def heap(prof_port: int) -> dict[str, float]:
    """The Go runtime's memory figures (MiB) after forced GCs (two: what a pool
    released survives the first)."""
    url = f"http://127.0.0.1:{prof_port}/debug/pprof/heap?debug=1&gc=1"
    for _ in range(2):
        with urllib.request.urlopen(url, timeout=60) as answer:
            text = answer.read().decode()
    return {name: int(value) / 2**20 for name, value in HEAP_LINE.findall(text)}


async def read(
    server: EmbeddedServer, prof_port: int, phase: str, took: float, settle: float
) -> Reading:
    await asyncio.sleep(settle)
    figures = await asyncio.to_thread(heap, prof_port)
    jsz = monitor(server, "jsz")
    assert server.process is not None
    reading = Reading(
        phase=phase,
        rss_mb=rss_mb(server.process.pid) or 0.0,
        heap_mb=figures.get("HeapAlloc", 0.0),
        heap_inuse_mb=figures.get("HeapInuse", 0.0),
        stack_mb=figures.get("Stack", 0.0),
        sys_mb=figures.get("Sys", 0.0),
        streams=int(jsz.get("streams", 0)),
        consumers=int(jsz.get("consumers", 0)),
        seconds=took,
    )
    note(f"{phase}: RSS {reading.rss_mb:.0f} MB, heap {reading.heap_mb:.0f} MB ({took:.1f} s)")
    return reading


class Orgs:
    """The orgs' connections and what each phase does to every org."""

    def __init__(self, server: EmbeddedServer, manifest: OrgManifest, path: Path) -> None:
        self.server, self.manifest, self.path = server, manifest, path
        self.clients: dict[str, Client] = {}
        self.settings: dict[str, Settings] = {}

    async def each(self, action: Callable[[str], Awaitable[Any]]) -> None:
        slots = asyncio.Semaphore(AT_ONCE)

        async def one(org: str) -> None:
            async with slots:
                await action(org)

        async with asyncio.TaskGroup() as group:
            for org in self.manifest.orgs:
                group.create_task(one(org))

    async def connect(self, org: str) -> None:
        settings = Settings(
            nats_url=self.server.url,
            org=org,
            user=org,
            password=PASSWORD,
            orgs_file=str(self.path),
        )
        self.settings[org] = settings
        self.clients[org] = await bus.connect(settings, name="deadlift-bench-cost")

    async def registry(self, org: str) -> None:
        await Registry.open(self.clients[org].jetstream())

    async def module(self, org: str) -> None:
        registry = await Registry.open(self.clients[org].jetstream())
        await push_module_file(registry, WASM, name="add_ten")

    async def first_run(self, org: str) -> None:
        """What the first event through every step makes: the trigger's consumer (as the
        worker that finds the event does, ``bus.ensure_triggers``), then each next step's
        own (``bus.ensure_on_demand``, as the step before it does; the entry step's own
        is made only by a replay)."""
        js = self.clients[org].jetstream()
        workflow = await (await Registry.open(js)).workflow("flow")
        await bus.ensure_triggers(js, self.settings[org], workflow)
        for step in workflow.steps[1:]:
            await bus.ensure_on_demand(js, self.settings[org], workflow, step)

    async def events_stream(self, org: str) -> None:
        subjects = [f"{org}.in", f"{org}.out"]
        config = stream_config(Stream.EVENTS, subjects, self.settings[org])
        await self.clients[org].jetstream().add_stream(config)

    async def workflow(self, org: str) -> None:
        js = self.clients[org].jetstream()
        registry = await Registry.open(js)
        loaded = [(parse_workflow(workflow_yaml("flow", org, org)), f"{org}.yaml")]
        await apply_workflows(js, registry, self.settings[org], loaded, orgs=self.manifest)

    async def dead_letter_stream(self, org: str) -> None:
        await self.clients[org].jetstream().add_stream(dead_letter_config(self.settings[org]))

    async def close(self, org: str) -> None:
        await self.clients.pop(org).close()


async def run(n: int, work: Path, settle: float) -> list[Reading]:
    names = [f"o{i}" for i in range(n)]
    user = {"user": "", "password": PASSWORD}
    raw = {"orgs": {o: {"users": [user | {"user": o}], "limits": LIMITS} for o in names}}
    manifest, path = OrgManifest.model_validate(raw), work / "orgs.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    prof_port = free_port()
    extra = work / "prof.conf"
    extra.write_text(f"prof_port: {prof_port}\n")
    # nats-server joins an include's path to the including file's directory, even an
    # absolute one (EmbeddedServer's include of config_file): put the file there too.
    joined = work / "store" / extra.relative_to(extra.anchor)
    joined.parent.mkdir(parents=True)
    joined.write_text(extra.read_text())
    server = EmbeddedServer(store_dir=work / "store", orgs=manifest, config_file=extra)
    server.start(timeout=600)
    try:
        orgs = Orgs(server, manifest, path)
        readings = [await read(server, prof_port, "accounts only", 0.0, settle)]
        phases: list[tuple[str, Callable[[str], Awaitable[Any]]]] = [
            ("a connection each", orgs.connect),
            ("registry (one stream)", orgs.registry),
            ("module pushed (add_ten)", orgs.module),
            ("events stream", orgs.events_stream),
            ("workflow applied (1 KV entry, no consumer)", orgs.workflow),
            ("first run (steps stream, 3 consumers)", orgs.first_run),
            ("dead-letter stream", orgs.dead_letter_stream),
            ("connections closed", orgs.close),
        ]
        for phase, action in phases:
            began = time.monotonic()
            await orgs.each(action)
            took = time.monotonic() - began
            readings.append(await read(server, prof_port, phase, took, settle))
        return readings
    finally:
        server.stop()


def render(n: int, readings: list[Reading]) -> str:
    lines = [
        f"{n:,} orgs: growth per org after each phase (RSS is noisy; heap is after a GC)",
        "",
        "| phase | streams / consumers | RSS | per org | heap | per org | stacks | per org |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    previous = readings[0]
    for r in readings:
        rss_kb = (r.rss_mb - previous.rss_mb) * 1024 / n
        heap_kb = (r.heap_mb - previous.heap_mb) * 1024 / n
        stack_kb = (r.stack_mb - previous.stack_mb) * 1024 / n
        lines.append(
            f"| {r.phase} | {r.streams:,} / {r.consumers:,} | {r.rss_mb:,.0f} MB | "
            f"{rss_kb:+,.0f} KB | {r.heap_mb:,.1f} MB | {heap_kb:+,.0f} KB | "
            f"{r.stack_mb:,.1f} MB | {stack_kb:+,.0f} KB |"
        )
        previous = r
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orgs", type=int, default=200, help="number of orgs (default 200)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--settle", type=float, default=SETTLE_S, help="seconds after each phase (default 15)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deadlift-org-cost-") as work:
        readings = asyncio.run(run(args.orgs, Path(work), args.settle))
    if args.json:
        print(json.dumps([asdict(r) for r in readings], indent=2))
    else:
        print(render(args.orgs, readings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
