"""The registry: module binaries, their metadata and workflows, in one stream per org.

(:mod:`deadlift.bus.registry_store` says how they are kept.)

The store is content-addressed: a binary is kept once under its sha256, and any
number of ``name@version`` entries point at it. A guest org's module that the
org accepted (:mod:`deadlift.bus.offers`) is kept as ``owner/name@version``,
with the owner's signature; the org's own modules have no owner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deadlift.bus import buckets
from deadlift.bus.registry_store import MAX_MODULE_BYTES, Binaries, open_store
from deadlift.bus.watch import watch_bucket
from deadlift.errors import ConfigError, InUseError, ModuleError, NotFoundError
from deadlift.model import names
from deadlift.model.contracts import module_name, module_owner
from deadlift.model.topology import Bucket
from deadlift.model.workflow import NAME_PATTERN, Workflow
from deadlift.wasm.codecs import CODECS
from deadlift.wasm.hostfns import NAMESPACE
from deadlift.wasm.inspect import WasmInfo, inspect_wasm
from deadlift.wasm.probe import DEFAULT_MAX_PAGES, DEFAULT_TIMEOUT_S, probe_module

log = logging.getLogger("deadlift.bus")

BINARIES = Bucket.BINARIES
MODULES = Bucket.MODULES
WORKFLOWS = Bucket.WORKFLOWS
# New versions follow deadlift.names (no '..', no trailing '.', not "latest");
# metadata already stored is read with the looser rule it was written under.
VERSION_PATTERN = names.VERSION_PATTERN
_STORED_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ModuleMeta(BaseModel):
    """What the registry knows about one ``name@version``."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=_STORED_VERSION)
    sha256: str
    codec: str = "json"
    size: int
    exports: list[str]
    host_imports: list[str] = Field(default_factory=list)
    timeout_ms: int | None = None
    max_memory_pages: int | None = None
    pushed_at: float = 0.0
    # A guest's module accepted by this org: its owner org, the owner's signature
    # and the key it verified with at accept. None for the org's own modules.
    owner: str | None = Field(None, pattern=NAME_PATTERN)
    signature: str | None = None
    signing_key: str | None = None
    accepted_at: float | None = None

    @property
    def ref(self) -> str:
        """``name@version``, or ``owner/name@version`` for a guest's module."""
        return (
            f"{self.owner}/{self.name}@{self.version}"
            if self.owner
            else f"{self.name}@{self.version}"
        )


