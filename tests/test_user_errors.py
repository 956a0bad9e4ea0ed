"""User mistakes on the command line: one line naming the mistake, exit 1 (or argparse's usage error, exit 2), and
the user's files left as they were. Each case here once printed a traceback, exited 0, or lost data."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from nanoseek.cli import main

TINY = ["--preset", "cpu-tiny", "--steps", "1", "--n-docs", "60", "--batch-size", "2", "--seq-len", "32",
        "--no-progress"]


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, says", [
    (["pretrain", "--out", "x", "--lr", "-1"], "--lr: -1: must be greater than 0"),
    (["pretrain", "--out", "x", "--batch-size", "0"], "--batch-size: 0: must be at least 1"),
    (["pretrain", "--out", "x", "--save-every", "0"], "--save-every"),
    (["grpo", "--model", "m", "--out", "x", "--group-size", "1"], "--group-size: 1: must be at least 2"),
    (["grpo", "--model", "m", "--out", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--model", "m", "--temperature", "-1"], "--temperature: -1 is outside [0, 2]"),
    (["distill", "--teacher", "t", "--out", "x", "--student", "s", "--batch-size", "0"], "--batch-size"),
    (["sft", "--model", "m", "--out", "x", "--seq-len", "0"], "--seq-len"),
    (["grpo", "--model", "m", "--out", "x", "--lr", "inf"], "--lr: inf: must be a finite number"),
    (["eval", "--model", "m", "--temperature", "nan"], "must be a finite number"),
    (["pretrain", "--out", "x", "--seed", "-1"], "--seed: -1 is outside [0, 4294967295]"),
    # the second file silently replaced the first (sft and pretrain add theirs up)
    (["eval", "--model", "m", "--data", "a.jsonl", "--data", "b.jsonl"], "--data takes one file (given a.jsonl and b"),
    (["grpo", "--model", "m", "--out", "x", "--eval-data", "a", "--eval-data", "b"], "--eval-data takes one file"),
    (["distill", "--teacher", "t", "--out", "x", "--data", "a", "--data", "b"], "--data takes one file"),
])
def test_bad_option_values_are_usage_errors(capsys, argv, says):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and says in err and "Traceback" not in err


def test_a_device_this_machine_lacks_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for argv in (["pretrain", "--out", tmp_path / "p", "--device", "cuda", *TINY],
                 ["eval", "--model", tmp_path, "--device", "cuda"],
                 ["pretrain", "--out", tmp_path / "p", "--device", "tpu", *TINY]):
        code, err = run_cli(capsys, *argv)
        assert code == 1 and err.startswith("error: --device") and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()


def test_a_gpu_index_past_the_visible_ones_is_one_line(monkeypatch):
    """On a one-GPU machine (simulated), cuda:1 is refused up front, not by CUDA's "invalid device ordinal"."""
    from nanoseek.cli import UserError
    from nanoseek.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cuda") == "cuda"
    with pytest.raises(UserError, match="shows 1 CUDA GPU"):
        resolve_device("cuda:1")


def test_out_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "notes.txt", *TINY)
    assert code == 1 and err.startswith("error:") and (tmp_path / "notes.txt").read_text() == "keep me"
    assert "is a file; name a run directory" in err  # not "[Errno 17] File exists"
    distill = ["distill", "--teacher", tmp_path / "t", "--student-preset", "cpu-student", "--out"]
    for argv in (distill, ["convert", "m"]):
        code, err = run_cli(capsys, *argv, tmp_path / "notes.txt")
        assert code == 1 and "is a file; name a" in err and (tmp_path / "notes.txt").read_text() == "keep me", err


@pytest.mark.parametrize("name", ["data/corpus.jsonl", "data/meta.json", "metrics.jsonl"])
def test_pretrain_never_replaces_a_data_folder_that_is_not_its_own(capsys, tmp_path, name):
    """Not even files with the names a run writes: a directory no run started in holds none of its leftovers."""
    (tmp_path / "data").mkdir()
    (tmp_path / name).write_text('{"text": "mine"}\n')
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path, *TINY)
    assert code == 1 and "not a training run" in err  # refused before anything is written
    assert (tmp_path / name).read_text() == '{"text": "mine"}\n'


