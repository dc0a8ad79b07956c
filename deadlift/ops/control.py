"""Control-plane operations shared by the CLI, the demo and tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext

from deadlift import bus
from deadlift.bus.identity import Identity, whoami
from deadlift.bus.registry import ModuleMeta, Registry
from deadlift.errors import ConfigError, ModuleError
from deadlift.model import names
from deadlift.model.contracts import check_workflow
from deadlift.model.orgs import OrgManifest, load_orgs
from deadlift.model.workflow import (
    Step,
    TriggerStart,
    Workflow,
    check_org_graph,
    load_workflow,
    subject_covers,
    subjects_overlap,
)
from deadlift.runtime.http_policy import parse_allowed_host
from deadlift.settings import Settings

# Consumer create/update requests in flight at once during an apply.
CONSUMER_REQUESTS = 32


async def push_module_file(
    registry: Registry,
    path: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    codec: str = "json",
    timeout_ms: int | None = None,
    max_memory_pages: int | None = None,
    probe_timeout_s: float | None = None,
) -> tuple[ModuleMeta, bool]:
    """Push a ``.wasm`` file; the module name defaults to the file's stem.

    The binary is instantiated in a child process first, killed after
    ``probe_timeout_s`` (default ``DEADLIFT_PROBE_TIMEOUT_S``): a start function
    that loops or crashes is refused with a ModuleError, never a hang or a crash.
    """
    path = Path(path)
    try:
        wasm = path.read_bytes()
    except OSError as exc:
        raise ModuleError(f"{path}: cannot read module: {exc.strerror}") from None
    if name is None:
        name = path.stem.replace(".", "_")
        try:
            names.check_name(name, field=f"{path}: module name (from the file name)")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; or name the module with --name") from None
    return await registry.push_module(
        wasm,
        name=name,
        version=version,
        codec=codec,
        timeout_ms=timeout_ms,
        max_memory_pages=max_memory_pages,
        source=str(path),
        probe_timeout_s=probe_timeout_s or Settings().probe_timeout_s,
    )


async def module_users(registry: Registry, sha256: str) -> list[str]:
    """The steps (``ORG.NAME/STEP``) of applied workflows that run the binary ``sha256``."""
    return [
        f"{w.key}/{s.name}"
        for w in await registry.workflows()
        for s in w.steps
        if s.module_sha256 == sha256
    ]


async def module_info(registry: Registry, ref: str) -> dict[str, Any]:
    """A module (``NAME``, ``NAME@VERSION`` or ``sha256:HEX``) as ``module inspect`` shows it.

    Its metadata, the steps using it (``used_by``) and every version of its name.

    Raises:
        NotFoundError: no such module or version.
    """
    meta = await registry.resolve(ref)
    return {
        **meta.model_dump(),
        "used_by": await module_users(registry, meta.sha256),
        "versions": [m.version for m in await registry.versions(meta.name, owner=meta.owner)],
    }


async def apply_workflows(
    js: JetStreamContext,
    registry: Registry,
    settings: Settings,
    workflows: Iterable[tuple[Workflow, str]],
    *,
    orgs: OrgManifest | None = None,
) -> list[Workflow]:
    """Validate workflows against the registry, then create streams, consumers, and store them.

    Nothing is stored unless every workflow is valid. A workflow must belong to
    the org of the connection's account; with an org manifest (``orgs``, else
    ``settings.orgs_file`` when it exists), it must keep its org's integrations
    (:func:`~deadlift.model.contracts.check_workflow`), and triggers that arrive
    through an import are recorded with their exporter and captured apart.
    """
    # The org comes from the connection: a workflow claiming another org is refused.
    identity = await whoami(js._nc)  # the JetStream context's own connection
    manifest = orgs if orgs is not None else load_orgs_if_present(settings.orgs_file)
    workflows = list(workflows)
    _check_documents(workflows, identity, settings)
    if manifest is not None:
        # Before the registry: a step exceeding its grants is refused even while the
        # guest's module is not accepted yet.
        for workflow, source in workflows:
            check_workflow(manifest, workflow, source=source)
    known = await registry.modules()  # read once for every step of every workflow
    resolved = [
        (await registry.resolve_workflow(w, source=src, known=known), src) for w, src in workflows
    ]
    if manifest is not None and not identity.single_tenant:
        resolved = [(resolve_imports(w, manifest, source=src), src) for w, src in resolved]
    keys = [w.key for w, _ in resolved]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise ConfigError(f"workflow {', '.join(sorted(duplicates))} is defined more than once")
    limit = stored_size_limit(js._nc.max_payload)
    for workflow, source in resolved:
        check_redelivery_horizon(workflow, settings, source=source)
        check_stored_size(workflow, limit, source=source)
    # Every check before anything is created: apply is all or nothing.
    stored = {w.key: w for w in await registry.workflows()}
    check_org_graph(resolved, stored.values())
    subjects = [s for w, _ in resolved for s in w.event_subjects()]
    imported: dict[str, list[str]] = {}
    for workflow, _ in resolved:
        for exporter, triggers in workflow.imported_triggers().items():
            imported.setdefault(exporter, []).extend(triggers)
    await bus.ensure_streams(js, settings, subjects, imported, require_dead_letter_room=True)
    resolved = await _record_starts(js, resolved, stored)
    await _create_consumers(js, settings, [w for w, _ in resolved], stored.values())
    for workflow, _ in resolved:
        await registry.put_workflow(workflow)
        if workflow.key in stored:
            await _drop_old_inputs(js, stored[workflow.key], workflow)
    return [w for w, _ in resolved]


async def _record_starts(
    js: JetStreamContext, workflows: list[tuple[Workflow, str]], stored: Mapping[str, Workflow]
) -> list[tuple[Workflow, str]]:
    """Record where each trigger's consumer delivers from once a worker makes it
    (``Workflow.starts``): the start the stored workflow has for it, else the stream's
    next sequence now, so every event sent from this apply on is run.

    A start given in the document is never used: apply decides.
    """
    tails: dict[str, TriggerStart] = {}
    recorded = []
    for workflow, source in workflows:
        previous = stored[workflow.key].starts if workflow.key in stored else {}
        bare = workflow.model_copy(update={"starts": {}})
        starts = {}
        for wanted in bus.trigger_inputs(bare):
            if wanted.consumer in previous:
                starts[wanted.consumer] = previous[wanted.consumer]
                continue
            if wanted.stream not in tails:
                info = await js.stream_info(wanted.stream)
                tails[wanted.stream] = TriggerStart(
                    seq=(info.state.last_seq or 0) + 1, stream_created=info.created
                )
            starts[wanted.consumer] = tails[wanted.stream]
        recorded.append((bare.model_copy(update={"starts": starts}), source))
    return recorded


async def _create_consumers(
    js: JetStreamContext, settings: Settings, workflows: list[Workflow], stored: Iterable[Workflow]
) -> None:
    """Create every step's consumers; if one cannot be made, delete those this apply added.

    The server can refuse one late (its limit of consumers per stream, say):
    nothing of the apply is left behind then but the streams' subjects.
    """
    inputs = [i for w in stored for s in w.steps for i in bus.step_inputs(w, s)]
    had = {(i.stream, i.consumer) for i in inputs}
    lazy = {(i.stream, i.consumer) for i in inputs if i.on_demand}
    await _check_consumer_room(js, workflows, had, lazy)
    slots = asyncio.Semaphore(CONSUMER_REQUESTS)

    async def ensure(workflow: Workflow, step: Step) -> None:
        async with slots:
            await bus.ensure_consumers(js, settings, workflow, step)

    try:  # many at once: an apply of thousands of steps is round trips, not work
        # All settle before any failure is raised: the rollback must see every one.
        results = await asyncio.gather(
            *(ensure(w, s) for w in workflows for s in w.steps), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
    except BaseException:
        added = [
            i
            for w in workflows
            for s in w.steps
            for i in bus.step_inputs(w, s)
            if (i.stream, i.consumer) not in had
        ]
        for new in added:
            with contextlib.suppress(Exception):
                await bus.delete_consumer(js, new.stream, new.consumer)
        raise


async def _check_consumer_room(
    js: JetStreamContext,
    workflows: list[Workflow],
    had: set[tuple[str, str]],
    lazy: set[tuple[str, str]],
) -> None:
    """Refuse, naming the first step over it, an apply that needs more consumers than the
    account or a stream allows: decided up front (consumers are then created many at
    once, in no fixed order), so the same apply always names the same step.

    ``lazy``: the stored workflows' consumers made on demand; room is kept for those
    not made yet, as for this apply's.
    """
    new = [
        (w, s, i)
        for w in workflows
        for s in w.steps
        for i in bus.step_inputs(w, s)
        # Those made on demand too: the room is kept for them, so a step's first
        # output is never refused for a full account.
        if (i.stream, i.consumer) not in had
    ]
    if not new:
        return
    account = await js.account_info()
    limit = account.limits.max_consumers or -1
    account_room = None
    if limit > 0:
        # Room is kept for the stored workflows' consumers made on demand, not made yet.
        made = await bus.list_consumers(js, {stream for stream, _ in lazy}) if lazy else {}
        account_room = limit - account.consumers - len(lazy - made.keys())
    stream_room: dict[str, tuple[int, int]] = {}
    for stream in sorted({i.stream for _, _, i in new}):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.stream_info(stream)
            if (info.config.max_consumers or -1) > 0:
                ceiling = info.config.max_consumers or 0
                stream_room[stream] = (ceiling, ceiling - info.state.consumer_count)
    added: Counter[str] = Counter()
    for n, (workflow, step, wanted) in enumerate(new, start=1):
        added[wanted.stream] += 1
        ceiling, room = stream_room.get(wanted.stream, (0, added[wanted.stream]))
        if added[wanted.stream] > room:
            why = f"stream {wanted.stream} allows {ceiling}"
        elif account_room is not None and n > account_room:
            why = f"the account allows {limit} ({account.consumers} exist)"
        else:
            continue
        raise ConfigError(
            f"workflow {workflow.key} step {step.name!r}: cannot create consumer "
            f"{wanted.consumer}: maximum consumers reached ({why}; this apply adds "
            f"{len(new)}); raise limits.max_consumers in the org manifest, or apply fewer steps"
        )


async def _drop_old_inputs(js: JetStreamContext, previous: Workflow, workflow: Workflow) -> None:
    """Delete the consumers of steps that left the workflow and of inputs a step no longer has.

    Workers stop such steps (finishing in-flight events); their consumers, and
    any backlog only they would read, go. So do the inputs a step no longer has
    (a trigger that moved).
    """
    current = {(i.stream, i.consumer) for s in workflow.steps for i in bus.step_inputs(workflow, s)}
    for step in previous.steps:
        for old in bus.step_inputs(previous, step):
            if (old.stream, old.consumer) not in current:
                await bus.delete_consumer(js, old.stream, old.consumer)


def _check_documents(
    workflows: list[tuple[Workflow, str]], identity: Identity, settings: Settings
) -> None:
    """Refuse a workflow of another org than the connection's, or a bad HTTP allow-list."""
    for workflow, source in workflows:
        identity.check(workflow.org, what=source)
        for step in workflow.steps:
            for entry in step.allowed_hosts:
                try:
                    parse_allowed_host(entry)
                except ConfigError as exc:
                    raise ConfigError(f"{source}: step {step.name!r}: {exc}") from None
        if settings.org and workflow.org != settings.org:
            raise ConfigError(
                f"{source}: org: the workflow belongs to {workflow.org!r} but you act as org "
                f"{settings.org!r}; apply it with --org {workflow.org}"
            )


