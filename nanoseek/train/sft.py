"""`nanoseek sft`: supervised fine-tuning on chat data, e.g. R1's cold start (`<think>\\n…\\n</think>\\n\\nanswer`).

Each conversation is rendered with the model directory's own chat template; the loss covers only the assistant
turns (their content and the end-of-sentence token that closes them), never the prompt. With no --data, the
training split of the task suite is rendered in R1's reasoning format. Rank 0 tokenizes the conversations once into
RUN/chat_tokens (memory-mapped, 3 bytes a token; `data/chat_tokens.py`), which the other ranks and a resumed run
read. Same run directory, resume, metrics and
multi-process behaviour as pretraining (shared `loop.fit`): the loss is the mean over all supervised tokens of a step,
however it is split over micro-batches and processes. Each process pads its rows to its own longest; the padding
counts in no router load (which moves the aux-loss-free bias) and no balance loss, so runs split differently stay
together (tests/test_torchrun.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..data.chat_tokens import ChatTokens
from . import loop, runlock
from .distributed import Dist, init_distributed

IGNORE = -100


@dataclass
class SFTConfig(loop.TrainConfig):
    model: str = ""
    data: list[str] = field(default_factory=list)
    n_samples: int = 4000  # task-suite conversations when no --data is given
    steps: int = 300
    epochs: float = 0.0  # > 0: that many passes over the data instead of `steps` (counted in packed rows)
    lr: float = 1e-3
    warmup: int = 10
    seq_len: int = 256  # tokens per row (packed with whole conversations); a longer conversation is truncated
    mtp_weight: float = 0.1  # keeps the MTP draft in step with the model (V3 used 0.1 late in training)


class ChatLoader:
    """Batches of tokenised conversations, in a seeded order per epoch; resumable (state_dict() is the epoch and the
    position of the next conversation in that order). Rank r takes rows r, r + world, ... of each global batch.

    pack=False: one conversation per row, padded to the longest in the batch. pack=True: each row of seq_len tokens
    takes whole conversations while they fit (only the row's tail is padding). The task suite's chats average 139
    tokens, so padded to the longest of 32 about half of every batch was padding. Every conversation starts with BOS,
    so the trainer's document mask (segments counted from BOS) keeps packed conversations from seeing each other, and
    RoPE scores only relative positions: a packed conversation computes what it would alone (tested). A
    conversation longer than a row is truncated."""

    def __init__(self, samples: Sequence[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, pack: bool = False):
        self.samples, self.batch_size, self.seq_len, self.pad_id = samples, batch_size, seq_len + 1, pad_id
        self.seed, self.rank, self.world, self.pack = seed, rank, world_size, pack
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[int]] | None = None
        self._fingerprint: str | None = None

    def _order(self) -> list[int]:
        if self._cached is None or self._cached[0] != self.epoch:
            order = list(range(len(self.samples)))
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
            self._cached = (self.epoch, order)
        return self._cached[1]

    def _next_row(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        while True:
            if self.position >= len(self.samples):
                self.epoch, self.position = self.epoch + 1, 0
            x, m = self.samples[self._order()[self.position]]
            if ids and (not self.pack or len(ids) + len(x) > self.seq_len):
                return ids, mask
            self.position += 1
            ids += x[: self.seq_len]
            mask += m[: self.seq_len]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> inputs (B, T), labels (B, T) = next token on assistant positions, else -100, and real (B, T) bool,
        False on padding."""
        rows = [self._next_row() for _ in range(self.batch_size * self.world)][self.rank :: self.world]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for row, (x, m) in enumerate(rows):
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
        # an input is real if a token follows it: a row's last token (its eos) is an input only in rows shorter than
        # the longest, so counting it made the router's loads depend on how a step is split into micro-batches
        real = torch.arange(T - 1)[None, :] < torch.tensor([len(x) - 1 for x, _ in rows])[:, None]
        return ids[:, :-1], labels, real

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """ValueError if the state is for other conversations (a --data file edited since the run started)."""
        if state.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError(f"loader state is for conversations {state['fingerprint'][:12]}…, these are "
                             f"{self.fingerprint()[:12]}…")
        self.epoch, self.position = state["epoch"], state["position"]

    def fingerprint(self) -> str:
        """sha256 of the tokenized conversations and their loss masks, in order."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for ids, mask in self.samples:
                h.update(len(ids).to_bytes(4, "little") + array("i", ids).tobytes() + bytes(mask))
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def rows_per_epoch(samples, seq_len: int, pack: bool) -> int:
    """Rows that one pass over `samples` fills (epoch 0's order; packing depends on the order only a little)."""
    loader, rows = ChatLoader(samples, 1, seq_len, 0, pack=pack), 0
    while loader.epoch == 0 and loader.position < len(samples):
        loader._next_row()
        rows += 1
    return rows


def default_conversations(n: int, seed: int) -> list[dict]:
    from ..data.tasks import mixture, to_chat

    return [to_chat(p) for p in mixture(n, seed=seed, split="train")]


def read_conversations(paths: list[str]) -> Iterator[list[dict]]:
    """The messages of every record of the --data files, one record at a time; a bad record is a UserError that
    names its line. A multi-turn chat gives one sample per assistant turn, ending with it: the chat template trains
    only the turns after the last user turn, since earlier ones are rendered without their reasoning (not as the
    model generated them)."""
    from ..cli import UserError
    from ..data.corpus import chat_messages, inline_reasoning, read_records

    cut_off = 0  # samples whose assistant turn opens <think> and never closes it
    try:
        for path in paths:
            for where, rec in read_records(path, columns=("messages",)):
                if not isinstance(rec.get("messages"), list) or not rec["messages"]:
                    raise UserError(f"{where}: the record has no 'messages' list (expected the OpenAI chat shape)")
                try:
                    messages = chat_messages(rec["messages"])
                except ValueError as e:
                    raise UserError(f"{where}: {e}") from None
                for sample in turns(inline_reasoning(messages)):
                    if cut_off_mid_thought(sample[-1]):
                        cut_off += 1
                    else:
                        yield sample
    except ValueError as e:
        raise UserError(str(e)) from None
    if cut_off:
        loop.notice(f"sft: {cut_off} assistant turns open <think> and never close it (replies cut off at their token "
                    "limit?) and are left out: a model trained on them would stop while thinking")


def cut_off_mid_thought(message: dict) -> bool:
    """An assistant turn that opens <think> and never closes it: a reply cut off at its token limit."""
    content = message["content"]
    return message["role"] == "assistant" and content.lstrip().startswith("<think>") and "</think>" not in content


def turns(messages: list[dict]) -> Iterator[list[dict]]:
    """[u1, a1, u2, a2] -> [u1, a1], [u1, a1, u2, a2]: the chat up to each assistant turn that a user turn follows,
    then the whole chat."""
    for i, m in enumerate(messages[:-1]):
        if m["role"] == "assistant" and messages[i + 1]["role"] == "user":
            yield messages[: i + 1]
    yield messages


def tokenized_conversations(cfg: SFTConfig, tok, run: Path, d: Dist) -> ChatTokens:
    """The training conversations, tokenized into RUN/chat_tokens by rank 0 (reused while the tokenizer and the
    --data files are unchanged, e.g. on --resume); the other ranks wait, then map the same files."""
    from ..cli import UserError
    from ..data import chat_tokens
    from ..data.corpus import check_paths, read_once

    out, tokens = run / "chat_tokens", None
    if d.is_main:
        if cfg.data:
            try:
                check_paths(cfg.data)  # a missing file, a folder or an unknown format: said before reading any
            except ValueError as e:
                raise UserError(str(e)) from None
            convs = read_conversations(cfg.data)
            if read_once(cfg.data):  # a named pipe (mkfifo chats.jsonl): tokenized, never reused
                key = f"stream-{uuid.uuid4().hex}"
            else:
                key = chat_tokens.cache_key(tok, chat_tokens.file_bytes(cfg.data))
        else:  # other problems than pretraining's
            convs = [c["messages"] for c in default_conversations(cfg.n_samples, cfg.seed + 1)]
            key = chat_tokens.cache_key(tok, (json.dumps(m).encode() for m in convs))
        tokens = chat_tokens.build(convs, tok, out, key, progress=cfg.progress)
    d.wait_for_main()  # no time limit: a user's large --data may take rank 0 a long while
    if not d.is_main:
        tokens = chat_tokens.load(out)
    if tokens is None:  # rank 0 built it: this process does not see the same run directory
        raise UserError(f"{out}: rank {d.rank} cannot read the conversations rank 0 tokenized; under torchrun on "
                        "several machines, --out must be on a filesystem they share")
    if not len(tokens):
        raise UserError("no conversations in " + ", ".join(cfg.data))
    return tokens


@runlock.releasing
def sft(cfg: SFTConfig, teacher=None, kd_weight: float = 0.0) -> dict | None:
    """Fine-tune; with a `teacher` model sharing the vocabulary, add kd_weight · KL(teacher ‖ student)."""
    from ..cli import UserError
    from ..tokenizer import Tokenizer

    d = init_distributed(cfg.device)
    cfg, resuming = loop.restore_config(loop.absolute_paths(cfg, "model", "data"))
    cfg = loop.resumed_micro_batch(cfg, resuming)
    loop.grad_accum_steps(cfg, d)
    run = Path(cfg.out)
    if d.is_main:
        loop.make_run_dir(run)
    d.barrier()
    torch.manual_seed(cfg.seed)
    source = run / "model" if resuming else Path(cfg.model)
    tok = Tokenizer.from_dir(source)  # SFT renders chats with the model directory's own tokenizer
    model = load_model(source, device=d.device)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the model's context "
                        f"({model.config.max_position_embeddings} tokens)")
    convs = tokenized_conversations(cfg, tok, run, d)
    samples = convs.subset(convs.answers_at() >= 0)  # nothing to learn from prompt-only records
    if not len(samples):
        raise UserError("no conversation has an assistant turn to learn from")
    if len(samples) < len(convs):
        loop.notice(f"sft: {len(convs) - len(samples)} of {len(convs)} training samples have no assistant turn and are "
                    "left out (a chat gives one sample per assistant turn)")
    fits = samples.answers_at() < cfg.seq_len  # a row keeps seq_len + 1 tokens
    if not fits.all():
        if not fits.any():
            raise UserError(f"every conversation's answer starts past --seq-len {cfg.seq_len}; raise --seq-len")
        loop.notice(f"sft: {int((~fits).sum())} of {len(samples)} conversations answer only past --seq-len "
                    f"{cfg.seq_len} and are left out")
        samples = samples.subset(fits)
    cut = int((samples.lengths() > cfg.seq_len + 1).sum())  # a row keeps seq_len + 1 tokens
    if cut:
        loop.notice(f"sft: {cut} of {len(samples)} conversations are longer than --seq-len {cfg.seq_len}: their ends "
                    "(with the end-of-turn token) are not trained; raise --seq-len to keep them whole")
    bos = model.config.bos_token_id
    pack = cfg.document_mask and bos is not None and bool((samples.first_tokens() == bos).all())
    if cfg.epochs > 0:  # the same data gives the same count, so a resumed run agrees with the saved one
        cfg.steps = max(1, math.ceil(cfg.epochs * rows_per_epoch(samples, cfg.seq_len, pack) / cfg.batch_size))
    loader = ChatLoader(samples, cfg.micro_batch_size, cfg.seq_len, tok.pad_id if tok.pad_id is not None else tok.eos_id,
                        cfg.seed, d.rank, d.world_size, pack=pack)
    extra = [source / f for f in ("tokenizer.json", "tokenizer_config.json")]
    if resuming:  # the checkpoint switch replaces RUN/model; keep the tokenizer files from a stable place
        extra = [run / "tokenizer" / f.name for f in extra]
    elif d.is_main:
        (run / "tokenizer").mkdir(exist_ok=True)
        for f in extra:
            (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
        extra = [run / "tokenizer" / f.name for f in extra]
    return loop.fit(cfg, model, loader, d, resuming, "sft", extra, teacher=teacher, kd_weight=kd_weight)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, bounded

    p.add_argument("--model", default="",
                   help="starting model directory (e.g. RUN/model of a pretraining run); "
                        "--resume of a run uses its own")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="FILE",
                   help="chat JSONL/Parquet ({'messages': [...]}; repeated --data add up); default: task suite in "
                        "R1 format")
    p.add_argument("--n-samples", type=POSITIVE_INT, default=4000,
                   help="task-suite conversations when no --data (default 4000)")
    p.add_argument("--steps", type=POSITIVE_INT, default=300, help="optimiser steps (default 300)")
    p.add_argument("--epochs", type=NONNEGATIVE, default=0.0,
                   help="train this many passes over the data instead of --steps (0: use --steps)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32,
                   help="global rows per step; each row packs whole conversations up to --seq-len tokens")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT,
                   help="rows per forward per process (default: the batch split over the processes, at most 32)")
    p.add_argument("--seq-len", type=bounded(int, 2), default=256,
                   help="tokens per row; a longer conversation is truncated")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="peak learning rate, cosine after warmup (default 1e-3)")
    p.add_argument("--warmup", type=NONNEGATIVE_INT, default=10, help="warmup steps (default 10)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="adamw, or muon on the layers' matrices with AdamW on the rest (see `pretrain --help`)")
    p.add_argument("--mtp-weight", type=NONNEGATIVE, default=0.1,
                   help="λ, weight of the MTP loss (0: off; default 0.1)")
    p.add_argument("--bias-gamma", type=NONNEGATIVE, default=0.001, help="γ, aux-loss-free routing bias step (0: off)")
    loop.add_run_arguments(p, "seed of the default data and the batch order", save_every=100)


def run(args: argparse.Namespace) -> int:
    keys = ("model", "out", "data", "n_samples", "steps", "epochs", "batch_size", "micro_batch_size", "seq_len", "lr",
            "warmup", "optimizer", "mtp_weight", "bias_gamma", "seed", "save_every", "stop_at", "resume", "device",
            "price_per_hour")
    cfg = SFTConfig(**{k: getattr(args, k) for k in keys}, progress=not args.no_progress)
    cfg.micro_batch_size = loop.micro_batch_default(cfg.batch_size, args.micro_batch_size or 32,
                                                    args.micro_batch_size is not None)
    result = sft(cfg)
    if result is not None:
        print(json.dumps(result))
    return 0
