"""``scale.py --orgs N``: what N orgs cost the server, and a fleet serving them (issue 15).

N orgs in one manifest: a server with one account each, limited by ``LIMITS`` (the
defaults, 64 MiB of memory and 1 GiB of storage per org, cannot all be reserved by
1,000 orgs: the server then refuses to start JetStream). Per org, with the org's
own credentials, ``add_ten`` is pushed and one 3-step workflow applied (``o{i}.in``
-> ``o{i}.out``), 8 orgs at a time. Measured: the server's start with every
account, the apply of all orgs, nats-server RSS with the accounts only and after
the applies (the difference per org), streams and consumers (``/jsz``), and the
server's CPU over 10 s of no traffic.

Then, with ``--worker-processes P`` (0: not), the fleet (``scale_fleet.py``): one
event is published to every org's trigger, P ``deadlift worker --orgs …`` processes
are started, each serving every P-th org with the manifest's users, and measured:
seconds from their start until every org's output was stored, their RSS (summed),
and, once their steps have gone cold, their idle CPU (summed) and the server's RSS
and idle CPU at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from scale_common import WASM, cpu_seconds, fmt, monitor, note, rss_mb, workflow_yaml
from scale_fleet import Fleet, fleet_cells, run_fleet

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings

AT_ONCE = 8
PASSWORD = "bench-dev"
LIMITS = {"max_memory": "1MiB", "max_storage": "64MiB"}


@dataclass
class OrgRow:
    """What one N of orgs measured; None where a phase did not run."""

    orgs: int
    server_start_s: float | None = None
    apply_s: float | None = None
    server_rss_accounts_mb: float | None = None
    server_rss_applied_mb: float | None = None
    per_org_kb: float | None = None
    streams: int | None = None
    consumers: int | None = None
    server_idle_cpu_pct: float | None = None
    fleet: Fleet | None = None  # with --worker-processes
    load_avg: list[float] = field(default_factory=list)  # 1-min, at the start and the end
    problems: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.orgs


async def apply_org(url: str, manifest: OrgManifest, path: Path, org: str) -> None:
    """Push add_ten and apply one 3-step workflow as ``org`` (its own account)."""
    # Credentials given, not looked up: --org alone re-reads the manifest on every
    # connect, which for 1,000 orgs made the bench measure YAML parsing (O(N²)).
    settings = Settings(nats_url=url, org=org, user=org, password=PASSWORD, orgs_file=str(path))
    nc = await bus.connect(settings, name="deadlift-bench-scale")
    try:
        js = nc.jetstream()
        registry = await Registry.open(js)
        await push_module_file(registry, WASM, name="add_ten")
        loaded = [(parse_workflow(workflow_yaml("flow", org, org)), f"{org}.yaml")]
        await apply_workflows(js, registry, settings, loaded, orgs=manifest)
    finally:
        await nc.close()


async def run_orgs(n: int, args: argparse.Namespace, work: Path) -> OrgRow:
    """Measure N orgs on a fresh server (stopped before it returns)."""
    row = OrgRow(orgs=n, load_avg=[os.getloadavg()[0]])
    names = [f"o{i}" for i in range(n)]
    user = {"user": "", "password": PASSWORD}
    raw = {"orgs": {o: {"users": [user | {"user": o}], "limits": LIMITS} for o in names}}
    manifest, path = OrgManifest.model_validate(raw), work / "orgs.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    began, server = time.monotonic(), EmbeddedServer(store_dir=work / "store", orgs=manifest)
    try:
        server.start(timeout=args.apply_timeout)  # thousands of accounts take a while
        row.server_start_s = time.monotonic() - began
        assert server.process is not None
        pid = server.process.pid
        row.server_rss_accounts_mb = rss_mb(pid)
        note(f"N={n} orgs: server up in {row.server_start_s:.1f} s; applying {AT_ONCE} at a time")
        slots, began = asyncio.Semaphore(AT_ONCE), time.monotonic()

        async def one(org: str) -> None:
            async with slots:
                await apply_org(server.url, manifest, path, org)

        async with asyncio.timeout(args.apply_timeout), asyncio.TaskGroup() as group:
            for org in names:
                group.create_task(one(org))
        row.apply_s = time.monotonic() - began
        jsz = monitor(server, "jsz")
        row.streams, row.consumers = jsz.get("streams"), jsz.get("consumers")
        note(f"N={n} orgs: applied in {row.apply_s:.1f} s; server idle for {args.idle:.0f} s")
        cpu = cpu_seconds(pid)
        await asyncio.sleep(args.idle)
        row.server_idle_cpu_pct = (cpu_seconds(pid) - cpu) / args.idle * 100
        row.server_rss_applied_mb = rss_mb(pid)
        if row.server_rss_applied_mb is not None and row.server_rss_accounts_mb is not None:
            grown = row.server_rss_applied_mb - row.server_rss_accounts_mb
            row.per_org_kb = grown * 1024 / n
        if args.worker_processes:
            row.fleet = Fleet(processes=args.worker_processes)
            try:
                await run_fleet(server, path, names, row.fleet, args, work, password=PASSWORD)
            finally:
                row.problems.extend(row.fleet.problems)
    except Exception as exc:  # reported; the next N still runs
        what = "server start" if row.server_start_s is None else "apply"
        what = "fleet" if row.fleet is not None else what
        first = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
        late = what == "apply" and time.monotonic() - began >= args.apply_timeout
        why = "timed out" if late or isinstance(exc, TimeoutError) else f"failed: {first}"
        row.problems.append(f"{what} {why} after {time.monotonic() - began:.0f} s")
    finally:
        server.stop()
        row.load_avg.append(os.getloadavg()[0])
    return row


def org_cells(r: OrgRow) -> dict[str, str]:
    """One table row."""
    return {
        "orgs": f"{r.orgs:,}",
        "server start": fmt(r.server_start_s, unit=" s"),
        "apply (all orgs)": fmt(r.apply_s, unit=" s"),
        "nats-server RSS: accounts only": fmt(r.server_rss_accounts_mb, ",.0f", " MB"),
        "applied": fmt(r.server_rss_applied_mb, ",.0f", " MB"),
        "per org": fmt(r.per_org_kb, ",.0f", " KB"),
        "streams / consumers": f"{fmt(r.streams, ',')} / {fmt(r.consumers, ',')}",
        "idle CPU (server)": fmt(r.server_idle_cpu_pct, unit="%"),
        **(fleet_cells(r.fleet) if r.fleet is not None else {}),
    }
