"""Checking a final answer: the rule-based verdicts that evaluation, GRPO's rewards and distillation's filter share.

- The task suite's answers are integers, compared as numbers (`as_number`: '1,234', '-$5', '42.0').
- A countdown answer is an expression, checked by walking its `ast` through a whitelist (`eval_expression`: integers,
  + - × ÷, exact division), using each given number at most once.
- Free-form answers of imported data (fractions, sets, LaTeX) go to `math-verify` (`math_equal`), imported on first
  use since it pulls in sympy.
"""

from __future__ import annotations

import ast
import operator
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tasks import Problem


# a dash a writer (or a model that read them) puts for a minus: hyphen, non-breaking hyphen, figure dash, en dash,
# small and full-width hyphen-minus, before a number and not after one ("3–5 hours", "2023–2024" are ranges); not the
# em dash, which is punctuation ("the answer — 21")
_SIGN_DASH = r"(?<![0-9A-Za-z)\]])[\u2010\u2011\u2012\u2013\ufe63\uff0d](?=\s*[0-9$€£¥])"


def plain_digits(text: str) -> str:
    """Digits of any script as ASCII ('４２', '٤٢' -> '42') and a dash that stands for a minus as '-' ('–21', '－21'):
    read as written, '答案是 ２１' was never equal to 21 and 'The answer is –21' was 21."""
    if text.isascii():
        return text
    text = re.sub(r"(?![0-9])\d", lambda m: str(unicodedata.digit(m[0])), text)
    return re.sub(_SIGN_DASH, "-", text)


