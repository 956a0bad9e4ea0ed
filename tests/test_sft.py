"""SFT: loss only on assistant tokens, the loss falls, and a stopped run resumes bit-identically."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from conftest import tiny_model_dir
from nanoseek.train.sft import ChatLoader, add_arguments, rows_per_epoch
from test_user_errors import run_cli

CONVS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                  {"role": "assistant", "content": f"<think>\n{a} + {b} = {a + b}\n</think>\n\nThe answer is {a + b}."}]}
    for a in range(12) for b in range(12)
]


def tokenized(convs, tok) -> list[tuple[list[int], list[int]]]:
    return [tok.chat_sample(c["messages"]) for c in convs]  # ChatLoader takes any sequence of (ids, mask)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    texts = [c["messages"][0]["content"] + " " + c["messages"][1]["content"] for c in CONVS]
    return tiny_model_dir(tmp_path_factory.mktemp("base"), texts, "chats.jsonl", CONVS)


def test_labels_cover_only_assistant_turns(base_dir):
    _, tok, _ = base_dir
    samples = tokenized(CONVS[:4], tok)
    loader = ChatLoader(samples, 4, 128, tok.eos_id)
    order = loader._order()
    inputs, labels, real = loader.next_batch()
    for row, (ids, mask) in enumerate(samples[i] for i in order):  # supervised exactly where the mask says, shifted by one
        expected = torch.tensor(ids[1:]).masked_fill(~torch.tensor(mask[1:], dtype=torch.bool), -100)
        assert torch.equal(labels[row, : len(ids) - 1], expected)
        assert real[row].sum() == len(ids) - 1 and real[row, : len(ids) - 1].all()  # the padding is marked
    text = tok.decode(labels[labels != -100].tolist())
    assert "What is" not in text and "<｜User｜>" not in text
    assert text.count("The answer is") == 4 and text.count("<｜end▁of▁sentence｜>") == 4


def test_packed_rows_compute_what_each_conversation_computes_alone(base_dir):
    d, tok, _ = base_dir
    samples = tokenized(CONVS[:40], tok)
    packed = ChatLoader(samples, 2, 128, tok.eos_id, pack=True)
    x, y, _ = packed.next_batch()
    k = packed.position  # the conversations those two rows hold, in the loader's order
    assert k >= 4 and x.shape[0] == 2  # several conversations per row
    padded_x, padded_y, _ = ChatLoader(samples, k, 128, tok.eos_id).next_batch()  # the same k, one per row
    assert (x == tok.eos_id).sum() < (padded_x == tok.eos_id).sum()  # less padding
    assert rows_per_epoch(samples, 128, pack=False) == 40 and rows_per_epoch(samples, 128, pack=True) <= 40 // 3
    model = nanoseek.load_model(d).eval()

    def summed_loss(inputs, labels):
        with torch.no_grad():
            logits = model(inputs, segments=(inputs == tok.bos_id).cumsum(1))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    assert (y != -100).sum() == (padded_y != -100).sum()  # the same supervised tokens
    assert torch.allclose(summed_loss(x, y), summed_loss(padded_x, padded_y), rtol=1e-5)


def run_sft(base, out, data, *extra):
    cmd = [sys.executable, "-m", "nanoseek", "sft", "--model", str(base), "--out", str(out), "--data", str(data),
           "--steps", "12", "--batch-size", "8", "--micro-batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
           "--no-progress", "--save-every", "6", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sft_loss_falls_and_resume_is_exact(base_dir, tmp_path):
    base, _, data = base_dir
    full = tmp_path / "full"
    run_sft(base, full, data)
    rows = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    part = tmp_path / "part"
    run_sft(base, part, data, "--stop-at", "6")
    built = (part / "chat_tokens" / "meta.json").stat().st_mtime_ns
    run_sft(base, part, data, "--resume")
    assert (part / "chat_tokens" / "meta.json").stat().st_mtime_ns == built  # the tokenized chats are reused
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(part / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (part / "model" / "tokenizer.json").is_file()


def test_a_teachers_forward_passes_count_in_the_cost(base_dir, tmp_path):
    """Logit distillation runs the teacher on every batch: its forward FLOPs are part of the step's."""
    from nanoseek.flops import flops_per_token
    from nanoseek.train.sft import SFTConfig, sft

    base, _, data = base_dir
    teacher = nanoseek.load_model(base).eval()
    common = dict(model=str(base), data=[str(data)], steps=2, batch_size=4, micro_batch_size=4, seq_len=64,
                  progress=False, device="cpu")
    alone = sft(SFTConfig(out=str(tmp_path / "a"), **common))["cost"]["flops"]
    taught = sft(SFTConfig(out=str(tmp_path / "b"), **common), teacher=teacher, kd_weight=0.5)["cost"]["flops"]
    cfg = teacher.config  # the same model as the student: per token, a forward against a training step
    share = flops_per_token(cfg, 64, training=False) / flops_per_token(cfg, 64, training=True, with_mtp=True)
    assert taught == pytest.approx(alone * (1 + share), rel=0.02)  # rows near 64 tokens; was alone
    # the KD term is logged on its own (it was summed into aux_loss with the balance loss)
    a, b = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b"))
    assert "kd_loss" not in a[0] and b[0]["aux_loss"] == a[0]["aux_loss"]
    assert b[0]["kd_loss"] == 0 < b[1]["kd_loss"]  # the teacher is the student's start: apart after one step


