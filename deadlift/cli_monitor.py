"""CLI commands for watching a live system: tail (and, next, status, workers, trace)."""

from __future__ import annotations

import click

from deadlift.cli import run_async, settings_of


@click.command()
@click.argument("subject")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("--count", "-n", type=click.IntRange(min=1), help="stop after N events")
@click.pass_context
def tail(ctx: click.Context, subject: str, as_json: bool, count: int | None) -> None:
    """Print decoded events on SUBJECT as they arrive (wildcards allowed)."""
    from deadlift.commands import tail_subject

    run_async(tail_subject(settings_of(ctx), subject, as_json=as_json, count=count))


COMMANDS: list[click.Command] = [tail]
