"""Greedy decoding, our Engine vs transformers' `generate` on the same float32 weights, in one process.

    python bench/decode.py [--new-tokens 128] [--prompt-len 32] [--repeats 3] [--threads N] [--device cpu]

For batch 1 and 8 (equal-length random prompts, so transformers needs no padding): wall time of the whole call
(prefill + decode) of each, tokens/s (batch · new tokens / time), the ratio, and whether the greedy tokens are
identical. "ours" is the eager engine (`Engine(model)`, `nanoseek serve --no-compile`); "compiled" is
`Engine(compile=True)` (`nanoseek serve`'s default on the CPU), whose decode steps go through torch.compile (the
one-off compile time of its two graphs, one sequence and a batch, is printed apart). Also the decode time per step, (time for N tokens - time
for 1 token) / (N - 1), ours also with the engine's fast path off (`Engine(fast_decode=False)`). Each time is the
best of `--repeats` runs, the engines and transformers alternating. Also the KV-cache bytes per token: ours (the latent c and
rope key, R + Dr values per layer) and what transformers' returned DynamicCache actually holds (measured from its
tensors), at the bench shape and, analytically, at DeepSeek-V3 671B's shape against a full per-head K/V cache.
Prints a markdown table and a final JSON line; writes nothing. Exits 1 if the greedy tokens differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

import nanoseek
from nanoseek.bench import best_times
from nanoseek.cli import bounded
from nanoseek.engine.cache import LatentCache
from nanoseek.engine.engine import Engine

# A CPU-benchmark shape with every V3 feature on (the one bench/train_step.py uses), MTP off: transformers has none.
BENCH = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=8,
    num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128,
    first_k_dense_replace=1, n_group=4, topk_group=2, num_nextn_predict_layers=0, max_position_embeddings=1024,
    rope_scaling=None, aux_loss_alpha=0.0, eos_token_id=None, initializer_range=0.05,
)


def hf_cache_bytes_per_token(hf, ids, new_tokens: int) -> tuple[int, str]:
    """Bytes per token per sequence of the cache object transformers' generate returns, from its tensors."""
    out = hf.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True)
    cache = out.past_key_values
    total, shapes = 0, set()
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
            shapes.add(tuple(t.shape[1:2]) + tuple(t.shape[3:]))
    seq = cache.get_seq_length()
    return total // seq, f"{type(cache).__name__}, per layer (heads, width) of keys/values: {sorted(shapes)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=bounded(int, 2), default=128,
                    help="at least 2: the decode time per step leaves the first token out")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = nanoseek.ModelConfig(**BENCH)
    model = nanoseek.build_model(cfg, device=args.device)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save_model(model, d)
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).to(args.device).eval()
    N, P = args.new_tokens, args.prompt_len
    engine = Engine(model, max_batch_size=8, max_seq_len=P + N + 1)
    modules = Engine(model, max_batch_size=8, max_seq_len=P + N + 1, fast_decode=False)  # without fastpath.py
    compiled = Engine(model, max_batch_size=8, max_seq_len=P + N + 1, compile=True)
    t = time.perf_counter()
    compiled.warm_up()  # compiles its two graphs: one sequence, and batches of 2 or more
    compile_s = time.perf_counter() - t
    rows, result = [], {"device": args.device, "new_tokens": N, "prompt_len": P, "threads": torch.get_num_threads(),
                        "compile_s": compile_s}
    for B in (1, 8):
        ids = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B))
        hf_ids = ids.to(args.device)

        def run_hf(n):
            with torch.no_grad():
                return hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=n,
                                   do_sample=False, pad_token_id=0)[:, P:].tolist()

        best = best_times({"ours": lambda n: engine.generate(ids.tolist(), max_new_tokens=n), "hf": run_hf,
                           "modules": lambda n: modules.generate(ids.tolist(), max_new_tokens=n),
                           "compiled": lambda n: compiled.generate(ids.tolist(), max_new_tokens=n)},
                          N, args.repeats, args.device)
        (t_ours, t1_ours, ours), (t_hf, t1_hf, theirs) = best["ours"], best["hf"]
        t_mod, t1_mod, ours_mod = best["modules"]
        t_comp, t1_comp, ours_comp = best["compiled"]
        r = {"batch": B, "ours_tok_s": B * N / t_ours, "hf_tok_s": B * N / t_hf, "speedup": t_hf / t_ours,
             "compiled_tok_s": B * N / t_comp, "compiled_speedup": t_hf / t_comp,
             "identical": ours == theirs == ours_mod == ours_comp, "ours_step_ms": (t_ours - t1_ours) / (N - 1) * 1e3,
             "compiled_step_ms": (t_comp - t1_comp) / (N - 1) * 1e3,
             "ours_modules_step_ms": (t_mod - t1_mod) / (N - 1) * 1e3,
             "hf_step_ms": (t_hf - t1_hf) / (N - 1) * 1e3, "ours_first_token_ms": t1_ours * 1e3,
             "hf_first_token_ms": t1_hf * 1e3}
        rows.append(r)
        result[f"batch{B}"] = r
    ours_bpt = LatentCache.bytes_per_token(cfg, dtype_bytes=4)
    hf_bpt, hf_desc = hf_cache_bytes_per_token(hf, torch.randint(0, cfg.vocab_size, (1, P), device=args.device), 8)
    v3 = nanoseek.get_preset("v3-671b")
    v3_ours = LatentCache.bytes_per_token(v3, dtype_bytes=2)
    v3_full = v3.num_hidden_layers * v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim) * 2
    result.update(ours_cache_bytes_per_token=ours_bpt, hf_cache_bytes_per_token=hf_bpt, hf_cache=hf_desc,
                  v3_latent_bytes_per_token=v3_ours, v3_full_kv_bytes_per_token=v3_full)

    print(f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts "
          f"(top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}, float32; prompt {P}, {N} new tokens, greedy; "
          f"{torch.get_num_threads()} threads, device {args.device}; compiling took {compile_s:.1f} s\n")
    print("| batch | ours tok/s | compiled tok/s | transformers tok/s | speedup ours / compiled | decode ms/step ours / "
          "compiled / transformers (ours without the fast path) | prefill+1st token ms ours / transformers | "
          "identical greedy tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ours_tok_s']:.1f} | {r['compiled_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
              f"{r['speedup']:.2f}x / {r['compiled_speedup']:.2f}x | {r['ours_step_ms']:.2f} / "
              f"{r['compiled_step_ms']:.2f} / {r['hf_step_ms']:.2f} ({r['ours_modules_step_ms']:.2f}) | "
              f"{r['ours_first_token_ms']:.1f} / "
              f"{r['hf_first_token_ms']:.1f} | {r['identical']} |")
    print("\n| KV cache bytes / token / sequence | ours | transformers |")
    print("|---|---|---|")
    print(f"| bench shape, float32 (measured for transformers) | {ours_bpt} | {hf_bpt} |")
    print(f"| V3-671B shape, bf16 (analytic: latent vs full per-head K/V) | {v3_ours} | {v3_full} "
          f"({v3_full / v3_ours:.1f}x) |")
    print(f"\ntransformers cache: {hf_desc}")
    print(json.dumps(result))
    if not all(r["identical"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
