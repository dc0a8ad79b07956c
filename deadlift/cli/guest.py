"""``deadlift guest runs|status``: what your modules do at the orgs that host them.

The org is the connection's (``--org`` / credentials): an org sees the run
records of its own modules, sent to its account by its hosts, and nothing else.
Every text in a record comes from the host or the module: it is escaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from deadlift import bus
from deadlift.bus.identity import whoami
from deadlift.cli.common import (
    checked,
    console,
    err_console,
    on_stop_signals,
    print_json,
    run_async,
    settings_of,
)
from deadlift.errors import DeadliftError
from deadlift.model import names
from deadlift.model.orgs import load_orgs
from deadlift.ops import guest as ops
from deadlift.settings import Settings, missing_orgs_file

OUTCOME_STYLE = {"ok": "green", "filtered": "dim", "retry": "yellow", "dead": "red"}
NO_RUNS = "no runs yet: your hosts' records of your modules' runs will appear here"


@click.group("guest")
def group() -> None:
    """Runs of your modules at the orgs that host them (run records)."""


@group.command("runs")
@click.option("--host", callback=checked(names.check_name), help="only runs at this host org")
@click.option("--follow", "-f", is_flag=True, help="then print new runs as they come (Ctrl-C)")
@click.option(
    "--last",
    "-n",
    type=click.IntRange(min=1, max=100_000),
    default=ops.DEFAULT_LAST,
    show_default=True,
    help="how many of the newest runs",
)
@click.option("--json", "as_json", is_flag=True, help="JSON (with --follow: one object per line)")
@click.pass_context
def runs(ctx: click.Context, host: str | None, follow: bool, last: int, as_json: bool) -> None:
    """Your modules' runs at their hosts: outcome, latency, errors, their log lines."""
    run_async(_runs(settings_of(ctx), host=host, follow=follow, last=last, as_json=as_json))


async def _runs(
    settings: Settings, *, host: str | None, follow: bool, last: int, as_json: bool
) -> None:
    nc = await bus.connect(settings, name="deadlift-guest")
    try:
        js = nc.jetstream()
        if not await _runs_kept(nc, settings):
            if as_json and not follow:
                print_json([])
            elif not as_json:
                err_console.print(NO_RUNS)
            if not follow:
                return
        listed = await ops.guest_runs(js, host=host, last=last)
        if as_json and not follow:
            print_json(listed)
            return
        for record in listed:
            _print_run(record, as_json)
        if not listed and not as_json and not follow:
            err_console.print(NO_RUNS)
        if follow:
            if not await ops.runs_stream_exists(js):
                raise DeadliftError(
                    "this org keeps no run records: it is the guest of no integration in the "
                    "org manifest (integrations: <name>: guest: <org>)"
                )
            after = listed[-1].get("seq") if listed else None
            await _follow(js, host=host, as_json=as_json, after=after)
    finally:
        await nc.drain()


async def _follow(js: Any, *, host: str | None, as_json: bool, after: Any) -> None:
    stop = asyncio.Event()
    on_stop_signals(stop.set, announce=False)
    start = after + 1 if isinstance(after, int) else None
    err_console.print("following runs (Ctrl-C to stop)")
    with contextlib.suppress(asyncio.CancelledError):  # a second Ctrl-C
        async for record in ops.follow_runs(js, host=host, stop=stop, start_seq=start):
            _print_run(record, as_json)


def _print_run(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, default=str), flush=True)
        return
    console.print(run_line(record), soft_wrap=True)
    for line in record.get("logs") or ():
        if isinstance(line, dict):
            level, text = line.get("level", ""), line.get("text", "")
            console.print(
                f"    [dim]{escape(str(level))}[/dim] {escape(str(text))}", soft_wrap=True
            )
    dropped = record.get("logs_dropped")
    if isinstance(dropped, int) and dropped > 0:
        console.print(f"    [dim]({dropped} more log line(s) not kept)[/dim]")


def run_line(record: dict[str, Any]) -> str:
    """One run: time, host, workflow/step, module, outcome, attempt, latency, error."""

    def text(field: str) -> str:
        return escape(str(record.get(field) or "-"))

    outcome = str(record.get("outcome") or "?")
    style = OUTCOME_STYLE.get(outcome, "magenta")
    latency = record.get("latency_ms")
    took = f"{latency:.1f} ms" if isinstance(latency, int | float) else "-"
    line = (
        f"{text('time')}  [bold]{text('host')}[/bold]  {text('workflow')}/{text('step')}  "
        f"{text('module')}  [{style}]{escape(outcome)}[/{style}] #{text('attempt')}  {took}"
    )
    if record.get("error_kind"):
        line += f"  [red]{text('error_kind')}[/red]: {text('error')}"
    return line


@group.command("status")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Per host, workflow, step and module: runs per outcome, latency, the last error."""

    async def show(settings: Settings) -> None:
        nc = await bus.connect(settings, name="deadlift-guest")
        try:
            rows = await ops.guest_status(nc.jetstream()) if await _runs_kept(nc, settings) else []
        finally:
            await nc.drain()
        if as_json:
            print_json(rows)
        elif rows:
            console.print(status_table(rows))
        else:
            err_console.print(NO_RUNS)

    run_async(show(settings_of(ctx)))


def status_table(rows: list[dict[str, Any]]) -> Table:
    """``guest status`` as a table (every cell escaped: the hosts wrote them)."""
    table = Table(title=f"runs of your modules at their hosts (newest {ops.STATUS_SCAN} at most)")
    for name in ("host", "workflow/step", "module"):
        table.add_column(name, no_wrap=True)
    for name in ("runs", "ok", "filtered", "retry", "dead", "p50 ms", "p99 ms"):
        table.add_column(name, justify="right")
    table.add_column("last run")
    table.add_column("last error")
    for row in rows:
        outcomes = row["outcomes"]
        error = row["last_error"]
        table.add_row(
            escape(row["host"]),
            escape(f"{row['workflow']}/{row['step']}"),
            escape(row["module"]),
            str(row["runs"]),
            *(str(outcomes.get(o, 0)) for o in ("ok", "filtered", "retry")),
            f"[red]{outcomes['dead']}[/red]" if outcomes.get("dead") else "0",
            "-" if row["p50_ms"] is None else f"{row['p50_ms']:.1f}",
            "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}",
            escape(str(row["last_run"] or "-")),
            escape(f"{error['kind']}: {error['message']} ({error['time']})") if error else "-",
        )
    return table


async def _runs_kept(nc: bus.DeadliftClient, settings: Settings) -> bool:
    """Whether the account keeps run records; create its integration streams if not yet.

    False when it has none now (nothing to read yet): either it was just created,
    or the org guests in no integration of the manifest.
    """
    js = nc.jetstream()
    if await ops.runs_stream_exists(js):
        return True
    if missing_orgs_file(settings.orgs_file):
        return False
    manifest = load_orgs(settings.orgs_file)
    org = settings.org or manifest.org_of_account((await whoami(nc)).account)
    if org is not None and org in manifest.orgs:
        await ops.ensure_runs_stream(js, manifest, org)
    return False


COMMANDS: list[click.Command] = [group]
