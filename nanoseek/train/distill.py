"""`nanoseek distill`: teach a student the teacher's reasoning (DeepSeek-R1 §2.4: distilled students get SFT on the
teacher's verified traces only).

1. traces   the teacher (a model directory or any OpenAI-compatible URL) answers task-suite problems from the
            train split, or the user's own (`--data FILE.jsonl`, GSM8K format); every trace is appended to
            RUN/traces.jsonl as it arrives, so an interrupted run resumes without asking again.
2. filter   rejection sampling: keep a trace only if it ended by itself, is well formed (`<think>` reasoning then
            an answer) and the task's checker verifies its answer; drop exact duplicates. The kept set is chat JSONL
            (RUN/kept.jsonl) that `nanoseek sft` also accepts.
3. student  SFT of the student (RUN/student) on the kept set; with a local teacher that shares the student's
            vocabulary, `--kd-weight` adds KL(teacher ‖ student) on the answer tokens (logit distillation).
4. report   teacher vs student: held-out pass@1 (the suite's eval split, or `--eval-data FILE.jsonl`), parameters
            (total and active), decode tokens/s; RUN/cost.json for the cost table counts the student's SFT and, from
            a local teacher, the trace generation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import atomic
from . import loop, runlock
from . import metrics as metrics_lib
from .rewards import judge
from .teacher import FAILURES_BEFORE_ABORT, TIMEOUT, LocalTeacher, api_base, check_scheme, is_url, make_teacher


@dataclass
class DistillConfig:
    teacher: str
    out: str
    teacher_model: str | None = None  # the model a URL teacher is asked for (default: the first its /models lists)
    student: str | None = None  # a model directory with tokenizer files
    student_preset: str | None = None  # or a fresh model of this preset, with the teacher's tokenizer
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "word", "countdown"])
    data: str | None = None  # or the problems of this GSM8K-format JSONL
    eval_data: str | None = None  # held-out GSM8K-format JSONL to score teacher and student on (default: the suite's)
    n: int = 2000  # problems (with --data: the file's first n; 0 = all)
    samples: int = 1  # traces per problem
    max_tokens: int = 160
    temperature: float = 0.6  # R1's recommended sampling
    concurrency: int = 8
    timeout: float = TIMEOUT  # seconds a URL teacher has for one whole reply
    epochs: float = 4.0  # passes of the student SFT over the kept traces
    steps: int | None = None  # or exactly this many SFT steps
    batch_size: int = 32
    seq_len: int = 256  # tokens per student SFT row (capped by the student's context); a longer trace is cut
    lr: float = 5e-4
    kd_weight: float = 0.0
    eval_n: int = 200
    seed: int = 0
    device: str = "auto"
    progress: bool = True


REFUSALS_BEFORE_ABORT = 8  # requests the teacher refused before it answered any: stop asking


def trace_problems(cfg: DistillConfig):
    """The first cfg.n problems of --data, or cfg.n problems of the train split spread evenly over the cells
    cfg.tasks names (family or family:level)."""
    from ..eval.evaluate import load_problems

    problems = load_problems(None if cfg.data else cfg.tasks, cfg.data, cfg.n, cfg.seed + 2, split="train")
    if not cfg.data:
        return problems
    first: dict[str, object] = {}
    for p in problems:
        first.setdefault(p.uid, p)
    unique = list(first.values())  # the first record of each question, in file order
    if len(unique) < len(problems):
        print(f"distill: {len(problems) - len(unique)} of {len(problems)} --data records repeat an earlier question "
              "(ignoring case and spacing); each question is asked once, and checked against its first record",
              file=sys.stderr)
    return unique


def collect_traces(cfg: DistillConfig, teacher, problems, path: Path) -> list[dict]:
    """Ask the teacher for every (problem, sample) not yet in `path`; append each answer as it arrives. The k-th
    (problem, sample) is always asked with seed `request_seed(cfg.seed, k)` and saved with its `index` k, so a resumed
    run gets the traces an uninterrupted one would have (from a local teacher, whose sampling is seeded per request).
    Two phrasings of one problem are two questions: keyed by problem, one overwrote the other. The time and FLOPs
    spent go to traces_cost.json as the traces are saved, so an interrupted run's saved traces are counted too."""
    done, older = {}, {}  # index -> record; (uid, sample) -> a record written before traces had an index
    if path.is_file():
        text = path.read_text()
        read = False  # whether the last line was read as a record
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                if "index" in rec:
                    done[rec["index"]] = rec
                else:
                    older[(rec["uid"], rec["sample"])] = rec
                read = True
            except (json.JSONDecodeError, KeyError, TypeError):
                read = False  # a line cut short by an interruption
        if text and not text.endswith("\n"):  # a kill before the last newline
            with path.open("a" if read else "r+") as f:
                if read:  # a whole record: it counts as done above, so keep it and end its line
                    f.write("\n")
                else:  # drop that cut line, or the next record would be appended to it
                    f.truncate(len(text[: text.rfind("\n") + 1].encode()))
    todo = [(p, s, k) for k, (p, s) in enumerate((p, s) for p in problems for s in range(cfg.samples))
            if k not in done and (p.uid, s) not in older]
    bar = None
    if cfg.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="teacher traces", unit="trace", file=sys.stderr, dynamic_ncols=True)
    refused: list[str] = []  # requests the server refused or failed on: not saved, so a rerun asks them again
    failing = 0  # requests it failed on since its last answer
    spent = {"t": time.perf_counter(), "flops": getattr(teacher, "flops", None)}  # not yet in traces_cost.json

    def account() -> None:
        now, flops = time.perf_counter(), getattr(teacher, "flops", None)
        add_traces_cost(path.parent, now - spent["t"], None if flops is None else flops - spent["flops"])
        spent.update(t=now, flops=flops)

    with path.open("a") as f, contextlib.ExitStack() as on_exit:
        if todo:
            on_exit.callback(account)  # also on an error or Ctrl-C: what was saved was paid for
        for i, trace in teacher.traces([p.question for p, _, _ in todo], cfg.max_tokens, cfg.temperature,
                                       [request_seed(cfg.seed, k) for _, _, k in todo]):
            p, s, k = todo[i]
            failing = failing + 1 if trace.failed else 0
            if failing >= FAILURES_BEFORE_ABORT:  # the server is down or overloaded, not one question
                raise ConnectionError(f"the teacher failed on {failing} requests in a row: {trace.error}")
            if trace.error:
                refused.append(f"{trace.error} (question: {p.question[:80]!r})")
                if len(refused) >= REFUSALS_BEFORE_ABORT and not done and not older:  # the settings, not a question
                    raise ConnectionError(f"the teacher refused the first {len(refused)} requests: {trace.error}")
                continue
            rec = {"index": k, "uid": p.uid, "sample": s, "question": p.question, "reasoning": trace.reasoning,
                   "answer": trace.answer, "finished": trace.finished}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[k] = rec
            if getattr(teacher, "flops", None) != spent["flops"] or time.perf_counter() - spent["t"] > 60:
                account()  # a local teacher's chunk was generated (a kill -9 loses at most the one in progress)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if refused:
        print(f"distill: the teacher refused or failed on {len(refused)} of {len(todo)} requests (first: "
              f"{refused[0]}); they are left out, and a rerun asks them again", file=sys.stderr)
    return [done[k] for k in sorted(done)] + list(older.values())


