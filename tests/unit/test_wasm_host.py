"""ModuleHost with real modules: isolation, limits, host functions, logs, host-function packs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deadlift.errors import ConfigError, ModuleError, StepError
from deadlift.wasm.codecs import from_module
from deadlift.wasm.host import ModuleHost, PluginSpec, check_loadable, compile_module
from deadlift.wasm.hostfns import HostCall, HostFunction, host_function, load_pack

DIST = Path(__file__).resolve().parents[2] / "workers" / "dist"
NAMES = ("add_ten", "hostile", "bad_host", "before_charge_action")
WASM = {n: (DIST / f"{n}.wasm").read_bytes() for n in NAMES}
SHA = {n: hashlib.sha256(w).hexdigest() for n, w in WASM.items()}

ADD_TEN = PluginSpec(sha256=SHA["add_ten"], org="acme", timeout_ms=1000, max_pages=256)
HOSTILE = PluginSpec(sha256=SHA["hostile"], org="acme", timeout_ms=200, max_pages=64)
BAD_HOST = PluginSpec(
    sha256=SHA["bad_host"], org="acme", timeout_ms=200, max_pages=64, host_functions=("send_email",)
)
CHARGE = PluginSpec(
    sha256=SHA["before_charge_action"],
    org="stripe",
    timeout_ms=1000,
    max_pages=256,
    host_functions=("past_purchases", "send_email"),
)

DAY = 86_400
NOW = 1_700_000_000
CHARGE_EVENT = {
    "charge_id": "ch_1",
    "customer": "cus_42",
    "email": "zoë@example.com",
    "amount": 99.5,
    "category": "shoes",
    "ts": NOW,
}


@pytest.fixture
def host() -> ModuleHost:
    host = ModuleHost()
    for name, wasm in WASM.items():
        host.add_binary(SHA[name], wasm)
    return host


def call_ctx(org: str = "acme", **granted: HostFunction) -> HostCall:
    return HostCall(
        org=org,
        workflow="checkout",
        step="before_charge",
        run="run-1",
        event_id="ev-1",
        granted=granted,
    )


def history(similar: int) -> list[dict[str, Any]]:
    """``similar`` purchases of the charge's category spread over exactly 30 days, plus noise."""
    found = [
        {"category": "shoes", "amount": 10, "ts": NOW - i * 30 * DAY // max(similar - 1, 1)}
        for i in range(similar)
    ]
    return [
        *found,
        {"category": "books", "amount": 5, "ts": NOW - DAY},  # another category
        {"category": "shoes", "amount": 5, "ts": NOW - 31 * DAY},  # too old
        {"category": "shoes", "amount": 5, "ts": NOW + DAY},  # after the charge
    ]


class Stripe:
    """Test host functions: a purchase history and an outbox."""

    def __init__(self, similar: int) -> None:
        self.similar = similar
        self.outbox: list[dict[str, Any]] = []
        self.seen: list[tuple[str, str, Any]] = []

        @host_function
        def past_purchases(call: HostCall, request: Any) -> Any:
            self.seen.append((call.org, call.step, request))
            return {"purchases": history(self.similar)}

        @host_function
        def send_email(call: HostCall, request: Any) -> Any:
            self.outbox.append(request)
            return {"id": f"em_{len(self.outbox)}"}

        self.functions = {"past_purchases": past_purchases, "send_email": send_email}


def charge(host: ModuleHost, context: HostCall, event: dict[str, Any] = CHARGE_EVENT) -> Any:
    raw = host.call(CHARGE, "before_charge_action", json.dumps(event).encode(), context)
    return from_module(raw, "json")


def add_ten(host: ModuleHost, value: int, spec: PluginSpec = ADD_TEN) -> Any:
    raw = host.call(spec, "add_ten", json.dumps({"value": value}).encode(), call_ctx(spec.org))
    return json.loads(raw)


def hostile(host: ModuleHost, function: str, data: bytes = b"", **changes: Any) -> bytes:
    stripe = Stripe(0)
    return host.call(replace(HOSTILE, **changes), function, data, call_ctx(**stripe.functions))


def fails(host: ModuleHost, function: str, data: bytes = b"", **changes: Any) -> StepError:
    with pytest.raises(StepError) as caught:
        hostile(host, function, data, **changes)
    return caught.value


# ---------------------------------------------------------------- isolation


def test_concurrent_calls_each_get_their_own_output(host: ModuleHost) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: add_ten(host, i), range(400)))
    assert results == [{"value": i + 10} for i in range(400)]
    idle, created = host.pool_sizes()[ADD_TEN]
    assert 1 <= created <= 8  # one instance per in-flight call, reused afterwards
    assert idle == created


