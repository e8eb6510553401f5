"""`edgeqwen survey`: the device kit, end to end on the tiny recipe (real builds, benches and report)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import invoke, run_cli


def _rows(folder):
    files = list(folder.glob("*.jsonl"))
    assert len(files) == 1
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def test_quick_synthetic_survey_writes_rows_and_the_device_table(tmp_path):
    out = tmp_path / "s"
    r = run_cli("survey", "--quick", "--synthetic", "--sizes", "tiny-qwen2", "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr
    said = r.stdout + r.stderr   # up front: what it will run, a duration and the disk it needs
    assert "will run: tiny-qwen2 q4_k_m; expect roughly" in said and "GiB of free disk" in said
    md = out / r.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    rows = _rows(out)
    assert [(x["build"]["quant"], x["status"]) for x in rows] == [("q4_k_m", "ok")]
    assert md.exists() and md.name == f"{rows[0]['device']['device_id']}.md"
    text = md.read_text()
    assert "| tiny-qwen2 (synthetic) | q4_k_m |" in text and "## Claims" in text and "Device id" in text
    t = invoke("table", out / f"{rows[0]['device']['device_id']}.jsonl")   # what `table` merges
    assert t.returncode == 0 and "| tiny-qwen2 (synthetic) | q4_k_m |" in t.stdout


def test_killed_survey_resumes_without_redoing_finished_builds(tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "edgeqwen.cli", "survey", "--quick", "--synthetic", "--sizes", "tiny-qwen2",
            "--quants", "q4_k_m,q8_0,q4_0", "--out", str(out)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    done = []
    while time.time() < deadline and not done:
        time.sleep(0.2)
        for f in out.glob("*.state.json"):
            try:
                done = json.loads(f.read_text())["done"]
            except ValueError:
                pass
        assert p.poll() is None or done, p.stderr.read()
    os.killpg(p.pid, signal.SIGKILL)   # mid-survey: at least one build finished, the rest not
    p.wait()
    before = _rows(out)
    measured = {x["build"]["quant"] for x in before}
    assert len(measured) < 3
    r = run_cli("survey", "--quick", "--synthetic", "--sizes", "tiny-qwen2", "--quants", "q4_k_m,q8_0,q4_0",
                "--out", out, "--resume", timeout=900)
    assert r.returncode == 0, r.stderr
    after = _rows(out)
    counts = {q: sum(x["build"]["quant"] == q for x in after) for q in ("q4_k_m", "q8_0", "q4_0")}
    assert all(counts[k.split("/")[1]] == 1 for k in done), counts   # finished before the kill: not measured again
    assert all(c >= 1 for c in counts.values()), counts       # and the rest measured now


def test_survey_needs_a_source_or_synthetic_and_skips_what_does_not_fit(tmp_path):
    r = invoke("survey", "--quick", "--out", tmp_path / "s")
    assert r.returncode == 2 and "--synthetic" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    from edgeqwen.measure.survey import matrix
    items, skipped = matrix(["0.5b", "7b"], ["q4_k_m"], ram_available=2 << 30, disk_free=100 << 30)
    assert [i.key for i in items] == ["0.5b/q4_k_m"] and "7b q4_k_m: needs" in skipped[0]
    items, skipped = matrix(["0.5b"], ["q4_k_m"], ram_available=8 << 30, disk_free=10 << 20)
    assert not items and "of disk" in skipped[0]


def test_table_refuses_a_row_that_passes_an_x86_run_off_as_a_pi(tmp_path):
    from helpers import REPO
    committed = sorted((REPO / "bench" / "results").glob("fbde2af58b2c.jsonl"))[0]   # an x86 machine's rows
    row = json.loads(committed.read_text().splitlines()[0])
    assert row["device"]["arch"] == "x86_64"
    forged = tmp_path / "forged.jsonl"
    row["device"].update(device="Raspberry Pi 5 Model B Rev 1.0", cpu="Cortex-A76")   # arch still x86_64
    forged.write_text(json.dumps(row) + "\n")
    t = invoke("table", forged)
    assert t.returncode == 2 and "forged.jsonl:1" in t.stderr and "claims a Raspberry Pi" in t.stderr
    assert len(t.stderr.strip().splitlines()) == 1
    row["device"]["arch"] = "aarch64"   # as hw reports a Pi: merged
    forged.write_text(json.dumps(row) + "\n")
    assert invoke("table", forged).returncode == 0


def test_an_emulated_board_reports_its_own_ram_not_the_hosts():
    env = {"EDGEQWEN_EMULATED": "qemu-user (cortex-a76)", "EDGEQWEN_EMULATED_RAM_GIB": "8"}
    fp = json.loads(invoke("hw", "--json", "--no-bandwidth", env=env).stdout)
    assert fp["emulated"] and fp["ram_total"] == 8 << 30 and fp["host_ram_total"] > 0
    from edgeqwen.measure.hw import device_label
    assert "8 GiB" in device_label(fp) and "the host's" not in device_label(fp)
    old = dict(fp, ram_total=fp["host_ram_total"])   # a row from before the harness said
    del old["host_ram_total"]
    assert "(the host's)" in device_label(old)


def test_a_build_that_cannot_be_made_here_is_skipped_and_the_survey_goes_on(tmp_path, monkeypatch):
    """The build's own preflight decides (a GGUF needs its f16 pass on disk too): one line, the rest measured."""
    import edgeqwen.formats.gguf.build as gguf_build
    from edgeqwen.errors import BuildError
    from edgeqwen.measure.survey import survey
    real, calls = gguf_build.check_disk, []

    def check_disk(path, need):   # the first GGUF build (q4_0) does not fit; the next does
        calls.append(path)
        if len(calls) == 1:
            raise BuildError(f"not enough disk space at {path}: need 9 GiB, 1 GiB free")
        real(path, need)
    monkeypatch.setattr(gguf_build, "check_disk", check_disk)
    monkeypatch.setenv("EDGEQWEN_HOME", str(tmp_path / "home"))   # builds of its own: none made before by others
    said = []
    md = survey(tmp_path / "s", sizes=["tiny-qwen2"], quants=["q4_0", "q4_k_m"], synthetic=True, quick=True,
                say=said.append)
    assert any(line.startswith("skipped tiny-qwen2 q4_0: not enough disk space") for line in said), said
    assert [x["build"]["quant"] for x in _rows(tmp_path / "s")] == ["q4_k_m"] and md.exists()


