"""`nanoseek eval`: answer extraction, the pass@1 / maj@K / pass@K arithmetic, GSM8K-format data with levels, and
the command's last stdout line."""

from __future__ import annotations

import json
import os

import pytest

from conftest import tiny_model_dir
from nanoseek.data.checking import check
from nanoseek.data.tasks import Problem, from_record, generate
from nanoseek.cli import Interrupted, main
from nanoseek.eval.answers import extract_answer
from nanoseek.eval.evaluate import EvalResult, load_problems, majority, run_eval, summarize

RECORDS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7", "level": 1},
    {"question": "What is 12 times 3?", "answer": "36", "level": 1},
    {"question": "A box holds 1,200 beads; 200 are sold. How many are left?", "answer": "1,200 - 200 = 1,000\n#### 1,000",
     "level": 2},
]


@pytest.mark.parametrize("text, answer", [
    ("<think>\nthe answer is 5? no, 2 + 2 = 4\n</think>\n\nIt is 4", "4"),  # only the text after </think> counts
    ("<think>\n9\n</think>\n\nSo it is \\boxed{12} and not 13", "12"),
    ("work: 3 × 4 = 12\nAnswer: 12", "12"),
    ("the answer is -3.5.", "-3.5"),
    ("first 10, then 20, finally 1,000 left", "1,000"),
    ("<think>\n7\n</think>\n\nno idea", None),
    ("so the probability is \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # nested braces: the whole box, not its 4
    ("\\boxed{1{,}234} and \\boxed{\\dfrac{1}{2}", "1,234"),  # an unclosed box is not an answer
    ("The answer is **18**.", "18"),
    ("The answer is *18*.", "18"), ("The answer is _18_", "18"), ("The answer is `18`.", "18"),
    ("The answer is (10 + 8) * 10.", "(10 + 8) * 10"),  # an ASCII * is multiplication: it was read as "(10 + 8) 10"
    ("<think>\nw\n</think>\n\n3+4*5", "3+4*5"),  # was "3+45"
    ("The answer is 18, because 16 - 3 - 4 = 9 and 9 × 2 = 18.", "18"),
    ("The answer is 12 apples", "12"),
    ("The answer is 8 × 6 + 10.", "8 × 6 + 10"),  # a countdown expression stays whole
    ("The answer is Paris.", "Paris"),
    ("so x = −5", "−5"),  # the Unicode minus
    ("The answer is 1 1/2.", "1 1/2"),  # a mixed number, not its 1
    ("The answer is 2:5.", "2:5"),  # a ratio, not its 2
    ("So the fraction is 3/4.", "3/4"),  # a fraction in prose, not its denominator
    ("Each person gets $\\frac{1}{2}$ of the cake.", "1/2"),
    ("3/4 of 16 is 12", "12"),
    ("The dates 12/25/2024 are far", "2024"),  # not a fraction
    ("It is 1/1,000 of the total", "1,000"), ("a ratio of 3/1.5", "1.5"),  # a denominator is not cut
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answers_the_checking_audit_found_misread():
    twelve = from_record({"question": "q", "answer": "12"})
    countdown = from_record({"question": "q", "answer": "(6 × 7) ÷ 3", "family": "countdown",
                             "meta": {"numbers": [6, 7, 3], "target": 14}})
    right = ["The answer is 8 + 4 = 12.",  # was read as 8
             "<think>\n3 × 4\n</think>\n12, as computed above.",  # was "12,"
             "The answer is 12 (3 × 4).",  # was the whole phrase
             "The answer is **$12**.",  # was empty
             "The answer is as follows:\n12",  # was "as follows:"
             "The answer is approx. 12"]  # was "approx"
    assert [check(twelve, extract_answer(t)) for t in right] == [True] * len(right)
    assert not check(twelve, extract_answer("The answer is 8 + 4 = 13."))
    assert check(countdown, extract_answer("The answer is 6 × 7 ÷ 3 = 14."))  # was read as 6
    assert check(countdown, extract_answer("\\boxed{6 \\times 7 \\div 3}"))  # LaTeX operators
    assert check(countdown, extract_answer("<think>\nwork\n</think>\n\n(6 × 7) ÷ 3"))  # was read as its last 3
    assert check(countdown, extract_answer("<think>\nwork\n</think>\n\n**6 × 7 ÷ 3 = 14**"))
    assert not check(countdown, extract_answer("<think>\nwork\n</think>\n\n6 × 7 + 3"))
    assert check(countdown, extract_answer("<think>\nwork\n</think>\n\n(6 * 7) / 3"))  # was read as 3
    boxed = ["\\boxed{\\$12}", "\\boxed{12 \\text{ apples}}", "\\boxed{\\text{12}}", "\\boxed{$12$}"]
    assert [check(twelve, extract_answer(t)) for t in boxed] == [True] * len(boxed)  # were "\\$12", ...
    assert check(from_record({"question": "q", "answer": "1234"}), extract_answer("\\boxed{1\\,234}"))
    assert not check(twelve, extract_answer("\\boxed{1 2}"))  # was 12: a space does not join digits
    assert not check(from_record({"question": "q", "answer": "78"}), "7 8")
    assert check(from_record({"question": "q", "answer": "-3"}), "- 3")  # but may follow a sign
    with pytest.raises(ValueError, match="integers"):  # string meta had made every answer wrong, silently
        from_record({"question": "q", "answer": "x", "family": "countdown", "meta": {"numbers": ["6"], "target": "6"}})


def test_majority_votes_on_values_not_strings():
    p = from_record({"question": "q", "answer": "12"})
    answers = ["13", "12", "12.0"]
    s = summarize([EvalResult(p, answers, answers, [check(p, a) for a in answers])])
    assert s["maj@3"] == 1.0  # "12" and "12.0" are one answer, 2 votes of 3


def test_answers_the_second_eval_audit_found_misread():
    gold = lambda a: from_record({"question": "q", "answer": a})  # noqa: E731
    assert [check(gold("42"), extract_answer(f"The answer is {w}42.")) for w in ("therefore ", "approximately ",
            "€", "just ")] == [True] * 4  # were the whole phrase, never a number
    assert check(gold("18"), extract_answer("The answer is 18! Great."))
    assert not check(gold("12"), extract_answer("The answer is 12 or 13."))  # a hedge was read as its first number
    assert not check(gold("12"), extract_answer("The answer is 12, 13, 14 or 15"))
    assert check(gold("1234"), extract_answer("The answer is 1,234 apples."))  # a thousands comma is no hedge
    assert [check(gold("7"), extract_answer(f"The answer is {w} 7.")) for w in ("not", "at most", "less than")] == \
        [False] * 3  # a bound is not the number
    assert check(gold("x^2y+xy^2"), "xy(x+y)") and check(gold("2xy"), "2 x y")  # letters in maths are still maths
    assert check(gold("6"), extract_answer("The answer is 5.\n\nWait, I made an error. Answer: 6"))  # the correction
    six = extract_answer("<think>\n10 - 4 = 6\n</think>\n\nThe answer is 6.")
    assert [check(gold(g), six) for g in ("#### 6 dollars", "6 apples", "\\$6", "\\$6.00")] == [True] * 4
    assert check(gold("18.50 dollars"), "18.5") and check(gold("Paris"), "paris") and not check(gold("Paris"), "Sarip")
    assert check(gold("\\{1, 2\\}"), "\\{2, 1\\}") and check(gold("\\sqrt{2}"), "\\sqrt 2")  # LaTeX still read
    with pytest.raises(ValueError, match="'family' must be a string"):  # was a traceback after the whole evaluation
        from_record({"question": "q", "answer": "5", "family": 5})
    assert from_record({"question": "q", "answer": "5", "level": float("nan")}).level == 0  # a Parquet column's gap


def test_answers_the_numbers_audit_found_misread():
    gold = lambda a: from_record({"question": "q", "answer": a})  # noqa: E731
    suite = generate("word", 1, 1, seed=0)[0]
    n = suite.answer
    for text in (f"**Answer:** There are {n} marbles in total.", f"Final Answer: The final answer is {n}. I hope it "
                 "is correct.", f"The answer is {n}. Let me know if any part of the answer is unclear!"):
        assert check(suite, extract_answer(text)) and check(gold(n), extract_answer(text)), text  # were wrong
    assert extract_answer("<think>\n3 × 4 = 12\n12 + 5 = 17") is None  # cut off while reasoning: was 17
    assert extract_answer("The answer is not 7.") == "not 7" and extract_answer("about 12 or 13") == "13"
    assert [extract_answer(t) for t in ("She has 12 left, not 20.", "12 rather than $20", "It is never 20.")] == \
        ["12", "12", None]  # a number ruled out is not the answer (was 20, 20 and 20)
    for text in ("The answer is -$5.", "The net is -$5", "Answer: -$5"):
        assert check(gold("-5"), extract_answer(text)) and not check(gold("5"), extract_answer(text)), text
    assert check(gold("#### -$5"), "-5") and check(gold("-$1,200"), extract_answer("The answer is -$1,200."))
    assert [extract_answer(t) for t in ("The area is 12 m^2.", "\\boxed{12 m^2}", "It is 9 cm².")] == ["12"] * 2 + ["9"]
    assert check(gold("1234"), extract_answer("The answer is 1 234"))  # was 1
    math_style = gold("Two and three make five.\nSo the answer is $\\boxed{5}$.")  # the whole text was the gold
    assert math_style.answer == "5" and check(math_style, "5")
    with pytest.raises(ValueError, match="without a final answer to check against"):  # could never be scored right
        gold("Two and three make five.\nSo five.")


def test_the_answer_follows_the_last_end_of_reasoning():
    assert extract_answer("<think>x</think> The answer is 5.</think> 7") == "7"


def test_digits_and_minus_signs_of_other_scripts():
    """A dash that stands for a minus was dropped ('–21' scored right for a gold of 21) and digits of other scripts
    were extracted but never equal to anything ('答案是 ２１' scored wrong for 21)."""
    gold = lambda a: from_record({"question": "q", "answer": a})  # noqa: E731
    for text in ("The answer is –21.", "Answer: －21", "\\boxed{－21}", "so x = ‐21", "The answer is ﹣21."):
        answer = extract_answer(text)
        assert check(gold("-21"), answer) and not check(gold("21"), answer), text
    for text in ("答案是 ２１", "\\boxed{２１}", "The answer is ٢١.", "21"):
        assert check(gold("21"), extract_answer(text)) and check(gold("２１"), extract_answer(text)), text
    assert extract_answer("The total — 21") == "21"  # an em dash is punctuation
    for text, last in (("It takes 3–5 hours.", "5"), ("The score was 7–5", "5"), ("From 2023–2024", "2024")):
        assert extract_answer(text) == last, text  # a range, not a negative number
    assert not check(gold("-2"), extract_answer("\\boxed{3–5}"))
    countdown = generate("countdown", 1, 1, seed=0)[0]
    wide = countdown.answer.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
    assert check(countdown, wide) and check(countdown, countdown.answer)


def test_a_url_reply_is_scored_as_the_same_local_completion():
    """A reply cut off right after </think> (content "", not null) has no answer, as locally; so has one that ended
    inside the reasoning (content null), as a local completion that never closed </think>."""
    from nanoseek.eval.evaluate import run_eval_url
    from nanoseek.train.teacher import Trace

    class Client:
        def traces(self, questions, max_tokens, temperature, seeds):
            yield 0, Trace("2 + 3 = 5", "", False, closed=True)
            yield 1, Trace("2 + 3 = 5", "", False, closed=False)

    five = from_record({"question": "What is 2 + 3?", "answer": "5"})
    results = run_eval_url(Client(), [five, five], progress=False)
    locally = [extract_answer("<think>\n2 + 3 = 5\n</think>"), extract_answer("<think>\n2 + 3 = 5")]
    assert [r.answers[0] for r in results] == locally == [None, None]

    class Refusing:  # every request refused: the settings are wrong (a local run says so too), not a score of 0
        def traces(self, questions, max_tokens, temperature, seeds):
            yield from ((i, Trace("", "", False, error="HTTP 400: too long")) for i in range(len(questions)))

    with pytest.raises(ConnectionError, match="refused every request"):
        run_eval_url(Refusing(), [five, five], progress=False)


def test_majority_pools_answers_as_check_reads_them():
    p, half = from_record({"question": "q", "answer": "12"}), from_record({"question": "q", "answer": "1/2"})
    rows = [(p, ["12", "3 × 4 = 12", "8 + 4 = 12", "13", "13"]), (half, ["1/2", "0.5", "\\frac{1}{2}", "3", "3"])]
    s = summarize([EvalResult(q, a, a, [check(q, x) for x in a]) for q, a in rows])
    assert s["maj@5"] == 1.0  # was 0.0: the two 13s (and 3s) outvoted three ways of writing the right answer
    assert majority(half, ["0.5", "1/3", "1/2", "1/3"]) == 0  # a number and a text that equals it are one answer


def test_boxed_fractions_are_scored_as_fractions():
    half, four = from_record({"question": "q", "answer": "1/2"}), from_record({"question": "q", "answer": "4"})
    assert check(half, extract_answer("so \\boxed{\\frac{1}{2}}"))
    assert not check(four, extract_answer("so \\boxed{\\frac{3}{4}}"))  # was read as its last digit, 4
    assert check(from_record({"question": "q", "answer": "-5"}), extract_answer("so x = −5"))


def test_gsm8k_records_check_numbers_as_numbers():
    problems = [from_record(r) for r in RECORDS]
    assert [p.answer for p in problems] == ["7", "36", "1000"]
    assert [p.level for p in problems] == [1, 1, 2]
    assert check(problems[2], "1,000") and check(problems[2], "1000.0") and not check(problems[2], "100")


def _result(problem, answers, truth):
    return EvalResult(problem, [str(a) for a in answers], answers, [a == truth for a in answers])


def test_summary_by_hand():
    p1, p2, p3 = (from_record(r) for r in RECORDS)
    results = [
        _result(p1, ["7", "7", "8", "7"], "7"),  # 3 of 4 right; majority right
        _result(p2, ["35", "36", "35", None], "36"),  # 1 of 4 right; majority (35) wrong
        _result(p3, ["9", "8", None, None], "1000"),  # none right
    ]
    s = summarize(results)
    assert s["n"] == 3
    assert s["pass@1"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3, abs=1e-4)
    assert s["maj@4"] == pytest.approx(1 / 3, abs=1e-4)
    # pass@2: 2 of 4 samples miss every right one with chance C(4−c, 2)/C(4, 2): c = 3 → 0, c = 1 → 3/6, c = 0 → 1
    assert s["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    assert s["pass@4"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["levels"]["1"] == {"n": 2, "pass@1": 0.5, "maj@4": 0.5, "pass@2": 0.75, "pass@4": 1.0}
    assert s["levels"]["2"] == {"n": 1, "pass@1": 0.0, "maj@4": 0.0, "pass@2": 0.0, "pass@4": 0.0}
    assert "cells" not in s  # one family: the levels are the cells
    one = summarize([_result(p1, ["7"], "7"), _result(p2, ["3"], "36")])
    assert one == {"n": 2, "pass@1": 0.5, "levels": {"1": {"n": 2, "pass@1": 0.5}}}  # no maj@1 / pass@1 twice
    p = generate("arithmetic", 1, 1)[0]
    again = Problem(p.family, p.level, "Compute " + p.meta["expression"], p.steps, p.answer, p.meta)  # rephrased
    assert summarize([_result(p, ["7"], "7"), _result(again, ["7"], "7")])["distinct"] == 1


def test_pass_at_k_estimator_and_cells():
    from itertools import combinations

    from nanoseek.eval.evaluate import pass_at_k

    correct = [True, False, False, True, False, False, False, False]  # n 8, c 2
    for k in (1, 2, 3, 8):  # the estimator is the share of k-subsets that hold a right sample
        subsets = list(combinations(correct, k))
        assert pass_at_k(8, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    word = from_record({**RECORDS[0], "family": "word"})
    sums = [from_record({"question": f"{i} + 1?", "answer": str(i + 1), "family": "arithmetic", "level": 1 + i % 2})
            for i in range(4)]
    results = [_result(word, ["7"] * 5 + ["6"], "7")] + [_result(p, [p.answer] * i + ["x"] * (6 - i), p.answer)
                                                         for i, p in enumerate(sums)]
    s = summarize(results)
    assert [k for k in s if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@4", "pass@6"]
    assert set(s["cells"]) == {"arithmetic:1", "arithmetic:2", "word:1"}
    assert s["cells"]["arithmetic:2"]["pass@2"] == pytest.approx((pass_at_k(6, 1, 2) + pass_at_k(6, 3, 2)) / 2,
                                                                  abs=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = [r["question"] + " " + r["answer"] for r in RECORDS] * 20 + ["The answer is 0123456789."] * 20
    return tiny_model_dir(tmp_path_factory.mktemp("evalmodel"), texts, "gsm8k.jsonl", RECORDS)


T = "work\n</think>\n\n"  # a completion after the template's prefilled <think>, up to its answer


class ScriptedEngine:
    """Stands in for the engine: answers each prompt with the next scripted completion."""

    max_batch_size = 2

    def __init__(self, tok, completions):
        self.tok, self.todo = tok, list(completions)

    def generate(self, prompts, max_new_tokens, temperature, seed, stop_token_ids, top_p=1.0):
        return [self.tok.encode(self.todo.pop(0)) for _ in prompts]


def test_run_eval_reads_and_checks_each_sample(model_dir):
    _, tok, data = model_dir
    problems = load_problems(None, str(data), 0, 0)
    script = ["3 + 4 = 7\n</think>\n\nThe answer is 7.", "3 + 4 = 8\n</think>\n\nThe answer is 8.",  # after <think>
              "12 × 3\n</think>\n\n\\boxed{36}", "12 × 3 = 36",  # (the template's prefill)
              "1200 - 200 = 1000\n</think>\n\nThe answer is 1,000.", "1200 - 200 = 1000\n</think>\n\nThe answer is 100."]
    results = run_eval(ScriptedEngine(tok, script), tok, problems, samples=2, temperature=0.6, progress=False)
    assert [r.correct for r in results] == [[True, False], [True, False], [True, False]]  # 36: never closed </think>
    assert results[1].completions[1] == "<think>\n12 × 3 = 36" and results[1].answers[1] is None
    eos = ScriptedEngine(tok, ["3 + 4\n</think>\n\nThe answer is 7<｜end▁of▁sentence｜>"])  # no full stop before EOS
    assert run_eval(eos, tok, problems[:1], progress=False)[0].correct == [True]
    s = summarize(results)
    assert (s["pass@1"], s["maj@2"], s["pass@2"]) == (0.5, 1.0, 1.0)


def test_a_problem_s_samples_do_not_depend_on_the_others_evaluated(model_dir):
    """Samples were seeded by their position in the run: one problem sampled other completions at --n 20 and --n 40,
    or in a --data file's other order."""
    from nanoseek.eval.evaluate import engine_for, prompts_for

    d, tok, data = model_dir
    problems = load_problems(None, str(data), 0, 0)
    engine = engine_for(d, "cpu", prompts_for(problems, tok, "chat"), 8, 2)
    kw = dict(samples=2, temperature=1.0, max_new_tokens=8, progress=False, seed=5)
    every = run_eval(engine, tok, problems, **kw)
    two = run_eval(engine, tok, problems[::-1][:2], **kw)
    assert [r.completions for r in two] == [r.completions for r in every[::-1][:2]]
    assert all(r.completions[0] != r.completions[1] for r in every)  # a problem's samples still differ
    assert run_eval(engine, tok, problems, **{**kw, "seed": 6})[0].completions != every[0].completions


def test_command_on_gsm8k_data(model_dir, tmp_path, capsys):
    d, _, data = model_dir
    out = tmp_path / "rows.jsonl"
    rc = main(["eval", "--model", str(d), "--data", str(data), "--samples", "2", "--temperature", "0.8",
               "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 3 and set(summary["levels"]) == {"1", "2"}
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [len(r["completions"]) for r in rows] == [2, 2, 2]
    for row, rec in zip(rows, RECORDS):  # the file and the summary agree with the extraction and the checker
        problem = from_record(rec)
        assert row["extracted"] == [extract_answer(c) for c in row["completions"]]
        assert row["correct"] == [a is not None and check(problem, a) for a in row["extracted"]]
    assert summary["pass@1"] == pytest.approx(sum(sum(r["correct"]) / 2 for r in rows) / 3, abs=1e-4)
    assert summary["pass@2"] == pytest.approx(sum(any(r["correct"]) for r in rows) / 3, abs=1e-4)


def test_a_full_disk_at_the_end_keeps_the_summary(model_dir, tmp_path, capsys, monkeypatch):
    """--out that cannot be written at the end (a full disk) lost the whole evaluation: no summary, one error."""
    import errno

    from nanoseek import atomic

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    d, _, data = model_dir
    monkeypatch.setattr(atomic, "write_text", full)
    rc = main(["eval", "--model", str(d), "--data", str(data), "--max-new-tokens", "4", "--out", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 1 and json.loads(out.strip().splitlines()[-1])["n"] == 3
    assert "could not be written (No space left on device); the summary above scores the evaluation" in err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # (root may write anywhere)
        rc = main(["eval", "--model", str(d), "--data", str(data), "--out", str(locked / "r")])
        assert rc == 1 and "is not writable" in capsys.readouterr().err  # before the evaluation, not after it


@pytest.mark.parametrize("args, message", [
    (["--samples", "4"], "identical completions"),
    (["--task", "arithmetic:9"], "arithmetic has levels 1, 2, 3, 4"),
    (["--task", "arithmetic:x"], "arithmetic has levels"),
    (["--task", "arithmetic:"], "arithmetic has levels"),  # not every level
    (["--task", "poetry"], "unknown task"),
    (["--data", "{bad}"], "bad.jsonl:1: a record needs"),
])
def test_user_mistakes_are_one_line_errors(model_dir, tmp_path, capsys, args, message):
    d, _, _ = model_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer here"}\n')
    args = [str(bad) if a == "{bad}" else a for a in args]
    assert main(["eval", "--model", str(d), "--n", "2", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_relation_is_not_its_right_hand_side():
    five, bound = from_record({"question": "q", "answer": "5"}), from_record({"question": "q", "answer": "x \\geq 5"})
    assert check(five, "x = 5") and check(five, "2 + 3 = 5")
    assert not check(five, "x >= 5") and not check(five, "x ≠ 5") and not check(five, "x <= 5")
    assert check(bound, "x >= 5") and not check(bound, "5")
    rows = [(five, ["x >= 5", "x >= 5", "5"]), (bound, ["5", "5", "x \\geq 5"])]
    s = summarize([EvalResult(q, a, a, [check(q, x) for x in a]) for q, a in rows])
    assert s["maj@3"] == 0.0  # "x >= 5" was counted as a vote for 5, and "5" as one for x ≥ 5


class InterruptedEngine(ScriptedEngine):
    """Ctrl-C arrives once the script runs out."""

    def generate(self, prompts, max_new_tokens, temperature, seed, stop_token_ids, top_p=1.0):
        if len(self.todo) < len(prompts):
            raise KeyboardInterrupt
        return super().generate(prompts, max_new_tokens, temperature, seed, stop_token_ids)


def test_ctrl_c_keeps_the_problems_that_finished(model_dir, tmp_path, capsys, monkeypatch):
    d, tok, data = model_dir
    problems = load_problems(None, str(data), 0, 0)
    script = [T + "The answer is 7.", T + "The answer is 8.", T + "36", T + "35"]  # a chunk of 4: problems 1, 2
    with pytest.raises(Interrupted) as e:
        run_eval(InterruptedEngine(tok, script), tok, problems, samples=2, temperature=0.6, progress=False)
    assert [r.correct for r in e.value.done] == [[True, False], [True, False]]

    import nanoseek.eval.evaluate as evaluate

    monkeypatch.setattr(evaluate, "engine_for", lambda *a: InterruptedEngine(tok, script))
    out = tmp_path / "rows.jsonl"
    rc = main(["eval", "--model", str(d), "--data", str(data), "--samples", "2", "--temperature", "0.6",
               "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert rc == 130 and "interrupted: 2 of 3 problems finished" in captured.err and "eval:" not in captured.err
    assert (summary["n"], summary["pass@1"], summary["interrupted"]) == (2, 0.5, True)
    assert [json.loads(l)["correct"] for l in out.read_text().splitlines()] == [[True, False], [True, False]]
    complete = out.read_text()  # an earlier result: an interrupted run leaves it whole (it was replaced by the part)
    monkeypatch.setattr(evaluate, "engine_for", lambda *a: InterruptedEngine(tok, ["The answer is 8."] * 4))
    assert main(["eval", "--model", str(d), "--data", str(data), "--samples", "2", "--temperature", "0.6",
                 "--out", str(out), "--no-progress"]) == 130
    assert out.read_text() == complete and "keeps its earlier results" in capsys.readouterr().err


def test_sigterm_keeps_the_problems_that_finished_as_ctrl_c_does(model_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM (Slurm, Kubernetes, `timeout`) killed the evaluation with every finished row."""
    import signal

    import nanoseek.cli as cli
    import nanoseek.eval.evaluate as evaluate

    class Terminated(ScriptedEngine):
        def generate(self, prompts, *a, **kw):
            if len(self.todo) < len(prompts):
                cli._terminate(signal.SIGTERM, None)  # the handler `nanoseek` installs
            return super().generate(prompts, *a, **kw)

    d, tok, data = model_dir
    monkeypatch.setattr(cli, "TERMINATED", False)
    script = [T + "The answer is 7.", T + "The answer is 8.", T + "36", T + "35"]
    monkeypatch.setattr(evaluate, "engine_for", lambda *a: Terminated(tok, script))
    out = tmp_path / "rows.jsonl"
    rc = main(["eval", "--model", str(d), "--data", str(data), "--samples", "2", "--temperature", "0.6",
               "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 143 and json.loads(captured.out.strip().splitlines()[-1])["n"] == 2
    assert "terminated: 2 of 3 problems finished" in captured.err
    assert len(out.read_text().splitlines()) == 2


def test_ctrl_c_during_a_url_evaluation_keeps_the_problems_whose_replies_all_came():
    from nanoseek.eval.evaluate import run_eval_url
    from nanoseek.train.teacher import Trace

    class Client:  # replies arrive out of order; Ctrl-C before the second sample of problem 0
        def traces(self, questions, max_tokens, temperature, seeds):
            for i, answer in [(3, "6"), (0, "5"), (2, "7")]:
                yield i, Trace("", f"The answer is {answer}.", False)
            raise KeyboardInterrupt

    five, six = from_record({"question": "2 + 3?", "answer": "5"}), from_record({"question": "3 + 3?", "answer": "6"})
    with pytest.raises(Interrupted) as e:
        run_eval_url(Client(), [five, six], samples=2, temperature=0.6, progress=False)
    assert [(r.problem, r.correct) for r in e.value.done] == [(six, [False, True])]


def test_a_data_file_longer_than_n_says_so(tmp_path, capsys):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(5)))
    assert len(load_problems(None, str(data), 3, 0)) == 3
    assert f"{data}: the first 3 of its 5 records (--n 0 for all)" in capsys.readouterr().err
    assert len(load_problems(None, str(data), 0, 0)) == len(load_problems(None, str(data), 5, 0)) == 5
    assert capsys.readouterr().err == ""
    with data.open("a") as f:
        f.write('{"question": "cut off\n')  # a broken record past the first n is not read: no error
    assert len(load_problems(None, str(data), 3, 0)) == 3
    assert f"{data}: the first 3 records (--n 0 for all)" in capsys.readouterr().err


def test_ctrl_c_inside_a_chunk_keeps_the_problems_whose_samples_all_finished(model_dir):
    """The engine says which completions of the chunk had finished: Ctrl-C 8 s into a long evaluation kept nothing
    until a whole chunk (up to 1024 completions) was done."""
    _, tok, data = model_dir
    problems = load_problems(None, str(data), 0, 0)

    class MidChunk(ScriptedEngine):
        def generate(self, prompts, max_new_tokens, temperature, seed, stop_token_ids, top_p=1.0):
            done = {0: T + "The answer is 7.", 1: T + "The answer is 8.", 3: T + "36"}  # problem 2: one of two
            raise Interrupted({i: self.tok.encode(t) for i, t in done.items()})

    with pytest.raises(Interrupted) as e:
        run_eval(MidChunk(tok, []), tok, problems, samples=2, temperature=0.6, progress=False)
    assert [(r.problem, r.correct) for r in e.value.done] == [(problems[0], [True, False])]
