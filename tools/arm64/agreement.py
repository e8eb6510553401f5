"""x86 against arm64 on the same tiny builds: greedy tokens and next-token logits, per precision.

    python tools/arm64/agreement.py prepare DIR    # on x86: build the tiny model's builds, dump x86's outputs
    python tools/arm64/agreement.py dump DIR arm64 # inside the emulated Pi (tests/test_arm64.py does this)
    python tools/arm64/agreement.py compare DIR [--out bench/ARM64.md]

DIR/builds holds the builds (made once, on x86, and run unchanged on both), DIR/<arch>/<build>.npz the
outputs. Logits are compared teacher-forced on one fixed token sequence, so a differing greedy token
does not make every later position differ.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GGUF = ("f16", "q8_0", "q4_k_m", "q4_0")
ONNX = ("fp32", "int8", "int4")
PROMPT = "The capital of France is"
GREEDY = 24


def _env(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_RECIPE
    recipes = root / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    (recipes / "tiny-qwen2.toml").write_text(TINY_RECIPE)
    os.environ.update(EDGEQWEN_HOME=str(root / "home"), EDGEQWEN_RECIPES=str(recipes), HF_HUB_OFFLINE="1")


def prepare(root: Path) -> None:
    """The tiny model (seed 1, as the test fixtures make it) built as every precision, on this machine."""
    _env(root)
    from conftest import REAL_TOKENIZER, tiny_config

    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe
    from edgeqwen.checkpoints.synthetic import write_synthetic
    ckpt = root / "ckpt"
    if not (ckpt / "config.json").exists():
        write_synthetic(ckpt, tiny_config(), seed=1, tokenizer=REAL_TOKENIZER if REAL_TOKENIZER.exists() else None)
    recipe = get_recipe("tiny-qwen2")
    for q in GGUF + ONNX:
        out = root / "builds" / q
        if not (out / "manifest.json").exists():
            build(BuildRequest(recipe=recipe, quant=q, source=ckpt, out=out, threads=2), log=None)


def dump(root: Path, arch: str) -> dict[str, Path]:
    """Greedy tokens and teacher-forced logits of every build, from this machine, into DIR/<arch>/."""
    _env(root)
    from edgeqwen.formats.load import load_runner
    from edgeqwen.runner import Sampling
    outdir = root / arch
    outdir.mkdir(exist_ok=True)
    x86 = root / "x86_64" / "f16.npz"
    ref_seq = np.load(x86)["seq"].tolist() if arch != "x86_64" and x86.exists() else None
    written = {}
    for q in GGUF + ONNX:
        b = root / "builds" / q
        r = load_runner(b, n_ctx=256)
        prompt = r.tokenize(PROMPT, special=False)
        toks = [x.token for x in r.stream(prompt, Sampling(max_tokens=GREEDY, temperature=0, ignore_eos=True))]
        r.close()
        if ref_seq is None:   # one sequence for every build: the prompt and the f16 build's greedy reply
            ref_seq = prompt + toks
        r = load_runner(b, n_ctx=256, logits=True)
        logits = r.logits(ref_seq)
        r.close()
        manifest = json.loads((b / "manifest.json").read_text())
        path = outdir / f"{q}.npz"
        np.savez(path, tokens=np.array(toks), seq=np.array(ref_seq), logits=logits.astype(np.float32),
                 sha256=np.array(manifest.get("sha256", "")))
        written[q] = path
    return written


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_one(a: Path, b: Path) -> dict:
    x, y = np.load(a), np.load(b)
    n = min(len(x["logits"]), len(y["logits"]))
    lx, ly = _log_softmax(x["logits"][:n]), _log_softmax(y["logits"][:n])
    kl = (np.exp(lx) * (lx - ly)).sum(-1)   # KL(x86 || arm64) per position, nats
    ta, tb = x["tokens"].tolist(), y["tokens"].tolist()
    first = next((i for i, (p, q) in enumerate(zip(ta, tb)) if p != q), None)
    return {"tokens_identical": ta == tb, "first_difference": first, "n_tokens": len(ta),
            "max_abs_dlogit": float(np.abs(x["logits"][:n] - y["logits"][:n]).max()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agree": float((lx.argmax(-1) == ly.argmax(-1)).mean())}


def compare(root: Path) -> dict[str, dict]:
    return {q: compare_one(root / "x86_64" / f"{q}.npz", root / "aarch64" / f"{q}.npz")
            for q in GGUF + ONNX if (root / "aarch64" / f"{q}.npz").exists()}


def table(results: dict[str, dict], note: str = "") -> str:
    lines = ["| precision | backend | greedy tokens identical | max abs Δlogit | KL mean (nats) | KL max | "
             "top-1 agreement |", "|---|---|---|---|---|---|---|"]
    for q, r in results.items():
        same = "yes" if r["tokens_identical"] else f"no (first differs at {r['first_difference']} of {r['n_tokens']})"
        lines.append(f"| {q} | {'llama.cpp' if q in GGUF else 'onnxruntime-genai'} | {same} | "
                     f"{r['max_abs_dlogit']:.2e} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | "
                     f"{100 * r['top1_agree']:.1f}% |")
    return "\n".join(lines) + "\n" + note


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    cmd, root = sys.argv[1], Path(sys.argv[2])
    if cmd == "prepare":
        prepare(root)
        dump(root, "x86_64")
    elif cmd == "dump":
        dump(root, sys.argv[3])
    elif cmd == "compare":
        res = compare(root)
        same = json.loads((root / "aarch64" / "same_bytes.json").read_text()) \
            if (root / "aarch64" / "same_bytes.json").exists() else {}
        note = ("\nGGUF files the arm64 quantizer wrote from the same checkpoint: "
                + ", ".join(f"{q} {'byte-identical' if ok else 'DIFFERENT'}" for q, ok in same.items()) + "\n"
                if same else "")
        text = table(res, note)
        print(text)
        if len(sys.argv) > 4 and sys.argv[3] == "--out":
            head = Path(sys.argv[5]).read_text() if len(sys.argv) > 5 else ""
            out = Path(sys.argv[4])
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(head + text)
            tmp.replace(out)
    else:
        sys.exit(f"unknown command {cmd}")
