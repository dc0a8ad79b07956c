"""Orgs as NATS accounts: one manifest, rendered config, and isolation that holds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.errors import DeadliftError, PermissionDeniedError
from deadlift.model.orgs import load_orgs, nats_accounts
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import ROOT, eventually, module_path

ORGS = ROOT / "config" / "orgs.yaml"


# -- the manifest, rendered by the CLI -------------------------------------------


def test_nats_config_command_prints_the_rendered_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "--orgs", str(ORGS), "nats-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    body = result.stdout.split("\n", 1)[1]  # after the "generated" comment
    assert json.loads(body) == nats_accounts(load_orgs(ORGS))


# -- isolation on a real server with one account per org -----------------------


@pytest.fixture(scope="module")
def accounts_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(orgs=load_orgs(ORGS)) as server:
        yield server


def as_org(server: EmbeddedServer, org: str) -> Settings:
    return Settings(nats_url=server.url, org=org, orgs_file=str(ORGS), ack_wait_s=5.0)


@pytest.fixture
async def stripe_with_a_workflow(accounts_server: EmbeddedServer) -> AsyncIterator[Any]:
    """Stripe's account holds a module, a workflow, streams and state."""
    settings = as_org(accounts_server, "stripe")
    nc = await bus.connect(settings)
    registry = await Registry.open(nc.jetstream())
    await push_module_file(registry, module_path("discount_notice"))
    flow = parse_workflow("""
name: private
org: stripe
trigger: stripe.charges.private
steps:
  - {name: notice, module: discount_notice, function: discount_notice,
     publish: [stripe.out.acme.discounts]}
""")
    await apply_workflows(nc.jetstream(), registry, settings, [(flow, "private.yaml")])
    yield nc
    await nc.drain()


async def test_acme_cannot_see_stripes_modules_workflows_streams_or_state(
    accounts_server: EmbeddedServer, stripe_with_a_workflow: Any
) -> None:
    acme = await bus.connect(as_org(accounts_server, "acme"))
    try:
        registry = await Registry.open(acme.jetstream())
        assert await registry.modules() == []
        assert await registry.workflows() == []
        names = [s.config.name for s in await acme.jetstream().streams_info()]
        stripe_names = [
            s.config.name for s in await stripe_with_a_workflow.jetstream().streams_info()
        ]
        assert "DEADLIFT_EVENTS" in stripe_names
        # Acme's own buckets only: never Stripe's events stream or its subjects.
        for name in names:
            info = await acme.jetstream().stream_info(name)
            assert not any(s.startswith("stripe.") for s in info.config.subjects or [])
    finally:
        await acme.drain()


async def test_subscribing_to_anothers_subjects_is_a_clear_error(
    accounts_server: EmbeddedServer,
) -> None:
    acme = await bus.connect(as_org(accounts_server, "acme"))
    try:
        await acme.subscribe("stripe.charges.private")
        with pytest.raises(PermissionDeniedError, match=r"stripe\.charges\.private"):
            await acme.check_allowed("stripe.charges.private")
    finally:
        await acme.close()


async def test_publishing_to_anothers_subjects_is_a_clear_error(
    accounts_server: EmbeddedServer, stripe_with_a_workflow: Any
) -> None:
    acme = await bus.connect(as_org(accounts_server, "acme"))
    try:
        event = events.new_event({"x": 1}, source="test", type="t")
        headers, body = events.encode(event)
        with pytest.raises(PermissionDeniedError, match=r"permission denied.*stripe\.charges"):
            publisher = bus.JetStreamPublisher(acme, timeout=1.0)
            await publisher.publish("stripe.charges.private", body, headers)
    finally:
        await acme.close()
    # …and nothing reached Stripe's stream.
    info = await stripe_with_a_workflow.jetstream().stream_info(
        "DEADLIFT_EVENTS", subjects_filter="stripe.charges.private"
    )
    assert not info.state.subjects  # per-subject counts (state.messages counts the stream)


def test_cli_reports_permission_denied(accounts_server: EmbeddedServer) -> None:
    base = [
        sys.executable,
        "-m",
        "deadlift.cli",
        "-s",
        accounts_server.url,
        "--orgs",
        str(ORGS),
        "--org",
        "acme",
    ]
    published = subprocess.run(
        [*base, "publish", "stripe.charges.private", "{}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert published.returncode == 1
    assert "permission denied" in published.stderr and "stripe.charges.private" in published.stderr
    tailed = subprocess.run(
        [*base, "tail", "stripe.>", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert tailed.returncode == 1 and "permission denied" in tailed.stderr


async def test_exported_events_reach_only_the_importer(
    accounts_server: EmbeddedServer, stripe_with_a_workflow: Any
) -> None:
    acme = await bus.connect(as_org(accounts_server, "acme"))
    globex = await bus.connect(as_org(accounts_server, "globex"))
    seen: dict[str, list[str]] = {"acme": [], "globex": []}

    async def recorder(org: str) -> Any:
        async def on_msg(msg: Any) -> None:
            seen[org].append(msg.subject)

        return on_msg

    try:
        await acme.subscribe("acme.>", cb=await recorder("acme"))
        for subject in ("globex.>", "deadlift.>", "_INBOX.>"):
            await globex.subscribe(subject, cb=await recorder("globex"))
        await acme.flush()
        await globex.flush()
        stripe = stripe_with_a_workflow
        event = events.new_event({"customer": "alice"}, source="test", type="t")
        headers, body = events.encode(event)
        await bus.JetStreamPublisher(stripe).publish("stripe.out.acme.discounts", body, headers)
        await eventually(lambda: seen["acme"], message="acme received the export")
        await asyncio.sleep(0.3)
    finally:
        await acme.drain()
        await globex.drain()
    assert seen["acme"] == ["acme.in.stripe.discounts"]  # renamed by the import
    assert seen["globex"] == []  # a third org sees nothing


async def test_acting_as_one_org_cannot_apply_anothers_workflow(
    accounts_server: EmbeddedServer,
) -> None:
    settings = as_org(accounts_server, "acme")
    nc = await bus.connect(settings)
    try:
        registry = await Registry.open(nc.jetstream())
        await push_module_file(registry, module_path("add_ten"))
        flow = parse_workflow(
            "name: sneaky\norg: stripe\ntrigger: acme.x\n"
            "steps:\n  - {name: a, module: add_ten, function: add_ten}\n"
        )
        with pytest.raises(PermissionDeniedError, match=r"claims org 'stripe'.*account ACME"):
            await apply_workflows(nc.jetstream(), registry, settings, [(flow, "sneaky.yaml")])
    finally:
        await nc.drain()


async def test_wrong_password_is_a_clear_connection_error(
    accounts_server: EmbeddedServer,
) -> None:
    settings = Settings(nats_url=accounts_server.url, user="acme", password="wrong")
    with pytest.raises(DeadliftError, match=r"as acme.*Authorization Violation.*credentials"):
        await bus.connect(settings)
