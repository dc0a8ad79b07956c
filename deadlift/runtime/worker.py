"""The worker: runs the steps of the workflows it can see, any number of processes at once.

It loads the workflows from the registry, starts a :class:`~deadlift.runtime.step.StepRunner`
per step consumer, follows registry changes without a restart, and shuts down
cleanly. The step loop itself is in :mod:`deadlift.runtime.step`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict
from types import TracebackType
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ConsumerInfo

from deadlift import bus
from deadlift.bus.checks import ConsumerChecks
from deadlift.bus.identity import Identity, whoami
from deadlift.bus.integration_streams import ensure_integration_streams
from deadlift.bus.offers import guest_module_problem
from deadlift.bus.publisher import JetStreamPublisher
from deadlift.bus.registry import Registry
from deadlift.errors import DeadliftError
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime.advertise import advertise
from deadlift.runtime.builtins import BUILTINS
from deadlift.runtime.context import StepContext, StepReport, step_signature
from deadlift.runtime.services import StateBuckets, step_services
from deadlift.runtime.step import StepRunner
from deadlift.runtime.supervisor import supervised
from deadlift.runtime.threads import LentExecutor, collector_paused, quick_handoff
from deadlift.runtime.watchdog import Watchdog
from deadlift.settings import Settings
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostFunction
from deadlift.wasm.probe import probe_module

log = logging.getLogger("deadlift.worker")

# Steps started at once (each: consumers, a binary load, a bind): enough to overlap
# the round trips, few enough not to flood the server when thousands start.
START_CONCURRENCY = 16
LIST_CONSUMERS_FROM = 64  # steps starting at once from which the consumers are listed first


class Worker:
    """Runs the steps of the workflows it can see, until :meth:`shutdown`.

    Args:
        nc: a connected NATS client (the caller owns and closes it).
        settings: defaults for limits, batches and streams.
        workflows: ``org.name`` or ``name`` of workflows to run; empty means all.
        host_functions: host functions this worker offers, by name (built-ins are added).
        observers: called with a :class:`StepReport` after each event at each step.
        orgs: the org manifest, for the ``config_get`` / ``secret_get`` built-ins.
        advertise: register as a NATS micro service (``deadlift workers`` lists it).
        executor: run module calls on this executor (``threads`` of them) instead of a
            pool of its own; the worker does not shut it down.
    """

    def __init__(
        self,
        nc: Client,
        *,
        settings: Settings | None = None,
        workflows: Sequence[str] = (),
        host_functions: Mapping[str, HostFunction] | None = None,
        observers: Sequence[Callable[[StepReport], None]] = (),
        concurrency: int | None = None,
        threads: int | None = None,
        orgs: OrgManifest | None = None,
        advertise: bool = True,
        executor: Executor | None = None,
    ) -> None:
        self.nc = nc
        self.orgs = orgs
        self.js = nc.jetstream()
        self.settings = settings or Settings()
        self.selection = tuple(workflows)
        self.functions = {**BUILTINS, **(host_functions or {})}
        self.observers = list(observers)
        self.concurrency = concurrency or self.settings.concurrency
        self.host = ModuleHost()
        # Extism releases the GIL: a thread per core runs modules in parallel.
        self.threads = threads or self.settings.threads or min(8, max(2, os.cpu_count() or 2))
        # A lent executor (a fleet's, shared by the orgs of one process) is not shut
        # down with this worker: the lender's other workers still use it.
        self.executor: Executor = (
            LentExecutor(executor)
            if executor is not None
            else ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="deadlift-wasm")
        )
        # Module calls stuck past timeout + grace (nothing can interrupt them) make the
        # worker unhealthy and shut it down; `deadlift worker` sets on_stuck to exit.
        self.watchdog = Watchdog(
            grace_s=self.settings.watchdog_grace_s, phase_s=self.settings.probe_timeout_s
        )
        self.registry: Registry | None = None
        self.identity: Identity | None = None
        self._refused: set[str] = set()  # workflows refused for claiming another org
        self._runners: dict[tuple[str, str], list[StepRunner]] = {}
        # The steps running per workflow key: a change looks only at its workflow's
        # (the registry watch replays every workflow at start: 10,000 of them, each
        # scanning 30,000 runners, blocked the event loop until the server cut it off).
        self._running: dict[str, set[str]] = {}
        self.publisher = JetStreamPublisher(nc)
        self.state = StateBuckets(self.js, replicas=self.settings.stream_replicas)
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_stop = asyncio.Event()
        self._captured: set[str] = set()  # subjects this worker made sure a stream captures
        self._loading: dict[str, asyncio.Lock] = {}  # per module binary being loaded
        self._starting = False  # in start(): the steps' "started" lines are summed up
        self._trim_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._shutting_down = False
        self._lock = asyncio.Lock()
        self.stats: Counter[str] = Counter()
        self.advertise = advertise
        self.started_at = time.time()
        self.supervisor = supervised()  # set when `deadlift worker --processes N` started it
        self._service: Any = None

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    @property
    def steps(self) -> list[str]:
        """``org.workflow.step`` of every step running now."""
        return sorted(f"{k[0]}.{k[1]}" for k in self._runners)

    def describe(self) -> dict[str, Any]:
        """What this worker is doing: for ``deadlift workers`` and the micro service."""
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "orgs": sorted({k[0].split(".")[0] for k in self._runners}),
            "steps": self.steps,
            "modules": self.modules,
            "stats": dict(self.stats),
            "in_flight": self.in_flight,
            "consumers": sum(len(rs) for rs in self._runners.values()),
            "cold_consumers": self.cold_consumers,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 1),
            "healthy": self.watchdog.healthy,
            "problems": self.watchdog.problems,
            "supervisor": asdict(self.supervisor) if self.supervisor else None,
        }

    @property
    def in_flight(self) -> int:
        """Batches of events being processed now, over every step."""
        return sum(r.in_flight for rs in self._runners.values() for r in rs)

    @property
    def context(self) -> StepContext:
        """What this worker hands each step runner."""
        return StepContext(
            js=self.js,
            publisher=self.publisher,
            host=self.host,
            executor=self.executor,
            threads=self.threads,
            settings=self.settings,
            watchdog=self.watchdog,
            functions=self.functions,
            concurrency=self.concurrency,
            stats=self.stats,
            on_report=self.report if self.observers else None,
            server=_server_of(self.nc),
            orgs=self.orgs,
        )

    @property
    def modules(self) -> dict[str, str]:
        """``org.workflow.step`` → sha256 of the module it runs now."""
        return {f"{k[0]}.{k[1]}": rs[0].spec.sha256 for k, rs in self._runners.items()}

    async def start(self) -> None:
        """Load the workflows, start their steps, and follow registry changes."""
        self.watchdog.start(asyncio.get_running_loop(), self.shutdown)
        # Which org this worker is comes from its connection, never from a document.
        self.identity = await whoami(self.nc)
        if self.identity.single_tenant:
            log.warning(
                "single-tenant server (no accounts): this worker runs every org's workflows "
                "with their config and secrets; use one NATS account per org in production"
            )
        self.registry = await Registry.open(self.js, replicas=self.settings.stream_replicas)
        quick_handoff()  # module threads wait less for the GIL while the loop is busy
        # Every workflow at once: one stream update, steps started in parallel.
        self._starting = True
        try:
            with collector_paused():
                await self._reconcile_many({w.key: w for w in await self.registry.workflows()})
        finally:
            self._starting = False
        self._watch_task = asyncio.create_task(self._watch(), name="deadlift-registry-watch")
        # Pull requests and cold steps' subscriptions were renewed: cold steps check again.
        listeners = getattr(self.nc, "on_reconnect", None)
        if listeners is not None:
            listeners.append(self._wake_cold)
        self._trim_task = asyncio.create_task(self._trim(), name="deadlift-pool-trim")
        if self.advertise:
            self._service = await advertise(self.nc, self.describe)
        await self._ensure_integration_streams()

    async def _ensure_integration_streams(self) -> None:
        """Keep this org's integration streams: offers it hosts, run records it guests."""
        assert self.identity is not None
        org = self.orgs.org_of_account(self.identity.account) if self.orgs else None
        if self.orgs is None or org is None:
            return  # no manifest, or a single-tenant server: no accounts to cross
        try:
            await ensure_integration_streams(
                self.js, self.orgs, org, replicas=self.settings.stream_replicas
            )
        except (DeadliftError, nats.errors.Error, TimeoutError) as exc:
            log.warning("integration streams of org %s not ensured: %s", org, exc)

    async def drain(self, timeout: float = 30.0) -> None:
        """Return when no step of this worker has an event pending or in flight.

        For tests and batch jobs (finish deterministically instead of polling for
        outputs): every step consumer of this worker must show nothing pending,
        nothing awaiting an ack (retries waiting out their backoff count) and no
        batch in flight, twice in a row (an output stored between two reads shows
        as pending on the next step's consumer the second time).

        Raises:
            TimeoutError: work is still pending after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker still busy after {timeout:g} s (steps: {self.steps})")
            quiet = quiet + 1 if await self._idle_now() else 0
            await asyncio.sleep(0.02)

    async def _idle_now(self) -> bool:
        if self.in_flight:
            return False
        async with self._lock:
            bindings = [r.binding for rs in self._runners.values() for r in rs]
        for binding in bindings:
            if await bus.input_has_events(self.js, binding) or self.in_flight:
                return False
        return True

    async def run(self) -> None:
        """Start, then wait until :meth:`shutdown` completes."""
        await self.start()
        await self._closed.wait()

    async def run_until_shutdown(self) -> None:
        """Wait (after :meth:`start`) until :meth:`shutdown` completes."""
        await self._closed.wait()

    async def shutdown(self) -> None:
        """Stop pulling, finish in-flight events, and release resources (idempotent)."""
        if self._shutting_down:
            await self._closed.wait()
            return
        self._shutting_down = True
        with contextlib.suppress(AttributeError, ValueError):
            self.nc.on_reconnect.remove(self._wake_cold)  # type: ignore[attr-defined]
        if self._trim_task is not None:
            self._trim_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trim_task
        if self._watch_task is not None:
            # Ending the watch (its watcher stops: the iteration ends) does not rely
            # on the cancel alone: Python 3.11's wait_for can swallow a cancel that
            # lands as nats-py's subscribe completes, and the task would wait forever.
            self._watch_stop.set()
            self._watch_task.cancel()
            _, pending = await asyncio.wait({self._watch_task}, timeout=5.0)
            if pending:
                log.warning("the registry watch did not stop; shutting down without it")
        async with self._lock:
            runners = [r for group in self._runners.values() for r in group]
            self._runners.clear()
            self._running.clear()
        stopping = asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
        try:
            # 10,000 workflows: 30,000 steps stopping allocate as they go, and full
            # collections walking the serving's heap stalled the stop past its deadline.
            with collector_paused(freeze=False):
                await asyncio.wait_for(stopping, self.settings.shutdown_timeout_s)
        except TimeoutError:
            # Unacked events are redelivered to another worker after ack_wait.
            log.warning(
                "in-flight events did not finish within %.0f s; leaving them for redelivery",
                self.settings.shutdown_timeout_s,
            )
        await ConsumerChecks.of(self.js).close()  # its inbox subscription
        # Answer `deadlift workers` / `health --worker` until now: a worker shut down
        # by its watchdog reports why (unhealthy, the stuck step) while it stops.
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.watchdog.stop()
        self._closed.set()

    def _wake_cold(self) -> None:
        # Every cold step checks at once: their checks are answered together (listings).
        for runner in (r for rs in self._runners.values() for r in rs):
            if runner.puller is not None:
                runner.puller.recheck()

    @property
    def cold_consumers(self) -> int:
        """Step consumers waiting cold (no pull request: an event rings them)."""
        return sum(
            1 for rs in self._runners.values() for r in rs if r.puller is not None and r.puller.cold
        )

    async def _trim(self) -> None:
        """Give back the instances of steps that went quiet (memory): once a second
        while instances are held, not at all while none is."""
        loop, held = asyncio.get_running_loop(), asyncio.Event()

        def holding() -> None:  # on the thread that returned an instance
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(held.set)

        while True:
            held.clear()
            if self.host.when_holding(holding):
                await held.wait()
            await asyncio.sleep(1.0)
            self.host.trim(idle_for=2.0)

    def _selected(self, workflow: Workflow) -> bool:
        return not self.selection or bool({workflow.key, workflow.name} & set(self.selection))

    def _admitted(self, workflow: Workflow) -> bool:
        """Whether the workflow belongs to this worker's org (whatever client stored it)."""
        assert self.identity is not None
        if self.identity.admits(workflow.org):
            self._refused.discard(workflow.key)
            return True
        if workflow.key not in self._refused:
            self._refused.add(workflow.key)
            log.error(
                "workflow %s not run: it claims org %r but this worker connects as NATS "
                "account %s; an org's workflows run only with that org's credentials",
                workflow.key,
                workflow.org,
                self.identity.account,
            )
        return False

    async def _watch(self) -> None:
        assert self.registry is not None
        while not self._shutting_down:
            try:
                async for key, workflow in self.registry.watch_workflows(self._watch_stop):
                    await self._reconcile(key, workflow)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep watching through reconnects
                log.warning("registry watch interrupted (%s); resuming", exc)
                await asyncio.sleep(1.0)

    async def _reconcile(self, key: str, workflow: Workflow | None) -> None:
        """Make the running steps of workflow ``key`` match ``workflow`` (None: removed)."""
        await self._reconcile_many({key: workflow})

    async def _reconcile_many(self, changes: Mapping[str, Workflow | None]) -> None:
        """Make the running steps of each workflow match it (None: removed).

        Only what changed is touched: a workflow whose steps all run unchanged
        costs a comparison (the registry watch replays every workflow on start).
        New steps start in parallel, at most :data:`START_CONCURRENCY` at once.
        """
        async with self._lock:
            if self._shutting_down:
                return
            wanted: dict[tuple[str, str], tuple[Workflow, Step]] = {}
            for key, workflow in changes.items():
                if workflow is not None and self._selected(workflow) and self._admitted(workflow):
                    wanted.update({(key, s.name): (workflow, s) for s in workflow.steps})
            running = [(key, name) for key in changes for name in self._running.get(key, ())]
            stale = [
                k
                for k in running
                if k not in wanted
                or self._runners[k][0].signature
                != step_signature(changes[k[0]], self._runners[k][0].step)
            ]
            for key, name in stale:
                self._running[key].discard(name)
            if stale:
                await asyncio.gather(*(r.stop() for k in stale for r in self._runners.pop(k)))
                # What a stopped step leaves may be frozen (see collector_paused): the
                # collector may take it now (its next full collection walks the heap).
                gc.unfreeze()
            missing = {k: v for k, v in wanted.items() if k not in self._runners}
            if not missing:
                return
            ready = await self._ensure_streams({w.key: w for w, _ in missing.values()})
            existing = await self._consumers_of(missing.values())
            slots = asyncio.Semaphore(START_CONCURRENCY)

            async def start(k: tuple[str, str], workflow: Workflow, step: Step) -> None:
                async with slots:
                    runners = await self._start_step(workflow, step, existing)
                if runners:
                    self._runners[k] = runners
                    self._running.setdefault(k[0], set()).add(k[1])

            await asyncio.gather(
                *(start(k, w, s) for k, (w, s) in missing.items() if w.key in ready)
            )
            started = [k for k in missing if k in self._runners]
            if len(started) > 1:
                flows = len({k[0] for k in started})
                log.info("started %d step(s) of %d workflow(s)", len(started), flows)

    async def _consumers_of(
        self, steps: Iterable[tuple[Workflow, Step]]
    ) -> Mapping[tuple[str, str], ConsumerInfo] | None:
        """The consumers already there, when starting many steps (a listing costs a
        request per 256 consumers of the stream, a step's check one per consumer); None
        when not listed (then each step asks for its own: {} would say none exists)."""
        steps = list(steps)
        if len(steps) < LIST_CONSUMERS_FROM:
            return None
        streams = {i.stream for w, s in steps for i in bus.step_inputs(w, s)}
        try:
            found = await bus.list_consumers(self.js, streams)
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("listing consumers failed (%s): each step checks its own", exc)
            return None
        # How long a listing of each stream is: the steps' checks list it when many ask.
        ConsumerChecks.of(self.js).note_sizes(Counter(stream for stream, _ in found))
        return found

    async def _ensure_streams(self, workflows: Mapping[str, Workflow]) -> set[str]:
        """Capture the workflows' subjects (once each); return the keys of those captured."""
        todo = {k: w for k, w in workflows.items() if not set(_capture_keys(w)) <= self._captured}
        if todo:
            try:  # one update of each stream for all of them
                await self._ensure_streams_of(list(todo.values()))
            except DeadliftError:
                for key, workflow in todo.items():  # find the one that cannot be captured
                    try:
                        await self._ensure_streams_of([workflow])
                    except DeadliftError as exc:
                        log.error("workflow %s not started: %s", key, exc)
        return {k for k, w in workflows.items() if set(_capture_keys(w)) <= self._captured}

    async def _ensure_streams_of(self, workflows: list[Workflow]) -> None:
        imported: dict[str, list[str]] = {}
        for workflow in workflows:
            for exporter, triggers in workflow.imported_triggers().items():
                imported.setdefault(exporter, []).extend(triggers)
        subjects = [s for w in workflows for s in w.event_subjects()]
        await bus.ensure_streams(self.js, self.settings, subjects, imported)
        self._captured.update(s for w in workflows for s in _capture_keys(w))

    async def _start_step(
        self,
        workflow: Workflow,
        step: Step,
        existing: Mapping[tuple[str, str], ConsumerInfo] | None = None,
    ) -> list[StepRunner]:
        where = f"workflow {workflow.key} step {step.name!r}"
        missing = sorted(set(step.host_functions) - set(self.functions))
        if missing:
            log.error(
                "%s not started: it grants host functions %s that this worker does not offer; "
                "start the worker with --host-functions PACKAGE.MODULE",
                where,
                ", ".join(missing),
            )
            return []
        if not step.module_sha256:
            log.error(
                "%s not started: module not resolved; apply it with `deadlift workflow apply`",
                where,
            )
            return []
        try:
            assert self.registry is not None
            # A guest's module runs only as accepted and signed by its owner, checked
            # on every load against the manifest's key, before the binary is touched.
            refusal = await guest_module_problem(self.registry, self.orgs, workflow, step)
            if refusal:
                log.error("%s not started: %s", where, refusal)
                return []
            # One load per binary, however many steps starting at once run it.
            async with self._loading.setdefault(step.module_sha256, asyncio.Lock()):
                if not self.host.has_binary(step.module_sha256):
                    wasm = await self.registry.binary(step.module_sha256)
                    # Instantiation runs its start function, unbounded: try it in a child first.
                    what = f"module {step.module} (sha256 {step.module_sha256[:12]})"
                    pages = step.max_memory_pages or self.settings.default_max_pages
                    await probe_module(
                        wasm, max_pages=pages, timeout_s=self.settings.probe_timeout_s, what=what
                    )
                    self.host.add_binary(step.module_sha256, wasm)
            spec = PluginSpec(
                sha256=step.module_sha256,
                org=workflow.org,
                # Instances are pooled per step: no module state crosses workflows,
                # steps or orgs, even when they run the same binary.
                workflow=workflow.name,
                step=step.name,
                timeout_ms=step.timeout_ms or self.settings.default_timeout_ms,
                max_pages=step.max_memory_pages or self.settings.default_max_pages,
                host_functions=tuple(sorted(step.host_functions)),
                config=tuple(sorted(step.config.items())),
                max_output_bytes=self.settings.max_output_bytes,
                allowed_hosts=tuple(step.allowed_hosts),
            )
            if self.host.compiled(spec):  # the common case at scale: no thread hop
                self.host.prepare(spec)
            else:  # compiling takes a while: off the event loop
                await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.host.prepare, spec
                )
            bindings = await bus.ensure_consumers(self.js, self.settings, workflow, step, existing)
            services = await step_services(
                workflow,
                step,
                publisher=self.publisher,
                settings=self.settings,
                orgs=self.orgs,
                state=self.state,
            )
        except DeadliftError as exc:
            log.error("%s not started: %s", where, exc)
            return []
        context = self.context
        runners = [StepRunner(context, workflow, step, spec, b, services) for b in bindings]
        for runner in runners:
            await runner.start()
        # One line per step for a reload; thousands at start are summed up instead.
        log.log(
            logging.DEBUG if self._starting else logging.INFO,
            "started %s (module %s)",
            where,
            step.module,
        )
        return runners

    def report(self, report: StepReport) -> None:
        """Pass a report to every observer; an observer's error never stops a step."""
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.exception("observer failed")


def _capture_keys(workflow: Workflow) -> list[str]:
    """What a workflow needs captured: its own subjects, and each import's triggers."""
    imported = workflow.imported_triggers().items()
    return [*workflow.event_subjects(), *(f"{e}:{t}" for e, ts in imported for t in ts)]


def _server_of(nc: Client) -> tuple[str, int] | None:
    """The host and port of the server ``nc`` is connected to, if known."""
    url = nc.connected_url
    if url is None or url.hostname is None:
        return None
    return url.hostname, url.port or 4222
