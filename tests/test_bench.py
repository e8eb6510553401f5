"""bench, table, claims and plan: the logic on a fake runner, plus one real tiny bench run."""
import json
import shutil

import pytest
from helpers import invoke, run_cli

from edgeqwen.measure.bench import BenchConfig, make_row, measure
from edgeqwen.measure.claims import judge, load_claims, render_claims
from edgeqwen.formats.gguf.info import read_gguf_info
from edgeqwen.measure.plan import load_devices, plan
from edgeqwen.runner import Response
from edgeqwen.measure.table import load_rows, render_rows


class FakeRunner:
    """Implements the runner protocol with fixed speeds, so bench arithmetic can be checked exactly."""

    backend, n_ctx, load_s, chat_template = "fake", 4096, 0.5, "{{ messages[0]['content'] }}"
    regular_vocab = 151643   # the runner protocol: ids below it are ordinary tokens

    def __init__(self, pp=100.0, tg=10.0):
        self.pp, self.tg, self.calls = pp, tg, []

    def tokenize(self, text, special=True):
        return list(range(len(text.split())))

    def apply_chat_template(self, messages):
        return messages[-1]["content"]

    def stream(self, tokens, sampling):
        self.calls.append((len(tokens), sampling.max_tokens))
        ttft = len(tokens) / self.pp
        for i in range(1, sampling.max_tokens + 1):
            yield Response("x", i, len(tokens), self.pp, i, self.tg if i > 1 else 0.0, ttft, 123 << 20,
                           "length" if i == sampling.max_tokens else None)

    def close(self):
        pass


FP = {"cpu": "Test CPU", "arch": "x86_64", "isa": ["avx2"], "device": "generic x86", "physical_cores": 4,
      "logical_cores": 8, "ram_total": 16 * 2**30, "ram_available": 12 * 2**30, "os": "Linux 6", "versions": {},
      "bandwidth_gbs": 50.0, "device_id": "dev-a"}


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


@pytest.fixture
def rows(tiny_builds, tmp_path):
    """Rows as bench writes them, from the fake runner, on two devices."""
    cfg = BenchConfig(prompt_tokens=64, gen_tokens=16, repeats=2)
    out = []
    for dev, tg in (("dev-a", 20.0), ("dev-b", 5.0)):
        fp = dict(FP, device_id=dev, cpu="Test CPU" if dev == "dev-a" else "Other CPU")
        for q in ("q8_0", "q4_k_m"):
            result = {"status": "ok", **measure(FakeRunner(tg=tg), cfg),
                      "max_rss": 310 << 20}
            out.append(make_row(str(tiny_builds[q]), 2, cfg, fp, result))
    out.append(make_row(str(tiny_builds["q4_0"]), 2, cfg, FP, {"status": "oom", "error": "killed"}))
    return out


def test_rows_carry_roofline_and_merge_without_duplicates(rows, tmp_path):
    r = rows[0]
    assert r["schema"] == 1 and r["bytes_per_token"] > 0
    assert r["roofline_tps"] == pytest.approx(50e9 / r["bytes_per_token"])
    assert r["roofline_frac"] == pytest.approx(20.0 / r["roofline_tps"])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(x) + "\n" for x in rows[:3]))
    b.write_text("".join(json.dumps(x) + "\n" for x in rows[2:]))  # rows[2] is in both files
    merged = load_rows([a, b])
    assert len(merged) == len(rows)


@pytest.mark.parametrize("fmt", ["md", "csv", "html"])
def test_table_groups_by_device(rows, fmt):
    text = render_rows(rows, fmt)
    assert text.count("Test CPU") >= 1 and text.count("Other CPU") >= 1
    assert "oom" in text and "20.00 ± 0.00" in text and "q4_k_m" in text


