"""`nanoseek speedrun`: the whole DeepSeek-V3 → R1 → distillation recipe with one command.

    tokenizer → pretrain (NTP + MTP, aux-loss-free MoE) → cold-start SFT (R1 format) → GRPO (verifiable rewards)
    → distill into a student with at most half the teacher's active parameters → held-out evaluation of every
    stage → report card

Each stage writes its own run directory under OUT (pretrain/, sft/, grpo/, student_base/, distill/), so any stage
can be rerun or inspected with the per-stage commands. Re-running the same command resumes: finished stages are
skipped, and the last line's `resumed` lists them (its `wall_s` counts only this invocation). The `cpu` preset is
sized for 2 CPU cores in about 20 minutes. `gpu` is meant for one H100 in about 10 but has never been timed on one:
the only GPU measurement of `small` (bench/results/pretrain_gpu.md, 55-59k tokens/s, taken before document masking
and before the experts got bf16 grouped matmuls) would put its pretraining alone at 22-24 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .atomic import entries, write_json


# Per-preset stage settings. cpu: cpu-tiny teacher, cpu-student (half its active parameters) student.
PRESETS = {
    "cpu": {
        "pretrain": dict(preset="cpu-tiny"),
        "student_base": dict(preset="cpu-student"),
        # rows packed with whole conversations (~74 a step): from the same base, 0.445 on 1000 problems at lr 1e-3,
        # against 0.426 with one conversation per padded row (about half of it padding); lr 2e-3 / 3e-3 / 4e-3 give
        # 0.479 / 0.478 / 0.475. From a later base: 200 steps over 8000 conversations 0.470, 300 over 8000 0.488,
        # 300 over 12000 0.505; after the word-problem split fix, 300 over 12000 0.472 / 0.504 and 400 over 16000
        # 0.509 / 0.512 on seeds 0 / 1 (bench/results/sft_cpu.md)
        "sft": dict(steps=400, batch_size=32, micro_batch_size=32, seq_len=320, lr=2e-3, n_samples=16000),
        # rollouts at T 0.6: sampled at T 1 the AdamW-pretrained model solved half the two-step problems it solved
        # greedily.
        # β 0: no reference model, and the update skips the ~half of completions whose group has no signal.
        # lr 5e-5, μ 1: from padded-row SFT models 100 steps gained +0.3 to +2.8 points on 1000 problems, lr 1e-4 or
        # μ 2 nothing, 80 steps +1.2; from packed-row SFT models 60 steps moved −1.1 (lr 2e-5: +0.4) and +0.0, within
        # a rerun's noise, and from the SFT model at 0.470 −2.9 to +1.0 over five runs (bench/results/grpo_cpu.md).
        # 30 steps (~1.3 s each on 2 cores of the Zen 5 VM) leave the SFT stage its 400 steps inside 20 min
        "grpo": dict(steps=30, prompts_per_step=16, group_size=8, max_new_tokens=256, lr=5e-5, updates_per_batch=1,
                     temperature=0.6, beta=0.0, eval_every=30, eval_n=100, adaptive_tasks=True),
        # the student learns only from the kept traces (~40% of them): 4000 problems gave it 0.379 on 1000, 3000 gave
        # 0.363, 3000 with logit KD (weight 0.5) 0.361; on packed rows, 8 passes at lr 2e-3 0.413 against 4 passes at
        # 1e-3 0.367 (the same 1418 traces). From a later teacher (0.494): 3500 problems, 8 passes 0.398; 7000
        # problems, 4 / 6 / 8 passes 0.428 / 0.437 / 0.444, two samples per problem 0.414 (bench/results/
        # distill_cpu.md). 7000 and 4 passes: the student's SFT takes as long as before, the traces twice as long
        "distill": dict(n=7000, max_tokens=256, epochs=4, batch_size=32, lr=2e-3),
        "eval_n": 200,
    },
    "gpu": {  # untimed on a GPU (see the docstring); the sft and grpo settings follow the cpu preset's findings
        "pretrain": dict(preset="small", steps=1200),
        "student_base": dict(preset="cpu-tiny", steps=1200, batch_size=64, micro_batch_size=64, seq_len=256),
        # ~1.4 passes over the conversations, as the cpu preset's (4000, the default, made ~11 passes)
        "sft": dict(steps=400, batch_size=64, micro_batch_size=64, seq_len=320, lr=5e-4, n_samples=32000),
        "grpo": dict(steps=60, prompts_per_step=32, group_size=16, max_new_tokens=256, lr=2e-5, temperature=0.6,
                     eval_every=20, eval_n=200, adaptive_tasks=True),
        "distill": dict(n=6000, max_tokens=256, batch_size=64, lr=3e-4),
        "eval_n": 500,
    },
}
# smoke: every stage for a few steps, to check the wiring in tests (numbers are meaningless).
PRESETS["smoke"] = {
    "pretrain": dict(preset="cpu-tiny", steps=6, batch_size=8, micro_batch_size=8, seq_len=64, n_docs=400, vocab_size=320),
    "student_base": dict(preset="cpu-student", steps=4, batch_size=8, micro_batch_size=8, seq_len=64, n_docs=400),
    "sft": dict(steps=4, batch_size=8, micro_batch_size=8, seq_len=96, n_samples=64),
    "grpo": dict(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=16, eval_every=2, eval_n=4),
    "distill": dict(n=16, steps=2, batch_size=4, max_tokens=24),
    "eval_n": 6,
}
TASKS = ["arithmetic", "word", "countdown"]
STAGES = ("pretrain", "sft", "grpo", "student_base", "distill")  # each a run directory under --out, in this order


def log(msg: str) -> None:
    print(f"[speedrun] {msg}", file=sys.stderr, flush=True)


MODELS = {"pretrain": "model", "sft": "model", "grpo": "model", "student_base": "model", "distill": "student/model"}


def done(stage_dir: Path) -> bool:
    """The stage finished: its done.json reads (one cut short by a full disk does not count: the stage resumes), and
    its model is there (a UserError names the stage to delete otherwise)."""
    from .cli import UserError

    try:
        json.loads((stage_dir / "done.json").read_text())
    except (OSError, ValueError):
        return False
    model = stage_dir / MODELS[stage_dir.name]
    if not (model / "config.json").is_file():
        raise UserError(f"{stage_dir} finished, but its model {model} is gone; delete {stage_dir} and rerun to train "
                        "that stage again")
    return True


def mark_done(stage_dir: Path, result: dict) -> dict:
    write_json(stage_dir / "done.json", result)
    return result


def claim(out: Path, settings: dict) -> None:
    """Rerunning resumes, so OUT must hold a speedrun of these settings (its stages would otherwise mix seeds or
    presets: a finished stage is skipped, whatever its settings were), or be new or empty: the speedrun writes its
    stages, summary and report there, and never over a user's files."""
    from .cli import UserError

    path = out / "speedrun.json"
    if path.is_file():
        try:
            held = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is damaged, so the settings of the speedrun in {out} are unknown; choose a new "
                            f"--out (or, if it ran with these settings, write {json.dumps(settings)} into it)") from None
        if held != settings:
            flags = " ".join(f"--{k} {v}" for k, v in held.items()) if isinstance(held, dict) else held
            raise UserError(f"{out} holds a speedrun of other settings ({flags}); rerun with those (or with neither "
                            "option) to resume it, or choose a new --out")
        return
    if out.is_dir() and entries(out, "speedrun.json"):
        raise UserError(f"{out} is not empty and holds no speedrun (no speedrun.json); choose a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def evaluate(model_dir: Path, n: int, device: str, style: str = "chat") -> dict:
    """Held-out summary of a stage's model, kept beside it (held_out.json) so a rerun or a resumed speedrun does not
    score it again; it is reused only for the same n and style and the same model files (config.json's time: a
    checkpoint writes it last)."""
    from .eval.evaluate import evaluate_dir, held_out

    key = {"n": n, "style": style, "model_time_ns": (model_dir / "config.json").stat().st_mtime_ns}
    path = model_dir.parent / "held_out.json"
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
            if kept.get("key") == key:
                return kept["summary"]
        except (json.JSONDecodeError, AttributeError, KeyError):
            pass
    # float32 on a GPU too: the scores then compare with GRPO's periodic evaluation (its float32 training model)
    # and with CPU runs; the speedrun's models are small
    summary = evaluate_dir(model_dir, held_out(n, TASKS), device, style=style, dtype="float32")[0]
    write_json(path, {"key": key, "summary": summary})
    return summary


def speedrun(out: Path, preset: str, device: str, seed: int, progress: bool = True) -> dict:
    from .train.distill import DistillConfig, distill
    from .train.grpo import GRPOConfig, grpo
    from .train.pretrain import PretrainConfig, TRAIN_PRESETS, pretrain
    from .train.sft import SFTConfig, sft

    p = PRESETS[preset]
    t0 = time.perf_counter()
    stages: dict[str, dict] = {}
    resumed: list[str] = []  # stages an earlier invocation finished: wall_s below counts this invocation only
    if out.exists() and not out.is_dir():
        from .cli import UserError

        raise UserError(f"--out {out} is a file; name a directory")
    claim(out, {"preset": preset, "seed": seed})

    def stage(name: str, fn):
        d = out / name
        if done(d):
            log(f"{name}: already done, skipping")
            resumed.append(name)
            return json.loads((d / "done.json").read_text())
        log(f"{name} ...")
        start = time.perf_counter()
        result = fn(d)
        result["stage_wall_s"] = round(time.perf_counter() - start, 1)
        log(f"{name} done in {result['stage_wall_s']} s")
        return mark_done(d, result)

    def pretrain_stage(name, settings, tokenizer=None):
        s = {**TRAIN_PRESETS[settings["preset"]], **settings}
        cfg = PretrainConfig(out=str(out / name), seed=seed, device=device, resume=True, tokenizer=tokenizer,
                             save_every=max(50, s["steps"] // 4), progress=progress, **s)
        return stage(name, lambda d: pretrain(cfg))

    pre = pretrain_stage("pretrain", p["pretrain"])
    stages["pretrain"] = evaluate(out / "pretrain" / "model", p["eval_n"], device, style="plain")
    stage("sft", lambda d: sft(SFTConfig(out=str(d), model=str(out / "pretrain" / "model"), seed=seed,
                                                   device=device, resume=True, progress=progress, **p["sft"])))
    stages["sft"] = evaluate(out / "sft" / "model", p["eval_n"], device)
    stage("grpo", lambda d: grpo(GRPOConfig(out=str(d), model=str(out / "sft" / "model"), tasks=TASKS, seed=seed,
                                            device=device, resume=True, progress=progress, **p["grpo"])))
    stages["grpo"] = evaluate(out / "grpo" / "model", p["eval_n"], device)
    teacher = out / "grpo" / "model"
    pretrain_stage("student_base", p["student_base"], tokenizer=str(out / "pretrain" / "tokenizer"))
    # eval_n 0: distill only counts parameters and times decoding; the held-out scores are the speedrun's own
    dist = stage("distill", lambda d: distill(DistillConfig(teacher=str(teacher), out=str(d), tasks=TASKS, seed=seed,
                                                             student=str(out / "student_base" / "model"),
                                                             device=device, eval_n=0, progress=progress,
                                                             **p["distill"])))
    stages["distill"] = evaluate(out / "distill" / "student" / "model", p["eval_n"], device)
    stages["distill"]["teacher_pass@1"] = stages["grpo"]["pass@1"]
    for key in ("params_total", "params_active", "decode_tokens_per_s"):  # teacher vs student, as issue 7 asks
        stages["distill"][key] = dist["student"][key]
        stages["distill"][f"teacher_{key}"] = dist.get("teacher", {}).get(key)
    stages["pretrain"]["cost"] = pre.get("cost")
    best = max(("sft", "grpo", "distill"), key=lambda s: stages[s]["pass@1"])
    final = {"sft": out / "sft" / "model", "grpo": out / "grpo" / "model", "distill": out / "distill" / "student" / "model"}[best]
    summary = {"stages": stages, "final_model": str(final), "wall_s": round(time.perf_counter() - t0, 1)}
    if resumed:  # their own times are each stage's done.json stage_wall_s
        summary["resumed"] = resumed
    write_json(out / "summary.json", summary)
    from .eval.report import write_report

    write_report(out)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import SEED

    p.add_argument("--preset", choices=list(PRESETS), default="cpu", metavar="{cpu,gpu}",
                   help="cpu (2 cores: 12-17 min measured, 20 at most; the default) or gpu (one GPU; meant for ~10 "
                        "min on an H100, not yet timed on one). A rerun in the same --out resumes with that run's "
                        "preset and seed")
    p.add_argument("--out", default="speedrun", help="directory for every stage's run (default ./speedrun)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=SEED, default=0, help="seed of every stage (data, initialisation, rollouts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (each stage still logs its lines)")


def resumed_settings(out: Path, preset: str, seed: int) -> tuple[str, int]:
    """A rerun in a speedrun's directory resumes with that run's preset and seed, unless the command line gives
    them (then `claim` checks that they match)."""
    from . import cli

    try:
        held = json.loads((out / "speedrun.json").read_text())
    except (OSError, ValueError):  # none (a new run), or damaged (claim says so)
        return preset, seed
    if not isinstance(held, dict):  # not a record of ours (claim says so)
        return preset, seed
    given = cli.GIVEN if cli.GIVEN is not None else {"preset", "seed"}
    if "preset" not in given and isinstance(held.get("preset"), str) and held["preset"] in PRESETS:
        preset = held["preset"]
    if "seed" not in given and type(held.get("seed")) is int:
        seed = held["seed"]
    return preset, seed


def run(args: argparse.Namespace) -> int:
    from .cli import UserError
    from .device import resolve_device

    if not str(args.out).strip():
        raise UserError("--out must name a directory")

    preset, seed = resumed_settings(Path(args.out), args.preset, args.seed)
    device = resolve_device(args.device, allow_mps=False)
    if preset == "gpu" and device == "cpu":
        why = "--preset gpu is" if args.preset == "gpu" else f"{args.out} holds a --preset gpu speedrun,"
        raise UserError(f"{why} sized for one GPU (a 244M-parameter model, 127M active, for 1200 steps: days on a "
                        "CPU), and this run's device is the CPU: " + ("use --preset cpu" if args.preset == "gpu" else
                                                       "resume it on a GPU, or choose a new --out for --preset cpu"))
    summary = speedrun(Path(args.out), preset, device, seed, progress=not args.no_progress)
    log(f"report: {Path(args.out) / 'report.md'}; serve the result with: nanoseek serve --model {summary['final_model']}")
    print(json.dumps(summary, default=str))
    return 0
