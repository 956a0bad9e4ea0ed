"""`nanoseek eval`: accuracy of a model on verifiable problems, batched through the engine.

Problems come from the task suite's held-out split (`--task arithmetic`, `--task word:2`, `--task all`) or from any
GSM8K-format JSONL (`question`, `answer` = worked solution ending in `#### N` or just `N`, optional `level`).
Each problem is prompted through the model's own chat template (or as plain text for base models), K samples are
drawn, and the answer is read from the completion (`answers.py`: after `</think>`, then `\\boxed{…}`, "answer is
…", …). pass@1 is the mean correctness over all K samples; with K > 1, maj@K is the accuracy of the most common
extracted answer and pass@k (k = 2, 4, …, K, the unbiased estimator) the chance that k samples include a right one:
what reinforcement learning could sharpen into pass@1 without new skills.
Numbers are compared as numbers, free-form math answers of imported data (fractions, expressions, sets) by
`math-verify`.

`--model URL` scores a model behind any OpenAI-compatible server the same way, through its chat endpoint (the
server applies the template): your model served elsewhere, or DeepSeek's own API, on the same held-out problems.

Decoding: an engine of up to 512 rows (`Engine.for_batch`) gets the prompts in chunks of twice its rows and
refills a row as soon as a completion ends, so the 1000-problem evaluation of the CPU speedrun's SFT model takes
10 s instead of 27 s, with the same completions (bench/results/eval_rows.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .answers import extract_answer


def majority(problem, answers: list[str | None]) -> int | None:
    """maj@K's pick: the index of the first answer of the largest group of equal answers (the earliest group wins a
    tie), or None when there is none. Answers are grouped as `check` reads them: "12", "12.0" and "3 × 4 = 12" are one
    answer; "1/2", "0.5" and "\\frac{1}{2}" are one too (math-verify) in imported data. A countdown expression is its
    text."""
    from ..data.checking import as_number, math_equal, result_of
    from ..data.tasks import FAMILIES

    groups: list[list] = []  # [first index, key, votes, text]
    for i, a in enumerate(answers):
        if a is None:
            continue
        text = a.strip() if problem.family == "countdown" else result_of(a).strip()
        key = value if (value := as_number(text)) is not None else text
        for g in groups:  # two numbers are compared as numbers; math-verify reads the rest ("0.5" is "1/2")
            if g[1] == key or (problem.family not in FAMILIES and str in (type(key), type(g[1]))
                               and math_equal(g[3], text)):
                g[2] += 1
                break
        else:
            groups.append([i, key, 1, text])
    return max(groups, key=lambda g: (g[2], -g[0]))[0] if groups else None


@dataclass
class EvalResult:
    problem: object
    completions: list[str]
    answers: list[str | None]
    correct: list[bool]


# DeepSeek-R1-Zero's template (R1 paper, Table 1), with the answer after </think> instead of in <answer> tags.
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process is enclosed within <think> </think> tags and the answer follows, i.e., <think> reasoning process here "
    "</think> answer here. User: {question}. Assistant:"
)


def prompts_for(problems, tok, style: str) -> list[list[int]]:
    """chat: the directory's chat template with the generation prompt; plain: BOS + question + newline (base
    models); r1-zero: R1-Zero's plain-text template."""
    if style == "chat":
        return [tok.apply_chat_template([{"role": "user", "content": p.question}]) for p in problems]
    if style == "r1-zero":
        return [tok.encode(R1_ZERO_PROMPT.format(question=p.question), add_bos=True) for p in problems]
    return [tok.encode(p.question + "\n", add_bos=True) for p in problems]


def check_context(prompts: Iterable[list[int]], max_new_tokens: int, context: int, model="") -> int:
    """The longest prompt's length; a UserError (naming `model`) unless it plus max_new_tokens fits `context`."""
    from ..cli import UserError

    longest = max(map(len, prompts), default=0)
    if longest + max_new_tokens > context:
        prompt = f"the longest prompt ({longest} tokens) + " if longest else ""
        raise UserError(f"{prompt}{max_new_tokens} new tokens exceeds the model's context of {context} tokens"
                        + (f" ({model})" if model else ""))
    return longest


