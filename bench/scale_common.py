"""What ``scale.py`` and ``scale_orgs.py`` share: the workflow they apply, process and
server readings (``/proc``, the monitoring port), progress lines and the table."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from deadlift.ops.server import EmbeddedServer, get_json

ROOT = Path(__file__).resolve().parents[1]
WASM = ROOT / "workers" / "dist" / "add_ten.wasm"
STEPS = 3
TICK = os.sysconf("SC_CLK_TCK")
BEGAN = time.monotonic()


def note(text: str) -> None:
    """A progress line on stderr, stamped with the seconds since the start."""
    print(f"[{time.monotonic() - BEGAN:7.1f}s] {text}", file=sys.stderr, flush=True)


def workflow_yaml(name: str, org: str, prefix: str) -> str:
    """add_ten -> add_ten -> add_ten, triggered by ``PREFIX.in``, publishing ``PREFIX.out``."""
    steps = "".join(
        f"  - {{name: s{k}, module: add_ten, function: add_ten, "
        + (f"next: [s{k + 1}]}}\n" if k < STEPS - 1 else f"publish: [{prefix}.out]}}\n")
        for k in range(STEPS)
    )
    return f"name: {name}\norg: {org}\ntrigger: {prefix}.in\nsteps:\n{steps}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int | None) -> float | None:
    """``VmRSS`` of ``pid`` in MiB; None when it is gone."""
    with contextlib.suppress(OSError, TypeError), open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    return None


def monitor(server: EmbeddedServer, path: str) -> dict[str, Any]:
    """A monitoring endpoint of the server (``varz``, ``connz?…``, ``jsz``); {} on no answer."""
    return get_json(f"http://127.0.0.1:{server.monitor_port}/{path}", timeout=10.0) or {}


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def table(rows: list[dict[str, str]], problems: list[str]) -> str:
    """A Markdown table (right-aligned), then the problems as a list."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---:|" * len(rows[0])]
    lines += ["| " + " | ".join(r.values()) + " |" for r in rows]
    return "\n".join(lines + ([""] + [f"* {p}" for p in problems] if problems else []))
