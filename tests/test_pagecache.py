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


def test_repacked_originals_are_released_with_the_same_tokens(tiny_builds, monkeypatch):
    from edgeqwen import hugepages, pagecache
    from edgeqwen.gguf_info import read_gguf_info
    from edgeqwen.llama_runner import LlamaRunner
    monkeypatch.setattr(hugepages, "available", lambda: False)   # a normal load maps the file only without THP
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf")).resolve()
    repacked = sum(t.n_bytes for t in read_gguf_info(model).tensors if t.type.name == "Q4_0"
                   and t.name != "token_embd.weight")
    kept = LlamaRunner(model, threads=2, n_ctx=256)
    assert kept.released > repacked * 0.9, (kept.released, repacked)   # every Q4_0 matrix, less page edges
    assert kept.released <= repacked
    resident_kept = _resident(model)
    tokens = _greedy(kept)
    kept.close()

    monkeypatch.setattr(pagecache, "releaser_for", lambda *a: None)
    whole = LlamaRunner(model, threads=2, n_ctx=256)
    assert whole.released == 0
    resident_whole = _resident(model)
    assert _greedy(whole) == tokens
    whole.close()
    # the originals were read through the mapping to be repacked: resident unless given back
    assert resident_whole - resident_kept > repacked * 0.8, (resident_whole, resident_kept, repacked)


def test_a_lean_load_releases_nothing(tiny_builds):
    from edgeqwen.llama_runner import LlamaRunner
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf"))
    r = LlamaRunner(model, threads=2, n_ctx=256, lean=True)
    assert r.released == 0 and len(_greedy(r, 4)) == 4
    r.close()


def test_lines_that_are_not_repacks_release_nothing(tiny_builds):
    from edgeqwen.gguf_info import read_gguf_info
    from edgeqwen.pagecache import Releaser
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf"))
    r = Releaser(model, read_gguf_info(model))
    for msg in ("load_tensors: CPU_REPACK model buffer size = 1.00 MiB", "repack: repack tensor no.such.tensor"):
        r.line(msg)
    assert r.finish() == 0


def test_a_load_that_reads_the_file_has_nothing_to_release(tiny_builds):
    from edgeqwen.hugepages import available
    from edgeqwen.llama_runner import LlamaRunner
    if not available():
        pytest.skip("transparent huge pages are off: a normal load maps the file here")
    model = next(Path(tiny_builds["q4_0"]).glob("*.gguf")).resolve()
    r = LlamaRunner(model, threads=2, n_ctx=256)
    assert not r.mapped and r.released == 0 and _resident(model) == 0 and len(_greedy(r, 4)) == 4
    r.close()
