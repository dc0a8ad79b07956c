"""Dead letters: events a step could not process, kept with why, and replayable.

A dead letter is the original message (body and headers) on
``deadlift.dlq.<org>.<workflow>.<step>`` in stream ``DEADLIFT_DLQ``, plus
``Deadlift-*`` headers saying where it came from and what went wrong. Its id is
its sequence number in that stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext

from deadlift.bus.publisher import MSG_ID, Publisher
from deadlift.errors import NotFoundError
from deadlift.model import names, topology
from deadlift.model.topology import Stream, step_subject
from deadlift.wire import events

H_ORG = "Deadlift-Org"
H_WORKFLOW = "Deadlift-Workflow"
H_STEP = "Deadlift-Step"
H_MODULE = "Deadlift-Module"
H_SUBJECT = "Deadlift-Subject"
H_STREAM = "Deadlift-Stream"
H_SEQ = "Deadlift-Stream-Seq"
H_ATTEMPTS = "Deadlift-Attempts"
H_KIND = "Deadlift-Error-Kind"
H_ERROR = "Deadlift-Error"
H_TIME = "Deadlift-Time"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered event."""

    id: int
    org: str
    workflow: str
    step: str
    subject: str
    attempts: int
    kind: str
    error: str
    module: str
    time: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields, without the body."""
        data = asdict(self)
        data.pop("body")
        data["size"] = len(self.body)
        data["headers"] = dict(self.headers)
        return data

    def original_headers(self) -> dict[str, str]:
        """The headers the event arrived with."""
        return {
            k: v for k, v in self.headers.items() if not k.startswith("Deadlift-") and k != MSG_ID
        }


async def record(
    publisher: Publisher,
    *,
    org: str,
    workflow: str,
    step: str,
    module: str,
    subject: str,
    headers: Mapping[str, str] | None,
    body: bytes,
    stream: str,
    seq: int,
    attempts: int,
    kind: str,
    error: str,
) -> None:
    """Store a dead letter durably (deduplicated per original message and step)."""
    merged = {k: v for k, v in (headers or {}).items() if k != MSG_ID}
    merged.update(
        {
            H_ORG: org,
            H_WORKFLOW: workflow,
            H_STEP: step,
            H_MODULE: module,
            H_SUBJECT: subject,
            H_STREAM: stream,
            H_SEQ: str(seq),
            H_ATTEMPTS: str(attempts),
            H_KIND: kind,
            H_ERROR: " ".join(error.split())[:1000],
            H_TIME: events.now_rfc3339(),
        }
    )
    msg_id = topology.dlq_msg_id(stream, seq, org, workflow, step)
    await publisher.publish(topology.dlq_subject(org, workflow, step), body, merged, msg_id=msg_id)


def parse(seq: int, headers: Mapping[str, str] | None, body: bytes | None = b"") -> DeadLetter:
    """A dead letter from a stored message: its sequence in the DLQ stream, headers and body."""
    h = dict(headers or {})
    attempts = h.get(H_ATTEMPTS, "0")
    return DeadLetter(
        id=seq,
        org=h.get(H_ORG, ""),
        workflow=h.get(H_WORKFLOW, ""),
        step=h.get(H_STEP, ""),
        subject=h.get(H_SUBJECT, ""),
        attempts=int(attempts) if attempts.isdigit() else 0,
        kind=h.get(H_KIND, ""),
        error=h.get(H_ERROR, ""),
        module=h.get(H_MODULE, ""),
        time=h.get(H_TIME, ""),
        headers=h,
        body=body or b"",
    )


def step_of(subject: str) -> tuple[str, str, str] | None:
    """``(org, workflow, step)`` of a dead-letter subject (None for any other subject)."""
    prefix = f"{topology.DLQ_PREFIX}."
    parts = subject[len(prefix) :].split(".") if subject.startswith(prefix) else []
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


async def letters(
    js: JetStreamContext,
    *,
    org: str | None = None,
    workflow: str | None = None,
    step: str | None = None,
    limit: int = 10_000,
) -> list[DeadLetter]:
    """Dead letters, oldest first, optionally of one org, workflow or step.

    Raises:
        ConfigError: ``org``, ``workflow`` or ``step`` is not a valid name.
    """
    for label, value in (("org", org), ("workflow", workflow), ("step", step)):
        if value is not None:
            names.check_name(value, field=label)
    filter_subject = topology.dlq_subject(org or "*", workflow or "*", step or "*")
    try:
        info = await js.stream_info(Stream.DLQ)
    except nats.js.errors.NotFoundError:
        return []
    found: list[DeadLetter] = []
    seq = info.state.first_seq
    while info.state.messages and seq <= info.state.last_seq and len(found) < limit:
        try:
            msg = await js.get_msg(Stream.DLQ, seq=seq, subject=filter_subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        if msg.seq is None:
            break
        found.append(parse(msg.seq, msg.headers, msg.data))
        seq = msg.seq + 1
    return found


async def get(js: JetStreamContext, letter_id: int) -> DeadLetter:
    """One dead letter by id.

    Raises:
        NotFoundError: no such dead letter (maybe replayed or purged already).
    """
    try:
        msg = await js.get_msg(Stream.DLQ, seq=letter_id)
    except nats.js.errors.APIError:
        raise NotFoundError(
            f"no dead letter {letter_id}; `deadlift dlq ls` lists them (replayed ones are removed)"
        ) from None
    return parse(letter_id, msg.headers, msg.data)


async def replay(js: JetStreamContext, publisher: Publisher, letter: DeadLetter) -> str:
    """Re-inject a dead letter into its step's input, then remove it from the queue.

    The step runs the module its workflow pins *now*, so replay after pushing a
    fixed module version and re-applying the workflow. Returns the subject used.
    """
    subject = step_subject(letter.org, letter.workflow, letter.step)
    msg_id = topology.replay_msg_id(letter.id, letter.time)
    await publisher.publish(subject, letter.body, letter.original_headers(), msg_id=msg_id)
    await js.delete_msg(Stream.DLQ, letter.id)
    return subject


async def purge(
    js: JetStreamContext,
    *,
    org: str | None = None,
    workflow: str | None = None,
    step: str | None = None,
) -> int:
    """Delete dead letters (all, or of one org, workflow or step); return how many."""
    chosen = await letters(js, org=org, workflow=workflow, step=step)
    for letter in chosen:
        try:
            await js.delete_msg(Stream.DLQ, letter.id)
        except nats.js.errors.APIError:
            continue  # gone meanwhile
    return len(chosen)
