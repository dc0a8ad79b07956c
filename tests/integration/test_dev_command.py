"""``deadlift dev``: Ctrl-C stops it cleanly; a second Ctrl-C ends it at once, no traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deadlift.ops.server import free_port
from tests.conftest import ROOT

CLI = [sys.executable, "-m", "deadlift.cli"]


@pytest.mark.slow  # starts a server, pushes every module, applies every workflow
@pytest.mark.timeout(300)
def test_a_second_ctrl_c_ends_dev_at_once_without_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*CLI, "dev", "--port", str(port), "--store-dir", str(tmp_path / "store")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 90
        assert process.stdout is not None
        for line in process.stdout:
            if "Ctrl-C to stop" in line or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in err, err[-3000:]
    assert process.returncode in (0, 130)