def request_seed(seed: int, k: int) -> int:
    """The sampling seed of the k-th (problem, sample) of a run with --seed `seed`. Not seed + k: then --seed 1's
    first sample was --seed 0's second, and two runs' traces merged held duplicates. Below 2**63, as servers take."""
    return (seed << 31) + k


def filter_traces(records: list[dict], problems) -> tuple[list[dict], dict]:
    """Rejection sampling -> chat records, and counts of what was dropped and why."""
    by_uid = {p.uid: p for p in problems}
    records = [rec for rec in records if rec["uid"] in by_uid]  # (traces of other problems: not this run's)
    kept, seen = [], set()
    counts = {"total": len(records), "malformed": 0, "wrong": 0, "duplicate": 0, "kept": 0}
    for rec in records:
        p = by_uid[rec["uid"]]
        text = f"<think>\n{rec['reasoning']}\n</think>\n\n{rec['answer']}"
        j = judge(text, p, finished=rec["finished"])
        if not j.format:
            counts["malformed"] += 1
            continue
        if not j.accuracy:
            counts["wrong"] += 1
            continue
        key = (rec["question"], rec["reasoning"], rec["answer"])  # (the same trace of the same question, sampled twice)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        kept.append({"messages": [{"role": "user", "content": rec["question"]},
                                  {"role": "assistant", "content": text}]})
    counts["kept"] = len(kept)
    return kept, counts


