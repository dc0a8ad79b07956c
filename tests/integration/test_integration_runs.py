"""A guest sees its modules' runs at the host, and only those.

Stripe (the host) runs Acme's ``before_charge_action`` and Initech's ``scorer``,
both offered, signed and accepted. Stripe's worker sends a run record per call
of each to its owner; Acme sees its own runs (ok, retried, dead, with its log
lines, without the charges), Initech sees only its own (with payloads: its
integration allows them), and Globex, a third org, sees nothing. All on a real
nats-server with one account per org.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from deadlift import bus
from deadlift.bus.offers import accept_offer, offer_module
from deadlift.model.orgs import OrgManifest
from deadlift.ops import guest
from deadlift.runtime.step import StepReport
from deadlift.wire import events, signing
from tests.conftest import eventually
from tests.integration.accounts import Clients, Connect, Org, write_orgs
from tests.integration.conftest import cli
from tests.manifests import integration, logins

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ACME_SEED, ACME_KEY = signing.new_key()
INITECH_SEED, INITECH_KEY = signing.new_key()


def manifest() -> dict[str, Any]:
    """Stripe hosts Acme (logs, no payloads) and Initech (logs and payloads); Globex is alone."""
    grants = {"grants": ["past_purchases", "send_email"]}
    return {
        # Each guest's offers stream reserves 512 MiB of the host's storage.
        "orgs": logins(
            "acme", "initech", "stripe", "globex", stripe={"limits": {"max_storage": "4GiB"}}
        ),
        "integrations": {
            "acme-at-stripe": integration(
                ACME_KEY,
                {"before_charge_action": grants},
                guest_sees={"logs": True, "payloads": False},
            ),
            "initech-at-stripe": integration(
                INITECH_KEY,
                {"scorer": {}},
                guest="initech",
                guest_sees={"logs": True, "payloads": True},
            ),
        },
    }


CHARGES = """
name: charges
org: stripe
trigger: stripe.charges
steps:
  - name: loyalty
    module: acme/before_charge_action@1
    function: before_charge_action
    host_functions: [past_purchases, send_email]
    retry: {max_attempts: 2, backoff: [0.1]}
"""

SCORING = """
name: scoring
org: stripe
trigger: stripe.score
steps:
  - {name: score, module: initech/scorer@1, function: add_ten}
