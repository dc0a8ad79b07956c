"""What every command shares: consoles, running async bodies, signals, exit codes, settings.

Exit codes: 0 success, 1 a runtime error, 2 invalid input (a file, a flag).
Signal handlers are installed here, by the commands, never by the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError, DeadliftError
from deadlift.model.orgs import OrgManifest, load_orgs
from deadlift.settings import Settings, missing_orgs_file

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
log = logging.getLogger("deadlift.cli")
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning Deadlift errors into a clear message and exit code.

    Uses uvloop when it is installed (``DEADLIFT_LOOP=asyncio`` opts out): the
    worker's hot path is event-loop bound, and uvloop makes it ~25% faster.
    """
    try:
        return _event_loop_runner()(coro)
    except DeadliftError as exc:
        fail(exc)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # A second Ctrl-C (see on_stop_signals) cancels the command: say so, no traceback.
        err_console.print("interrupted; unacknowledged events are redelivered after ack_wait")
        sys.exit(EXIT_INTERRUPTED)


def fail(exc: DeadliftError) -> NoReturn:
    """Report an error and exit: 2 for invalid input (a ConfigError), else 1.

    The message is printed as given, never as rich markup: one quoting user
    input ("[/x]") is text.
    """
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    sys.exit(EXIT_INVALID if isinstance(exc, ConfigError) else EXIT_ERROR)


def checked(check: Callable[..., str], **options: Any) -> Callable[..., Any]:
    """A click callback validating a value with a :mod:`deadlift.names` check.

    Bad input is refused before anything connects: one line naming the flag or
    argument and what it allows, exit code 2.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or ctx.resilient_parsing:
            return value
        field = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        try:
            return check(value, field=field, **options)
        except ConfigError as exc:
            fail(exc)

    return callback


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, T]], T]:
    choice = os.environ.get("DEADLIFT_LOOP", "auto").lower()
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("DEADLIFT_LOOP=uvloop but uvloop is not installed") from None
        else:
            runner: Callable[[Coroutine[Any, Any, T]], T] = uvloop.run
            return runner
    return asyncio.run


def settings_of(ctx: click.Context) -> Settings:
    """The settings built from global flags and the environment."""
    settings: Settings = ctx.obj["settings"]
    return settings


def org_manifest(settings: Settings) -> OrgManifest:
    """The org manifest of the settings; a missing one names where it was looked for.

    Raises:
        ConfigError: the manifest is missing or invalid.
    """
    missing = missing_orgs_file(settings.orgs_file)
    if missing:
        raise ConfigError(missing)
    return load_orgs(settings.orgs_file)


def tenancy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--single-tenant`` (development, loud) and the hidden, default ``--accounts``."""
    command = click.option(
        "--accounts", is_flag=True, hidden=True, help="the default; kept for scripts"
    )(command)
    return click.option(
        "--single-tenant",
        is_flag=True,
        help="development only: one shared account, no authentication (default: one "
        "account per org from the org manifest, --orgs)",
    )(command)


def tenancy(settings: Settings, *, single_tenant: bool, accounts: bool) -> OrgManifest | None:
    """The org manifest a server runs with, or None for the single-tenant mode (warned).

    Raises:
        click.UsageError: both flags given.
        ConfigError: the manifest is missing or invalid.
    """
    if single_tenant and accounts:
        raise click.UsageError("--single-tenant and --accounts exclude each other")
    if single_tenant:
        err_console.print(SINGLE_TENANT_WARNING)
        return None
    return org_manifest(settings)


def with_registry(
    func: Callable[..., Awaitable[T]],
) -> Callable[..., Coroutine[Any, Any, T]]:
    """Give an async command a connected client and the registry; close it afterwards."""

    @functools.wraps(func)
    async def wrapper(settings: Settings, *args: Any, **kwargs: Any) -> T:
        nc = await bus.connect(settings, name="deadlift-cli")
        try:
            registry = await Registry.open(nc.jetstream(), replicas=settings.stream_replicas)
            return await func(settings, nc, registry, *args, **kwargs)
        finally:
            await nc.drain()

    return wrapper


SINGLE_TENANT_WARNING = (
    "[bold red]WARNING: single-tenant development mode.[/bold red] No authentication: "
    "every client is in one account and can read, change and remove every org's "
    "workflows, modules, events and state. Never use it for more than one org or "
    "outside a development machine."
)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout (anything else as its ``str``)."""
    print(json.dumps(value, indent=2, default=str), flush=True)


# -- signals ----------------------------------------------------------------------


def on_stop_signals(callback: Callable[[], None], *, announce: bool = True) -> None:
    """Call ``callback`` on the first SIGTERM/SIGINT; cancel the running task on the second.

    For async commands (call it inside the running loop). With ``announce``, both
    are logged as a graceful stop of in-flight work.
    """
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    state = {"seen": 0}

    def handle(signum: int) -> None:
        state["seen"] += 1
        if state["seen"] == 1:
            if announce:
                name = signal.Signals(signum).name
                log.info("%s: finishing in-flight events, then exiting", name)
            callback()
        elif main_task is not None:
            if announce:
                log.warning("second signal: cancelling in-flight work (it will be redelivered)")
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


def stop_requested() -> Callable[[], bool]:
    """For synchronous commands: note SIGTERM/SIGINT instead of dying by them.

    Returns a function telling whether one has come.
    """
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return lambda: stop["now"]


# -- leaving at once ------------------------------------------------------------------


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
