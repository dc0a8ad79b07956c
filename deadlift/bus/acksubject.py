"""What a delivered JetStream message's ack subject says: its delivery count, stream and sequence.

nats-py's ``Msg.metadata`` parses the same subject into nested dataclasses and a
datetime on every message; a step reads three numbers of it per event. The ack
subject's two forms (ADR-15) are read here, the same way nats-py reads them.
"""

from __future__ import annotations

from typing import Any

_V1_TOKENS = 9  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>
_V2_TOKENS = 11  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>… (+ a token)


def delivery(msg: Any) -> tuple[int, str, int]:
    """``(num_delivered, stream, stream sequence)`` of a message a consumer delivered.

    Raises:
        nats.errors.NotJSMessageError: not a JetStream delivery (as ``msg.metadata``).
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) >= _V1_TOKENS and tokens[0] == "$JS" and tokens[1] == "ACK":
        if len(tokens) == _V1_TOKENS:
            return int(tokens[4]), tokens[2], int(tokens[5])
        if len(tokens) >= _V2_TOKENS:
            return int(tokens[6]), tokens[4], int(tokens[7])
    meta = msg.metadata  # anything else: nats-py's reading (or its error)
    return meta.num_delivered, meta.stream, meta.sequence.stream if meta.sequence else 0
