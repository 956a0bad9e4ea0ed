"""`nanoseek chat`: the terminal chat over test_serve.py's tiny random model (it never ends an answer by itself), and
how its printer shows reasoning."""

from __future__ import annotations

import io
import os
import subprocess

import pytest

from test_serve import ROOT, build_model_dir, verb_command  # helpers, not tests


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("tiny-r1"))


def test_terminal_chat(model_dir):
    cmd = verb_command("chat", "nanoseek.chat") + ["--model", str(model_dir), "--max-tokens", "12", "--device", "cpu",
                                                   "--no-compile"]
    r = subprocess.run(cmd, input="hi\n/clear\nhello again\n/exit\n", capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout  # a pipe gets no styling escapes
    assert "cleared" in r.stdout.lower()
    assert "(cut off at 12 tokens: --max-tokens)" in r.stdout  # the tiny random model never ends on its own
    eof = subprocess.run(cmd, input="hi\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert eof.returncode == 0, eof.stderr  # EOF quits cleanly too


def test_chat_printer_dims_reasoning_on_a_terminal():
    from nanoseek.chat import DIM, RESET, Printer

    for color, want in ((True, f"{DIM}think{RESET}\n\nanswer\n"), (False, "think\n\nanswer\n")):
        out = io.StringIO()
        printer = Printer(out, color=color)
        printer.write("reasoning", "think")
        printer.write("content", "answer")
        printer.end()
        assert out.getvalue() == want
