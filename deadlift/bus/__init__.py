"""NATS I/O: connections, streams and consumers, durable publishing, the registry, dead letters.

The bus moves bytes and headers; :mod:`deadlift.wire.events` knows how to encode
them, and :mod:`deadlift.model.topology` names everything.
"""

from deadlift.bus.connection import DeadliftClient, connect, with_org_credentials
from deadlift.bus.publisher import (
    MSG_ID,
    JetStreamPublisher,
    MemoryPublisher,
    Publisher,
    check_size,
)
from deadlift.bus.streams import (
    StepBinding,
    StepInput,
    consumer_config,
    delete_consumer,
    delete_consumers,
    ensure_consumers,
    ensure_streams,
    import_stream,
    step_inputs,
)

__all__ = [
    "MSG_ID",
    "DeadliftClient",
    "JetStreamPublisher",
    "MemoryPublisher",
    "Publisher",
    "StepBinding",
    "StepInput",
    "check_size",
    "connect",
    "consumer_config",
    "delete_consumer",
    "delete_consumers",
    "ensure_consumers",
    "ensure_streams",
    "import_stream",
    "step_inputs",
    "with_org_credentials",
]
