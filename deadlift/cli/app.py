"""The ``deadlift`` command line. Signal handlers live here, never in the library."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from deadlift import bus
from deadlift.bus.registry import Registry, dump_json
from deadlift.cli.common import (
    SINGLE_TENANT_WARNING,
    checked,
    console,
    err_console,
    run_async,
    settings_of,
    with_registry,
)
from deadlift.errors import ConfigError, DeadliftError, ModuleError
from deadlift.model import names
from deadlift.ops.control import apply_files, push_module_file
from deadlift.settings import Settings
from deadlift.wire import events


class _Commands(click.Group):
    """The top-level group; the monitoring commands live in :mod:`deadlift.cli.monitor`.

    They are added on first use rather than at import, because that module
    imports this one (a cycle when run as ``python -m deadlift.cli``).
    """

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            from deadlift.cli import cluster, monitor

            for command in (*monitor.COMMANDS, *cluster.COMMANDS):
                self.add_command(command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    "-s",
    envvar="DEADLIFT_NATS_URL",
    default="nats://127.0.0.1:4222",
    show_default=True,
    help="NATS URL(s), comma-separated [env DEADLIFT_NATS_URL]",
)
@click.option(
    "--creds",
    envvar="DEADLIFT_CREDS",
    type=click.Path(dir_okay=False),
    help="NATS credentials file [env DEADLIFT_CREDS]",
)
@click.option("--user", envvar="DEADLIFT_USER", help="NATS user [env DEADLIFT_USER]")
@click.option(
    "--password", envvar="DEADLIFT_PASSWORD", help="NATS password [env DEADLIFT_PASSWORD]"
)
@click.option(
    "--org", envvar="DEADLIFT_ORG", help="act as this org (its credentials from the org manifest)"
)
@click.option(
    "--orgs",
    "orgs_file",
    envvar="DEADLIFT_ORGS_FILE",
    default="config/orgs.yaml",
    show_default=True,
    help="the org manifest",
)
@click.option("--log-level", envvar="DEADLIFT_LOG_LEVEL", default="INFO", show_default=True)
@click.option(
    "--log-format",
    envvar="DEADLIFT_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line with org/workflow/step/run and trace ids",
)
@click.pass_context
def main(
    ctx: click.Context,
    server: str,
    creds: str | None,
    user: str | None,
    password: str | None,
    org: str | None,
    orgs_file: str,
    log_level: str,
    log_format: str,
) -> None:
    """Deadlift: integrations as Wasm modules, run by workers on NATS JetStream."""
    try:
        settings = Settings(
            nats_url=server,
            creds=creds,
            user=user,
            password=password,
            org=org,
            orgs_file=orgs_file,
            log_level=log_level.upper(),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from deadlift.runtime.telemetry import configure_logging

    configure_logging(settings.log_level, log_format)
    ctx.obj = {"settings": settings}


# -- server -------------------------------------------------------------------


@main.command()
@click.option("--port", "-p", default=4222, show_default=True, help="client port")
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False),
    default=".deadlift/nats",
    show_default=True,
    help="JetStream store directory",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="extra nats-server config file",
)
@click.option(
    "--single-tenant",
    is_flag=True,
    help="development only: one shared account, no authentication (default: one "
    "account per org from the org manifest, --orgs)",
)
@click.option("--accounts", is_flag=True, hidden=True, help="the default; kept for scripts")
@click.pass_context
def server(
    ctx: click.Context,
    port: int,
    store_dir: str,
    config_file: str | None,
    single_tenant: bool,
    accounts: bool,
) -> None:
    """Run the bundled nats-server with JetStream until Ctrl-C (one account per org)."""
    from deadlift.model.orgs import load_orgs
    from deadlift.ops.server import EmbeddedServer

    if single_tenant and accounts:
        raise click.UsageError("--single-tenant and --accounts exclude each other")
    if single_tenant:
        err_console.print(SINGLE_TENANT_WARNING)
    # Handlers first: a SIGTERM while the server starts must still stop it (it runs
    # in its own session, so nothing else would).
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        orgs = None if single_tenant else load_orgs(settings_of(ctx).orgs_file)
        embedded = EmbeddedServer(
            port=port, store_dir=store_dir, config_file=config_file, orgs=orgs
        )
        embedded.start()
    except DeadliftError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    console.print(f"nats-server with JetStream on [bold]{embedded.url}[/bold], store {store_dir}")
    if orgs is not None:
        console.print(f"accounts: {', '.join(orgs.orgs)} (from {settings_of(ctx).orgs_file})")
    console.print("Ctrl-C to stop")
    try:
        while not stop["now"] and embedded.process and embedded.process.poll() is None:
            time.sleep(0.2)
    finally:
        embedded.stop()


@main.command("nats-config")
@click.pass_context
def nats_config(ctx: click.Context) -> None:
    """Print the nats-server accounts configuration rendered from the org manifest."""
    from deadlift.model.orgs import load_orgs, render_nats_config

    try:
        click.echo(render_nats_config(load_orgs(settings_of(ctx).orgs_file)), nl=False)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)


# -- modules ------------------------------------------------------------------


@main.group()
def module() -> None:
    """Push and list Wasm modules."""


@module.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--name", "-n", callback=checked(names.check_name), help="module name (default: the file name)"
)
@click.option(
    "--version",
    "-v",
    "version",
    callback=checked(names.check_version),
    help="version (default: next integer)",
)
@click.option(
    "--codec",
    type=click.Choice(["json", "msgpack", "raw"]),
    default="json",
    show_default=True,
    help="how event data is passed to the module",
)
@click.option("--timeout-ms", type=click.IntRange(min=1), help="default per-call timeout")
@click.option(
    "--max-memory-pages", type=click.IntRange(1, 65536), help="default memory limit in 64 KiB pages"
)
@click.pass_context
def module_push(ctx: click.Context, file: str, **options: Any) -> None:
    """Validate FILE.wasm with Extism and store it in the registry.

    It is instantiated in a child process first, killed after DEADLIFT_PROBE_TIMEOUT_S.
    """

    @with_registry
    async def push(settings: Settings, nc: Any, registry: Registry) -> None:
        try:
            meta, changed = await push_module_file(
                registry, file, probe_timeout_s=settings.probe_timeout_s, **options
            )
        except ModuleError as exc:  # a module that cannot run is invalid input: exit 2
            raise ConfigError(str(exc)) from None
        verb = "pushed" if changed else "unchanged"
        console.print(
            f"{verb} [bold]{meta.ref}[/bold] sha256:{meta.sha256[:12]} {meta.size} bytes, "
            f"exports {', '.join(meta.exports)}"
            + (f", imports {', '.join(meta.host_imports)}" if meta.host_imports else "")
        )

    run_async(push(settings_of(ctx)))


@module.command("ls")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def module_ls(ctx: click.Context, as_json: bool) -> None:
    """List registered modules and versions."""

    @with_registry
    async def ls(settings: Settings, nc: Any, registry: Registry) -> None:
        metas = await registry.modules()
        if as_json:
            click.echo(dump_json([m.model_dump() for m in metas]))
            return
        table = Table("module", "version", "sha256", "codec", "size", "exports", "host imports")
        for m in metas:
            table.add_row(
                m.name,
                m.version,
                m.sha256[:12],
                m.codec,
                str(m.size),
                ", ".join(m.exports),
                ", ".join(m.host_imports),
            )
        console.print(table)

    run_async(ls(settings_of(ctx)))


@module.command("inspect")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def module_inspect(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a module (NAME, NAME@VERSION or sha256:HEX): exports, imports, size, limits."""

    @with_registry
    async def inspect(settings: Settings, nc: Any, registry: Registry) -> None:
        meta = await registry.resolve(ref)
        users = [
            f"{w.key}/{s.name}"
            for w in await registry.workflows()
            for s in w.steps
            if s.module_sha256 == meta.sha256
        ]
        info = {
            **meta.model_dump(),
            "used_by": users,
            "versions": [m.version for m in await registry.versions(meta.name)],
        }
        if as_json:
            click.echo(dump_json(info))
            return
        for key, value in info.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            shown = shown if shown not in (None, "") else "-"
            console.print(f"[bold]{key:>16}[/bold] {escape(str(shown))}")

    run_async(inspect(settings_of(ctx)))


