"""Runs under `torchrun --nproc_per_node=2` (gloo, CPU): a run started in one process resumes in two, sft's loss is the
mean over the step's tokens however the batch is split over processes, a resumed grpo run checks its prompt split
again, and a failure on rank 0 alone is one error line, not the other rank's gloo traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BASE = ["--preset", "cpu-tiny", "--batch-size", "8", "--seq-len", "48", "--n-docs", "600", "--vocab-size", "320",
        "--warmup", "3", "--no-progress"]  # no --micro-batch-size: one process takes the whole batch at once


def nanoseek(*args, procs: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    r = subprocess.run([sys.executable, *launch, "-m", "nanoseek", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pt") / "whole"
    nanoseek("pretrain", "--out", run, "--steps", 4, *BASE)
    return run


def test_a_one_process_run_resumes_in_two(one_process_run, tmp_path):
    """Stopped at step 2 in one process (micro-batch 8), resumed under torchrun without naming a new split: each rank
    takes 4 rows, and the run goes on as the one-process run did."""
    run = tmp_path / "split"
    nanoseek("pretrain", "--out", run, "--steps", 4, "--stop-at", 2, *BASE)
    nanoseek("pretrain", "--out", run, "--steps", 4, "--resume", *BASE, procs=2)
    whole, split = losses(one_process_run), losses(run)
    assert len(split) == 4 and split[:2] == whole[:2]
    assert split[2:] == pytest.approx(whole[2:], rel=1e-4)


def test_sft_in_two_processes_has_the_loss_of_one(one_process_run, tmp_path):
    """The step's loss is the mean over all its supervised tokens, whichever process and micro-batch holds them, and
    the padding, which differs with the split, moves no routing bias: the runs stay together step after step."""
    args = ["sft", "--model", one_process_run / "model", "--steps", 12, "--batch-size", 4, "--seq-len", 96,
            "--n-samples", 40, "--no-progress"]
    nanoseek(*args, "--out", tmp_path / "one")
    nanoseek(*args, "--out", tmp_path / "two", procs=2)
    # equal to the logged 5 decimals for 11 steps, but the sums' rounding differs with the split, and on the task
    # suite's data of 2026-12-07 step 12 is 4e-5 apart: held to 1e-4, as pretraining above
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_a_resumed_grpo_run_checks_its_prompt_split_again(one_process_run, tmp_path):
    args = ["grpo", "--model", one_process_run / "model", "--out", tmp_path / "g", "--steps", 2,
            "--prompts-per-step", 3, "--group-size", 2, "--max-new-tokens", 8, "--eval-every", 0, "--no-progress"]
    nanoseek(*args, "--stop-at", 1)
    r = nanoseek(*args, "--resume", procs=2, check=False)
    assert r.returncode != 0 and r.stderr.count("--prompts-per-step 3 does not split evenly over 2 processes") == 1


def test_a_failure_on_rank_0_alone_is_one_line(tmp_path):
    """Rank 0 alone reads --data; the other rank, waiting for it, must not add a gloo traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no closing brace"\n')
    r = nanoseek("pretrain", "--out", tmp_path / "run", "--steps", 2, "--data", bad, *BASE, procs=2, check=False)
    assert r.returncode != 0
    assert r.stderr.count("error:") == 1 and "not valid JSON" in r.stderr
    assert "[rank1]: Traceback" not in r.stderr and "Connection closed by peer" not in r.stderr


WAIT = """
import sys, time
from nanoseek.train import distributed
distributed.COLLECTIVE_TIMEOUT_MIN = 0.03  # 1.8 s
d = distributed.init_distributed("cpu")
print("waiting", flush=True)
if d.is_main:
    time.sleep(int(sys.argv[2]))  # rank 0 preparing the data
getattr(d, sys.argv[1])()
print("through", flush=True)
"""


def test_the_others_wait_for_rank_0s_data_past_the_collective_timeout(tmp_path):
    """Tokenizing a multi-GB corpus takes rank 0 hours: the others wait for it without the 60-minute collective
    timeout (here shrunk to 1.8 s; a plain barrier gives up)."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT)
    run = lambda how: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",  # noqa: E731
                                      "--nproc_per_node=2", str(script), how, "5"], capture_output=True, text=True,
                                     env=ENV, timeout=120)
    waited = run("wait_for_main")
    assert waited.returncode == 0 and waited.stdout.count("through") == 2, waited.stderr[-2000:]
    assert run("barrier").returncode != 0


def test_ctrl_c_reaches_the_ranks_waiting_for_rank_0(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while rank 0 prepares the data: the waiting rank stops too.
    Blocked inside gloo, it ignored the signal until torchrun killed it 30 s later."""
    import signal

    script = tmp_path / "wait.py"
    script.write_text(WAIT)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), "wait_for_main", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, start_new_session=True)
    said = ""
    while said.count("waiting") < 2:  # both ranks started (their lines may interleave)
        said += p.stdout.readline()
    time.sleep(1)  # both in their wait
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "forcefully exiting via 9" not in err, err[-2000:]


def test_help_and_a_missing_verb_print_once():
    r = nanoseek("pretrain", "--help", procs=2)
    assert r.stdout.count("usage: nanoseek pretrain") == 1  # was once per process


def test_group_advantages_of_an_empty_batch():
    """A rank whose dynamic-sampling (dapo) batch kept no group: no advantages, and no std() warning."""
    import warnings

    import torch

    from nanoseek.train.grpo import group_advantages

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert group_advantages(torch.zeros(0, 4), "dapo").shape == (0, 4)


def test_a_cuda_index_under_torchrun_is_refused(monkeypatch):
    """--device cuda:0 under torchrun trained on the CPU with gloo; each process takes cuda:LOCAL_RANK."""
    from nanoseek import device
    from nanoseek.cli import UserError
    from nanoseek.train import distributed

    monkeypatch.setattr(device, "resolve_device", lambda d, allow_mps=True: d)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="pass --device cuda"):
        distributed.init_distributed("cuda:0")


def test_two_processes_train_with_mtp_off(tmp_path):
    """--mtp-weight 0 leaves the MTP module without gradients: DDP must be told, or its second step fails."""
    nanoseek("pretrain", "--out", tmp_path / "run", "--steps", 3, "--mtp-weight", 0, *BASE, procs=2)
    assert len(losses(tmp_path / "run")) == 3
