"""The registry watch a worker keeps open: correct, and free while nothing changes.

Real nats-server: the session's, or one of the test's own behind a TCP proxy the
test cuts, or one whose account may not subscribe to the bucket's subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

import deadlift.bus.watch
from deadlift import bus
from deadlift.bus.registry import WORKFLOWS, Registry
from deadlift.model.topology import Stream
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops.server import EmbeddedServer, free_port
from deadlift.settings import Settings

TIMEOUT = 10.0


def flow(name: str, trigger: str = "calc.in") -> Workflow:
    text = (
        f"name: {name}\norg: acme\ntrigger: {trigger}\nsteps:\n"
        "  - {name: only, module: 'add_ten@1', function: add_ten, module_sha256: '"
        + "0" * 64
        + "'}\n"
    )
    return parse_workflow(text)


class Watch:
    """A registry watch running in the background, its yields collected."""

    def __init__(self, registry: Registry) -> None:
        self.stop = asyncio.Event()
        self.seen: list[tuple[str, str | None]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(registry))

    async def _run(self, registry: Registry) -> None:
        async for key, workflow in registry.watch_workflows(self.stop):
            self.seen.append((key, workflow and workflow.trigger[0]))
            self._changed.set()

    async def until(self, *expected: tuple[str, str | None]) -> None:
        """Wait until the yields end with ``expected``."""
        async with asyncio.timeout(TIMEOUT):
            while self.seen[-len(expected) :] != list(expected):
                self._changed.clear()
                await self._changed.wait()

    async def until_seen(self, *expected: tuple[str, str | None]) -> None:
        """Wait until each of ``expected`` was yielded, in any order."""
        async with asyncio.timeout(TIMEOUT):
            while not set(expected) <= set(self.seen):
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self._task, TIMEOUT)


@contextlib.asynccontextmanager
async def watching(registry: Registry) -> AsyncIterator[Watch]:
    watch = Watch(registry)
    try:
        yield watch
    finally:
        await watch.close()


async def test_the_watch_yields_the_stored_workflows_then_puts_and_deletes(
    registry: Registry,
) -> None:
    await registry.put_workflow(flow("first"))
    async with watching(registry) as watch:
        await watch.until(("acme.first", "calc.in"))
        await registry.put_workflow(flow("second", "calc.two"))
        await watch.until(("acme.second", "calc.two"))
        await registry.put_workflow(flow("first", "calc.changed"))
        await watch.until(("acme.first", "calc.changed"))
        await registry.delete_workflow("acme.first")
        await watch.until(("acme.first", None))
        await asyncio.sleep(1.5)  # past the second read of each key: nothing twice
    assert watch.seen == [
        ("acme.first", "calc.in"),
        ("acme.second", "calc.two"),
        ("acme.first", "calc.changed"),
        ("acme.first", None),
    ]


async def test_an_idle_watch_holds_no_consumer_and_gets_no_messages(
    registry: Registry, nc: Client
) -> None:
    """nats-py's KV watch is a consumer with heartbeats every 5 s and a task waking 4
    times a second: a host worker holds one per org, so idle orgs cost CPU."""
    await registry.put_workflow(flow("first"))
    async with watching(registry) as watch:
        await watch.until(("acme.first", "calc.in"))
        info = await nc.jetstream().stream_info(Stream.REGISTRY)
        assert info.state.consumer_count == 0
        received = nc.stats["in_msgs"]
        await asyncio.sleep(6)  # more than the 5 s heartbeat of a consumer
        assert nc.stats["in_msgs"] == received


async def test_a_put_the_stream_refused_is_never_reported(registry: Registry, nc: Client) -> None:
    """A put's message reaches the watch's subscription even when the stream refuses it."""
    async with watching(registry) as watch:
        refused = flow("ghost").model_dump_json().encode()
        subject = f"$KV.{WORKFLOWS}.acme.ghost"
        headers = {"Nats-Expected-Last-Subject-Sequence": "12345"}
        ack = await nc.request(subject, refused, headers=headers, timeout=TIMEOUT)
        assert b"wrong last sequence" in ack.data  # the stream did refuse it
        await registry.put_workflow(flow("real"))
        await watch.until(("acme.real", "calc.in"))
        await asyncio.sleep(1.5)  # past the second read of the refused key
    assert watch.seen == [("acme.real", "calc.in")]


class Proxy:
    """A TCP proxy to a server, whose connections the test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.open = True
        self._pipes: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._pipes += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def cut(self) -> None:
        """Close every connection and refuse new ones."""
        self.open = False
        for writer in self._pipes:
            writer.close()
        self._pipes.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_changes_made_while_disconnected_are_read_after_reconnecting(
    tmp_path: Path,
) -> None:
    """Core messages sent while a client is disconnected are lost: the watch reads
    every entry again once reconnected."""
    with EmbeddedServer(store_dir=tmp_path / "store") as server:
        proxy = Proxy(server.port)
        await proxy.start()
        direct = await bus.connect(Settings(nats_url=server.url), name="test-writer")
        watched = await bus.connect(
            Settings(nats_url=f"nats://127.0.0.1:{proxy.port}"), name="test-watcher"
        )
        try:
            writer = await Registry.open(direct.jetstream())
            await writer.put_workflow(flow("kept"))
            await writer.put_workflow(flow("dropped"))
            async with watching(await Registry.open(watched.jetstream())) as watch:
                await watch.until_seen(("acme.kept", "calc.in"), ("acme.dropped", "calc.in"))
                proxy.cut()
                await asyncio.sleep(0.5)
                await writer.put_workflow(flow("kept", "calc.moved"))
                await writer.delete_workflow("acme.dropped")
                await writer.put_workflow(flow("added"))
                proxy.open = True
                await watch.until_seen(
                    ("acme.kept", "calc.moved"), ("acme.dropped", None), ("acme.added", "calc.in")
                )
        finally:
            await proxy.close()
            await watched.close()
            await direct.close()


