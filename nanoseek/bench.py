"""`nanoseek bench`: how fast is nanoseek on this machine, for this model?

    nanoseek bench (--model DIR | --preset NAME) [--batch-sizes 1,8,32] [--prompt-len 128] [--new-tokens 128] ...

Greedy decoding of random prompt ids, per batch size: prefill tokens/s (batch · prompt / time to the first token)
and decode tokens/s without the prefill (batch / time per step, a step being (time for N tokens − time for 1) /
(N − 1)). With MTP layers, also MTP-speculative decoding (the engine's draft-and-verify: the same tokens) at the
smallest and largest batch, with its draft acceptance rate. Then one training step as `nanoseek pretrain` takes it
(next-token + λ·MTP + balance loss, backward, clipping, optimiser step, routing-bias update): tokens/s, MFU against
the device's peak (train/metrics.py's datasheet table on GPUs, a measured matmul on the CPU) and dollars per million
tokens. Every time is the best of --repeats after a warm-up, synchronised on CUDA. Prints tables, then one JSON line
with every number and the machine. The side-by-side comparisons with transformers behind our performance claims are
the scripts in bench/; this verb measures nanoseek alone, on the user's machine and model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def out_of_memory(e: BaseException) -> bool:
    """A GPU's OutOfMemoryError, or the CPU allocator's plain RuntimeError ("can't allocate memory")."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "allocate memory" in str(e)


# --- timing helpers (bench/decode.py uses them too) -------------------------------------------------------------
def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def best_times(fns: dict, N: int, repeats: int, device) -> dict:
    """fns: name -> f(n_new_tokens) -> tokens. Returns name -> [best time for N tokens, best time for 1 token (s),
    tokens of the last N-token call], after a 2-token and a 1-token warm-up call each; the fns alternate within every
    repeat, so a drifting machine affects them alike."""
    best = {k: [float("inf"), float("inf"), None] for k in fns}
    for k, f in fns.items():
        f(2), f(1)  # warm-up of both lengths timed below
    for _ in range(repeats):
        for k, f in fns.items():
            for slot, n in ((0, N), (1, 1)):
                sync(device)
                t = time.perf_counter()
                out = f(n)
                sync(device)
                best[k][slot] = min(best[k][slot], time.perf_counter() - t)
                if slot == 0:
                    best[k][2] = out
    return best


