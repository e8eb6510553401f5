"""`edgeqwen tune`: measured settings per machine and build, used by default, recorded in every bench row."""
import json

from helpers import invoke, run_cli


def test_tune_measures_stores_and_is_used_by_default(tiny_builds, tmp_path):
    env = {"EDGEQWEN_HOME": str(tmp_path / "home")}   # its own tune.json: other tests keep the defaults
    b = tiny_builds["q4_0"]
    # one thread count to try (and the defaults' all cores): the settings' other two dimensions in full
    r = run_cli("tune", b, "--depth", "16", "--gen-tokens", "4", "--repeats", "1", "--threads", "1", env=env,
                timeout=900)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "home" / "tune.json").read_text())
    (key, entry), = data["entries"].items()
    manifest = json.loads((b / "manifest.json").read_text())
    assert key.endswith("/" + manifest["sha256"])
    measured, s = entry["measured"], entry["settings"]
    assert {(m["flash_attn"], m["kv"]) for m in measured} == {(True, "f16"), (True, "q8_0"), (False, "f16")}
    quiet = [m for m in measured if not m["busy"]] or measured
    best = max(quiet, key=lambda m: m["score"])
    assert {k: s[k] for k in ("threads", "flash_attn", "kv")} == {k: best[k] for k in ("threads", "flash_attn", "kv")}
    assert "best:" in r.stderr
    # beside a hog: every thread count (the one tried, and all cores: tune's own count, physical cores) measured,
    # spinning and, where llama.cpp runs its threads with OpenMP, sleeping; the fastest stored
    from edgeqwen.formats.gguf.runner import has_openmp
    from edgeqwen.process import physical_cores
    beside = entry["beside_hog"]
    if physical_cores() == 1:   # nothing to share: tune skips the phase
        assert beside == [] and "busy" not in s
    else:
        waits = {True, False} if has_openmp() else {True}
        assert {(m["threads"], m["spin"]) for m in beside} == {(t, w) for t in (1, physical_cores()) for w in waits}
        assert all(m["others"] > 0.5 for m in beside)
        top = max(beside, key=lambda m: m["tg_empty"])
        assert s["busy"] == {"threads": top["threads"], "spin": top["spin"]} and "beside a hog:" in r.stderr
    out = tmp_path / "rows.jsonl"
    for extra, tuned in (([], True), (["--no-tune"], False)):
        r = run_cli("bench", b, "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8", "--out", out,
                    *extra, env=env)
        assert r.returncode == 0, r.stderr
        row = json.loads(out.read_text().splitlines()[-1])
        got = row["settings"]
        assert got["tuned"] is tuned
        if tuned:
            assert (got["threads"], got["flash_attn"], got["kv"]) == (s["threads"], s["flash_attn"], s["kv"])
        else:
            assert (got["flash_attn"], got["kv"]) == (True, "f16")
    r = run_cli("run", b, "hi", "-n", "4", "-t", "0", "-v", env=env)
    assert r.returncode == 0, r.stderr


def test_a_broken_or_foreign_tune_cache_falls_back_to_the_defaults(tiny_builds, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"EDGEQWEN_HOME": str(home)}
    b = tiny_builds["q8_0"]
    sha = json.loads((b / "manifest.json").read_text())["sha256"]
    out = tmp_path / "rows.jsonl"
    for content in ("{not json", json.dumps({"schema": 1, "entries": {f"another-machine/{sha}": {
            "settings": {"threads": 1, "flash_attn": False, "kv": "q8_0"}}}})):
        (home / "tune.json").write_text(content)
        r = run_cli("bench", b, "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8", "--out", out, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert json.loads(out.read_text().splitlines()[-1])["settings"]["tuned"] is False


def test_tune_needs_a_gguf_build(onnx_builds):
    r = invoke("tune", onnx_builds["int4"])
    assert r.returncode == 2 and "not a GGUF build" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_busy_machine_loads_with_the_busy_settings_unless_threads_are_given(tiny_builds, tmp_path):
    from edgeqwen.measure.hw import fingerprint
    from edgeqwen.measure.tune import hog
    home = tmp_path / "home"
    home.mkdir()
    b = tiny_builds["q4_0"]
    sha = json.loads((b / "manifest.json").read_text())["sha256"]
    device = fingerprint(bandwidth=False)["device_id"]
    (home / "tune.json").write_text(json.dumps({"schema": 1, "entries": {f"{device}/{sha}": {"settings": {
        "threads": 1, "flash_attn": True, "kv": "f16", "busy": {"threads": 1, "spin": False}}}}}))
    # libgomp prints its settings as it loads: a spin count of 0 is the passive wait policy
    env = {"EDGEQWEN_HOME": str(home), "OMP_DISPLAY_ENV": "VERBOSE"}
    with hog():
        busy = run_cli("run", b, "hi", "-n", "2", "-t", "0", env=env)
        given = run_cli("run", b, "hi", "-n", "2", "-t", "0", "--threads", "1", env=env)
    assert busy.returncode == 0 and given.returncode == 0, busy.stderr + given.stderr
    assert "other processes are using" in busy.stderr and "other processes are using" not in given.stderr
    from edgeqwen.formats.gguf.runner import has_openmp
    if has_openmp():   # only libgomp prints its settings (and reads the policy)
        assert "GOMP_SPINCOUNT = '0'" in busy.stderr and "GOMP_SPINCOUNT = '0'" not in given.stderr
