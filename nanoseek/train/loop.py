"""What every training stage shares: the optimiser and LR schedule, atomic checkpoints with exact
resume, and the optimisation loop (the metrics file and the cost table are in metrics.py).

Run directory layout:
    RUN/model          -> current/model          an HF model directory (+ tokenizer files)
    RUN/train_state    -> current/train_state    optimizer.safetensors + state.json (step, data position, RNG, config)
    RUN/current        -> ckpt/step-000123       switched with one atomic rename, so a run killed at any moment
                                                 resumes from a complete checkpoint (model and state always agree)
    RUN/metrics.jsonl                            one JSON object per logged step
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import atomic
from ..checkpoint import save_model
from ..data.chat_tokens import FILES as CHAT_TOKEN_FILES
from ..data.corpus import SHARD_FILES
from ..flops import flops_per_token
from ..model.mtp import mtp_loss
from . import muon as muon_lib
from . import runlock
from .distributed import Dist
from .metrics import Metrics, Timer, device_peak_flops, run_cost, run_summary
from .stopping import StopOnSignal

KEEP_CHECKPOINTS = 2


def notice(msg: str) -> None:
    """A line on stderr for the user, from one process only (under torchrun every rank reaches the same notices)."""
    from ..cli import rank

    if rank() == 0:
        print(msg, file=sys.stderr)



# --- optimiser and schedule ------------------------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "muon")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                   kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW, or Muon for the layers' matrices and AdamW for the rest (muon.py); weight decay on matrices (and
    embeddings), none on norms and biases."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {OPTIMIZERS}")
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if kind == "muon" and muon_lib.is_muon_param(name, p):
                muon.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "muon":
        return muon_lib.Muon([{"params": muon, "weight_decay": weight_decay, "muon": True}] + groups, lr=lr,
                             betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def mixed_precision(device) -> torch.autocast:
    """bf16 autocast for a training forward on a GPU (float32 master weights; the router stays float32, moe.py);
    off on the CPU, where training is plain float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
          decay_frac: float = 0.2) -> float:
    """Linear warmup, then cosine to min_ratio·peak, or WSD (warmup, stable, then linear down to min_ratio·peak over
    the last decay_frac of the steps, reached at the last one)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_frac))
        if step < decay_start:
            return peak
        frac = (step + 1 - decay_start) / max(1, total - decay_start)
        return peak * (1 - (1 - min_ratio) * frac)
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"{idx}.{k}": v.detach().cpu().contiguous() for idx, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors, {"python": _jsonable(random.getstate())}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():  # by index, for the GPUs this machine shows (a run may resume on fewer)
        for key, state in tensors.items():
            if key.startswith("cuda") and int(key[4:]) < torch.cuda.device_count():
                torch.cuda.set_rng_state(state, int(key[4:]))
    random.setstate(_tuplify(meta["python"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(run: Path, model, opt, step: int, state: dict, extra_files: list[Path] = ()) -> Path:
    """Write ckpt/step-N/{model,train_state} under a temporary name, then switch RUN/current to it atomically."""
    run = Path(run)
    name = f"step-{step:06d}"
    final = run / "ckpt" / name
    tmp = run / "ckpt" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp / "model")
        for f in extra_files:
            shutil.copy2(f, tmp / "model" / Path(f).name)
        (tmp / "train_state").mkdir(parents=True)
        opt_t, opt_meta = _optimizer_tensors(opt)
        save_file(opt_t, str(tmp / "train_state" / "optimizer.safetensors"))
        rng_t, rng_meta = rng_state()
        save_file(rng_t, str(tmp / "train_state" / "rng.safetensors"))
        state = {**state, "step": step, "optimizer": opt_meta, "rng": rng_meta}
        (tmp / "train_state" / "state.json").write_text(json.dumps(state, indent=1))
    except (OSError, SafetensorError) as e:  # a full disk: say what is kept, and leave no half-written copy behind
        from ..cli import UserError

        shutil.rmtree(tmp, ignore_errors=True)
        kept = (f"{run}'s checkpoint of {os.readlink(run / 'current').removeprefix('ckpt/')} is kept: continue with "
                "--resume" if (run / "current").is_symlink() else "no earlier checkpoint was saved")
        raise UserError(f"could not save the checkpoint of step {step} in {run / 'ckpt'} ({e}); {kept}") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for sub in ("model", "train_state"):  # before the switch: once `current` exists, the run resumes through them
        if not (run / sub).is_symlink():
            (run / sub).symlink_to(Path("current") / sub)
    link_tmp = run / ".current.tmp"
    link_tmp.unlink(missing_ok=True)
    link_tmp.symlink_to(Path("ckpt") / name)
    os.replace(link_tmp, run / "current")  # the atomic switch
    # keep this checkpoint and the one before; a later step's is from an abandoned start (a fresh run over the
    # leftovers of a failed one)
    steps = sorted(((int(p.name[5:]), p) for p in (run / "ckpt").glob("step-*") if p.name[5:].isdigit()))
    earlier = [p for s, p in steps if s <= step]
    for old in earlier[:-KEEP_CHECKPOINTS] + [p for s, p in steps if s > step]:
        shutil.rmtree(old, ignore_errors=True)
    for orphan in (run / "ckpt").glob(".step-*.tmp"):  # a save a kill cut short, at a step this run may never save
        shutil.rmtree(orphan, ignore_errors=True)  # again (the run directory's lock: no other writer's)
    return final


def has_checkpoint(run: Path) -> bool:
    return (Path(run) / "train_state" / "state.json").is_file()


def load_train_state(run: Path, opt) -> dict:
    """Restore optimizer and RNG from RUN/train_state; return the JSON state (step, data position, config)."""
    ts = Path(run) / "train_state"
    state = json.loads((ts / "state.json").read_text())
    _load_optimizer(opt, load_file(str(ts / "optimizer.safetensors")), state["optimizer"])
    set_rng_state(load_file(str(ts / "rng.safetensors")), state["rng"])
    return state


# --- the optimisation loop -------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Settings every training stage shares; stages subclass it with their data and model options."""

    out: str
    steps: int = 600
    batch_size: int = 32  # sequences per optimiser step, over all ranks and micro-batches
    micro_batch_size: int = 32  # sequences per forward on one rank
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    schedule: str = "cosine"  # cosine | wsd | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | muon (Muon on the layers' matrices, AdamW on the rest; train/muon.py)
    clip: float = 1.0
    mtp_weight: float = 0.3  # λ
    document_mask: bool = True  # a packed row's documents (each starts with BOS) attend only within themselves
    bias_gamma: float = 0.001  # γ, aux-loss-free bias update speed
    seed: int = 0
    save_every: int = 100
    stop_at: int | None = None  # end this process after that step (the schedule still spans `steps`)
    log_every: int = 1
    resume: bool = False
    device: str = "auto"
    price_per_hour: float = 2.0  # dollars per device-hour for the cost table (DeepSeek used $2 per H800 hour)
    progress: bool = True

    @property
    def end(self) -> int:
        return min(self.steps, self.stop_at or self.steps)


