"""A run whose gradient turns NaN stops with one line before the update reaches the weights, and keeps its last good
checkpoint and metrics (it used to train on to the end in NaN, overwrite that checkpoint and exit 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_grpo_runs import sevens, untrained_model_dir
from test_pretrain import pretrain


def strict_rows(run: Path) -> list[dict]:
    """metrics.jsonl as strict JSON (NaN and Infinity are not JSON: jq and most parsers refuse them)."""
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_with_too_high_a_learning_rate_stops_and_keeps_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = pretrain(out, "--lr", "1e4", "--save-every", "1", steps=6, check=False)
    assert r.returncode == 1, r.stderr[-2000:]
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: pretrain: the gradient at step ") and "diverged" in error, error
    failed = int(error.split("at step ")[1].split()[0])
    kept = json.loads((out / "train_state" / "state.json").read_text())["step"]
    assert kept == failed - 1 >= 1 and f"last checkpoint (step {kept})" in error and "--lr" in error
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "model" / "model.safetensors")).values())
    assert [row["step"] for row in strict_rows(out)] == list(range(1, failed))


def test_grpo_stops_at_a_nan_loss_with_its_last_checkpoint(tmp_path, monkeypatch):
    import nanoseek.train.grpo as grpo_module
    from nanoseek.cli import UserError
    from nanoseek.train.grpo import GRPOConfig, grpo

    real_collect, real_loss, poisoned = grpo_module.collect, grpo_module.policy_loss, {"on": False}

    def collect(cfg, engine, tok, step, *rest):
        poisoned["on"] = step == 2  # the third step's loss is NaN
        return real_collect(cfg, engine, tok, step, *rest)

    def policy_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return (loss * math.nan if poisoned["on"] else loss), stats

    monkeypatch.setattr(grpo_module, "judge", sevens)
    monkeypatch.setattr(grpo_module, "collect", collect)
    monkeypatch.setattr(grpo_module, "policy_loss", policy_loss)
    out = tmp_path / "run"
    cfg = GRPOConfig(model=str(untrained_model_dir(tmp_path / "sft")), out=str(out), tasks=["arithmetic:1"], steps=4,
                     prompts_per_step=2, group_size=4, max_new_tokens=8, temperature=1.0, lr=1e-3, save_every=1,
                     eval_every=0, progress=False, device="cpu")
    with pytest.raises(UserError, match=r"grpo: the gradient at step 3 is nan: training diverged.*last checkpoint "
                                        r"\(step 2\) is kept"):
        grpo(cfg)
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "model" / "model.safetensors")).values())
    assert [row["step"] for row in strict_rows(out)] == [1, 2]
