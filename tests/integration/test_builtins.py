"""Built-in host functions on a real nats-server with the real modules from workers/.

emit (declared subjects only, deterministic ids), config_get / secret_get (per org,
secrets never leak), per-org instance pools, and the kv built-ins on one account per
org. http_request and allowed_hosts: tests/test_attack_http.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError
from deadlift.model.orgs import Org, OrgManifest, Secret, User, load_orgs
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.builtins import state_bucket
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import ROOT, module_path, publish, raw_messages, stored

ORGS_FILE = ROOT / "config" / "orgs.yaml"


def emit_workflow(emit: str = '["acme.audit.>"]', attempts: int = 1) -> str:
    return f"""
name: audit
org: acme
trigger: acme.emit.in
steps:
  - name: fan
    module: emitter
    function: emit_many
    host_functions: [emit]
    emit: {emit}
    publish: [acme.emit.out]
    retry: {{max_attempts: {attempts}, backoff: [0.05]}}
"""


async def listen(nc: Client, *subjects: str) -> list[str]:
    """Core-NATS subjects seen on ``subjects`` from now on (durable or not)."""
    seen: list[str] = []

    async def on_msg(msg: Any) -> None:
        seen.append(msg.subject)

    for subject in subjects:
        await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return seen


# -- emit ------------------------------------------------------------------------


async def test_emit_stores_each_event_once_with_the_run_and_the_steps_source(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("emitter")
    await apply(emit_workflow())
    async with Worker(nc, settings=settings) as worker:
        first = await publish(
            nc, "acme.emit.in", {"subjects": ["acme.audit.a", "acme.audit.b"], "data": {"n": 1}}
        )
        second = await publish(
            nc, "acme.emit.in", {"subjects": ["acme.audit.a", "acme.audit.b"], "data": {"n": 2}}
        )
        await worker.drain()
    outputs = await stored(nc, "acme.emit.out")
    assert [e.data for e in outputs] == [{"emitted": 2}, {"emitted": 2}]
    assert sorted(e.run for e in outputs) == sorted([first.id, second.id])
    emitted = {s: await stored(nc, s) for s in ("acme.audit.a", "acme.audit.b")}
    for subject, found in emitted.items():
        # One event per input on each subject, never more.
        assert sorted(e.run for e in found) == sorted([first.id, second.id]), subject
        assert {e.run: e.data["n"] for e in found} == {first.id: 1, second.id: 2}
        for event in found:
            assert event.source == "deadlift://acme/audit/fan"
            assert event.extensions[events.ORG] == "acme"
            assert event.extensions[events.STEP] == "fan"
    ids = [e.id for found in emitted.values() for e in found]
    assert len(set(ids)) == 4  # every emitted event is its own event
    # The de-duplication key is the event id plus the subject.
    for subject in emitted:
        for msg in await raw_messages(nc, Stream.EVENTS, subject):
            assert msg.headers[events.MSG_ID] == f"{msg.headers['ce-id']}:{subject}"


BAD_SUBJECTS = [
    "acme.secret.x",  # not declared
    "deadlift.step.acme.other.run",  # another step's input: reserved
    "acme.audit.*",  # a wildcard is no subject to publish to
    "$KV.deadlift_state_acme.k",  # NATS internals: reserved
]


async def test_emit_outside_the_declared_subjects_fails_and_publishes_nothing(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """Each bad subject dead-letters its event; the retry re-emits with the same ids."""
    await push("emitter")
    await apply(emit_workflow(attempts=2))
    seen = await listen(nc, "acme.secret.>", "acme.audit.*", "deadlift.step.acme.other.>")
    async with Worker(nc, settings=settings) as worker:
        sent = {
            bad: await publish(
                nc, "acme.emit.in", {"subjects": ["acme.audit.before", bad], "data": bad}
            )
            for bad in BAD_SUBJECTS
        }
        await worker.drain()
    letters = await dlq.letters(nc.jetstream())
    assert len(letters) == len(BAD_SUBJECTS), "a dead letter per bad subject"
    by_run = {letter.headers["ce-id"]: letter for letter in letters}
    for bad, event in sent.items():
        letter = by_run[event.id]
        assert letter.kind == "host_function", (bad, letter.error)
        assert letter.attempts == 2, bad  # a host function failure is retried
        assert repr(bad) in letter.error, (bad, letter.error)
        if bad == "acme.secret.x":
            assert "acme.audit.>" in letter.error and "not allowed" in letter.error
    # The emit before the bad one happened on both attempts and was stored once per event.
    before = await stored(nc, "acme.audit.before")
    assert sorted(e.run for e in before) == sorted(e.id for e in sent.values())
    assert await stored(nc, "acme.emit.out") == []
    assert await stored(nc, "acme.secret.x") == []
    assert await stored(nc, "deadlift.step.acme.other.run", stream=Stream.STEPS) == []
    assert [s for s in seen if s != "acme.audit.before"] == []  # not even a core publish


async def test_a_step_granting_emit_without_subjects_can_emit_nowhere(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("emitter")
    await apply(emit_workflow(emit="[]"))
    seen = await listen(nc, "acme.>")
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "acme.emit.in", {"subjects": ["acme.audit.a"], "data": 1})
        await worker.drain()
    [letter] = await dlq.letters(nc.jetstream())
    assert letter.kind == "host_function"
    assert "'acme.audit.a' is not allowed" in letter.error
    assert "emit: []" in letter.error
    assert await stored(nc, "acme.emit.out") == []
    assert [s for s in seen if s != "acme.emit.in"] == []


async def test_emit_subjects_overlapping_the_workflows_own_trigger_are_refused_at_apply(
    push: Any, apply: Any, registry: Registry
) -> None:
    """An emitted event on the trigger would start the workflow again, forever."""
    await push("emitter")
    with pytest.raises(ConfigError, match=r"step 'fan': emit: 'acme\.emit\.>'.*'acme\.emit\.in'"):
        await apply(emit_workflow(emit='["acme.emit.>"]'))  # covers the trigger acme.emit.in
    assert await registry.workflows() == []


async def test_emitted_events_belong_to_the_inputs_trace(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("emitter")
    await apply(emit_workflow())
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    sent = events.new_event(
        {"subjects": ["acme.audit.a"], "data": 1},
        source="test",
        type="test.event",
        traceparent=f"00-{trace_id}-b7ad6b7169203331-01",
    )
    headers, body = events.encode(sent)
    headers[events.MSG_ID] = sent.id
    async with Worker(nc, settings=settings) as worker:
        await bus.JetStreamPublisher(nc).publish("acme.emit.in", body, headers)
        await worker.drain()
    [output] = await stored(nc, "acme.emit.out")
    [emitted] = await stored(nc, "acme.audit.a")
    for event in (output, emitted):
        assert event.traceparent is not None
        assert event.traceparent.split("-")[1] == trace_id  # same trace, whatever the span


async def test_a_module_importing_an_ungranted_host_function_is_refused_at_apply(
    push: Any, apply: Any, registry: Registry
) -> None:
    await push("settings_reader")
    with pytest.raises(ConfigError, match=r"step 'read': host_functions:.*secret_get") as caught:
        await apply("""
