"""The Acme/Stripe story, end to end (``deadlift demo``), and ``deadlift dev``.

The integration ``acme-at-stripe`` (config/orgs.yaml) says it all: Acme authors
``before_charge_action``, signs it and offers it to Stripe; Stripe accepts it
(the signature is checked against Acme's declared key) and runs it before each
charge with Stripe's host functions (``past_purchases``, ``send_email``). Ten
similar purchases in 30 days → a loyalty discount email. Stripe's next step
publishes the discount event the contract declares (checked against its JSON
Schema); Acme counts the discounts in its own state, and sees every run of its
module at Stripe — including a charge its module refused — without Stripe's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deadlift import bus
from deadlift.bus.identity import whoami
from deadlift.bus.integration_streams import ensure_integration_streams
from deadlift.bus.offers import accept_offer, offer_module
from deadlift.bus.registry import Registry, kv_entries
from deadlift.demo import stripe
from deadlift.errors import DeadliftError
from deadlift.model.orgs import OrgManifest, load_orgs
from deadlift.model.workflow import load_workflow
from deadlift.ops.control import apply_files, push_module_file
from deadlift.ops.guest import guest_runs
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.builtins import decode_key, state_bucket
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / "workers" / "dist"
WORKFLOWS = ROOT / "config" / "workflows"
ORGS = ROOT / "config" / "orgs.yaml"
# Development signing seeds, one per guest org (config/keys/<org>.seed): the
# manifest declares their public keys. Real seeds are the guest's secret.
KEYS = ROOT / "config" / "keys"
CHARGE_SUBJECT = "stripe.charges.acme"

# (charge id, customer, category, amount); alice twice, so Acme counts her twice.
# ch_006 has no amount: Acme's module refuses it, and Acme sees that run fail.
CHARGES: list[tuple[str, str, str, float | None]] = [
    ("ch_001", "alice", "coffee", 4.5),
    ("ch_002", "bob", "coffee", 3.9),
    ("ch_003", "carol", "books", 15.0),
    ("ch_004", "dave", "tea", 6.0),
    ("ch_005", "alice", "coffee", 4.5),
    ("ch_006", "erin", "coffee", None),
]
REFUSED = {"ch_006"}
# What the refused charge logs (the module's error, its dead letter): the story's,
# so `demo --quiet` does not show it as if something went wrong.
EXPECTED_LOGS = (*REFUSED, 'missing field "amount"')
EXPECTED = {"alice": 2, "dave": 1}

console = Console(highlight=False, width=max(132, Console().width))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DeadliftError(f"{what} not found at {path}; run from a Deadlift checkout")
    return path


class Printer:
    """Prints each step execution as it happens (the demo's and dev's live log)."""

    def __init__(self, *, verbose: bool = True) -> None:
        self.verbose = verbose
        self.reports: list[StepReport] = []

    def __call__(self, report: StepReport) -> None:
        self.reports.append(report)
        if not self.verbose:
            return
        colour = {"ok": "green", "filtered": "yellow", "retry": "magenta", "dead": "red"}
        outcome = f"[{colour.get(report.outcome, 'white')}]{report.outcome:<8}[/]"
        detail = ""
        if report.outcome == "ok":
            detail = _short(report.output, 60)
        elif report.error:
            detail = f"[{report.error_kind}] {_short(report.error, 60)}"
        console.print(
            f"  {report.org:<6} {report.workflow + '/' + report.step:<26} "
            f"{report.module:<30} {report.latency_ms:6.1f} ms {outcome} "
            f"{report.run[:8]:<8} {detail}",
            overflow="ellipsis",
            no_wrap=True,
            crop=True,
        )

    def count(self, org: str, step: str, outcomes: tuple[str, ...]) -> int:
        """How many reports of that step had one of those outcomes."""
        return sum(
            1 for r in self.reports if r.org == org and r.step == step and r.outcome in outcomes
        )


def _short(data: Any, limit: int = 90) -> str:
    text = json.dumps(data, default=str) if not isinstance(data, str) else data
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def _wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return bool(condition())


class OrgSession:
    """One org's connection to its own NATS account, and its registry."""

    def __init__(self, nc: Any, registry: Registry, settings: Settings) -> None:
        self.nc, self.registry, self.settings = nc, registry, settings
        self.js = nc.jetstream()

    @classmethod
    async def open(cls, url: str, org: str, orgs_file: Path) -> OrgSession:
        """Connect as ``org`` (credentials from the org manifest)."""
        settings = Settings(nats_url=url, org=org, orgs_file=str(orgs_file))
        nc = await bus.connect(settings, name=f"deadlift-{org}")
        return cls(nc, await Registry.open(nc.jetstream()), settings)

    async def push(self, names: list[str], *, quiet: bool = False) -> None:
        """Push modules from workers/dist into this org's registry."""
        for name in names:
            path = _require(MODULES / f"{name}.wasm", "module")
            meta, changed = await push_module_file(self.registry, path)
            if not quiet:
                console.print(
                    f"  {self.settings.org}: module {meta.ref} sha256:{meta.sha256[:12]}"
                    + ("" if changed else " (unchanged)")
                )

    async def apply(self, paths: list[Path], *, quiet: bool = False) -> None:
        """Apply workflow files as this org."""
        for w in await apply_files(self.js, self.registry, self.settings, paths):
            if not quiet:
                console.print(
                    f"  {self.settings.org}: workflow {w.key}, trigger {', '.join(w.trigger)}"
                )

    async def close(self) -> None:
        """Drain the connection."""
        await self.nc.drain()