# --- the command ---------------------------------------------------------------------------------------------------
def batch_sizes(text: str) -> list[int]:
    """argparse type: '1,8,32' -> [1, 8, 32] (sorted, without repeats)."""
    try:
        sizes = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected batch sizes like 1,8,32") from None
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be at least 1")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import NONNEGATIVE, POSITIVE_INT, bounded
    from .device import add_dtype_argument
    from .train.pretrain import TRAIN_PRESETS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (ours or any deepseek_v3 Hugging Face directory)")
    src.add_argument("--preset", choices=list(TRAIN_PRESETS),
                     help="a model size of `nanoseek pretrain`, randomly initialised (nothing to download)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    add_dtype_argument(p)
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1, 8, 32], help="decode batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=POSITIVE_INT, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--new-tokens", type=bounded(int, 2), default=128,
                   help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=3,
                   help="runs of each measurement; the best counts (default 3)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure MTP-speculative decoding at the smallest and largest batch (models with MTP "
                        "layers)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a training step: tokens/s, MFU, dollars per million tokens")
    p.add_argument("--optimizer", choices=["adamw", "muon"],
                   help="the training step's optimiser (default: the preset's; adamw for --model, whose directory does "
                        "not record one; the speedrun's pretraining uses muon)")
    p.add_argument("--train-batch", type=POSITIVE_INT, default=8, help="sequences per training step (default 8)")
    p.add_argument("--seq-len", type=bounded(int, 2), default=256, help="tokens per training sequence (default 256)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="plain decode steps through torch.compile, as `nanoseek serve` does on the CPU (float32; "
                        "speculative steps stay eager); the one-off compile (~50 s on 2 cores the first time) is "
                        "reported apart. Default: the eager engine")
    p.add_argument("--price-per-hour", type=NONNEGATIVE, default=2.0, help="dollars per device-hour (default 2.0)")
    p.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads (default: PyTorch's choice)")


def num(x: float | None, spec: str, unit: str = "") -> str:
    return "–" if x is None else format(x, spec) + unit


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def machine(device: str) -> dict:
    from .device import cpu_name

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews the numbers
    return {"device": device, "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg_1m": load}


def load(args, cfg, device: str, dtype: torch.dtype):
    """The model in `dtype` on `device`: read from --model, or a random init of the --preset (seed 0)."""
    from .checkpoint import load_model
    from .model import build_model

    if args.model:
        return load_model(args.model, device=device, dtype=dtype)
    torch.manual_seed(0)
    return build_model(cfg, device=device, dtype=dtype)


def measure_decode(engine, B: int, args, spec: bool) -> dict:
    """Greedy decoding of B random prompts: prefill and decode rates, token and step counts of one N-token run."""
    N, P = args.new_tokens, args.prompt_len
    prompts = torch.randint(0, engine.cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B)).tolist()
    counted = {}

    def run(n):
        before = dict(engine.stats)
        out = engine.generate(prompts, max_new_tokens=n, speculative=spec, stop_token_ids=())  # n tokens each
        if n == N:  # greedy: every N-token run emits the same tokens in the same steps
            counted.update({k: engine.stats[k] - before[k] for k in before}, tokens=sum(map(len, out)))
        return out

    t_n, t_1, _ = best_times({"run": run}, N, args.repeats, engine.device)["run"]
    # seconds per decode step, excluding prefill and the first token; None when the N-token run was no slower than
    # the 1-token one (at a small N, timing noise can win): no rate is better than a made-up one
    step = (t_n - t_1) / (N - 1) if t_n > t_1 else None
    if step is None:
        say(f"batch {B}: {N} new tokens took no longer than 1, so no decode rate; raise --new-tokens or --repeats")
    r = {"batch": B, "prefill_tok_s": B * P / t_1, "first_token_ms": t_1 * 1e3,
         "decode_tok_s": B / step if step else None, "step_ms": step * 1e3 if step else None,
         "tokens": counted["tokens"], "decode_steps": counted["decode_steps"]}
    if spec:
        r |= {"drafted": counted["drafted"], "accepted": counted["accepted"],
              "acceptance_rate": counted["accepted"] / max(counted["drafted"], 1)}
    return r


def measure_train(model, args, device: str, optimizer: str) -> dict:
    """One pretraining step (the loss of train/loop.py's `fit`, one micro-batch) on random ids: best of --repeats."""
    from .flops import flops_per_token
    from .train import loop, metrics

    cfg, B, T = model.config, args.train_batch, args.seq_len
    model.train()
    opt = loop.make_optimizer(model, lr=1e-4, weight_decay=0.1, kind=optimizer)  # speed does not depend on lr
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]  # (B, T) each
    segments = None
    if cfg.bos_token_id is not None:  # document-masked packed rows, as pretrain trains by default
        inputs[:, 0] = cfg.bos_token_id
        segments = (inputs == cfg.bos_token_id).cumsum(1)  # (B, T)
    use_mtp = len(model.mtp_layers) > 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step() -> float:
        with autocast:
            _, loss, l_mtp, aux = loop.lm_losses(model, model, inputs, labels, segments, use_mtp)
            total = loss + loop.TrainConfig.mtp_weight * l_mtp + aux  # pretrain's defaults: λ, clip, γ
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.TrainConfig.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_routing_bias(loop.TrainConfig.bias_gamma)
        return loss.item()

    loss, best = step(), float("inf")  # warm-up (allocates the optimiser state)
    for _ in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        best = min(best, time.perf_counter() - t)
    say("measuring the device's peak FLOP/s")
    peak, peak_how = metrics.device_peak_flops(torch.device(device))
    tok_s = B * T / best
    flops = flops_per_token(cfg, T, training=True, with_mtp=use_mtp)  # per token, forward + backward
    return {"batch": B, "seq_len": T, "optimizer": optimizer, "mtp": use_mtp, "loss": loss, "step_ms": best * 1e3,
            "tokens_per_s": tok_s, "flops_per_token": flops, "mfu": flops * tok_s / peak, "peak_flops": peak,
            "peak": peak_how, "price_per_hour": args.price_per_hour,
            "dollars_per_million_tokens": args.price_per_hour / 3600 / tok_s * 1e6}