def test_a_fresh_pretrain_makes_its_own_tokenizer(capsys, tmp_path):
    """A failed first attempt leaves RUN/tokenizer behind; the retry with another --vocab-size must not reuse it.
    The same folder made by the user (no run started there) is theirs: refused, left as it is."""
    assert run_cli(capsys, "tokenizer", "train", "--out", tmp_path / "tokenizer", "--vocab-size", 300, "--n-docs", 50)[0] == 0
    mine = (tmp_path / "tokenizer" / "tokenizer.json").read_text()
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path, *TINY, "--vocab-size", "280")
    assert code == 1 and "not a training run (tokenizer)" in err
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == mine
    (tmp_path / ".nanoseek-run").touch()  # what a run writes first: so the tokenizer is an attempt's leftover
    code, _ = run_cli(capsys, "pretrain", "--out", tmp_path, *TINY, "--vocab-size", "280")
    assert code == 0
    vocab = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 280


def test_outputs_never_overwrite_what_the_user_made(capsys, tmp_path, monkeypatch):
    """eval --out replaces only an earlier eval --out file; tasks --out and tokenizer train need --overwrite."""
    data = tmp_path / "problems.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    code, err = run_cli(capsys, "eval", "--model", tmp_path, "--data", data, "--out", data)
    assert code == 1 and "not this command's output" in err and data.read_text().startswith('{"question"')
    for out, says in ((tmp_path, "is a directory"), ("", "must name a file"), (tmp_path / "no" / "r.jsonl", "no directory")):
        code, err = run_cli(capsys, "eval", "--model", tmp_path, "--data", data, "--out", out)
        assert code == 1 and says in err, err
    earlier = tmp_path / "results.jsonl"
    earlier.write_text('{"question": "q", "answer": "1", "completions": ["1"], "extracted": ["1"], "correct": [true]}\n')
    from nanoseek.eval.evaluate import earlier_results

    notes = tmp_path / "notes.md"
    notes.write_text("\nmy notes\n")  # a first line that is blank is no sign of an earlier --out
    (tmp_path / "empty.jsonl").write_text("")
    assert earlier_results(earlier) and earlier_results(tmp_path / "empty.jsonl")
    assert not earlier_results(data) and not earlier_results(notes)
    assert run_cli(capsys, "tasks", "--out", data, "--n", 2)[1].startswith("error: --out")  # exists: refused
    assert data.read_text().startswith('{"question": "What is 1 + 1?"')
    assert run_cli(capsys, "tasks", "--out", data, "--n", 2, "--overwrite")[0] == 0
    assert len(data.read_text().splitlines()) == 2
    assert "name it .jsonl" in run_cli(capsys, "tasks", "--out", tmp_path / "q.parquet", "--n", 2)[1]
    from nanoseek.data import tasks

    def small_cell(family, level, n, **kw):  # the error a cell gives when --n asks more than it holds
        raise ValueError(f"only 3 distinct eval problems found for {family}:{level}, {n} asked")

    monkeypatch.setattr(tasks, "generate", small_cell)
    code, err = run_cli(capsys, "tasks", "--out", tmp_path / "big.jsonl", "--tasks", "word:1", "--n", 5,
                        "--split", "eval")
    assert code == 1 and err.startswith("error: only 3 distinct") and "--n" in err and "Traceback" not in err, err
    monkeypatch.undo()
    tok = tmp_path / "tok"
    assert run_cli(capsys, "tokenizer", "train", "--out", tok, "--n-docs", 50)[0] == 0
    code, err = run_cli(capsys, "tokenizer", "train", "--out", tok, "--n-docs", 50)
    assert code == 1 and "--overwrite" in err


