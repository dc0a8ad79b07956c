"""Async bodies of the long-running CLI commands (worker, tail, dlq).

Part of the CLI layer: this is where signal handlers are installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import nats.errors
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deadlift import bus
from deadlift.bus import dlq
from deadlift.errors import DeadliftError, EventDecodeError
from deadlift.model.orgs import load_orgs
from deadlift.runtime.watchdog import EXIT_STUCK, Stuck
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostFunction, load_pack
from deadlift.wire import events

log = logging.getLogger("deadlift.cli")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def load_packs(packs: tuple[str, ...] | list[str]) -> dict[str, HostFunction]:
    """Host functions from every pack, refusing two packs that define the same name."""
    functions: dict[str, HostFunction] = {}
    for pack in packs:
        for name, fn in load_pack(pack).items():
            if name in functions:
                raise DeadliftError(f"host function {name!r} is defined by two packs ({pack})")
            functions[name] = fn
    return functions


def on_stop_signals(callback: Any) -> None:
    """Call ``callback`` on the first SIGTERM/SIGINT; cancel the command on the second."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    state = {"seen": 0}

    def handle(signum: int) -> None:
        state["seen"] += 1
        if state["seen"] == 1:
            log.info("%s: finishing in-flight events, then exiting", signal.Signals(signum).name)
            callback()
        elif main_task is not None:
            log.warning("second signal: cancelling in-flight work (it will be redelivered)")
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


async def run_worker(
    settings: Settings,
    *,
    workflows: tuple[str, ...] = (),
    concurrency: int | None = None,
    packs: tuple[str, ...] = (),
) -> None:
    """The ``deadlift worker`` command."""
    from deadlift.runtime.telemetry import configure

    flush_telemetry = configure("deadlift-worker")
    functions = load_packs(packs)
    orgs = load_orgs(settings.orgs_file) if Path(settings.orgs_file).is_file() else None
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
    names = ("ok", "filtered", "retry", "dead", "duplicate")
    stats = " ".join(f"{k}={worker.stats[k]}" for k in names)
    log.info("worker stopped: %s", stats)
    flush_telemetry()
    # Calls still running now were given up on (their events are redelivered), and
    # one stuck where nothing can interrupt it would keep the interpreter from ever
    # exiting (executor threads are joined at exit): leave without them.
    left = [str(s) for s in worker.watchdog.stuck] or worker.watchdog.running()
    if left:
        log.error("exiting with status %d; module calls left running: %s", EXIT_STUCK, left)
        hard_exit(EXIT_STUCK)


# Beyond DEADLIFT_SHUTDOWN_TIMEOUT_S, how long a stopping worker may take to drain
# its connection and flush before it is ended regardless.
EXIT_MARGIN_S = 5.0


def flush_logs() -> None:
    """Flush every logging handler and the standard streams (before ``os._exit``)."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    # A broken stream must not keep the process alive.
    for logger in loggers:
        for handler in logger.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def hard_exit(code: int) -> NoReturn:
    """Flush logs and end the process now, without joining threads (a stuck one never ends)."""
    flush_logs()
    os._exit(code)


def exit_after(seconds: float, code: int, why: Callable[[], str]) -> None:
    """End the process with ``code`` after ``seconds`` unless it has exited by then.

    A daemon thread: it works whatever the event loop or the module threads are doing.
    """

    def wait_then_exit() -> None:
        time.sleep(seconds)
        try:
            log.error("%s; exiting now with status %d", why(), code)
        finally:
            hard_exit(code)

    threading.Thread(target=wait_then_exit, name="deadlift-exit-deadline", daemon=True).start()


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


WORKER_STARTUP_S = 60.0  # a worker (a service) waits this long for NATS at start


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


def _scope(workflow: str | None) -> tuple[str | None, str | None]:
    """``ORG.NAME`` or ``NAME`` → (org, name)."""
    if workflow and "." in workflow:
        org, name = workflow.split(".", 1)
        return org, name
    return None, workflow


async def dlq_command(
    settings: Settings,
    action: str,
    *,
    ids: tuple[int, ...] = (),
    workflow: str | None = None,
    step: str | None = None,
    as_json: bool = False,
) -> None:
    """The ``deadlift dlq ls|show|replay|purge`` commands."""
    nc = await bus.connect(settings, name="deadlift-dlq")
    js = nc.jetstream()
    org, name = _scope(workflow)
    try:
        if action == "ls":
            _print_letters(await dlq.letters(js, org=org, workflow=name, step=step), as_json)
        elif action == "show":
            _show_letter(await dlq.get(js, ids[0]), as_json)
        elif action == "replay":
            chosen = (
                [await dlq.get(js, i) for i in ids]
                if ids
                else await dlq.letters(js, org=org, workflow=name, step=step)
            )
            for letter in chosen:
                subject = await dlq.replay(js, bus.JetStreamPublisher(nc), letter)
                console.print(f"replayed dead letter {letter.id} into {subject}")
            console.print(f"{len(chosen)} dead letter(s) replayed")
        elif action == "purge":
            count = await dlq.purge(js, org=org, workflow=name, step=step)
            console.print(f"{count} dead letter(s) purged")
    finally:
        await nc.drain()


def _print_letters(letters: list[dlq.DeadLetter], as_json: bool) -> None:
    if as_json:
        print(json.dumps([d.summary() for d in letters], indent=2, default=str))
        return
    table = Table("id", "org", "workflow", "step", "attempts", "kind", "error", "time")
    for d in letters:
        table.add_row(
            str(d.id), d.org, d.workflow, d.step, str(d.attempts), d.kind, d.error, d.time
        )
    console.print(table)
    if not letters:
        console.print("no dead letters")


def _show_letter(letter: dlq.DeadLetter, as_json: bool) -> None:
    try:
        event = events.decode(
            letter.original_headers(), letter.body, fallback_id="-", fallback_source="-"
        )
        data: Any = event.data.hex() if isinstance(event.data, bytes) else event.data
    except EventDecodeError as exc:
        data = f"<undecodable: {exc}> {letter.body[:200]!r}"
    if as_json:
        print(json.dumps({**letter.summary(), "data": data}, indent=2, default=str))
        return
    for key, value in letter.summary().items():
        if key != "headers":
            console.print(f"[bold]{key:>9}[/bold] {escape(str(value))}")
    console.print("[bold]  headers[/bold]")
    for key, value in letter.headers.items():
        console.print(f"           {escape(str(key))}: {escape(str(value))}")
    console.print(f"[bold]     data[/bold] {escape(json.dumps(data, default=str))}")
