"""Where an org's registry is kept: one stream, or the three buckets of earlier versions.

Each stream costs nats-server ~42 KB of memory for as long as it exists
(``bench/org_cost.py``), and a host has thousands of orgs. The registry is
therefore one stream per org, :attr:`Stream.REGISTRY`, holding three KV key
spaces with the subjects the buckets of earlier versions used:

* ``$KV.deadlift_workflows.<org>.<name>``: applied workflows (nats-py's KV);
* ``$KV.deadlift_module_meta.<[owner/]name/version>``: module metadata (nats-py's KV);
* ``$KV.deadlift_modules.<sha256>``: a binary's size and chunk count, written
  after its chunks ``$KV.deadlift_modules.<sha256>.<i>``, so a binary that is
  listed is whole (:class:`ChunkedBinaries`).

The subjects stay those of the old buckets, so accounts rendered before
(``$KV.deadlift_workflows.>`` to subscribe) and workflow watches work unchanged. An
org whose registry is already in the old layout (``KV_deadlift_workflows``,
``KV_deadlift_module_meta``, ``OBJ_deadlift_modules``) keeps it: nothing is moved
under a running fleet. Workers of earlier versions cannot open the new layout
(their buckets would capture the same subjects): upgrade every worker of an org
together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from deadlift.bus import buckets
from deadlift.model.topology import Bucket, Stream

CHUNK_BYTES = 128 * 1024  # as nats-py's Object Store: a chunk's JSON answer stays far below 1 MB
MAX_MODULE_BYTES = 32 * 1024 * 1024  # the largest binary the registry takes
READ_AHEAD = 8  # chunks asked for at once
# Per key: a workflow's earlier versions (the old workflows bucket kept 10).
HISTORY = 10
GONE = ("DEL", "PURGE")


class Binaries(Protocol):
    """Module binaries by sha256 (the registry checks the hash of what it reads)."""

    async def put(self, sha256: str, data: bytes) -> None: ...
    async def get(self, sha256: str) -> bytes | None: ...
    async def has(self, sha256: str) -> bool: ...
    async def delete(self, sha256: str) -> None: ...
    async def shas(self) -> list[str]: ...


@dataclass(frozen=True)
class RegistryStore:
    """The registry's three key spaces, in whichever layout the org has."""

    layout: Literal["stream", "buckets"]
    binaries: Binaries
    modules: KeyValue
    workflows: KeyValue


def registry_stream_config(*, replicas: int = 1) -> StreamConfig:
    """The one stream of an org's registry: KV semantics (``buckets.kv_stream_config``)
    over the three key spaces."""
    return buckets.kv_stream_config(Bucket.WORKFLOWS, history=HISTORY, replicas=replicas).evolve(
        name=Stream.REGISTRY,
        subjects=[f"$KV.{b}.>" for b in (Bucket.WORKFLOWS, Bucket.MODULES, Bucket.BINARIES)],
    )


async def open_store(js: JetStreamContext, *, replicas: int = 1) -> RegistryStore:
    """The org's registry, created as one stream on first use."""
    if await _exists(js, f"KV_{Bucket.WORKFLOWS}"):
        return await _open_buckets(js, replicas)
    try:
        await js.stream_info(Stream.REGISTRY)
    except nats.js.errors.NotFoundError:
        # Two creators racing send the same config: the server accepts both.
        await js.add_stream(registry_stream_config(replicas=replicas))
    return RegistryStore(
        layout="stream",
        binaries=ChunkedBinaries(js, Stream.REGISTRY, Bucket.BINARIES),
        modules=buckets.kv_in(js, Bucket.MODULES, Stream.REGISTRY),
        workflows=buckets.kv_in(js, Bucket.WORKFLOWS, Stream.REGISTRY),
    )


