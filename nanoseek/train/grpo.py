"""`nanoseek grpo`: reasoning by reinforcement learning with verifiable rewards (DeepSeek-R1-Zero / R1).

Each step samples `prompts_per_step` problems, rolls out G completions per problem through the engine (one batched,
KV-cached generation; the G copies of a prompt share one prefill), scores them with the rule-based rewards of
`rewards.py`, and takes `updates_per_batch` optimiser steps on the same rollouts.

Advantage of completion i in its group of G (rewards r):
    grpo, dapo:  A_i = (r_i − mean(r)) / (std(r) + 1e-4)        (std over the group, population form)
    dr_grpo:     A_i =  r_i − mean(r)                             (Dr. GRPO: no std division)
Per completion token t, with ρ = π(o_t)/π_old(o_t) and the k3 KL estimate to the frozen reference, bounded as
verl bounds it (log π_ref/π clamped to ±20 before exp, the estimate to at most 10)
    KL_t = min(π_ref/π − log(π_ref/π) − 1, 10):
(the bound matters for MoE: one Adam step at lr 1e-4 flips a few tokens' expert routing and moves their log-probs by
several nats; unbounded, exp() of that gave a mean KL of 23 and a gradient norm of 519 at the second update)
    ℓ_t = −[ min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) − β·KL_t ]
and the batch loss aggregates ℓ as
    grpo:     mean over completions of (mean over the completion's tokens)     (R1's sample-level loss)
    dr_grpo:  mean over completions of (sum over tokens / max_new_tokens)      (constant length normaliser)
    dapo:     sum over all tokens of the batch / number of tokens              (token-level loss)
ε_high = ε_low unless set (dapo's default is 0.28). dapo also drops groups whose rewards are all equal (dynamic
sampling: up to 3 extra rollout rounds refill the batch) and applies the soft overlong penalty of rewards.py.
β = 0 skips the reference model entirely, and with it the forward and backward of every completion whose advantage
is 0 (the gradient is the same; metric `trained` is the fraction that ran). kl, clipped and entropy are per token
of the completions the update ran on. Metric `false_steps` is the share of rollouts whose reasoning states a false
arithmetic fact (`rewards.false_steps`, e.g. "7 × 6 = 43"): wrong answers that do are slips in the working, not a
wrong plan.

Problems: the task suite's train split (`--tasks`, evenly or `--adaptive-tasks`), or the user's own verifiable
problems (`--data FILE.jsonl`, GSM8K format as `nanoseek eval` reads it), drawn in a seeded order that reshuffles
every pass over the file; `--eval-data` scores a held-out file of the same format instead of the suite's eval split.

Under `torchrun --nproc_per_node=N` the same command runs data-parallel: every rank draws the step's problems, rolls
out its 1/N of them (each completion seeded as one process would seed it, so grpo and dr_grpo sample the same
rollouts), and the gradients of its rows, scaled by the whole batch's normalisers, are summed over the ranks before
clipping; the curriculum sees every rank's accuracy; rank 0 evaluates, logs and saves. A test matches 2 gloo
processes against one.

Modes: `r1` starts from an SFT model and prompts with its chat template (which prefills `<think>\\n`);
`r1-zero` starts from a base model with R1-Zero's plain-text template. In both, the answer follows `</think>`
(R1-Zero's `<answer>` tags are not used, so one reward function serves both).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model
from ..flops import flops_per_token, generation_flops
from . import loop, runlock
from .distributed import Dist, init_distributed
from . import metrics as metrics_lib
from .curriculum import Curriculum, task_cells
from .rewards import false_steps, judge
from .stopping import StopOnSignal

LOSSES = ("grpo", "dr_grpo", "dapo")
KL_LOG_RATIO, KL_MAX = 20.0, 10.0  # the k3 estimate's bounds (module docstring)
TRUNCATION_WARNING = 0.2  # warn (once) when more than this share of a step's completions is cut off
EXTRA_ROUNDS = 1 << 24  # dapo's extra rollout rounds are seeded as steps from here on


@dataclass
class GRPOConfig(loop.TrainConfig):
    model: str = ""
    mode: str = "r1"  # r1 | r1-zero
    loss: str = "grpo"  # grpo | dr_grpo | dapo
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])  # family[:level] of the task suite
    data: str | None = None  # GSM8K-format JSONL to train on instead of the task suite
    eval_data: str | None = None  # GSM8K-format JSONL for the periodic evaluation instead of the suite's eval split
    adaptive_tasks: bool = False  # draw task cells by learnability p(1 - p) of their running accuracy (Curriculum)
    steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8  # G
    max_new_tokens: int = 256  # the task suite's worked solutions take ~60-200 tokens; a cut-off one earns nothing
    temperature: float = 1.0
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    beta: float = 0.001  # KL weight; 0 turns the reference model off
    clip_eps: float = 0.2  # ε_low
    clip_eps_high: float | None = None  # ε_high; None: ε_low (dapo: 0.28)
    updates_per_batch: int = 2  # μ, optimiser steps per rollout batch
    micro_batch_size: int = 32  # completions per forward in the update
    format_weight: float = 0.2
    overlong_cache: int | None = None  # dapo soft overlong penalty width (default max_new_tokens // 4); 0: off
    eval_every: int = 20
    eval_n: int = 100
    save_every: int = 20

    @property
    def eps_high(self) -> float:  # as given, else dapo's clip-higher 0.28, else ε_low
        return self.clip_eps_high if self.clip_eps_high is not None else 0.28 if self.loss == "dapo" else self.clip_eps

    @property
    def overlong_width(self) -> int:  # the soft overlong penalty's tokens: as given, else dapo's max_new // 4, else 0
        return self.overlong_cache if self.overlong_cache is not None else self.max_new_tokens // 4 * (self.loss == "dapo")


# --- the math (pure functions, tested by hand) -----------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, loss: str) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G); exactly 0 for a group whose rewards are all equal (the mean of G equal
    floats can differ from them in the last bit, which the std division would blow up to 1e-4 - 6e-4)."""
    uniform = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    centered = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(uniform, 0.0)
    if loss == "dr_grpo" or not rewards.numel():  # (none: a rank whose dynamic-sampling batch kept no group)
        return centered
    return centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + 1e-4)


