"""Tests that play several orgs, each with its own NATS account on one real server.

A test module declares its orgs in a module fixture ``orgs_file`` (written with
``write_orgs``); the fixtures in ``conftest.py`` then load it (``orgs``), start a
server with one account per org for that module (``server``), and connect as
any of its orgs (``clients``, ``connect``), closing every client when the test ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.connection import DeadliftClient
from deadlift.bus.integration_streams import ensure_integration_streams
from deadlift.bus.registry import Registry
from deadlift.demo import stripe_host_functions
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import module_path, recreated


def write_orgs(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` to ``folder/orgs.yaml``; return its path."""
    path = folder / "orgs.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def as_org(server: EmbeddedServer, orgs_file: Path, org: str) -> Settings:
    """Settings of ``org`` on ``server``, with short waits for fast tests."""
    return Settings(
        nats_url=server.url,
        org=org,
        orgs_file=str(orgs_file),
        ack_wait_s=5.0,
        default_timeout_ms=2000,
    )


async def clean(nc: Client) -> Registry:
    """Delete the org's streams (so each test starts empty); return its registry."""
    js = nc.jetstream()
    for info in await js.streams_info():
        await js.delete_stream(info.config.name or "")
    registry: Registry = await recreated(lambda: Registry.open(js))
    return registry


class Org:
    """One org's connection, registry and settings, on clean streams."""

    def __init__(
        self, name: str, nc: DeadliftClient, registry: Registry, settings: Settings
    ) -> None:
        self.name = name
        self.nc = nc
        self.js = nc.jetstream()
        self.registry = registry
        self.settings = settings

    async def push(self, file: str, **options: Any) -> Any:
        """Push a module of workers/dist by file stem: ``await acme.push("add_ten")``."""
        meta, _ = await push_module_file(self.registry, module_path(file), **options)
        return meta

    async def apply(self, text: str, orgs: OrgManifest, *, source: str = "test.yaml") -> Workflow:
        """Apply a workflow given as YAML text, held to the org manifest."""
        [applied] = await apply_workflows(
            self.js, self.registry, self.settings, [(parse_workflow(text), source)], orgs=orgs
        )
        return applied

    def host(self, orgs: OrgManifest, **options: Any) -> Worker:
        """This org's worker, hosting its guests' modules: held to ``orgs``, with the
        demo's host functions (the ones integrations grant), not advertised."""
        return Worker(
            self.nc,
            settings=self.settings,
            orgs=orgs,
            host_functions=stripe_host_functions(),
            advertise=False,
            **options,
        )


Connect = Callable[..., Awaitable[Any]]
"""The ``connect`` fixture: ``await connect("acme")``."""


class Clients:
    """Connects as any org of the manifest on ``server``; ``close`` closes every client."""

    def __init__(self, server: EmbeddedServer, orgs_file: Path, orgs: OrgManifest) -> None:
        self.server = server
        self.orgs_file = orgs_file
        self.orgs = orgs
        self.opened: list[DeadliftClient] = []

    async def connect(self, org: str) -> DeadliftClient:
        """A client of ``org``'s account, its streams as they are."""
        client = await bus.connect(as_org(self.server, self.orgs_file, org))
        self.opened.append(client)
        return client

    async def org(self, org: str, *, streams: bool = True, kind: type[Org] = Org) -> Org:
        """``org`` on clean streams, as a ``kind`` (``Org`` or a module's subclass of it);
        with ``streams``, its integration streams made again, as its worker or CLI does on start."""
        client = await self.connect(org)
        registry = await clean(client)
        if streams:  # patiently: they were just deleted
            js = client.jetstream()
            await recreated(lambda: ensure_integration_streams(js, self.orgs, org))
        return kind(org, client, registry, as_org(self.server, self.orgs_file, org))

    async def close(self) -> None:
        """Close every client still open."""
        for client in self.opened:
            if not client.is_closed:
                await client.close()
