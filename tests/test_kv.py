"""--kv q8_0: llama.cpp's quantized KV cache through run, bench, eval and plan; what it saves and what it costs."""
import json

from helpers import invoke, run_cli


def test_plan_halves_the_kv_cache_with_q8_0():
    from edgeqwen.measure.plan import plan
    f16, q8 = plan("1.5b", "q4_k_m", ctx=32768), plan("1.5b", "q4_k_m", ctx=32768, kv="q8_0")
    assert abs(q8.kv_bytes / f16.kv_bytes - 34 / 64) < 1e-3
    assert f16.peak_ram - q8.peak_ram == f16.kv_bytes - q8.kv_bytes
    r = invoke("plan", "1.5b", "int4", "--kv", "q8_0")
    assert r.returncode == 2 and "not a GGUF build" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_q8_0_cache_runs_benches_and_is_scored_against_the_f16_cache(tiny_builds, onnx_builds, tmp_path):
    b = tiny_builds["q8_0"]
    r = run_cli("run", b, "Hello there", "-n", "16", "-t", "0", "--kv", "q8_0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation_tokens"] == 16
    out = tmp_path / "rows.jsonl"
    r = run_cli("bench", b, "--kv", "q8_0", "--repeats", "1", "--prompt-tokens", "32", "--gen-tokens", "16",
                "--out", out)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["kv"] == "q8_0" and row["status"] == "ok"
    # the same file with its own f16 cache as the reference: what is lost is the cache's quantization alone
    r = run_cli("eval", b, "--reference", b, "--kv", "q8_0", "--text", "en", "--windows", "2", "--ctx", "256",
                "--out", out)
    assert r.returncode == 0, r.stderr
    ev = json.loads(out.read_text().splitlines()[-1])
    assert ev["kind"] == "eval" and ev["kv"] == "q8_0" and 0 < ev["kl_mean"] < 0.05
    t = invoke("table", out)
    assert t.returncode == 0 and "llama.cpp (KV q8_0)" in t.stdout
    assert "KL en" not in t.stdout   # a cache's cost is not the build's quality: the quality table ignores it
    r = invoke("run", onnx_builds["int4"], "hi", "--kv", "q8_0")
    assert r.returncode != 0 and "need a GGUF build" in r.stderr and len(r.stderr.strip().splitlines()) == 1
