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

    # without color (a pipe) the reasoning ran into the answer with nothing between: now in R1's tags
    for color, want in ((True, f"{DIM}think{RESET}\n\nanswer\n"), (False, "<think>\nthink\n</think>\n\nanswer\n")):
        out = io.StringIO()
        printer = Printer(out, color=color)
        printer.write("reasoning", "think")
        printer.write("content", "answer")
        printer.end()
        assert out.getvalue() == want
    out = io.StringIO()
    printer = Printer(out, color=False)
    printer.write("reasoning", "cut off\n")  # an answer stopped while thinking
    printer.end()
    assert out.getvalue() == "<think>\ncut off\n</think>\n"


def test_old_turns_leave_early_enough_to_answer_and_the_user_is_told(model_dir, capsys):
    """Turns were dropped only once the prompt did not fit at all, so an answer got a few tokens of context, and
    nothing said that turns had left."""
    import types

    from nanoseek.chat import ChatSession
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    turn = [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "ok"}]
    messages = turn * 3 + [{"role": "user", "content": "and now?"}]
    limit = len(tok.apply_chat_template(messages)) + 10  # it fits, with 10 tokens left to answer in
    session = ChatSession(types.SimpleNamespace(tokenizer=tok, max_model_len=limit), 0.0, 1.0, max_tokens=2048)
    ids = session._prompt(messages)
    assert len(ids) + limit // 4 <= limit  # room kept: a quarter of the context (less than --max-tokens)
    assert messages[-1]["content"] == "and now?" and len(messages) < 7
    assert "oldest turn" in capsys.readouterr().out


def test_a_system_prompt_longer_than_the_context_is_refused_at_start(model_dir):
    cmd = verb_command("chat", "nanoseek.chat") + ["--model", str(model_dir), "--device", "cpu", "--no-compile",
                                                   "--max-model-len", "64", "--system", "word " * 100]
    r = subprocess.run(cmd, input="hi\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and "--system is longer than the context of 64 tokens" in r.stderr
