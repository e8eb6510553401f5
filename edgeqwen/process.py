"""Small measurement helpers shared by build, runner and bench."""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable

import psutil

# the most threads any option accepts (--threads, bench's lists): more than cores, never absurd
MAX_THREADS = 4 * (os.cpu_count() or 1)


def physical_cores() -> int:
    """Default thread count: physical cores (hyper-threads do not help memory-bound decode)."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def max_rss_bytes() -> int:
    """The OS's own high-water mark for this process.

    On Linux VmHWM, because ru_maxrss survives execve and so can report the parent's size;
    elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakRSS:
    """Samples this process's RSS in a thread; .peak is the highest seen since start (or reset)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._proc = psutil.Process(os.getpid())
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    def reset(self) -> None:
        self.peak = self._proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def sha256_file(path, on_bytes: Callable[[int], None] | None = None, block: int = 16 << 20) -> str:
    """The hex sha256 of a file, read in blocks (on_bytes(n) after each, for a progress bar)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(block):
            h.update(b)
            if on_bytes:
                on_bytes(len(b))
    return h.hexdigest()
