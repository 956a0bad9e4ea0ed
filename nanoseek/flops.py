"""FLOP accounting for MFU and the cost table: matmul FLOPs per token of the activated parameters plus attention.

Per token, a forward pass costs 2 FLOPs per activated matmul weight (the embedding lookup is free, the output head
is not) plus causal attention: H·(d_qk + d_v)·T on average over a length-T sequence. Training is 3× the forward
(backward = 2× forward). MTP modules count only when they run (training)."""

from __future__ import annotations

import time

import torch

from .config import ModelConfig


def matmul_params_per_token(cfg: ModelConfig, with_mtp: bool = False) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk if cfg.q_lora_rank else D * H * qk
    attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + v) + H * v * D
    dense = 3 * D * cfg.intermediate_size
    moe = 3 * D * cfg.moe_intermediate_size * ((cfg.num_experts_per_tok or 0) + (cfg.n_shared_experts or 0))
    moe += D * (cfg.n_routed_experts or 0)  # router
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    total = sum(attn + (moe if cfg.is_moe_layer(i) else dense) for i in range(n_layers))
    if with_mtp:
        total += cfg.num_nextn_predict_layers * (2 * D * D + D * cfg.vocab_size)  # eh_proj + shared head
    return total + D * cfg.vocab_size  # output head


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, with_mtp: bool | None = None) -> float:
    with_mtp = training if with_mtp is None else with_mtp
    n_attn = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    attn = n_attn * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    fwd = 2 * matmul_params_per_token(cfg, with_mtp) + attn
    return 3 * fwd if training else fwd


def generation_flops(cfg: ModelConfig, prompt_len: int, completion_lens: list[int]) -> float:
    """One prompt prefilled once, then each of its completions decoded a token at a time with the KV cache. A token
    decoded after a context of k tokens attends over k: on average over c tokens after a p-token prompt that is the
    cost `flops_per_token` gives a whole sequence of length 2p + c."""
    def fwd(t):
        return flops_per_token(cfg, t, training=False, with_mtp=False)

    return prompt_len * fwd(prompt_len) + sum(c * fwd(2 * prompt_len + c) for c in completion_lens)


def measured_peak_flops(device: str | torch.device = "cpu", dtype=torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on this device: the practical ceiling MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
