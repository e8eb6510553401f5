"""A normal (repacking) load that maps the file (no huge pages to be had) gives back the original pages of what it
repacked: same tokens, less resident. Where it reads the file instead (hugepages.py) nothing is mapped to give back."""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux's page cache and /proc/self/smaps")


def _resident(path: Path) -> int:
    """Bytes of `path` mapped and resident in this process (every mapping of it, from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = line.rstrip().endswith(str(path))
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def _greedy(runner, n=12) -> list[int]:
    from edgeqwen.runner import Sampling
    return [r.token for r in runner.stream(runner.tokenize("The capital of France is"),
                                           Sampling(max_tokens=n, temperature=0)) if r.token is not None]


def _logits(runner):
    """Every position's logits of a short prompt: the weights as the kernels read them (the same load path on
    both sides, so they agree to rounding; a page given back that was still needed would not)."""
    return runner.logits(runner.tokenize("The capital of France is Paris, and of Italy"))


def _logged_repacks(monkeypatch) -> list[str]:
    """Collects the tensor names libllama reports repacking during a load in this process, in either wording
    (ggml-cpu's repack buffer, or the AMX buffer): what this CPU's branch is, as the library says."""
    import re

    from edgeqwen.formats.gguf import pagecache
    names, line = [], pagecache.Releaser.line

    def spy(self, msg):
        m = re.search(r"^(?:repack: repack tensor|\S+: amx repack tensor) (\S+)", msg)
        if m:
            names.append(m.group(1))
        return line(self, msg)
    monkeypatch.setattr(pagecache.Releaser, "line", spy)
    return names


def _page_interior(start: int, n: int, page: int = 4096) -> int:
    a, b = -(-start // page) * page, (start + n) // page * page
    return max(0, b - a)


def test_repacked_originals_are_released_with_the_same_tokens_on_this_cpus_repack_or_amx_buffer(tiny_builds,
                                                                                                  monkeypatch):
    """Whatever this CPU repacks (CPU_REPACK: Q4_0; AMX: Q4_0 and the tied output's Q6_K copy of token_embd), the
    originals given back are exactly those libllama reported copying, less token_embd, which the lookup still reads."""
    from edgeqwen.formats import hugepages
    from edgeqwen.formats.gguf import pagecache
    from edgeqwen.formats.gguf.info import read_gguf_info
    from edgeqwen.formats.gguf.runner import LlamaRunner
    monkeypatch.setattr(hugepages, "available", lambda: False)   # a normal load maps the file only without THP
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf")).resolve()
    info = read_gguf_info(model)
    where = {t.name: (info.data_start + t.offset, t.n_bytes) for t in info.tensors}
    names = _logged_repacks(monkeypatch)
    kept = LlamaRunner(model, threads=2, n_ctx=256, logits=True)
    try:
        assert names, "libllama reported no repacked tensor for a Q4_0 model"
        expected = sum(_page_interior(*where[n]) for n in set(names) if n != "token_embd.weight")
        assert kept.released == expected, (kept.released, expected, sorted(set(names)))
        resident_kept = _resident(model)
        before = _logits(kept)
    finally:
        kept.close()

    monkeypatch.setattr(pagecache, "releaser_for", lambda *a: None)
    whole = LlamaRunner(model, threads=2, n_ctx=256, logits=True)
    try:
        assert whole.released == 0
        resident_whole = _resident(model)
        import numpy as np
        assert np.allclose(_logits(whole), before, atol=1e-4)
    finally:
        whole.close()
    # the originals were read through the mapping to be repacked: resident unless given back
    assert resident_whole - resident_kept > expected * 0.8, (resident_whole, resident_kept, expected)


RECORDED = Path(__file__).parent / "data" / "llama-logs"


@pytest.mark.parametrize("branch, released_tensors", [
    ("cpu_repack", "q4_0"),      # recorded on an AMD EPYC (AVX-512)
    ("amx", "q4_0"),             # written from the vendored AMX sources: token_embd's copy is logged, kept mapped
    ("no_repack", None),         # recorded: the q8_0 model on the same CPU
])
def test_recorded_load_logs_release_what_each_branch_repacked_and_never_the_embedding(tiny_builds, branch,
                                                                                       released_tensors):
    import mmap

    from edgeqwen.formats.gguf.info import read_gguf_info
    from edgeqwen.formats.gguf.pagecache import Releaser
    model = next(Path(tiny_builds["q4_0" if released_tensors else "q8_0"]).glob("*.gguf")).resolve()
    info = read_gguf_info(model)
    with open(model, "rb") as f:   # the file mapped and read, as a mapped load leaves it
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        sum(m[i] for i in range(0, len(m), 4096))
        before = _resident(model)
        r = Releaser(model, info)
        lines = [ln for ln in (RECORDED / f"{branch}-mapped.log").read_text().splitlines() if not ln.startswith("#")]
        for ln in lines:
            r.line(ln)
        released = r.finish()
        expected = sum(_page_interior(info.data_start + t.offset, t.n_bytes) for t in info.tensors
                       if t.type.name.lower() == released_tensors)
        dropped = before - _resident(model)
        assert released == expected, (released, expected)
        # what left memory is what was released: never token_embd's 30 MiB, which the lookup reads every token
        assert expected * 0.9 <= dropped <= expected + 65536, (dropped, expected)
    finally:
        m.close()


def test_a_lean_load_releases_nothing(tiny_builds):
    from edgeqwen.formats.gguf.runner import LlamaRunner
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf"))
    r = LlamaRunner(model, threads=2, n_ctx=256, lean=True)
    assert r.released == 0 and len(_greedy(r, 4)) == 4
    r.close()


def test_lines_that_are_not_repacks_release_nothing(tiny_builds):
    from edgeqwen.formats.gguf.info import read_gguf_info
    from edgeqwen.formats.gguf.pagecache import Releaser
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf"))
    r = Releaser(model, read_gguf_info(model))
    for msg in ("load_tensors: CPU_REPACK model buffer size = 1.00 MiB", "repack: repack tensor no.such.tensor"):
        r.line(msg)
    assert r.finish() == 0


def test_a_load_that_reads_the_file_has_nothing_to_release(tiny_builds):
    from edgeqwen.formats.hugepages import available
    from edgeqwen.formats.gguf.runner import LlamaRunner
    if not available():
        pytest.skip("transparent huge pages are off: a normal load maps the file here")
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf")).resolve()
    before = _resident(model)   # another test's mapping in this process is not this load's
    r = LlamaRunner(model, threads=2, n_ctx=256)
    try:
        assert not r.mapped and r.released == 0 and _resident(model) == before and len(_greedy(r, 4)) == 4
    finally:
        r.close()
