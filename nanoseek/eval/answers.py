"""Reading the final answer out of a completion: the text after `</think>` (none for a completion cut off inside
`<think>`), then `\\boxed{…}`, "answer is …", "Answer: …", a last line that is an expression (a countdown answer),
or the last number that no "not" rules out ("12 left, not 20" is 12). Evaluation, GRPO's reward and distillation's
filter all read answers here; `data/checking.py` then says whether one is right.
"""

from __future__ import annotations

import re

from ..data.checking import plain_digits

NUMBER = r"[-−]?\d+(?:,\d{3})*(?:\.\d+)?"  # −: the Unicode minus; commas only as thousands separators
AMOUNT = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # unsigned, and a comma only in a whole "1,234": not "12, 13"
EXPRESSION = r"[\d\s,.+\-−×÷*/()]+"  # a number or a countdown expression
UNIT_POWER = r"(?<=[A-Za-z])(?:\^\{?\d\}?|[²³])"  # the ^2 of "m^2", "cm²"
NEGATED = r"\b(?:not|never|nor|isn't|rather than|instead of)\s+[$€£¥]?$"  # the words before a number ruled out


def extract_answer(text: str) -> str | None:
    """The final answer in a completion, or None. One that opened `<think>` and never closed it was cut off while
    reasoning: it has no answer (whatever number its reasoning reached last)."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        return None
    text = plain_digits(text)
    text = re.sub(r"([-−])\s*([$€£¥])", r"\2\1", text)  # "-$5" is "$-5": the sign stays with the number
    boxed = _last_boxed(text)
    if boxed is not None:
        return _boxed_answer(boxed)
    # the last "answer is …" or "Answer: …" that holds a number (a later correction wins; a closing "if any part of
    # the answer is unclear" does not), else the last one; past "**$" of **$18**
    found = list(re.finditer(r"answer is[:\s*`]*\$?([^\n.$]+(?:\.\d+)?)|Answer:\s*([^\n]+)", text, re.IGNORECASE))
    m = next((m for m in reversed(found) if re.search(r"\d", m[m.lastindex])), found[-1] if found else None)
    # a worded answer ("Paris") stands, unless a number follows it ("the answer is as follows:\n12")
    if m and (re.search(r"\d", m[m.lastindex]) or not re.search(NUMBER, text[m.end():])):
        return _phrase_answer(m[m.lastindex])
    bare = _bare_expression(text)
    if bare is not None:
        return bare
    text = re.sub(UNIT_POWER, "", text)  # "12 m^2" is 12, not 2
    text = re.sub(r"\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}", r" \1/\2", text)  # $\frac{1}{2}$ is 1/2, not 2
    # "3/4" is one number, not 4 (but a date's 12/25/2024 is no fraction)
    nums = [m[0] for m in re.finditer(rf"(?<![/\d]){NUMBER}/\d+(?![\d/]|[.,]\d)|{NUMBER}", text)
            if not re.search(NEGATED, text[max(0, m.start() - 24) : m.start()], re.IGNORECASE)]
    return nums[-1] if nums else None  # "She has 12 left, not 20." is 12


def _boxed_answer(boxed: str) -> str:
    """A number in LaTeX dress is that number: \\boxed{\\$12}, \\boxed{12 \\text{ apples}}, \\boxed{1\\,234},
    \\boxed{1{,}234}; anything else stays as written, for math-verify to read (\\frac{3}{4}, sets, intervals)."""
    plain = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", boxed)
    plain = re.sub(r"(?<=\d)\\,(?=\d{3})", "", plain).replace("{,}", ",").replace("\\$", "").replace("$", "")
    plain = re.sub(r"\\[,;! ]", " ", plain)
    m = re.fullmatch(rf"\s*({NUMBER})\s*(?:[A-Za-z][A-Za-z .]*{UNIT_POWER}?)?", plain)  # the number, perhaps its unit
    return m.group(1) if m else boxed


def _bare_expression(text: str) -> str | None:
    """A last line that is only an expression, as a countdown answer may be ("(6 × 7) ÷ 3", "**6 × 7 ÷ 3 = 14**"):
    the whole expression, not its last number."""
    lines = [l for l in text.splitlines() if l.strip()]
    line = _unemphasized(lines[-1].replace("$", "")) if lines else ""
    return line if re.search(r"\d\s*[-−+×÷*/]\s*[(\d]", line) and _is_expression(line) else None


def _unemphasized(text: str) -> str:
    """Markdown emphasis and a final full stop dropped: `**18**`, `*18*.`, `` `6 × 7` `` -> the text inside; a `*`
    between operands is multiplication and stays ("(10 + 8) * 10")."""
    text = re.sub(r"\*\*|__|`", "", text).strip().rstrip(".").strip()
    return re.sub(r"^[*_]+|[*_]+$", "", text).strip().rstrip(".").strip()


def _is_expression(text: str) -> bool:
    """An arithmetic expression, perhaps followed by "= value" ("(3 + 4) × 5", "8 + 4 = 12"), that parses as one
    ("12 (3 × 4)" does not: a number, then its working)."""
    from ..data.checking import eval_expression

    if not re.fullmatch(rf"{EXPRESSION}(?:=\s*{NUMBER}\s*)?", text):
        return False
    try:
        eval_expression(text.partition("=")[0])
        return True
    except (ValueError, SyntaxError, ZeroDivisionError):
        return False


def _last_boxed(text: str) -> str | None:
    """What the last closed \\boxed{…} holds, nested braces included: \\boxed{\\frac{3}{4}} is \\frac{3}{4},
    not 4."""
    for m in reversed(list(re.finditer(r"\\boxed\{", text))):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[m.end():i].strip()
    return None


BOUNDS = (r"\b(?:not|no|never|nor|or|at most|at least|less|more|fewer|greater|smaller|larger|under|over|below|above|"
          r"up to|between|except|maybe|perhaps|about|around|approximately|roughly|nearly|almost)\b|[<>≤≥≈~]")


def _phrase_answer(phrase: str) -> str:
    """The answer in "the answer is …": Markdown emphasis dropped (**18**); a number followed by words ("18,
    because …", "18 apples", "18!") is that number, and so is a number after words that do not change it ("therefore
    42", "approximately €42"); an expression, a worded answer, a hedge ("12 or 13", "12, 13") or a bound ("not 7",
    "at most 5"), a ratio or time ("2:5") and a mixed number ("1 1/2") stay whole, which no integer answer equals."""
    phrase = _unemphasized(phrase)
    if _is_expression(phrase):
        return phrase
    number = rf"[$€£¥]?([-−]?{AMOUNT})"
    if re.match(rf"{number}(?:,\s+|\s+(?:,\s*)?(?:or|and)\s+)(?:or\s+)?{number}", phrase):  # a hedge (not 1,234)
        return phrase
    spaced = re.match(r"[$€£¥]?([-−]?\d{1,3}(?: \d{3})+(?:\.\d+)?)(?=[\s,;:)!.]|$)", phrase)  # "1 234"
    lead = spaced or re.match(rf"{number}(?=[\s,;:)!.]|$)(?!:\d|\s+\d+/\d)", phrase)  # not of "3:30", "1 1/2"
    if lead:
        return lead.group(1)
    lead_in = r"(?:therefore|thus|hence|so|then|now|still|just|simply|exactly|clearly|approximately|about|around|roughly)"
    words = re.fullmatch(rf"(?:{lead_in},?\s+)+{number}", phrase, flags=re.IGNORECASE)  # not "not 7", "at most 5"
    if words:
        return words.group(1)
    # a sentence with one number and no word that bounds or hedges it: "There are 12 marbles in total", "The final
    # answer is 12. I hope it is correct" (after "Answer:")
    numbers = re.findall(rf"[$€£¥]?({NUMBER})", re.sub(UNIT_POWER, "", phrase))
    if len(numbers) == 1 and not re.search(BOUNDS, phrase, flags=re.IGNORECASE):
        return numbers[0]
    return phrase
