"""Measurements that know when they are wrong: how much CPU other processes took while we measured.

On these 2-vCPU machines one other heavy job made llama.cpp's spinning threads collapse (the real 0.5B q4_k_m:
11 tok/s, then 0.5-1.9 a minute later), and a user's Pi runs other services too. So every measurement records
the machine's load from the kernel's own counters, with no sampling thread of ours (on 2 vCPUs a thread that
wakes up preempts a compute thread): /proc/stat's CPU time of the whole machine, less our own and our waited-for
children's (os.times), over the wall time, before (a short idle look) and during the measurement; and CPU steal,
time the hypervisor gave to other guests. A row is marked busy when other processes used more than BUSY_CORES
cores on average, or steal took more than BUSY_STEAL of the machine; table and claims never let such a row decide.
"""
from __future__ import annotations

import os
import time

BUSY_CORES = 0.25   # other processes' average use, in cores (an idle VM here: ~0.01-0.05)
BUSY_STEAL = 0.10   # share of the machine's time stolen by the hypervisor
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot, or None where /proc/stat is not."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / _HZ, (v[7] if len(v) > 7 else 0) / _HZ


def _ours() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Watch:
    """with Watch() as w: ... -> w.others (cores other processes used on average), w.steal (share of the machine)."""

    def __enter__(self):
        self._s0, self._o0, self._t0 = _stat(), _ours(), time.monotonic()
        self.others = self.steal = None
        return self

    def __exit__(self, *exc):
        s1, wall = _stat(), time.monotonic() - self._t0
        if self._s0 and s1 and wall > 0:
            self.others = max(0.0, (s1[0] - self._s0[0]) - (_ours() - self._o0)) / wall
            self.steal = (s1[1] - self._s0[1]) / wall / (os.cpu_count() or 1)
        return False


def idle_look(seconds: float = 0.5) -> Watch:
    """Other processes' load while we sleep, just before a measurement."""
    with Watch() as w:
        time.sleep(seconds)
    return w


def load_fields(before: Watch, during: Watch) -> dict:
    """A row's record of the machine's load, and whether it was too busy to trust."""
    if during.others is None:
        return {}
    load = {"others_before": round(before.others or 0.0, 3), "others_during": round(during.others, 3),
            "steal": round(during.steal or 0.0, 4)}
    busy = max(load["others_before"], load["others_during"]) > BUSY_CORES or load["steal"] > BUSY_STEAL
    return {"load": load, "busy": busy}


def busy_line(row: dict) -> str:
    """Why a row is marked busy, in words."""
    load = row.get("load") or {}
    return (f"other processes used {max(load.get('others_before', 0), load.get('others_during', 0)):.2f} cores"
            f"{', steal ' + format(load['steal'], '.0%') if load.get('steal', 0) > BUSY_STEAL else ''}")
