"""NATS I/O: connections, streams and consumers, durable publishing, the registry, dead letters.

The bus moves bytes and headers; :mod:`deadlift.wire.events` knows how to encode
them, and :mod:`deadlift.model.topology` names everything.
"""

from deadlift.bus.connection import DeadliftClient, connect, with_org_credentials
from deadlift.bus.on_demand import (
    count_from,
    ensure_on_demand,
    ensure_trigger,
    ensure_triggers,
    events_from,
    input_has_events,
    make_consumer,
)
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
    configured_as,
    consumer_config,
    delete_consumer,
    delete_consumers,
    ensure_consumers,
    ensure_steps_stream,
    ensure_streams,
    import_stream,
    list_consumers,
    made_at_apply,
    step_inputs,
    trigger_inputs,
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
    "configured_as",
    "connect",
    "consumer_config",
    "count_from",
    "delete_consumer",
    "delete_consumers",
    "ensure_consumers",
    "ensure_on_demand",
    "ensure_steps_stream",
    "ensure_streams",
    "ensure_trigger",
    "ensure_triggers",
    "events_from",
    "import_stream",
    "input_has_events",
    "list_consumers",
    "made_at_apply",
    "make_consumer",
    "step_inputs",
    "trigger_inputs",
    "with_org_credentials",
]
