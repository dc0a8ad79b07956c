"""Soak test: under random faults, Deadlift loses no event and duplicates none.

What it proves
--------------
It runs a real nats-server (JetStream, one store dir that survives restarts) and W
``deadlift worker`` processes, and applies three workflows (org ``soak``):

* ``soak``          soak.in   -> add_ten -> multiply_by_five -> publishes soak.out
* ``soak-hostile``  soak.bad  -> add_ten          (malformed inputs: must be dead-lettered)
* ``soak-trap``     soak.trap -> hostile.trap     (a trapping module: must be dead-lettered)

It publishes N events ``{"value": n}`` (n = 0..N-1, distinct ids) on soak.in at a
steady rate. Meanwhile, every few seconds, a seeded fault task does one of:
SIGKILL a worker (a replacement starts), SIGTERM a worker (a replacement starts),
restart the nats-server (SIGKILL or SIGTERM, then start it again on the same port
and store; workers must reconnect by themselves), or publish a hostile input (bad
msgpack with ce- headers, no ce-id, a non-JSON foreign body, ``{"value": "not a
number"}``, an input for the trapping module). Every publish is retried with the
same ``Nats-Msg-Id`` until acknowledged, so publishing survives server restarts.

It then waits (``--timeout``) until every output is stored on soak.out, every hostile
input is dead-lettered and every step consumer is idle, and checks that soak.out
holds exactly the values {(n + 10) * 5}, once each (lost = 0, duplicated = 0), that
each hostile input was dead-lettered and that no good event was.

Not part of ``make test``. Run it from the repository root:

    .venv/bin/python bench/soak.py --events 2000 --seed 1

Exit code 0 only when every check passes (1 otherwise, 130 on Ctrl-C). The last line::

    events=2000 lost=0 duplicated=0 dead_lettered=K kills=.. sigterms=.. server_restarts=.. \
hostile=.. seconds=..

Every process it starts (nats-server, workers) is stopped by PID before it exits. The
work dir (store, server and worker logs) is removed after a passing run and kept,
with its path printed, after a failing one (or always with ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.errors import DeadliftError
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.settings import Settings
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "workers" / "dist"
ORG = "soak"
GOOD_IN, GOOD_OUT, BAD_IN, TRAP_IN = "soak.in", "soak.out", "soak.bad", "soak.trap"
GOOD_WORKFLOW = "soak"

WORKFLOWS = [
    f"""
name: {GOOD_WORKFLOW}
org: {ORG}
trigger: {GOOD_IN}
steps:
  - name: add
    module: add_ten
    function: add_ten
    next: [multiply]
    timeout_ms: 500
    retry: {{max_attempts: 2, backoff: [0.2]}}
  - name: multiply
    module: multiply_by_five
    function: multiply_by_five
    publish: [{GOOD_OUT}]
    timeout_ms: 500
    retry: {{max_attempts: 2, backoff: [0.2]}}
""",
    f"""
name: soak-hostile
org: {ORG}
trigger: {BAD_IN}
steps:
  - name: add
    module: add_ten
    function: add_ten
    timeout_ms: 500
    retry: {{max_attempts: 2, backoff: [0.2]}}
""",
    f"""
name: soak-trap
org: {ORG}
trigger: {TRAP_IN}
steps:
  - name: trap
    module: hostile
    function: trap
    timeout_ms: 500
    retry: {{max_attempts: 2, backoff: [0.2]}}