def test_orgs_never_share_instances(host: ModuleHost) -> None:
    other = replace(ADD_TEN, org="stripe")
    assert add_ten(host, 1) == add_ten(host, 1, other) == {"value": 11}
    sizes = host.pool_sizes()
    assert {spec.org for spec in sizes} == {"acme", "stripe"}
    assert sizes[ADD_TEN] == sizes[other] == (1, 1)


# ---------------------------------------------------------------- limits and failures


def test_endless_loop_is_stopped_by_the_timeout(host: ModuleHost) -> None:
    started = time.monotonic()
    error = fails(host, "spin", timeout_ms=200)
    assert time.monotonic() - started < 5
    assert error.kind == "timeout"
    assert "200 ms" in str(error)


def test_a_module_timed_out_while_logging_times_out(host: ModuleHost) -> None:
    # The timer may interrupt libextism's own log handling ("invalid handle offset for
    # log message"): that is the timeout's doing, not the module's trap.
    flood = json.dumps({"lines": 1_000_000, "size": 1}).encode()
    kinds = [fails(host, "flood", flood, timeout_ms=2).kind for _ in range(30)]
    assert set(kinds) == {"timeout"}


def test_memory_bomb_hits_the_memory_limit(host: ModuleHost) -> None:
    error = fails(host, "bomb", max_pages=64)
    assert (error.kind, error.retryable) == ("oom", False)
    assert "64 pages" in str(error)


def test_trap_names_its_cause(host: ModuleHost) -> None:
    error = fails(host, "trap")
    assert error.kind == "trap"
    assert "unreachable" in str(error)


def test_guest_error_carries_its_message(host: ModuleHost) -> None:
    error = fails(host, "fail")
    assert error.kind == "error"
    assert "hostile: asked to fail" in str(error)


def test_output_over_the_limit_is_refused(host: ModuleHost) -> None:
    assert len(hostile(host, "huge", b'{"bytes": 1000}', max_output_bytes=1000)) == 1000
    error = fails(host, "huge", b'{"bytes": 1001}', max_output_bytes=1000)
    assert (error.kind, error.retryable) == ("output_too_large", False)
    assert "1001 bytes" in str(error)


def test_missing_export(host: ModuleHost) -> None:
    error = fails(host, "no_such_function")
    assert (error.kind, error.retryable) == ("missing_export", False)
    assert "no_such_function" in str(error)


@pytest.mark.parametrize(
    ("function", "data"),
    [("spin", b""), ("bomb", b""), ("trap", b""), ("fail", b""), ("huge", b'{"bytes": 999999}')],
)
def test_a_failed_instance_is_replaced(host: ModuleHost, function: str, data: bytes) -> None:
    assert hostile(host, "ok", b"first") == b"first"
    with pytest.raises(StepError):
        hostile(host, function, data)
    assert host.pool_sizes()[HOSTILE] == (0, 1)  # the failed instance was dropped
    assert hostile(host, "ok", b"after") == b"after"
    assert host.pool_sizes()[HOSTILE] == (1, 2)


def test_unloaded_binary(host: ModuleHost) -> None:
    with pytest.raises(ModuleError, match="not loaded"):
        host.call(replace(ADD_TEN, sha256="f" * 64), "add_ten", b"{}", call_ctx())


# ---------------------------------------------------------------- host functions


def test_loyal_customer_gets_a_discount_email(host: ModuleHost) -> None:
    stripe = Stripe(similar=10)
    output = charge(host, call_ctx("stripe", **stripe.functions))
    assert output == {
        "charge_id": "ch_1",
        "customer": "cus_42",
        "email": "zoë@example.com",
        "category": "shoes",
        "similar_purchases": 10,
        "discount_percent": 10,
        "email_id": "em_1",
    }
    [email] = stripe.outbox
    assert email["to"] == "zoë@example.com"
    assert "10% discount" in email["body"]
    assert stripe.seen == [("stripe", "before_charge", {"customer": "cus_42"})]


