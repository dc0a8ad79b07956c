"""KV buckets, created leaner than nats-py creates them.

nats-py's ``create_key_value`` always turns on per-message TTLs
(``allow_msg_ttl``), which nats-server backs with a ~31 KB structure per stream,
kept for the stream's life (``bench/org_cost.py``: a bucket costs 65 KB of server
heap with it, 34 KB without). Deadlift never sets a message TTL, and every org
has two to three buckets, so they are created here with the same configuration
minus that flag, and opened with nats-py as usual.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

# nats-py's default: a KV put's duplicate window (the bucket has no max age).
DUPLICATE_WINDOW_S = 120.0


def kv_stream_config(bucket: str, *, history: int, replicas: int = 1) -> StreamConfig:
    """The stream behind KV bucket ``bucket``: nats-py's layout, no message TTLs.

    No direct get either, as before: it would add a subscription per bucket.
    """
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msgs_per_subject=history,
        num_replicas=replicas,
        storage=StorageType.FILE,
    )


async def key_value(
    js: JetStreamContext, bucket: str, *, history: int, replicas: int = 1
) -> KeyValue:
    """Open KV bucket ``bucket``, creating it on first use."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    # Two creators racing get the same config: the server accepts both.
    await js.add_stream(kv_stream_config(bucket, history=history, replicas=replicas))
    return await js.key_value(bucket)


def kv_in(js: JetStreamContext, bucket: str, stream: str) -> KeyValue:
    """KV ``bucket``'s key space kept in ``stream`` (which captures ``$KV.<bucket>.>``)."""
    return KeyValue(name=bucket, stream=stream, pre=f"$KV.{bucket}.", js=js, direct=False)


def stream_of(kv: KeyValue) -> str:
    """The stream that holds a KV bucket's entries."""
    return str(kv._stream)  # nats-py keeps it private; it is set from its constructor


def prefix_of(kv: KeyValue) -> str:
    """A KV bucket's subject prefix, ``$KV.<bucket>.``."""
    return str(kv._pre)
