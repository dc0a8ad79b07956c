"""``deadlift status``, ``deadlift workers`` and ``deadlift trace``: watching a live system.

The data comes from :mod:`deadlift.ops.status`, :mod:`deadlift.ops.discovery`
and :mod:`deadlift.ops.trace`; this module wires click, renders tables and
installs signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.cli.common import (
    console,
    err_console,
    on_stop_signals,
    print_json,
    run_async,
    settings_of,
    with_registry,
)
from deadlift.ops.discovery import DISCOVERY_TIMEOUT_S, STAT_NAMES, WorkerInfo, live_workers
from deadlift.ops.status import StatusReport, status_once, status_reports
from deadlift.ops.trace import DEFAULT_SCAN, TraceEntry, trace_across_orgs, trace_run
from deadlift.settings import Settings

# -- status -------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", is_flag=True, help="refresh until Ctrl-C")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="seconds between the samples the rates come from (and between refreshes)",
)
@click.option("--workflow", "-w", help="only this workflow (ORG.NAME or NAME)")
@click.pass_context
def status(
    ctx: click.Context, as_json: bool, watch: bool, interval: float, workflow: str | None
) -> None:
    """Per step: backlog, in flight, redeliveries, rate, dead letters and workers."""
    command = _status_watch if watch else _status_once
    run_async(command(settings_of(ctx), as_json=as_json, interval=interval, workflow=workflow))


@with_registry
async def _status_once(
    settings: Settings,
    nc: bus.DeadliftClient,
    registry: Registry,
    *,
    as_json: bool,
    interval: float,
    workflow: str | None,
) -> None:
    report = await status_once(nc, registry, interval=interval, workflow=workflow)
    if as_json:
        print_json(report.to_json())
    else:
        console.print(status_table(report))


@with_registry
async def _status_watch(
    settings: Settings,
    nc: bus.DeadliftClient,
    registry: Registry,
    *,
    as_json: bool,
    interval: float,
    workflow: str | None,
) -> None:
    stop = asyncio.Event()
    on_stop_signals(stop.set, announce=False)
    reports = status_reports(nc, registry, stop, interval=interval, workflow=workflow)
    with contextlib.suppress(asyncio.CancelledError):  # a second Ctrl-C
        if as_json:
            async for report in reports:
                print(json.dumps(report.to_json(), default=str), flush=True)
            return
        with Live(console=console, auto_refresh=False) as live:
            async for report in reports:
                live.update(status_table(report), refresh=True)


def status_table(report: StatusReport) -> Table:
    """The status report as a table."""
    source = "" if report.workers_source == "describe" else " (from waiting pulls)"
    table = Table(title=f"{report.time}  {report.workers} worker(s){source}")
    for name in ("org", "workflow", "step"):
        table.add_column(name, no_wrap=True)
    for name in ("workers", "pending", "in flight", "redelivered", "rate/s", "dead"):
        table.add_column(name, justify="right")
    for s in report.steps:
        table.add_row(
            s.org,
            s.workflow,
            s.step,
            str(s.workers),
            _highlight(s.pending, "yellow"),
            str(s.ack_pending),
            _highlight(s.redelivered, "yellow"),
            "-" if s.rate is None else f"{s.rate:.1f}",
            _highlight(s.dead_letters, "red"),
        )
    if not report.steps:
        table.caption = "no workflows; apply one with `deadlift workflow apply`"
    return table


def _highlight(value: int, color: str) -> str:
    return f"[{color}]{value}[/{color}]" if value else "0"


# -- workers ------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.05),
    default=DISCOVERY_TIMEOUT_S,
    show_default=True,
    help="seconds to gather answers",
)
@click.pass_context
def workers(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """List live workers: where they run, their steps and counts (exit 1 if none answer)."""
    run_async(_workers(settings_of(ctx), as_json=as_json, timeout=timeout))


async def _workers(settings: Settings, *, as_json: bool, timeout: float) -> None:
    nc = await bus.connect(settings, name="deadlift-workers")
    try:
        found = await live_workers(nc, timeout=timeout)
    finally:
        await nc.drain()
    if as_json:
        print_json([w.to_json() for w in found])
    else:
        console.print(workers_table(found))


def workers_table(found: Sequence[WorkerInfo]) -> Table:
    """Live workers as a table."""
    table = Table("worker", "host", "pid", "orgs", "steps", "uptime", *STAT_NAMES)
    table.add_column("in flight")
    for w in found:
        # A process of `deadlift worker --processes N`: its place, and its supervisor.
        of = w.supervisor
        where = f" ({of['slot']}/{of['processes']} of {of['pid']})" if of else ""
        table.add_row(
            w.id,
            w.host,
            f"{w.pid or '-'}{where}",
            ", ".join(w.orgs),
            "\n".join(w.steps) or (f"[red]{escape(w.error)}[/red]" if w.error else "-"),
            _duration(w.uptime_s),
            *(str(w.stats.get(name, 0)) for name in STAT_NAMES),
            str(w.in_flight),
        )
    return table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


# -- trace --------------------------------------------------------------------


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--all-orgs",
    is_flag=True,
    help="operator command: connect as each org of the org manifest (--orgs) and merge, "
    "following the run across orgs; needs the system account's credentials",
)
@click.option(
    "--system-creds",
    type=click.Path(exists=True, dir_okay=False),
    envvar="DEADLIFT_SYSTEM_CREDS",
    help="with --all-orgs: the system account's credentials (or DEADLIFT_SYSTEM_USER/PASSWORD)",
)
@click.option(
    "--scan",
    type=click.IntRange(min=1),
    default=DEFAULT_SCAN,
    show_default=True,
    help="read at most the last N messages of each stream",
)
@click.pass_context
def trace(
    ctx: click.Context,
    run_id: str,
    as_json: bool,
    all_orgs: bool,
    system_creds: str | None,
    scan: int,
) -> None:
    """Show the events of run RUN_ID (its trigger's event id) in order, across steps."""
    settings = settings_of(ctx)
    if system_creds:
        settings = settings.model_copy(update={"system_creds": system_creds})
    run_async(_trace(settings, run_id, as_json=as_json, all_orgs=all_orgs, scan=scan))


async def _trace(
    settings: Settings, run_id: str, *, as_json: bool, all_orgs: bool, scan: int
) -> None:
    warnings: list[str] = []
    if all_orgs:
        entries, warnings = await trace_across_orgs(settings, run_id, scan=scan)
    else:
        nc = await bus.connect(settings, name="deadlift-trace")
        try:
            entries = await trace_run(nc.jetstream(), run_id, scan=scan)
        finally:
            await nc.drain()
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    if as_json:
        print_json([e.to_json() for e in entries])
    else:
        console.print(trace_table(run_id, entries, accounts=all_orgs))


def trace_table(run_id: str, entries: Sequence[TraceEntry], *, accounts: bool = False) -> Table:
    """A run's events as a table."""
    table = Table(title=f"run {run_id}: {len(entries)} event(s)")
    for name in ("time", "+ms", *(["account"] if accounts else []), "stream", "subject"):
        table.add_column(name, justify="right" if name == "+ms" else "left")
    for name in ("by", "event", "data"):
        table.add_column(name)
    for e in entries:
        table.add_row(
            e.at.strftime("%H:%M:%S.%f")[:-3],
            f"{e.offset_ms:.1f}",
            *([e.account or ""] if accounts else []),
            e.stream.removeprefix("DEADLIFT_").lower(),
            escape(e.subject),
            _producer(e),
            escape(e.event_id[:12]),
            escape(_preview(e.dead["error"] if e.dead else e.data)),
        )
    return table


def _producer(entry: TraceEntry) -> str:
    if entry.dead:
        d = entry.dead
        where = escape(f"{d['org']}/{d['workflow']}/{d['step']} [{d['kind']}]")
        return f"[red]dead at {where}[/red]"
    if entry.step:
        return f"{entry.org}/{entry.workflow}/{entry.step}"
    return escape(f"trigger ({entry.source})") if entry.source else "trigger"


def _preview(data: Any, width: int = 60) -> str:
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


COMMANDS: list[click.Command] = [status, workers, trace]
