"""info, verify, rm and gc on real tiny builds; the cached check every load makes."""
import json
import shutil

from helpers import invoke, run_cli


def _copy_build(src, home_builds, name):
    dst = home_builds / name
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["name"] = name
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_info_shows_manifest_files_plan_and_rows(tiny_builds, tmp_path):
    folder = tiny_builds["q4_k_m"]
    m = json.loads((folder / "manifest.json").read_text())
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"schema": 1, "kind": "eval", "id": "x1", "time": "2026-01-01T00:00:00Z",
                                "device": {"device": "d", "cpu": "c"}, "text": "en", "ppl": 12.5,
                                "build": {"name": m["name"], "sha256": m["sha256"], "quant": "q4_k_m"}}) + "\n")
    r = invoke("info", folder, "--rows", rows)
    assert r.returncode == 0, r.stderr
    assert m["sha256"] in r.stdout and "model.gguf" in r.stdout and "PPL 12.500" in r.stdout
    d = json.loads(invoke("info", folder, "--json").stdout)
    assert d["files"]["model.gguf"] == m["file_size"] and d["manifest"]["quant"] == "q4_k_m"


def test_verify_catches_a_corrupted_file_and_run_refuses_it(tiny_builds, isolated_env):
    b = _copy_build(tiny_builds["q8_0"], isolated_env / "home" / "builds", "corrupt-me")
    r = invoke("verify", "corrupt-me")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    with open(b / "model.gguf", "r+b") as f:   # flip bytes in the tensor data, keep size and header
        f.seek(-4096, 2)
        f.write(b"\xff" * 64)
    r = invoke("verify", "corrupt-me")
    assert r.returncode == 1 and str(b / "model.gguf") in r.stderr and "sha256" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("run", "corrupt-me", "hi", "-n", "2")   # mtime changed: the load re-hashes and refuses
    assert r.returncode == 1 and "does not match" in r.stderr and r.stdout == ""


def test_verify_onnx_build_covers_its_data_file(onnx_builds, isolated_env):
    b = _copy_build(onnx_builds["int8"], isolated_env / "home" / "builds", "onnx-corrupt")
    assert invoke("verify", "onnx-corrupt").returncode == 0
    with open(b / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    r = invoke("verify", "onnx-corrupt")
    assert r.returncode == 1 and "model.onnx.data" in r.stderr


def test_rm_removes_only_builds(tiny_builds, isolated_env, tmp_path):
    builds = isolated_env / "home" / "builds"
    _copy_build(tiny_builds["q4_0"], builds, "to-remove")
    r = invoke("rm", "to-remove")
    assert r.returncode == 0 and not (builds / "to-remove").exists()
    outside = tmp_path / "mine"
    shutil.copytree(tiny_builds["q4_0"], outside)
    r = invoke("rm", outside)
    assert r.returncode == 2 and "only removes its own builds" in r.stderr and outside.exists()
    r = invoke("rm", "no-such-build")
    assert r.returncode == 2 and "no build named" in r.stderr


def test_gc_finds_unused_checkpoints_and_references(tiny_builds, isolated_env):
    home = isolated_env / "home"
    orphan = home / "checkpoints" / "orphan-synthetic"
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"\0" * 4096)
    ref = _copy_build(tiny_builds["f16"], home / "builds", "lonely-ref")
    m = json.loads((ref / "manifest.json").read_text())
    m.update(role="reference", source={"kind": "local", "id": "/nowhere", "path": "/nowhere"})
    (ref / "manifest.json").write_text(json.dumps(m))
    dry = invoke("gc", "--dry-run")
    assert dry.returncode == 0 and "orphan-synthetic" in dry.stdout and "lonely-ref" in dry.stdout
    assert orphan.exists() and ref.exists()
    assert all(n not in dry.stdout for n in ("q4_k_m", "q8_0"))   # builds themselves are never garbage
    r = invoke("gc")
    assert r.returncode == 0 and not orphan.exists() and not ref.exists()
    assert tiny_builds["q4_k_m"].exists()


def test_build_names_are_one_safe_path_component(tiny_ckpt, isolated_env):
    for bad in ("../../x", "a/b", ".hidden", ""):
        r = invoke("build", "tiny", "q8", "--source", tiny_ckpt, "--name", bad)
        assert r.returncode == 2 and "--name" in r.stderr, (bad, r.stderr)
    assert not (isolated_env / "x").exists()
