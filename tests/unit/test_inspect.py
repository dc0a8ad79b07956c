"""inspect_wasm reads what a real module exports and imports, and refuses what is not Wasm."""

from __future__ import annotations

from pathlib import Path

import pytest

from deadlift.errors import ModuleError
from deadlift.wasm.hostfns import NAMESPACE
from deadlift.wasm.inspect import Import, WasmInfo, inspect_wasm
from tests.unit.fakes import unloadable_wasm

DIST = Path(__file__).resolve().parents[2] / "workers" / "dist"


def wasm(name: str) -> bytes:
    return (DIST / f"{name}.wasm").read_bytes()


def test_exports_of_real_modules() -> None:
    assert set(inspect_wasm(wasm("add_ten")).exports) == {"add_ten", "_main"}
    assert set(inspect_wasm(wasm("echo")).exports) == {"echo", "_main", "upper", "count"}
    assert {"spin", "bomb", "trap", "huge", "fail", "ok"} <= set(
        inspect_wasm(wasm("hostile")).exports
    )
    assert "bad_host_call" in inspect_wasm(wasm("bad_host")).exports


def test_host_imports_of_real_modules() -> None:
    charge = inspect_wasm(wasm("before_charge_action"))
    assert sorted(charge.host_imports(NAMESPACE)) == ["past_purchases", "send_email"]
    assert inspect_wasm(wasm("aggregate_discounts")).host_imports(NAMESPACE) == ["kv_incr"]
    add_ten = inspect_wasm(wasm("add_ten"))
    assert add_ten.host_imports(NAMESPACE) == []
    # The PDK's own imports are seen too, under their namespace.
    assert "input_length" in add_ten.host_imports("extism:host/env")
    assert all(i.kind == "func" for i in charge.imports)


def test_empty_module_has_nothing() -> None:
    assert inspect_wasm(b"\0asm\x01\0\0\0") == WasmInfo(exports=(), imports=())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a WebAssembly module"),
        (b"hello, world", "not a WebAssembly module"),
        (b"\x7fELF\x02\x01\x01\0", "not a WebAssembly module"),
        (b"\0asm\x02\0\0\0", "unsupported Wasm version"),
        (b"\0asm\x0d\0\x01\0", "unsupported Wasm version"),  # a component, not a core module
    ],
)
def test_not_wasm_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ModuleError, match=message):
        inspect_wasm(data)


@pytest.mark.parametrize("cut", [9, 100, 1000, -1])
def test_truncated_module_is_refused(cut: int) -> None:
    data = wasm("before_charge_action")
    with pytest.raises(ModuleError, match="truncated"):
        inspect_wasm(data[:cut])


def test_malformed_section_is_refused() -> None:
    # An import section claiming one import whose kind byte is unknown.
    body = b"\x01" + b"\x01m" + b"\x01n" + b"\x09\x00"
    data = b"\0asm\x01\0\0\0" + b"\x02" + bytes([len(body)]) + body
    with pytest.raises(ModuleError, match="unknown import kind 9"):
        inspect_wasm(data)


def test_unloadable_module_is_otherwise_well_formed() -> None:
    """The hand-made module is real Wasm: only its import makes Extism refuse it."""
    info = inspect_wasm(unloadable_wasm())
    assert info.imports == (Import("env", "nope", "func"),)
