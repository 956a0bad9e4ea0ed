"""Expression trees and their worked solutions, shared by the task families.

A tree is an int leaf or (op, left, right) with op in + - × ÷. `work_out` writes the solution a small model can
follow: one operation per line in evaluation order, each preceded by schoolbook column working (`columns`) and
followed by what is left of the expression (`Now: 128 ÷ 16`). Pure standard library.
"""

from __future__ import annotations

PREC = {"+": 1, "-": 1, "×": 2, "÷": 2}


def apply_op(op: str, a: int, b: int) -> int | None:
    """a op b, or None when a division is not exact."""
    if op == "÷":
        return a // b if b and a % b == 0 else None
    return a + b if op == "+" else a - b if op == "-" else a * b


def tree_value(t) -> int:
    return t if isinstance(t, int) else apply_op(t[0], tree_value(t[1]), tree_value(t[2]))


def render(t, parent: str | None = None, right: bool = False, first: bool = True) -> str:
    """Parenthesise a child of lower precedence, or a right child of equal precedence, so the text parses back
    into exactly this tree (and its evaluation order); a negative number too, unless it opens the text or a
    bracket (`-3 × 2`, `9 - (-701) × 9`, not `9 - -701 × 9`)."""
    if isinstance(t, int):
        return f"({t})" if t < 0 and not first else str(t)
    op, a, b = t
    wrap = parent is not None and (PREC[op] < PREC[parent] or (right and PREC[op] == PREC[parent]))
    s = f"{render(a, op, False, first or wrap)} {op} {render(b, op, True, False)}"
    return f"({s})" if wrap else s


def _reduce(t):
    """Evaluate the first operation of t in post-order (innermost first, × ÷ before + -: the tree encodes both)
    -> (t with that operation replaced by its value, a, op, b, value)."""
    op, left, right = t
    if not isinstance(left, int):
        left, *done = _reduce(left)
    elif not isinstance(right, int):
        right, *done = _reduce(right)
    else:
        v = apply_op(op, left, right)
        return v, left, op, right, v
    return ((op, left, right), *done)


def work_out(t) -> tuple[int, list[str]]:
    """t's value and its solution, one operation per line in post-order: the schoolbook working of `columns`, the
    operation and its result, then what is left of the expression with the result in place (`Now: 128 ÷ 16`), so a
    small model reads its next operation off the line above instead of finding its place in the question, and sees
    whether anything is left to do."""
    lines: list[str] = []
    while not isinstance(t, int):
        t, a, op, b, v = _reduce(t)
        lines += [*columns(op, a, b), f"{render((op, a, b))} = {v}"]
        if not isinstance(t, int):
            lines.append(f"Now: {render(t)}")
    return t, lines


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # least significant first


def signed(op: str, a: int, b: int) -> tuple[str, str, int, int] | None:
    """An operation with a negative operand as one on non-negative numbers: -> (sign, op, x, y) with
    a op b = sign(x op y), e.g. -68 - 4 -> ("-", "+", 68, 4); None when neither operand is negative."""
    if a >= 0 and b >= 0:
        return None
    x, y = abs(a), abs(b)
    if op in "×÷":
        return ("-" if (a < 0) != (b < 0) else "", op, x, y)
    if op == "+":
        if a >= 0:
            return ("", "-", a, y)  # a + (-y) = a - y
        return ("", "-", b, x) if b >= 0 else ("-", "+", x, y)  # (-x) + b = b - x; (-x) + (-y) = -(x + y)
    if a >= 0:
        return ("", "+", a, y)  # a - (-y) = a + y
    return ("-", "+", x, b) if b >= 0 else ("", "-", y, x)  # (-x) - b = -(x + b); (-x) - (-y) = y - x


def columns(op: str, a: int, b: int) -> list[str]:
    """Schoolbook working so a small model computes digit by digit instead of guessing:
    + - and × by one digit column by column (least significant first; a × carry is added on a line of its own),
    × by a two-digit factor as one partial product per non-zero digit, then their sum, exact ÷ as long division,
    at any size. Only a product of two factors of three digits or more has none (its working would be too long for
    a tiny model's context). A negative operand is first rewritten by the sign rules (`-68 - 4 = -(68 + 4)`), then
    that operation is worked out and stated (`68 + 4 = 72`); the caller states the original one (`-68 - 4 = -72`)."""
    rewrite = signed(op, a, b)
    if rewrite:
        sign, op2, x, y = rewrite
        inner = render((op2, x, y))
        value = apply_op(op2, x, y)
        return [f"{render((op, a, b))} = {sign + '(' + inner + ')' if sign else inner}", *columns(op2, x, y),
                f"{inner} = {value}"]
    if max(a, b) < 10:
        return []
    lines: list[str] = []
    if op == "+":
        da, db, carry = _digits(a), _digits(b), 0
        for i in range(max(len(da), len(db))):
            terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
            total = sum(terms)
            carry = total // 10
            if len(terms) > 1:
                lines.append(" + ".join(map(str, terms)) + f" = {total}" + (", carry 1" if carry else ""))
    elif op == "-":
        big, small = max(a, b), min(a, b)
        db, ds, borrow = _digits(big), _digits(small), 0
        for i, x in enumerate(db):
            paid, (x, y) = borrow, (x - borrow, ds[i] if i < len(ds) else 0)
            borrow = int(x < y)
            if i < len(ds) or borrow:
                lines.append(f"{x + 10 * borrow} - {y} = {x + 10 * borrow - y}" + (", borrow 1" if borrow else ""))
            elif paid:  # a column past the smaller number that only pays the borrow back, as + shows its carry
                lines.append(f"{x + 1} - 1 = {x}")
        if a < b:
            lines.append(f"{b} - {a} = {b - a}, so {a} - {b} is negative")
    elif op == "×" and min(a, b) <= 9:
        big, d, carry = max(a, b), min(a, b), 0
        for x in _digits(big):  # one operation per line: the digit's product, then the carry added to it
            p = x * d
            lines.append(f"{x} × {d} = {p}")
            if carry:
                lines.append(f"{p} + {carry} = {p + carry}")
                p += carry
            carry = p // 10
    elif op == "×" and min(a, b) <= 99:  # one partial product per non-zero digit of the smaller factor, then their sum
        big, small = max(a, b), min(a, b)
        parts = []
        for i, d in enumerate(_digits(small)):
            if d:
                lines += columns("×", big, d) + [f"{big} × {d} = {big * d}"]
                if i:
                    lines.append(f"{big} × {d * 10**i} = {big * d * 10**i}")
                parts.append(big * d * 10**i)
        if len(parts) == 2:
            lines += columns("+", *parts) + [f"{parts[0]} + {parts[1]} = {sum(parts)}"]
        else:  # a multiple of ten: its one partial product is the result the caller states next
            lines.pop()
    elif op == "÷" and b and a % b == 0 and a >= 10:  # long division, most significant digit first
        rest, work = 0, []
        for x in reversed(_digits(a)):
            cur = rest * 10 + x
            rest = cur % b
            if cur >= b or work:
                work.append(f"{cur} ÷ {b} = {cur // b}" + (f", remainder {rest}" if rest else ""))
        lines = work if len(work) > 1 else []
    return lines
