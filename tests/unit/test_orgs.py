"""The org manifest: one NATS account per org, rendered config, and clear refusals.

Isolation on a real server with those accounts is tested in
tests/integration/test_orgs.py and tests/integration/test_attack_orgs.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deadlift.errors import ConfigError
from deadlift.model.orgs import load_orgs, nats_accounts
from tests.conftest import ROOT

ORGS = ROOT / "config" / "orgs.yaml"


def write_manifest(tmp_path: Path, manifest: dict[str, Any]) -> Path:
    path = tmp_path / "orgs.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def two_orgs() -> dict[str, Any]:
    return {
        "orgs": {
            "acme": {
                "users": [{"user": "acme", "password": "a"}],
                "imports": [
                    {"org": "stripe", "subject": "stripe.out.acme.>", "to": "acme.in.stripe.>"}
                ],
            },
            "stripe": {
                "users": [{"user": "stripe", "password": "s"}],
                "exports": [{"subject": "stripe.out.acme.>", "to": ["acme"]}],
            },
        }
    }


def test_shipped_manifest_renders_one_account_per_org() -> None:
    rendered = nats_accounts(load_orgs(ORGS))
    assert rendered["system_account"] == "SYS"
    accounts = rendered["accounts"]
    assert set(accounts) == {"ACME", "STRIPE", "GLOBEX", "SYS"}
    assert all(accounts[a]["jetstream"]["max_file"] > 0 for a in ("ACME", "STRIPE", "GLOBEX"))
    # The integration acme-at-stripe declares the event; nats-config derives the pair.
    assert {"stream": "stripe.out.acme.discounts", "accounts": ["ACME"]} in accounts["STRIPE"][
        "exports"
    ]
    assert {
        "stream": {"account": "STRIPE", "subject": "stripe.out.acme.discounts"},
        "to": "acme.in.stripe.discounts",
    } in accounts["ACME"]["imports"]
    acme_pub = accounts["ACME"]["users"][0]["permissions"]["publish"]["allow"]
    assert "acme.>" in acme_pub and "$JS.API.>" in acme_pub
    assert not any(s.startswith("stripe") for s in acme_pub)
    assert "GLOBEX" not in json.dumps(accounts["STRIPE"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["orgs"]["acme"]["imports"][0].update(subject="stripe.secret.>"),
            "exports no subject covering it",
        ),
        (lambda m: m["orgs"]["acme"]["imports"][0].update(org="initech"), "unknown org 'initech'"),
        (
            lambda m: m["orgs"]["stripe"]["exports"][0].update(to=["initech"]),
            "unknown org 'initech'",
        ),
        (
            lambda m: m["orgs"]["stripe"]["users"].append({"user": "acme", "password": "x"}),
            "used twice",
        ),
        (
            lambda m: m["orgs"].update({"Bad Org": {"users": [{"user": "b", "password": "b"}]}}),
            "org name 'Bad Org'",
        ),
        (lambda m: m["orgs"]["acme"]["users"].append({"user": "nopass"}), "user + password"),
        (lambda m: m["orgs"]["acme"].update(colour="red"), "colour"),
    ],
)
def test_invalid_manifest_is_refused_with_the_file_and_the_problem(
    tmp_path: Path, change: Any, message: str
) -> None:
    manifest = two_orgs()
    change(manifest)
    path = write_manifest(tmp_path, manifest)
    with pytest.raises(ConfigError, match="invalid org manifest") as caught:
        load_orgs(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_rendered_accounts_ship_no_system_password_and_set_limits() -> None:
    rendered = nats_accounts(load_orgs(ORGS))
    assert "users" not in rendered["accounts"]["SYS"]
    acme = rendered["accounts"]["ACME"]
    assert acme["jetstream"]["max_file"] > 0 and acme["jetstream"]["max_consumers"] > 0
    assert acme["limits"]["max_connections"] > 0
    # Only the server writes where imports arrive: events and integration control messages.
    assert acme["users"][0]["permissions"]["publish"]["deny"] == [
        "acme.in.stripe.discounts",
        "deadlift.from.>",
    ]


def test_a_manifest_is_parsed_once_until_its_file_changes(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, two_orgs())
    first = load_orgs(path)
    assert load_orgs(path) is first  # a thousand connections read it once
    changed = two_orgs()
    changed["orgs"]["acme"]["config"] = {"program": "silver"}
    write_manifest(tmp_path, changed)  # at once: the text, not the clock, tells
    again = load_orgs(path)
    assert again is not first and again.org("acme").config == {"program": "silver"}