def test_claims_pass_fail_untested(rows, tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text("""
[fast-box]
ram_gib = 16
bandwidth_gbs = 50
source = "test"
match = { cpu = "^Test CPU$", ram_gib = 16 }
[slow-box]
ram_gib = 16
bandwidth_gbs = 50
source = "test"
match = { cpu = "^Other CPU$", ram_gib = 16 }
[nobody]
ram_gib = 8
bandwidth_gbs = 17
source = "test"
match = { device = "Raspberry Pi 5" }
""")
    claims = tmp_path / "claims.toml"
    claims.write_text("".join(f"""
[[claim]]
id = "{i}"
model = "tiny"
quant = "q4"
device = "{d}"
min_decode_tps = 10
max_peak_rss_gib = 1
""" for i, d in (("a", "fast-box"), ("b", "slow-box"), ("c", "nobody"))))
    devs = load_devices(devices)
    verdicts = {c["id"]: judge(c, rows, devs) for c in load_claims(claims)}
    assert verdicts["a"]["verdict"] == "PASS" and verdicts["a"]["row"]["device"]["device_id"] == "dev-a"
    assert verdicts["b"]["verdict"] == "FAIL"
    assert verdicts["c"]["verdict"] == "UNTESTED" and "row" not in verdicts["c"]
    # the same rows measured beside other work decide nothing: a busy row is shown, never a verdict
    busy = [dict(r, busy=True, load={"others_before": 0.0, "others_during": 1.0, "steal": 0.0}) for r in rows]
    verdicts = {c["id"]: judge(c, busy, devs) for c in load_claims(claims)}
    assert {v["verdict"] for v in verdicts.values()} == {"UNTESTED"}
    assert "BUSY: other processes used 1.00 cores" in render_rows(busy)
    # and so do rows of a board whose firmware throttled during the run (get_throttled's bits for now)
    hot = [dict(r, thermal_after={"throttled": 0x50004}) for r in rows]
    verdicts = {c["id"]: judge(c, hot, devs) for c in load_claims(claims)}
    assert {v["verdict"] for v in verdicts.values()} == {"UNTESTED"} and "THROTTLED" in render_rows(hot)
    once = [dict(r, thermal_after={"throttled": 0x50000}) for r in rows]   # only since boot: still a verdict
    assert judge(load_claims(claims)[0], once, devs)["verdict"] == "PASS"


def test_emulated_rows_never_count_for_speed(rows, tmp_path):
    """A fast row from an emulated Pi 5 makes the claim neither PASS nor FAIL; it shows as correctness only."""
    devices = tmp_path / "devices.toml"
    devices.write_text("""
[pi5]
ram_gib = 8
bandwidth_gbs = 17
source = "test"
match = { device = "Raspberry Pi 5", ram_gib = 8 }
""")
    emu = dict(rows[1], id="emu", device=dict(rows[1]["device"], device="Raspberry Pi 5 Model B Rev 1.0",
                                               cpu="Cortex-A76", arch="aarch64", emulated=True, device_id="emu-pi",
                                               emulator="qemu-user (x86_64 kernel)"))
    claim = {"id": "x", "model": "tiny", "quant": "q4", "device": "pi5", "min_decode_tps": 1}
    v = judge(claim, [emu], load_devices(devices))
    assert v["verdict"] == "UNTESTED" and "row" not in v and v["emulated_row"]["id"] == "emu"
    assert "runs on ARM (emulated, correctness)" in render_claims([v]) and "speed on the device UNTESTED" in \
        render_claims([v])
    table = render_rows([emu], "md")
    assert "EMULATED" in table and "emulated" in table and "20.00" not in table
    # the same row, not emulated, would have passed
    real = dict(emu, device=dict(emu["device"], emulated=False, ram_total=8 << 30))
    assert judge(claim, [real], load_devices(devices))["verdict"] == "PASS"


def test_pi5_identity_from_cpuinfo_and_device_tree(monkeypatch):
    from helpers import REPO
    from edgeqwen.measure import hw
    info = hw.cpu_info((REPO / "tools/arm64/pi5-cpuinfo").read_text(), "aarch64", "Raspberry Pi 5 Model B Rev 1.0\0")
    assert info == {"cpu": "Cortex-A76", "arch": "aarch64", "isa": ["dotprod", "fp16", "neon"],
                    "device": "Raspberry Pi 5 Model B Rev 1.0"}
    monkeypatch.delenv("EDGEQWEN_EMULATED", raising=False)
    kernel = hw._read("/proc/sys/kernel/arch")
    if kernel:   # a guest machine on this kernel is what qemu-user looks like from inside
        monkeypatch.setattr(hw.platform, "machine", lambda: "aarch64" if kernel != "aarch64" else "x86_64")
        assert hw.emulation().startswith("qemu-user")
        monkeypatch.setattr(hw.platform, "machine", lambda: kernel)
        assert hw.emulation() is None


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m", "q4_0"])
def test_plan_predicts_the_exact_tensor_bytes(tiny_builds, quant):
    m = json.loads((tiny_builds[quant] / "manifest.json").read_text())
    info = read_gguf_info(tiny_builds[quant] / "model.gguf")
    p = plan("tiny", quant, config=m["config"])
    assert p.weights_bytes == sum(t.n_bytes for t in info.tensors)


def test_plan_follows_llama_cpp_fallbacks_on_the_real_shape():
    """Qwen2-0.5B's 896-wide rows cannot hold K-quant blocks: llama.cpp falls back (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    import collections

    from edgeqwen.measure.plan import model_config, tensor_types
    cfg = model_config("0.5b", {"tie_word_embeddings": False})
    counts = collections.Counter(t.name for *_, t in tensor_types(cfg, "q4_k_m"))
    # what llama.cpp wrote for the real (untied) 0.5B checkpoint
    assert counts == {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}


def test_a_resident_load_holds_the_untied_embedding_table():
    """A normal load that reads the file into memory (Linux, huge pages) cannot leave the table to the page cache."""
    from edgeqwen.measure.plan import describe, predicted_min_ram_for_row
    from edgeqwen.recipes import get_recipe
    cfg = dict(get_recipe("0.5b").hf_config(), tie_word_embeddings=False)
    lean, resident = plan("0.5b", "q8_0", config=cfg), plan("0.5b", "q8_0", config=cfg, resident=True)
    assert lean.gathered_bytes > 100 << 20 and resident.min_ram == lean.min_ram + lean.gathered_bytes
    assert resident.peak_ram == lean.peak_ram   # mapped or read in, every page is resident once unlimited
    assert "a normal one on Linux reads the file into memory" in describe(lean, None, None)
    row = {"build": {"size": "0.5b", "quant": "q8_0", "config": cfg}, "config": {"n_ctx": 4096}}
    assert predicted_min_ram_for_row(row) == predicted_min_ram_for_row({**row, "mapped": True}) \
        == predicted_min_ram_for_row({**row, "mapped": False}) - lean.gathered_bytes
    tied = plan("0.5b", "q8_0", resident=True)   # nothing only gathered from: the same either way
    assert tied.gathered_bytes == 0 and tied.min_ram == plan("0.5b", "q8_0").min_ram


def test_plan_and_claims_cli(tmp_path):
    r = invoke("plan", "72b", "q4", "--device", "consumer-gpu-24gb")
    assert r.returncode == 0 and "does NOT fit" in r.stdout
    r = invoke("plan", "7b", "q4", "--ctx", "32768", "--device", "nope")
    assert r.returncode == 2 and "raspberry-pi-5-8gb" in r.stderr
    r = invoke("plan", "1.5b", "int4", "--device", "raspberry-pi-5-4gb")
    assert r.returncode == 0 and "ONNX" in r.stdout and "prompt logits" in r.stdout and "fits" in r.stdout
    r = invoke("plan", "57b-a14b", "int4")
    assert r.returncode == 2 and "mixture of experts" in r.stderr and "Traceback" not in r.stderr


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


def test_hw_fingerprint_cli():
    r = invoke("hw", "--json", "--no-bandwidth")
    assert r.returncode == 0
    fp = json.loads(r.stdout)
    assert {"cpu", "arch", "isa", "device", "physical_cores", "logical_cores", "ram_total", "os", "versions",
            "device_id"} <= set(fp)
    assert fp["physical_cores"] >= 1 and fp["ram_total"] > 2**30 and fp["versions"]["edgeqwen"]


def test_plan_peak_counts_repacked_copies_only_where_the_originals_stay():
    from edgeqwen.measure.plan import plan, predicted_rss_for_row
    given, kept = plan("1.5b", "q4_0"), plan("1.5b", "q4_0", release=False)
    assert given.repack_bytes > 0 and kept.peak_ram - given.peak_ram == given.repack_bytes
    row = {"backend": "llama.cpp", "build": {"size": "1.5b", "quant": "q4_0"}, "n_ctx": 4096, "prompt_tokens": 512}
    assert predicted_rss_for_row(row) == kept.peak_ram   # a row from before the runner released them
    assert predicted_rss_for_row({**row, "released_bytes": 1 << 20}) == given.peak_ram


def test_plan_on_an_amx_cpu_counts_the_amx_repacked_copies():
    """llama.cpp's AMX buffer type keeps a repacked copy of every Q8_0/K-quant matrix but token_embd."""
    from edgeqwen.measure.plan import model_config, nbytes, tensor_types
    cfg = {"tie_word_embeddings": False}
    q8 = [(name, ne, t) for name, _, ne, t in tensor_types(model_config("0.5b", cfg), "q8_0")]
    want = sum(nbytes(ne, t) for name, ne, t in q8 if t.name == "Q8_0" and name != "token_embd")
    assert want > 0 and any(name == "output" and t.name == "Q8_0" for name, _, t in q8)
    assert plan("0.5b", "q8_0", config=cfg).repack_bytes == 0  # no AVX2 repack for Q8_0
    assert plan("0.5b", "q8_0", config=cfg, amx=True).repack_bytes == want
    assert plan("0.5b", "f16", config=cfg, amx=True).repack_bytes == 0


def test_plan_on_an_amx_cpu_holds_a_tied_outputs_copy_and_the_amx_layouts_additions():
    """A tied model's output is token_embd loaded again into the AMX buffer while the lookup keeps reading the
    original (pagecache.py keeps it): a second copy, whichever way the file is loaded; and the AMX layout adds 4
    bytes per Q8_0 / Q4_K block (ggml-cpu/amx/mmq.cpp get_row_size)."""
    from edgeqwen.measure.plan import model_config, nbytes, tensor_types
    tied = model_config("0.5b")
    assert tied.tie_word_embeddings
    types = tensor_types(tied, "q8_0")
    embd = nbytes(types[0][2], types[0][3])
    blocks = sum(ne // 32 for name, _, ne, t in types if t.name == "Q8_0")   # token_embd's copy included
    for resident in (False, True):
        cpu, amx = plan("0.5b", "q8_0", resident=resident), plan("0.5b", "q8_0", amx=True, resident=resident)
        assert amx.peak_ram - cpu.peak_ram == embd + 4 * blocks
        assert amx.min_ram - cpu.min_ram == embd + 4 * blocks
    # make demo's bench row on a Sapphire Rapids VM (issue 28, recorded there): plan said 0.53 GiB, it measured 0.69
    demo = plan("0.5b", "q4", amx=True, prompt_tokens=128, resident=True).peak_ram / 2**30
    assert abs(demo - 0.69) / 0.69 < 0.10, demo


def test_plan_over_several_devices():
    from edgeqwen.measure.plan import load_devices, parse_pool, plan, plan_pool
    profiles = load_devices()
    pool = parse_pool("3xraspberry-pi-5-4gb", profiles)
    r = plan_pool("7b", "q4", pool)
    p = plan("7b", "q4")
    # every layer placed once; the shares add up to the whole model's weights, KV and one runtime per device
    assert sum(s.layers for s in r["shares"]) == 28
    fixed = 3 * (p.compute_bytes + p.runtime_bytes)
    assert abs(sum(s.need for s in r["shares"]) - fixed - p.weights_bytes - p.kv_bytes) < 16 << 20
    assert r["fits"] and r["alone"] == [("raspberry-pi-5-4gb", False)]
    # a pipeline: no faster than one device holding it all, and slower by the network model
    one = plan_pool("7b", "q4", parse_pool("2xraspberry-pi-5-8gb", profiles))
    assert r["tps"] < 1 / one["compute_s"]
    assert not plan_pool("72b", "q4", parse_pool("3xraspberry-pi-5-8gb", profiles))["fits"]
    assert plan_pool("72b", "q4", parse_pool("8xraspberry-pi-5-8gb", profiles))["fits"]
    assert plan_pool("72b", "q4", parse_pool("4xx86-laptop-ddr5-16gb", profiles))["fits"]


@pytest.mark.parametrize("spec, msg", [("3xnope", "unknown device"), ("raspberry-pi-5-4gb", "between 2 and 17"),
                                       ("18xraspberry-pi-5-4gb", "between 2 and 17"), ("3x;foo", "is not [COUNTx]")])
def test_plan_devices_bad_input(spec, msg):
    p = invoke("plan", "7b", "q4", "--devices", spec)
    assert p.returncode == 2 and msg in p.stderr and p.stderr.count("\n") == 1


def test_table_columns_use_llama_bench_test_names(rows):
    from edgeqwen.measure.table import render_rows
    md = render_rows(rows, "md")
    assert "| pp64 t/s | tg16 t/s | tg16@d64 t/s |" in md   # tg16 from an empty context, tg16@d64 after the prompt
    line = next(ln for ln in md.splitlines() if "q8_0" in ln and "20.00" in ln)
    assert line.count("20.00 ± 0.00") == 2   # FakeRunner decodes at 20 tok/s at either depth
    mixed = [dict(rows[0]), dict(rows[1], prompt_tokens=512)]
    assert "| pp t/s | tg t/s | tg@d t/s |" in render_rows(mixed, "md")


def _hog():
    """A CPU hog: one core of busy loop, as another user's job would be."""
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_a_bench_beside_a_cpu_hog_is_marked_busy_and_a_quiet_one_is_not(tiny_builds, tmp_path):
    import time
    out = tmp_path / "r.jsonl"
    args = ("bench", tiny_builds["q8_0"], "--threads", "1", "--repeats", "2", "--prompt-tokens", "32",
            "--gen-tokens", "16", "--out", out)
    hog = _hog()
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


def test_fit_refuses_a_baseline_taken_beside_a_cpu_hog(tiny_builds):
    import os

    from edgeqwen.measure import memlimit
    if os.geteuid() != 0 or memlimit._version() is None:
        pytest.skip("needs root and the cgroup memory controller")
    hog = _hog()
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


def _recorded_sysctl(name):
    """A Mac's sysctl answers, from a fixture written from Apple's documented keys and public dumps (not
    recorded on a Mac here: see each file's header)."""
    from helpers import REPO
    pairs = {}
    for line in (REPO / "tests" / "data" / "sysctl" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split(":", 1)
            pairs[k.strip()] = v.strip()
    return lambda key: pairs.get(key, "")


@pytest.mark.parametrize("fixture,chip,perf,eff,gib,bw", [
    ("macbookair-m1-8gb.txt", "Apple M1", 4, 4, 8, 68.25),
    ("macmini-m2-16gb.txt", "Apple M2", 4, 4, 16, 100),
    ("macbookpro16-m3max-48gb.txt", "Apple M3 Max", 12, 4, 48, 400),   # the full chip, not the 10P bin
    ("macmini-m4-16gb.txt", "Apple M4", 4, 6, 16, 120),
])
def test_hw_reads_apple_chips_from_sysctl(fixture, chip, perf, eff, gib, bw):
    from edgeqwen.measure.hw import apple_info
    a = apple_info(_recorded_sysctl(fixture))
    assert a["chip"] == chip and a["performance_cores"] == perf and a["efficiency_cores"] == eff
    assert a["unified_memory"] == gib << 30 and a["gpu"] and a["bandwidth_published_gbs"] == bw
    assert a["bandwidth_source"].startswith("https://")


def test_hw_tells_binned_apple_chips_apart_and_ignores_other_machines():
    from edgeqwen.measure.hw import apple_info
    binned = {"machdep.cpu.brand_string": "Apple M4 Max", "hw.perflevel0.physicalcpu": "10",
              "hw.perflevel1.physicalcpu": "4", "hw.memsize": str(36 << 30)}
    a = apple_info(lambda k: binned.get(k, ""))
    assert a["chip"] == "Apple M4 Max (14-core CPU, 32-core GPU)" and a["bandwidth_published_gbs"] == 410
    assert apple_info(lambda k: {"machdep.cpu.brand_string": "Intel(R) Core(TM) i7-9750H"}.get(k, "")) is None


def test_apple_chip_table_is_sourced():
    from edgeqwen.measure.hw import apple_chips
    chips = apple_chips()
    assert len(chips) >= 15
    for name, c in chips.items():
        assert c["bandwidth_gbs"] > 0 and c["source"].startswith("https://"), name
        assert c["source_kind"] in ("apple-via-press", "secondary"), name


def test_published_measurements_are_sourced_and_validated(tmp_path):
    from edgeqwen.errors import UsageError
    from edgeqwen.measure.calibrate import points, published
    from edgeqwen.schemas import PublishedRow, check
    rows = published()["row"]
    assert len(rows) >= 25 and all(r["source"].startswith("https://") for r in rows)
    assert {"pi", "apple", "x86"} <= {r["device_class"] for r in rows}
    from edgeqwen.measure.plan import plan
    assert len(points(plan)) >= 25   # unambiguous decode rows with a bandwidth and a size (plan's where unprinted)
    assert len(points()) < len(points(plan))   # without plan: only the rows whose source printed the file size
    bad = dict(rows[0], tok_s="20")   # a string is never taken for a number
    with pytest.raises(UsageError, match="tok_s"):
        check(PublishedRow, bad, "published.toml row 1", "a published row", "a table")


def test_leave_one_out_predicts_each_row_from_the_others():
    from edgeqwen.measure.calibrate import Point, error_table, leave_one_out
    row = {"tok_s": 10.0}

    def pt(tok_s, cls="pi5"):
        return Point(dict(row, tok_s=tok_s), "cpu", cls, 10.0, 5e8, False)   # ceiling 20 tok/s
    same = [pt(10.0), pt(10.0), pt(10.0)]
    assert all(abs(e) < 1e-12 for _, e in leave_one_out(same))
    loo = leave_one_out([pt(10.0), pt(12.0), pt(8.0), pt(5.0, "pi4")])
    errs = {p.row["tok_s"]: e for p, e in loo}
    assert 5.0 not in errs   # alone in its class: nothing to predict it from
    assert errs[10.0] == pytest.approx(0.0) and errs[12.0] == pytest.approx(9 / 12 - 1)
    t = error_table(loo)[("cpu", "pi5")]
    assert t["n"] == 3 and t["worst_abs"] == pytest.approx(11 / 8 - 1)   # 8.0 predicted from 10 and 12


def test_untested_speed_claims_on_calibrated_devices_are_predicted_with_their_error():
    from edgeqwen.measure.claims import judge, render_claims
    from edgeqwen.measure.plan import load_devices
    devs = load_devices()
    claim = {"id": "p", "model": "0.5b", "quant": "q4_k_m", "device": "raspberry-pi-5-8gb", "min_decode_tps": 10}
    v = judge(claim, [], devs)
    assert v["verdict"].startswith("PREDICTED PASS (±") and v["prediction"]["error"] > 0
    assert "PREDICTED PASS" in render_claims([v])
    far = judge(dict(claim, min_decode_tps=500), [], devs)
    assert far["verdict"].startswith("PREDICTED FAIL")
    # no published rows of GPUs: nothing to know the error by
    gpu = judge({"id": "g", "model": "0.5b", "quant": "q4_k_m", "device": "consumer-gpu-24gb", "min_decode_tps": 1},
                [], devs)
    assert gpu["verdict"] == "UNTESTED"


def test_one_run_says_n1_not_a_spread_it_did_not_measure():
    from edgeqwen.measure.table import _ts
    assert _ts({"mean": 4.3, "sd": 0.0, "n": 1}) == "4.30 (n=1)"
    assert _ts({"mean": 5.0, "sd": 0.1, "n": 3}) == "5.00 ± 0.10" and _ts(None) == "-"


def test_no_plan_ceiling_sits_below_the_measurement_it_is_shown_beside():
    """Over every committed row file and claim: where a row decides a claim, the prediction beside it uses that
    machine's measured bandwidth, so its roofline is never under the measured decode (a fixed profile's 20.6 GB/s
    once put 'ceiling 4.7' beside a measured 5.9 tok/s)."""
    from helpers import REPO

    from edgeqwen.measure.plan import load_devices
    from edgeqwen.measure.table import load_rows
    rows = load_rows(sorted((REPO / "bench" / "results").glob("*.jsonl")))
    devices = load_devices()
    decided = 0
    for claim in load_claims():
        v = judge(claim, rows, devices)
        row, p = v.get("row"), v.get("prediction")
        if row and row.get("status") == "ok" and p:
            decided += 1
            assert p["measured_bandwidth"] and row["tg"]["mean"] <= p["ceiling_tps"], (claim["id"], row["tg"], p)
    assert decided >= 2


def test_rows_say_what_measured_them_and_how_hot_it_was(tmp_path):
    """Provenance in the fingerprint every row carries: edgeqwen's commit (in a checkout), llama.cpp's own version
    and commit (libggml-base's ggml_version/ggml_commit), and the thermal state where Linux shows it."""
    from helpers import REPO

    from edgeqwen.measure.hw import THROTTLED_NOW, thermal, versions
    v = versions()
    if (REPO / ".git").exists() and shutil.which("git"):
        assert len(v["edgeqwen_commit"].removesuffix("-dirty")) == 40
    if "llama_cpp_python" in v:
        assert v["ggml"].count(".") == 2 and v["ggml_commit"]
    # A recorded tree, marked as such: the files a Raspberry Pi 5 under load shows (Raspberry Pi OS, 6.6 kernel),
    # get_throttled 50005 = under-voltage and throttled now, and both since boot (vcgencmd's documented bits).
    sys_ = tmp_path / "sys"
    zone = sys_ / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("81650\n")
    freq = sys_ / "devices" / "system" / "cpu" / "cpu0" / "cpufreq"
    freq.mkdir(parents=True)
    for name, value in (("scaling_governor", "ondemand"), ("scaling_cur_freq", "1500000"),
                        ("cpuinfo_max_freq", "2400000")):
        (freq / name).write_text(value + "\n")
    fw = sys_ / "devices" / "platform" / "soc" / "soc:firmware"
    fw.mkdir(parents=True)
    (fw / "get_throttled").write_text("50005\n")
    t = thermal(sys_)
    assert t == {"temps_c": {"cpu-thermal": 81.65}, "governor": "ondemand", "cur_mhz": 1500, "max_mhz": 2400,
                 "throttled": 0x50005} and t["throttled"] & THROTTLED_NOW
    assert thermal(tmp_path / "nothing") == {}   # a VM shows none of it: absent, never guessed