""",
]

FAULT_KINDS = ("kill_worker", "term_worker", "restart_server", "hostile")
FAULT_COUNTS = ("kill", "sigterm", "server_restart", "hostile", "worker_crash")
HOSTILE_KINDS = ("bad_msgpack", "missing_id", "foreign_non_json", "not_a_number", "trap")
WORKER_COMMAND = (sys.executable, "-m", "deadlift.cli")
STREAMS = (Stream.EVENTS, Stream.STEPS)
QUIET_CHECKS = 5  # idle polls (1 s apart) after which missing outputs will never come
NATS_TROUBLE = (TimeoutError, OSError, nats.errors.Error, DeadliftError)


class SoakError(Exception):
    """The soak could not run (as opposed to: it ran and found loss or duplication)."""


# -- processes (sync: they are quick, or run in a thread) ----------------------------------


class Server:
    """The nats-server on a fixed port and store dir, restartable."""

    def __init__(self, work: Path) -> None:
        self.embedded = EmbeddedServer(store_dir=work / "store", log_file=work / "nats.log")

    @property
    def url(self) -> str:
        return self.embedded.url

    @property
    def pid(self) -> int | None:
        process = self.embedded.process
        return process.pid if process else None

    def start(self, attempts: int = 5) -> None:
        """Start on the same port and store; retry a few times (the port may linger)."""
        for attempt in range(1, attempts + 1):
            try:
                self.embedded.start()
                return
            except DeadliftError:
                self.embedded.kill()
                if attempt == attempts:
                    raise
                time.sleep(0.5 * attempt)

    def restart(self, how: str, down_s: float) -> None:
        """SIGKILL or SIGTERM the server, stay down ``down_s``, start it again."""
        if how == "SIGKILL":
            self.embedded.kill()
        else:
            self.embedded.stop()  # SIGTERM; keeps the store (not a temp dir)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.embedded.stop()


@dataclass
class WorkerProc:
    """One ``deadlift worker`` process and its log file."""

    number: int
    process: subprocess.Popen[bytes]
    log_path: Path
    how_stopped: str = ""  # "" while we have not signalled it

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Workers:
    """The worker processes: start, signal, replace, reap and stop them by PID."""

    url: str
    count: int
    concurrency: int
    env: dict[str, str]
    log_dir: Path
    running: list[WorkerProc] = field(default_factory=list)
    stopping: list[WorkerProc] = field(default_factory=list)
    exited: list[tuple[WorkerProc, int]] = field(default_factory=list)
    crashes: list[tuple[WorkerProc, int]] = field(default_factory=list)
    started: int = 0

    def start_one(self) -> WorkerProc:
        self.started += 1
        log_path = self.log_dir / f"worker-{self.started}.log"
        concurrency = str(self.concurrency)
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                [*WORKER_COMMAND, "--server", self.url, "worker", "--concurrency", concurrency],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=self.env,
                start_new_session=True,  # a Ctrl-C meant for the soak is handled by the soak
            )
        worker = WorkerProc(self.started, process, log_path)
        self.running.append(worker)
        return worker

    def fill(self) -> list[WorkerProc]:
        """Start workers until ``count`` run; return the new ones."""
        return [self.start_one() for _ in range(self.count - len(self.running))]

    def signal_random(self, rng: random.Random, sig: signal.Signals) -> WorkerProc | None:
        """Send ``sig`` to a random running worker; it is no longer counted as running."""
        if not self.running:
            return None
        worker = self.running.pop(rng.randrange(len(self.running)))
        worker.how_stopped = sig.name
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(sig)
        self.stopping.append(worker)
        return worker

    def reap(self) -> list[tuple[WorkerProc, int]]:
        """Collect exited workers; return those that exited without being signalled."""
        crashed = [(w, rc) for w in self.running if (rc := w.process.poll()) is not None]
        self.running = [w for w in self.running if w.process.poll() is None]
        self.crashes += crashed
        for worker in [w for w in self.stopping if w.process.poll() is not None]:
            self.stopping.remove(worker)
            self.exited.append((worker, worker.process.returncode))
        return crashed

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker still alive, wait for them, SIGKILL the stragglers."""
        alive = [w for w in self.running + self.stopping if w.process.poll() is None]
        for worker in alive:
            if worker in self.running:
                worker.how_stopped = "final SIGTERM"
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in alive:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        for worker in self.running:
            self.exited.append((worker, worker.process.returncode))
        self.running = []
        self.reap()

    def unclean_sigterm_exits(self) -> list[tuple[WorkerProc, int]]:
        """Workers that were SIGTERMed (to drain) but did not exit with code 0."""
        return [(w, rc) for w, rc in self.exited if "SIGTERM" in w.how_stopped and rc != 0]

    def logs(self) -> Iterator[tuple[WorkerProc, str]]:
        everyone = [w for w, _ in self.exited] + [w for w, _ in self.crashes]
        for worker in sorted(everyone, key=lambda w: w.number):
            with contextlib.suppress(OSError):
                yield worker, worker.log_path.read_text(errors="replace")


