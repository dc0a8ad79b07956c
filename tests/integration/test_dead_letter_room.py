"""An org's steps and dead-letter streams, made when first needed, need room among
the streams its account may have: ``workflow apply`` keeps it free for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from deadlift import bus
from deadlift.bus import dlq
from deadlift.errors import ConfigError
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import Stream
from deadlift.runtime.worker import Worker
from deadlift.wire import events
from tests.integration.accounts import Connect, write_orgs
from tests.manifests import logins

# The registry and the events: 2 streams; the steps and the dead letters come later.
FLOW = """
name: fragile
org: {org}
trigger: {org}.in
steps:
  - {{name: run, module: hostile, function: trap, publish: [{org}.out],
     retry: {{max_attempts: 1}}}}
"""


@pytest.fixture(scope="module")
def orgs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    limits = {"tight": {"limits": {"max_streams": 3}}, "roomy": {"limits": {"max_streams": 4}}}
    return write_orgs(tmp_path_factory.mktemp("orgs"), {"orgs": logins("tight", "roomy", **limits)})


async def test_apply_keeps_a_stream_free_for_the_first_dead_letter(
    connect: Connect, orgs: OrgManifest
) -> None:
    tight = await connect("tight", streams=False)
    await tight.push("hostile")
    with pytest.raises(
        ConfigError, match=r"no room is left for DEADLIFT_STEPS and DEADLIFT_DLQ.*max_streams"
    ):
        await tight.apply(FLOW.format(org="tight"), orgs)

    roomy = await connect("roomy", streams=False)
    await roomy.push("hostile")
    await roomy.apply(FLOW.format(org="roomy"), orgs)
    assert not await dlq.stream_exists(roomy.js)
    event = events.new_event({"v": 1}, source="test", type="t", id="e1")
    headers, body = events.encode(event)
    async with Worker(roomy.nc, settings=roomy.settings, orgs=orgs, advertise=False) as worker:
        await bus.JetStreamPublisher(roomy.nc).publish("roomy.in", body, headers, msg_id="e1")
        await worker.drain()

    [letter] = await dlq.letters(roomy.js)  # in the stream its account had room for
    assert (letter.headers["ce-id"], letter.kind) == ("e1", "trap")
    # A 1-step workflow that never replayed: no steps stream was ever made.
    assert (await roomy.js.account_info()).streams == 3
    assert (await roomy.js.stream_info(Stream.DLQ)).state.messages == 1
