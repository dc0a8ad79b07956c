"""``deadlift demo``, ``deadlift dev`` and ``deadlift bench``: trying Deadlift on one machine."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.markup import escape
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
    help="events per throughput run",
)
@click.option(
    "--pairs",
    "-p",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="rounds of each comparison (bare loop / Deadlift, A B A B ...); 3 or more for a spread",
)
def bench(as_json: bool, count: int, pairs: int) -> None:
    """Measure Deadlift against the bare loop and per-message instantiation.

    Every worker is a `deadlift worker` process, timed from when all of them are
    pulling; compared scenarios run in interleaved pairs, and each ratio is the
    median of the pairs' with its spread. A line per run on stderr as it starts
    and ends (not with --json).
    """
    report = run_async(
        run_benchmark(events_count=count, pairs=pairs, progress=None if as_json else bench_progress)
    )
    if as_json:
        click.echo(dump_json(report))
        return
    render_bench(report)


def render_bench(report: dict[str, Any]) -> None:
    """``bench``'s table, its pairs and its targets."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("scenario", no_wrap=True)
    table.add_column("events", justify="right")
    table.add_column("events/s", justify="right")
    table.add_column("each run", justify="right")
    table.add_column("p50/p99 ms", justify="right")
    table.add_column("note")
    for r in report["results"]:
        latency = f"{r['p50_ms']:.2f}/{r['p99_ms']:.2f}" if r["p50_ms"] is not None else ""
        table.add_row(
            r["name"],
            str(r["events"]),
            f"{r['rate']:.0f}" if r["seconds"] else "-",
            " ".join(f"{rate:.0f}" for rate in r.get("runs", [])),
            latency,
            ", ".join(f"{k}={v:.0f}" for k, v in r["extra"].items()),
        )
    # A line per scenario when piped too (rich assumes 80 columns then).
    out = console if console.is_terminal else Console(width=max(132, console.width))
    out.print(table)
    load = report.get("machine", {}).get("load_average")
    if load:
        out.print(f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end")
    comparisons = report.get("comparisons", {})
    if comparisons:
        out.print(
            f"median ratio [lowest-highest] of {report.get('pairs')} interleaved pairs:",
            markup=False,
        )
    for name, c in comparisons.items():
        low, high = c["spread"]
        ratios = " ".join(f"{x:.2f}" for x in c["ratios"])
        out.print(
            f"  {name}: {c['median_ratio']:.2f}x [{low:.2f}-{high:.2f}]  (pairs: {ratios})",
            markup=False,
        )
    for name, ratio in report["ratios"].items():
        if name not in comparisons:
            out.print(f"  {name}: {ratio:.2f}x", markup=False)
    measured = report.get("measured", {})
    for name, ok in report["targets"].items():
        figure = f": {measured[name]}" if name in measured else ""
        mark = "[green]✓ met[/]" if ok else "[red]✗ not met[/]"
        out.print(f"  {mark} {escape(name)}{escape(figure)}")


def bench_progress(number: int, of: int, label: str, result: Result | None) -> None:
    """``bench``'s progress on stderr: a line as each run starts and one as it ends."""
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