def setup(args: argparse.Namespace):
    """Checks before any work -> (device, model config, inference dtype). A mistake is a one-line UserError."""
    from .checkpoint import read_config
    from .cli import UserError
    from .config import get_preset
    from .device import check_fits, has_cxx, inference_dtype, resolve_device
    from .model import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, allow_mps=False)
    if device.startswith("mps"):
        raise UserError("--device mps: bench measures cpu or cuda devices")
    device = "cuda:0" if device == "cuda" else device
    if args.model is not None:
        if not os.path.isdir(args.model):
            raise UserError(f"--model {args.model}: " + ("a file, not a model directory" if os.path.exists(args.model)
                                                          else "no such model directory"))
        cfg = read_config(args.model)
    else:
        cfg = get_preset(args.preset).replace(torch_dtype="float32")
    dtype = inference_dtype(args.dtype, device)  # auto: what `nanoseek serve` decodes in
    P, N, B = args.prompt_len, args.new_tokens, args.batch_sizes[-1]
    context = cfg.max_position_embeddings
    if P + N > context:
        raise UserError(f"--prompt-len {P} + --new-tokens {N} = {P + N} tokens does not fit the model's context "
                        f"({context})")
    if args.train and args.seq_len > context:
        raise UserError(f"--seq-len {args.seq_len} does not fit the model's context ({context})")
    if args.compile and device == "cpu" and not has_cxx():
        raise UserError("--compile needs a C++ compiler on the PATH (inductor writes C++ on the CPU)")
    # sizes before any allocation: a 671B preset is refused, not swapped to death
    weights = sum(p.numel() for p in build_model(cfg, device="meta").parameters()) * dtype.itemsize
    check_fits(weights, device, f"the weights ({str(dtype).removeprefix('torch.')})", "choose a smaller model")
    # the engine's cache: (main + MTP layers, largest batch, P + N + 1 positions, R + Dr)
    cache = ((cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * B * (P + N + 1)
             * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize)
    check_fits(weights + cache, device, f"the weights and a KV cache of {B} x {P + N} positions",
               "use smaller --batch-sizes, --prompt-len or --new-tokens")
    if args.train:
        check_fits(weights // dtype.itemsize * 16, device, "training's float32 weights, gradients and optimiser state",
                   "pass --no-train")
    return device, cfg, dtype


def run(args: argparse.Namespace) -> int:
    from .cli import UserError
    from .engine.cache import LatentCache
    from .engine.engine import Engine
    from .model import param_counts
    from .train.pretrain import TRAIN_PRESETS

    start = time.perf_counter()
    device, cfg, dtype = setup(args)
    host = machine(device)  # before our own work raises the load average
    P, N, sizes = args.prompt_len, args.new_tokens, args.batch_sizes
    name = args.model if args.model else f"preset {args.preset} (random weights)"
    say(f"loading {name} on {device}")
    model = load(args, cfg, device, dtype).eval()
    counts = param_counts(model)
    kv_bpt = LatentCache.bytes_per_token(cfg, dtype.itemsize)  # latent c (R) + rope key (Dr), every main layer
    engine_bpt = LatentCache.bytes_per_token(cfg, dtype.itemsize, with_mtp=True)  # the MTP layers' too
    full_bpt = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype.itemsize
    spec_ok = args.speculative and len(model.mtp_layers) > 0
    engine = Engine(model, max_batch_size=sizes[-1], max_seq_len=min(P + N + 1, cfg.max_position_embeddings),
                    compile=args.compile)
    engine.share_prefix = False  # random prompts are distinct anyway; never prefill fewer rows than we count
    compiling = engine.fast is not None and engine.fast.compiling
    compile_s = None
    if compiling:
        say("compiling the decode step (~50 s on 2 cores the first time, seconds once inductor's cache holds it)")
        t = time.perf_counter()
        engine.warm_up()
        compile_s = time.perf_counter() - t
    decode, spec = [], []
    try:
        for i, B in enumerate(sizes):
            say(f"decode, batch {B} ({i + 1}/{len(sizes)}): {P}-token prompts, {N} new tokens, best of {args.repeats}")
            decode.append(measure_decode(engine, B, args, spec=False))
        for B in sorted({sizes[0], sizes[-1]}) if spec_ok else []:  # the smallest batch (1 by default) and largest
            say(f"MTP-speculative decode, batch {B}")
            r = measure_decode(engine, B, args, spec=True)
            plain = next(d["decode_tok_s"] for d in decode if d["batch"] == B)
            r["speedup"] = r["decode_tok_s"] / plain if r["decode_tok_s"] and plain else None
            spec.append(r)
    except (RuntimeError, MemoryError) as e:  # OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        raise UserError(f"decoding at batch {B} ran out of {device} memory: use smaller --batch-sizes") from None
    del engine, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    train = None
    if args.train:
        say(f"training step, batch {args.train_batch} x {args.seq_len} tokens, best of {args.repeats}")
        optimizer = args.optimizer or (TRAIN_PRESETS[args.preset].get("optimizer", "adamw") if args.preset else "adamw")
        try:
            train = measure_train(load(args, cfg, device, torch.float32), args, device, optimizer)
        except (RuntimeError, MemoryError) as e:  # OutOfMemoryError is a RuntimeError
            if not out_of_memory(e):
                raise
            raise UserError(f"a training step of {args.train_batch} x {args.seq_len} tokens ran out of {device} "
                            "memory: use a smaller --train-batch or --seq-len, or --no-train") from None

    result = {
        "model": args.model or args.preset, "random_weights": not args.model, "params": counts,
        "mtp_layers": cfg.num_nextn_predict_layers,
        "machine": host | {"dtype": str(dtype).removeprefix("torch."),
                                      "train_dtype": "bfloat16 autocast" if device != "cpu" else "float32"},
        "prompt_len": P, "new_tokens": N, "repeats": args.repeats, "compile": compiling, "compile_s": compile_s,
        "kv_cache_bytes_per_token": kv_bpt, "full_kv_bytes_per_token": full_bpt, "engine_cache_bytes_per_token": engine_bpt,
        "decode": decode, "speculative": spec or None, "train": train, "wall_s": time.perf_counter() - start,
    }
    print_table(result, name)
    print(json.dumps(rounded(result)))
    return 0


def rounded(x):
    """Floats to 5 significant digits, all the way down (timings do not repeat to more)."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return [rounded(v) for v in x] if isinstance(x, list) else x


def print_table(r: dict, name: str) -> None:
    m, c, spec = r["machine"], r["params"], {s["batch"]: s for s in r["speculative"] or []}
    hw = m["gpu"] or f"{m['cpu']}, {m['threads']} thread{'s' * (m['threads'] != 1)} on {m['cores']} cores"
    if m["load_avg_1m"] is not None:
        hw += f", load average {m['load_avg_1m']:.1f} at the start"
    print(f"nanoseek bench: {name}, {c['total'] / 1e6:.3g}M parameters ({c['active'] / 1e6:.3g}M active per token"
          + (f", +{c['mtp'] / 1e6:.3g}M MTP)" if c["mtp"] else ")"))
    print(f"{m['device']} ({hw}), torch {m['torch']}, {m['dtype']}; prompt {r['prompt_len']} tokens, "
          f"{r['new_tokens']} new tokens, greedy, best of {r['repeats']}; "
          + (f"decode compiled ({r['compile_s']:.1f} s to compile)" if r["compile"] else "eager decode (--compile: "
             "torch.compile, as `nanoseek serve` does on the CPU)") + "\n")
    print("| batch | prefill tok/s | first token ms | decode tok/s | ms/step | MTP-speculative tok/s (eager) | "
          f"vs plain{' (compiled)' if r['compile'] else ''} | draft acceptance |")
    print("|---|---|---|---|---|---|---|---|")
    for d in r["decode"]:
        s = spec.get(d["batch"])
        more = (f"{num(s['decode_tok_s'], '.1f')} | {num(s['speedup'], '.2f', 'x')} | {s['acceptance_rate']:.0%}" if s
                else "– | – | –")
        print(f"| {d['batch']} | {d['prefill_tok_s']:.0f} | {d['first_token_ms']:.1f} | "
              f"{num(d['decode_tok_s'], '.1f')} | {num(d['step_ms'], '.2f')} | {more} |")
    kv, full = r["kv_cache_bytes_per_token"], r["full_kv_bytes_per_token"]
    print(f"\nKV cache: {kv} bytes per token (MLA latent + rope key of the main layers, {m['dtype']}); full per-head "
          f"K/V would be {full} ({1 - kv / full:.1%} less). The engine holds {r['engine_cache_bytes_per_token']}, with "
          f"the MTP layers' for speculative decoding")
    if r["speculative"] and r["random_weights"]:
        print("Random weights: the MTP draft rarely matches, so speculative decoding shows its cost, not its gain "
              "(DeepSeek-V3 reports 85-90% acceptance for a trained model). Bench a trained --model for that.")
    elif r["speculative"] is None:
        print("MTP-speculative decoding: not measured (" + ("--no-speculative)" if r["mtp_layers"] else
                                                          "the model has no MTP layers)"))
    t = r["train"]
    if t:
        print(f"\n| training step | tokens/s | ms/step | MFU | $ per 1M tokens at ${t['price_per_hour']:g}/h |")
        print("|---|---|---|---|---|")
        print(f"| {t['batch']} x {t['seq_len']} tokens, {'NTP + MTP' if t['mtp'] else 'NTP'} loss, {t['optimizer']} "
              f"| {t['tokens_per_s']:.0f} | {t['step_ms']:.1f} | {t['mfu']:.1%} | "
              f"{t['dollars_per_million_tokens']:.4f} |")
        print(f"MFU against {t['peak_flops'] / 1e12:.3g} TFLOP/s ({t['peak']})")
    load, cores = m["load_avg_1m"] or 0, m["cores"] or 1
    if m["gpu"] is None and load >= 1 and m["threads"] >= cores:
        print(f"\nThe machine was busy (load average {load:.1f}): torch's {m['threads']} threads wait on "
              "each other when another process takes a core, which can slow everything many times over. Rerun on "
              "a quiet machine, or with fewer --threads.")
    elif m["gpu"] is None and load >= cores:  # fewer threads than cores, but every core was taken
        print(f"\nThe machine was busy (load average {load:.1f} on {cores} cores): the numbers above are what was "
              "left of it. Rerun on a quiet machine.")
    print()
