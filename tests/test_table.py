"""table and claims: rows merged and rendered per device, claims judged from them."""
import json

import pytest

from edgeqwen.measure.claims import judge, load_claims, render_claims
from edgeqwen.measure.plan import load_devices
from edgeqwen.measure.table import load_rows, render_rows


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


def test_table_columns_use_llama_bench_test_names(rows):
    from edgeqwen.measure.table import render_rows
    md = render_rows(rows, "md")
    assert "| pp64 t/s | tg16 t/s | tg16@d64 t/s |" in md   # tg16 from an empty context, tg16@d64 after the prompt
    line = next(ln for ln in md.splitlines() if "q8_0" in ln and "20.00" in ln)
    assert line.count("20.00 ± 0.00") == 2   # FakeRunner decodes at 20 tok/s at either depth
    mixed = [dict(rows[0]), dict(rows[1], prompt_tokens=512)]
    assert "| pp t/s | tg t/s | tg@d t/s |" in render_rows(mixed, "md")


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
