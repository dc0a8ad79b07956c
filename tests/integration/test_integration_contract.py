"""What crosses an integration keeps its contract, and `deadlift contract` tells both sides.

On a real nats-server with one account per org: Stripe (the host) sends Acme
(the guest) a ``discounts`` event with a JSON Schema. A valid event reaches
Acme's import with ``ce-dataschema``; an invalid one is dead-lettered on
Stripe's side (kind ``schema``) and never leaves; Globex, a third org, sees
nothing. ``workflow apply`` refuses a step exceeding the guest module's grants
before the module is even accepted, and ``contract check`` reports both sides.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deadlift import bus
from deadlift.errors import ConfigError
from deadlift.model.integrations import schema_uri
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import Stream, step_subject
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import push_module_file
from deadlift.runtime.step import StepReport
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import events, signing
from tests.conftest import module_path, publish, raw_messages
from tests.integration.accounts import Clients, Connect, Org, write_orgs
from tests.integration.conftest import cli
from tests.manifests import discount_schema, integration, logins

_, PUBLIC = signing.new_key()
DISCOUNTS = "stripe.out.acme.discounts"
ARRIVES = "acme.in.stripe.discounts"
URI = schema_uri("acme-at-stripe", "discounts")
SCHEMA = discount_schema("discount_percent")
VALID = {"customer": "alice", "discount_percent": 10}
INVALID = {"customer": "alice", "discount_percent": 250}


def manifest() -> dict[str, Any]:
    discounts = {"from": "stripe", "subject": DISCOUNTS, "to": ARRIVES, "schema": "discount.json"}
    return {
        "orgs": logins("acme", "stripe", "globex"),
        "integrations": {
            "acme-at-stripe": integration(
                PUBLIC,
                {"before_charge_action": {"grants": ["past_purchases"]}},
                events={"discounts": discounts},
            )
        },
    }


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    """The manifest and, beside it, the schema it names."""
    (folder / "discount.json").write_text(json.dumps(SCHEMA))
    return write_orgs(folder, data)


@pytest.fixture(scope="module")
def orgs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("orgs"), manifest())


@pytest.fixture
def connect(clients: Clients) -> Connect:
    """``await connect("acme")``: that org on clean streams; no worker has made its
    integration streams yet."""
    return functools.partial(clients.org, streams=False)


NOTICE = f"""
name: notice
org: stripe
trigger: stripe.charges
steps:
  - {{name: relay, module: echo, function: echo, next: [log], publish: [{DISCOUNTS}]}}
  - {{name: log, module: echo, function: echo, publish: [stripe.log]}}
"""
EMITTING = """
name: emitting
org: stripe
trigger: stripe.emits
steps:
  - {name: emit, module: emitter, function: emit_many, emit: [stripe.out.>],
     host_functions: [emit], retry: {max_attempts: 1}}
"""
LOYALTY = f"""
name: loyalty
org: acme
trigger: {ARRIVES}
steps:
  - {{name: count, module: echo, function: echo}}
