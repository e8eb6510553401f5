"""The margin model (tests/margin.py) is what it promises on every engine, quant and kernel path here: greedy
decoding continues its cycles, and the chosen token leads the runner-up by at least margin.MARGIN logits."""
import pytest
from margin import MARGIN, STEER_TEXT

from edgeqwen.formats.load import load_runner

N = 24   # generated positions checked per prompt


def _margins(runner, prompt: list[int], cycles: dict) -> tuple[list[int], list[int], float]:
    """Greedy continuation of prompt by argmax of the runner's own logits (N tokens), and the least top-two gap."""
    import numpy as np
    succ = {int(k): v for k, v in cycles["successor"].items()}
    start = succ.get(prompt[-1], cycles["cycle"][0])
    want = [start]
    while len(want) < N:
        want.append(succ[want[-1]])
    rows = runner.logits(prompt + want[:-1])[len(prompt) - 1:]
    top2 = np.sort(rows, axis=1)[:, -2:]
    return [int(t) for t in rows.argmax(axis=1)], want, float((top2[:, 1] - top2[:, 0]).min())


def _check(runner, cycles):
    chat = runner.tokenize(runner.apply_chat_template([{"role": "user", "content": "Name three colours."}]))
    for prompt in (chat, runner.tokenize("Any text at all, then " + STEER_TEXT)):
        got, want, gap = _margins(runner, prompt, cycles)
        assert got == want and gap >= MARGIN, (got, want, gap)
        print(f"{runner.backend}: least top-two gap {gap:.2f} logits")


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m", "q4_0"])
def test_gguf_margins_on_both_kernel_paths(margin_builds, margin_cycles, margin_load, quant):
    r = load_runner(margin_builds[quant], logits=True, n_ctx=512, **margin_load["kw"])
    try:
        _check(r, margin_cycles)
    finally:
        r.close()


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_onnx_margins(margin_onnx, margin_cycles, quant):
    r = load_runner(margin_onnx[quant], n_ctx=512)
    try:
        _check(r, margin_cycles)
    finally:
        r.close()


def test_mlx_margins(margin_mlx, margin_cycles):
    r = load_runner(margin_mlx["mlx4"], n_ctx=512)
    try:
        _check(r, margin_cycles)
    finally:
        r.close()


def test_the_cycles_are_ordinary_text_and_control_characters(margin_cycles):
    text, control = margin_cycles["cycle_text"], margin_cycles["control_text"]
    assert text.isprintable() and len(text.split()) >= 5
    assert "\x05" in control and "\x0c" in control
