"""Hostile modules against a shared worker: memory held after failures, timeouts told apart.

Also (issue 14) how ``deadlift health`` words a server whose JetStream is off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import extism
import pytest
from nats.js.errors import APIError, ServiceUnavailableError

from deadlift.errors import StepError
from deadlift.ops.health import healthz_problem, jetstream_problem, storage_problem
from deadlift.wasm.host import ModuleHost, PluginSpec, _step_error
from deadlift.wasm.hostfns import HostCall

WASM = (Path(__file__).resolve().parents[2] / "workers" / "dist" / "hostile.wasm").read_bytes()
SHA = hashlib.sha256(WASM).hexdigest()
MIB = 1 << 20


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ctx(org: str = "acme") -> HostCall:
    return HostCall(org=org, workflow="w", step="s", run="r", event_id="e", granted={})


def spec(org: str = "acme", **changes: int) -> PluginSpec:
    limits = {"timeout_ms": 1000, "max_pages": 256} | changes
    return PluginSpec(sha256=SHA, org=org, max_output_bytes=8 * MIB, **limits)


@pytest.fixture
def host() -> ModuleHost:
    host = ModuleHost()
    host.add_binary(SHA, WASM)
    return host


def test_failed_calls_do_not_hold_their_instances_memory(host: ModuleHost) -> None:
    """A failed call's error must not keep the dropped instance (and its heap) alive.

    A worker keeps each event's StepError until the batch is settled, as here.
    Each ``bomb`` call fills 16 MiB; before the fix the error's traceback held the
    instance, about 10 MB resident per call.
    """
    bomb = spec(max_pages=256)
    for _ in range(5):
        host.call(bomb, "ok", b"warm", ctx())
    before = rss()
    kept: list[StepError] = []
    for _ in range(150):
        with pytest.raises(StepError) as caught:
            host.call(bomb, "bomb", b"", ctx())
        assert caught.value.kind == "oom"
        kept.append(caught.value)
    grown = rss() - before
    assert grown < 150 * MIB, f"RSS grew by {grown / MIB:.0f} MiB over 150 oom calls"


def test_idle_instances_are_bounded_by_their_memory_cap() -> None:
    """Idle instances count at their worst case (max_pages): the total is capped."""
    host = ModuleHost(max_idle_bytes=64 * MIB)
    host.add_binary(SHA, WASM)
    big = spec(max_pages=256)  # 16 MiB each: at most 4 idle
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: host.call(big, "ok", b"x", ctx()), range(64)))
    idle = sum(n for n, _ in host.pool_sizes().values())
    assert 1 <= idle <= 4


def test_endless_loops_are_all_timeouts(host: ModuleHost) -> None:
    """Concurrent timeouts bump a shared epoch: "wasm trap: interrupt" is a timeout too."""
    spinner = spec(timeout_ms=50, max_pages=64)
    kinds: Counter[str] = Counter()
    other: list[str] = []

    def spin(_: int) -> None:
        try:
            host.call(spinner, "spin", b"", ctx())
        except StepError as exc:
            kinds[str(exc.kind)] += 1
            if exc.kind != "timeout":
                other.append(str(exc))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(spin, range(200)))
    assert kinds == {"timeout": 200}, other


@pytest.mark.parametrize(
    "message",
    ["unable to set extism input", "unable to clear error message", "wasm trap: interrupt"],
)
def test_a_call_interrupted_while_libextism_sets_it_up_is_a_timeout(message: str) -> None:
    """Another call's timeout can land in libextism's setup of this one (1 in 200
    concurrent endless loops under load said "unable to set extism input")."""
    error = _step_error(extism.Error(message), spec(timeout_ms=50), ctx(), None)
    assert error.kind == "timeout", error


def test_one_orgs_timeouts_do_not_interrupt_another_orgs_calls(host: ModuleHost) -> None:
    """Same binary, same limits, two orgs: evil's timeouts must not cut good's calls short."""
    evil, good = spec("evil", timeout_ms=100), spec("good", timeout_ms=100)
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            with contextlib.suppress(StepError):
                host.call(evil, "spin", b"", ctx("evil"))

    attacker = threading.Thread(target=attack)
    attacker.start()
    failures: Counter[str] = Counter()
    try:
        for _ in range(300):
            try:
                host.call(good, "huge", b'{"bytes": 2000000}', ctx("good"))
            except StepError as exc:
                failures[str(exc.kind)] += 1
    finally:
        stop.set()
        attacker.join()
    assert not failures


@pytest.mark.parametrize(
    "error",
    [
        ServiceUnavailableError(),  # no responders: the JetStream API is gone
        APIError(code=503, err_code=10076, description="JetStream not enabled"),
        APIError(code=503, err_code=10039, description="JetStream not enabled for account"),
    ],
)
def test_jetstream_off_asks_for_a_server_restart(error: Exception) -> None:
    problem = jetstream_problem(error)
    assert problem is not None
    assert "restart nats-server" in problem
    assert "disk" in problem


def test_other_jetstream_errors_are_not_read_as_disabled() -> None:
    missing = APIError(code=404, err_code=10059, description="stream not found")
    assert jetstream_problem(missing) is None
    assert jetstream_problem(TimeoutError()) is None


def test_full_account_storage_is_a_problem() -> None:
    assert storage_problem(10, -1) is None  # unlimited
    assert storage_problem(10, 100) is None
    problem = storage_problem(100, 100)
    assert problem is not None and "storage is full" in problem


def test_a_write_error_in_healthz_asks_for_a_server_restart() -> None:
    """What nats-server 2.15 answered here after its store's disk (a 3 MB tmpfs) filled up.

    JetStream stayed on, account and stream info still answered, PubAcks never
    came, and /healthz kept saying this after space was freed, until a restart.
    """
    healthz = {
        "status": "unavailable",
        "status_code": 503,
        "error": "JetStream stream 'APP > S' write error: write /data/jetstream/APP/streams/"
        "S/msgs/1.blk: no space left on device",
    }
    problem = healthz_problem("n1", healthz)
    assert problem is not None
    assert problem.startswith("server n1: JetStream stream 'APP > S' write error")
    assert "restart nats-server" in problem and "free disk space" in problem


def test_healthz_other_answers() -> None:
    assert healthz_problem("n1", {"status": "ok", "status_code": 200}) is None
    problem = healthz_problem("n1", {"status": "unavailable", "error": "JetStream not current"})
    assert problem == "server n1 is unhealthy: JetStream not current"
