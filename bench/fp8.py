"""FP8 training on one GPU: bf16 autocast vs nanoseek's FP8 recipe (DeepSeek-V3 §3.3) vs torchao float8 (rowwise).

    PYTHONPATH=. python bench/fp8.py [--shapes narrow,wide,wide-dense] [--variants bf16,fp8,torchao] [--gemm]
                        [--steps 200] [--warmup 30] [--batch 8] [--seq 1024]
Variants: bf16 (autocast), fp8 (ours, best verified backend), fp8-triton (ours, Triton GEMM forced), fp8-pow2 (ours,
power-of-two scales), torchao (float8 rowwise, if installed).

Each variant trains a fresh model (same seed, same init, same batches) for --steps steps of forward + backward +
fused AdamW under bf16 autocast with float32 master weights. tokens/s is timed with CUDA events over the steps after
--warmup (which absorb torch.compile of the quantisers and cuBLAS/Triton warm-up); the loss is the mean of the last
20 steps. Data: random walks through a fixed random permutation of the vocabulary (next token = perm[token] with
probability 3/4, uniform otherwise), so the loss falls and the gap between variants means something.

Shapes (nanoseek "small" preset, MTP off, no sequence aux loss):
  narrow      hidden 768, 12 layers (1 dense + 11 MoE: 16 experts, top-4, width 384, one shared)
  wide        hidden 2048, 8 layers (1 dense 5632 + 7 MoE: 16 experts, top-4, width 1024, one shared), 16 heads
  wide-dense  as wide but every layer a dense SwiGLU MLP of width 5632: the matmuls FP8Linear covers dominate
In the bf16 / torchao runs the routed experts run as bf16 grouped_mm (inputs cast as autocast would; nanoseek's own
Experts fall back to a per-expert loop for float32 inputs); fp8 runs use FP8Experts (row-wise FP8 grouped GEMMs).
Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model import fp8 as fp8mod
from nanoseek.model.moe import Experts, grouped_mm

COMMON = dict(num_nextn_predict_layers=0, seq_aux=False, aux_loss_alpha=0.0, max_position_embeddings=4096,
              torch_dtype="float32")
WIDE = dict(hidden_size=2048, num_hidden_layers=8, intermediate_size=5632, num_attention_heads=16,
            num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
            v_head_dim=128, moe_intermediate_size=1024)
SHAPES = {
    "narrow": {},
    "wide": WIDE,
    "wide-dense": dict(WIDE, first_k_dense_replace=WIDE["num_hidden_layers"]),
}


class BF16Experts(Experts):
    """Baseline experts: the same grouped_mm as nanoseek's, with inputs cast to bf16 as autocast would."""

    def __init__(self, ex: Experts):
        torch.nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = ex.gate_proj, ex.up_proj, ex.down_proj

    def forward(self, x, weights, indices, counts):
        N, K = indices.shape
        order = indices.flatten().argsort(stable=True)
        token = order // K
        xs = x[token].bfloat16()
        offsets = counts.cumsum(0).to(torch.int32)
        g, u, d = (p.bfloat16().mT for p in (self.gate_proj, self.up_proj, self.down_proj))
        h = F.silu(grouped_mm(xs, g, offsets)) * grouped_mm(xs, u, offsets)
        ys = grouped_mm(h, d, offsets) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


def swap_experts(model, cls):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Experts:
                setattr(parent, name, cls(child))


