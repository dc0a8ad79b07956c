"""The worker: runs workflow steps from durable consumers, any number of processes at once.

Per step: pull a batch → decode the event → call the module (in a thread: Extism
releases the GIL) → publish the output to the next steps and publish subjects
with a deterministic ``Nats-Msg-Id`` → await the PubAcks → ack. A crash anywhere
before the ack redelivers the event; the re-published output is dropped by the
stream's duplicate window, so each output is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StorageType

from deadlift import bus, dlq, events
from deadlift.builtins import (
    BUILTINS,
    CONFIG_SERVICE,
    EMIT_SERVICE,
    SECRETS_SERVICE,
    STATE_SERVICE,
    EmitTarget,
    state_bucket,
)
from deadlift.errors import DeadliftError, EventDecodeError, EventEncodeError, StepError
from deadlift.orgs import OrgManifest
from deadlift.registry import Registry
from deadlift.settings import Settings
from deadlift.wasm.codecs import from_module, to_module
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall, HostFunction
from deadlift.workflow import Step, Workflow, step_subject

log = logging.getLogger("deadlift.worker")

FETCH_TIMEOUT_S = 1.0  # also bounds how long shutdown waits for a fetch to return


@dataclass(frozen=True, slots=True)
class StepReport:
    """What happened to one event at one step (passed to observers)."""

    org: str
    workflow: str
    step: str
    module: str
    run: str
    event_id: str
    outcome: str  # ok | filtered | retry | dead
    latency_ms: float
    attempt: int
    output: Any = None
    targets: tuple[str, ...] = ()
    error: str | None = None
    error_kind: str | None = None


Observer = Callable[[StepReport], None]


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
    """

    def __init__(
        self,
        nc: Client,
        *,
        settings: Settings | None = None,
        workflows: Sequence[str] = (),
        host_functions: Mapping[str, HostFunction] | None = None,
        observers: Sequence[Observer] = (),
        concurrency: int | None = None,
        threads: int = 4,
        orgs: OrgManifest | None = None,
        advertise: bool = True,
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
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deadlift-wasm")
        self.registry: Registry | None = None
        self._runners: dict[tuple[str, str], list[StepRunner]] = {}
        self._state: dict[str, Any] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._shutting_down = False
        self._lock = asyncio.Lock()
        self.stats: Counter[str] = Counter()
        self.advertise = advertise
        self.started_at = time.time()
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
            "in_flight": sum(len(r._inflight) for rs in self._runners.values() for r in rs),
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    @property
    def modules(self) -> dict[str, str]:
        """``org.workflow.step`` → sha256 of the module it runs now."""
        return {f"{k[0]}.{k[1]}": rs[0].spec.sha256 for k, rs in self._runners.items()}

    async def start(self) -> None:
        """Load the workflows, start their steps, and follow registry changes."""
        self.registry = await Registry.open(self.js)
        for workflow in await self.registry.workflows():
            await self._reconcile(workflow.key, workflow)
        self._watch_task = asyncio.create_task(self._watch(), name="deadlift-registry-watch")
        if self.advertise:
            from deadlift.monitor import advertise

            self._service = await advertise(self)

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
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        async with self._lock:
            runners = [r for group in self._runners.values() for r in group]
            self._runners.clear()
        stopping = asyncio.gather(*(r.stop() for r in runners), return_exceptions=True)
        try:
            await asyncio.wait_for(stopping, self.settings.shutdown_timeout_s)
        except TimeoutError:
            # Unacked events are redelivered to another worker after ack_wait.
            log.warning(
                "in-flight events did not finish within %.0f s; leaving them for redelivery",
                self.settings.shutdown_timeout_s,
            )
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._closed.set()

    def _selected(self, workflow: Workflow) -> bool:
        return not self.selection or bool({workflow.key, workflow.name} & set(self.selection))

    async def _watch(self) -> None:
        assert self.registry is not None
        while not self._shutting_down:
            try:
                async for key, workflow in self.registry.watch_workflows():
                    await self._reconcile(key, workflow)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep watching through reconnects
                log.warning("registry watch interrupted (%s); resuming", exc)
                await asyncio.sleep(1.0)

    async def _reconcile(self, key: str, workflow: Workflow | None) -> None:
        """Make the running steps of workflow ``key`` match ``workflow`` (None: removed)."""
        async with self._lock:
            if self._shutting_down:
                return
            wanted: dict[tuple[str, str], Step] = {}
            if workflow is not None and self._selected(workflow):
                wanted = {(key, s.name): s for s in workflow.steps}
            stale = [
                k
                for k, rs in self._runners.items()
                if k[0] == key
                and (k not in wanted or rs[0].signature != _signature(workflow, rs[0].step))
            ]
            for k in stale:
                await asyncio.gather(*(r.stop() for r in self._runners.pop(k)))
            if workflow is None or not wanted:
                return
            try:
                await bus.ensure_streams(self.js, self.settings, workflow.event_subjects())
            except DeadliftError as exc:
                log.error("workflow %s not started: %s", key, exc)
                return
            for k, step in wanted.items():
                if k not in self._runners:
                    runners = await self._start_step(workflow, step)
                    if runners:
                        self._runners[k] = runners

    async def _start_step(self, workflow: Workflow, step: Step) -> list[StepRunner]:
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
            if not self.host.has_binary(step.module_sha256):
                wasm = await self.registry.binary(step.module_sha256)
                self.host.add_binary(step.module_sha256, wasm)
            spec = PluginSpec(
                sha256=step.module_sha256,
                org=workflow.org,
                timeout_ms=step.timeout_ms or self.settings.default_timeout_ms,
                max_pages=step.max_memory_pages or self.settings.default_max_pages,
                host_functions=tuple(sorted(step.host_functions)),
                config=tuple(sorted(step.config.items())),
                max_output_bytes=self.settings.max_output_bytes,
                allowed_hosts=tuple(step.allowed_hosts),
            )
            await asyncio.get_running_loop().run_in_executor(self.executor, self.host.prepare, spec)
            bindings = await bus.ensure_consumers(self.js, self.settings, workflow, step)
            services = await self._services(workflow, step)
        except DeadliftError as exc:
            log.error("%s not started: %s", where, exc)
            return []
        runners = [StepRunner(self, workflow, step, spec, b, services) for b in bindings]
        for runner in runners:
            await runner.start()
        log.info("started %s (module %s)", where, step.module)
        return runners

    async def _services(self, workflow: Workflow, step: Step) -> dict[str, Any]:
        """What the built-in host functions of one step work with, scoped to its org."""
        org = workflow.org
        services: dict[str, Any] = {
            EMIT_SERVICE: EmitTarget(tuple(step.emit), self._emitter(workflow, step)),
        }
        if self.orgs is not None and org in self.orgs.orgs:
            declared = self.orgs.orgs[org]
            services[CONFIG_SERVICE] = dict(declared.config)
            services[SECRETS_SERVICE] = {k: v.resolve(k) for k, v in declared.secrets.items()}
        if any(name.startswith("kv_") for name in step.host_functions):
            services[STATE_SERVICE] = await self._state_bucket(org)
        return services

    def _emitter(self, workflow: Workflow, step: Step) -> Any:
        source = f"deadlift://{workflow.org}/{workflow.name}/{step.name}"

        async def publish(call: HostCall, subject: str, data: Any) -> None:
            call.emitted += 1
            event = events.Event(
                data=data,
                # Deterministic: a retried call emits with the same ids (deduplicated).
                id=events.derive_id(call.event_id, workflow.key, step.name, str(call.emitted)),
                source=source,
                type=f"deadlift.{workflow.org}.{workflow.name}.{step.name}.emit",
                time=events.now_rfc3339(),
                extensions={
                    events.RUN: call.run,
                    events.ORG: workflow.org,
                    events.WORKFLOW: workflow.name,
                    events.STEP: step.name,
                },
            )
            headers, body = events.encode(event)
            headers[events.MSG_ID] = f"{event.id}:{subject}"
            await bus.publish(self.js, self.nc, subject, body, headers)

        return publish

    async def _state_bucket(self, org: str) -> Any:
        if org not in self._state:
            bucket = state_bucket(org)
            try:
                self._state[org] = await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                self._state[org] = await self.js.create_key_value(
                    config=KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE)
                )
        return self._state[org]

    def report(self, report: StepReport) -> None:
        """Pass a report to every observer; an observer's error never stops a step."""
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.exception("observer failed")


