"""`nanoseek tasks`: write task-suite problems to a JSONL file, in any of the suite's three renderings.

    gsm8k  {"question", "answer": worked solution + "#### N", "level", "family", "meta"}: what `nanoseek eval --data`
           and `nanoseek grpo --data` read back with the checker intact (a countdown record keeps its numbers)
    chat   {"messages": [user, assistant "<think>…</think> answer"]}: R1's cold-start format, for `nanoseek sft --data`
    text   {"text": question, working, answer}: pretraining documents, for `nanoseek pretrain --data`

The problems are the ones the training stages draw: the same split (train or the held-out eval split, which never
share a problem), spread evenly over the chosen (family, level) cells, deterministic for --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from .. import atomic

RENDERINGS = ("gsm8k", "chat", "text")


def render(problem, fmt: str) -> dict:
    from .tasks import to_chat, to_gsm8k, to_text

    return {"gsm8k": to_gsm8k, "chat": to_chat, "text": lambda p: {"text": to_text(p)}}[fmt](problem)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import POSITIVE_INT, SEED

    p.add_argument("--out", required=True, help="JSONL file to write ('-' for standard output)")
    p.add_argument("--format", choices=RENDERINGS, default="gsm8k",
                   help="gsm8k (question/answer, for eval and grpo --data; default), chat (for sft --data) or text "
                        "(for pretrain --data)")
    p.add_argument("--tasks", nargs="+", default=["all"], help="family[:level] cells, or 'all' (default)")
    p.add_argument("--split", choices=["train", "eval"], default="train",
                   help="train, or the held-out eval split the evaluations score (default train)")
    p.add_argument("--n", type=POSITIVE_INT, default=1000, help="problems, spread evenly over the cells (default 1000)")
    p.add_argument("--seed", type=SEED, default=0, help="which problems")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError, output_file
    from ..eval.evaluate import load_problems

    if args.out != "-":
        out = output_file(args.out, overwrite=args.overwrite)
        if out.suffix.lower() not in (".jsonl", ".json"):
            raise UserError(f"--out {args.out}: the file is JSON lines; name it .jsonl (or .json)")
    problems = load_problems(args.tasks, None, args.n, args.seed, split=args.split)
    lines = "".join(json.dumps(render(p, args.format), ensure_ascii=False) + "\n" for p in problems)
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        atomic.write_text(out, lines)  # a reader never sees half a file
        cells = Counter(f"{p.family}:{p.level}" for p in problems)
        print(json.dumps({"out": str(out), "format": args.format, "split": args.split, "n": len(problems),
                          "cells": dict(sorted(cells.items()))}))
    return 0
