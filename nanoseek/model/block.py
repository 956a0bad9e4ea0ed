"""One pre-norm decoder layer: x + MLA(norm(x)), then h + FFN(norm(h)), the FFN dense or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP, RMSNorm
from .mla import MLA
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions=None, cache=None, span=None, mask=None, token_mask=None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); an additive mask (B, 1, T, T) of 0 / -inf keeps packed documents apart;
        token_mask (B, T) bool, False on padding, which then moves no MoE balancing."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, span, mask=mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, MoE) else self.mlp(h))
