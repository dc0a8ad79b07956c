"""``deadlift bench``'s guest-module scenarios: what run records cost a host.

Two orgs on one server with accounts: ``host`` runs a 1-step workflow of
``add_ten`` — once as its own module, once as the module ``guest`` signed,
offered and ``host`` accepted, where every call also sends the guest a run
record (which the guest stores, in ``DEADLIFT_GUEST_RUNS``). Same server setup,
same module, same backlog, the same worker process (``deadlift worker
--processes 1``, as ``host``), timed the same way
(:mod:`deadlift.ops.bench_gate`): the difference is the guest path (the
signature check at load and one record per event).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from deadlift import bus
from deadlift.bus.integration_streams import ensure_integration_streams
from deadlift.bus.offers import accept_offer, offer_module
from deadlift.bus.registry import Registry
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import GUEST_RUNS_STREAM
from deadlift.model.workflow import parse_workflow
from deadlift.ops.bench_gate import Gate, hold, window
from deadlift.ops.bench_support import Processes, Result, prefill, worker_command, worker_env
from deadlift.ops.control import apply_workflows
from deadlift.ops.server import EmbeddedServer, write_private
from deadlift.settings import Settings
from deadlift.wire import signing

WORKFLOW = """
name: bench
org: host
trigger: host.in
steps:
  - {{name: s0, module: {module}, function: add_ten, publish: [host.out]}}
"""


def _orgs(signing_key: str) -> dict[str, Any]:
    return {
        "orgs": {
            "host": {"users": [{"user": "host", "password": "bench-host"}]},
            "guest": {"users": [{"user": "guest", "password": "bench-guest"}]},
        },
        "integrations": {
            "bench": {
                "host": "host",
                "guest": "guest",
                "signing_key": signing_key,
                "modules": {"add_ten": {"publish": ["host.out"]}},
            }
        },
    }


async def _session(server: EmbeddedServer, org: str) -> tuple[Any, Registry, Settings]:
    settings = Settings(nats_url=server.url, user=org, password=f"bench-{org}")
    nc = await bus.connect(settings, name=f"bench-{org}")
    return nc, await Registry.open(nc.jetstream()), settings


async def guest_throughput(count: int, *, guest: bool, wasm: bytes) -> Result:
    """Events/s of the host's 1-step workflow running ``add_ten`` as its own or the guest's."""
    seed, key = signing.new_key()
    orgs = _orgs(key)
    manifest = OrgManifest.model_validate(orgs)
    with tempfile.TemporaryDirectory(prefix="deadlift-bench-") as tmp:
        orgs_file = Path(tmp) / "orgs.yaml"
        write_private(orgs_file, yaml.safe_dump(orgs))
        with EmbeddedServer(orgs=manifest) as server:
            host_nc, host_registry, host_settings = await _session(server, "host")
            guest_nc, guest_registry, _ = await _session(server, "guest")
            if guest:
                meta, _ = await guest_registry.push_module(wasm, name="add_ten")
                await ensure_integration_streams(host_nc.jetstream(), manifest, "host")
                await ensure_integration_streams(guest_nc.jetstream(), manifest, "guest")
                offer = await offer_module(
                    guest_nc,
                    guest_registry,
                    manifest,
                    owner="guest",
                    ref=meta.ref,
                    host="host",
                    seed=seed,
                )
                await accept_offer(
                    host_nc.jetstream(), host_registry, manifest, host="host", ref=offer.ref
                )
                module = "guest/add_ten"
            else:
                await host_registry.push_module(wasm, name="add_ten")
                module = "add_ten"
            workflow = parse_workflow(WORKFLOW.format(module=module))
            js = host_nc.jetstream()
            await apply_workflows(
                js, host_registry, host_settings, [(workflow, "bench.yaml")], orgs=manifest
            )
            gate = Gate.of(workflow, "host.out")
            await hold(js, gate)
            await prefill(js, "host.in", count)
            env = worker_env(
                server.url,
                DEADLIFT_ORGS_FILE=str(orgs_file),
                DEADLIFT_USER="host",
                DEADLIFT_PASSWORD="bench-host",
            )
            with Processes([worker_command(1)], env) as worker:
                seconds = await window(
                    js, gate, count=count, processes=lambda: 1, check=worker.check
                )
            extra = {}
            if guest:  # the worker has drained: every record it sent is stored
                info = await guest_nc.jetstream().stream_info(GUEST_RUNS_STREAM)
                extra["run_records"] = info.state.messages
            await guest_nc.drain()
            await host_nc.drain()
    name = "1 step, guest module + run records" if guest else "1 step, own module (accounts)"
    return Result(name, count, seconds, extra=extra)