def policy_loss(logp, old_logp, ref_logp, adv, mask, loss: str, eps_low: float, eps_high: float, beta: float,
                n_seqs: int, n_tokens: int, max_new_tokens: int):
    """logp/old_logp/ref_logp/mask (B, T) over completion tokens, adv (B,). n_seqs / n_tokens are the totals of the
    whole rollout batch, so micro-batch contributions add up to the batch loss. Returns (loss, stats)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * a, clipped * a)
    kl = torch.zeros_like(logp)
    if beta > 0 and ref_logp is not None:
        log_r = (ref_logp - logp).clamp(-KL_LOG_RATIO, KL_LOG_RATIO)
        kl = (torch.exp(log_r) - log_r - 1).clamp(max=KL_MAX)
    per_token = -(surrogate - beta * kl) * mask
    if loss == "grpo":
        total = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif loss == "dr_grpo":
        total = (per_token.sum(1) / max_new_tokens).sum() / n_seqs
    elif loss == "dapo":
        total = per_token.sum() / n_tokens
    else:
        raise ValueError(f"unknown loss {loss!r}")
    with torch.no_grad():
        was_clipped = ((ratio * a) > (clipped * a)).float() * mask  # the clipped branch is the one taken
        stats = {"kl": (kl * mask).sum().item(), "clipped": was_clipped.sum().item()}
    return total, stats


def completion_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, with_entropy: bool = False,
                        temperature: float = 1.0):
    """ids (B, T) prompt+completion, mask (B, T) 1 on completion tokens -> log π(token | prefix) (B, T-1), aligned
    with mask[:, 1:]; and the summed entropy over masked positions. π is the sampling distribution, softmax(logits /
    temperature), so the importance ratio compares like with like when rollouts are sampled below temperature 1.
    On a GPU the forward runs under bf16 autocast, as training's does (old, new and reference log-probs alike)."""
    with loop.mixed_precision(ids.device):
        logits = model(ids[:, :-1])
    logits = logits.float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask[:, 1:]).sum().item()
    return logp, entropy


# --- rollouts ----------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    ids: torch.Tensor  # (N, T) prompt + completion, right-padded
    mask: torch.Tensor  # (N, T) 1 on completion tokens
    rewards: torch.Tensor  # (P, G)
    accuracy: torch.Tensor
    fmt: torch.Tensor
    lengths: torch.Tensor  # (N,) completion lengths
    truncated: float
    n_groups_dropped: int = 0
    false_rate: float = 0.0  # fraction of completions whose reasoning states a false arithmetic fact


