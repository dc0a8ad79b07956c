"""``deadlift module push|ls|inspect|rm``: Wasm modules in the registry.

Offers of guest orgs' modules (``module offer|offers|accept|keygen``) are in
:mod:`deadlift.cli.offers`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from deadlift.bus.registry import Registry, dump_json
from deadlift.cli.common import (
    checked,
    console,
    print_json,
    run_async,
    settings_of,
    with_registry,
)
from deadlift.errors import ConfigError, ModuleError
from deadlift.model import names
from deadlift.ops.control import module_info, push_module_file
from deadlift.settings import Settings


@click.group()
def module() -> None:
    """Push and list Wasm modules; offer them to a host org, accept a guest's."""


@module.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--name", "-n", callback=checked(names.check_name), help="module name (default: the file name)"
)
@click.option(
    "--version",
    "-v",
    "version",
    callback=checked(names.check_version),
    help="version (default: next integer)",
)
@click.option(
    "--codec",
    type=click.Choice(["json", "msgpack", "raw"]),
    default="json",
    show_default=True,
    help="how event data is passed to the module",
)
@click.option("--timeout-ms", type=click.IntRange(min=1), help="default per-call timeout")
@click.option(
    "--max-memory-pages", type=click.IntRange(1, 65536), help="default memory limit in 64 KiB pages"
)
@click.option(
    "--json", "as_json", is_flag=True, help="print name, version, sha256, codec, new as JSON"
)
@click.pass_context
def module_push(ctx: click.Context, file: str, as_json: bool, **options: Any) -> None:
    """Validate FILE.wasm with Extism and store it in the registry.

    It is instantiated in a child process first, killed after DEADLIFT_PROBE_TIMEOUT_S.
    """

    @with_registry
    async def push(settings: Settings, nc: Any, registry: Registry) -> None:
        try:
            meta, changed = await push_module_file(
                registry, file, probe_timeout_s=settings.probe_timeout_s, **options
            )
        except ModuleError as exc:  # a module that cannot run is invalid input: exit 2
            raise ConfigError(str(exc)) from None
        if as_json:
            print_json(
                {
                    "name": meta.name,
                    "version": meta.version,
                    "ref": meta.ref,
                    "sha256": meta.sha256,
                    "codec": meta.codec,
                    "size": meta.size,
                    "exports": meta.exports,
                    "host_imports": meta.host_imports,
                    "new": changed,
                }
            )
            return
        verb = "pushed" if changed else "unchanged"
        console.print(
            f"{verb} [bold]{meta.ref}[/bold] sha256:{meta.sha256[:12]} {meta.size} bytes, "
            f"exports {', '.join(meta.exports)}"
            + (f", imports {', '.join(meta.host_imports)}" if meta.host_imports else "")
        )

    run_async(push(settings_of(ctx)))


@module.command("ls")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def module_ls(ctx: click.Context, as_json: bool) -> None:
    """List registered modules and versions."""

    @with_registry
    async def ls(settings: Settings, nc: Any, registry: Registry) -> None:
        metas = await registry.modules()
        if as_json:
            click.echo(dump_json([m.model_dump() for m in metas]))
            return
        table = Table(
            "owner", "module", "version", "sha256", "codec", "size", "exports", "host imports"
        )
        for m in metas:
            table.add_row(
                m.owner or "-",
                m.name,
                m.version,
                m.sha256[:12],
                m.codec,
                str(m.size),
                ", ".join(m.exports),
                ", ".join(m.host_imports),
            )
        console.print(table)

    run_async(ls(settings_of(ctx)))


@module.command("inspect")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def module_inspect(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a module (NAME, NAME@VERSION or sha256:HEX): exports, imports, size, limits."""

    @with_registry
    async def inspect(settings: Settings, nc: Any, registry: Registry) -> None:
        info = with_iso_times(await module_info(registry, ref))
        if as_json:
            click.echo(dump_json(info))
            return
        for key, value in info.items():
            if key == "pushed_at_iso":
                continue
            if key == "pushed_at":
                value = info["pushed_at_iso"]
            shown = ", ".join(value) if isinstance(value, list) else value
            shown = shown if shown not in (None, "") else "-"
            console.print(f"[bold]{key:>16}[/bold] {escape(str(shown))}")

    run_async(inspect(settings_of(ctx)))


def iso_utc(epoch: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC (``2026-11-30T14:13:28Z``); None when unknown (0)."""
    if not epoch:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def with_iso_times(info: dict[str, Any]) -> dict[str, Any]:
    """Module info with ``pushed_at_iso`` next to the raw ``pushed_at`` (Unix seconds)."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        out[key] = value
        if key == "pushed_at":
            out["pushed_at_iso"] = iso_utc(value)
    return out


@module.command("rm")
@click.argument("ref")
@click.pass_context
def module_rm(ctx: click.Context, ref: str) -> None:
    """Remove [OWNER/]NAME@VERSION (or every version); refused while a workflow uses it."""

    @with_registry
    async def rm(settings: Settings, nc: Any, registry: Registry) -> None:
        for meta in await registry.remove_module(ref):
            console.print(f"removed {meta.ref} (sha256:{meta.sha256[:12]})")

    run_async(rm(settings_of(ctx)))


COMMANDS: list[click.Command] = [module]
