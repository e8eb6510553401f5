"""A fast GGUF header reader: scalar metadata and tensor infos, skipping the big token arrays.

gguf.GGUFReader materialises every array (seconds for a 150k-token vocabulary); bench, plan
and the runner's file check only need sizes and a few numbers.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

VT = gguf.GGUFValueType
_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d", VT.BOOL: "<?"}


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    type: gguf.GGMLQuantizationType
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size


@dataclass
class GGUFInfo:
    metadata: dict
    tensors: list[TensorEntry]
    data_start: int
    file_size: int

    @property
    def arch(self) -> str:
        return self.metadata.get(gguf.Keys.General.ARCHITECTURE, "")

    def get(self, key: str, default=None):
        return self.metadata.get(key.format(arch=self.arch), default)

    @property
    def complete(self) -> bool:
        end = max((t.offset + t.n_bytes for t in self.tensors), default=0)
        return self.data_start + end <= self.file_size


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse a GGUF header; raises ValueError on anything malformed."""
    with open(path, "rb") as f:
        def unpack(fmt):
            size = struct.calcsize(fmt)
            b = f.read(size)
            if len(b) != size:
                raise ValueError("unexpected end of file in the header")
            return struct.unpack(fmt, b)[0]

        def string(skip=False):
            n = unpack("<Q")
            if n > 1 << 30:
                raise ValueError("impossible string length")
            if skip:
                f.seek(n, 1)
                return None
            return f.read(n).decode("utf-8", "replace")

        def value(vt, skip=False):
            if vt == VT.STRING:
                return string(skip)
            if vt == VT.ARRAY:
                sub, n = VT(unpack("<I")), unpack("<Q")
                if sub in _SCALAR:
                    size = struct.calcsize(_SCALAR[sub])
                    if skip or n > 64:
                        f.seek(size * n, 1)
                        return f"<array of {n}>"
                    return [value(sub) for _ in range(n)]
                for _ in range(n):
                    value(sub, skip=True)
                return f"<array of {n}>"
            return unpack(_SCALAR[vt])

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(VT(unpack("<I")))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
            tensors.append(TensorEntry(name, dims, gguf.GGMLQuantizationType(unpack("<I")), unpack("<Q")))
        align = meta.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        pos = f.tell()
        data_start = (pos + align - 1) // align * align
    return GGUFInfo(meta, tensors, data_start, path.stat().st_size)
