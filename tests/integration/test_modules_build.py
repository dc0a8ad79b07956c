"""The committed workers/dist/*.wasm are exactly what workers/ sources build to.

Rebuilds every module from a copy of workers/ (sources, package.json and
package-lock.json; never node_modules or dist) with the same commands as
`make modules`, then compares byte for byte. Needs node/npm and the npm registry
(or a warm npm cache); skipped where npx is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "workers"
DIST = WORKERS / "dist"
NOT_MODULES = {"lib", "dist", "node_modules"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(cmd: list[str], cwd: Path, timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JSON_")}
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )


def _module_sources() -> set[str]:
    return {
        p.name
        for p in WORKERS.iterdir()
        if p.is_dir() and p.name not in NOT_MODULES and (p / "index.ts").is_file()
    }


def test_every_module_source_has_committed_wasm() -> None:
    built = {p.stem for p in DIST.glob("*.wasm")}
    assert built == _module_sources()


@pytest.mark.timeout(600)
def test_modules_rebuild_byte_for_byte(tmp_path: Path) -> None:
    npx = shutil.which("npx")
    npm = shutil.which("npm")
    if npx is None or npm is None:
        pytest.skip("npx not available: cannot rebuild workers/ (install Node.js and npm)")

    copy = tmp_path / "workers"
    shutil.copytree(WORKERS, copy, ignore=shutil.ignore_patterns("node_modules", "dist"))
    _run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], copy, timeout=300)
    _run([npm, "run", "build"], copy, timeout=500)

    committed = {p.name: _sha(p) for p in sorted(DIST.glob("*.wasm"))}
    rebuilt = {p.name: _sha(p) for p in sorted((copy / "dist").glob("*.wasm"))}
    assert committed, "no committed modules in workers/dist"
    assert sorted(rebuilt) == sorted(committed)
    differing = [
        f"{name} (committed {committed[name][:12]}, rebuilt {rebuilt[name][:12]})"
        for name in committed
        if rebuilt[name] != committed[name]
    ]
    assert not differing, (
        "rebuilt modules differ from workers/dist (run `make modules` and commit them): "
        + ", ".join(differing)
    )