def make_data(vocab, B, T, steps, device) -> torch.Tensor:
    """(steps, B, T+1) token ids, built once per shape (one loop over positions, vectorised over all sequences)."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234)).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (steps * B, T + 1), generator=g, device=device)
    follow = torch.rand(steps * B, T + 1, generator=g, device=device) < 0.75
    for i in range(T):
        ids[:, i + 1] = torch.where(follow[:, i + 1], perm[ids[:, i]], ids[:, i + 1])
    return ids.view(steps, B, T + 1)


def prepare(variant: str, cfg, device):
    torch.manual_seed(0)
    model = nanoseek.build_model(cfg, device=device).train()
    fp8mod._backends_for.cache_clear()
    os.environ.pop("NANOSEEK_FP8_BACKEND", None)
    if variant == "bf16":
        swap_experts(model, BF16Experts)
    elif variant.startswith("fp8"):
        if variant == "fp8-triton":
            os.environ["NANOSEEK_FP8_BACKEND"] = "triton"
        fp8mod.convert_to_fp8(model, pow2_scales=variant.endswith("pow2"))
    elif variant == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        swap_experts(model, BF16Experts)
        keep = ("lm_head", "mlp.gate")  # the same layers stay high precision as in our recipe
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                                   module_filter_fn=lambda m, fqn: not fqn.endswith(keep))
    return model


def run(variant, cfg, data, args, device):
    model = prepare(variant, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    losses = torch.zeros(args.steps, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for step, ids in enumerate(data):
        if step == args.warmup:
            start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_routing_bias(1e-3)
        losses[step] = loss.detach()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    losses = losses.tolist()
    res = dict(variant=variant, tokens_per_s=(args.steps - args.warmup) * args.batch * args.seq / (ms / 1e3),
               step_ms=ms / (args.steps - args.warmup), loss=sum(losses[-20:]) / 20, first_loss=losses[0],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, wall_s=time.time() - t0)
    del model, opt
    torch.cuda.empty_cache()
    return res


def gemm_table(device):
    """Per-GEMM rates at the wide shape (M = 8192 tokens): bf16 vs FP8 block-scaled, plus the quantiser's cost."""
    from triton.testing import do_bench

    rows = []
    for M, K, N in ((8192, 2048, 5632), (8192, 5632, 2048), (8192, 2048, 2048)):
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=device, dtype=torch.bfloat16)
        flops = 2 * M * N * K
        r = dict(shape=f"{M}x{K}x{N}", bf16=flops / do_bench(lambda: a @ w.t(), return_mode="median") / 1e9)
        aq, a_s = fp8mod.quantize_tiles(a)
        wq, ws = fp8mod.quantize_weight(w)
        for name in ("cublas", "triton"):
            if name in fp8mod._backends_for(a.device):
                fn = fp8mod._CANDIDATES[name][0]
                r[name] = flops / do_bench(lambda: fn(aq, a_s, wq, ws, True), return_mode="median") / 1e9
        r["quant_x_us"] = do_bench(lambda: fp8mod.quantize_tiles(a), return_mode="median") * 1e3
        r["quant_xT_us"] = do_bench(lambda: fp8mod.quantize_tiles(a.t()), return_mode="median") * 1e3
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="narrow,wide,wide-dense")
    ap.add_argument("--variants", default="bf16,fp8,torchao")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gemm", action="store_true", help="also time single GEMMs and the quantiser")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8.py needs a CUDA GPU")
    device = torch.device("cuda")
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                real_backends=list(fp8mod._backends_for(device)), grouped=fp8mod._grouped_backend(device),
                backend_report=dict(fp8mod.BACKEND_REPORT))
    print(json.dumps(info), flush=True)
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    results, gemms = {}, []
    if args.gemm:
        gemms = gemm_table(device)
        print("| GEMM (MxKxN) | bf16 TFLOP/s | fp8 cuBLAS TFLOP/s | fp8 Triton TFLOP/s | quant x (us) | quant xT (us) |")
        print("|---|---|---|---|---|---|")
        for r in gemms:
            print(f"| {r['shape']} | {r['bf16']:.0f} | {r.get('cublas', float('nan')):.0f} | "
                  f"{r.get('triton', float('nan')):.0f} | {r['quant_x_us']:.0f} | {r['quant_xT_us']:.0f} |", flush=True)
    for shape in args.shapes.split(","):
        cfg = nanoseek.get_preset("small").replace(**COMMON, **SHAPES[shape])
        results[shape] = []
        data = make_data(cfg.vocab_size, args.batch, args.seq, args.steps, device)
        for variant in args.variants.split(","):
            if variant == "torchao" and info["torchao"] is None:
                results[shape].append(dict(variant=variant, skipped="torchao is not installed"))
                continue
            if variant == "fp8-triton" and "triton" not in info["real_backends"]:
                results[shape].append(dict(variant=variant, skipped="Triton backend unavailable"))
                continue
            try:
                r = run(variant, cfg, data, args, device)
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                r = dict(variant=variant, skipped=f"{type(e).__name__}: {str(e)[:200]}")
                torch.cuda.empty_cache()
            results[shape].append(r)
            print(json.dumps(dict(shape=shape, **r)), flush=True)
    print(f"\ntokens/step {args.batch}x{args.seq}, {args.steps} steps ({args.warmup} warm-up), {info['device']}")
    print("| shape | variant | tokens/s | vs bf16 | final loss | loss gap vs bf16 | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for shape, rows in results.items():
        base = next((r for r in rows if r["variant"] == "bf16" and "skipped" not in r), None)
        for r in rows:
            if "skipped" in r:
                print(f"| {shape} | {r['variant']} | - | - | - | {r['skipped']} | - |")
                continue
            sp = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            gap = (r["loss"] - base["loss"]) / base["loss"] if base else float("nan")
            r.update(speedup=sp, loss_gap=gap)
            print(f"| {shape} | {r['variant']} | {r['tokens_per_s']:,.0f} | {sp:.3f}x | {r['loss']:.4f} | "
                  f"{gap:+.3%} | {r['peak_gib']:.1f} |")
    print(json.dumps(dict(info, args=vars(args), gemm=gemms, results=results)))


if __name__ == "__main__":
    main()
