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
