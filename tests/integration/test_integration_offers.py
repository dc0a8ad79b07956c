"""A guest owns and ships its module; the host accepts it; workers verify it on every load.

Acme (the guest) pushes a module to its own registry, signs it and offers it to
Stripe (the host) through the integration declared in the org manifest; Stripe
lists the offers and accepts one, and only then may its workflows use
``acme/NAME@VERSION``. Globex is a third org with no integration. Everything
runs on a real nats-server with one account per org.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import RePublish, StreamConfig

from deadlift.bus import offers
from deadlift.bus.integration_streams import offers_stream
from deadlift.bus.offers import accept_offer, chunk_size, list_offers, offer_module
from deadlift.errors import ConfigError, PermissionDeniedError
from deadlift.model import integrations as links
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Workflow
from deadlift.ops.status import step_counts
from deadlift.runtime.step import StepReport
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import signing
from tests.conftest import eventually, module_path, publish
from tests.integration.accounts import Org, write_orgs
from tests.integration.conftest import cli
from tests.manifests import integration, logins

SEED, PUBLIC = signing.new_key()  # acme's signing key for this module's tests


def manifest() -> dict[str, Any]:
    """Stripe hosts Acme's modules; Globex is a third org with no integration."""
    modules = {
        "before_charge_action": {"grants": ["past_purchases", "send_email"]},
        "scorer": {"publish": ["stripe.scored"]},
    }
    return {
        "orgs": logins("acme", "stripe", "globex"),
        "integrations": {"acme-at-stripe": integration(PUBLIC, modules)},
    }


@pytest.fixture(scope="module")
def orgs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_orgs(tmp_path_factory.mktemp("orgs"), manifest())


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "acme.seed"
    path.write_text(SEED + "\n")
    return path


CHARGES = """
name: charges
org: stripe
trigger: stripe.charges
steps:
  - name: check
    module: acme/before_charge_action@1
    function: before_charge_action
    host_functions: [past_purchases, send_email]
"""

SCORING = """
name: scoring
org: stripe
trigger: stripe.score
steps:
  - name: score
    module: {module}
    function: _main
    publish: [stripe.scored]
"""


async def offer(acme: Org, orgs: OrgManifest, ref: str, *, seed: str = SEED) -> Any:
    return await offer_module(
        acme.nc, acme.registry, orgs, owner="acme", ref=ref, host="stripe", seed=seed
    )


def charge(customer: str = "alice") -> dict[str, Any]:
    return {
        "charge_id": "ch_1",
        "customer": customer,
        "email": f"{customer}@example.com",
        "amount": 4.5,
        "category": "coffee",
        "ts": int(time.time()),
    }


def worker(org: Org, orgs: OrgManifest, reports: list[StepReport]) -> Worker:
    return org.host(orgs, observers=[reports.append])


# -- offer, list, accept, run ---------------------------------------------------------