# -- the fault log --------------------------------------------------------------------------


@dataclass
class FaultLog:
    """What was done to the system, with times relative to the start."""

    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)

    def note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        print(f"[{time.monotonic() - self.started:6.1f}s] {kind:<15} {detail}", flush=True)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


# -- publishing -----------------------------------------------------------------------------


@dataclass
class PublishStats:
    retries: int = 0
    duplicate_acks: int = 0


async def publish_durable(
    nc: Client,
    subject: str,
    body: bytes,
    headers: dict[str, str],
    stats: PublishStats,
    *,
    within: float = 60.0,
) -> PubAck:
    """Publish until acknowledged, resending the same Nats-Msg-Id (bounded by ``within``)."""
    deadline = time.monotonic() + within
    while True:
        try:
            ack = await bus.JetStreamPublisher(nc, timeout=2.0).publish(subject, body, headers)
        except NATS_TROUBLE as exc:
            if time.monotonic() > deadline:
                raise SoakError(
                    f"publish to {subject} not acknowledged in {within} s: {exc}"
                ) from exc
            stats.retries += 1
            await asyncio.sleep(0.25)
            continue
        stats.duplicate_acks += bool(ack.duplicate)
        return ack


def good_event(run_id: str, n: int) -> tuple[dict[str, str], bytes]:
    event = events.new_event(
        {"value": n}, source="deadlift://soak", type="soak.value", id=f"{run_id}-{n}"
    )
    headers, body = events.encode(event)
    headers[events.MSG_ID] = event.id
    return headers, body


async def publish_events(
    nc: Client, run_id: str, count: int, rate: float, stats: PublishStats
) -> None:
    """Publish values 0..count-1 on soak.in at ``rate`` per second (catching up after stalls)."""
    started = time.monotonic()
    for n in range(count):
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        headers, body = good_event(run_id, n)
        await publish_durable(nc, GOOD_IN, body, headers, stats)


@dataclass(frozen=True)
class Hostile:
    """One hostile input, and where it was stored (to find its dead letter)."""

    kind: str
    subject: str
    stream: str
    seq: int


def hostile_message(kind: str, msg_id: str) -> tuple[str, dict[str, str], bytes]:
    """Subject, headers and body of a hostile input of ``kind``."""
    value: Any = "not a number" if kind == "not_a_number" else 1
    event = events.new_event({"value": value}, source="deadlift://soak", type="soak.bad", id=msg_id)
    headers, body = events.encode(event)
    headers[events.MSG_ID] = msg_id
    if kind == "bad_msgpack":
        return BAD_IN, headers, b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    if kind == "missing_id":
        headers.pop(f"{events.PREFIX}id")
        return BAD_IN, headers, body
    if kind == "foreign_non_json":
        return BAD_IN, {events.MSG_ID: msg_id}, b"\x00\xffnot json {"  # no ce- headers at all
    if kind == "trap":
        return TRAP_IN, headers, body
    return BAD_IN, headers, body  # not_a_number


async def publish_hostile(nc: Client, kind: str, msg_id: str, stats: PublishStats) -> Hostile:
    subject, headers, body = hostile_message(kind, msg_id)
    ack = await publish_durable(nc, subject, body, headers, stats)
    return Hostile(kind, subject, ack.stream, ack.seq)


# -- faults ---------------------------------------------------------------------------------


