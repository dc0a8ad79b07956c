"""``deadlift server``: a SIGTERM at any moment of its start leaves no nats-server behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

import deadlift.ops.server
from deadlift.errors import DeadliftError
from deadlift.ops.server import EmbeddedServer, free_port
from tests.conftest import ROOT

CLI = [sys.executable, "-m", "deadlift.cli"]


def accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_while_the_server_starts_stops_the_nats_server(tmp_path: Path) -> None:
    """The nats-server runs in its own session (a Ctrl-C for the CLI must not kill it
    before workers drain), so the CLI must stop it itself, even when the SIGTERM
    arrives the moment the server answers, before the CLI has printed anything."""
    port = free_port()
    process = subprocess.Popen(
        [*CLI, "server", "--port", str(port), "--store-dir", str(tmp_path / "store")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while not accepting(port) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.terminate()
    process.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while accepting(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not accepting(port), "nats-server left running after the CLI got SIGTERM"


async def test_a_config_file_given_by_absolute_path_is_included(tmp_path: Path) -> None:
    """nats-server resolves an include against the including file's directory,
    absolute or not: `deadlift server --config /abs/extra.conf` failed at start
    ("open <store>/abs/extra.conf: no such file or directory")."""
    extra = tmp_path / "elsewhere" / "extra.conf"
    extra.parent.mkdir()
    extra.write_text("max_payload: 2097152\n")
    with EmbeddedServer(config_file=extra, store_dir=tmp_path / "store") as server:
        nc = await nats.connect(server.url)
        try:
            assert nc.max_payload == 2097152
        finally:
            await nc.close()


def test_a_chosen_port_taken_before_the_server_binds_it_is_chosen_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port free when chosen can be drawn by another process's connection before
    nats-server binds it (a `deadlift bench` run failed so): the server starts on new
    ports instead of failing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        first = iter([busy])
        monkeypatch.setattr(
            deadlift.ops.server, "free_port", lambda: next(first, None) or free_port()
        )
        with EmbeddedServer() as server:
            assert server.port != busy
            assert accepting(server.port)


def test_a_port_given_and_taken_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(DeadliftError, match="address already in use"):
            EmbeddedServer(port=busy, store_dir=tmp_path / "store").start()
