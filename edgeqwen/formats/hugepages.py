"""Transparent huge pages for the weights libllama copies into memory as it loads (Linux).

Decode reads every weight matrix for every token, and in 4 KiB pages the TLB misses cost speed. Two kinds of
weights are in memory libllama allocates: the copies its CPU backend repacks Q4_0, Q4_K (and, with AMX, more)
into, and, in a normal load (llama_runner: no mmap where this module is available), every other tensor, read
from the file into a "CPU" buffer. THP "madvise", the usual default, gives that malloc'd memory no huge pages:
llama-bench's own tg128 on the real 0.5B q4_0 was 1.037x as fast with glibc's `glibc.malloc.hugetlb=1` (median
of 6 pairs, AMD EPYC AVX2, README). libllama logs "<NAME> model buffer size = X MiB" after it allocates each
weights buffer and before it fills it, so at that line the buffers' pages are untouched: madvise(MADV_HUGEPAGE)
on the anonymous memory that appeared since it began loading tensors makes them fault in 2 MiB pages. The resident size
stays the same (the buffers are filled completely); where the kernel refuses, nothing changes. The log line is
libllama's wording, not an API. A file mapping cannot be given huge pages this way: MADV_COLLAPSE refuses a
read-only ext4 mapping (EINVAL, Linux 6.18), which is why normal loads read the file instead.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import re

_log = logging.getLogger("edgeqwen")
BUFFER_LINE = re.compile(r"(\S+) model buffer size = +([\d.]+) MiB")
TENSORS_LINE = "loading model tensors"   # after the vocabulary (tens of MiB of heap) is loaded, before the buffers
FILLED_BY_LOAD = {"CPU_REPACK", "AMX", "CPU"}   # buffers libllama allocates and fills ("CPU_Mapped" is the file)
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25   # Linux 6.1+
HUGE_PAGE = 2 << 20
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def madvise(addr: int, length: int, advice: int) -> int:
    """libc's madvise on any mapping (Python's mmap.madvise only reaches mappings Python made); 0 on success."""
    return _libc().madvise(addr, length, advice)


def anonymous_mappings() -> set[tuple[int, int]]:
    """(start, end) of this process's private anonymous read-write mappings and its heap (not the stack)."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()
            if p[1] == "rw-p" and (len(p) == 5 or p[5] == "[heap]"):
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                out.add((lo, hi))
    return out


def _new_parts(now: set[tuple[int, int]], before: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The address ranges in `now` that no range in `before` covered: new mappings, and what old ones grew by.
    glibc serves a buffer under its mmap threshold, which rises to the size of the largest mmapped chunk freed
    (up to 32 MiB, so a second load of a small model in one process), from the heap or an arena: they grow."""
    out, old = [], sorted(before)
    for lo, hi in sorted(now):
        for blo, bhi in old:
            if bhi <= lo or blo >= hi:
                continue
            if blo > lo:
                out.append((lo, blo))
            lo = max(lo, bhi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


class HugePager:
    """Feed it libllama's log lines during a load (`line`); `advised` counts the bytes given MADV_HUGEPAGE."""

    def __init__(self):
        self.before = anonymous_mappings()
        self.advised = 0

    def line(self, msg: str) -> None:
        if TENSORS_LINE in msg:
            self.before = anonymous_mappings()
            return
        m = BUFFER_LINE.search(msg)
        # the line rounds to 0.01 MiB; the memory holding the buffer is at least the size less that rounding
        size = (float(m.group(2)) - 0.005) * 2**20 if m and m.group(1) in FILLED_BY_LOAD else 0
        if size >= HUGE_PAGE:   # a buffer libllama fills, of at least one huge page
            now = anonymous_mappings()
            self.advised += _advise(_new_parts(now, self.before), size)
            self.before = now   # each range once


def _advise(ranges: list[tuple[int, int]], min_size: float, collapse: bool = False) -> int:
    """MADV_HUGEPAGE (and MADV_COLLAPSE if asked) on the ranges of at least min_size; the bytes advised."""
    done = 0
    try:
        for lo, hi in ranges:
            if hi - lo >= min_size and madvise(lo, hi - lo, MADV_HUGEPAGE) == 0:
                if collapse:   # may fail in part (e.g. pages in use): what moved, moved
                    madvise(lo, hi - lo, MADV_COLLAPSE)
                done += hi - lo
    except (OSError, AttributeError) as e:   # an optimisation only: never fail a load over it
        _log.debug("cannot ask for huge pages: %s", e)
    return done


def available() -> bool:
    """Linux with transparent huge pages not "never": MADV_HUGEPAGE gets 2 MiB pages."""
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def hugepager() -> HugePager | None:
    """A HugePager where the kernel gives huge pages on request, None elsewhere."""
    return HugePager() if available() else None


def collapse_new(before: set[tuple[int, int]]) -> int:
    """After a load that filled memory with no log line to act on first (onnxruntime: the weights MatMulNBits
    prepacks as the session is made), move the anonymous mappings (heap included) new or grown since `before`
    (taken where available()), of at least one huge page, into huge pages now (synchronous); bytes asked for."""
    return _advise(_new_parts(anonymous_mappings(), before), HUGE_PAGE, collapse=True)