name: settings
org: acme
trigger: acme.settings.in
steps:
  - {name: read, module: settings_reader, function: read, host_functions: [config_get]}
""")
    assert "config_get" not in str(caught.value).split("imports", 1)[1]
    assert await registry.workflows() == []  # nothing stored


# -- config_get / secret_get -----------------------------------------------------

ACME_SECRET = "acme-s3cr3t-0f-len-23"
ACME_ENV_SECRET = "acme-env-secret-value-of-length-38xxxx"
STRIPE_SECRET = "sk_stripe_9af1c0de"


def settings_workflow(org: str) -> str:
    return f"""
name: settings
org: {org}
trigger: {org}.settings.in
steps:
  - name: read
    module: settings_reader
    function: read
    host_functions: [config_get, secret_get]
    publish: [{org}.settings.out]
    retry: {{max_attempts: 1}}
"""


async def test_config_and_secrets_are_the_calling_orgs_and_secrets_never_leak(
    nc: Client,
    settings: Settings,
    push: Any,
    apply: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DEADLIFT_TEST_ACME_ENV_SECRET", ACME_ENV_SECRET)
    manifest = OrgManifest(
        orgs={
            "acme": Org(
                users=[User(user="acme", password="a")],
                config={"tier": "gold", "region": "eu"},
                secrets={
                    "api_key": Secret(value=ACME_SECRET),
                    "crm_token": Secret(env="DEADLIFT_TEST_ACME_ENV_SECRET", value="fallback"),
                },
            ),
            "stripe": Org(
                users=[User(user="stripe", password="s")],
                config={"sender": "loyalty@stripe.example", "region": "us"},
                secrets={"api_key": Secret(value=STRIPE_SECRET)},
            ),
        }
    )
    await push("settings_reader")
    await apply(settings_workflow("acme"))
    await apply(settings_workflow("stripe"))
    request = {
        "config": ["tier", "region", "sender"],
        "secrets": ["api_key", "crm_token", "absent"],
    }
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, orgs=manifest, observers=[reports.append]) as worker:
        await publish(nc, "acme.settings.in", request)
        await publish(nc, "stripe.settings.in", request)
        await publish(nc, "acme.settings.in", {"secrets": "api_key"})  # invalid: dead-lettered
        await worker.drain()
    acme = await stored(nc, "acme.settings.out")
    stripe = await stored(nc, "stripe.settings.out")
    letters = await dlq.letters(nc.jetstream())
    assert len(letters) == 1
    assert [e.data for e in acme] == [
        {
            "config": {"tier": "gold", "region": "eu", "sender": None},
            "secret_lengths": {
                "api_key": len(ACME_SECRET),
                "crm_token": len(ACME_ENV_SECRET),  # the environment wins over the value
                "absent": None,
            },
        }
    ]
    assert [e.data for e in stripe] == [
        {
            "config": {"tier": None, "region": "us", "sender": "loyalty@stripe.example"},
            "secret_lengths": {"api_key": len(STRIPE_SECRET), "crm_token": None, "absent": None},
        }
    ]
    assert letters[0].org == "acme" and "must be an array of strings" in letters[0].error
    assert "started workflow acme.settings" in caplog.text  # the log was captured
    secrets = (ACME_SECRET, ACME_ENV_SECRET, STRIPE_SECRET)
    texts = [caplog.text, repr(reports), repr([r.getMessage() for r in caplog.records])]
    for stream in (Stream.EVENTS, Stream.STEPS, Stream.DLQ):
        for msg in await raw_messages(nc, stream, ">"):
            texts.append(repr(msg.headers) + repr(msg.data))
    for secret in secrets:
        for text in texts:
            assert secret not in text


# -- per-org instance pools ------------------------------------------------------


def counter_workflow(org: str) -> str:
    return f"""
