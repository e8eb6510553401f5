"""Give back the model file's pages that a repacking load never reads again (Linux).

llama.cpp's CPU backend copies Q4_0, Q4_K (and, with AMX, more) weights into interleaved layouts as it loads,
reading each original through its mmap of the file. The originals then stay mapped in the process: peak RSS
counts those weights twice, and under a memory limit the kernel's reclaim, which finds them mapped and
recently referenced, keeps them while it evicts pages still in use. On this project's VMs (8 MiB read-ahead)
that made a normal load need 0.1-0.5 GiB more than a lean one (fit rows: 1.5B q4_0 1.34 against 1.11 GiB).

libllama logs "repack tensor NAME" as it starts each copy, so when the next one starts (and when the load is
done) the previous original is unmapped (madvise MADV_DONTNEED, safe on a read-only shared file mapping: a
later read would fault the same bytes back in) and dropped from the page cache (POSIX_FADV_DONTNEED).
The log lines are libllama's wording, not an API: if they change, nothing is released and nothing else changes.
Two wordings, from the vendored sources: ggml-cpu's repack buffer ("repack: repack tensor NAME with TYPE_8x8") and,
on AMX CPUs, the AMX buffer ("ggml_backend_amx_buffer_set_tensor: amx repack tensor NAME of type TYPE"), which
also takes Q8_0, Q6_K and the output matrix. A tied model's output matrix IS token_embd, loaded twice: the AMX
copy serves the output layer while the embedding lookup still reads the mapped original every token, so that
one is never given back (releasing it only made every lookup fault its rows in again).
The runner uses this only where a normal load maps the file (no transparent huge pages); elsewhere on Linux it
reads the file into memory (hugepages.py) and maps no originals to give back.
"""
from __future__ import annotations

import logging
import os
import re

from ..hugepages import madvise

_log = logging.getLogger("edgeqwen")
REPACK_LINE = re.compile(r"(?:^|: )(?:amx )?repack tensor (\S+)")   # both wordings above
STILL_READ = "token_embd.weight"   # gathered from, a row a token, from the file (never released when tied)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Releaser:
    """Feed it libllama's log lines during a load (`line`), then call `finish()`; `released` counts bytes."""

    def __init__(self, path, info):
        self.path = path
        self.ranges = {t.name: (info.data_start + t.offset, t.n_bytes) for t in info.tensors}
        self.ranges.pop(STILL_READ, None)   # untied: never repacked; tied: also the output matrix (see above)
        self.pending: str | None = None
        self.released = 0
        self._maps: list[tuple[int, int, int]] | None = None
        self._fd: int | None = None   # for fadvise, open while the load lasts

    def line(self, msg: str) -> None:
        m = REPACK_LINE.search(msg)
        if not m or m.group(1) not in self.ranges:
            return
        if self.pending:
            self._release(self.pending)   # its copy is complete: this line starts the next one
        self.pending = m.group(1)

    def finish(self) -> int:
        if self.pending:
            self._release(self.pending)
            self.pending = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.released:
            # Without read-ahead around faults: under a memory limit a fault on a page still in use (a bias, a
            # norm, the embedding table between repacked matrices) would otherwise read its whole window back
            # (8 MiB on these VMs), the dropped originals included, and evict what is in use.
            try:
                for lo, hi, _ in self._mappings():
                    madvise(lo, hi - lo, 1)   # MADV_RANDOM
            except (OSError, AttributeError) as e:
                _log.debug("cannot set MADV_RANDOM on %s: %s", self.path, e)
            _log.debug("released %.0f MiB of repacked originals from %s", self.released / 2**20, self.path)
        return self.released

    def _mappings(self) -> list[tuple[int, int, int]]:
        """(start, end, file offset) of every mapping of this file in this process: by device and inode, or by
        path (overlay filesystems show the lower file's device in /proc/self/maps)."""
        if self._maps is None:
            st = os.stat(self.path)
            dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
            real = os.path.realpath(self.path)
            self._maps = []
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) >= 5 and ((parts[4] == str(st.st_ino) and parts[3] == dev)
                                            or (len(parts) == 6 and parts[5].rstrip("\n") == real)):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self._maps.append((lo, hi, int(parts[2], 16)))
        return self._maps

    def _release(self, name: str) -> None:
        start, n = self.ranges[name]
        a, b = -(-start // _PAGE) * _PAGE, (start + n) // _PAGE * _PAGE   # whole pages only: neighbours stay
        if b <= a:
            return
        try:
            for lo, hi, off in self._mappings():
                if off <= a and b <= off + (hi - lo):
                    madvise(lo + a - off, b - a, 4)   # MADV_DONTNEED
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            os.posix_fadvise(self._fd, a, b - a, os.POSIX_FADV_DONTNEED)
            self.released += b - a
        except (OSError, AttributeError) as e:   # an optimisation only: never fail a load over it
            _log.debug("cannot release %s's original pages: %s", name, e)


def releaser_for(path, info):
    """A Releaser on Linux (where /proc/self/maps, madvise and fadvise behave as used here), None elsewhere."""
    if os.uname().sysname != "Linux" or not hasattr(os, "posix_fadvise"):
        return None
    return Releaser(path, info)