def cli_command(cwd: Path | None = None) -> str:
    """How to run this ``deadlift`` from another shell in ``cwd`` (default: here).

    ``deadlift`` when that is what the PATH finds, else the script's path next to
    this Python (``.venv/bin/deadlift`` in a checkout set up by ``make``).
    """
    script = Path(sys.executable).parent / "deadlift"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m deadlift.cli"
    found = shutil.which("deadlift")
    if found and Path(found).resolve() == script.resolve():
        return "deadlift"
    try:
        return shlex.quote(str(script.relative_to(cwd or Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def stripe_host_functions() -> dict[str, Any]:
    """The host functions Stripe offers to the modules it runs."""
    return {"past_purchases": stripe.past_purchases, "send_email": stripe.send_email}


async def share_guest_modules(
    sessions: dict[str, OrgSession], manifest: OrgManifest, *, quiet: bool = False
) -> None:
    """Each guest signs and offers its integration modules; each host accepts them.

    Uses the development seeds in ``config/keys``; a guest without one is skipped.
    """
    say = _silent if quiet else console.print
    for key, item in manifest.integrations.items():
        guest, host = sessions.get(item.guest), sessions.get(item.host)
        seed_file = KEYS / f"{item.guest}.seed"
        if guest is None or host is None or not seed_file.is_file():
            continue
        seed = seed_file.read_text(encoding="utf-8").strip()
        # The host's offers stream exists before the guest offers (its worker
        # would create it too).
        await ensure_integration_streams(host.js, manifest, item.host)
        # The owner is the account the guest's connection belongs to.
        owner = manifest.org_of_account((await whoami(guest.nc)).account) or item.guest
        for name in item.modules:
            meta = await guest.registry.resolve(name)
            offer = await offer_module(
                guest.nc,
                guest.registry,
                manifest,
                owner=owner,
                ref=meta.ref,
                host=item.host,
                seed=seed,
            )
            say(
                f"  {item.guest}: signed and offered {offer.name}@{offer.version} "
                f"(sha256:{offer.sha256[:12]}) to {item.host} ({key})"
            )
            accepted, _ = await accept_offer(
                host.js, host.registry, manifest, host=item.host, ref=offer.ref
            )
            say(
                f"  {item.host}: verified {item.guest}'s signature and accepted "
                f"{accepted.ref}; grants {', '.join(item.modules[name].grants) or 'nothing'}"
            )


async def run_demo(*, verbose: bool = True, timeout: float = 30.0) -> bool:
    """Run the story across NATS accounts on a throwaway server; True when checks pass.

    Not ``verbose``: print only the verdict line (and the checks that failed).
    """
    stripe.clear_outbox()
    manifest = load_orgs(_require(ORGS, "org manifest"))
    say = console.print if verbose else _silent
    with EmbeddedServer(orgs=manifest) as server, _quiet_about_the_refused_charge(verbose):
        say(
            f"[bold]Deadlift demo[/bold] — embedded nats-server at {server.url}, "
            f"one account per org: {', '.join(manifest.orgs)}"
        )
        acme = await OrgSession.open(server.url, "acme", ORGS)
        stripe_org = await OrgSession.open(server.url, "stripe", ORGS)
        try:
            quiet = not verbose
            say("\n[bold]Acme authors its module; Stripe accepts it[/bold] (acme-at-stripe)")
            await acme.push(["before_charge_action", "aggregate_discounts"], quiet=quiet)
            await share_guest_modules({"acme": acme, "stripe": stripe_org}, manifest, quiet=quiet)
            await stripe_org.push(["discount_notice"], quiet=quiet)
            charges = _require(WORKFLOWS / "stripe-charges.yaml", "workflow")
            await stripe_org.apply([charges], quiet=quiet)
            await acme.apply([_require(WORKFLOWS / "acme-loyalty.yaml", "workflow")], quiet=quiet)
            printer = Printer(verbose=verbose)
            stripe_worker = Worker(
                stripe_org.nc,
                settings=stripe_org.settings,
                host_functions=stripe_host_functions(),
                observers=[printer],
                orgs=manifest,
            )
            acme_worker = Worker(
                acme.nc, settings=acme.settings, observers=[printer], orgs=manifest
            )
            async with stripe_worker, acme_worker:
                say(f"\n[bold]Stripe receives {len(CHARGES)} charge requests[/bold]")
                await _send_charges(stripe_org)
                total = sum(EXPECTED.values())
                finished = await _wait_for(
                    lambda: (
                        printer.count("stripe", "before-charge", ("ok", "filtered", "dead"))
                        >= len(CHARGES)
                        and printer.count("acme", "aggregate", ("ok", "dead")) >= total
                    ),
                    timeout,
                )
            counts = await _read_counts(acme.js)
            runs = await _acme_runs(acme.js, printer, timeout=5.0)
        finally:
            await acme.close()
            await stripe_org.close()
    _show_runs(runs, say)
    return _verdict(finished, counts, printer, runs, verbose=verbose)


@contextlib.contextmanager
def _quiet_about_the_refused_charge(verbose: bool) -> Iterator[None]:
    """Not verbose: drop the log lines the refused charge is expected to cause."""

    def unexpected(record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in EXPECTED_LOGS)

    loggers = (
        [] if verbose else [logging.getLogger(n) for n in ("deadlift.module", "deadlift.worker")]
    )
    for logger in loggers:
        logger.addFilter(unexpected)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(unexpected)


async def _acme_runs(js: Any, printer: Printer, *, timeout: float) -> list[dict[str, Any]]:
    """The run records of Acme's module at Stripe, as Acme's own stream keeps them."""
    wanted = sum(1 for r in printer.reports if r.step == "before-charge")
    deadline = time.monotonic() + timeout
    while True:
        runs = await guest_runs(js, host="stripe", last=100)
        if len(runs) >= wanted or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.05)


def _show_runs(runs: list[dict[str, Any]], say: Any) -> None:
    say(
        "\n[bold]Acme's view: the runs of its module at Stripe[/bold] "
        "(deadlift --org acme guest runs)"
    )
    table = Table("host", "step", "module", "outcome", "attempt", "ms")
    table.add_column("error, or the module's last log line", no_wrap=True, overflow="ellipsis")
    for run in runs:
        detail = ""
        if run.get("error"):
            detail = f"[{run.get('error_kind')}] {run['error']}"
        elif run.get("logs"):
            detail = str(run["logs"][-1].get("text", ""))
        table.add_row(
            escape(str(run.get("host"))),
            escape(str(run.get("step"))),
            escape(str(run.get("module"))),
            escape(str(run.get("outcome"))),
            str(run.get("attempt")),
            f"{run.get('latency_ms', 0):.1f}",
            escape(detail),
        )
    say(table)


async def _send_charges(org: OrgSession) -> None:
    for charge_id, customer, category, amount in CHARGES:
        charge: dict[str, Any] = {
            "charge_id": charge_id,
            "customer": customer,
            "email": f"{customer}@acme.example",
            "category": category,
            "ts": int(time.time()),
        }
        if amount is not None:
            charge["amount"] = amount
        event = events.new_event(
            charge,
            source="https://stripe.example/charges",
            type="com.stripe.charge.requested",
            id=charge_id,
        )
        headers, body = events.encode(event)
        await bus.JetStreamPublisher(org.nc).publish(CHARGE_SUBJECT, body, headers, msg_id=event.id)


async def _read_counts(js: Any) -> dict[str, int]:
    """Acme's discount counters, read back from Acme's own KV bucket."""
    bucket = state_bucket("acme")
    counts = {}
    for key, value in await kv_entries(js, await js.key_value(bucket)):
        name = decode_key(key)
        if name.startswith("discounts."):
            counts[name.removeprefix("discounts.")] = int(value)
    return counts


def _silent(*args: Any, **kwargs: Any) -> None:
    """Print nothing (``demo --quiet``)."""


def _verdict(
    finished: bool,
    counts: dict[str, int],
    printer: Printer,
    runs: list[dict[str, Any]],
    *,
    verbose: bool = True,
) -> bool:
    say = console.print if verbose else _silent
    emails = stripe.outbox()
    say("\n[bold]Emails Stripe sent for Acme[/bold]")
    for email in emails:
        say(f"  {email['id']} to {email['to']}: {email['subject']}")
    table = Table("customer", "discounts (Acme's KV)", "expected")
    for customer in sorted(set(counts) | set(EXPECTED)):
        if customer.startswith("_"):
            continue
        table.add_row(customer, str(counts.get(customer, 0)), str(EXPECTED.get(customer, 0)))
    say(table)
    dead = {r.event_id for r in printer.reports if r.outcome == "dead"}
    at_stripe = [r for r in printer.reports if r.step == "before-charge"]
    checks = {
        "every event processed in time": finished,
        "only the charge without an amount failed": dead == REFUSED,
        "Acme sees every run of its module at Stripe": len(runs) == len(at_stripe)
        and {r["outcome"] for r in runs} == {r.outcome for r in at_stripe},
        "Acme sees why its module failed": any(
            r["outcome"] == "dead" and "amount" in str(r.get("error")) for r in runs
        ),
        "Acme sees no charge data": not any("input" in r or "output" in r for r in runs),
        "one email per discount": Counter(e["to"].split("@")[0] for e in emails)
        == Counter(EXPECTED),
        "Acme's counts match": {k: v for k, v in counts.items() if not k.startswith("_")}
        == EXPECTED,
        "Acme's total matches": counts.get("_total") == sum(EXPECTED.values()),
    }
    for name, ok in checks.items():
        if verbose or not ok:  # a failed check is an error: shown even when quiet
            console.print(f"  {'[green]✓[/]' if ok else '[red]✗[/]'} {name}")
    ok = all(checks.values())
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed[/]")
    return ok


async def run_dev(
    stop: asyncio.Event, *, port: int = 4222, store_dir: str = ".deadlift/nats"
) -> None:
    """Server (one account per org), every module and workflow of this checkout, workers,
    until ``stop`` is set (the CLI sets it on Ctrl-C)."""
    manifest = load_orgs(_require(ORGS, "org manifest"))
    # hostile_start_*: the attack suite's modules whose start function loops or
    # crashes; no registry accepts them (module push refuses them).
    modules = sorted(
        p.stem
        for p in _require(MODULES, "workers/dist").glob("*.wasm")
        if not p.stem.startswith("hostile_start_")
    )
    flows = {p: load_workflow(p) for p in sorted(WORKFLOWS.glob("*.yaml"))}
    with EmbeddedServer(port=port, store_dir=store_dir, orgs=manifest) as server:
        sessions = [await OrgSession.open(server.url, org, ORGS) for org in manifest.orgs]
        workers = []
        try:
            for session in sessions:
                await session.push(modules, quiet=True)
            await share_guest_modules({s.settings.org or "": s for s in sessions}, manifest)
            for session in sessions:
                mine = [p for p, w in flows.items() if w.org == session.settings.org]
                await session.apply(mine)
                workers.append(
                    Worker(
                        session.nc,
                        settings=session.settings,
                        host_functions=stripe_host_functions(),
                        observers=[Printer()],
                        orgs=manifest,
                    )
                )
            for worker in workers:
                await worker.start()
            cli = cli_command()
            console.print(
                f"\n[bold]dev server at {server.url}[/bold] (accounts: "
                f"{', '.join(manifest.orgs)}); try in another shell:\n"
                f"  {cli} -s {server.url} --org acme publish calc.in '{{\"value\": 1}}'\n"
                f"  {cli} -s {server.url} --org acme tail calc.out\n"
                "Ctrl-C to stop\n",
                soft_wrap=True,
            )
            await stop.wait()
        finally:
            await asyncio.gather(*(w.shutdown() for w in workers))
            for session in sessions:
                await session.close()
