"""Where the registry is kept: one stream per org, or an earlier version's three buckets.

Real nats-server (the session fixture), real modules from workers/dist.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.api import ObjectStoreConfig, StorageType

from deadlift.bus import buckets
from deadlift.bus.registry import Registry
from deadlift.bus.registry_store import CHUNK_BYTES, ChunkedBinaries, registry_stream_config
from deadlift.errors import ModuleError, NotFoundError
from deadlift.model.topology import Bucket, Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows
from deadlift.settings import Settings
from tests.conftest import module_path

FLOW = """
name: single
org: acme
trigger: calc.single
steps:
  - name: only
    module: add_ten
    function: add_ten
"""


def padded(name: str, size: int) -> bytes:
    """A real module grown past ``size`` bytes by a custom section (still valid Wasm)."""
    wasm = module_path(name).read_bytes()
    filler = b"\x07padding" + b"\x00" * size  # name length, name, then the payload
    length, encoded = len(filler), b""
    while True:  # the section's size as unsigned LEB128
        byte, length = length & 0x7F, length >> 7
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return wasm + b"\x00" + encoded + filler


async def streams(nc: Client) -> set[str]:
    return {str(s.config.name) for s in await nc.jetstream().streams_info()}


async def test_an_orgs_registry_is_one_stream(
    nc: Client, registry: Registry, push: Callable[..., Awaitable[Any]], settings: Settings
) -> None:
    """Modules, their binaries and workflows: one stream of the account, not three."""
    meta = await push("add_ten")
    workflow = parse_workflow(FLOW, source="single.yaml")
    await apply_workflows(nc.jetstream(), registry, settings, [(workflow, "single.yaml")])
    names = await streams(nc)
    assert Stream.REGISTRY in names
    assert not {n for n in names if n.startswith(("KV_deadlift_", "OBJ_deadlift_"))}
    assert await registry.binary(meta.sha256) == module_path("add_ten").read_bytes()
    assert [w.key for w in await registry.workflows()] == ["acme.single"]
    # Only the streams the org needs now: the registry and the events (the steps
    # stream comes with the first event sent from step to step).
    assert names == {Stream.REGISTRY, Stream.EVENTS}


async def test_a_binary_of_many_chunks_is_stored_and_read_whole(
    nc: Client, registry: Registry
) -> None:
    wasm = padded("add_ten", 3 * CHUNK_BYTES + 5)
    meta, changed = await registry.push_module(wasm, name="big")
    assert changed
    assert await registry.binary(meta.sha256) == wasm
    info = await nc.jetstream().stream_info(
        Stream.REGISTRY, subjects_filter=f"$KV.{Bucket.BINARIES}.{meta.sha256}.>"
    )
    assert len(info.state.subjects or {}) == 4  # 3 whole chunks and the rest


async def test_an_interrupted_binary_put_is_not_listed_and_a_retry_is_whole(nc: Client) -> None:
    """Chunks are written before the listing: a put cut short leaves no binary to load."""
    js = nc.jetstream()
    await js.add_stream(registry_stream_config())
    store = ChunkedBinaries(js, Stream.REGISTRY, Bucket.BINARIES)
    data = os.urandom(2 * CHUNK_BYTES + 1)
    sha = hashlib.sha256(data).hexdigest()
    await js.publish(f"$KV.{Bucket.BINARIES}.{sha}.0", data[:CHUNK_BYTES])  # then it stopped
    assert not await store.has(sha)
    assert await store.get(sha) is None
    assert await store.shas() == []
    await store.put(sha, data)
    assert await store.get(sha) == data
    assert await store.shas() == [sha]


async def test_a_deleted_binary_leaves_nothing_stored(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(registry_stream_config())
    store = ChunkedBinaries(js, Stream.REGISTRY, Bucket.BINARIES)
    data = os.urandom(CHUNK_BYTES + 1)
    sha = hashlib.sha256(data).hexdigest()
    await store.put(sha, data)
    await store.delete(sha)
    assert await store.get(sha) is None
    assert (await js.stream_info(Stream.REGISTRY)).state.messages == 0


async def test_a_tampered_chunk_is_reported_corrupt_not_run(nc: Client, registry: Registry) -> None:
    """Whoever writes the account's registry cannot swap a binary under its sha256."""
    wasm = padded("add_ten", CHUNK_BYTES)
    meta, _ = await registry.push_module(wasm, name="big")
    subject = f"$KV.{Bucket.BINARIES}.{meta.sha256}.1"
    await nc.jetstream().publish(subject, b"\x01" * (len(wasm) - CHUNK_BYTES))
    with pytest.raises(ModuleError, match="corrupt"):
        await registry.binary(meta.sha256)
    listing = f"$KV.{Bucket.BINARIES}.{meta.sha256}"
    await nc.jetstream().publish(listing, b"not json")
    with pytest.raises(ModuleError, match="corrupt"):
        await registry.binary(meta.sha256)


