"""The registry as a user sees it: versions, content addressing, validation, removal, the CLI.

Real nats-server (the session fixture), real modules from workers/dist.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client

import deadlift.bus.registry
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError, InUseError, ModuleError, NotFoundError
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows, push_module_file, remove_workflow
from deadlift.runtime.builtins import state_bucket
from deadlift.runtime.services import StateBuckets
from deadlift.settings import Settings
from tests.conftest import ROOT, module_path
from tests.unit.fakes import unloadable_wasm

Apply = Callable[[str], Awaitable[Any]]
Push = Callable[..., Awaitable[Any]]


def wasm(name: str) -> bytes:
    return module_path(name).read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def stored_binaries(nc: Client) -> list[str]:
    """The sha256 of every binary in the module store."""
    return await (await Registry.open(nc.jetstream())).binary_shas()


async def stream_names(nc: Client) -> set[str]:
    return {str(s.config.name) for s in await nc.jetstream().streams_info()}


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI against the test server, as the installed ``deadlift`` command does."""
    entry = "import sys; from deadlift.cli import main; sys.argv[0] = 'deadlift'; main()"
    return subprocess.run(
        [sys.executable, "-c", entry, "--server", settings.nats_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


CALCULATOR = (ROOT / "config" / "workflows" / "calculator.yaml").read_text()


def one_step(module: str, *, name: str = "single", function: str = "add_ten", **extra: Any) -> str:
    lines = [
        f"name: {name}",
        "org: acme",
        f"trigger: calc.{name}",
        "steps:",
        "  - name: only",
        f"    module: '{module}'",
        f"    function: {function}",
    ]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


# -- versions ------------------------------------------------------------------


async def test_default_versions_count_up_and_every_ref_resolves(registry: Registry) -> None:
    binaries = [wasm("add_ten"), wasm("multiply_by_five"), wasm("echo")]
    metas = []
    for data in binaries:
        meta, changed = await registry.push_module(data, name="calc")
        assert changed
        metas.append(meta)
    assert [m.version for m in metas] == ["1", "2", "3"]
    assert [m.version for m in await registry.versions("calc")] == ["1", "2", "3"]
    assert [m.sha256 for m in metas] == [sha(b) for b in binaries]

    assert (await registry.resolve("calc")).sha256 == sha(binaries[2])  # latest
    assert (await registry.resolve("calc@latest")).version == "3"
    assert (await registry.resolve("calc@1")).sha256 == sha(binaries[0])
    assert (await registry.resolve("calc@2")).sha256 == sha(binaries[1])
    by_sha = await registry.resolve(f"sha256:{sha(binaries[1])}")
    assert by_sha.ref == "calc@2"
    assert await registry.binary(by_sha.sha256) == binaries[1]


async def test_latest_is_the_newest_push_not_the_highest_version(registry: Registry) -> None:
    await registry.push_module(wasm("add_ten"), name="calc", version="9")
    await registry.push_module(wasm("echo"), name="calc", version="10")
    await registry.push_module(wasm("multiply_by_five"), name="calc", version="2.0-beta")
    assert (await registry.resolve("calc")).ref == "calc@2.0-beta"
    # The default next version counts on from the highest integer version.
    meta, _ = await registry.push_module(wasm("filter_even"), name="calc")
    assert meta.version == "11"
    assert (await registry.resolve("calc")).ref == "calc@11"


async def test_same_binary_again_is_a_no_op(registry: Registry, nc: Client) -> None:
    data = wasm("add_ten")
    first, changed = await registry.push_module(data, name="adder")
    assert changed
    again, changed = await registry.push_module(data, name="adder")
    assert (again, changed) == (first, False)
    pinned, changed = await registry.push_module(data, name="adder", version="1")
    assert (pinned, changed) == (first, False)
    assert [m.version for m in await registry.versions("adder")] == ["1"]
    assert await stored_binaries(nc) == [first.sha256]


async def test_new_binary_under_existing_version_is_refused(registry: Registry) -> None:
    original, _ = await registry.push_module(wasm("add_ten"), name="adder", version="1.0")
    with pytest.raises(ConfigError, match=r"adder@1\.0") as caught:
        await registry.push_module(wasm("echo"), name="adder", version="1.0")
    assert "immutable" in str(caught.value)
    assert await registry.versions("adder") == [original]
    assert await registry.binary((await registry.resolve("adder@1.0")).sha256) == wasm("add_ten")


async def test_concurrent_pushes_never_overwrite_a_version(registry: Registry) -> None:
    one, two = wasm("add_ten"), wasm("echo")
    pushed = await asyncio.gather(
        registry.push_module(one, name="calc"), registry.push_module(two, name="calc")
    )
    assert sorted(meta.version for meta, _ in pushed) == ["1", "2"]
    assert {m.sha256 for m in await registry.versions("calc")} == {sha(one), sha(two)}

    results = await asyncio.gather(
        registry.push_module(one, name="pinned", version="1.0"),
        registry.push_module(two, name="pinned", version="1.0"),
        return_exceptions=True,
    )
    [winner] = [r for r in results if isinstance(r, tuple)]
    [refused] = [r for r in results if isinstance(r, Exception)]
    assert isinstance(refused, ConfigError) and "immutable" in str(refused)
    assert await registry.versions("pinned") == [winner[0]]


async def test_unknown_module_or_version_is_not_found(registry: Registry) -> None:
    await registry.push_module(wasm("add_ten"), name="adder")
    await registry.push_module(wasm("echo"), name="adder")
    with pytest.raises(NotFoundError, match=r"'adder' has no version '7' \(versions: 1, 2\)"):
        await registry.resolve("adder@7")
    with pytest.raises(NotFoundError, match="'nothing' is not registered"):
        await registry.resolve("nothing")
    with pytest.raises(NotFoundError, match="no module with sha256"):
        await registry.resolve("sha256:" + "0" * 64)


async def test_one_binary_under_two_names_is_stored_once(registry: Registry, nc: Client) -> None:
    data = wasm("echo")
    alpha, _ = await registry.push_module(data, name="alpha")
    beta, changed = await registry.push_module(data, name="beta", codec="raw")
    assert changed
    assert alpha.sha256 == beta.sha256 == sha(data)
    assert (alpha.codec, beta.codec) == ("json", "raw")
    assert await stored_binaries(nc) == [alpha.sha256]

    assert [m.ref for m in await registry.remove_module("alpha")] == ["alpha@1"]
    with pytest.raises(NotFoundError):
        await registry.resolve("alpha")
    assert (await registry.resolve("beta")).sha256 == alpha.sha256
    assert await registry.binary(alpha.sha256) == data  # still there: beta uses it
    assert await stored_binaries(nc) == [alpha.sha256]

    await registry.remove_module("beta")
    assert await registry.modules() == []
    assert await stored_binaries(nc) == []  # the last name went: the orphan went too
    with pytest.raises(NotFoundError, match="missing from the store"):
        await registry.binary(alpha.sha256)


# -- apply pins each step --------------------------------------------------------


async def test_apply_pins_each_step_to_sha256_and_codec(
    registry: Registry, push: Push, apply: Apply
) -> None:
    await push("add_ten")
    await push("multiply_by_five", codec="msgpack", timeout_ms=300)
    applied = await apply(CALCULATOR)
    [stored] = await registry.workflows()
    assert stored == applied
    for step, ref, codec in (
        ("add", "add_ten", "json"),
        ("multiply", "multiply_by_five", "msgpack"),
    ):
        meta = await registry.resolve(ref)
        assert stored.step(step).module_sha256 == meta.sha256
        assert stored.step(step).codec == codec
    # The step's own timeout (500 in the file) beats the module's default (300).
    assert stored.step("multiply").timeout_ms == 500

    # A newer push does not move an applied workflow: it stays on its binary.
    await registry.push_module(wasm("echo"), name="add_ten")
    [still] = await registry.workflows()
    assert still.step("add").module_sha256 == sha(wasm("add_ten"))
    assert (await registry.resolve("add_ten")).version == "2"


# -- validation at push ----------------------------------------------------------


def _truncated() -> bytes:
    return wasm("add_ten")[:1000]


def _random() -> bytes:
    return random.Random(7).randbytes(4096)


@pytest.mark.parametrize(
    ("content", "options", "error", "message"),
    [
        pytest.param(_random, {}, ModuleError, "not a WebAssembly module", id="not-wasm"),
        pytest.param(_truncated, {}, ModuleError, "truncated", id="truncated"),
        pytest.param(unloadable_wasm, {}, ModuleError, "Extism cannot", id="extism-refuses"),
        pytest.param(
            lambda: wasm("add_ten"), {"name": "Bad Name"}, ConfigError, "Bad Name", id="bad-name"
        ),
        pytest.param(lambda: wasm("add_ten"), {"codec": "xml"}, ConfigError, "xml", id="codec"),
        pytest.param(
            lambda: wasm("add_ten"), {"version": "1/../2"}, ConfigError, "1/../2", id="version"
        ),
        pytest.param(
            lambda: wasm("add_ten"), {"version": "-1"}, ConfigError, "'-1'", id="version-dash"
        ),
    ],
)
async def test_invalid_module_is_refused_and_nothing_is_stored(
    registry: Registry,
    nc: Client,
    tmp_path: Path,
    content: Callable[[], bytes],
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    path = tmp_path / "candidate.wasm"
    path.write_bytes(content())
    with pytest.raises(error) as caught:
        await push_module_file(registry, path, **options)
    assert message in str(caught.value)
    assert str(path) in str(caught.value), "the error names the file"
    assert await registry.modules() == []
    assert await stored_binaries(nc) == []


async def test_module_over_the_size_limit_is_refused(
    registry: Registry, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deadlift.bus.registry, "MAX_MODULE_BYTES", 1024)
    with pytest.raises(ModuleError, match=r"add_ten\.wasm: \d+ bytes is over the 1024-byte"):
        await push_module_file(registry, module_path("add_ten"))
    assert await registry.modules() == []
    assert await stored_binaries(nc) == []


# -- validation at apply ---------------------------------------------------------


@pytest.mark.parametrize(
    ("workflow", "expected"),
    [
        pytest.param(
            one_step("nothing_here"),
            ["step 'only'", "module:", "'nothing_here' is not registered"],
            id="unknown-module",
        ),
        pytest.param(
            one_step("add_ten@7"),
            ["step 'only'", "module:", "no version '7'", "versions: 1"],
            id="unknown-version",
        ),
        pytest.param(
            one_step("add_ten", function="subtract"),
            ["step 'only'", "function:", "'subtract'", "exports: _main, add_ten"],
            id="missing-export",
        ),
        pytest.param(
            one_step("before_charge_action", function="before_charge_action"),
            ["step 'only'", "host_functions:", "past_purchases, send_email"],
            id="imports-not-granted",
        ),
        pytest.param(
            one_step(
                "before_charge_action",
                function="before_charge_action",
                host_functions=["send_email"],
            ),
            ["step 'only'", "host_functions:", "imports past_purchases which"],
            id="one-import-not-granted",
        ),
    ],
)
async def test_invalid_workflow_is_refused_and_nothing_is_stored(
    registry: Registry,
    nc: Client,
    settings: Settings,
    push: Push,
    workflow: str,
    expected: list[str],
) -> None:
    await push("add_ten")
    await push("before_charge_action")
    parsed = parse_workflow(workflow, source="flows/bad.yaml")
    with pytest.raises(ConfigError) as caught:
        await apply_workflows(nc.jetstream(), registry, settings, [(parsed, "flows/bad.yaml")])
    text = str(caught.value)
    assert text.startswith("flows/bad.yaml: "), text
    for part in expected:
        assert part in text, text
    assert await registry.workflows() == []
    assert Stream.EVENTS not in await stream_names(nc)


async def test_apply_is_all_or_nothing(
    registry: Registry, nc: Client, settings: Settings, push: Push
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    good = parse_workflow(CALCULATOR, source="good.yaml")
    bad = parse_workflow(one_step("add_ten", function="nope"), source="second.yaml")
    with pytest.raises(ConfigError, match=r"^second\.yaml: step 'only': function:"):
        await apply_workflows(
            nc.jetstream(), registry, settings, [(good, "good.yaml"), (bad, "second.yaml")]
        )
    assert await registry.workflows() == []
    assert Stream.EVENTS not in await stream_names(nc)
    # Both valid: both stored.
    fixed = parse_workflow(one_step("add_ten"), source="second.yaml")
    await apply_workflows(
        nc.jetstream(), registry, settings, [(good, "good.yaml"), (fixed, "second.yaml")]
    )
    assert [w.key for w in await registry.workflows()] == ["acme.calculator", "acme.single"]


# -- module rm -----------------------------------------------------------------


async def test_module_in_use_cannot_be_removed_until_its_workflow_goes(
    registry: Registry, nc: Client, push: Push, apply: Apply
) -> None:
    add_ten = await push("add_ten")
    await push("multiply_by_five")
    await apply(CALCULATOR)
    for ref in ("add_ten", "add_ten@1"):
        with pytest.raises(InUseError, match=r"acme\.calculator step 'add'"):
            await registry.remove_module(ref)
    with pytest.raises(InUseError, match=r"acme\.calculator step 'multiply'"):
        await registry.remove_module("multiply_by_five")
    assert len(await registry.modules()) == 2
    assert await registry.binary(add_ten.sha256) == wasm("add_ten")

    await remove_workflow(nc.jetstream(), registry, "calculator")
    assert await registry.workflows() == []
    assert [m.ref for m in await registry.remove_module("add_ten")] == ["add_ten@1"]
    assert [m.name for m in await registry.modules()] == ["multiply_by_five"]
    with pytest.raises(NotFoundError, match="missing from the store"):
        await registry.binary(add_ten.sha256)


async def test_module_pinned_by_sha256_cannot_be_removed(
    registry: Registry, push: Push, apply: Apply
) -> None:
    meta = await push("add_ten")
    await apply(one_step(f"sha256:{meta.sha256}"))
    with pytest.raises(InUseError, match=r"acme\.single step 'only'"):
        await registry.remove_module("add_ten")
    assert await registry.binary(meta.sha256) == wasm("add_ten")


async def test_removing_one_version_keeps_the_others(
    registry: Registry, nc: Client, apply: Apply
) -> None:
    first, _ = await registry.push_module(wasm("echo"), name="adder")
    second, _ = await registry.push_module(wasm("add_ten"), name="adder")
    await apply(one_step("adder@2"))  # uses version 2 only

    assert [m.ref for m in await registry.remove_module("adder@1")] == ["adder@1"]
    assert [m.version for m in await registry.versions("adder")] == ["2"]
    assert (await registry.resolve("adder")).sha256 == second.sha256
    assert await stored_binaries(nc) == [second.sha256]
    with pytest.raises(NotFoundError, match="missing from the store"):
        await registry.binary(first.sha256)
    with pytest.raises(NotFoundError, match=r"no version '1' \(versions: 2\)"):
        await registry.remove_module("adder@1")
    with pytest.raises(InUseError, match="step 'only'"):
        await registry.remove_module("adder@2")
    with pytest.raises(NotFoundError, match="not registered"):
        await registry.remove_module("nothing")


async def test_remove_latest_and_refs_that_name_no_version(registry: Registry) -> None:
    first, _ = await registry.push_module(wasm("echo"), name="adder")
    await registry.push_module(wasm("add_ten"), name="adder")
    assert [m.ref for m in await registry.remove_module("adder@latest")] == ["adder@2"]
    assert await registry.versions("adder") == [first]
    with pytest.raises(ConfigError, match="NAME or NAME@VERSION"):
        await registry.remove_module(f"sha256:{first.sha256}")
    assert await registry.versions("adder") == [first]
    # A removed version can be pushed again.
    again, changed = await registry.push_module(wasm("multiply_by_five"), name="adder")
    assert (again.version, changed) == ("2", True)


async def test_removing_a_version_that_shares_its_binary_keeps_the_binary(
    registry: Registry, nc: Client, apply: Apply
) -> None:
    data = wasm("add_ten")
    await registry.push_module(data, name="adder", version="1")
    await registry.push_module(data, name="adder", version="2")
    await apply(one_step("adder@2"))
    removed = await registry.remove_module("adder@1")  # the workflow pins @2, not @1
    assert [m.ref for m in removed] == ["adder@1"]
    assert await registry.binary(sha(data)) == data
    assert await stored_binaries(nc) == [sha(data)]


# -- the CLI -------------------------------------------------------------------


@pytest.mark.slow
async def test_cli_inspect_rm_and_workflow_rm(
    registry: Registry, settings: Settings, push: Push, apply: Apply
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    await registry.push_module(wasm("echo"), name="add_ten")  # add_ten@2, unused
    await apply(CALCULATOR.replace("module: add_ten", "module: add_ten@1"))

    shown = cli(settings, "module", "inspect", "add_ten@1", "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    data = wasm("add_ten")
    assert info["exports"] == ["_main", "add_ten"]
    assert info["host_imports"] == []
    assert info["size"] == len(data)
    assert info["sha256"] == sha(data)
    assert info["codec"] == "json"
    assert info["versions"] == ["1", "2"]
    assert info["used_by"] == ["acme.calculator/add"]
    latest = json.loads(cli(settings, "module", "inspect", "add_ten", "--json").stdout)
    assert (latest["version"], latest["used_by"]) == ("2", [])

    refused = cli(settings, "module", "rm", "add_ten")
    assert refused.returncode != 0
    assert "acme.calculator" in refused.stderr and "'add'" in refused.stderr, refused.stderr
    assert len(await registry.versions("add_ten")) == 2

    removed = cli(settings, "workflow", "rm", "calculator")
    assert removed.returncode == 0, removed.stderr
    assert "acme.calculator" in removed.stdout
    listed = cli(settings, "workflow", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []

    gone = cli(settings, "module", "rm", "add_ten")
    assert gone.returncode == 0, gone.stderr
    assert "add_ten@1" in gone.stdout and "add_ten@2" in gone.stdout
    assert [m.name for m in await registry.modules()] == ["multiply_by_five"]


@pytest.mark.slow
async def test_cli_module_rm_in_use_exits_1(settings: Settings, push: Push, apply: Apply) -> None:
    """A refusal is a runtime error (exit 1), not invalid input (exit 2): the ref is fine."""
    await push("add_ten")
    await apply(one_step("add_ten"))
    refused = cli(settings, "module", "rm", "add_ten")
    assert "acme.single step 'only'" in refused.stderr, refused.stderr
    assert refused.returncode == 1, refused.stderr


async def test_a_workflow_watch_ends_when_asked_to_stop(registry: Registry) -> None:
    """The worker ends its registry watch this way on shutdown: a cancel alone can be
    swallowed (Python 3.11's wait_for inside nats-py's subscribe), leaving it waiting."""
    stop = asyncio.Event()
    seen = []

    async def watch() -> None:
        async for key, _ in registry.watch_workflows(stop):
            seen.append(key)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert task.done() and task.exception() is None


# -- server cost ---------------------------------------------------------------


async def test_buckets_are_created_without_message_ttls_and_work(
    registry: Registry, nc: Client, push: Push
) -> None:
    """Every org has these buckets: per-message TTLs (unused) cost the server ~31 KB each."""
    js = nc.jetstream()
    bucket = await StateBuckets(js).of("acme")
    await bucket.put("counter", b"1")
    await push("add_ten")
    for stream in (Stream.REGISTRY, f"KV_{state_bucket('acme')}"):
        assert not (await js.stream_info(stream)).config.allow_msg_ttl, stream
    assert (await bucket.get("counter")).value == b"1"
    assert [m.name for m in await registry.modules()] == ["add_ten"]


async def test_a_bucket_created_by_nats_py_still_opens(nc: Client) -> None:
    """Buckets of earlier versions (nats-py's, with message TTLs) are used as they are."""
    js = nc.jetstream()
    name = state_bucket("globex")
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_key_value(name)
    await js.create_key_value(bucket=name, history=1)
    bucket = await StateBuckets(js).of("globex")
    await bucket.put("k", b"v")
    assert (await bucket.get("k")).value == b"v"
    assert (await js.stream_info(f"KV_{name}")).config.allow_msg_ttl
    await js.delete_key_value(name)
