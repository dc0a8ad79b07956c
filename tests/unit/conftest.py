"""Fixtures of the step-runner unit tests: one Wasm host and one executor per module."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from deadlift.wasm.host import ModuleHost
from tests.unit.step_harness import module_host


@pytest.fixture(scope="module")
def host() -> ModuleHost:
    return module_host()


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-wasm") as pool:
        yield pool