"""


@pytest.fixture(scope="module")
def orgs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_orgs(tmp_path_factory.mktemp("orgs"), manifest())


class Guest(Org):
    """An org that may ask the hosts of its modules for their runs."""

    async def runs(self, *args: str) -> Any:
        """``deadlift --org ORG guest ARGS --json``, parsed."""
        settings = self.settings
        result = await cli(
            settings, "--org", self.name, "--orgs", settings.orgs_file, "guest", *args, "--json"
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture
def connect(clients: Clients) -> Connect:
    """``await connect("acme")``: that org as a ``Guest`` on clean streams."""
    return functools.partial(clients.org, kind=Guest)


async def ship(
    guest_org: Org, host: Org, orgs: OrgManifest, file: str, name: str, seed: str
) -> None:
    """The guest pushes, signs and offers its module; the host accepts it."""
    await guest_org.push(file, name=name)
    await offer_module(
        guest_org.nc,
        guest_org.registry,
        orgs,
        owner=guest_org.name,
        ref=f"{name}@1",
        host=host.name,
        seed=seed,
    )
    await accept_offer(
        host.js, host.registry, orgs, host=host.name, ref=f"{guest_org.name}/{name}@1"
    )


async def publish(nc: Any, subject: str, data: Any) -> None:
    event = events.new_event(data, source="test", type="test.event", traceparent=TRACEPARENT)
    headers, body = events.encode(event)
    await bus.JetStreamPublisher(nc).publish(subject, body, headers, msg_id=event.id)


async def _at_least(records: Any, count: int) -> list[dict[str, Any]] | None:
    found: list[dict[str, Any]] = await records
    return found if len(found) >= count else None


def charge(customer: Any = "alice") -> dict[str, Any]:
    return {
        "charge_id": "ch_secret_1",
        "customer": customer,
        "email": "alice@example.com",
        "amount": 4.5,
        "category": "coffee",
        "ts": int(time.time()),
    }


async def test_each_guest_sees_its_own_runs_and_a_third_org_nothing(
    connect: Any, orgs: OrgManifest
) -> None:
    acme, initech, stripe = await connect("acme"), await connect("initech"), await connect("stripe")
    globex = await connect("globex", streams=False)
    await ship(acme, stripe, orgs, "before_charge_action", "before_charge_action", ACME_SEED)
    await ship(initech, stripe, orgs, "add_ten", "scorer", INITECH_SEED)
    for text in (CHARGES, SCORING):
        await stripe.apply(text, orgs, source="t.yaml")
    # Globex listens on every control subject its account has: nothing ever comes.
    overheard: list[Msg] = []

    async def overhear(msg: Msg) -> None:
        overheard.append(msg)

    for subject in ("deadlift.from.>", "deadlift.share.>"):
        await globex.nc.subscribe(subject, cb=overhear)

    reports: list[StepReport] = []
    async with stripe.host(orgs, observers=[reports.append]) as running:
        await publish(stripe.nc, "stripe.charges", charge())
        await publish(stripe.nc, "stripe.charges", charge(customer=42))  # the module fails on it
        await publish(stripe.nc, "stripe.score", {"value": 1})
        await running.drain()
    assert sorted(r.outcome for r in reports) == ["dead", "ok", "ok", "retry"]
    assert running.stats["run_records"] == 4 and running.stats["run_records_lost"] == 0

    # Acme: its three runs at stripe, in order, with its logs and errors, no charge data.
    mine = await eventually(
        lambda: _at_least(guest.guest_runs(acme.js), 3), message="acme's records"
    )
    listed = await acme.runs("runs")
    assert [r["seq"] for r in listed] == [r["seq"] for r in mine]
    assert {(r["host"], r["workflow"], r["step"], r["module"]) for r in listed} == {
        ("stripe", "charges", "loyalty", "acme/before_charge_action@1")
    }
    by_outcome = {r["outcome"]: r for r in listed}
    assert sorted(by_outcome) == ["dead", "ok", "retry"]
    ok, dead = by_outcome["ok"], by_outcome["dead"]
    assert ok["error_kind"] is None and ok["latency_ms"] > 0
    assert ok["trace_id"] == "0af7651916cd43dd8448eb211c80319c"  # not tracing: the input's
    assert any("10% discount" in line["text"] for line in ok["logs"]), ok["logs"]
    assert (dead["attempt"], dead["error_kind"]) == (2, "error")
    assert "customer" in dead["error"]
    assert by_outcome["retry"]["run"] == dead["run"]
    # No payloads: the charge is nowhere but in what the module itself chose to log.
    stored = json.dumps([{k: v for k, v in r.items() if k != "logs"} for r in listed])
    assert "ch_secret_1" not in stored and "alice@example.com" not in stored
    assert all("input" not in r and "output" not in r for r in listed)
    assert await acme.runs("runs", "--host", "initech") == []

    shown = await cli(
        acme.settings, "--org", "acme", "--orgs", acme.settings.orgs_file, "guest", "runs"
    )
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    dead_line = next(line for line in lines if " dead #2 " in line)
    assert "stripe  charges/loyalty  acme/before_charge_action@1" in dead_line
    assert 'error: module returned an error: before_charge_action: field "customer"' in dead_line
    assert any(line.startswith("    INFO before_charge_action: charge") for line in lines)
    table = await cli(
        acme.settings, "--org", "acme", "--orgs", acme.settings.orgs_file, "guest", "status"
    )
    assert table.exit_code == 0 and "acme/before_charge_action@1" in table.stdout, table.output

    [row] = await acme.runs("status")
    assert row["outcomes"] == {"ok": 1, "retry": 1, "dead": 1} and row["runs"] == 3
    assert row["last_error"]["kind"] == "error" and row["p50_ms"] is not None

    # Initech: only its own run, with payloads (its integration allows them).
    [scored] = await eventually(
        lambda: _at_least(guest.guest_runs(initech.js), 1), message="initech's records"
    )
    assert (scored["module"], scored["outcome"]) == ("initech/scorer@1", "ok")
    assert (scored["input"], scored["output"]) == ({"value": 1}, {"value": 11})
    assert [r["module"] for r in await initech.runs("runs")] == ["initech/scorer@1"]

    # Globex: no stream of run records, nothing overheard.
    assert await globex.runs("runs") == []
    assert await globex.runs("status") == []
    assert not await guest.runs_stream_exists(globex.js)  # it guests nowhere: none created
    assert overheard == []


async def test_a_guest_follows_new_runs(connect: Any, orgs: OrgManifest) -> None:
    acme, stripe = await connect("acme"), await connect("stripe")
    await ship(acme, stripe, orgs, "before_charge_action", "before_charge_action", ACME_SEED)
    await stripe.apply(CHARGES, orgs, source="t.yaml")
    stop = asyncio.Event()
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        async for record in guest.follow_runs(acme.js, host="stripe", stop=stop):
            seen.append(record)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)  # subscribed
    async with stripe.host(orgs) as running:
        for customer in ("alice", "bob"):
            await publish(stripe.nc, "stripe.charges", charge(customer))
        await running.drain()
    await eventually(lambda: len(seen) == 2, message="two followed runs")
    stop.set()
    await asyncio.wait_for(follower, 2.0)  # stops cleanly
    assert sorted(r["outcome"] for r in seen) == ["filtered", "ok"]
    assert {r["host"] for r in seen} == {"stripe"}

    # From a sequence on (what `guest runs --follow` does after listing the newest).
    again: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def resume() -> None:
        async for record in guest.follow_runs(acme.js, stop=stop, start_seq=seen[1]["seq"]):
            again.append(record)

    resumed = asyncio.create_task(resume())
    await eventually(lambda: len(again) == 1, message="the run from that sequence on")
    stop.set()
    await asyncio.wait_for(resumed, 2.0)
    assert again[0]["seq"] == seen[1]["seq"]


async def test_the_newest_runs_and_the_host_from_where_they_came(connect: Any) -> None:
    acme, stripe = await connect("acme"), await connect("stripe")
    for n in range(120):  # as a host's worker sends them; one claims another host
        body = {"host": "globex", "workflow": "w", "step": "s", "outcome": "ok", "n": n}
        await stripe.nc.publish("deadlift.share.acme.runs.w.s", json.dumps(body).encode())
    await stripe.nc.flush()
    await eventually(lambda: _at_least(guest.guest_runs(acme.js, last=200), 120), message="stored")
    newest = await guest.guest_runs(acme.js, host="stripe", last=5)
    assert [r["n"] for r in newest] == [115, 116, 117, 118, 119]
    assert {r["host"] for r in newest} == {"stripe"}  # the subject's, not the body's claim
    assert await guest.guest_runs(acme.js, host="globex", last=5) == []
    [row] = await guest.guest_status(acme.js)
    assert (row["host"], row["runs"], row["outcomes"]) == ("stripe", 120, {"ok": 120})
