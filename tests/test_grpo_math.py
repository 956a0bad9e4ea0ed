"""GRPO's advantages and losses on small cases computed by hand, the rule-based rewards on crafted completions,
and a few real update steps raising the reward on a learnable task."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.train.distributed import Dist
import torch.nn.functional as F

from nanoseek.train.grpo import LOSSES, group_advantages, policy_loss
from nanoseek.data.tasks import from_record
from nanoseek.train.rewards import format_ok, judge


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r, "grpo")
    # group 1: mean 0.5, population std 0.5 -> ±1 (up to the 1e-4 guard); group 2: all equal -> 0
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))
    assert torch.allclose(group_advantages(r, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # groups of eight equal rewards, whose float mean can differ from them in the last bit (here all five do; the
    # std division made that 1e-4 to 6e-4): still exactly 0
    same = torch.tensor([0.7, 0.1, 0.3, 1 / 3, 0.9])[:, None].repeat(1, 8)
    assert torch.equal(group_advantages(same, "grpo"), torch.zeros(5, 8))
    assert torch.equal(group_advantages(same, "dr_grpo"), torch.zeros(5, 8))


def case():
    # two completions, lengths 2 and 1 (mask), advantages +1 and -2
    logp = torch.log(torch.tensor([[0.5, 0.2], [0.4, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.2], [0.5, 0.9]]))  # ratios 2.0, 1.0 / 0.8, (masked)
    ref = torch.log(torch.tensor([[0.5, 0.1], [0.4, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    return logp, old, ref, adv, mask


def k3(p, r):
    return r / p - math.log(r / p) - 1


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_policy_loss_by_hand(variant):
    logp, old, ref, adv, mask = case()
    eps, eps_high, beta = 0.2, 0.28 if variant == "dapo" else 0.2, 0.1
    loss, stats = policy_loss(logp, old, ref, adv, mask, variant, eps, eps_high, beta, n_seqs=2, n_tokens=3,
                              max_new_tokens=4)
    # token terms: min(ρA, clip(ρ)A) - β·KL
    t11 = min(2.0 * 1, (1 + eps_high) * 1) - beta * k3(0.5, 0.5)  # clipped at 1+ε_high
    t12 = 1.0 * 1 - beta * k3(0.2, 0.1)
    t21 = min(0.8 * -2, max(0.8, 1 - eps) * -2) - beta * k3(0.4, 0.4)
    if variant == "grpo":
        expected = -((t11 + t12) / 2 + t21 / 1) / 2
    elif variant == "dr_grpo":
        expected = -((t11 + t12) / 4 + t21 / 4) / 2
    else:
        expected = -(t11 + t12 + t21) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    assert stats["clipped"] == 1.0  # only the first token took the clipped branch


def test_kl_estimate_is_bounded():
    """A token whose log-probability fell 12 nats below the reference's (an MoE routing flip after one step) adds
    β·10 to the loss, not β·(e^12 − 13), and no gradient; a token 0.5 nats away keeps the exact k3 term."""
    logp = torch.tensor([[-13.0, -1.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, stats = policy_loss(logp, logp.detach(), ref, torch.tensor([0.0]), torch.ones(1, 2), "dapo", 0.2, 0.2, 1.0,
                              1, 2, 4)
    assert math.isclose(stats["kl"], 10 + k3(math.exp(-1.5), math.exp(-1.0)), rel_tol=1e-6)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0


def test_policy_loss_microbatches_add_up():
    logp, old, ref, adv, mask = case()
    for variant in ("grpo", "dr_grpo", "dapo"):
        whole, _ = policy_loss(logp, old, ref, adv, mask, variant, 0.2, 0.2, 0.1, 2, 3, 4)
        parts = sum(policy_loss(logp[i : i + 1], old[i : i + 1], ref[i : i + 1], adv[i : i + 1], mask[i : i + 1],
                                variant, 0.2, 0.2, 0.1, 2, 3, 4)[0] for i in range(2))
        assert torch.allclose(whole, parts)


def test_ratio_one_gradient_is_advantage_weighted():
    """At ρ = 1 and β = 0 the GRPO gradient w.r.t. logp is -A/(n·|o|) per token."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), None, torch.tensor([3.0]), torch.ones(1, 2), "grpo", 0.2, 0.2, 0.0, 1, 2, 8)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -1.5]]))