def test_a_training_run_never_moves_into_a_folder_of_other_files(capsys, tmp_path):
    (tmp_path / "thesis.tex").write_text("keep")
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path, *TINY)
    assert code == 1 and "not a training run (thesis.tex)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_convert_and_tokenizer_leave_an_existing_model_alone(capsys, tmp_path):
    import nanoseek

    torch.manual_seed(0)
    src = nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny")), tmp_path / "a")
    dst = nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny")), tmp_path / "b")
    before = (dst / "model.safetensors").read_bytes()
    code, err = run_cli(capsys, "convert", src, dst)
    assert code == 1 and "--overwrite" in err and (dst / "model.safetensors").read_bytes() == before
    assert run_cli(capsys, "convert", src, dst, "--overwrite", "--dtype", "float32")[0] == 0
    assert (dst / "model.safetensors").read_bytes() != before
    code, err = run_cli(capsys, "tokenizer", "train", "--out", dst, "--n-docs", "50")
    assert code == 1 and "model directory" in err and not (dst / "tokenizer.json").exists()


def test_distill_refuses_a_run_of_other_settings(capsys, tmp_path):
    from nanoseek.cli import UserError
    from nanoseek.train.distill import DistillConfig, claim_run

    run = tmp_path / "run"
    claim_run(run, DistillConfig(teacher="http://127.0.0.1:1/v1", out=str(run), student="s1"))
    claim_run(run, DistillConfig(teacher="http://127.0.0.1:1/v1", out=str(run), student="s1"))  # a rerun resumes
    (run / "traces.jsonl").write_text('{"index": 0}\n')  # (a run with no traces yet takes new settings)
    with pytest.raises(UserError, match="teacher"):
        claim_run(run, DistillConfig(teacher="other", out=str(run), student="s1"))
    with pytest.raises(UserError, match="student 's1' -> 's2'"):
        claim_run(run, DistillConfig(teacher="http://127.0.0.1:1/v1", out=str(run), student="s2"))
    old, new = tmp_path / "speedrun", tmp_path / "moved"  # a speedrun's distill run, its models beside it
    claim_run(old / "distill", DistillConfig(teacher=str(old / "grpo/model"), out="", student=str(old / "s/model")))
    (old / "distill" / "traces.jsonl").write_text('{"index": 0}\n')
    old.rename(new)
    claim_run(new / "distill", DistillConfig(teacher=str(new / "grpo/model"), out="", student=str(new / "s/model")))
    with pytest.raises(UserError, match="student 's/model' -> 'x/model'"):
        claim_run(new / "distill", DistillConfig(teacher=str(new / "grpo/model"), out="", student=str(new / "x/model")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        claim_run(tmp_path / "busy", DistillConfig(teacher="t", out=str(tmp_path / "busy"), student="s1"))


def test_resume_says_what_it_keeps_and_refuses_another_stage(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "pretrain", "--out", run, *TINY)[0] == 0
    code, err = run_cli(capsys, "pretrain", "--out", run, *TINY, "--steps", "2", "--resume", "--lr", "0.5")
    assert code == 0 and "lr 0.5 (the run's: 0.006)" in err  # the run keeps its own learning rate, and says so
    code, err = run_cli(capsys, "pretrain", "--out", run, *TINY, "--steps", "2", "--resume")
    assert code == 0 and "already at step 2" in err and "not used" not in err
    code, err = run_cli(capsys, "sft", "--model", run / "model", "--out", run, "--resume", "--no-progress")
    assert code == 1 and "another stage" in err
    for verb in (["pretrain", *TINY], ["speedrun", "--preset", "smoke"]):
        code, err = run_cli(capsys, verb[0], "--out", "", *verb[1:])
        assert code == 1 and "--out must name" in err, err
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "typo", *TINY, "--resume")
    assert code == 0 and "no checkpoint to resume; starting a new run" in err


def test_resume_keeps_the_runs_own_length_unless_given(capsys, tmp_path):
    run, args = tmp_path / "run", [a for a in TINY if a not in ("--steps", "1")]
    assert run_cli(capsys, "pretrain", "--out", run, *args, "--steps", "3", "--save-every", "1", "--stop-at", "1")[0] == 0
    code, err = run_cli(capsys, "pretrain", "--out", run, "--resume", "--no-progress", "--set", "num_hidden_layers=2",
                        "--no-document-mask")
    state = json.loads((run / "train_state" / "state.json").read_text())
    assert code == 0 and state["step"] == 3  # not the preset's 2000 steps
    assert (state["config"]["steps"], state["config"]["save_every"]) == (3, 1)
    assert "overrides {'num_hidden_layers': 2}" in err and "document_mask False" in err  # said to be not used
    assert run_cli(capsys, "pretrain", "--out", run, "--resume", "--no-progress", "--steps", "4")[0] == 0
    assert json.loads((run / "train_state" / "state.json").read_text())["step"] == 4  # given: extends the run


def test_a_finished_run_resumed_reports_where_it_is(capsys, tmp_path):
    run, args = tmp_path / "run", [a for a in TINY if a not in ("--steps", "1")]
    assert run_cli(capsys, "pretrain", "--out", run, *args, "--steps", "2")[0] == 0
    for extra in ([], ["--steps", "1"]):
        assert main(["pretrain", "--out", str(run), "--resume", "--no-progress", *extra]) == 0
        out = capsys.readouterr()
        summary = json.loads(out.out.strip().splitlines()[-1])
        assert "already at step 2" in out.err and summary["steps"] == 2 and summary["final"]["step"] == 2, summary


def test_sft_and_grpo_resume_without_model(capsys, tmp_path):
    base = tmp_path / "base"
    assert run_cli(capsys, "pretrain", "--out", base, *TINY)[0] == 0
    sft = ["--steps", "2", "--batch-size", "2", "--seq-len", "64", "--n-samples", "8", "--no-progress"]
    assert run_cli(capsys, "sft", "--model", base / "model", "--out", tmp_path / "s", *sft, "--stop-at", "1")[0] == 0
    assert run_cli(capsys, "sft", "--out", tmp_path / "s", "--resume", "--no-progress")[0] == 0  # the run's own model
    assert json.loads((tmp_path / "s" / "train_state" / "state.json").read_text())["step"] == 2
    # --steps 300 is sft's default, and given it still extends the run (it was taken as not given)
    assert run_cli(capsys, "sft", "--out", tmp_path / "s", "--resume", "--steps", "300", "--stop-at", "3",
                   "--no-progress")[0] == 0
    assert json.loads((tmp_path / "s" / "train_state" / "state.json").read_text())["step"] == 3
    for verb in ("sft", "grpo"):
        code, err = run_cli(capsys, verb, "--out", tmp_path / f"new-{verb}", "--no-progress")
        assert code == 1 and "--model names the model to start from" in err
        code, err = run_cli(capsys, verb, "--out", tmp_path / f"new-{verb}", "--resume", "--no-progress")
        assert code == 1 and err == f"error: {tmp_path / f'new-{verb}'} has no checkpoint to resume; pass --model to " \
                                    "start a new run there\n"  # not "starting a new run" first


def test_an_unknown_option_gets_the_verbs_usage_and_a_guess(capsys):
    code, err = run_cli(capsys, "eval", "--model", "m", "--temprature", "0.6")
    assert code == 2 and "usage: nanoseek eval" in err
    assert "unrecognized arguments: --temprature 0.6 (did you mean --temperature?)" in err


def test_resume_trains_on_the_runs_own_shards_after_the_data_changed(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: {i} + {i} = {2 * i}"}) + "\n" for i in range(40)))
    run, args = tmp_path / "run", [a for a in TINY if a not in ("--steps", "1")]
    assert run_cli(capsys, "pretrain", "--out", run, *args, "--data", data, "--steps", "3", "--stop-at", "1")[0] == 0
    shards = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    data.write_text(data.read_text() + json.dumps({"text": "an edit after the run started"}) + "\n")
    code, err = run_cli(capsys, "pretrain", "--out", run, "--resume", "--no-progress")
    assert code == 0 and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == shards  # its own tokens, untouched


def test_a_bad_record_deep_in_a_streamed_corpus_is_one_line(capsys, tmp_path):
    """--data is read one record at a time (a GB corpus is never held in memory), by the tokenizer's trainer and then
    by the shard builder: a bad line past the start still names its line and leaves no shards."""
    good = "".join(json.dumps({"text": f"{i} + 1 = {i + 1}"}) + "\n" for i in range(500))
    data = tmp_path / "a.jsonl"
    data.write_text(good + '{"text": broken\n' + good)
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r", *TINY, "--data", data)
    assert code == 1 and err.count("error:") == 1 and f"{data}:501: not valid JSON" in err
    data.write_text(good)
    assert run_cli(capsys, "pretrain", "--out", tmp_path / "r", *TINY, "--data", data)[0] == 0
    bad = tmp_path / "b.jsonl"
    bad.write_text(good + '{"text": broken\n')  # read by the shard builder only: the tokenizer is the run's
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "s", *TINY, "--data", bad, "--tokenizer",
                        tmp_path / "r" / "model")
    assert code == 1 and f"{bad}:501: not valid JSON" in err
    assert not (tmp_path / "s" / "data").exists() and not list(tmp_path.glob("s/.data.tmp-*"))


def test_data_files_add_up_and_a_tokenizer_without_bos_is_refused(capsys, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, n in ((a, 30), (b, 20)):
        path.write_text("".join(json.dumps({"text": f"{path.stem} {i} + 1 = {i + 1}"}) + "\n" for i in range(n)))
    assert run_cli(capsys, "pretrain", "--out", tmp_path / "r", *TINY, "--data", a, "--data", b)[0] == 0
    assert json.loads((tmp_path / "r" / "data" / "meta.json").read_text())["n_docs"] == 50  # both files
    assert run_cli(capsys, "pretrain", "--out", tmp_path / "r2", *TINY, "--data")[0] == 2  # no file: a usage error
    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train([str(a)], trainers.BpeTrainer(vocab_size=300))
    (tmp_path / "tok").mkdir()
    plain.save(str(tmp_path / "tok" / "tokenizer.json"))
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r3", *TINY, "--data", a, "--tokenizer",
                        tmp_path / "tok")
    assert code == 1 and "no begin/end-of-sentence token" in err
    for flags, says in ((["--tokenizer", tmp_path / "tok", "--vocab-size", "300"], "brings its own vocabulary"),
                        (["--set", "max_position_embeddings=16"], "shorter than a training row")):
        code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r4", *TINY, *flags)
        assert code == 1 and says in err  # was silently ignored or raised
    code, err = run_cli(capsys, "distill", "--teacher", "ftp://host/model", "--student", tmp_path, "--out",
                        tmp_path / "d")
    assert code == 1 and "http:// or https://" in err


def test_set_takes_pythons_spellings_and_refuses_strings_for_flags(capsys, tmp_path):
    from nanoseek.config import ConfigError, get_preset

    run = tmp_path / "run"
    assert run_cli(capsys, "pretrain", "--out", run, *TINY, "--set", "attention_bias=False",
                   "--set", "tie_word_embeddings=True")[0] == 0
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["attention_bias"] is False and cfg["tie_word_embeddings"] is True
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r2", *TINY, "--set", "norm_topk_prob=no")
    assert code == 1 and "norm_topk_prob must be true or false" in err
    for bad in ({"type": "yarn"}, {"type": "yarn", "factor": "x"}, {"type": "yarn", "factor": 4, "beta_fast": "b"}):
        with pytest.raises(ConfigError, match="rope_scaling"):
            get_preset("cpu-tiny").replace(rope_scaling=bad)
    for setting, says in (("num_experts_per_tok=0", "num_experts_per_tok must be at least 1"),
                          ("num_experts_per_tok=null", "num_experts_per_tok must be at least 1"),
                          ("initializer_range=-1", "initializer_range must be a non-negative number, got -1"),
                          ("aux_loss_alpha=abc", "aux_loss_alpha must be a non-negative number, got 'abc'"),
                          ("routed_scaling_factor=-1", "routed_scaling_factor must be a positive number, got -1"),
                          ("quantization_config=5", "quantization_config must be an object"),
                          ("n_group=8", "at least 2 experts a group")):
        code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r3", *TINY, "--set", setting)
        assert code == 1 and says in err and "Traceback" not in err, (setting, err)  # were tracebacks, or a run
    assert not (tmp_path / "r3" / "model").exists()  # that no command could load


def test_a_torn_metrics_line_is_skipped(tmp_path):
    """A kill during a write can leave half a line at the end of metrics.jsonl: resume and report skip it."""
    from nanoseek.train.metrics import Metrics, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    Metrics(path, resume_step=1).log({"step": 2, "loss": 1.4})
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.4}]


