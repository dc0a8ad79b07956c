"""``deadlift module offer|offers|accept|keygen``: a guest's signed modules, run by a host.

The org acting is the one of the connection's account (``--org`` picks its
credentials from the org manifest): an offer is attributed, and an accept
stored, by the account, never by a flag.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from deadlift.bus.identity import whoami
from deadlift.bus.offers import Offer, accept_offer, list_offers, offer_module
from deadlift.bus.registry import Registry
from deadlift.cli.common import (
    checked,
    console,
    err_console,
    fail,
    org_manifest,
    print_json,
    run_async,
    settings_of,
    with_registry,
)
from deadlift.cli.modules import iso_utc
from deadlift.errors import ConfigError, DeadliftError, ModuleError
from deadlift.model import names
from deadlift.model.orgs import OrgManifest
from deadlift.ops.server import write_private
from deadlift.settings import Settings
from deadlift.wire import signing


async def acting_org(nc: Any, manifest: OrgManifest) -> str:
    """The org of the connection's account.

    Raises:
        ConfigError: a single-tenant server, or an account no org of the manifest has.
    """
    identity = await whoami(nc)
    if identity.single_tenant:
        raise ConfigError(
            "offers cross between orgs, so they need one NATS account per org: start the "
            "server from the org manifest (not --single-tenant) and pass --org ORG"
        )
    org = manifest.org_of_account(identity.account)
    if org is None:
        raise ConfigError(
            f"these credentials belong to NATS account {identity.account}, which is no org "
            "of the org manifest (--orgs); connect as an org with --org ORG"
        )
    return org


def manifest_of(settings: Settings) -> OrgManifest:
    """The org manifest, or exit 2 naming what is wrong with it."""
    try:
        return org_manifest(settings)
    except DeadliftError as exc:
        fail(exc)


def offer_json(offer: Offer) -> dict[str, Any]:
    """An offer for ``--json`` output: its fields, ``ref`` and ``offered_at_iso``."""
    return {**asdict(offer), "ref": offer.ref, "offered_at_iso": iso_utc(offer.offered_at)}


@click.command("offer")
@click.argument("ref", callback=checked(names.check_module_ref))
@click.option("--to", "host", required=True, callback=checked(names.check_name), help="host org")
@click.option(
    "--key",
    type=click.Path(dir_okay=False),
    help=f"signing seed file (default: env {signing.SEED_ENV})",
)
@click.option("--json", "as_json", is_flag=True, help="print the offer as JSON")
@click.pass_context
def module_offer(ctx: click.Context, ref: str, host: str, key: str | None, as_json: bool) -> None:
    """Sign the org's module NAME@VERSION and offer it to the host org --to.

    The host lists it with `deadlift module offers` and runs it only once it
    accepts it (`deadlift module accept OWNER/NAME@VERSION`).
    """
    settings = settings_of(ctx)
    try:  # before connecting: a missing key or manifest is invalid input
        seed = signing.read_seed(key)
        manifest = org_manifest(settings)
    except DeadliftError as exc:
        fail(exc)

    @with_registry
    async def offer(settings: Settings, nc: Any, registry: Registry) -> None:
        owner = await acting_org(nc, manifest)
        made = await offer_module(
            nc, registry, manifest, owner=owner, ref=ref, host=host, seed=seed
        )
        if as_json:
            print_json({**offer_json(made), "host": host})
            return
        console.print(
            f"offered [bold]{escape(made.ref)}[/bold] sha256:{made.sha256[:12]} {made.size} "
            f"bytes to {host}, signed; {host} accepts it with "
            f"`deadlift --org {host} module accept {escape(made.ref)}`"
        )

    run_async(offer(settings))


@click.command("offers")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def module_offers(ctx: click.Context, as_json: bool) -> None:
    """List the modules guest orgs offered this org, and whether each is accepted."""
    settings = settings_of(ctx)
    manifest = manifest_of(settings)

    @with_registry
    async def offers(settings: Settings, nc: Any, registry: Registry) -> None:
        host = await acting_org(nc, manifest)
        found = await list_offers(nc.jetstream(), registry, manifest, host)
        if as_json:
            print_json([offer_json(o) for o in found])
            return
        if not found:
            console.print(f"no offers to {host}")
            return
        table = Table("owner", "module", "version", "sha256", "size", "offered at", "status")
        for o in found:
            table.add_row(
                o.owner,
                o.name,
                escape(o.version),
                o.sha256[:12],
                str(o.size),
                iso_utc(o.offered_at) or "-",
                o.status,
            )
        console.print(table)

    run_async(offers(settings))


@click.command("accept")
@click.argument("ref", callback=checked(names.check_module_ref))
@click.option("--json", "as_json", is_flag=True, help="print the accepted module as JSON")
@click.pass_context
def module_accept(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Accept a guest's offer OWNER/NAME@VERSION: verify its signature, store it.

    Workflows may then use it as `module: OWNER/NAME@VERSION` (or OWNER/NAME,
    the latest accepted).
    """
    settings = settings_of(ctx)
    manifest = manifest_of(settings)

    @with_registry
    async def accept(settings: Settings, nc: Any, registry: Registry) -> None:
        host = await acting_org(nc, manifest)
        try:
            meta, changed = await accept_offer(
                nc.jetstream(),
                registry,
                manifest,
                host=host,
                ref=ref,
                probe_timeout_s=settings.probe_timeout_s,
            )
        except ModuleError as exc:  # a module that cannot run is invalid input: exit 2
            raise ConfigError(str(exc)) from None
        if as_json:
            print_json({**meta.model_dump(), "ref": meta.ref, "new": changed})
            return
        verb = "accepted" if changed else "already accepted"
        console.print(
            f"{verb} [bold]{escape(meta.ref)}[/bold] sha256:{meta.sha256[:12]}, signature "
            f"verified; use it as `module: {escape(meta.ref)}`"
        )

    run_async(accept(settings))


@click.command("keygen")
@click.option(
    "--out", type=click.Path(dir_okay=False), help="write the seed here (mode 0600); never shared"
)
@click.option("--json", "as_json", is_flag=True, help="print the public key (and file) as JSON")
def module_keygen(out: str | None, as_json: bool) -> None:
    """Make a signing key for offering modules; declare its public key as signing_key.

    The seed (SU…) signs offers: keep it secret (`--key FILE` or env
    DEADLIFT_SIGNING_KEY). Without --out it is printed.
    """
    seed, public = signing.new_key()
    if out is not None:
        path = Path(out)
        if path.exists():
            raise click.UsageError(f"--out {out}: the file exists; a key is never overwritten")
        write_private(path, seed + "\n")
    if as_json:
        print_json({"public_key": public, **({"seed_file": out} if out else {"seed": seed})})
        return
    if out is None:
        err_console.print("the seed below signs modules as your org: keep it secret")
        console.print(f"seed: {seed}")
    else:
        console.print(f"wrote the seed to {escape(out)} (mode 0600)")
    console.print(f"public key (the integration's signing_key): {public}")


COMMANDS: list[click.Command] = [module_offer, module_offers, module_accept, module_keygen]