def test_gradients_reach_the_optimiser_clipped_to_clip(base_dir, tmp_path, monkeypatch):
    import nanoseek.train.loop as loop
    from nanoseek.train.sft import SFTConfig, sft

    base, _, data = base_dir
    norms, make = [], loop.make_optimizer

    def spied(model, *a, **kw):
        opt = make(model, *a, **kw)
        step = opt.step

        def step_and_record(*sa, **skw):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                               if p.grad is not None])).item())
            return step(*sa, **skw)

        opt.step = step_and_record
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spied)
    sft(SFTConfig(out=str(tmp_path / "s"), model=str(base), data=[str(data)], steps=2, batch_size=4,
                  micro_batch_size=4, seq_len=64, clip=0.05, progress=False, device="cpu"))
    logged = [json.loads(line)["grad_norm"] for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert min(logged) > 0.05 and norms == pytest.approx([0.05, 0.05], rel=1e-4)  # the log shows the norm before


def test_a_resume_refuses_edited_data(base_dir, tmp_path):
    """The --data file changed since the run started: resuming would silently train on other conversations."""
    base, _, data = base_dir
    edited = tmp_path / "chats.jsonl"
    edited.write_text(data.read_text())
    run_sft(base, tmp_path / "run", edited, "--stop-at", "6")
    edited.write_text(data.read_text().replace("The answer is", "So it is"))
    r = subprocess.run([sys.executable, "-m", "nanoseek", "sft", "--out", str(tmp_path / "run"), "--resume",
                        "--data", str(edited), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and "not what the run was trained on" in r.stderr and "Traceback" not in r.stderr


def test_bad_data_is_one_line(base_dir, tmp_path):
    base, _, _ = base_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no messages"}\n')
    r = subprocess.run([sys.executable, "-m", "nanoseek", "sft", "--model", str(base), "--out", str(tmp_path / "o"),
                        "--data", str(bad), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and "messages" in r.stderr and "Traceback" not in r.stderr


def test_prompt_only_conversations_are_reported(base_dir, tmp_path, capsys):
    base, _, _ = base_dir
    data = tmp_path / "chats.jsonl"
    prompt_only = {"messages": [{"role": "user", "content": "What is 1 + 1?"}]}
    cut_off = {"messages": [{"role": "user", "content": "What is 1 + 1?"},  # an API reply cut at its token limit
                            {"role": "assistant", "content": "<think>\n1 + 1 is"}]}
    tag = {"messages": [{"role": "user", "content": "Which tag opens R1's reasoning?"},
                        {"role": "assistant", "content": "It is `<think>`."}]}  # an answer that names the tag: kept
    data.write_text("".join(json.dumps(c) + "\n" for c in [prompt_only] * 5 + [cut_off] * 2 + [tag] + CONVS[:10]))
    code, err = run_cli(capsys, "sft", "--model", base, "--out", tmp_path / "o", "--data", data, "--steps", 1,
                        "--batch-size", 2, "--seq-len", 64, "--no-progress")
    assert code == 0 and "sft: 5 of 16 training samples have no assistant turn and are left out" in err
    assert "sft: 2 assistant turns open <think> and never close it" in err  # (trained on, they taught stopping)


def test_data_files_add_up_and_bad_ones_are_one_line(base_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--out", "o", "--data", "a.jsonl", "--data", "b.jsonl"]).data == \
        ["a.jsonl", "b.jsonl"]
    base, _, data = base_dir
    code, err = run_cli(capsys, "sft", "--model", base, "--out", tmp_path / "o", "--data")
    assert code == 2 and "--data" in err and not (tmp_path / "o").exists()  # not the task suite in its place
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps(CONVS[0]) + '\n{"messages": [{"role": "user", "content": "cut \\ud83d"}]}\n')
    code, err = run_cli(capsys, "sft", "--model", base, "--out", tmp_path / "o", "--data", data, "--data", cut,
                        "--no-progress")
    assert code == 1 and err == f"error: {cut}:2: text is not valid Unicode (lone surrogate \\ud83d); fix or " \
                                "remove that record\n"


def test_loss_is_the_mean_over_the_steps_tokens_however_the_batch_is_split(base_dir, tmp_path):
    """Short and long answers in one batch: with micro-batches of 1 row, each row's mean loss weighs by its share of
    the step's supervised tokens (not 1/accum), so step 1's loss and gradient are those of the whole batch at once.
    The start model is trained a little first, so that its loss differs between short and long answers."""
    base, _, data = base_dir
    run_sft(base, tmp_path / "start", data)
    long = "<think>\n" + "\n".join(f"{a} + {a} = {2 * a}" for a in range(1, 9)) + "\n</think>\n\nThe answer is 16."
    convs = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                           {"role": "assistant", "content": long if (a + b) % 2 else f"The answer is {a + b}."}]}
             for a in range(6) for b in range(6)]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(c) + "\n" for c in convs))
    first = {}
    for micro in ("4", "1"):
        out = tmp_path / f"m{micro}"
        cmd = [sys.executable, "-m", "nanoseek", "sft", "--model", str(tmp_path / "start" / "model"), "--out", str(out),
               "--data", str(mixed), "--steps", "1", "--batch-size", "4", "--micro-batch-size", micro,
               "--seq-len", "64", "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        first[micro] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["4"]["loss"] == pytest.approx(first["1"]["loss"], abs=2e-5)
    assert first["4"]["grad_norm"] == pytest.approx(first["1"]["grad_norm"], rel=1e-3)
    assert first["4"]["aux_loss"] == pytest.approx(first["1"]["aux_loss"], rel=1e-5)  # a mean over sequences too



def test_the_router_counts_the_same_tokens_however_the_batch_is_split(base_dir):
    """An input is real (counted in the router's loads and balance loss) if a token follows it. A row's eos was an
    input, counted, in rows shorter than the longest of their micro-batch only: the loads depended on the split."""
    _, tok, _ = base_dir
    convs = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                           {"role": "assistant", "content": f"The answer is {2 * a}." + " Yes." * a}]}
             for a in range(4)]
    samples = tokenized(convs, tok)
    assert len({len(x) for x, _ in samples}) == 4  # rows of different lengths
    loader = ChatLoader(samples, 4, 128, tok.eos_id)
    lengths = [len(samples[i][0]) for i in loader._order()]  # (the epoch's order, before reading moves past it)
    whole = loader.next_batch()[2]
    one = ChatLoader(samples, 1, 128, tok.eos_id)  # the same order, a row at a time
    split = [one.next_batch()[2] for _ in range(4)]
    assert whole.sum(1).tolist() == [s.sum().item() for s in split] == [n - 1 for n in lengths]


