"""One worker process serving many orgs: each keeps its own connection, config and instances.

A :class:`~deadlift.runtime.fleet.Fleet` (and ``deadlift worker --orgs``) runs a
worker per org in one process, on a real nats-server with one account per org.
Acme and Globex apply the same workflows (same names, same modules): each must
get its own outputs, read its own ``config_get`` and ``secret_get`` values, count
its own calls on instances of its own, and see only its own worker; an org whose
credentials are refused is reported while the others run, and SIGTERM stops them all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deadlift.errors import DeadliftError
from deadlift.model.orgs import OrgManifest, load_orgs
from deadlift.ops.discovery import discover_workers
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.fleet import Fleet
from deadlift.runtime.watchdog import EXIT_STUCK
from deadlift.settings import Settings
from tests.conftest import ROOT, eventually, publish, stored
from tests.integration.accounts import Clients, Org, write_orgs
from tests.manifests import logins

SERVED = ("acme", "globex")
PROGRAM = {"acme": "gold", "globex": "silver"}
SECRET = {"acme": "acme-crm-token", "globex": "globex-token"}  # told apart by length

READER = """
name: reader
org: {org}
trigger: {org}.read.in
steps:
  - {{name: read, module: settings_reader, function: read,
     host_functions: [config_get, secret_get], publish: [{org}.read.out]}}
"""

COUNTER = """
name: counter
org: {org}
trigger: {org}.count.in
steps:
  - {{name: count, module: echo, function: count, concurrency: 1,
     publish: [{org}.count.out]}}
"""


def manifest(initech_password: str = "i") -> dict[str, Any]:
    """Acme and Globex with a config value and a secret each; Initech, whose password
    may be wrong."""
    orgs = logins(
        "acme",
        "globex",
        **{
            org: {"config": {"program": PROGRAM[org]}, "secrets": {"crm": {"value": SECRET[org]}}}
            for org in SERVED
        },
    )
    orgs["initech"] = {"users": [{"user": "initech", "password": initech_password}]}
    return {"orgs": orgs}


@pytest.fixture(scope="module")
def orgs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_orgs(tmp_path_factory.mktemp("orgs"), manifest())


@pytest.fixture(scope="module")
def wrong_initech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same manifest, but the worker's copy has a wrong password for Initech."""
    return write_orgs(tmp_path_factory.mktemp("wrong"), manifest(initech_password="wrong"))


@pytest.fixture
async def served(clients: Clients, orgs: OrgManifest) -> dict[str, Org]:
    """Acme and Globex on clean streams, each with the reader and counter workflows."""
    found = {}
    for name in SERVED:
        org = await clients.org(name)
        await org.push("settings_reader")
        await org.push("echo")
        for flow in (READER, COUNTER):
            await org.apply(flow.format(org=name), orgs)
        found[name] = org
    return found


def fleet_settings(server: EmbeddedServer, orgs_file: Path) -> Settings:
    return Settings(
        nats_url=server.url, orgs_file=str(orgs_file), ack_wait_s=5.0, default_timeout_ms=2000
    )


async def outputs(org: Org, what: str) -> list[Any]:
    return [e.data for e in await stored(org.nc, f"{org.name}.{what}.out")]


READ = {"config": ["program"], "secrets": ["crm"]}


def read_by(org: str) -> dict[str, Any]:
    """What the reader outputs when it runs for ``org``."""
    return {"config": {"program": PROGRAM[org]}, "secret_lengths": {"crm": len(SECRET[org])}}


