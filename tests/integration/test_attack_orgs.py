"""Attacks by a hostile org: identity, provenance, limits, credentials and operator commands.

Each test plays an org (or an org's user) that tries to get something it was
not given, on a real nats-server with one account per org, and fails if the
hole reopens. The trust model these tests hold is in the README ("Trust model").
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import RePublish, StreamConfig

from deadlift import bus
from deadlift.bus.identity import require_operator, whoami
from deadlift.errors import ConfigError, DeadliftError, PermissionDeniedError
from deadlift.model.orgs import load_orgs
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer, free_port
from deadlift.ops.trace import trace_across_orgs
from deadlift.runtime.step import StepReport
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import ROOT, eventually, module_path, raw_messages
from tests.integration.accounts import Clients, Connect, as_org, clean, write_orgs

SECRET = "acme-crm-token-do-not-leak"
DEADLIFT = [sys.executable, "-m", "deadlift.cli"]


def manifest() -> dict[str, Any]:
    """Acme imports from Stripe; Globex is a third, hostile org with small limits."""
    return {
        "system": {"user": "operator", "password": "operator-test"},
        "orgs": {
            "acme": {
                "users": [
                    {"user": "acme", "password": "a"},
                    {"user": "acme-hook", "password": "h", "role": "publisher"},
                ],
                "imports": [
                    {"org": "stripe", "subject": "stripe.out.acme.>", "to": "acme.in.stripe.>"}
                ],
                "config": {"program": "gold"},
                "secrets": {"crm_token": {"value": SECRET}},
            },
            "stripe": {
                "users": [{"user": "stripe", "password": "s"}],
                "exports": [{"subject": "stripe.out.acme.>", "to": ["acme"]}],
            },
            "globex": {
                "users": [{"user": "globex", "password": "g"}],
                "limits": {"max_storage": "256KiB"},
            },
            "initech": {  # only the connection-limit test connects as initech
                "users": [{"user": "initech", "password": "i"}],
                "limits": {"max_connections": 3},
            },
        },
    }


@pytest.fixture(scope="module")
def orgs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_orgs(tmp_path_factory.mktemp("orgs"), manifest())


@pytest.fixture
def connect(clients: Clients) -> Connect:
    """``await connect("acme")``: a client of that org's account, its streams as they are."""
    return clients.connect


# -- 1. identity comes from the connection ----------------------------------------------


READER = """
name: {name}
org: {org}
trigger: {org}.read.in
steps:
  - {{name: read, module: settings_reader, function: read,
     host_functions: [config_get, secret_get], publish: [{org}.read.out]}}
"""


async def test_identity_is_the_connections_account(connect: Any) -> None:
    for org in ("acme", "globex"):
        assert (await whoami(await connect(org))).account == org.upper()


async def test_apply_refuses_a_workflow_claiming_another_org(
    connect: Any, server: EmbeddedServer, orgs_file: Path
) -> None:
    globex = await connect("globex")
    registry = await clean(globex)
    await push_module_file(registry, module_path("settings_reader"))
    forged = parse_workflow(READER.format(name="steal", org="acme"))
    # No --org on the client side: the refusal must come from the connection.
    settings = Settings(nats_url=server.url, user="globex", password="g", orgs_file=str(orgs_file))
    with pytest.raises(PermissionDeniedError, match="account GLOBEX"):
        await apply_workflows(globex.jetstream(), registry, settings, [(forged, "steal.yaml")])
    assert await registry.workflows() == []


