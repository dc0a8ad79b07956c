"""``deadlift bench``'s baselines: the loop Deadlift must beat, as a process of its own.

A plain nats-py pull consumer → Extism call → ``publish_async`` with
``Nats-Msg-Id`` → await the PubAcks → ack, written without Deadlift (batches of
256, the module called inline). With ``--per-message`` it creates an Extism
plugin per message, as the original Deadlift proof of concept did.

It runs as a process, started and timed exactly as a worker is
(:mod:`deadlift.ops.bench_gate`), on the event loop the CLI uses (uvloop when
installed, unless ``DEADLIFT_LOOP=asyncio``)::

    python -m deadlift.ops.bench_bare NATS_URL COUNT [--per-message]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Coroutine
from typing import Any

import extism
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from deadlift import bus
from deadlift.ops.bench_gate import Gate
from deadlift.ops.bench_support import module_wasm
from deadlift.settings import Settings
from deadlift.wire import events

STREAM = "BARE"
CONSUMER = "bare"
INPUT = "bare.in"
OUTPUT = "bare.out"
BATCH = 256
GATE = Gate(STREAM, CONSUMER, ((STREAM, CONSUMER),), OUTPUT, STREAM)
"""The bare loop's one consumer, held and released as a worker's is."""


def command(server_url: str, count: int, *, per_message: bool = False) -> list[str]:
    """The bare loop's command line."""
    flag = ["--per-message"] if per_message else []
    return [sys.executable, "-m", "deadlift.ops.bench_bare", server_url, str(count), *flag]


async def setup(js: Any) -> None:
    """The bare loop's stream (file store, the server's defaults) and durable consumer."""
    await js.add_stream(StreamConfig(name=STREAM, subjects=[INPUT, OUTPUT]))
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=INPUT,
            max_ack_pending=-1,
        ),
    )


def _manifest(wasm: bytes) -> dict[str, Any]:
    return {"wasm": [{"data": wasm}], "timeout_ms": 1000, "memory": {"max_pages": 256}}


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


async def bare_loop(server_url: str, count: int, *, per_message: bool = False) -> None:
    """Process ``count`` events of the bare stream, then return."""
    wasm = module_wasm()
    nc = await bus.connect(Settings(nats_url=server_url), name="bench-bare")
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM)
    plugin = None if per_message else extism.Plugin(_manifest(wasm), functions=[])
    done = 0
    while done < count:
        try:
            msgs = await sub.fetch(BATCH, timeout=5)
        except (TimeoutError, nats.errors.TimeoutError):
            continue  # held: the bench opens the gate once this pull waits
        acks = []
        for msg in msgs:
            event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
            runner = plugin or extism.Plugin(_manifest(wasm), functions=[])
            out = runner.call("add_ten", _json(event.data))
            headers = {events.MSG_ID: f"{event.id}:out"}
            acks.append(await js.publish_async(OUTPUT, out, headers=headers))
        await asyncio.gather(*acks)
        for msg in msgs:
            await msg.ack()
        done += len(msgs)
    await nc.drain()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """On the event loop ``deadlift`` commands use."""
    if os.environ.get("DEADLIFT_LOOP", "auto").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: list[str]) -> None:
    url, count, *flags = argv
    _run(bare_loop(url, int(count), per_message="--per-message" in flags))


if __name__ == "__main__":
    main(sys.argv[1:])
