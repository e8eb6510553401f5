"""The HTTP path's cost, and several users at once: `edgeqwen serve` against `edgeqwen run` on the same build, and
serve with --parallel against itself one request at a time and against llama-server (a benchmark, not a test).

    python -m bench.serve_bench BUILD [--rounds 5] [--tokens 128] [--conc-rounds 3] [--out bench/SERVE.md]
    python -m bench.serve_bench --render results/serve-DEVICE.json [--out bench/SERVE.md]

Decode: `run --raw -t 0 -n TOKENS --json` in a fresh process against one streaming request to a server
on the same build, interleaved (run, server, run, server ...), each round with its own prompt whose
first token differs, so neither side reuses a KV prefix. The server's figure is taken by the client
(first to last streamed chunk), and the server's own (the runner's) is shown beside it. TTFT overhead:
the client's time from request to first chunk minus run's TTFT.

Concurrency: 1, 2, 4 and 8 clients, each sending requests one after another (16 in all, 64-token replies, EOS
ignored, greedy, a different prompt each) to three servers on the same file, 2 threads each, every slot with a
context of CTX tokens: ours with --parallel 8, ours with --parallel 1 (one request at a time), and llama-server
(built from the same vendored llama.cpp by tools/build-llama-tools.sh) with -np 8 -c 8*CTX. Aggregate tok/s is
all generated tokens over the wall time; latency is each request's, client-side. The servers take turns within a
round (order rotated each round); the figures are medians over rounds. Raw figures go to
results/serve-DEVICE.json, from which --render writes SERVE.md again.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import HERE, RESULTS, llama_tool, write_json, write_text
from bench.harness import Served, free_port, wait_healthy

CLIENTS = (1, 2, 4, 8)
REQUESTS = 16
SLOTS = 8
CTX = 1024


TOPICS = ["rivers", "bread", "volcanoes", "chess", "bees", "glass", "tides", "paper", "owls", "copper",
          "clouds", "rice", "bridges", "salt", "wool", "ice"]


def prompt(i: int) -> str:
    return f"{TOPICS[i % len(TOPICS)].capitalize()} are interesting because"


def run_once(build: str, p: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgeqwen.cli", "run", build, p, "--raw", "-t", "0", "-n", str(tokens),
                          "--json", "--threads", "2"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def serve_once(url: str, model: str, p: str, tokens: int) -> dict:
    import httpx
    body = {"model": model, "prompt": p, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, usage, timings = [], None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            d = json.loads(line[5:])
            if d.get("usage"):
                usage, timings = d["usage"], d["timings"]
            elif d["choices"] and d["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    n = usage["completion_tokens"]
    return {"ttft_s": stamps[0] - t0, "client_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "server_tps": timings["predicted_per_second"], "tokens": n, "chunks": len(stamps)}


def concurrent(url: str, model: str, clients: int, tokens: int = 64) -> dict:
    """REQUESTS requests from `clients` clients at once, each client's one after another: aggregate generated
    tok/s over the wall time, and each request's latency (seconds, client-side)."""
    import httpx
    lat, gen, errors = [], [], []

    def client(c):
        for k in range(c, REQUESTS, clients):
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", timeout=900, json={
                "model": model, "prompt": prompt(k), "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            if r.status_code != 200:
                errors.append(r.text[:300])
                return
            lat.append(time.perf_counter() - t0)
            gen.append(r.json()["usage"]["completion_tokens"])
    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"a request failed: {errors[0]}")
    return {"tps": sum(gen) / wall, "latency": sorted(lat), "tokens": sum(gen), "wall_s": wall}


