"""Tokenizer: BPE training, special tokens, the R1 chat template, and parity with transformers' AutoTokenizer."""

from __future__ import annotations

import argparse
import json
import random
import re
import sys

import pytest

from nanoseek.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, TokenizerError, render_chat, train_tokenizer

WORDS = "the a cat dog sat ran on mat sum of and is total apples each box how many step first then answer".split()


def synthetic_texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        if i % 3 == 0:
            texts.append(f"{SPECIAL_TOKENS['user']}What is {a} + {b}?{SPECIAL_TOKENS['assistant']}<think>\n"
                         f"{words}, {a} plus {b}\n</think>\n\n{a + b}{SPECIAL_TOKENS['eos']}")
        else:
            texts.append(f"{words.capitalize()}. Then {a} and {b} make {a + b}. Ünïcödé ✓ 日本")
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(synthetic_texts(), vocab_size=400)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return AutoTokenizer.from_pretrained(d)


SYSTEM = {"role": "system", "content": "You are concise."}
Q1 = {"role": "user", "content": "What is 12 + 30?"}
A1 = {"role": "assistant", "content": "<think>\nadd the tens: 12 plus 30\n</think>\n\n42"}
Q2 = {"role": "user", "content": "And 7 × 6?"}
A2 = {"role": "assistant", "content": "<think>\nseven sixes\n</think>\n\n42 again"}
CHATS = {
    "single": [Q1],
    "system": [SYSTEM, Q1],
    "multi": [SYSTEM, Q1, A1, Q2],
    "multi_answered": [Q1, A1, Q2, A2],
    "no_reasoning": [Q1, {"role": "assistant", "content": "42"}, Q2],
}


def hf_ids(hf, messages, **kw):
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


# --- vocabulary ----------------------------------------------------------------------------------------------------
def test_vocab_and_ids(tok):
    assert tok.vocab_size <= 400
    assert [tok.bos_id, tok.eos_id, tok.think_id, tok.end_think_id] == [0, 1, 4, 5]
    assert tok.pad_id == tok.eos_id


def test_digits_are_single_tokens(tok):
    for text in ["12345", "x = 9876543210", "3.14159"]:
        for token_id in tok.encode(text):
            piece = tok.decode([token_id])
            assert not (any(c.isdigit() for c in piece) and len(piece.strip()) > 1), (text, piece)
    assert len(tok.encode("0123456789")) == 10


def test_special_tokens_are_single_ids(tok):
    for name, s in SPECIAL_TOKENS.items():
        ids = tok.encode(s)
        assert len(ids) == 1, name
        assert tok.decode(ids) == s
    ids = tok.encode("<think>\nhmm\n</think>\n\n7")
    assert ids[0] == tok.think_id and tok.end_think_id in ids
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id


def test_round_trip(tok):
    user, asst, eos = SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"], SPECIAL_TOKENS["eos"]
    for text in ["Hello world", "  leading and trailing  \n\n", "Ünïcödé ✓ 日本語 🙂", "tabs\tand\r\nnewlines",
                 f"{user}hi{asst}<think>\nx\n</think>\n\ny{eos}"]:
        assert tok.decode(tok.encode(text)) == text


def test_long_texts_tokenize_the_same(tok):
    """Past LONG_TEXT characters `encode` goes through encode_batch (which releases the GIL): the same ids."""
    from nanoseek.tokenizer import LONG_TEXT

    text = ("Ünïcödé 12 + 7 = 19 🙂\n" * (LONG_TEXT // 10))[:LONG_TEXT + 5]
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + tok.hf.encode(text, add_special_tokens=False).ids
    assert tok.longest_token >= max(len(s) for s in SPECIAL_TOKENS.values())


def test_skip_special_tokens_keeps_reasoning_tags(tok):
    ids = tok.encode(f"{SPECIAL_TOKENS['bos']}<think>\nr\n</think>\n\nanswer{SPECIAL_TOKENS['eos']}")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nr\n</think>\n\nanswer"


def test_vocab_size_too_small():
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], vocab_size=100)