async def test_an_offered_module_runs_at_the_host_only_once_accepted(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    pushed = await acme.push("before_charge_action")
    made = await offer(acme, orgs, "before_charge_action@1")
    assert (made.owner, made.ref, made.sha256) == (
        "acme",
        "acme/before_charge_action@1",
        pushed.sha256,
    )

    [listed] = await list_offers(stripe.js, stripe.registry, orgs, "stripe")
    assert (listed.ref, listed.status, listed.size) == (made.ref, "pending", pushed.size)
    with pytest.raises(ConfigError) as refused:
        await stripe.apply(CHARGES, orgs)
    assert str(refused.value) == (
        "test.yaml: step 'check': module acme/before_charge_action@1 is not accepted: list offers "
        "with `deadlift --org stripe module offers`, accept with "
        "`deadlift --org stripe module accept acme/before_charge_action@1`"
    )

    meta, changed = await accept_offer(
        stripe.js, stripe.registry, orgs, host="stripe", ref="acme/before_charge_action@1"
    )
    assert changed and meta.ref == "acme/before_charge_action@1" and meta.owner == "acme"
    assert meta.sha256 == pushed.sha256 and meta.signing_key == PUBLIC and meta.accepted_at
    assert signing.verify(PUBLIC, meta.signature or "", "acme", meta.name, "1", meta.sha256)
    again = await accept_offer(
        stripe.js, stripe.registry, orgs, host="stripe", ref="acme/before_charge_action@1"
    )
    assert again == (meta, False)  # accepting the same binary again is a no-op
    [listed] = await list_offers(stripe.js, stripe.registry, orgs, "stripe")
    assert listed.status == "accepted"
    # Stripe's own modules are another namespace: a plain name does not find Acme's.
    assert [m.ref for m in await stripe.registry.modules()] == ["acme/before_charge_action@1"]

    workflow = await stripe.apply(CHARGES, orgs)
    assert workflow.steps[0].module_sha256 == pushed.sha256
    reports: list[StepReport] = []
    async with worker(stripe, orgs, reports) as running:
        assert running.steps == ["stripe.charges.check"]
        await publish(stripe.nc, "stripe.charges", charge())
        await running.drain()
    [report] = reports
    assert report.outcome == "ok", report.error
    assert report.output["discount_percent"] == 10 and report.output["customer"] == "alice"


async def test_a_big_module_crosses_in_chunks(
    acme: Org, stripe: Org, orgs: OrgManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module larger than one chunk is reassembled byte for byte at the host."""
    monkeypatch.setattr(offers, "MAX_CHUNK", 16 * 1024)
    assert chunk_size(acme.nc.max_payload) == 16 * 1024
    await acme.push("before_charge_action")
    made = await offer(acme, orgs, "before_charge_action")
    assert made.chunks > 1
    meta, _ = await accept_offer(
        stripe.js, stripe.registry, orgs, host="stripe", ref="acme/before_charge_action@1"
    )
    stored = await stripe.registry.binary(meta.sha256)
    assert stored == module_path("before_charge_action").read_bytes()


# -- signatures -------------------------------------------------------------------------


async def test_an_offer_signed_with_another_key_is_refused_at_offer(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    await acme.push("add_ten", name="scorer")
    other, _ = signing.new_key()
    with pytest.raises(
        ConfigError,
        match="this key is not the signing_key integration acme-at-stripe declares for acme",
    ):
        await offer(acme, orgs, "scorer@1", seed=other)
    assert await list_offers(stripe.js, stripe.registry, orgs, "stripe") == []


async def forge_offer(acme: Org, wasm: bytes, *, name: str, version: str, signature: str) -> str:
    """Publish an offer as Acme's account would, bypassing offer_module; return its sha256."""
    sha = hashlib.sha256(wasm).hexdigest()
    await acme.nc.publish(links.share_subject("stripe", links.OFFERS, name, sha, "0"), wasm)
    document = {
        "name": name,
        "version": version,
        "sha256": sha,
        "size": len(wasm),
        "chunks": 1,
        "codec": "json",
        "signature": signature,
        "offered_at": 1.0,
    }
    await acme.nc.publish(
        links.share_subject("stripe", links.OFFERS, name, sha, "meta"),
        json.dumps(document).encode(),
    )
    await acme.nc.flush()
    return sha


async def test_an_offer_with_a_wrong_signature_is_refused_at_accept(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    wasm = module_path("add_ten").read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    other, _ = signing.new_key()
    await forge_offer(
        acme,
        wasm,
        name="scorer",
        version="1",
        signature=signing.sign(other, "acme", "scorer", "1", sha),
    )
    listed = await eventually(lambda: list_offers(stripe.js, stripe.registry, orgs, "stripe"))
    assert [(o.ref, o.status) for o in listed] == [("acme/scorer@1", "invalid signature")]
    with pytest.raises(ConfigError) as refused:
        await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")
    assert (
        "signature does not verify with acme's signing_key declared in integration acme-at-stripe"
        in str(refused.value)
    )
    assert "not accepted" in str(refused.value)
    assert await stripe.registry.modules() == []


async def test_a_signature_for_another_binary_is_refused_at_accept(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    """Acme's genuine signature of add_ten does not carry over to another binary."""
    good = hashlib.sha256(module_path("add_ten").read_bytes()).hexdigest()
    signature = signing.sign(SEED, "acme", "scorer", "1", good)
    await forge_offer(
        acme, module_path("echo").read_bytes(), name="scorer", version="1", signature=signature
    )
    await eventually(lambda: list_offers(stripe.js, stripe.registry, orgs, "stripe"))
    with pytest.raises(ConfigError, match="signature does not verify"):
        await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")


async def test_an_offer_written_by_a_stream_of_the_host_is_skipped(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    """A Stripe user may not publish where Acme's offers arrive, but a stream's republish
    is written by the server: such a message is not from Acme, and is not listed."""
    wasm = module_path("add_ten").read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    await stripe.js.add_stream(
        StreamConfig(
            name="EVIL",
            subjects=["stripe.evil.>"],
            republish=RePublish(src="stripe.evil.>", dest="deadlift.from.acme.offers.>"),
        )
    )
    document = {
        "name": "scorer",
        "version": "1",
        "sha256": sha,
        "size": len(wasm),
        "chunks": 1,
        "signature": signing.sign(SEED, "acme", "scorer", "1", sha),  # even a valid one
        "offered_at": 1.0,
    }
    await stripe.js.publish(f"stripe.evil.scorer.{sha}.0", wasm)
    await stripe.js.publish(f"stripe.evil.scorer.{sha}.meta", json.dumps(document).encode())
    stream = offers_stream("acme")

    async def both_stored() -> bool:
        return await _stored(stripe, stream) == 2

    await eventually(both_stored, message="the republished forgery (chunk and document) stored")
    assert await list_offers(stripe.js, stripe.registry, orgs, "stripe") == []
    with pytest.raises(Exception, match="has not offered scorer@1"):
        await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")


async def _stored(org: Org, stream: str) -> int:
    info = await org.js.stream_info(stream)
    return int(info.state.messages)


# -- a tampered registry entry never runs --------------------------------------------------


async def accepted_scoring(acme: Org, stripe: Org, orgs: OrgManifest) -> Workflow:
    """Acme's scorer@1 (add_ten) offered, accepted, and used by Stripe's workflow."""
    await acme.push("add_ten", name="scorer")
    await offer(acme, orgs, "scorer@1")
    await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")
    return await stripe.apply(SCORING.format(module="acme/scorer@1"), orgs)


async def assert_not_run(
    stripe: Org, orgs: OrgManifest, caplog: pytest.LogCaptureFixture, why: str
) -> None:
    """A worker refuses the step: its event stays in the consumer, nothing is published."""
    reports: list[StepReport] = []
    with caplog.at_level(logging.ERROR, logger="deadlift.worker"):
        async with worker(stripe, orgs, reports) as running:
            assert running.steps == []
            await publish(stripe.nc, "stripe.score", {"value": 1})
            await asyncio.sleep(2.0)
    assert reports == []
    # The event waits, never delivered: no step made the trigger's consumer.
    counts = await step_counts(stripe.js, [await stripe.registry.workflow("scoring")])
    assert counts[("stripe", "scoring", "score")].pending == 1
    assert counts[("stripe", "scoring", "score")].consumers == 0
    refusals = [r.getMessage() for r in caplog.records if "not started" in r.getMessage()]
    assert refusals and "workflow stripe.scoring step 'score'" in refusals[0]
    assert why in refusals[0]


async def test_a_tampered_signature_in_the_registry_never_runs(
    acme: Org, stripe: Org, orgs: OrgManifest, caplog: pytest.LogCaptureFixture
) -> None:
    await accepted_scoring(acme, stripe, orgs)
    kv = stripe.registry.modules_bucket
    entry = json.loads((await kv.get("acme/scorer/1")).value or b"")
    other, other_public = signing.new_key()
    # Whoever writes the registry may also claim another key: the worker uses the manifest's.
    entry.update(
        signature=signing.sign(other, "acme", "scorer", "1", entry["sha256"]),
        signing_key=other_public,
    )
    await kv.put("acme/scorer/1", json.dumps(entry).encode())
    await assert_not_run(stripe, orgs, caplog, "does not verify with acme's signing_key")


async def test_a_registry_entry_pointed_at_another_binary_never_runs(
    acme: Org, stripe: Org, orgs: OrgManifest, caplog: pytest.LogCaptureFixture
) -> None:
    await accepted_scoring(acme, stripe, orgs)
    own = await stripe.push("echo")  # a binary of Stripe's own
    kv = stripe.registry.modules_bucket
    entry = json.loads((await kv.get("acme/scorer/1")).value or b"")
    entry["sha256"] = own.sha256  # Acme's name and signature, Stripe's binary
    await kv.put("acme/scorer/1", json.dumps(entry).encode())
    workflow = await stripe.apply(SCORING.format(module="acme/scorer@1"), orgs)
    assert workflow.steps[0].module_sha256 == own.sha256  # apply trusts the registry...
    await assert_not_run(stripe, orgs, caplog, "does not verify")  # ...the worker does not


async def test_a_guest_module_needs_the_org_manifest_to_run(
    acme: Org, stripe: Org, orgs: OrgManifest, caplog: pytest.LogCaptureFixture
) -> None:
    await accepted_scoring(acme, stripe, orgs)
    with caplog.at_level(logging.ERROR, logger="deadlift.worker"):
        async with Worker(stripe.nc, settings=stripe.settings, advertise=False) as running:
            assert running.steps == []
    assert any("no org manifest" in r.getMessage() for r in caplog.records)


# -- versions -------------------------------------------------------------------------------


async def test_a_new_version_never_runs_until_accepted(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    await acme.push("add_ten", name="scorer", version="1")
    second = await acme.push("echo", name="scorer", version="2")
    await offer(acme, orgs, "scorer@1")
    await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")
    latest = SCORING.format(module="acme/scorer")  # the latest accepted version
    await stripe.apply(latest, orgs)
    reports: list[StepReport] = []
    async with worker(stripe, orgs, reports) as running:
        await publish(stripe.nc, "stripe.score", {"value": 1})
        await running.drain()
        assert [r.output for r in reports] == [{"value": 11}]

        await offer(acme, orgs, "scorer@2")
        statuses = {
            o.ref: o.status for o in await list_offers(stripe.js, stripe.registry, orgs, "stripe")
        }
        assert statuses == {"acme/scorer@1": "accepted", "acme/scorer@2": "pending"}
        reapplied = await stripe.apply(latest, orgs)  # still @1: @2 is only offered
        assert reapplied.steps[0].module_sha256 != second.sha256
        await publish(stripe.nc, "stripe.score", {"value": 2})
        await running.drain()
        assert [r.output for r in reports][-1] == {"value": 12}

        await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@2")
        picked = await stripe.apply(latest, orgs)
        assert picked.steps[0].module_sha256 == second.sha256
        await eventually(lambda: running.modules.get("stripe.scoring.score") == second.sha256)
        await publish(stripe.nc, "stripe.score", {"value": 3})
        await running.drain()
        assert [r.output for r in reports][-1] == {"value": 3}  # echo, Acme's @2


async def test_an_accepted_version_is_immutable(acme: Org, stripe: Org, orgs: OrgManifest) -> None:
    """Acme removes scorer@1 and pushes another binary as @1: Stripe keeps the first."""
    await acme.push("add_ten", name="scorer", version="1")
    await offer(acme, orgs, "scorer@1")
    await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")
    await acme.registry.remove_module("scorer@1")
    await acme.push("echo", name="scorer", version="1")
    await offer(acme, orgs, "scorer@1")
    statuses = [o.status for o in await list_offers(stripe.js, stripe.registry, orgs, "stripe")]
    assert sorted(statuses)[0] == "accepted" and statuses.count("accepted") == 1
    assert any(s.startswith("conflicts with accepted sha256") for s in statuses)
    with pytest.raises(ConfigError, match="acme/scorer@1 already exists with another binary"):
        await accept_offer(stripe.js, stripe.registry, orgs, host="stripe", ref="acme/scorer@1")


async def test_module_rm_of_an_accepted_module(acme: Org, stripe: Org, orgs: OrgManifest) -> None:
    await accepted_scoring(acme, stripe, orgs)
    with pytest.raises(Exception, match=r"used by workflow stripe\.scoring step 'score'"):
        await stripe.registry.remove_module("acme/scorer@1")
    await stripe.registry.delete_workflow("stripe.scoring")
    [removed] = await stripe.registry.remove_module("acme/scorer@1")
    assert removed.ref == "acme/scorer@1"
    assert await stripe.registry.modules() == []


async def test_inspecting_an_accepted_module_lists_the_guests_versions_only(
    acme: Org, stripe: Org, orgs: OrgManifest, orgs_file: Path
) -> None:
    # Stripe has a module of its own with the same name, in two versions.
    await stripe.push("add_ten", name="scorer")
    await stripe.push("multiply_by_five", name="scorer")
    await accepted_scoring(acme, stripe, orgs)
    as_stripe = ("--orgs", str(orgs_file), "--org", "stripe", "module", "inspect")
    result = await cli(stripe.settings, *as_stripe, "acme/scorer@1", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["owner"] == "acme" and shown["versions"] == ["1"]
    own = json.loads((await cli(stripe.settings, *as_stripe, "scorer", "--json")).output)
    assert own["owner"] is None and own["versions"] == ["1", "2"]


# -- who may offer ---------------------------------------------------------------------------


async def test_an_org_without_an_integration_cannot_offer(
    connect: Any, stripe: Org, orgs: OrgManifest
) -> None:
    globex: Org = await connect("globex")
    await globex.push("add_ten", name="scorer")
    with pytest.raises(
        ConfigError, match="no integration in the org manifest has stripe hosting globex"
    ):
        await offer_module(
            globex.nc,
            globex.registry,
            orgs,
            owner="globex",
            ref="scorer@1",
            host="stripe",
            seed=SEED,
        )
    # Published by hand, it goes nowhere: nothing exports Globex's offers to Stripe.
    wasm = module_path("add_ten").read_bytes()
    await forge_offer(globex, wasm, name="scorer", version="1", signature="x")
    await asyncio.sleep(0.3)
    assert await list_offers(stripe.js, stripe.registry, orgs, "stripe") == []


async def test_the_host_cannot_publish_where_offers_arrive(stripe: Org) -> None:
    subject = links.from_subject("acme", links.OFFERS, "scorer", "0" * 64, "meta")
    await stripe.nc.publish(subject, b"{}")
    with pytest.raises(PermissionDeniedError, match=r"deadlift\.from\.acme\.offers"):
        await stripe.nc.check_allowed(subject)


async def test_an_offer_the_host_does_not_store_times_out(
    acme: Org, stripe: Org, orgs: OrgManifest
) -> None:
    await stripe.js.delete_stream(offers_stream("acme"))
    await acme.push("add_ten", name="scorer")
    with pytest.raises(ConfigError, match="stripe has not stored the offer") as refused:
        await offer_module(
            acme.nc,
            acme.registry,
            orgs,
            owner="acme",
            ref="scorer@1",
            host="stripe",
            seed=SEED,
            timeout=0.5,
        )
    assert "deadlift --org stripe module offers" in str(refused.value)


async def test_a_module_the_integration_does_not_list_cannot_be_offered(
    acme: Org, orgs: OrgManifest
) -> None:
    await acme.push("add_ten")
    with pytest.raises(
        ConfigError, match="integration acme-at-stripe does not list acme's module 'add_ten'"
    ):
        await offer(acme, orgs, "add_ten@1")


# -- the CLI ----------------------------------------------------------------------------------


async def test_cli_offer_offers_accept(
    acme: Org, stripe: Org, orgs_file: Path, key_file: Path, restore_logging: None
) -> None:
    await acme.push("add_ten", name="scorer")
    common = ("--orgs", str(orgs_file))
    settings = acme.settings

    offered = await cli(
        settings,
        *common,
        "--org",
        "acme",
        "module",
        "offer",
        "scorer@1",
        "--to",
        "stripe",
        "--key",
        str(key_file),
        "--json",
    )
    assert offered.exit_code == 0, offered.output
    made = json.loads(offered.stdout)
    assert (made["ref"], made["owner"], made["host"]) == ("acme/scorer@1", "acme", "stripe")

    listed = await cli(settings, *common, "--org", "stripe", "module", "offers", "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert (row["ref"], row["status"], row["sha256"]) == (
        "acme/scorer@1",
        "pending",
        made["sha256"],
    )
    assert row["offered_at_iso"].endswith("Z")
    table = await cli(settings, *common, "--org", "stripe", "module", "offers")
    assert "acme" in table.stdout and "pending" in table.stdout

    accepted = await cli(
        settings, *common, "--org", "stripe", "module", "accept", "acme/scorer@1", "--json"
    )
    assert accepted.exit_code == 0, accepted.output
    meta = json.loads(accepted.stdout)
    assert (meta["ref"], meta["owner"], meta["new"]) == ("acme/scorer@1", "acme", True)
    listed = await cli(settings, *common, "--org", "stripe", "module", "offers", "--json")
    assert json.loads(listed.stdout)[0]["status"] == "accepted"
    ls = await cli(settings, *common, "--org", "stripe", "module", "ls")
    assert "acme" in ls.stdout and "scorer" in ls.stdout

    # Acme cannot accept on Stripe's behalf: its own manifest entry has no guests.
    wrong = await cli(settings, *common, "--org", "acme", "module", "accept", "acme/scorer@1")
    assert wrong.exit_code == 2 and "no integration" in wrong.stderr


async def test_cli_offer_needs_a_key(
    acme: Org, orgs_file: Path, restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(signing.SEED_ENV, raising=False)
    result = await cli(
        acme.settings,
        "--orgs",
        str(orgs_file),
        "--org",
        "acme",
        "module",
        "offer",
        "scorer@1",
        "--to",
        "stripe",
    )
    assert result.exit_code == 2 and "no signing key" in result.stderr


async def test_cli_keygen_writes_a_private_seed(tmp_path: Path, restore_logging: None) -> None:
    out = tmp_path / "acme.seed"
    result = await cli(Settings(), "module", "keygen", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert out.stat().st_mode & 0o777 == 0o600
    assert signing.public_key(out.read_text()) == shown["public_key"]
    again = await cli(Settings(), "module", "keygen", "--out", str(out))
    assert again.exit_code == 2 and "exists" in again.stderr