def fresh_student(cfg: DistillConfig, teacher, run: Path) -> Path:
    """A newly initialised model of `student_preset` with the (local) teacher's tokenizer."""
    from ..checkpoint import save_model
    from ..config import get_preset
    from ..model import build_model

    tok = teacher.tok
    mc = get_preset(cfg.student_preset).replace(vocab_size=teacher.model.config.vocab_size, bos_token_id=tok.bos_id,
                                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, torch_dtype="float32")
    torch.manual_seed(cfg.seed)
    out = run / "student_init"
    save_model(build_model(mc), out)
    tok.save(out)
    return out


def decode_tokens_per_s(model, n_prompts: int = 8, new_tokens: int = 64, repeats: int = 3) -> float:
    """Tokens per second of `n_prompts` rows decoding `new_tokens` each: the best of `repeats` timed runs after a
    warm-up of the same shape (one run of ~0.1 s on a shared 2-core machine moved by up to 6x)."""
    from ..engine.engine import Engine

    engine = Engine(model)
    prompts = [[engine.cfg.bos_token_id or 0] + [5 + i] * 8 for i in range(n_prompts)]
    best = 0.0
    for run in range(repeats + 1):  # run 0 warms up
        t = time.perf_counter()
        outs = engine.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=())  # new_tokens each
        if run:
            best = max(best, sum(len(o) for o in outs) / (time.perf_counter() - t))
    return best


def scored_problems(cfg: DistillConfig) -> list:
    """What teacher and student are scored on (eval.evaluate.held_out_or_data)."""
    from ..data.tasks import parse_cells
    from ..eval.evaluate import held_out_or_data

    families = set() if cfg.eval_data or cfg.data else {f for f, _ in parse_cells(cfg.tasks)}
    return held_out_or_data(cfg.eval_data, cfg.data, cfg.eval_n, families, seed=cfg.seed)


def describe(model_dir: str, device: str, problems: list, max_new_tokens: int) -> dict:
    """pass@1 on `problems` (when there are any), parameters (total and active), decode tokens/s."""
    from ..engine.engine import load_for_inference
    from ..eval.evaluate import evaluate_dir
    from ..model import param_counts

    if problems:
        summary, engine = evaluate_dir(model_dir, problems, device, max_new_tokens=max_new_tokens)
        model = engine.model
        del engine  # its cache: one engine at a time
    else:
        summary, model = {}, load_for_inference(model_dir, device)
    counts = param_counts(model)
    return {"pass@1": summary.get("pass@1"), "levels": summary.get("levels"), "params_total": counts["total"],
            "params_active": counts["active"], "decode_tokens_per_s": round(decode_tokens_per_s(model), 1)}


def describe_url(teacher, problems: list, max_new_tokens: int, progress: bool) -> dict:
    """A URL teacher's pass@1 on `problems`, asked greedily through its chat endpoint as `nanoseek eval --model URL`
    asks; its parameters and decoding speed are the server's to know (None)."""
    from ..eval.evaluate import run_eval_url, summarize

    try:
        summary = summarize(run_eval_url(teacher, problems, max_new_tokens=max_new_tokens, progress=progress))
    except ConnectionError as e:  # the student is trained and scored: say so, and leave the teacher unscored
        print(f"distill: the teacher could not be scored ({e})", file=sys.stderr)
        summary = {}
    return {"pass@1": summary.get("pass@1"), "levels": summary.get("levels"), "params_total": None,
            "params_active": None, "decode_tokens_per_s": None}


