"""What the tests share that is not a fixture: the tiny model's shape and recipe, where ../shared is, and the two
ways to run the command: `run_cli` in a child process (exit codes, signals, crashes and native logs are real) and
`invoke` in this process through click's CliRunner (argument checks and light commands, without starting Python)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeqwen.runner import Response

REPO = Path(__file__).resolve().parent.parent
# EDGEQWEN_TEST_NO_SHARED=1 runs the suite as a fresh clone without ../shared beside it (what a new user has);
# .ci/run runs the tests whose fixtures depend on it that way too.
SHARED = REPO.parent / "shared" if not os.environ.get("EDGEQWEN_TEST_NO_SHARED") else REPO / ".no-shared"
REAL_TOKENIZER = SHARED / "fixtures" / "qwen2-tokenizer"

# Small, but with K-quant-friendly widths (multiples of 256) so quantized kernels, AMX included,
# take their real paths.
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)

TINY_RECIPE = """
name = "tiny-qwen2"
size = "tiny"
arch = "qwen2"
hub_repo = "edgeqwen-test/tiny-qwen2"
revision = "main"
context_length = 32768
tied_embeddings = true

[aliases]
q4 = "q4_k_m"
q8 = "q8_0"

[config]
hidden_size = 256
intermediate_size = 512
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 151936
max_position_embeddings = 32768
rope_theta = 1000000.0
rms_norm_eps = 1e-06
bos_token_id = 151643
eos_token_id = 151645
"""


def tiny_config(**over) -> dict:
    from edgeqwen.recipes import get_recipe
    cfg = get_recipe("0.5b").hf_config()
    cfg.update(TINY)
    cfg.update(over)
    return cfg


def tokenizer_dir():
    return REAL_TOKENIZER if REAL_TOKENIZER.exists() else None


def interrupted_build(module, monkeypatch, tiny_ckpt, out, quant) -> None:
    """A build whose step's progress bar (module: formats.steps) raises KeyboardInterrupt (Ctrl-C mid-write), through
    the real path."""
    import contextlib

    from edgeqwen.formats.build import BuildRequest, build
    from edgeqwen.recipes import get_recipe

    @contextlib.contextmanager
    def interrupting_bar(label, total, unit="B"):
        def upd(n):
            raise KeyboardInterrupt
        yield upd
    monkeypatch.setattr(module, "bar", interrupting_bar)
    with pytest.raises(KeyboardInterrupt):
        build(BuildRequest(recipe=get_recipe("tiny-qwen2"), quant=quant, source=tiny_ckpt, out=out), log=None)


def two_chat_turns(runner, greedy) -> tuple[list[int], list]:
    """A first turn, then a second whose prompt extends the first's answer: (the second prompt, its Responses),
    which must reuse the first turn's KV."""
    t1 = runner.tokenize(runner.apply_chat_template([{"role": "user", "content": "Hello there, how are you?"}]))
    first = list(runner.stream(t1, greedy))
    t2 = (t1 + [x.token for x in first if x.token is not None]
          + runner.tokenize("\n<|im_start|>user\nAnd you?<|im_end|>\n"))
    reused = list(runner.stream(t2, greedy))
    assert reused[-1].cached_tokens > len(t1) // 2
    return t2, reused


def run_cli(*args, input=None, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    """The real command in a child process (so crashes and exit codes are real)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgeqwen.cli", *map(str, args)], input=input,
                          capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)


def invoke(*args, input=None, env=None) -> subprocess.CompletedProcess:
    """The command in this process through click's CliRunner: the same group, error policy and exit codes as
    `run_cli`, without starting Python. For checks of arguments and light commands; a native abort here would take
    the test process with it, so loading and generating stay in `run_cli`. An exception that escaped the group
    (a traceback a user would see) comes back on stderr, as a child process would print it."""
    import traceback

    from click.testing import CliRunner

    from edgeqwen.cli import cli
    r = CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env, prog_name="edgeqwen")
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, err)


def needs_real_tokenizer():
    return pytest.mark.skipif(not REAL_TOKENIZER.exists(), reason="../shared/fixtures/qwen2-tokenizer is absent")


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


def cpu_hog():
    """A CPU hog: one core of busy loop, as another user's job would be."""
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def build_name(folder) -> str:
    """The model name a build is served and listed under (its manifest's)."""
    return json.loads((Path(folder) / "manifest.json").read_text())["name"]
