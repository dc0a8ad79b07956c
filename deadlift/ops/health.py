"""Is this deployment healthy? What ``deadlift health`` (an exec probe) checks.

The worker has no HTTP endpoint: containers and systemd units ask with
``deadlift health`` (NATS and JetStream answer with these credentials), and
``--worker`` (a live, healthy worker answers on this host). A report is a
JSON-friendly dict with ``ok`` and ``problems``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from deadlift import bus
from deadlift.bus.identity import as_system
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
        problems: list[str] = []
        try:
            account = await js.account_info()
        except Exception as exc:
            problem = jetstream_problem(exc)
            if problem is None:
                raise
            report["jetstream"] = {"error": str(exc) or type(exc).__name__}
            report["problems"] = [problem]
            return report
        report["jetstream"] = {
            "streams": account.streams,
            "consumers": account.consumers,
            "storage": account.storage,
        }
        full = storage_problem(account.storage, account.limits.max_storage)
        if full:
            problems.append(full)
        if settings.system_creds or settings.system_user:
            report["servers"] = await _check_servers(settings, timeout, problems)
        if streams:
            report["streams"] = await _check_streams(js, problems)
        if worker:
            report["workers_here"] = await _check_workers_here(nc, timeout, problems)
        report["problems"] = problems
        report["ok"] = not problems
        return report
    finally:
        await nc.close()


# JetStream API error codes meaning "JetStream is off" (JSNotEnabledErr,
# JSNotEnabledForAccountErr).
_JS_OFF_CODES = frozenset({10076, 10039})
RESTART_ADVICE = (
    'After a storage write error (a full disk: "no space left on device") nats-server '
    "stores nothing more on that stream, or turns JetStream off, until it is restarted; "
    "freeing space is not enough: free disk space in the JetStream store directory, "
    "then restart nats-server"
)


def jetstream_problem(exc: BaseException) -> str | None:
    """The health problem for an account-info error that means JetStream is off, else None.

    With JetStream disabled the server either answers 503 "JetStream not enabled
    (for account)" or, no longer listening on ``$JS.API.>``, nothing at all
    (nats-py: ServiceUnavailableError, from "no responders"). None for anything else.
    """
    if isinstance(exc, nats.js.errors.ServiceUnavailableError) and not exc.err_code:
        return f"JetStream does not answer (no responders): it is off. {RESTART_ADVICE}"
    if isinstance(exc, nats.js.errors.APIError):
        described = (exc.description or "").lower()
        if exc.err_code in _JS_OFF_CODES or "not enabled" in described:
            return f"JetStream is disabled ({exc.description}). {RESTART_ADVICE}"
    return None


def healthz_problem(server: str, healthz: Mapping[str, Any]) -> str | None:
    """The problem in one server's ``/healthz`` answer (``{"status": ..., "error": ...}``).

    After a write error (a full disk: "no space left on device") nats-server keeps
    JetStream on, but the stream stays broken, PubAcks never come, and ``/healthz``
    says so, until the server is restarted; freeing space is not enough.
    """
    if healthz.get("status") in ("ok", None) and not healthz.get("error"):
        return None
    error = str(healthz.get("error") or healthz.get("status"))
    lowered = error.lower()
    if any(sign in lowered for sign in _STORAGE_FAILURES):
        return f"server {server}: {error}. {RESTART_ADVICE}"
    return f"server {server} is unhealthy: {error}"


_STORAGE_FAILURES = ("no space left", "write error", "out of space", "will be disabled")


async def _check_servers(
    settings: Settings, timeout: float, problems: list[str]
) -> list[dict[str, Any]]:
    """Every server's ``/healthz``, asked through the system account (its credentials set)."""
    try:
        nc = await asyncio.wait_for(
            bus.connect(as_system(settings), name="deadlift-health"), timeout
        )
    except (TimeoutError, DeadliftError, OSError) as exc:
        problems.append(f"cannot ask the servers' health with the system credentials: {exc}")
        return []
    answers: list[dict[str, Any]] = []
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SYS.REQ.SERVER.PING.HEALTHZ", b"{}", reply=inbox)
        deadline = asyncio.get_running_loop().time() + min(timeout, 1.0)
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            try:
                answer = json.loads(msg.data)
            except ValueError:
                continue
            server = (answer.get("server") or {}).get("name") or "?"
            healthz = answer.get("data") or {"status": "unavailable", "error": answer.get("error")}
            answers.append({"server": server, **healthz})
            problem = healthz_problem(server, healthz)
            if problem:
                problems.append(problem)
    finally:
        await nc.close()
    if not answers:
        problems.append("no server answered the system account's health request")
    return answers


def storage_problem(used: int, limit: int) -> str | None:
    """A problem when the account's JetStream storage is full (``limit`` < 0: unlimited)."""
    if limit > 0 and used >= limit:
        return (
            f"JetStream storage is full for this account ({used} of {limit} bytes): "
            "new events are refused until streams shrink or the limit is raised"
        )
    return None


async def _check_streams(js: JetStreamContext, problems: list[str]) -> dict[str, Any]:
    """Each of Deadlift's streams: its replicas and leader (noting what is wrong)."""
    found: dict[str, Any] = {}
    for name in (Stream.EVENTS, Stream.STEPS, Stream.DLQ):
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            if name == Stream.DLQ:  # created with the org's first dead letter: none yet
                found[name] = {"absent": "no dead letter yet"}
                continue
            if name == Stream.STEPS:  # created with the first event sent to a step's own
                found[name] = {"absent": "no event sent from step to step yet"}
                continue
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
    """The live workers on this host (noting none, one whose watchdog found a stuck call,
    and a supervisor some of whose worker processes do not answer)."""
    host = socket.gethostname()
    found = await discover_workers(nc, timeout=min(timeout, 2.0))
    mine = [w for w in found if w.host == host and not w.error]
    if not mine:
        problems.append(f"no live worker on host {host} answered")
    for sick in (w for w in mine if not w.healthy):
        problems.extend(f"worker pid {sick.pid}: {p}" for p in sick.problems or ["?"])
    # A supervisor's children answer each for itself (an org per service with --orgs).
    slots: dict[int, tuple[int, set[int]]] = {}
    for w in mine:
        if w.supervisor:
            slots.setdefault(w.supervisor["pid"], (w.supervisor["processes"], set()))[1].add(
                w.supervisor["slot"]
            )
    for pid, (processes, answered) in sorted(slots.items()):
        if len(answered) < processes:
            problems.append(
                f"supervisor pid {pid}: {len(answered)} of its {processes} worker processes "
                "answered (the others are starting, or exited and are being restarted)"
            )
    return [
        {"pid": w.pid, "steps": len(w.steps), "healthy": w.healthy, "supervisor": w.supervisor}
        for w in mine
    ]


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