def read_traces_cost(run: Path, local: bool) -> dict:
    """RUN/traces_cost.json: the wall time and (from a local teacher) FLOPs that the saved traces cost."""
    try:
        return json.loads((run / "traces_cost.json").read_text())
    except (OSError, ValueError):  # none yet (or, from older versions, one cut short: its time is lost)
        return {"wall_s": 0.0, "flops": 0.0 if local else None}


def add_traces_cost(run: Path, wall_s: float, flops: float | None) -> dict:
    """Add to RUN/traces_cost.json (a resumed run adds to what earlier ones spent). flops None: a URL teacher, whose
    machine did the work."""
    path = run / "traces_cost.json"
    cost = read_traces_cost(run, flops is not None)
    cost["wall_s"] = round(cost["wall_s"] + wall_s, 2)
    if flops is not None and cost["flops"] is not None:
        cost["flops"] += flops
    atomic.write_json(path, cost)
    return cost


def write_cost(run: Path, traces: dict, device: str) -> None:
    """RUN/cost.json for the cost table: the student's SFT plus, from a local teacher, the trace generation (device
    time and FLOPs). A URL teacher's traces ran on someone else's machine and are left out of both."""
    sft_cost = json.loads((run / "student" / "cost.json").read_text())
    local = traces["flops"] is not None
    wall = sft_cost["wall_s"] + (traces["wall_s"] if local else 0.0)
    flops = sft_cost["flops"] + (traces["flops"] if local else 0.0)
    peak, how = metrics_lib.device_peak_flops(torch.device(device))
    cost = metrics_lib.cost_summary(wall, 1, flops, peak, sft_cost["price_per_device_hour"], how)
    cost["parts"] = {"teacher_traces": traces, "student_sft": {k: sft_cost[k] for k in ("wall_s", "flops")}}
    atomic.write_json(run / "cost.json", cost)


def eval_budget(cfg: DistillConfig) -> int:
    """New tokens when scoring teacher and student: the suite's longest solutions, or what the teacher was allowed."""
    return max(320, cfg.max_tokens)


def check_scored(cfg: DistillConfig, scored: list) -> None:
    """Before any work: the problems teacher and student are scored on fit their contexts (the teacher's traces are
    checked when it tokenizes them, before it generates)."""
    from ..checkpoint import read_config
    from ..eval.evaluate import check_context, prompts_for
    from ..tokenizer import Tokenizer

    for model_dir in (None if is_url(cfg.teacher) else cfg.teacher, cfg.student):
        if model_dir and scored:
            check_context(prompts_for(scored, Tokenizer.from_dir(model_dir), "chat"), eval_budget(cfg),
                          read_config(model_dir).max_position_embeddings, model_dir)


def check_same_vocabulary(teacher: str, student: str) -> None:
    """Logit distillation compares the two models' distributions token id by token id: the same tokenizer (its
    tokens and their ids) and the same output size, or the KL would pair unrelated tokens."""
    from ..checkpoint import read_config
    from ..cli import UserError
    from ..tokenizer import Tokenizer

    vocab = [Tokenizer.from_dir(d).hf.get_vocab(with_added_tokens=True) for d in (teacher, student)]
    sizes = [read_config(d).vocab_size for d in (teacher, student)]
    if vocab[0] != vocab[1] or sizes[0] != sizes[1]:
        raise UserError(f"--kd-weight: the student ({student}) does not share the teacher's tokenizer (vocab_size "
                        f"{sizes[1]} against {sizes[0]}, {len(vocab[1])} against {len(vocab[0])} tokens, or other "
                        "ids); distill without --kd-weight, or start from --student-preset, which takes the teacher's")


RUN_ENTRIES = {"traces.jsonl", "traces_cost.json", "kept.jsonl", "student_init", "student", "cost.json", "report.json"}


