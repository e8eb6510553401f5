"""A real memory limit for a child process: a Linux memory cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`).

This is how `bench --memory-limit` and `fit` answer "will it run in N GB" on a machine with more: the
child and everything it maps (the model file's page cache included, which the kernel charges to the
cgroup that reads it) must live within the limit, and the kernel reclaims or OOM-kills exactly as it
would on a device with that much RAM. The cgroup is made beside the one this process is in, and
removed when the run ends, whatever happened.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

from ..errors import UsageError

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'4G', '7.2G', '512M', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if not m:
        raise UsageError(f"{text!r}: give a size such as 4G, 7.2G or 512M")
    n = int(float(m.group(1)) * _UNITS.get(m.group(2), 1))
    if n < 16 << 20:
        raise UsageError(f"{text!r}: a memory limit below 16 MiB cannot hold a process")
    return n


def _own_cgroup(version: int) -> Path:
    """The cgroup this process is in, under the controller's mount (children go beside our own processes)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, ctrls, path = line.split(":", 2)
        if (version == 2 and hier == "0") or (version == 1 and "memory" in ctrls.split(",")):
            return (V2_ROOT if version == 2 else V1_ROOT) / path.lstrip("/")
    raise OSError("no memory cgroup for this process")


def _version() -> int | None:
    if (V2_ROOT / "cgroup.controllers").exists() and "memory" in (V2_ROOT / "cgroup.controllers").read_text().split():
        return 2
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return 1
    return None


def _reap(parent: Path) -> None:
    """Remove the cgroups an earlier run left behind when it was killed outright (SIGKILL skips __exit__):
    empty ones whose process is gone."""
    for d in parent.glob("edgeqwen-*-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                d.rmdir()
            except OSError:   # still has a process, or not ours to remove
                pass


class MemoryCgroup:
    """with MemoryCgroup(limit) as cg: Popen(..., preexec_fn=cg.enter); cg.oom_kills(); cg.peak()"""

    def __init__(self, limit: int):
        self.limit = limit
        self.version = _version()
        self.path: Path | None = None

    def __enter__(self) -> MemoryCgroup:
        if os.uname().sysname != "Linux" or self.version is None:
            raise UsageError("--memory-limit needs Linux's memory cgroup controller, which this machine does not "
                             "have (mounted at /sys/fs/cgroup); the run was not started")
        try:
            parent = _own_cgroup(self.version)
            if self.version == 2:   # a v2 cgroup with processes cannot have children with controllers
                parent = V2_ROOT
            _reap(parent)
            self.path = parent / f"edgeqwen-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.path.mkdir()
            if self.version == 2:
                (self.path / "memory.max").write_text(str(self.limit))
                if (self.path / "memory.swap.max").exists():
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
                sw = self.path / "memory.memsw.limit_in_bytes"
                if sw.exists():   # with swap accounting: no swap either, as on a device without it
                    sw.write_text(str(self.limit))
        except PermissionError:
            self._remove()
            raise UsageError("--memory-limit needs permission to create a memory cgroup (run as root, or give this "
                             "user a delegated cgroup); the run was not started") from None
        except OSError as e:
            self._remove()
            raise UsageError(f"--memory-limit: cannot set up a memory cgroup ({e.strerror or e})") from None
        return self

    def enter(self) -> None:
        """In the child, before exec: move this process into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except (OSError, TypeError):
            return ""

    def oom_kills(self) -> int:
        """The kernel's own count of OOM kills in this cgroup (not a guess from an exit code)."""
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control")
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        return int(m.group(1)) if m else 0

    def peak(self) -> int | None:
        text = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes").strip()
        return int(text) if text.isdigit() else None

    def _remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):   # the last process may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self._remove()


def read_ahead_kb(path) -> int | None:
    """The read-ahead window of the block device holding `path` (what a fault under a memory limit reads
    around itself: 8 MiB on this project's VMs, the kernel's default 128 KiB); None if unknown."""
    try:
        st = os.stat(path)
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        for q in (dev / "queue" / "read_ahead_kb", dev / ".." / "queue" / "read_ahead_kb"):   # disk, partition
            if q.exists():
                return int(q.read_text())
    except (OSError, ValueError):
        pass
    return None


def drop_page_cache(paths) -> None:
    """Evict these files' clean pages, so the next reader (in a limited cgroup) is charged for them:
    pages already cached by an earlier unlimited run would otherwise be mapped for free."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
