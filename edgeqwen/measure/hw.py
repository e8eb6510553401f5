"""Hardware fingerprint: what this machine is, as far as LLM speed is concerned."""
from __future__ import annotations

import functools
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


# Arm's own cores by "CPU part" (implementer 0x41): ARM kernels print no model name.
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd49": "Neoverse-N2",
             "0xd4f": "Neoverse-V2"}
# Where a board's model name lives: /proc/device-tree is a link to the second on a Pi's kernel.
DT_MODEL = ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")


def emulation() -> str | None:
    """How this process is emulated, if it is: under qemu-user the kernel (and /proc/sys/kernel/arch) is the
    host's while uname reports the guest's machine; Rosetta 2 says so in sysctl.proc_translated. EDGEQWEN_EMULATED
    names the emulator when a harness knows better."""
    if env := os.environ.get("EDGEQWEN_EMULATED"):
        return env[:64]
    if sys.platform == "darwin":
        return "rosetta" if _sysctl("sysctl.proc_translated") == "1" else None
    kernel = _read("/proc/sys/kernel/arch")
    norm = {"arm64": "aarch64", "amd64": "x86_64"}
    machine = platform.machine().lower()
    if kernel and norm.get(kernel, kernel) != norm.get(machine, machine):
        return f"qemu-user ({kernel} kernel)"
    return None


