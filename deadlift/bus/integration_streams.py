"""The streams an org keeps for its integrations: offers it hosts, runs it guests.

A host keeps each guest's offered modules in ``DEADLIFT_OFFERS_<GUEST>``; the
stream republishes the headers of what it stored to the guest (a receipt: the
offer is stored, whether or not any host process runs). A guest keeps the run
records of its modules at every host in ``DEADLIFT_GUEST_RUNS``.
"""

from __future__ import annotations

from datetime import timedelta

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig

from deadlift.model import integrations as links
from deadlift.model.orgs import OrgManifest, account_name
from deadlift.model.topology import GUEST_RUNS_STREAM, OFFERS_STREAM_PREFIX

RUNS_MAX_AGE = timedelta(days=7)
# Both count against the org's storage limit (1 GiB by default): kept small, so a
# host with many guests still has room for its own streams. Offers are binaries
# waiting for the host (the oldest go first when full); records are small JSON.
RUNS_MAX_BYTES = 128 * 1024 * 1024
OFFERS_MAX_BYTES = 64 * 1024 * 1024


def offers_stream(guest: str) -> str:
    """The host's stream of the modules ``guest`` offered it."""
    return OFFERS_STREAM_PREFIX + account_name(guest)


async def _ensure(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name or "")
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)


async def ensure_integration_streams(
    js: JetStreamContext, manifest: OrgManifest, org: str, *, replicas: int = 1
) -> list[str]:
    """Create the streams ``org`` keeps for its integrations; return their names."""
    made = []
    guests = sorted({i.guest for i in manifest.integrations_of(org).values() if i.host == org})
    for guest in guests:
        stored = links.from_subject(guest, links.OFFERS, ">")
        name = offers_stream(guest)
        await _ensure(
            js,
            StreamConfig(
                name=name,
                subjects=[stored],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_bytes=OFFERS_MAX_BYTES,
                # A re-offer of a version replaces the earlier chunk on its subject.
                max_msgs_per_subject=1,
                republish=RePublish(
                    src=stored,
                    dest=links.share_subject(guest, links.RECEIPTS, ">"),
                    headers_only=True,
                ),
            ),
        )
        made.append(name)
    if any(i.guest == org for i in manifest.integrations_of(org).values()):
        await _ensure(
            js,
            StreamConfig(
                name=GUEST_RUNS_STREAM,
                subjects=[f"{links.FROM}.*.{links.RUNS}.>"],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=RUNS_MAX_AGE.total_seconds(),
                max_bytes=RUNS_MAX_BYTES,
                discard=DiscardPolicy.OLD,
            ),
        )
        made.append(GUEST_RUNS_STREAM)
    return made
