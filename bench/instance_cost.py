"""What a fresh module instance costs: the floor of a worker serving many steps at once.

Instances are pooled per step (no module state crosses steps), so a step's first
event after a start, or after its idle instances were given back, pays for a new
one: creating it, its first call (Extism sets the instance up then), and later
dropping it. Each phase also shows its minor page faults per instance: memory
touched for the first time, which the kernel must zero (4 KiB each). A worker
starting N workflows of 3 steps with an event each pays this 3N times, on its
module threads. From the repository root::

    .venv/bin/python bench/instance_cost.py [--module add_ten] [--instances 500]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path

import extism

from deadlift.wasm.host import PluginSpec, compile_module

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("create", "first_call", "warm_call", "drop")


def _faults() -> int:
    """Minor page faults of this process so far (a fresh page touched: zeroed by the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(module: str, function: str, instances: int) -> dict[str, float]:
    """Per instance: milliseconds of create, first call, a warm call, drop; and the
    minor page faults of each."""
    wasm = (ROOT / "workers" / "dist" / f"{module}.wasm").read_bytes()
    spec = PluginSpec(sha256="0" * 64, org="bench", timeout_ms=1000, max_pages=256)
    compiled = compile_module(wasm, spec)
    data = json.dumps({"value": 1}).encode()
    marks = [(time.perf_counter(), _faults())]
    plugins = [extism.Plugin(compiled, functions=None) for _ in range(instances)]
    marks.append((time.perf_counter(), _faults()))
    for _ in range(2):  # the first call, then a warm one
        for plugin in plugins:
            plugin.call(function, data, parse=bytes)
        marks.append((time.perf_counter(), _faults()))
    del plugins, plugin
    gc.collect()
    marks.append((time.perf_counter(), _faults()))
    costs: dict[str, float] = {}
    for name, (t0, f0), (t1, f1) in zip(PHASES, marks[:-1], marks[1:], strict=True):
        costs[f"{name}_ms"] = (t1 - t0) * 1000 / instances
        costs[f"{name}_faults"] = (f1 - f0) / instances
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="add_ten")
    parser.add_argument("--function", default=None, help="default: the module's name")
    parser.add_argument("--instances", type=int, default=500)
    args = parser.parse_args()
    costs = measure(args.module, args.function or args.module, args.instances)
    for name in PHASES:
        print(
            f"{name:<14} {costs[name + '_ms']:7.3f} ms  "
            f"{costs[name + '_faults']:5.0f} minor page faults"
        )
    fresh = costs["create_ms"] + costs["first_call_ms"] + costs["drop_ms"]
    print(f"{'fresh, in all':<14} {fresh:7.3f} ms per instance")
    for workflows in (1_000, 10_000):
        cpu = 3 * workflows * fresh / 1000
        print(
            f"{workflows:,} workflows x 3 steps, an event each: {cpu:.1f} s of CPU "
            f"for instances alone ({cpu / 2:.1f} s on 2 cores)"
        )


if __name__ == "__main__":
    main()
