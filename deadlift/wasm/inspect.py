"""Read a Wasm binary's imports and exports without instantiating it."""

from __future__ import annotations

from dataclasses import dataclass

from deadlift.errors import ModuleError

_MAGIC = b"\x00asm"
_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


@dataclass(frozen=True, slots=True)
class Import:
    """One import: ``module`` namespace, ``name`` and kind (func, memory…)."""

    module: str
    name: str
    kind: str


@dataclass(frozen=True, slots=True)
class WasmInfo:
    """What a module offers and needs."""

    exports: tuple[str, ...]  # exported functions only
    imports: tuple[Import, ...]

    def host_imports(self, namespace: str) -> list[str]:
        """Names of functions imported from ``namespace`` (e.g. ``extism:host/user``)."""
        return [i.name for i in self.imports if i.module == namespace and i.kind == "func"]


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ModuleError("truncated Wasm binary")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uleb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ModuleError("malformed LEB128 integer in Wasm binary")

    def name(self) -> str:
        length = self.uleb()
        if self.pos + length > self.end:
            raise ModuleError("truncated name in Wasm binary")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_limits(self) -> None:
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()


def inspect_wasm(data: bytes) -> WasmInfo:
    """Parse the import and export sections of a Wasm binary.

    Raises:
        ModuleError: the bytes are not a Wasm module.
    """
    if data[:4] != _MAGIC:
        raise ModuleError("not a WebAssembly module (missing the \\0asm header)")
    if data[4:8] != b"\x01\x00\x00\x00":
        raise ModuleError("unsupported Wasm version (a core module, version 1, is required)")
    reader = _Reader(data, 8)
    exports: list[str] = []
    imports: list[Import] = []
    while reader.pos < len(data):
        section = reader.byte()
        size = reader.uleb()
        start, end = reader.pos, reader.pos + size
        if end > len(data):
            raise ModuleError("truncated Wasm section")
        body = _Reader(data, start, end)
        if section == 2:
            imports = _imports(body)
        elif section == 7:
            exports = _exports(body)
        reader.pos = end
    return WasmInfo(exports=tuple(exports), imports=tuple(imports))


def _imports(r: _Reader) -> list[Import]:
    found = []
    for _ in range(r.uleb()):
        module, name, kind = r.name(), r.name(), r.byte()
        if kind == 0:
            r.uleb()
        elif kind == 1:
            r.byte()
            r.skip_limits()
        elif kind == 2:
            r.skip_limits()
        elif kind == 3:
            r.byte()
            r.byte()
        elif kind == 4:
            r.byte()
            r.uleb()
        else:
            raise ModuleError(f"unknown import kind {kind} in Wasm binary")
        found.append(Import(module, name, _KINDS[kind]))
    return found


def _exports(r: _Reader) -> list[str]:
    found = []
    for _ in range(r.uleb()):
        name, kind = r.name(), r.byte()
        r.uleb()
        if kind == 0:
            found.append(name)
    return found
