"""``deadlift server`` and ``deadlift nats-config``: one nats-server, accounts from the manifest."""

from __future__ import annotations

import time

import click

from deadlift.cli.common import (
    console,
    fail,
    org_manifest,
    settings_of,
    stop_requested,
    tenancy,
    tenancy_options,
)
from deadlift.errors import ConfigError, DeadliftError
from deadlift.model.orgs import render_nats_config
from deadlift.ops.server import EmbeddedServer


@click.command()
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
@tenancy_options
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
    # Handlers first: a SIGTERM while the server starts must still stop it (it runs
    # in its own session, so nothing else would).
    stopping = stop_requested()
    try:
        orgs = tenancy(settings_of(ctx), single_tenant=single_tenant, accounts=accounts)
        embedded = EmbeddedServer(
            port=port, store_dir=store_dir, config_file=config_file, orgs=orgs
        )
        embedded.start()
    except DeadliftError as exc:
        fail(exc)
    console.print(f"nats-server with JetStream on [bold]{embedded.url}[/bold], store {store_dir}")
    if orgs is not None:
        console.print(f"accounts: {', '.join(orgs.orgs)} (from {settings_of(ctx).orgs_file})")
    console.print("Ctrl-C to stop")
    try:
        while not stopping() and embedded.process and embedded.process.poll() is None:
            time.sleep(0.2)
    finally:
        embedded.stop()


@click.command("nats-config")
@click.pass_context
def nats_config(ctx: click.Context) -> None:
    """Print the nats-server accounts configuration rendered from the org manifest."""
    try:
        click.echo(render_nats_config(org_manifest(settings_of(ctx))), nl=False)
    except ConfigError as exc:
        fail(exc)


COMMANDS: list[click.Command] = [server, nats_config]