def load_orgs_if_present(path: str | Path) -> OrgManifest | None:
    """The org manifest at ``path``, or None when there is no such file."""
    return load_orgs(path) if Path(path).is_file() else None


def resolve_imports(workflow: Workflow, manifest: OrgManifest, *, source: str) -> Workflow:
    """Record which triggers arrive through an import; refuse writing to an import.

    Only the exporting org's events arrive on an import's subjects (the org's
    own users may not publish there), so a step may not publish or emit to one,
    and a trigger must lie wholly inside one import or wholly outside all.
    """
    if workflow.org not in manifest.orgs:
        return workflow
    patterns = manifest.imports_of(workflow.org)
    imports: dict[str, str] = {}
    for trigger in workflow.trigger:
        for imp in patterns:
            if subject_covers(imp.local_subject, trigger):
                imports[trigger] = imp.org
                break
            if subjects_overlap(imp.local_subject, trigger):
                raise ConfigError(
                    f"{source}: trigger: {trigger} overlaps {imp.local_subject}, where "
                    f"{imp.org}'s events arrive; trigger on the org's own subjects and on "
                    "that import separately"
                )
    for step in workflow.steps:
        for subject in [*step.publish, *step.emit]:
            for imp in patterns:
                if subjects_overlap(imp.local_subject, subject):
                    raise ConfigError(
                        f"{source}: step {step.name!r}: {subject} lies in "
                        f"{imp.local_subject}, where only {imp.org}'s export delivers; "
                        "publish to one of the org's own subjects"
                    )
    _check_permitted(workflow, manifest, source=source)
    return workflow.model_copy(update={"imports": imports})


