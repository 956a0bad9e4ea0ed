"""`nanoseek report` on small synthetic run directories, written as the trainers and the speedrun write them
(metrics.jsonl, cost.json, done.json, summary.json): the machine and prices the runs recorded, interrupted stages,
and damaged files that only make the report say less."""

from __future__ import annotations

import json

import pytest

from nanoseek.eval.report import write_report

CPU = "CPU (2 threads) measured fp32 matmul"


def cost(device: str = CPU, devices: int = 1, hours: float = 0.5, price: float = 2.0) -> dict:
    return {"device": device, "devices": devices, "wall_s": hours * 3600 / devices, "device_hours": hours,
            "flops": 1e15, "mfu": 0.3, "price_per_device_hour": price, "dollars": hours * price}


def stage(root, name, steps=4, cost_json=None, done=True):
    """A run directory root/name as a speedrun stage leaves it: metrics.jsonl, then cost.json, then done.json."""
    d = root / name
    d.mkdir(parents=True)
    rows = [{"step": s, "loss": 5.0 / s, "wall_s": 10.0 * s} for s in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if cost_json is not None:
        (d / "cost.json").write_text(json.dumps(cost_json))
    if done:
        (d / "done.json").write_text(json.dumps({"stage": name, "cost": cost_json}))
    return d


def cost_table(report: str) -> dict[str, str]:
    """The cost table's rows by stage cell."""
    table = report.split("## Cost")[1].split("\n\n")[1]
    return {r.split("|")[1].strip(): r for r in table.splitlines()[2:]}


def test_machine_is_the_one_the_runs_recorded_not_this_one(tmp_path):
    from nanoseek.device import cpu_name

    stage(tmp_path, "pretrain", cost_json=cost())
    stage(tmp_path, "sft", cost_json=cost())
    report = write_report(tmp_path).read_text()
    assert f"Machine (recorded by the runs): {CPU}\n" in report
    assert cpu_name() not in report


def test_machines_that_differ_are_named_per_stage(tmp_path):
    stage(tmp_path, "pretrain", cost_json=cost("NVIDIA H800 datasheet bf16 dense", devices=8))
    stage(tmp_path, "sft", cost_json=cost())
    stage(tmp_path, "grpo", cost_json={k: v for k, v in cost().items() if k != "device"})
    report = write_report(tmp_path).read_text()
    assert (f"Machines (recorded by the runs): 8 × NVIDIA H800 datasheet bf16 dense (pretrain); {CPU} (sft); "
            "not recorded (grpo)\n") in report


def test_without_a_recorded_machine_this_one_is_labelled_as_such(tmp_path):
    from nanoseek.device import cpu_name

    stage(tmp_path, "pretrain", cost_json={k: v for k, v in cost().items() if k != "device"})
    report = write_report(tmp_path).read_text()
    assert f"Machine: not recorded by the runs; this report was made on {cpu_name()}" in report


def test_each_recorded_price_is_named_under_the_table(tmp_path):
    stage(tmp_path, "pretrain", cost_json=cost(hours=0.5, price=2.0))
    stage(tmp_path, "sft", cost_json=cost(hours=0.25, price=10.0))
    stage(tmp_path, "grpo", cost_json=cost(hours=0.25, price=2.0))
    report = write_report(tmp_path).read_text()
    rows = cost_table(report)
    assert "$1.0000" in rows["pretrain"] and "$2.5000" in rows["sft"] and "$0.5000" in rows["grpo"]
    assert "Dollars at $2/device-hour (pretrain, grpo), $10/device-hour (sft) (DeepSeek-V3:" in report
    # --price-per-hour bills every stage at one price: the note names it alone
    report = write_report(tmp_path, price=3.0).read_text()
    assert "Dollars at $3/device-hour (DeepSeek-V3:" in report and "$0.7500" in cost_table(report)["sft"]


def test_an_interrupted_stage_is_marked_in_the_cost_table(tmp_path):
    stage(tmp_path, "pretrain", cost_json=cost())
    stage(tmp_path, "sft", cost_json=cost())  # training finished, killed before the stage's own evaluation ended
    (tmp_path / "sft" / "done.json").unlink()
    stage(tmp_path, "grpo", steps=7, done=False)  # killed mid-training: no cost.json, no done.json
    report = write_report(tmp_path).read_text()
    rows = cost_table(report)
    assert set(rows) == {"pretrain", "sft (interrupted at step 4)", "grpo (interrupted at step 7)", "**total**"}
    assert "| grpo (interrupted at step 7) | 0.0194 |" in rows["grpo (interrupted at step 7)"]  # 70 s logged
    assert "interrupted stage" in report.split("## Cost")[1]


def test_a_lone_run_that_finished_is_not_marked_interrupted(tmp_path):
    """A run made by `nanoseek pretrain` has no done.json (only the speedrun writes it): its cost.json says it
    finished."""
    run = stage(tmp_path, "run", cost_json=cost(), done=False)
    assert set(cost_table(write_report(run).read_text())) == {"run", "**total**"}
    (run / "cost.json").unlink()
    assert "run (interrupted at step 4)" in cost_table(write_report(run).read_text())


def test_a_lone_distill_run_is_one_distill_row(tmp_path):
    """`nanoseek distill --out RUN` trains its student in RUN/student; RUN/cost.json adds the teacher's traces."""
    run = tmp_path / "d"
    stage(run, "student", cost_json=cost(hours=0.25), done=False)
    (run / "distill.json").write_text("{}")
    (run / "cost.json").write_text(json.dumps(cost(hours=0.5)))
    rows = cost_table(write_report(run).read_text())
    assert set(rows) == {"distill", "**total**"}
    assert "| distill | 0.5000 |" in rows["distill"]


def test_teacher_and_student_side_by_side(tmp_path):
    """Issue 7's teacher-vs-student report: from a speedrun's summary.json, or a lone distill run's report.json."""
    stage(tmp_path, "distill", cost_json=cost())
    summary = {"stages": {"distill": {"pass@1": 0.44, "teacher_pass@1": 0.5, "params_total": 217448,
                                      "teacher_params_total": 775584, "params_active": 217448,
                                      "teacher_params_active": 443808, "decode_tokens_per_s": 13809.3,
                                      "teacher_decode_tokens_per_s": "fast"}}}  # a damaged value is left out
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path).read_text()
    assert "| teacher | 0.500 | 775,584 | 443,808 | – |" in report
    assert "| student | 0.440 | 217,448 | 217,448 | 13,809 |" in report

    run = tmp_path / "lone"
    stage(run, "student", cost_json=cost(), done=False)
    (run / "distill.json").write_text("{}")
    (run / "report.json").write_text(json.dumps({"student": {"pass@1": None, "params_total": 10, "params_active": 10,
                                                             "decode_tokens_per_s": 99.0}}))  # a URL teacher: none
    report = write_report(run).read_text()
    assert "| student | – | 10 | 10 | 99 |" in report and "| teacher |" not in report


