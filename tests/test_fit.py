"""Memory limits for real: bench --memory-limit and fit in Linux memory cgroups, on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import cpu_hog, run_cli

from edgeqwen.measure import memlimit

needs_cgroups = pytest.mark.skipif(os.geteuid() != 0 or memlimit._version() is None,
                                   reason="needs root and the cgroup memory controller")


def _our_cgroups():
    v = memlimit._version()
    parent = memlimit.V2_ROOT if v == 2 else memlimit._own_cgroup(1)
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f"edgeqwen-{os.getpid()}-") or
                  (p.name.startswith("edgeqwen-") and p.is_dir()))


@needs_cgroups
def test_a_limit_far_below_the_need_is_an_oom_killed_row_and_the_cgroup_goes(tiny_builds, tmp_path):
    before = _our_cgroups()
    out = tmp_path / "r.jsonl"
    r = run_cli("bench", tiny_builds["q8_0"], "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8",
                "--memory-limit", "40M", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["status"] for x in rows] == ["ok", "oom-killed"], rows[-1].get("error")
    assert rows[1]["memory_limit"] == 40 << 20 and rows[1]["oom_kills"] >= 1
    assert "Traceback" not in r.stderr
    assert _our_cgroups() == before


@needs_cgroups
def test_a_cgroup_left_by_a_killed_run_is_removed_by_the_next():
    v = memlimit._version()
    parent = memlimit.V2_ROOT if v == 2 else memlimit._own_cgroup(1)
    stale = parent / "edgeqwen-999999999-deadbeef"   # above any pid_max: that process cannot exist
    stale.mkdir()
    try:
        with memlimit.MemoryCgroup(64 << 20):
            assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


@needs_cgroups
def test_a_generous_limit_gives_the_same_tokens(tiny_builds):
    cmd = [sys.executable, "-m", "edgeqwen.cli", "run", str(tiny_builds["q4_k_m"]), "Tell me a story.", "-t", "0",
           "-n", "24", "--json"]
    free = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    with memlimit.MemoryCgroup(1 << 30) as cg:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cg.enter)
        assert cg.oom_kills() == 0 and cg.peak() > 0
        path = cg.path
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["text"] == free["text"]
    assert not path.exists()


@needs_cgroups
def test_fit_converges_on_the_tiny_model(tiny_builds):
    from edgeqwen.measure.bench import BenchConfig
    from edgeqwen.measure.fit import fit
    res = 32 << 20
    row = fit(str(tiny_builds["q8_0"]), 2, {"device_id": "test"}, fraction=0.5, resolution=res,
              # 384 tokens of decode: the tiny model decodes at 300 (AVX2) to 850 tok/s (AMX), and three 96-token
              # baselines (~0.1 s each) once read 520 / 835 / 857 tok/s on a quiet AMX machine, 16 once spread
              # by 50%: fit (rightly) refuses a baseline that disagrees by more than 40%
              cfg=BenchConfig(prompt_tokens=16, gen_tokens=384, repeats=1, n_ctx=512), kv="q8_0")
    assert row["kind"] == "fit" and row["min_ram"] <= row["peak_rss_unlimited"] * 1.2 + (80 << 20)
    assert row["kv"] == "q8_0"   # the KV cache type reaches the measuring children and the row
    passing = [p["limit"] for p in row["probes"] if p["pass"]]
    failing = [p["limit"] for p in row["probes"] if not p["pass"]]
    assert row["min_ram"] == min(passing) and all(f < row["min_ram"] for f in failing)
    below = max(failing + [64 << 20])   # the search starts from 64 MiB, taken as too little
    assert row["min_ram"] - below <= max(res, row["min_ram"] // 50)
    assert row["tg_at_min"] >= 0.5 * row["baseline_tg"]
    # the read-ahead window of the model's disk is part of the result (8 MiB here, 128 KiB on most devices)
    assert row["read_ahead_kb"] == memlimit.read_ahead_kb(next(Path(tiny_builds["q8_0"]).glob("*.gguf")))


@pytest.mark.parametrize("tg,peak,faults,retried", [
    (7.0, 1200, 50, True),    # never reached its 1300 MiB limit: memory cannot have slowed it
    (9.0, 1300, 0, True),     # reached it, missed the bar (10 tok/s) by 10%, read nothing back: noise
    (8.7, 1300, 4, True),     # 4 faults cannot lose 1.4 s over 96 tokens: noise
    (9.0, 1300, 200, False),  # the same miss while paging (200 faults can cost 2 s): memory, judged once
    (7.0, 1300, 0, False),    # reached it and missed by 30%
    (None, 100, None, False), # stopped at its time budget
    (7.0, None, 0, False),    # no cgroup reading, far below the bar
])
def test_only_probes_noise_can_explain_are_measured_again(tg, peak, faults, retried):
    from edgeqwen.measure.fit import _noise_can_explain
    row = {"status": "too-slow", "tg": {"mean": tg} if tg else None, "cgroup_peak": peak and peak << 20,
           "major_faults": faults}
    assert _noise_can_explain(row, 1300 << 20, 10.0, 96) is retried
    assert not _noise_can_explain({**row, "status": "oom-killed"}, 1300 << 20, 10.0, 96)


def test_without_permission_or_controller_one_clear_line(tiny_builds, monkeypatch):
    from edgeqwen.cli import cli

    def denied(version):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(memlimit, "_own_cgroup", denied)
    monkeypatch.setattr(memlimit, "_version", lambda: 1)
    r = CliRunner().invoke(cli, ["bench", str(tiny_builds["q4_0"]), "--memory-limit", "1G"])
    assert r.exit_code == 2 and "permission to create a memory cgroup" in r.output
    assert len(r.output.strip().splitlines()) == 1
    monkeypatch.setattr(memlimit, "_version", lambda: None)
    r = CliRunner().invoke(cli, ["fit", str(tiny_builds["q4_0"])])
    assert r.exit_code == 2 and "memory cgroup controller" in r.output


@pytest.mark.parametrize("text,want", [("4G", 4 << 30), ("7.5G", int(7.5 * 2**30)), ("512M", 512 << 20),
                                       ("1073741824", 1 << 30), ("2GiB", 2 << 30)])
def test_sizes(text, want):
    assert memlimit.parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "-1G", "G", "4X", "1K"])
def test_bad_sizes(bad):
    from edgeqwen.errors import UsageError
    with pytest.raises(UsageError):
        memlimit.parse_size(bad)


def test_fit_plot_draws_speed_against_the_limit(tmp_path):
    from edgeqwen.measure.table import fit_plot

    def row(size, quant, lean):
        probes = [{"limit": g << 30, "tg": tg, "pass": ok} for g, tg, ok in ((4, 2.4, True), (2, None, False),
                                                                               (3, 1.9, False))]
        return {"kind": "fit", "time": "2026-11-26T00:00:00Z", "device": {"cpu": "Test CPU"}, "lean": lean,
                "build": {"size": size, "quant": quant}, "min_ram": 4 << 30, "probes": probes}
    out = tmp_path / "fit.png"
    assert fit_plot([row("7b", "q4_k_m", False), row("7b", "q4_k_m", True), row("1.5b", "q4_0", False)], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
    assert not fit_plot([row("0.5b", "q4_k_m", False)], tmp_path / "none.png")   # only 1.5B and 7B are drawn
    assert not (tmp_path / "none.png").exists()


def test_a_later_fit_of_the_same_build_supersedes_the_earlier():
    from edgeqwen.measure.table import latest_fits

    def row(t, lean, sha="a", dev="d1", min_ram=1, name="x"):
        return {"kind": "fit", "time": t, "device": {"device_id": dev}, "build": {"sha256": sha, "name": name},
                "lean": lean, "fraction": 0.9, "min_ram": min_ram}
    rows = [row("2026-11-25T10:00:00Z", False, min_ram=2), row("2026-11-26T10:00:00Z", False, min_ram=1),
            row("2026-11-25T10:00:00Z", True), row("2026-11-25T10:00:00Z", False, name="y"),
            row("2026-11-25T10:00:00Z", False, dev="d2"), {"kind": "bench"},
            # the build made again under its name (a new file): its fit supersedes the old file's
            row("2026-11-25T10:00:00Z", True, name="z"), row("2026-11-26T11:00:00Z", True, sha="b", name="z")]
    got = latest_fits(rows)
    assert len(got) == 5 and rows[0] not in got and rows[1] in got and rows[-2] not in got and rows[-1] in got


def test_fit_refuses_a_baseline_taken_beside_a_cpu_hog(tiny_builds):
    import os

    from edgeqwen.measure import memlimit
    if os.geteuid() != 0 or memlimit._version() is None:
        pytest.skip("needs root and the cgroup memory controller")
    hog = cpu_hog()
    try:
        r = run_cli("fit", tiny_builds["q8_0"], "--threads", "1", "--lean", timeout=600)
    finally:
        hog.kill()
        hog.wait()
    assert r.returncode == 1 and "the machine is busy" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr


def test_fit_refuses_a_baseline_whose_runs_disagree():
    from edgeqwen.errors import RunnerError
    from edgeqwen.measure.fit import _check_baseline
    runs = [{"tg": {"mean": x}} for x in (0.87, 0.88, 1.36)]   # a fit's real baseline, beside another job
    with pytest.raises(RunnerError, match="disagree"):
        _check_baseline("b", runs, 0.88)
    _check_baseline("b", [{"tg": {"mean": x}} for x in (26.8, 27.5, 28.5)], 27.5)   # quiet: 6% apart
