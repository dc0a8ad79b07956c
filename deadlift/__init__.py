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
from deadlift.events import Event
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostCall, HostFunction, host_function
from deadlift.worker import StepReport, Worker
from deadlift.workflow import Step, Workflow, load_workflow, parse_workflow

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