def older_run(run: Path) -> bool:
    """A distillation run from before RUN/distill.json was written: nothing but what distill writes, and a
    traces.jsonl of its records (a last line cut short by an interruption aside)."""
    if not (run / "traces.jsonl").is_file() or not {p.name for p in atomic.entries(run, "distill.json")} <= (
            RUN_ENTRIES):
        return False
    try:
        text = (run / "traces.jsonl").read_text()
        whole = text.splitlines()[: None if text.endswith("\n") else -1]
        return any(whole) and all({"uid", "sample", "question", "answer"} <= json.loads(line).keys()
                                  for line in whole if line)
    except (ValueError, AttributeError):  # not JSON objects (UnicodeDecodeError is a ValueError)
        return False


def claim_run(run: Path, cfg: DistillConfig) -> None:
    """RUN/distill.json records what a run distils (teacher, student, problems, sampling, the student's training); a
    rerun in the same directory with the same settings resumes it, and one with other settings is refused instead of
    silently reusing traces or a student made with the old ones. A run that holds neither yet (its teacher never
    answered: a mistyped --teacher-model) takes the new settings."""
    from ..cli import UserError

    what = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "eval_data", "eval_n", "concurrency",
                                                                          "timeout", "device", "progress")}
    what["tasks"] = None if cfg.data else list(cfg.tasks)
    if cfg.data:  # the file's content, not only its name: traces of an edited file's problems would not be these
        what["data_sha256"] = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
    home = run.resolve().parent
    for k in ("teacher", "student", "data"):  # a speedrun's models sit beside its distill run: moving OUT moves them
        if what.get(k) and not is_url(what[k]) and Path(what[k]).resolve().is_relative_to(home):
            what[k] = str(Path(what[k]).resolve().relative_to(home))
    if is_url(cfg.teacher):  # 'http://h:p', 'http://h:p/' and 'http://h:p/v1' are one teacher
        what["teacher"] = api_base(cfg.teacher)
    path = run / "distill.json"
    if run.is_dir():
        runlock.lock(run)  # two distillations in one directory would ask for every trace twice
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError:
            before = what  # written atomically; an unreadable one is not ours to judge
        if isinstance(before.get("teacher"), str) and is_url(before["teacher"]):  # (older runs kept the spelling)
            before["teacher"] = api_base(before["teacher"])
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}  # for what an older record leaves out
        defaults["data_sha256"] = what.get("data_sha256")
        changed = [f"{k} {before.get(k, defaults.get(k))!r} -> {v!r}" if k != "data_sha256" else
                   f"the --data file {cfg.data} changed since" for k, v in what.items()
                   if before.get(k, defaults.get(k)) != v
                   and not (k == "data_sha256" and before.get("data") != what.get("data"))]  # (another file)
        if not changed:
            return
        traces = run / "traces.jsonl"
        if traces.is_file() and traces.stat().st_size or (run / "student").exists():
            raise UserError(f"{run} holds a distillation of other settings ({'; '.join(changed)}); choose a new "
                            "--out, or rerun with the same settings to resume it")
        for name in ("traces_cost.json", "kept.jsonl"):  # the old settings' time and (empty) verdicts
            (run / name).unlink(missing_ok=True)
    elif run.is_dir() and atomic.entries(run, "distill.json") and not older_run(run):  # someone's files: not replaced
        raise UserError(f"{run} is not empty and holds no distillation run; choose a new --out")
    run.mkdir(parents=True, exist_ok=True)
    runlock.lock(run)
    atomic.write_json(path, what)


