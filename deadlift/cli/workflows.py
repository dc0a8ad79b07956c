"""``deadlift workflow apply|ls|graph|rm``: workflows in the registry."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from deadlift.bus.registry import ModuleMeta, Registry, dump_json
from deadlift.cli.common import console, print_json, run_async, settings_of, with_registry
from deadlift.model.graph import render
from deadlift.model.workflow import Workflow
from deadlift.ops.control import apply_files, load_orgs_if_present, remove_workflow
from deadlift.settings import Settings


@click.group()
def workflow() -> None:
    """Apply, list and draw workflows."""


@workflow.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="print each workflow's key and the module version and sha256 each step pinned",
)
@click.pass_context
def workflow_apply(ctx: click.Context, files: tuple[str, ...], as_json: bool) -> None:
    """Validate workflow FILES against the registry and store them (all or nothing).

    Prints the module version and sha256 each step is pinned to.
    """

    @with_registry
    async def apply(settings: Settings, nc: Any, registry: Registry) -> None:
        applied = await apply_files(nc.jetstream(), registry, settings, files)
        report = pinned(applied, await registry.modules())
        if as_json:
            print_json(report)
            return
        for w in report:
            console.print(
                f"applied [bold]{w['key']}[/bold] (trigger {escape(', '.join(w['trigger']))})",
                soft_wrap=True,
            )
            for s in w["steps"]:
                pin = s["module_ref"] or s["module"]
                console.print(
                    f"  {escape(s['name'])}: {escape(pin)} sha256:{(s['sha256'] or '')[:12]}",
                    soft_wrap=True,
                )

    run_async(apply(settings_of(ctx)))


def pinned(applied: list[Workflow], modules: list[ModuleMeta]) -> list[dict[str, Any]]:
    """Per applied workflow: its key, trigger, and per step the module version it pinned.

    ``module`` is the reference as written (``NAME``, ``NAME@V``, ``sha256:…``);
    ``module_ref`` the ``name@version`` whose binary the step now runs.
    """
    by_sha: dict[str, list[ModuleMeta]] = {}
    for module in modules:
        by_sha.setdefault(module.sha256, []).append(module)
    report = []
    for w in applied:
        steps = []
        for step in w.steps:
            meta = _meta_of(step.module, by_sha.get(step.module_sha256 or "", []))
            steps.append(
                {
                    "name": step.name,
                    "module": step.module,
                    "module_name": meta.name if meta else None,
                    "module_version": meta.version if meta else None,
                    "module_ref": meta.ref if meta else None,
                    "sha256": step.module_sha256,
                    "codec": step.codec,
                    "function": step.function,
                }
            )
        report.append({"key": w.key, "org": w.org, "trigger": list(w.trigger), "steps": steps})
    return report


def _meta_of(ref: str, candidates: list[ModuleMeta]) -> ModuleMeta | None:
    """Which ``name@version`` a step's reference resolved to, among those of its binary."""
    name, _, version = ref.partition("@")
    for meta in reversed(candidates):  # the newest first
        if meta.name == name and (not version or version in ("latest", meta.version)):
            return meta
    return candidates[-1] if candidates else None


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
