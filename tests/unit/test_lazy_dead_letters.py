"""The dead-letter stream is created by the org's first dead letter, never by an apply.

Without a server: a JetStream stand-in holding stream configurations (with the
account's ``max_streams``), and a publisher that no stream takes until the stream
is created. ``tests/integration/test_dead_letters.py`` does it on a real server.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast

import nats.js.errors
import pytest
from nats.js.api import PubAck, StreamConfig

from deadlift.bus import dlq
from deadlift.bus.publisher import MemoryPublisher
from deadlift.errors import DeadliftError, PermissionDeniedError
from deadlift.model.topology import Stream
from deadlift.settings import Settings

SETTINGS = Settings(nats_url="nats://127.0.0.1:1", duplicate_window_s=120.0)


class Streams:
    """The JetStream calls ``dlq.ensure_stream`` makes, over stream configurations."""

    def __init__(self, *, max_streams: int = -1) -> None:
        self.configs: dict[str, StreamConfig] = {}
        self.max_streams = max_streams
        self.added: list[str] = []

    async def add_stream(self, config: StreamConfig) -> Any:
        assert config.name
        if config.name in self.configs:
            if self.configs[config.name] != config:
                raise nats.js.errors.BadRequestError(err_code=dlq.STREAM_NAME_IN_USE)
            return SimpleNamespace(config=config)
        if 0 < self.max_streams <= len(self.configs):
            raise nats.js.errors.BadRequestError(
                err_code=10027, description="maximum number of streams reached"
            )
        self.configs[config.name] = config
        self.added.append(config.name)
        return SimpleNamespace(config=config)


class Missing(MemoryPublisher):
    """A publisher no stream takes (nats-py's "no responders") until the DLQ stream exists."""

    def __init__(self, streams: Streams, error: DeadliftError | None = None) -> None:
        super().__init__()
        self.streams = streams
        self.error = error or DeadliftError("no stream captures deadlift.dlq.acme.flow.s")
        self.refused = 0

    async def publish(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str | None = None
    ) -> PubAck:
        if Stream.DLQ not in self.streams.configs:
            self.refused += 1
            raise self.error
        return await super().publish(subject, body, headers, msg_id=msg_id)


async def record(publisher: MemoryPublisher, streams: Streams | None) -> None:
    async def create() -> None:
        assert streams is not None
        await dlq.ensure_stream(cast(Any, streams), SETTINGS)

    await dlq.record(
        publisher,
        org="acme",
        workflow="flow",
        step="s",
        module="0" * 64,
        subject="acme.in",
        headers={"ce-id": "e1"},
        body=b"{}",
        stream=Stream.EVENTS,
        seq=3,
        attempts=1,
        kind="trap",
        error="boom",
        create_stream=create if streams is not None else None,
    )


async def test_the_first_dead_letter_creates_the_stream_and_is_stored() -> None:
    js = Streams()
    publisher = Missing(js)
    await record(publisher, js)
    assert publisher.refused == 1 and js.added == [Stream.DLQ]
    [letter] = publisher.messages
    assert letter.headers[dlq.H_KIND] == "trap"
    await record(publisher, js)  # the next one: no second creation, no duplicate
    assert js.added == [Stream.DLQ] and len(publisher.messages) == 1


async def test_a_stream_made_meanwhile_with_other_settings_is_kept_as_it_is() -> None:
    js = Streams()
    older = SETTINGS.model_copy(update={"duplicate_window_s": 60})
    await dlq.ensure_stream(cast(Any, js), older)
    await dlq.ensure_stream(cast(Any, js), SETTINGS)  # "name in use": fine
    assert js.configs[Stream.DLQ].duplicate_window == 60


async def test_a_refused_letter_is_not_retried_and_a_full_account_says_so() -> None:
    js = Streams()
    denied = Missing(js, PermissionDeniedError("not allowed to publish"))
    with pytest.raises(PermissionDeniedError):
        await record(denied, js)
    assert denied.refused == 1 and js.added == []
    with pytest.raises(DeadliftError, match="no stream captures"):
        await record(Missing(js), None)  # no way to create it: the caller keeps the event
    full = Streams(max_streams=1)
    await full.add_stream(StreamConfig(name=Stream.STEPS, subjects=["deadlift.step.>"]))
    with pytest.raises(DeadliftError, match="max_streams"):
        await record(Missing(full), full)
