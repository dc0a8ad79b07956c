"""Integrations without a server: the manifest, the rendered accounts, the contract checks,
the schema gate on what crosses, and the AsyncAPI export."""

from __future__ import annotations

import copy
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from deadlift.bus.publisher import MemoryPublisher
from deadlift.errors import ConfigError, HostFunctionError, StepError
from deadlift.model import asyncapi
from deadlift.model.contracts import check_workflow, outgoing_event, step_problems
from deadlift.model.integrations import schema_problem, schema_uri
from deadlift.model.orgs import OrgManifest, load_orgs, nats_accounts
from deadlift.model.workflow import parse_workflow
from deadlift.ops import contract
from deadlift.runtime import crossings
from deadlift.wire import events
from tests import manifests
from tests.conftest import ROOT

KEY = "UBA5VKKOGUIAHM6DF7GL4R2CSGTITX6A4HJXMRO2QJWESFMXVLMUNXG4"
SCHEMA = manifests.discount_schema("percent")
ASYNCAPI_SPEC = Path(__file__).parent / "specs" / "asyncapi-3.0.0-without-id.json.gz"


def raw() -> dict[str, Any]:
    """Stripe hosts Acme's module; Stripe sends discounts, Acme sends refunds; Globex is apart."""
    module = {"grants": ["past_purchases", "send_email"], "publish": ["stripe.audit.>"]}
    sent = {
        "discounts": {
            "from": "stripe",
            "subject": "stripe.out.acme.discounts",
            "to": "acme.in.stripe.discounts",
            "schema": SCHEMA,
        },
        "refunds": {"from": "acme", "subject": "acme.out.stripe.refunds"},
    }
    return {
        "orgs": manifests.logins("acme", "stripe", "globex", acme={"subjects": ["calc.>"]}),
        "integrations": {
            "acme-at-stripe": manifests.integration(
                KEY, {"before_charge_action": module}, events=sent
            )
        },
    }


def manifest(changes: Any = None) -> OrgManifest:
    data = raw()
    if changes is not None:
        changes(data)
    return OrgManifest.model_validate(data)


def integration(data: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = data["integrations"]["acme-at-stripe"]
    return item


# -- the manifest refuses what cannot be kept ------------------------------------------


def _set(path: str, value: Any) -> Any:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = integration(data)
        for part in parents:
            target = target[part]
        target[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("host", "initech"), r"host 'initech' is not an org"),
        (_set("guest", "initech"), r"guest 'initech' is not an org"),
        (_set("guest", "stripe"), r"host and guest are one org"),
        (_set("events.discounts.from", "globex"), r"from 'globex' must be stripe or acme"),
        (
            _set("events.discounts.subject", "acme.out.discounts"),
            r"acme\.out\.discounts is not a subject of stripe",
        ),
        (_set("events.discounts.schema", {"type": "nonsense"}), r"not a valid JSON Schema"),
        (_set("signing_key", "SUAM" + "A" * 54), r"signing_key"),
        (_set("signing_key", KEY[:-1]), r"signing_key"),
    ],
    ids=[
        "unknown-host",
        "unknown-guest",
        "host-is-guest",
        "third-org-sender",
        "not-senders-subject",
        "invalid-schema",
        "seed-not-key",
        "short-key",
    ],
)
def test_the_manifest_refuses_a_broken_integration(change: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        manifest(change)


def test_one_integration_per_host_and_guest() -> None:
    def twice(data: dict[str, Any]) -> None:
        data["integrations"]["again"] = copy.deepcopy(integration(data))

    with pytest.raises(
        ValueError, match=r"stripe already hosts acme in integration acme-at-stripe"
    ):
        manifest(twice)


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "orgs.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_schema_file_is_read_relative_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "discount.yaml").write_text(yaml.safe_dump(SCHEMA))
    data = raw()
    integration(data)["events"]["discounts"]["schema"] = "schemas/discount.yaml"
    path = write(tmp_path, data)
    monkeypatch.chdir(ROOT)  # elsewhere: the path is the manifest's, not the shell's
    loaded = load_orgs(path)
    assert loaded.integrations["acme-at-stripe"].events["discounts"].payload_schema == SCHEMA


def test_a_missing_schema_file_names_the_field_and_the_file(tmp_path: Path) -> None:
    data = raw()
    integration(data)["events"]["discounts"]["schema"] = "schemas/missing.json"
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_orgs(path)
    text = str(caught.value)
    assert "integrations.acme-at-stripe.events.discounts.schema" in text
    assert str(tmp_path / "schemas" / "missing.json") in text


def test_an_invalid_schema_in_a_file_is_refused_with_its_place(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"type": 12}))
    data = raw()
    integration(data)["events"]["discounts"]["schema"] = "bad.json"
    with pytest.raises(ConfigError, match=r"discounts.*not a valid JSON Schema"):
        load_orgs(write(tmp_path, data))


