"""Loading a model directory for serving, and the one thread that owns the engine.

`load_runtime(model_dir, ...)` reads the model, its tokenizer and its generation_config.json (sampling defaults and
stop ids) into a `Runtime`. `EngineWorker` is the background thread that drives `Engine.step()` while there is work:
callers hand it `Job`s (submit / cancel are queued and applied by the worker between steps, so no step ever races
them), and each job's `sink` is called, on the worker thread, with `(token_id, finished, finish_reason)` per token or
with an exception. The worker also enforces the thinking budget: after `budget` reasoning tokens, if `</think>` has
not come, it forces `</think>\\n\\n` with `engine.force_next` before the next step, so the model answers; every
budget, 0 and 1 included, is exact (the engine emits one token per request per step).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .reasoning import SectionTracker

log = logging.getLogger("nanoseek.serve")

Sink = Callable[[object], None]  # receives (token_id, finished, finish_reason) tuples or an Exception


@dataclass
class Runtime:
    engine: object  # nanoseek.engine.engine.Engine
    tokenizer: object  # nanoseek.tokenizer.Tokenizer
    model_dir: Path
    max_model_len: int
    defaults: dict  # sampling defaults: temperature, top_p, top_k
    stop_ids: list[int]  # eos ids that end a completion

    @property
    def think_ids(self) -> tuple[int | None, int | None]:
        return self.tokenizer.think_id, self.tokenizer.end_think_id


def read_generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: unreadable, using default sampling settings", path)
        return {}
    return data if isinstance(data, dict) else {}


def sampling_defaults(gen: dict) -> dict:
    """temperature / top_p / top_k a request gets when it does not say (R1 recommends 0.6 / 0.95)."""
    out = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    for key, cast in (("temperature", float), ("top_p", float), ("top_k", int)):
        if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
            out[key] = cast(gen[key])
    return out


def _ids(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def stop_ids(model_dir: Path, cfg, tokenizer) -> list[int]:
    """The tokens that end a completion: generation_config.json's eos ids, config.json's, and the tokenizer's."""
    gen = read_generation_config(model_dir)
    return sorted({*_ids(gen.get("eos_token_id")), *_ids(cfg.eos_token_id),
                   *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})


def load_runtime(model_dir, device: str = "auto", max_model_len: int | None = None,
                 max_batch_size: int = 16, compile: bool | None = None, dtype=None) -> Runtime:
    """Model + tokenizer + defaults from an HF model directory. Raises UserError for bad settings.
    compile None: decode through torch.compile where it applies (the CPU, float32, a C++ compiler on the PATH).
    dtype: `--dtype` (None / "auto": bfloat16 on a GPU, float32 on the CPU)."""
    import torch

    from ..checkpoint import read_config
    from ..cli import UserError
    from ..device import has_cxx, inference_dtype, resolve_device
    from ..engine.cache import LatentCache
    from ..engine.engine import Engine
    from ..tokenizer import Tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "a file, not a model directory" if model_dir.exists() else "no such model directory"
        raise UserError(f"{model_dir}: {what}")
    if max_batch_size < 1:
        raise UserError("--max-batch-size must be at least 1")
    cfg = read_config(model_dir)
    limit = cfg.max_position_embeddings
    if max_model_len is None:
        max_model_len = min(limit, 4096)
    elif not 2 <= max_model_len <= limit:
        raise UserError(f"--max-model-len must be between 2 and the model's max_position_embeddings ({limit})")
    tokenizer = Tokenizer.from_dir(model_dir)
    device = resolve_device(device)
    if compile is None:  # the compiled decode step is float32's (engine/fastpath.py)
        compile = device == "cpu" and has_cxx() and inference_dtype(dtype, device) == torch.float32
    try:
        engine = Engine.from_pretrained(model_dir, device=device, dtype=dtype, max_batch_size=max_batch_size,
                                        max_seq_len=max_model_len, compile=compile)
    except (RuntimeError, MemoryError) as e:  # the KV cache holds max_batch_size rows of max_model_len positions
        if "alloc" not in str(e) and not isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            raise
        per_token = LatentCache.bytes_per_token(cfg, inference_dtype(dtype, device).itemsize, with_mtp=True)
        gib = per_token * max_batch_size * max_model_len / 2**30
        raise UserError(f"no memory for the KV cache of --max-batch-size {max_batch_size} × --max-model-len "
                        f"{max_model_len} ({gib:.3g} GiB): lower either") from None
    if engine.fast is not None and engine.fast.compiling:
        print("nanoseek: compiling the decode step (~50 s on 2 cores the first time, seconds once cached; "
              "--no-compile skips it)...", file=sys.stderr, flush=True)
        engine.warm_up()
    return Runtime(engine, tokenizer, model_dir, max_model_len, sampling_defaults(read_generation_config(model_dir)),
                   stop_ids(model_dir, cfg, tokenizer))


