"""Worker memory per org: one process serving N orgs vs a process per org (issue 15, item 4).

It starts a nats-server with one account per org (``--orgs`` of them, ``o001``…),
gives every org one small workflow (one step, ``add_ten``), then for each N of
``--sizes`` starts ``deadlift worker --orgs o001,…`` (one process, a worker per
org), sends each served org one event, waits for every output, lets it settle
for ``--settle`` seconds, and reads the process's RSS (``VmRSS`` of
``/proc/PID/status``). It does the same for one ``deadlift --org o001 worker``
(one org, one process) and estimates a process per org as N times that.

Run it from the repository root (about a minute for 1, 10 and 50 orgs)::

    .venv/bin/python bench/orgs_per_process.py --sizes 1,10,50

Prints a table, then the figures as JSON on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.orgs import load_orgs
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "workers" / "dist" / "add_ten.wasm"
FLOW = """
name: calc
org: {org}
trigger: {org}.calc.in
steps:
  - {{name: add, module: add_ten, function: add_ten, publish: [{org}.calc.out]}}
"""


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid``, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def org_name(i: int) -> str:
    return f"o{i:03d}"


async def prepare(server: EmbeddedServer, orgs_file: Path, orgs: list[str]) -> dict[str, Any]:
    """Each org's client, with add_ten pushed and its workflow applied."""
    manifest = load_orgs(orgs_file)
    clients = {}
    for org in orgs:
        settings = Settings(nats_url=server.url, org=org, orgs_file=str(orgs_file))
        nc = await bus.connect(settings, name="bench")
        js = nc.jetstream()
        registry = await Registry.open(js)
        await push_module_file(registry, MODULE)
        flow = parse_workflow(FLOW.format(org=org))
        await apply_workflows(js, registry, settings, [(flow, "calc.yaml")], orgs=manifest)
        clients[org] = nc
    return clients


async def outputs(nc: Any, org: str) -> int:
    info = await nc.jetstream().stream_info(Stream.EVENTS, subjects_filter=f"{org}.calc.out")
    return sum((info.state.subjects or {}).values())


async def measure(
    clients: dict[str, Any], command: list[str], orgs: list[str], ready: str, settle: float
) -> dict[str, Any]:
    """Start ``command``, wait for ``ready`` in its log, run one event per org, read RSS."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    assert process.stderr is not None
    log: list[str] = []
    drain: asyncio.Task[bytes] | None = None
    try:
        while not any(ready in line for line in log):
            line = (await asyncio.wait_for(process.stderr.readline(), 300)).decode()
            if not line:
                raise RuntimeError("worker exited at start:\n" + "".join(log[-20:]))
            log.append(line)
        start_s = time.monotonic() - started
        drain = asyncio.create_task(process.stderr.read())  # keep the pipe from filling
        before = {org: await outputs(clients[org], org) for org in orgs}
        for org in orgs:
            event = events.new_event({"value": 1}, source="bench", type="bench")
            headers, body = events.encode(event)
            await bus.JetStreamPublisher(clients[org]).publish(f"{org}.calc.in", body, headers)
        deadline = time.monotonic() + 120
        for org in orgs:
            while await outputs(clients[org], org) <= before[org]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no output for org {org}")
                await asyncio.sleep(0.05)
        await asyncio.sleep(settle)
        rss = rss_mb(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), 60)
        if drain is not None:
            drain.cancel()
    return {
        "orgs": len(orgs),
        "rss_mb": round(rss, 1),
        "start_s": round(start_s, 2),
        "exit": status,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    orgs = [org_name(i) for i in range(1, max(sizes) + 1)]
    with tempfile.TemporaryDirectory(prefix="deadlift-orgs-bench-") as tmp:
        orgs_file = Path(tmp) / "orgs.yaml"
        manifest = {"orgs": {org: {"users": [{"user": org, "password": org}]} for org in orgs}}
        orgs_file.write_text(yaml.safe_dump(manifest))
        with EmbeddedServer(orgs=load_orgs(orgs_file)) as server:
            clients = await prepare(server, orgs_file, orgs)
            cli = [sys.executable, "-m", "deadlift.cli", "--server", server.url]
            cli += ["--orgs", str(orgs_file)]
            single = await measure(
                clients, [*cli, "--org", orgs[0], "worker"], orgs[:1], "worker running", args.settle
            )
            fleets = []
            for n in sizes:
                served = orgs[:n]
                command = [*cli, "worker", "--orgs", ",".join(served)]
                fleets.append(await measure(clients, command, served, "serving", args.settle))
            for nc in clients.values():
                await nc.close()
    return {"one_org_process": single, "one_process_n_orgs": fleets, "cpus": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="1,10,50", help="orgs per process (default 1,10,50)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before reading RSS")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    single = result["one_org_process"]["rss_mb"]
    print(f"{'orgs':>5}  {'one process (MB)':>17}  {'a process per org (MB, est.)':>29}  start (s)")
    for row in result["one_process_n_orgs"]:
        n = row["orgs"]
        print(f"{n:>5}  {row['rss_mb']:>17.1f}  {n * single:>29.1f}  {row['start_s']:>9.2f}")
    print(f"one-org process (deadlift --org o001 worker): {single:.1f} MB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