# --- chat template -------------------------------------------------------------------------------------------------
def test_template_text(tok):
    bos, eos, user, asst = (SPECIAL_TOKENS[k] for k in ("bos", "eos", "user", "assistant"))
    text = tok.apply_chat_template(CHATS["multi"], tokenize=False)
    assert text == f"{bos}You are concise.{user}What is 12 + 30?{asst}42{eos}{user}And 7 × 6?{asst}<think>\n"
    assert tok.apply_chat_template(CHATS["multi"], thinking=False, tokenize=False).endswith(f"{user}And 7 × 6?{asst}")
    assert tok.apply_chat_template([Q1], add_generation_prompt=False, tokenize=False) == f"{bos}{user}What is 12 + 30?"


def test_old_reasoning_stripped_last_kept(tok):
    text = tok.apply_chat_template(CHATS["multi_answered"], add_generation_prompt=False, tokenize=False)
    assert "add the tens" not in text
    asst, eos = SPECIAL_TOKENS["assistant"], SPECIAL_TOKENS["eos"]
    assert text.endswith(f"{asst}<think>\nseven sixes\n</think>\n\n42 again{eos}")


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_parity(tok, hf_tok, name, add_generation_prompt):
    messages = CHATS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert hf_ids(hf_tok, messages, add_generation_prompt=add_generation_prompt) == ours
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False) == \
        tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert hf_ids(hf_tok, messages, add_generation_prompt=True, thinking=False) == \
        tok.apply_chat_template(messages, thinking=False)
    assert hf_tok.decode(ours) == tok.decode(ours)


def test_transformers_encode_parity(tok, hf_tok):
    for text in synthetic_texts(20, seed=1):
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.bos_token == SPECIAL_TOKENS["bos"] and hf_tok.eos_token == SPECIAL_TOKENS["eos"]
    assert hf_tok.pad_token_id == tok.pad_id


# --- SFT samples ---------------------------------------------------------------------------------------------------
def test_chat_sample_mask(tok, hf_tok):
    messages = [SYSTEM] + CHATS["multi_answered"]
    ids, mask = tok.chat_sample(messages)
    assert ids == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    eos = SPECIAL_TOKENS["eos"]
    assert trained == f"<think>\nseven sixes\n</think>\n\n42 again{eos}"  # the last turn: the earlier one is
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])  # history, without its reasoning (not as generated)
    assert SPECIAL_TOKENS["assistant"] in prompt and f"42{eos}" in prompt and "again" not in prompt
    plain = tok.chat_sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert tok.decode([i for i, m in zip(*plain) if m]) == f"<think>\n\n</think>\n\nhello{eos}"  # as generated
    r = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(r["assistant_masks"]) == mask


def test_chat_sample_without_generation_blocks(tok):
    """Another model's template: each assistant message's whole turn (what it adds to the render) is trained on."""
    bos, eos, user, asst = (SPECIAL_TOKENS[k] for k in ("bos", "eos", "user", "assistant"))
    plain = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + user + "{{ m['content'] }}"
             "{% else %}" + asst + "{{ m['content'] }}" + eos + "{% endif %}{% endfor %}")
    other = Tokenizer(tok.hf, chat_template=plain)
    messages = CHATS["multi_answered"]
    ids, mask = other.chat_sample(messages)
    assert ids == other.apply_chat_template(messages, add_generation_prompt=False)
    trained = other.decode([i for i, m in zip(ids, mask) if m])
    assert trained == f"{asst}{A1['content']}{eos}{asst}{A2['content']}{eos}"
    with pytest.raises(TokenizerError, match="generation"):  # R1's stripping without markers: no consistent prefixes
        Tokenizer(tok.hf, chat_template=CHAT_TEMPLATE.replace("{%- generation %}", "").replace(
            "{% endgeneration %}", "")).chat_sample(messages)


def test_thinking_switches_as_transformers_and_vllm_pass_them(tok, hf_tok):
    """`enable_thinking` (Qwen-style clients) turned the server's prefill off but not the template's, so vLLM kept
    it; and a directory whose template defaults to not thinking (DeepSeek-V3.1's) was forced to think."""
    assert hf_ids(hf_tok, [Q1], add_generation_prompt=True, enable_thinking=False) == \
        tok.apply_chat_template([Q1], thinking=False)
    v31 = "{{ bos_token }}{% if thinking is not defined %}{% set thinking = false %}{% endif %}" \
          "{{ messages[0]['content'] }}<｜Assistant｜>{{ '<think>' if thinking else '</think>' }}"
    other = Tokenizer(tok.hf, chat_template=v31)
    assert other.apply_chat_template([Q1], tokenize=False).endswith("</think>")
    assert other.apply_chat_template([Q1], thinking=True, tokenize=False).endswith("<think>")


