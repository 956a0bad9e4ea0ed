"""`nanoseek bench` on tiny sizes: the JSON line's numbers are there, positive and consistent with what was asked
(token and step counts, acceptance in [0, 1], MFU in (0, 1]); user mistakes are one-line errors. No timing
thresholds: benchmarks are not tests."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from nanoseek import bench, cli

TINY = ["--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--train-batch", "2",
        "--seq-len", "16", "--device", "cpu"]


def run_bench(capsys, *argv) -> tuple[int, str, str]:
    """The verb as `nanoseek bench ARGV` runs it (cli.main's error handling), on its own parser."""
    parser = argparse.ArgumentParser(prog="nanoseek bench")
    bench.add_arguments(parser)
    try:
        code = bench.run(parser.parse_args([str(a) for a in argv]))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    except cli._user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def positive_numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            positive_numbers(v)
    elif isinstance(x, list):
        for v in x:
            positive_numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        assert math.isfinite(x) and x >= 0, x


@pytest.fixture(scope="module")
def tiny_run():
    """cpu-tiny (one MTP layer), every part measured once."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert bench.run(parser.parse_args(["--preset", "cpu-tiny", *TINY])) == 0
    return out.getvalue()


def test_preset_with_mtp(tiny_run):
    r = last_json(tiny_run)
    positive_numbers(r)
    assert "| batch |" in tiny_run and "Random weights" in tiny_run
    assert r["model"] == "cpu-tiny" and r["random_weights"] and r["mtp_layers"] == 1
    assert r["machine"]["device"] == "cpu" and r["machine"]["threads"] == torch.get_num_threads()
    assert [d["batch"] for d in r["decode"]] == [1, 2]
    for d in r["decode"]:
        assert d["tokens"] == d["batch"] * 4  # every sequence got all its new tokens (no stop tokens)
        assert d["decode_steps"] == 3  # the first token comes from the prefill
        assert d["prefill_tok_s"] > 0
        # None when noise made the 4-token run no slower than the 1-token one (test_noise_is_no_decode_rate)
        assert d["decode_tok_s"] is d["step_ms"] is None or d["decode_tok_s"] > 0 and d["step_ms"] > 0
    spec = r["speculative"]
    assert [s["batch"] for s in spec] == [1, 2]
    for s in spec:
        assert s["tokens"] == s["batch"] * 4
        assert 0 <= s["acceptance_rate"] <= 1 and s["accepted"] <= s["drafted"]
        assert 1 <= s["decode_steps"] <= 3  # an accepted draft saves a step
        assert s["speedup"] is None or s["speedup"] > 0
    t = r["train"]
    assert t["mtp"] and t["optimizer"] == "muon" and (t["batch"], t["seq_len"]) == (2, 16)
    assert 0 < t["mfu"] <= 1
    assert t["tokens_per_s"] > 0 and t["dollars_per_million_tokens"] > 0 and math.isfinite(t["loss"])
    assert r["kv_cache_bytes_per_token"] == 4 * (32 + 16) * 4  # 4 layers x (latent 32 + rope key 16) x float32
    assert r["kv_cache_bytes_per_token"] < r["full_kv_bytes_per_token"]
    assert r["engine_cache_bytes_per_token"] == 5 * (32 + 16) * 4  # the engine caches the MTP layer's too


def test_no_mtp_no_speculative(capsys):
    code, out, _ = run_bench(capsys, "--preset", "cpu-student", *TINY, "--no-train", "--batch-sizes", "3")
    r = last_json(out)
    assert code == 0 and r["mtp_layers"] == 0 and r["speculative"] is None and r["train"] is None
    assert r["decode"][0]["tokens"] == 12 and "no MTP layers" in out


def test_model_dir(capsys, tmp_path):
    import nanoseek

    torch.manual_seed(0)
    nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny")), tmp_path)
    code, out, _ = run_bench(capsys, "--model", tmp_path, *TINY, "--batch-sizes", "2", "--no-speculative",
                             "--price-per-hour", "0")
    r = last_json(out)
    assert code == 0 and r["model"] == str(tmp_path) and not r["random_weights"]
    assert r["speculative"] is None and "--no-speculative" in out
    assert r["train"]["optimizer"] == "adamw" and r["train"]["dollars_per_million_tokens"] == 0
    code, out, _ = run_bench(capsys, "--model", tmp_path, *TINY, "--batch-sizes", "2", "--no-speculative",
                             "--optimizer", "muon")
    assert code == 0 and last_json(out)["train"]["optimizer"] == "muon"


def test_noise_is_no_decode_rate(capsys, monkeypatch):
    """When the N-token run was timed no slower than the 1-token one, there is no decode rate to report (it printed
    1e9 tokens/s), and no speculative speed-up either."""
    def no_slower(fns, N, repeats, device):  # N tokens in 0.01 s, 1 token in 0.02 s
        return {k: [0.01, 0.02, f(N)] for k, f in fns.items()}

    monkeypatch.setattr(bench, "best_times", no_slower)
    code, out, err = run_bench(capsys, "--preset", "cpu-tiny", *TINY, "--no-train")
    r = last_json(out)
    assert code == 0 and all(d["decode_tok_s"] is None and d["step_ms"] is None for d in r["decode"])
    assert all(s["speedup"] is None for s in r["speculative"]) and "no decode rate" in err
    assert "| 1 | 400 | 20.0 | – | – | – | – | 0% |" in out


@pytest.mark.parametrize("argv, code, says", [
    (["--preset", "nope"], 2, "invalid choice: 'nope'"),
    (["--preset", "cpu-tiny", "--batch-sizes", "1,x"], 2, "expected batch sizes like 1,8,32"),
    (["--preset", "cpu-tiny", "--batch-sizes", "0,8"], 2, "batch sizes must be at least 1"),
    (["--preset", "cpu-tiny", "--new-tokens", "1"], 2, "--new-tokens: 1: must be at least 2"),
    (["--batch-sizes", "1"], 2, "one of the arguments --model --preset is required"),
    (["--model", "no/such/dir"], 1, "no such model directory"),
    (["--model", ""], 1, "no such model directory"),
    (["--model", sys.executable], 1, "a file, not a model directory"),
    (["--preset", "cpu-tiny", "--prompt-len", "500", "--new-tokens", "100"], 1, "does not fit the model's context"),
    (["--preset", "cpu-tiny", "--seq-len", "1000"], 1, "--seq-len 1000 does not fit"),
])
def test_user_errors(capsys, argv, code, says):
    got, out, err = run_bench(capsys, *argv)
    assert got == code and says in err and "Traceback" not in err and not out


def test_model_dir_without_config(capsys, tmp_path):
    code, _, err = run_bench(capsys, "--model", tmp_path)
    assert code == 1 and "no config.json" in err


@pytest.mark.skipif(importlib.util.find_spec("nanoseek.generate") is None,
                    reason="the CLI imports every verb's module; nanoseek.generate is not there yet")
def test_cli_entry():
    p = subprocess.run([sys.executable, "-m", "nanoseek", "bench", "--preset", "cpu-tiny", "--batch-sizes", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "batch sizes must be at least 1" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("threads, load, says", [(1, 8.0, "8.0 on 4 cores"), (4, 2.0, "torch's 4 threads wait"),
                                                 (1, 0.5, None)])
def test_a_busy_machine_is_named_with_fewer_threads_than_cores(capsys, monkeypatch, threads, load, says):
    """With --threads below the core count the note was never printed, however busy the machine."""
    real = bench.machine
    monkeypatch.setattr(bench, "machine", lambda device: {**real(device), "cores": 4, "threads": threads,
                                                          "load_avg_1m": load})
    code, out, _ = run_bench(capsys, "--preset", "cpu-tiny", *TINY, "--no-train", "--no-speculative")
    assert code == 0 and (says in out if says else "was busy" not in out)
