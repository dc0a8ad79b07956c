"""The Extism host: compiled modules cached by sha256, one instance per in-flight call.

Facts this design rests on (measured, see DESIGN.md): a ``Plugin`` shared by two
concurrent calls returns the *other* call's output, so every call takes an
instance from a pool and returns it only if the call succeeded; nothing is
limited unless the manifest says so, so every instance gets a timeout and a
memory cap; an instance keeps its heap and globals after a failure, so a failed
instance is dropped, and pools are keyed by org, workflow and step so no module
state crosses them. Compiled code is per step too: a timeout interrupts every
call on the compiled module's engine (see ``PluginSpec.compiled_key``).

A failed call's StepError must not keep the dropped instance alive (a worker holds
the errors of a batch until it is settled): see :meth:`ModuleHost.call`. Idle
instances are capped by count and by their worst-case memory (``max_pages``).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import extism
from extism.extism import CompiledPlugin

from deadlift.errors import ModuleError, StepError
from deadlift.model.topology import ErrorKind
from deadlift.runtime import watchdog
from deadlift.wasm import logs
from deadlift.wasm.hostfns import NAMESPACE, HostCall, extism_functions
from deadlift.wasm.inspect import inspect_wasm

WASM_PAGE = 64 * 1024
INSTANTIATE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """Everything that makes two instances interchangeable (the pool key).

    ``org``, ``workflow`` and ``step`` are part of it: an instance keeps its
    globals and heap between calls, so two steps never share one.
    """

    sha256: str
    org: str
    timeout_ms: int
    max_pages: int
    host_functions: tuple[str, ...] = ()
    config: tuple[tuple[str, str], ...] = ()
    max_output_bytes: int = 512 * 1024
    allowed_hosts: tuple[str, ...] = ()
    workflow: str = ""
    step: str = ""

    @property
    def compiled_key(self) -> tuple[Any, ...]:
        """What the compiled code depends on: binary, limits, linked functions, config.

        And whose it is: Extism times a call out by bumping the epoch of the
        compiled module's wasmtime engine, which interrupts *every* call running
        on it. Sharing compiled code across orgs would let one org's endless loop
        time out another org's calls (measured: 7 % of a neighbour's 3 ms calls),
        so each org compiles its own (~0.5 MB, ~1.5 ms with wasmtime's cache). Within
        an org, the steps running the very same binary with the same limits share
        it (an interrupted call is reported as a timeout and retried): compiling per
        step would cost ~0.5 MB per step, too much for a host with thousands.
        """
        return (
            self.sha256,
            self.timeout_ms,
            self.max_pages,
            self.host_functions,
            self.config,
            self.org,
        )

    @property
    def instance_bytes(self) -> int:
        """The most memory one instance can hold: its whole ``max_pages``."""
        return self.max_pages * WASM_PAGE


class NoIdleInstance(Exception):
    """No idle instance to call on (:meth:`ModuleHost.call` with ``instantiate=False``)."""


class _Pool:
    def __init__(self, compiled: CompiledPlugin, spec: PluginSpec, exports: frozenset[str]) -> None:
        self.compiled = compiled
        self.spec = spec
        self.exports = exports  # checked here: plugin.function_exists is an FFI call
        self.idle: list[extism.Plugin] = []
        self.created = 0
        self.last_used = time.monotonic()


class ModuleHost:
    """Runs module functions; thread-safe, blocking (call it from an executor)."""

    def __init__(
        self,
        *,
        max_idle_per_spec: int = 64,
        max_idle_total: int = 64,
        max_idle_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self._binaries: dict[str, bytes] = {}
        self._compiled: dict[tuple[Any, ...], tuple[CompiledPlugin, frozenset[str]]] = {}
        self._pools: dict[PluginSpec, _Pool] = {}
        # The pools holding idle instances, least recently used first: evicting and
        # trimming look only here (a host with 30,000 steps must not sort them all).
        self._holding: OrderedDict[PluginSpec, _Pool] = OrderedDict()
        self._lock = threading.Lock()
        self._max_idle = max_idle_per_spec
        # Pools are per step, and an instance holds ~2 MB: with many steps, idle
        # instances are capped overall (the least recently used pool gives first).
        self._max_idle_total = max_idle_total
        self._idle_total = 0
        # An idle instance keeps the heap its last call grew, up to its max_pages:
        # idle instances are also capped by that worst case, summed (at least one
        # instance is always kept, however large its cap).
        self._max_idle_bytes = max_idle_bytes
        self._idle_bytes = 0
        self._waiter: Callable[[], None] | None = None  # see when_holding
        logs.install()

    @property
    def holding(self) -> bool:
        """Whether any idle instance is held (something for :meth:`trim` to give back)."""
        return bool(self._holding)

    def when_holding(self, callback: Callable[[], None]) -> bool:
        """Have ``callback`` called once, by the thread returning it, when an idle
        instance is next held; False (and never called) if one is held now.

        Whoever trims waits for it rather than waking every second while nothing
        is held (a process serving a thousand idle orgs has a thousand trimmers).
        """
        with self._lock:
            if self._holding:
                return False
            self._waiter = callback
            return True

    def add_binary(self, sha256: str, wasm: bytes) -> None:
        """Make a module binary available under its sha256."""
        with self._lock:
            self._binaries[sha256] = wasm

    def has_binary(self, sha256: str) -> bool:
        """Whether the binary is loaded."""
        return sha256 in self._binaries

    def pool_sizes(self) -> Mapping[PluginSpec, tuple[int, int]]:
        """(idle, created) instance counts per spec."""
        with self._lock:
            return {k: (len(p.idle), p.created) for k, p in self._pools.items()}

    def trim(self, idle_for: float = 2.0, keep: int = 1, release_after: float = 15.0) -> int:
        """Drop idle instances beyond ``keep`` from pools unused for ``idle_for`` seconds.

        A busy step holds one instance per thread; once it goes quiet, the extra
        instances (about 2 MB each) are given back, and a step unused for
        ``release_after`` seconds gives back its last one too (pools are per step:
        memory must not grow with the number of idle steps). Returns how many
        were dropped.
        """
        now = time.monotonic()
        dropped: list[extism.Plugin] = []
        with self._lock:
            for pool in list(self._holding.values()):
                quiet = now - pool.last_used
                if quiet < idle_for:
                    break  # the rest were used more recently still
                kept = 0 if quiet >= release_after else keep
                if len(pool.idle) > kept:
                    gone = len(pool.idle) - kept
                    dropped.extend(pool.idle[kept:])
                    self._idle_total -= gone
                    self._idle_bytes -= gone * pool.spec.instance_bytes
                    del pool.idle[kept:]
                if not pool.idle:
                    del self._holding[pool.spec]
        for plugin in dropped:
            logs.unbind(plugin)
        return len(dropped)

    def prepare(self, spec: PluginSpec) -> None:
        """Compile the module for ``spec`` now (so link errors surface before any event)."""
        self._pool(spec)

    def compiled(self, spec: PluginSpec) -> bool:
        """Whether ``spec``'s module is compiled already (then :meth:`prepare` is quick)."""
        with self._lock:
            return spec.compiled_key in self._compiled

    def call(
        self,
        spec: PluginSpec,
        function: str,
        data: bytes,
        context: HostCall,
        *,
        instantiate: bool = True,
    ) -> bytes:
        """Call ``function`` with ``data``; return its raw output.

        ``instantiate`` False: only on an idle instance, never compiling or creating
        one (milliseconds: the event loop's thread calls so).

        Raises:
            StepError: with ``kind`` timeout, oom, trap, error, host_function,
                missing_export or output_too_large.
            NoIdleInstance: none idle, with ``instantiate`` False.
        """
        if instantiate:
            pool = self._pool(spec)
        else:
            with self._lock:
                found = self._pools.get(spec)
            if found is None:
                raise NoIdleInstance
            pool = found
        if function not in pool.exports:
            raise StepError(
                f"module {spec.sha256[:12]} has no exported function {function!r}",
                kind=ErrorKind.MISSING_EXPORT,
                retryable=False,
            )
        plugin = self._take(pool, context, instantiate)
        failure: StepError | None = None
        output = b""
        finished = False
        try:
            began = time.perf_counter()
            try:
                output = plugin.call(function, data, parse=bytes, host_context=context)
            except extism.Error as exc:
                failure = _step_error(exc, spec, context, logs.take_error(plugin))
                if failure.kind == ErrorKind.TRAP and _past_timeout(began, spec):
                    failure = _interrupted(spec, failure)
            else:
                failure = _output_error(output, spec, context)
            finished = True
        finally:
            logs.flush()
            self._give_back(pool, plugin, finished and failure is None)
            # The caller keeps the StepError (a worker: until the batch is settled),
            # and with it this frame: it must not keep the dropped instance, whose
            # heap may be max_pages large, alive. Hence no raise inside `except`
            # either (its __context__ would hold extism.Error, whose traceback
            # holds Plugin.call's frame and so the plugin).
            del plugin
        if failure is not None:
            raise failure
        return output

    def _pool(self, spec: PluginSpec) -> _Pool:
        with self._lock:
            pool = self._pools.get(spec)
            if pool is not None:
                return pool
            wasm = self._binaries.get(spec.sha256)
            compiled = self._compiled.get(spec.compiled_key)
        if compiled is None:
            if wasm is None:
                raise ModuleError(f"module binary {spec.sha256} is not loaded")
            compiled = (compile_module(wasm, spec), frozenset(inspect_wasm(wasm).exports))
        with self._lock:
            code, exports = self._compiled.setdefault(spec.compiled_key, compiled)
            return self._pools.setdefault(spec, _Pool(code, spec, exports))

    def _take(self, pool: _Pool, context: HostCall, instantiate: bool = True) -> extism.Plugin:
        with self._lock:
            pool.last_used = time.monotonic()
            plugin = pool.idle.pop() if pool.idle else None
            if plugin is not None:
                self._idle_total -= 1
                self._idle_bytes -= pool.spec.instance_bytes
                if pool.idle:
                    self._holding.move_to_end(pool.spec)
                else:
                    del self._holding[pool.spec]
        if plugin is None:
            if not instantiate:
                raise NoIdleInstance
            plugin = self._instantiate(pool)
            with self._lock:
                pool.created += 1
        logs.bind(plugin, context)
        return plugin

    def _instantiate(self, pool: _Pool) -> extism.Plugin:
        what = f"module {pool.spec.sha256[:12]}"
        for attempt in range(INSTANTIATE_ATTEMPTS):
            try:
                # Runs the start function, which no timeout bounds: the watchdog's.
                with watchdog.phase(f"instantiating {what}"):
                    return extism.Plugin(pool.compiled, functions=None)
            except extism.Error as exc:
                message = str(exc)
            # Instantiating runs Wasm on the engine a concurrent call's timeout
            # interrupts (see _SETUP_FAILURES): that is no fault of the module.
            if "wasm trap: interrupt" not in message:
                break
            if attempt == INSTANTIATE_ATTEMPTS - 1:
                raise StepError(
                    f"cannot instantiate {what}: interrupted {INSTANTIATE_ATTEMPTS} times "
                    "by concurrent calls of this step timing out",
                    kind=ErrorKind.TIMEOUT,
                )
        raise StepError(f"cannot instantiate {what}: {message}", kind=ErrorKind.ERROR)

    def _give_back(self, pool: _Pool, plugin: extism.Plugin, ok: bool) -> None:
        # A failed instance may hold a corrupt heap or half-set globals: drop it.
        dropped = [] if ok else [plugin]
        waiter = None
        if ok:
            with self._lock:
                if len(pool.idle) < self._max_idle:
                    pool.idle.append(plugin)
                    self._idle_total += 1
                    self._idle_bytes += pool.spec.instance_bytes
                    pool.last_used = time.monotonic()  # idle since now: trim counts from here
                    self._holding[pool.spec] = pool
                    self._holding.move_to_end(pool.spec)
                else:
                    dropped.append(plugin)
                dropped.extend(self._evict_locked())
                if self._holding:
                    waiter, self._waiter = self._waiter, None
        for instance in dropped:
            logs.unbind(instance)
        if waiter is not None:
            waiter()

    def _evict_locked(self) -> list[extism.Plugin]:
        """Idle instances over the count or memory caps, least recently used pools first."""
        evicted: list[extism.Plugin] = []

        def over() -> bool:
            return self._idle_total > self._max_idle_total or (
                self._idle_bytes > self._max_idle_bytes and self._idle_total > 1
            )

        for pool in list(self._holding.values()):  # least recently used first
            if not over():
                break
            while pool.idle and over():
                evicted.append(pool.idle.pop(0))
                self._idle_total -= 1
                self._idle_bytes -= pool.spec.instance_bytes
            if not pool.idle:
                del self._holding[pool.spec]
        return evicted


def manifest(wasm: bytes, spec: PluginSpec) -> dict[str, Any]:
    """The Extism manifest for a spec: limits always set."""
    return {
        "wasm": [{"data": wasm}],
        "timeout_ms": spec.timeout_ms,
        "memory": {"max_pages": spec.max_pages},
        "config": dict(spec.config),
        # Extism's own HTTP is off for every host: it follows redirects without
        # re-checking them. Modules reach the network through Deadlift's granted
        # `http_request` host function, which checks every hop.
        "allowed_hosts": [],
    }


def compile_module(wasm: bytes, spec: PluginSpec) -> CompiledPlugin:
    """Compile and link a module with exactly the granted host functions.

    Raises:
        ModuleError: Extism cannot load or link it (e.g. an import not granted).
    """
    info = inspect_wasm(wasm)
    # CompiledPlugin does not link: an import nobody provides would only fail
    # when the first instance is created, i.e. on the first event. Check now.
    missing = sorted(set(info.host_imports(NAMESPACE)) - set(spec.host_functions))
    if missing:
        raise ModuleError(
            f"module {spec.sha256[:12]} imports host function(s) {', '.join(missing)} "
            f"from {NAMESPACE!r} that are not granted"
        )
    wasi = any(i.module.startswith("wasi") for i in info.imports)
    try:
        return CompiledPlugin(manifest(wasm, spec), wasi, extism_functions(spec.host_functions))
    except extism.Error as exc:
        raise ModuleError(f"Extism cannot load module {spec.sha256[:12]}: {exc}") from None


def check_loadable(wasm: bytes, host_functions: tuple[str, ...]) -> None:
    """Raise ModuleError unless Extism can load ``wasm`` with those host functions linked."""
    spec = PluginSpec(
        sha256="0" * 64, org="-", timeout_ms=1000, max_pages=256, host_functions=host_functions
    )
    compiled = compile_module(wasm, spec)
    try:
        extism.Plugin(compiled, functions=None)
    except extism.Error as exc:
        raise ModuleError(f"Extism cannot instantiate the module: {exc}") from None


def _output_error(output: bytes, spec: PluginSpec, context: HostCall) -> StepError | None:
    """What is wrong with a call that returned, if anything."""
    if context.failure is not None:
        return StepError(str(context.failure), kind=ErrorKind.HOST_FUNCTION)
    if len(output) > spec.max_output_bytes:
        return StepError(
            f"module output is {len(output)} bytes, over the limit of "
            f"{spec.max_output_bytes} (DEADLIFT_MAX_OUTPUT_BYTES)",
            kind=ErrorKind.OUTPUT_TOO_LARGE,
            retryable=False,
        )
    return None


def _step_error(
    exc: extism.Error, spec: PluginSpec, context: HostCall, logged: str | None
) -> StepError:
    message = str(exc)
    if context.failure is not None:
        return StepError(str(context.failure), kind=ErrorKind.HOST_FUNCTION)
    if message == "timeout":
        return StepError(
            f"module call timed out after {spec.timeout_ms} ms", kind=ErrorKind.TIMEOUT
        )
    if "wasm trap: interrupt" in message or (logged is None and _in_setup(message)):
        return StepError(
            f"module call timed out after {spec.timeout_ms} ms, or was interrupted by a "
            f"concurrent call of this step timing out ({message.splitlines()[0]})",
            kind=ErrorKind.TIMEOUT,
        )
    if (
        message == "oom"
        or "out of memory" in message
        or ("memory" in message and "limit" in message)
    ):
        return StepError(
            f"module ran out of memory (limit {spec.max_pages} pages of 64 KiB; "
            "raise max_memory_pages if the module needs more)",
            kind=ErrorKind.OOM,
            retryable=False,
        )
    if "error while executing" in message or "wasm trap" in message or "unreachable" in message:
        return StepError(f"module trapped: {_trap_reason(message, logged)}", kind=ErrorKind.TRAP)
    return StepError(f"module returned an error: {message}", kind=ErrorKind.ERROR)


def _past_timeout(began: float, spec: PluginSpec) -> bool:
    return (time.perf_counter() - began) * 1000 >= spec.timeout_ms


def _interrupted(spec: PluginSpec, trap: StepError) -> StepError:
    """A trap at or after the call's timeout: the timer's interrupt, wherever it hit.

    In libextism's own handling of a host call (e.g. a log line), it surfaces as
    that call failing ("invalid handle offset for log message"): a timeout, then.
    """
    return StepError(
        f"module call timed out after {spec.timeout_ms} ms ({trap})", kind=ErrorKind.TIMEOUT
    )


# What libextism says when the Wasm it runs *around* a call (its kernel: reset,
# input, clearing the error) traps. Only an interrupt traps there: Extism times a
# call out by bumping the epoch of the compiled module's engine, which every
# instance of it shares, so another call's timeout reaching this one while
# libextism sets it up (before its own timer starts, where it would say
# "timeout") fails it with wasmtime's raw "wasm trap: interrupt", or a kernel
# backtrace, or "unable to clear error message" / "unable to set extism input" (seen
# once in 200 concurrent endless loops under load). A trap in the module's own
# function is always logged ("call to X encountered an error"): `logged` is set.
_SETUP_FAILURES = (
    "error while executing",
    "unable to clear error message",
    "unable to set extism input",
)


def _in_setup(message: str) -> bool:
    return message.startswith(_SETUP_FAILURES)


def _trap_reason(message: str, logged: str | None) -> str:
    """The wasm trap's cause ("wasm `unreachable` instruction executed") and where it hit.

    ``extism.Error`` only carries wasmtime's backtrace; the cause is in the error
    chain that libextism logs for the plugin (``Caused by: wasm trap: ...``).
    """
    text = logged or message
    cause = ""
    if "Caused by:" in text:
        after = text.split("Caused by:", 1)[1].split("Stack backtrace:", 1)[0]
        lines = [line.strip() for line in after.splitlines() if line.strip()]
        cause = lines[0].removeprefix("wasm trap: ") if lines else ""
    frame = re.search(r"^\s*0:\s+(0x[0-9a-f]+) - (.+)$", message, re.M)
    where = ""
    if frame:
        where = f"in {frame.group(2).strip().removeprefix('<unknown>!')} at {frame.group(1)}"
    return " ".join(part for part in (cause or "wasm trap", where) if part)