def engine_for(model_dir, device: str, prompts: list[list[int]], max_new_tokens: int, samples: int = 1,
               dtype=None):
    """An engine for evaluating `samples` completions of each of `prompts` (`Engine.for_batch`); dtype as
    `load_for_inference` takes it."""
    from ..checkpoint import read_config
    from ..engine.engine import Engine, load_for_inference

    check_context(prompts, max_new_tokens, read_config(model_dir).max_position_embeddings, model_dir)
    model = load_for_inference(model_dir, device, dtype)
    return Engine.for_batch(model, len(prompts) * samples, max(map(len, prompts), default=0), max_new_tokens)


def run_eval(engine, tok, problems, samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
             style: str = "chat", seed: int = 0, progress: bool = True, top_p: float = 1.0) -> list[EvalResult]:
    from ..cli import Interrupted, ctrl_c_ignored
    from ..serve.reasoning import starts_in_reasoning

    prompts = prompts_for(problems, tok, style)
    stop = [tok.eos_id] if style == "chat" else [tok.eos_id, tok.bos_id]
    thought = "<think>\n" if prompts and starts_in_reasoning(prompts[0], tok) else ""  # the template's prefill
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(samples)]
    seeds = sample_seeds(problems, samples, seed)
    outs: dict[int, list[int]] = {}  # sample index (problem-major) -> its new tokens
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(flat), desc="eval", unit="sample", file=sys.stderr, dynamic_ncols=True)
    step = 2 * engine.max_batch_size  # the engine refills its rows inside a chunk; the bar moves per chunk
    try:
        for start in range(0, len(flat), step):
            chunk = [p for _, p in flat[start : start + step]]
            try:
                new = engine.generate(chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=None if temperature == 0 else seeds[start : start + step],
                                      stop_token_ids=[t for t in stop if t is not None])
            except Interrupted as e:  # the chunk's completions that had finished
                outs.update({start + i: o for i, o in e.done.items()})
                raise
            outs.update({start + i: o for i, o in enumerate(new)})
            if bar is not None:
                bar.update(len(chunk))
    except KeyboardInterrupt:
        with ctrl_c_ignored():
            raise Interrupted(finished_problems(problems, {k: thought + completion_text(tok, o)
                                                           for k, o in outs.items()}, samples)) from None
    finally:
        if bar is not None:
            bar.close()
    return check_completions(problems, [thought + completion_text(tok, outs[k]) for k in range(len(flat))], samples)


def sample_seeds(problems, samples: int, seed: int) -> list[int]:
    """The sampling seed of each (problem, sample), problem-major: a hash of --seed, the question and the sample's
    number, so a problem's samples are the same whichever others are evaluated beside it (`--n`, a --data file's
    order). Below 2**63, as servers take."""
    return [int.from_bytes(hashlib.sha256(f"{seed}\n{s}\n{p.question}".encode()).digest()[:7], "big")
            for p in problems for s in range(samples)]


def completion_text(tok, ids: list[int]) -> str:
    """A completion's text up to the end of its answer (a chat completion ends with EOS; a base model continues with
    the next document, after a BOS)."""
    text = tok.decode(ids, skip_special_tokens=False)
    for end in (tok.eos_token, tok.bos_token):
        if end:
            text = text.split(end)[0]
    return text


