"""The buffers libllama loads weights into are asked for huge pages before they are filled: same tokens."""
import mmap
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux's madvise and /proc/self/smaps")


def _smaps(addr: int) -> dict[str, list[str]]:
    """/proc/self/smaps fields of the mapping holding addr."""
    inside, out = False, {}
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    return out
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside:
                out[head.rstrip(":")] = line.split()[1:]
    if inside:
        return out
    raise AssertionError(f"no mapping holds {addr:#x}")


def _flags(addr: int) -> list[str]:
    """VmFlags of the mapping holding addr ("hg": MADV_HUGEPAGE was given)."""
    return _smaps(addr)["VmFlags"]


def _greedy(runner, n=12) -> list[int]:
    from edgeqwen.runner import Sampling
    return [r.token for r in runner.stream(runner.tokenize("The capital of France is"),
                                           Sampling(max_tokens=n, temperature=0)) if r.token is not None]


def test_a_new_buffer_of_the_logged_size_is_advised_and_nothing_else():
    import ctypes

    from edgeqwen.formats.hugepages import HugePager
    hp = HugePager()
    buf = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    hp.line("load_tensors:   CPU_Mapped model buffer size =   400.86 MiB")   # the file's mapping: not ours to advise
    hp.line("load_tensors:   CPU_REPACK model buffer size =     1.00 MiB")   # under one huge page: nothing to gain
    assert hp.advised == 0 and "hg" not in _flags(addr)
    hp.line("load_tensors:   CPU_REPACK model buffer size =     8.00 MiB")
    assert hp.advised >= 8 << 20 and "hg" in _flags(addr)
    advised = hp.advised
    hp.line("load_tensors:   CPU_REPACK model buffer size =     8.00 MiB")   # each mapping once
    assert hp.advised == advised
    buf.close()