def cpu_info(cpuinfo: str | None = None, machine: str | None = None, dt_model: str | None = None) -> dict:
    """CPU model, ISA flags and device class (Raspberry Pi model, Apple chip, or generic).

    cpuinfo, machine and dt_model stand in for /proc/cpuinfo, uname -m and the device-tree model (tests)."""
    machine = (machine or platform.machine()).lower()
    model, flags, device = "", set(), ""
    if sys.platform == "darwin" and cpuinfo is None:
        model = _sysctl("machdep.cpu.brand_string")
        flags = {name for key, name in MAC_FLAGS.items() if _sysctl(key) == "1"}
        device = model if model.startswith("Apple") else f"Mac {machine}"
    else:
        cpuinfo = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
        m = re.search(r"^(model name|Hardware|Model)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        model = m.group(2).strip() if m else platform.processor()
        part = re.search(r"^CPU implementer\s*:\s*0x41\s*$.*?^CPU part\s*:\s*(0x[0-9a-f]+)", cpuinfo,
                         re.MULTILINE | re.DOTALL)
        if part and part.group(1) in ARM_PARTS and not (m and m.group(1) == "model name"):
            model = ARM_PARTS[part.group(1)]
        fm = re.search(r"^(flags|Features)\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        raw = set(fm.group(2).split()) if fm else set()
        table = X86_FLAGS if machine in ("x86_64", "amd64", "i686") else ARM_FLAGS
        flags = {name for key, name in table.items() if key in raw}
        if machine in ("aarch64", "arm64"):
            flags.add("neon")  # mandatory on AArch64
        dt = dt_model if dt_model is not None else next((t for t in map(_read, DT_MODEL) if t), "")
        dt = dt.strip("\x00\n ")
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
    """What measured: edgeqwen's version and commit, llama.cpp's own version and commit, every backend's."""
    import importlib.metadata as md

    from .. import __version__
    out = {"edgeqwen": __version__, "python": platform.python_version()}
    if commit := edgeqwen_commit():
        out["edgeqwen_commit"] = commit
    for pkg in ("llama_cpp_python", "onnxruntime", "onnxruntime_genai", "mlx", "mlx-lm", "gguf", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out.update(ggml_version())
    return out


@functools.cache
def edgeqwen_commit() -> str | None:
    """The checkout's commit (+"-dirty" with uncommitted changes to tracked files); None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


_GGML = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
out = {}
for name in ("ggml_version", "ggml_commit"):
    f = getattr(lib, name, None)
    if f is not None:
        f.restype = ctypes.c_char_p
        out[name] = f().decode("utf-8", "replace")
print(json.dumps(out))
"""


@functools.cache
def ggml_version() -> dict:
    """llama.cpp's own version and commit, as libggml-base reports them (ggml_version, ggml_commit; libllama has
    no such call). Read in a child process: loading the library here would load libgomp before load_runner sets
    how its threads wait."""
    import importlib.util
    import json
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return {}
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*"))
    if not libs:
        return {}
    try:
        p = subprocess.run([sys.executable, "-c", _GGML, str(libs[0])], capture_output=True, text=True, timeout=30)
        got = json.loads(p.stdout) if p.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}
    return {k: v for k, v in (("ggml", got.get("ggml_version")), ("ggml_commit", got.get("ggml_commit"))) if v}


THROTTLED_NOW = 0xF   # get_throttled's bits for now: under-voltage, frequency capped, throttled, soft temperature limit


def throttled(row: dict) -> bool:
    """A row measured while the board's firmware was throttling (before or after the run): shown as such, never a
    verdict, like a busy row."""
    states = (row.get("device", {}).get("thermal") or {}, row.get("thermal_after") or {})
    return any(isinstance(t.get("throttled"), int) and t["throttled"] & THROTTLED_NOW for t in states)


def thermal(root: Path = Path("/sys")) -> dict:
    """The machine's thermal and clock state where Linux shows it: every thermal zone's temperature (°C), the
    CPU frequency governor and current / maximum clock (MHz), and on a Raspberry Pi the firmware's throttled
    flags (non-zero: under-voltage or throttling now or since boot). Absent where unreadable, never guessed.
    root stands in for /sys (tests feed recorded trees)."""
    out: dict = {}
    zones = {}
    for z in sorted((root / "class" / "thermal").glob("thermal_zone*")):
        try:
            kind = (z / "type").read_text().strip() or z.name
            zones[f"{kind}" if kind not in zones else f"{kind}-{z.name}"] = int((z / "temp").read_text()) / 1000
        except (OSError, ValueError):
            continue
    if zones:
        out["temps_c"] = zones
    freq = root / "devices" / "system" / "cpu" / "cpu0" / "cpufreq"
    for key, name, scale in (("governor", "scaling_governor", None), ("cur_mhz", "scaling_cur_freq", 1000),
                             ("max_mhz", "cpuinfo_max_freq", 1000)):
        try:
            raw = (freq / name).read_text().strip()
            out[key] = raw if scale is None else round(int(raw) / scale)
        except (OSError, ValueError):
            pass
    try:   # the Pi firmware's get_throttled (vcgencmd's bits), which its firmware driver prints in hex
        raw = (root / "devices" / "platform" / "soc" / "soc:firmware" / "get_throttled").read_text().strip()
        out["throttled"] = int(raw, 16)
    except (OSError, ValueError):
        pass
    return out


def apple_chips() -> dict[str, dict]:
    from ..recipes import load_toml
    from ..resources import data
    return load_toml(data("apple_chips.toml"), "Apple chip table")


def apple_info(sysctl=_sysctl) -> dict | None:
    """An Apple Silicon Mac from sysctl: the chip (binned variants told apart by their performance cores), the
    core split, unified memory, the published memory bandwidth (with its source) and the GPU. sysctl stands in
    for the command (tests feed recorded outputs)."""
    brand = sysctl("machdep.cpu.brand_string")
    if not brand.startswith("Apple M"):
        return None

    def num(key):
        v = sysctl(key)
        return int(v) if v.isdigit() else 0
    perf, eff = num("hw.perflevel0.physicalcpu"), num("hw.perflevel1.physicalcpu")
    cands = [(name, c) for name, c in apple_chips().items() if c.get("brand_string", name) == brand]

    def has(cores, n):
        return n in cores if isinstance(cores, list) else cores == n
    name, chip = next(((n, c) for n, c in cands if has(c.get("performance_cores"), perf)),
                      cands[0] if cands else (brand, {}))
    out = {"chip": name, "performance_cores": perf, "efficiency_cores": eff, "unified_memory": num("hw.memsize"),
           "gpu": True, "model": sysctl("hw.model") or None}
    if chip.get("bandwidth_gbs"):
        out.update(bandwidth_published_gbs=chip["bandwidth_gbs"], bandwidth_source=chip["source"])
    return out


def fingerprint(bandwidth: bool = True, provenance: bool = True) -> dict:
    """This machine as a row records it. provenance=False leaves out the versions and the thermal state (a child
    process and git): for a look-up by device id or ISA, not for a row."""
    cpu = cpu_info()
    vm = psutil.virtual_memory()
    fp = {
        **cpu,
        "physical_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_total": vm.total,
        "ram_available": vm.available,
        "os": f"{platform.system()} {platform.release()}",
        **({"versions": versions(), "thermal": thermal()} if provenance else {}),
        "emulated": bool(emu := emulation()),
    }
    if emu:
        fp["emulator"] = emu
        # the board being emulated, not the host: a harness that knows it says its RAM (tools/test-arm64.sh)
        gib = os.environ.get("EDGEQWEN_EMULATED_RAM_GIB", "")
        if gib.isdigit() and 0 < int(gib) <= 1024:
            fp.update(host_ram_total=fp["ram_total"], ram_total=int(gib) << 30,
                      ram_available=min(fp["ram_available"], int(gib) << 30))
    if sys.platform == "darwin" and (apple := apple_info()):
        fp["apple"] = apple
    if bandwidth:
        fp["bandwidth_gbs"] = memory_bandwidth()
    fp["device_id"] = device_id(fp)
    return fp


def device_id(fp: dict) -> str:
    """Stable id of a machine kind: same CPU, ISA extensions, cores, RAM size (to the GiB) and OS family.

    The ISA list is part of it because cloud VMs name different CPU generations alike ("Intel(R) Xeon(R)
    Processor" with and without AMX), and their speeds must not be merged."""
    key = f"{fp['cpu']}|{fp['arch']}|{fp['physical_cores']}|{fp['logical_cores']}|{round(fp['ram_total'] / 2**30)}|" \
          f"{fp['os'].split()[0]}|{','.join(sorted(fp.get('isa', [])))}" + ("|emulated" if fp.get("emulated") else "")
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def device_label(fp: dict) -> str:
    emu = " · EMULATED (correctness only)" if fp.get("emulated") else ""
    host = " (the host's)" if fp.get("emulated") and "host_ram_total" not in fp else ""
    return (f"{fp.get('device', '?')} · {fp.get('cpu', '?')} · {fp.get('physical_cores', '?')}C · "
            f"{round(fp.get('ram_total', 0) / 2**30)} GiB{host}{emu}")
