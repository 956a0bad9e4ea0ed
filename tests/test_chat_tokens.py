"""SFT's tokenized conversations on disk: what is read back is what was tokenized, a cache is reused exactly when its
key matches and is whole, and a bad record or a killed build leaves nothing half-built."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanoseek.data import chat_tokens
from nanoseek.tokenizer import train_tokenizer

CHATS = [[{"role": "user", "content": f"What is {a} × {b}?"},
          {"role": "assistant", "content": f"<think>\n{a} × {b} = {a * b}\n</think>\n\n{a * b}"}]
         for a in range(1, 9) for b in range(1, 6)]
PROMPT_ONLY = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([m["content"] for c in CHATS for m in c], vocab_size=300)


def test_what_is_read_back_is_what_was_tokenized(tok, tmp_path):
    chats = [*CHATS, PROMPT_ONLY]
    tokens = chat_tokens.build(iter(chats), tok, tmp_path / "c", "k")
    expected = [tok.chat_sample(c) for c in chats]
    assert len(tokens) == len(chats) and [tokens[i] for i in range(len(tokens))] == expected
    assert isinstance(tokens.ids, np.memmap) and tokens.ids.dtype == np.uint16 and tokens.mask.dtype == np.uint8
    assert tokens.lengths().tolist() == [len(ids) for ids, _ in expected]
    assert tokens.answers_at().tolist() == [m.index(1) if 1 in m else -1 for _, m in expected]
    assert tokens.answers_at()[-1] == -1 and (tokens.first_tokens() == tok.bos_id).all()
    keep = np.arange(len(chats)) % 3 == 0  # a subset keeps the order and the arrays
    assert [tokens.subset(keep)[i] for i in range(keep.sum())] == [e for e, k in zip(expected, keep) if k]
    assert tokens.subset(keep).subset(np.array([False, True] + [False] * (keep.sum() - 2)))[0] == expected[3]


def test_a_cache_is_reused_only_with_its_key_and_whole(tok, tmp_path):
    out = tmp_path / "c"
    chat_tokens.build(iter(CHATS), tok, out, "k")

    def never():
        raise AssertionError("tokenized again")
        yield

    assert len(chat_tokens.build(never(), tok, out, "k")) == len(CHATS)  # same key: not read again
    assert chat_tokens.load(out, "other") is None
    assert len(chat_tokens.build(iter(CHATS[:5]), tok, out, "other")) == 5  # another key: rebuilt in place
    with open(out / "mask.bin", "r+b") as f:  # a file cut short (a copy or a disk fault)
        f.truncate(3)
    assert chat_tokens.load(out, "other") is None
    assert len(chat_tokens.build(iter(CHATS[:7]), tok, out, "other")) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no build directories left behind


def test_a_bad_record_leaves_nothing_half_built(tok, tmp_path):
    def chats():
        yield from CHATS[:3]
        raise ValueError("data.jsonl:4: not valid JSON")

    with pytest.raises(ValueError, match="data.jsonl:4"):
        chat_tokens.build(chats(), tok, tmp_path / "c", "k")
    assert list(tmp_path.iterdir()) == []
    assert json.loads(json.dumps(chat_tokens.build(iter([]), tok, tmp_path / "c", "k").lengths().tolist())) == []


def test_the_key_follows_the_tokenizer_and_the_data(tok, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"messages": []}\n')
    b.write_text('{"messages": []}\n')
    key = chat_tokens.cache_key(tok, chat_tokens.file_bytes([a]))
    assert key == chat_tokens.cache_key(tok, chat_tokens.file_bytes([b]))  # the content counts, not the path
    assert key != chat_tokens.cache_key(tok, chat_tokens.file_bytes([a, b]))
    b.write_text('{"messages": [] }\n')
    assert key != chat_tokens.cache_key(tok, chat_tokens.file_bytes([b]))
    other = train_tokenizer(["another corpus, other merges"] * 20, vocab_size=300)
    assert key != chat_tokens.cache_key(other, chat_tokens.file_bytes([a]))
    tok.chat_template, template = tok.chat_template + " ", tok.chat_template
    try:
        assert key != chat_tokens.cache_key(tok, chat_tokens.file_bytes([a]))
    finally:
        tok.chat_template = template


def test_a_damaged_cache_is_rebuilt_never_trained_on(tok, tmp_path):
    """Files damaged in place (same size), a malformed meta.json, or the cache's own files without their meta.json
    (an interrupted copy): each is rebuilt from the conversations, not used and not refused."""
    out = tmp_path / "c"
    first = chat_tokens.build(iter(CHATS), tok, out, "k")
    expected = [first[i] for i in range(len(first))]
    del first
    ids = bytearray((out / "ids.bin").read_bytes())
    ids[:4] = bytes(4) if ids[:4] != bytes(4) else b"\x01\x00\x01\x00"
    (out / "ids.bin").write_bytes(ids)
    assert chat_tokens.load(out, "k") is None and chat_tokens.load(out) is not None  # only the key holder checks
    rebuilt = chat_tokens.build(iter(CHATS), tok, out, "k")
    assert [rebuilt[i] for i in range(len(rebuilt))] == expected
    for meta in ('{"version": 1, "dtype": "float99", "n": 1, "tokens": 1, "key": "k", "sha256": {}}', "[]", "{"):
        (out / "meta.json").write_text(meta)
        assert chat_tokens.load(out, "k") is None
        assert len(chat_tokens.build(iter(CHATS), tok, out, "k")) == len(CHATS)
    (out / "meta.json").unlink()
    assert len(chat_tokens.build(iter(CHATS), tok, out, "k")) == len(CHATS)
    (out / "meta.json").unlink()
    (out / "notes.txt").write_text("mine")  # someone else's file: refused, not replaced
    with pytest.raises(FileExistsError, match="not a token cache"):
        chat_tokens.build(iter(CHATS), tok, out, "k")


def test_a_build_left_under_this_processs_pid_is_stale(tok, tmp_path):
    """A killed build's folder is named with its pid; in a restarted container that pid (PID 1) is this process's,
    which has not made its own yet: the folder is removed, not kept forever."""
    import os

    left = tmp_path / f".c.tmp-{os.getpid()}-0123abcd"
    left.mkdir()
    chat_tokens.build(iter(CHATS[:2]), tok, tmp_path / "c", "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("content", ["<think>r</think>a", "\n<think>\nr\n</think>\na", "r\n</think>\n\na",
                                     "<think>\nr\n</think>\n\na"])
def test_reasoning_written_otherwise_is_trained_as_the_generation_prompt_starts_it(content):
    """Inference starts the answer at `<think>\\n`: a trace written `<think>r</think>a` or as a raw completion was
    trained as written, so the prompt's `<think>\\n` never appeared in training."""
    from nanoseek.data.corpus import inline_reasoning

    out = inline_reasoning([{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
    assert out[1]["content"] == "<think>\nr\n</think>\n\na"


def test_an_answer_that_mentions_the_closing_tag_is_not_cut_there():
    from nanoseek.data.corpus import inline_reasoning

    answer = {"role": "assistant", "content": "It writes the </think> tag, then the answer.", "reasoning_content": "r"}
    out = inline_reasoning([{"role": "user", "content": "q"}, answer])
    assert out[1]["content"] == "<think>\nr\n</think>\n\nIt writes the </think> tag, then the answer."


def test_a_template_whose_prompt_is_not_where_training_starts_is_named(tok, tmp_path, capsys, monkeypatch):
    """DeepSeek-R1's own template strips the reasoning of every assistant turn, the last too: SFT then trained the
    answer alone, after a prompt that inference never ends with. The build says so."""
    tokens = chat_tokens.build(iter(CHATS), tok, tmp_path / "ok", "k")
    assert len(tokens) == len(CHATS) and "generation prompt" not in capsys.readouterr().err
    real = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda m, **k: real(m, **k)[:-1] + [0])  # a prompt that differs
    chat_tokens.build(iter(CHATS), tok, tmp_path / "skew", "k")
    assert f"in {len(CHATS)} samples the chat template's generation prompt" in capsys.readouterr().err
