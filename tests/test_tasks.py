"""The verifiable task suite: determinism, the train/eval split, answers that check, checkers that can't be fooled."""

import json
import re
from collections import Counter

import pytest

from nanoseek.data.tasks import (
    FAMILIES, LEVELS, Problem, from_record, generate, mixture, split_of, to_chat, to_gsm8k, to_text,
)
from nanoseek.data.checking import check
from test_working import check_lines  # tests/ is on sys.path under pytest

CELLS = [(f, l) for f in FAMILIES for l in LEVELS[f]]


@pytest.fixture(scope="module")
def samples():
    return {(f, l): generate(f, l, 300, seed=7) for f, l in CELLS}


def wrong_numeric(p):
    return [str(int(p.answer) + 1), str(int(p.answer) - 1), "", "   ", "banana", "42abc", "1/0", "--3", None,
            f"{p.answer}{p.answer}1", "nan", "inf", "1e400"]


def test_families_and_levels():
    assert FAMILIES == ("arithmetic", "word", "countdown")
    assert LEVELS == {"arithmetic": (1, 2, 3, 4), "word": (1, 2, 3), "countdown": (1, 2, 3)}


@pytest.mark.parametrize("family,level", CELLS)
def test_deterministic(family, level):
    a, b = generate(family, level, 50, seed=1), generate(family, level, 50, seed=1)
    assert a == b
    assert [p.uid for p in a] != [p.uid for p in generate(family, level, 50, seed=2)]
    assert [p.uid for p in generate(family, level, 20, seed=1, split="eval")] == [
        p.uid for p in generate(family, level, 20, seed=1, split="eval")]
    json.dumps([p.meta for p in a])  # JSON-serialisable


@pytest.mark.parametrize("family,level", CELLS)
def test_train_eval_disjoint(family, level):
    train = generate(family, level, 2000, seed=0, split="train")
    evals = generate(family, level, 300, seed=0, split="eval")
    tu, eu = {p.uid for p in train}, {p.uid for p in evals}
    assert len({p.question for p in train}) == 2000 and len({p.question for p in evals}) == 300
    assert not tu & eu  # no content (e.g. the same sum in another phrasing) is in both splits
    assert not {p.question for p in train} & {p.question for p in evals}
    assert {split_of(p) for p in train} == {"train"} and {split_of(p) for p in evals} == {"eval"}
    assert all(p.family == family and p.level == level for p in train + evals)


def test_a_word_problem_is_one_problem_in_every_template():
    """The same generated values in each template of a scenario and level are one problem (one uid, one split),
    whatever order the template states them in ("Rosa is 15. Ivan is 3 years older" / "3 years older than Priya,
    who is 15"), so a held-out word problem is never trained on in another phrasing."""
    import random as stdlib_random

    from nanoseek.data.tasks import SCENARIOS, WORD_TEMPLATES

    for (scenario, level), templates in WORD_TEMPLATES.items():
        for seed in range(20):
            values, _, answer = SCENARIOS[scenario](stdlib_random.Random(seed), level)
            uids = {Problem("word", level, t.format(**values), (), str(answer), {"scenario": scenario}).uid
                    for t in templates}
            assert len(uids) == 1, (scenario, level, [t.format(**values) for t in templates])


def test_uid_is_hash_of_content_not_phrasing():
    p = generate("arithmetic", 1, 1)[0]
    q = Problem(p.family, p.level, "Compute " + p.meta["expression"], (), p.answer, dict(p.meta))
    assert q.uid == p.uid and len(p.uid) == 16 and int(p.uid, 16) >= 0
    r = Problem("gsm8k", 1, "  " + p.question.upper().replace(" ", "   \n") + " ", (), "0", {})
    assert r.uid == Problem("gsm8k", 1, p.question, (), "0", {}).uid  # free text: normalised question
    assert Problem("word", 1, p.question, (), "0", {}).uid != p.uid
    assert split_of(p) == ("eval" if int(p.uid, 16) % 10 == 0 else "train")
    assert len({p, p}) == 1  # hashable despite the meta dict