def run_eval_url(client, problems, samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 256,
                 seed: int = 0, progress: bool = True) -> list[EvalResult]:
    """The same evaluation of a model behind an OpenAI-compatible chat endpoint (`client`: a teacher.URLTeacher,
    which sends the requests concurrently with retries); the server applies its own chat template, and each reply
    is scored as `<think>\nreasoning\n</think>\n\nanswer` (without the closing tag if it ended inside the reasoning:
    `content` null, as nanoseek serve and vLLM send it).
    Each sample is asked with the seed `sample_seeds` gives it, as run_eval draws it."""
    from ..cli import Interrupted, ctrl_c_ignored
    from ..train.teacher import FAILURES_BEFORE_ABORT

    questions = [p.question for p in problems for _ in range(samples)]
    texts: dict[int, str] = {}  # sample index (problem-major) -> the reply as a completion's text
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(questions), desc="eval", unit="sample", file=sys.stderr, dynamic_ncols=True)
    refused: list[str] = []  # requests the server refused (a 400: scored as wrong, as a local run's)
    failed: dict[int, str] = {}  # requests it kept failing on (a 5xx or no reply, after retries): no score counts them

    def answered():  # the problems whose every sample the server answered, checked
        return finished_problems(problems, {i: t for i, t in texts.items() if i not in failed}, samples)

    try:
        for i, trace in client.traces(questions, max_new_tokens, temperature, sample_seeds(problems, samples, seed)):
            if trace.failed:
                failed[i] = trace.error
                if len(failed) >= FAILURES_BEFORE_ABORT:  # no use asking the rest
                    raise ConnectionError(f"the server failed on {len(failed)} requests, even after retries: "
                                          f"{trace.error}")
            elif trace.error:
                refused.append(trace.error)
            if not trace.reasoning:
                texts[i] = trace.answer
            elif trace.closed:
                texts[i] = f"<think>\n{trace.reasoning}\n</think>\n\n{trace.answer}"
            else:  # ended inside the reasoning: no answer, as a local completion that never closed </think>
                texts[i] = f"<think>\n{trace.reasoning}"
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:  # the replies come in any order
        with ctrl_c_ignored():
            raise Interrupted(finished_problems(problems, texts, samples)) from None
    except ConnectionError as e:  # the server stopped answering: what it had answered is kept, as after a Ctrl-C
        raise ServerStopped(str(e), answered()) from None
    finally:  # an error is then printed on a line of its own
        if bar is not None:
            bar.close()
    if failed:  # a score that counts a server's failures as wrong answers would not be the model's
        raise ServerStopped(f"the server failed on {len(failed)} of {len(questions)} requests, even after retries "
                            f"(first: {next(iter(failed.values()))}); the problems it answered are scored apart",
                            answered())
    if refused and len(refused) == len(questions):  # the settings, not the questions: as a local run's error
        raise ConnectionError(f"the server refused every request (first: {refused[0]}); is --max-new-tokens more "
                              "than its context leaves?")
    if refused:
        print(f"eval: the server refused {len(refused)} of {len(questions)} requests (first: {refused[0]}); they are "
              "scored as wrong", file=sys.stderr)
    return check_completions(problems, [texts[i] for i in range(len(questions))], samples)


class ServerStopped(ConnectionError):
    """A URL that stopped answering (or kept failing on some requests), carrying the problems it had answered."""

    def __init__(self, message: str, done: list[EvalResult]):
        super().__init__(message)
        self.done = done


def finished_problems(problems, texts: dict[int, str], samples: int) -> list[EvalResult]:
    """After a Ctrl-C: the problems whose samples all have a text (texts: sample index, problem-major), checked."""
    done = [j for j in range(len(problems)) if all(j * samples + s in texts for s in range(samples))]
    return check_completions([problems[j] for j in done], [texts[j * samples + s] for j in done
                                                           for s in range(samples)], samples)


