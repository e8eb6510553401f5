"""`edgeqwen bench | hw | table | plan | eval`: measuring. Registered on the group in cli/__init__.py."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .params import (CTX, KV_OPTION, OUT_DIR, OUT_FILE, SPEED_FRACTION, THREADS, draft_of, speculative_options,
                     tune_options)


@click.command("bench")
@click.argument("builds", nargs=-1, required=True)
@click.option("--threads", help="Thread counts, comma-separated (default: `edgeqwen tune`'s, else physical cores).")
@click.option("--prompt-tokens", default=512, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Prefill length (random tokens).")
@click.option("--gen-tokens", default=128, show_default=True, type=click.IntRange(2, 1 << 20),
              help="Decode length (EOS disabled).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option("--ctx", default=4096, show_default=True, type=CTX, help="Context the build is loaded with.")
@click.option("--out", type=OUT_FILE, help="Append one JSON row per measurement to FILE.jsonl.")
@click.option("--memory-limit", help="Also run each build inside a memory cgroup of this size (e.g. 4G, 7.2G).")
@click.option("--lean", is_flag=True, help="Load without repacked/prepacked weight copies (less RAM, maybe slower).")
@click.option("--workers", help="llama.cpp RPC workers HOST:PORT,... to spread each build over (edgeqwen worker).")
@click.option("--split", help="Layer shares, this machine first, then each worker (e.g. 1,1,1).")
@speculative_options
@KV_OPTION
@tune_options
def bench_cmd(builds, threads, prompt_tokens, gen_tokens, repeats, ctx, out, memory_limit, lean, workers, split,
              draft, lookup, draft_max, kv, flash_attn, no_tune):
    """Measure BUILDS on this machine: load time, prefill and decode tok/s, TTFT, peak RSS.

    Each build and thread count runs in a fresh process, after one warm-up. A build that
    fails to load or runs out of memory becomes a failure row and the run goes on; the
    exit status is then 1.

    \b
      edgeqwen bench qwen2-0.5b-q4_k_m qwen2-0.5b-q8_0 --threads 1,2 --out results.jsonl
      edgeqwen bench qwen2-7b-q4_k_m --workers pi-2.local:50052 --split 1,1
    """
    from ..measure.bench import BenchConfig, bench, parse_threads
    from ..measure.hw import device_label, fingerprint
    from ..measure.table import render_rows
    ts = parse_threads(threads) if threads else None   # None: each build's tuned count, else all cores
    if prompt_tokens < 1 or gen_tokens < 2 or repeats < 1:
        from ..errors import UsageError
        raise UsageError("--prompt-tokens >= 1, --gen-tokens >= 2 and --repeats >= 1")
    from ..formats.gguf.rpc import check_workers, parse_split, parse_workers
    eps = parse_workers(workers)
    if eps:
        check_workers(eps)
    cfg = BenchConfig(prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                      n_ctx=max(ctx, prompt_tokens + gen_tokens + 16), lean=lean, workers=[str(e) for e in eps],
                      split=parse_split(split, len(eps)), draft=draft_of(draft, lookup), draft_max=draft_max, kv=kv,
                      flash_attn=None if flash_attn is None else flash_attn == "on", tuned=not no_tune)
    limit = None
    if memory_limit:
        from ..measure.memlimit import MemoryCgroup, parse_size
        limit = parse_size(memory_limit)
        with MemoryCgroup(limit):   # fail now, with one line, if cgroups are unavailable
            pass
    click.echo("measuring this machine's memory bandwidth...", err=True)

    fp = fingerprint()
    click.echo(device_label(fp), err=True)

    def progress(row):
        if row["status"] != "ok":
            click.echo(f"{row['build']['name']} ({row['threads']} threads): {row['status']}: {row['error']}", err=True)
    rows = bench(list(builds), ts, cfg, fp, out=out, progress=progress, memory_limit=limit)
    from ..measure.plan import predicted_rss_for_row
    click.echo(render_rows(rows, "md", plan_fn=predicted_rss_for_row))
    # Under --memory-limit an OOM kill or a crawl is the answer asked for; anything else not ok is a failure: its
    # row is written, but a script must not take the run for a success.
    failed = [r for r in rows if r["status"] != "ok" and not r.get("memory_limit")]
    if failed:
        from ..errors import EdgeqwenError
        raise EdgeqwenError(f"{len(failed)} of {len(rows)} measurements failed"
                            + (f" (rows in {out})" if out else "") + ": " + failed[0]["error"].splitlines()[0][:200])


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-bandwidth", is_flag=True, help="Skip the memory bandwidth test.")
def hw(as_json, no_bandwidth):
    """Print this machine's hardware fingerprint (CPU, ISA, cores, RAM, bandwidth, versions).

    \b
      edgeqwen hw --json
    """
    from ..measure.hw import fingerprint
    fp = fingerprint(bandwidth=not no_bandwidth)
    if as_json:
        click.echo(json.dumps(fp, indent=2))
        return
    for k, v in fp.items():
        if k in ("ram_total", "ram_available"):
            v = f"{v / 2**30:.1f} GiB"
        elif isinstance(v, (list, tuple)):
            v = " ".join(v) or "-"
        elif isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        click.echo(f"{k:15s} {v}")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "html"]), default="md", show_default=True)
@click.option("--plot", type=OUT_FILE, help="Decode tok/s against peak RSS, as a PNG.")
@click.option("--claims", is_flag=False, flag_value="-", type=click.Path(path_type=Path),
              help="Judge claims: the bundled ones (--claims alone) or those in a TOML file.")
@click.option("--profiles", "--devices", "devices", type=click.Path(path_type=Path),
              help="Device profiles file (default: the bundled ones).")
def table(files, fmt, plot, claims, devices):
    """Merge result rows (JSONL) from any number of machines into one table, grouped by device.

    \b
      edgeqwen table bench/results/*.jsonl --claims --plot results.png
    """
    from ..measure.plan import predicted_rss_for_row
    from ..measure.table import load_rows, render_rows
    from ..measure.table import plot as draw
    rows = load_rows(list(files))
    if not rows:
        from ..errors import UsageError
        raise UsageError("no rows in " + ", ".join(map(str, files)))
    click.echo(render_rows(rows, fmt, plan_fn=predicted_rss_for_row))
    if claims:
        from ..measure.claims import judge, load_claims, render_claims
        from ..measure.plan import load_devices
        devs = load_devices(devices)
        cs = load_claims(None if str(claims) == "-" else claims)
        click.echo("\n" + render_claims([judge(c, rows, devs) for c in cs]))
    if plot:
        draw(rows, plot)
        click.echo(f"plot written to {plot}", err=True)


@click.command("plan")
@click.argument("size")
@click.argument("quant", default="q4")
@click.option("--ctx", default=4096, show_default=True, type=CTX, help="Context length to hold in the KV cache.")
@click.option("--device", help="A device profile (list them with --device list).")
@click.option("--devices", "pool", help="Several devices sharing the model over llama.cpp RPC, this one first: "
              "[COUNTx]PROFILE,... (e.g. 3xraspberry-pi-5-4gb).")
@click.option("--profiles", "devices", type=click.Path(path_type=Path), help="Device profiles file.")
@click.option("--draft", metavar="SIZE[:QUANT]", help="Also the memory of a draft model for speculative decoding "
              "(e.g. 0.5b:q4_0; run --draft loads it beside the target).")
@KV_OPTION
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Conversations served at once (serve --parallel): a context of --ctx for each.")
def plan_cmd(size, quant, ctx, device, pool, devices, draft, kv, parallel):
    """Predict file size, peak RAM and decode speed of SIZE as QUANT, and whether it fits a device.

    SIZE is a recipe size (0.5b, 1.5b, 7b) or 72b / 57b-a14b, by arithmetic. Without --device
    it plans for this machine's CPU (on AMX CPUs llama.cpp keeps more repacked weights).

    \b
      edgeqwen plan 7b q4 --ctx 32768 --device x86-laptop-ddr5-16gb
      edgeqwen plan 72b q4 --devices 5xraspberry-pi-5-16gb
      edgeqwen plan 1.5b q8 --draft 0.5b:q4_0 --device raspberry-pi-5-4gb
    """
    kv = kv or "f16"
    from ..errors import UsageError
    from ..measure.hw import fingerprint
    from ..measure.plan import describe, describe_pool, load_devices, parse_pool, plan, plan_pool
    if pool:
        if device:
            raise UsageError("give --device or --devices, not both")
        if draft:
            raise UsageError("--draft does not combine with --devices (speculative decoding runs on one machine)")
        click.echo(describe_pool(plan_pool(size, quant, parse_pool(pool, load_devices(devices)), ctx=ctx)))
        return
    devs = load_devices(devices) if device else {}
    if device == "list":
        for name, d in load_devices(devices).items():
            click.echo(f"{name:24s} {d['ram_gib']:>4} GiB {d['bandwidth_gbs']:>7} GB/s  {d['source']}")
        return
    if device and device not in devs:
        raise UsageError(f"unknown device {device!r}; choose one of: {', '.join(devs)}")
    amx = bool(devs.get(device, {}).get("amx")) if device else \
        "amx_int8" in fingerprint(bandwidth=False, provenance=False)["isa"]
    p = plan(size, quant, ctx=ctx, amx=amx, kv=kv, parallel=parallel)
    click.echo(describe(p, device, devs.get(device)))
    if draft:
        from ..measure.plan import describe_draft
        dsize, _, dquant = draft.partition(":")
        click.echo(describe_draft(p, plan(dsize, dquant or "q4_0", ctx=ctx, amx=amx, kv=kv), device,
                                  devs.get(device)))


@click.command("eval")
@click.argument("build")
@click.option("--reference", help="Reference build or Hugging Face folder (default: the f16 GGUF, or for ONNX "
              "builds the fp32 ONNX, of the same source, built if missing).")
@click.option("--text", "texts", multiple=True, default=["en", "zh"], show_default=True,
              help="en, zh (bundled texts) or a file; repeat for several.")
@click.option("--ctx", default=512, show_default=True, type=CTX, help="Window length; its second half is scored.")
@click.option("--threads", type=THREADS)
@click.option("--windows", "max_windows", type=click.IntRange(min=1), help="Score only N windows a text.")
@click.option("--json", "as_json", is_flag=True, help="Print the result rows as JSON lines.")
@click.option("--out", type=OUT_FILE, help="Append the rows to FILE.jsonl (for `edgeqwen table`).")
@KV_OPTION
def eval_cmd(build, reference, texts, ctx, threads, max_windows, as_json, out, kv):
    """Measure what quantization costs: perplexity, KL and top-1 agreement against a reference.

    \b
      edgeqwen eval qwen2-0.5b-q4_k_m --text en --text zh --out results.jsonl
      edgeqwen eval qwen2-0.5b-q8_0 --kv q8_0 --reference qwen2-0.5b-q8_0   # the KV cache's own cost
    """
    kv = kv or "f16"
    from ..measure.evaluate import evaluate_files, load_text
    from ..measure.evalrows import eval_row, resolve_reference
    from ..home import resolve_build
    path, manifest = resolve_build(build)
    from ..formats import model_path
    model_file = model_path(path, manifest)
    ref_file = resolve_reference(path, manifest, reference, log=lambda m: click.echo(m, err=True))
    loaded = [load_text(spec) for spec in texts]
    for label, res in evaluate_files(model_file, ref_file, loaded, ctx, threads, max_windows, kv):
        row = eval_row(build, manifest, model_file, ref_file, label, res)
        if kv != "f16":
            row["kv"] = kv
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if as_json:
            click.echo(json.dumps(row))
        else:
            kl = f" · KL {res['kl_mean']:.5f} · top-1 {100 * res['top1']:.1f}% · ref PPL {res['ref_ppl']:.3f}" \
                if "kl_mean" in res else ""
            click.echo(f"{label}: PPL {res['ppl']:.3f}{kl} ({res['tokens_scored']} tokens, {res['seconds']:.1f} s)")


@click.command("fit")
@click.argument("build")
@click.option("--device", help="Also run once at this device profile's usable RAM (see plan --device list).")
@click.option("--threads", type=THREADS, help="Default: physical cores.")
@click.option("--lean/--no-lean", default=None, help="Only a lean (or only a normal) load; default: both (GGUF), "
              "and the smaller need wins.")
@click.option("--fraction", default=0.9, show_default=True, type=SPEED_FRACTION,
              help="Full speed means at least this share of the unlimited decode speed.")
@click.option("--resolution", default="64M", show_default=True, help="Stop bisecting at this interval.")
@click.option("--out", type=OUT_FILE, help="Append the fit rows to FILE.jsonl.")
@KV_OPTION
def fit_cmd(build, device, threads, lean, fraction, resolution, out, kv):
    """Find the least RAM BUILD runs in at full speed, under real memory limits (cgroups).

    Bisects on a memory cgroup's limit, each probe a fresh process (load, prefill, decode); needs
    Linux and root (or a delegated cgroup). Progress on stderr; a 7B takes some minutes.

    \b
      edgeqwen fit qwen2-7b-q4_k_m --device raspberry-pi-5-8gb --out results.jsonl
    """
    from ..measure.fit import fit
    from ..measure.hw import fingerprint
    from ..process import human_bytes, physical_cores
    from ..measure.memlimit import MemoryCgroup, parse_size
    res = parse_size(resolution)
    with MemoryCgroup(1 << 30):   # one clear line now if cgroups are unavailable
        pass
    prof = None
    if device:
        from ..errors import UsageError
        from ..measure.plan import load_devices
        devs = load_devices()
        if device not in devs:
            raise UsageError(f"unknown device {device!r}; choose one of: {', '.join(devs)}")
        prof = (device, devs[device])
    fp = fingerprint()
    rows = []
    from ..formats import detect
    from ..home import resolve_build
    can_lean = detect(*resolve_build(build)).lean
    for mode in [lean] if lean is not None else [False, True] if can_lean else [False]:
        row = fit(build, threads or physical_cores(), fp, lean=mode, fraction=fraction, resolution=res, device=prof,
                  kv=kv)
        rows.append(row)
        if out:   # as each search ends: a 7B search is long
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        dc = row.get("device_check")
        on = (f"; on {dc['profile']} ({human_bytes(dc['usable'])} usable): "
              f"{'fits' if dc['fits'] else 'does NOT fit'}, headroom {human_bytes(dc['headroom'])}") if dc else ""
        click.echo(f"{row['build']['name']}{' (lean)' if row['lean'] else ''}: needs {human_bytes(row['min_ram'])} "
                   f"for {row['tg_at_min']:.1f} tok/s ({row['tg_at_min'] / row['baseline_tg']:.0%} of "
                   f"{row['baseline_tg']:.1f} unlimited); peak RSS unlimited {human_bytes(row['peak_rss_unlimited'])}"
                   + on)
    if len(rows) == 2:
        best = min(rows, key=lambda r: r["min_ram"])
        click.echo(f"least RAM: {'lean' if best['lean'] else 'normal'} load ({human_bytes(best['min_ram'])})")


@click.command("survey")
@click.option("--out", "out_dir", type=OUT_DIR, default="survey",
              show_default=True, help="Folder for DEVICE-ID.jsonl (rows), DEVICE-ID.md (table) and the resume state.")
@click.option("--synthetic", is_flag=True, help="Random weights of each size's exact shape (speed and memory only).")
@click.option("--source", "sources", multiple=True, metavar="SIZE=DIR",
              help="A local Hugging Face folder for a size (its builds are also scored by eval).")
@click.option("--sizes", default=",".join(("0.5b", "1.5b", "7b")), show_default=True,
              help="Sizes (or recipe names), comma-separated.")
@click.option("--quants", help="Quants, comma-separated (default: q4_k_m,q4_0,q8_0,int4, and mlx4 on a Mac).")
@click.option("--quick", is_flag=True, help="A short pass: q4_k_m only, one short bench each, no fit or eval.")
@click.option("--resume", is_flag=True, help="Skip the builds a killed survey had finished.")
def survey_cmd(out_dir, synthetic, sources, sizes, quants, quick, resume):
    """Measure this device: the standard matrix that fits it, for a results table.

    Builds what fits (RAM and disk, from plan), then bench (all cores and half), fit (where a
    memory cgroup is available) and eval (real sources). Post OUT/DEVICE-ID.md or attach
    OUT/DEVICE-ID.jsonl; `edgeqwen table` merges such files.

    \b
      edgeqwen survey --synthetic --quick             # about ten minutes
      edgeqwen survey --source 0.5b=./qwen2.5-0.5b-instruct --resume
    """
    from ..errors import UsageError
    from ..measure.survey import survey
    src = {}
    for spec in sources:
        size, sep, folder = spec.partition("=")
        if not sep or not size or not folder:
            raise UsageError(f"--source {spec!r}: SIZE=DIR, e.g. 0.5b=./qwen2.5-0.5b-instruct")
        src[size.strip().lower()] = Path(folder)
    md = survey(out_dir, sizes=[s.strip() for s in sizes.split(",") if s.strip()],
                quants=[q.strip() for q in quants.split(",") if q.strip()] if quants is not None else None,
                sources=src, synthetic=synthetic, quick=quick, resume=resume,
                say=lambda m: click.echo(m, err=True))
    click.echo(str(md))


@click.command("tune")
@click.argument("build")
@click.option("--depth", default=1024, show_default=True, type=click.IntRange(16, 32768),
              help="Prompt length: prefill is measured on it and decode after it.")
@click.option("--gen-tokens", default=64, show_default=True, type=click.IntRange(2, 4096))
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(1, 100))
@click.option("--threads", help="Thread counts to try, comma-separated (default: 1 to the physical cores).")
@click.option("--no-busy", is_flag=True, help="Skip the measurements beside a busy process (a CPU hog tune starts).")
def tune_cmd(build, depth, gen_tokens, repeats, threads, no_busy):
    """Find this machine's fastest llama.cpp settings for BUILD and use them from now on.

    Measures flash attention on/off x thread counts x KV cache f16/q8_0 (prefill, decode from an empty
    context and at depth), each in a fresh process; the winner (best geometric mean against llama.cpp's
    defaults) is stored for this machine and build, and run, chat, serve and bench use it unless a setting
    is given or --no-tune. Then decode is measured beside one busy process it starts (a CPU hog), at each
    thread count with llama.cpp's threads spinning or sleeping while they wait; run, chat and serve use the
    best of those when other processes hold a core as they load.

    \b
      edgeqwen tune qwen2-1.5b-q4_k_m
      edgeqwen run qwen2-1.5b-q4_k_m "Hi" --no-tune     # llama.cpp's defaults again
    """
    from ..measure.bench import parse_threads
    from ..measure.tune import tune
    tune(build, depth=depth, gen_tokens=gen_tokens, repeats=repeats,
         threads=parse_threads(threads) if threads else None, hog_phase=not no_busy,
         say=lambda m: click.echo(m, err=True))


COMMANDS = [bench_cmd, hw, table, plan_cmd, eval_cmd, fit_cmd, survey_cmd, tune_cmd]
