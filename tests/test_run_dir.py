"""What a run directory guards: a user's own files that happen to bear a run's names, a resume whose tokenizer or
token shards went missing or were cut short, and checkpoints and metrics across a kill at the wrong moment."""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.corpus import PackedLoader, build_shards
from nanoseek.train import loop
from nanoseek.train.metrics import Metrics
from test_pretrain import metrics, pretrain, weights


def test_a_fresh_run_leaves_a_users_files_alone(tmp_path, capsys):
    """A `data/` with the user's training file, a `tokenizer/` with their notes, a `model/` directory: a fresh run
    used to delete the first two and fail at its first checkpoint on the third."""
    for name, files in (("data", ["train.jsonl", "meta.json"]), ("tokenizer", ["tokenizer.json", "notes.md"]),
                        ("model", ["config.json"])):
        run = tmp_path / name
        (run / name).mkdir(parents=True)
        for f in files:
            (run / name / f).write_text("{}")
        assert main(["pretrain", "--out", str(run), "--steps", "2", "--preset", "cpu-tiny", "--no-progress"]) == 1
        assert "holds files that are not a training run" in capsys.readouterr().err
        assert sorted(p.name for p in (run / name).iterdir()) == sorted(files)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 4 of 8, and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("stopped")
    pretrain(root / "whole", steps=8)
    pretrain(root / "half", "--stop-at", "4", steps=8)
    return root


def write_docs(path, k: int) -> None:
    word = ["plus", "added to", "and also"][k]
    path.write_text("".join(json.dumps({"text": f"{i} {word} {k} is {i + k}. " * 4}) + "\n" for i in range(300)))


def test_a_resume_without_its_tokenizer_takes_the_models(tmp_path):
    """RUN/tokenizer deleted and the --data file edited since: the resume used to train a new tokenizer on today's
    file and ship it beside weights trained with the old one."""
    data, run = tmp_path / "docs.jsonl", tmp_path / "run"
    write_docs(data, 1)
    pretrain(run, "--data", str(data), "--stop-at", "2", steps=4)
    before = (run / "tokenizer" / "tokenizer.json").read_text()
    write_docs(data, 2)
    shutil.rmtree(run / "tokenizer")
    pretrain(run, "--resume", "--data", str(data), steps=4)
    assert (run / "tokenizer" / "tokenizer.json").read_text() == before
    assert (run / "model" / "tokenizer.json").read_text() == before


def test_a_resume_refuses_shards_rebuilt_from_other_data(tmp_path):
    """RUN/data deleted and the --data file edited since: the rebuilt shards are not the run's (it used to train on
    them silently, or fail with a traceback when their size differed)."""
    data, run = tmp_path / "docs.jsonl", tmp_path / "run"
    write_docs(data, 1)
    pretrain(run, "--data", str(data), "--stop-at", "2", steps=4)
    write_docs(data, 2)
    shutil.rmtree(run / "data")
    r = pretrain(run, "--resume", "--data", str(data), steps=4, check=False)
    assert r.returncode == 1 and "not what the run was trained on" in r.stderr and "Traceback" not in r.stderr


def test_a_cut_shard_is_rebuilt_on_resume(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped / "half", run, symlinks=True)
    shard = sorted((run / "data").glob("shard-*.bin"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is missing or cut short"):
        PackedLoader(run / "data", batch_size=4, seq_len=48)
    pretrain(run, "--resume", steps=8)  # the same problems again: the same shards, and the run goes on as before
    assert all(torch.equal(a, b) for a, b in zip(weights(run).values(), weights(stopped / "whole").values()))
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(stopped / "whole")]


def test_build_shards_rebuilds_a_damaged_cache(tmp_path):
    from nanoseek.tokenizer import train_tokenizer

    texts = [f"doc {i} " * 20 for i in range(50)]
    tok = train_tokenizer(texts, vocab_size=300)
    out = build_shards(texts, tok, tmp_path / "data", progress=False)
    shard = out / "shard-00000.bin"
    size = shard.stat().st_size
    os.truncate(shard, 10)
    build_shards(texts, tok, out, progress=False)
    assert shard.stat().st_size == size


def test_checkpoints_and_links_survive_a_kill_and_leftovers(tmp_path, monkeypatch):
    """The model/train_state links exist before `current` does (a kill right after the switch used to leave a
    whole checkpoint that a resume did not see); a fresh run's checkpoint is never pruned in favour of later steps
    an abandoned run left."""
    from nanoseek.config import get_preset
    from nanoseek.model import build_model

    model = build_model(get_preset("cpu-tiny"))
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    for step in (5, 6):  # leftovers of an abandoned start
        (run / "ckpt" / f"step-{step:06d}").mkdir(parents=True)
    real_replace = os.replace

    def killed_after_switch(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("current"):
            raise KeyboardInterrupt  # kill -9 here: nothing after the switch runs

    monkeypatch.setattr(loop.os, "replace", killed_after_switch)
    with pytest.raises(KeyboardInterrupt):
        loop.save_checkpoint(run, model, opt, 2, {"data": {}})
    assert loop.has_checkpoint(run)
    monkeypatch.setattr(loop.os, "replace", real_replace)
    loop.save_checkpoint(run, model, opt, 3, {"data": {}})
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step-000002", "step-000003"]
    assert json.loads((run / "train_state" / "state.json").read_text())["step"] == 3


def test_a_save_on_a_full_disk_keeps_the_last_checkpoint_and_no_half_copy(tmp_path, monkeypatch):
    """The error was safetensors' own ("Error while serializing: I/O error") and the half-written .step-N.tmp stayed,
    keeping the disk full."""
    from safetensors import SafetensorError

    from nanoseek.cli import UserError
    from nanoseek.config import get_preset
    from nanoseek.model import build_model

    model = build_model(get_preset("cpu-tiny"))
    opt = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    loop.save_checkpoint(run, model, opt, 2, {"data": {}})

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(loop, "save_file", full)
    with pytest.raises(UserError, match=r"could not save the checkpoint of step 4 in .*ckpt \(Error while "
                       r"serializing.*\); .*checkpoint of step-000002 is kept: continue with --resume"):
        loop.save_checkpoint(run, model, opt, 4, {"data": {}})
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step-000002"]
    assert json.loads((run / "train_state" / "state.json").read_text())["step"] == 2


def test_a_kill_while_metrics_are_trimmed_loses_no_history(tmp_path, monkeypatch):
    import nanoseek.atomic as atomic

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))

    def killed(*a, **kw):  # the trimmed history is written, not yet swapped in
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        Metrics(path, resume_step=3)
    monkeypatch.undo()
    assert len(path.read_text().splitlines()) == 5  # was cut to half a line
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # and the temporary file is gone


