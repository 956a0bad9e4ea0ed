"""Whole GRPO runs on a tiny model: stopped (by --stop-at or a signal) and resumed bit-identically, rollouts and
rewards by mode, training on data files, and two gloo processes matching one."""

from __future__ import annotations

import pytest
import torch

from nanoseek.train.distributed import Dist


def sevens(text, *a, **kw):
    """A reward an untrained model earns: a quarter point for each digit 7 it writes."""
    from nanoseek.train.rewards import Judgement

    return Judgement(text.count("7") / 4, 0.0, 0.0, None)


def untrained_model_dir(path):
    """A random cpu-tiny model with a tokenizer trained on task-suite text, saved at path."""
    import nanoseek
    from nanoseek.tokenizer import task_suite_texts, train_tokenizer

    tok = train_tokenizer(task_suite_texts(200, seed=0), vocab_size=300)
    torch.manual_seed(0)
    nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny").replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)), path)
    tok.save(path)
    return path


def test_grpo_run_stopped_and_resumed_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """`nanoseek grpo` stopped after 2 of 4 steps (--stop-at) and resumed ends with the weights, metrics and
    adaptive-curriculum state of one uninterrupted 4-step run. An untrained model earns no task reward, so the
    rollouts are rewarded for each digit 7 they write: rewards differ within groups and the policy moves."""
    import json

    from safetensors.torch import load_file

    import nanoseek.train.grpo as grpo_module
    from nanoseek.train.grpo import GRPOConfig, grpo

    monkeypatch.setattr(grpo_module, "judge", sevens)
    model = untrained_model_dir(tmp_path / "sft")
    common = dict(model=str(model), tasks=["arithmetic:1", "word:1"], adaptive_tasks=True, steps=4, prompts_per_step=2,
                  group_size=4, max_new_tokens=8, temperature=1.0, updates_per_batch=2, lr=1e-3, save_every=2, eval_every=0,
                  progress=False, device="cpu")
    grpo(GRPOConfig(out=str(tmp_path / "whole"), **common))
    warning = capsys.readouterr().err  # 8 tokens cut off nearly every completion of the untrained model
    assert warning.count("hit --max-new-tokens 8") == 1, warning
    grpo(GRPOConfig(out=str(tmp_path / "parts"), stop_at=2, **common))
    grpo(GRPOConfig(out=str(tmp_path / "parts"), resume=True, **common))

    def weights(run):
        return load_file(str(tmp_path / run / "model" / "model.safetensors"))

    whole, parts = weights("whole"), weights("parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert any(not torch.equal(whole[k], load_file(str(model / "model.safetensors"))[k]) for k in whole)  # it learned

    def metrics(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # timings differ

    assert metrics("whole") == metrics("parts") and len(metrics("whole")) == 4

    import signal

    from nanoseek.train.stopping import Stopped

    collect = grpo_module.collect

    def sigterm_in_step_2(cfg, engine, tok, step, *rest):  # (Slurm's preemption, `timeout`, `docker stop`)
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return collect(cfg, engine, tok, step, *rest)

    monkeypatch.setattr(grpo_module, "collect", sigterm_in_step_2)
    with pytest.raises(Stopped, match="grpo: stopped at step 2, its checkpoint saved") as stopped:
        grpo(GRPOConfig(out=str(tmp_path / "signalled"), **{**common, "save_every": 100}))
    assert stopped.value.signum == signal.SIGTERM and len(metrics("signalled")) == 2
    monkeypatch.setattr(grpo_module, "collect", collect)
    grpo(GRPOConfig(out=str(tmp_path / "signalled"), resume=True, **common))
    assert all(torch.equal(whole[k], weights("signalled")[k]) for k in whole)
    log = grpo_module.metrics_lib.Metrics.log

    def sigterm_while_step_2_is_logged(self, row):  # after the step's all-reduce: it still stops after this step
        log(self, row)
        if row.get("step") == 2:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(grpo_module.metrics_lib.Metrics, "log", sigterm_while_step_2_is_logged)
    with pytest.raises(Stopped, match="grpo: stopped at step 2"):
        grpo(GRPOConfig(out=str(tmp_path / "late"), **{**common, "save_every": 100}))
    monkeypatch.setattr(grpo_module.metrics_lib.Metrics, "log", log)

    from safetensors.torch import save_file

    from nanoseek.cli import UserError

    grpo(GRPOConfig(out=str(tmp_path / "later"), stop_at=2, **common))  # then its starting model is trained further
    start = load_file(str(model / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in start.items()}, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="no longer holds the model this run started from"):  # (it resumed silently)
        grpo(GRPOConfig(out=str(tmp_path / "later"), resume=True, **common))


@pytest.mark.parametrize("mode", ["r1", "r1-zero"])
def test_rollouts_prompt_and_judge_by_mode(mode):
    """r1 prompts through the chat template, which prefills `<think>\\n` (put back before judging); r1-zero prompts
    with R1-Zero's plain template, after which the model writes `<think>` itself."""
    from nanoseek.data.tasks import from_record
    from nanoseek.eval.evaluate import R1_ZERO_PROMPT
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.curriculum import Curriculum
    from nanoseek.train.grpo import GRPOConfig, rollout

    tok = train_tokenizer(["What is 3 + 4? 3 + 4 = 7 The answer is 7."] * 50, vocab_size=300)
    problem = from_record({"question": "What is 3 + 4?", "answer": "7", "family": "arithmetic", "level": 1})
    reasoning = "3 + 4 = 7\n</think>\n\nThe answer is 7."
    completions = {"r1": [reasoning, "<think>\n" + reasoning], "r1-zero": [" <think>\n" + reasoning, reasoning]}[mode]

    class Scripted:
        max_seq_len = 1024  # room for any prompt here

        def generate(self, prompts, max_new_tokens, temperature, seed, stop_token_ids):
            self.prompts = prompts
            return [tok.encode(c) + [tok.eos_id] for c in completions]

    engine = Scripted()
    cfg = GRPOConfig(out="unused", mode=mode, group_size=2, tasks=["arithmetic:1"])
    r = rollout(cfg, engine, tok, [problem], 0, Curriculum(cfg), Dist())
    prompt = tok.decode(engine.prompts[0], skip_special_tokens=False)
    if mode == "r1":
        assert prompt.endswith("<｜Assistant｜><think>\n")
    else:
        assert prompt.endswith(R1_ZERO_PROMPT.format(question=problem.question)) and "<｜User｜>" not in prompt
    assert r.accuracy.tolist() == [[1.0, 0.0]] and r.fmt.tolist() == [[1.0, 0.0]]  # the second has no / two <think>


def test_curriculum_draws_a_data_file_pass_by_pass():
    """With --data every problem of the file is drawn once per pass, each pass in its own seeded order, and the
    position round-trips through the checkpoint state."""
    from nanoseek.data.tasks import from_record
    from nanoseek.train.curriculum import Curriculum
    from nanoseek.train.grpo import GRPOConfig

    pool = [from_record({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(5)]
    cur = Curriculum(GRPOConfig(out="", data="file.jsonl"), pool)
    drawn = [p.question for step in range(5) for p in cur.sample(step, 0, 3)]  # 15 = three passes
    passes = [drawn[i : i + 5] for i in (0, 5, 10)]
    assert all(sorted(p) == sorted(q.question for q in pool) for p in passes)
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    again = Curriculum(GRPOConfig(out="", data="file.jsonl"), pool)
    again.load_state_dict(cur.state_dict())
    assert [p.question for p in again.sample(5, 0, 7)] == [p.question for p in cur.sample(5, 0, 7)]
    other = Curriculum(GRPOConfig(out="", data="file.jsonl", seed=1), pool)
    assert [p.question for p in other.sample(0, 0, 5)] != passes[0]
    edited = Curriculum(GRPOConfig(out="", data="file.jsonl"), pool[:4])  # the file changed since the run started
    with pytest.raises(ValueError, match="not those the run was trained on"):
        edited.load_state_dict(cur.state_dict())


def test_grpo_trains_and_evaluates_on_data_files(tmp_path, monkeypatch, capsys):
    """`nanoseek grpo --data FILE --eval-data FILE`: trains on the file's problems (a 4-step run stopped at 2 and
    resumed matches an uninterrupted one), evaluates on the other file; user mistakes are one-line errors."""
    import json

    from safetensors.torch import load_file

    import nanoseek.train.grpo as grpo_module
    from conftest import tiny_model_dir
    from nanoseek.cli import UserError
    from nanoseek.tokenizer import task_suite_texts
    from nanoseek.train.grpo import GRPOConfig, grpo
    from nanoseek.train.rewards import Judgement

    asked = []
    monkeypatch.setattr(grpo_module, "judge", lambda text, problem, *a, **kw: (
        asked.append(problem.question), Judgement(text.count("7") / 4, 0.0, 0.0, None))[1])
    records = [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
               for i in range(6)]
    model, _, train = tiny_model_dir(tmp_path / "sft", task_suite_texts(200, seed=0), "train.jsonl", records)
    held = tmp_path / "test.jsonl"
    held.write_text("".join(json.dumps({"question": f"What is {i} + 3?", "answer": str(i + 3)}) + "\n" for i in range(3)))
    common = dict(model=str(model), data=str(train), eval_data=str(held), eval_n=2, eval_every=2, steps=4,
                  prompts_per_step=2, group_size=4, max_new_tokens=8, lr=1e-3, save_every=2, progress=False, device="cpu")
    grpo(GRPOConfig(out=str(tmp_path / "whole"), **common))
    assert set(asked) == {f"Tom has {i} apples and buys 2. How many?" for i in range(6)}  # 8 drawn: every one
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval"]["n"] for r in rows if "eval" in r] == [2, 2, 2]  # steps 0, 2 and 4, on --eval-data
    grpo(GRPOConfig(out=str(tmp_path / "parts"), stop_at=2, **common))
    grpo(GRPOConfig(out=str(tmp_path / "parts"), resume=True, **common))
    whole, parts = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n" + json.dumps({"question": 5}) + "\n")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "What is " + " + ".join(["1"] * 400) + "?", "answer": "400"}) + "\n")
    for kw, says in ((dict(data=str(bad)), "bad.jsonl:2"), (dict(data=str(train), adaptive_tasks=True), "--adaptive-tasks"),
                     (dict(data=str(long)), "exceeds the model's context"),
                     (dict(data=str(tmp_path / "missing.jsonl")), "missing.jsonl")):
        with pytest.raises(UserError, match=says):
            grpo(GRPOConfig(out=str(tmp_path / "err"), **{**common, **kw}))
        assert not (tmp_path / "err").exists()  # refused before the run directory is made
    capsys.readouterr()
    grpo(GRPOConfig(out=str(tmp_path / "no-eval"), **{**common, "eval_every": 0, "steps": 1}))
    assert "--eval-data is not used" in capsys.readouterr().err
    assert not any("eval" in json.loads(line) for line in (tmp_path / "no-eval" / "metrics.jsonl").open())


DDP_SCRIPT = '''
import sys
import nanoseek.train.grpo as grpo_module
from nanoseek.cli import main
from test_grpo_runs import sevens
grpo_module.judge = sevens
main(["grpo", *sys.argv[1:]])  # as `torchrun ... -m nanoseek grpo ...` runs it, with this file's reward
'''


def grpo_flags(cfg: dict) -> list[str]:
    """GRPOConfig fields -> `nanoseek grpo` flags."""
    flags = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if key == "progress":
            flags += [] if value else ["--no-progress"]
        elif value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif value is not False:
            flags += [flag, str(value)]
    return flags


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_two_gloo_processes_match_one(tmp_path, monkeypatch, loss):
    """`torchrun --nproc_per_node=2 ... grpo`: each rank rolls out half of a step's prompts (seeded as one process
    seeds them) and the gradients are summed over the ranks, so 3 steps (μ = 2, adaptive cells) end where one process
    ends: the same rollout metrics, and weights equal to float rounding. dapo's ranks each keep their own groups with
    signal, which one process would choose differently: it must run and learn."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    import nanoseek.train.grpo as grpo_module
    from nanoseek.train.grpo import GRPOConfig, grpo

    model = untrained_model_dir(tmp_path / "sft")
    # 32 new tokens: the untrained model writes a 7 about once in 300 tokens, so with 8 a run could see no 7 at all,
    # have no group with signal and not learn (it did, once the task suite's word problems changed)
    common = dict(model=str(model), tasks=["arithmetic:1", "word:1"], adaptive_tasks=True, steps=3, prompts_per_step=4,
                  group_size=4, max_new_tokens=32, temperature=1.0, updates_per_batch=2, lr=1e-3, eval_every=0,
                  loss=loss, progress=False, device="cpu")
    monkeypatch.setattr(grpo_module, "judge", sevens)
    grpo(GRPOConfig(out=str(tmp_path / "one"), **common))
    script = tmp_path / "run_grpo.py"
    script.write_text(DDP_SCRIPT)
    here = os.path.dirname(__file__)  # the script imports this file's reward
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        *grpo_flags({**common, "out": str(tmp_path / "two")})],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, "\n".join(line for line in r.stderr.splitlines() if "rror" in line)[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["cost"]["device"].endswith("2 processes")

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two, start = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "one" / "model",
                                                                          tmp_path / "two" / "model", model))
    assert any((two[k] - start[k]).abs().max() > 1e-4 for k in two)  # it learned
    if loss == "dapo":
        assert len(rows("two")) == 3
        return
    keys = ("reward", "accuracy", "response_length", "truncated", "groups_dropped", "cell_accuracy")
    for a, b in zip(rows("one"), rows("two"), strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}  # the same rollouts
        assert b["trained"] == pytest.approx(a["trained"]) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
