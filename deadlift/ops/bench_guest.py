"""``deadlift bench``'s guest-module scenarios: what run records cost a host.

Two orgs on one server with accounts: ``host`` runs a 1-step workflow of
``add_ten`` — once as its own module, once as the module ``guest`` signed,
offered and ``host`` accepted, where every call also sends the guest a run
record. Same server setup, same module, same backlog: the difference is the
guest path (the signature check at load and one record per event).
"""

from __future__ import annotations

import time
from typing import Any

from deadlift import bus
from deadlift.bus.integration_streams import ensure_integration_streams
from deadlift.bus.offers import accept_offer, offer_module
from deadlift.bus.registry import Registry
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import parse_workflow
from deadlift.ops.bench_support import Result, done, prefill, until
from deadlift.ops.control import apply_workflows
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import signing

WORKFLOW = """
name: bench
org: host
trigger: host.in
steps:
  - {{name: s0, module: {module}, function: add_ten, publish: [host.out]}}
"""


def _manifest(signing_key: str) -> OrgManifest:
    return OrgManifest.model_validate(
        {
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
    )


async def _session(server: EmbeddedServer, org: str) -> tuple[Any, Registry, Settings]:
    settings = Settings(nats_url=server.url, user=org, password=f"bench-{org}")
    nc = await bus.connect(settings, name=f"bench-{org}")
    return nc, await Registry.open(nc.jetstream()), settings


async def guest_throughput(count: int, *, guest: bool, wasm: bytes) -> Result:
    """Events/s of the host's 1-step workflow running ``add_ten`` as its own or the guest's."""
    seed, key = signing.new_key()
    manifest = _manifest(key)
    with EmbeddedServer(orgs=manifest) as server:
        host_nc, host_registry, host_settings = await _session(server, "host")
        guest_nc, guest_registry, _ = await _session(server, "guest")
        if guest:
            meta, _ = await guest_registry.push_module(wasm, name="add_ten")
            await ensure_integration_streams(host_nc.jetstream(), manifest, "host")
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
        await prefill(js, "host.in", count)
        worker = Worker(host_nc, settings=host_settings, advertise=False, orgs=manifest)
        started = time.perf_counter()
        await worker.start()
        await until(lambda: done(worker, count), timeout=300)
        seconds = time.perf_counter() - started
        records = worker.stats["run_records"]
        await worker.shutdown()
        await guest_nc.drain()
        await host_nc.drain()
    name = "deadlift 1 step, guest module" if guest else "deadlift 1 step, own module (accounts)"
    return Result(name, count, seconds, extra={"run_records": records} if guest else {})