def test_every_answer_checks_and_wrong_ones_fail(samples):
    for (family, level), problems in samples.items():
        for p in problems:
            assert check(p, p.answer), (p.question, p.answer)
            if family == "countdown":
                for bad in ("", "garbage", "1 + 1", str(p.meta["target"]), None, p.answer + " + 1"):
                    assert not check(p, bad), (p.answer, bad)
            else:
                assert re.fullmatch(r"-?\d+", p.answer)
                for bad in wrong_numeric(p):
                    assert not check(p, bad), (p.answer, bad)


def test_numeric_normalisation():
    p = Problem("arithmetic", 1, "q", (), "1234", {})
    for ok in ("1234", " 1234 ", "1,234", "+1234", "1234.0", "1234.", "1 234", "1234.00"):
        assert check(p, ok), ok
    for bad in ("1,23,4", "12,34", "1235", "1234.5", "$1234x", "1.234"):
        assert not check(p, bad), bad
    neg = Problem("arithmetic", 1, "q", (), "-7", {})
    assert check(neg, "-7") and check(neg, "-7.0") and check(neg, "−7") and not check(neg, "7")


@pytest.mark.parametrize("level", LEVELS["arithmetic"])
def test_arithmetic_matches_python(level, samples):
    ops_range = {1: (1, 1), 2: (2, 2), 3: (3, 3), 4: (3, 4)}[level]
    max_digits = {1: 2, 2: 2, 3: 3, 4: 4}[level]
    for p in samples["arithmetic", level]:
        expr = p.meta["expression"]
        assert expr in p.question
        value = eval(expr.replace("×", "*").replace("÷", "/"))  # our own generated text, not model output
        assert value == int(value) == int(p.answer)
        n_ops = sum(expr.count(o) for o in " + , - , × , ÷ ".split(","))
        results = [l for l in p.steps if re.fullmatch(r"-?\d+ [-+×÷] \(?-?\d+\)? = -?\d+", l)]
        assert ops_range[0] <= n_ops <= ops_range[1] and len(results) >= n_ops
        assert all(len(n) <= max_digits for n in re.findall(r"\d+", expr))
        assert ("(" in expr) == (level >= 3)
        assert not any(a == b and re.fullmatch(r"\d+ × \d+0 = \d+", a) for a, b in zip(p.steps, p.steps[1:]))  # × 20
        left = [l.removeprefix("Now: ") for l in p.steps if l.startswith("Now: ")]
        assert len(left) == n_ops - 1  # after each operation but the last: what is left, worth the same
        assert all(eval(e.replace("×", "*").replace("÷", "/")) == value for e in left), left
        check_lines(p.steps)  # every step a true statement, column working and sign rules included
        assert p.steps[-1].endswith(f"= {p.answer}")
    if level == 1:  # compact enough for a tiny model, column working included
        assert max(len(p.question) + sum(map(len, p.steps)) for p in samples["arithmetic", 1]) < 200


@pytest.mark.parametrize("level", LEVELS["word"])
def test_word_problems(level, samples):
    problems = samples["word", level]
    assert {p.meta["scenario"] for p in problems} == {"shopping", "sharing", "groups", "rates", "ages", "time"}
    for p in problems:
        sentences = [i for i, line in enumerate(p.steps) if line.endswith(".")]  # working lines carry no full stop
        assert len(sentences) == level and int(p.answer) > 0
        for i, j in zip(sentences, sentences[1:] + [len(p.steps)]):
            a, op, b = re.search(r"(\d+) ([-+×÷]) (\d+)\D*$", p.steps[i]).groups()  # the operation it names ...
            result = re.fullmatch(rf"{a} {re.escape(op)} {b} = (\d+)", p.steps[j - 1])  # ... is worked, then stated
            assert result and int(result[1]) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b),
                                                 "÷": int(a) // int(b)}[op], p.steps
        assert p.steps[-1].split("= ")[-1] == p.answer


