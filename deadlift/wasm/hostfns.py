"""Host functions: Python functions a host org offers to guest modules.

A host function takes the call context and the decoded JSON request and returns
a JSON-encodable response::

    from deadlift import host_function

    @host_function
    def send_email(call, request):
        ...
        return {"id": message_id}

Guests import it from namespace ``extism:host/user`` with signature
``(i64) -> i64``: the argument and the result are Extism memory offsets holding
UTF-8 JSON. Only the functions a step grants are linked into its module.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import extism

from deadlift.errors import ConfigError, HostFunctionError
from deadlift.runtime.telemetry import fail_span, host_function_span

NAMESPACE = "extism:host/user"
HostImpl = Callable[["HostCall", Any], Any]


@dataclass(frozen=True, slots=True)
class HostFunction:
    """A named host function. Create with :func:`host_function`."""

    name: str
    impl: HostImpl
    description: str = ""

    def __call__(self, call: HostCall, request: Any) -> Any:
        return self.impl(call, request)


def host_function(func: HostImpl | None = None, *, name: str | None = None) -> Any:
    """Declare a host function (``@host_function`` or ``@host_function(name="x")``).

    The function may be sync or ``async``; async ones run on the worker's event loop.
    """

    def wrap(f: HostImpl) -> HostFunction:
        return HostFunction(name or f.__name__, f, (inspect.getdoc(f) or "").split("\n")[0])

    return wrap(func) if func is not None else wrap


@dataclass(slots=True)
class HostCall:
    """What a host function knows about the call it serves."""

    org: str
    workflow: str
    step: str
    run: str
    event_id: str
    granted: Mapping[str, HostFunction]
    loop: asyncio.AbstractEventLoop | None = None
    services: Mapping[str, Any] = field(default_factory=dict, repr=False)  # holds secrets
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("deadlift.host"))
    failure: HostFunctionError | None = None
    calls: int = 0
    emitted: int = 0
    trace_context: Any = None  # the module call's span context, for host-function spans
    traceparent: str | None = None  # the input event's, passed on when not tracing
    origin: str | None = None  # the org the run came from through an import, if any
    host_timeout_s: float = 30.0  # how long an async host function may take (the step's timeout)
    # The module's log lines during this call (see deadlift.wasm.logs): at most
    # log_limit bytes pass (None: DEADLIFT_MODULE_LOG_BYTES); the rest is counted.
    log_limit: int | None = None
    log_bytes: int = 0
    log_dropped_lines: int = 0
    log_dropped_bytes: int = 0
    # When a list, the module's own lines of this call (level, escaped text) are
    # also kept here, at most logs.CAPTURE_LINES (for the run record a guest sees).
    log_lines: list[tuple[str, str]] | None = None
    log_lines_over: int = 0

    def forget_logs(self) -> None:
        """Start the call's log budget and captured lines afresh: the attempt that
        logged them was undone (cut off on the fast lane, to run again)."""
        self.log_bytes = self.log_dropped_lines = self.log_dropped_bytes = 0
        self.log_lines_over = 0
        if self.log_lines is not None:
            self.log_lines.clear()

    def run_async(self, awaitable: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run a coroutine on the worker's loop from the module's thread and wait for it.

        It may take at most ``timeout`` seconds, by default the step's call timeout:
        Extism cannot interrupt a call blocked in a host function, so the host
        function must end in time itself (else the worker's watchdog sees a stuck call).
        """
        timeout = self.host_timeout_s if timeout is None else timeout
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        problem = None
        if self.loop is None or self.loop.is_closed():
            problem = "no event loop to run an async host function on"
        elif on_loop:  # waiting here would deadlock the loop
            problem = "async host functions need the module call to run off-loop"
        if problem is not None:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # else: "coroutine ... was never awaited"
            raise HostFunctionError(problem)
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # do not leave it running on the worker's loop
            raise HostFunctionError(f"async host function did not finish in {timeout} s") from None


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def invoke(call: HostCall, name: str, raw_request: bytes) -> bytes:
    """Run host function ``name`` for a guest; never raises.

    Extism swallows exceptions raised inside host functions, so a failure is
    recorded on ``call.failure`` (the step then fails with kind
    ``host_function``) and the guest receives ``{"error": ...}``.
    """
    call.calls += 1
    try:
        impl = call.granted.get(name)
        if impl is None:
            raise HostFunctionError(f"host function {name!r} is not granted to step {call.step!r}")
        try:
            request = json.loads(raw_request) if raw_request else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise HostFunctionError(f"{name}: the module sent a request that is not JSON") from exc
        with host_function_span(call.trace_context, name) as span:
            try:
                result = impl(call, request)
                if inspect.isawaitable(result):
                    result = call.run_async(result)
            except Exception as exc:
                fail_span(span, "host_function", f"{name}: {exc}")
                raise
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
    except Exception as exc:
        error = exc if isinstance(exc, HostFunctionError) else HostFunctionError(f"{name}: {exc!r}")
        if call.failure is None:
            call.failure = error
        call.logger.warning("host function %s failed in step %s: %s", name, call.step, error)
        return json.dumps({"error": str(error)}).encode()


_TRAMPOLINES: dict[str, extism.Function] = {}
_TRAMPOLINES_LOCK = threading.Lock()


def extism_functions(names: Iterable[str]) -> list[extism.Function]:
    """Extism functions for ``names``: one shared trampoline per name, per process.

    The trampoline finds the implementation through the per-call host context,
    so one compiled module can serve any org's calls without re-linking.
    """
    functions = []
    with _TRAMPOLINES_LOCK:
        for name in sorted(set(names)):
            if name not in _TRAMPOLINES:
                _TRAMPOLINES[name] = _make_trampoline(name)
            functions.append(_TRAMPOLINES[name])
    return functions


def _make_trampoline(name: str) -> extism.Function:
    def trampoline(
        current: extism.CurrentPlugin,
        inputs: list[extism.Val],
        outputs: list[extism.Val],
        *_user_data: Any,
    ) -> None:
        call = current.host_context()
        try:
            request = current.input_bytes(inputs[0])
        except Exception:  # an offset the guest made up
            request = b"\xff"
        if not isinstance(call, HostCall):
            current.return_bytes(outputs[0], b'{"error":"no Deadlift call context"}')
            return
        current.return_bytes(outputs[0], invoke(call, name, request))

    fn: extism.Function = extism.host_fn(
        name=name, namespace=NAMESPACE, signature=([extism.ValType.I64], [extism.ValType.I64])
    )(trampoline)
    return fn


def load_pack(spec: str) -> dict[str, HostFunction]:
    """Load the host functions of a Python module (``pkg.module``) by import path.

    Every module-level :class:`HostFunction` is taken.

    Raises:
        ConfigError: the module cannot be imported or offers no host functions.
    """
    try:
        module = importlib.import_module(spec)
    except Exception as exc:  # ImportError, but also any error raised while importing it
        raise ConfigError(f"--host-functions {spec}: cannot import: {exc!r}") from exc
    found = {v.name: v for v in vars(module).values() if isinstance(v, HostFunction)}
    if not found:
        raise ConfigError(
            f"--host-functions {spec}: no functions decorated with @deadlift.host_function found"
        )
    return found
