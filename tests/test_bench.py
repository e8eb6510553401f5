"""bench: the measurement on a fake runner, real tiny bench runs, and a bench beside a busy core."""
import json
import shutil

from helpers import FakeRunner, cpu_hog, invoke, run_cli

from edgeqwen.measure.bench import BenchConfig, measure


def test_measure_reads_everything_off_the_stream():
    fake = FakeRunner(pp=200.0, tg=20.0)
    out = measure(fake, BenchConfig(prompt_tokens=64, gen_tokens=16, repeats=3))
    assert out["pp"]["mean"] == 200.0 and out["tg"]["mean"] == 20.0 and out["tg"]["n"] == 3
    assert out["ttft_s"]["n"] == 3 and out["stream_peak_rss"] == 123 << 20 and out["tg_empty"]["mean"] == 20.0
    # warm-up at the prompt length, then per repeat: the random prompt of the asked length, one token from an
    # empty context, and a 1-token chat TTFT run
    assert fake.calls[0] == (64, 8) and fake.calls[1] == (64, 16) and fake.calls[2] == (1, 16)
    assert fake.calls[3][1] == 1 and len(fake.calls) == 1 + 3 * 3
    fake = FakeRunner(pp=200.0, tg=20.0)
    assert measure(fake, BenchConfig(prompt_tokens=64, gen_tokens=16, repeats=2, empty_tg=False))["tg_empty"] is None
    assert len(fake.calls) == 1 + 2 * 2


def test_real_tiny_bench_run_with_a_failure_row(tiny_builds, tmp_path):
    bad = tmp_path / "broken"
    shutil.copytree(tiny_builds["q8_0"], bad)
    with open(bad / "model.gguf", "r+b") as f:
        f.truncate(1 << 20)
    out = tmp_path / "r.jsonl"
    r = run_cli("bench", tiny_builds["q4_0"], bad, "--threads", "1", "--repeats", "1", "--prompt-tokens", "32",
                "--gen-tokens", "8", "--out", out)
    # the run goes on past the failure, writes both rows, and exits 1 with one line saying so
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: 1 of 2 measurements failed")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # the truncated file no longer matches its manifest: caught before llama.cpp sees it, as one line
    assert [x["status"] for x in rows] == ["ok", "failed"] and "does not match its manifest" in rows[1]["error"]
    assert not rows[1]["error"].startswith("edgeqwen.errors")
    ok = rows[0]
    assert ok["tg"]["mean"] > 0 and ok["pp"]["mean"] > 0 and ok["load_s"] > 0 and ok["max_rss"] > 0
    assert ok["counters"]["tg"]["mean"] > 0 and ok["device"]["physical_cores"] >= 1
    # a load that maps the file gives the Q4_0 originals back as they are repacked (pagecache.py); one that reads
    # the file into huge pages (Linux with THP, hugepages.py) maps none
    assert ok["released_bytes"] > 0 if ok["mapped"] else ok["released_bytes"] == 0
    # read in: its CPU buffer (the 151,936-row embedding table; 30.44 MiB here) asked for huge pages; mapped: nothing
    assert (ok["hugepage_bytes"] > 0) != ok["mapped"]
    # merges with itself without duplicates, renders, plots
    png = tmp_path / "p.png"
    t = invoke("table", out, out, "--plot", png, "--claims")
    assert t.returncode == 0 and t.stdout.count("| tiny-qwen2") == 2 and png.stat().st_size > 1000
    assert "UNTESTED" in t.stdout


def test_a_bench_beside_a_cpu_hog_is_marked_busy_and_a_quiet_one_is_not(tiny_builds, tmp_path):
    import time
    out = tmp_path / "r.jsonl"
    args = ("bench", tiny_builds["q8_0"], "--threads", "1", "--repeats", "2", "--prompt-tokens", "32",
            "--gen-tokens", "16", "--out", out)
    hog = cpu_hog()
    try:
        time.sleep(0.3)
        busy = run_cli(*args)
    finally:
        hog.kill()
        hog.wait()
    quiet = run_cli(*args)
    assert busy.returncode == quiet.returncode == 0, busy.stderr + quiet.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["busy"] and rows[0]["load"]["others_during"] > 0.5, rows[0]["load"]
    assert not rows[1]["busy"] and rows[1]["load"]["others_during"] < 0.25, rows[1]["load"]
    assert "BUSY: other processes used" in busy.stdout