def test_reasoning_in_a_field_is_rendered_as_transformers_renders_it(tok, hf_tok):
    """SFT trained a final turn's `reasoning_content` (inlined before rendering) that the template ignored, so
    transformers (TRL, any other trainer) rendered the same record with an empty think block."""
    messages = [Q1, {"role": "assistant", "content": "42", "reasoning_content": " 12 plus 30 "}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text.endswith("<think>\n12 plus 30\n</think>\n\n42" + SPECIAL_TOKENS["eos"])
    assert hf_ids(hf_tok, messages) == tok.chat_sample(messages)[0]
    history = tok.apply_chat_template(messages + [Q2], tokenize=False)
    assert "12 plus 30" not in history  # an earlier turn's reasoning is not fed back


def test_the_prefill_is_tokenized_as_generation_sees_it():
    """With a merged "\\n\\n" token, SFT trained `<think>` `\\n\\n` `</think>` where generation starts from
    `<think>` `\\n`: a context the model never saw in training."""
    chats = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]
             for i in range(300)]
    merged = train_tokenizer([render_chat(c) for c in chats], vocab_size=300)
    assert len(merged.encode("\n\n")) == 1
    for chat in chats[:20]:
        ids, mask = merged.chat_sample(chat)
        prompt = merged.apply_chat_template(chat[:1])
        assert ids[: len(prompt)] == prompt and merged.decode(ids[len(prompt):]).startswith("\n</think>")


def test_another_templates_sample_is_cut_only_where_its_prompt_ends():
    """Cutting at each trained span's edge too split " assistant" into pieces generation never produces."""
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}" \
            "{% if add_generation_prompt %}assistant:{% endif %}"
    tok = Tokenizer(train_tokenizer([f"user: what is {i} plus {i}? assistant: it is {2 * i}. " for i in range(400)],
                                    vocab_size=400).hf, chat_template=plain)
    chat = [{"role": "user", "content": "what is 3 plus 3?"}, {"role": "assistant", "content": "it is 6."}]
    ids, mask = tok.chat_sample(chat)
    assert ids == tok.apply_chat_template(chat, add_generation_prompt=False)  # no merge across "assistant:" | " it"
    assert ids[: len(tok.apply_chat_template(chat[:1]))] == tok.apply_chat_template(chat[:1])


def test_a_chat_may_hold_any_character(tok):
    """U+F0000 and U+F0001 (Nerd Font icons in pasted terminal text) marked the trained spans, so such chats were
    refused."""
    ids, mask = tok.chat_sample([{"role": "user", "content": "icon \U000f0000 here"},
                                 {"role": "assistant", "content": "ok \U000f0001"}])
    assert tok.decode([i for i, m in zip(ids, mask) if m]).endswith("ok \U000f0001" + SPECIAL_TOKENS["eos"])


