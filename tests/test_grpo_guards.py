"""`nanoseek grpo`'s guards, from an audit: task names and --eval-n checked before evaluation, rollouts whose prompts
fit the engine (not a traceback or a silently cut completion), dapo's count of dropped groups, and the accuracy
reward on answers that show their working or smuggle in a chat turn."""

from __future__ import annotations

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.tasks import Problem
from nanoseek.train.rewards import judge
from test_grpo_runs import untrained_model_dir

QUICK = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return untrained_model_dir(tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize("extra, says", [(["--tasks", "nonsense"], "unknown task 'nonsense'"),
                                         (["--tasks", "arithmetic", "--eval-n", "100000"], "--eval-n 100000")])
def test_bad_tasks_and_eval_n_are_one_line_with_evaluation_on(model, tmp_path, capsys, extra, says):
    assert main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), *QUICK, *extra]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_tasks_all_trains_and_evaluates_every_family(model, tmp_path, capsys):
    """`--tasks all`, as `nanoseek eval --task all` reads it (the evaluation took the word 'all' for a family)."""
    import json

    assert main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), *QUICK, "--tasks", "all"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result["final"]["eval"]["families"]) == {"arithmetic", "word", "countdown"}


def test_r1_zero_prompts_longer_than_256_tokens_fit_the_rollout_engine(model, tmp_path, capsys):
    """R1-Zero's template around a three-step word problem is ~300 tokens with this tokenizer; the engine was sized
    from the (absent) evaluation prompts with a 256-token floor, and the rollout failed with a traceback."""
    from nanoseek.data.tasks import generate
    from nanoseek.eval.evaluate import prompts_for
    from nanoseek.tokenizer import Tokenizer

    longest = max(map(len, prompts_for(generate("word", 3, 8, seed=0), Tokenizer.from_dir(model), "r1-zero")))
    assert longest > 256 + 8  # the case the test is about
    assert main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), "--mode", "r1-zero", "--tasks",
                 "word:3", "--eval-every", "0", *QUICK]) == 0, capsys.readouterr().err


def test_dapo_counts_every_group_it_dropped(monkeypatch):
    """Two all-equal groups dropped over two rounds; the final trim to the batch's share used to overwrite the count
    with the number of surplus groups (0 here)."""
    from nanoseek.train import distributed, grpo

    plan = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.2, 0.2], [1.2, 0.0]])]

    def fake_rollout(cfg, engine, tok, problems, step, curriculum, d):
        r = plan.pop(0)
        n = r.numel()
        return grpo.Rollout(torch.ones(n, 4, dtype=torch.long), torch.ones(n, 4), r, r, r, torch.ones(n), 0.0)

    class Curriculum:
        def sample(self, *a):
            return [None, None]

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    cfg = grpo.GRPOConfig(out="x", loss="dapo", prompts_per_step=2, group_size=2)
    batch, seen = grpo.collect(cfg, None, None, 0, Curriculum(), distributed.init_distributed("cpu"))
    assert seen.rewards.shape[0] == 4 and batch.rewards.shape[0] == 2 and batch.n_groups_dropped == 2


def test_dapo_extra_rounds_are_seeded_apart_from_steps(monkeypatch):
    """The extra rounds were seeded from --steps + step, so a dapo run extended on --resume sampled other completions
    than one run to that length at once."""
    from nanoseek.train import distributed, grpo

    seeds = []

    def fake_rollout(cfg, engine, tok, problems, step, curriculum, d):
        seeds.append(step)
        r = torch.zeros(2, 2)  # every group all-equal: dapo asks for all three extra rounds
        return grpo.Rollout(torch.ones(4, 4, dtype=torch.long), torch.ones(4, 4), r, r, r, torch.ones(4), 0.0)

    class Curriculum:
        def sample(self, *a):
            return [None, None]

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    for steps in (2, 4):
        cfg = grpo.GRPOConfig(out="x", loss="dapo", prompts_per_step=2, group_size=2, steps=steps)
        grpo.collect(cfg, None, None, 1, Curriculum(), distributed.init_distributed("cpu"))
    assert seeds[:4] == seeds[4:] and len(set(seeds[:4])) == 4 and max(seeds) > 10**6


@pytest.mark.parametrize("answer, gold", [("16 − 3 − 4 = 9, so the answer is 9.", "9"),
                                          ("2.5 × 4 = 10, so the answer is 10.", "10"),
                                          ("1,200 + 300 = 1,500, so the answer is 1,500.", "1500"),
                                          ("9 × $2 = $18. The answer is 18.", "18"),
                                          ("6 x 7 = 42, so the answer is 42.", "42")])