# Fields a resumed run may change; everything else comes from the run's saved config.
# (micro_batch_size: a step's loss is the mean over all its tokens however it is split, so a resumed run may split
# it otherwise, e.g. under torchrun)
RESUMABLE_CHANGES = ("resume", "stop_at", "steps", "save_every", "progress", "device", "out", "micro_batch_size")
PER_INVOCATION = ("resume", "stop_at", "progress", "device", "out")  # the rest: the run's own unless given again
DEST_FIELDS = {"set": "overrides", "no_document_mask": "document_mask"}  # argparse dest -> config field


RUN_MARKER = ".nanoseek-run"  # the first thing a new run writes in its directory
RUN_LINKS = ("model", "train_state", "current")
RUN_FILES = ("metrics.jsonl", "cost.json", "done.json")
RUN_FOLDERS = {"ckpt": r"\.?step-\d+(\.tmp)?", "tokenizer": r"tokenizer(_config)?\.json",  # folder -> what a run writes there
               "data": SHARD_FILES, "chat_tokens": CHAT_TOKEN_FILES}  # pretraining's token shards, sft's tokenized chats


def leftover(entry: Path) -> bool:
    """Whether an entry of a run directory without a checkpoint is what a failed or interrupted start of a run
    leaves, and so may be replaced: in a directory a run started in (it holds RUN_MARKER), the links, checkpoints,
    tokenizer files, tokenized data and logs a run writes; never a user's own file or directory that happens to have
    one of those names."""
    if not (entry.parent / RUN_MARKER).is_file():
        return False
    if entry.name in RUN_LINKS:
        return entry.is_symlink()
    if entry.name in RUN_FOLDERS:
        return entry.is_dir() and not entry.is_symlink() and all(
            re.fullmatch(RUN_FOLDERS[entry.name], c.name) for c in entry.iterdir())
    return (entry.name in RUN_FILES and entry.is_file()) or atomic.is_temporary(entry, *RUN_FILES)


