"""CLI commands for watching a live system: status, workers, trace, tail.

The data comes from :mod:`deadlift.ops.monitor`; this module wires click, renders
tables and installs signal handlers. ``deadlift.cli`` is imported inside the
commands, not at the top: ``python -m deadlift.cli`` runs cli.py as
``__main__``, and a top-level import would load it a second time mid-import.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Coroutine, Sequence
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from deadlift.cli.common import checked, run_async, settings_of, with_registry
from deadlift.errors import EventDecodeError
from deadlift.model import names
from deadlift.ops import monitor
from deadlift.settings import Settings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _run(ctx: click.Context, command: Any, *args: Any, **kwargs: Any) -> None:
    """Run an async command body with the global settings, errors as exit codes."""

    coro: Coroutine[Any, Any, None] = command(settings_of(ctx), *args, **kwargs)
    run_async(coro)


def _checked(check: Any, **options: Any) -> Any:
    """``deadlift.cli.checked`` (imported when called: see the module docstring)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:

        return checked(check, **options)(ctx, param, value)

    return callback


def _stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on the first SIGTERM/SIGINT; cancel the command on the second."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def handle() -> None:
        if not stop.is_set():
            stop.set()
        elif main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle)


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str), flush=True)


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
    _run(ctx, command, as_json=as_json, interval=interval, workflow=workflow)


async def _status_once(
    settings: Settings, *, as_json: bool, interval: float, workflow: str | None
) -> None:

    @with_registry
    async def once(settings: Settings, nc: Any, registry: Any) -> None:
        report = await monitor.status_once(nc, registry, interval=interval, workflow=workflow)
        if as_json:
            _json(report.to_json())
        else:
            console.print(status_table(report))

    await once(settings)


async def _status_watch(
    settings: Settings, *, as_json: bool, interval: float, workflow: str | None
) -> None:

    @with_registry
    async def watch(settings: Settings, nc: Any, registry: Any) -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        reports = monitor.status_reports(nc, registry, stop, interval=interval, workflow=workflow)
        if as_json:
            async for report in reports:
                print(json.dumps(report.to_json(), default=str), flush=True)
            return
        with Live(console=console, auto_refresh=False) as live:
            async for report in reports:
                live.update(status_table(report), refresh=True)

    with contextlib.suppress(asyncio.CancelledError):  # a second Ctrl-C
        await watch(settings)


