"""The chat REPL through a real pseudo-terminal."""
import os
import re
import sys

import pytest

pexpect = pytest.importorskip("pexpect")


def _spawn(build, *args):
    return pexpect.spawn(sys.executable, ["-m", "edgeqwen.cli", "chat", str(build), *args],
                         env=dict(os.environ, TERM="dumb"), encoding="utf-8", timeout=120)


def test_chat_question_stats_reset_and_eof(tiny_builds):
    child = _spawn(tiny_builds["q4_0"], "--ctx", "1024", "-n", "24", "-t", "0", "--system", "Be brief.")
    try:
        child.expect(">>> ")
        child.sendline("Hello, who are you?")
        child.expect(r"tok/s · TTFT \d+ ms · RSS \d+ MiB")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"reply:\s+\d+ tokens")
        child.expect("peak RSS")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("history cleared")
        child.expect(">>> ")
    finally:
        _leave(child)


@pytest.mark.parametrize("fixture,build", [("tiny_builds", "q4_0"), ("onnx_builds", "int4")])
def test_ctrl_c_stops_two_long_replies_then_stats(request, fixture, build):
    """Each backend: Ctrl-C mid-reply returns to the prompt, says so, and the next turn works too."""
    child = _spawn(request.getfixturevalue(fixture)[build], "--ctx", "2048", "-n", "1500", "-t", "1.0",
                   "--seed", "1")
    try:
        child.expect(">>> ")
        for line in ("Write a very long essay.", "And now?"):
            child.sendline(line)
            child.expect(re.escape(line) + "\r\n")  # our line echoed
            child.expect(r"\S{3,}")  # streaming has started
            child.sendintr()
            child.expect("interrupted")
            child.expect(">>> ")
        child.sendline("/stats")
        child.expect("peak RSS")
        child.expect(">>> ")
    finally:
        _leave(child)


def _leave(child):
    """Ctrl-D at the prompt ends the REPL with exit status 0."""
    try:
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