def make_run_dir(run: Path) -> None:
    """The run directory, marked as one a run started in (RUN_MARKER) before anything else is written there: what
    the run writes from here on may be replaced by a new start, nothing else."""
    run.mkdir(parents=True, exist_ok=True)
    runlock.lock(run)
    (run / RUN_MARKER).touch()


def absolute_paths(cfg, *fields: str):
    """The config dataclass with these path fields (a path or a list of paths; URLs are left as they are) made
    absolute, so a run resumed from another working directory finds its model and data again."""
    fix = lambda v: os.path.abspath(v) if isinstance(v, str) and v and "://" not in v else v  # noqa: E731
    return dataclasses.replace(cfg, **{f: [fix(v) for v in getattr(cfg, f)] if isinstance(getattr(cfg, f), list)
                                       else fix(getattr(cfg, f)) for f in fields})


def restore_config(cfg: TrainConfig) -> tuple[TrainConfig, bool]:
    """With --resume and a checkpoint in cfg.out: the saved config, with the RESUMABLE_CHANGES taken from cfg.
    Without a checkpoint: cfg, once --out is known to be new, empty or this kind of run's own leftovers."""
    from .. import cli
    from ..cli import UserError

    if not str(cfg.out).strip():
        raise UserError("--out must name a run directory")
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file; name a run directory")
    if run.is_dir():
        runlock.lock(run)  # before its checkpoint is read: another process may be training there
    if not has_checkpoint(run):
        foreign = sorted(p.name for p in run.iterdir() if not leftover(p) and not p.name.startswith(".")
                         ) if run.is_dir() else []
        if foreign:
            raise UserError(f"{run} holds files that are not a training run ({', '.join(foreign[:3])}"
                            f"{', …' if len(foreign) > 3 else ''}); choose a new or empty --out")
        if getattr(cfg, "model", None) == "":  # sft and grpo start from a model; a resumed run uses its own
            raise UserError(f"{run} has no checkpoint to resume; pass --model to start a new run there" if cfg.resume
                            else "--model names the model to start from (only --resume of an existing run can leave "
                                 "it out)")
        if cfg.resume and cli.GIVEN is not None and "resume" in cli.GIVEN:
            notice(f"{run}: no checkpoint to resume; starting a new run")
        return cfg, False
    if not cfg.resume:
        raise UserError(f"{run} already holds a run; pass --resume to continue it or choose a new --out")
    state = json.loads((run / "train_state" / "state.json").read_text())
    # options the command line set (all of them for a config built in Python); --steps and --save-every change the
    # run only when given: their defaults would otherwise stretch its schedule to the preset's length
    given = {DEST_FIELDS.get(k, k) for k in cli.GIVEN} if cli.GIVEN is not None else set(state["config"])
    try:
        restored = dataclasses.replace(type(cfg)(**state["config"]), **{
            k: getattr(cfg, k) for k in RESUMABLE_CHANGES if k in PER_INVOCATION or k in given})
    except TypeError:  # the saved config has fields this stage's does not
        raise UserError(f"{run} holds a run of another stage than this one; choose a new --out") from None
    ignored = [f"{k} {getattr(cfg, k)!r} (the run's: {getattr(restored, k)!r})" for k in state["config"]
               if k not in RESUMABLE_CHANGES and k in given and getattr(cfg, k) != getattr(restored, k)]
    if ignored:
        notice(f"{run}: resuming with the run's own settings; this command's differ and are not used: "
               + ", ".join(ignored))
    step, before = state["step"], state["config"]["steps"]
    if step >= restored.end:
        notice(f"{run}: the run is already at step {step} (asked to run to {restored.end}); nothing to do")
    elif restored.steps != before:
        new, old = (lr_at(step, n, restored.lr, restored.warmup, restored.schedule, restored.min_lr_ratio)
                    for n in (restored.steps, before))
        if new != old:
            notice(f"{run}: --steps {restored.steps} (the run's: {before}) stretches its {restored.schedule} schedule "
                   f"to the new length: the learning rate at step {step + 1} is {new:.3g}, not {old:.3g}")
    return restored, True


