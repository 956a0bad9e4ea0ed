"""Teacher traces without a server: collected, resumed after a kill or Ctrl-C, costed, filtered and verified, from
scripted teachers; the distillation KL by hand."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from nanoseek.cli import UserError
from nanoseek.data.tasks import generate
from nanoseek.train.distill import DistillConfig, collect_traces, filter_traces, trace_problems
from nanoseek.train.teacher import split_reasoning

def test_two_phrasings_of_a_problem_are_two_traces_and_a_resume_keeps_both(tmp_path):
    """Keyed by problem, the second phrasing's trace overwrote the first's (9.6% of the speedrun's traces were asked
    and dropped), and a resumed run kept the other one."""
    import dataclasses as dc

    from nanoseek.train.teacher import Trace

    p = generate("word", 1, 1, seed=3)[0]
    other = dc.replace(p, question=p.question + " Answer with a number.")
    assert other.uid == p.uid

    class Teacher:
        def __init__(self, stop_after=None):
            self.stop_after = stop_after

        def traces(self, questions, max_tokens, temperature, seeds):
            for i, (q, seed) in enumerate(zip(questions, seeds)):
                if i == self.stop_after:
                    raise KeyboardInterrupt
                yield i, Trace(f"seed {seed}", f"The answer is {p.answer}.", True)

    cfg = DistillConfig(teacher="t", out=str(tmp_path), progress=False)
    whole = collect_traces(cfg, Teacher(), [p, other], tmp_path / "whole.jsonl")
    with pytest.raises(KeyboardInterrupt):
        collect_traces(cfg, Teacher(stop_after=1), [p, other], tmp_path / "resumed.jsonl")
    resumed = collect_traces(cfg, Teacher(), [p, other], tmp_path / "resumed.jsonl")
    assert [r["question"] for r in whole] == [p.question, other.question] and resumed == whole
    assert filter_traces(whole, [p, other])[1]["kept"] == 2


def test_filter_keeps_only_verified_unique_traces():
    p, q = generate("arithmetic", 1, 2, seed=5)
    rec = lambda prob, ans, fin=True, why="add": {"uid": prob.uid, "sample": 0, "question": prob.question,  # noqa: E731
                                                  "reasoning": why, "answer": f"The answer is {ans}.", "finished": fin}
    records = [rec(p, p.answer), rec(p, p.answer), rec(q, int(q.answer) + 1), rec(q, q.answer, fin=False),
               rec(q, q.answer, why=""), rec(q, q.answer, why="add\n<｜User｜>more<｜Assistant｜>add")]
    kept, counts = filter_traces(records, [p, q])  # chat tokens in a reasoning would train a new turn in the middle
    assert counts == {"total": 6, "malformed": 3, "wrong": 1, "duplicate": 1, "kept": 1}
    msg = kept[0]["messages"]
    assert msg[0]["content"] == p.question and msg[1]["content"].startswith("<think>\nadd\n</think>\n\n")


def test_logit_distillation_is_kl_of_the_student_from_the_teacher():
    """KL(teacher ‖ student) = Σ p_t (log p_t − log p_s), the mean over supervised positions (the reverse KL, the
    student's own mass, is another objective: mode seeking)."""
    import torch

    from nanoseek.train.loop import distill_kl

    student = torch.tensor([[[2.0, 0, 0], [0, 0, 9]]])  # (B=1, T=2, V=3); position 1 is not supervised
    teacher = torch.tensor([[[0.0, 1, 0], [9, 0, 0]]])
    p_t, log_s = teacher[0, 0].softmax(-1), student[0, 0].log_softmax(-1)
    expected = (p_t * (p_t.log() - log_s)).sum().item()
    assert distill_kl(student, teacher, torch.tensor([[5, -100]])).item() == pytest.approx(expected, rel=1e-6)


def test_split_reasoning():
    assert split_reasoning("<think>r</think> a") == ("r", "a")
    assert split_reasoning("r</think>a", prefilled=True) == ("r", "a")
    assert split_reasoning("just text") == ("", "just text")


def test_distill_cost_counts_local_traces_and_adds_up_over_resumes(tmp_path):
    """RUN/cost.json: the student's SFT plus a local teacher's trace generation, summed over resumed collections; a
    URL teacher's traces ran elsewhere and count in neither device time nor FLOPs."""
    import json

    from nanoseek.train.distill import add_traces_cost, write_cost

    for name, flops in (("local", 5e9), ("url", None)):
        run = tmp_path / name
        (run / "student").mkdir(parents=True)
        (run / "student" / "cost.json").write_text(json.dumps({"wall_s": 30.0, "flops": 1e10,
                                                               "price_per_device_hour": 2.0}))
        add_traces_cost(run, 10.0, flops)
        traces = add_traces_cost(run, 2.5, flops)  # a resumed run asks for the rest
        write_cost(run, traces, "cpu")
        cost = json.loads((run / "cost.json").read_text())
        if flops is None:
            assert traces == {"wall_s": 12.5, "flops": None}
            assert cost["wall_s"] == 30.0 and cost["flops"] == 1e10
        else:
            assert traces == {"wall_s": 12.5, "flops": 1e10}
            assert cost["wall_s"] == 42.5 and cost["flops"] == 2e10
            assert cost["dollars"] == round(42.5 / 3600 * 2.0, 4)


def test_trace_problems_follow_the_task_cells():

    problems = trace_problems(DistillConfig(teacher="t", out="o", n=40, tasks=["arithmetic:2", "countdown"]))
    assert {(p.family, p.level) for p in problems} == {("arithmetic", 2), ("countdown", 1), ("countdown", 2),
                                                      ("countdown", 3)}
    with pytest.raises(UserError, match="arithmetic has levels"):
        trace_problems(DistillConfig(teacher="t", out="o", n=4, tasks=["arithmetic:7"]))


def test_a_first_write_cut_by_a_kill_does_not_block_the_rerun(tmp_path):
    """Killed while writing distill.json or speedrun.json (a run's first file), a directory held only the hidden
    temporary file of that write, and every rerun refused it as someone's files (found by a kill audit)."""
    from nanoseek.speedrun import claim
    from nanoseek.train.distill import claim_run

    for name, first, start in (("d", "distill.json", lambda run: claim_run(run, DistillConfig(
            teacher="t", out=str(run), student="s"))), ("s", "speedrun.json", lambda run: claim(run, {"seed": 0}))):
        run = tmp_path / name
        run.mkdir()
        (run / f".{first}.0123456789ab.tmp").write_text('{"te')
        start(run)
        assert sorted(p.name for p in run.iterdir()) == [first]
        other = tmp_path / f"{name}-other"  # another file's temporary stays someone's file
        other.mkdir()
        (other / ".notes.txt.0123456789ab.tmp").write_text("mine")
        with pytest.raises(UserError, match="not empty"):
            start(other)


def test_a_last_record_without_its_newline_is_kept(tmp_path):
    """A kill between a record and its newline: the record counted as done was then cut from traces.jsonl, so the
    next rerun asked the teacher again (and a URL teacher's other answer retrained the student)."""
    from nanoseek.train.distill import collect_traces

    record = {"index": 0, "uid": "u", "sample": 0, "question": "q", "reasoning": "r", "answer": "a", "finished": True}
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(record))
    cfg = DistillConfig(teacher="t", out=str(tmp_path), student="s", progress=False)
    problem = types.SimpleNamespace(uid="u", question="q", answer="a")

    class NoTeacher:
        def traces(self, questions, *args):
            assert not questions, "asked the teacher for a trace already on disk"
            return iter(())

    assert collect_traces(cfg, NoTeacher(), [problem], path) and path.read_text() == json.dumps(record) + "\n"