def _check_permitted(workflow: Workflow, manifest: OrgManifest, *, source: str) -> None:
    """Refuse a subject the org's users may not use: the server would refuse it only
    at run time, event by event."""
    allowed = manifest.own_subjects(workflow.org)
    shown = ", ".join(allowed)
    uses = [("trigger", None, t) for t in workflow.trigger] + [
        (field, step.name, subject)
        for step in workflow.steps
        for field, subjects in (("publish", step.publish), ("emit", step.emit))
        for subject in subjects
    ]
    for field, step_name, subject in uses:
        if not any(subject_covers(pattern, subject) for pattern in allowed):
            where = f"step {step_name!r}: {field}" if step_name else field
            raise ConfigError(
                f"{source}: {where}: {subject} is outside the subjects org "
                f"{workflow.org!r} may use ({shown}); use one of them, or add it to the "
                f"org's `subjects:` in the org manifest"
            )


async def remove_workflow(js: JetStreamContext, registry: Registry, name: str) -> Workflow:
    """Remove a workflow: workers stop its steps, its consumers are deleted."""
    workflow = await registry.workflow(name)
    await registry.delete_workflow(workflow.key)
    for step in workflow.steps:
        await bus.delete_consumers(js, workflow, step)
    return workflow


# Room a KV put needs besides the value: its subject, headers and protocol line.
KV_PUT_HEADROOM = 4096


