"""Bad input gets one clear line and a non-zero exit: GGUF metadata llama.cpp would abort on, argument ranges."""
import math
import os
import shutil
import struct

import pytest
from conftest import run_cli


EXAMPLES = int(os.environ.get("EDGEQWEN_FUZZ_EXAMPLES", "300"))   # make fuzz runs many more


def _patched(src, dst, key: bytes, fmt: str, value):
    """Copy a GGUF and overwrite the scalar value stored right after `key` (its type tag is 4 bytes)."""
    shutil.copy(src, dst)
    data = bytearray(dst.read_bytes())
    at = data.index(key) + len(key) + 4
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("key,fmt,value,words", [
    (b"qwen2.block_count", "<I", 0, "block_count"),
    (b"qwen2.block_count", "<I", 1000, "block_count"),
    (b"qwen2.context_length", "<I", 0, "context_length"),
    (b"qwen2.attention.head_count_kv", "<I", 3, "head counts"),
    (b"qwen2.attention.layer_norm_rms_epsilon", "<f", math.nan, "epsilon"),
])
def test_metadata_llama_cpp_would_abort_on_is_one_line(tiny_builds, tmp_path, key, fmt, value, words):
    bad = _patched(tiny_builds["q4_0"] / "model.gguf", tmp_path / "bad.gguf", key, fmt, value)
    r = run_cli("run", bad, "hello", "-n", "2")
    assert r.returncode == 1 and words in r.stderr and "abort" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_a_broken_chat_template_is_one_line(tiny_builds, tmp_path):
    bad = tmp_path / "tpl.gguf"
    data = bytearray((tiny_builds["q4_0"] / "model.gguf").read_bytes())
    at = data.index(b"{%", data.index(b"tokenizer.chat_template"))
    data[at:at + 2] = b"{{"   # a template syntax error, same length
    bad.write_bytes(bytes(data))
    r = run_cli("run", bad, "hello", "-n", "2")
    assert r.returncode == 1 and "chat template" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # llama-cpp-python compiles every template in the metadata when it loads, so --raw cannot help here
    r = run_cli("run", bad, "hello", "-n", "2", "--raw")
    assert r.returncode == 1 and "chat template" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--temperature", "nan"], "finite"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "5"], "top-p"),
    (["--top-p", "0"], "top-p"),
    (["-n", "0"], "max-tokens"),
    (["--threads", "100000"], "threads"),
    (["--ctx", "1000000000"], "ctx"),
    (["--ctx", "0"], "ctx"),
])
def test_argument_ranges(tiny_builds, args, words):
    r = run_cli("run", tiny_builds["q4_0"], "hello", *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_ctx_beyond_the_model_is_refused(tiny_builds):
    r = run_cli("run", tiny_builds["q4_0"], "hello", "--ctx", "65536")   # the tiny model holds 32768
    assert r.returncode == 1 and "context length (32768)" in r.stderr


def test_eval_ctx_and_plan_ctx_ranges(tiny_builds):
    assert run_cli("eval", tiny_builds["q4_0"], "--ctx", "1").returncode == 2
    assert run_cli("plan", "0.5b", "q4", "--ctx", "-4096").returncode == 2


def test_a_file_llama_cpp_aborts_on_is_one_line_not_a_silent_crash(tiny_builds, tmp_path):
    """Two identical token strings (one byte changed in the vocabulary): llama.cpp's GGML_ASSERT aborts the
    process that loads it; the CLI loads an untrusted file in a child first and says so in one line."""
    bad = tmp_path / "dup.gguf"
    data = bytearray((tiny_builds["q4_0"] / "model.gguf").read_bytes())
    at = data.index(b"{%")   # the vocabulary has both "{%" and "{{"
    assert data.index(b"{{") < data.index(b"tokenizer.chat_template")
    data[at:at + 2] = b"{{"
    bad.write_bytes(bytes(data))
    r = run_cli("run", bad, "hello", "-n", "2")
    assert r.returncode == 1 and "crashed (SIGABRT)" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr


def test_fuzzed_gguf_headers_give_a_clean_error_or_load(tiny_builds, tmp_path_factory):
    """Random byte flips and truncations: the header checks raise RunnerError or pass, nothing else."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from edgeqwen.errors import RunnerError
    from edgeqwen.llama_runner import _check_gguf
    src = (tiny_builds["q4_0"] / "model.gguf").read_bytes()
    head = src[:1 << 16]
    work = tmp_path_factory.mktemp("fuzz") / "f.gguf"

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(st.integers(0, len(head) - 1), st.integers(0, 255)), max_size=8),
                      st.integers(8, len(src)))
    def check(flips, cut):
        data = bytearray(src[:cut])
        for pos, byte in flips:
            if pos < len(data):
                data[pos] = byte
        work.write_bytes(bytes(data))
        try:
            _check_gguf(work)
        except RunnerError:
            pass
    check()


@pytest.mark.parametrize("content,words", [
    (b"[1, 2, 3]\n", "JSON object"),
    (b'{"schema": 1, "kind": "bench", "time": "t", "device": {}}\n', "build"),
    (b'{"schema": 1, "kind": "bench", "time": "t", "device": {}, "build": {"name": "x"}}\n', "status"),
    (b'{"schema": 1, "time": "t", "device": {}, "build": {"name": "x"}}\n', "kind"),
    (b'{"schema": 1, "kind": "fit", "time": "t", "device": {}, "build": {"name": "x"}, "min_ram": "lots", '
     b'"baseline_tg": 1, "tg_at_min": 1, "peak_rss_unlimited": 1, "lean": false}\n', "min_ram"),
    (b"\xff\xfe\x00garbage", "not a text file"),
    (b"{" * 200000 + b"\n", "not a JSON line"),
])
def test_bad_result_rows_are_one_line(tmp_path, content, words):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(content)
    r = run_cli("table", f)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("manifest,words", [
    ("[]", "manifest"), ("null", "manifest"), ('{"name": "x"}', "quant"), ("{not json", "not valid JSON"),
    ('{"name": "x", "quant": "q4_0", "file": "../../etc/passwd", "file_size": 1}', "file"),
])
def test_bad_manifests_are_one_line(tmp_path, manifest, words):
    d = tmp_path / "b"
    d.mkdir()
    (d / "manifest.json").write_text(manifest)
    r = run_cli("run", d, "hello")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unusable_paths_are_one_line(tmp_path, tiny_ckpt):
    f = tmp_path / "afile"
    f.write_text("x")
    r = run_cli("build", "tiny", "q8", "--source", tiny_ckpt, "--out", f / "sub")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) >= 1
    r = run_cli("list", env={"EDGEQWEN_HOME": str(f)})
    assert "Traceback" not in r.stderr


def test_fuzzed_arguments_give_success_or_a_usage_error():
    """plan and table argument parsing: any values give exit 0 or a clean usage error, never another exception."""
    hypothesis = pytest.importorskip("hypothesis")
    from click.testing import CliRunner
    from hypothesis import strategies as st

    from edgeqwen.cli import cli
    values = st.one_of(st.integers(-2**40, 2**40).map(str), st.floats().map(str), st.text(max_size=12),
                       st.sampled_from(["nan", "inf", "-0", "1e309", "0x10", "", " ", "4G"]))

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.sampled_from(["0.5b", "7b", "72b", "x", ""]), st.sampled_from(["q4", "q8_0", "int4", "zz"]),
                      values)
    def check(size, quant, ctx):
        r = CliRunner().invoke(cli, ["plan", size, quant, "--ctx", ctx])
        assert r.exit_code in (0, 1, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    check()


# --- a checkpoint's files: safetensors headers, config.json, the index, the tokenizer ----------------------

def _json_values():
    """Any JSON value: what a hostile or corrupt file can hold where we expect an object or a number."""
    from hypothesis import strategies as st
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(allow_nan=False),
                        st.text(max_size=8), st.sampled_from([0, -1, 1, 2**40, 1e-300, "12", "nan"]))
    return st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), c, max_size=4)),
                        max_leaves=12)


def _write_safetensors(path, header: bytes, body: bytes = b"\0" * 64):
    import struct
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


def test_fuzzed_safetensors_headers_give_a_source_error_or_tensors(tmp_path_factory):
    """Header JSON of any shape and values: SourceError naming the file, or tensors inside the file, never another
    exception; overlapping or out-of-file offsets are refused."""
    hypothesis = pytest.importorskip("hypothesis")
    import json

    from hypothesis import strategies as st

    from edgeqwen.errors import SourceError
    from edgeqwen.safetensors import read_header
    f = tmp_path_factory.mktemp("st") / "m.safetensors"
    entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F16", "F32", "BF16", "I8", "", 3]),
                                   "shape": st.one_of(st.lists(st.integers(-2, 70), max_size=3), _json_values()),
                                   "data_offsets": st.one_of(st.tuples(st.integers(-5, 90), st.integers(-5, 90)),
                                                             _json_values())})
    header = st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(entry, _json_values()), max_size=4),
                       _json_values())

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(header)
    def check(h):
        _write_safetensors(f, json.dumps(h).encode())
        try:
            tensors = read_header(f)
        except SourceError as e:
            assert str(f) in str(e)
            return
        spans = sorted((t.start, t.end) for t in tensors.values())
        assert all(8 <= a <= b <= f.stat().st_size for a, b in spans)
        for (a1, b1), (a2, b2) in zip(spans, spans[1:]):
            assert b1 <= a2 or a2 == b2 or a1 == b1   # no two non-empty tensors share bytes
    check()
    overlapping = json.dumps({"a": {"dtype": "F16", "shape": [8], "data_offsets": [0, 16]},
                              "b": {"dtype": "F16", "shape": [8], "data_offsets": [8, 24]}}).encode()
    for bad, words in [(b"[1, 2]", "JSON object"), (b"[" * 100000, "nested too deeply"), (overlapping, "overlap")]:
        _write_safetensors(f, bad)
        with pytest.raises(SourceError, match=words):
            read_header(f)


def _tiny_copy(tiny_ckpt, dst):
    shutil.copytree(tiny_ckpt, dst, dirs_exist_ok=True)
    return dst


@pytest.mark.parametrize("patch,words", [
    ([1, 2], "must be a JSON object"), (None, "must be a JSON object"),
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"max_position_embeddings": -4}, "max_position_embeddings"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings"), ({"hidden_size": "256"}, "hidden_size"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"), ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_scaling": {"type": "yarn"}}, "needs a factor"), ({"auto_map": {"AutoModel": "x.Y"}}, "remote code"),
])
def test_bad_config_json_is_one_line(tiny_ckpt, tmp_path, patch, words):
    import json
    src = _tiny_copy(tiny_ckpt, tmp_path / "ckpt")
    cfg = json.loads((src / "config.json").read_text())
    text = json.dumps(patch) if not isinstance(patch, dict) else json.dumps({**cfg, **patch})
    (src / "config.json").write_text(text)
    r = run_cli("build", "tiny-qwen2", "q8", "--source", src, "--out", tmp_path / "out")
    assert r.returncode == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_fuzzed_config_json_gives_a_source_error_or_opens(tiny_ckpt, tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    import json

    from hypothesis import strategies as st

    from edgeqwen.checkpoint import open_checkpoint
    from edgeqwen.errors import SourceError
    src = _tiny_copy(tiny_ckpt, tmp_path_factory.mktemp("cfg") / "ckpt")
    good = json.loads((src / "config.json").read_text())

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.dictionaries(st.sampled_from(sorted(good)), _json_values(), max_size=4))
    def check(patch):
        (src / "config.json").write_text(json.dumps({**good, **patch}))
        try:
            open_checkpoint(src)
        except SourceError:
            pass
    check()


@pytest.mark.parametrize("index,words", [
    ({"weight_map": ["a"]}, "weight_map"), ({"weight_map": {"x": "../../etc/passwd"}}, "weight_map.x"),
    ([1], "JSON object"), ({"weight_map": {"x": "missing.safetensors"}}, "missing"),
])
def test_bad_weight_index_is_one_line(tiny_ckpt, tmp_path, index, words):
    import json

    from edgeqwen.checkpoint import open_checkpoint
    from edgeqwen.errors import SourceError
    src = _tiny_copy(tiny_ckpt, tmp_path / "ckpt")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=words):
        open_checkpoint(src)


@pytest.mark.parametrize("name,content,words", [
    ("tokenizer.json", "", "not valid JSON"), ("tokenizer.json", "[]", "JSON object"),
    ("tokenizer.json", '{"model": {}}', "model.vocab"), ("tokenizer.json", b"\xff\xfe", "not UTF-8"),
    ("tokenizer.json", '{"model": {"vocab": {"a": -1}}}', "model.vocab.a"),
    ("tokenizer.json", '{"model": {"vocab": {}}, "added_tokens": [{"content": "x"}]}', "added_tokens.0.id"),
    ("tokenizer_config.json", "{", "not valid JSON"), ("tokenizer_config.json", '{"eos_token": 5}', "eos_token"),
])
def test_bad_tokenizer_files_are_one_line(tiny_ckpt, tmp_path, name, content, words):
    src = _tiny_copy(tiny_ckpt, tmp_path / "ckpt")
    (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    r = run_cli("build", "tiny-qwen2", "q8", "--source", src, "--out", tmp_path / "out", "--no-smoke")
    assert r.returncode == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


# --- device profiles and claims -----------------------------------------------------------------------

@pytest.mark.parametrize("toml,words", [
    ('[d]\nram_gib = "8"\nbandwidth_gbs = 17\nsource = "x"\n', "ram_gib"),
    ("[d]\nram_gib = 8\nbandwidth_gbs = 17\n", "source"),
    ('[d]\nram_gib = 8\nbandwidth_gbs = -1\nsource = "x"\n', "bandwidth_gbs"),
    ('[d]\nram_gib = 8\nbandwidth_gbs = 17\nsource = "x"\nmatch = { device = "(" }\n', "regular expression"),
    ("d = 3\n", "must be a table"), ("\xff", "cannot read"), ("[d\n", "cannot read"),
])
def test_bad_device_profiles_are_one_line(tmp_path, toml, words):
    f = tmp_path / "devices.toml"
    f.write_bytes(toml.encode("latin-1"))
    r = run_cli("plan", "7b", "q4", "--device", "d", "--profiles", f)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("toml,words", [
    ('[[claim]]\nid = "a"\nmodel = "7b"\nquant = "q4"\n', "device"),
    ('[[claim]]\nid = "a"\nmodel = "7b"\nquant = "q4"\ndevice = "x"\nmin_decode_tps = "fast"\n', "min_decode_tps"),
    ('[[claim]]\nid = "a"\nmodel = "7b"\nquant = "q4"\ndevice = "x"\nspeed = 1\n', "speed"),
    ('claim = 3\n', "[[claim]] tables"),
])
def test_bad_claims_are_one_line(tmp_path, toml, words):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"schema": 1, "kind": "bench", "time": "t", "device": {}, "build": {"name": "x"}, '
                    '"status": "failed", "threads": 1}\n')
    f = tmp_path / "claims.toml"
    f.write_text(toml)
    r = run_cli("table", rows, "--claims", f)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bundled_profiles_and_claims_validate():
    from edgeqwen.claims import load_claims
    from edgeqwen.plan import load_devices
    assert len(load_devices()) >= 10 and len(load_claims()) >= 5


def test_fuzzed_run_arguments_give_a_usage_error_never_another_exception():
    """run's sampling, context, thread and worker options, any values: exit 1 or 2 with a message, never another
    exception (the build does not exist, so only the boundary is exercised)."""
    hypothesis = pytest.importorskip("hypothesis")
    from click.testing import CliRunner
    from hypothesis import strategies as st

    from edgeqwen.cli import cli
    values = st.one_of(st.integers(-2**40, 2**40).map(str), st.floats().map(str), st.text(max_size=10),
                       st.sampled_from(["nan", "inf", "0", "1", "1e309", "", "127.0.0.1:0", "a:1,a:1", "1,1,1"]))
    opts = st.sampled_from(["-n", "-t", "--top-p", "--threads", "--ctx", "--workers", "--split", "--seed"])

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(opts, values), max_size=4))
    def check(pairs):
        args = ["run", "no-such-build-here", "hi"] + [x for p in pairs for x in p]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code in (1, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    check()


def test_fuzzed_rows_and_manifests_give_a_usage_error_or_data(tmp_path_factory):
    """A JSONL line or a manifest.json of any JSON shape: rows / a manifest, or one UsageError naming the file."""
    hypothesis = pytest.importorskip("hypothesis")
    import json

    from hypothesis import strategies as st

    from edgeqwen.errors import UsageError
    from edgeqwen.home import read_manifest
    from edgeqwen.table import load_rows, render_rows
    d = tmp_path_factory.mktemp("rows")
    row = st.fixed_dictionaries({"schema": st.sampled_from([1, 1, 2, "1"]), "kind": st.sampled_from(
        ["bench", "eval", "fit", "x"]), "time": _json_values(), "device": _json_values(), "build": _json_values(),
        "status": st.sampled_from(["ok", "failed", 3]), "threads": _json_values(), "tg": _json_values(),
        "pp": _json_values()})

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.one_of(row, _json_values()), _json_values())
    def check(r, manifest):
        (d / "rows.jsonl").write_text(json.dumps(r) + "\n")
        try:
            render_rows(load_rows([d / "rows.jsonl"]))
        except UsageError as e:
            assert "rows.jsonl" in str(e)
        (d / "manifest.json").write_text(json.dumps(manifest))
        try:
            read_manifest(d)
        except UsageError as e:
            assert "manifest.json" in str(e)
    check()