def test_the_shipped_manifest_declares_the_acme_stripe_integration() -> None:
    loaded = load_orgs(ROOT / "config" / "orgs.yaml")
    item = loaded.integrations["acme-at-stripe"]
    assert (item.host, item.guest) == ("stripe", "acme")
    assert item.events["discounts"].payload_schema is not None


# -- the rendered accounts ---------------------------------------------------------------


def test_events_become_exports_and_imports_of_exactly_the_two_sides() -> None:
    accounts = nats_accounts(manifest())["accounts"]
    stripe, acme, globex = accounts["STRIPE"], accounts["ACME"], accounts["GLOBEX"]
    assert {"stream": "stripe.out.acme.discounts", "accounts": ["ACME"]} in stripe["exports"]
    assert {
        "stream": {"account": "STRIPE", "subject": "stripe.out.acme.discounts"},
        "to": "acme.in.stripe.discounts",
    } in acme["imports"]
    # No `to:` given: the receiver sees the sender's subject.
    assert {"stream": {"account": "ACME", "subject": "acme.out.stripe.refunds"}} in stripe[
        "imports"
    ]
    assert "exports" not in globex and "imports" not in globex


def test_control_subjects_link_host_and_guest_one_way_each() -> None:
    accounts = nats_accounts(manifest())["accounts"]
    stripe, acme = accounts["STRIPE"], accounts["ACME"]
    exported = {e["stream"]: e["accounts"] for e in stripe["exports"]}
    assert exported["deadlift.share.acme.receipts.>"] == ["ACME"]
    assert exported["deadlift.share.acme.runs.>"] == ["ACME"]
    assert {e["stream"]: e["accounts"] for e in acme["exports"]}[
        "deadlift.share.stripe.offers.>"
    ] == ["STRIPE"]
    assert {
        "stream": {"account": "ACME", "subject": "deadlift.share.stripe.offers.>"},
        "to": "deadlift.from.acme.offers.>",
    } in stripe["imports"]
    assert {
        "stream": {"account": "STRIPE", "subject": "deadlift.share.acme.runs.>"},
        "to": "deadlift.from.stripe.runs.>",
    } in acme["imports"]


def test_no_user_may_write_where_the_server_delivers_control_messages() -> None:
    for account in ("ACME", "STRIPE", "GLOBEX"):
        for user in nats_accounts(manifest())["accounts"][account]["users"]:
            assert "deadlift.from.>" in user["permissions"]["publish"]["deny"]


# -- workflows held to the contract ------------------------------------------------------


def workflow(org: str, step: str) -> Any:
    return parse_workflow(
        f"name: flow\norg: {org}\ntrigger: {org}.start\nsteps:\n  - {step}\n", source="flow.yaml"
    )


GUEST = "{name: check, module: acme/before_charge_action, function: before_charge_action"


@pytest.mark.parametrize(
    ("org", "step", "problems"),
    [
        ("stripe", GUEST + ", host_functions: [past_purchases, send_email]}", []),
        (
            "stripe",
            GUEST + ", host_functions: [past_purchases, kv_get]}",
            [r"host_functions: kv_get not granted to acme/before_charge_action"],
        ),
        (
            "stripe",
            GUEST + ", publish: [stripe.out.acme.discounts, stripe.audit.x]}",
            [],
        ),
        (
            "stripe",
            GUEST + ", publish: [stripe.elsewhere]}",
            [r"publish: stripe\.elsewhere: acme/before_charge_action may publish only"],
        ),
        (
            "stripe",
            GUEST + ", emit: [stripe.charges.>]}",
            [r"emit: stripe\.charges\.>: .*may publish only"],
        ),
        (
            "stripe",
            "{name: check, module: acme/unknown_module}",
            [r"integration acme-at-stripe does not list acme's module 'unknown_module'"],
        ),
        (
            "globex",
            "{name: check, module: acme/before_charge_action}",
            [r"no integration in the org manifest has globex hosting acme's modules"],
        ),
        ("acme", "{name: own, module: acme/add_ten}", [r"name the org's own modules without"]),
        (
            "acme",
            "{name: own, module: echo, publish: [acme.in.stripe.discounts]}",
            [r"acme\.in\.stripe\.discounts is where stripe's event discounts .* arrives"],
        ),
        ("acme", "{name: own, module: echo, publish: [acme.out.stripe.refunds]}", []),
        ("globex", "{name: own, module: echo, publish: [globex.out]}", []),
    ],
    ids=[
        "granted",
        "not-granted",
        "declared-publish",
        "undeclared-publish",
        "undeclared-emit",
        "module-not-listed",
        "no-integration",
        "own-module-with-owner",
        "publish-on-peer-event",
        "own-event",
        "unrelated-org",
    ],
)
def test_step_problems(org: str, step: str, problems: list[str]) -> None:
    flow = workflow(org, step)
    found = step_problems(manifest(), flow, flow.steps[0])
    assert len(found) == len(problems), found
    for text, pattern in zip(found, problems, strict=True):
        assert re.search(pattern, text), text