async def _settle(action: Awaitable[Any], what: str) -> None:
    """Ack/nak/term/in_progress without letting a lost connection crash the step.

    If the server never hears it, the event is redelivered after ack_wait and
    its outputs are deduplicated: nothing is lost.
    """
    try:
        await action
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        log.warning("%s failed (%s); the event will be redelivered", what, exc)


def _signature(workflow: Workflow | None, step: Step) -> Any:
    """What must stay equal for a running step to keep running unchanged."""
    if workflow is None:
        return None
    try:
        current = workflow.step(step.name)
    except KeyError:
        return None
    entry = current in workflow.entry_steps()
    return (current, tuple(workflow.trigger) if entry else ())


class StepRunner:
    """Pulls one step's events from its consumer and runs them, bounded in flight."""

    def __init__(
        self,
        worker: Worker,
        workflow: Workflow,
        step: Step,
        spec: PluginSpec,
        binding: bus.StepBinding,
        services: dict[str, Any],
    ) -> None:
        self.worker = worker
        self.workflow = workflow
        self.step = step
        self.spec = spec
        self.binding = binding
        self.services = services
        self.signature = _signature(workflow, step)
        self.concurrency = step.concurrency or worker.concurrency
        self.granted = {n: worker.functions[n] for n in step.host_functions}
        self.source = f"deadlift://{workflow.org}/{workflow.name}/{step.name}"
        self.type = f"deadlift.{workflow.org}.{workflow.name}.{step.name}"
        self.targets = [
            *(step_subject(workflow.org, workflow.name, n) for n in step.next),
            *step.publish,
        ]
        self._inflight: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        """Bind to the durable consumer and start pulling."""
        self._sub = await self.worker.js.pull_subscribe_bind(
            durable=self.binding.consumer, stream=self.binding.stream
        )
        self._task = asyncio.create_task(
            self._loop(), name=f"deadlift-step-{self.binding.consumer}"
        )

    async def stop(self) -> None:
        """Stop pulling and wait for in-flight events to finish (acked or nak'd)."""
        self._stopping = True
        self._room.set()
        if self._task is not None:
            await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._sub is not None:
            await self._hand_back()
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _hand_back(self) -> None:
        """Nak messages that reached this runner after it stopped pulling.

        A pull request can still deliver a message just after the last fetch
        returned. Left alone it would wait out ack_wait before redelivery; a nak
        hands it to the next worker (or the replacement runner) at once.
        """
        await asyncio.sleep(0.05)
        inner = getattr(self._sub, "_sub", None)
        queue = getattr(inner, "_pending_queue", None)  # nats-py internals, best effort
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if getattr(msg, "reply", None) and str(msg.reply).startswith("$JS.ACK."):
                await _settle(msg.nak(), "nak")

    async def _loop(self) -> None:
        batch = self.worker.settings.fetch_batch
        while not self._stopping:
            room = self.concurrency - len(self._inflight)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(batch, room), timeout=FETCH_TIMEOUT_S)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                return
            except Exception as exc:  # reconnecting, no responders…: retry shortly
                log.warning("fetch for %s failed: %s", self.binding.consumer, exc)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "step %s crashed on an event", self.binding.consumer, exc_info=task.exception()
            )

    async def _handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        meta = msg.metadata
        attempt = meta.num_delivered or 1
        seq = meta.sequence.stream if meta.sequence else 0
        try:
            event = events.decode(
                msg.headers,
                msg.data,
                fallback_id=events.derive_id(meta.stream or "", str(seq)),
                fallback_source=f"nats:{msg.subject}",
            )
        except EventDecodeError as exc:
            await self._fail(
                msg, None, attempt, started, StepError(str(exc), kind="decode", retryable=False)
            )
            return
        if attempt > self.step.retry.max_attempts:
            error = StepError(
                f"delivered {attempt} times without completing (worker crashes or ack timeouts)",
                kind="exhausted",
                retryable=False,
            )
            await self._fail(msg, event, attempt, started, error)
            return
        heartbeat = self._keep_alive(msg)
        try:
            output = await self._call(event)
            targets = () if output is None else await self._publish(event, output)
        except StepError as exc:
            await self._fail(msg, event, attempt, started, exc)
            return
        except (TimeoutError, DeadliftError, nats.errors.Error) as exc:
            # NATS trouble while publishing: try again later, the output is deduplicated.
            error = StepError(f"publish failed: {exc or type(exc).__name__}", kind="publish")
            await self._fail(msg, event, attempt, started, error)
            return
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
        await _settle(msg.ack(), "ack")
        outcome = "filtered" if output is None else "ok"
        self._report(event, outcome, started, attempt, output=output, targets=targets)

    def _keep_alive(self, msg: Msg) -> asyncio.Task[None] | None:
        """Keep a call that may outlast ack_wait from being redelivered meanwhile."""
        interval = self.binding.ack_wait / 2
        if self.spec.timeout_ms / 1000 + 1.0 < interval:
            return None  # the call will be done long before the server would redeliver

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                await _settle(msg.in_progress(), "in_progress")

        return asyncio.create_task(beat())

    async def _call(self, event: events.Event) -> Any:
        codec = self.step.codec or "json"
        try:
            data = to_module(event.data, codec)
        except EventEncodeError as exc:
            raise StepError(str(exc), kind="encode", retryable=False) from None
        context = HostCall(
            org=self.workflow.org,
            workflow=self.workflow.name,
            step=self.step.name,
            run=event.run,
            event_id=event.id,
            granted=self.granted,
            loop=asyncio.get_running_loop(),
            services=self.services,
        )
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(
            self.worker.executor,
            self.worker.host.call,
            self.spec,
            self.step.function,
            data,
            context,
        )
        return from_module(raw, codec)

    async def _publish(self, event: events.Event, output: Any) -> tuple[str, ...]:
        out = events.Event(
            data=output,
            id=events.derive_id(event.source, event.id, self.workflow.key, self.step.name),
            source=self.source,
            type=self.type,
            time=events.now_rfc3339(),
            extensions={
                events.RUN: event.run,
                events.ORG: self.workflow.org,
                events.WORKFLOW: self.workflow.name,
                events.STEP: self.step.name,
            },
            traceparent=event.traceparent,
        )
        try:
            headers, body = events.encode(out)
        except EventEncodeError as exc:
            raise StepError(str(exc), kind="encode", retryable=False) from None
        js, nc = self.worker.js, self.worker.nc
        acks = []
        for subject in self.targets:
            message_headers = {**headers, events.MSG_ID: f"{out.id}:{subject}"}
            try:
                bus.check_size(nc, subject, message_headers, body)
            except DeadliftError as exc:
                raise StepError(str(exc), kind="output_too_large", retryable=False) from None
            acks.append(await js.publish_async(subject, body, headers=message_headers))
        for ack in acks:
            result = await asyncio.wait_for(ack, timeout=10.0)
            if result.duplicate:  # published before (a redelivery): stored once all the same
                self.worker.stats["duplicate"] += 1
        return tuple(self.targets)

    async def _fail(
        self,
        msg: Msg,
        event: events.Event | None,
        attempt: int,
        started: float,
        error: StepError,
    ) -> None:
        retry = self.step.retry
        if error.retryable and attempt < retry.max_attempts:
            await _settle(msg.nak(delay=retry.delay(attempt)), "nak")
            self._report(event, "retry", started, attempt, error=error)
            return
        meta = msg.metadata
        try:
            await dlq.record(
                self.worker.js,
                self.worker.nc,
                org=self.workflow.org,
                workflow=self.workflow.name,
                step=self.step.name,
                module=self.spec.sha256,
                subject=msg.subject,
                headers=msg.headers,
                body=msg.data,
                stream=meta.stream or "",
                seq=meta.sequence.stream if meta.sequence else 0,
                attempts=attempt,
                kind=error.kind,
                error=str(error),
            )
        except Exception as exc:  # never lose it: let it come back
            log.error("dead-lettering failed for %s (%s); will retry", self.binding.consumer, exc)
            await _settle(msg.nak(delay=1.0), "nak")
            return
        await _settle(msg.term(), "term")
        log.warning(
            "event %s dead-lettered at %s after %d attempt(s): [%s] %s",
            event.id if event else "?",
            self.binding.consumer,
            attempt,
            error.kind,
            error,
        )
        self._report(event, "dead", started, attempt, error=error)

    def _report(
        self,
        event: events.Event | None,
        outcome: str,
        started: float,
        attempt: int,
        *,
        output: Any = None,
        targets: tuple[str, ...] = (),
        error: StepError | None = None,
    ) -> None:
        self.worker.stats[outcome] += 1
        if not self.worker.observers:
            return
        self.worker.report(
            StepReport(
                org=self.workflow.org,
                workflow=self.workflow.name,
                step=self.step.name,
                module=self.step.module,
                run=event.run if event else "",
                event_id=event.id if event else "",
                outcome=outcome,
                latency_ms=(time.perf_counter() - started) * 1000,
                attempt=attempt,
                output=output,
                targets=targets,
                error=str(error) if error else None,
                error_kind=error.kind if error else None,
            )
        )