def as_number(text) -> Fraction | None:
    """'1,234', '1 234', '+7', '42.0', '-3', '- 3', '5.', '-$5' -> a number; anything else ('7 8', '12,34') -> None."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    s = plain_digits(text).strip().replace("−", "-")
    s = re.sub(r"^([-+]?)\s*\\?[$€£¥]\s*", r"\1", s)  # "-$5", "$ 5", "\\$5"
    s = re.sub(r"^([-+])\s+", r"\1", s).removeprefix("+").removesuffix(".")  # "- 3"
    s = re.sub(r"[\u00a0\u2009\u202f]", " ", s)  # no-break and thin spaces
    for sep in ",", " ":  # thousands separators: "1,234" and "1 234", not "12,34" or "7 8"
        if sep in s:
            if not re.fullmatch(rf"-?[0-9]{{1,3}}({sep}[0-9]{{3}})+(\.[0-9]+)?", s):
                return None
            s = s.replace(sep, "")
    return Fraction(s) if re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", s) else None


_ASCII = str.maketrans({"×": "*", "÷": "/", "−": "-"})
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def eval_expression(text: str, used: list[int] | None = None, whole: bool = False) -> Fraction:
    """Exact value of an arithmetic expression in the suite's notation (integers, + - × ÷ or + - * /, parentheses,
    a leading minus), by a whitelisted walk of its Python parse: anything else raises ValueError (SyntaxError for
    what does not parse, ZeroDivisionError for a division by 0). `used` collects the integers it holds; `whole`
    (countdown's rules) requires whole-number intermediate results (exact division) and refuses a leading minus."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if used is not None:
                used.append(node.value)
            v = Fraction(node.value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and not whole:
            v = -walk(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            v = _AST_OPS[type(node.op)](walk(node.left), walk(node.right))
        else:
            raise ValueError(f"{type(node).__name__} is not allowed")
        if whole and v.denominator != 1:
            raise ValueError("an intermediate result is not a whole number")
        return v

    for latex, op in (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/")):  # \boxed{(3 + 4) \times 5}
        text = text.replace(latex, op)
    return walk(ast.parse(plain_digits(text).translate(_ASCII).strip(), mode="eval").body)


def _check_countdown(meta: dict, predicted: str) -> bool:
    if not isinstance(predicted, str) or len(predicted) > 200:
        return False
    expr, eq, rhs = predicted.partition("=")
    if eq and as_number(rhs) != meta["target"]:  # "(3 + 4) × 5 = 35" is fine, "= 36" is not
        return False
    used: list[int] = []
    value = eval_expression(expr, used, whole=True)
    return value == meta["target"] and not Counter(used) - Counter(meta["numbers"])


def result_of(answer: str) -> str:
    """What an equation answers: "8 + 4 = 12" answers 12; a relation is kept whole ("x >= 5" is not 5)."""
    return answer if re.search(r"\\not\s*=", answer) else re.split(r"(?<![<>!=])=(?!=)", answer)[-1]


def check(problem: Problem, predicted: str) -> bool:
    """Is `predicted` a correct final answer? Never raises."""
    try:
        if problem.family == "countdown":
            return _check_countdown(problem.meta, predicted)
        predicted, gold = result_of(plain_digits(predicted)), plain_digits(problem.answer)
        got, want = as_number(predicted), as_number(gold)
        from .tasks import FAMILIES  # (tasks imports this module)

        if problem.family in FAMILIES or (got is not None and want is not None):
            return got is not None and got == want  # the suite's answers are integers: "8 + 3" is not "11"
        return math_equal(gold, predicted)  # free-form answers of imported data (\frac{1}{2}, sets, ...)
    except Exception:  # garbage in, False out (RecursionError, ValueError, KeyError, ...)
        return False


def math_equal(gold: str, predicted: str) -> bool:
    """Mathematical equivalence by `math-verify` (LaTeX or plain expressions; imported here: it pulls in sympy)."""
    import threading

    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which exists only on the main thread
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold, predicted = (t.replace("\\$", "").strip() for t in (gold, predicted))  # \$6 is 6
    # a mixed number is a sum: "1 1/2" is 3/2 (math-verify reads it as 1)
    gold, predicted = (re.sub(r"^(-?)(\d+)\s+(\d+)/(\d+)$", r"\1(\2 + \3/\4)", t) for t in (gold, predicted))
    if gold.casefold() == predicted.casefold():  # "Paris" (math-verify reads a word as a product of letters)
        return True

    def same(g, p) -> bool:
        return bool(g) and bool(p) and verify(g, p, timeout_seconds=limit)

    def latex(t: str):  # read as LaTeX between $: \sqrt{2}, \{1, 2\}, xy(x+y)
        return parse(t if "$" in t or "\\boxed" in t else f"${t}$", parsing_timeout=limit)

    # a relation ("x >= 5", "x \not= 5") is never a number, whatever a reading makes of it
    relation = r"[<>≤≥≠⩾⩽]|!=|\\(?:[gl]eq?(?:slant)?|neq?|[gl]t|not)(?![A-Za-z])"
    if bool(re.search(relation, gold)) != bool(re.search(relation, predicted)):
        return False
    # words are no maths: "6 dollars" read as LaTeX is 6·d·o·l·l·a·r·s, so with a word on either side only the plain
    # reading counts ("6 dollars" is 6), and not where a word or a relation changes the number ("not 7", "at most 5",
    # "7 or 8", "x >= 5": the plain reading takes its last number)
    words = any(re.search(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+(?:\{[^{}]*\})?", "", t)) for t in (gold, predicted))
    if not words and same(latex(gold), latex(predicted)):
        return True
    bounds = r"\b(?:not|no|never|less|more|fewer|least|most|under|over|below|above|except|or)\b"
    if any(re.search(bounds, t, flags=re.IGNORECASE) or re.search(relation, t) for t in (gold, predicted)):
        return False
    # the plain reading keeps the first number it finds: only for a text that holds one ("3:30" is not 3, "5!" not 5;
    # "1/2 cup" and "\frac{1}{2}" are one)
    one = lambda t: len(re.findall(r"\d(?:[\d,.]*\d)?(?:\s*/\s*\d+)?",  # noqa: E731
                                   re.sub(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}", r"\1/\2", t))) == 1
    if not all(one(t) and not re.search(r"\d\s*!", t) for t in (gold, predicted)):
        return False
    return same(parse(gold, parsing_timeout=limit), parse(predicted, parsing_timeout=limit))
