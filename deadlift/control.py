"""Control-plane operations shared by the CLI, the demo and tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nats.js import JetStreamContext

from deadlift import bus
from deadlift.errors import ConfigError, ModuleError
from deadlift.registry import ModuleMeta, Registry
from deadlift.settings import Settings
from deadlift.workflow import Workflow, load_workflow


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
    subjects = [s for w, _ in resolved for s in w.event_subjects()]
    await bus.ensure_streams(js, settings, subjects)
    for workflow, _ in resolved:
        for step in workflow.steps:
            await bus.ensure_consumers(js, settings, workflow, step)
        await registry.put_workflow(workflow)
    return [w for w, _ in resolved]


async def apply_files(
    js: JetStreamContext, registry: Registry, settings: Settings, paths: Iterable[str | Path]
) -> list[Workflow]:
    """Load workflow files and apply them together."""
    loaded = [(load_workflow(p), str(p)) for p in paths]
    return await apply_workflows(js, registry, settings, loaded)
