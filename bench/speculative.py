"""Speculative decoding against the target alone and llama.cpp's own speculative example (`make speculative`)
-> bench/SPECULATIVE.md.

    python -m bench.speculative --target qwen2-1.5b-real-q8_0 --draft qwen2-0.5b-real-q4_0 [--draft ...] \
        [--target ...] [--worst TARGET=DRAFT] [--rounds 3]

Every figure is one fresh process decoding 128 greedy tokens after a chat-templated prompt (code, chat, and a
summarise-this-text prompt): `edgeqwen run --json --no-tune` (llama.cpp's default settings, as the example
runs with) alone, with `--draft`, and with `--lookup`, and
`llama-speculative-simple` (built from the llama.cpp llama-cpp-python vendors, tools/build-llama-tools.sh) with
the same draft and draft length. The sides alternate which goes first in each round; a cell is the median decode
tok/s over the rounds and the ratio is the median of per-round ratios. Greedy output is checked identical to the
target alone in every run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import HERE, RESULTS, edgeqwen, llama_tool, write_json, write_text


N = 128
DRAFT_MAX = 8
_CODE = '''def parse_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, qty, price = line.split(",")
            rows.append({"name": name, "qty": int(qty), "price": float(price)})
    return rows
'''
_TEXT = ("The Raspberry Pi 5 is a single-board computer released in October 2023. It uses a Broadcom BCM2712 "
         "system on a chip with four Arm Cortex-A76 cores at 2.4 GHz, a VideoCore VII GPU, and LPDDR4X memory in "
         "2, 4, 8 or 16 GB. Compared with the Raspberry Pi 4, it is two to three times faster in CPU benchmarks, "
         "adds a PCI Express 2.0 lane for fast storage, a real-time clock, and a power button. It needs a 5 V, "
         "5 A power supply to power high-current USB devices, and an active cooler is recommended under sustained "
         "load because the chip throttles at 85 degrees Celsius.")
PROMPTS = {
    "code": "Write a Python function that reads a CSV file of name,qty,price rows and returns the total value "
            "per name as a dict, with type hints and a docstring.",
    "code edit": "Add type hints and a docstring to this function, and make it skip rows with a negative qty. "
                 "Return the whole function.\n\n" + _CODE,
    "chat": "What are three good habits for a healthy sleep schedule? Explain each in two sentences.",
    "summarise": _TEXT + "\n\nSummarise the text above in three sentences.",
}


def templated(build: str, prompt: str) -> str:
    """The chat-templated text, given to both sides raw so they decode after the same tokens."""
    from edgeqwen.formats.load import load_runner
    r = load_runner(build, n_ctx=512)
    try:
        return r.apply_chat_template([{"role": "user", "content": prompt}])
    finally:
        r.close()


def ours(target: str, text: str, threads: int, draft: str | None) -> dict:
    extra = [] if draft is None else ["--lookup"] if draft == "lookup" else ["--draft", draft]
    out = json.loads(edgeqwen("run", target, text, "--raw", "-n", N, "-t", 0, "--json", "--threads", threads,
                         "--draft-max", DRAFT_MAX, "--no-tune", *extra).strip().splitlines()[-1])
    spec = out["counters"].get("speculative") or {}
    return {"tps": out["generation_tps"], "text": out["text"], "acceptance": spec.get("acceptance")}


def llama_spec(binary: str, target: Path, draft: Path, text: str, threads: int) -> dict:
    """llama-speculative-simple: greedy, the same draft length; its own decode speed and acceptance."""
    with open(RESULTS / ".spec-prompt.txt", "w") as f:
        f.write(text)
    p = subprocess.run([binary, "-m", str(target), "-md", str(draft), "-f", f.name, "-n", str(N), "--temp", "0",
                        "--top-k", "1", "-t", str(threads), "-td", str(threads), "-c", "4096",
                        "--spec-type", "draft-simple", "--spec-draft-n-max", str(DRAFT_MAX), "--spec-draft-n-min", "0",
                        "-fa", "on"],
                       capture_output=True, text=True)
    log = p.stdout + p.stderr
    speed = re.search(r"decoded\s+\d+\s+tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", log)
    acc = re.search(r"accept\s+=\s+([\d.]+)%", log)
    if p.returncode != 0 or not speed:
        sys.exit(f"llama-speculative-simple failed ({p.returncode}):\n{log[-3000:]}")
    return {"tps": float(speed.group(1)), "acceptance": float(acc.group(1)) / 100 if acc else None}


def model_file(build: str) -> Path:
    from edgeqwen.home import resolve_build
    path, m = resolve_build(build)
    return path / m["file"]


def measure(pairs: list[tuple[str, str]], rounds: int, threads: int, binary: str | None, prompts: dict,
            save=None) -> list[dict]:
    out = []
    for target, draft in pairs:
        texts = {k: templated(target, v) for k, v in prompts.items()}
        for kind, text in texts.items():
            e = {"target": target, "draft": draft, "prompt": kind, "alone": [], "ours": [], "ref": [],
                 "identical": True, "acceptance": [], "ref_acceptance": []}
            sides = ["alone", "ours"] + (["ref"] if binary and draft != "lookup" else [])
            for i in range(rounds):
                for side in (sides if i % 2 == 0 else sides[::-1]):
                    if side == "ref":
                        r = llama_spec(binary, model_file(target), model_file(draft), text, threads)
                        e["ref_acceptance"].append(r["acceptance"])
                    else:
                        r = ours(target, text, threads, None if side == "alone" else draft)
                        if side == "ours":
                            e["acceptance"].append(r["acceptance"])
                        e.setdefault("texts", {}).setdefault(side, []).append(r["text"])
                    e[side].append(r["tps"])
                print(f"{target} {draft} {kind} round {i}: " + ", ".join(f"{s} {e[s][-1]:.1f}" for s in sides),
                      file=sys.stderr, flush=True)
            e["identical"] = _identical(e)
            if not e["identical"]:   # where the first run that differs leaves the target's text
                e["first_diff"] = _first_diff(e)
            e.pop("texts", None)
            out.append(e)
            if save:
                save(out)
    return out


def _identical(e: dict) -> bool:
    t = e.get("texts", {})
    return len(set(t.get("alone", []) + t.get("ours", []))) == 1


def _first_diff(e: dict) -> tuple[int, int]:
    """(characters in common, length of the target's text) for the earliest divergence over the runs."""
    ref = e["texts"]["alone"][0]
    common = min(len(os.path.commonprefix([ref, t])) for t in e["texts"]["alone"] + e["texts"]["ours"])
    return common, len(ref)


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b) if y)


