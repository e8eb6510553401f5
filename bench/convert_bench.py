"""Conversion benchmark: wall time and peak RSS of HF -> GGUF f16 for synthetic 0.5B, 1.5B and 7B.

Each conversion runs in a fresh child process; its peak RSS is the kernel's own high-water mark
(ru_maxrss of that child) and a 20 ms psutil sampler. With --reference PYTHON, llama.cpp's
convert_hf_to_gguf.py (from the llama-cpp-python sdist) is measured on the same checkpoints.

    python -m bench.convert_bench                       # 0.5b 1.5b 7b
    python -m bench.convert_bench 0.5b --reference /path/to/venv/bin/python --ref-script convert_hf_to_gguf.py
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import write_text
from edgeqwen.formats.build import synthetic_checkpoint
from edgeqwen.process import human_bytes
from edgeqwen.recipes import get_recipe


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, sampled peak RSS, the kernel's VmHWM) of one child process."""
    t0 = time.perf_counter()
    # stderr to a file, not a pipe: a chatty child (the genai builder) would block on a full pipe
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc, peak, hwm = psutil.Process(p.pid), 0, 0
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
            with open(f"/proc/{p.pid}/status") as f:
                hwm = max(hwm, next((int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:")), 0))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        err.seek(0)
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err.read()[-2000:]}")
    return wall, peak, hwm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", default=["0.5b", "1.5b", "7b"])
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--reference", help="python with torch+transformers to run llama.cpp's converter")
    ap.add_argument("--ref-script", help="path to convert_hf_to_gguf.py")
    ap.add_argument("--workdir", help="where the GGUFs go (removed after each run)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder for the synthetic checkpoints "
                    "(llama.cpp's converter only accepts tokenizers it recognises)")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        recipe = get_recipe(size)
        ckpt = synthetic_checkpoint(recipe, seed=0, tokenizer=args.tokenizer, log=lambda m: print(m, file=sys.stderr))
        src_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="convbench-"))
        try:
            code = ("import sys; from pathlib import Path; from edgeqwen.checkpoints import open_checkpoint;"
                    "from edgeqwen.formats.gguf.convert import convert;"
                    "convert(open_checkpoint(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3])")
            tools = [("edgeqwen", [sys.executable, "-c", code, str(ckpt), str(work / "ours.gguf"), args.outtype])]
            if args.reference and args.ref_script:
                tools.append(("llama.cpp convert_hf_to_gguf", [args.reference, args.ref_script, str(ckpt), "--outtype",
                                                               args.outtype, "--outfile", str(work / "ref.gguf")]))
            for tool, cmd in tools:
                wall, peak, kmax = measure(cmd)
                rows.append((size, tool, human_bytes(src_bytes), f"{wall:.1f}", human_bytes(peak),
                             human_bytes(kmax) if kmax else "-"))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
                for f in work.glob("*.gguf"):
                    f.unlink()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([f"HF -> GGUF {args.outtype} on {os.cpu_count()} CPUs, "
                      f"{human_bytes(psutil.virtual_memory().total)} RAM", "",
                      "| size | converter | checkpoint | wall s | peak RSS (sampled) | max RSS (kernel) |",
                      "|---|---|---|---|---|---|", *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"
    print("\n" + text, end="")
    if args.out:
        write_text(args.out, text)


if __name__ == "__main__":
    main()