def check_completions(problems, texts: list[str], samples: int) -> list[EvalResult]:
    """Completions (problem-major, `samples` each) -> each problem's extracted answers, checked."""
    from ..data.checking import check

    results = []
    for i, p in enumerate(problems):
        group = texts[i * samples : (i + 1) * samples]
        answers = [extract_answer(t) for t in group]
        results.append(EvalResult(p, group, answers, [a is not None and check(p, a) for a in answers]))
    return results


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of n samples, c of them right, include a right one: 1 − C(n−c, k) / C(n, k) (the unbiased
    estimator of Chen et al. 2021, "Evaluating Large Language Models Trained on Code")."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(results: list[EvalResult]) -> dict:
    """pass@1 (mean over samples); when K > 1 also maj@K and pass@k for k = 2, 4, 8, … and K; the same per level,
    per family and per (family, level) cell. `distinct`: how many different problems the n are, when fewer."""
    def score(rs):
        out = {"n": len(rs), "pass@1": round(sum(sum(r.correct) / len(r.correct) for r in rs) / max(1, len(rs)), 4)}
        K = len(rs[0].correct) if rs else 1
        if K > 1:
            picks = [majority(r.problem, r.answers) for r in rs]
            out[f"maj@{K}"] = round(sum(r.correct[i] for r, i in zip(rs, picks) if i is not None) / len(rs), 4)
            for k in sorted({2**i for i in range(1, K.bit_length()) if 2**i < K} | {K}):
                out[f"pass@{k}"] = round(sum(pass_at_k(K, sum(r.correct), k) for r in rs) / len(rs), 4)
        return out

    summary = score(results)
    distinct = len({r.problem.uid for r in results})
    if distinct < len(results):  # a small cell's problems come back in other phrasings (tasks.generate)
        summary["distinct"] = distinct
    by_level, by_family, by_cell = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in results:
        by_level[r.problem.level].append(r)
        by_family[r.problem.family].append(r)
        by_cell[f"{r.problem.family}:{r.problem.level}"].append(r)
    if len(by_level) > 1 or any(lvl for lvl in by_level):
        summary["levels"] = {str(k): score(v) for k, v in sorted(by_level.items())}
    if len(by_family) > 1:
        summary["families"] = {k: score(v) for k, v in sorted(by_family.items())}
        if "levels" in summary:
            summary["cells"] = {k: score(v) for k, v in sorted(by_cell.items())}
    return summary


def evaluate_dir(model_dir, problems, device: str, style: str = "chat",
                 max_new_tokens: int = 320, dtype=None) -> tuple[dict, object]:
    """Greedy evaluation of a model directory on `problems` -> (summary, engine). 320 new tokens fit the longest
    worked solutions of the task suite (three-step word problems with their column working)."""
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    engine = engine_for(model_dir, device, prompts_for(problems, tok, style), max_new_tokens, dtype=dtype)
    results = run_eval(engine, tok, problems, max_new_tokens=max_new_tokens, style=style, progress=False)
    return summarize(results), engine


def held_out(n: int, families, seed: int = 4242) -> list:
    """n problems of the task suite's eval split, spread evenly over the families' levels: the speedrun scores every
    stage on seed 4242's (distill and GRPO's periodic evaluation draw with their own seeds)."""
    from ..data.tasks import mixture

    return mixture(n, seed=seed, split="eval", families=list(families))


def held_out_or_data(eval_data: str | None, data: str | None, n: int, families, seed: int) -> list:
    """A training stage's held-out problems: the first n of --eval-data; none when it trains on --data without one
    (the suite would not measure that skill); else n of the suite's eval split in `families`."""
    from ..cli import UserError

    if eval_data:
        return load_problems(None, eval_data, n, 0, n_flag="--eval-n")
    if data:
        return []
    try:
        return held_out(n, sorted(families), seed=seed)
    except ValueError as e:  # more problems than the families' eval split holds
        raise UserError(f"--eval-n {n}: {e}") from None


