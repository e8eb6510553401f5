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