async def test_one_fleet_serves_each_org_its_own_config_instances_and_worker(
    served: dict[str, Org], server: EmbeddedServer, orgs: OrgManifest, orgs_file: Path
) -> None:
    acme, globex = served["acme"], served["globex"]
    async with Fleet(SERVED, manifest=orgs, settings=fleet_settings(server, orgs_file)) as fleet:
        assert fleet.serving == ["acme", "globex"]
        for org in (acme, globex):
            await publish(org.nc, f"{org.name}.read.in", READ)
        for n in range(3):  # one at a time: the same instance serves each call
            await publish(acme.nc, "acme.count.in", {"n": n})
            await fleet.drain()
        await publish(globex.nc, "globex.count.in", {"n": 0})
        await fleet.drain()
        # Each org's `deadlift workers` sees one worker: its own, running its own steps.
        for org in (acme, globex):
            [seen] = await discover_workers(org.nc)
            assert seen.pid == os.getpid()
            assert seen.steps == [f"{org.name}.counter.count", f"{org.name}.reader.read"]
    assert await outputs(acme, "read") == [read_by("acme")]
    assert await outputs(globex, "read") == [read_by("globex")]
    # Same workflow, step and binary in both orgs: Globex's instance is not Acme's.
    assert await outputs(acme, "count") == [{"calls": 1}, {"calls": 2}, {"calls": 3}]
    assert await outputs(globex, "count") == [{"calls": 1}]
    assert fleet.stats["ok"] == 6


