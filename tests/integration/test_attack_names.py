"""Hostile names: NUL, line breaks, whitespace, huge and non-ASCII subjects, names and versions.

Each is tried where a user can hand it to Deadlift — the CLI (click's CliRunner
against the real test server) and the library — and must be refused cleanly: a
ConfigError naming the field and what is allowed (the CLI: one line, exit code 2,
no traceback), with the client still connected and a valid publish on it still
working. The workflow parser gets the same inputs in tests/unit/test_names.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import Result
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError
from deadlift.ops.tail import subscribe_all
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import module_path, recreated
from tests.integration.conftest import cli
from tests.unit.hostile_names import (
    BAD_NAMES,
    BAD_PATTERNS,
    BAD_SUBJECTS,
    BAD_VERSIONS,
    one_line,
)

STREAM = "ATTACK_NAMES"
VALID = "attack.ok"
BAD_HEADER_VALUES = ["a\rb", "a\nb", "a\x00b", "a\r\nNats-Msg-Id: forged", "ok\x1b[2J", " padded"]


# -- the library, against the real server ---------------------------------------------------


@pytest.fixture
async def stream(nc: Client) -> str:
    """A stream capturing ``attack.>`` on the clean JetStream."""
    await recreated(lambda: nc.jetstream().add_stream(name=STREAM, subjects=["attack.>"]))
    # A stream re-created the moment its namesake was deleted can come back with the
    # old store (nats-server removes it asynchronously): start it empty regardless.
    await nc.jetstream().purge_stream(STREAM)
    return STREAM


async def still_works(nc: Client) -> None:
    """The client is connected and a valid durable publish on it is stored."""
    assert nc.is_connected and not nc.is_closed
    event = events.new_event({"ok": True}, source="test", type="test.attack")
    headers, body = events.encode(event)
    headers[events.MSG_ID] = event.id
    ack = await bus.JetStreamPublisher(nc).publish(VALID, body, headers)
    assert ack.stream == STREAM and not ack.duplicate
    msg = await nc.jetstream().get_msg(STREAM, seq=ack.seq)
    assert msg.subject == VALID and msg.headers and msg.headers[events.MSG_ID] == event.id


@pytest.mark.parametrize(("subject", "why"), BAD_SUBJECTS)
async def test_bus_publish_refuses_hostile_subjects_and_the_client_keeps_working(
    nc: Client, stream: str, subject: str, why: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await bus.JetStreamPublisher(nc).publish(subject, b"\x80", {})
    message = str(caught.value)
    one_line(message)
    assert message.startswith("subject: ") and why in message
    await still_works(nc)
    info = await nc.jetstream().stream_info(STREAM)
    assert info.state.messages == 1  # only the valid one was stored


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"ce-type": "a\rb"}, "carriage return"),
        ({"ce-type": "a\nb"}, "newline"),
        ({"ce-id": "x\r\nNats-Msg-Id: forged"}, "carriage return"),
        ({"bad name": "x"}, "invalid header name"),
        ({"bad:name": "x"}, "invalid header name"),
        ({"bad\x00name": "x"}, "invalid header name"),
    ],
)
async def test_bus_publish_refuses_headers_that_break_the_header_block(
    nc: Client, stream: str, headers: dict[str, str], why: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await bus.JetStreamPublisher(nc).publish(VALID, b"\x80", headers)
    one_line(str(caught.value))
    assert str(caught.value).startswith("headers: ") and why in str(caught.value)
    await still_works(nc)


@pytest.mark.parametrize(("subject", "why"), BAD_PATTERNS)
async def test_subscribing_refuses_hostile_subjects(
    nc: Client, stream: str, subject: str, why: str
) -> None:
    async def ignore(msg: Any) -> None:
        pass

    before = len(nc._subs)
    with pytest.raises(ConfigError, match="subject") as caught:
        await subscribe_all(nc, ["attack.fine", subject], ignore)
    assert why in str(caught.value)
    assert len(nc._subs) == before  # refused before subscribing to anything
    await still_works(nc)


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_module_push_refuses_hostile_names(registry: Registry, name: str) -> None:
    wasm = module_path("add_ten").read_bytes()
    with pytest.raises(ConfigError) as caught:
        await registry.push_module(wasm, name=name, source="add_ten.wasm")
    one_line(str(caught.value))
    assert "module name" in str(caught.value) and "lowercase letters" in str(caught.value)
    assert await registry.modules() == []


@pytest.mark.parametrize("version", BAD_VERSIONS)
async def test_module_push_refuses_hostile_versions(registry: Registry, version: str) -> None:
    wasm = module_path("add_ten").read_bytes()
    with pytest.raises(ConfigError) as caught:
        await registry.push_module(wasm, name="add_ten", version=version, source="add_ten.wasm")
    one_line(str(caught.value))
    assert "version" in str(caught.value)
    assert await registry.modules() == []


async def test_registry_lookups_refuse_hostile_refs_and_still_work(registry: Registry) -> None:
    meta, _ = await registry.push_module(
        module_path("add_ten").read_bytes(), name="add_ten", version="v1.2-rc.1"
    )
    for ref in ("add_ten\n", "add_ten@v1.2-rc.1\n", "add_ten@1..2", "add ten", "x" * 6000):
        with pytest.raises(ConfigError, match="invalid module reference"):
            await registry.resolve(ref)
        with pytest.raises(ConfigError, match="invalid module reference"):
            await registry.remove_module(ref)
    assert await registry.resolve("add_ten@v1.2-rc.1") == meta
    assert await registry.resolve("add_ten@latest") == meta


async def test_dead_letter_scopes_refuse_hostile_names(nc: Client) -> None:
    js = nc.jetstream()
    for scope in ({"org": "acme\n"}, {"workflow": "calc\x00"}, {"step": "a b"}, {"step": "a.>"}):
        with pytest.raises(ConfigError, match="lowercase letters"):
            await dlq.letters(js, **scope)
        with pytest.raises(ConfigError, match="lowercase letters"):
            await dlq.purge(js, **scope)
    assert await dlq.letters(js, org="acme", workflow="calc", step="a") == []


# -- the CLI, against the real server --------------------------------------------------------


def refused_by_cli(result: Result, field: str, why: str) -> None:
    """Exit code 2, one line on stderr naming the field and why, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    one_line(lines[0])
    assert lines[0].startswith(f"error: {field}: ") and why in lines[0], lines[0]