def test_check_workflow_names_the_source_step_and_field() -> None:
    flow = workflow("stripe", GUEST + ", host_functions: [kv_get]}")
    with pytest.raises(ConfigError, match=r"^flow\.yaml: step 'check': host_functions: kv_get"):
        check_workflow(manifest(), flow, source="flow.yaml")


def test_outgoing_event_knows_the_sender_only() -> None:
    found = outgoing_event(manifest(), "stripe", "stripe.out.acme.discounts")
    assert found is not None
    assert (found.integration, found.event, found.receiver) == (
        "acme-at-stripe",
        "discounts",
        "acme",
    )
    assert found.uri == schema_uri("acme-at-stripe", "discounts")
    assert outgoing_event(manifest(), "acme", "stripe.out.acme.discounts") is None
    assert outgoing_event(manifest(), "stripe", "stripe.out.acme.other") is None


# -- schema problems ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"customer": "c1", "percent": 10}, None),
        ({"customer": "c1"}, "(root): 'percent' is a required property"),
        ({"customer": "c1", "percent": 0}, "percent: 0 is less than or equal to the minimum of 0"),
        ({"customer": "", "percent": 5}, "customer: '' should be non-empty"),
        ({"customer": "c1", "percent": 5, "x": 1}, "(root): Additional properties are not allowed"),
        ([1, 2], "(root): [1, 2] is not of type 'object'"),
    ],
)
def test_schema_problem_names_the_path_and_the_rule(data: Any, problem: str | None) -> None:
    found = schema_problem(SCHEMA, data)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found


# -- the gate on what crosses ------------------------------------------------------------


@dataclass
class Job:
    output: Any
    error: StepError | None = None


def test_steps_without_integration_events_get_the_publisher_itself() -> None:
    publisher = MemoryPublisher()
    assert crossings.publish_crossings(manifest(), "stripe", ["stripe.internal"]) == {}
    assert crossings.publish_crossings(None, "stripe", ["stripe.out.acme.discounts"]) == {}
    # An event without a schema has nothing to check or name.
    assert crossings.publish_crossings(manifest(), "acme", ["acme.out.stripe.refunds"]) == {}
    jobs = [Job({"anything": True})]
    assert crossings.gate(jobs, {}, publisher) is publisher
    assert jobs[0].error is None


async def test_the_gate_refuses_a_breaking_output_and_names_the_schema_on_the_rest() -> None:
    found = crossings.publish_crossings(manifest(), "stripe", ["stripe.out.acme.discounts"])
    good, bad, failed = Job({"customer": "c", "percent": 5}), Job({"customer": "c"}), Job(None)
    failed.error = StepError("earlier")
    publisher = MemoryPublisher()
    stamped = crossings.gate([good, bad, failed], found, publisher)
    assert good.error is None and failed.error is not None and str(failed.error) == "earlier"
    assert bad.error is not None and bad.error.kind == "schema" and not bad.error.retryable
    assert str(bad.error) == (
        "output for acme on stripe.out.acme.discounts breaks the acme-at-stripe/discounts "
        "schema: (root): 'percent' is a required property"
    )
    await stamped.publish("stripe.out.acme.discounts", b"x", {"ce-id": "1"}, msg_id="m1")
    await stamped.publish("deadlift.step.x", b"x", {"ce-id": "1"}, msg_id="m2")
    schema_header = crossings.DATASCHEMA_HEADER
    assert publisher.on("stripe.out.acme.discounts")[0].headers[schema_header] == schema_uri(
        "acme-at-stripe", "discounts"
    )
    assert schema_header not in publisher.on("deadlift.step.x")[0].headers


def test_raw_output_is_read_as_json_or_breaks_the_schema() -> None:
    [crossing] = crossings.publish_crossings(
        manifest(), "stripe", ["stripe.out.acme.discounts"]
    ).values()
    assert crossing.problem(b'{"customer": "c", "percent": 1}') is None
    problem = crossing.problem(b"\xff not json")
    assert problem is not None and "not JSON" in problem