@pytest.mark.parametrize("level", LEVELS["countdown"])
def test_countdown_problems(level, samples):
    for p in samples["countdown", level]:
        nums = p.meta["numbers"]
        assert len(nums) == level + 2 and 10 <= p.meta["target"] <= 999
        assert all(str(n) in p.question for n in nums) and str(p.meta["target"]) in p.question
        assert not Counter(map(int, re.findall(r"\d+", p.answer))) - Counter(nums)


def test_countdown_checker():
    p = Problem("countdown", 2, "q", (), "(3 + 4) × 5", {"numbers": [3, 4, 5, 6], "target": 35})
    for ok in ("(3 + 4) × 5", "(3+4)*5", "5 × (4 + 3)", "(3 + 4) × 5 = 35", " (6 − 3 + 4) × 5 ", "(6-3+4)*5"):
        assert check(p, ok), ok
    for bad in ("5 × 7", "(3 + 4) × 5 = 36", "35", "(3 + 4) * 5 * 1", "(4 + 4) × 5 - 5", "3 + 4 × 5",
                "(3 + 4) ** 1 * 5", "-(-35)", "(3 + 4) × 5.0", "(3 + 4) × 05 + 0", "((3 + 4) × 5",
                "__import__('os')", "__import__('os').system('echo hi')", "(lambda: 35)()", "[35][0]",
                "open('x')", "35 if True else 0", "7 // 2", "True * 35", "", "   ", None, "(" * 300 + "1",
                "(3 + 4) × 5; 1", "6 / 4 × 5 × 4 + 5"):
        assert check(p, bad) is False, bad
    q = Problem("countdown", 1, "q", (), "", {"numbers": [7, 2, 4], "target": 14})
    assert check(q, "7 × 2") and check(q, "7 × 4 ÷ 2") and not check(q, "7 ÷ 2 × 4")  # 7 ÷ 2 is not exact
    r = Problem("countdown", 1, "q", (), "", {"numbers": [3, 5, 9], "target": 7})
    # 3 - 5 is negative, which no question forbids (this was refused, and so was 8 × (2 - 3 + 7) for 48)
    assert check(r, "9 - 5 + 3") and check(r, "3 - 5 + 9") and check(r, "3 - (5 - 9)") and not check(r, "-5 + 9 + 3")
    s = Problem("countdown", 1, "q", (), "", {"numbers": [5, 3, 2], "target": 25})
    assert not check(s, "5 × 5") and check(s, "5 × (3 + 2)")  # 5 used twice


def test_templates_are_varied():
    for family in FAMILIES:
        templates = {p.meta["template"] for p in mixture(900, seed=3, families=[family])}
        assert len(templates) >= 10, (family, templates)
        questions = mixture(300, seed=3, families=[family], levels=[1])
        stems = {re.sub(r"\d+", "N", p.question) for p in questions}
        assert len(stems) >= 10, family


def test_renderings(samples):
    for problems in samples.values():
        for p in problems[:50]:
            chat = to_chat(p)
            assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
            assert chat["messages"][0]["content"] == p.question
            content = chat["messages"][1]["content"]
            assert content == "<think>\n" + "\n".join(p.steps) + "\n</think>\n\nThe answer is " + p.answer + "."
            assert re.fullmatch(r"<think>\n[^<]+\n</think>\n\nThe answer is [^\n]+\.", content)
            text = to_text(p)
            assert text.startswith(p.question + "\n") and text.splitlines()[-1] == f"Answer: {p.answer}"
            rec = to_gsm8k(p)
            assert rec["answer"].endswith(f"\n#### {p.answer}") and rec["level"] == p.level
            assert rec["family"] == p.family and rec["question"] == p.question
            assert from_record(json.loads(json.dumps(rec))) == p