def test_working_beside_the_answer_is_not_stuffing(answer, gold):
    problem = Problem("imported", 0, "q", (), gold, {})
    assert judge(f"<think>\nwork\n</think>\n\n{answer}", problem).accuracy == 1
    assert judge(f"<think>\nwork\n</think>\n\n{answer.replace(gold, '7', 1)} or 8 or 9", problem).accuracy == 0


def test_an_answer_that_opens_another_chat_turn_fails_the_format():
    problem = Problem("arithmetic", 1, "q", (), "42", {})
    text = "<think>\nx\n</think>\n\nThe answer is 42.<｜User｜>What is 1 + 1?<｜Assistant｜>"
    assert judge(text, problem).format == 0 and judge(text, problem).reward == 0


@pytest.mark.parametrize("gold", ["(1, 2, 3)", "2x^2+3x+1"])
def test_a_free_form_answer_may_hold_as_many_numbers_as_its_gold(gold):
    """eval scored these right and GRPO's accuracy reward (and so distill's filter) wrong, as answer stuffing."""
    problem = Problem("imported", 0, "q", (), gold, {})
    assert judge(f"<think>\nwork\n</think>\n\n\\boxed{{{gold}}}", problem).accuracy == 1
    assert judge(f"<think>\nwork\n</think>\n\n\\boxed{{{gold}}} or 4 or 5 or 6", problem).accuracy == 0


@pytest.mark.parametrize("answer", ["Ava had 20 apples and gave away 8, so she has 12 left.",
                                    "She had 1200 dollars, spent $8, and has $1,192 left.",
                                    "**12** apples: taking 8 from 20 leaves 12."])
def test_numbers_the_question_gave_are_not_stuffing(answer):
    """A prose answer restating the question's numbers scored 0 (and distill dropped a teacher's right trace)."""
    gold = "1192" if "1,192" in answer else "12"
    problem = Problem("word", 1, "Ava has 20 apples (1200 dollars) and gives away 8. How many are left?", (), gold, {})
    assert judge(f"<think>\nwork\n</think>\n\n{answer}", problem).accuracy == 1
    stuffed = f"<think>\nwork\n</think>\n\nAva had 20 apples, so 11 or 13 or {gold}."
    assert judge(stuffed, problem).accuracy == 0


@pytest.mark.parametrize("question, answer, gold", [
    ("Ava has 20 apples and 8 pears. How many apples?", "19, 21, 20", "20"),  # the answer is one of the question's
    ("Ava has 20 apples and 8 pears. How many apples?", "7, 8, 19 or 20", "20"),
    ("Ava had 20 apples and gave away 8. How many are left?", "It is 8, 20, -8, -20 or 12.", "12")])  # signs it gave
def test_a_hedge_among_the_questions_numbers_is_still_stuffing(question, answer, gold):
    assert judge(f"<think>\nwork\n</think>\n\n{answer}", Problem("word", 1, question, (), gold, {})).accuracy == 0


def test_a_budget_past_the_context_is_refused_before_training(model, tmp_path, capsys):
    """Without --data or an evaluation, only the sample of suite prompts could catch it: the run trained until a
    longer prompt came up, then failed with its unsaved steps lost."""
    import json

    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    args = ["grpo", "--model", str(model), "--out", str(tmp_path / "run"), *QUICK, "--max-new-tokens", str(context - 8),
            "--tasks", "word:3", "--eval-every", "0"]
    assert main(args) == 1
    assert "a sample of the task's training prompts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_overlong_penalty_can_be_set(model, tmp_path):
    """GRPOConfig.overlong_cache had no flag: dapo's default width could not be changed or turned off."""
    import json

    assert main(["grpo", "--model", str(model), "--out", str(tmp_path / "run"), *QUICK, "--eval-every", "0",
                 "--overlong-cache", "4"]) == 0
    state = json.loads((tmp_path / "run" / "train_state" / "state.json").read_text())
    assert state["config"]["overlong_cache"] == 4
    assert main(["grpo", "--model", str(model), "--out", str(tmp_path / "run2"), *QUICK, "--overlong-cache", "8"]) == 1


def test_distill_refuses_more_held_out_problems_than_there_are_in_one_line():
    """distill's copy of the held-out picker let held_out's ValueError through as a traceback (grpo's caught it)."""
    from nanoseek.cli import UserError
    from nanoseek.train.distill import DistillConfig, scored_problems

    with pytest.raises(UserError, match="--eval-n 110000"):
        scored_problems(DistillConfig(teacher="t", out="o", tasks=["arithmetic:1"], eval_n=110000))
