"""plan: memory and speed predictions against the files, llama.cpp's own choices and published measurements."""
import json

import pytest
from helpers import invoke

from edgeqwen.formats.gguf.info import read_gguf_info
from edgeqwen.measure.plan import load_devices, plan


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m", "q4_0"])
def test_plan_predicts_the_exact_tensor_bytes(tiny_builds, quant):
    m = json.loads((tiny_builds[quant] / "manifest.json").read_text())
    info = read_gguf_info(tiny_builds[quant] / "model.gguf")
    p = plan("tiny", quant, config=m["config"])
    assert p.weights_bytes == sum(t.n_bytes for t in info.tensors)


def test_plan_follows_llama_cpp_fallbacks_on_the_real_shape():
    """Qwen2-0.5B's 896-wide rows cannot hold K-quant blocks: llama.cpp falls back (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    import collections

    from edgeqwen.formats.gguf.plan import tensor_types
    from edgeqwen.measure.plan import model_config
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


def test_plan_peak_counts_repacked_copies_only_where_the_originals_stay():
    from edgeqwen.measure.plan import plan, predicted_rss_for_row
    given, kept = plan("1.5b", "q4_0"), plan("1.5b", "q4_0", release=False)
    assert given.repack_bytes > 0 and kept.peak_ram - given.peak_ram == given.repack_bytes
    row = {"backend": "llama.cpp", "build": {"size": "1.5b", "quant": "q4_0"}, "n_ctx": 4096, "prompt_tokens": 512}
    assert predicted_rss_for_row(row) == kept.peak_ram   # a row from before the runner released them
    assert predicted_rss_for_row({**row, "released_bytes": 1 << 20}) == given.peak_ram


def test_plan_on_an_amx_cpu_counts_the_amx_repacked_copies():
    """llama.cpp's AMX buffer type keeps a repacked copy of every Q8_0/K-quant matrix but token_embd."""
    from edgeqwen.formats.gguf.plan import nbytes, tensor_types
    from edgeqwen.measure.plan import model_config
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
    from edgeqwen.formats.gguf.plan import nbytes, tensor_types
    from edgeqwen.measure.plan import model_config
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
    from edgeqwen.measure.plan import parse_pool, plan, plan_pool
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
