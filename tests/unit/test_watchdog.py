"""The watchdog: module calls stuck past their limit plus grace are noticed, once.

Nothing interrupts a thread blocked in a host function or a module's start
function; the watchdog notices it from a monitor thread. A worker it shuts down,
and an instantiation inside a real worker process, are tested in
tests/integration/test_attack_time.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from deadlift.runtime.watchdog import Stuck, Watchdog, phase


def test_watchdog_notices_a_call_past_its_limit_plus_grace_once() -> None:
    fired: list[list[Stuck]] = []
    dog = Watchdog(grace_s=0.3, on_stuck=fired.append, interval_s=0.05)
    dog.start()
    release = threading.Event()

    def blocked() -> None:
        with dog.track("step acme/w/s (module m)", 0.2):
            release.wait(10)

    def quick() -> None:
        with dog.track("step acme/w/quick (module m)", 0.2):
            time.sleep(0.3)  # past its limit, within the grace: not stuck

    threads = [threading.Thread(target=f, name=f.__name__) for f in (blocked, quick)]
    try:
        assert dog.healthy and dog.problems == []
        for t in threads:
            t.start()
        threads[1].join()
        assert not fired
        deadline = time.monotonic() + 3
        while not fired and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fired) == 1 and [s.what for s in fired[0]] == ["step acme/w/s (module m)"]
        assert fired[0][0].thread == "blocked" and fired[0][0].deadline_s == pytest.approx(0.5)
        assert not dog.healthy
        assert dog.problems[0].startswith("stuck: step acme/w/s (module m) has been running")
        time.sleep(0.2)
        assert len(fired) == 1  # once: the worker is going away
    finally:
        release.set()
        for t in threads:
            t.join()
        dog.stop()


def test_a_phase_has_its_own_allowance_and_stops_the_calls_clock() -> None:
    dog = Watchdog(grace_s=0.2, phase_s=0.6)
    with phase("outside any call"):  # nothing tracked: a no-op
        pass
    with dog.track("call", 0.1):
        with phase("instantiating module x"):
            time.sleep(0.5)  # past the call's 0.3 s deadline, within the phase's 0.8 s
            assert dog.check() == []
            assert dog.running()[0].startswith("call: instantiating module x (running")
        assert dog.check() == []  # the call's clock did not run during the phase
        time.sleep(0.35)
        [stuck] = dog.check()
        assert stuck.what == "call" and stuck.deadline_s == pytest.approx(0.8, abs=0.05)
    assert dog.running() == []


def test_the_watchdogs_of_a_process_share_one_thread_and_fire_alone() -> None:
    """A process serving many orgs has a watchdog each; a thread each cost a third of
    its idle CPU (250 orgs). One monitor thread watches them all."""
    fired: dict[int, list[list[Stuck]]] = {i: [] for i in range(50)}
    dogs = [Watchdog(grace_s=0.1, on_stuck=fired[i].append, interval_s=0.05) for i in range(50)]
    for dog in dogs:
        dog.start()
    release = threading.Event()

    def blocked() -> None:
        with dogs[7].track("step o7/w/s (module m)", 0.1):
            release.wait(10)

    thread = threading.Thread(target=blocked, name="blocked")
    try:
        monitors = [t for t in threading.enumerate() if t.name == "deadlift-watchdog"]
        assert len(monitors) == 1
        thread.start()
        deadline = time.monotonic() + 3
        while not fired[7] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fired[7]) == 1
        assert not dogs[7].healthy
        assert all(not fired[i] and dogs[i].healthy for i in range(50) if i != 7)
    finally:
        release.set()
        thread.join()
        for dog in dogs:
            dog.stop()
