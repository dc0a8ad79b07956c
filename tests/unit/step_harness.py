"""What the step-runner unit tests share: the real modules, a Wasm host holding them,
the executor, and the harness a test drives a :class:`StepRunner` through."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

from deadlift.bus.publisher import MemoryPublisher
from deadlift.runtime.context import StepReport
from deadlift.runtime.step import StepRunner
from deadlift.wasm.host import ModuleHost
from tests.conftest import module_path
from tests.unit.fakes import FakeMsg

MODULES = ("add_ten", "multiply_by_five", "echo", "filter_even", "hostile", "before_charge_action")
WASM = {name: module_path(name).read_bytes() for name in MODULES}
SHA = {name: hashlib.sha256(wasm).hexdigest() for name, wasm in WASM.items()}


def module_host() -> ModuleHost:
    """A Wasm host with every module of :data:`MODULES` loaded."""
    host = ModuleHost()
    for name, wasm in WASM.items():
        host.add_binary(SHA[name], wasm)
    return host


@dataclass
class Harness:
    """A step runner with everything it was handed, and what it reported."""

    runner: StepRunner
    publisher: MemoryPublisher
    reports: list[StepReport]
    stats: Counter[str]

    async def deliver(self, *msgs: FakeMsg) -> None:
        """Hand the runner one batch, as a fetch would, and wait until it is settled."""
        await self.runner.handle(cast(Any, list(msgs)))
