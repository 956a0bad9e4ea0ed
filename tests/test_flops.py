"""FLOP accounting behind MFU and the cost table, checked against what the model really runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.flops import flops_per_token, generation_flops, matmul_params_per_token


@pytest.mark.parametrize("preset", ["cpu-tiny", "cpu-student"])
def test_matmul_flops_match_torchs_count_of_a_forward(preset):
    """torch's FlopCounterMode counts every matmul of a forward but not the routed experts' grouped_mm; added by
    hand, the two must agree with 2 FLOPs per activated matmul weight per token."""
    cfg = nanoseek.get_preset(preset)
    model = nanoseek.build_model(cfg).eval()
    B, T = 2, 48
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (B, T)))
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    routed = moe_layers * 3 * 2 * cfg.hidden_size * cfg.moe_intermediate_size * (cfg.num_experts_per_tok or 0) * B * T
    assert counter.get_total_flops() + routed == 2 * matmul_params_per_token(cfg) * B * T


def test_generation_flops_sum_the_kv_cached_decode():
    """Prefill p tokens once, then decode c tokens each attending over its whole context: the closed form must match
    the token-by-token sum (position j attends over j keys: 2·H·(d_qk + d_v)·j FLOPs) to within the off-by-one."""
    cfg = nanoseek.get_preset("cpu-tiny")
    H, d = cfg.num_attention_heads, cfg.qk_head_dim + cfg.v_head_dim
    per_token = 2 * matmul_params_per_token(cfg)
    p, completions = 60, [100, 7]
    exact = sum(per_token + 2 * H * d * j * cfg.num_hidden_layers for j in range(1, p + 1))
    exact += sum(per_token + 2 * H * d * j * cfg.num_hidden_layers for c in completions for j in range(p + 1, p + c + 1))
    assert generation_flops(cfg, p, completions) == pytest.approx(exact, rel=0.01)
    assert flops_per_token(cfg, 10, training=True, with_mtp=False) == 3 * flops_per_token(cfg, 10, training=False)


def test_gpu_peaks_by_card_not_by_substring():
    from nanoseek.train.metrics import datasheet_peak

    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H800 PCIe": 756e12, "NVIDIA H200 NVL": 835e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA GeForce RTX 4090": 165e12,
             "NVIDIA RTX A1000 6GB Laptop GPU": None, "NVIDIA L4": None}  # None: measured instead
    assert {n: datasheet_peak(n) for n in names} == names