def test_rows_longer_than_the_models_context_are_refused(base_dir, tmp_path, capsys):
    base, _, _ = base_dir
    context = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    code, err = run_cli(capsys, "sft", "--model", base, "--out", tmp_path / "o", "--steps", 1, "--batch-size", 2,
                        "--seq-len", context + 1, "--no-progress")
    assert code == 1 and f"--seq-len {context + 1} is longer than the model's context ({context} tokens)" in err


def test_conversations_cut_by_seq_len_are_reported(base_dir, tmp_path, capsys):
    base, tok, data = base_dir
    lengths = [len(tok.chat_sample(c["messages"])[0]) for c in CONVS]  # 31 to 33 tokens
    cut = sum(n > 31 for n in lengths)  # a row of --seq-len 30 keeps 31 tokens
    assert 0 < cut < len(lengths)
    code, err = run_cli(capsys, "sft", "--model", base, "--out", tmp_path / "o", "--data", data, "--steps", 1,
                        "--batch-size", 2, "--seq-len", 30, "--no-progress")
    assert code == 0 and f"sft: {cut} of {len(lengths)} conversations are longer than --seq-len 30" in err


def test_reasoning_in_its_own_field_is_trained_as_r1_writes_it(base_dir, tmp_path):
    """DeepSeek's API returns the reasoning in `reasoning_content` (vLLM: `reasoning`); saved as it came, SFT trained on
    the answer alone."""
    from nanoseek.train.sft import read_conversations

    _, tok, _ = base_dir
    inline = CONVS[5]
    reasoning, answer = inline["messages"][1]["content"].removeprefix("<think>\n").split("\n</think>\n\n")
    for field in ("reasoning_content", "reasoning"):
        split = {"messages": [inline["messages"][0], {"role": "assistant", "content": answer, field: reasoning}]}
        data = tmp_path / f"{field}.jsonl"
        data.write_text(json.dumps(split) + "\n")
        assert [tok.chat_sample(m) for m in read_conversations([str(data)])] == [tok.chat_sample(inline["messages"])]