def render(data: dict) -> str:
    lines = [
        "# Speculative decoding: a small Qwen2 drafts, the big one verifies",
        "",
        f"Generated by `python -m bench.speculative` on {data['date']}, {data['device_label']}, "
        f"{data['threads']} threads, {data['rounds']} rounds; raw figures in `{data['json']}`.",
        "",
        f"Each cell: decode tok/s over {N} greedy tokens after a chat-templated prompt, one fresh process per run, "
        "the sides alternating which goes first; the median over the rounds (speed-up: the median of per-round "
        f"ratios). Drafts up to {DRAFT_MAX} tokens (ours adapts the length; llama-speculative-simple is given the "
        "same maximum, --spec-draft-n-min 0 and its default --spec-draft-p-min, 0). `identical`: every greedy "
        "output of ours equals the target alone's, token for token.",
        "",
        "| target | draft | prompt | alone tok/s | ours tok/s | speed-up | accepted | llama.cpp spec tok/s | ours / "
        "llama.cpp | its accepted | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def med(xs, fmt="{:.2f}"):
        xs = [x for x in xs if x is not None]
        return fmt.format(statistics.median(xs)) if xs else "-"
    for e in data["entries"]:
        ref = e["ref"]
        cells = [e["target"], e["draft"], e["prompt"], med(e["alone"]), med(e["ours"]),
                 f"**{_ratio(e['ours'], e['alone']):.2f}x**", med([a and 100 * a for a in e["acceptance"]], "{:.0f}%"),
                 med(ref), f"{_ratio(e['ours'], ref):.2f}x" if ref else "-",
                 med([a and 100 * a for a in e["ref_acceptance"]], "{:.0f}%"),
                 "yes" if e["identical"] else "**no**" + (" (same first {} of {} chars)".format(*e["first_diff"])
                                                          if e.get("first_diff") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + data.get("notes", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", default=[])
    ap.add_argument("--draft", action="append", default=[], help="a draft build, or lookup")
    ap.add_argument("--worst", action="append", default=[], metavar="TARGET=DRAFT",
                    help="a pair measured on the chat prompt only (e.g. synthetic weights: acceptance near zero)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-spec", help="llama-speculative-simple (default: tools/build-llama-tools.sh's)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "SPECULATIVE.md")
    ap.add_argument("--render", type=Path, metavar="JSON")
    ap.add_argument("--append", action="store_true", help="keep the entries already in this device's JSON")
    a = ap.parse_args()
    if a.render:
        data = json.loads(a.render.read_text())
    else:
        binary = None
        if not a.no_reference:
            binary = a.llama_spec or llama_tool("llama-speculative-simple")
        from edgeqwen.measure.hw import device_label, fingerprint
        fp = fingerprint(bandwidth=False)
        dest = RESULTS / f"speculative-{fp['device_id']}.json"
        data = {"date": time.strftime("%Y-%m-%d"), "device_label": device_label(fp), "threads": a.threads,
                "rounds": a.rounds, "json": str(dest.relative_to(HERE.parent)), "entries": []}

        def save(entries):
            data["entries"] = done + entries
            write_json(dest, data)
        done: list[dict] = json.loads(dest.read_text())["entries"] if a.append and dest.exists() else []
        done += measure([(t, d) for t in a.target for d in a.draft], a.rounds, a.threads, binary, PROMPTS, save)
        for w in a.worst:
            t, d = w.split("=", 1)
            done += measure([(t, d)], a.rounds, a.threads, binary, {"chat": PROMPTS["chat"]}, save)
        data["entries"] = done
        save([])
    text = render(data)
    write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
