"""Training step, ours vs transformers' DeepseekV3ForCausalLM on the same weights and batch, in one process.

    python bench/train_step.py [--batch 4] [--seq 256] [--steps 5] [--threads N]

Times forward + backward (+ no optimizer) of both, prints tokens/s, the ratio, and our MFU against this machine's
measured float32 matmul peak. MTP is off in both (transformers has no MTP training path), so the work is equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.device import cpu_name
from nanoseek.flops import flops_per_token, measured_peak_flops

# A CPU-benchmark shape: every V3 feature on, large enough that matmuls (not Python) dominate.
BENCH = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=8,
    num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128,
    first_k_dense_replace=1, n_group=4, topk_group=2, num_nextn_predict_layers=0, max_position_embeddings=1024,
    rope_scaling=None, aux_loss_alpha=0.0,
)


def time_steps(step, steps: int) -> float:
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny").replace(**BENCH)
    ours = nanoseek.build_model(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_model(ours, d)
        ref = DeepseekV3ForCausalLM.from_pretrained(d, attn_implementation="sdpa").train()
        # transformers >= 5 runs experts with grouped_mm by default; "eager" is its per-expert Python loop.
        ref_loop = DeepseekV3ForCausalLM.from_pretrained(d, attn_implementation="sdpa", experts_implementation="eager").train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    with torch.no_grad():
        ours.eval(), ref.eval()
        diff = (ours(inputs) - ref(inputs).logits).abs().max().item()
        ours.train(), ref.train()

    def step_ours():
        ours.zero_grad(set_to_none=True)
        F.cross_entropy(ours(inputs).flatten(0, 1), labels.flatten()).backward()

    def step_hf(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs).logits.flatten(0, 1), labels.flatten()).backward()

    t_ref = time_steps(lambda: step_hf(ref), args.steps)
    t_loop = time_steps(lambda: step_hf(ref_loop), args.steps)
    t_ours = time_steps(step_ours, args.steps)
    tokens = args.batch * args.seq
    peak = measured_peak_flops()
    mfu = flops_per_token(cfg, args.seq, training=True, with_mtp=False) * tokens / t_ours / peak
    res = {
        "ours_tokens_per_s": round(tokens / t_ours, 1),
        "transformers_tokens_per_s": round(tokens / t_ref, 1),
        "transformers_eager_experts_tokens_per_s": round(tokens / t_loop, 1),
        "ratio": round(t_ref / t_ours, 2),
        "ratio_vs_eager_experts": round(t_loop / t_ours, 2),
        "mfu_vs_measured_peak": round(mfu, 3),
        "measured_peak_gflops": round(peak / 1e9, 1),
        "max_abs_logit_diff": diff,
        "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": f"{cpu_name()}, {os.cpu_count()} cores",
    }
    print("| | tokens/s |\n|---|---|")
    print(f"| nanoseek | {res['ours_tokens_per_s']} |\n| transformers (grouped_mm experts) | {res['transformers_tokens_per_s']} |")
    print(f"| transformers (eager expert loop) | {res['transformers_eager_experts_tokens_per_s']} |")
    print(f"ratio {res['ratio']}x (vs eager loop {res['ratio_vs_eager_experts']}x), "
          f"our MFU {res['mfu_vs_measured_peak']:.1%} of measured peak", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
