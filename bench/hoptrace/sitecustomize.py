"""Per-hop timestamps of every event a ``deadlift worker`` runs (``bench/latency_hops.py --trace``).

Loaded by a worker process through ``PYTHONPATH`` when ``DEADLIFT_HOPTRACE`` names
a file prefix; it wraps a few of the step's functions (nothing else changes) and
writes one JSON line per acked event to ``<prefix>.<pid>``, every stamp a
``time.time()`` (the server's clock, on this machine):

read         the socket read that brought the delivery      queued   put on the pull's queue
fetched      the pull returned it                            batch    its batch began
submit       its module calls were handed to the threads     thread_in/out   its chunk ran
plugin_in/out  the Extism call itself                        back     the batch had its calls back
publish/published  its outputs written to the connection    written  the flusher wrote them
puback       its output's PubAck                             acked    its ack written
srv_in       the server's timestamp of the input (from the ack subject)

A diagnostic: it relies on the names of the functions it wraps.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

PREFIX = os.environ.get("DEADLIFT_HOPTRACE")


def install(prefix: str) -> None:  # noqa: C901 (one wrapper per stamp)
    import extism

    import deadlift.bus.direct as direct
    import deadlift.bus.pull as pull
    import deadlift.runtime.calls as calls
    import deadlift.runtime.outputs as outputs
    import deadlift.runtime.step as step

    now = time.time
    out = open(f"{prefix}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115 (for the process's life)
    state: dict[str, Any] = {"read": 0.0, "unwritten": []}
    current = threading.local()

    def stamp(msg: Any, name: str, at: float) -> None:
        stamps = getattr(msg, "_hops", None)
        if stamps is not None:
            stamps.setdefault(name, at)

    start = pull.Pull.start

    async def traced_start(self: Any) -> None:
        await start(self)
        queue = self._queue
        put = queue.put_nowait

        def put_nowait(msg: Any) -> None:
            msg._hops = {"read": state["read"], "queued": now()}
            put(msg)

        queue.put_nowait = put_nowait
        transport = self.nc._transport
        if getattr(transport, "_hops", False):
            return
        transport._hops = True
        read, writelines = transport.read, transport.writelines

        async def traced_read(n: int) -> bytes:
            data = await read(n)
            state["read"] = now()
            return data

        def traced_writelines(data: Any) -> Any:
            at = now()
            for stamps in state["unwritten"]:
                stamps.setdefault("written", at)
            state["unwritten"] = []
            return writelines(data)

        transport.read, transport.writelines = traced_read, traced_writelines

    pull.Pull.start = traced_start

    fetch = pull.Pull.fetch

    async def traced_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        msgs = await fetch(self, *args, **kwargs)
        at = now()
        for msg in msgs:
            stamp(msg, "fetched", at)
        return msgs

    pull.Pull.fetch = traced_fetch

    handle_batch = step.StepRunner._handle_batch

    async def traced_handle_batch(self: Any, msgs: Any) -> None:
        at = now()
        for msg in msgs:
            stamp(msg, "batch", at)
        await handle_batch(self, msgs)

    step.StepRunner._handle_batch = traced_handle_batch

    call_all = calls.ModuleCalls.call_all

    async def traced_call_all(self: Any, jobs: Any) -> None:
        at = now()
        for job in jobs:
            stamp(job.msg, "submit", at)
        await call_all(self, jobs)
        at = now()
        for job in jobs:
            stamp(job.msg, "back", at)

    calls.ModuleCalls.call_all = traced_call_all

    run = calls.ModuleCalls.run

    def traced_run(self: Any, jobs: Any, *args: Any, **kwargs: Any) -> None:
        current.msg = jobs[0].msg if len(jobs) == 1 else None
        at = now()
        for job in jobs:
            stamp(job.msg, "thread_in", at)
        run(self, jobs, *args, **kwargs)
        at = now()
        for job in jobs:
            stamp(job.msg, "thread_out", at)

    calls.ModuleCalls.run = traced_run

    plugin_call = extism.Plugin.call

    def traced_plugin_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        msg = getattr(current, "msg", None)
        if msg is not None:
            stamp(msg, "plugin_in", now())
        try:
            return plugin_call(self, *args, **kwargs)
        finally:
            if msg is not None:
                stamp(msg, "plugin_out", now())

    extism.Plugin.call = traced_plugin_call

    publish_all = outputs.Outputs.publish_all

    async def traced_publish_all(self: Any, jobs: Any, publisher: Any) -> None:
        at = now()
        for job in jobs:
            stamp(job.msg, "publish", at)
        await publish_all(self, jobs, publisher)
        at = now()
        for job in jobs:
            stamps = getattr(job.msg, "_hops", None)
            if stamps is None:
                continue
            stamps["published"] = at
            state["unwritten"].append(stamps)
            for ack in job.acks:
                ack.add_done_callback(lambda _, s=stamps: s.setdefault("puback", now()))

    outputs.Outputs.publish_all = traced_publish_all

    ack = direct.ack

    async def traced_ack(msg: Any) -> None:
        await ack(msg)
        stamps = getattr(msg, "_hops", None)
        if stamps is None:
            return
        stamps["acked"] = now()
        tokens = msg.reply.split(".")
        stamps["srv_in"] = int(tokens[7]) / 1e9 if len(tokens) == 9 else None
        headers = msg.headers or {}
        stamps["subject"] = msg.subject
        stamps["run"] = headers.get("ce-deadliftrun") or headers.get("ce-id")
        out.write(json.dumps(stamps) + "\n")

    direct.ack = traced_ack


if PREFIX and "worker" in sys.argv:
    install(PREFIX)