@pytest.mark.parametrize("damaged, levels", [
    ({"levels": [0.5, 0.1]}, ""),
    ({"levels": {"1": {"n": 3}, "2": {"n": 3, "pass@1": 0.4}}}, "L2: 0.40"),
    ({"levels": {"1": 0.5, "2": {"pass@1": 0.4}}, "families": "word"}, "L2: 0.40"),
    ({"levels": {"2": {"pass@1": 0.4}}, "families": {"word": {"pass@1": "high"}}}, "L2: 0.40"),
], ids=["levels-list", "level-without-pass@1", "level-number-families-string", "family-pass@1-string"])
def test_a_damaged_summary_only_makes_the_report_say_less(tmp_path, damaged, levels):
    stage(tmp_path, "pretrain", cost_json=cost())
    summary = {"stages": {"pretrain": {"pass@1": 0.3, **damaged}, "sft": {"pass@1": "?"}, "grpo": [1]}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path).read_text()
    accuracy = report.split("## Held-out accuracy by stage")[1].split("\n\n")[1].splitlines()
    assert accuracy[2:] == [f"| pretrain | 0.300 | {levels} |  |"]  # sft and grpo have no pass@1
    assert (tmp_path / "accuracy.png").is_file()


@pytest.mark.parametrize("row", [
    {"loss": 1.0}, {"step": 5, "reward": 0.5},
    {"step": 5, "reward": 0.5, "accuracy": 0.5, "response_length": 9, "eval": [0.5]},
], ids=["no-step", "reward-alone", "eval-list"])
def test_a_damaged_metrics_row_is_skipped(tmp_path, row):
    run = stage(tmp_path, "run", cost_json=cost(), done=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    assert cost_table(write_report(run).read_text())["run"].startswith("| run | 0.5000 |")
    assert (run / "run_loss.png").is_file()


def test_an_interrupted_runs_time_is_its_last_good_rows(tmp_path):
    run = stage(tmp_path, "run", done=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": "5", "wall_s": 50.0}) + "\n" + json.dumps({"wall_s": 60.0}) + "\n")
    assert " | 0.0111 | " in cost_table(write_report(run).read_text())["run (interrupted at step 4)"]  # 40 s


@pytest.mark.parametrize("damaged", [{"flops": "many"}, {"mfu": [0.3]}, {"price_per_device_hour": "2"},
                                     {"device": 7}])
def test_a_damaged_cost_json_leaves_out_what_is_damaged(tmp_path, damaged):
    run = stage(tmp_path, "run", cost_json={**cost(), **damaged}, done=False)
    report = write_report(run).read_text()
    row = cost_table(report)["run"]
    assert row.startswith("| run | 0.5000 |") and row.endswith("| $1.0000 |")
    assert ("Machine: not recorded by the runs" in report) == ("device" in damaged)


@pytest.mark.parametrize("name", ["cost.json", "summary.json"])
def test_a_file_that_is_not_utf8_only_makes_the_report_say_less(tmp_path, name):
    stage(tmp_path, "pretrain", cost_json=cost())
    (tmp_path / "summary.json").write_text(json.dumps({"stages": {"pretrain": {"pass@1": 0.3}}}))
    (tmp_path / ("pretrain/" if name == "cost.json" else "") / name).write_bytes(b"\xff\xfe\x00bad")
    assert "| pretrain |" in write_report(tmp_path).read_text()


def test_a_speedrun_without_its_summary_reports_the_stages_scored_so_far(tmp_path):
    """summary.json comes at the end; each stage keeps its held-out score in held_out.json as soon as it is scored."""
    for name, p in (("pretrain", 0.31), ("sft", 0.5)):
        stage(tmp_path, name, cost_json=cost())
        (tmp_path / name / "held_out.json").write_text(json.dumps({"key": {}, "summary": {
            "pass@1": p, "levels": {"1": {"pass@1": p + 0.1}}}}))
    stage(tmp_path, "grpo", steps=3, done=False)  # in progress: not scored yet
    report = write_report(tmp_path).read_text()
    accuracy = report.split("## Held-out accuracy by stage")[1].split("\n\n")[1].splitlines()
    assert accuracy[2:] == ["| pretrain | 0.310 | L1: 0.41 |  |", "| sft | 0.500 | L1: 0.60 |  |"]
    assert (tmp_path / "accuracy.png").is_file()


def test_a_student_reported_on_its_own_has_its_own_cost(tmp_path):
    """`nanoseek report RUN/distill/student`: the student's cost.json, not the distill run's (which adds the traces)."""
    run = tmp_path / "d"
    student = stage(run, "student", cost_json=cost(hours=0.25), done=False)
    (run / "distill.json").write_text("{}")
    (run / "cost.json").write_text(json.dumps(cost(hours=0.5)))
    assert "| student | 0.2500 |" in cost_table(write_report(student).read_text())["student"]


def test_a_resumed_run_is_not_reported_with_the_cost_of_its_earlier_stop(tmp_path):
    """--stop-at writes cost.json; --resume takes it away until the run ends, so a resumed run killed meanwhile is
    reported as interrupted, with the time it logged."""
    from nanoseek.train.metrics import Metrics

    run = stage(tmp_path, "run", steps=6, cost_json=cost(hours=0.001), done=False)
    Metrics(run / "metrics.jsonl", resume_step=6).log({"step": 7, "loss": 0.5, "wall_s": 70.0})  # then killed
    assert " | 0.0194 | " in cost_table(write_report(run).read_text())["run (interrupted at step 7)"]


def test_a_run_stopped_early_says_so(tmp_path):
    """--stop-at writes the run's cost.json too: the report says where it stopped rather than showing a whole run."""
    run = stage(tmp_path, "run", steps=3, cost_json=cost(), done=False)
    (run / "train_state").mkdir()
    (run / "train_state" / "state.json").write_text(json.dumps({"step": 3, "config": {"steps": 6}}))
    assert "run (stopped at step 3 of 6)" in cost_table(write_report(run).read_text())
    (run / "train_state" / "state.json").write_text(json.dumps({"step": 6, "config": {"steps": 6}}))
    assert set(cost_table(write_report(run).read_text())) == {"run", "**total**"}


def test_a_distillation_stopped_while_collecting_traces_has_a_row(tmp_path):
    """Killed before its student's SFT, a distill stage has no metrics.jsonl, but its saved traces cost device time."""
    stage(tmp_path, "pretrain", cost_json=cost())
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "traces_cost.json").write_text(json.dumps({"wall_s": 360.0, "flops": 2e12}))
    rows = cost_table(write_report(tmp_path).read_text())
    assert "| distill (interrupted collecting the teacher's traces) | 0.1000 | 2e+12 |" in "\n".join(rows.values())


def test_a_url_teachers_wait_is_named_not_counted(tmp_path):
    run = tmp_path / "d"
    stage(run, "student", cost_json=cost(hours=0.25), done=False)
    (run / "distill.json").write_text("{}")
    parts = {"teacher_traces": {"wall_s": 900.0, "flops": None}, "student_sft": {"wall_s": 900.0, "flops": 1e15}}
    (run / "cost.json").write_text(json.dumps({**cost(hours=0.25), "parts": parts}))
    report = write_report(run).read_text()
    assert "| distill | 0.2500 |" in cost_table(report)["distill"]
    assert "the URL teacher's traces took 900 s of waiting, not counted" in report
    assert "held-out evaluations" in report.split("## Cost")[1]  # what each row counts is said under the table


def test_a_timer_leaves_out_what_it_excludes():
    import time

    from nanoseek.train.metrics import Timer

    timer = Timer()
    with timer.excluding():
        time.sleep(0.2)
    assert timer.elapsed() < 0.1
