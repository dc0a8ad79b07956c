"""Many orgs in one worker process, without a server: flags, credentials, the shared pool.

What needs a server (each org's outputs, config and instances, refused credentials,
SIGTERM) is in ``tests/integration/test_fleet.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from nats.aio.client import Client

from deadlift.cli.app import main
from deadlift.errors import DeadliftError
from deadlift.model.orgs import load_orgs
from deadlift.runtime.fleet import Fleet
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings

MANIFEST = """
orgs:
  acme: {users: [{user: acme, password: a}]}
  globex: {users: [{user: globex, password: g}]}
"""


@pytest.fixture
def orgs_file(tmp_path: Path) -> Path:
    path = tmp_path / "orgs.yaml"
    path.write_text(MANIFEST)
    return path


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI configures root logging; put it back for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def worker_command(orgs_file: Path, *args: str, before: tuple[str, ...] = ()) -> Result:
    """``deadlift --server (nothing listens) --orgs FILE [BEFORE] worker ARGS``."""
    return CliRunner().invoke(
        main,
        ["--server", "nats://127.0.0.1:1", "--orgs", str(orgs_file), *before, "worker", *args],
    )


def test_an_org_the_manifest_does_not_declare_is_refused_before_connecting(
    orgs_file: Path,
) -> None:
    result = worker_command(orgs_file, "--orgs", "acme,initech")
    assert result.exit_code == 2
    assert "not in the org manifest: initech (its orgs: acme, globex)" in result.output


@pytest.mark.parametrize(
    ("before", "args", "complaint"),
    [
        ((), ("--orgs", "acme", "--all-orgs"), "--orgs and --all-orgs exclude each other"),
        ((), ("--creds-dir", "."), "--creds-dir goes with --orgs or --all-orgs"),
        (("--org", "acme"), ("--orgs", "acme,globex"), "drop --org (DEADLIFT_ORG)"),
        (("--user", "acme"), ("--all-orgs",), "drop --user (DEADLIFT_USER)"),
    ],
)
def test_flags_that_contradict_each_other_are_refused(
    orgs_file: Path, before: tuple[str, ...], args: tuple[str, ...], complaint: str
) -> None:
    result = worker_command(orgs_file, *args, before=before)
    assert result.exit_code == 2
    assert complaint in " ".join(result.output.split())


async def test_every_org_without_a_credentials_file_is_named(
    orgs_file: Path, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    fleet = Fleet(
        ["acme", "globex"],
        manifest=load_orgs(orgs_file),
        settings=Settings(nats_url="nats://127.0.0.1:1", user="someone", password="x"),
        creds_dir=creds,
    )
    with pytest.raises(DeadliftError, match="no org could be served") as refused:
        await fleet.start()
    await fleet.shutdown()
    for org in ("acme", "globex"):
        assert f"no credentials file {creds / org}.creds for org {org}" in str(refused.value)


async def test_a_worker_given_a_pool_leaves_it_running_when_it_stops() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        worker = Worker(Client(), executor=pool, threads=2, advertise=False)
        await worker.shutdown()
        assert pool.submit(sum, [1, 2]).result(timeout=5) == 3  # others still use it