@pytest.fixture
def problem():
    from nanoseek.data.tasks import generate

    return generate("arithmetic", 1, 1, seed=3)[0]


def test_rewards_on_crafted_completions(problem):
    ans = problem.answer
    right = f"<think>\nlet me add\n</think>\n\nThe answer is {ans}."
    wrong = f"<think>\nlet me add\n</think>\n\nThe answer is {int(ans) + 1}."
    assert judge(right, problem).reward == pytest.approx(1.2) and judge(right, problem).accuracy == 1
    assert judge(wrong, problem).accuracy == 0 and judge(wrong, problem).format == 1
    assert judge(right, problem, finished=False).reward == 0  # cut off at the token limit
    malformed = [
        f"The answer is {ans}.",  # no reasoning block
        f"<think>\n</think>\n\nThe answer is {ans}.",  # empty reasoning
        "<think>\nx\n</think>\n\n",  # empty answer
        f"<think>\nx\n</think><think>\ny\n</think>\n\n{ans}",  # repeated tags
        f"<think>\nx\n</think>\n\n{ans} </think>",  # tag inside the answer
        f"</think><think>\nx\n\n{ans}",  # wrong order
        f"<think>\nx\n</think>\n{ans}</think>\n\nThe answer is {ans}.",  # a second </think> (the last one splits)
        "<think>\n" + "same line\n" * 10 + f"</think>\n\n{ans}",  # degenerate repetition
    ]
    for text in malformed:
        j = judge(text, problem)
        assert j.format == 0 and j.accuracy == 0 and j.reward == 0, text
    stuffed = f"<think>\nhmm\n</think>\n\n{int(ans) - 1} or {ans} or {int(ans) + 1}"
    assert judge(stuffed, problem).accuracy == 0 and judge(stuffed, problem).format == 1
    a, b = int(ans) // 2, int(ans) - int(ans) // 2
    worked = f"<think>\nhmm\n</think>\n\n{a} + {b} = {ans}, so the answer is {ans}."  # working, not stuffing
    assert judge(worked, problem).accuracy == 1
    false_working = f"<think>\nhmm\n</think>\n\n{a} + {b} = {int(ans) + 1} = {ans}, so the answer is {ans}."
    assert judge(false_working, problem).accuracy == 0
    gold = lambda a: from_record({"question": "q", "answer": a})  # noqa: E731
    latex = [("$3 \\times 4 = 12$, so \\boxed{12}", "12"), ("$3 \\cdot 4 = 12$. \\boxed{12}", "12"),
             ("$\\frac{6}{8} = \\frac{3}{4}$, so \\boxed{\\frac{3}{4}}", "3/4"), ("50 × 20% = 10. The answer is 10.", "10")]
    for text, g in latex:  # working in LaTeX or with a percent is working too (they scored 0)
        assert judge(f"<think>\nhmm\n</think>\n\n{text}", gold(g)).accuracy == 1, text
    assert judge("<think>\nhmm\n</think>\n\nThe answer is -$5.", gold("5")).accuracy == 0  # the sign counts


def test_dapo_defaults_clip_higher_and_a_soft_overlong_penalty():
    from nanoseek.train.grpo import GRPOConfig

    dapo, grpo = GRPOConfig(out="x", loss="dapo", max_new_tokens=256), GRPOConfig(out="x", max_new_tokens=256)
    assert (dapo.eps_high, dapo.overlong_width) == (0.28, 64) and (grpo.eps_high, grpo.overlong_width) == (0.2, 0)
    given = GRPOConfig(out="x", loss="dapo", clip_eps_high=0.3, overlong_cache=0)
    assert (given.eps_high, given.overlong_width) == (0.3, 0)


