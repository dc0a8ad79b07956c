"""Instantiate a module in a child process, with a deadline, before Deadlift trusts it.

Instantiating a Wasm module runs its start function (AssemblyScript puts
top-level statements there), and nothing bounds it: Extism's ``timeout_ms``
applies to calls only. A start function that loops would hang the thread that
instantiates it forever (no timeout, no cancel handle: the plugin does not exist
yet), and one that calls Extism kernel functions (input, output, log…, which
expect a call in progress) crashes the whole process with SIGSEGV (measured with
libextism 1.41). So ``module push`` and a worker's first load of a binary
instantiate it in a throwaway child process (:mod:`deadlift.wasm.probe_child`,
~50 ms: it imports Extism only) and kill it at the deadline.

A verdict is cached per binary, memory cap, linked functions and deadline for
the life of the process (a worker probes each binary once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from deadlift.errors import ModuleError
from deadlift.wasm.hostfns import NAMESPACE
from deadlift.wasm.inspect import inspect_wasm

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_PAGES = 256
CHILD = Path(__file__).with_name("probe_child.py")
KERNEL_HINT = (
    "its start function (top-level code) may call Extism kernel functions (input, output, "
    "log, config, var, http), which only work inside a call: move that code into an "
    "exported function and push a new version"
)

_verdicts: dict[tuple[str, int, tuple[str, ...], float], str | None] = {}


async def probe_module(
    wasm: bytes,
    *,
    host_functions: Sequence[str] | None = None,
    max_pages: int = DEFAULT_MAX_PAGES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "",
) -> None:
    """Raise ModuleError unless ``wasm`` instantiates in a child process within ``timeout_s``.

    ``host_functions`` are linked as stubs (default: every function the module
    imports from ``extism:host/user``); other imports must be Extism's own.
    ``what`` (e.g. ``module add_ten``) starts the error message.

    Raises:
        ModuleError: the start function did not finish in time, the child died
            (a signal is named), or Extism refused to link or instantiate it.
    """
    info = inspect_wasm(wasm)
    wanted = info.host_imports(NAMESPACE) if host_functions is None else host_functions
    names = tuple(sorted(wanted))
    key = (hashlib.sha256(wasm).hexdigest(), max_pages, names, timeout_s)
    if key not in _verdicts:
        wasi = any(i.module.startswith("wasi") for i in info.imports)
        _verdicts[key] = await _run_child(wasm, names, max_pages, wasi, timeout_s)
    problem = _verdicts[key]
    if problem is not None:
        raise ModuleError(f"{what}: {problem}" if what else problem)


async def _run_child(
    wasm: bytes, names: tuple[str, ...], max_pages: int, wasi: bool, timeout_s: float
) -> str | None:
    """Run the probe child; the problem it found, or None."""
    # -P: the script's directory is not put on sys.path (deadlift/wasm/inspect.py
    # would shadow the standard library's inspect).
    args = [sys.executable, "-P", str(CHILD), str(max_pages), "1" if wasi else "0", *names]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:  # not the module's fault: no verdict to cache
        raise ModuleError(f"cannot start the module probe ({sys.executable}): {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(wasm), timeout_s)
    except TimeoutError:
        return (
            f"module start did not finish within {timeout_s:g} s (its start function may "
            "loop): top-level code runs while the module is instantiated, before any call; "
            "move that work into an exported function and push a new version (or raise "
            "DEADLIFT_PROBE_TIMEOUT_S if its start is merely slow)"
        )
    finally:
        if proc.returncode is None:  # the deadline, or we were cancelled: never leave it running
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    problem = verdict(proc.returncode, out, err)
    if problem is not None and (proc.returncode or 0) > 0:  # the probe failed: no verdict
        raise ModuleError(problem)
    return problem


def verdict(returncode: int | None, out: bytes, err: bytes) -> str | None:
    """Turn the child's exit status and output into a problem (None: loadable)."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"module crashed the process instantiating it ({name}); {KERNEL_HINT}"
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if returncode != 0 or not isinstance(report, dict):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        detail = f": {' | '.join(tail)}" if tail else ""
        return f"the module probe exited with status {returncode}{detail}"
    if report.get("ok"):
        return None
    return f"Extism cannot instantiate the module: {report.get('error')}"
