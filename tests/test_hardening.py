"""Bad input gets one clear line and a non-zero exit: GGUF metadata llama.cpp would abort on, argument ranges."""
import math
import os
import shutil
import struct

import pytest
from helpers import invoke, run_cli


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
    r = invoke("run", tiny_builds["q4_0"], "hello", *args)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_ctx_beyond_the_model_is_refused(tiny_builds):
    r = run_cli("run", tiny_builds["q4_0"], "hello", "--ctx", "65536")   # the tiny model holds 32768
    assert r.returncode == 1 and "context length (32768)" in r.stderr


def test_eval_ctx_and_plan_ctx_ranges(tiny_builds):
    assert invoke("eval", tiny_builds["q4_0"], "--ctx", "1").returncode == 2
    assert invoke("plan", "0.5b", "q4", "--ctx", "-4096").returncode == 2


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
    from edgeqwen.formats.gguf.runner import _check_gguf
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
    r = invoke("table", f)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("manifest,words", [
    ("[]", "manifest"), ("null", "manifest"), ('{"name": "x"}', "quant"), ("{not json", "not valid JSON"),
    ('{"name": "x", "quant": "q4_0", "file": "../../etc/passwd", "file_size": 1}', "file"),
])
def test_bad_manifests_are_one_line(tmp_path, manifest, words):
    d = tmp_path / "b"
    d.mkdir()
    (d / "manifest.json").write_text(manifest)
    r = invoke("run", d, "hello")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unusable_paths_are_one_line(tmp_path, tiny_ckpt):
    f = tmp_path / "afile"
    f.write_text("x")
    r = invoke("build", "tiny", "q8", "--source", tiny_ckpt, "--out", f / "sub")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) >= 1
    r = invoke("list", env={"EDGEQWEN_HOME": str(f)})
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
    from edgeqwen.checkpoints.safetensors import read_header
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
    r = invoke("build", "tiny-qwen2", "q8", "--source", src, "--out", tmp_path / "out")
    assert r.returncode == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_fuzzed_config_json_gives_a_source_error_or_opens(tiny_ckpt, tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    import json

    from hypothesis import strategies as st

    from edgeqwen.checkpoints import open_checkpoint
    from edgeqwen.errors import SourceError
    src = _tiny_copy(tiny_ckpt, tmp_path_factory.mktemp("cfg") / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):   # not what is fuzzed here, and 7 MB to parse each time
        (src / name).unlink()
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

    from edgeqwen.checkpoints import open_checkpoint
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
    r = invoke("build", "tiny-qwen2", "q8", "--source", src, "--out", tmp_path / "out", "--no-smoke")
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
    r = invoke("plan", "7b", "q4", "--device", "d", "--profiles", f)
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
    r = invoke("table", rows, "--claims", f)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bundled_profiles_and_claims_validate():
    from edgeqwen.measure.claims import load_claims
    from edgeqwen.measure.plan import load_devices
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
    from edgeqwen.measure.table import load_rows, render_rows
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


# --- text from outside: one rule (edgeqwen/text.py), never a traceback --------------------------------------

def _cli_bytes(args, stdin: bytes, timeout=300):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "edgeqwen.cli", *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout)


@pytest.mark.parametrize("stdin", [b"hi \xff\xfe", b"nul \x00 inside", b"\xed\xa0\x80 a lone surrogate, encoded",
                                   b"\x1b[31m red \x1b[0m"])
def test_run_reads_any_bytes_on_stdin(tiny_builds, stdin):
    r = _cli_bytes(["run", tiny_builds["q8_0"], "-n", "4", "-t", "0"], stdin)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]


def test_run_reads_undecodable_arguments(tiny_builds):
    r = _cli_bytes(["run", tiny_builds["q8_0"], b"hi \xff\xfe".decode("utf-8", "surrogateescape"), "-n", "4",
                    "--system", b"\xc3".decode("utf-8", "surrogateescape")], b"")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_one_megabyte_prompt_is_one_line(tiny_builds):
    r = _cli_bytes(["run", tiny_builds["q8_0"], "-n", "4"], b"word " * 200000 + b"\xff")
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"context holds" in r.stderr, r.stderr[-500:]


def test_chat_reads_any_bytes(tiny_builds):
    r = _cli_bytes(["chat", tiny_builds["q8_0"], "-n", "4"], b"hi \xff\xfe\n\x00\n" + b"x" * (1 << 20) + b"\n/quit\n")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert b"the context holds" in r.stdout   # the 1 MB line is refused, the chat goes on


def test_the_terminals_text_is_cleaned_piece_by_piece_as_whole():
    """run prints each piece through display_text as it streams: what shows is display_text of the whole answer
    whatever control characters a model emits (run --json and the API carry them exactly: test_serve)."""
    from edgeqwen.runner import display_text
    pieces = ["a\x1b[2J", "\x00b", "\ufffd c\n", "\td\x7f"]
    assert "".join(display_text(p) for p in pieces) == display_text("".join(pieces))
    assert "\x1b" not in display_text("".join(pieces)) and "\n" in display_text("\n")


