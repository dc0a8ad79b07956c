"""``deadlift dlq ls|show|replay|purge``: dead-lettered events."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import click
from nats.aio.client import Client
from rich.markup import escape
from rich.table import Table

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.cli.common import (
    EXIT_ERROR,
    checked,
    console,
    print_json,
    run_async,
    settings_of,
    with_registry,
)
from deadlift.model import names
from deadlift.model.topology import Stream
from deadlift.ops import dead_letters
from deadlift.ops.records import letter_data
from deadlift.settings import Settings


@click.group("dlq")
def group() -> None:
    """Inspect, replay and purge dead-lettered events."""


def _scope(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--step", callback=checked(names.check_name), help="only this step")(func)
    return click.option(
        "--workflow",
        "-w",
        callback=checked(names.check_workflow_ref),
        help="only this workflow (ORG.NAME or NAME)",
    )(func)


@group.command("ls")
@_scope
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def dlq_ls(ctx: click.Context, workflow: str | None, step: str | None, as_json: bool) -> None:
    """List dead-lettered events with the step, attempts and the error."""

    async def ls(settings: Settings) -> None:
        nc = await bus.connect(settings, name="deadlift-dlq")
        try:
            js = nc.jetstream()
            found = await dead_letters.find(js, workflow=workflow, step=step)
            # None at all: say whether the org ever had one (the stream comes with the first).
            never = not found and not as_json and not await dlq.stream_exists(js)
        finally:
            await nc.drain()
        if never:
            console.print(
                f"no dead letters: this org has had none yet (its stream {Stream.DLQ} is "
                "created with the first)"
            )
            return
        _print_letters(found, as_json)

    run_async(ls(settings_of(ctx)))


@group.command("show")
@click.argument("letter_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def dlq_show(ctx: click.Context, letter_id: int, as_json: bool) -> None:
    """Show one dead letter: where it failed, why, its headers and data."""

    async def show(settings: Settings) -> None:
        nc = await bus.connect(settings, name="deadlift-dlq")
        try:
            letter = await dlq.get(nc.jetstream(), letter_id)
        finally:
            await nc.drain()
        _show_letter(letter, as_json)

    run_async(show(settings_of(ctx)))


@group.command("replay")
@click.argument("letter_ids", type=int, nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter")
@_scope
@click.option("--json", "as_json", is_flag=True, help="machine-readable per-letter report")
@click.pass_context
def dlq_replay(
    ctx: click.Context,
    letter_ids: tuple[int, ...],
    replay_all: bool,
    workflow: str | None,
    step: str | None,
    as_json: bool,
) -> None:
    """Re-inject dead letters into their step's input (runs the step's current module).

    Each letter is replayed, skipped (replayed or purged already) or refused and
    kept (its workflow or step is no longer applied). Exit code 1 if any was refused.
    """
    if not (letter_ids or replay_all or workflow):
        raise click.UsageError("name dead letter ids, --all, or --workflow W [--step S]")

    @with_registry
    async def replay(
        settings: Settings, nc: Client, registry: Registry
    ) -> list[dead_letters.Replay]:
        return await dead_letters.replay(
            nc.jetstream(),
            bus.JetStreamPublisher(nc),
            registry,
            letter_ids,
            workflow=workflow,
            step=step,
            settings=settings,
        )

    results = run_async(replay(settings_of(ctx)))
    _print_replays(results, as_json)
    if any(r.outcome == dead_letters.Outcome.REFUSED for r in results):
        sys.exit(EXIT_ERROR)


@group.command("purge")
@_scope
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def dlq_purge(ctx: click.Context, workflow: str | None, step: str | None, yes: bool) -> None:
    """Delete dead letters (all, or of one workflow or step)."""
    if not yes:
        click.confirm("Delete these dead letters for good?", abort=True)

    async def purge(settings: Settings) -> None:
        nc = await bus.connect(settings, name="deadlift-dlq")
        try:
            count = await dead_letters.purge(nc.jetstream(), workflow=workflow, step=step)
        finally:
            await nc.drain()
        console.print(f"{count} dead letter(s) purged")

    run_async(purge(settings_of(ctx)))


def _print_letters(letters: list[dlq.DeadLetter], as_json: bool) -> None:
    if as_json:
        print_json([d.summary() for d in letters])
        return
    table = Table("id", "org", "workflow", "step", "attempts", "kind", "error", "time")
    for d in letters:
        table.add_row(
            str(d.id), d.org, d.workflow, d.step, str(d.attempts), d.kind, d.error, d.time
        )
    console.print(table)
    if not letters:
        console.print("no dead letters")


def _print_replays(results: list[dead_letters.Replay], as_json: bool) -> None:
    if as_json:
        print_json([r.as_dict() for r in results])
        return
    for r in results:
        where = f" into {r.subject}" if r.subject and r.outcome == "replayed" else ""
        why = f": {r.reason}" if r.reason else ""
        console.print(f"dead letter {r.id} {r.outcome}{where}{escape(why)}", soft_wrap=True)
    counts = Counter(str(r.outcome) for r in results)
    console.print(
        ", ".join(f"{counts[o]} {o}" for o in ("replayed", "skipped", "refused"))
        + " dead letter(s)"
    )


def _show_letter(letter: dlq.DeadLetter, as_json: bool) -> None:
    data = letter_data(letter)
    if as_json:
        print_json({**letter.summary(), "data": data})
        return
    for key, value in letter.summary().items():
        if key != "headers":
            console.print(f"[bold]{key:>9}[/bold] {escape(str(value))}")
    console.print("[bold]  headers[/bold]")
    for key, value in letter.headers.items():
        console.print(f"           {escape(str(key))}: {escape(str(value))}")
    console.print(f"[bold]     data[/bold] {escape(json.dumps(data, default=str))}")


COMMANDS: list[click.Command] = [group]