@dataclass
class Soak:
    """Everything the soak tasks share."""

    args: argparse.Namespace
    run_id: str
    nc: Client
    js: JetStreamContext
    server: Server
    workers: Workers
    faults: FaultLog
    rng: random.Random
    stats: PublishStats = field(default_factory=PublishStats)
    hostile: list[Hostile] = field(default_factory=list)
    consumers: set[str] = field(default_factory=set)

    def replace_crashed(self) -> None:
        for worker, rc in self.workers.reap():
            self.faults.note("worker_crash", f"pid={worker.pid} exited {rc} unasked (see log)")
        for worker in self.workers.fill():
            self.faults.note("worker_start", f"pid={worker.pid}")


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; return True at once if ``stop`` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def inject_faults(soak: Soak, stop: asyncio.Event) -> None:
    """Every few seconds, one random fault, until ``stop`` (each kind comes up every round)."""
    low, high = soak.args.fault_interval
    plan: list[str] = []
    for _ in range(10_000):  # bounded; in practice ``stop`` ends it
        if await sleep_unless(stop, soak.rng.uniform(low, high)):
            return
        soak.replace_crashed()
        if not plan:
            plan = list(FAULT_KINDS)
            soak.rng.shuffle(plan)
        await do_fault(soak, plan.pop())


async def do_fault(soak: Soak, kind: str) -> None:
    rng, workers, note = soak.rng, soak.workers, soak.faults.note
    if kind in ("kill_worker", "term_worker"):
        sig = signal.SIGKILL if kind == "kill_worker" else signal.SIGTERM
        victim = workers.signal_random(rng, sig)
        fresh = ", ".join(str(w.pid) for w in workers.fill())
        note(
            "kill" if sig == signal.SIGKILL else "sigterm",
            f"{sig.name} worker pid={victim.pid if victim else '-'}, replacement pid={fresh}",
        )
    elif kind == "restart_server":
        how = rng.choice(("SIGKILL", "SIGTERM"))
        down = rng.uniform(0.2, 2.0)
        old = soak.server.pid
        await asyncio.to_thread(soak.server.restart, how, down)
        note("server_restart", f"{how} pid={old}, down {down:.1f} s, new pid={soak.server.pid}")
    else:
        await publish_hostile_burst(soak)


async def publish_hostile_burst(soak: Soak) -> None:
    """One hostile input of every kind, in a random order."""
    kinds = list(HOSTILE_KINDS)
    soak.rng.shuffle(kinds)
    for kind in kinds:
        msg_id = f"{soak.run_id}-hostile-{len(soak.hostile)}"
        item = await publish_hostile(soak.nc, kind, msg_id, soak.stats)
        soak.hostile.append(item)
    placed = ", ".join(f"{h.kind}@{h.subject}#{h.seq}" for h in soak.hostile[-len(kinds) :])
    soak.faults.note("hostile", placed)


# -- reading the results --------------------------------------------------------------------


@dataclass
class Stored:
    """One message stored on soak.out."""

    seq: int
    value: Any
    event_id: str
    msg_id: str


async def read_outputs(js: JetStreamContext) -> list[Stored]:
    """Every message stored on soak.out, in order (as tests/conftest.py ``stored()`` reads)."""
    info = await js.stream_info(Stream.EVENTS, subjects_filter=GOOD_OUT)
    found: list[Stored] = []
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq:
        try:
            msg = await js.get_msg(Stream.EVENTS, seq=seq, subject=GOOD_OUT, next=True)
        except nats.js.errors.NotFoundError:
            break
        assert msg.seq is not None
        event = events.decode(msg.headers, msg.data or b"", fallback_id="-", fallback_source="-")
        value = event.data.get("value") if isinstance(event.data, dict) else event.data
        msg_id = (msg.headers or {}).get(events.MSG_ID, "")
        found.append(Stored(msg.seq, value, event.id, msg_id))
        seq = msg.seq + 1
    return found


async def output_count(js: JetStreamContext) -> int:
    info = await js.stream_info(Stream.EVENTS, subjects_filter=GOOD_OUT)
    return int((info.state.subjects or {}).get(GOOD_OUT, 0))


async def consumer_names(js: JetStreamContext) -> set[str]:
    return {
        info.name for stream in STREAMS for info in await js.consumers_info(stream) if info.name
    }


async def busy_consumers(js: JetStreamContext, expected: set[str]) -> list[str]:
    """Consumers with undelivered or unacknowledged messages (or not loaded yet)."""
    busy, seen = [], set()
    for stream in STREAMS:
        for info in await js.consumers_info(stream):
            seen.add(info.name)
            if info.num_pending or info.num_ack_pending:
                busy.append(f"{info.name} pending={info.num_pending} acks={info.num_ack_pending}")
    busy += [f"{name} missing" for name in sorted(expected - seen)]
    return busy