def stored_size_limit(max_payload: int) -> int:
    """The largest workflow (as stored, JSON) the registry's KV can hold on this server."""
    return (max_payload or 1024 * 1024) - KV_PUT_HEADROOM


def check_stored_size(workflow: Workflow, limit: int, *, source: str) -> None:
    """Refuse a workflow too large to store, naming the field that makes it so.

    Checked before any stream or consumer is created: else apply would leave
    them behind and fail at the last step, storing the workflow.
    """
    size = len(workflow.model_dump_json().encode())
    if size <= limit:
        return
    dumped = workflow.model_dump(mode="json")
    field = max(dumped, key=lambda name: len(json.dumps(dumped[name])))
    where = field
    if field == "steps":
        step = max(dumped["steps"], key=lambda s: len(json.dumps(s)))
        if len(json.dumps(step)) > limit // 2:
            inner = max(step, key=lambda name: len(json.dumps(step[name])))
            where = f"step {step['name']!r}: {inner}"
        else:
            where = f"steps ({len(dumped['steps'])} of them)"
    raise ConfigError(
        f"{source}: {where}: the workflow is {size} bytes as stored, over the {limit} bytes "
        "the registry can hold (the server's max_payload less room for the headers); "
        f"shorten {where.rsplit(': ', 1)[-1].split(' (')[0]}, or split the workflow"
    )


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
