"""Is this deployment healthy? What ``deadlift health`` (an exec probe) checks.

The worker has no HTTP endpoint: containers and systemd units ask with
``deadlift health`` (NATS and JetStream answer with these credentials), and
``--worker`` (a live, healthy worker answers on this host). A report is a
JSON-friendly dict with ``ok`` and ``problems``.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from deadlift import bus
from deadlift.errors import DeadliftError
from deadlift.model.topology import Stream
from deadlift.ops.discovery import discover_workers
from deadlift.settings import Settings


async def check_health(
    settings: Settings, *, worker: bool, streams: bool, timeout: float
) -> dict[str, Any]:
    """What ``deadlift health`` checks, as a report with ``ok``.

    Raises:
        DeadliftError: NATS refused or did not take the connection.
        TimeoutError: NATS or JetStream did not answer within ``timeout``.
    """
    report: dict[str, Any] = {"ok": False, "server": settings.nats_url}
    nc = await asyncio.wait_for(bus.connect(settings, name="deadlift-health"), timeout)
    try:
        report["connected_to"] = str(nc.connected_url.netloc) if nc.connected_url else None
        js = nc.jetstream(timeout=timeout)
        account = await js.account_info()
        report["jetstream"] = {"streams": account.streams, "consumers": account.consumers}
        problems: list[str] = []
        if streams:
            report["streams"] = await _check_streams(js, problems)
        if worker:
            report["workers_here"] = await _check_workers_here(nc, timeout, problems)
        report["problems"] = problems
        report["ok"] = not problems
        return report
    finally:
        await nc.close()


async def _check_streams(js: JetStreamContext, problems: list[str]) -> dict[str, Any]:
    """Each of Deadlift's streams: its replicas and leader (noting what is wrong)."""
    found: dict[str, Any] = {}
    for name in (Stream.EVENTS, Stream.STEPS, Stream.DLQ):
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            found[name] = {"error": "not found"}
            problems.append(f"stream {name} not found (no workflow applied yet?)")
            continue
        except Exception as exc:
            found[name] = {"error": str(exc) or type(exc).__name__}
            problems.append(f"stream {name}: {exc or type(exc).__name__}")
            continue
        cluster = info.cluster
        replicas = (cluster.replicas or []) if cluster else []
        found[name] = {
            "replicas": info.config.num_replicas or 1,
            "leader": cluster.leader if cluster else None,
            "current": sum(1 for r in replicas if r.current) + (1 if cluster else 0),
        }
        if cluster is not None and not cluster.leader:
            problems.append(f"stream {name} has no leader")
    return found


async def _check_workers_here(
    nc: Client, timeout: float, problems: list[str]
) -> list[dict[str, Any]]:
    """The live workers on this host (noting none, or one whose watchdog found a stuck call)."""
    host = socket.gethostname()
    found = await discover_workers(nc, timeout=min(timeout, 2.0))
    mine = [w for w in found if w.host == host and not w.error]
    if not mine:
        problems.append(f"no live worker on host {host} answered")
    for sick in (w for w in mine if not w.healthy):
        problems.extend(f"worker pid {sick.pid}: {p}" for p in sick.problems or ["?"])
    return [{"pid": w.pid, "steps": len(w.steps), "healthy": w.healthy} for w in mine]


async def probe(
    settings: Settings, *, worker: bool = False, streams: bool = False, timeout: float = 5.0
) -> dict[str, Any]:
    """:func:`check_health` within ``timeout`` (plus a second); never raises.

    A failure to connect, a timeout or anything unexpected is reported as a
    problem: a probe reports, it never crashes.
    """
    try:
        return await asyncio.wait_for(
            check_health(settings, worker=worker, streams=streams, timeout=timeout),
            timeout + 1.0,
        )
    except (TimeoutError, DeadliftError, OSError) as exc:
        return {"ok": False, "server": settings.nats_url, "problems": [str(exc) or "timeout"]}
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
        return {"ok": False, "server": settings.nats_url, "problems": [problem]}