name: counter
org: {org}
trigger: {org}.count.in
steps:
  - {{name: count, module: echo, function: count, concurrency: 1,
     publish: [{org}.count.out]}}
"""


async def test_instance_state_never_crosses_orgs(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    meta = await push("echo")
    await apply(counter_workflow("acme"))
    await apply(counter_workflow("stripe"))
    async with Worker(nc, settings=settings) as worker:
        for n in range(3):
            await publish(nc, "acme.count.in", {"n": n})
            await worker.drain()  # one at a time: the same instance serves each call
        await publish(nc, "stripe.count.in", {"n": 0})
        await worker.drain()
        stripe = await stored(nc, "stripe.count.out")
        pools = {s.org: sizes for s, sizes in worker.host.pool_sizes().items()}
        specs = [s for s in worker.host.pool_sizes() if s.sha256 == meta.sha256]
    acme = await stored(nc, "acme.count.out")
    assert [e.data for e in acme] == [{"calls": 1}, {"calls": 2}, {"calls": 3}]
    assert [e.data for e in stripe] == [{"calls": 1}]  # a fresh instance: acme's count is not seen
    assert sorted(s.org for s in specs) == ["acme", "stripe"]
    assert pools == {"acme": (1, 1), "stripe": (1, 1)}  # (idle, created): one instance each


# -- kv built-ins with one account per org ---------------------------------------


@pytest.fixture(scope="module")
def accounts_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(orgs=load_orgs(ORGS_FILE)) as server:
        yield server


def as_org(server: EmbeddedServer, org: str) -> Settings:
    return Settings(nats_url=server.url, org=org, orgs_file=str(ORGS_FILE), ack_wait_s=5.0)


@pytest.fixture
async def org_clients(accounts_server: EmbeddedServer) -> AsyncIterator[dict[str, Client]]:
    clients = {org: await bus.connect(as_org(accounts_server, org)) for org in ("acme", "stripe")}
    yield clients
    for client in clients.values():
        await client.drain()


async def test_kv_state_lives_in_the_calling_orgs_account_only(
    accounts_server: EmbeddedServer, org_clients: dict[str, Client]
) -> None:
    acme, stripe = org_clients["acme"], org_clients["stripe"]
    settings = as_org(accounts_server, "acme")
    registry = await Registry.open(acme.jetstream())
    await push_module_file(registry, module_path("aggregate_discounts"))
    flow = parse_workflow("""
name: kv-loyalty
org: acme
trigger: acme.kvtest.in
steps:
  - {name: aggregate, module: aggregate_discounts, function: aggregate_discounts,
     host_functions: [kv_incr], publish: [acme.kvtest.out]}
""")
    await apply_workflows(acme.jetstream(), registry, settings, [(flow, "kv.yaml")])
    notice = {"kind": "loyalty_discount", "issuer": "stripe", "charge_id": "ch_1"}
    async with Worker(acme, settings=settings, workflows=["acme.kv-loyalty"]) as worker:
        for customer in ("alice", "alice", "bob"):
            await publish(acme, "acme.kvtest.in", {**notice, "customer": customer})
        await worker.drain()
    out = await stored(acme, "acme.kvtest.out")
    assert sorted((e.data["customer"], e.data["discounts"]) for e in out) == [
        ("alice", 1),
        ("alice", 2),
        ("bob", 1),
    ]
    assert sorted(e.data["total"] for e in out) == [1, 2, 3]
    kv = await acme.jetstream().key_value(state_bucket("acme"))
    assert (await kv.get("discounts.alice")).value == b"2"
    assert (await kv.get("discounts._total")).value == b"3"
    with pytest.raises(nats.js.errors.NotFoundError):  # BucketNotFoundError is one
        await stripe.jetstream().key_value(state_bucket("acme"))
    stripe_streams = [s.config.name for s in await stripe.jetstream().streams_info()]
    assert f"KV_{state_bucket('acme')}" not in stripe_streams