def test_data_from_a_pipe_is_read_once(base_dir, tmp_path):
    """`--data <(zcat chats.jsonl.gz)`: a pipe can be read once, so it is tokenized without first being hashed for
    the cache (which read it to the end and left SFT waiting forever on the second open)."""
    import os
    import threading

    base, _, data = base_dir
    fifo = tmp_path / "chats.jsonl"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(data.read_text()), daemon=True)
    writer.start()
    r = subprocess.run([sys.executable, "-m", "nanoseek", "sft", "--model", str(base), "--out", str(tmp_path / "run"),
                        "--data", str(fifo), "--steps", "1", "--batch-size", "2", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "chat_tokens" / "meta.json").read_text())["n"] == len(CONVS)


def test_every_turn_of_a_multi_turn_chat_is_trained_as_generated(base_dir, tmp_path):
    """A chat with reasoning in two assistant turns: the template renders the earlier one without its reasoning
    (history), so SFT trains each turn in a sample that ends with it, reasoning and all; a turn without reasoning is
    trained after an empty <think></think>, as the generation prompt (which prefills <think>) makes the model write."""
    from nanoseek.train.sft import read_conversations

    _, tok, _ = base_dir
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5"},
            {"role": "user", "content": "And times 4?"},
            {"role": "assistant", "content": "20", "reasoning_content": "5 × 4 = 20"},
            {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    data = tmp_path / "multi.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n")
    samples = list(read_conversations([str(data)]))
    assert [len(s) for s in samples] == [3, 5, 7]
    eos = "<｜end▁of▁sentence｜>"
    trained = [tok.decode([i for i, m in zip(*tok.chat_sample(s)) if m]) for s in samples]
    assert trained == [f"<think>\n2 + 3 = 5\n</think>\n\n5{eos}", f"<think>\n5 × 4 = 20\n</think>\n\n20{eos}",
                       f"<think>\n\n</think>\n\nYou are welcome.{eos}"]


def test_the_cost_counts_real_tokens_not_padding(base_dir, tmp_path, monkeypatch):
    """Rows padded to the longest of their batch: the padding is computed but is neither tokens nor model FLOPs (it
    was 25% of an audit's FLOPs). With one FLOP per token, one epoch's FLOPs are its conversations' inputs."""
    import nanoseek.train.loop as loop
    from nanoseek.train.sft import SFTConfig, sft

    base, tok, _ = base_dir
    convs = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                           {"role": "assistant", "content": f"The answer is {2 * a}." + " Yes." * a}]} for a in range(8)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    monkeypatch.setattr(loop, "flops_per_token", lambda *a, **k: 1.0)
    cost = sft(SFTConfig(model=str(base), out=str(tmp_path / "run"), data=[str(data)], steps=2, batch_size=4,
                         micro_batch_size=4, seq_len=128, document_mask=False, progress=False, device="cpu"))["cost"]
    assert cost["flops"] == sum(len(x) - 1 for x, _ in tokenized(convs, tok))