async def test_worker_never_runs_a_stored_workflow_claiming_another_org(
    connect: Any, server: EmbeddedServer, orgs_file: Path
) -> None:
    """Globex writes a workflow claiming acme straight into its registry (no apply):
    its worker must not run it, so acme's secret never reaches globex's module."""
    globex = await connect("globex")
    registry = await clean(globex)
    settings = as_org(server, orgs_file, "globex")
    await push_module_file(registry, module_path("settings_reader"))
    [own] = await apply_workflows(
        globex.jetstream(),
        registry,
        settings,
        [(parse_workflow(READER.format(name="own", org="globex")), "own.yaml")],
    )
    forged = await registry.resolve_workflow(parse_workflow(READER.format(name="x", org="acme")))
    await registry.put_workflow(forged)  # what a hostile client can do: store any document
    reports: list[StepReport] = []
    async with Worker(
        globex, settings=settings, observers=[reports.append], orgs=load_orgs(orgs_file)
    ) as worker:
        assert worker.steps == ["globex.own.read"]  # acme.x is refused, not started
        request = {"config": ["program"], "secrets": ["crm_token"]}
        event = events.new_event(request, source="test", type="t")
        headers, body = events.encode(event)
        await bus.JetStreamPublisher(globex).publish("globex.read.in", body, headers)
        await worker.drain()
    assert reports, "globex's own step ran"
    assert own.org == "globex"
    # Globex's own step gets globex's (empty) config and secrets, never acme's.
    assert reports[0].output == {"config": {"program": None}, "secret_lengths": {"crm_token": None}}
    assert {r.org for r in reports} == {"globex"}


# -- 3. provenance across orgs ----------------------------------------------------------


ECHO_FLOW = """
name: inbox
org: acme
trigger: [acme.own.in, acme.in.stripe.>]
steps:
  - {name: take, module: echo, function: echo, publish: [acme.inbox.out]}
"""


@pytest.fixture
async def acme_inbox(connect: Any, server: EmbeddedServer, orgs_file: Path) -> Any:
    """Acme's workflow taking its own events and Stripe's, with a worker that reports."""
    acme = await connect("acme")
    registry = await clean(acme)
    await clean(await connect("stripe"))
    settings = as_org(server, orgs_file, "acme")
    await push_module_file(registry, module_path("echo"))
    [workflow] = await apply_workflows(
        acme.jetstream(), registry, settings, [(parse_workflow(ECHO_FLOW), "inbox.yaml")]
    )
    reports: list[StepReport] = []
    async with Worker(
        acme, settings=settings, observers=[reports.append], orgs=load_orgs(orgs_file)
    ):
        yield acme, workflow, reports


def forged_headers(data: Any, *, id: str, msg_id: str) -> tuple[dict[str, str], bytes]:
    """An event that claims to come from Acme itself."""
    event = events.Event(
        data=data,
        id=id,
        source="deadlift://acme/inbox/take",
        type="t",
        extensions={events.ORIGIN: "acme", events.ORG: "acme"},
    )
    headers, body = events.encode(event)
    headers[events.MSG_ID] = msg_id
    return headers, body


async def test_the_importer_may_not_publish_on_its_import_subjects(acme_inbox: Any) -> None:
    acme, _, _ = acme_inbox
    headers, body = forged_headers({"n": 1}, id="fake", msg_id="fake")
    with pytest.raises(PermissionDeniedError, match=r"acme\.in\.stripe\.charge"):
        await bus.JetStreamPublisher(acme).publish("acme.in.stripe.charge", body, headers)


async def test_provenance_comes_from_the_import_not_from_headers(
    acme_inbox: Any, connect: Any
) -> None:
    acme, workflow, reports = acme_inbox
    stripe = await connect("stripe")
    # Stripe claims to be acme (ce-source, ce-deadliftorigin); acme claims to be stripe.
    headers, body = forged_headers({"from": "stripe"}, id="e1", msg_id="m1")
    await stripe.publish("stripe.out.acme.charge", body, headers=headers)
    await stripe.flush()
    own_headers, own_body = forged_headers({"from": "acme"}, id="e2", msg_id="m2")
    own_headers[f"ce-{events.ORIGIN}"] = "stripe"
    await bus.JetStreamPublisher(acme).publish("acme.own.in", own_body, own_headers)
    await eventually(lambda: len(reports) == 2, message="both events processed")
    origin = {r.output["from"]: r.origin for r in reports}
    assert origin == {"stripe": "stripe", "acme": None}
    outputs = await raw_messages(acme, Stream.EVENTS, "acme.inbox.out")
    stamped = {
        json.dumps(events.unpack(m.data)): m.headers.get(f"ce-{events.ORIGIN}") for m in outputs
    }
    assert stamped == {'{"from": "stripe"}': "stripe", '{"from": "acme"}': None}
    # Stripe's events are captured apart, in acme's stream for what stripe sends.
    assert len(await raw_messages(acme, bus.import_stream("stripe"), "acme.in.stripe.charge")) == 1
    assert workflow.imports == {"acme.in.stripe.>": "stripe"}