@pytest.mark.usefixtures("restore_logging")
async def test_cli_publish_refuses_hostile_subjects_and_headers(
    nc: Client, stream: str, settings: Settings
) -> None:
    for subject, why in BAD_SUBJECTS:
        result = await cli(settings, "publish", subject, '{"a": 1}')
        refused_by_cli(result, "SUBJECT", why)
    for value in BAD_HEADER_VALUES:
        why = "whitespace" if value == " padded" else "contains"
        refused_by_cli(await cli(settings, "publish", VALID, "{}", "--id", value), "--id", why)
        refused_by_cli(await cli(settings, "publish", VALID, "{}", "--type", value), "--type", why)
    assert (await nc.jetstream().stream_info(STREAM)).state.messages == 0
    # A subject holding rich markup is text: printed as given, never parsed.
    ok = await cli(settings, "publish", "attack.[/x]", '{"a": 1}', "--id", "run-1")
    assert ok.exit_code == 0, ok.output
    assert "published run-1 to attack.[/x]: stream ATTACK_NAMES seq 1" in ok.stdout
    stored = await nc.jetstream().get_msg(STREAM, seq=1)
    assert stored.subject == "attack.[/x]"
    await still_works(nc)


@pytest.mark.usefixtures("restore_logging")
async def test_cli_tail_refuses_hostile_subjects(settings: Settings) -> None:
    for subject, why in BAD_PATTERNS:
        refused_by_cli(await cli(settings, "tail", subject), "SUBJECT", why)
    for workflow_ref in ("calc\n", "acme.calc.x", "acme..calc", "Calc"):
        result = await cli(settings, "tail", "--workflow", workflow_ref)
        refused_by_cli(result, "--workflow", "NAME or ORG.NAME")


@pytest.mark.usefixtures("restore_logging")
async def test_cli_module_push_refuses_hostile_names_and_versions(
    registry: Registry, settings: Settings
) -> None:
    path = str(module_path("add_ten"))
    for name in BAD_NAMES:
        refused_by_cli(await cli(settings, "module", "push", path, "--name", name), "--name", "")
    for version in BAD_VERSIONS:
        result = await cli(
            settings, "module", "push", path, "--name", "adder", "--version", version
        )
        refused_by_cli(result, "--version", "")
    assert await registry.modules() == []
    ok = await cli(settings, "module", "push", path, "--name", "adder", "--version", "v1.2-rc.1")
    assert ok.exit_code == 0, ok.output
    assert [m.ref for m in await registry.modules()] == ["adder@v1.2-rc.1"]


@pytest.mark.usefixtures("restore_logging")
async def test_cli_module_push_names_the_file_when_its_stem_is_no_name(
    registry: Registry, settings: Settings, tmp_path: Any
) -> None:
    odd = tmp_path / "My Module.wasm"
    odd.write_bytes(module_path("add_ten").read_bytes())
    result = await cli(settings, "module", "push", str(odd))
    assert result.exit_code == 2 and "Traceback" not in result.output
    one_line(result.stderr)
    assert "module name (from the file name)" in result.stderr and "--name" in result.stderr


@pytest.mark.usefixtures("restore_logging")
async def test_cli_dlq_scopes_refuse_hostile_names(nc: Client, settings: Settings) -> None:
    for workflow_ref in ("calc\x00", "a.b.c", "calc ", ".calc"):
        for action in (["ls"], ["purge", "--yes"], ["replay"]):
            result = await cli(settings, "dlq", *action, "--workflow", workflow_ref)
            refused_by_cli(result, "--workflow", "NAME or ORG.NAME")
    for step in ("a\nb", "a.>", "A"):
        result = await cli(settings, "dlq", "ls", "--step", step)
        refused_by_cli(result, "--step", "lowercase letters")
    ok = await cli(settings, "dlq", "ls", "--workflow", "acme.calc", "--step", "add")
    assert ok.exit_code == 0 and "no dead letters" in ok.stdout
