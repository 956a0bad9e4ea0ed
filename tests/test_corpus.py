"""Corpus: JSONL/Parquet reading, token shards, and the packed loader (determinism, resume, rank sharding)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from nanoseek.data.corpus import (
    PackedLoader, build_shards, read_meta, read_records, read_texts, render_messages, shard_dtype,
)
from nanoseek.tokenizer import SPECIAL_TOKENS, train_tokenizer


def documents(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta sum total each apples box then answer is".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + f" {rng.randint(0, 10**6)}"
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(documents(), vocab_size=320)


@pytest.fixture(scope="module")
def shard_dir(tok, tmp_path_factory):
    return build_shards(documents(), tok, tmp_path_factory.mktemp("c") / "data", shard_tokens=997, progress=False)


def stream(tok, texts) -> list[int]:
    out = []
    for text in texts:
        out += [tok.bos_id, *tok.encode(text), tok.eos_id]
    return out


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(batches_a, batches_b) -> bool:
    return all(torch.equal(x, y) for a, b in zip(batches_a, batches_b, strict=True) for x, y in zip(a, b))


# --- reading -------------------------------------------------------------------------------------------------------
def test_read_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [r["text"] for _, r in read_records(p)] == ["a", "b"]


def test_read_jsonl_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3"):
        list(read_records(p))
    p.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2.*object"):
        list(read_records(p))


def test_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="expected .jsonl"):
        read_records(tmp_path / "d.csv")


def test_read_texts(tmp_path, tok):
    p = tmp_path / "d.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nyo"}]
    p.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    rendered = list(read_texts([p], tokenizer=tok))[1]
    template = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    # before a tokenizer exists (training one), a chat is the text the template writes (was "user: hi" lines)
    assert list(read_texts(p)) == ["plain", template]
    assert template == SPECIAL_TOKENS["bos"] + rendered + SPECIAL_TOKENS["eos"] and rendered == render_messages(
        messages, tok)  # build_shards puts BOS and EOS around every document: once each
    ids = np.fromfile(next(build_shards([rendered], tok, tmp_path / "shards", progress=False).glob("*.bin")),
                      dtype=np.uint16).tolist()
    assert ids == tok.encode(template) and ids.count(tok.bos_id) == ids.count(tok.eos_id) == 1
    (tmp_path / "bad.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: the record has neither"):
        list(read_texts(tmp_path / "bad.jsonl"))
    # OpenAI's content parts, which the server takes, read as the string they join to (were refused)
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
             messages[1]]
    (tmp_path / "parts.jsonl").write_text(json.dumps({"messages": parts}) + "\n")
    joined = [{"role": "user", "content": "h\ni"}, messages[1]]
    assert list(read_texts(tmp_path / "parts.jsonl", tokenizer=tok)) == [render_messages(joined, tok)]
    from nanoseek.train.sft import read_conversations

    assert list(read_conversations([str(tmp_path / "parts.jsonl")])) == [joined]
    (tmp_path / "image.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}) + "\n")
    with pytest.raises(ValueError, match="image.jsonl:1: message 1 must be .*text parts"):
        list(read_texts(tmp_path / "image.jsonl"))


def test_a_json_array_says_lines_are_read(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"text": "a"}, {"text": "b"}]')
    with pytest.raises(ValueError, match=r"d.json:1: expected a JSON object, got list \(one JSON object a line"):
        list(read_texts(p))


def test_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "d.parquet")
    assert list(read_texts(tmp_path / "d.parquet")) == ["x", "y"]
    # a dataset's other columns (ids, URLs, the page's HTML) are not read: only those the caller names
    pq.write_table(pa.table({"id": [1, 2], "text": ["x", "y"], "html": ["<p>x</p>", "<p>y</p>"]}), tmp_path / "w.parquet")
    assert [r for _, r in read_records(tmp_path / "w.parquet", columns=("text", "messages"))] == [{"text": "x"},
                                                                                                   {"text": "y"}]
    assert list(read_texts(tmp_path / "w.parquet")) == ["x", "y"]
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="o.parquet: row 1: the record has neither"):  # still says what is missing
        list(read_texts(tmp_path / "o.parquet"))


def test_lone_surrogate_names_its_line(tmp_path):
    """Valid JSON, but no tokenizer can encode it: refused where it is read, in text and in messages alike."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok \\ud83d\\ude00 and a \\\\ud800 spelled out"}\n{"text": "hello \\ud800 world"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: .*lone surrogate \\ud800"):
        list(read_texts(p))
    p.write_text('{"messages": [{"role": "user", "content": "cut \\udfff"}]}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: .*lone surrogate \\udfff"):
        list(read_records(p))
    p.write_text('{"text": "ok \\ud83d\\ude00 and a \\\\ud800 spelled out"}\n')  # a pair, and an escaped backslash
    assert list(read_texts(p)) == ["ok \U0001f600 and a \\ud800 spelled out"]


def test_byte_order_mark_is_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8-sig")  # as Notepad and PowerShell 5 write
    assert list(read_texts(p)) == ["a", "b"]


def test_undecodable_lines_name_their_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 text"):
        list(read_records(p))
    p.write_text('{"text": "a"}\n{"text": ' + "[" * 50000 + "]" * 50000 + "}\n")  # valid JSON, too deep to parse
    with pytest.raises(ValueError, match=r"d\.jsonl:2: JSON nested too deeply"):
        list(read_records(p))


def test_a_directory_says_to_give_its_files(tmp_path):
    folder = tmp_path / "dataset.parquet"  # a Parquet dataset as Spark writes it
    folder.mkdir()
    for path in (folder, tmp_path):
        with pytest.raises(ValueError) as e:
            read_records(path)
        assert str(e.value).startswith(f"{path} is a directory; give the files in it (e.g. {path}/*.parquet")


def test_unreadable_parquet_names_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "notparquet.parquet").write_text('{"text": "a"}\n')
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name, says in (("notparquet", "magic bytes"), ("empty", "size is 0")):
        with pytest.raises(ValueError, match=rf"{name}\.parquet: cannot read as Parquet: .*{says}"):
            list(read_records(tmp_path / f"{name}.parquet"))
    raw = pa.array([b"ok", b"\xed\xa0\x80"])  # an encoded surrogate: not UTF-8, though the column says string
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 2, raw.buffers())}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: a string column is not UTF-8 text"):
        list(read_records(tmp_path / "bad.parquet"))


