"""Hardware fingerprint: what this machine is, as far as LLM speed is concerned."""
from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

# ISA features that change which llama.cpp / onnxruntime kernels run.
X86_FLAGS = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
             "avx512_bf16": "avx512_bf16", "amx_tile": "amx", "amx_int8": "amx_int8", "f16c": "f16c", "fma": "fma"}
ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2",
             "fphp": "fp16", "bf16": "bf16"}
MAC_FLAGS = {"hw.optional.arm.FEAT_DotProd": "dotprod", "hw.optional.arm.FEAT_I8MM": "i8mm",
             "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.neon": "neon", "hw.optional.arm.FEAT_FP16": "fp16"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def _sysctl(key: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_info() -> dict:
    """CPU model, ISA flags and device class (Raspberry Pi model, Apple chip, or generic)."""
    machine = platform.machine().lower()
    model, flags, device = "", set(), ""
    if sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
        flags = {name for key, name in MAC_FLAGS.items() if _sysctl(key) == "1"}
        device = model if model.startswith("Apple") else f"Mac {machine}"
    else:
        cpuinfo = _read("/proc/cpuinfo")
        m = re.search(r"^(model name|Hardware|Model)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        model = m.group(2).strip() if m else platform.processor()
        fm = re.search(r"^(flags|Features)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        raw = set(fm.group(2).split()) if fm else set()
        table = X86_FLAGS if machine in ("x86_64", "amd64", "i686") else ARM_FLAGS
        flags = {name for key, name in table.items() if key in raw}
        if machine in ("aarch64", "arm64"):
            flags.add("neon")  # mandatory on AArch64
        dt = _read("/proc/device-tree/model")
        if dt:
            device = dt
            if not m:
                model = dt
        else:
            kind = "x86" if ("x86" in machine or "amd64" in machine) else \
                "ARM" if ("arm" in machine or "aarch" in machine) else machine
            device = f"generic {kind}"
    return {"cpu": model or "unknown", "arch": machine, "isa": sorted(flags), "device": device}


def memory_bandwidth(threads: int | None = None, mib: int = 256, repeats: int = 5) -> float:
    """Streaming copy bandwidth in GB/s (read + write), one numpy copy per thread; best of repeats."""
    import numpy as np
    threads = threads or psutil.cpu_count(logical=False) or 1
    # Two buffers per thread, all of them within 1/16 of RAM (128 MiB in all on a 2 GB Pi).
    mib = max(8, min(mib, psutil.virtual_memory().total // 16 // (2 * threads) // 2**20))
    n = mib * 2**20 // 8
    bufs = [(np.ones(n), np.empty(n)) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def work(a, b, barrier=barrier):
            barrier.wait()
            np.copyto(b, a)  # releases the GIL: the threads really run in parallel

        ts = [threading.Thread(target=work, args=ab) for ab in bufs]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        best = max(best, threads * 2 * n * 8 / dt / 1e9)
    return round(best, 2)


def versions() -> dict:
    import importlib.metadata as md

    from . import __version__
    out = {"edgeqwen": __version__, "python": platform.python_version()}
    for pkg in ("llama_cpp_python", "onnxruntime", "onnxruntime_genai", "gguf", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def fingerprint(bandwidth: bool = True) -> dict:
    cpu = cpu_info()
    vm = psutil.virtual_memory()
    fp = {
        **cpu,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_total": vm.total,
        "ram_available": vm.available,
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions(),
    }
    if bandwidth:
        fp["bandwidth_gbs"] = memory_bandwidth()
    fp["device_id"] = device_id(fp)
    return fp


def device_id(fp: dict) -> str:
    """Stable id of a machine kind: same CPU, ISA extensions, cores, RAM size (to the GiB) and OS family.

    The ISA list is part of it because cloud VMs name different CPU generations alike ("Intel(R) Xeon(R)
    Processor" with and without AMX), and their speeds must not be merged."""
    key = f"{fp['cpu']}|{fp['arch']}|{fp['physical_cores']}|{fp['logical_cores']}|{round(fp['ram_total'] / 2**30)}|" \
          f"{fp['os'].split()[0]}|{','.join(sorted(fp.get('isa', [])))}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def device_label(fp: dict) -> str:
    return f"{fp['device']} · {fp['cpu']} · {fp['physical_cores']}C · {round(fp['ram_total'] / 2**30)} GiB"