def test_disk_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """A full or read-only disk is the machine's state, not a bug: one line, no traceback."""
    import nanoseek.atomic as atomic

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    assert main(["tasks", "--out", str(tmp_path / "x.jsonl"), "--n", "4"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # and no half-written .tmp


def test_an_atomic_write_never_touches_a_file_of_its_temporary_name(tmp_path):
    """It wrote FILE.tmp, then renamed it: a user's own FILE.tmp beside FILE was replaced and gone."""
    from nanoseek import atomic

    (tmp_path / "x.jsonl.tmp").write_text("mine")
    atomic.write_text(tmp_path / "x.jsonl", "new\n")
    assert (tmp_path / "x.jsonl.tmp").read_text() == "mine" and (tmp_path / "x.jsonl").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl", "x.jsonl.tmp"]


def test_rng_state_resumes_on_fewer_gpus(monkeypatch):
    """A run saved where 12 GPUs were visible resumes where only one is: each GPU's generator state goes back to the
    GPU of its index (not by string order, where cuda10 sorts before cuda2), and states of absent GPUs are skipped
    (torch's set_rng_state_all raised IndexError)."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, int(state[0])))
    saved = {"torch": torch.get_rng_state()} | {f"cuda{i}": torch.tensor([i], dtype=torch.uint8) for i in range(12)}
    loop.set_rng_state(saved, {"python": loop._jsonable(random.getstate())})
    assert restored == {0: 0, 1: 1, 2: 2}


def test_a_full_disk_while_writing_shards_names_the_file(tmp_path):
    """numpy's tofile said only "N requested and M written"; the shard writer says the disk is full, and where."""
    import numpy as np

    from nanoseek.data.corpus import _ShardWriter

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    (tmp_path / "shard-00000.bin").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    writer = _ShardWriter(tmp_path, np.dtype(np.uint16), shard_tokens=4)
    with pytest.raises(OSError, match=r"No space left on device.*shard-00000\.bin") as e:
        writer.add(np.arange(8))
    assert e.value.errno == 28


def test_a_run_directory_in_use_is_refused_to_a_second_process(tmp_path):
    """Two trainings in one --out (a command started twice) ran side by side: interleaved metrics, shared
    checkpoint temporaries, one run's weights beside the other's tokenizer, and both said they succeeded."""
    import subprocess
    import sys

    from nanoseek.train import runlock

    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(run), "--steps", "2", "--preset", "cpu-tiny",
           "--n-docs", "200", "--no-progress"]
    holder = runlock.releasing(lambda: [runlock.lock(run), subprocess.run(cmd, capture_output=True, text=True)])
    _, second = holder()
    assert second.returncode == 1 and "in use by another nanoseek process" in second.stderr
    assert not (run / "metrics.jsonl").exists()
    # the stage released it when it returned: the directory trains now
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def test_a_checkpoint_a_kill_cut_short_does_not_stay_on_disk(tmp_path):
    """Killed while saving step 3, then resumed with another --save-every: step 3 was never saved again, and its
    partial checkpoint (up to a model and its optimiser state) stayed in ckpt/ for good."""
    run = tmp_path / "run"
    pretrain(run, "--save-every", "2", "--stop-at", "2", steps=4)
    orphan = run / "ckpt" / ".step-000003.tmp"
    (orphan / "model").mkdir(parents=True)
    pretrain(run, "--save-every", "2", "--resume", steps=4)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step-000002", "step-000004"]


def test_learning_rate_schedules_by_hand():
    from nanoseek.train.loop import lr_at

    steps = (0, 9, 10, 55, 79, 80, 90, 99)
    last_cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    cosine = [lr_at(s, 100, 1.0, 10) for s in steps]
    assert cosine[:4] == pytest.approx([0.1, 1.0, 1.0, 0.55]) and cosine[-1] == pytest.approx(last_cosine)
    # WSD: stable until the last 20 steps, then down to the floor, which its last step reaches (it stopped at 0.145)
    assert [lr_at(s, 100, 1.0, 10, "wsd") for s in steps] == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0, 0.955, 0.505, 0.1])
    assert [lr_at(s, 100, 2.0, 10, "constant") for s in (0, 10, 99)] == pytest.approx([0.2, 2.0, 2.0])