def prompt_style(cfg: GRPOConfig) -> str:
    """r1 prompts through the chat template (prefilling `<think>`), r1-zero through R1-Zero's plain template."""
    return "chat" if cfg.mode == "r1" else "r1-zero"


def rollout(cfg: GRPOConfig, engine, tok, problems, step: int, curriculum: Curriculum, d: Dist) -> Rollout:
    """This rank's share of `problems` (the step's, the same on every rank), G completions each, judged. The
    curriculum observes the accuracy of all of them, gathered from every rank."""
    from ..eval.evaluate import check_context, prompts_for

    P = len(problems) // d.world_size
    prompts = prompts_for(problems, tok, prompt_style(cfg))
    check_context(prompts, cfg.max_new_tokens, engine.max_seq_len, "the rollout engine, sized from a sample of the "
                  "task's prompts: a shorter --max-new-tokens leaves room")  # every rank checks all: one error line
    mine, prompts = problems[d.rank * P : (d.rank + 1) * P], prompts[d.rank * P : (d.rank + 1) * P]  # this rank's
    G = cfg.group_size
    flat = [p for p in prompts for _ in range(G)]
    seed = cfg.seed * 7919 + step * 65537 + d.rank * P * G  # completion i is seeded seed + i, as in one process
    outs = engine.generate(flat, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                           stop_token_ids=[tok.eos_id])
    prefix = "<think>\n" if cfg.mode == "r1" else ""  # the chat template prefilled it
    judged, seqs, masks, n_false = [], [], [], 0
    for i, out in enumerate(outs):
        finished = bool(out) and out[-1] == tok.eos_id
        text = prefix + tok.decode(out[:-1] if finished else out)
        judged.append(judge(text, mine[i // G], finished, cfg.format_weight, len(out), cfg.max_new_tokens,
                            cfg.overlong_width))
        seqs.append(flat[i] + out)
        masks.append([0] * len(flat[i]) + [1] * len(out))
        n_false += bool(false_steps(text))
    T = max(len(s) for s in seqs)
    pad = tok.eos_id
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.float32)
    as_tensor = lambda key: torch.tensor([getattr(j, key) for j in judged]).view(P, G)  # noqa: E731
    lengths = torch.tensor([len(o) for o in outs], dtype=torch.float32)
    truncated = sum(1 for o in outs if not (o and o[-1] == tok.eos_id)) / len(outs)
    curriculum.observe(problems, d.all_gather(as_tensor("accuracy")))
    return Rollout(ids, mask, as_tensor("reward"), as_tensor("accuracy"), as_tensor("format"), lengths, truncated,
                   false_rate=n_false / len(outs))


def keep_groups(r: Rollout, keep: torch.Tensor, dropped: bool = True) -> Rollout:
    """Sub-select groups (P,) bool; rows of ids/mask follow their group. `dropped`: count the others in
    n_groups_dropped (groups without signal), else keep the count (a batch trimmed to its share)."""
    G = r.rewards.shape[1]
    rows = keep.repeat_interleave(G)
    n_dropped = r.n_groups_dropped + int((~keep).sum()) if dropped else r.n_groups_dropped
    return Rollout(r.ids[rows], r.mask[rows], r.rewards[keep], r.accuracy[keep], r.fmt[keep], r.lengths[rows],
                   r.truncated, n_dropped, r.false_rate)


def concat(a: Rollout, b: Rollout) -> Rollout:
    T = max(a.ids.shape[1], b.ids.shape[1])
    pad = lambda t, v: F.pad(t, (0, T - t.shape[1]), value=v)  # noqa: E731
    na, nb = a.ids.shape[0], b.ids.shape[0]
    share = lambda x, y: (x * na + y * nb) / max(1, na + nb)  # noqa: E731  (per-completion rates of both)
    return Rollout(torch.cat([pad(a.ids, 0), pad(b.ids, 0)]), torch.cat([pad(a.mask, 0), pad(b.mask, 0)]),
                   torch.cat([a.rewards, b.rewards]), torch.cat([a.accuracy, b.accuracy]), torch.cat([a.fmt, b.fmt]),
                   torch.cat([a.lengths, b.lengths]), share(a.truncated, b.truncated),
                   a.n_groups_dropped + b.n_groups_dropped, share(a.false_rate, b.false_rate))


