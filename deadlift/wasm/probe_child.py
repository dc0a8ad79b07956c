"""The probe's child process: instantiate one module and report (see :mod:`deadlift.wasm.probe`).

Run as ``python -P deadlift/wasm/probe_child.py MAX_PAGES WASI [HOST_FUNCTION...]``
with the binary on stdin. It imports nothing of Deadlift (importing the package
costs ~0.3 s) and only Extism from outside the standard library. It prints one
JSON line, ``{"ok": true}`` or ``{"ok": false, "error": "..."}``, and exits 0;
a module whose start function hangs or crashes the process is the parent's to
notice (a deadline, a signal).
"""

from __future__ import annotations

import json
import sys
from typing import Any

NAMESPACE = "extism:host/user"
NO_CONTEXT = b'{"error":"no Deadlift call context"}'


def _stub(name: str) -> Any:
    import extism

    def stub(current: Any, inputs: list[Any], outputs: list[Any], *_: Any) -> None:
        # What the worker's trampoline answers outside a call (e.g. from a start function).
        current.return_bytes(outputs[0], NO_CONTEXT)

    return extism.host_fn(
        name=name, namespace=NAMESPACE, signature=([extism.ValType.I64], [extism.ValType.I64])
    )(stub)


def main(argv: list[str]) -> int:
    """Instantiate the module on stdin; print the verdict as one JSON line."""
    import extism
    from extism.extism import CompiledPlugin

    max_pages, wasi, names = int(argv[0]), argv[1] == "1", argv[2:]
    wasm = sys.stdin.buffer.read()
    manifest = {"wasm": [{"data": wasm}], "timeout_ms": 1000, "memory": {"max_pages": max_pages}}
    try:
        compiled = CompiledPlugin(manifest, wasi, [_stub(n) for n in names])
        extism.Plugin(compiled, functions=None)
    except extism.Error as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return 0
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
