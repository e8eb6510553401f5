"""Builds end to end on the tiny model: outputs, reuse, interruption and every bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import invoke, run_cli

from edgeqwen.process import sha256_file


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q4_0"])
def test_quantized_builds_load_and_generate(tiny_builds, quant):
    """Fails if a quantized model crashes llama.cpp (the gcc/AMX miscompile) or yields no tokens."""
    folder = tiny_builds[quant]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["quant"] == quant and m["format"] == "gguf" and not m["synthetic"]
    assert m["smoke"]["tokens"] >= 1
    # and again now, in a fresh process, with a longer prompt so batched (AMX) matmuls run
    r = run_cli("run", folder, "Write a long story about a lighthouse keeper and the sea. " * 8,
                "-n", "16", "-t", "0", "--json")
    assert r.returncode == 0, f"llama.cpp exited {r.returncode}: {r.stderr[-500:]}"
    out = json.loads(r.stdout)
    assert out["generation_tokens"] >= 1


def test_manifest_records_what_was_built(tiny_builds, tiny_ckpt):
    folder = tiny_builds["q4_k_m"]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["file_size"] == (folder / "model.gguf").stat().st_size
    assert m["sha256"] == sha256_file(folder / "model.gguf")
    assert m["source"]["kind"] == "local" and m["source"]["files"]["model.safetensors"] == \
        sha256_file(tiny_ckpt / "model.safetensors")
    assert {"convert", "quantize"} <= set(m["timings_s"]) and m["peak_rss_bytes"]["quantize"] > 0
    assert m["tools"]["llama_cpp_python"] and m["tools"]["gguf"]
    assert not (folder / "model-f16.gguf").exists()  # intermediate removed


def test_existing_build_is_reused_and_never_silently_replaced(tiny_builds, tiny_untied_ckpt, tiny_ckpt):
    folder = tiny_builds["q8_0"]
    before = (folder / "manifest.json").stat().st_mtime_ns
    r = invoke("build", "tiny", "q8", "--source", tiny_ckpt)
    assert r.returncode == 0 and "already built" in r.stderr
    assert (folder / "manifest.json").stat().st_mtime_ns == before
    r = invoke("build", "tiny", "q8", "--source", tiny_untied_ckpt)
    assert r.returncode != 0 and "--force" in r.stderr
    assert (folder / "manifest.json").stat().st_mtime_ns == before


def test_synthetic_build_is_marked(tmp_path):
    r = run_cli("build", "tiny", "q8", "--synthetic", "--out", tmp_path / "syn")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert m["synthetic"] is True and m["source"]["kind"] == "synthetic"
    assert m["name"].endswith("-synthetic")


def _bad_folder(tmp_path, tiny_ckpt, kind):
    d = tmp_path / kind
    shutil.copytree(tiny_ckpt, d)
    st = d / "model.safetensors"
    if kind == "missing-weights":
        st.unlink()
    elif kind == "truncated":
        with open(st, "r+b") as f:
            f.truncate(st.stat().st_size // 2)
    elif kind == "not-qwen2":
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "pickle-only":
        st.rename(d / "pytorch_model.bin")
    elif kind == "remote-code":
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "wrong-size":
        pass
    return d


@pytest.mark.parametrize("kind,model,message", [
    ("missing-weights", "tiny", "no \\*.safetensors"),
    ("truncated", "tiny", "truncated"),
    ("not-qwen2", "tiny", "not qwen2"),
    ("pickle-only", "tiny", "never loads pickle"),
    ("remote-code", "tiny", "remote code"),
    ("wrong-size", "0.5b", "not a qwen2-0.5b checkpoint"),
])
def test_bad_sources_fail_cleanly(tmp_path, tiny_ckpt, kind, model, message):
    import re
    d = _bad_folder(tmp_path, tiny_ckpt, kind)
    out = tmp_path / "out"
    r = invoke("build", model, "q8", "--source", d, "--out", out)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("Error:") and re.search(message, lines[-1]), r.stderr
    assert not out.exists() and not list(tmp_path.glob("out*tmp*"))


@pytest.mark.parametrize("args,message", [
    (["3b", "q4"], "unknown model"),
    (["0.5b", "q5"], "unknown quant"),
    (["0.5b", "iq2_xxs"], "importance matrix"),
])
def test_bad_names_fail_with_the_choices(args, message):
    r = invoke("build", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_offline_hub_miss_names_the_repo_and_source_flag(tmp_path):
    r = invoke("build", "0.5b", "q4", env={"HF_HOME": str(tmp_path / "empty-hf")})
    assert r.returncode != 0
    assert "Qwen/Qwen2-0.5B-Instruct" in r.stderr and "--source" in r.stderr


def test_hub_cache_path_through_huggingface_hub(tmp_path, tiny_ckpt):
    """A checkpoint in the huggingface_hub cache is found offline by the real client."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--edgeqwen-test--tiny-qwen2"
    shutil.copytree(tiny_ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "b"
    r = run_cli("build", "tiny", "q8", "--out", out, "--no-smoke", env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["kind"] == "hub" and m["source"]["commit"] == commit


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_build_leaves_nothing_that_looks_finished(tmp_path, tiny_ckpt, sig):
    home = tmp_path / "home"
    env = dict(os.environ, EDGEQWEN_HOME=str(home))
    p = subprocess.Popen([sys.executable, "-m", "edgeqwen.cli", "build", "tiny", "f16", "--source", str(tiny_ckpt)],
                         env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    partial = []
    while time.time() < deadline and not partial:  # wait until it is writing
        partial = [f for f in (home / "builds").glob("*tmp*/*.gguf")] if (home / "builds").exists() else []
        time.sleep(0.01)
    assert partial, "build never started writing"
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode != 0
    final = home / "builds" / "tiny-qwen2-f16"
    assert not final.exists()
    # a rerun cleans up whatever a kill left and completes
    r = run_cli("build", "tiny", "f16", "--source", tiny_ckpt, "--no-smoke", env={"EDGEQWEN_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (home / "builds").iterdir()] == ["tiny-qwen2-f16"]


def test_full_disk_fails_cleanly(tmp_path, tiny_ckpt):
    """A real small filesystem (tmpfs) that cannot hold the build."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run_cli("build", "tiny", "f16", "--source", tiny_ckpt, "--out", mnt / "b")
        assert r.returncode != 0 and "disk" in r.stderr.splitlines()[-1]
        assert list(mnt.iterdir()) == []
        # past the preflight: the filesystem fills up while writing
        r = run_cli("build", "tiny", "f16", "--source", tiny_ckpt, "--out", mnt / "b",
                    env={"EDGEQWEN_SKIP_DISK_CHECK": "1"})
        assert r.returncode != 0 and "disk full" in r.stderr.splitlines()[-1], r.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_list_shows_builds_and_recipes(tiny_builds):
    r = invoke("list")
    assert r.returncode == 0
    assert "tiny-qwen2-q4_k_m" in r.stdout and "Qwen/Qwen2-7B-Instruct" in r.stdout and "q6_k" in r.stdout