def unlettered(hostile: list[Hostile], letters: list[dlq.DeadLetter]) -> list[Hostile]:
    keys = {(x.headers.get(dlq.H_STREAM), x.headers.get(dlq.H_SEQ)) for x in letters}
    return [h for h in hostile if (h.stream, str(h.seq)) not in keys]


async def progress(soak: Soak) -> tuple[bool, bool, str]:
    """(everything accounted for, every consumer idle, a description).

    Accounted for: every output stored and every hostile input dead-lettered. Idle:
    nothing undelivered or awaiting an ack, so nothing more will happen by itself.
    """
    count = await output_count(soak.js)
    missing = unlettered(soak.hostile, await dlq.letters(soak.js, org=ORG))
    busy = await busy_consumers(soak.js, soak.consumers)
    complete = count >= soak.args.events and not missing
    text = (
        f"{count}/{soak.args.events} outputs, {len(missing)} hostile input(s) without a "
        f"dead letter, {'busy: ' + '; '.join(busy) if busy else 'every consumer idle'}"
    )
    return complete, not busy, text


async def wait_until_settled(soak: Soak) -> str:
    """Poll each second until complete and idle (twice in a row), or idle but incomplete for
    ``QUIET_CHECKS`` polls in a row (nothing more can arrive), or ``--timeout``.

    Returns "" when complete, else why not.
    """
    deadline = time.monotonic() + soak.args.timeout
    text, idle_polls = "not checked", 0
    while time.monotonic() < deadline:
        soak.replace_crashed()
        try:
            complete, idle, text = await progress(soak)
        except NATS_TROUBLE as exc:
            complete, idle, text = False, False, f"NATS trouble: {exc!r}"
        idle_polls = idle_polls + 1 if idle else 0
        if complete and idle_polls >= 2:
            return ""
        if idle_polls >= QUIET_CHECKS:
            return f"gave up waiting after {QUIET_CHECKS} s of quiet: {text}"
        await asyncio.sleep(1.0)
    return f"not settled within --timeout {soak.args.timeout:.0f} s: {text}"


@dataclass
class Verdict:
    lost: list[int]  # output values missing from soak.out
    vanished: list[int]  # of those, the n with no dead letter either
    duplicated: int
    unexpected: list[Any]
    letters: list[dlq.DeadLetter]
    good_letters: list[dlq.DeadLetter]
    unlettered: list[Hostile]
    outputs: list[Stored]

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.duplicated or self.unexpected or self.good_letters or self.unlettered
        )