def test_bad_problem_records_and_too_little_data_are_one_line(capsys, tmp_path):
    from nanoseek.data.tasks import from_record

    for rec, says in (({"question": "q", "answer": ""}, "empty"), ({"question": "q", "answer": "#### "}, "empty"),
                      ({"question": "q", "answer": {"x": 1}}, "a string or a number"),
                      ({"question": "q", "answer": float("nan")}, "no completion can match"),
                      *(({"question": "q", "answer": "2", "level": bad}, "non-negative integer")
                        for bad in ("abc", "²", True, [], {}, -1, 2.5))):
        with pytest.raises(ValueError, match=says):
            from_record(rec)
    assert [from_record({"question": "q", "answer": "2", "level": ok}).level  # NaN: a gap in a Parquet column
            for ok in (2, 2.0, " 3 ", "", None, float("nan"))] == [2, 2, 3, 0, 0, 0]
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"text": "one short document"}\n')
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "run", "--data", tiny, *TINY)
    assert code == 1 and "give more --data" in err and "Traceback" not in err


def test_sft_leaves_out_conversations_whose_answer_starts_past_the_row(capsys, tmp_path):
    from conftest import tiny_model_dir

    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    model, _, data = tiny_model_dir(tmp_path / "m", ["word hi hello there ok"] * 20, "chat.jsonl", [long, short] * 4)
    code, err = run_cli(capsys, "sft", "--model", model, "--out", tmp_path / "s", "--data", data, "--seq-len", 32,
                        "--steps", 2, "--batch-size", 2, "--no-progress")
    assert code == 0 and "4 of 8 conversations answer only past --seq-len 32" in err
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite: no batch without answer tokens
    (tmp_path / "m" / "long.jsonl").write_text(json.dumps(long) + "\n")
    code, err = run_cli(capsys, "sft", "--model", model, "--out", tmp_path / "s2", "--data", tmp_path / "m" / "long.jsonl",
                        "--seq-len", 32, "--no-progress")
    assert code == 1 and "raise --seq-len" in err