# --- shards --------------------------------------------------------------------------------------------------------
def test_shards_round_trip(tok, shard_dir):
    meta = read_meta(shard_dir)
    assert meta["dtype"] == "uint16" and meta["n_docs"] == 300 and meta["vocab_size"] == tok.vocab_size
    assert len(meta["shards"]) > 1 and all(s["tokens"] == 997 for s in meta["shards"][:-1])
    tokens = np.concatenate([np.fromfile(shard_dir / s["file"], dtype=meta["dtype"]) for s in meta["shards"]])
    assert tokens.tolist() == stream(tok, documents())
    assert meta["total_tokens"] == len(tokens)


def test_shards_reused_and_rebuilt(tok, tmp_path):
    out = build_shards(documents(50), tok, tmp_path / "data", progress=False)
    first = read_meta(out)
    mtime = (out / "meta.json").stat().st_mtime_ns

    class NoEncode:  # reuse must not tokenize anything
        def __getattr__(self, name):
            if name == "encode_batch":
                raise AssertionError("re-tokenized a matching cache")
            return getattr(tok, name)

    assert build_shards(documents(50), NoEncode(), out, progress=False) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    build_shards(iter(documents(50)), tok, out, progress=False)  # a one-shot iterator: same fingerprint, kept
    assert read_meta(out) == first and (out / "meta.json").stat().st_mtime_ns == mtime
    build_shards(documents(51), tok, out, progress=False)
    assert read_meta(out)["fingerprint"] != first["fingerprint"] and read_meta(out)["n_docs"] == 51
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary directories left behind


