"""`nanoseek generate`: the same tokens as `Engine.generate`, raw vs chat prompt ids, seeded samples, stop strings,
the reasoning split, speculative = greedy, --out records, and user mistakes as one-line errors."""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings

import pytest
import torch

from conftest import tiny_model_dir
from nanoseek.engine.engine import Engine
from nanoseek.generate import Prompt, complete, encode

TEXTS = ["Tom has 3 apples and buys 4 more. The answer is 7.", "What is 12 times 3? It is 36.",
         "<think>\n3 + 4 = 7\n</think>\n\nThe answer is 7."] * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(directory, tokenizer, engine) of a random cpu-tiny model with one MTP layer."""
    d, tok, _ = tiny_model_dir(tmp_path_factory.mktemp("genmodel"), TEXTS, "unused.jsonl", [])
    return d, tok, Engine.from_pretrained(d, max_batch_size=8, max_seq_len=128)


def main(argv: list[str]) -> int:
    """`nanoseek generate ARGV` through the real CLI."""
    from nanoseek.cli import main as cli_main

    return cli_main(["generate", *argv])


def generate(capsys, model, *argv) -> tuple[str, dict]:
    """(stdout before the summary, the summary line) of a successful run."""
    assert main(["--model", str(model[0]), *argv]) == 0
    out = capsys.readouterr().out
    body, _, last = out.rstrip("\n").rpartition("\n")
    return body, json.loads(last)


def reference(model, ids: list[int], n: int, **kw) -> list[int]:
    """Engine.generate's new tokens, the eos that ends them dropped."""
    _, tok, engine = model
    out = engine.generate([ids], max_new_tokens=n, stop_token_ids=[tok.eos_id], **kw)[0]
    return out[:-1] if out and out[-1] == tok.eos_id else out


def test_greedy_equals_engine_generate(model, capsys):
    _, tok, _ = model
    body, s = generate(capsys, model, "Tom has 3", "--max-new-tokens", "12")
    toks = reference(model, [tok.bos_id, *tok.encode("Tom has 3")], 12)
    assert s["completions"] == [tok.decode(toks, skip_special_tokens=True)]
    assert (s["n_prompts"], s["samples"], s["new_tokens"]) == (1, 1, 12)
    assert s["tokens_per_s"] == pytest.approx(12 / s["seconds"], rel=0.05)
    # stdout is the completion itself (control characters dropped, as `nanoseek chat` prints)
    assert body == s["completions"][0].translate({c: None for c in [*range(32), 127] if chr(c) not in "\t\n"})


def test_dtype_choice_decodes_in_it(model, capsys, monkeypatch):
    """--dtype picks the weights' dtype (a GPU's default, bfloat16, can be turned to float32 to match the CPU and
    transformers): float32 gives the default's tokens on the CPU, bfloat16 loads bfloat16 weights and decodes."""
    import nanoseek.engine.engine as engine_mod

    loaded = []
    real = engine_mod.load_for_inference
    monkeypatch.setattr(engine_mod, "load_for_inference",
                        lambda *a, **k: loaded.append(m := real(*a, **k)) or m)
    _, default = generate(capsys, model, "Tom has 3", "--max-new-tokens", "8")
    _, f32 = generate(capsys, model, "Tom has 3", "--max-new-tokens", "8", "--dtype", "float32")
    _, bf16 = generate(capsys, model, "Tom has 3", "--max-new-tokens", "8", "--dtype", "bfloat16")
    assert [next(m.parameters()).dtype for m in loaded] == [torch.float32, torch.float32, torch.bfloat16]
    assert f32["completions"] == default["completions"] and bf16["new_tokens"] == 8
    from nanoseek.serve.runtime import load_runtime  # serve's and chat's --dtype

    with warnings.catch_warnings():  # the compiled decode step is float32's: not tried, so no warning
        warnings.simplefilter("error")
        assert load_runtime(model[0], dtype="bfloat16").engine.dtype == torch.bfloat16


def test_raw_and_chat_prompt_ids(model):
    _, tok, _ = model
    args = argparse.Namespace(system="Be brief.")
    raw, chat, msgs = encode([Prompt("1", "What is 2?"), Prompt("2", "What is 2?", [{"role": "user", "content":
                              "What is 2?"}]), Prompt("3", "x", [{"role": "system", "content": args.system},
                                                               {"role": "user", "content": "x"}])], tok)
    assert raw == [tok.bos_id, *tok.encode("What is 2?")]
    assert chat == tok.apply_chat_template([{"role": "user", "content": "What is 2?"}], add_generation_prompt=True)
    assert chat[0] == tok.bos_id and chat[-2:] == [tok.think_id, *tok.encode("\n")]  # R1 prefills <think>\n
    assert tok.decode(msgs).startswith("<｜begin▁of▁sentence｜>Be brief.")
    # a raw prompt that already starts with BOS does not get a second one (as /v1/completions)
    assert encode([Prompt("1", "<｜begin▁of▁sentence｜>Hi")], tok)[0] == [tok.bos_id, *tok.encode("Hi")]