def test_overlong_penalty():
    assert format_ok("<think>a</think>b")
    from nanoseek.data.tasks import generate

    p = generate("arithmetic", 1, 1, seed=3)[0]
    text = f"<think>\nx\n</think>\n\n{p.answer}"
    assert judge(text, p, n_tokens=70, max_tokens=96, overlong_cache=24).overlong_penalty == 0
    assert judge(text, p, n_tokens=84, max_tokens=96, overlong_cache=24).overlong_penalty == pytest.approx(0.5)
    assert judge(text, p, n_tokens=96, max_tokens=96, overlong_cache=24).reward == pytest.approx(0.2)


@pytest.mark.parametrize("variant", LOSSES)
def test_a_few_steps_raise_the_reward_on_a_learnable_task(variant):
    """The whole update path (advantages, clipped ratio, KL to the reference, μ updates) on a task a tiny model can
    learn in a few steps: the reward is the share of completion tokens equal to one chosen token."""
    import copy

    import nanoseek
    from nanoseek.engine.engine import Engine
    from nanoseek.train.grpo import GRPOConfig, Rollout, update
    from nanoseek.train.loop import make_optimizer

    torch.manual_seed(0)
    cfg_m = nanoseek.get_preset("cpu-tiny").replace(vocab_size=16, hidden_size=64, num_hidden_layers=2,
                                                    intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32,
                                                    kv_lora_rank=32, num_nextn_predict_layers=0)
    model = nanoseek.build_model(cfg_m)
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    cfg = GRPOConfig(out="unused", loss=variant, lr=3e-3, beta=0.01, max_new_tokens=6, updates_per_batch=2, micro_batch_size=16)
    opt = make_optimizer(model, cfg.lr, 0.0)
    engine = Engine(model, max_batch_size=32, max_seq_len=16)
    target, P, G = 5, 4, 8
    prompts = [[1, 2 + i, 3] for i in range(P)]
    history = []
    for step in range(10):
        model.eval()
        outs = engine.generate([p for p in prompts for _ in range(G)], max_new_tokens=6, temperature=1.0,
                              seed=step * 100, stop_token_ids=())  # 6 tokens each: the toy task has no eos
        model.train()
        rewards = torch.tensor([sum(t == target for t in o) / len(o) for o in outs]).view(P, G)
        ids = torch.tensor([prompts[i // G] + o for i, o in enumerate(outs)])
        mask = torch.tensor([[0] * 3 + [1] * 6] * len(outs), dtype=torch.float32)
        update(cfg, model, ref, opt, Rollout(ids, mask, rewards, rewards, rewards, torch.full((P * G,), 6.0), 0.0),
               Dist())
        history.append(rewards.mean().item())
    assert history[0] < 0.2  # about 1/16 by chance at the start
    assert sum(history[-3:]) / 3 > history[0] + 0.2, history


def test_curriculum_cells_and_learnability_weights():
    """--tasks parsing into (family, level) cells; adaptive sampling draws by p(1-p) + 0.01 of each cell's running
    accuracy, so a half-solved cell dominates cells the policy always or never solves; its state round-trips."""
    from nanoseek.cli import UserError
    from nanoseek.train.curriculum import Curriculum, task_cells
    from nanoseek.train.grpo import GRPOConfig

    assert task_cells(GRPOConfig(out="", tasks=["arithmetic:2", "countdown"])) == [("arithmetic", 2), ("countdown", 1),
                                                                          ("countdown", 2), ("countdown", 3)]
    for bad in (["poetry"], ["arithmetic:9"], ["word:x"]):
        with pytest.raises(UserError):
            task_cells(GRPOConfig(out="", tasks=bad))
    even = Curriculum(GRPOConfig(out="", tasks=["arithmetic:1", "arithmetic:4"]))
    assert sorted(p.level for p in even.sample(0, 0, 8)) == [1, 1, 1, 1, 4, 4, 4, 4]
    cur = Curriculum(GRPOConfig(out="", tasks=["arithmetic:1", "arithmetic:4", "word:1"], adaptive_tasks=True))
    cur.observe([p for p in cur.sample(0, 0, 3)], torch.zeros(3, 4))  # every cell moves from 0.5 towards 0
    assert all(abs(v - 0.35) < 1e-9 for v in cur.accuracy.values())
    cur.load_state_dict({"cell_accuracy": {"arithmetic:1": 1.0, "arithmetic:4": 0.0, "word:1": 0.5}})
    levels = [(p.family, p.level) for p in cur.sample(1, 0, 600)]
    share = levels.count(("word", 1)) / len(levels)  # weights 0.01 : 0.01 : 0.26 -> 0.93
    assert 0.89 < share < 0.97
    again = Curriculum(GRPOConfig(out="", tasks=["arithmetic:1", "arithmetic:4", "word:1"], adaptive_tasks=True))
    again.load_state_dict(cur.state_dict())
    assert [p.question for p in again.sample(5, 0, 16)] == [p.question for p in cur.sample(5, 0, 16)]


def test_logprobs_score_the_distribution_the_rollouts_sample():
    """Below temperature 1 the loss must score softmax(logits / T), the distribution the engine samples from:
    the first token's frequencies over 4000 engine samples at T = 0.5 match exp(log π_T), not π_1."""
    import nanoseek
    from nanoseek.engine.engine import Engine
    from nanoseek.train.grpo import completion_logprobs

    torch.manual_seed(0)
    cfg_m = nanoseek.get_preset("cpu-tiny").replace(vocab_size=8, hidden_size=32, num_hidden_layers=1,
                                                    intermediate_size=64, q_lora_rank=16, kv_lora_rank=16,
                                                    num_nextn_predict_layers=0)
    model = nanoseek.build_model(cfg_m).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked logits, so T = 0.5 and T = 1 differ clearly
    prompt, n = [1, 2, 3], 4000
    outs = Engine(model, max_batch_size=64, max_seq_len=8).generate([prompt] * n, max_new_tokens=1, temperature=0.5,
                                                                    seed=0)
    freq = torch.bincount(torch.tensor([o[0] for o in outs]), minlength=8).float() / n
    ids = torch.tensor([prompt + [t] for t in range(8)])
    mask = torch.tensor([[0, 0, 0, 1]] * 8)
    with torch.no_grad():
        p_half = completion_logprobs(model, ids, mask, temperature=0.5)[0][:, -1].exp()
        p_one = completion_logprobs(model, ids, mask)[0][:, -1].exp()
    assert p_half.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (freq - p_half).abs().max() < 0.03, (freq, p_half)
    assert (freq - p_one).abs().max() > 0.1, (freq, p_one)  # the test could tell the two apart


def small_policy():
    """A 2-layer MoE model over 16 tokens, seeded, for the update tests."""
    import nanoseek

    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny").replace(vocab_size=16, hidden_size=32, num_hidden_layers=2,
                                                  intermediate_size=64, moe_intermediate_size=16, q_lora_rank=16,
                                                  kv_lora_rank=16, num_nextn_predict_layers=0)
    return nanoseek.build_model(cfg)


@pytest.mark.parametrize("variant", LOSSES)
def test_zero_advantage_completions_are_skipped_without_changing_the_update(variant):
    """With β = 0 the update runs only the completions whose advantage is non-zero; the parameters after two
    optimiser steps equal those of the full computation (a frozen reference present, β = 0: every completion runs,
    KL weighted 0), also when no group has any signal (the optimiser still steps: momentum and weight decay)."""
    import copy

    from nanoseek.train.grpo import GRPOConfig, Rollout, update

    base = small_policy()
    P, G, T = 4, 4, 9
    ids = torch.randint(0, 16, (P * G, T))
    mask = torch.tensor([[0] * 3 + [1] * 6] * (P * G), dtype=torch.float32)
    with_signal = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])  # groups 1, 2: no signal
    for rewards in (with_signal, torch.ones(P, G)):
        batch = Rollout(ids, mask, rewards, rewards, rewards, torch.full((P * G,), 6.0), 0.0)
        cfg = GRPOConfig(out="unused", loss=variant, lr=1e-2, beta=0.0, max_new_tokens=6, updates_per_batch=2,
                         micro_batch_size=3)
        params = []
        for skip in (True, False):
            model = copy.deepcopy(base).train()
            ref = None if skip else copy.deepcopy(base).requires_grad_(False).eval()
            # SGD: AdamW's division by sqrt(v) would magnify float rounding in near-zero gradients past any tolerance
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=0.1)
            for _ in range(2):
                stats = update(cfg, model, ref, opt, batch, Dist())
            expected = (8 if rewards is with_signal else 1) / 16 if skip else 1.0
            assert stats["trained"] == expected
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert (params[0] - params[1]).abs().max().item() < 1e-6
        assert (params[0] - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max().item() > 1e-3


def test_update_is_the_same_whatever_the_padding_and_micro_batches():
    """Rows of different lengths are grouped by length and each micro-batch is cut to its longest row: extra padding
    columns or another micro-batch size leave the parameters after the update unchanged."""
    import copy

    from nanoseek.train.grpo import GRPOConfig, Rollout, update

    base = small_policy()
    P, G, T = 3, 4, 14
    ids = torch.randint(0, 16, (P * G, T))
    lengths = torch.randint(1, 10, (P * G,))
    mask = torch.zeros(P * G, T)
    for i, n in enumerate(lengths.tolist()):
        mask[i, 3 : 3 + n] = 1.0
    rewards = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0]])
    params = []
    for extra, micro in ((0, 3), (6, 3), (0, 16)):
        batch = Rollout(F.pad(ids, (0, extra)), F.pad(mask, (0, extra)), rewards, rewards, rewards,
                        lengths.float(), 0.0)
        cfg = GRPOConfig(out="unused", lr=1e-2, beta=0.0, max_new_tokens=10, updates_per_batch=2, micro_batch_size=micro)
        model = copy.deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        update(cfg, model, None, opt, batch, Dist())
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (params[0] - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max().item() > 1e-3
    assert (params[0] - params[1]).abs().max().item() < 1e-6
    assert (params[0] - params[2]).abs().max().item() < 1e-6


def test_false_steps_finds_the_false_facts_and_only_those():
    from nanoseek.data.tasks import LEVELS, generate
    from nanoseek.train.rewards import false_steps

    text = ("<think>\n7 + 5 = 13, carry 1\n1 + 9 + 1 = 11\n14 ÷ 8 = 1, remainder 7\n9 - 7 = 3.\n96 - (-43) = 139\n"
            "(2 + 3) × 4 = 21\n5 ÷ 0 = 1\nAltogether 2 + 2 = 5 apples.\n</think>\n\n3 + 4 = 8")
    # the wrong sum, the wrong remainder, the wrong difference and the wrong product; not the answer after </think>,
    # a division by zero, or a fact inside a sentence
    assert [text[a:b] for a, b in false_steps(text)] == ["13", "1, remainder 7", "3", "21"]
    even = "<think>\n14 ÷ 7 = 1, remainder 7\n</think>\n2"  # a remainder as large as the divisor is no remainder
    assert [even[a:b] for a, b in false_steps(even)] == ["1, remainder 7"]
    # every worked solution of the task suite states only true facts
    checked = 0
    for family, levels in LEVELS.items():
        for level in levels:
            for p in generate(family, level, 200, seed=2):
                text = "<think>\n" + "\n".join(p.steps) + "\n</think>\n\n" + p.answer
                assert false_steps(text) == [], p.steps
                checked += sum(bool(false_steps(f"<think>\n{s.split(' = ')[0]} = 99999\n</think>")) for s in p.steps)
    assert checked > 10000  # the checker reads most lines: with a wrong result they are flagged


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
from test_grpo_math import sevens
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
