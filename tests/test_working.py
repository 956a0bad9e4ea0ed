"""The worked solutions' arithmetic: every line true, no operation on big or negative numbers left without working."""

import random
import re

import pytest

from nanoseek.data.working import apply_op, columns, render, signed, work_out

OPS = "+-×÷"


def check_lines(lines: list[str]) -> None:
    """Every line is a true statement: an operation `a op b = c` (÷ exact), column working `x + y (+ c) = s, carry 1`
    or `75 - 7 = 68, so 7 - 75 is negative`, a sign rule `-68 - 4 = -(68 + 4)`, a long-division step
    `35 ÷ 10 = 3, remainder 5`, or what is left (`Now: ...`, checked by the caller)."""
    for line in lines:
        if line.startswith("Now: "):
            continue
        div = re.fullmatch(r"(\d+) ÷ (\d+) = (\d+), remainder (\d+)", line)
        if div:
            n, d, q, r = map(int, div.groups())
            assert (q, r) == divmod(n, d) and r > 0, line
            continue
        lhs, rhs = (eval(side.replace("×", "*").replace("÷", "/")) for side in line.split(",")[0].split(" = "))
        assert lhs == rhs, line  # our own generated text; an inexact ÷ gives a fraction that equals no integer


def test_sign_rules_are_exact():
    for a in range(-25, 26):
        for b in range(-25, 26):
            for op in OPS:
                v = apply_op(op, a, b)
                rule = signed(op, a, b)
                if v is None:
                    continue
                if a >= 0 and b >= 0:
                    assert rule is None
                    continue
                sign, op2, x, y = rule
                assert x >= 0 and y >= 0
                assert (-1 if sign else 1) * apply_op(op2, x, y) == v, (a, op, b, rule)


def test_negative_operands_are_worked_by_sign_rules():
    assert columns("-", -68, 4) == ["-68 - 4 = -(68 + 4)", "8 + 4 = 12, carry 1", "6 + 1 = 7", "68 + 4 = 72"]
    assert columns("+", -1, 46) == ["-1 + 46 = 46 - 1", "6 - 1 = 5", "46 - 1 = 45"]
    assert columns("-", 5, -3) == ["5 - (-3) = 5 + 3", "5 + 3 = 8"]
    assert columns("×", -3, 4) == ["-3 × 4 = -(3 × 4)", "3 × 4 = 12"]
    _, lines = work_out(("-", ("-", 7, 75), 4))
    assert lines[-2:] == ["68 + 4 = 72", "-68 - 4 = -72"]


def test_no_operation_is_left_to_a_leap():
    """Whatever the size: + and - always have column working past one digit, × by a factor up to 99 and exact ÷
    with a quotient of two or more digits too, and any negative operand first goes through a sign rule."""
    rng = random.Random(0)
    for _ in range(3000):
        a, b, op = rng.randint(-99_999, 99_999), rng.randint(-999, 999), rng.choice(OPS)
        if op == "÷":
            if abs(b) < 2:
                continue
            a -= a % b
        v = apply_op(op, a, b)
        lines = columns(op, a, b)
        check_lines(lines + [f"{a} {op} {b} = {v}"])
        x, y = abs(a), abs(b)
        worked = (a < 0 or b < 0 or (op in "+-" and max(x, y) >= 10)
                  or (op == "×" and max(x, y) >= 10 and min(x, y) <= 99) or (op == "÷" and x >= 10 and x // y >= 10))
        if worked:
            assert lines, (a, op, b)


@pytest.mark.parametrize("seed", range(5))
def test_work_out_lines_are_true(seed):
    rng = random.Random(seed)

    def tree(depth):
        if depth == 0:
            return rng.randint(-999, 9999)
        return (rng.choice("+-×"), tree(depth - 1), tree(rng.randrange(depth)))

    for _ in range(200):
        t = tree(3)
        value, lines = work_out(t)
        check_lines(lines)
        assert lines[-1].endswith(f"= {value}")


def test_every_digit_of_a_difference_is_worked():
    """A column past the smaller number that only pays a borrow back was skipped (52 - 7 showed 12 - 7 = 5 and never
    where the 4 came from), where + shows its carry column."""
    assert columns("-", 52, 7) == ["12 - 7 = 5, borrow 1", "5 - 1 = 4"]
    assert columns("-", 734, 58) == ["14 - 8 = 6, borrow 1", "12 - 5 = 7, borrow 1", "7 - 1 = 6"]
    assert columns("-", 59, 7) == ["9 - 7 = 2"]  # no borrow: the 5 is copied


def test_a_negative_number_inside_an_expression_is_bracketed():
    assert render(("-", 9, ("×", -701, 9))) == "9 - (-701) × 9"  # was "9 - -701 × 9"
    assert render(("×", -3, 2)) == "-3 × 2" and render(("×", ("+", -3, 2), 4)) == "(-3 + 2) × 4"
