"""Control-plane operations shared by the CLI, the demo and tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nats.js import JetStreamContext

from deadlift import bus
from deadlift.errors import ConfigError, ModuleError, NotFoundError
from deadlift.registry import ModuleMeta, Registry
from deadlift.settings import Settings
from deadlift.workflow import Step, Workflow, load_workflow


async def push_module_file(
    registry: Registry,
    path: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    codec: str = "json",
    timeout_ms: int | None = None,
    max_memory_pages: int | None = None,
) -> tuple[ModuleMeta, bool]:
    """Push a ``.wasm`` file; the module name defaults to the file's stem."""
    path = Path(path)
    try:
        wasm = path.read_bytes()
    except OSError as exc:
        raise ModuleError(f"{path}: cannot read module: {exc.strerror}") from None
    return await registry.push_module(
        wasm,
        name=name or path.stem.replace(".", "_"),
        version=version,
        codec=codec,
        timeout_ms=timeout_ms,
        max_memory_pages=max_memory_pages,
        source=str(path),
    )


async def apply_workflows(
    js: JetStreamContext,
    registry: Registry,
    settings: Settings,
    workflows: Iterable[tuple[Workflow, str]],
) -> list[Workflow]:
    """Validate workflows against the registry, then create streams, consumers, and store them.

    Nothing is stored unless every workflow is valid.
    """
    resolved = [(await registry.resolve_workflow(w, source=src), src) for w, src in workflows]
    keys = [w.key for w, _ in resolved]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise ConfigError(f"workflow {', '.join(sorted(duplicates))} is defined more than once")
    for workflow, source in resolved:
        check_redelivery_horizon(workflow, settings, source=source)
        if settings.org and workflow.org != settings.org:
            raise ConfigError(
                f"{source}: org: the workflow belongs to {workflow.org!r} but you act as org "
                f"{settings.org!r}; apply it with --org {workflow.org}"
            )
    subjects = [s for w, _ in resolved for s in w.event_subjects()]
    await bus.ensure_streams(js, settings, subjects)
    for workflow, _ in resolved:
        for step in workflow.steps:
            await bus.ensure_consumers(js, settings, workflow, step)
        previous = await _stored(registry, workflow.key)
        await registry.put_workflow(workflow)
        if previous is not None:
            # Steps that left the workflow: workers stop them (finishing in-flight
            # events); their consumers, and any backlog only they would read, go.
            current = {s.name for s in workflow.steps}
            for step in previous.steps:
                if step.name not in current:
                    await bus.delete_consumers(js, previous, step)
    return [w for w, _ in resolved]


async def _stored(registry: Registry, key: str) -> Workflow | None:
    try:
        return await registry.workflow(key)
    except NotFoundError:
        return None


async def remove_workflow(js: JetStreamContext, registry: Registry, name: str) -> Workflow:
    """Remove a workflow: workers stop its steps, its consumers are deleted."""
    workflow = await registry.workflow(name)
    await registry.delete_workflow(workflow.key)
    for step in workflow.steps:
        await bus.delete_consumers(js, workflow, step)
    return workflow


def redelivery_horizon(step: Step, settings: Settings) -> float:
    """Longest time, in seconds, between a step's first publish of an output and a re-publish.

    An output is published again only when its input is delivered again: after
    a worker died (ack_wait later) or after a failed attempt (the backoff later).
    Each of the ``max_attempts - 1`` gaps lasts at most the longer of the two,
    plus one call.
    """
    timeout_s = (step.timeout_ms or settings.default_timeout_ms) / 1000
    gaps = range(1, step.retry.max_attempts)
    return sum(max(settings.ack_wait_s, step.retry.delay(i)) + timeout_s + 1.0 for i in gaps)


def check_redelivery_horizon(workflow: Workflow, settings: Settings, *, source: str) -> None:
    """Refuse a step whose retries could re-publish an output after the duplicate window.

    Outputs are exactly-once only while a re-publish falls inside the streams'
    duplicate window (``DEADLIFT_DUPLICATE_WINDOW_S``).
    """
    window = settings.duplicate_window_s
    for step in workflow.steps:
        horizon = redelivery_horizon(step, settings)
        if horizon >= window:
            raise ConfigError(
                f"{source}: step {step.name!r}: retry: attempts could re-publish an output "
                f"{horizon:.0f} s after the first try, beyond the {window:.0f} s duplicate "
                "window, so an output could be stored twice; lower retry.max_attempts, "
                "retry.backoff or timeout_ms, or raise DEADLIFT_DUPLICATE_WINDOW_S"
            )


async def apply_files(
    js: JetStreamContext, registry: Registry, settings: Settings, paths: Iterable[str | Path]
) -> list[Workflow]:
    """Load workflow files and apply them together."""
    loaded = [(load_workflow(p), str(p)) for p in paths]
    return await apply_workflows(js, registry, settings, loaded)
