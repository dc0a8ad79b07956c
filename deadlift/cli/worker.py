"""``deadlift worker``: run workflow steps until SIGTERM/SIGINT, then stop gracefully.

One org (the connection's), or with ``--orgs``/``--all-orgs`` many in one process:
a :class:`~deadlift.runtime.fleet.Fleet` with a worker per org on its own connection.
With ``--processes N`` (default: one per CPU) above 1, this process is a
:class:`~deadlift.runtime.supervisor.Supervisor` of N such workers, each running
this command line with ``--processes 1``.

This is where the worker's signal handlers and exit deadlines live (the
:class:`~deadlift.runtime.worker.Worker` installs none): the first signal
finishes in-flight events and drains, bounded in time; a second exits at once;
a module call stuck where nothing can interrupt it ends the process with
:data:`~deadlift.runtime.watchdog.EXIT_STUCK`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import click
from click.core import ParameterSource

from deadlift.cli.common import (
    exit_after,
    fail,
    hard_exit,
    org_manifest,
    run_async,
    settings_of,
)
from deadlift.errors import ConfigError, DeadliftError
from deadlift.model.orgs import OrgManifest
from deadlift.ops.control import load_orgs_if_present
from deadlift.runtime.fleet import Fleet, org_names
from deadlift.runtime.startup import STARTUP_S, connect_patiently, start_patiently
from deadlift.runtime.supervisor import Supervisor, follow_supervisor, resolve_processes
from deadlift.runtime.telemetry import configure
from deadlift.runtime.watchdog import EXIT_STUCK, Stuck
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostFunction, load_pack

log = logging.getLogger("deadlift.cli")

# Beyond DEADLIFT_SHUTDOWN_TIMEOUT_S, how long a stopping worker may take to drain
# its connection and flush before it is ended regardless.
EXIT_MARGIN_S = 5.0
WORKER_STARTUP_S = STARTUP_S  # a worker (a service) waits this long for NATS at start
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
@click.option(
    "--orgs",
    "serve",
    multiple=True,
    metavar="ORG,ORG...",
    help="serve these orgs of the org manifest in this one process: a worker per org, on "
    "its own connection with that org's credentials; repeatable (the manifest itself is "
    "the global option: deadlift --orgs FILE worker --orgs ORG,ORG)",
)
@click.option("--all-orgs", is_flag=True, help="serve every org of the org manifest")
@click.option(
    "--processes",
    metavar="N|auto",
    help="worker processes [env DEADLIFT_PROCESSES; default auto: one per CPU available]; "
    "above 1, this process supervises N workers (this command with --processes 1), "
    "restarting any that exits, and stops them all on SIGTERM/SIGINT",
)
@click.option(
    "--creds-dir",
    type=click.Path(file_okay=False, exists=True),
    help="with --orgs/--all-orgs: a directory holding ORG.creds for each org served "
    "(default: each org's development user from the org manifest)",
)
@click.pass_context
def worker(
    ctx: click.Context,
    workflows: tuple[str, ...],
    concurrency: int | None,
    packs: tuple[str, ...],
    serve: tuple[str, ...],
    all_orgs: bool,
    creds_dir: str | None,
    processes: str | None,
) -> None:
    """Run workflow steps until SIGTERM/SIGINT, then finish in-flight events and drain.

    With --orgs or --all-orgs, one process serves many orgs: each org's worker
    connects with that org's credentials and sees only that org's account.
    With --processes N (default: one per CPU), N such worker processes share the work.
    """
    settings = settings_of(ctx)
    orgs = [name.strip() for item in serve for name in item.split(",") if name.strip()]
    _check_fleet_flags(settings, orgs=orgs, all_orgs=all_orgs, creds_dir=creds_dir)
    fleet: tuple[OrgManifest, list[str]] | None = None
    if orgs or all_orgs:
        try:  # an unknown org is refused before anything connects (exit 2)
            manifest = org_manifest(settings)
            fleet = manifest, org_names(manifest, list(manifest.orgs) if all_orgs else orgs)
        except ConfigError as exc:
            fail(exc)
    try:
        count = resolve_processes(processes if processes is not None else settings.processes)
    except ConfigError as exc:
        fail(exc)
    # Until the worker installs its own handlers (once connected), a SIGTERM means
    # "never mind": nothing is in flight yet, so exit cleanly rather than die by signal.
    signal.signal(signal.SIGTERM, _exit_before_start)
    if count > 1:
        # Every flag was checked above: a child's usage error would only repeat N times.
        sys.exit(run_async(run_supervisor(settings, command=child_command(ctx), processes=count)))
    follow_supervisor()  # a supervised child stops with its supervisor
    if fleet is None:
        run_async(run_worker(settings, workflows=workflows, concurrency=concurrency, packs=packs))
        return
    run_async(
        run_fleet(
            settings,
            manifest=fleet[0],
            orgs=fleet[1],
            creds_dir=creds_dir,
            workflows=workflows,
            concurrency=concurrency,
            packs=packs,
        )
    )


def _check_fleet_flags(
    settings: Settings, *, orgs: list[str], all_orgs: bool, creds_dir: str | None
) -> None:
    """Refuse flags that contradict each other, before anything connects (exit 2)."""
    if orgs and all_orgs:
        raise click.UsageError("--orgs and --all-orgs exclude each other")
    if not (orgs or all_orgs):
        if creds_dir:
            raise click.UsageError("--creds-dir goes with --orgs or --all-orgs")
        return
    given = [
        flag
        for flag, value in (
            ("--org (DEADLIFT_ORG)", settings.org),
            ("--creds (DEADLIFT_CREDS)", settings.creds),
            ("--user (DEADLIFT_USER)", settings.user),
            ("DEADLIFT_TOKEN", settings.token),
        )
        if value
    ]
    if given:
        raise click.UsageError(
            "--orgs/--all-orgs connect as each org with its own credentials (from the org "
            f"manifest, or --creds-dir); drop {', '.join(given)}: they name one account"
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
    nc = await connect_patiently(settings, within_s=WORKER_STARTUP_S)
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
    _on_worker_signals(worker.shutdown, worker.watchdog.running, bound)
    try:
        await start_patiently(worker, within_s=WORKER_STARTUP_S)
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


def _on_worker_signals(
    shutdown: Callable[[], Awaitable[None]], running: Callable[[], list[str]], bound: float
) -> None:
    """SIGTERM/SIGINT: a graceful shutdown, ended by force after ``bound`` seconds.

    The first signal starts the shutdown (stop pulling, finish in-flight events,
    drain), and a deadline: a module thread stuck where nothing can interrupt it
    would otherwise keep the process alive forever. A second signal exits at once.
    ``running`` names the module calls still running, for the deadline's message.
    """
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"seen": 0}

    def why() -> str:
        calls = running()
        stuck = f" (module calls still running: {'; '.join(calls)})" if calls else ""
        return f"shutdown did not finish within {bound:.0f} s{stuck}"

    def handle(signum: int) -> None:
        state["seen"] += 1
        name = signal.Signals(signum).name
        if state["seen"] == 1:
            log.info("%s: finishing in-flight events, then exiting (at most %.0f s)", name, bound)
            exit_after(bound, EXIT_STUCK, why)
            state["shutdown"] = asyncio.ensure_future(shutdown())
        else:
            log.warning(
                "second signal (%s): exiting now; unacked events are redelivered to other workers",
                name,
            )
            hard_exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


# -- many processes --------------------------------------------------------------------


def child_command(ctx: click.Context) -> list[str]:
    """This command line for a supervised child: the options given, ``--processes 1``.

    Options that came from the environment are inherited with it.
    """
    root = ctx.find_root()
    return [
        sys.executable,
        "-m",
        "deadlift.cli",
        *(_given_options(root) if root is not ctx else []),
        ctx.info_name or "worker",
        *_given_options(ctx, skip="processes"),
        "--processes",
        "1",
    ]


def _given_options(ctx: click.Context, *, skip: str = "") -> list[str]:
    """The options of ``ctx`` given on its command line, as arguments again."""
    args: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or not name or name == skip:
            continue
        if name not in ctx.params or ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[name]
        if param.is_flag:
            args.extend([param.opts[0]] if value else param.secondary_opts[:1])
        elif param.multiple:
            args.extend(arg for item in value for arg in (param.opts[0], str(item)))
        else:
            args.extend([param.opts[0], str(value)])
    return args


async def run_supervisor(settings: Settings, *, command: list[str], processes: int) -> int:
    """``deadlift worker --processes N``: run N worker processes; return the exit code.

    The first SIGTERM/SIGINT is forwarded to every child as SIGTERM (each stops
    gracefully, within the same bound as one worker); children still running after
    it are killed. A second signal kills them at once.
    """
    bound = settings.shutdown_timeout_s + EXIT_MARGIN_S
    supervisor = Supervisor(command, processes=processes, stop_timeout_s=bound)
    loop = asyncio.get_running_loop()
    seen = {"signals": 0}

    def handle(signum: int) -> None:
        seen["signals"] += 1
        name = signal.Signals(signum).name
        if seen["signals"] == 1:
            log.info("%s: stopping %d worker processes (at most %.0f s)", name, processes, bound)
            supervisor.stop()
        else:
            log.warning(
                "second signal (%s): exiting now, killing the worker processes; their "
                "unacked events are redelivered to other workers",
                name,
            )
            supervisor.kill()
            hard_exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)
    log.info("supervisor pid %d: running %d worker processes", os.getpid(), processes)
    code = await supervisor.run()
    log.info("worker processes stopped (%d restart(s)); exit status %d", supervisor.restarts, code)
    return code


# -- many orgs in one process -----------------------------------------------------------


async def run_fleet(
    settings: Settings,
    *,
    manifest: OrgManifest,
    orgs: list[str],
    creds_dir: str | None = None,
    workflows: tuple[str, ...] = (),
    concurrency: int | None = None,
    packs: tuple[str, ...] = (),
) -> None:
    """``deadlift worker --orgs ORG,ORG`` / ``--all-orgs``: a worker per org, one process."""
    flush_telemetry = configure("deadlift-worker")
    functions = load_packs(packs)
    loop = asyncio.get_running_loop()
    bound = settings.shutdown_timeout_s + EXIT_MARGIN_S

    def on_stuck(org: str, stuck: list[Stuck]) -> None:
        """In a watchdog thread. A stuck thread is lost to every org's calls (one pool),
        and keeps the process from exiting: stop every org, then exit 70."""
        log.error(
            "org %s: a module call is stuck; this process exits with status %d once every "
            "org's in-flight events are settled (at most %.0f s)",
            org,
            EXIT_STUCK,
            bound,
        )
        exit_after(bound, EXIT_STUCK, lambda: f"shutdown did not finish within {bound:.0f} s")
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(fleet.shutdown()))

    fleet = Fleet(
        orgs,
        manifest=manifest,
        settings=settings,
        creds_dir=creds_dir,
        workflows=workflows,
        host_functions=functions,
        concurrency=concurrency,
        patience_s=WORKER_STARTUP_S,
        on_stuck=on_stuck,
    )
    _on_worker_signals(fleet.shutdown, fleet.running, bound)
    try:
        await fleet.start()
        not_served = f"; not serving: {', '.join(fleet.failed)}" if fleet.failed else ""
        log.info(
            "serving %d of %d org(s): %s%s",
            len(fleet.serving),
            len(fleet.orgs),
            ", ".join(fleet.serving) or "none",
            not_served,
        )
        await fleet.run_until_shutdown()
    finally:
        await fleet.shutdown()
    for org, served in fleet.workers.items():
        log.info("org %s stopped: %s", org, _stats(served.stats))
    log.info("worker stopped: %s", _stats(fleet.stats))
    flush_telemetry()
    left = fleet.stuck() or fleet.running()
    if left:
        log.error("exiting with status %d; module calls left running: %s", EXIT_STUCK, left)
        hard_exit(EXIT_STUCK)


def _stats(stats: Counter[str]) -> str:
    return " ".join(f"{k}={stats[k]}" for k in STOPPED_STATS)


COMMANDS: list[click.Command] = [worker]