def test_eval_text_files_are_decoded_by_the_rule(tiny_builds, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"Some text \xff\xfe with bad bytes. " * 40)
    r = run_cli("eval", tiny_builds["q8_0"], "--text", f, "--ctx", "64", "--windows", "1",
                "--reference", tiny_builds["f16"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_fuzzed_text_tokenizes_or_is_refused_never_raises(tiny_builds):
    """Any bytes, decoded by the rule, tokenize in the real runner (GGUF)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from edgeqwen.formats.gguf.runner import LlamaRunner
    from edgeqwen.text import clean, decode
    r = LlamaRunner(next(tiny_builds["q8_0"].glob("*.gguf")), threads=1, n_ctx=256)

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.one_of(st.binary(max_size=64).map(decode),
                                st.binary(max_size=64).map(lambda b: clean(b.decode("utf-8", "surrogateescape"))),
                                st.text(max_size=32).map(clean)))
    def check(text):
        toks = r.tokenize(text)
        assert all(0 <= t < r.n_vocab for t in toks)
    check()
    r.close()


# --- numeric options and outputs: ranges and finiteness at the boundary, outputs checked before the work ----

@pytest.mark.parametrize("args, words", [
    (["fit", "B", "--fraction", "nan"], "finite"),
    (["fit", "B", "--fraction", "inf"], "fraction"),
    (["fit", "B", "--fraction", "-1"], "fraction"),
    (["bench", "B", "--prompt-tokens", "-5"], "prompt-tokens"),
    (["bench", "B", "--gen-tokens", "99999999999"], "gen-tokens"),
    (["bench", "B", "--repeats", "1e9"], "repeats"),
    (["serve", "B", "--request-timeout", "nan"], "finite"),
    (["serve", "B", "--request-timeout", "0"], "request-timeout"),
    (["fit", "B", "--out", "/no/such/folder/rows.jsonl"], "does not exist"),
    (["bench", "B", "--out", "/"], "directory"),
    (["eval", "B", "--out", "/etc/hostname/rows.jsonl"], "is not a folder"),
    (["table", "x.jsonl", "--plot", "/no/such/p.png"], "does not exist"),
])
def test_numeric_options_and_outputs_are_checked_first(args, words):
    r = invoke(*[str(a) for a in args])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_fit_out_is_checked_before_the_search(tiny_builds, tmp_path):
    import time
    t0 = time.perf_counter()
    r = invoke("fit", tiny_builds["q8_0"], "--out", tmp_path / "missing" / "rows.jsonl")
    assert r.returncode == 2 and "does not exist" in r.stderr and time.perf_counter() - t0 < 30


def test_fuzzed_numeric_options_give_a_usage_error_never_another_exception():
    hypothesis = pytest.importorskip("hypothesis")
    from click.testing import CliRunner
    from hypothesis import strategies as st

    from edgeqwen.cli import cli
    values = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(str),
                       st.sampled_from(["nan", "inf", "-inf", "-0", "1e309", "0x10", "", " ", "4G", "-1"]))
    cases = st.sampled_from([("bench", "--prompt-tokens"), ("bench", "--gen-tokens"), ("bench", "--repeats"),
                             ("bench", "--ctx"), ("fit", "--fraction"), ("fit", "--resolution"),
                             ("eval", "--ctx"), ("eval", "--windows"), ("serve", "--port"), ("serve", "--max-queue"),
                             ("serve", "--request-timeout"), ("plan", "--ctx"), ("run", "--top-p")])

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(cases, values)
    def check(case, value):
        cmd, opt = case
        args = [cmd, "no-such-build-here"] + (["q4"] if cmd == "plan" else []) + [opt, value]
        if cmd == "serve":
            args += ["--host", ""]   # never listen: refused at the host check if the option passed
        r = CliRunner().invoke(cli, args)
        assert r.exit_code in (1, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    check()


def test_bench_draws_its_prompt_from_the_builds_own_vocabulary_and_a_failure_exits_1(tiny_builds, tmp_path):
    """A build whose vocabulary is smaller than Qwen2's (1000 tokens): every measurement used to fail with
    llama_decode -1, and bench still exited 0."""
    from helpers import tiny_config

    from edgeqwen.checkpoints.synthetic import write_generated_tokenizer, write_synthetic
    src = tmp_path / "small-vocab"
    write_synthetic(src, tiny_config(vocab_size=1024), seed=3)
    write_generated_tokenizer(src, 1000)
    b = run_cli("build", "tiny-qwen2", "q8_0", "--source", src, "--out", tmp_path / "small", "--no-smoke")
    assert b.returncode == 0, b.stderr
    r = run_cli("bench", tmp_path / "small", "--threads", "1", "--repeats", "1", "--prompt-tokens", "32",
                "--gen-tokens", "4", "--out", tmp_path / "rows.jsonl")
    assert r.returncode == 0 and "| ok |" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    r = run_cli("bench", bad / "model.gguf", "--threads", "1", "--repeats", "1", "--prompt-tokens", "8",
                "--gen-tokens", "2")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("Error: 1 of 1 measurements failed")


# --- result rows: every field table reads, each wrong in turn ----------------------------------------------

GOOD_ROWS = {
    "bench": {"schema": 1, "kind": "bench", "time": "2026-12-03T00:00:00", "id": "b",
              "device": {"cpu": "c", "device_id": "d", "arch": "x86_64", "isa": ["avx2"], "ram_total": 1 << 30},
              "build": {"name": "n", "recipe": "r", "quant": "q4_0", "size": "0.5b", "file_size": 1 << 20},
              "backend": "llama.cpp", "status": "ok", "threads": 2, "load_s": 0.5,
              "pp": {"mean": 10.0, "sd": 1.0, "n": 2},
              "tg": {"mean": 5.0, "sd": 0.1, "n": 2}, "tg_empty": {"mean": 6.0, "sd": 0.1, "n": 2},
              "ttft_s": {"mean": 0.1, "sd": 0.0, "n": 2}, "max_rss": 1 << 28, "roofline_frac": 0.5,
              "prompt_tokens": 512, "gen_tokens": 128},
    "eval": {"schema": 1, "kind": "eval", "time": "2026-12-03T00:00:00", "id": "e", "device": {},
             "build": {"name": "n", "file_size": 1 << 20}, "text": "en", "ppl": 9.5, "ref_ppl": 9.0, "kl_mean": 0.01,
             "kl_p99": 0.1, "top1": 0.9, "tokens_scored": 100, "reference": "/x/f16/model.gguf"},
    "fit": {"schema": 1, "kind": "fit", "time": "2026-12-03T00:00:00", "id": "f", "device": {"device_id": "d"},
            "build": {"name": "n", "size": "1.5b", "quant": "q4_0"}, "min_ram": 1 << 30, "baseline_tg": 10.0,
            "tg_at_min": 9.5, "peak_rss_unlimited": 1 << 30, "lean": False, "fraction": 0.9,
            "probes": [{"limit": 1 << 30, "tg": 9.5, "pass": True}]},
}


def _render_all(path):
    from edgeqwen.measure.claims import judge, load_claims, render_claims
    from edgeqwen.measure.plan import load_devices, predicted_rss_for_row
    from edgeqwen.measure.table import load_rows, render_quality, render_rows
    rows = load_rows([path])
    for fmt in ("md", "csv", "html"):
        render_rows(rows, fmt, plan_fn=predicted_rss_for_row)
        render_quality(rows, fmt)
    devs = load_devices()
    render_claims([judge(c, rows, devs) for c in load_claims()])


@pytest.mark.parametrize("kind", sorted(GOOD_ROWS))
def test_good_rows_render(tmp_path, kind):
    import json
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(GOOD_ROWS[kind]) + "\n")
    _render_all(f)


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


def test_fuzzed_row_fields_each_wrong_in_turn_give_a_usage_error_or_render(tmp_path_factory):
    """A row whose fields are right but one (any type, any value): it renders, or one UsageError naming the file
    and the field; never a TypeError / KeyError / OverflowError from the table (the campaign found 8)."""
    hypothesis = pytest.importorskip("hypothesis")
    import copy
    import json

    from hypothesis import strategies as st

    from edgeqwen.errors import UsageError
    d = tmp_path_factory.mktemp("rows")
    fields = [(k, p) for k, row in GOOD_ROWS.items() for p in _paths(row) if p not in (("schema",), ("kind",))]
    wrong = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**1100), st.floats(allow_nan=False),
                      st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                            st.integers(), max_size=2),
                      st.just("DELETE"))

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
    @hypothesis.given(st.sampled_from(fields), wrong)
    def check(field, value):
        kind, path = field
        row = copy.deepcopy(GOOD_ROWS[kind])
        at = row
        for k in path[:-1]:
            at = at[k]
        if value == "DELETE":
            del at[path[-1]]
        else:
            at[path[-1]] = value
        f = d / "rows.jsonl"
        f.write_text(json.dumps(row) + "\n")
        try:
            _render_all(f)
        except UsageError as e:
            assert "rows.jsonl" in str(e) and "\n" not in str(e)
    check()


@pytest.mark.parametrize("name,content", [("tune.json", "[" * 100000 + "]" * 100000), ("verified.json", "[1, 2]"),
                                          ("verified.json", "[" * 100000 + "]" * 100000), ("tune.json", "\xff\xfe")])
def test_hostile_cache_files_are_ignored_with_a_warning(margin_builds, tmp_path, name, content):
    """Our caches (the tune winners, the verified builds) are written again when unreadable: a run goes on."""
    home = tmp_path / "home"
    home.mkdir()
    (home / name).write_bytes(content.encode("utf-8", "surrogateescape") if content != "\xff\xfe" else b"\xff\xfe")
    r = run_cli("run", margin_builds["q8_0"], "hi", "-n", "2", env={"EDGEQWEN_HOME": str(home)})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert name in r.stderr and "ignored" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_hostile_nested_json_anywhere_is_one_error(tmp_path):
    from edgeqwen.errors import SourceError
    from edgeqwen.schemas import read_cache, read_json
    p = tmp_path / "x.json"
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SourceError, match="nested too deeply"):
        read_json(p, "a file")
    assert read_cache(p, "a cache") == {}