# tokens a thinking budget waits past its end for the reasoning to finish a character (UTF-8: at most 4 bytes)
CHARACTER_GRACE = 3


@dataclass(eq=False)
class Job:
    """One engine request. `sink` is called on the worker thread; it must only hand the item over (quickly)."""

    prompt: list[int]
    params: object  # SamplingParams
    sink: Sink
    budget: int | None = None  # thinking_token_budget
    tracker: SectionTracker | None = None  # reasoning state, for the budget
    force_ids: Sequence[int] = ()  # what the budget forces: </think>\n\n
    rid: int | None = None
    cancelled: bool = False
    forced: bool = field(default=False, repr=False)

    def over_budget(self) -> bool:
        t = self.tracker
        return (self.budget is not None and not self.forced and t is not None and t.in_reasoning
                and t.reasoning_tokens >= self.budget
                and (not t.mid_character or t.reasoning_tokens >= self.budget + CHARACTER_GRACE))


class EngineWorker:
    """The thread that owns the engine: applies queued submits/cancels, steps, and dispatches tokens."""

    def __init__(self, engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: deque[tuple[str, Job]] = deque()
        self._jobs: dict[int, Job] = {}
        self._stopping = False
        self.stats = {"submitted": 0, "finished": 0, "cancelled": 0, "errors": 0}
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)

    # --- called from any thread -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._command("submit", job)

    def cancel(self, job: Job) -> None:
        """Free a job's engine slot: its client went away (counted as cancelled)."""
        self._command("cancel", job)

    def finish(self, job: Job) -> None:
        """Free a job's engine slot: it ended early by a rule of its request, a stop string (counted as finished)."""
        self._command("finish", job)

    def counts(self) -> dict:
        return {"running": self.engine.num_active, "waiting": self.engine.num_waiting + len(self._commands),
                **self.stats}

    def _command(self, kind: str, job: Job) -> None:
        with self._cv:
            self._commands.append((kind, job))
            self._cv.notify()

    # --- the worker thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._commands and not self.engine.has_work() and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for kind, job in commands:
                self._apply(kind, job)
            if self.engine.has_work():
                self._step()
        for rid in list(self._jobs):
            self.engine.cancel(rid)

    def _apply(self, kind: str, job: Job) -> None:
        if kind in ("cancel", "finish"):
            job.cancelled = True
            if job.rid is not None and self._jobs.pop(job.rid, None) is not None:
                self.engine.cancel(job.rid)
                self.stats["cancelled" if kind == "cancel" else "finished"] += 1
            return
        if job.cancelled:
            return
        try:
            job.rid = self.engine.submit(job.prompt, job.params)
        except ValueError as e:
            job.sink(e)
            return
        self._jobs[job.rid] = job
        self.stats["submitted"] += 1
        self._enforce_budget(job)

    def _enforce_budget(self, job: Job) -> None:
        if job.over_budget():
            job.forced = True
            self.engine.force_next(job.rid, job.force_ids)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # a bug or out of memory: fail the requests in flight, keep serving
            log.error("engine step failed:\n%s", traceback.format_exc())
            self.stats["errors"] += 1
            for rid, job in list(self._jobs.items()):
                self.engine.cancel(rid)
                job.sink(RuntimeError(f"generation failed: {e}"))
            self._jobs.clear()
            return
        for rid, tok, finished, reason, logprob in events:
            job = self._jobs.get(rid)
            if job is None:
                continue
            if finished:
                del self._jobs[rid]
                self.stats["finished"] += 1
            elif job.tracker is not None:
                job.tracker.feed(tok)
                self._enforce_budget(job)
            job.sink((tok, finished, reason, logprob))