def test_a_buffer_whose_size_the_line_rounds_up_is_still_advised():
    import ctypes

    from edgeqwen.formats.hugepages import HugePager
    hp = HugePager()
    buf = mmap.mmap(-1, 31_916_032, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # a real tiny q4_0 CPU buffer's
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    hp.line("load_tensors:          CPU model buffer size =    30.44 MiB")   # 30.438 MiB, printed rounded up
    assert hp.advised == 31_916_032 and "hg" in _flags(addr)
    del addr
    buf.close()


def test_new_parts_are_new_mappings_and_what_old_ones_grew_by():
    from edgeqwen.formats.hugepages import _new_parts
    before = {(100, 200), (300, 400), (500, 600)}
    now = {(100, 250), (300, 400), (450, 650), (700, 800)}   # heap grew; one merged on both sides; one new
    assert _new_parts(now, before) == [(200, 250), (450, 500), (600, 650), (700, 800)]
    assert _new_parts(before, before) == []


def test_memory_filled_before_it_could_be_advised_is_collapsed_into_huge_pages():
    """onnxruntime prepacks its weights inside session creation, with no line to act on: collapse afterwards."""
    import ctypes

    from edgeqwen.formats.hugepages import anonymous_mappings, available, collapse_new
    if not available():
        pytest.skip("transparent huge pages are off on this kernel")
    before = anonymous_mappings()
    buf = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(b"\1" * (8 << 20))   # filled in 4 KiB pages, as onnxruntime's allocations are
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert int(_smaps(addr)["AnonHugePages"][0]) == 0
    assert collapse_new(before) >= 8 << 20
    assert "hg" in _flags(addr) and int(_smaps(addr)["AnonHugePages"][0]) >= 2048   # kB: at least one huge page
    assert buf[:4] == b"\1" * 4 and buf[-4:] == b"\1" * 4   # the same bytes
    del addr
    buf.close()


# In a fresh process, as a user's: pytest's own has raised glibc's mmap threshold above the tiny model's buffer.
LOAD = r"""
import json, sys
from edgeqwen.formats import hugepages
from edgeqwen.formats.gguf.runner import LlamaRunner
from edgeqwen.runner import Sampling
hugepages.HUGE_PAGE = 0   # the tiny model's repacked copy is smaller than one huge page
seen, line = [], hugepages.HugePager.line
hugepages.HugePager.line = lambda self, msg: (seen.append(msg), line(self, msg))
if sys.argv[3] == "off":
    hugepages.hugepager = lambda: None
    hugepages.available = lambda: False
r = LlamaRunner(sys.argv[1], threads=2, n_ctx=256, lean=sys.argv[2] == "lean")
tokens = [x.token for x in r.stream(r.tokenize("The capital of France is"), Sampling(max_tokens=8, temperature=0))]
maps = open("/proc/self/maps").read()
print(json.dumps({"advised": r.hugepages, "lines": [m for m in seen if hugepages.BUFFER_LINE.search(m)],
                  "tokens": tokens, "mapped": r.mapped, "file_in_maps": str(r.path.resolve()) in maps}))
"""


def _load(model, lean="full", huge="on") -> dict:
    import json
    import subprocess
    p = subprocess.run([sys.executable, "-c", LOAD, str(model), lean, huge], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.splitlines()[-1])


def test_the_runner_advises_its_repack_or_amx_buffer_with_the_same_tokens(margin_builds):
    from edgeqwen.formats.hugepages import hugepager
    model = next(Path(margin_builds["q4_0"]).glob("*.gguf"))
    advised = _load(model)
    # Q4_0 goes to an extra buffer on every x86 CPU: ggml-cpu's CPU_REPACK, or AMX on AMX CPUs (libllama's words)
    assert any(re.search(r" (CPU_REPACK|AMX) model buffer size", m) for m in advised["lines"]), advised["lines"]
    if hugepager() is None:
        pytest.skip("transparent huge pages are off on this kernel")
    assert advised["advised"] > 0
    plain = _load(model, huge="off")
    assert plain["advised"] == 0 and plain["tokens"] == advised["tokens"] and len(plain["tokens"]) == 8


TWICE = r"""
import gc, sys
from edgeqwen.formats.gguf.runner import LlamaRunner
for _ in range(2):
    r = LlamaRunner(sys.argv[1], threads=1, n_ctx=256)
    print(r.hugepages)
    del r
    gc.collect()
"""


def test_a_second_load_in_one_process_is_advised_too(tiny_builds):
    """Freeing the first model's buffer raises glibc's mmap threshold above the tiny model's: the second comes out
    of the heap, which grows by it."""
    import subprocess

    from edgeqwen.formats.hugepages import available
    if not available():
        pytest.skip("transparent huge pages are off on this kernel")
    p = subprocess.run([sys.executable, "-c", TWICE, str(next(Path(tiny_builds["q8_0"]).glob("*.gguf")))],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = (int(x) for x in p.stdout.split())
    assert first > 0 and second > 0


def test_a_lean_load_advises_nothing(tiny_builds):
    lean = _load(next(Path(tiny_builds["q4_0"]).glob("*.gguf")), lean="lean")
    assert lean["advised"] == 0 and not any(re.search(r" (CPU_REPACK|AMX) ", m) for m in lean["lines"])


RECORDED = Path(__file__).parent / "data" / "llama-logs"


@pytest.mark.parametrize("branch, filled", [
    ("cpu_repack", {"CPU": 30.44}),                 # recorded (AMD EPYC, AVX-512): CPU_REPACK is 0.63 MiB, too small
    ("amx", {"CPU": 30.44, "AMX": 31.06}),          # written from the vendored AMX sources
])
def test_recorded_read_in_loads_advise_every_filled_buffer_of_each_branch(branch, filled):
    """Each buffer line of a read-in load, replayed with a real anonymous mapping of that size appearing just
    before it (as libllama's allocation does): the buffers libllama fills are advised, nothing else."""
    import ctypes

    from edgeqwen.formats.hugepages import BUFFER_LINE, HugePager
    hp, maps = HugePager(), []
    for ln in (RECORDED / f"{branch}-read.log").read_text().splitlines():
        m = BUFFER_LINE.search(ln)
        if m:
            size = round(float(m.group(2)) * 2**20) // 4096 * 4096
            maps.append((m.group(1), mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)))
        if not ln.startswith("#"):
            hp.line(ln)
    try:
        for name, buf in maps:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            assert ("hg" in _flags(addr)) == (name in filled), name
            del addr
        assert abs(hp.advised - sum(filled.values()) * 2**20) < 2 * 4096 * len(filled)
    finally:
        for _, buf in maps:
            buf.close()


def test_a_normal_load_reads_the_file_into_huge_pages_and_a_lean_one_maps_it(margin_builds):
    from edgeqwen.formats.hugepages import available
    model = next(Path(margin_builds["q8_0"]).glob("*.gguf"))   # nothing repacked: every weight in the "CPU" buffer
    if not available():
        pytest.skip("transparent huge pages are off on this kernel")
    normal, lean, plain = _load(model), _load(model, lean="lean"), _load(model, huge="off")
    assert not normal["mapped"] and not normal["file_in_maps"] and normal["advised"] > 0
    assert any(" CPU model buffer size" in m for m in normal["lines"])   # libllama's wording holds
    assert lean["mapped"] and lean["file_in_maps"] and lean["advised"] == 0
    assert plain["mapped"] and plain["file_in_maps"]   # no huge pages to be had: the file stays mapped
    assert normal["tokens"] == lean["tokens"] == plain["tokens"] and len(normal["tokens"]) == 8
