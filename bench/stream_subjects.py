"""How long nats-server takes to create and update a stream of N literal subjects.

A workflow's own subjects (its triggers and publish subjects) are captured by the
org's events stream, one subject each: 10,000 workflows are a stream of 20,000
subjects. The server checks them pairwise on every create and update, so the time
grows with the square of N. From the repository root::

    .venv/bin/python bench/stream_subjects.py [--sizes 2000,5000,10000,20000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from nats.js.api import StreamConfig

from deadlift.ops.server import EmbeddedServer


async def measure(sizes: list[int]) -> None:
    with EmbeddedServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=600)
        print(f"{'subjects':>9}  {'create':>8}  {'update (+1)':>11}")
        for n in sizes:
            subjects = [f"bench.w{i}.{k}" for i in range(n // 2) for k in ("in", "out")]
            began = time.monotonic()
            await js.add_stream(StreamConfig(name=f"S{n}", subjects=subjects))
            created = time.monotonic() - began
            began = time.monotonic()
            await js.update_stream(StreamConfig(name=f"S{n}", subjects=[*subjects, "bench.x.in"]))
            print(f"{n:>9,}  {created:>7.2f}s  {time.monotonic() - began:>10.2f}s", flush=True)
            await js.delete_stream(f"S{n}")
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="2000,5000,10000,20000", help="numbers of subjects")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    asyncio.run(measure(sizes))


if __name__ == "__main__":
    main()
