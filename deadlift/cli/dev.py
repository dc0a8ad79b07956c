"""``deadlift demo``, ``deadlift dev`` and ``deadlift bench``: trying Deadlift on one machine."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
from rich.table import Table

from deadlift.bus.registry import dump_json
from deadlift.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    console,
    err_console,
    on_stop_signals,
    run_async,
)
from deadlift.demo import run_demo, run_dev
from deadlift.ops.benchmark import Result
from deadlift.ops.benchmark import run as run_benchmark


@click.command()
@click.option(
    "--quiet", "-q", is_flag=True, help="print only the verdict line (and warnings, errors)"
)
def demo(quiet: bool) -> None:
    """Run the Acme/Stripe story on a throwaway server; exit 0 when its checks pass."""
    if quiet:  # the workers' and modules' INFO lines are the story: not wanted here
        root = logging.getLogger()
        root.setLevel(max(root.level, logging.WARNING))
    ok = run_async(run_demo(verbose=not quiet))
    sys.exit(EXIT_OK if ok else EXIT_ERROR)


@click.command()
@click.option("--port", "-p", default=4222, show_default=True, help="NATS client port")
@click.option(
    "--store-dir", type=click.Path(file_okay=False), default=".deadlift/nats", show_default=True
)
def dev(port: int, store_dir: str) -> None:
    """Server + every module in workers/ + every workflow in config/ + a worker, until Ctrl-C."""

    async def until_ctrl_c() -> None:
        stop = asyncio.Event()
        on_stop_signals(stop.set)
        await run_dev(stop, port=port, store_dir=store_dir)

    run_async(until_ctrl_c())


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--events",
    "-n",
    "count",
    default=20_000,
    show_default=True,
    help="events per throughput scenario",
)
def bench(as_json: bool, count: int) -> None:
    """Measure Deadlift against the bare loop and per-message instantiation.

    A line per scenario on stderr as it starts and ends (not with --json).
    """
    report = run_async(
        run_benchmark(events_count=count, progress=None if as_json else bench_progress)
    )
    if as_json:
        click.echo(dump_json(report))
        return
    table = Table("scenario", "events", "events/s", "p50 ms", "p99 ms", "note")
    for r in report["results"]:
        note = ", ".join(f"{k}={v:.0f}" for k, v in r["extra"].items())
        table.add_row(
            r["name"],
            str(r["events"]),
            f"{r['rate']:.0f}" if r["seconds"] else "-",
            f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "",
            f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "",
            note,
        )
    console.print(table)
    for name, ratio in report["ratios"].items():
        console.print(f"  {name}: {ratio:.2f}x")
    for name, ok in report["targets"].items():
        console.print(f"  {'[green]✓[/]' if ok else '[red]✗[/]'} {name}")


def bench_progress(number: int, of: int, label: str, result: Result | None) -> None:
    """``bench``'s progress on stderr: a line as each scenario starts and one as it ends."""
    if result is None:
        err_console.print(f"[{number}/{of}] {label} …", markup=False)
        return
    if result.seconds:
        figure = f"{result.rate:.0f} events/s in {result.seconds:.1f} s"
    else:
        figure = ", ".join(f"{k}={v:.0f}" for k, v in result.extra.items()) or "done"
    if result.p50_ms is not None:
        figure += f", p50 {result.p50_ms:.2f} ms"
    err_console.print(f"[{number}/{of}] {label}: {figure}", markup=False)


COMMANDS: list[click.Command] = [demo, dev, bench]
