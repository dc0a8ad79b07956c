"""What the benchmark scenarios share: the result record, the module, the backlog, processes.

Every worker in a scenario is the real CLI, ``deadlift worker``, started by
:func:`worker_command` and run by :class:`Processes`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from deadlift.errors import DeadliftError
from deadlift.model.topology import Stream
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "workers" / "dist" / "add_ten.wasm"
STOP_S = 30.0  # how long a stopped worker process may take to drain and exit


@dataclass
class Result:
    """One scenario's figures."""

    name: str
    events: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    runs: list[float] = field(default_factory=list)  # events/s of each run, if several

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds else 0.0


def module_wasm() -> bytes:
    if not MODULE.is_file():
        raise FileNotFoundError(f"{MODULE} not found; run from a Deadlift checkout")
    return MODULE.read_bytes()


async def prefill(js: Any, subject: str, count: int) -> None:
    """Publish ``count`` Deadlift events, awaiting their PubAcks in windows."""
    window: list[Any] = []
    for n in range(count):
        event = events.new_event({"value": n}, source="bench", type="bench")
        headers, body = events.encode(event)
        headers[events.MSG_ID] = event.id
        window.append(await js.publish_async(subject, body, headers=headers))
        if len(window) >= 2000:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)


async def until(
    condition: Callable[[], Awaitable[bool]], timeout: float, *, every: float = 0.005
) -> None:
    """Return once ``condition()`` is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(every)


async def stored(js: Any, subject: str, stream: str = Stream.EVENTS) -> int:
    """Messages stored on subjects matching ``subject`` (``state.messages`` counts all)."""
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


# -- worker processes ---------------------------------------------------------------


def worker_command(processes: int | None = None) -> list[str]:
    """``deadlift worker`` as a user runs it: the default, or ``--processes N``.

    The one place the bench spells the worker's command line. The default
    (``None``) is what ``deadlift worker`` does with no flag: since issue 16,
    one process per available core under a supervisor.
    """
    command = [sys.executable, "-m", "deadlift.cli", "--log-level", "WARNING", "worker"]
    return command if processes is None else [*command, "--processes", str(processes)]


def worker_env(server_url: str, **extra: str) -> dict[str, str]:
    """The environment of a bench worker: this one, on ``server_url``, without a manifest.

    ``DEADLIFT_PROCESSES`` is dropped so that ``deadlift worker`` runs its default.
    """
    env = {k: v for k, v in os.environ.items() if k != "DEADLIFT_PROCESSES"}
    return {**env, "DEADLIFT_NATS_URL": server_url, "DEADLIFT_ORGS_FILE": "/nonexistent", **extra}


class Processes:
    """Child processes of a scenario: started together, stopped with SIGTERM, then waited for.

    Their stdout is discarded and their stderr kept in a temporary file:
    :meth:`check` raises, with its last lines, when one has exited early.
    """

    def __init__(self, commands: Sequence[Sequence[str]], env: Mapping[str, str]) -> None:
        self.commands = [list(c) for c in commands]
        self.env = dict(env)
        self.running: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def __enter__(self) -> Self:
        for command in self.commands:
            log = tempfile.TemporaryFile()  # closed in stop()
            self._logs.append(log)
            self.running.append(
                subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
            )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.running]

    def check(self) -> None:
        """Raise DeadliftError if a process has failed (exited with a status other than 0)."""
        for command, process, log in zip(self.commands, self.running, self._logs, strict=True):
            if process.poll() not in (None, 0):
                raise DeadliftError(
                    f"bench: {' '.join(command[1:])} exited with status "
                    f"{process.returncode}:\n{_tail(log)}"
                )

    def stop(self) -> None:
        """SIGTERM every process (a supervisor passes it on), wait, SIGKILL the late."""
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
        self.running.clear()
        self._logs.clear()


def _tail(log: IO[bytes], lines: int = 15) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(no output)"


def worker_children(pid: int) -> int:
    """How many worker processes ``pid`` supervises (its children running ``worker``)."""
    found = 0
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:  # it has just exited
                continue
            found += b"worker" in argv
    return found


def rss_mb(pid: int) -> float:
    """A process's resident memory, MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