@runlock.releasing
def distill(cfg: DistillConfig) -> dict:
    from ..checkpoint import read_config
    from ..cli import UserError
    from ..config import get_preset
    from ..device import resolve_device
    from .sft import SFTConfig, sft

    # everything that can be checked is checked before any teacher time is spent
    device = resolve_device(cfg.device, allow_mps=False)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file; name a run directory")
    check_scheme(cfg.teacher, "--teacher")
    if not cfg.student and not cfg.student_preset:
        raise UserError("name the student: --student DIR or --student-preset PRESET")
    if cfg.student and not (all((Path(cfg.student) / f).is_file() for f in ("config.json", "tokenizer.json"))
                            and any(Path(cfg.student).glob("*.safetensors"))):
        raise UserError(f"--student {cfg.student}: not a model directory with config.json, *.safetensors weights "
                        "and tokenizer files")
    if cfg.student_preset:
        get_preset(cfg.student_preset)  # ConfigError names the presets
        if is_url(cfg.teacher):
            raise UserError("--student-preset needs a local teacher (for its tokenizer); with a URL teacher pass "
                            "--student DIR")
    if cfg.kd_weight > 0 and is_url(cfg.teacher):
        raise UserError("--kd-weight needs a local teacher directory (logits are not available over HTTP)")
    if cfg.kd_weight > 0 and cfg.student:
        check_same_vocabulary(cfg.teacher, cfg.student)
    problems, scored = trace_problems(cfg), scored_problems(cfg)  # a bad data file is refused before anything runs
    check_scored(cfg, scored)
    if cfg.data and not scored:
        print("distill: --data without --eval-data: teacher and student are not scored (pass --eval-data FILE.jsonl)",
              file=sys.stderr)
    cfg = loop.absolute_paths(cfg, "teacher", "student", "data", "eval_data")  # a rerun elsewhere names the same run
    run = Path(cfg.out)
    try:
        teacher = make_teacher(cfg.teacher, device=device, concurrency=cfg.concurrency, model=cfg.teacher_model,
                               timeout=cfg.timeout)
    except ConnectionError as e:
        raise UserError(f"teacher unreachable: {e}") from None
    claim_run(run, cfg)  # only now: a mistyped teacher URL must not tie --out to it
    try:
        records = collect_traces(cfg, teacher, problems, run / "traces.jsonl")
    except ConnectionError as e:
        raise UserError(f"teacher failed: {e} (the traces so far are kept in {run / 'traces.jsonl'}: a rerun asks only "
                        "for the rest)") from None
    traces_cost = read_traces_cost(run, isinstance(teacher, LocalTeacher))
    kept, counts = filter_traces(records, problems)
    kept_text = "".join(json.dumps(k) + "\n" for k in kept)
    kept_before = (run / "kept.jsonl").read_text() if (run / "kept.jsonl").is_file() else None
    if (run / "student").exists() and kept_before != kept_text:
        print("distill: the kept traces changed since the student's training began (answers to questions the teacher "
              "had refused, or another check of them): the student is trained again from the start", file=sys.stderr)
        shutil.rmtree(run / "student")
    atomic.write_text(run / "kept.jsonl", kept_text)
    print(f"traces: {json.dumps(counts)}", file=sys.stderr)
    if not kept and counts["total"] and counts["malformed"] == counts["total"]:
        raise UserError(f"no trace passed verification ({counts}): every reply lacked a reasoning (reasoning_content, "
                        "reasoning, or <think>…</think> in its content) or an answer after it; is the teacher a "
                        "reasoning model, and is --max-tokens enough for it to finish?")
    if not kept:
        raise UserError(f"no trace passed verification ({counts}); a stronger teacher or more samples are needed")
    student = cfg.student or str(fresh_student(cfg, teacher, run))
    kd_teacher = teacher.model if cfg.kd_weight > 0 and isinstance(teacher, LocalTeacher) else None
    if isinstance(teacher, LocalTeacher):
        teacher.model = None  # not beside the student's training unless KD needs it (the report loads it again)
    # A few hundred kept traces and a fixed step count would mean dozens of epochs: the student memorises them and
    # forgets what its pretraining taught it (measured: a student base at 0.39 on level-1 arithmetic fell to 0.06 on
    # arithmetic after ~50 epochs of 127 traces). Count epochs instead.
    sft_cfg = SFTConfig(out=str(run / "student"), model=student, data=[str(run / "kept.jsonl")],
                        steps=cfg.steps or 1, epochs=0.0 if cfg.steps else cfg.epochs, batch_size=cfg.batch_size,
                        micro_batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                        seq_len=min(cfg.seq_len, read_config(student).max_position_embeddings),
                        device=device, progress=cfg.progress, resume=True)
    result = sft(sft_cfg, teacher=kd_teacher, kd_weight=cfg.kd_weight)
    del kd_teacher
    write_cost(run, traces_cost, device)
    report = {"traces": counts, "student": describe(str(run / "student" / "model"), device, scored, eval_budget(cfg))}
    if isinstance(teacher, LocalTeacher):
        report["teacher"] = describe(cfg.teacher, device, scored, eval_budget(cfg))
    elif scored:
        report["teacher"] = describe_url(teacher, scored, eval_budget(cfg), cfg.progress)
    atomic.write_json(run / "report.json", report)
    return {"stage": "distill", "model": str(run / "student" / "model"), "sft": result["final"] if result else None, **report}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, TEMPERATURE, OneFile

    p.add_argument("--teacher", required=True, help="teacher model directory, or an OpenAI-compatible base URL "
                   "(API key from $NANOSEEK_TEACHER_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--teacher-model", help="the model to ask a URL teacher for, e.g. deepseek-reasoner (default: the "
                                           "first its /v1/models lists)")
    p.add_argument("--out", required=True, help="run directory (traces.jsonl, kept.jsonl, student/, report.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--student", help="student model directory (with tokenizer files) to fine-tune")
    g.add_argument("--student-preset", help="or a fresh student of this preset, with the local teacher's tokenizer")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tasks", nargs="+", default=["arithmetic", "word", "countdown"],
                     help="task-suite cells to ask the teacher: FAMILY (all its levels) or FAMILY:LEVEL "
                          "(default: all three families)")
    src.add_argument("--data", action=OneFile, help="ask your own problems instead: GSM8K-format JSONL (question, "
                                                    "answer '... #### N' or 'N'); the answer verifies each trace")
    p.add_argument("--eval-data", action=OneFile, help="GSM8K-format JSONL to score teacher and student on (default: "
                                                       "the task suite's held-out split)")
    p.add_argument("--n", type=NONNEGATIVE_INT, default=2000,
                   help="problems to ask the teacher (with --data: the file's first N; 0 = all)")
    p.add_argument("--samples", type=POSITIVE_INT, default=1, help="traces per problem")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=160,
                   help="teacher completion budget per problem (default 160)")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.6,
                   help="teacher sampling temperature (default 0.6, R1's)")
    p.add_argument("--concurrency", type=POSITIVE_INT, default=8, help="parallel requests to a URL teacher")
    p.add_argument("--timeout", type=POSITIVE, default=TIMEOUT,
                   help="seconds a URL teacher has for one whole reply (default 600); a reply that times out twice "
                        "is left out, and a rerun asks it again")
    p.add_argument("--epochs", type=POSITIVE, default=4.0, help="student SFT passes over the kept traces (default 4)")
    p.add_argument("--steps", type=POSITIVE_INT, help="student SFT steps (overrides --epochs)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="student SFT rows per step (default 32)")
    p.add_argument("--seq-len", type=POSITIVE_INT, default=256,
                   help="student SFT tokens per row (default 256, capped by the student's context): raise it for "
                        "long teacher traces, whose ends are otherwise cut")
    p.add_argument("--lr", type=POSITIVE, default=5e-4, help="student SFT peak learning rate (default 5e-4)")
    p.add_argument("--kd-weight", type=NONNEGATIVE, default=0.0, metavar="W",
                   help="logit distillation: adds W × KL(teacher ‖ student) (temperature 1, over the assistant "
                        "tokens, logged as kd_loss) to the student's SFT loss; needs a local teacher with the "
                        "student's tokenizer (0: off)")
    p.add_argument("--eval-n", type=POSITIVE_INT, default=200,
                   help="held-out problems to score teacher and student on (default 200)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the problems, the sampling and the student SFT")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    keys = ("teacher", "teacher_model", "out", "student", "student_preset", "tasks", "data", "eval_data", "n", "samples",
            "max_tokens", "temperature", "concurrency", "timeout", "epochs", "steps", "batch_size", "seq_len", "lr",
            "kd_weight", "eval_n", "seed", "device")
    print(json.dumps(distill(DistillConfig(**{k: getattr(args, k) for k in keys}, progress=not args.no_progress))))
    return 0