def test_verbs_that_do_not_train_data_parallel_refuse_torchrun(capsys, tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) a verb other than pretrain, sft and grpo would run as N copies of itself (N
    requests to a teacher per problem, N writers of one file): it is refused before it does anything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_cli(capsys, "distill", "--teacher", tmp_path, "--out", tmp_path / "d", "--student", tmp_path)
    assert code == 1 and "distill runs in one process" in err and "sft --data RUN/kept.jsonl" in err
    assert not (tmp_path / "d").exists()
    code, err = run_cli(capsys, "eval", "--model", tmp_path)
    assert code == 1 and "eval runs in one process" in err


def test_serve_and_generate_refuse_what_they_cannot_use(capsys, tmp_path):
    """A --history that is not an SQLite file is told before the model loads; a cache that cannot be allocated and
    a message role the chat template would drop (the model answered an empty conversation) are one line too."""
    from conftest import tiny_model_dir

    model, _, prompts = tiny_model_dir(tmp_path / "m", ["what is 1 + 2"] * 20, "p.jsonl",
                                       [{"messages": [{"role": "usr", "content": "what is 1 + 2"}]}])
    (tmp_path / "notes.txt").write_text("not a database")
    for history in (tmp_path, tmp_path / "notes.txt"):
        code, err = run_cli(capsys, "serve", "--model", tmp_path / "no-model", "--no-compile", "--history", history)
        assert code == 1 and err.startswith(f"error: --history {history}: cannot open") and "Traceback" not in err
    assert (tmp_path / "notes.txt").read_text() == "not a database"
    code, err = run_cli(capsys, "serve", "--model", model, "--no-compile", "--history", tmp_path / "h.sqlite3",
                        "--max-batch-size", 10**9)
    assert code == 1 and err.startswith("error: no memory for the KV cache") and "Traceback" not in err, err
    code, err = run_cli(capsys, "generate", "--model", model, "--prompts", prompts, "--max-new-tokens", 2)
    assert code == 1 and "message 1 must be {'role': one of system, developer, user, assistant" in err
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port in use: told before the model loads, not after
        port = busy.getsockname()[1]
        code, err = run_cli(capsys, "serve", "--model", tmp_path / "no-model", "--history", tmp_path / "h.sqlite3",
                            "--port", port)
    assert code == 1 and err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (choose another " \
                                "--port or --host)\n"