def resumed_micro_batch(cfg: TrainConfig, resuming: bool) -> TrainConfig:
    """A resumed pretrain or sft run keeps its micro-batch unless --micro-batch-size is given, capped at the batch
    each process gets now: a run started in one process resumes under torchrun without naming a new split."""
    from .. import cli

    if not resuming or cli.GIVEN is None or "micro_batch_size" in cli.GIVEN:  # (None: a config built in Python)
        return cfg
    return dataclasses.replace(cfg, micro_batch_size=micro_batch_default(cfg.batch_size, cfg.micro_batch_size, False))


def micro_batch_default(batch_size: int, micro_batch_size: int, given: bool) -> int:
    """The micro-batch to use: as given, or (not given on the command line) the largest that divides the batch each
    process gets and is at most the preset's, so `torchrun --nproc_per_node=N` and a --batch-size of 40 work without
    also passing --micro-batch-size."""
    if given:
        return min(micro_batch_size, batch_size)
    per_process = max(1, batch_size // int(os.environ.get("WORLD_SIZE", "1")))
    return max(m for m in range(1, min(micro_batch_size, per_process) + 1) if per_process % m == 0)


def add_run_arguments(p, seed_help: str, save_every: int) -> None:
    """The command-line options every training stage takes: seed, checkpoints and resume, device, the cost table's
    price and the progress bar (TrainConfig's fields of the same names)."""
    from ..cli import NONNEGATIVE, POSITIVE_INT, SEED

    p.add_argument("--seed", type=SEED, default=0, help=seed_help)
    p.add_argument("--save-every", type=POSITIVE_INT, default=save_every,
                   help="checkpoint every K steps (and at the end)")
    p.add_argument("--stop-at", type=POSITIVE_INT,
                   help="checkpoint and exit after this step (e.g. a job time limit); continue with --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where its last checkpoint left it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--price-per-hour", type=NONNEGATIVE, default=2.0, help="dollars per device-hour in the cost table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def stop_if_diverged(grad_norm: torch.Tensor, cfg, stage: str, step: int) -> None:
    """Stop a run whose gradient is NaN or infinite before the optimiser applies it (usually too high a learning
    rate): clipping scales NaN to NaN, every weight would turn NaN, and the next checkpoint would replace the last good
    one. The norm is of the gradients summed over every process, so all of them stop at the same step."""
    if torch.isfinite(grad_norm):
        return
    from ..cli import UserError

    run = Path(cfg.out)
    kept = (f"its last checkpoint (step {json.loads((run / 'train_state' / 'state.json').read_text())['step']}) is "
            f"kept" if has_checkpoint(run) else "no checkpoint had been written")
    raise UserError(f"{stage}: the gradient at step {step} is {grad_norm.item()}: training diverged, and stopped "
                    f"before that update reached the weights; {kept} in {run}. Start a new run with a lower --lr "
                    f"(this one's: {cfg.lr:g})")


def grad_accum_steps(cfg: TrainConfig, d: Dist) -> int:
    from ..cli import UserError

    if cfg.batch_size % (cfg.micro_batch_size * d.world_size):
        raise UserError(f"batch size {cfg.batch_size} is not a multiple of micro-batch {cfg.micro_batch_size} "
                        f"x {d.world_size} processes" + ("" if not cfg.resume else "; a resumed run keeps its batch "
                                                           "and micro-batch: resume it with a process count that "
                                                           "divides them"))
    return cfg.batch_size // (cfg.micro_batch_size * d.world_size)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over supervised positions (labels != -100) of KL(teacher ‖ student) over the vocabulary."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (B, T)
    mask = (labels != -100).float()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def token_weights(labels: list[torch.Tensor], d: Dist, depths: int = 1) -> list[tuple[float, list[float]]]:
    """Per micro-batch, (next-token, [MTP depth 1, …]) weights for its mean losses so that the step's loss is the
    mean over every supervised position of the step, whatever its split into micro-batches and processes: n_i ×
    world_size / N, with N the positions of the whole step summed over ranks (DDP averages gradients over ranks,
    hence × world_size). MTP depth k counts the positions it scores (labels[:, k:]). One micro-batch in one process:
    exactly 1.0."""
    counts = torch.tensor([[(y[:, k:] != -100).sum().item() for k in range(depths + 1)] for y in labels],
                          dtype=torch.float64)  # (micro-batches, 1 + depths); labels are still on the host
    totals = counts.sum(0)
    if d.world_size > 1:  # (one process: no round trip through the device)
        totals = d.all_reduce_sum_(totals.to(d.device)).cpu()
    return [(row[0], row[1:]) for row in (counts * d.world_size / totals.clamp(min=1)).tolist()]


def lm_losses(net, model, inputs, labels, segments, use_mtp: bool, real=None, mtp_weights=None):
    """One micro-batch's forward -> (logits (B, T, V), next-token CE, MTP CE, sequence-wise balance loss) on labels
    (-100 = ignored); `net` is the model or its DDP wrapper; `real` (B, T) bool marks the tokens that are not
    padding (None: all); `mtp_weights` weigh each MTP depth's CE (token_weights). The MTP and balance terms are 0
    when off."""
    zero = torch.zeros((), device=inputs.device)
    if use_mtp:
        logits, mtp_logits = net(inputs, return_mtp=True, segments=segments, token_mask=real)
        l_mtp = mtp_loss(mtp_logits, labels, weights=mtp_weights)
    else:
        logits, l_mtp = net(inputs, segments=segments, token_mask=real), zero
    l_main = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    aux = model.aux_loss()
    return logits, l_main, l_mtp, zero if aux is None else aux


def fit(cfg: TrainConfig, model, loader, d: Dist, resuming: bool, stage: str, extra_files=(), teacher=None,
        kd_weight: float = 0.0) -> dict | None:
    """Run optimiser steps [start, cfg.end): loss = CE + λ·MTP CE + balance loss on labels (-100 = ignored), the
    cross-entropies a mean over every supervised position of the step (token_weights), gradient accumulation (DDP
    synchronises on the last micro-batch), clipping, AdamW or Muon, aux-loss-free bias update
    with loads summed over ranks, metrics, progress bar and checkpoints. `loader` has next_batch() ->
    (inputs, labels) and state_dict()/load_state_dict(). With a `teacher` model (same vocabulary), kd_weight ·
    KL(teacher ‖ student) on the supervised positions joins the loss (logged as kd_loss). A loader that pads may
    return a third tensor, (B, T) bool False on padding, which then counts in no router load or balance loss.
    Returns the result dict on rank 0."""
    run = Path(cfg.out)
    accum = grad_accum_steps(cfg, d)
    mc = model.config
    model.train()
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, kind=cfg.optimizer)
    start, prior_wall, prior_flops = 0, 0.0, 0.0
    if resuming:
        state = load_train_state(run, opt)
        start, prior_wall, prior_flops = state["step"], state["wall_s"], state["flops"]
        try:
            loader.load_state_dict(state["data"])
        except ValueError as e:  # e.g. RUN/data rebuilt from --data files that changed since
            from ..cli import UserError

            raise UserError(f"{run}: the training data is not what the run was trained on ({e}); resume with the "
                            "data it started with, or start a new run") from None
    ddp = model
    use_mtp = cfg.mtp_weight > 0 and len(model.mtp_layers) > 0
    if d.world_size > 1:
        # the routing-bias buffers stay equal on every rank without syncing (each applies the all-reduced load)
        new_kwarg = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        ddp = torch.nn.parallel.DistributedDataParallel(  # MTP modules left out of the loss get no gradient: say so
            model, find_unused_parameters=len(model.mtp_layers) > 0 and not use_mtp,
            **({"forward_sync_buffers": False} if new_kwarg else {"broadcast_buffers": False}))
    metrics = Metrics(run / "metrics.jsonl", start if resuming else None, enabled=d.is_main)
    # every rank measures its own device (or its share of the CPU's cores)
    peak_all = device_peak_flops(d.device)[0] * d.world_size
    autocast = mixed_precision(d.device)
    moes = model.moe_layers()
    distilling = teacher is not None and kd_weight > 0
    no_kd = torch.zeros((), device=d.device)
    bar = None
    if d.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.end, initial=start, desc=stage, unit="step", dynamic_ncols=True, file=sys.stderr)
    timer, last, total_flops = Timer(), {}, 0.0
    with StopOnSignal(stage, d.world_size) as stop:  # a Ctrl-C or SIGTERM: finish the step, save, stop
        for step in range(start, cfg.end):
            t0 = timer.elapsed()
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = torch.zeros(4, device=d.device)  # main CE, MTP CE, balance loss, KD (kd_weight × KL)
            tokens = flops = 0.0
            batches = [loader.next_batch() for _ in range(accum)]
            weights = token_weights([batch[1] for batch in batches], d, len(model.mtp_layers))
            for micro, ((inputs, labels, *real), (w_main, w_mtp)) in enumerate(zip(batches, weights)):
                # SFT's padding is neither tokens nor model FLOPs
                n_real = int(real[0].sum()) if real else inputs.numel()
                inputs, labels = inputs.to(d.device), labels.to(d.device)
                real = real[0].to(d.device) if real else None
                segments = ((inputs == mc.bos_token_id).cumsum(1)
                            if cfg.document_mask and mc.bos_token_id is not None else None)
                tokens += n_real
                flops += flops_per_token(mc, inputs.shape[1], training=True, with_mtp=use_mtp) * n_real
                last_micro = micro == accum - 1
                with (ddp.no_sync() if d.world_size > 1 and not last_micro else torch.enable_grad()), autocast:
                    logits, l_main, l_mtp, aux = lm_losses(ddp, model, inputs, labels, segments, use_mtp, real, w_mtp)
                    aux = aux / accum  # the balance loss is a mean over sequences: each micro-batch's counts alike
                    kd = no_kd
                    if distilling:
                        with torch.no_grad():
                            t_logits = teacher(inputs, segments=segments)
                        flops += flops_per_token(teacher.config, inputs.shape[1], training=False) * n_real
                        kd = kd_weight * distill_kl(logits, t_logits, labels) * w_main
                    (l_main * w_main + cfg.mtp_weight * l_mtp + aux + kd).backward()
                sums += torch.stack([l_main.detach() * w_main, l_mtp.detach(), aux.detach(), kd.detach()])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            stop_if_diverged(grad_norm, cfg, stage, step + 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loads = [d.all_reduce_sum_(m.load.clone()) if m.load is not None else None for m in moes]
            model.update_routing_bias(cfg.bias_gamma, loads)
            sums, stopping = d.all_reduce_mean(torch.cat([sums, sums.new_tensor([stop.requested])])).split([4, 1])
            dt = timer.elapsed() - t0
            tokens, flops = tokens * d.world_size, flops * d.world_size
            total_flops += flops
            if step % cfg.log_every == 0 or step == cfg.end - 1:
                main_l, mtp_l, aux_l, kd_l = sums.tolist()
                imbalance = [round((l.max() / l.mean()).item(), 3)
                             for l in loads[: len(moes) - len(model.mtp_layers)] if l is not None]
                last = {
                    "step": step + 1, "loss": round(main_l, 5), "mtp_loss": round(mtp_l, 5),
                    "aux_loss": round(aux_l, 7), "lr": lr, "grad_norm": round(grad_norm.item(), 4),
                    "tokens_per_s": round(tokens / dt, 1),
                    "mfu": round(flops / dt / peak_all, 4), "expert_imbalance": imbalance,
                    "wall_s": round(prior_wall + timer.elapsed(), 2),
                }
                if distilling:
                    last["kd_loss"] = round(kd_l, 7)
                metrics.log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0].item():.3f}", tok_s=f"{tokens / dt:.0f}")
            done = step + 1
            stopping = stop.agreed(stopping.item())
            if done % cfg.save_every == 0 or done == cfg.end or stopping:
                if d.is_main:
                    state = {"data": loader.state_dict(), "wall_s": prior_wall + timer.elapsed(),
                             "flops": prior_flops + total_flops,
                             "config": dataclasses.asdict(cfg)}
                    save_checkpoint(run, model, opt, done, state, extra_files)
                d.barrier()
            if stopping and done < cfg.end:
                raise stop.stopped(done, run)
    if bar is not None:
        bar.close()
    del ddp  # DDP's reducer holds the process group: free it first, then end the group on every rank together
    gc.collect()
    d.close()
    if not d.is_main:
        return None
    cost = run_cost(run, d, prior_wall + timer.elapsed(), prior_flops + total_flops, cfg.price_per_hour)
    print(f"cost: {cost['device_hours']} device-hours, {cost['flops']:.3g} FLOPs, MFU {cost['mfu']:.1%} "
          f"({cost['device']}), ${cost['dollars']} at ${cfg.price_per_hour}/device-hour", file=sys.stderr)
    return run_summary(stage, run, max(start, cfg.end), last, cost)
