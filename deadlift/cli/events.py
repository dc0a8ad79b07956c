"""``deadlift publish`` and ``deadlift tail``: sending an event, watching them arrive."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import click
from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.markup import escape

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.cli.common import (
    checked,
    console,
    err_console,
    on_stop_signals,
    print_json,
    run_async,
    settings_of,
)
from deadlift.errors import EventDecodeError
from deadlift.model import names
from deadlift.ops.publish import DEFAULT_TYPE, publish_event
from deadlift.ops.records import decode_record
from deadlift.ops.tail import subscribe_all, workflow_subjects
from deadlift.settings import Settings

# -- publish ------------------------------------------------------------------


@click.command()
@click.argument("subject", callback=checked(names.check_subject, wildcards=False))
@click.argument("data")
@click.option(
    "--id",
    "event_id",
    callback=checked(names.check_header_value),
    help="event id (default: random); resending an id is deduplicated",
)
@click.option(
    "--type",
    "event_type",
    default=DEFAULT_TYPE,
    show_default=True,
    callback=checked(names.check_header_value),
)
@click.option(
    "--json", "as_json", is_flag=True, help="print id, subject, stream, seq, duplicate as JSON"
)
@click.pass_context
def publish(
    ctx: click.Context,
    subject: str,
    data: str,
    event_id: str | None,
    event_type: str,
    as_json: bool,
) -> None:
    """Publish JSON DATA as a Deadlift event on SUBJECT (durably)."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="DATA") from None

    async def send(settings: Settings) -> None:
        nc = await bus.connect(settings, name="deadlift-publish")
        try:
            publisher = bus.JetStreamPublisher(nc)
            event, ack = await publish_event(
                publisher, subject, value, id=event_id, type=event_type
            )
            if as_json:
                print_json(
                    {
                        "id": event.id,
                        "subject": subject,
                        "stream": ack.stream,
                        "seq": ack.seq,
                        "duplicate": bool(ack.duplicate),
                    }
                )
                return
            note = " (duplicate, dropped)" if ack.duplicate else ""
            console.print(
                f"published {escape(event.id)} to {escape(subject)}: stream {ack.stream} "
                f"seq {ack.seq}{note}",
                soft_wrap=True,
            )
        finally:
            await nc.drain()

    run_async(send(settings_of(ctx)))


# -- tail ---------------------------------------------------------------------


@click.command()
@click.argument("subject", required=False, callback=checked(names.check_subject, wildcards=True))
@click.option(
    "--workflow",
    "-w",
    callback=checked(names.check_workflow_ref),
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
    run_async(
        _tail(settings_of(ctx), subject=subject, workflow=workflow, as_json=as_json, count=count)
    )


async def _tail(
    settings: Settings,
    *,
    subject: str | None,
    workflow: str | None,
    as_json: bool,
    count: int | None,
) -> None:
    nc = await bus.connect(settings, name="deadlift-tail")
    try:
        subjects, label = [subject or ""], subject or ""
        if workflow:
            flow = await (await Registry.open(nc.jetstream())).workflow(workflow)
            subjects = workflow_subjects(flow)
            label = f"workflow {flow.key} ({', '.join(subjects)})"
        await _follow(nc, subjects, label, as_json=as_json, count=count)
    finally:
        await nc.drain()


async def _follow(
    nc: Client, subjects: list[str], label: str, *, as_json: bool, count: int | None
) -> None:
    done = asyncio.Event()
    on_stop_signals(done.set, announce=False)
    seen = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal seen
        try:
            record = decode_record(msg)
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

    await subscribe_all(nc, subjects, on_msg)
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


COMMANDS: list[click.Command] = [publish, tail]
