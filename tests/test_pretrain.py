"""Pretraining runs: the loss falls, a stopped or kill -9'd run resumes bit-identically, and 2 gloo processes
match one process at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = ["--preset", "cpu-tiny", "--batch-size", "8", "--micro-batch-size", "4", "--seq-len", "48", "--n-docs", "600",
        "--vocab-size", "320", "--warmup", "3", "--no-progress"]


def pretrain(out, *extra, steps=24, env=None, check=True):
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(out), "--steps", str(steps), *TINY, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    r = pretrain(out, "--save-every", "12")
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def test_run_directory_and_loss_falls(full_run):
    out, result = full_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    for key in ("loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_imbalance"):
        assert key in rows[-1]
    assert len(rows[-1]["expert_imbalance"]) == 3  # cpu-tiny: 4 layers, the first dense
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and (out / "model" / "tokenizer.json").is_file()
    assert (out / "train_state" / "optimizer.safetensors").is_file()
    assert result["cost"]["flops"] > 0 and result["cost"]["device_hours"] > 0


def test_loadable_by_transformers(full_run):
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    import nanoseek

    out, _ = full_run
    ours, hf = nanoseek.load_model(out / "model"), DeepseekV3ForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = torch.tensor([tok("12 + 7 =")["input_ids"]])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_stop_and_resume_is_bit_identical(full_run, tmp_path):
    full, _ = full_run
    out = tmp_path / "run"
    pretrain(out, "--save-every", "12", "--stop-at", "12")
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 12
    pretrain(out, "--resume", "--save-every", "12")
    a, b = weights(full), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(full)]


def test_kill_9_then_resume_is_bit_identical(full_run, tmp_path):
    full, _ = full_run
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(out), "--steps", "24", "--save-every", "3", *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill somewhere after the first checkpoints, mid-run
        m = out / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] < 24
    pretrain(out, "--resume", "--save-every", "3")
    a, b = weights(full), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_its_step_and_the_resumed_run_is_bit_identical(full_run, tmp_path, sig, code):
    """Ctrl-C, or the SIGTERM of Slurm, Kubernetes, `docker stop` or `timeout`, ended the run at once: every step
    since the last checkpoint was lost (the speedrun's pretraining saves every 500). Now the step under way ends, a
    checkpoint is saved, and the exit status says which signal it was."""
    full, _ = full_run
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(out), "--steps", "24", "--save-every", "100",
           *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,  # (a CI runner may
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # ignore Ctrl-C)
    deadline, m = time.time() + 300, out / "metrics.jsonl"
    while time.time() < deadline and not (m.is_file() and len(m.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    step = json.loads((out / "train_state" / "state.json").read_text())["step"]
    assert proc.returncode == code and 5 <= step < 24 and len(metrics(out)) == step, err[-2000:]
    assert f"pretrain: stopped at step {step}, its checkpoint saved in {out}: continue with --resume" in err
    assert "Traceback" not in err
    pretrain(out, "--resume")
    a, b = weights(full), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(full)]


def test_a_signal_during_the_last_step_still_stops_and_a_second_ctrl_c_stops_at_once(ctrl_c):
    from nanoseek.train.stopping import StopOnSignal

    with pytest.raises(KeyboardInterrupt, match="x: stopped after its last step, which is saved"):
        with StopOnSignal("x") as stop:  # the run ended (and saved) anyway: a speedrun must not go on
            signal.raise_signal(signal.SIGINT)
            assert stop.requested == 1.0
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal("x"):
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            pytest.fail("the second Ctrl-C did not stop at once")
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal("x", world_size=2):  # under torchrun the launcher forwards the terminal's Ctrl-C: two
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            reached = True  # the step still ends, and its checkpoint is saved
    assert reached
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a parent's `cmd &` in a script: ignored, and it stays so
    try:
        with StopOnSignal("x") as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested == 0.0
    finally:
        signal.signal(signal.SIGINT, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_refuses_to_overwrite_a_run(full_run):
    out, _ = full_run
    r = pretrain(out, check=False)
    assert r.returncode == 1 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_set_overrides_the_model_config_and_rejects_bad_fields(tmp_path):
    out = tmp_path / "wide"
    pretrain(out, "--set", "num_hidden_layers=3", "--set", "num_nextn_predict_layers=0", steps=2)
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["num_nextn_predict_layers"] == 0
    for bad in ("no_such_field=1", "hidden_size", "hidden_size=-4", 'hidden_size="wide"'):
        r = pretrain(tmp_path / "bad", "--set", bad, steps=2, check=False)
        assert r.returncode == 1 and "--set" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-500:])


def test_fp8_run_tracks_the_float_run(tmp_path):
    """`pretrain --fp8` (exact FP8 emulation on CPU) from the same seed stays within 1% of the float32 loss. At a
    gentle LR: at the preset's 6e-3 the first steps are chaotic enough that any perturbation (FP8 or not) moves the
    loss by several percent for a while."""
    for name, extra in (("float", ()), ("fp8", ("--fp8",))):
        pretrain(tmp_path / name, "--lr", "2e-3", *extra)
    tail = lambda run: sum(m["loss"] for m in metrics(run)[-8:]) / 8  # noqa: E731  (one batch's loss is noisy)
    ref, fp8 = tail(tmp_path / "float"), tail(tmp_path / "fp8")
    assert metrics(tmp_path / "float")[0]["loss"] > ref + 1.0  # the loss fell: flat lines would compare trivially
    assert abs(fp8 - ref) / ref < 0.01, (ref, fp8)


def test_two_gloo_processes_match_one(tmp_path):
    single = tmp_path / "one"
    pretrain(single, steps=4)
    multi = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanoseek",
           "pretrain", "--out", str(multi), "--steps", "4", *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cost = json.loads(r.stdout.strip().splitlines()[-1])["cost"]
    assert cost["devices"] == 1 and cost["device"].endswith("2 processes")  # one CPU, shared by both ranks
    one, two = metrics(single), metrics(multi)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a["loss"], b["loss"])


def test_micro_batch_default_splits_the_batch_over_processes(monkeypatch):
    from nanoseek.train.loop import micro_batch_default

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert micro_batch_default(16, 16, given=False) == 8  # torchrun without --micro-batch-size: 16 = 8 x 2 processes
    assert micro_batch_default(64, 16, given=False) == 16  # the preset's micro-batch already fits
    assert micro_batch_default(16, 16, given=True) == 16  # what the user asked for is kept (and then checked)
    monkeypatch.delenv("WORLD_SIZE")
    assert micro_batch_default(16, 32, given=False) == 16


def test_each_mtp_depth_is_a_mean_over_its_positions_however_the_step_is_split():
    """MTP depth k scores labels[:, k:]; every depth was weighed by depth 1's positions, so with two depths a split
    step's loss (and gradient) was not the whole step's."""
    from nanoseek.model.mtp import mtp_loss
    from nanoseek.train.distributed import Dist
    from nanoseek.train.loop import token_weights

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (4, 9), generator=g)
    labels[0, 5:] = labels[1, 2:] = -100  # supervised positions differ between rows and depths
    logits = [torch.randn(4, 9 - k, 7, generator=g) for k in (1, 2)]
    whole = mtp_loss(logits, labels)
    parts = [(labels[i : i + 1], [lg[i : i + 1] for lg in logits]) for i in range(4)]
    weights = token_weights([y for y, _ in parts], Dist(), depths=2)
    split = sum(mtp_loss(lg, y, weights=w_mtp) for (y, lg), (_, w_mtp) in zip(parts, weights))
    assert torch.allclose(split, whole, rtol=1e-6)


def test_resuming_with_more_steps_says_the_schedule_stretches(tmp_path, capsys):
    """--resume with a larger --steps recomputes the cosine schedule for the new length: the learning rate jumped
    with no word."""
    from test_user_errors import run_cli

    args = ["pretrain", *TINY, "--out", tmp_path / "run"]
    assert run_cli(capsys, *args, "--steps", "4")[0] == 0
    code, err = run_cli(capsys, *args, "--steps", "8", "--resume")
    assert code == 0 and "--steps 8 (the run's: 4) stretches its cosine schedule" in err