def test_the_gpu_speedrun_is_refused_on_the_cpu(capsys, tmp_path):
    code, err = run_cli(capsys, "speedrun", "--preset", "gpu", "--device", "cpu", "--out", tmp_path / "s")
    assert code == 1 and "sized for one GPU" in err and not (tmp_path / "s").exists()  # it started, for days


def test_a_model_too_big_for_memory_is_refused_before_any_work(capsys, tmp_path):
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "big", *TINY, "--preset", "v3-671b")
    assert code == 1 and "optimiser state need" in err and "choose a smaller --preset" in err, err  # was an OOM
    assert not (tmp_path / "big").exists()


def test_the_default_micro_batch_divides_the_batch():
    """--batch-size 40 alone failed on a --micro-batch-size the user never gave (32 does not divide 40)."""
    from nanoseek.train.loop import micro_batch_default

    assert [micro_batch_default(b, cap, False) for b, cap in ((40, 32), (24, 16), (32, 32), (7, 32), (64, 16))] == \
        [20, 12, 32, 7, 16]
    assert micro_batch_default(40, 32, True) == 32  # as given (then refused with a message if it does not divide)


def test_the_command_line_starts_without_torch():
    """`nanoseek` imports nanoseek.cli before any handler exists: with torch imported there (0.2-0.8 s), a Ctrl-C in
    the first second was a traceback from inside the import."""
    import subprocess
    import sys

    code = "import sys, nanoseek.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    import nanoseek  # and the package's names and submodules are there when asked for

    assert nanoseek.config.PRESETS is nanoseek.PRESETS and nanoseek.checkpoint.load_model is nanoseek.load_model
    assert not hasattr(nanoseek, "no_such_module")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["tasks", "--help"], ["pretrian"]])
