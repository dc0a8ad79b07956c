"""The public API is small and deliberate: pinned here so changes are conscious."""

from __future__ import annotations

import deadlift
from deadlift.errors import (
    ConfigError,
    DeadliftError,
    EventDecodeError,
    InUseError,
    NotFoundError,
    PermissionDeniedError,
    StepError,
)


def test_public_names_are_pinned() -> None:
    assert sorted(deadlift.__all__) == sorted(
        [
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
    )
    for name in deadlift.__all__:
        assert getattr(deadlift, name) is not None


def test_one_exception_tree_that_also_speaks_builtin() -> None:
    assert issubclass(ConfigError, DeadliftError) and issubclass(ConfigError, ValueError)
    assert issubclass(EventDecodeError, ValueError)
    assert issubclass(NotFoundError, LookupError)
    assert issubclass(PermissionDeniedError, PermissionError)
    assert issubclass(InUseError, DeadliftError) and not issubclass(InUseError, ConfigError)
    error = StepError("boom", kind="timeout", retryable=True)
    assert (error.kind, error.retryable) == ("timeout", True)


def test_a_host_function_is_declared_with_a_decorator() -> None:
    @deadlift.host_function
    def lookup(call: deadlift.HostCall, request: object) -> object:
        """Look something up."""
        return {"ok": True}

    @deadlift.host_function(name="renamed")
    def other(call: deadlift.HostCall, request: object) -> object:
        return None

    assert isinstance(lookup, deadlift.HostFunction)
    assert (lookup.name, lookup.description) == ("lookup", "Look something up.")
    assert other.name == "renamed"
