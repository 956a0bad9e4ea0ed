"""The verifiable task suite: generated problems with a worked solution, a final answer and a rule-based checker.

Three families, each with difficulty levels and many phrasings (so a model learns the task, not one sentence):
- arithmetic: integer + - × ÷ (division always exact), 1-4 operations on 1-4 digit operands, parentheses from
  level 3. The worked solution evaluates one operation per line (`12 × 3 = 36`), innermost first, each followed by
  what is left of the expression (`Now: 36 - 7`).
- word: one- to three-step word problems (shopping, sharing, groups, rates, ages, time) with integer answers; each
  step names its operation in a sentence, then shows the same column working as arithmetic, then the result.
- countdown: reach a target from a few numbers (each at most once, + - × ÷, exact division; `3 - 5 + 9` may pass
  through -2). The answer is an expression, checked by walking its `ast` through a whitelist (integers, + - × ÷).

The same problems feed pretraining (`to_text`), SFT in DeepSeek-R1's `<think>` format (`to_chat`), GRPO with
verifiable rewards and evaluation (`to_gsm8k` / `from_record`, which also reads GSM8K-format JSONL); checking.py
judges an answer.
A problem is in the eval split iff the hash of its content says so (~10%: `Problem.uid`, the expression, countdown's
numbers and target, a word problem's scenario and values, not its wording), so train and eval never share a problem.
Pure standard library; everything is deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field

from .checking import as_number
from .working import PREC, apply_op, columns, render, tree_value, work_out

FAMILIES: tuple[str, ...] = ("arithmetic", "word", "countdown")
LEVELS: dict[str, tuple[int, ...]] = {"arithmetic": (1, 2, 3, 4), "word": (1, 2, 3), "countdown": (1, 2, 3)}
SPLITS = ("train", "eval")


DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Problem:
    family: str
    level: int
    question: str
    steps: tuple[str, ...]
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def uid(self) -> str:
        """Hash of the problem's content, not its phrasing: the same sum asked in two templates is one problem, so
        the train and eval splits can never share it."""
        if self.family == "arithmetic" and "expression" in self.meta:
            key = self.meta["expression"]
        elif self.family == "countdown" and "numbers" in self.meta:
            key = f"{sorted(self.meta['numbers'])} -> {self.meta['target']}"
        elif self.family == "word" and "scenario" in self.meta:  # templates state the values in different orders
            key = f"{self.meta['scenario']}:{self.level}:{sorted(map(int, re.findall(DIGITS, self.question)))}"
        else:
            key = " ".join(self.question.lower().split())
        return hashlib.sha256(f"{self.family}\n{key}".encode()).hexdigest()[:16]

    def __hash__(self) -> int:  # meta is a dict, so hash by identity of the problem text
        return hash((self.family, self.uid))


def split_of(problem: Problem) -> str:
    return "eval" if int(problem.uid, 16) % 10 == 0 else "train"


# --- arithmetic -------------------------------------------------------------------------------------------------
ARITH_TEMPLATES = ("{e} = ?", "What is {e}?", "Compute {e}.", "Calculate {e}.", "Evaluate {e}.", "{e} =",
                   "Find {e}.", "Work out {e}.", "What does {e} equal?", "Solve: {e}", "How much is {e}?",
                   "Simplify {e}.")
# level -> (min ops, max ops, max digits per operand, flat: no parentheses)
ARITH_LEVELS = {1: (1, 1, 2, True), 2: (2, 2, 2, True), 3: (3, 3, 3, False), 4: (3, 4, 4, False)}
MAX_VALUE = 10**6


def _num(rng: random.Random, digits: int) -> int:
    d = rng.randint(1, digits)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _flat_tree(nums: list[int], ops: list[str]):
    """a op b op c ... parsed with × ÷ binding tighter, left to right: never needs parentheses."""
    terms, term_ops = [nums[0]], []
    for op, n in zip(ops, nums[1:]):
        if PREC[op] == 2:
            terms[-1] = (op, terms[-1], n)
        else:
            terms.append(n)
            term_ops.append(op)
    t = terms[0]
    for op, u in zip(term_ops, terms[1:]):
        t = (op, t, u)
    return t


def _random_tree(rng: random.Random, n_ops: int, digits: int):
    if n_ops == 0:
        return _num(rng, digits)
    k = rng.randrange(n_ops)
    return (rng.choice("+-×÷"), _random_tree(rng, k, digits), _random_tree(rng, n_ops - 1 - k, digits))


def _fix(rng: random.Random, t, digits: int, small_mul: bool):
    """Make every ÷ exact by rewriting a leaf dividend as a multiple of the divisor; None when that is impossible
    or a value leaves the limits (then the caller draws again)."""
    if isinstance(t, int):
        return t
    op, a, b = t[0], _fix(rng, t[1], digits, small_mul), _fix(rng, t[2], digits, small_mul)
    if a is None or b is None:
        return None
    va, vb = tree_value(a), tree_value(b)
    if op == "÷":
        if abs(vb) < 2:
            return None
        if va % vb:
            top = (10**digits - 1) // abs(vb)
            if not isinstance(a, int) or top < 2:
                return None
            a = va = abs(vb) * rng.randint(2, top)
    if op == "×" and small_mul and min(abs(va), abs(vb)) > 9:  # levels 1-2: "2 digits × 1 digit" at most
        return None
    return (op, a, b) if abs(apply_op(op, va, vb)) <= MAX_VALUE else None


def _arithmetic(rng: random.Random, level: int) -> Problem:
    lo, hi, digits, flat = ARITH_LEVELS[level]
    while True:
        n_ops = rng.randint(lo, hi)
        if flat:
            tree = _flat_tree([_num(rng, digits) for _ in range(n_ops + 1)], [rng.choice("+-×÷") for _ in range(n_ops)])
        else:
            tree = _random_tree(rng, n_ops, digits)
        tree = _fix(rng, tree, digits, small_mul=level <= 2)
        if tree is not None and (flat or "(" in render(tree)):
            break
    expr, (value, steps) = render(tree), work_out(tree)
    i = rng.randrange(len(ARITH_TEMPLATES))
    return Problem("arithmetic", level, ARITH_TEMPLATES[i].format(e=expr), tuple(steps), str(value),
                   {"expression": expr, "template": f"arithmetic:{i}"})


# --- word problems ----------------------------------------------------------------------------------------------
NAMES = ("Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = (("apple", "apples"), ("pencil", "pencils"), ("notebook", "notebooks"), ("ticket", "tickets"),
         ("muffin", "muffins"), ("marker", "markers"))
EXTRAS = ("book", "scarf", "lamp", "backpack", "cake", "kite")
THINGS = ("stickers", "marbles", "cards", "cookies", "beads", "stamps")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("tray", "trays"), ("jar", "jars"))
WORKERS = (("printer", "prints", "pages"), ("baker", "bakes", "loaves"), ("machine", "makes", "toys"),
           ("robot", "packs", "parcels"), ("pump", "fills", "buckets"))

WORD_TEMPLATES = {
    ("shopping", 1): ("{n} buys {a} {items} at ${p} each. How many dollars does {n} spend?",
                      "Each {item} costs ${p}. How much do {a} {items} cost in dollars?"),
    ("shopping", 2): ("{n} buys {a} {items} at ${p} each and a {thing} for ${q}. How many dollars does {n} spend in total?",
                      "{A} {item} costs ${p} and a {thing} costs ${q}. What do {a} {items} and one {thing} cost together, in dollars?"),
    ("shopping", 3): ("{n} buys {a} {items} at ${p} each and a {thing} for ${q}, paying with a ${r} bill. How many dollars of change does {n} get?",
                      "{n} has ${r}, then buys {a} {items} for ${p} each and a {thing} for ${q}. How many dollars does {n} have left?"),
    ("sharing", 1): ("{n} shares {t} {things} equally among {k} friends. How many {things} does each friend get?",
                     "{t} {things} are split evenly into {k} piles. How many {things} are in each pile?"),
    ("sharing", 2): ("{n} has {a} {things} and gets {b} more, then shares them all equally among {k} friends. How many does each friend get?",
                     "One jar holds {a} {things} and another holds {b}. All of them are split evenly into {k} piles. How many {things} are in each pile?"),
    ("sharing", 3): ("{n} has {a} {things}, gets {b} more and keeps {c}. The rest are shared equally among {k} friends. How many does each friend get?",
                     "One jar holds {a} {things} and another holds {b}. After {c} are lost, the rest are split evenly into {k} piles. How many {things} are in each pile?"),
    ("groups", 1): ("There are {g} {boxes} with {e} {things} in each. How many {things} are there in total?",
                    "A shop has {g} {boxes} of {things}, and each {box} holds {e}. How many {things} does the shop have?"),
    ("groups", 2): ("There are {g} {boxes} with {e} {things} in each, plus {x} loose {things}. How many {things} are there in total?",
                    "A shop has {g} {boxes} of {things} with {e} in each {box}, and {x} more on the shelf. How many {things} does the shop have?"),
    ("groups", 3): ("There are {g} {boxes} with {e} {things} in each, plus {x} loose {things}. They are regrouped into sets of {m}. How many sets are there?",
                    "A shop has {g} {boxes} of {e} {things} and {x} more on the shelf. It repacks them all in bundles of {m}. How many bundles does it make?"),
    ("rates", 1): ("A {worker} {verbs} {rate} {units} per hour. How many {units} is that in {h1} hours?",
                   "In one hour a {worker} {verbs} {rate} {units}. How many {units} after {h1} hours?"),
    ("rates", 2): ("A {worker} {verbs} {rate} {units} per hour. It works {h1} hours in the morning and {h2} hours in the afternoon. How many {units} in total?",
                   "In one hour a {worker} {verbs} {rate} {units}. It runs {h1} hours on Monday and {h2} hours on Tuesday. How many {units} is that altogether?"),
    ("rates", 3): ("A {worker} {verbs} {rate} {units} per hour. It works {h1} hours in the morning and {h2} hours in the afternoon, and {d} of the {units} are faulty. How many good {units} are there?",
                   "In one hour a {worker} {verbs} {rate} {units}. It runs {h1} hours on Monday and {h2} hours on Tuesday, then {d} {units} are given away. How many {units} remain?"),
    ("ages", 1): ("{A} is {x} years old. {B} is {d} years older than {A}. How old is {B}?",
                  "{B} is {d} years older than {A}, who is {x}. What is {B}'s age?"),
    ("ages", 2): ("{A} is {x} years old. {B} is {d} years older than {A}. How old will {B} be in {y} years?",
                  "{B} is {d} years older than {A}, who is {x}. What will {B}'s age be {y} years from now?"),
    ("ages", 3): ("{A} is {x} years old. {B} is {d} years older than {A}, and {C} is {k} times as old as {B}. How old will {C} be in {y} years?",
                  "{B} is {d} years older than {A}, who is {x}. {C} is {k} times {B}'s age. What will {C}'s age be {y} years from now?"),
    ("time", 1): ("{n} reads for {h} hours. How many minutes is that?",
                  "A trip takes {h} hours. How many minutes long is it?"),
    ("time", 2): ("{n} reads for {h} hours and {m} minutes. How many minutes is that?",
                  "A trip takes {h} hours and {m} minutes. How many minutes long is it?"),
    ("time", 3): ("{n} reads for {h} hours and {m} minutes every day for {k} days. How many minutes is that in total?",
                  "A trip takes {h} hours and {m} minutes, and it is made on {k} days. How many minutes of travel is that in total?"),
}


def _shopping(r: random.Random, lvl: int):
    item, items = r.choice(ITEMS)
    n, a, p, thing, q = r.choice(NAMES), r.randint(2, 9), r.randint(2, 20), r.choice(EXTRAS), r.randint(3, 40)
    c, t = a * p, a * p + q
    bill = next(b for b in (20, 50, 100, 200, 500) if b > t)
    steps = [f"The {items} cost {a} × {p} = {c} dollars.", f"With the {thing}: {c} + {q} = {t} dollars.",
             f"The change is {bill} - {t} = {bill - t} dollars."]
    values = dict(n=n, item=item, items=items, a=a, p=p, thing=thing, q=q, r=bill, A="An" if item[0] in "aeiou" else "A")
    return values, steps[:lvl], (c, t, bill - t)[lvl - 1]


def _sharing(r: random.Random, lvl: int):
    k, q, c = r.randint(2, 9), r.randint(2, 15), r.randint(2, 12) if lvl == 3 else 0  # counts of plurals from 2
    t, s, things = k * q, k * q + c, r.choice(THINGS)
    a = r.randint(2, s - 2)
    steps = ([f"Altogether there are {a} + {s - a} = {s} {things}."] if lvl >= 2 else []) + (
        [f"Without the {c}: {s} - {c} = {t}."] if lvl == 3 else []) + [f"Each share is {t} ÷ {k} = {q}."]
    return dict(n=r.choice(NAMES), things=things, t=t, k=k, a=a, b=s - a, c=c), steps, q


def _groups(r: random.Random, lvl: int):
    (box, boxes), things = r.choice(CONTAINERS), r.choice(THINGS)
    g, e, m, x = r.randint(2, 9), r.randint(2, 12), r.randint(2, 9), r.randint(2, 15)
    p = g * e
    if lvl == 3:  # make the total a multiple of the group size
        x = m - p % m + m * r.randint(0 if m - p % m > 1 else 1, 2)  # not "1 loose cards"
    steps = [f"The {boxes} hold {g} × {e} = {p} {things}.", f"With the extra {x}: {p} + {x} = {p + x}.",
             f"In groups of {m}: {p + x} ÷ {m} = {(p + x) // m}."]
    return dict(box=box, boxes=boxes, things=things, g=g, e=e, m=m, x=x), steps[:lvl], (p, p + x, (p + x) // m)[lvl - 1]


def _rates(r: random.Random, lvl: int):
    worker, verbs, units = r.choice(WORKERS)
    rate, h1, h2 = r.randint(2, 30), r.randint(2, 8), r.randint(2, 8)
    hours = h1 + h2 if lvl >= 2 else h1
    t, d = rate * hours, r.randint(2, rate * hours - 1)
    steps = ([f"Hours worked: {h1} + {h2} = {hours}."] if lvl >= 2 else []) + [
        f"It {verbs} {rate} × {hours} = {t} {units}."] + ([f"Then {t} - {d} = {t - d}."] if lvl == 3 else [])
    return dict(worker=worker, verbs=verbs, units=units, rate=rate, h1=h1, h2=h2, d=d), steps, t - d if lvl == 3 else t


def _ages(r: random.Random, lvl: int):
    A, B, C = r.sample(NAMES, 3)
    x, d, k, y = r.randint(2, 15), r.randint(2, 12), r.randint(2, 3), r.randint(2, 20)
    b = x + d
    steps = [f"{B} is {x} + {d} = {b} years old."]
    if lvl == 3:
        steps.append(f"{C} is {k} × {b} = {k * b} years old.")
    who, now = (C, k * b) if lvl == 3 else (B, b)
    if lvl >= 2:
        steps.append(f"In {y} years {who} will be {now} + {y} = {now + y}.")
    return dict(A=A, B=B, C=C, x=x, d=d, k=k, y=y), steps, now + y if lvl >= 2 else now


def _time(r: random.Random, lvl: int):
    h, m, k = r.randint(2, 9), r.randint(5, 55), r.randint(2, 7)
    hm = 60 * h
    steps = [f"{h} hours is {h} × 60 = {hm} minutes.", f"Adding {m} minutes: {hm} + {m} = {hm + m}.",
             f"Over {k} days: {hm + m} × {k} = {(hm + m) * k} minutes."]
    return dict(n=r.choice(NAMES), h=h, m=m, k=k), steps[:lvl], (hm, hm + m, (hm + m) * k)[lvl - 1]


SCENARIOS = {"shopping": _shopping, "sharing": _sharing, "groups": _groups, "rates": _rates, "ages": _ages,
             "time": _time}


EQUATION = re.compile(r"(\d+) ([-+×÷]) (\d+) = \d+")


def _worked(sentences: list[str]) -> list[str]:
    """A word problem's solution as arithmetic shows it: each sentence names its operation ("The pens cost 7 × 29
    dollars."), then the schoolbook working of `columns`, then the result ("7 × 29 = 203"). A small model cannot
    multiply 29 × 7 in one token, and writing the operands down first means the working copies them from one line."""
    out = []
    for s in sentences:
        m = EQUATION.search(s)
        if m is None:
            out.append(s)
            continue
        op, a, b = m[2], int(m[1]), int(m[3])
        out += [s[: m.start()] + f"{a} {op} {b}" + s[m.end():], *columns(op, a, b), m[0]]
    return out


def _word(rng: random.Random, level: int) -> Problem:
    scenario = rng.choice(tuple(SCENARIOS))
    values, steps, answer = SCENARIOS[scenario](rng, level)
    steps = _worked(steps)
    templates = WORD_TEMPLATES[scenario, level]
    i = rng.randrange(len(templates))
    return Problem("word", level, templates[i].format(**values), tuple(steps), str(answer),
                   {"scenario": scenario, "template": f"word:{scenario}:{level}:{i}"})


# --- countdown --------------------------------------------------------------------------------------------------
COUNTDOWN_TEMPLATES = (
    "Using the numbers {nums}, make {target}. You may use +, -, × and ÷, and each number at most once.",
    "Make {target} from {nums} using +, -, ×, ÷. Each number can be used once at most.",
    "Numbers: {nums}. Target: {target}. Combine the numbers with + - × ÷ (each at most once) to hit the target.",
    "Write an expression equal to {target} using only the numbers {nums}, each at most once, and + - × ÷.",
    "Countdown: reach {target} with {nums}. Use each number at most once; division must be exact.",
    "Can you make {target} out of {nums}? Use + - × ÷ and each number no more than once.",
    "Find an arithmetic expression that uses some of {nums} (each at most once) and equals {target}.",
    "Target {target}. Available numbers: {nums}. Use +, -, ×, ÷ with each number at most once.",
    "Combine {nums} with addition, subtraction, multiplication and exact division to get {target}. Each number may be used once.",
    "How can you get {target} from the numbers {nums}? Each number may be used at most once.",
    "Reach exactly {target} using the numbers {nums} and the operations + - × ÷; no number twice.",
    "Give an expression for {target} built from {nums}, using each number at most once.",
)
BIG_NUMBERS = (12, 15, 20, 25, 50, 75, 100)


def _countdown(rng: random.Random, level: int) -> Problem:
    """Combine random pairs of the numbers until one value is left: that value is the target, so a solution
    (using every number) always exists; intermediate results stay positive integers."""
    while True:
        nums = [rng.randint(1, 10) for _ in range(level + 2)]
        if level > 1 and rng.random() < 0.5:
            nums[rng.randrange(len(nums))] = rng.choice(BIG_NUMBERS)
        pool = [(x, x) for x in nums]
        while len(pool) > 1:
            (a, ta), (b, tb) = sorted((pool.pop(rng.randrange(len(pool))) for _ in range(2)), key=lambda p: -p[0])
            ops = ["+"] + ["×"] * (b > 1) + ["-"] * (a > b) + ["÷"] * (b > 1 and a % b == 0)
            op = rng.choice(ops)
            pool.append((apply_op(op, a, b), (op, ta, tb)))
        target, tree = pool[0]
        if 10 <= target <= 999 and target not in nums:
            break
    expr, (_, steps) = render(tree), work_out(tree)
    i = rng.randrange(len(COUNTDOWN_TEMPLATES))
    question = COUNTDOWN_TEMPLATES[i].format(nums=", ".join(map(str, nums)), target=target)
    return Problem("countdown", level, question, (*steps, f"So {expr} = {target}."), expr,
                   {"numbers": nums, "target": target, "template": f"countdown:{i}"})


GENERATORS = {"arithmetic": _arithmetic, "word": _word, "countdown": _countdown}


# --- generation -------------------------------------------------------------------------------------------------
def _validate(family: str, level=None, split: str = "train") -> None:
    if family not in LEVELS:
        raise ValueError(f"unknown task family {family!r}; choose from {', '.join(FAMILIES)}")
    if level is not None and level not in LEVELS[family]:
        raise ValueError(f"{family} has no level {level!r}; levels are {', '.join(map(str, LEVELS[family]))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def generate(family: str, level: int, n: int, seed: int = 0, split: str = "train",
             distinct: bool = True) -> list[Problem]:
    """n problems of one family and level from one split, deterministic for the arguments. Questions are distinct
    (small levels have few contents, so one content may come back in other phrasings) unless distinct=False, which
    lets a question repeat so a small space (level-1 division: a few hundred facts) keeps its share of the draws."""
    _validate(family, level, split)
    rng = random.Random(f"{family}-{level}-{seed}")
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) >= n:
            return out
        p = GENERATORS[family](rng, level)
        if split_of(p) == split and p.question not in seen:
            if distinct:
                seen.add(p.question)
            out.append(p)
    raise ValueError(f"only {len(out)} distinct {split} problems found for {family}:{level}, {n} asked")


def parse_cells(specs) -> list[tuple[str, int]]:
    """Task specs as the commands take them ("family" = all its levels, "family:level" = one, "all" = every cell) ->
    the distinct (family, level) cells they name, in order; ValueError for an unknown family or level."""
    cells = []
    for spec in specs:
        if spec == "all":
            cells += [(fam, level) for fam in FAMILIES for level in LEVELS[fam]]
            continue
        fam, colon, lvl = spec.partition(":")
        if fam not in FAMILIES:
            raise ValueError(f"unknown task {fam!r}; choose from {', '.join(FAMILIES)} (FAMILY:LEVEL for one level), "
                             "or all")
        # "arithmetic:" names no level; "²" is a digit to isdigit() and not to int()
        if colon and (not (lvl.isascii() and lvl.isdigit()) or int(lvl) not in LEVELS[fam]):
            raise ValueError(f"task {spec!r}: {fam} has levels {', '.join(map(str, LEVELS[fam]))}")
        cells += [(fam, int(lvl))] if lvl else [(fam, level) for level in LEVELS[fam]]
    return list(dict.fromkeys(cells))


def cells_mixture(n: int, cells, seed: int = 0, split: str = "train") -> list[Problem]:
    """`mixture` over the (family, level) cells of `parse_cells`: n problems spread evenly over them, shuffled."""
    levels: dict[str, list[int]] = {}
    for f, lv in cells:
        levels.setdefault(f, []).append(lv)
    return mixture(n, seed=seed, split=split, families=list(levels), levels=levels)


def mixture(n: int, seed: int = 0, split: str = "train", families=None, levels=None,
            distinct: bool = True) -> list[Problem]:
    """n problems spread evenly over families × levels, shuffled. `levels`: a dict family -> levels, or a list
    applied to every family that has those levels. `distinct`: as in `generate`."""
    families = (families,) if isinstance(families, str) else tuple(families or FAMILIES)

    def wanted(f: str) -> tuple:
        _validate(f, None, split)
        if isinstance(levels, dict):
            return (levels[f],) if isinstance(levels.get(f), int) else tuple(levels.get(f, LEVELS[f]))
        return LEVELS[f] if levels is None else tuple(l for l in levels if l in LEVELS[f])

    cells = [(f, l) for f in families for l in dict.fromkeys(wanted(f))]
    for f, l in cells:
        _validate(f, l, split)
    if not cells or (levels is not None and not isinstance(levels, dict) and set(levels) - {l for _, l in cells}):
        raise ValueError(f"levels {levels!r} do not fit families {', '.join(families)} (levels: {LEVELS})")
    rng = random.Random(f"mixture-{seed}-{split}")
    base, extra = divmod(n, len(cells))
    bonus = set(rng.sample(range(len(cells)), extra))
    out = []
    for i, (f, l) in enumerate(cells):
        k = base + (i in bonus)
        if k:
            out += generate(f, l, k, seed=seed, split=split, distinct=distinct)
    rng.shuffle(out)
    return out


# --- renderings -------------------------------------------------------------------------------------------------
def to_text(problem: Problem) -> str:
    return "\n".join([problem.question, *problem.steps, f"Answer: {problem.answer}"])


def to_chat(problem: Problem) -> dict:
    reasoning = "\n".join(problem.steps)
    final = f"The answer is {problem.answer}."
    return {"messages": [{"role": "user", "content": problem.question},
                         {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{final}"}]}


def to_gsm8k(problem: Problem) -> dict:
    """GSM8K's shape, plus `meta` (so a countdown record keeps its numbers and target)."""
    return {"question": problem.question, "answer": "\n".join([*problem.steps, f"#### {problem.answer}"]),
            "level": problem.level, "family": problem.family, "meta": problem.meta}