def test_tasks_all_is_scored_on_every_family():
    """`--tasks all` asked the teacher every cell, then raised a traceback choosing the held-out problems."""
    from nanoseek.train.distill import scored_problems

    problems = scored_problems(DistillConfig(teacher="t", out="o", tasks=["all"], eval_n=30))
    assert len(problems) == 30 and {p.family for p in problems} == {"arithmetic", "word", "countdown"}


class ChunkTeacher:
    """Stands in for LocalTeacher: answers in chunks of two, its FLOPs counted per chunk; stops at `stop_at`."""

    def __init__(self, stop_at=None):
        self.flops, self.stop_at, self.seeds = 0.0, stop_at, []

    def traces(self, questions, max_tokens, temperature, seeds):
        from nanoseek.train.teacher import Trace

        self.seeds += seeds
        for start in range(0, len(questions), 2):
            self.flops += 10.0
            for i in range(start, min(start + 2, len(questions))):
                if i == self.stop_at:
                    raise KeyboardInterrupt
                yield i, Trace(f"r{seeds[i]}", "a", True)


def test_an_interrupted_collection_counts_what_its_saved_traces_cost(tmp_path):
    """traces_cost.json used to be written only when the whole collection returned: a run interrupted after
    saving traces, then resumed, reported the cost of the rest alone."""
    cfg = DistillConfig(teacher="t", out=str(tmp_path), n=4, progress=False)
    problems, path = trace_problems(cfg), tmp_path / "traces.jsonl"
    with pytest.raises(KeyboardInterrupt):
        collect_traces(cfg, ChunkTeacher(stop_at=3), problems, path)  # two chunks generated, three traces saved
    assert len(path.read_text().splitlines()) == 3
    assert json.loads((tmp_path / "traces_cost.json").read_text())["flops"] == 20.0
    collect_traces(cfg, ChunkTeacher(), problems, path)  # the rest: one chunk
    assert json.loads((tmp_path / "traces_cost.json").read_text())["flops"] == 30.0


def test_another_seed_samples_other_traces(tmp_path):
    """Request seeds were seed + k: --seed 1's first sample of a problem was --seed 0's second."""
    seeds = []
    for seed in (0, 1):
        teacher = ChunkTeacher()
        cfg = DistillConfig(teacher="t", out=str(tmp_path), n=4, samples=2, seed=seed, progress=False)
        collect_traces(cfg, teacher, trace_problems(dataclasses.replace(cfg, seed=0)), tmp_path / f"{seed}.jsonl")
        seeds.append(set(teacher.seeds))
    assert len(seeds[0]) == len(seeds[1]) == 8 and not seeds[0] & seeds[1]
    assert seeds[0] == set(range(8))  # --seed 0 keeps its traces