def test_emit_contracts_only_for_steps_whose_emits_can_cross() -> None:
    flow = workflow("stripe", "{name: s, module: echo, emit: [stripe.internal.>]}")
    assert crossings.emit_contracts(manifest(), flow, flow.steps[0]) is None
    flow = workflow("stripe", "{name: s, module: echo, emit: [stripe.out.>]}")
    contracts = crossings.emit_contracts(manifest(), flow, flow.steps[0])
    assert contracts is not None
    contracts.check("stripe.out.other", {"free": "form"})  # not an event: not checked
    contracts.check("stripe.out.acme.discounts", {"customer": "c", "percent": 1})
    with pytest.raises(HostFunctionError, match=r"acme-at-stripe/discounts schema: percent"):
        contracts.check("stripe.out.acme.discounts", {"customer": "c", "percent": 101})
    assert contracts.headers("stripe.out.other") == {}
    assert contracts.headers("stripe.out.acme.discounts") == {
        f"{events.PREFIX}dataschema": schema_uri("acme-at-stripe", "discounts")
    }


# -- contract show and the AsyncAPI document --------------------------------------------


def test_contract_show_tells_both_sides_the_same_contract() -> None:
    [shown] = contract.show(manifest(), org="acme")
    assert contract.show(manifest(), org="stripe") == [shown]
    assert contract.show(manifest(), org="globex") == []
    assert shown["modules"] == [
        {
            "module": "acme/before_charge_action",
            "description": "",
            "grants": ["past_purchases", "send_email"],
            "publish": ["stripe.audit.>"],
        }
    ]
    discounts = shown["events"][0]
    assert discounts["subject"] == "stripe.out.acme.discounts"
    assert discounts["arrives_on"] == "acme.in.stripe.discounts"
    assert discounts["schema"]["required"] == ["customer", "percent"]
    with pytest.raises(ConfigError, match=r"integration 'nope' is not one of org acme's"):
        contract.show(manifest(), org="acme", name="nope")
    with pytest.raises(ConfigError, match=r"org 'initech' is not in the org manifest"):
        contract.show(manifest(), org="initech")


@pytest.fixture(scope="module")
def asyncapi_spec() -> Draft7Validator:
    return Draft7Validator(json.loads(gzip.decompress(ASYNCAPI_SPEC.read_bytes())))


@pytest.mark.parametrize("org", ["acme", "stripe", "globex"])
def test_the_asyncapi_document_is_valid_asyncapi_3(
    org: str, asyncapi_spec: Draft7Validator
) -> None:
    document = asyncapi.document(manifest(), org)
    assert [e.message for e in asyncapi_spec.iter_errors(document)] == []
    # And it survives YAML (what the CLI prints by default).
    assert yaml.safe_load(yaml.safe_dump(document, sort_keys=False)) == document


def test_the_asyncapi_spec_catches_a_broken_document(asyncapi_spec: Draft7Validator) -> None:
    document = asyncapi.document(manifest(), "stripe")
    document["operations"]["send.acme-at-stripe.discounts"]["action"] = "publish"
    assert list(asyncapi_spec.iter_errors(document))


def _resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_the_asyncapi_document_addresses_events_as_each_side_sees_them() -> None:
    sender, receiver = (
        asyncapi.document(manifest(), "stripe"),
        asyncapi.document(manifest(), "acme"),
    )
    cid = "acme-at-stripe.discounts"
    assert sender["channels"][cid]["address"] == "stripe.out.acme.discounts"
    assert receiver["channels"][cid]["address"] == "acme.in.stripe.discounts"
    assert sender["operations"][f"send.{cid}"]["action"] == "send"
    assert receiver["operations"][f"receive.{cid}"]["action"] == "receive"
    for document in (sender, receiver):
        for operation in document["operations"].values():
            channel = _resolve(document, operation["channel"]["$ref"])
            for ref in operation["messages"]:
                message = _resolve(document, _resolve(document, ref["$ref"])["$ref"])
                assert message["contentType"] == events.MSGPACK
        message = document["components"]["messages"][cid]
        assert _resolve(document, message["payload"]["$ref"]) == SCHEMA
        assert message["headers"]["properties"]["ce-dataschema"]["const"] == schema_uri(
            "acme-at-stripe", "discounts"
        )
        assert channel["address"]
    # Acme's own subjects are channels without a payload; Stripe's refunds event has no schema.
    addresses = {c["address"]: c for c in receiver["channels"].values()}
    assert {"acme.>", "calc.>", "acme.out.stripe.refunds"} <= set(addresses)
    assert "messages" not in addresses["calc.>"]
    refunds = receiver["components"]["messages"]["acme-at-stripe.refunds"]
    assert "payload" not in refunds
    assert "acme-at-stripe.refunds" not in receiver["components"]["schemas"]


def test_the_asyncapi_version_follows_the_contract() -> None:
    before = asyncapi.document(manifest(), "acme")["info"]["version"]
    assert asyncapi.document(manifest(), "acme")["info"]["version"] == before

    def stricter(data: dict[str, Any]) -> None:
        integration(data)["events"]["discounts"]["schema"] = {**SCHEMA, "required": ["customer"]}

    assert asyncapi.document(manifest(stricter), "acme")["info"]["version"] != before
