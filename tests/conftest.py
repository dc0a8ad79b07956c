"""Shared fixtures: a real nats-server with JetStream, real Wasm modules from workers/."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "workers" / "dist"


def module_path(name: str) -> Path:
    """A built module from workers/dist."""
    return MODULES / f"{name}.wasm"


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
    """The registry on the clean JetStream."""
    return await Registry.open(nc.jetstream())


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


async def publish(nc: Client, subject: str, data: Any, *, id: str | None = None) -> events.Event:
    """Publish a Deadlift event durably; return it."""
    event = events.new_event(data, source="test", type="test.event", id=id)
    headers, body = events.encode(event)
    headers[events.MSG_ID] = event.id
    await bus.JetStreamPublisher(nc).publish(subject, body, headers)
    return event


async def raw_messages(nc: Client, stream: str, subject: str) -> list[Any]:
    """Every raw message (headers and body) stored on ``subject`` in ``stream``, in order."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return []
    found: list[Any] = []
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        found.append(msg)
        seq = msg.seq + 1
    return found


async def stored(nc: Client, subject: str, stream: str = Stream.EVENTS) -> list[events.Event]:
    """Every event stored on ``subject`` in ``stream``, decoded, in order."""
    return [
        events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
        for msg in await raw_messages(nc, stream, subject)
    ]


async def eventually(
    condition: Callable[[], Any], *, timeout: float = 10.0, message: str = "condition"
) -> Any:
    """Poll ``condition`` (sync or async) until it is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{message} not met within {timeout} s (last value: {last!r})")