# --- directories ---------------------------------------------------------------------------------------------------
def test_a_run_directory_given_for_a_model_says_where_the_model_is(tok, tmp_path):
    tok.save(tmp_path / "run" / "model")
    with pytest.raises(TokenizerError, match="a run directory's model is .*run/model"):
        Tokenizer.from_dir(tmp_path / "run")
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_save_and_from_dir(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is True
    assert config["chat_template"] == CHAT_TEMPLATE
    again = Tokenizer.from_dir(tmp_path)
    assert again.vocab_size == tok.vocab_size and again.bos_id == tok.bos_id
    assert again.apply_chat_template(CHATS["multi"]) == tok.apply_chat_template(CHATS["multi"])


def test_transformers_puts_bos_before_raw_text_as_our_engine_does(tok, hf_tok):
    """A raw prompt is BOS + text in `nanoseek generate` and /v1/completions; transformers' `tok(text)` (and vLLM's
    completions) must read it the same, or a model answers another prompt there (it had no BOS)."""
    text = "Question: What is 7 plus 5?"
    assert hf_tok(text).input_ids == tok.encode(text, add_bos=tok.needs_bos(text)) == [tok.bos_id, *tok.encode(text)]
    messages = CHATS["multi"]  # a chat template writes its own BOS: still one
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        tok.apply_chat_template(messages)


def test_a_save_cut_short_leaves_no_tokenizer_json(tok, tmp_path, monkeypatch):
    """tokenizer.json is what says a directory holds a tokenizer, so it is written last: killed after it and before
    tokenizer_config.json, a directory that transformers reads without BOS, EOS or chat template was refused by the
    rerun as a finished tokenizer (found by a kill audit)."""
    import nanoseek.atomic

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nanoseek.atomic, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        tok.save(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()


def test_from_dir_uses_the_directorys_own_template(tok, hf_tok, tmp_path):
    custom = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    hf_tok.chat_template = custom
    try:
        hf_tok.save_pretrained(tmp_path)  # transformers' own layout (template may land in chat_template.jinja)
    finally:
        hf_tok.chat_template = CHAT_TEMPLATE
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([Q1], tokenize=False) == f"{SPECIAL_TOKENS['bos']}[user]What is 12 + 30?"


def test_from_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_dir_bad_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# --- CLI -----------------------------------------------------------------------------------------------------------
def cli_args(*argv):
    from nanoseek import tokenizer

    parser = argparse.ArgumentParser()
    tokenizer.add_arguments(parser)
    return tokenizer, parser.parse_args(list(argv))


def test_cli_train(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": t}) for t in synthetic_texts(200)]
    lines.append(json.dumps({"messages": [Q1, A1]}))
    data.write_text("\n".join(lines) + "\n")
    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--data", str(data), "--vocab-size", "300")
    assert module.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["out"] == str(tmp_path / "tok") and result["vocab_size"] <= 300
    assert Tokenizer.from_dir(tmp_path / "tok").think_id is not None


def test_cli_train_on_task_suite(tmp_path, monkeypatch, capsys):
    """Without --data the verb trains on plain and chat renderings of the task suite (stubbed here)."""
    import types

    def mixture(n, seed=0, split="train"):
        rng = random.Random(seed)
        return [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n)]

    stub = types.SimpleNamespace(
        mixture=mixture, to_text=lambda p: f"Question: {p[0]} + {p[1]}. Answer: {p[0] + p[1]}",
        to_chat=lambda p: {"messages": [{"role": "user", "content": f"{p[0]} + {p[1]}?"},
                                        {"role": "assistant", "content": f"<think>\nadd\n</think>\n\n{sum(p)}"}]},
    )
    monkeypatch.setitem(sys.modules, "nanoseek.data.tasks", stub)
    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--n-docs", "200", "--vocab-size", "300")
    texts = module.task_suite_texts(4, 0)
    assert len(texts) == 8 and texts[-1].startswith(SPECIAL_TOKENS["bos"]) and "</think>" in texts[-1]
    assert module.run(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["vocab_size"] <= 300


def test_cli_user_errors(tmp_path):
    from nanoseek.cli import UserError

    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--data", str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="missing.jsonl"):
        module.run(args)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--data", str(bad))
    with pytest.raises(UserError, match="bad.jsonl:2"):
        module.run(args)


def test_cli_data_files_add_up(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "from a"}\n')
    b.write_text('{"text": "from b"}\n')
    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--data", str(a), "--data", str(b))
    assert module._training_texts(args) == ["from a", "from b"]
    with pytest.raises(SystemExit):  # `--data $(ls empty/*.jsonl)`: an error, not the task suite
        cli_args("train", "--out", str(tmp_path / "tok"), "--data")


def test_cli_out_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch):
    from nanoseek.cli import UserError

    out = tmp_path / "afile"
    out.write_text("keep me")
    module, args = cli_args("train", "--out", str(out), "--n-docs", "50")
    monkeypatch.setattr(module, "train_tokenizer", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(UserError, match=re.escape(f"--out {out} is a file; name a directory")):
        module.run(args)
    assert out.read_text() == "keep me"


def test_cli_data_that_is_a_directory(tmp_path):
    from nanoseek.cli import UserError

    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--data", str(tmp_path))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path} is a directory; give the files in it")):
        module.run(args)


def test_cli_out_that_cannot_be_made_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    module, args = cli_args("train", "--out", str(tmp_path / "afile" / "tok"), "--n-docs", "50")
    monkeypatch.setattr(module, "train_tokenizer", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(NotADirectoryError):  # reported by the CLI as one line
        module.run(args)


def test_cli_says_on_stderr_when_the_vocabulary_is_smaller_than_asked(tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text('{"text": "ab ab ab"}\n')
    module, args = cli_args("train", "--out", str(tmp_path / "tok"), "--data", str(data), "--vocab-size", "1000")
    assert module.run(args) == 0
    out, err = capsys.readouterr()
    got = json.loads(out.splitlines()[-1])["vocab_size"]
    assert got < 1000 and f"only {got} of the 1000 tokens" in err


def test_cli_train_refuses_a_shard_folder(tmp_path):
    """RUN/data holds tokenizer.json beside token shards: --overwrite replaced it, and pretrain --data then trained
    on ids that meant other tokens."""
    from nanoseek.cli import UserError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"shards": ["shard_00000.bin"], "vocab_size": 512}))
    (tmp_path / "data" / "tokenizer.json").write_text("{}")
    module, args = cli_args("train", "--out", str(tmp_path / "data"), "--n-docs", "10", "--overwrite")
    with pytest.raises(UserError, match="holds token shards"):
        module.run(args)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "meta.json").write_text("5")  # someone else's meta.json: no shards, no traceback
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts(50)))
    module, args = cli_args("train", "--out", str(tmp_path / "mine"), "--data", str(data), "--vocab-size", "300")
    assert module.run(args) == 0


