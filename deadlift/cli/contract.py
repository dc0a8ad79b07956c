"""``deadlift contract show|check|asyncapi``: integrations, as both sides promised them."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from rich.markup import escape

from deadlift.cli.common import (
    EXIT_ERROR,
    console,
    fail,
    org_manifest,
    print_json,
    run_async,
    settings_of,
)
from deadlift.errors import ConfigError, DeadliftError
from deadlift.ops import contract as ops

T = TypeVar("T")


@click.group("contract")
def group() -> None:
    """Show integrations, check applied workflows against them, export AsyncAPI."""


@group.command("show")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def contract_show(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Print integration NAME, or every integration of --org (all without --org).

    Read from the org manifest alone: no server is needed.
    """
    settings = settings_of(ctx)
    found = _run(lambda: ops.show(org_manifest(settings), org=settings.org, name=name))
    if as_json:
        print_json(found)
        return
    if not found:
        whose = f"org {settings.org} takes part in" if settings.org else "the org manifest has"
        console.print(f"{whose} no integration")
    for item in found:
        _print_integration(item)


@group.command("check")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable report")
@click.pass_context
def contract_check(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Check both sides' applied workflows against integration NAME (or every one of --org).

    Each side is read from its own account: the acting org with its credentials,
    the other with the org manifest's development credentials when it has them
    (else it is reported not checked). Exit code 1 when a problem is found.
    """
    settings = settings_of(ctx)
    manifest = _run(lambda: org_manifest(settings))
    report = run_async(ops.check(settings, manifest, name=name))
    if as_json:
        print_json(report.as_dict())
    else:
        _print_report(report)
    if report.problems:
        sys.exit(EXIT_ERROR)


@group.command("asyncapi")
@click.option("--org", "org", help="whose subjects (default: the global --org)")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="write to FILE instead of stdout"
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML")
@click.pass_context
def contract_asyncapi(
    ctx: click.Context, org: str | None, output: str | None, as_json: bool
) -> None:
    """Print an AsyncAPI 3.0.0 document of an org's subjects and integration events."""
    settings = settings_of(ctx)
    manifest = _run(lambda: org_manifest(settings))
    org = org or settings.org
    if org is None:
        raise click.UsageError(f"name the org: --org NAME (one of: {', '.join(manifest.orgs)})")
    document = _run(lambda: ops.asyncapi(manifest, org))
    text = (
        json.dumps(document, indent=2) + "\n"
        if as_json
        else yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    )
    if output is None:
        sys.stdout.write(text)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(ConfigError(f"{output}: cannot write the document: {exc.strerror}"))
    console.print(f"wrote the AsyncAPI document of org {org} to {escape(output)}")


def _run(body: Callable[[], T]) -> T:
    """Run a synchronous body, turning a Deadlift error into its message and exit code."""
    try:
        return body()
    except DeadliftError as exc:
        fail(exc)


def _print_integration(item: dict[str, Any]) -> None:
    out = console.print
    title = f" — {item['description']}" if item["description"] else ""
    out(f"[bold]integration {escape(item['name'])}[/bold]{escape(title)}", soft_wrap=True)
    out(f"  host   {item['host']} (runs the code)")
    out(f"  guest  {item['guest']} (owns the code, signs it)")
    out(f"  signing key  {item['signing_key']}", soft_wrap=True)
    out("  modules")
    for module in item["modules"] or [{"module": "(none)", "grants": [], "publish": []}]:
        grants = ", ".join(module["grants"]) or "none"
        extra = f"; may also publish {', '.join(module['publish'])}" if module["publish"] else ""
        out(
            f"    {escape(module['module'])}: grants {escape(grants)}{escape(extra)}",
            soft_wrap=True,
        )
    out("  events")
    for event in item["events"]:
        where = event["subject"]
        if event["arrives_on"] != event["subject"]:
            where += f" → {event['arrives_on']}"
        out(
            f"    {escape(event['name'])}: {event['from']} → {event['to']}  {escape(where)}",
            soft_wrap=True,
        )
        schema = event["schema"]
        if schema is None:
            out("      schema: none (payloads are not checked)")
        else:
            title = f"{schema['title']!r} " if schema["title"] else ""
            required = ", ".join(schema["required"]) or "none"
            out(
                f"      schema {escape(title)}({schema['uri']}); required: {escape(required)}",
                soft_wrap=True,
            )
    if not item["events"]:
        out("    (none)")
    sees = item["guest_sees"]
    shown = [what for what in ("logs", "payloads") if sees.get(what)]
    out(
        f"  {item['guest']} sees of its runs at {item['host']}: outcome, timing, errors"
        + "".join(f", {what}" for what in shown)
    )


def _print_report(report: ops.Report) -> None:
    out = console.print
    if not report.sides:
        out("no integration to check")
        return
    for side in report.sides:
        if not side.checked:
            out(
                f"[yellow]{side.org}[/yellow]: {escape(side.note or 'not checked')}", soft_wrap=True
            )
            continue
        flows = ", ".join(side.workflows) or "none"
        status = "[red]problems[/red]" if side.problems else "[green]ok[/green]"
        out(f"{side.org}: {status} (applied workflows: {escape(flows)})", soft_wrap=True)
        for problem in side.problems:
            out(f"  [red]✗[/red] {escape(problem)}", soft_wrap=True)
    for item in report.integrations:
        for warning in item["warnings"]:
            out(f"[yellow]warning[/yellow] {item['name']}: {escape(warning)}", soft_wrap=True)
    if report.problems:
        out(f"[red]{report.problems} problem(s)[/red]")
    else:
        out("no problems")


COMMANDS: list[click.Command] = [group]
