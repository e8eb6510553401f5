"""`edgeqwen tune`'s winner against llama.cpp's defaults at tg128@d4096, and decode beside a busy process
(`make tune-bench`) -> bench/TUNE.md.

    python bench/tune.py --build qwen2-0.5b-real-q4_k_m --build qwen2-1.5b-real-q8_0 [--rounds 2]

For each build: `edgeqwen tune BUILD` as a user runs it (its own choice of depth, its stored winner and its
busy-machine settings), then decode of 128 tokens after a 4096-token context (llama-bench's tg128@d4096) with
the winner and with llama.cpp's defaults (flash attention auto = on for the CPU, all physical cores, f16 KV
cache), paired: the two sides alternate which goes first in each round, each side a fresh process, measured
twice over, by `edgeqwen bench`'s child (our runner) and by llama-bench itself (built from the sources
llama-cpp-python vendors, tools/build-llama-tools.sh). A cell is the median over the rounds; the ratio is the
median of per-round ratios. Beside-a-hog figures are tune's own (one `while True: pass` process on a core).
With --kv-eval BUILD, the q8_0 KV cache's own quality cost: `edgeqwen eval BUILD --kv q8_0 --reference BUILD`
(the same weights with an f16 cache as the reference).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import llama_tool, write_json, write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GEN = 128


def tune(build: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "edgeqwen.cli", "tune", build], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"edgeqwen tune {build} failed:\n{p.stderr[-2000:]}")
    print(p.stderr, file=sys.stderr, flush=True)
    from edgeqwen.home import resolve_build
    from edgeqwen.measure.hw import fingerprint
    from edgeqwen.measure.tuned import tune_file
    sha = resolve_build(build)[1]["sha256"]
    return json.loads(tune_file().read_text())["entries"][f"{fingerprint(bandwidth=False)['device_id']}/{sha}"]


def ours(build: str, s: dict, depth: int) -> float:
    from edgeqwen.measure.bench import BenchConfig, run_one
    cfg = BenchConfig(prompt_tokens=depth, gen_tokens=GEN, repeats=1, n_ctx=depth + GEN + 64, empty_tg=False,
                      kv=s["kv"], flash_attn=s["flash_attn"], tuned=False)
    row = run_one(build, s["threads"], cfg)
    if row.get("status") != "ok":
        sys.exit(f"bench {build} {s}: {row.get('error')}")
    if row.get("busy"):
        print(f"warning: the machine was busy during {build} {s}", file=sys.stderr)
    return row["tg"]["mean"]


def llama_bench(binary: str, model: Path, s: dict, depth: int) -> float:
    cmd = [binary, "-m", str(model), "-p", "0", "-n", str(GEN), "-d", str(depth), "-r", "2", "-o", "json",
           "-t", str(s["threads"]), "-fa", "on" if s["flash_attn"] else "off", "-ctk", s["kv"], "-ctv", s["kv"]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)[0]["avg_ts"]


def measure(build: str, rounds: int, depth: int, binary: str | None) -> dict:
    from edgeqwen.home import resolve_build
    from edgeqwen.process import physical_cores
    entry = tune(build)
    won = {k: entry["settings"][k] for k in ("threads", "flash_attn", "kv")}
    default = {"threads": physical_cores(), "flash_attn": True, "kv": "f16"}
    path, m = resolve_build(build)
    e = {"build": build, "winner": won, "default": default, "tuned": entry, "ours": {"winner": [], "default": []},
         "llama_bench": {"winner": [], "default": []}}
    sides = ["default", "winner"]
    for i in range(rounds):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            s = won if side == "winner" else default
            e["ours"][side].append(ours(build, s, depth))
            if binary:
                e["llama_bench"][side].append(llama_bench(binary, path / m["file"], s, depth))
            print(f"{build} round {i} {side}: ours {e['ours'][side][-1]:.2f}"
                  + (f", llama-bench {e['llama_bench'][side][-1]:.2f}" if binary else ""), file=sys.stderr, flush=True)
    return e


def kv_eval(build: str) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "edgeqwen.cli", "eval", build, "--kv", "q8_0", "--reference", build,
                        "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"edgeqwen eval {build} --kv q8_0 failed:\n{p.stderr[-2000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _ratio(a: list[float], b: list[float]) -> float | None:
    return statistics.median(x / y for x, y in zip(a, b) if y) if a and b else None


def _label(s: dict) -> str:
    return f"{s['threads']} threads, FA {'on' if s['flash_attn'] else 'off'}, KV {s['kv']}"


def render(data: dict) -> str:
    lines = [
        "# `edgeqwen tune`: its winner against llama.cpp's defaults, and a busy machine",
        "",
        f"Generated by `bench/tune.py` on {data['date']}, {data['device_label']}, {data['rounds']} rounds; raw "
        f"figures in `{data['json']}`.",
        "",
        f"## Decode at depth: tg{GEN}@d{data['depth']}",
        "",
        f"Decode tok/s of {GEN} tokens after a {data['depth']}-token context, with tune's winner (chosen by "
        "`edgeqwen tune BUILD` as a user runs it: prefill 1024, decode from empty and at depth 1024, geometric "
        "mean) and with llama.cpp's defaults (flash attention auto = on on the CPU, all physical cores, f16 KV "
        "cache), measured by our runner (bench's child process) and by llama-bench (`-p 0 -n 128 -d "
        f"{data['depth']} -r 2`), fresh processes, sides alternating; medians over the rounds.",
        "",
        "| build | tune's winner | defaults: ours | winner: ours | **ratio** | defaults: llama-bench | winner: "
        "llama-bench | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    med = lambda xs: f"{statistics.median(xs):.2f}" if xs else "-"   # noqa: E731
    for e in data["entries"]:
        r, rl = _ratio(e["ours"]["winner"], e["ours"]["default"]), _ratio(e["llama_bench"]["winner"],
                                                                          e["llama_bench"]["default"])
        lines.append(f"| {e['build']} | {_label(e['winner'])} | {med(e['ours']['default'])} | "
                     f"{med(e['ours']['winner'])} | **{r:.3f}x** | {med(e['llama_bench']['default'])} | "
                     f"{med(e['llama_bench']['winner'])} | {f'{rl:.3f}x' if rl else '-'} |")
    lines += ["", "## Beside a busy process", "",
              "Decode tok/s from an empty context (64 tokens, tune's own measurement) with one other process "
              "spinning on a core (`python -c 'while True: pass'`, started by tune), at each thread count, with "
              "llama.cpp's threads spinning while they wait (libgomp's default) or sleeping (OMP_WAIT_POLICY="
              "passive); against the idle winner's decode from an empty context in the same tune run.", "",
              "| build | idle tok/s | threads | wait | beside a hog tok/s | x idle |", "|---|---|---|---|---|---|"]
    for e in data["entries"]:
        t = e["tuned"]
        won = t["settings"]
        idle = next(m["tg_empty"] for m in t["measured"]
                    if all(m[k] == won[k] for k in ("threads", "flash_attn", "kv")))
        for m in t.get("beside_hog", []):
            chosen = won.get("busy") == {"threads": m["threads"], "spin": m["spin"]}
            lines.append(f"| {e['build']} | {idle:.2f} | {m['threads']} | {'spin' if m['spin'] else 'sleep'} | "
                         f"{'**' if chosen else ''}{m['tg_empty']:.2f}{'**' if chosen else ''} | "
                         f"{m['tg_empty'] / idle:.2f}x |")
    if data.get("kv_eval"):
        lines += ["", "## The q8_0 KV cache's quality cost", "",
                  "`edgeqwen eval BUILD --kv q8_0 --reference BUILD`: the same weights, scored with a q8_0 KV cache "
                  "against an f16 one, on the bundled texts (window 512, its second half scored). KL is "
                  "KL(f16 cache || q8_0 cache) in nats per token; compare with what the weights' quantization "
                  "costs in QUALITY.md (q8_0 weights: 0.0008 en).", "",
                  "| build | text | tokens | PPL q8_0 cache (f16 cache) | KL mean | KL p99 | top-1 agreement |",
                  "|---|---|---|---|---|---|---|"]
        for r in data["kv_eval"]:
            lines.append(f"| {r['build']['name']} | {r['text']} | {r['tokens_scored']} | {r['ppl']:.3f} "
                         f"({r['ref_ppl']:.3f}) | {r['kl_mean']:.4f} | {r['kl_p99']:.4f} | {100 * r['top1']:.1f}% |")
    return "\n".join(lines) + "\n" + data.get("notes", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=False, default=[])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--no-reference", action="store_true", help="skip llama-bench")
    ap.add_argument("--kv-eval", action="append", default=[], metavar="BUILD",
                    help="score the q8_0 KV cache against f16 on BUILD's own weights")
    ap.add_argument("--out", type=Path, default=HERE / "TUNE.md")
    ap.add_argument("--render", type=Path, metavar="JSON")
    a = ap.parse_args()
    if a.render:
        data = json.loads(a.render.read_text())
    else:
        binary = None if a.no_reference else llama_tool("llama-bench")
        from edgeqwen.measure.hw import device_label, fingerprint
        fp = fingerprint(bandwidth=False)
        dest = HERE / "results" / f"tune-{fp['device_id']}.json"
        data = {"date": time.strftime("%Y-%m-%d"), "device_label": device_label(fp), "rounds": a.rounds,
                "depth": a.depth, "json": str(dest.relative_to(HERE.parent)), "entries": []}
        def save():
            write_json(dest, data)
        for b in a.build:
            data["entries"].append(measure(b, a.rounds, a.depth, binary))
            save()
        for b in a.kv_eval:
            data.setdefault("kv_eval", []).extend(kv_eval(b))
            save()
    text = render(data)
    write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