async def test_an_org_whose_credentials_are_refused_is_reported_and_the_others_run(
    served: dict[str, Org],
    server: EmbeddedServer,
    wrong_initech: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    acme = served["acme"]
    settings = fleet_settings(server, wrong_initech)
    wrong = load_orgs(wrong_initech)
    async with Fleet(["initech", "acme"], manifest=wrong, settings=settings) as fleet:
        assert fleet.serving == ["acme"]
        assert "Authorization Violation" in fleet.failed["initech"]
        await publish(acme.nc, "acme.read.in", READ)
        await fleet.drain()
    assert await outputs(acme, "read") == [read_by("acme")]
    assert any("org initech not served" in r.getMessage() for r in caplog.records)


async def test_credentials_of_another_orgs_account_are_refused(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """A mislabelled login (Acme's, filed as Globex's) must not serve Globex as Acme."""
    mislabelled = load_orgs(
        write_orgs(tmp_path, {"orgs": {"globex": {"users": [{"user": "acme", "password": "a"}]}}})
    )
    fleet = Fleet(["globex"], manifest=mislabelled, settings=Settings(nats_url=server.url))
    with pytest.raises(DeadliftError, match=r"no org could be served.*globex.*account ACME"):
        await fleet.start()
    await fleet.shutdown()
    assert fleet.workers == {}


async def test_a_server_without_accounts_is_refused(
    nats_server: EmbeddedServer, orgs: OrgManifest
) -> None:
    """Single-tenant, every worker already runs every org's workflows: nothing to split."""
    fleet = Fleet(SERVED, manifest=orgs, settings=Settings(nats_url=nats_server.url))
    with pytest.raises(DeadliftError, match=r"acme: the server has no accounts \(single-tenant\)"):
        await fleet.start()
    await fleet.shutdown()


@pytest.mark.parametrize("after_s", [0.0, 0.03])  # before connecting; while starting
async def test_a_fleet_shut_down_while_it_starts_stops_every_org(
    after_s: float,
    served: dict[str, Org],
    server: EmbeddedServer,
    orgs: OrgManifest,
    orgs_file: Path,
) -> None:
    fleet = Fleet(SERVED, manifest=orgs, settings=fleet_settings(server, orgs_file))
    starting = asyncio.create_task(fleet.start())
    await asyncio.sleep(after_s)
    await asyncio.wait_for(fleet.shutdown(), 30)
    await asyncio.wait_for(starting, 5)  # returns: a shutdown is not a failure to start
    assert set(fleet.failed) | set(fleet.serving) == set(SERVED)
    for org in served.values():
        assert await discover_workers(org.nc) == []


# -- the process ------------------------------------------------------------------------


def start_worker(
    server: EmbeddedServer, orgs_file: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``deadlift --orgs FILE worker ARGS`` (its stderr is the log)."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "deadlift.cli"),
            *(
                "--server",
                server.url,
                "--orgs",
                str(orgs_file),
                "worker",
                "--processes",
                "1",
                *args,
            ),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "DEADLIFT_ACK_WAIT_S": "5", **(env or {})},
    )


async def started(process: subprocess.Popen[str], *, timeout: float = 60) -> str:
    """The log of ``process`` up to the line saying which orgs it serves."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not any("serving" in line for line in lines):
        line = await asyncio.wait_for(asyncio.to_thread(process.stderr.readline), timeout)
        assert line and time.monotonic() < deadline, "".join(lines)
        lines.append(line)
    return "".join(lines)


def stop(process: subprocess.Popen[str], log: str) -> tuple[int, str]:
    """SIGTERM; the exit status and the whole log (``log``: what was read of it already)."""
    process.send_signal(signal.SIGTERM)
    try:
        _, rest = process.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        _, rest = process.communicate()
    return process.returncode, log + rest


@pytest.mark.slow
async def test_a_worker_process_serves_two_orgs_and_sigterm_stops_both(
    served: dict[str, Org], server: EmbeddedServer, orgs_file: Path
) -> None:
    process = start_worker(server, orgs_file, "--orgs", "acme,globex")
    log = ""
    try:
        log = await started(process)
        for org in served.values():
            await publish(org.nc, f"{org.name}.read.in", READ)
        for name, org in served.items():
            await eventually(lambda o=org: outputs(o, "read"), timeout=30, message=name)
        for name, org in served.items():
            [seen] = await discover_workers(org.nc)
            assert seen.pid == process.pid and seen.orgs == [name]
    finally:
        status, log = stop(process, log)
    assert status == 0, log[-3000:]
    for name, org in served.items():
        assert await outputs(org, "read") == [read_by(name)]
    assert "serving 2 of 2 org(s): acme, globex" in log
    assert "org acme stopped: ok=1" in log and "org globex stopped: ok=1" in log
    assert "worker stopped: ok=2" in log


@pytest.mark.slow
async def test_a_worker_process_reports_the_org_it_cannot_serve_and_serves_the_rest(
    served: dict[str, Org], server: EmbeddedServer, wrong_initech: Path
) -> None:
    process = start_worker(server, wrong_initech, "--all-orgs")
    log = ""
    try:
        log = await started(process)
        for org in served.values():
            await publish(org.nc, f"{org.name}.read.in", READ)
        for name, org in served.items():
            await eventually(lambda o=org: outputs(o, "read"), timeout=30, message=name)
    finally:
        status, log = stop(process, log)
    assert status == 0, log[-3000:]
    assert "org initech not served" in log and "Authorization Violation" in log
    assert "serving 2 of 3 org(s): acme, globex; not serving: initech" in log
    for name, org in served.items():
        assert await outputs(org, "read") == [read_by(name)]


CHARGES = """
name: charges
org: acme
trigger: acme.charges
steps:
  - {name: check, module: before_charge_action, function: before_charge_action,
     host_functions: [past_purchases, send_email], timeout_ms: 500, publish: [acme.charged]}
"""
CHARGE = {
    "charge_id": "ch_1",
    "customer": "alice",
    "email": "alice@example.com",
    "amount": 4.5,
    "category": "coffee",
    "ts": int(time.time()),
}


@pytest.mark.slow
async def test_a_stuck_call_of_one_org_stops_every_org_and_exits_70(
    served: dict[str, Org],
    server: EmbeddedServer,
    orgs: OrgManifest,
    orgs_file: Path,
    tmp_path: Path,
) -> None:
    """One pool serves every org: a thread stuck where nothing can interrupt it is lost to
    all of them, and keeps the process from exiting; the process goes, as a one-org one does."""
    acme = served["acme"]
    await acme.push("before_charge_action")
    await acme.apply(CHARGES, orgs)
    marker = tmp_path / "hanging"
    process = start_worker(
        server,
        orgs_file,
        *("--orgs", "acme,globex", "--host-functions", "tests.integration.stuck_pack"),
        env={
            "DEADLIFT_TEST_HANG": "1",
            "DEADLIFT_TEST_HANG_MARKER": str(marker),
            "DEADLIFT_WATCHDOG_GRACE_S": "1",
            "DEADLIFT_SHUTDOWN_TIMEOUT_S": "3",
        },
    )
    try:
        log = await started(process)
        await publish(acme.nc, "acme.charges", CHARGE)
        await eventually(marker.exists, timeout=10, message="the call is under way")
        _, rest = process.communicate(timeout=0.5 + 1 + 3 + 5 + 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    log += rest
    assert process.returncode == EXIT_STUCK, log
    assert "module call stuck: step acme/charges/check" in log
    assert "org acme: a module call is stuck" in log
    assert "org globex stopped" in log
    assert "Traceback" not in log
