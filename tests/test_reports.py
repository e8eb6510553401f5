"""Reports rendered from committed raw data: rendering again gives the committed file, byte for byte."""
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_serve_md_is_its_raw_data_rendered():
    from bench.serve_bench import render
    raws = sorted((REPO / "bench" / "results").glob("serve-*.json"))
    assert raws, "bench/SERVE.md has no raw data"
    data = json.loads(raws[-1].read_text())
    assert render(data) == (REPO / "bench" / "SERVE.md").read_text()
    for r in data["concurrency"]["ours --parallel 8"]["4"]:   # an edited figure shows
        r["tps"] *= 2
    assert render(data) != (REPO / "bench" / "SERVE.md").read_text()