def test_chat_run_splits_reasoning_from_the_answer(model, capsys, tmp_path):
    _, tok, _ = model
    out = tmp_path / "c.jsonl"
    body, s = generate(capsys, model, "What is 2?", "--chat", "--system", "Be brief.", "--max-new-tokens", "10",
                       "--out", str(out))
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "What is 2?"}])
    toks = reference(model, ids, 10)
    k = toks.index(tok.end_think_id) if tok.end_think_id in toks else len(toks)
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["reasoning"] == tok.decode(toks[:k], skip_special_tokens=True)
    answer = tok.decode(toks[k + 1:], skip_special_tokens=True).lstrip()
    assert rec["answer"] == rec["text"] == s["completions"][0] == answer
    assert body.startswith("<think>\n") and body.count("</think>") == 1  # not a terminal: reasoning in R1's tags


class ScriptedEngine:
    """Stands in for the engine: each request writes `script`'s token ids, one per step, then stops with eos."""

    def __init__(self, script: list[int], eos: int):
        self.script, self.eos, self.requests, self.cancelled = script, eos, {}, []

    def submit(self, prompt, params):
        self.requests[len(self.requests)] = [params, 0]
        return len(self.requests) - 1

    def has_work(self):
        return any(n is not None for _, n in self.requests.values())

    def cancel(self, rid):
        self.cancelled.append(rid)
        self.requests[rid][1] = None

    def step(self):
        events = []
        for rid, (params, n) in self.requests.items():
            if n is not None:
                tok = (self.script + [self.eos])[n]
                done = tok == self.eos or n + 1 == params.max_new_tokens
                self.requests[rid][1] = None if done else n + 1
                events.append((rid, tok, done, "stop" if tok == self.eos else "length" if done else None, None))
        return events


def test_reasoning_split_stop_strings_and_seeds(model):
    _, tok, _ = model
    script = tok.encode("3 + 4 = 7\n</think>\n\nThe answer is 7. Then 12 times 3.")
    eng = ScriptedEngine(script, tok.eos_id)
    chat = tok.apply_chat_template([{"role": "user", "content": "q"}])
    c = complete(eng, tok, [chat, [1, 2]], 2, temperature=0.5, seed=7, stop_ids=[tok.eos_id], chat=[True, False])
    assert [p.seed for p, _ in eng.requests.values()] == [7, 8, 9, 10]  # seed + completion index
    assert (c[0].reasoning, c[0].text) == ("3 + 4 = 7\n", "The answer is 7. Then 12 times 3.")
    assert c[0].finish_reason == "stop"
    assert c[0].new_tokens == len(script) + 1  # the eos counts
    assert (c[2].reasoning, c[2].text) == (None, tok.decode(script))  # raw: no split
    # a stop string cuts the answer there and ends the request (cancelled, fewer tokens); not in the reasoning
    eng = ScriptedEngine(script, tok.eos_id)
    (c,) = complete(eng, tok, [chat], stop=[" = ", "Then"], stop_ids=[tok.eos_id], chat=[True])
    assert (c.reasoning, c.text, c.finish_reason, eng.cancelled) == ("3 + 4 = 7\n", "The answer is 7. ", "stop", [0])
    assert c.new_tokens < len(script)
    (c,) = complete(ScriptedEngine(script, tok.eos_id), tok, [[1]], max_new_tokens=5)
    assert (c.new_tokens, c.finish_reason, c.text) == (5, "length", tok.decode(script[:5]))


def test_stop_string_on_the_model(model, capsys, tmp_path):
    _, full = generate(capsys, model, "Tom has", "--max-new-tokens", "16")
    text = full["completions"][0]
    stop = next(text[i : i + 2] for i in range(3, len(text)) if "\ufffd" not in text[i : i + 2])
    out = tmp_path / "s.jsonl"
    _, s = generate(capsys, model, "Tom has", "--max-new-tokens", "16", "--stop", stop, "--out", str(out))
    assert s["completions"] == [text[: text.index(stop)]]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["finish_reason"] == "stop" and rec["new_tokens"] == s["new_tokens"] < 16


