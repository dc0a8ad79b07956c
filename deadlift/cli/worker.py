"""``deadlift worker``: run workflow steps until SIGTERM/SIGINT, then stop gracefully.

This is where the worker's signal handlers and exit deadlines live (the
:class:`~deadlift.runtime.worker.Worker` installs none): the first signal
finishes in-flight events and drains, bounded in time; a second exits at once;
a module call stuck where nothing can interrupt it ends the process with
:data:`~deadlift.runtime.watchdog.EXIT_STUCK`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import click
import nats.errors

from deadlift import bus
from deadlift.cli.common import exit_after, hard_exit, run_async, settings_of
from deadlift.errors import DeadliftError
from deadlift.ops.control import load_orgs_if_present
from deadlift.runtime.telemetry import configure
from deadlift.runtime.watchdog import EXIT_STUCK, Stuck
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostFunction, load_pack

log = logging.getLogger("deadlift.cli")

# Beyond DEADLIFT_SHUTDOWN_TIMEOUT_S, how long a stopping worker may take to drain
# its connection and flush before it is ended regardless.
EXIT_MARGIN_S = 5.0
WORKER_STARTUP_S = 60.0  # a worker (a service) waits this long for NATS at start
STOPPED_STATS = ("ok", "filtered", "retry", "dead", "duplicate")


@click.command()
@click.option(
    "--workflow",
    "-w",
    "workflows",
    multiple=True,
    help="run only this workflow (ORG.NAME or NAME); repeatable",
)
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="events in flight per step")
@click.option(
    "--host-functions",
    "packs",
    multiple=True,
    envvar="DEADLIFT_HOST_FUNCTIONS",
    help="Python module offering host functions (pkg.module); repeatable",
)
@click.pass_context
def worker(
    ctx: click.Context, workflows: tuple[str, ...], concurrency: int | None, packs: tuple[str, ...]
) -> None:
    """Run workflow steps until SIGTERM/SIGINT, then finish in-flight events and drain."""
    # Until the worker installs its own handlers (once connected), a SIGTERM means
    # "never mind": nothing is in flight yet, so exit cleanly rather than die by signal.
    signal.signal(signal.SIGTERM, _exit_before_start)
    run_async(
        run_worker(settings_of(ctx), workflows=workflows, concurrency=concurrency, packs=packs)
    )


def _exit_before_start(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def load_packs(packs: tuple[str, ...] | list[str]) -> dict[str, HostFunction]:
    """Host functions from every pack, refusing two packs that define the same name."""
    functions: dict[str, HostFunction] = {}
    for pack in packs:
        for name, fn in load_pack(pack).items():
            if name in functions:
                raise DeadliftError(f"host function {name!r} is defined by two packs ({pack})")
            functions[name] = fn
    return functions


async def run_worker(
    settings: Settings,
    *,
    workflows: tuple[str, ...] = (),
    concurrency: int | None = None,
    packs: tuple[str, ...] = (),
) -> None:
    """The ``deadlift worker`` command."""
    flush_telemetry = configure("deadlift-worker")
    functions = load_packs(packs)
    orgs = load_orgs_if_present(settings.orgs_file)
    nc = await _connect_patiently(settings)
    worker = Worker(
        nc,
        settings=settings,
        workflows=workflows,
        host_functions=functions,
        concurrency=concurrency,
        orgs=orgs,
    )
    bound = settings.shutdown_timeout_s + EXIT_MARGIN_S
    worker.watchdog.on_stuck = lambda stuck: _exit_when_stuck(worker, stuck, bound)
    _on_worker_signals(worker, bound)
    try:
        await _start_patiently(worker)
        log.info(
            "worker running %d step(s): %s",
            len(worker.steps),
            ", ".join(worker.steps) or "none yet",
        )
        await worker.run_until_shutdown()
    finally:
        await worker.shutdown()
        try:
            await nc.drain()
        except Exception as exc:  # e.g. the server is restarting: nothing left to flush
            log.warning("could not drain the connection (%s); closing", exc)
            await nc.close()
    stats = " ".join(f"{k}={worker.stats[k]}" for k in STOPPED_STATS)
    log.info("worker stopped: %s", stats)
    flush_telemetry()
    # Calls still running now were given up on (their events are redelivered), and
    # one stuck where nothing can interrupt it would keep the interpreter from ever
    # exiting (executor threads are joined at exit): leave without them.
    left = [str(s) for s in worker.watchdog.stuck] or worker.watchdog.running()
    if left:
        log.error("exiting with status %d; module calls left running: %s", EXIT_STUCK, left)
        hard_exit(EXIT_STUCK)


def _exit_when_stuck(worker: Worker, stuck: list[Stuck], bound: float) -> None:
    """The watchdog found a stuck module call (in its thread): stop, then exit 70."""
    log.error(
        "this worker exits with status %d once in-flight events are settled (at most %.0f s)",
        EXIT_STUCK,
        bound,
    )
    exit_after(bound, EXIT_STUCK, lambda: f"shutdown did not finish within {bound:.0f} s")


def _on_worker_signals(worker: Worker, bound: float) -> None:
    """SIGTERM/SIGINT: a graceful shutdown, ended by force after ``bound`` seconds.

    The first signal starts the shutdown (stop pulling, finish in-flight events,
    drain), and a deadline: a module thread stuck where nothing can interrupt it
    would otherwise keep the process alive forever. A second signal exits at once.
    """
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"seen": 0}

    def why() -> str:
        running = worker.watchdog.running()
        stuck = f" (module calls still running: {'; '.join(running)})" if running else ""
        return f"shutdown did not finish within {bound:.0f} s{stuck}"

    def handle(signum: int) -> None:
        state["seen"] += 1
        name = signal.Signals(signum).name
        if state["seen"] == 1:
            log.info("%s: finishing in-flight events, then exiting (at most %.0f s)", name, bound)
            exit_after(bound, EXIT_STUCK, why)
            state["shutdown"] = asyncio.ensure_future(worker.shutdown())
        else:
            log.warning(
                "second signal (%s): exiting now; unacked events are redelivered to other workers",
                name,
            )
            hard_exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


async def _connect_patiently(settings: Settings) -> bus.DeadliftClient:
    """Connect, retrying while the server is unreachable (not on refused credentials)."""
    deadline = asyncio.get_running_loop().time() + WORKER_STARTUP_S
    while True:
        try:
            return await bus.connect(settings, name="deadlift-worker")
        except DeadliftError as exc:
            refused = "authoriz" in str(exc).lower() or "authent" in str(exc).lower()
            if refused or asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("%s; retrying", exc)
            await asyncio.sleep(1.0)


async def _start_patiently(worker: Worker) -> None:
    """Start the worker, retrying while JetStream is not answering yet (a restart)."""
    deadline = asyncio.get_running_loop().time() + WORKER_STARTUP_S
    while True:
        try:
            await worker.start()
            return
        except (TimeoutError, nats.errors.Error) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise DeadliftError(f"JetStream did not answer at start: {exc}") from None
            log.warning("JetStream not ready (%s); retrying", exc or type(exc).__name__)
            await asyncio.sleep(1.0)


COMMANDS: list[click.Command] = [worker]