def test_from_record_gsm8k():
    rec = {"question": "Tom has 3 bags of 4 apples. How many apples?", "answer": "3 bags × 4 = <<3*4=12>>12\n#### 12"}
    p = from_record(rec)
    assert p.family == "gsm8k" and p.level == 0 and p.answer == "12" and p.steps == ("3 bags × 4 = <<3*4=12>>12",)
    assert check(p, "12") and check(p, "12.0") and not check(p, "13")
    big = from_record({"question": "q", "answer": "Lots.\n#### 1,250", "level": 2})
    assert big.answer == "1250" and big.level == 2 and check(big, "1,250") and check(big, "1250")
    plain = from_record({"question": "q", "answer": "7", "family": "word"})
    assert plain.family == "word" and plain.steps == () and check(plain, "7")
    with pytest.raises(ValueError):
        from_record({"answer": "7"})
    with pytest.raises(ValueError, match="'question' is empty"):
        from_record({"question": " ", "answer": "7"})
    with pytest.raises(ValueError):
        from_record({"question": "q", "answer": "#### (1 + 2)", "family": "countdown"})


def test_free_form_answers_use_math_verify():
    half = from_record({"question": "q", "answer": "Halve it.\n#### \\frac{1}{2}"})
    assert half.answer == "\\frac{1}{2}"
    for good in ("0.5", "1/2", "\\frac{2}{4}", "$\\frac{1}{2}$"):
        assert check(half, good), good
    for bad in ("0.25", "2", "one half", ""):
        assert not check(half, bad), bad
    poly = from_record({"question": "q", "answer": "x^2 + 2x + 1"})
    assert check(poly, "(x+1)^2") and not check(poly, "(x-1)^2")
    # math-verify's plain reading takes a text's first number: a clock time, a ratio, a factorial or a mixed number
    # was checked as it ("3:45" passed for 3:30, "1" for 1 1/2, "5" for 5!)
    for gold, good, bad in [("3:30", "3:30", "3:45"), ("2:1", "2:1", "2:5"), ("1 1/2", "1.5", "1"),
                            ("1 1/2", "3/2", "2"), ("5!", "120", "5")]:
        p = from_record({"question": "q", "answer": gold})
        assert check(p, good) and not check(p, bad), (gold, good, bad)
    for gold, good in [("\\frac{1}{2}", "1/2 cup"), ("3/4", "3/4 of the pizza")]:  # a fraction is one number
        assert check(from_record({"question": "q", "answer": gold}), good), (gold, good)
    five = from_record({"question": "q", "answer": "5"})
    for relation in ("x \\geqslant 5", "x \\leqslant 5", "x ⩾ 5", "x \\not= 5", "x \\ne 5"):
        assert not check(five, relation), relation  # a relation is not its number, however it is written
    with pytest.raises(ValueError, match="takes a number"):  # the suite's families check integers: never right
        from_record({"question": "q", "answer": "1/2", "family": "arithmetic"})
    # the suite's own integer answers are never "verified" from an expression that evaluates to them
    p = generate("arithmetic", 1, 1, seed=0)[0]
    assert not check(p, p.meta["expression"]) and check(p, p.answer)


def test_mixture_spread_and_shuffle():
    ps = mixture(100, seed=5)
    assert len(ps) == 100 and ps == mixture(100, seed=5) and ps != mixture(100, seed=6)
    cells = Counter((p.family, p.level) for p in ps)
    assert set(cells) == set(CELLS) and max(cells.values()) - min(cells.values()) <= 1
    assert len({p.family for p in ps[:10]}) > 1  # shuffled, not grouped
    ev = mixture(60, seed=5, split="eval", families=["word", "countdown"], levels={"word": [3], "countdown": [1, 2]})
    assert Counter((p.family, p.level) for p in ev) == {("word", 3): 20, ("countdown", 1): 20, ("countdown", 2): 20}
    assert {split_of(p) for p in ev} == {"eval"}
    l4 = mixture(10, seed=1, split="eval", levels=[4])  # a list applies to the families that have the level
    assert {(p.family, p.level) for p in l4} == {("arithmetic", 4)}
    assert mixture(0) == []


