"""The wire format: Deadlift events as CloudEvents in NATS headers with a msgpack body."""