async def test_an_exporter_cannot_preoccupy_the_importers_message_ids(
    acme_inbox: Any, connect: Any
) -> None:
    """Stripe sends first what acme will send (same Nats-Msg-Id, same ce-source and ce-id):
    acme's own event and its output must still be stored, and stripe's too."""
    acme, _, reports = acme_inbox
    stripe = await connect("stripe")
    headers, body = forged_headers({"from": "stripe"}, id="same-id", msg_id="same-msg-id")
    await stripe.publish("stripe.out.acme.charge", body, headers=headers)
    await stripe.flush()
    await eventually(lambda: reports, message="stripe's event processed")
    own_headers, own_body = forged_headers({"from": "acme"}, id="same-id", msg_id="same-msg-id")
    ack = await bus.JetStreamPublisher(acme).publish("acme.own.in", own_body, own_headers)
    assert not ack.duplicate
    await eventually(lambda: len(reports) == 2, message="acme's own event processed")
    outputs = await raw_messages(acme, Stream.EVENTS, "acme.inbox.out")
    assert sorted(events.unpack(m.data)["from"] for m in outputs) == ["acme", "stripe"]


async def test_a_publisher_user_cannot_make_the_server_write_into_an_import(
    acme_inbox: Any, server: EmbeddedServer
) -> None:
    """A partner's publish-only user: its own subjects, nothing of JetStream's API."""
    hook = await bus.connect(Settings(nats_url=server.url, user="acme-hook", password="h"))
    try:
        event = events.new_event({"n": 1}, source="hook", type="t")
        headers, body = events.encode(event)
        await bus.JetStreamPublisher(hook).publish("acme.own.in", body, headers)  # allowed
        with pytest.raises(PermissionDeniedError):
            await bus.JetStreamPublisher(hook).publish("acme.in.stripe.x", body, headers)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await hook.jetstream(timeout=1).add_stream(name="EVIL", subjects=["acme.evil.>"])
        assert hook.denied("$JS.API.STREAM.CREATE.EVIL")
    finally:
        await hook.close()


async def test_an_import_written_by_the_importers_own_stream_is_refused(
    acme_inbox: Any,
) -> None:
    """An admin of acme makes a stream republish into acme.in.stripe.>: the server
    writes it, so permissions do not stop it; the worker does (kind provenance)."""
    acme, _, reports = acme_inbox
    js = acme.jetstream()
    await js.add_stream(
        StreamConfig(
            name="EVIL",
            subjects=["acme.evil.>"],
            republish=RePublish(src="acme.evil.>", dest="acme.in.stripe.>"),
        )
    )
    headers, body = forged_headers({"from": "acme, posing as stripe"}, id="e9", msg_id="m9")
    await js.publish("acme.evil.charge", body, headers=headers)
    await eventually(lambda: reports, message="the forged import handled")
    assert [(r.outcome, r.error_kind) for r in reports] == [("dead", "provenance")]
    assert await raw_messages(acme, Stream.EVENTS, "acme.inbox.out") == []


async def test_apply_refuses_subjects_the_org_may_not_use(
    connect: Any, server: EmbeddedServer, orgs_file: Path
) -> None:
    """The server would refuse them only at run time, event by event: refuse at apply."""
    acme = await connect("acme")
    registry = await clean(acme)
    await push_module_file(registry, module_path("echo"))
    settings = as_org(server, orgs_file, "acme")
    for field, trigger, publish in (
        ("publish", "acme.ok.in", "stripe.secret.out"),
        ("trigger", "globex.orders", "acme.ok.out"),
    ):
        flow = parse_workflow(f"""
name: outside
org: acme
trigger: {trigger}
steps:
  - {{name: take, module: echo, function: echo, publish: [{publish}]}}
""")
        with pytest.raises(ConfigError, match=rf"{field}: .* is outside the subjects org 'acme'"):
            await apply_workflows(acme.jetstream(), registry, settings, [(flow, "out.yaml")])
    assert await registry.workflows() == []