def test_repeated_draws_keep_small_spaces_at_their_share():
    """Level-1 division has a few hundred train facts: distinct questions run out and its share of the draws falls
    far below the evaluation's (a fifth to a quarter); with distinct=False it keeps about a fifth, from train only."""
    def division_share(ps):
        return sum("÷" in p.meta["expression"] for p in ps) / len(ps)

    distinct = generate("arithmetic", 1, 30000, seed=3)
    repeated = generate("arithmetic", 1, 30000, seed=3, distinct=False)
    evals = generate("arithmetic", 1, 400, seed=3, split="eval")
    assert division_share(distinct) < 0.1 and 0.15 < division_share(repeated) < 0.3
    assert 0.15 < division_share(evals) < 0.35
    assert len({p.question for p in repeated}) < len(repeated) and {split_of(p) for p in repeated} == {"train"}
    assert repeated == generate("arithmetic", 1, 30000, seed=3, distinct=False)


def test_errors():
    for args in [("algebra", 1, 1), ("word", 4, 1), ("arithmetic", 0, 1)]:
        with pytest.raises(ValueError, match="family|level"):
            generate(*args)
    with pytest.raises(ValueError, match="split"):
        generate("word", 1, 1, split="test")
    with pytest.raises(ValueError, match="family"):
        mixture(10, families=["chess"])
    with pytest.raises(ValueError):
        mixture(10, levels=[9])
    with pytest.raises(ValueError, match="level"):
        mixture(10, levels={"word": [4]})


def test_tasks_command_writes_each_rendering(tmp_path, capsys):
    """`nanoseek tasks`: GSM8K-format records read back (from_record) into problems whose own answers check, from the
    split asked for, countdown's numbers kept; chat and text records in the shapes sft and pretrain read; one-line
    errors for bad input."""
    from nanoseek.cli import main

    out = tmp_path / "eval.jsonl"
    assert main(["tasks", "--out", str(out), "--format", "gsm8k", "--split", "eval", "--n", "40"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    problems = [from_record(json.loads(line)) for line in out.read_text().splitlines()]
    assert summary["n"] == len(problems) == 40 and len(summary["cells"]) == 10
    assert all(split_of(p) == "eval" and check(p, p.answer) for p in problems)
    assert any(p.family == "countdown" for p in problems)
    assert not check(next(p for p in problems if p.family == "countdown"), "1 + 1")
    recs = {}
    for fmt in ("chat", "text"):
        assert main(["tasks", "--out", str(tmp_path / f"{fmt}.jsonl"), "--format", fmt, "--tasks", "word:2", "--n", "3"]) == 0
        recs[fmt] = [json.loads(line) for line in (tmp_path / f"{fmt}.jsonl").read_text().splitlines()]
    assert len(recs["chat"]) == len(recs["text"]) == 3
    assert all(r["messages"][1]["content"].startswith("<think>\n") for r in recs["chat"])
    assert all(r["text"].split("\n")[-1].startswith("Answer: ") for r in recs["text"])
    capsys.readouterr()
    for argv, says in ((["--tasks", "arithmetic:7"], "levels 1, 2, 3, 4"),
                       (["--out", str(tmp_path / "no" / "x.jsonl")], "there is no directory"),
                       (["--out", str(tmp_path)], "a directory")):
        assert main(["tasks", "--out", str(tmp_path / "x.jsonl"), *argv]) == 1
        assert says in capsys.readouterr().err


def test_word_problems_read_as_english(samples):
    """1 took plural nouns ("Rosa is 1 years older", "plus 1 loose cards", "After 1 are lost") and apple took "A"."""
    bad = re.compile(r"\b1 (?:years|loose|of the|are)\b|\b1 (?:\w+s|loaves)\b|\bA apple")
    for level in LEVELS["word"]:
        for p in generate("word", level, 3000, seed=0):
            assert not bad.search(p.question), p.question


def test_a_level_that_is_a_digit_only_to_unicode_is_refused_by_name():
    from nanoseek.data.tasks import parse_cells

    with pytest.raises(ValueError, match="arithmetic has levels 1, 2, 3, 4"):  # int("²") raised its own error
        parse_cells(["arithmetic:²"])