class Registry:
    """Modules and workflows stored in JetStream. Open with :meth:`open`."""

    def __init__(self, js: JetStreamContext, binaries: Binaries, modules: Any, workflows: Any):
        self.js = js
        self._binaries = binaries
        self._modules = modules
        self._workflows = workflows

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> Registry:
        """Open the org's registry, creating it on first use (``replicas`` on a cluster)."""
        store = await open_store(js, replicas=replicas)
        return cls(js, store.binaries, store.modules, store.workflows)

    @property
    def modules_bucket(self) -> Any:
        """The module metadata's KV key space (nats-py's ``KeyValue``)."""
        return self._modules

    @property
    def workflows_bucket(self) -> Any:
        """The workflows' KV key space (nats-py's ``KeyValue``)."""
        return self._workflows

    async def binary_shas(self) -> list[str]:
        """The sha256 of every stored binary."""
        return await self._binaries.shas()

    # -- modules -------------------------------------------------------------

    async def push_module(
        self,
        wasm: bytes,
        *,
        name: str,
        version: str | None = None,
        codec: str = "json",
        timeout_ms: int | None = None,
        max_memory_pages: int | None = None,
        source: str = "<module>",
        probe_timeout_s: float | None = None,
    ) -> tuple[ModuleMeta, bool]:
        """Validate and store a module; return its metadata and whether anything changed.

        Pushing the same binary again is a no-op; a different binary under an
        existing version is refused (versions are immutable). The binary is
        instantiated in a child process (:mod:`deadlift.wasm.probe`) that is killed
        after ``probe_timeout_s``: its start function may loop or crash.

        Raises:
            ModuleError: not Wasm, too large, or Extism cannot load it.
            ConfigError: bad name, version or codec, or the version is taken.
        """
        template = await _checked(
            wasm,
            name=name,
            version=version,
            codec=codec,
            timeout_ms=timeout_ms,
            max_memory_pages=max_memory_pages,
            source=source,
            probe_timeout_s=probe_timeout_s,
        )
        return await self._store(wasm, template, version)

    async def accept_module(
        self,
        wasm: bytes,
        *,
        owner: str,
        name: str,
        version: str,
        signature: str,
        signing_key: str,
        codec: str = "json",
        timeout_ms: int | None = None,
        max_memory_pages: int | None = None,
        source: str = "<offer>",
        probe_timeout_s: float | None = None,
    ) -> tuple[ModuleMeta, bool]:
        """Store a guest's module as ``owner/name@version``, validated and probed as a push.

        The caller has verified ``signature`` with ``signing_key``
        (:func:`deadlift.bus.offers.accept_offer`); both are kept so every load can
        verify it again. Accepting the same binary again is a no-op.

        Raises:
            ModuleError: not Wasm, too large, or Extism cannot load it.
            ConfigError: bad name, version or codec, or the version is taken by
                another binary of that owner.
        """
        names.check_name(owner, field=f"{source}: owner")
        template = await _checked(
            wasm,
            name=name,
            version=version,
            codec=codec,
            timeout_ms=timeout_ms,
            max_memory_pages=max_memory_pages,
            source=source,
            probe_timeout_s=probe_timeout_s,
        )
        now = time.time()
        owned = template.model_copy(
            update={
                "owner": owner,
                "signature": signature,
                "signing_key": signing_key,
                "accepted_at": now,
            }
        )
        return await self._store(wasm, owned, version)

    async def _store(
        self, wasm: bytes, template: ModuleMeta, wanted: str | None
    ) -> tuple[ModuleMeta, bool]:
        """Store a checked binary and its metadata (``template`` with version and time set)."""
        name, owner, sha = template.name, template.owner, template.sha256
        while True:
            existing = await self.versions(name, owner=owner)
            version = wanted
            if version is None:
                if existing and existing[-1].sha256 == sha:
                    return existing[-1], False
                version = _next_version(existing)
            for meta in existing:
                if meta.version == version:
                    if meta.sha256 == sha:
                        return meta, False
                    raise ConfigError(
                        f"{meta.ref} already exists with another binary "
                        f"(sha256 {meta.sha256[:12]}); versions are immutable, "
                        + ("offer a new version" if owner else "push a new version")
                    )
            meta = template.model_copy(update={"version": version, "pushed_at": time.time()})
            # Binary first: metadata must never point at a missing binary.
            if not await self._has_binary(sha):
                await self._binaries.put(sha, wasm)
            try:
                # create, not put: of two concurrent pushes of one version, one wins.
                await self._modules.create(
                    _module_key(name, version, owner), meta.model_dump_json().encode()
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # pushed meanwhile: look again (a no-op, a refusal or the next version)
            return meta, True

    async def modules(self) -> list[ModuleMeta]:
        """Every module version, the org's own first, by owner, name, then push time."""
        metas = [ModuleMeta.model_validate_json(v) for v in await _values(self.js, self._modules)]
        return sorted(metas, key=lambda m: (m.owner or "", m.name, m.pushed_at))

    async def versions(self, name: str, *, owner: str | None = None) -> list[ModuleMeta]:
        """The versions of one module (the org's own, or ``owner``'s accepted), oldest first."""
        return _versions(await self.modules(), name, owner)

    async def resolve(self, ref: str, *, known: list[ModuleMeta] | None = None) -> ModuleMeta:
        """Find a module by ``[owner/]name`` (latest), ``[owner/]name@version`` or ``sha256:<hex>``.

        ``owner/…`` looks only at that owner's accepted modules; a plain name and
        ``sha256:`` only at the org's own.

        ``known``: every module's metadata, read once by a caller resolving many.

        Raises:
            NotFoundError: naming what exists instead.
        """
        names.check_module_ref(ref, field="module")
        metas = known if known is not None else await self.modules()
        if ref.startswith("sha256:"):
            sha = ref.removeprefix("sha256:")
            for meta in reversed(metas):
                if meta.sha256 == sha and meta.owner is None:
                    return meta
            raise NotFoundError(f"no module with sha256 {sha}; push it with `deadlift module push`")
        owner, name = module_owner(ref), module_name(ref)
        version = ref.partition("@")[2]
        versions = _versions(metas, name, owner)
        if not versions:
            if owner:
                raise NotFoundError(
                    f"{owner} has no accepted module {name!r}; list offers with "
                    f"`deadlift module offers` and accept one with "
                    f"`deadlift module accept {owner}/{name}@VERSION`"
                )
            raise NotFoundError(
                f"module {name!r} is not registered; push it with "
                f"`deadlift module push FILE.wasm --name {name}`"
            )
        if not version or version == "latest":
            return versions[-1]
        for meta in versions:
            if meta.version == version:
                return meta
        listed = ", ".join(m.version for m in versions)
        shown = f"{owner}/{name}" if owner else name
        raise NotFoundError(f"module {shown!r} has no version {version!r} (versions: {listed})")

    async def remove_module(self, ref: str) -> list[ModuleMeta]:
        """Remove ``name@version`` (or every version of ``name``); return what was removed.

        Raises:
            ConfigError: a workflow still uses it (naming the workflow and step).
            NotFoundError: no such module or version.
        """
        names.check_module_ref(ref, field="module")
        if ref.startswith("sha256:"):
            raise ConfigError(f"module rm {ref}: name the module as NAME or NAME@VERSION")
        owner, name = module_owner(ref), module_name(ref)
        version = ref.partition("@")[2]
        versions = await self.versions(name, owner=owner)
        if version == "latest" and versions:
            version = versions[-1].version
        chosen = [m for m in versions if not version or m.version == version]
        if not chosen:
            await self.resolve(ref)  # raises NotFoundError naming what exists
        removed = {m.ref for m in chosen}
        shas = {m.sha256 for m in chosen}
        orphans = shas - {m.sha256 for m in await self.modules() if m.ref not in removed}
        for workflow in await self.workflows():
            for step in workflow.steps:
                # A step uses the module if its binary would go (whatever its
                # reference: name, name@version or sha256:), or if its reference
                # names what goes and would no longer resolve.
                ref_version = step.module.partition("@")[2]
                names_it = (
                    module_owner(step.module) == owner
                    and module_name(step.module) == name
                    and (not version or ref_version == version)
                )
                if step.module_sha256 in orphans or names_it:
                    raise InUseError(
                        f"module {ref} is used by workflow {workflow.key} step {step.name!r}; "
                        "change or remove that workflow first"
                    )
        for meta in chosen:
            await self._modules.purge(_module_key(meta.name, meta.version, meta.owner))
        remaining = {m.sha256 for m in await self.modules()}
        for sha in shas - remaining:  # the store is content-addressed: drop orphans only
            await self._binaries.delete(sha)
        return chosen

    async def binary(self, sha256: str) -> bytes:
        """The module binary with this sha256 (verified by the object store)."""
        data = await self._binaries.get(sha256)
        if data is None:
            raise NotFoundError(f"module binary {sha256} is missing from the store")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ModuleError(f"module binary {sha256} is corrupt in the store")
        return data

    async def _has_binary(self, sha256: str) -> bool:
        return await self._binaries.has(sha256)

    # -- workflows -----------------------------------------------------------

    async def resolve_workflow(
        self,
        workflow: Workflow,
        *,
        source: str = "<workflow>",
        known: list[ModuleMeta] | None = None,
    ) -> Workflow:
        """Pin each step to a module binary and check its function and imports.

        ``known``: every module's metadata, read once by a caller resolving many.

        Raises:
            ConfigError: naming the step: unknown module, missing export, or
                host functions the module imports but the step does not grant.
        """
        steps = []
        metas = known if known is not None else await self.modules()
        for step in workflow.steps:
            where = f"{source}: step {step.name!r}"
            try:
                meta = await self.resolve(step.module, known=metas)
            except NotFoundError as exc:
                owner = module_owner(step.module)
                if owner is not None:
                    raise ConfigError(
                        f"{where}: {not_accepted(step.module, workflow.org)}"
                    ) from None
                raise ConfigError(f"{where}: module: {exc}") from None
            if step.function not in meta.exports:
                raise ConfigError(
                    f"{where}: function: module {meta.ref} exports no function "
                    f"{step.function!r} (it exports: {', '.join(meta.exports) or 'nothing'})"
                )
            missing = sorted(set(meta.host_imports) - set(step.host_functions))
            if missing:
                raise ConfigError(
                    f"{where}: host_functions: module {meta.ref} imports "
                    f"{', '.join(missing)} which the step does not grant; add them to "
                    f"host_functions or use a module that does not need them"
                )
            steps.append(
                step.model_copy(
                    update={
                        "module_sha256": meta.sha256,
                        "codec": meta.codec,
                        "timeout_ms": step.timeout_ms or meta.timeout_ms,
                        "max_memory_pages": step.max_memory_pages or meta.max_memory_pages,
                    }
                )
            )
        return workflow.model_copy(update={"steps": steps})

    async def put_workflow(self, workflow: Workflow) -> None:
        """Store a resolved workflow (workers watching the registry pick it up)."""
        await self._workflows.put(workflow.key, workflow.model_dump_json().encode())

    async def workflows(self) -> list[Workflow]:
        """Every stored workflow."""
        found = [Workflow.model_validate_json(v) for v in await _values(self.js, self._workflows)]
        return sorted(found, key=lambda w: w.key)

    async def workflow(self, name: str) -> Workflow:
        """A workflow by ``org.name`` or, when unambiguous, ``name``."""
        matches = [w for w in await self.workflows() if name in (w.key, w.name)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFoundError(f"no workflow {name!r}; apply it with `deadlift workflow apply`")
        keys = ", ".join(w.key for w in matches)
        raise NotFoundError(f"workflow name {name!r} is ambiguous ({keys}); use ORG.NAME")

    async def delete_workflow(self, key: str) -> None:
        """Remove a workflow from the registry."""
        await self._workflows.delete(key)

    async def watch_workflows(
        self, stop: asyncio.Event | None = None
    ) -> AsyncIterator[tuple[str, Workflow | None]]:
        """Yield ``(key, workflow)`` for every stored workflow, then for each change.

        A deleted workflow yields ``(key, None)``. Setting ``stop`` ends the iteration.
        Idle, it costs nothing (see :mod:`deadlift.bus.watch`).
        """
        async for change in watch_bucket(self.js, self._workflows, stop):
            if change.value is None:
                yield change.key, None
                continue
            try:
                workflow = Workflow.model_validate_json(change.value)
            except ValidationError as exc:
                # Written around `workflow apply`, which validates: the others still run.
                log.error("workflow %s in the registry is not valid, not run: %s", change.key, exc)
                continue
            yield change.key, workflow


def _versions(metas: list[ModuleMeta], name: str, owner: str | None) -> list[ModuleMeta]:
    return [
        m
        for m in metas
        if m.name == name
        and m.owner == owner
        # An owned entry counts only as accepted (the only way one is written).
        and (owner is None or m.accepted_at is not None)
    ]


def not_accepted(ref: str, host: str) -> str:
    """Why a host may not use a guest's module reference yet, and what to do."""
    accept = ref if "@" in ref else f"{ref}@VERSION"
    return (
        f"module {ref} is not accepted: list offers with `deadlift --org {host} module offers`, "
        f"accept with `deadlift --org {host} module accept {accept}`"
    )


async def _checked(
    wasm: bytes,
    *,
    name: str,
    version: str | None,
    codec: str,
    timeout_ms: int | None,
    max_memory_pages: int | None,
    source: str,
    probe_timeout_s: float | None,
) -> ModuleMeta:
    """Validate and probe a binary; its metadata, version and time still to be set."""
    info = _validate(wasm, name=name, version=version, codec=codec, source=source)
    host_imports = info.host_imports(NAMESPACE)
    try:
        await probe_module(
            wasm,
            host_functions=host_imports,
            max_pages=max_memory_pages or DEFAULT_MAX_PAGES,
            timeout_s=probe_timeout_s or DEFAULT_TIMEOUT_S,
        )
    except ModuleError as exc:
        raise ModuleError(f"{source}: {exc}") from None
    return ModuleMeta(
        name=name,
        version=version or "0",
        sha256=hashlib.sha256(wasm).hexdigest(),
        codec=codec,
        size=len(wasm),
        exports=sorted(info.exports),
        host_imports=sorted(host_imports),
        timeout_ms=timeout_ms,
        max_memory_pages=max_memory_pages,
    )


def _validate(wasm: bytes, *, name: str, version: str | None, codec: str, source: str) -> WasmInfo:
    names.check_name(name, field=f"{source}: module name")
    if version is not None:
        names.check_version(version, field=f"{source}: version")
    if codec not in CODECS:
        raise ConfigError(f"{source}: codec {codec!r}: use one of {', '.join(CODECS)}")
    if len(wasm) > MAX_MODULE_BYTES:
        raise ModuleError(
            f"{source}: {len(wasm)} bytes is over the {MAX_MODULE_BYTES}-byte module limit"
        )
    try:
        info = inspect_wasm(wasm)  # a fast parse; loading it is the probe's (a subprocess)
    except ModuleError as exc:
        raise ModuleError(f"{source}: {exc}") from None
    return info


async def _values(js: JetStreamContext, kv: Any) -> list[bytes]:
    return [value for _, value in await kv_entries(js, kv)]


async def kv_entries(js: JetStreamContext, kv: Any) -> list[tuple[str, bytes]]:
    """Every current ``(key, value)`` of a KV bucket, by key.

    Keys come from the bucket stream's subjects, not from ``kv.keys()``: that
    opens an ordered consumer which nats-py never deletes (it lingers for its
    5-minute inactivity threshold), so about a thousand registry listings in five
    minutes would hit the server's consumer limit and break every later one.
    """
    prefix = buckets.prefix_of(kv)
    info = await js.stream_info(buckets.stream_of(kv), subjects_filter=f"{prefix}>")
    entries = []
    for subject in sorted(info.state.subjects or {}):
        key = subject.removeprefix(prefix)
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # deleted or purged (its marker keeps the subject), or gone meanwhile
        if entry.value:
            entries.append((key, entry.value))
    return entries


def _module_key(name: str, version: str, owner: str | None = None) -> str:
    # Names have no '/': an owned key (three parts) never clashes with an own one.
    return f"{owner}/{name}/{version}" if owner else f"{name}/{version}"


def _next_version(existing: list[ModuleMeta]) -> str:
    numbers = [int(m.version) for m in existing if m.version.isdigit()]
    return str(max(numbers, default=0) + 1)


def dump_json(value: Any) -> str:
    """Pretty JSON for ``--json`` output."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)