def load_problems(tasks_: list[str] | None, data: str | None, n: int, seed: int, split: str = "eval",
                  n_flag: str = "--n"):
    """The first n problems (0: all) of --data FILE (GSM8K-format JSONL or Parquet), saying so when the file holds
    more (n_flag: the option that sets n); or n task-suite problems of `split` spread over the cells `tasks_` names
    (FAMILY, FAMILY:LEVEL or all; parse_cells)."""
    from ..cli import UserError, rank
    from ..data import tasks

    if data:
        from ..data.corpus import check_paths, read_records

        problems = []
        try:
            check_paths(data)  # "PATH: no such file", not an errno
            records = read_records(data, columns=("question", "answer", "level", "family", "meta"))
            for where, rec in records:
                try:
                    problems.append(tasks.from_record(rec))
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                if n and len(problems) == n:
                    break
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from None
        if not problems:
            raise UserError(f"{data}: no records")
        try:  # how many more there are, for the notice (the records past n are not read, so not checked)
            rest = sum(1 for _ in records)
            total = f" of its {n + rest}"
        except (OSError, ValueError):
            rest, total = 1, ""
        if rest and rank() == 0:
            more = "--n 0 for all" if n_flag == "--n" else f"{n_flag} for more"
            print(f"{data}: the first {n}{total} records ({more})", file=sys.stderr)
        return problems
    if n < 1:
        raise UserError("--n must be at least 1 (0 means all of --data, which is not given)")
    try:
        cells = tasks.parse_cells(tasks_ or ["all"])
        return tasks.cells_mixture(n, cells, seed=seed, split=split)
    except ValueError as e:  # a bad cell, or more problems than a small cell holds
        raise UserError(f"{e}; ask for fewer with --n" if "distinct" in str(e) else str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, TEMPERATURE, OneFile, bounded
    from ..device import add_dtype_argument
    from ..train.teacher import TIMEOUT

    p.add_argument("--model", required=True,
                   help="model directory (HF format, with tokenizer files), or the base URL of an OpenAI-compatible "
                        "server (nanoseek serve, vLLM, SGLang, DeepSeek's API: its API key from "
                        "$NANOSEEK_TEACHER_API_KEY or $OPENAI_API_KEY) to score it on the same problems")
    p.add_argument("--served-model", metavar="NAME",
                   help="with a URL: the model to ask for (default: the first the server lists)")
    p.add_argument("--concurrency", type=POSITIVE_INT, default=8, help="with a URL: requests in flight (default 8)")
    p.add_argument("--timeout", type=POSITIVE, default=TIMEOUT,
                   help="with a URL: seconds for one whole reply (default 600); a request that times out twice "
                        "fails, and a run with a failed request gives no score")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default="all", help="task-suite family[:level] or 'all' (held-out split; default all)")
    src.add_argument("--data", action=OneFile,
                     help="GSM8K-format JSONL: question, answer ('... #### N' or 'N'), optional level")
    p.add_argument("--n", type=NONNEGATIVE_INT, default=200,
                   help="problems to evaluate (default 200; 0 = all of --data)")
    p.add_argument("--samples", type=POSITIVE_INT, default=1,
                   help="K samples per problem (pass@1 is their mean; maj@K and pass@k too); needs --temperature > 0")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.0,
                   help="0 = greedy (default); R1 recommends 0.6 with K > 1")
    p.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True), default=1.0, metavar="P",
                   help="nucleus sampling, the same for a directory and a URL (1 = off; R1 used 0.95 with T 0.6)")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=256,
                   help="completion budget; a cut-off answer is usually wrong")
    p.add_argument("--prompt", choices=["chat", "plain", "r1-zero"], default="chat",
                   help="chat template (default), plain text for base models, or R1-Zero's template")
    p.add_argument("--seed", type=SEED, default=0, help="which held-out problems (and the sampling seed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_dtype_argument(p)
    p.add_argument("--out", help="also write per-problem results (JSONL) here ('-': standard output, before the "
                                 "summary line); an existing file is replaced only if an earlier --out wrote it. "
                                 "Ctrl-C, or a URL that stops answering, keeps the problems that finished: their "
                                 "rows, and a summary of them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def earlier_results(path: Path) -> bool:
    """Was `path` written by `nanoseek eval --out` (so replacing it loses nothing the user made)?"""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        return not first or {"completions", "correct"} <= json.loads(first).keys()  # an empty file, or results
    except (OSError, ValueError, AttributeError):
        return False


def run(args: argparse.Namespace) -> int:
    from .. import atomic, cli
    from ..cli import Interrupted, UserError, ctrl_c_ignored, output_file
    from ..device import resolve_device
    from ..tokenizer import Tokenizer
    from ..train.teacher import URLTeacher, check_scheme, is_url

    if args.samples > 1 and args.temperature <= 0:
        raise UserError(f"--samples {args.samples} with greedy decoding gives {args.samples} identical completions; "
                        "pass --temperature (R1 used 0.6)")
    device = resolve_device(args.device, allow_mps=False)
    earlier = args.out not in (None, "-") and Path(args.out).exists()  # an interrupted run leaves it whole
    if args.out is not None and args.out != "-":  # checked now, not after the whole evaluation
        output_file(args.out, replace_ok=earlier_results)
    problems = load_problems(None if args.data else [args.task], args.data, args.n, args.seed)
    check_scheme(args.model, "--model")
    interrupted, stopped, unwritten = False, None, None
    try:
        if is_url(args.model):
            if args.prompt != "chat":
                raise UserError("a model behind a URL is asked through its chat endpoint: --prompt chat only")
            try:
                client = URLTeacher(args.model, model=args.served_model, concurrency=args.concurrency,
                                    timeout=args.timeout, top_p=args.top_p)
                results = run_eval_url(client, problems, args.samples, args.temperature, args.max_new_tokens,
                                       args.seed, progress=not args.no_progress)
            except ServerStopped as e:
                if not e.done:
                    raise UserError(f"{args.model}: {e}") from None
                results, stopped = e.done, f"{args.model}: {e}"
            except ConnectionError as e:
                raise UserError(f"{args.model}: {e}") from None
        else:
            if args.served_model:
                raise UserError("--served-model names a model behind a URL; --model is a directory")
            tok = Tokenizer.from_dir(args.model)
            engine = engine_for(args.model, device, prompts_for(problems, tok, args.prompt), args.max_new_tokens,
                                args.samples, args.dtype)
            results = run_eval(engine, tok, problems, args.samples, args.temperature, args.max_new_tokens,
                               args.prompt, args.seed, progress=not args.no_progress, top_p=args.top_p)
    except Interrupted as e:  # keep what finished: its rows go to --out, its scores to the summary
        if not e.done:
            raise
        results, interrupted = e.done, True
    partial = interrupted or stopped is not None
    if partial:
        rows = f", and their rows are in {args.out}" if args.out not in (None, "-") else ""
        if earlier:  # a complete earlier result is worth more than a part of this one
            rows = f" ({args.out} keeps its earlier results: their rows are not written)"
        head = f"error: {stopped}\n" if stopped else "terminated: " if cli.TERMINATED else "interrupted: "
        print(f"\n{head}{len(results)} of {len(problems)} problems finished; the summary scores those{rows}",
              file=sys.stderr)
    with ctrl_c_ignored() if interrupted else contextlib.nullcontext():  # the rows a Ctrl-C kept are written whole
        if args.out is not None and not (partial and earlier):
            rows = "".join(json.dumps({"question": r.problem.question, "answer": r.problem.answer, "completions":
                                       r.completions, "extracted": r.answers, "correct": r.correct}) + "\n"
                           for r in results)
            if args.out == "-":
                sys.stdout.write(rows)
            else:
                try:
                    atomic.write_text(Path(args.out).resolve(), rows)  # whole or not at all, through a link
                except OSError as e:  # a full disk: the scores below are still worth having
                    unwritten = f"--out {args.out} could not be written ({e.strerror or e}); the summary above " \
                                "scores the evaluation"
        print(json.dumps(summarize(results) | ({"interrupted": True} if interrupted else {}) |
                         ({"incomplete": stopped} if stopped else {})))
    if unwritten:
        raise UserError(unwritten)
    return 130 if interrupted else 1 if stopped else 0
