"""Rule-based rewards for reasoning RL (DeepSeek-R1 §2.2.2): no neural reward model, only checks a rule can make.

A completion is judged on the full assistant text: in `r1` mode the chat template prefills `<think>\\n`, so that
prefix is put back before judging; in `r1-zero` mode the model writes it itself.

- format = 1 iff the text is exactly one well-formed `<think> reasoning </think> answer`: one opening and one
  closing tag, in that order, non-empty reasoning, a non-empty answer after `</think>` that contains no tags (nor a
  chat template's special tokens, which would open another turn), and the completion ended by itself (not cut off
  at the token limit).
- accuracy = 1 iff the format holds and the task's checker accepts the answer extracted from the text after
  `</think>`. Guards against the known hacks: empty or repeated tags fail the format (so also accuracy); "answer
  stuffing", a numeric answer section listing several candidate numbers (the operands of a true equation shown as
  working and the numbers the question gave, other than the answer, do not count, also in LaTeX or with a percent; a
  fraction a/b is one number), scores 0 accuracy; reasoning that is the same line repeated over and over fails the
  format.
- reward = accuracy + format_weight · format, minus DAPO's soft overlong penalty when enabled: for a completion
  of length L with budget L_max and cache L_c, penalty = clip((L − (L_max − L_c)) / L_c, 0, 1).
- false steps, for GRPO's `false_steps` metric (the share of rollouts that state one): the reasoning lines that
  state an arithmetic fact, `a op b = c` (more operands, parentheses and a long-division `, remainder r` allowed),
  checked exactly; `false_steps` gives the character span of the stated result of each false one. Lines that state
  anything else are not judged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from ..data.checking import eval_expression
from ..eval.answers import AMOUNT, NUMBER, extract_answer

THINK, END_THINK = "<think>", "</think>"
MAX_ANSWER_NUMBERS = 2  # "The answer is 42." has one; "12 or 13 or 14" is stuffing (a gold "(1, 2, 3)" allows 3)
VALUE = rf"{NUMBER}(?:/\d+)?"  # what counts as one number of an answer: "3/4" is one
MAX_REPEATS = 4  # the same non-empty reasoning line more often than this is degenerate
# "8 + 4 = 12, carry 1", "1 + 9 + 1 = 11", "96 - (-43) = 139", "14 ÷ 8 = 1, remainder 6": a whole line whose left
# side is numbers and + - × ÷ and whose right side is one integer (then optionally ", ..." or a full stop).
STEP = re.compile(r"^[ \t]*(?P<lhs>[-(]*\d+\)*(?: [+\-×÷] [-(]*\d+\)*)+) = (?P<rhs>-?\d+)"
                  r"(?:, remainder (?P<rem>\d+))?(?=[ \t]*$|,|\.[ \t]*$)", re.M)

# "16 − 3 = 13", "2.5 × 4 = 10", "1,200 + 300 = 1,500", "9 × $2 = $18", "6 x 7 = 42": working beside an answer
_OPERAND = rf"[-−(]*\$?{AMOUNT}%?\)*"
EQUATION = re.compile(rf"(?P<lhs>{_OPERAND}(?:\s*[-−+×x·÷*/]\s*{_OPERAND})+)\s*=\s*"
                      rf"(?P<rhs>[-−]?\$?{AMOUNT})(?![\d.,]\d)")


@dataclass
class Judgement:
    reward: float
    accuracy: float
    format: float
    answer: str | None
    overlong_penalty: float = 0.0


def format_ok(text: str, finished: bool = True) -> bool:
    """Finished, one `<think>…</think>` with a reasoning and an answer after it, no line repeated past MAX_REPEATS,
    no tags in the answer and no chat-template token (`<｜User｜>`, …) anywhere: one would open another turn."""
    if not finished or text.count(THINK) != 1 or text.count(END_THINK) != 1 or "<｜" in text:
        return False
    m = re.fullmatch(r"\s*<think>(.*)</think>(.*)", text, flags=re.DOTALL)
    if m is None:
        return False
    reasoning, answer = m.group(1).strip(), m.group(2).strip()
    if not reasoning or not answer or "<" in answer and re.search(r"</?\w+>", answer):  # tags
        return False
    lines = [l.strip() for l in reasoning.splitlines() if l.strip()]
    return not lines or max(lines.count(l) for l in set(lines)) <= MAX_REPEATS


def judge(text: str, problem, finished: bool = True, format_weight: float = 0.2, n_tokens: int = 0,
          max_tokens: int = 0, overlong_cache: int = 0) -> Judgement:
    """text: the whole assistant turn (with the prefilled `<think>` put back); problem: a data.tasks.Problem."""
    from ..data.checking import check

    fmt = format_ok(text, finished)
    answer = extract_answer(text) if fmt else None
    acc = float(answer is not None and not _stuffed(text.rsplit(END_THINK, 1)[-1], problem) and check(problem, answer))
    penalty = 0.0
    if overlong_cache and max_tokens:
        penalty = min(1.0, max(0.0, (n_tokens - (max_tokens - overlong_cache)) / overlong_cache))
    return Judgement(acc + format_weight * float(fmt) - penalty, acc, float(fmt), answer, penalty)


def _stuffed(answer_part: str, problem) -> bool:
    """More candidate numbers in the answer section than its gold holds (at least MAX_ANSWER_NUMBERS): the working
    of true equations and the numbers the question gave, other than the answer, are not candidates. A countdown
    answer is an expression full of numbers: never stuffing."""
    if problem.family == "countdown":
        return False
    gold = _values(problem.answer)
    restated = _values(_plain(problem.question)) - gold  # the answer itself always counts
    return len(_values(_results_only(_plain(answer_part))) - restated) > max(MAX_ANSWER_NUMBERS, len(gold))


def _values(text: str) -> set[Fraction]:
    """The numbers in `text` as exact values ("1,200" and "1200" are one, "3/4" is one number)."""
    values = set()
    for v in re.findall(VALUE, text):
        num, _, den = v.replace(",", "").replace("−", "-").partition("/")
        values.add(Fraction(num) / int(den) if den and int(den) else Fraction(num))
    return values


def _plain(answer: str) -> str:
    """LaTeX working in plain notation: \\times and \\cdot as ×, \\div as ÷, \\frac{a}{b} as a/b."""
    answer = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", answer)
    return answer.replace("\\times", "×").replace("\\cdot", "×").replace("\\div", "÷")


def _results_only(answer: str) -> str:
    """The answer section with every true equation's working replaced by its result ("8 + 4 = 12, so 12" -> "12, so
    12"), so that showing the working is not answer stuffing; a false one ("8 + 4 = 13 = 12") stays whole."""

    def exact(text: str) -> str:  # "$1,200" -> "1200", "2.5" -> "(25/10)", "x" and "·" -> "×": eval_expression's terms
        text = re.sub(r"\$|(?<=\d),(?=\d{3})", "", text).replace("x", "×").replace("·", "×")
        text = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", text)  # "20%" -> "(20/100)"
        return re.sub(r"(\d+)\.(\d+)", lambda d: f"({d[1]}{d[2]}/{10 ** len(d[2])})", text)

    def result(m: re.Match) -> str:
        try:
            return m["rhs"] if eval_expression(exact(m["lhs"])) == eval_expression(exact(m["rhs"])) else m[0]
        except (ValueError, SyntaxError, ZeroDivisionError):
            return m[0]

    return EQUATION.sub(result, answer)


def false_steps(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) in `text` of the stated results of the false arithmetic lines of its reasoning
    (before `</think>`): for "7 + 5 = 13, carry 1" the span of "13"; for a wrong long-division line
    "14 ÷ 8 = 1, remainder 7" the span of "1, remainder 7"."""
    reasoning = text.split(END_THINK, 1)[0]
    spans = []
    for m in STEP.finditer(reasoning):
        lhs, rhs, rem = m["lhs"], int(m["rhs"]), m["rem"]
        try:
            value = eval_expression(lhs)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
            continue
        if rem is None:
            ok = value == rhs
        else:  # long division: a = b·q + r with 0 ≤ r < b
            parts = re.fullmatch(r"(\d+) ÷ (\d+)", lhs)
            ok = parts is not None and int(rem) < int(parts[2]) and int(parts[1]) == int(parts[2]) * rhs + int(rem)
        if not ok:
            spans.append((m.start("rhs"), m.end()))
    return spans
