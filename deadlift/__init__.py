"""Deadlift: cross-company integrations as Wasm modules run by asyncio workers on NATS JetStream."""

from deadlift.errors import (
    ConfigError,
    DeadliftError,
    EventDecodeError,
    EventEncodeError,
    HostFunctionError,
    InUseError,
    ModuleError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    StepError,
)
from deadlift.model.workflow import Step, Workflow, load_workflow, parse_workflow
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostCall, HostFunction, host_function
from deadlift.wire.events import Event

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeadliftError",
    "Event",
    "EventDecodeError",
    "EventEncodeError",
    "HostCall",
    "HostFunction",
    "HostFunctionError",
    "InUseError",
    "ModuleError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Settings",
    "Step",
    "StepError",
    "StepReport",
    "Worker",
    "Workflow",
    "host_function",
    "load_workflow",
    "parse_workflow",
]