def test_killed_build_leaves_no_cache(tok, tmp_path):
    def texts():
        yield from documents(20)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_shards(texts(), tok, tmp_path / "data", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_shard_dtype():
    assert shard_dtype(65536) == np.uint16 and shard_dtype(129280) == np.uint32


# --- packed loader -------------------------------------------------------------------------------------------------
def test_batches(tok, shard_dir):
    loader = PackedLoader(shard_dir, batch_size=4, seq_len=16, seed=0)
    inputs, labels = loader.next_batch()
    assert inputs.shape == labels.shape == (4, 16) and inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    full = stream(tok, documents())
    for row, label in zip(inputs.tolist(), labels.tolist()):
        starts = [i for i in range(0, len(full) - 16, 16) if full[i: i + 16] == row]
        assert starts and full[starts[0] + 1: starts[0] + 17] == label


def test_epoch_covers_every_chunk_once(shard_dir):
    loader = PackedLoader(shard_dir, batch_size=8, seq_len=32, seed=3)
    rows = [tuple(r) for _ in range(loader.steps_per_epoch) for r in loader.next_batch()[0].tolist()]
    assert len(set(rows)) == len(rows) == loader.steps_per_epoch * 8
    assert loader.state_dict()["epoch"] == 0
    loader.next_batch()
    assert loader.state_dict()["epoch"] == 1


def test_deterministic(shard_dir):
    a = take(PackedLoader(shard_dir, batch_size=4, seq_len=16, seed=1), 5)
    b = take(PackedLoader(shard_dir, batch_size=4, seq_len=16, seed=1), 5)
    c = take(PackedLoader(shard_dir, batch_size=4, seq_len=16, seed=2), 5)
    assert same(a, b) and not same(a, c)


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_resume(shard_dir, where):
    reference = PackedLoader(shard_dir, batch_size=4, seq_len=32, seed=0)
    first = 3 if where == "mid_epoch" else reference.steps_per_epoch - 2  # the next 4 cross into epoch 1
    expected = take(reference, first + 4)[first:]
    loader = PackedLoader(shard_dir, batch_size=4, seq_len=32, seed=0)
    take(loader, first)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = PackedLoader(shard_dir, batch_size=4, seq_len=32, seed=0)
    resumed.load_state_dict(state)
    assert same(take(resumed, 4), expected)


def test_resume_rejects_other_layout(shard_dir):
    state = PackedLoader(shard_dir, batch_size=4, seq_len=32).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(shard_dir, batch_size=4, seq_len=16).load_state_dict(state)


def test_rank_sharding_union(shard_dir):
    world = 3
    single = PackedLoader(shard_dir, batch_size=2 * world, seq_len=16, seed=5)
    ranks = [PackedLoader(shard_dir, batch_size=2, seq_len=16, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(single.steps_per_epoch + 2):  # into the second epoch
        inputs, labels = single.next_batch()
        per_rank = [loader.next_batch() for loader in ranks]
        for r, (x, y) in enumerate(per_rank):
            assert torch.equal(x, inputs[r::world]) and torch.equal(y, labels[r::world])
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)


def test_a_step_sees_the_same_chunks_however_it_is_split(shard_dir):
    """A step of 8 chunks taken whole, as 2 micro-batches of 4, or by 2 ranks × 2 micro-batches of 2: the same chunks
    every step, also across epoch boundaries (an epoch ends before a step, never inside one). The corpus has 469
    chunks, 5 past the last whole step: a boundary decided per micro-batch would start the next epoch mid-step."""
    def steps(micro, world, n):
        loaders = [PackedLoader(shard_dir, batch_size=micro, seq_len=16, seed=7, rank=r, world_size=world,
                                step_chunks=8) for r in range(world)]
        out = []
        for _ in range(n):
            rows = [x for loader in loaders for _ in range(8 // (micro * world)) for x in loader.next_batch()[0]]
            out.append(sorted(tuple(x.tolist()) for x in rows))
        return out

    assert PackedLoader(shard_dir, batch_size=8, seq_len=16).n_chunks % 8 == 5
    n = 2 * PackedLoader(shard_dir, batch_size=8, seq_len=16).steps_per_epoch + 1  # into the third epoch
    whole = steps(8, 1, n)
    assert steps(4, 1, n) == whole and steps(2, 2, n) == whole and steps(1, 2, n) == whole
    with pytest.raises(ValueError, match="multiple"):
        PackedLoader(shard_dir, batch_size=3, seq_len=16, step_chunks=8)


def test_too_small(shard_dir):
    with pytest.raises(ValueError, match="global batch"):
        PackedLoader(shard_dir, batch_size=10_000, seq_len=64)
