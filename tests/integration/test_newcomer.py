"""A newcomer's first hour (issue 14), against real servers and the real CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deadlift import bus
from deadlift.errors import DeadliftError
from deadlift.model.orgs import load_orgs
from deadlift.model.topology import Stream
from deadlift.ops.server import LOG_NAME, EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import ROOT, module_path

pytestmark = pytest.mark.slow

ORGS = ROOT / "config" / "orgs.yaml"
CALCULATOR = ROOT / "config" / "workflows" / "calculator.yaml"


@pytest.fixture(scope="module")
def accounts() -> Iterator[EmbeddedServer]:
    """A server with one account per org of the repository's manifest."""
    with EmbeddedServer(orgs=load_orgs(ORGS)) as server:
        yield server


def deadlift(
    server: EmbeddedServer, *args: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run the CLI against ``server`` in ``cwd``, with no org or manifest from the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("DEADLIFT_ORGS_FILE", "DEADLIFT_ORG")}
    return subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "--server", server.url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def calculator(accounts: EmbeddedServer) -> dict[str, str]:
    """Acme's calculator applied (calc.in captured); the sha256 of each module by name."""
    shas = {}
    for name in ("add_ten", "multiply_by_five"):
        pushed = deadlift(
            accounts, "--org", "acme", "module", "push", "--json", str(module_path(name))
        )
        assert pushed.returncode == 0, pushed.stderr
        shas[name] = json.loads(pushed.stdout)["sha256"]
    applied = deadlift(accounts, "--org", "acme", "workflow", "apply", str(CALCULATOR))
    assert applied.returncode == 0, applied.stderr
    return shas


def test_module_push_json(accounts: EmbeddedServer) -> None:
    wasm = str(module_path("add_ten"))
    args = ["--org", "acme", "module", "push", "--json", "--name", "nc_add", wasm]
    pushed = deadlift(accounts, *args)
    assert pushed.returncode == 0, pushed.stderr
    meta = json.loads(pushed.stdout)
    assert (meta["name"], meta["version"], meta["codec"], meta["new"]) == (
        "nc_add",
        "1",
        "json",
        True,
    )
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])
    assert json.loads(deadlift(accounts, *args).stdout)["new"] is False


def test_apply_names_the_pinned_versions(
    accounts: EmbeddedServer, calculator: dict[str, str]
) -> None:
    applied = deadlift(accounts, "--org", "acme", "workflow", "apply", str(CALCULATOR))
    assert applied.returncode == 0, applied.stderr
    assert f"add: add_ten@1 sha256:{calculator['add_ten'][:12]}" in applied.stdout
    as_json = deadlift(accounts, "--org", "acme", "workflow", "apply", "--json", str(CALCULATOR))
    [report] = json.loads(as_json.stdout)
    assert report["key"] == "acme.calculator"
    add = next(s for s in report["steps"] if s["name"] == "add")
    assert (add["module_version"], add["sha256"]) == ("1", calculator["add_ten"])


def test_publish_json(accounts: EmbeddedServer, calculator: dict[str, str]) -> None:
    args = ["--org", "acme", "publish", "--json", "--id", "nc-1", "calc.in", '{"value": 1}']
    published = deadlift(accounts, *args)
    assert published.returncode == 0, published.stderr
    ack = json.loads(published.stdout)
    assert ack["id"] == "nc-1" and ack["subject"] == "calc.in" and ack["duplicate"] is False
    assert ack["stream"] and ack["seq"] >= 1
    assert json.loads(deadlift(accounts, *args).stdout)["duplicate"] is True


def test_module_inspect_shows_an_iso_time(
    accounts: EmbeddedServer, calculator: dict[str, str]
) -> None:
    shown = deadlift(accounts, "--org", "acme", "module", "inspect", "add_ten")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"pushed_at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown.stdout)
    info = json.loads(
        deadlift(accounts, "--org", "acme", "module", "inspect", "add_ten", "--json").stdout
    )
    assert isinstance(info["pushed_at"], float)
    assert info["pushed_at_iso"].endswith("Z")


def test_org_works_from_a_subdirectory_of_the_project(
    accounts: EmbeddedServer, calculator: dict[str, str]
) -> None:
    published = deadlift(
        accounts,
        "--org",
        "acme",
        "publish",
        "calc.in",
        '{"value": 2}',
        cwd=ROOT / "deadlift" / "cli",
    )
    assert published.returncode == 0, published.stderr


def test_refused_authorization_advises_org_or_creds(accounts: EmbeddedServer) -> None:
    refused = deadlift(accounts, "publish", "calc.in", "{}")
    assert refused.returncode == 1
    assert "--org NAME" in refused.stderr and "--creds FILE" in refused.stderr
    assert "deadlift server" not in refused.stderr
    assert "NATS error" not in refused.stderr  # the cause is said once, in the error


async def test_non_ascii_event_type_survives_the_server(
    accounts: EmbeddedServer, calculator: dict[str, str]
) -> None:
    published = deadlift(
        accounts, "--org", "acme", "publish", "--type", "zoë.日本", "calc.in", '{"v": 3}'
    )
    assert published.returncode == 0, published.stderr
    nc = await bus.connect(Settings(nats_url=accounts.url, org="acme", orgs_file=str(ORGS)))
    try:
        msg = await nc.jetstream().get_last_msg(Stream.EVENTS, "calc.in")
    finally:
        await nc.drain()
    event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
    assert event.type == "zoë.日本"
    assert event.data == {"v": 3}


def test_demo_quiet_prints_only_the_verdict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "demo", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "demo passed\n"
    assert result.stderr == ""


def test_server_start_failure_shows_what_nats_server_said(
    accounts: EmbeddedServer, tmp_path: Path
) -> None:
    taken = EmbeddedServer(port=accounts.port, store_dir=tmp_path / "store")
    with pytest.raises(DeadliftError, match="address already in use") as failed:
        taken.start()
    assert str(tmp_path / "store" / LOG_NAME) in str(failed.value)
    assert (tmp_path / "store" / LOG_NAME).is_file()
