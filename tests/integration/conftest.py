"""Fixtures of the integration tests: a real nats-server -js on a free loopback port.

A module that plays several orgs declares them in a module fixture ``orgs_file``;
``orgs``, ``server``, ``clients``, ``connect``, ``acme`` and ``stripe`` then give it
its own server with one account per org (see ``tests/integration/accounts.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from click.testing import CliRunner, Result
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.cli import main
from deadlift.model.orgs import OrgManifest, load_orgs
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from tests.conftest import module_path, recreated
from tests.integration.accounts import Clients, Connect, Org


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedServer]:
    """One real nats-server -js on a free loopback port with a temp store, for the session."""
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def settings(nats_server: EmbeddedServer) -> Settings:
    """Settings pointing at the test server, with short waits for fast tests."""
    return Settings(nats_url=nats_server.url, ack_wait_s=5.0, default_timeout_ms=1000)


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    """A client on a clean JetStream: every stream (and so every bucket) is deleted first."""
    client = await bus.connect(settings, name="deadlift-test")
    js = client.jetstream()
    for name in await js.streams_info():
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name.config.name)
    yield client
    await client.drain()


@pytest.fixture
async def registry(nc: Client) -> Registry:
    """The registry on the clean JetStream (its buckets were just deleted: see ``recreated``)."""
    registry: Registry = await recreated(lambda: Registry.open(nc.jetstream()))
    return registry


@pytest.fixture
def push(registry: Registry) -> Callable[..., Awaitable[Any]]:
    """Push a module from workers/dist by file stem: ``await push("add_ten")``."""

    async def push_(name: str, **options: Any) -> Any:
        meta, _ = await push_module_file(registry, module_path(name), **options)
        return meta

    return push_


@pytest.fixture
def apply(nc: Client, registry: Registry, settings: Settings) -> Callable[..., Awaitable[Workflow]]:
    """Apply a workflow given as YAML text."""

    async def apply_(text: str) -> Workflow:
        workflow = parse_workflow(text, source="test.yaml")
        [applied] = await apply_workflows(
            nc.jetstream(), registry, settings, [(workflow, "test.yaml")]
        )
        return applied

    return apply_


# -- one account per org, for a module that declares its orgs in a fixture `orgs_file` --


@pytest.fixture(scope="module")
def orgs(orgs_file: Path) -> OrgManifest:
    """The module's org manifest."""
    return load_orgs(orgs_file)


@pytest.fixture(scope="module")
def server(orgs: OrgManifest) -> Iterator[EmbeddedServer]:
    """A nats-server with one account per org of the module's manifest, for the module."""
    with EmbeddedServer(orgs=orgs) as embedded:
        yield embedded


@pytest.fixture
async def clients(
    server: EmbeddedServer, orgs_file: Path, orgs: OrgManifest
) -> AsyncIterator[Clients]:
    """Connects as the module's orgs; every client is closed at the end of the test."""
    opened = Clients(server, orgs_file, orgs)
    yield opened
    await opened.close()


@pytest.fixture
def connect(clients: Clients) -> Connect:
    """``await connect("acme")``: that org on clean streams (``Clients.org``)."""
    return clients.org


@pytest.fixture
async def acme(connect: Connect) -> Org:
    """Acme on clean streams."""
    org: Org = await connect("acme")
    return org


@pytest.fixture
async def stripe(connect: Connect) -> Org:
    """Stripe on clean streams."""
    org: Org = await connect("stripe")
    return org


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures root logging; put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def cli(settings: Settings, *args: str) -> Result:
    """``deadlift --server URL ARGS`` in-process with CliRunner (in a thread: it runs a loop)."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, main, ["--server", settings.nats_url, *args], catch_exceptions=True
    )