def test_help_and_verbs_without_torch_do_not_import_it(argv):
    """Only the named verb's options are built: every verb's module (four import torch) made `--help` take seconds."""
    import subprocess
    import sys

    code = (f"import sys, nanoseek.cli as c\ntry:\n    c.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_version_is_the_package_s(capsys):
    from importlib.metadata import version

    import nanoseek
    from nanoseek.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"nanoseek {nanoseek.__version__}\n"
    assert version("nanoseek") == nanoseek.__version__  # pyproject reads it from there


def test_a_ctrl_c_while_modules_load_waits_until_they_have(ctrl_c):
    """A Ctrl-C inside numpy's import (torch imports it) printed a traceback or was lost; now it is held until the
    imports end, then raised where the CLI handles it."""
    import signal

    from nanoseek.cli import signals_deferred

    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            reached = True
    assert reached


def test_interrupted_is_the_last_line_not_a_progress_bar_drawn_again(monkeypatch, capsys):
    import gc
    import sys

    import nanoseek.generate
    from nanoseek.cli import main

    def run(args):
        from tqdm import tqdm

        bar = tqdm(total=10, file=sys.stderr)
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(nanoseek.generate, "run", run)
    assert main(["generate", "--model", "m", "hi"]) == 130
    gc.collect()  # a bar left open was closed, and drawn once more, when it was collected
    assert capsys.readouterr().err.endswith("\ninterrupted\n")


def test_set_refuses_a_v2_router_transformers_would_read_otherwise(tmp_path, capsys):
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r", *TINY, "--set", "scoring_func=softmax",
                        "--set", "topk_method=greedy")
    assert code == 1 and "norm_topk_prob false" in err