async def judge(soak: Soak) -> Verdict:
    outputs = await read_outputs(soak.js)
    expected = {(n + 10) * 5 for n in range(soak.args.events)}
    seen = Counter(s.value for s in outputs)
    letters = await dlq.letters(soak.js, org=ORG)
    good_letters = [x for x in letters if x.workflow == GOOD_WORKFLOW]
    lost = sorted(expected - set(seen))
    lettered = {letter_n(x) for x in good_letters}
    return Verdict(
        lost=lost,
        vanished=[n for n in (v // 5 - 10 for v in lost) if n not in lettered],
        duplicated=sum(c - 1 for v, c in seen.items() if v in expected and c > 1),
        unexpected=sorted((v for v in seen if v not in expected), key=repr),
        letters=letters,
        good_letters=good_letters,
        unlettered=unlettered(soak.hostile, letters),
        outputs=outputs,
    )


# -- reporting ------------------------------------------------------------------------------


def report_details(soak: Soak, verdict: Verdict, why_not_settled: str) -> int:
    """Everything useful for a diagnosis, before the summary line; return worker troubles."""
    faults = {k: soak.faults.counts[k] for k in FAULT_COUNTS}
    print("--- faults:", ", ".join(f"{k}={n}" for k, n in faults.items()), "(hostile: bursts of 5)")
    print(
        f"--- publishing: {soak.stats.retries} publish retries, "
        f"{soak.stats.duplicate_acks} acknowledged as duplicates (earlier attempt stored)"
    )
    kinds = Counter(h.kind for h in soak.hostile)
    print("--- hostile inputs:", dict(sorted(kinds.items())))
    print("--- dead letters:", dict(Counter(f"{x.workflow}/{x.kind}" for x in verdict.letters)))
    if why_not_settled:
        print(f"!!! {why_not_settled}")
    troubled = report_workers(soak.workers)
    by_value: dict[Any, list[Stored]] = {}
    for stored in verdict.outputs:
        by_value.setdefault(stored.value, []).append(stored)
    dups = [s for s in by_value.values() if len(s) > 1]
    for copies in dups[:5]:
        print(f"!!! value {copies[0].value} stored {len(copies)} times:")
        for s in copies:
            print(f"      stream seq {s.seq} ce-id {s.event_id} Nats-Msg-Id {s.msg_id}")
    if verdict.lost:
        print(f"!!! lost {len(verdict.lost)} output values, e.g. {verdict.lost[:10]}")
    if verdict.vanished:
        print(
            f"!!! {len(verdict.vanished)} of them have no dead letter either, "
            f"n = {verdict.vanished[:10]}"
        )
    if verdict.unexpected:
        print(f"!!! unexpected values on {GOOD_OUT}: {verdict.unexpected[:10]}")
    for letter in verdict.good_letters[:5]:
        print(f"!!! good event dead-lettered: {describe_letter(letter, set(by_value))}")
    for item in verdict.unlettered[:5]:
        print(f"!!! hostile input without a dead letter: {item}")
    return troubled


def letter_n(letter: dlq.DeadLetter) -> int | None:
    """The n of a good event's dead letter (its input at step add is n, at multiply n + 10)."""
    try:
        event = events.decode(letter.headers, letter.body, fallback_id="-", fallback_source="-")
        value = int(event.data["value"])
    except Exception:
        return None
    return value - 10 if letter.step == "multiply" else value


def describe_letter(letter: dlq.DeadLetter, stored_values: set[Any]) -> str:
    """A good event's dead letter: which n, why, and whether its output got stored anyway."""
    n = letter_n(letter)
    stored = n is not None and (n + 10) * 5 in stored_values
    return (
        f"n={n} at step {letter.step} (stream seq {letter.headers.get(dlq.H_SEQ)}) after "
        f"{letter.attempts} deliveries [{letter.kind}], "
        f"{'output stored anyway' if stored else 'output NOT stored'}: {letter.error}"
    )


def report_workers(workers: Workers) -> int:
    """Print what the worker processes did; return how many misbehaved (kept for a look)."""
    oks, troubled = 0, set()
    for worker, text in workers.logs():
        found = re.search(r"worker stopped: ok=(\d+)", text)
        oks += int(found.group(1)) if found else 0
        if "Traceback" in text or "crashed" in text:
            troubled.add(worker.pid)
            print(f"!!! worker pid={worker.pid} logged a traceback ({last_error(text)})")
            print(f"      {worker.log_path}")
    print(
        f"--- workers: {workers.started} started, {len(workers.crashes)} exited unasked, "
        f"ok step runs reported by cleanly stopped workers: {oks}"
    )
    for worker, rc in workers.crashes:
        troubled.add(worker.pid)
        print(f"!!! worker pid={worker.pid} exited {rc} unasked: {worker.log_path}")
    for worker, rc in workers.unclean_sigterm_exits():
        troubled.add(worker.pid)
        print(f"!!! worker pid={worker.pid} exited {rc} after {worker.how_stopped}")
    return len(troubled)


def last_error(text: str) -> str:
    """The exception that ends the last traceback in a log, and the deadlift line raising it."""
    lines = text[text.rindex("Traceback") :].splitlines() if "Traceback" in text else []
    errors = [line for line in lines if line and not line.startswith((" ", "Traceback"))]
    frames = [line.strip() for line in lines if "/deadlift/" in line and "File" in line]
    where = re.sub(r'File ".*/(deadlift/[^"]+)", line (\d+), in (\w+)', r"\1:\2 \3", frames[-1])
    return f"{errors[0] if errors else 'no traceback'} at {where if frames else '?'}"


def summary_line(soak: Soak, verdict: Verdict) -> str:
    counts = soak.faults.counts
    return (
        f"events={soak.args.events} lost={len(verdict.lost)} duplicated={verdict.duplicated} "
        f"dead_lettered={len(verdict.letters)} kills={counts['kill']} "
        f"sigterms={counts['sigterm']} server_restarts={counts['server_restart']} "
        f"hostile={len(soak.hostile)} seconds={soak.faults.seconds:.0f}"
    )


# -- the run --------------------------------------------------------------------------------


async def setup(js: JetStreamContext, settings: Settings) -> None:
    """Push the modules and apply the three workflows."""
    registry = await Registry.open(js)
    for name in ("add_ten", "multiply_by_five", "hostile"):
        await push_module_file(registry, MODULES / f"{name}.wasm")
    loaded = [(parse_workflow(text, source="soak.py"), "soak.py") for text in WORKFLOWS]
    await apply_workflows(js, registry, settings, loaded)


async def run(
    args: argparse.Namespace, server: Server, workers: Workers, faults: FaultLog
) -> tuple[bool, bool]:
    """The soak; return (every check passed, every worker behaved)."""
    settings = Settings(nats_url=server.url, ack_wait_s=args.ack_wait)
    nc = await bus.connect(settings, name="deadlift-soak")
    try:
        js = nc.jetstream()
        await setup(js, settings)
        run_id = f"soak{args.seed}-{os.getpid()}-{int(time.time())}"
        soak = Soak(args, run_id, nc, js, server, workers, faults, random.Random(args.seed))
        soak.consumers = await consumer_names(js)
        soak.replace_crashed()
        stop = asyncio.Event()
        fault_task = asyncio.create_task(inject_faults(soak, stop))
        try:
            await publish_events(nc, run_id, args.events, args.rate, soak.stats)
            faults.note("published", f"all {args.events} events acknowledged")
        finally:
            stop.set()
            await fault_task
        why_not = await wait_until_settled(soak)
        verdict = await judge(soak)
        await asyncio.to_thread(workers.stop_all)
        troubled = report_details(soak, verdict, why_not)
        print(summary_line(soak, verdict), flush=True)
        return verdict.ok, troubled == 0
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="good events to publish")
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault schedule")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (W)")
    parser.add_argument("--concurrency", type=int, default=8, help="per worker and step")
    parser.add_argument("--rate", type=float, default=50.0, help="events published per second")
    parser.add_argument(
        "--fault-interval",
        type=float,
        nargs=2,
        default=(2.0, 5.0),
        metavar=("MIN", "MAX"),
        help="seconds between faults, uniformly drawn",
    )
    parser.add_argument(
        "--ack-wait", type=float, default=10.0, help="consumer ack wait (DEADLIFT_ACK_WAIT_S)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait, once all is published, for every output and dead letter",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (store, logs)")
    parser.add_argument("--verbose", action="store_true", help="show the soak client's NATS log")
    args = parser.parse_args(argv)
    if args.events < 1 or args.workers < 1 or args.rate <= 0:
        parser.error("--events, --workers and --rate must be positive")
    return args


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    # The workers must create consumers with the same ack wait as the soak did.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "DEADLIFT_ACK_WAIT_S": str(args.ack_wait)}


def on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("deadlift.bus").setLevel(logging.CRITICAL)  # reconnect chatter
    work = Path(tempfile.mkdtemp(prefix="deadlift-soak-"))
    server = Server(work)
    workers = Workers(server.url, args.workers, args.concurrency, worker_env(args), work)
    faults = FaultLog()
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    ok = clean = False
    try:
        server.start()
        faults.note("server_start", f"pid={server.pid} {server.url} store {work / 'store'}")
        ok, clean = asyncio.run(run(args, server, workers, faults))
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SoakError, DeadliftError) as exc:
        print(f"soak failed to run: {exc}", file=sys.stderr)
        return 1
    finally:
        workers.stop_all()
        server.stop()
        if ok and clean and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