def test_no_discount_below_ten_similar_purchases(host: ModuleHost) -> None:
    stripe = Stripe(similar=9)
    assert charge(host, call_ctx("stripe", **stripe.functions)) is None  # JSON null: filtered
    assert stripe.outbox == []


def test_raising_host_function_fails_the_step(host: ModuleHost) -> None:
    @host_function
    def past_purchases(call: HostCall, request: Any) -> Any:
        raise RuntimeError("database is down")

    stripe = Stripe(10)
    context = call_ctx("stripe", **{**stripe.functions, "past_purchases": past_purchases})
    with pytest.raises(StepError, match=r"past_purchases.*database is down") as caught:
        charge(host, context)
    assert caught.value.kind == "host_function"
    assert stripe.outbox == []


def test_host_function_linked_but_not_granted_to_the_call(host: ModuleHost) -> None:
    stripe = Stripe(10)
    context = call_ctx("stripe", past_purchases=stripe.functions["past_purchases"])
    with pytest.raises(StepError, match="'send_email' is not granted") as caught:
        charge(host, context)
    assert caught.value.kind == "host_function"


def test_garbage_request_from_the_guest(host: ModuleHost) -> None:
    error = fails(host, "bad_host_call", sha256=SHA["bad_host"], host_functions=("send_email",))
    assert error.kind == "host_function"
    assert "send_email" in str(error)


async def test_async_host_function_runs_on_the_callers_loop(host: ModuleHost) -> None:
    loop = asyncio.get_running_loop()
    stripe = Stripe(10)
    on_loop = []

    @host_function(name="send_email")
    async def send_email_async(call: HostCall, request: Any) -> Any:
        on_loop.append(asyncio.get_running_loop() is loop)
        await asyncio.sleep(0.01)
        return {"id": "em_async"}

    context = call_ctx("stripe", **{**stripe.functions, "send_email": send_email_async})
    context.loop = loop
    output = await loop.run_in_executor(None, charge, host, context)
    assert output["email_id"] == "em_async"
    assert on_loop == [True]


def test_async_host_function_without_a_loop_fails_cleanly(host: ModuleHost) -> None:
    pending: list[Any] = []

    @host_function
    def send_email(call: HostCall, request: Any) -> Any:
        pending.append(asyncio.sleep(0, {"id": "never"}))
        return pending[-1]

    stripe = Stripe(10)
    context = call_ctx("stripe", **{**stripe.functions, "send_email": send_email})
    with pytest.raises(StepError, match="no event loop") as caught:
        charge(host, context)
    assert caught.value.kind == "host_function"
    assert pending[0].cr_frame is None  # closed, not left to warn "never awaited"


def test_import_not_linked_fails_at_compile(host: ModuleHost) -> None:
    wasm = WASM["before_charge_action"]
    with pytest.raises(ModuleError, match="past_purchases, send_email"):
        compile_module(wasm, replace(CHARGE, host_functions=()))
    with pytest.raises(ModuleError, match="past_purchases"):
        host.prepare(replace(CHARGE, host_functions=("send_email",)))
    with pytest.raises(ModuleError, match="send_email"):
        check_loadable(wasm, ())
    check_loadable(wasm, ("past_purchases", "send_email"))


# ---------------------------------------------------------------- plugin logs


def test_plugin_logs_carry_the_call_context(
    host: ModuleHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deadlift.module")
    charge(host, call_ctx("stripe", **Stripe(similar=3).functions))
    [record] = [r for r in caplog.records if "similar purchase" in r.getMessage()]
    assert record.name == "deadlift.module"
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("[stripe/checkout/before_charge] before_charge_action:")
    assert "3 similar purchase(s)" in record.getMessage()
    assert (record.org, record.workflow, record.step, record.run) == (  # type: ignore[attr-defined]
        "stripe",
        "checkout",
        "before_charge",
        "run-1",
    )


def test_failure_logs_hold_no_host_stack(
    host: ModuleHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deadlift.module")
    fails(host, "trap")
    messages = [r.getMessage() for r in caplog.records if r.name == "deadlift.module"]
    assert any("[acme/checkout/before_charge] call to trap" in m for m in messages)
    assert not any("Stack backtrace" in m for m in messages)


# ---------------------------------------------------------------- host-function packs


def test_load_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dl_test_pack_ok.py").write_text(
        "from deadlift import host_function\n"
        "@host_function\n"
        "def send_email(call, request):\n"
        "    '''Send an email.'''\n"
        "    return {'id': 'x'}\n"
        "@host_function(name='past_purchases')\n"
        "def history(call, request):\n"
        "    return {'purchases': []}\n"
        "def not_a_host_function(call, request):\n"
        "    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pack = load_pack("dl_test_pack_ok")
    assert sorted(pack) == ["past_purchases", "send_email"]
    assert pack["send_email"].description == "Send an email."
    assert pack["past_purchases"](call_ctx(), None) == {"purchases": []}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def plain(call, request):\n    return 1\n", "no functions decorated"),
        ("import dl_no_such_dependency\n", "cannot import"),
        ("def broken(:\n", "cannot import"),
        ("raise RuntimeError('boom at import')\n", "boom at import"),
    ],
)
def test_load_pack_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    name = f"dl_test_pack_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_pack(name)