def test_a_typo_in_the_last_data_file_is_said_before_the_others_are_read(capsys, tmp_path, monkeypatch):
    from nanoseek import tokenizer

    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda *a, **kw: pytest.fail("read the first file first"))
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"text": "1 + 1 = 2"}) + "\n")
    for verb in (["pretrain", *TINY], ["tokenizer", "train"]):
        for bad, says in ((tmp_path / "missing.jsonl", "missing.jsonl: no such file"), (tmp_path / "c.csv", "'.csv'")):
            code, err = run_cli(capsys, *verb, "--out", tmp_path / "o", "--data", data, bad)
            assert code == 1 and says in err and err.count("error:") == 1, (verb, err)


def test_a_run_trains_on_an_earlier_runs_shards_as_it_would_on_the_data(capsys, tmp_path):
    """--data RUN/data: the shards and the tokenizer of an earlier run, read in place (nothing tokenized again): with
    the same settings the model is the earlier run's, bit for bit."""
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} + 2 = {i + 2}"}) + "\n" for i in range(80)))
    assert run_cli(capsys, "pretrain", "--out", tmp_path / "a", *TINY, "--data", data)[0] == 0
    assert run_cli(capsys, "pretrain", "--out", tmp_path / "b", *TINY, "--data", tmp_path / "a" / "data")[0] == 0
    same = lambda f: (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()  # noqa: E731
    assert same("model/model.safetensors") and same("model/tokenizer.json") and not (tmp_path / "b" / "data").exists()
    for extra, says in (([], "not token shards"), (["--data", data], "cannot be mixed"),
                        (["--vocab-size", "300"], "drop --tokenizer/--vocab-size")):
        shards = tmp_path / ("a/data" if extra else "a/model")  # a model folder is not shards
        code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "c", *TINY, "--data", shards, *extra)
        assert code == 1 and says in err and err.count("error:") == 1
    (tmp_path / "a" / "data" / "shard-00000.bin").write_bytes(b"")
    code, err = run_cli(capsys, "pretrain", "--out", tmp_path / "c", *TINY, "--data", tmp_path / "a" / "data")
    assert code == 1 and "missing or cut short (shard-00000.bin)" in err


def test_pretrain_refuses_a_pipe_it_would_read_twice(capsys, tmp_path):
    """It trained the tokenizer on the pipe, then waited for ever to read it again for the token shards."""
    import os

    os.mkfifo(tmp_path / "corpus.jsonl")
    code, err = run_cli(capsys, "pretrain", *TINY, "--out", tmp_path / "run", "--data", tmp_path / "corpus.jsonl")
    assert code == 1 and "can be read only once (a pipe?)" in err and "--tokenizer" in err


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly():
    """`nanoseek generate ... | head -1` printed `error: [Errno 32] Broken pipe` and exited 1."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "nanoseek", "tasks", "--out", "-", "--n", "20000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_an_out_we_cannot_write_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """`tokenizer train` trained, and `convert` loaded the whole model, before finding they could not write --out;
    the error then named our temporary file, not the user's."""
    import os
    from pathlib import Path

    from nanoseek import atomic
    from nanoseek.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and access(p, mode, **kw))  # (root)
    for argv in (["tokenizer", "train", "--out", str(locked / "tok")], ["convert", str(tmp_path), str(locked / "m")]):
        assert main(argv) == 1
        assert f"the directory {locked} is not writable" in capsys.readouterr().err
    target = tmp_path / "gone" / "report.md"
    with pytest.raises(FileNotFoundError) as e:
        atomic.write_text(target, "x")
    assert e.value.filename == str(target) and ".tmp" not in str(e.value)