def collect(cfg: GRPOConfig, engine, tok, step: int, curriculum: Curriculum, d: Dist) -> tuple[Rollout, Rollout]:
    """-> (this rank's batch to train on, everything it sampled, for the metrics). dapo drops all-equal groups and
    refills, round by round on every rank until each has its share (under torchrun each rank keeps the first groups
    with signal among its own, so the batch is not the one a single process would keep)."""
    seen = rollout(cfg, engine, tok, curriculum.sample(step, 0, cfg.prompts_per_step), step, curriculum, d)
    if cfg.loss != "dapo":
        return seen, seen
    share = cfg.prompts_per_step // d.world_size
    batch = keep_groups(seen, seen.rewards.std(dim=1) > 0)
    for round_ in range(1, 4):
        short = d.all_reduce_sum_(torch.tensor(float(batch.rewards.shape[0] < share), device=d.device))
        if not short.item():
            break
        # seeded as a step of its own beyond any real one (step·10 + round met step 10·s + r's main rollout), and
        # not by --steps, which a resumed run may extend
        extra = rollout(cfg, engine, tok, curriculum.sample(step, round_, cfg.prompts_per_step),
                        EXTRA_ROUNDS + step * 4 + round_, curriculum, d)
        seen = concat(seen, extra)
        batch = concat(batch, keep_groups(extra, extra.rewards.std(dim=1) > 0))
    n = min(share, batch.rewards.shape[0])
    keep = torch.zeros(batch.rewards.shape[0], dtype=torch.bool)
    keep[:n] = True
    return keep_groups(batch, keep, dropped=False), seen


# --- FLOPs for the cost table -------------------------------------------------------------------------------------------
def rollout_flops(mc, r: Rollout) -> float:
    """Generation: each group's prompt is prefilled once, its G completions decoded with the KV cache."""
    G = r.rewards.shape[1]
    prompt, lengths = r.mask.argmax(dim=1).tolist(), r.lengths.long().tolist()  # argmax: first completion position
    return sum(generation_flops(mc, prompt[g], lengths[g : g + G]) for g in range(0, len(prompt), G))


def update_flops(mc, row_lengths: list[int], updates: int, extra_forwards: int) -> float:
    """The update's forward + backward over rows of these lengths (prompt + completion), μ times, plus
    `extra_forwards` forwards over them (old log-probs for μ > 1, the reference for β > 0). Padding is not counted."""
    train = sum(t * flops_per_token(mc, t, training=True, with_mtp=False) for t in row_lengths)
    forward = sum(t * flops_per_token(mc, t, training=False, with_mtp=False) for t in row_lengths)
    return float(updates * train + extra_forwards * forward)


