"""`nanoseek chat`: the terminal chat over test_serve.py's tiny random model (it never ends an answer by itself), and
how its printer shows reasoning."""

from __future__ import annotations

import io
import os
import subprocess
import sys

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


def test_a_thinking_budget_never_cuts_a_character():
    """A budget that ran out inside a multi-byte character closed the reasoning there: it ended in U+FFFD and the
    model went on from invalid bytes. </think> now waits for the character to end."""
    from test_serve import tiny_texts

    from nanoseek.serve.reasoning import SectionTracker
    from nanoseek.serve.runtime import Job
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(tiny_texts(), vocab_size=400)
    ids = tok.encode("思a思")
    assert len(ids) == 7 and tok.decode(ids[:1]).endswith("\ufffd")  # a byte a token: the tokenizer never saw 思
    for budget, forced_after in ((1, 3), (2, 3), (3, 3), (4, 4), (5, 7)):
        tracker = SectionTracker(tok.think_id, tok.end_think_id, in_reasoning=True, tokenizer=tok)
        job = Job([], None, None, budget=budget, tracker=tracker)
        over = []
        for t in ids:
            tracker.feed(t)
            over.append(job.over_budget())
        assert over.index(True) + 1 == forced_after, budget
        assert not tok.decode(ids[:forced_after]).endswith("\ufffd")
    written = tok.encode("\ufffd中")  # a U+FFFD the model wrote, then a character: whole after the 6th byte
    tracker = SectionTracker(tok.think_id, tok.end_think_id, in_reasoning=True, tokenizer=tok)
    job = Job([], None, None, budget=4, tracker=tracker)
    assert len(written) == 6 and [tracker.feed(t) and job.over_budget() for t in written].index(True) == 5
    invalid = [ids[1]] * 4  # continuation bytes that start no character: waiting would never end
    tracker = SectionTracker(tok.think_id, tok.end_think_id, in_reasoning=True, tokenizer=tok)
    job = Job([], None, None, budget=1, tracker=tracker)
    assert [tracker.feed(t) and job.over_budget() for t in invalid] == [False, False, False, True]


def test_chat_survives_a_line_that_is_not_utf8_and_a_terminal_that_is_ascii(model_dir):
    cmd = verb_command("chat", "nanoseek.chat") + ["--model", str(model_dir), "--max-tokens", "4", "--device", "cpu",
                                                   "--no-compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}  # a strict UTF-8 locale
    r = subprocess.run(cmd, input=b"caf\xe9 \xff\nhi\n/exit\n", capture_output=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr  # was a UnicodeDecodeError traceback, the conversation lost
    assert b"not UTF-8 text" in r.stdout and r.stdout.count(b"(cut off at 4 tokens") == 1
    show = "from nanoseek.chat import terminal_text; terminal_text(); print('\u601d ok')"
    r = subprocess.run([sys.executable, "-c", show], capture_output=True, cwd=ROOT,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert (r.returncode, r.stdout) == (0, b"? ok\n"), r.stderr  # was a UnicodeEncodeError


def test_chat_printer_drops_c1_controls():
    from nanoseek.chat import Printer

    out = io.StringIO()
    Printer(out, color=False).write("content", "a\x9b2Jb\x9d0;title\x07c\u00e9")
    assert out.getvalue() == "a2Jb0;titlecé"
