"""``deadlift cluster``, ``deadlift certs`` and ``deadlift health``: beyond one machine.

``deadlift cluster`` runs a JetStream cluster on loopback (what the fail-over
tests use); ``deadlift certs`` makes the TLS certificates of routes and leaf
nodes for the static configs of deploy/; ``deadlift health`` is the exec probe
of worker containers and systemd units (the worker has no HTTP endpoint): exit 0
when healthy, 1 when not.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import click
from rich.markup import escape

from deadlift.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    err_console,
    fail,
    settings_of,
    stop_requested,
    tenancy,
    tenancy_options,
)
from deadlift.errors import DeadliftError
from deadlift.ops.cluster import LocalCluster
from deadlift.ops.health import probe
from deadlift.ops.tls import CertificateAuthority

# -- cluster --------------------------------------------------------------------


@click.command()
@click.option("--size", "-n", type=click.IntRange(1, 7), default=3, show_default=True)
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    default=4222,
    show_default=True,
    help="client port of the first node; the others follow (0: free ports)",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False),
    default=".deadlift/cluster",
    show_default=True,
    help="one sub-directory per node (n1, n2, …): config, log, JetStream store; "
    "tls/: the routes' CA and certificates",
)
@tenancy_options
@click.pass_context
def cluster(
    ctx: click.Context, size: int, port: int, store_dir: str, single_tenant: bool, accounts: bool
) -> None:
    """Run a local JetStream cluster of SIZE nats-servers on loopback until Ctrl-C.

    One NATS account per org from the org manifest (--orgs): connect with
    --org NAME or the org's credentials. The routes between the nodes use mutual
    TLS with a CA made for this cluster and a random route password; monitoring
    listens on 127.0.0.1 only.

    The first line printed is the client URLs, comma-separated, usable as
    --server (DEADLIFT_NATS_URL). Set DEADLIFT_STREAM_REPLICAS=3 for R3 streams.
    """
    settings = settings_of(ctx)
    try:
        orgs = tenancy(settings, single_tenant=single_tenant, accounts=accounts)
        ports = [port + i for i in range(size)] if port else None
        running = LocalCluster(size, store_dir=store_dir, orgs=orgs, ports=ports).start()
    except DeadliftError as exc:
        fail(exc)
    click.echo(running.url, nl=True)
    sys.stdout.flush()
    err_console.print(
        f"{size}-node JetStream cluster {running.name!r} (meta leader "
        f"{running.meta_leader()}), store {store_dir}"
    )
    for node in running.nodes:
        err_console.print(f"  {node.name}: {node.url}  monitor {node.monitor_url}")
    if running.ca is not None:
        err_console.print(
            f"routes: mutual TLS (CA {running.ca.cert}) and a route password made for this run"
        )
    if orgs is not None:
        err_console.print(
            f"accounts: {', '.join(orgs.orgs)} (from {settings.orgs_file}); "
            "connect with --org NAME or the org's credentials"
        )
    org = "" if orgs is None else f"--org {next(iter(orgs.orgs))} "
    click.echo(
        f"try: DEADLIFT_STREAM_REPLICAS={min(size, 3)} deadlift --server {running.url} "
        f"{org}worker\nCtrl-C to stop",
        err=True,
    )
    stopping = stop_requested()
    reported: set[str] = set()
    try:
        while not stopping():
            for node in running.nodes:
                if not node.running and node.name not in reported:
                    reported.add(node.name)
                    err_console.print(f"[yellow]node {node.name} exited[/yellow] (see its log)")
            time.sleep(0.2)
    finally:
        running.stop()


# -- certs ----------------------------------------------------------------------


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="another name or IP address every certificate is valid for (repeatable)",
)
@click.option(
    "--common-name",
    help="the certificates' subject CN (default: each NAME); a route identity for "
    "verify_and_map, e.g. deadlift-route",
)
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True)
def certs(
    directory: str,
    names: tuple[str, ...],
    hosts: tuple[str, ...],
    common_name: str | None,
    days: int,
) -> None:
    """Make TLS certificates for NATS routes or leaf nodes: DIRECTORY/NAME.pem, NAME-key.pem.

    They are signed by DIRECTORY/ca.pem (made with ca-key.pem when absent, reused
    otherwise), valid for NAME and every --host, for both server and client use
    (a route both accepts and dials). Private keys are readable by their owner only.
    Needs the openssl CLI. See deploy/README.md.
    """
    try:
        authority = CertificateAuthority(directory)
        for name in names:
            files = authority.issue(name, hosts=hosts, common_name=common_name, days=days)
            click.echo(f"{files.cert}  {files.key}")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    except DeadliftError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"CA: {authority.cert} (keep {authority.key} offline once done)", err=True)


# -- health ---------------------------------------------------------------------


@click.command()
@click.option(
    "--worker",
    is_flag=True,
    help="also require a live worker on this host (its micro service answers)",
)
@click.option(
    "--streams",
    is_flag=True,
    help="also require Deadlift's streams to exist and have a leader",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="seconds for the whole check",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def health(ctx: click.Context, worker: bool, streams: bool, timeout: float, as_json: bool) -> None:
    """Exit 0 when NATS and JetStream answer with these credentials, else 1 (a probe).

    For Kubernetes exec probes and systemd: readiness `deadlift health`,
    liveness `deadlift health --worker` (the worker in this container answers).
    """
    settings = settings_of(ctx)
    report = asyncio.run(probe(settings, worker=worker, streams=streams, timeout=timeout))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif report["ok"]:
        click.echo(f"ok: {report.get('connected_to') or settings.nats_url}")
    else:
        click.echo(f"unhealthy: {'; '.join(report.get('problems') or ['?'])}", err=True)
    sys.exit(EXIT_OK if report["ok"] else EXIT_ERROR)


COMMANDS: list[click.Command] = [cluster, certs, health]
