"""Run N worker processes and keep them running: ``deadlift worker --processes N``.

One Python process uses about one core (the event loop holds the GIL), so a worker
uses every core as N processes, each a normal worker on the same step consumers
(durable pull consumers spread the events). The :class:`Supervisor` starts them,
restarts one that exits (with backoff, logging each restart), stops them all on
:meth:`~Supervisor.stop`, and stops everything when one exits with status 2 (a
usage or configuration error: a restart would fail the same way).

A child knows its supervisor from ``DEADLIFT_SUPERVISOR_PID`` and
``DEADLIFT_SUPERVISOR_SLOT`` (``slot/processes``): its ``describe()`` reports them
(``deadlift workers`` and ``health --worker`` group the processes), and
:func:`follow_supervisor` makes it stop when the supervisor dies. Like the worker,
this module installs no signal handlers: the CLI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deadlift.errors import ConfigError
from deadlift.runtime.watchdog import EXIT_STUCK

log = logging.getLogger("deadlift.supervisor")

PID_ENV = "DEADLIFT_SUPERVISOR_PID"
SLOT_ENV = "DEADLIFT_SUPERVISOR_SLOT"
EXIT_USAGE = 2  # a usage or configuration error: restarting cannot fix it
START_STAGGER_S = 0.1  # between the children's starts: not every import and probe at once
_PR_SET_PDEATHSIG = 1  # prctl(2)


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core node sees 64 cores in
    ``os.cpu_count()`` and its affinity; only the cgroup quota tells.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup)
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpus(root: Path) -> int | None:
    """The CPUs of a cgroup v2 ``cpu.max`` or v1 CFS quota, rounded up; None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        v1 = root / "cpu"
        try:
            quota, period = (
                (v1 / f).read_text().strip() for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            )
        except OSError:
            return None
    with contextlib.suppress(ValueError):
        if quota not in ("max", "-1") and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
    return None


def resolve_processes(value: int | str) -> int:
    """How many worker processes ``value`` (a count, or ``auto``) means.

    Raises:
        ConfigError: neither ``auto`` nor a count of at least 1.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return available_cpus()
    if (isinstance(value, int) or value.strip().isdigit()) and int(value) >= 1:
        return int(value)
    raise ConfigError(
        f"--processes (DEADLIFT_PROCESSES) is {value!r}: give a count of at least 1, or auto"
    )


@dataclass
class Backoff:
    """Delays between restarts of one child: doubling from ``first_s`` up to ``max_s``,
    back to ``first_s`` once a child has run ``steady_s``."""

    first_s: float = 0.5
    max_s: float = 30.0
    steady_s: float = 60.0
    _next: float = field(init=False)

    def __post_init__(self) -> None:
        self._next = self.first_s

    def after(self, ran_s: float) -> float:
        """The delay before restarting a child that exited after running ``ran_s`` seconds."""
        if ran_s >= self.steady_s:
            self._next = self.first_s
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


@dataclass(frozen=True, slots=True)
class Supervised:
    """What a supervised child knows of its supervisor (from its environment)."""

    pid: int
    slot: int
    processes: int


def supervised(env: Mapping[str, str] = os.environ) -> Supervised | None:
    """This process's supervisor, when a :class:`Supervisor` started it; else None."""
    try:
        slot, processes = env[SLOT_ENV].split("/")
        return Supervised(int(env[PID_ENV]), int(slot), int(processes))
    except (KeyError, ValueError):
        return None


def follow_supervisor() -> Supervised | None:
    """In a supervised child: get SIGTERM when the supervisor dies, even by SIGKILL
    (else children outlive it, still pulling). Linux only (``PR_SET_PDEATHSIG``).
    Raises SystemExit(0) if the supervisor is already gone."""
    me = supervised()
    if me is None:
        return None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != me.pid:  # it died before prctl took effect
        raise SystemExit(0)
    return me


def exit_status(code: int) -> str:
    """A child's exit code as words: ``status 70``, ``killed by SIGKILL``."""
    if code >= 0:
        return f"exited with status {code}"
    with contextlib.suppress(ValueError):
        return f"killed by {signal.Signals(-code).name}"
    return f"killed by signal {-code}"


