"""`nanoseek pretrain`: next-token + multi-token-prediction pretraining of a DeepSeek-V3-architecture model.

Loss per step (DeepSeek-V3 §2–3):
    L = CE(main) + λ·mean_k CE(MTP depth k) + α·(sequence-wise balance loss, summed over MoE layers)
then, after the optimiser step, every MoE layer's routing bias moves by γ·sign(mean load − load) with the loads
summed over all micro-batches and ranks (aux-loss-free balancing). AdamW (β 0.9/0.95, weight decay 0.1 on
matrices) or Muon on the layers' matrices (`--optimizer`; the CPU presets' default, muon.py), linear warmup then
cosine, WSD or constant, gradient clipping at 1.0, gradient accumulation, bf16 autocast on GPU.
Rows pack several documents; each attends only within itself, with positions restarting at its BOS (as Llama 3
trains), so a document is seen exactly as it is at inference, alone (--no-document-mask turns this off).

With no --data the run trains on the verifiable task suite (nothing to download). Under
`torchrun --nproc_per_node=N` the same command trains data-parallel (DDP): the global batch is split over ranks, so
a run's losses do not depend on N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model, read_config
from ..config import ModelConfig, get_preset
from ..device import check_fits
from ..model import build_model, param_counts
from . import loop, runlock
from .distributed import Dist, init_distributed

# Training defaults per preset (flags override). cpu-tiny: 6-7 minutes on 2 cores; small batches, many steps (at
# equal tokens, batch 16 learned the arithmetic faster than 32 in our sweeps; see bench/results/pretrain_cpu.md).
TRAIN_PRESETS = {
    "cpu-tiny": dict(steps=2000, batch_size=16, micro_batch_size=16, seq_len=128, lr=6e-3, warmup=50, n_docs=60000,
                     optimizer="muon"),
    "small": dict(steps=3000, batch_size=64, micro_batch_size=16, seq_len=1024, lr=1.5e-3, warmup=100, n_docs=400000),
    "v2-lite": dict(steps=1000, batch_size=32, micro_batch_size=1, seq_len=4096, lr=4.2e-4, warmup=100, n_docs=100000),
    "v3-671b": dict(steps=1000, batch_size=32, micro_batch_size=1, seq_len=4096, lr=2.2e-4, warmup=100, n_docs=100000),
}
TRAIN_PRESETS["cpu-student"] = dict(TRAIN_PRESETS["cpu-tiny"])  # the speedrun's dense student trains on the same recipe


@dataclass
class PretrainConfig(loop.TrainConfig):
    preset: str = "cpu-tiny"
    aux_alpha: float | None = None  # α; None keeps the preset's aux_loss_alpha
    data: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    vocab_size: int | None = None
    n_docs: int = 40000
    overrides: dict = field(default_factory=dict)  # ModelConfig fields changed from the preset's (--set KEY=VALUE)
    fp8: bool = False  # FP8 GEMMs (DeepSeek-V3's tile/block recipe, model/fp8.py); master weights stay float32


def per_preset(key: str) -> str:
    return f"(default per preset; cpu-tiny {TRAIN_PRESETS['cpu-tiny'][key]})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, bounded
    from ..tokenizer import MIN_VOCAB

    p.add_argument("--preset", default="cpu-tiny",
                   help="model size: cpu-tiny, cpu-student, small, v2-lite, v3-671b (default cpu-tiny)")
    p.add_argument("--out", required=True, help="run directory (model/, train_state/, metrics.jsonl)")
    p.add_argument("--steps", type=POSITIVE_INT, help=f"optimiser steps {per_preset('steps')}")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="FILE",
                   help="JSONL/Parquet files with {'text'} or {'messages'} (repeatable); or the token shards of an "
                        "earlier run (its RUN/data folder), to train on them and their tokenizer without tokenizing "
                        "again (read in place: keep them while this run may resume); default: the task suite")
    p.add_argument("--batch-size", type=POSITIVE_INT, help=f"global sequences per step {per_preset('batch_size')}")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT,
                   help="sequences per forward per process (gradient accumulation fills the rest) "
                        f"{per_preset('micro_batch_size')}")
    p.add_argument("--seq-len", type=bounded(int, 2), help=f"tokens per packed row {per_preset('seq_len')}")
    p.add_argument("--lr", type=POSITIVE, help=f"peak learning rate {per_preset('lr')}")
    p.add_argument("--warmup", type=NONNEGATIVE_INT, help=f"warmup steps {per_preset('warmup')}")
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine",
                   help="after warmup: cosine to 10%% of the peak, WSD (flat, then a linear decay over the last 20%%), or constant")
    p.add_argument("--optimizer", choices=["adamw", "muon"],
                   help="adamw, or muon: Muon on the layers' matrices and AdamW on the embedding, head, norms and "
                        "biases, at the same learning rate (default per preset)")
    p.add_argument("--mtp-weight", type=NONNEGATIVE, default=0.3,
                   help="λ, weight of the MTP loss (0 turns MTP training off)")
    p.add_argument("--no-document-mask", action="store_true",
                   help="let packed documents attend across their boundaries (default: each attends only within itself)")
    p.add_argument("--bias-gamma", type=NONNEGATIVE, default=0.001, help="γ, aux-loss-free routing bias step (0: off)")
    p.add_argument("--aux-alpha", type=NONNEGATIVE,
                   help="α, sequence-wise balance loss weight (default: the preset's 1e-4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one model-config field of the preset, e.g. --set num_hidden_layers=6 (repeatable; "
                        "VALUE is JSON: numbers, true/false, null; True/False/None too)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json to use instead of training one")
    p.add_argument("--vocab-size", type=bounded(int, MIN_VOCAB),
                   help="vocabulary of the tokenizer trained for this run (default: the preset's; cpu-tiny "
                        f"{get_preset('cpu-tiny').vocab_size})")
    p.add_argument("--n-docs", type=POSITIVE_INT, help="task-suite problems to generate when no --data is given "
                   f"(each a text document; every fourth also a chat document) {per_preset('n_docs')}")
    p.add_argument("--fp8", action="store_true",
                   help="train with FP8 GEMMs (1x128 activation tiles, 128x128 weight blocks; exact emulation on CPU); "
                        "checkpoints keep float32 master weights: `nanoseek convert RUN/model OUT --fp8` writes "
                        "DeepSeek's FP8 format")
    loop.add_run_arguments(p, "seed of the data, the initialisation and the batch order", save_every=100)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    from ..cli import UserError

    if args.preset not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    d = dict(TRAIN_PRESETS[args.preset])
    for key in ("steps", "batch_size", "micro_batch_size", "seq_len", "lr", "warmup", "n_docs", "optimizer"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    d["micro_batch_size"] = loop.micro_batch_default(d["batch_size"], d["micro_batch_size"],
                                                     args.micro_batch_size is not None)
    overrides = parse_overrides(args.set, args.preset)
    if args.tokenizer and args.vocab_size:
        raise UserError("--vocab-size sizes a tokenizer trained for this run; --tokenizer brings its own vocabulary")
    if overrides.get("max_position_embeddings", d["seq_len"]) < d["seq_len"]:
        raise UserError(f"--set max_position_embeddings={overrides['max_position_embeddings']} is shorter than a "
                        f"training row (--seq-len {d['seq_len']})")
    return PretrainConfig(
        out=args.out, preset=args.preset, data=args.data, resume=args.resume, save_every=args.save_every,
        seed=args.seed, stop_at=args.stop_at, schedule=args.schedule, mtp_weight=args.mtp_weight,
        document_mask=not args.no_document_mask, bias_gamma=args.bias_gamma,
        aux_alpha=args.aux_alpha, overrides=overrides, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        device=args.device, fp8=args.fp8, price_per_hour=args.price_per_hour, progress=not args.no_progress, **d,
    )


PYTHON_SPELLINGS = {"True": "true", "False": "false", "None": "null"}  # --set attention_bias=False means false
FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")


def parse_overrides(items: list[str], preset: str) -> dict:
    """--set KEY=VALUE items -> {field: value} (VALUE as JSON, else a bare string), checked against the preset."""
    from ..cli import UserError

    overrides = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or key not in ModelConfig.__dataclass_fields__:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY a model-config field (e.g. hidden_size=256)")
        if key in FROM_TOKENIZER:
            raise UserError(f"--set {key}: the run sets it itself (the vocabulary and special ids from its tokenizer, "
                            "float32 master weights)")
        value = PYTHON_SPELLINGS.get(value, value)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string, e.g. --set scoring_func=softmax
    try:
        get_preset(preset).replace(**overrides).check_portable()
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError; "abc" > 0 is a TypeError
        raise UserError(f"--set: {e}") from None
    return overrides


def run(args: argparse.Namespace) -> int:
    result = pretrain(config_from_args(args))
    if result is not None:
        print(json.dumps(result))
    return 0


# --- data --------------------------------------------------------------------------------------------------------
def task_suite_corpus(n_docs: int, seed: int, tok) -> list[str]:
    """Pretraining documents from the task suite's train split: 15% spread over every family and level, 85% the
    basic arithmetic everything else builds on (level 1 : level 2 = 70 : 15); every problem as plain text (question,
    worked steps, answer), and every fourth also in the chat format, so the base model has seen `<think>` turns.
    Level-1 questions may repeat: its few hundred division facts would otherwise run out of distinct phrasings and
    fall to 7% of the level-1 documents, against a quarter of the evaluation (bench/results/pretrain_cpu.md)."""
    import random

    from ..data.corpus import render_messages
    from ..data.tasks import mixture, to_chat, to_text

    n_all = n_l2 = n_docs * 15 // 100
    problems = mixture(n_all, seed=seed, split="train")
    problems += mixture(n_l2, seed=seed + 1, split="train", families=["arithmetic"], levels=[2])
    problems += mixture(n_docs - n_all - n_l2, seed=seed + 2, split="train", families=["arithmetic"], levels=[1],
                        distinct=False)
    random.Random(seed).shuffle(problems)
    docs = []
    for i, p in enumerate(problems):
        docs.append(to_text(p))
        if i % 4 == 0:
            docs.append(render_messages(to_chat(p)["messages"], tok))
    return docs


def read_user_texts(paths: list[str], tok=None) -> Iterator[str]:
    """The --data files' texts, one record at a time (a corpus of GBs is never held in memory); a bad record is a
    UserError that names its line."""
    from ..cli import UserError
    from ..data.corpus import read_texts

    try:
        yield from read_texts(paths, tokenizer=tok)
    except ValueError as e:  # a bad JSON line, an unknown suffix, no pyarrow for Parquet
        raise UserError(str(e)) from None


def shard_source(cfg: PretrainConfig) -> Path | None:
    """The token-shard folder of an earlier run that --data names (used as it is), or None for data files."""
    from ..cli import UserError
    from ..data.corpus import damaged_shards, read_meta

    folders = [Path(p) for p in cfg.data if Path(p).is_dir()]
    if not folders:
        return None
    source, meta = folders[0], read_meta(folders[0])
    if meta is None:
        raise UserError(f"--data {source} is a folder but not token shards (an earlier run's RUN/data); give the "
                        f"data files in it (e.g. {source}/*.jsonl)")
    if len(cfg.data) > 1:
        raise UserError(f"--data {source} (token shards) is a whole corpus: it cannot be mixed with other --data")
    if cfg.tokenizer or cfg.vocab_size:
        raise UserError(f"--data {source} brings the tokenizer that made its shards: drop --tokenizer/--vocab-size")
    if not (source / "tokenizer.json").is_file():
        raise UserError(f"--data {source}: the shards hold no tokenizer (made by an earlier nanoseek); rebuild them")
    if damaged := damaged_shards(source, meta):
        raise UserError(f"--data {source}: shard files missing or cut short ({', '.join(damaged[:3])})")
    return source


def prepare_tokenizer_and_data(cfg: PretrainConfig, run: Path, d: Dist, resuming: bool):
    """Rank 0 trains/copies the tokenizer and builds token shards under RUN/ (or takes both from the shard folder
    --data names); the others wait, then read them. A
    resumed run keeps its tokenizer and its shards, whatever the --data files hold now: a deleted RUN/tokenizer comes
    back from RUN/model, and shards deleted or cut short are rebuilt from --data and refused (by `loop.fit`) if they
    are not the ones the run trained on. A fresh run makes its own (a failed earlier attempt may have left some made
    with other settings)."""
    from ..cli import UserError
    from ..data.corpus import build_shards, cache_complete, check_paths, read_once
    from ..tokenizer import Tokenizer, task_suite_texts, train_tokenizer

    source = shard_source(cfg)
    if cfg.data and not source:
        try:
            check_paths(cfg.data)  # a typo in the last of several files, said before reading the others
        except ValueError as e:
            raise UserError(str(e)) from None
    tok_dir, shard_dir = run / "tokenizer", source or run / "data"
    if d.is_main and not (resuming and (tok_dir / "tokenizer.json").is_file()):
        if resuming and (run / "model" / "tokenizer.json").is_file():  # the one the run trained with, not a new one
            tok = Tokenizer.from_dir(run / "model")
        elif source:
            tok = Tokenizer.from_dir(source)
        elif cfg.tokenizer:
            tok = Tokenizer.from_dir(cfg.tokenizer)
            if tok.bos_id is None or tok.eos_id is None:
                raise UserError(f"--tokenizer {cfg.tokenizer}: no begin/end-of-sentence token (documents are packed "
                                "between them; set bos_token and eos_token in its tokenizer_config.json)")
        else:
            once = read_once(cfg.data)  # a named pipe: its second read would wait for ever
            if once:
                raise UserError(f"--data {once[0]} can be read only once (a pipe?), and pretraining reads it twice: "
                                "to train the tokenizer, then to tokenize; write it to a file, or pass --tokenizer")
            texts = read_user_texts(cfg.data) if cfg.data else task_suite_texts(min(cfg.n_docs, 10000), cfg.seed)
            tok = train_tokenizer(texts, vocab_size=cfg.vocab_size or get_preset(cfg.preset).vocab_size,
                                  show_progress=cfg.progress and bool(cfg.data))  # a user's corpus may take minutes
        tmp = run / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tmp, tok_dir)
    d.wait_for_main()  # no time limit: training a tokenizer on a user's corpus may take a long while
    tok = Tokenizer.from_dir(tok_dir)
    if d.is_main and not source and not (resuming and cache_complete(shard_dir)):  # (rebuilt ones must match: fit checks)
        texts = read_user_texts(cfg.data, tok) if cfg.data else task_suite_corpus(cfg.n_docs, cfg.seed, tok)
        build_shards(texts, tok, shard_dir, progress=cfg.progress)
    d.wait_for_main()  # tokenizing a multi-GB corpus takes rank 0 hours
    return tok, shard_dir


# --- the run -----------------------------------------------------------------------------------------------------
def model_config(cfg: PretrainConfig, tok) -> ModelConfig:
    mc = get_preset(cfg.preset).replace(**cfg.overrides)
    vocab = -(-tok.vocab_size // 64) * 64  # round up: tidy matmul shapes; unused rows never get a token
    changes = dict(vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                   max_position_embeddings=max(mc.max_position_embeddings, cfg.seq_len), torch_dtype="float32")
    if cfg.aux_alpha is not None:
        changes["aux_loss_alpha"] = cfg.aux_alpha
    return mc.replace(**changes)


@runlock.releasing
def pretrain(cfg: PretrainConfig) -> dict | None:
    from ..cli import UserError
    from ..data.corpus import PackedLoader

    d = init_distributed(cfg.device)
    cfg, resuming = loop.restore_config(loop.absolute_paths(cfg, "data", "tokenizer"))
    cfg = loop.resumed_micro_batch(cfg, resuming)
    loop.grad_accum_steps(cfg, d)  # validate the batch split before any work
    run = Path(cfg.out)
    # before any work, a 671B preset is refused, not swapped to death (sizes as the preset's, its vocabulary too)
    mc = read_config(run / "model") if resuming else get_preset(cfg.preset).replace(**cfg.overrides)
    params = sum(p.numel() for p in build_model(mc, device="meta").parameters())
    check_fits(params * 16, str(d.device), "float32 weights, gradients and optimiser state",
               "choose a smaller --preset, or --set smaller sizes")
    if d.is_main:
        loop.make_run_dir(run)
    d.barrier()
    torch.manual_seed(cfg.seed)
    tok, shard_dir = prepare_tokenizer_and_data(cfg, run, d, resuming)
    model = load_model(run / "model", device=d.device) if resuming else build_model(model_config(cfg, tok), device=d.device)
    if cfg.fp8:
        from ..model.fp8 import convert_to_fp8

        convert_to_fp8(model)  # swaps the GEMMs only: parameter names, checkpoints and resume are unchanged
    try:
        loader = PackedLoader(shard_dir, batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                              rank=d.rank, world_size=d.world_size, step_chunks=cfg.batch_size)
    except ValueError as e:  # too little data for one batch
        raise UserError(f"{e}: give more --data (or --n-docs), or a smaller --batch-size or --seq-len") from None
    extra_files = [run / "tokenizer" / f for f in ("tokenizer.json", "tokenizer_config.json")]
    result = loop.fit(cfg, model, loader, d, resuming, "pretrain", extra_files)
    if result is not None:
        result["params"] = param_counts(model)
    return result