async def test_a_workflow_may_not_publish_into_an_import(
    connect: Any, server: EmbeddedServer, orgs_file: Path
) -> None:
    acme = await connect("acme")
    registry = await clean(acme)
    await push_module_file(registry, module_path("echo"))
    flow = parse_workflow("""
name: forge
org: acme
trigger: acme.forge.in
steps:
  - {name: take, module: echo, function: echo, publish: [acme.in.stripe.fake]}
""")
    settings = as_org(server, orgs_file, "acme")
    with pytest.raises(ConfigError, match="only stripe's export delivers"):
        await apply_workflows(acme.jetstream(), registry, settings, [(flow, "forge.yaml")])


# -- 4. limits per org, defaults, credentials -------------------------------------------


async def test_one_org_filling_its_storage_does_not_starve_another(connect: Any) -> None:
    globex, acme = await connect("globex"), await connect("acme")
    await clean(globex)
    await clean(acme)
    await globex.jetstream().add_stream(name="HOG", subjects=["globex.hog.>"])
    await acme.jetstream().add_stream(name="FINE", subjects=["acme.fine.>"])
    refused = None
    for i in range(200):  # 256 KiB at 8 KiB a message: refused well before the end
        try:
            await globex.jetstream().publish(f"globex.hog.{i}", b"x" * 8192)
        except nats.js.errors.APIError as exc:
            refused = exc
            break
    assert refused is not None, "globex stored more than its max_storage"
    for i in range(50):  # acme, same server, still stores
        await acme.jetstream().publish(f"acme.fine.{i}", b"y" * 8192)
    assert (await acme.jetstream().stream_info("FINE")).state.messages == 50


async def test_an_org_has_a_connection_limit(server: EmbeddedServer, orgs_file: Path) -> None:
    settings = as_org(server, orgs_file, "initech")
    clients = [await bus.connect(settings) for _ in range(3)]
    try:
        with pytest.raises(
            DeadliftError, match=r"maximum account active connections.*max_connections"
        ):
            await bus.connect(settings)
    finally:
        for client in clients:
            await client.close()


def test_server_command_defaults_to_accounts_private_config_and_loopback_monitoring(
    tmp_path: Path,
) -> None:
    port = free_port()
    store = tmp_path / "store"
    process = subprocess.Popen(
        [*DEADLIFT, "server", "--port", str(port), "--store-dir", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert f"127.0.0.1:{port}" in process.stdout.readline()  # type: ignore[union-attr]

        anonymous = Settings(nats_url=f"nats://127.0.0.1:{port}", orgs_file="-")
        with pytest.raises(DeadliftError, match="Authorization Violation"):
            asyncio.run(asyncio.wait_for(bus.connect(anonymous), 20))
        config = store / "deadlift-server.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600  # holds every org's passwords
        assert stat.S_IMODE(store.stat().st_mode) == 0o700
        assert json.loads(config.read_text().split("\ninclude", 1)[0])["http"].startswith(
            "127.0.0.1:"
        )
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_single_tenant_server_is_explicit_and_loud(tmp_path: Path) -> None:
    port, store = free_port(), tmp_path / "store"
    process = subprocess.Popen(
        [*DEADLIFT, "server", "--single-tenant", "--port", str(port), "--store-dir", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert f"127.0.0.1:{port}" in process.stdout.readline()  # type: ignore[union-attr]
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    assert "WARNING: single-tenant development mode" in err
    assert "every org's" in err


# -- 7. following a run across orgs is an operator's command ----------------------------


async def test_trace_across_orgs_needs_the_operators_credentials(
    server: EmbeddedServer, orgs_file: Path
) -> None:
    as_acme = as_org(server, orgs_file, "acme")
    with pytest.raises(PermissionDeniedError, match="operator command"):
        await trace_across_orgs(as_acme, "some-run")
    # An org's own password passed as "system" credentials does not make it the operator.
    pretending = as_acme.model_copy(update={"system_user": "acme", "system_password": "a"})
    with pytest.raises(PermissionDeniedError, match="operator command"):
        await require_operator(pretending, command="trace --all-orgs")
    operator = as_acme.model_copy(
        update={"system_user": "operator", "system_password": "operator-test"}
    )
    assert (await require_operator(operator, command="trace --all-orgs")).account == "SYS"
