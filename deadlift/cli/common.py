"""What every command shares: consoles, running async bodies, exit codes, settings.

Exit codes: 0 success, 1 a runtime error, 2 invalid input (a file, a flag).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError, DeadliftError
from deadlift.settings import Settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID = 2

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning Deadlift errors into a clear message and exit code.

    Uses uvloop when it is installed (``DEADLIFT_LOOP=asyncio`` opts out): the
    worker's hot path is event-loop bound, and uvloop makes it ~25% faster.
    """
    try:
        return _event_loop_runner()(coro)
    except ConfigError as exc:
        refuse(exc)
    except DeadliftError as exc:
        # Escaped: a message quoting user input ("[/x]") is text, not rich markup.
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(EXIT_ERROR)


def refuse(exc: ConfigError) -> NoReturn:
    """Report invalid input (as given, never as rich markup) and exit 2."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    sys.exit(EXIT_INVALID)


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
            refuse(exc)

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
