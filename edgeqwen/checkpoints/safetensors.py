"""A small memory-mapped safetensors reader that never holds a whole tensor in memory.

Chunks are read through mmap and the pages dropped from the process afterwards, so peak RSS
stays at a few chunks whatever the model size. No torch, no pickle.
"""
from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SourceError

# safetensors dtype -> (numpy storage dtype, bytes per element); bf16 is carried as raw uint16.
DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}
CHUNK_BYTES = 16 << 20
# What a build may write besides: MLX's packed quantized weights (a source checkpoint never holds them).
WRITE_DTYPES = {**DTYPES, "U32": (np.uint32, 4)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int
    file: Path

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: Path, dtypes: dict = DTYPES) -> dict[str, TensorInfo]:
    """Parse and validate one file's header: truncation and unknown dtypes fail here, before any work.
    dtypes: what may appear (a checkpoint's floats; a build's WRITE_DTYPES)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 100 << 20):
                raise SourceError(f"{path}: not a safetensors file (header length {n} is impossible)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: cannot read safetensors header: {e}") from None
    except RecursionError:
        raise SourceError(f"{path}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header must be a JSON object")
    from ..schemas import TensorEntry, check_source
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise SourceError(f"{path}: __metadata__ must be an object")
            continue
        e = check_source(TensorEntry, meta, path, f"tensor {name}")
        if e.dtype not in dtypes:
            raise SourceError(f"{path}: tensor {name} has dtype {e.dtype}; only {', '.join(dtypes)} are supported")
        begin, end = e.data_offsets
        shape = tuple(e.shape)
        info = TensorInfo(name, e.dtype, shape, base + begin, base + end, path)
        if end - begin != info.n_elements * dtypes[e.dtype][1]:
            raise SourceError(f"{path}: tensor {name} size does not match its shape {shape}")
        if base + end > size:
            raise SourceError(f"{path} is truncated: tensor {name} ends at byte {base + end}, file has {size}")
        out[name] = info
    # Tensors may not share bytes: overlapping offsets would read one tensor's data as another's.
    spans = sorted((t.start, t.end, t.name) for t in out.values() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise SourceError(f"{path}: tensors {a} and {b} overlap (data_offsets)")
    return out


class Reader:
    """Reads tensors from one or more safetensors files in row chunks."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors
        self._maps: dict[Path, tuple[object, mmap.mmap]] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            f = open(path, "rb")
            self._maps[path] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return self._maps[path][1]

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Yield the tensor as 2-D row blocks (1-D tensors as one block) in storage dtype."""
        info = self.tensors[name]
        np_dtype, width = DTYPES[info.dtype]
        mm = self._map(info.file)
        row = info.shape[-1] if info.shape else 1
        n_rows = info.n_elements // max(row, 1)
        rows_per = max(1, chunk_bytes // (row * width))
        for r0 in range(0, n_rows, rows_per):
            r1 = min(n_rows, r0 + rows_per)
            off = info.start + r0 * row * width
            arr = np.frombuffer(mm, dtype=np_dtype, count=(r1 - r0) * row, offset=off).reshape(r1 - r0, row)
            yield arr
            del arr
            _drop_pages(mm, off, (r1 - r0) * row * width)

    def read(self, name: str) -> np.ndarray:
        """The whole tensor (small tensors and tests only)."""
        info = self.tensors[name]
        parts = [c.copy() for c in self.chunks(name)]
        return np.concatenate(parts).reshape(info.shape)

    def close(self) -> None:
        for f, mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a chunk is still referenced (an error in flight); GC unmaps it
                pass
            f.close()
        self._maps.clear()


def _drop_pages(mm: mmap.mmap, off: int, length: int) -> None:
    # Read-only file pages stay in the page cache; this only unmaps them from our RSS.
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        start = off - off % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm) - start, length + (off - start)))
        except (OSError, ValueError):
            pass


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def to_f32(chunk: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(chunk) if dtype == "BF16" else chunk.astype(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (as uint16), NaNs kept quiet."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]], fill, metadata=None) -> None:
    """Write a safetensors file whose tensors are produced chunk by chunk.

    specs: (name, dtype, shape); fill(name, shape) yields byte-like chunks in row order.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * WRITE_DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, _dtype, shape in specs:
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            got = 0
            for chunk in fill(name, shape):
                b = memoryview(np.ascontiguousarray(chunk)).cast("B")
                f.write(b)
                got += len(b)
            if got != want:
                raise ValueError(f"{name}: wrote {got} bytes, expected {want}")
