"""``deadlift workflow apply|ls|graph|rm``: workflows in the registry."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from deadlift.bus.registry import Registry, dump_json
from deadlift.cli.common import console, run_async, settings_of, with_registry
from deadlift.model.graph import render
from deadlift.ops.control import apply_files, load_orgs_if_present, remove_workflow
from deadlift.settings import Settings


@click.group()
def workflow() -> None:
    """Apply, list and draw workflows."""


@workflow.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.pass_context
def workflow_apply(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Validate workflow FILES against the registry and store them (all or nothing)."""

    @with_registry
    async def apply(settings: Settings, nc: Any, registry: Registry) -> None:
        applied = await apply_files(nc.jetstream(), registry, settings, files)
        for w in applied:
            steps = ", ".join(f"{s.name}={s.module}" for s in w.steps)
            console.print(
                f"applied [bold]{w.key}[/bold] (trigger {escape(', '.join(w.trigger))}): "
                f"{escape(steps)}"
            )

    run_async(apply(settings_of(ctx)))


@workflow.command("ls")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def workflow_ls(ctx: click.Context, as_json: bool) -> None:
    """List applied workflows."""

    @with_registry
    async def ls(settings: Settings, nc: Any, registry: Registry) -> None:
        found = await registry.workflows()
        if as_json:
            click.echo(dump_json([w.model_dump() for w in found]))
            return
        table = Table("org", "workflow", "trigger", "steps")
        for w in found:
            table.add_row(
                w.org,
                w.name,
                escape(", ".join(w.trigger)),
                escape(" → ".join(f"{s.name}({s.module})" for s in w.steps)),
            )
        console.print(table)

    run_async(ls(settings_of(ctx)))


@workflow.command("graph")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot"]),
    default="mermaid",
    show_default=True,
)
@click.pass_context
def workflow_graph(ctx: click.Context, name: str, fmt: str) -> None:
    """Print workflow NAME (ORG.NAME or NAME) as a graph, with its cross-org edges."""

    @with_registry
    async def graph(settings: Settings, nc: Any, registry: Registry) -> None:
        orgs = load_orgs_if_present(settings.orgs_file)
        click.echo(render(await registry.workflow(name), fmt, orgs))

    run_async(graph(settings_of(ctx)))


@workflow.command("rm")
@click.argument("name")
@click.pass_context
def workflow_rm(ctx: click.Context, name: str) -> None:
    """Remove workflow NAME: workers finish its in-flight events and stop its steps."""

    @with_registry
    async def rm(settings: Settings, nc: Any, registry: Registry) -> None:
        removed = await remove_workflow(nc.jetstream(), registry, name)
        console.print(f"removed workflow {removed.key}")

    run_async(rm(settings_of(ctx)))


COMMANDS: list[click.Command] = [workflow]