async def test_a_removed_modules_binary_is_gone(
    registry: Registry, push: Callable[..., Awaitable[Any]]
) -> None:
    meta = await push("echo")
    await registry.remove_module("echo")
    assert await registry.binary_shas() == []
    with pytest.raises(NotFoundError, match="missing"):
        await registry.binary(meta.sha256)


async def test_an_earlier_versions_buckets_are_used_as_they_are(
    nc: Client, settings: Settings
) -> None:
    """An org whose registry is in the three buckets keeps it: nothing moves under a fleet."""
    js = nc.jetstream()
    for stream in await streams(nc):
        await js.delete_stream(stream)
    objects = await js.create_object_store(
        Bucket.BINARIES, config=ObjectStoreConfig(storage=StorageType.FILE)
    )
    await buckets.key_value(js, Bucket.MODULES, history=5)
    await buckets.key_value(js, Bucket.WORKFLOWS, history=10)
    registry = await Registry.open(js)
    wasm = module_path("add_ten").read_bytes()
    meta, _ = await registry.push_module(wasm, name="add_ten")
    assert (await objects.get(meta.sha256)).data == wasm  # in the old Object Store
    workflow = parse_workflow(FLOW, source="single.yaml")
    await apply_workflows(js, registry, settings, [(workflow, "single.yaml")])
    names = await streams(nc)
    assert Stream.REGISTRY not in names
    assert {f"KV_{Bucket.WORKFLOWS}", f"KV_{Bucket.MODULES}", f"OBJ_{Bucket.BINARIES}"} <= names
    reopened = await Registry.open(js)
    assert await reopened.binary(meta.sha256) == wasm
    assert [w.key for w in await reopened.workflows()] == ["acme.single"]
    stop = asyncio.Event()
    async for key, watched in reopened.watch_workflows(stop):
        assert (key, watched is not None) == ("acme.single", True)
        break


@pytest.mark.parametrize(
    "listing",
    [
        {"size": 2**40, "chunks": 2**23},  # far over the module limit
        {"size": 10, "chunks": 1_000_000},  # more chunks than its size needs
    ],
)
async def test_a_hostile_listing_is_corrupt_and_read_no_further(
    nc: Client, registry: Registry, listing: dict[str, int]
) -> None:
    """A worker serving many orgs must not be made to read gigabytes or a million chunks
    by whoever may write one org's registry."""
    wasm = module_path("add_ten").read_bytes()
    meta, _ = await registry.push_module(wasm, name="add_ten")
    subject = f"$KV.{Bucket.BINARIES}.{meta.sha256}"
    await nc.jetstream().publish(subject, json.dumps(listing).encode())
    with pytest.raises(ModuleError, match="corrupt"):
        await asyncio.wait_for(registry.binary(meta.sha256), 5)


async def test_an_oversized_chunk_is_corrupt(nc: Client, registry: Registry) -> None:
    wasm = padded("add_ten", CHUNK_BYTES)
    meta, _ = await registry.push_module(wasm, name="big")
    chunk = f"$KV.{Bucket.BINARIES}.{meta.sha256}.0"
    await nc.jetstream().publish(chunk, b"\x01" * (CHUNK_BYTES + 1))
    with pytest.raises(ModuleError, match="corrupt"):
        await registry.binary(meta.sha256)