def from_record(rec: dict) -> Problem:
    """A Problem from a GSM8K-format record: `answer` is a solution ending in '#### N' or boxing it, or just 'N'."""
    question, answer = rec.get("question"), rec.get("answer")
    if not isinstance(question, str) or not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError("a record needs a 'question' string and an 'answer' (a string or a number)")
    if not question.strip():
        raise ValueError("the 'question' is empty")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise ValueError(f"the 'answer' is {answer} (no completion can match it)")
    body, sep, final = str(answer).rpartition("####")
    steps = tuple(l for l in body.split("\n") if l.strip()) if sep else ()
    final = (final if sep else str(answer)).strip()
    if not sep and "\n" in final:  # a worked solution: its answer is boxed, or it cannot be checked
        from ..eval.answers import extract_answer

        steps, final = tuple(l for l in final.split("\n") if l.strip()), "\\boxed{" in final and extract_answer(final)
        if not final:
            raise ValueError("the 'answer' is a worked solution without a final answer to check against: end it with "
                             "a line '#### N' (GSM8K's form) or put the answer in \\boxed{}")
    if not final:
        raise ValueError("the 'answer' is empty (nothing to check a completion against)")
    level = rec.get("level")
    level = 0 if level in (None, "") or isinstance(level, float) and math.isnan(level) else level  # NaN: a Parquet gap
    if isinstance(level, str) and re.fullmatch(r"\s*[0-9]+\s*", level):
        level = int(level)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or level < 0 or (
            isinstance(level, float) and not level.is_integer()):  # 2.0 passes: pandas writes a gappy int column so
        raise ValueError(f"'level' must be a non-negative integer such as 2, got {level!r}")
    family = rec.get("family") or "gsm8k"
    if not isinstance(family, str):
        raise ValueError(f"'family' must be a string such as \"gsm8k\", got {family!r}")
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("'meta' must be an object (countdown: {'numbers': [...], 'target': N})")
    meta = dict(meta)
    if family == "countdown":
        if not {"numbers", "target"} <= meta.keys():
            raise ValueError("a countdown record needs meta with 'numbers' and 'target'")
        ints = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not ints(meta["target"]) or not isinstance(meta["numbers"], list) or not all(map(ints, meta["numbers"])):
            raise ValueError("countdown meta needs integers: {'numbers': [3, 4, 5], 'target': 35} (no strings)")
    elif as_number(final) is not None:
        final = final.replace(",", "")
    elif family in FAMILIES:  # checked as the suite's integers: no completion could match
        raise ValueError(f"family {family!r} takes a number as its answer, got {final!r} (leave 'family' out, or "
                         "\"gsm8k\", for a free-form answer)")
    return Problem(family, int(level), question, steps, final, meta)