class LlamaServer:
    """llama-server on the same file: -np SLOTS -c SLOTS*CTX (each slot CTX), 2 threads, on 127.0.0.1."""

    def __init__(self, model_file: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([llama_tool("llama-server"), "-m", str(model_file), "--host", "127.0.0.1",
                                      "--port", str(self.port), "-t", "2", "-tb", "2", "-np", str(SLOTS),
                                      "-c", str(SLOTS * CTX), "--no-webui"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_healthy(self.proc, self.url, 120, "llama-server")
        except RuntimeError:
            self.proc.kill()
            raise

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def concurrency(build: str, model: str, model_file: Path, rounds: int) -> dict:
    """{server kind: {clients: [per-round results]}}, the kinds taking turns in a rotating order."""
    kinds = ["ours --parallel 8", "ours --parallel 1", "llama-server -np 8"]
    out = {k: {str(c): [] for c in CLIENTS} for k in kinds}
    for i in range(rounds):
        for kind in kinds[i % 3:] + kinds[:i % 3]:
            if kind.startswith("llama-server"):
                srv = LlamaServer(model_file)
                name = "x"   # llama-server serves whatever model it loaded, under any name
            else:
                srv = Served([build], "--parallel", kind.split()[-1], "--ctx", str(CTX))
                name = model
            try:
                concurrent(srv.url, name, 2, 8)   # warm-up: both sides' first requests touch their buffers
                for c in CLIENTS:
                    r = concurrent(srv.url, name, c)
                    out[kind][str(c)].append(r)
                    print(f"round {i} {kind} {c} clients: {r['tps']:.1f} tok/s, p50 "
                          f"{statistics.median(r['latency']):.2f} s", file=sys.stderr, flush=True)
            finally:
                srv.stop()
    return out


def render(data: dict) -> str:
    med = statistics.median
    rows = data["overhead"]
    run_tps = [r["generation_tps"] for r, _ in rows]
    cli_tps = [s["client_tps"] for _, s in rows]
    srv_tps = [s["server_tps"] for _, s in rows]
    run_ttft = [r["ttft_s"] * 1000 for r, _ in rows]
    srv_ttft = [s["ttft_s"] * 1000 for _, s in rows]
    conc = data["concurrency"]
    rounds = len(next(iter(next(iter(conc.values())).values())))

    def agg(kind, c):
        return med(r["tps"] for r in conc[kind][str(c)])

    def pct(kind, c, q):   # the quantile of every request's latency over the rounds
        lat = sorted(x for r in conc[kind][str(c)] for x in r["latency"])
        return lat[min(len(lat) - 1, int(q * len(lat)))]
    kinds = list(conc)
    lines = [
        "# edgeqwen serve: the HTTP path's cost, and several users at once", "",
        f"Generated by `{data['command']}` on {data['date']}, {data['device_label']}, 2 threads; build "
        f"`{data['model']}` ({data['quant']}, {data['file_size'] / 2**20:.0f} MiB); raw figures in "
        f"`{data['json']}` (`python -m bench.serve_bench --render` writes this file again from them).", "",
        "## One request: serve against run", "",
        f"Medians of {len(rows)} interleaved rounds (range in brackets); each round a new prompt, greedy, no KV "
        "reuse on either side.", "",
        "| | edgeqwen run | edgeqwen serve (client-side) | ratio |", "|---|---|---|---|",
        f"| decode tok/s | {med(run_tps):.1f} [{min(run_tps):.1f}–{max(run_tps):.1f}] | {med(cli_tps):.1f} "
        f"[{min(cli_tps):.1f}–{max(cli_tps):.1f}] (server's own: {med(srv_tps):.1f}) | "
        f"{med(cli_tps) / med(run_tps):.3f}× |",
        f"| TTFT ms | {med(run_ttft):.0f} [{min(run_ttft):.0f}–{max(run_ttft):.0f}] | {med(srv_ttft):.0f} "
        f"[{min(srv_ttft):.0f}–{max(srv_ttft):.0f}] | +{med(srv_ttft) - med(run_ttft):.0f} ms over HTTP |", "",
        "## Several clients at once", "",
        f"{REQUESTS} requests of 64 tokens (EOS ignored, greedy, each its own prompt) from 1, 2, 4 or 8 clients at "
        f"once, each client's requests one after another; every slot has a context of {CTX} tokens. Aggregate "
        f"tok/s: medians of {rounds} rounds (the three servers take turns in each); latency: p50 / p95 of every "
        "request over the rounds, client-side.", "",
        "| clients | " + " | ".join(f"{k} tok/s" for k in kinds) + " | parallel / serial | parallel / llama-server |"
        + " latency p50 / p95 s: " + " · ".join(kinds) + " |",
        "|---|" + "---|" * (len(kinds) + 3),
    ]
    for c in CLIENTS:
        lines.append(f"| {c} | " + " | ".join(f"{agg(k, c):.1f}" for k in kinds)
                     + f" | {agg(kinds[0], c) / agg(kinds[1], c):.2f}× | {agg(kinds[0], c) / agg(kinds[2], c):.2f}× | "
                     + " · ".join(f"{pct(k, c, 0.5):.1f} / {pct(k, c, 0.95):.1f}" for k in kinds) + " |")
    lines += ["", data.get("note", "")]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build", nargs="?")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--conc-rounds", type=int, default=3)
    ap.add_argument("--render", type=Path, help="write the report again from this raw file")
    ap.add_argument("--out", type=Path, default=HERE / "SERVE.md")
    a = ap.parse_args()
    if a.render:
        write_text(a.out, render(json.loads(a.render.read_text())))
        return
    if not a.build:
        ap.error("give a BUILD (or --render RAW.json)")
    from edgeqwen.formats import model_path
    from edgeqwen.home import resolve_build
    from edgeqwen.measure.hw import device_label, fingerprint
    path, manifest = resolve_build(a.build)
    model = manifest["name"]
    server = Served([a.build], "--parallel", "1")
    rows = []
    try:
        for i in range(a.rounds):
            r = run_once(a.build, prompt(i), a.tokens)
            s = serve_once(server.url, model, prompt(i), a.tokens)
            rows.append((r, s))
            print(f"round {i}: run {r['generation_tps']:.1f} tok/s TTFT {r['ttft_s'] * 1000:.0f} ms | serve "
                  f"{s['client_tps']:.1f} (server {s['server_tps']:.1f}) tok/s TTFT {s['ttft_s'] * 1000:.0f} ms",
                  file=sys.stderr)
    finally:
        server.stop()
    conc = concurrency(a.build, model, model_path(path, manifest), a.conc_rounds)
    fp = fingerprint(bandwidth=False)
    dest = RESULTS / f"serve-{fp['device_id']}.json"
    data = {"command": "python -m bench.serve_bench " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "device_label": device_label(fp), "device_id": fp["device_id"], "cpu": fp.get("cpu"),
            "load": os.getloadavg()[0], "model": model, "quant": manifest.get("quant"),
            "file_size": manifest["file_size"], "sha256": manifest.get("sha256"),
            "json": str(dest.relative_to(HERE.parent)), "overhead": rows, "concurrency": conc}
    write_json(dest, data)
    text = render(data)
    write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
