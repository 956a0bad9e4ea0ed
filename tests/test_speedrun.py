"""The speedrun's wiring, end to end on the `smoke` preset (a few steps per stage; the numbers mean nothing).

A smoke-sized teacher cannot produce verifiable traces, so the test plays the teacher for the first traces by
writing them into distill/traces.jsonl beforehand: the distill stage must resume from them and ask only for the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys

from nanoseek.speedrun import PRESETS, TASKS
from nanoseek.train.distill import DistillConfig, trace_problems


def test_smoke_speedrun(tmp_path):
    out = tmp_path / "sr"
    cfg = DistillConfig(teacher="", out="", tasks=TASKS, seed=0, **PRESETS["smoke"]["distill"])
    problems = trace_problems(cfg)
    (out / "distill").mkdir(parents=True)
    (out / "speedrun.json").write_text(json.dumps({"preset": "smoke", "seed": 0}))  # a run stopped in its distill
    with (out / "distill" / "traces.jsonl").open("w") as f:
        for p in problems[:-2]:  # the teacher still has to answer the last two
            f.write(json.dumps({"uid": p.uid, "sample": 0, "question": p.question, "reasoning": "\n".join(p.steps),
                                "answer": f"The answer is {p.answer}.", "finished": True}) + "\n")
    r = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "%|" not in r.stderr  # no stage drew a progress bar
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for stage in ("pretrain", "sft", "grpo", "distill"):
        assert 0.0 <= summary["stages"][stage]["pass@1"] <= 1.0
    assert "teacher_pass@1" in summary["stages"]["distill"]
    dist = summary["stages"]["distill"]
    assert dist["params_active"] * 2 <= dist["teacher_params_active"] and dist["params_total"] > 0
    assert dist["decode_tokens_per_s"] > 0 and dist["teacher_decode_tokens_per_s"] > 0
    assert (out / summary["final_model"].split(str(out) + "/")[-1] / "config.json").is_file()
    assert len((out / "distill" / "traces.jsonl").read_text().splitlines()) == len(problems)
    report = (out / "report.md").read_text()
    assert "Cost" in report and (out / "pretrain_loss.png").is_file() and (out / "grpo_rl.png").is_file()
    assert "![accuracy.png](accuracy.png)" in report and (out / "accuracy.png").is_file()
    cost_rows = {row.split("|")[1].strip(): row for row in report.split("## Cost")[1].splitlines() if row.startswith("| ")}
    for stage in ("pretrain", "sft", "grpo", "distill"):  # FLOPs and MFU for every stage: "–" marks a missing one
        assert "–" not in cost_rows[stage], cost_rows[stage]
    distill_cost = json.loads((out / "distill" / "cost.json").read_text())
    assert distill_cost["parts"]["teacher_traces"]["flops"] > 0  # the teacher's last two traces, generated here
    assert distill_cost["flops"] > distill_cost["parts"]["student_sft"]["flops"]
    # rerunning resumes, with the run's own preset and seed unless given: every stage is skipped
    r2 = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--out", str(out)],
                        capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0 and r2.stderr.count("already done") == 5
    again = json.loads(r2.stdout.strip().splitlines()[-1])
    assert again["stages"] == summary["stages"]  # kept, not scored again
    assert "resumed" not in summary and again["resumed"] == ["pretrain", "sft", "grpo", "student_base", "distill"]
    assert json.loads((out / "sft" / "held_out.json").read_text())["summary"] == summary["stages"]["sft"]
    # ... of the same settings only: another seed would mix seeds across the stages
    r3 = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out),
                         "--seed", "1"], capture_output=True, text=True, timeout=900)
    assert r3.returncode == 1 and "holds a speedrun of other settings (--preset smoke --seed 0)" in r3.stderr
    assert "already done" not in r3.stderr
    # a done.json cut short (a full disk) resumes that stage, which has nothing left to do; a lost model is one line
    (out / "sft" / "done.json").write_text("")
    r4 = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out)],
                        capture_output=True, text=True, timeout=900)
    assert r4.returncode == 0 and r4.stderr.count("already done") == 4, r4.stderr[-3000:]
    assert json.loads(r4.stdout.strip().splitlines()[-1])["stages"] == summary["stages"]
    (out / "grpo" / "model").unlink()
    r5 = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out)],
                        capture_output=True, text=True, timeout=900)
    assert r5.returncode == 1 and f"delete {out / 'grpo'} and rerun" in r5.stderr and "Traceback" not in r5.stderr


def test_an_out_of_other_files_or_a_damaged_record_is_refused_before_any_stage(tmp_path):
    """The speedrun writes summary.json, report.md and plots into OUT: a folder of the user's own is refused (it
    used to be overwritten), and so is a damaged speedrun.json (it used to refuse every setting, saying nothing)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "speedrun.json").write_text("")
    for out, says in ((mine, "is not empty and holds no speedrun"), (damaged, "speedrun.json is damaged")):
        r = subprocess.run([sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 1 and says in r.stderr and "[speedrun] pretrain" not in r.stderr, r.stderr
    assert (mine / "report.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["report.md"]


def test_cpu_student_has_at_most_half_the_teachers_active_parameters():
    import torch

    import nanoseek
    from nanoseek.model.transformer import param_counts

    def active(preset: str) -> int:
        with torch.device("meta"):
            return param_counts(nanoseek.build_model(nanoseek.get_preset(preset)))["active"]

    teacher, student = active(PRESETS["cpu"]["pretrain"]["preset"]), active(PRESETS["cpu"]["student_base"]["preset"])
    assert student <= teacher / 2, (student, teacher)