def test_load_pack_unknown_module() -> None:
    with pytest.raises(ConfigError, match="dl_pack_that_does_not_exist"):
        load_pack("dl_pack_that_does_not_exist")


def test_idle_instances_are_capped_across_step_pools() -> None:
    """Pools are per step (no state crosses steps), so with many steps the idle
    instances (~2 MB each) are capped overall; the least recently used give first."""
    host = ModuleHost(max_idle_total=4)
    host.add_binary(SHA["add_ten"], WASM["add_ten"])
    steps = [replace(ADD_TEN, workflow="w", step=f"s{i}") for i in range(10)]
    for spec in steps:
        assert json.loads(host.call(spec, "add_ten", b'{"value": 1}', call_ctx())) == {"value": 11}
    idle = {spec.step: sizes[0] for spec, sizes in host.pool_sizes().items()}
    assert sum(idle.values()) == 4
    assert [idle[f"s{i}"] for i in range(6, 10)] == [1, 1, 1, 1]  # the most recent kept
    # An evicted step still runs: it gets a fresh instance.
    assert json.loads(host.call(steps[0], "add_ten", b'{"value": 2}', call_ctx())) == {"value": 12}


def test_returning_an_instance_looks_only_at_pools_holding_idle_ones() -> None:
    """Each return over the idle cap sorted every step's pool, under the host's lock,
    to find the least recently used: 1.1 ms per call with 30,000 steps' pools (a
    worker of 10,000 workflows), paid by every executor thread in turn. Eviction
    now walks only the pools that hold idle instances (at most the idle cap)."""
    host = ModuleHost(max_idle_total=3)
    host.add_binary(SHA["add_ten"], WASM["add_ten"])
    steps = [replace(ADD_TEN, workflow="w", step=f"s{i}") for i in range(300)]
    for spec in steps:
        host.call(spec, "add_ten", b'{"value": 1}', call_ctx())
        assert len(host._holding) <= 3
    assert [s.step for s in host._holding] == ["s297", "s298", "s299"]  # least recent first
    # Using a held step makes it the most recent: the next eviction spares it.
    host.call(steps[297], "add_ten", b'{"value": 1}', call_ctx())
    host.call(steps[0], "add_ten", b'{"value": 1}', call_ctx())
    assert [s.step for s in host._holding] == ["s299", "s297", "s0"]


# -- idle instances ------------------------------------------------------------


def test_a_quiet_steps_instances_are_given_back(host: ModuleHost) -> None:
    assert add_ten(host, 1) == {"value": 11}
    assert host.holding and host.pool_sizes()[ADD_TEN][0] == 1
    assert host.trim(idle_for=0.0, release_after=0.0) == 1
    assert not host.holding and host.pool_sizes()[ADD_TEN][0] == 0
    assert add_ten(host, 2) == {"value": 12}  # a new instance, as good


def test_the_host_says_when_it_next_holds_an_idle_instance(host: ModuleHost) -> None:
    """Whoever trims waits for this: a thousand idle orgs' trimmers never wake."""
    told: list[bool] = []
    assert host.when_holding(lambda: told.append(host.holding))
    fails(host, "trap")  # a failed call's instance is dropped: nothing held, nothing told
    assert told == []
    add_ten(host, 1)
    add_ten(host, 2)  # once only
    assert told == [True]
    assert not host.when_holding(lambda: told.append(False))  # held now: not armed
    host.trim(idle_for=0.0, release_after=0.0)
    add_ten(host, 3)
    assert told == [True]