def status_table(report: monitor.StatusReport) -> Table:
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
    default=monitor.DISCOVERY_TIMEOUT_S,
    show_default=True,
    help="seconds to gather answers",
)
@click.pass_context
def workers(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """List live workers: where they run, their steps and counts (exit 1 if none answer)."""
    _run(ctx, _workers, as_json=as_json, timeout=timeout)


async def _workers(settings: Settings, *, as_json: bool, timeout: float) -> None:
    from deadlift import bus

    nc = await bus.connect(settings, name="deadlift-workers")
    try:
        found = await monitor.live_workers(nc, timeout=timeout)
    finally:
        await nc.drain()
    if as_json:
        _json([w.to_json() for w in found])
    else:
        console.print(workers_table(found))


def workers_table(found: Sequence[monitor.WorkerInfo]) -> Table:
    """Live workers as a table."""
    table = Table("worker", "host", "pid", "orgs", "steps", "uptime", *monitor.STAT_NAMES)
    table.add_column("in flight")
    for w in found:
        table.add_row(
            w.id,
            w.host,
            str(w.pid or "-"),
            ", ".join(w.orgs),
            "\n".join(w.steps) or (f"[red]{escape(w.error)}[/red]" if w.error else "-"),
            _duration(w.uptime_s),
            *(str(w.stats.get(name, 0)) for name in monitor.STAT_NAMES),
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
    default=monitor.DEFAULT_SCAN,
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
    if system_creds:
        settings = ctx.obj["settings"]
        ctx.obj["settings"] = settings.model_copy(update={"system_creds": system_creds})
    _run(ctx, _trace, run_id, as_json=as_json, all_orgs=all_orgs, scan=scan)


async def _trace(
    settings: Settings, run_id: str, *, as_json: bool, all_orgs: bool, scan: int
) -> None:
    from deadlift import bus

    warnings: list[str] = []
    if all_orgs:
        entries, warnings = await monitor.trace_across_orgs(settings, run_id, scan=scan)
    else:
        nc = await bus.connect(settings, name="deadlift-trace")
        try:
            entries = await monitor.trace_run(nc.jetstream(), run_id, scan=scan)
        finally:
            await nc.drain()
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    if as_json:
        _json([e.to_json() for e in entries])
    else:
        console.print(trace_table(run_id, entries, accounts=all_orgs))


def trace_table(
    run_id: str, entries: Sequence[monitor.TraceEntry], *, accounts: bool = False
) -> Table:
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


def _producer(entry: monitor.TraceEntry) -> str:
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


# -- tail ---------------------------------------------------------------------


@click.command()
@click.argument("subject", required=False, callback=_checked(names.check_subject, wildcards=True))
@click.option(
    "--workflow",
    "-w",
    callback=_checked(names.check_workflow_ref),
    help="every subject of this workflow (ORG.NAME or NAME): triggers, steps, outputs, DLQ",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("--count", "-n", type=click.IntRange(min=1), help="stop after N events")
@click.pass_context
def tail(
    ctx: click.Context, subject: str | None, workflow: str | None, as_json: bool, count: int | None
) -> None:
    """Print decoded events on SUBJECT (wildcards allowed) or of a workflow as they arrive."""
    if bool(subject) == bool(workflow):
        raise click.UsageError("name a SUBJECT or --workflow W (one of them)")
    _run(ctx, _tail, subject=subject, workflow=workflow, as_json=as_json, count=count)


async def _tail(
    settings: Settings,
    *,
    subject: str | None,
    workflow: str | None,
    as_json: bool,
    count: int | None,
) -> None:
    from deadlift import bus
    from deadlift.bus.registry import Registry

    nc = await bus.connect(settings, name="deadlift-tail")
    try:
        subjects, label = [subject or ""], subject or ""
        if workflow:
            flow = await (await Registry.open(nc.jetstream())).workflow(workflow)
            subjects = monitor.workflow_subjects(flow)
            label = f"workflow {flow.key} ({', '.join(subjects)})"
        await _follow(nc, subjects, label, as_json=as_json, count=count)
    finally:
        await nc.drain()


async def _follow(
    nc: Any, subjects: list[str], label: str, *, as_json: bool, count: int | None
) -> None:
    done = asyncio.Event()
    _stop_on_signals(done)
    seen = 0

    async def on_msg(msg: Any) -> None:
        nonlocal seen
        try:
            record = monitor.decode_record(msg)
        except EventDecodeError as exc:
            console.print(f"[red]{escape(f'{msg.subject}: undecodable: {exc}')}[/red]")
            return
        if as_json:
            print(json.dumps(record, default=str), flush=True)
        else:
            console.print(tail_line(record), soft_wrap=True)
        seen += 1
        if count is not None and seen >= count:
            done.set()

    await monitor.subscribe_all(nc, subjects, on_msg)
    err_console.print(f"tailing {escape(label)} (Ctrl-C to stop)", soft_wrap=True)
    with contextlib.suppress(asyncio.CancelledError):  # a second Ctrl-C
        await done.wait()


def tail_line(record: dict[str, Any]) -> str:
    """One tailed event as a line: subject, producing step, type, ids, data."""
    if record.get("dead"):
        d = record["dead"]
        where = escape(f"{d['step']} [{d['kind']}]")
        by = f"[red]dead at {where}[/red] "
    elif record["step"]:
        by = f"from [cyan]{record['step']}[/cyan] "
    else:
        by = ""
    return (
        f"[bold]{escape(record['subject'])}[/bold] {by}{escape(record['type'])} "
        f"{escape(record['id'][:12])} run {escape(record['run'][:12])}: "
        + escape(json.dumps(record["data"], default=str))
    )


COMMANDS: list[click.Command] = [status, workers, trace, tail]