# --- the run -------------------------------------------------------------------------------------------------------------
def update(cfg: GRPOConfig, model, ref, opt, r: Rollout, d: Dist, step: int = 0) -> dict:
    """`updates_per_batch` optimiser steps on one rollout batch (this rank's part of it: the loss's normalisers are
    the whole batch's, and the gradients are summed over the ranks before clipping); `step` (1-based) names the run's
    step in the error that stops a diverged run."""
    device = d.device
    adv = group_advantages(r.rewards, cfg.loss).flatten()
    T = cfg.temperature  # the loss scores the distribution the rollouts were sampled from
    total = lambda x: d.all_reduce_sum_(torch.tensor(float(x), dtype=torch.float64, device=device)).item()  # noqa: E731
    n_seqs, n_tokens = int(total(r.ids.shape[0])), max(1.0, total(r.mask[:, 1:].sum().item()))
    # Without a KL term a completion whose advantage is 0 (its group's rewards all equal) adds exactly 0 to the
    # gradient, so it is not run at all; the normalisers above stay those of the whole batch, and one completion is
    # kept if none has signal, so the optimiser still steps (momentum, weight decay) as it would have.
    train = adv != 0 if ref is None else torch.ones_like(adv, dtype=torch.bool)
    if not total(train.sum().item()):  # kept on the first rank that has completions (dapo may have left a rank none)
        first = int((d.all_gather(torch.tensor([train.numel()])) > 0).nonzero()[0])
        train[:1] = d.rank == first
    rows = train.nonzero().flatten()
    n_trained_tokens = max(1.0, total(r.mask[rows, 1:].sum().item()))
    # Rows are right-padded to the longest of the whole rollout batch: micro-batch rows of similar length and cut
    # each micro-batch to its own longest, so the forward does not run over columns of padding.
    T_all = r.mask.shape[1]
    ends = torch.where(r.mask.any(dim=1), T_all - r.mask.flip(1).argmax(dim=1), 1)  # (n_seqs,) prompt + completion
    rows = rows[ends[rows].argsort(stable=True)]
    chunks = [rows[i : i + cfg.micro_batch_size] for i in range(0, len(rows), cfg.micro_batch_size)]
    spans = [int(ends[c].max()) for c in chunks]
    old, ref_lp = [], []
    with torch.no_grad():
        for c, L in zip(chunks, spans):
            ids, mask = r.ids[c, :L].to(device), r.mask[c, :L].to(device)
            old.append(completion_logprobs(model, ids, mask, temperature=T)[0] if cfg.updates_per_batch > 1 else None)
            ref_lp.append(completion_logprobs(ref, ids, mask, temperature=T)[0] if ref is not None else None)
    stats = {"kl": 0.0, "clipped": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.updates_per_batch):
        opt.zero_grad(set_to_none=True)
        for k, (c, L) in enumerate(zip(chunks, spans)):
            ids, mask = r.ids[c, :L].to(device), r.mask[c, :L].to(device)
            logp, ent = completion_logprobs(model, ids, mask, with_entropy=True, temperature=T)
            old_lp = old[k] if old[k] is not None else logp.detach()
            loss, st = policy_loss(logp, old_lp, ref_lp[k], adv[c].to(device), mask[:, 1:], cfg.loss, cfg.clip_eps,
                                   cfg.eps_high, cfg.beta, n_seqs, n_tokens, cfg.max_new_tokens)
            loss.backward()
            stats["kl"] += st["kl"] / n_trained_tokens / cfg.updates_per_batch
            stats["clipped"] += st["clipped"] / n_trained_tokens / cfg.updates_per_batch
            stats["entropy"] += ent / n_trained_tokens / cfg.updates_per_batch
        d.all_reduce_grads(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        loop.stop_if_diverged(grad_norm, cfg, "grpo", step)
        stats["grad_norm"] += grad_norm.item() / cfg.updates_per_batch
        opt.step()
        model.update_routing_bias(0.0)  # RL leaves the routing bias alone; drop the accumulated loads
    for k in ("kl", "clipped", "entropy"):  # each rank's share of the batch's per-token means
        stats[k] = total(stats[k])
    stats["trained"] = total(len(rows)) / n_seqs
    stats["flops"] = total(update_flops(model.config, ends[rows].tolist(), cfg.updates_per_batch,
                                        int(cfg.updates_per_batch > 1) + int(ref is not None)))
    return stats


def eval_problems(cfg: GRPOConfig) -> list:
    """The problems of the periodic evaluation (eval.evaluate.held_out_or_data)."""
    from ..eval.evaluate import held_out_or_data

    return held_out_or_data(cfg.eval_data, cfg.data, cfg.eval_n, {f for f, _ in task_cells(cfg)}, seed=12345)


def sample_prompts(cfg: GRPOConfig, tok, per_cell: int = 64) -> list[list[int]]:
    """Prompts of `per_cell` training problems of each task cell: what the rollouts will look like, to size the
    engine (the task suite's problems are drawn step by step, so the longest is not known in advance)."""
    from ..data.tasks import generate
    from ..eval.evaluate import prompts_for

    problems = [p for family, level in task_cells(cfg) for p in generate(family, level, per_cell, seed=cfg.seed)]
    return prompts_for(problems, tok, prompt_style(cfg))


def evaluate(cfg: GRPOConfig, engine, tok, problems: list) -> dict:
    from ..eval.evaluate import run_eval, summarize

    results = run_eval(engine, tok, problems, max_new_tokens=cfg.max_new_tokens, style=prompt_style(cfg), progress=False)
    return summarize(results)


def weights_digest(model) -> str:
    """sha256 of a model's weights, names and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def reference_model(cfg: GRPOConfig, model, state: dict, d: Dist):
    """(the frozen reference the KL term pulls toward, its weights' digest): the starting model. A resumed run
    reloads it from --model, which must still hold the weights the run started from."""
    from ..checkpoint import CheckpointError
    from ..cli import UserError

    if not state:
        return copy.deepcopy(model).requires_grad_(False).eval(), weights_digest(model)
    try:
        ref = load_model(Path(cfg.model), device=d.device)
    except (OSError, ValueError, CheckpointError) as e:  # (ConfigError is a ValueError)
        raise UserError(f"the run's reference model (its starting --model {cfg.model}, which the KL term, β > 0, "
                        f"pulls toward) cannot be loaded: {e}") from None
    digest = weights_digest(ref)
    if state.get("reference_sha256") not in (None, digest):
        raise UserError(f"{cfg.model} no longer holds the model this run started from, the reference of its KL term "
                        "(β > 0): put that model back to resume, or start a new run")
    return ref.requires_grad_(False).eval(), digest


@runlock.releasing
def grpo(cfg: GRPOConfig) -> dict | None:
    from ..cli import UserError
    from ..engine.engine import Engine
    from ..eval.evaluate import check_context, prompts_for
    from ..tokenizer import Tokenizer

    if cfg.loss not in LOSSES or cfg.mode not in ("r1", "r1-zero"):
        raise UserError(f"--loss must be one of {LOSSES} and --mode r1 or r1-zero")
    if not 0 < cfg.temperature <= 2:
        raise UserError(f"--temperature must be in (0, 2] (GRPO needs sampled groups), got {cfg.temperature}")
    if cfg.overlong_cache is not None and cfg.overlong_cache >= cfg.max_new_tokens:
        raise UserError(f"--overlong-cache {cfg.overlong_cache} must be less than --max-new-tokens "
                        f"{cfg.max_new_tokens}: it is the last stretch before the budget (a longer one penalises "
                        "short answers)")
    if cfg.data and cfg.adaptive_tasks:
        raise UserError("--adaptive-tasks weighs the task suite's cells; with --data the file's problems are drawn "
                        "in turn")
    d = init_distributed(cfg.device)
    cfg, resuming = loop.restore_config(loop.absolute_paths(cfg, "model", "data", "eval_data"))
    if cfg.prompts_per_step % d.world_size:  # after restore_config: a resumed run keeps its own value
        raise UserError(f"--prompts-per-step {cfg.prompts_per_step} does not split evenly over {d.world_size} processes"
                        + ("; a resumed run keeps its own: resume it with a process count that divides it" if resuming
                           else ""))
    d.barrier()  # every rank has read the run directory before rank 0 writes to it
    pool = None
    if cfg.data:
        from ..eval.evaluate import load_problems

        pool = load_problems(None, cfg.data, 0, 0)
    scored = eval_problems(cfg) if cfg.eval_every else []
    if cfg.data and not scored and cfg.eval_every:
        loop.notice("grpo: training on --data without --eval-data: no periodic held-out evaluation")
    if cfg.eval_data and not cfg.eval_every:
        loop.notice("grpo: --eval-data is not used: --eval-every 0 turns the periodic evaluation off")
    run = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    source = run / "model" if resuming else Path(cfg.model)
    tok = Tokenizer.from_dir(source)
    model = load_model(source, device=d.device)
    context = model.config.max_position_embeddings
    every = (pool or []) + scored  # one prompt at a time: a --data file of a million problems is not held as tokens
    longest = check_context((prompts_for([p], tok, prompt_style(cfg))[0] for p in every), cfg.max_new_tokens, context)
    if pool is None:  # the suite's prompts: a sample of them, with a quarter to spare for longer ones
        sampled = check_context(sample_prompts(cfg, tok), cfg.max_new_tokens, context,
                                "a sample of the task's training prompts")  # refuse now, not at a later step
        longest = max(longest, math.ceil(1.25 * sampled))
    if d.is_main:
        loop.make_run_dir(run)
    opt = loop.make_optimizer(model, cfg.lr, cfg.weight_decay)
    start, prior_wall, flops, state = 0, 0.0, 0.0, {}
    curriculum = Curriculum(cfg, pool)
    if resuming:
        state = loop.load_train_state(run, opt)
        start, prior_wall, flops = state["step"], state["wall_s"], state.get("flops", 0.0)
        try:
            curriculum.load_state_dict(state["data"])
        except ValueError as e:
            raise UserError(f"{run}: {e}") from None
    ref, ref_digest = reference_model(cfg, model, state, d) if cfg.beta > 0 else (None, None)
    if not resuming and d.is_main:
        (run / "tokenizer").mkdir(exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (run / "tokenizer" / f).write_bytes((source / f).read_bytes())
    d.barrier()
    extra = [run / "tokenizer" / f for f in ("tokenizer.json", "tokenizer_config.json")]
    engine = Engine(model, max_batch_size=cfg.prompts_per_step // d.world_size * cfg.group_size,
                    max_seq_len=min(context, max(256, longest) + cfg.max_new_tokens))
    metrics = metrics_lib.Metrics(run / "metrics.jsonl", start if resuming else None, enabled=d.is_main)
    scored = scored if d.is_main else []  # rank 0 evaluates
    bar = None
    if cfg.progress and d.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.end, initial=start, desc=f"grpo ({cfg.loss})", unit="step", file=sys.stderr, dynamic_ncols=True)
    timer = metrics_lib.Timer()
    row, warned = {}, False
    if start == 0 and scored and cfg.eval_every:
        with timer.excluding():  # held-out evaluations are not the stage's cost (nor are any other stage's)
            metrics.log({"step": 0, "eval": evaluate(cfg, engine, tok, scored)})
    with StopOnSignal("grpo", d.world_size) as stop:  # a Ctrl-C or SIGTERM: finish the step, save, stop
        for step in range(start, cfg.end):
            lr = loop.lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            model.eval()
            batch, seen = collect(cfg, engine, tok, step, curriculum, d)
            t1 = time.perf_counter()
            model.train()
            trainable = d.all_reduce_sum_(torch.tensor(float(batch.rewards.numel()), device=d.device)).item()
            stats = update(cfg, model, ref, opt, batch, d, step + 1) if trainable else {}  # dapo may drop every group
            if not trainable:
                loop.notice(f"grpo: step {step + 1}: every group's rewards were equal, also after 3 more rollout "
                            "rounds: no update (the problems are all solved or all failed; see --tasks / --data)")
            t2 = time.perf_counter()
            flops += d.all_reduce_sum_(torch.tensor(rollout_flops(model.config, seen), dtype=torch.float64,
                                                    device=d.device)).item() + stats.pop("flops", 0.0)
            # every rank sampled as many completions: the means of the ranks' means are the batch's
            reward, acc, fmt, length, truncated, false_rate, stopping = d.all_reduce_mean(torch.tensor(
                [seen.rewards.mean().item(), seen.accuracy.mean().item(), seen.fmt.mean().item(),
                 seen.lengths.mean().item(), seen.truncated, seen.false_rate, stop.requested],
                dtype=torch.float64, device=d.device)).tolist()
            row = {
                "step": step + 1, "reward": round(reward, 4), "accuracy": round(acc, 4), "format_rate": round(fmt, 4),
                "response_length": round(length, 2), "truncated": round(truncated, 4),
                "groups_dropped": int(d.all_reduce_sum_(torch.tensor(batch.n_groups_dropped, device=d.device)).item()),
                "false_steps": round(false_rate, 4),
                **{k: round(v, 5) for k, v in stats.items()}, "lr": lr,
                "rollout_s": round(t1 - t0, 2), "update_s": round(t2 - t1, 2),
                "wall_s": round(prior_wall + timer.elapsed(), 2),
            }
            if cfg.adaptive_tasks:
                row["cell_accuracy"] = {k: round(v, 3) for k, v in curriculum.accuracy.items()}
            if scored and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.end):
                model.eval()
                before = timer.excluded
                with timer.excluding():
                    row["eval"] = evaluate(cfg, engine, tok, scored)
                row["eval_s"] = round(timer.excluded - before, 2)
            metrics.log(row)
            if truncated > TRUNCATION_WARNING and not warned and d.is_main:  # RL's most common silent failure: say it
                warned = True
                (bar.write if bar is not None else print)(
                    f"grpo: {truncated:.0%} of step {step + 1}'s completions hit --max-new-tokens "
                    f"{cfg.max_new_tokens}; a cut-off completion fails the format check and earns no reward: raise "
                    "--max-new-tokens", file=sys.stderr)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                                len=f"{row['response_length']:.0f}")
            stopping = stop.agreed(stopping)
            if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.end or stopping) and d.is_main:
                loop.save_checkpoint(run, model, opt, step + 1, {
                    "data": curriculum.state_dict(), "wall_s": prior_wall + timer.elapsed(), "flops": flops,
                    "config": dataclasses.asdict(cfg), "reference_sha256": ref_digest}, extra)
            if stopping and step + 1 < cfg.end:
                d.barrier()
                raise stop.stopped(step + 1, run)
    if bar is not None:
        bar.close()
    d.close()
    if not d.is_main:
        return None
    cost = metrics_lib.run_cost(run, d, prior_wall + timer.elapsed(), flops, cfg.price_per_hour)
    return metrics_lib.run_summary("grpo", run, max(start, cfg.end), row, cost)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, OneFile, bounded

    p.add_argument("--model", default="",
                   help="starting model: the SFT model (r1) or a base model (r1-zero); "
                        "--resume of a run uses its own")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--mode", choices=["r1", "r1-zero"], default="r1",
                   help="r1: prompts through the model's chat template (after SFT); r1-zero: R1-Zero's plain-text "
                        "template, for a base model that can follow an instruction (default r1)")
    p.add_argument("--loss", choices=LOSSES, default="grpo", help="grpo (R1), dr_grpo, or dapo")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tasks", nargs="+", default=["arithmetic"],
                     help="task-suite families[:level] to train on (default: arithmetic; every family: "
                          "arithmetic word countdown)")
    src.add_argument("--data", action=OneFile, help="train on your own problems instead: GSM8K-format JSONL "
                     "(question, answer '... #### N' or 'N', as `nanoseek eval --data` reads), drawn in a seeded order")
    p.add_argument("--adaptive-tasks", action="store_true",
                   help="draw the tasks' levels by learnability p(1-p) of their running rollout accuracy, not evenly")
    p.add_argument("--steps", type=POSITIVE_INT, default=60, help="rollout batches (default 60)")
    p.add_argument("--prompts-per-step", type=POSITIVE_INT, default=16, help="problems per rollout batch (default 16)")
    p.add_argument("--group-size", type=bounded(int, 2), default=8, help="G, completions per prompt")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256,
                   help="completion budget; a completion cut off here fails the format check and earns no reward")
    p.add_argument("--temperature", type=bounded(float, 0, 2, low_open=True), default=1.0,
                   help="rollout sampling temperature; the loss scores the same softmax(logits / T)")
    p.add_argument("--lr", type=POSITIVE, default=1e-4, help="learning rate, constant (default 1e-4)")
    p.add_argument("--beta", type=NONNEGATIVE, default=0.001, help="KL weight (0: no reference model)")
    p.add_argument("--clip-eps", type=bounded(float, 0, 1, low_open=True), default=0.2,
                   help="ε, the importance ratio's clip range [1 - ε, 1 + ε] (default 0.2)")
    p.add_argument("--clip-eps-high", type=POSITIVE, help="upper clip (default ε; dapo 0.28)")
    p.add_argument("--overlong-cache", type=NONNEGATIVE_INT, metavar="L",
                   help="soft overlong penalty: a completion's last L tokens before --max-new-tokens cost up to 1 "
                        "reward (default: dapo max-new-tokens // 4, else 0 = off)")
    p.add_argument("--updates-per-batch", type=POSITIVE_INT, default=2, help="μ, optimiser steps per rollout batch")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT, default=32, help="completions per forward in the update")
    p.add_argument("--format-weight", type=NONNEGATIVE, default=0.2,
                   help="reward for a well-formed <think>…</think> answer, on top of 1 for a right one (default 0.2)")
    p.add_argument("--eval-every", type=NONNEGATIVE_INT, default=20,
                   help="evaluate on the held-out split every K steps (0: never)")
    p.add_argument("--eval-n", type=POSITIVE_INT, default=100, help="held-out problems per evaluation (default 100)")
    p.add_argument("--eval-data", action=OneFile,
                   help="GSM8K-format JSONL to evaluate on instead of the task suite's held-out split")
    loop.add_run_arguments(p, "seed of the rollouts and the problems drawn", save_every=20)


def run(args: argparse.Namespace) -> int:
    keys = ("model", "out", "mode", "loss", "tasks", "data", "eval_data", "adaptive_tasks", "steps", "prompts_per_step",
            "group_size", "max_new_tokens", "temperature", "lr", "beta", "clip_eps", "clip_eps_high", "overlong_cache",
            "updates_per_batch",
            "micro_batch_size", "format_weight", "eval_every", "eval_n", "seed", "save_every", "stop_at", "resume",
            "device", "price_per_hour")
    result = grpo(GRPOConfig(**{k: getattr(args, k) for k in keys}, progress=not args.no_progress))
    if result is not None:  # rank 0 under torchrun
        print(json.dumps(result))
    return 0