"""


async def arrived(acme: Org) -> list[Any]:
    """What Stripe's export delivered into Acme's account (captured by Acme's import stream)."""
    return await raw_messages(acme.nc, bus.import_stream("stripe"), ARRIVES)


@pytest.fixture
async def both_sides(stripe: Org, acme: Org, orgs: OrgManifest) -> tuple[Org, Org]:
    """Stripe relays charges onto the discounts event; Acme's workflow receives it."""
    for org in (stripe, acme):
        await push_module_file(org.registry, module_path("echo"))
    await push_module_file(stripe.registry, module_path("emitter"))
    await stripe.apply(NOTICE, orgs)
    await stripe.apply(EMITTING, orgs)
    await acme.apply(LOYALTY, orgs)
    return stripe, acme


async def test_a_valid_event_crosses_and_names_its_schema(
    both_sides: tuple[Org, Org], orgs: OrgManifest, connect: Any
) -> None:
    stripe, acme = both_sides
    globex = await connect("globex")
    seen: list[Any] = []

    async def note(msg: Any) -> None:
        seen.append(msg)

    for pattern in ("globex.>", "deadlift.>"):  # everything Globex may subscribe to
        await globex.nc.subscribe(pattern, cb=note)
    reports: list[StepReport] = []
    async with Worker(
        stripe.nc, settings=stripe.settings, orgs=orgs, observers=[reports.append]
    ) as worker:
        await publish(stripe.nc, "stripe.charges", VALID)
        await worker.drain()
    assert [r.outcome for r in reports] == ["ok", "ok"]
    [sent] = await raw_messages(stripe.nc, Stream.EVENTS, DISCOUNTS)
    assert sent.headers["ce-dataschema"] == URI
    [received] = await arrived(acme)
    assert received.headers["ce-dataschema"] == URI
    assert events.unpack(received.data) == VALID
    # The internal next step and the org's own subjects carry no contract.
    [log] = await raw_messages(stripe.nc, Stream.EVENTS, "stripe.log")
    assert "ce-dataschema" not in log.headers
    await globex.nc.flush()
    assert seen == []
    assert not [s for s in await globex.js.streams_info() if s.state.messages]


async def test_an_invalid_event_is_dead_lettered_at_the_sender_and_never_leaves(
    both_sides: tuple[Org, Org], orgs: OrgManifest, restore_logging: None
) -> None:
    stripe, acme = both_sides
    reports: list[StepReport] = []
    async with Worker(
        stripe.nc, settings=stripe.settings, orgs=orgs, observers=[reports.append]
    ) as worker:
        await publish(stripe.nc, "stripe.charges", INVALID)
        await worker.drain()
    [report] = reports
    assert (report.outcome, report.error_kind) == ("dead", "schema")
    assert report.error == (
        f"output for acme on {DISCOUNTS} breaks the acme-at-stripe/discounts schema: "
        "discount_percent: 250 is greater than the maximum of 100"
    )
    # All or nothing: not the event, not even the internal next step.
    assert await raw_messages(stripe.nc, Stream.EVENTS, DISCOUNTS) == []
    next_step = step_subject("stripe", "notice", "log")
    assert await raw_messages(stripe.nc, Stream.STEPS, next_step) == []
    assert await arrived(acme) == []
    result = await cli(
        stripe.settings,
        "--org",
        "stripe",
        "--orgs",
        stripe.settings.orgs_file,
        "dlq",
        "ls",
        "--json",
    )
    assert result.exit_code == 0, result.output
    [letter] = json.loads(result.output)
    assert (letter["workflow"], letter["step"], letter["kind"]) == ("notice", "relay", "schema")
    assert "discount_percent: 250" in letter["error"]


async def test_an_emitted_event_is_held_to_the_schema_too(
    both_sides: tuple[Org, Org], orgs: OrgManifest
) -> None:
    stripe, acme = both_sides
    reports: list[StepReport] = []
    async with Worker(
        stripe.nc, settings=stripe.settings, orgs=orgs, observers=[reports.append]
    ) as worker:
        await publish(stripe.nc, "stripe.emits", {"subjects": [DISCOUNTS], "data": VALID})
        await worker.drain()
        await publish(stripe.nc, "stripe.emits", {"subjects": [DISCOUNTS], "data": INVALID})
        await worker.drain()
    ok, dead = reports
    assert ok.outcome == "ok"
    assert (dead.outcome, dead.error_kind) == ("dead", "host_function")
    assert "emit to 'stripe.out.acme.discounts' for acme breaks the acme-at-stripe/discounts" in (
        dead.error or ""
    )
    [received] = await arrived(acme)
    assert received.headers["ce-dataschema"] == URI
    assert events.unpack(received.data) == VALID


GREEDY = """
name: charges
org: stripe
trigger: stripe.charges.guest
steps:
  - name: check
    module: acme/before_charge_action
    function: before_charge_action
    host_functions: [past_purchases, send_email]
"""


async def test_apply_refuses_more_than_the_grants_before_the_module_is_accepted(
    stripe: Org, orgs: OrgManifest
) -> None:
    # acme/before_charge_action was never offered nor accepted: the grants are refused first.
    with pytest.raises(ConfigError) as caught:
        await stripe.apply(GREEDY, orgs, source="flow.yaml")
    assert str(caught.value) == (
        "flow.yaml: step 'check': host_functions: send_email not granted to "
        "acme/before_charge_action by integration acme-at-stripe (grants: past_purchases)"
    )
    assert await stripe.registry.workflows() == []


async def test_apply_refuses_publishing_where_the_peers_event_arrives(
    acme: Org, orgs: OrgManifest
) -> None:
    await push_module_file(acme.registry, module_path("echo"))
    forged = f"""
name: forger
org: acme
trigger: acme.start
steps:
  - {{name: fake, module: echo, function: echo, publish: [{ARRIVES}]}}
"""
    with pytest.raises(ConfigError, match=rf"step 'fake': publish: {ARRIVES}: .* only stripe"):
        await acme.apply(forged, orgs)


async def contract_check(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    result = await cli(settings, "--orgs", settings.orgs_file, *args, "contract", "check", "--json")
    return result.exit_code, json.loads(result.stdout)


async def test_contract_check_reports_both_sides(
    both_sides: tuple[Org, Org], orgs: OrgManifest, restore_logging: None
) -> None:
    stripe, acme = both_sides
    code, report = await contract_check(stripe.settings, "--org", "stripe")
    assert code == 0, report
    assert report["ok"] is True
    sides = {s["org"]: s for s in report["sides"]}
    assert sides["stripe"]["checked"] and sides["acme"]["checked"]
    assert sides["stripe"]["workflows"] == ["stripe.emitting", "stripe.notice"]
    assert sides["acme"]["workflows"] == ["acme.loyalty"]
    [item] = report["integrations"]
    assert item["events"]["discounts"] == {
        "sent_by": ["stripe.emitting/emit", "stripe.notice/relay"],
        "triggers": ["acme.loyalty"],
    }
    assert item["warnings"] == []
    # Globex takes part in no integration: nothing to check, nothing wrong.
    code, report = await contract_check(stripe.settings, "--org", "globex")
    assert (code, report) == (0, {"ok": True, "sides": [], "integrations": []})

    # A client that skips `workflow apply` stores a step beyond the grants: check finds it.
    rogue = parse_workflow(GREEDY.replace("send_email", "kv_get"), source="rogue.yaml")
    await stripe.registry.put_workflow(rogue)
    code, report = await contract_check(acme.settings, "--org", "acme")
    assert code == 1
    assert report["ok"] is False
    [problem] = {s["org"]: s for s in report["sides"]}["stripe"]["problems"]
    assert problem.startswith("stripe.charges: step 'check': host_functions: kv_get not granted")


async def test_contract_check_reports_an_unused_event_and_a_side_it_cannot_read(
    stripe: Org, orgs_file: Path, tmp_path: Path, restore_logging: None
) -> None:
    # This copy of the manifest has no password for acme: only Stripe can be read.
    data = manifest()
    data["orgs"]["acme"]["users"] = [{"nkey": signing.new_key()[1]}]
    written = write_manifest(tmp_path, data)
    settings = stripe.settings.model_copy(update={"orgs_file": str(written)})
    code, report = await contract_check(settings, "--org", "stripe")
    assert code == 0, report
    sides = {s["org"]: s for s in report["sides"]}
    assert sides["acme"]["checked"] is False
    assert sides["acme"]["note"] == (
        "not checked: no credentials for org acme here; run `deadlift --org acme contract check`"
    )
    [item] = report["integrations"]
    assert item["events"]["discounts"] == {"sent_by": [], "triggers": None}
    assert item["warnings"] == [
        "event discounts: declared but never sent: no applied workflow of stripe publishes "
        f"or emits on {DISCOUNTS}"
    ]


async def test_contract_show_and_asyncapi_need_no_server(
    orgs_file: Path, tmp_path: Path, restore_logging: None
) -> None:
    offline = Settings(nats_url="nats://127.0.0.1:1", orgs_file=str(orgs_file))
    shown = await cli(offline, "--orgs", str(orgs_file), "contract", "show", "--json")
    assert shown.exit_code == 0, shown.output
    [item] = json.loads(shown.stdout)
    assert item["events"][0]["schema"]["uri"] == URI
    out = tmp_path / "acme.yaml"
    written = await cli(
        offline, "--orgs", str(orgs_file), "contract", "asyncapi", "--org", "acme", "-o", str(out)
    )
    assert written.exit_code == 0, written.output
    document = yaml.safe_load(out.read_text())
    assert document["asyncapi"] == "3.0.0"
    assert document["channels"]["acme-at-stripe.discounts"]["address"] == ARRIVES
    assert document["components"]["schemas"]["acme-at-stripe.discounts"] == SCHEMA