@pytest.mark.parametrize("args,words", [
    (["--sizes", "13b"], "unknown model '13b'"),
    (["--sizes", ""], "--sizes names no size"),
    (["--sizes", " , "], "--sizes names no size"),
    (["--quants", "q9"], "q9"),
    (["--quants", ""], "--quants names no quant"),
    (["--out", ""], "is empty"),
])
def test_hostile_survey_choices_are_a_usage_error_before_anything_is_written(tmp_path, args, words):
    out = tmp_path / "s"
    r = run_cli("survey", "--synthetic", "--quick", "--out", out, *args, cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]   # click adds its usage lines
    assert r.returncode == 2 and len(errors) == 1 and words in errors[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_hostile_a_survey_that_measured_nothing_exits_1_and_says_why(tmp_path, monkeypatch):
    from edgeqwen.errors import EdgeqwenError
    from edgeqwen.measure import survey as survey_mod
    real = survey_mod.matrix   # this machine with 1 MiB of RAM available: nothing fits
    monkeypatch.setattr(survey_mod, "matrix", lambda s, q, ram, disk, apple=False: real(s, q, 1 << 20, disk, apple))
    with pytest.raises(EdgeqwenError, match="measured nothing.*needs") as e:
        survey_mod.survey(tmp_path / "s", sizes=["tiny-qwen2"], quants=["q4_0"], synthetic=True, quick=True,
                          say=lambda m: None)
    assert e.value.exit_code == 1 and not list((tmp_path / "s").glob("*.md"))
