"""What a step runner is handed, and what it reports: no runner sees its worker.

A :class:`StepContext` carries the runner's dependencies (JetStream, the one
publisher, the Wasm host, the executor, settings, the watchdog, the host
functions on offer, the report callback); a :class:`StepReport` says what
happened to one event at one step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from nats.js import JetStreamContext

from deadlift.bus.publisher import Publisher
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime.watchdog import Watchdog
from deadlift.settings import Settings
from deadlift.wasm.host import ModuleHost
from deadlift.wasm.hostfns import HostFunction
from deadlift.wire import events


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
    origin: str | None = None  # the org the run came from through an import, if any


Observer = Callable[[StepReport], None]


@dataclass(frozen=True, slots=True)
class StepContext:
    """Everything a :class:`~deadlift.runtime.step.StepRunner` needs, handed to it.

    Attributes:
        js: JetStream, for binding to the step's durable consumer.
        publisher: the one durable publisher (outputs and dead letters).
        host: the Wasm host running modules.
        executor: the threads module calls run in; ``threads`` of them.
        settings: limits, batches and timeouts.
        watchdog: notices module calls stuck past their deadline.
        functions: host functions on offer, by name (a step gets those it grants).
        stats: counts per outcome (``ok``, ``retry``…, ``duplicate``), shared.
        on_report: called with a :class:`StepReport` per event, or None (then none is built).
        orgs: the org manifest, when the worker has one: integrations (contracts,
            run records of guest modules) are held to it.
    """

    js: JetStreamContext
    publisher: Publisher
    host: ModuleHost
    executor: Executor
    threads: int
    settings: Settings
    watchdog: Watchdog
    functions: Mapping[str, HostFunction]
    concurrency: int
    stats: Counter[str]
    on_report: Callable[[StepReport], None] | None = None
    server: tuple[str, int] | None = None  # the NATS server connected to (telemetry)
    orgs: OrgManifest | None = None


def step_signature(workflow: Workflow | None, step: Step) -> Any:
    """What must stay equal for a running step to keep running unchanged."""
    if workflow is None:
        return None
    try:
        current = workflow.step(step.name)
    except KeyError:
        return None
    entry = current in workflow.entry_steps()
    return (current, tuple(workflow.trigger) if entry else ())


# Where a stream of this account, not a client, wrote a message (see deadlift.wire.events).
SERVER_RELAY_HEADERS = events.SERVER_RELAY_HEADERS
relayed_by_server = events.relayed_by_server


def provenance_headers(headers: Mapping[str, str] | None, origin: str | None) -> dict[str, str]:
    """A trigger's headers with its provenance as stamped on arrival.

    Kept in a dead letter, so a replay into the step's input keeps it. A foreign
    event (no ``ce-`` headers) stays foreign: one ``ce-`` header would make it invalid.
    """
    key = f"{events.PREFIX}{events.ORIGIN}"
    stamped = {k: v for k, v in (headers or {}).items() if k.lower() != key}
    if origin and any(k.lower().startswith(events.PREFIX) for k in stamped):
        stamped[key] = origin
    return stamped


def stamp_origin(event: events.Event, origin: str | None) -> events.Event:
    """The event with its provenance set to ``origin`` (None: the org's own).

    Whatever the event claimed is dropped: only where it arrived tells.
    """
    extensions = {k: v for k, v in event.extensions.items() if k != events.ORIGIN}
    if origin:
        extensions[events.ORIGIN] = origin
    return replace(event, extensions=extensions)