def test_seeded_samples_are_reproducible(model, capsys, tmp_path):
    _, tok, _ = model
    runs = [generate(capsys, model, "Tom has", "What is", "--temperature", "1", "--samples", "3", "--seed", seed,
                     "--max-new-tokens", "8")[1]["completions"] for seed in ("5", "5", "6")]
    assert len(runs[0]) == 6 and runs[0] == runs[1] != runs[2]
    assert runs[0][1] == runs[2][0]  # completion i is seeded seed + i: seed 5's second is seed 6's first
    expected = [tok.decode(reference(model, [tok.bos_id, *tok.encode("What is")], 8, temperature=1.0, seed=5 + i),
                           skip_special_tokens=True) for i in (3, 4, 5)]
    assert runs[0][3:] == expected
    # --out: one record per completion, prompt-major; several completions print one block each
    out = tmp_path / "o.jsonl"
    body, s = generate(capsys, model, "Tom has", "What is", "--temperature", "1", "--samples", "3", "--seed", "5",
                       "--max-new-tokens", "8", "--out", str(out))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in recs] == [(p, i) for p in ("Tom has", "What is") for i in range(3)]
    assert [r["text"] for r in recs] == runs[0] and all("reasoning" not in r for r in recs)
    assert s["new_tokens"] == sum(r["new_tokens"] for r in recs)
    assert all(r["finish_reason"] == ("length" if r["new_tokens"] == 8 else "stop") for r in recs)
    assert body.count("==> prompt ") == 6 and "==> prompt 2 (sample 3 of 3): What is <==" in body


def test_speculative_equals_greedy(model, capsys):
    args = ["Tom has", "What is 12", "--max-new-tokens", "16"]
    _, plain = generate(capsys, model, *args)
    _, spec = generate(capsys, model, *args, "--speculative")
    assert spec["completions"] == plain["completions"] and 0 <= spec["acceptance_rate"] <= 1


def test_prompt_files_and_stdin(model, capsys, tmp_path, monkeypatch):
    _, tok, _ = model
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffTom has\r\n\r\nWhat is\n".encode())  # a BOM and CRLF, as Windows editors save
    _, from_txt = generate(capsys, model, "--prompts", str(txt), "--max-new-tokens", "6")
    _, from_args = generate(capsys, model, "Tom has", "What is", "--max-new-tokens", "6")
    assert from_txt == {**from_args, "seconds": from_txt["seconds"], "tokens_per_s": from_txt["tokens_per_s"]}
    monkeypatch.setattr(sys, "stdin", io.StringIO("Tom has\nWhat is\n"))
    _, from_stdin = generate(capsys, model, "--prompts", "-", "--max-new-tokens", "6")
    assert from_stdin["completions"] == from_args["completions"]
    # JSONL: a "messages" record goes through the chat template, a "prompt" record stays raw
    jl = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "What is 2?"}]
    parts = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *msgs]  # as the server takes
    jl.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"prompt": "Tom has"}) + "\n"
                  + json.dumps({"prompt": "a\u2028b\x0cc"}, ensure_ascii=False) + "\n"  # line breaks only at \\n
                  + json.dumps({"messages": parts}) + "\n")
    out = tmp_path / "j.jsonl"
    _, s = generate(capsys, model, "--prompts", str(jl), "--max-new-tokens", "6", "--out", str(out))
    recs = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert recs[0]["prompt"] == msgs and "reasoning" in recs[0] and "reasoning" not in recs[1]
    expected = tok.decode(reference(model, tok.apply_chat_template(msgs), 6), skip_special_tokens=True)
    assert recs[0]["reasoning"] == expected
    assert s["completions"][1] == from_args["completions"][0]
    assert len(recs) == 4 and recs[2]["prompt"] == "a\u2028b\x0cc"
    assert recs[3]["prompt"] == [{"role": "system", "content": "be brief"}, *msgs]