def test_cli_train_leaves_no_earlier_tokenizer_files_beside_the_new_one(tmp_path, capsys):
    """transformers read a stale special_tokens_map.json / chat_template.jinja beside the new tokenizer: another eos
    and another chat template than nanoseek's."""
    from transformers import AutoTokenizer

    from nanoseek.cli import UserError

    out = tmp_path / "tok"
    out.mkdir()
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (out / "chat_template.jinja").write_text("{% for m in messages %}OTHER{{ m.content }}{% endfor %}")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts(100)))
    module, args = cli_args("train", "--out", str(out), "--data", str(data), "--vocab-size", "300")
    with pytest.raises(UserError, match=r"already holds tokenizer files \(.*special_tokens_map\.json"):
        module.run(args)
    module, args = cli_args("train", "--out", str(out), "--data", str(data), "--vocab-size", "300", "--overwrite")
    assert module.run(args) == 0
    ours, hf = Tokenizer.from_dir(out), AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == SPECIAL_TOKENS["eos"]
    assert hf.apply_chat_template([Q1], tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template([Q1], tokenize=False)


def test_from_dir_reads_chat_template_jinja_first_as_transformers_does(tok, hf_tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template([Q1], tokenize=False)
    assert want == "[What is 12 + 30?]" == Tokenizer.from_dir(tmp_path).apply_chat_template([Q1], tokenize=False)


@pytest.mark.parametrize("text", ["a\udcffb", "\ud800"])
def test_text_that_is_not_unicode_is_a_tokenizer_error(tok, text):
    """A non-UTF-8 byte in a command-line prompt (surrogateescape) or a JSON "\\ud800" escape: a TypeError
    traceback from the Rust tokenizer before."""
    with pytest.raises(TokenizerError, match="lone UTF-16 surrogate"):
        tok.encode(text)
    with pytest.raises(TokenizerError, match="lone UTF-16 surrogate"):
        tok.encode_batch(["fine", text])


def test_a_long_run_without_spaces_is_cut_for_training():
    """BPE training time grew with the square of a run without spaces: 400 kB of "ab" took 131 s, 10 MB hours.
    Such a run is trained on in pieces of 1000 characters; other text is left whole."""
    from nanoseek.tokenizer import _without_special_tokens

    pieces = list(_without_special_tokens(["ab" * 1250 + " tail " + "x" * 999, "short text"]))
    assert [len(p) for p in pieces] == [1000, 1000, 500 + 6 + 999, 10] and "".join(pieces[:3]) == (
        "ab" * 1250 + " tail " + "x" * 999)
    trained = train_tokenizer(synthetic_texts(50) + ["ab" * 100_000], vocab_size=300)
    assert trained.decode(trained.encode("abab cat")) == "abab cat"