class Supervisor:
    """Runs ``processes`` copies of ``command`` until :meth:`stop`; restarts those that exit.

    Args:
        command: the child's command line (``deadlift ... worker --processes 1``).
        processes: how many children run at once.
        stop_timeout_s: after :meth:`stop`, how long children may take to exit
            before they are killed.
        env: the children's environment (default: this process's), to which
            :data:`PID_ENV` and :data:`SLOT_ENV` are added.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        processes: int,
        stop_timeout_s: float,
        env: Mapping[str, str] | None = None,
        backoff: Backoff | None = None,
        stagger_s: float = START_STAGGER_S,
    ) -> None:
        self.command = list(command)
        self.processes = processes
        self.stop_timeout_s = stop_timeout_s
        self.env = dict(os.environ if env is None else env)
        self.backoff = backoff or Backoff()
        self.stagger_s = stagger_s
        self.restarts = 0
        self.children: dict[int, asyncio.subprocess.Process] = {}  # slot -> running child
        self._stopping = asyncio.Event()
        self._code: int | None = None  # decided by a child's usage error or a failed spawn
        self._final: dict[int, int] = {}  # slot -> exit code after stop()
        self._killed: set[int] = set()  # pids killed at the deadline

    async def run(self) -> int:
        """Start the children and keep them running until :meth:`stop`; return the exit code.

        0 when every child stopped cleanly; else a child's failure code (70 for
        one killed at the deadline), or 2 when a child reported a usage error.
        """
        slots = [
            asyncio.create_task(self._keep(slot), name=f"deadlift-process-{slot}")
            for slot in range(1, self.processes + 1)
        ]
        await self._stopping.wait()
        _, late = await asyncio.wait(slots, timeout=self.stop_timeout_s)
        if late:  # past the bound: what is left is killed
            for child in list(self.children.values()):
                log.error("worker process pid %d did not stop in time; killing it", child.pid)
                self._killed.add(child.pid)
                self._signal(child, signal.SIGKILL)
            await asyncio.wait(late)
        return self._exit_code()

    def stop(self) -> None:
        """Stop every child (SIGTERM: each finishes in-flight events and drains); idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for child in list(self.children.values()):
            self._signal(child, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL every child now (a second signal); their events are redelivered."""
        self._stopping.set()
        for child in list(self.children.values()):
            self._signal(child, signal.SIGKILL)

    async def _keep(self, slot: int) -> None:
        """Run slot ``slot``'s child until :meth:`stop`, restarting it when it exits."""
        try:
            await self._keep_running(slot)
        except Exception:  # a bug or a failed spawn must not leave a slot silently empty
            log.exception("worker process %d: cannot run it; stopping", slot)
            self._fail(1)

    async def _keep_running(self, slot: int) -> None:
        backoff = Backoff(self.backoff.first_s, self.backoff.max_s, self.backoff.steady_s)
        env = {**self.env, PID_ENV: str(os.getpid()), SLOT_ENV: f"{slot}/{self.processes}"}
        await self._pause(self.stagger_s * (slot - 1))
        while not self._stopping.is_set():
            started = time.monotonic()
            # Its own session: a Ctrl-C in the terminal reaches only the supervisor,
            # which forwards one SIGTERM (two would make a worker exit at once).
            child = await asyncio.create_subprocess_exec(
                *self.command, env=env, start_new_session=True
            )
            self.children[slot] = child
            if self._stopping.is_set():  # stop() came while it was starting
                self._signal(child, signal.SIGTERM)
            code = await child.wait()
            del self.children[slot]
            if self._stopping.is_set():
                self._final[slot] = EXIT_STUCK if child.pid in self._killed else code
                return
            ran = time.monotonic() - started
            if code == EXIT_USAGE:
                log.error(
                    "worker process %d (pid %d) exited with status 2, a usage or configuration "
                    "error (see above): a restart would fail the same way; stopping",
                    slot,
                    child.pid,
                )
                self._fail(EXIT_USAGE)
                return
            delay = backoff.after(ran)
            self.restarts += 1
            log.warning(
                "worker process %d (pid %d) %s after %.1f s; restarting it in %.1f s "
                "(restart %d of this supervisor)",
                slot,
                child.pid,
                exit_status(code),
                ran,
                delay,
                self.restarts,
            )
            await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if :meth:`stop` comes meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _fail(self, code: int) -> None:
        if self._code is None:
            self._code = code
        self.stop()

    def _exit_code(self) -> int:
        if self._code is not None:
            return self._code
        for code in self._final.values():
            # Stopped before its SIGTERM handler was installed: a clean stop too.
            if code not in (0, -signal.SIGTERM):
                return code if code > 0 else 128 - code
        return 0

    @staticmethod
    def _signal(child: asyncio.subprocess.Process, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it has just exited
            child.send_signal(signum)