@pytest.mark.parametrize("args, message", [
    (["--prompts", "{dir}/missing.txt"], "cannot read"),
    ([""], "prompt 1 is empty"),
    (["--prompts", "{bad}"], "bad.jsonl line 2: not valid JSON"),
    (["--prompts", "{empty}"], "no prompts"),
    (["1 " * 600], "prompt 1: the longest prompt"),
    ([], "no prompt"),
    (["a", "--prompts", "{empty}"], "not both"),
    (["a", "--speculative", "--temperature", "0.5"], "greedy only"),
    (["a", "--speculative", "--model", "{nomtp}"], "MTP layers"),
    (["a", "--samples", "3"], "identical completions"),
    (["a", "--system", "hi"], "add --chat"),
    (["a", "--stop", ""], "--stop must not be empty"),
    (["a", "--device", "tpu"], "--device"),
    (["a", "--out", "{dir}/exists.jsonl"], "--overwrite"),
    (["--prompts", "{answered}"], "answered.jsonl line 1: the conversation ends with an assistant turn"),
])
def test_user_mistakes_are_one_line_errors(model, tmp_path, capsys, args, message):
    d = model[0]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "exists.jsonl").write_text("mine\n")
    (tmp_path / "answered.jsonl").write_text(json.dumps({"messages": [  # an SFT chat reused as a prompt
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}) + "\n")
    nomtp = tmp_path / "nomtp"
    nomtp.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    (nomtp / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    subst = {"{dir}": str(tmp_path), "{bad}": str(tmp_path / "bad.jsonl"), "{empty}": str(tmp_path / "empty.txt"),
             "{nomtp}": str(nomtp), "{answered}": str(tmp_path / "answered.jsonl")}
    args = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    assert main(["--model", str(d), "--max-new-tokens", "4", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("args", [["--top-p", "0"], ["--temperature", "-1"], ["--samples", "0"], ["--top-k", "-2"],
                                  ["--max-new-tokens", "0"], ["--seed", "x"]])
def test_bad_option_values_are_usage_errors(model, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model[0]), "a", *args])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_ctrl_c_keeps_the_completions_that_finished(model, capsys, tmp_path, monkeypatch):
    import nanoseek.eval.evaluate as evaluate

    d, _, _ = model

    class OneRowThenCtrlC(Engine):  # one completion at a time; Ctrl-C once the first has finished
        def step(self):
            if self.finished_once:
                raise KeyboardInterrupt
            events = super().step()
            self.finished_once = any(finished for _, _, finished, *_ in events)
            return events

    def one_row(model_dir, device, ids, max_new_tokens, samples, dtype=None):
        engine = OneRowThenCtrlC.from_pretrained(model_dir, max_batch_size=1, max_seq_len=64)
        engine.finished_once = False
        return engine

    from nanoseek.cli import Interrupted

    engine = one_row(d, "cpu", None, 6, 1)  # Engine.generate says which prompts had finished
    with pytest.raises(Interrupted) as e:
        engine.generate([[1, 5, 6], [1, 7]], max_new_tokens=6, stop_token_ids=[])
    assert list(e.value.done) == [0] and len(e.value.done[0]) == 6
    monkeypatch.setattr(evaluate, "engine_for", one_row)
    out = tmp_path / "o.jsonl"
    assert main(["--model", str(d), "Tom has 3", "What is 12", "--max-new-tokens", "6", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: 1 of 2 completions finished; they are in {out}" in err and "Traceback" not in err
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (rec["prompt"], rec["sample"], rec["new_tokens"]) == ("Tom has 3", 0, 6)
    before = out.read_text()  # --overwrite of an earlier file, interrupted: the earlier file stays whole
    assert main(["--model", str(d), "Tom has 3", "What is 12", "--max-new-tokens", "6", "--out", str(out),
                 "--overwrite"]) == 130
    captured = capsys.readouterr()
    assert out.read_text() == before and f"{out} keeps what it held: they are shown here instead" in captured.err
    assert captured.out.startswith("==> prompt 1: Tom has 3 <==\n")
    # without --out the finished completions were thrown away: they are shown on stdout
    assert main(["--model", str(d), "Tom has 3", "What is 12", "--max-new-tokens", "6"]) == 130
    shown = capsys.readouterr().out
    assert shown.startswith("==> prompt 1: Tom has 3 <==\n") and "prompt 2" not in shown


def test_jsonl_prompts_by_any_case_or_flag_and_one_prompts_file(model, capsys, tmp_path, monkeypatch):
    """A .JSONL file, or JSONL on stdin, was completed as raw text, its JSON lines the prompts; a second --prompts
    silently replaced the first."""
    record = json.dumps({"prompt": "Tom has"}) + "\n"
    _, want = generate(capsys, model, "Tom has", "--max-new-tokens", "4")
    (tmp_path / "P.JSONL").write_text(record)
    _, got = generate(capsys, model, "--prompts", str(tmp_path / "P.JSONL"), "--max-new-tokens", "4")
    assert got["completions"] == want["completions"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(record))
    _, got = generate(capsys, model, "--prompts", "-", "--jsonl", "--max-new-tokens", "4", "--no-progress")
    assert got["completions"] == want["completions"]
    with pytest.raises(SystemExit):
        main(["--model", str(model[0]), "--prompts", "a.txt", "--prompts", "b.txt"])
    assert "--prompts takes one file" in capsys.readouterr().err
