"""Pieces of org manifests the tests share: logins, an integration, a discount's schema."""

from __future__ import annotations

from typing import Any


def logins(*orgs: str, **more: dict[str, Any]) -> dict[str, Any]:
    """The ``orgs`` section: each org has one user named after it, its initial for a password.

    ``more`` adds fields to an org by name: ``logins("acme", acme={"subjects": ["calc.>"]})``.
    """
    return {
        org: {"users": [{"user": org, "password": org[0]}], **more.get(org, {})} for org in orgs
    }


def integration(
    signing_key: str,
    modules: dict[str, Any],
    *,
    host: str = "stripe",
    guest: str = "acme",
    **fields: Any,
) -> dict[str, Any]:
    """An entry of ``integrations``: ``host`` runs the ``modules`` ``guest`` signs with
    ``signing_key``; ``fields`` adds the rest (``events``, ``guest_sees``)."""
    return {"host": host, "guest": guest, "signing_key": signing_key, "modules": modules, **fields}


def discount_schema(percent: str) -> dict[str, Any]:
    """The JSON Schema of a loyalty discount: a customer and a ``percent`` field in (0, 100]."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Loyalty discount",
        "type": "object",
        "required": ["customer", percent],
        "properties": {
            "customer": {"type": "string", "minLength": 1},
            percent: {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        },
        "additionalProperties": False,
    }


# Two add_ten steps of org acme: calc.in → add → more → calc.out.
ADD_TEN_CHAIN = """
name: calc
org: acme
trigger: calc.in
steps:
  - {name: add, module: add_ten, function: add_ten, next: [more]}
  - {name: more, module: add_ten, function: add_ten, publish: [calc.out]}
"""
