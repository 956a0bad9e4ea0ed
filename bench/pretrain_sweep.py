"""One point of the CPU pretraining sweep: how fast does a model shape / batch / LR learn level-1 arithmetic?

    python bench/pretrain_sweep.py [--steps 1200] [--batch 16] [--lr 3e-3] [--set hidden_size=96 ...]
                                   [--no-document-mask] [--threads 1] [--eval-every 400]

A bare loop (AdamW, warmup + cosine, clipping, NTP + 0.3·MTP, document-masked packed rows) on level-1 arithmetic
of the task suite only, printing the loss and, every --eval-every steps, greedy pass@1 on 100 held-out level-1
problems with the breakdown per operator. The sweep behind cpu-tiny's shape and batch (bench/results/pretrain_cpu.md)
ran two of these at a time with one thread each, so wall-clock columns compare runs within that setting only.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.cli import POSITIVE_INT
from nanoseek.data.tasks import mixture, to_text
from nanoseek.eval.evaluate import run_eval
from nanoseek.model.mtp import mtp_loss
from nanoseek.tokenizer import task_suite_texts, train_tokenizer
from nanoseek.train.loop import lr_at, make_optimizer
from nanoseek.train.pretrain import parse_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="cpu-tiny config override")
    ap.add_argument("--no-document-mask", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=POSITIVE_INT, default=400)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = train_tokenizer(task_suite_texts(10000, 0), vocab_size=512)
    problems = mixture(20000, seed=1, split="train", families=["arithmetic"], levels=[1])
    random.Random(0).shuffle(problems)
    stream = torch.tensor([t for p in problems for t in tok.encode(to_text(p), add_bos=True) + [tok.eos_id]])
    cfg = nanoseek.get_preset("cpu-tiny").replace(vocab_size=-(-tok.vocab_size // 64) * 64, bos_token_id=tok.bos_id,
                                                  eos_token_id=tok.eos_id, **parse_overrides(args.set, "cpu-tiny"))
    model = nanoseek.build_model(cfg)
    opt = make_optimizer(model, args.lr, weight_decay=0.1)
    held_out = mixture(100, seed=0, split="eval", families=["arithmetic"], levels=[1])
    T, n_chunks = args.seq_len, (len(stream) - 1) // args.seq_len
    g = torch.Generator().manual_seed(0)
    order, pos, t0 = torch.randperm(n_chunks, generator=g), 0, time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=30)
        if pos + args.batch > n_chunks:
            order, pos = torch.randperm(n_chunks, generator=g), 0
        rows = torch.stack([stream[i * T : i * T + T + 1] for i in order[pos : pos + args.batch].tolist()])
        pos += args.batch
        x, y = rows[:, :-1], rows[:, 1:]
        segments = None if args.no_document_mask else (x == tok.bos_id).cumsum(1)
        logits, mtp = model(x, return_mtp=True, segments=segments)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        (loss + 0.3 * mtp_loss(mtp, y) + model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_routing_bias(0.001)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} wall {time.perf_counter() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0:
            model.eval()
            results = run_eval(nanoseek.Engine(model), tok, held_out, max_new_tokens=160, style="plain", progress=False)
            model.train()
            by_op: dict[str, list[bool]] = {}
            for r in results:
                op = next(o for o in (" + ", " - ", " × ", " ÷ ") if o in r.problem.meta["expression"]).strip()
                by_op.setdefault(op, []).append(r.correct[0])
            print(json.dumps({"step": step + 1, "wall_s": round(time.perf_counter() - t0),
                              "pass@1": sum(r.correct[0] for r in results) / len(results),
                              "by_op": {k: f"{sum(v)}/{len(v)}" for k, v in by_op.items()}}), flush=True)


if __name__ == "__main__":
    main()
