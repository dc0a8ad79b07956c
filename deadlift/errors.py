"""One exception tree for everything Deadlift raises.

Leaf errors also inherit the matching built-in, so callers that only know
Python's exceptions still catch them (as nats-py does with TimeoutError).
"""

from __future__ import annotations


class DeadliftError(Exception):
    """Root of every error Deadlift raises."""


class ConfigError(DeadliftError, ValueError):
    """A workflow file, module manifest, setting or flag is invalid."""


class EventDecodeError(DeadliftError, ValueError):
    """A message could not be decoded as a Deadlift event."""


class EventEncodeError(DeadliftError, ValueError):
    """Event data cannot be carried by the wire format or a module codec."""


class ModuleError(DeadliftError):
    """A Wasm module is invalid, missing, or cannot be loaded by Extism."""


class NotFoundError(DeadliftError, LookupError):
    """A module, workflow or step does not exist in the registry."""


class InUseError(DeadliftError):
    """Something cannot be removed because a workflow still uses it."""


class PermissionDeniedError(DeadliftError, PermissionError):
    """The NATS server refused a publish or subscription for this user."""


class PayloadTooLargeError(DeadliftError, ValueError):
    """A message is larger than the server accepts (max_payload)."""


class StepError(DeadliftError):
    """A step failed.

    Attributes:
        kind: what went wrong — ``timeout``, ``oom``, ``trap``, ``error``,
            ``host_function``, ``decode``, ``encode``, ``output_too_large``,
            ``missing_export``.
        retryable: whether running the step again on the same event may succeed.
    """

    def __init__(self, message: str, *, kind: str = "error", retryable: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


class HostFunctionError(DeadliftError):
    """A host function failed; the step calling it fails with kind ``host_function``."""