async def _open_buckets(js: JetStreamContext, replicas: int) -> RegistryStore:
    """An earlier version's layout: an Object Store and two KV buckets."""
    try:
        objects = await js.object_store(Bucket.BINARIES)
    except nats.js.errors.NotFoundError:
        objects = await js.create_object_store(
            Bucket.BINARIES, config=ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas)
        )
    return RegistryStore(
        layout="buckets",
        binaries=ObjectStoreBinaries(objects),
        modules=await buckets.key_value(js, Bucket.MODULES, history=5, replicas=replicas),
        workflows=await buckets.key_value(js, Bucket.WORKFLOWS, history=10, replicas=replicas),
    )


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    return True


class ChunkedBinaries:
    """Binaries as KV entries of one stream: ``<sha>.<i>`` chunks, then ``<sha>`` listing them."""

    def __init__(self, js: JetStreamContext, stream: str, bucket: str) -> None:
        self.js = js
        self.stream = stream
        self.prefix = f"$KV.{bucket}."

    async def put(self, sha256: str, data: bytes) -> None:
        # Chunks of an interrupted earlier put would linger as history: clear them first.
        await self.js.purge_stream(self.stream, subject=f"{self.prefix}{sha256}.>")
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
        for i, chunk in enumerate(chunks):
            await self.js.publish(f"{self.prefix}{sha256}.{i}", chunk, stream=self.stream)
        listing = json.dumps({"size": len(data), "chunks": len(chunks)}).encode()
        await self.js.publish(f"{self.prefix}{sha256}", listing, stream=self.stream)

    async def get(self, sha256: str) -> bytes | None:
        """The binary, or None if it is not listed (missing, deleted, or a put unfinished).

        A listing or chunk not as :meth:`put` writes them gives ``b""`` (the registry
        reports it corrupt), read no further: whoever may write the account's registry
        must not make a worker serving many orgs read gigabytes or millions of chunks.
        """
        listing = await self._last(f"{self.prefix}{sha256}")
        if listing is None:
            return None
        try:
            shape = json.loads(listing)
            size, count = int(shape["size"]), int(shape["chunks"])
        except (ValueError, KeyError, TypeError):
            return b""
        if not 0 <= size <= MAX_MODULE_BYTES or count != -(-size // CHUNK_BYTES):
            return b""
        parts: list[bytes] = []
        for first in range(0, count, READ_AHEAD):
            batch = range(first, min(count, first + READ_AHEAD))
            subjects = [f"{self.prefix}{sha256}.{i}" for i in batch]
            for part in await asyncio.gather(*(self._last(s) for s in subjects)):
                if part is None or len(part) > CHUNK_BYTES:
                    return b""
                parts.append(part)
        data = b"".join(parts)
        return data if len(data) == size else b""

    async def has(self, sha256: str) -> bool:
        return await self._last(f"{self.prefix}{sha256}") is not None

    async def delete(self, sha256: str) -> None:
        # The listing first: a reader never sees a listed binary without its chunks.
        await self.js.purge_stream(self.stream, subject=f"{self.prefix}{sha256}")
        await self.js.purge_stream(self.stream, subject=f"{self.prefix}{sha256}.>")

    async def shas(self) -> list[str]:
        """Every listed binary's sha256."""
        info = await self.js.stream_info(self.stream, subjects_filter=f"{self.prefix}*")
        return sorted(s.removeprefix(self.prefix) for s in (info.state.subjects or {}))

    async def _last(self, subject: str) -> bytes | None:
        try:
            msg = await self.js.get_last_msg(self.stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        if (msg.headers or {}).get("KV-Operation") in GONE:
            return None
        return msg.data or b""


class ObjectStoreBinaries:
    """Binaries in the Object Store of an earlier version's registry."""

    def __init__(self, objects: Any) -> None:
        self.objects = objects

    async def put(self, sha256: str, data: bytes) -> None:
        await self.objects.put(sha256, data)

    async def get(self, sha256: str) -> bytes | None:
        try:
            result = await self.objects.get(sha256)
        except nats.js.errors.NotFoundError:
            return None
        return bytes(result.data or b"")

    async def has(self, sha256: str) -> bool:
        try:
            await self.objects.get_info(sha256)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def delete(self, sha256: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.objects.delete(sha256)

    async def shas(self) -> list[str]:
        try:
            infos = await self.objects.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        return sorted(i.name for i in infos if not i.deleted)