@module.command("rm")
@click.argument("ref")
@click.pass_context
def module_rm(ctx: click.Context, ref: str) -> None:
    """Remove NAME@VERSION (or every version of NAME); refused while a workflow uses it."""

    @with_registry
    async def rm(settings: Settings, nc: Any, registry: Registry) -> None:
        for meta in await registry.remove_module(ref):
            console.print(f"removed {meta.ref} (sha256:{meta.sha256[:12]})")

    run_async(rm(settings_of(ctx)))


# -- workflows ----------------------------------------------------------------


@main.group()
def workflow() -> None:
    """Apply, list and draw workflows."""


@workflow.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.pass_context
def workflow_apply(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Validate workflow FILES against the registry and store them (all or nothing)."""

    @with_registry
    async def apply(settings: Settings, nc: Any, registry: Registry) -> None:
        applied = await apply_files(nc.jetstream(), registry, settings, files)
        for w in applied:
            steps = ", ".join(f"{s.name}={s.module}" for s in w.steps)
            console.print(
                f"applied [bold]{w.key}[/bold] (trigger {escape(', '.join(w.trigger))}): "
                f"{escape(steps)}"
            )

    run_async(apply(settings_of(ctx)))


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
    from deadlift.model.graph import render
    from deadlift.model.orgs import load_orgs

    @with_registry
    async def graph(settings: Settings, nc: Any, registry: Registry) -> None:
        orgs_file = Path(settings.orgs_file)
        orgs = load_orgs(orgs_file) if orgs_file.is_file() else None
        click.echo(render(await registry.workflow(name), fmt, orgs))

    run_async(graph(settings_of(ctx)))


@workflow.command("rm")
@click.argument("name")
@click.pass_context
def workflow_rm(ctx: click.Context, name: str) -> None:
    """Remove workflow NAME: workers finish its in-flight events and stop its steps."""
    from deadlift.ops.control import remove_workflow

    @with_registry
    async def rm(settings: Settings, nc: Any, registry: Registry) -> None:
        removed = await remove_workflow(nc.jetstream(), registry, name)
        console.print(f"removed workflow {removed.key}")

    run_async(rm(settings_of(ctx)))


# -- worker -------------------------------------------------------------------


@main.command()
@click.option(
    "--workflow",
    "-w",
    "workflows",
    multiple=True,
    help="run only this workflow (ORG.NAME or NAME); repeatable",
)
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="events in flight per step")
@click.option(
    "--host-functions",
    "packs",
    multiple=True,
    envvar="DEADLIFT_HOST_FUNCTIONS",
    help="Python module offering host functions (pkg.module); repeatable",
)
@click.pass_context
def worker(
    ctx: click.Context, workflows: tuple[str, ...], concurrency: int | None, packs: tuple[str, ...]
) -> None:
    """Run workflow steps until SIGTERM/SIGINT, then finish in-flight events and drain."""
    from deadlift.cli.commands import run_worker

    # Until the worker installs its own handlers (once connected), a SIGTERM means
    # "never mind": nothing is in flight yet, so exit cleanly rather than die by signal.
    signal.signal(signal.SIGTERM, _exit_before_start)
    run_async(
        run_worker(settings_of(ctx), workflows=workflows, concurrency=concurrency, packs=packs)
    )


def _exit_before_start(signum: int, frame: Any) -> None:
    raise SystemExit(0)


# -- events -------------------------------------------------------------------


@main.command()
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
    default="deadlift.publish",
    show_default=True,
    callback=checked(names.check_header_value),
)
@click.pass_context
def publish(
    ctx: click.Context, subject: str, data: str, event_id: str | None, event_type: str
) -> None:
    """Publish JSON DATA as a Deadlift event on SUBJECT (durably)."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="DATA") from None

    async def send(settings: Settings) -> None:
        nc = await bus.connect(settings, name="deadlift-publish")
        try:
            event = events.new_event(value, source="deadlift://cli", type=event_type, id=event_id)
            headers, body = events.encode(event)
            headers[events.MSG_ID] = event.id
            ack = await bus.JetStreamPublisher(nc).publish(subject, body, headers)
            note = " (duplicate, dropped)" if ack.duplicate else ""
            console.print(
                f"published {escape(event.id)} to {escape(subject)}: stream {ack.stream} "
                f"seq {ack.seq}{note}",
                soft_wrap=True,
            )
        finally:
            await nc.drain()

    run_async(send(settings_of(ctx)))


# -- dead letters ---------------------------------------------------------------


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead-lettered events."""


def _dlq_scope(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--step", callback=checked(names.check_name), help="only this step")(func)
    return click.option(
        "--workflow",
        "-w",
        callback=checked(names.check_workflow_ref),
        help="only this workflow (ORG.NAME or NAME)",
    )(func)


@dlq.command("ls")
@_dlq_scope
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def dlq_ls(ctx: click.Context, workflow: str | None, step: str | None, as_json: bool) -> None:
    """List dead-lettered events with the step, attempts and the error."""
    from deadlift.cli.commands import dlq_command

    run_async(dlq_command(settings_of(ctx), "ls", workflow=workflow, step=step, as_json=as_json))


@dlq.command("show")
@click.argument("letter_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def dlq_show(ctx: click.Context, letter_id: int, as_json: bool) -> None:
    """Show one dead letter: where it failed, why, its headers and data."""
    from deadlift.cli.commands import dlq_command

    run_async(dlq_command(settings_of(ctx), "show", ids=(letter_id,), as_json=as_json))


@dlq.command("replay")
@click.argument("letter_ids", type=int, nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter")
@_dlq_scope
@click.pass_context
def dlq_replay(
    ctx: click.Context,
    letter_ids: tuple[int, ...],
    replay_all: bool,
    workflow: str | None,
    step: str | None,
) -> None:
    """Re-inject dead letters into their step's input (runs the step's current module)."""
    from deadlift.cli.commands import dlq_command

    if not (letter_ids or replay_all or workflow):
        raise click.UsageError("name dead letter ids, --all, or --workflow W [--step S]")
    run_async(dlq_command(settings_of(ctx), "replay", ids=letter_ids, workflow=workflow, step=step))


@dlq.command("purge")
@_dlq_scope
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def dlq_purge(ctx: click.Context, workflow: str | None, step: str | None, yes: bool) -> None:
    """Delete dead letters (all, or of one workflow or step)."""
    from deadlift.cli.commands import dlq_command

    if not yes:
        click.confirm("Delete these dead letters for good?", abort=True)
    run_async(dlq_command(settings_of(ctx), "purge", workflow=workflow, step=step))


@main.command()
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
    """Measure Deadlift against the bare loop and per-message instantiation."""
    from deadlift.ops.benchmark import run

    report = run_async(run(events_count=count))
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


# -- demo and dev -----------------------------------------------------------------


@main.command()
@click.option("--quiet", "-q", is_flag=True, help="print only the outcome")
def demo(quiet: bool) -> None:
    """Run the Acme/Stripe story on a throwaway server; exit 0 when its checks pass."""
    from deadlift.demo import run_demo

    ok = run_async(run_demo(verbose=not quiet))
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--port", "-p", default=4222, show_default=True, help="NATS client port")
@click.option(
    "--store-dir", type=click.Path(file_okay=False), default=".deadlift/nats", show_default=True
)
def dev(port: int, store_dir: str) -> None:
    """Server + every module in workers/ + every workflow in config/ + a worker, until Ctrl-C."""
    from deadlift.demo import run_dev

    run_async(run_dev(port=port, store_dir=store_dir))


if __name__ == "__main__":
    main()