async def test_a_watch_its_account_may_not_subscribe_for_still_works(tmp_path: Path) -> None:
    """Accounts rendered before the watch subscribed to the bucket: a JetStream watch."""
    config = tmp_path / "old.conf"
    config.write_text(
        "accounts: { ACME: { jetstream: enabled, users: [ {user: acme, password: pw,"
        ' permissions: { publish: ">", subscribe: {allow: ["_INBOX.>"]} } } ] } }\n'
    )
    with EmbeddedServer(store_dir=tmp_path / "store", config_file=config) as server:
        client = await bus.connect(
            Settings(nats_url=server.url, user="acme", password="pw"), name="test-old-account"
        )
        try:
            registry = await Registry.open(client.jetstream())
            await registry.put_workflow(flow("first"))
            async with watching(registry) as watch:
                await watch.until(("acme.first", "calc.in"))
                await registry.put_workflow(flow("second"))
                await watch.until(("acme.second", "calc.in"))
        finally:
            await client.close()


async def test_an_invalid_stored_workflow_is_skipped_and_the_watch_goes_on(
    registry: Registry, nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Written around `workflow apply` (a raw KV put): the org's other workflows still run."""
    kv = registry.workflows_bucket
    await kv.put("acme.broken", b"{not a workflow")
    await registry.put_workflow(flow("first"))
    async with watching(registry) as watch:
        await watch.until(("acme.first", "calc.in"))
        await kv.put("acme.broken", b"[]")
        await registry.put_workflow(flow("second"))
        await watch.until(("acme.second", "calc.in"))
    assert [key for key, _ in watch.seen] == ["acme.first", "acme.second"]
    assert "workflow acme.broken in the registry is not valid, not run" in caplog.text


async def test_a_flood_of_unstored_keys_is_bounded_and_stored_changes_still_come(
    registry: Registry, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone in the account may publish on the bucket's subjects, stored or not: past
    MAX_NAMED keys waiting, the watch reads what is stored instead of each key named."""
    monkeypatch.setattr(deadlift.bus.watch, "MAX_NAMED", 50)
    async with watching(registry) as watch:
        headers = {"Nats-Expected-Last-Subject-Sequence": "12345"}  # the stream refuses
        for k in range(2_000):
            await nc.publish(f"$KV.{WORKFLOWS}.acme.flood{k}", b"{}", headers=headers)
        await registry.put_workflow(flow("real"))
        await watch.until(("acme.real", "calc.in"))
    assert watch.seen == [("acme.real", "calc.in")]
