"""Worker memory under a module that runs out of memory on every call (issue 14).

It runs ``hostile.bomb`` (allocates until its ``max_pages`` are used up) through
``ModuleHost.call`` the way a worker does: batches of ``--batch`` events split
over ``--threads`` executor threads, each event's StepError kept until its whole
batch is done. It prints the process RSS (``/proc/self/statm``) at steady state
(after ``--warm`` successful calls), after ``--calls`` oom calls, and after
``--idle`` seconds idle (trimming the pools each second, as a worker does).

Run it from the repository root (about 15 s)::

    .venv/bin/python bench/hostile_memory.py --calls 1000 --max-pages 256

Exit code 0 when RSS after the calls stays under twice the steady value, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deadlift.errors import StepError
from deadlift.wasm.host import ModuleHost, PluginSpec
from deadlift.wasm.hostfns import HostCall

WASM = Path(__file__).resolve().parents[1] / "workers" / "dist" / "hostile.wasm"
MIB = 1 << 20


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--calls", type=int, default=1000, help="oom calls (default 1000)")
    parser.add_argument("--max-pages", type=int, default=256, help="module memory cap")
    parser.add_argument("--batch", type=int, default=128, help="events per batch")
    parser.add_argument("--threads", type=int, default=2, help="executor threads")
    parser.add_argument("--warm", type=int, default=200, help="successful calls first")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle at the end")
    args = parser.parse_args()

    wasm = WASM.read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    host = ModuleHost()
    host.add_binary(sha, wasm)
    spec = PluginSpec(sha256=sha, org="bench", timeout_ms=1000, max_pages=args.max_pages)

    def call(function: str) -> StepError | None:
        context = HostCall(org="bench", workflow="w", step="s", run="r", event_id="e", granted={})
        try:
            host.call(spec, function, b"{}", context)
        except StepError as exc:
            return exc
        return None

    def batches(function: str, total: int) -> list[str]:
        kinds: list[str] = []
        with ThreadPoolExecutor(args.threads) as pool:
            for start in range(0, total, args.batch):
                size = min(args.batch, total - start)
                errors = list(pool.map(call, [function] * size))  # held until the batch is done
                kinds.extend(str(e.kind) if e else "ok" for e in errors)
        return kinds

    assert set(batches("ok", args.warm)) == {"ok"}
    steady = rss()
    started = time.monotonic()
    kinds = batches("bomb", args.calls)
    took = time.monotonic() - started
    after = rss()
    for _ in range(int(args.idle)):
        time.sleep(1.0)
        host.trim(idle_for=2.0)
    idle = rss()

    print(f"max_pages={args.max_pages} ({args.max_pages * 64 // 1024} MiB per instance)")
    print(f"calls: {len(kinds)} in {took:.1f} s, kinds: {sorted(set(kinds))}")
    print(f"RSS steady:               {steady / MIB:7.1f} MiB")
    print(f"RSS after {args.calls} oom calls: {after / MIB:7.1f} MiB ({after / steady:.2f}x)")
    print(f"RSS after {args.idle:.0f} s idle:      {idle / MIB:7.1f} MiB")
    return 0 if after < 2 * steady else 1


if __name__ == "__main__":
    sys.exit(main())
