"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules, module k predicting token t+k+1.

Module k (stored as layer `num_hidden_layers + k - 1`, with DeepSeek's tensor names):
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     embedding first, as vLLM reads the official weights
    h^k  = DecoderLayer(h')                                         a full MLA + (MoE) block
    logits^k = lm_head(shared_head.norm(h^k))                       embedding and output head shared with the model
h^0 is the main model's final (normed) hidden state. During training the module sees positions i < T - k of a
length-T input; logits^k at position i are scored against the label of position i + k (`mtp_loss`).
At inference the module is a one-token draft for speculative decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .block import DecoderLayer
from .layers import RMSNorm


class SharedHead(nn.Module):
    """Holds the module's own output norm; the output projection itself is the model's `lm_head` (shared), which
    the checkpoint writer also stores as `shared_head.head` for DeepSeek-format readers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, cos, sin, positions=None, cache=None, span=None, mask=None,
                token_mask=None) -> torch.Tensor:
        """h_prev (B, T, D) hidden of depth k-1, emb (B, T, D) embeddings of the tokens k ahead -> h^k (B, T, D)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, cos, sin, positions, cache, span, mask, token_mask)


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, ignore_index: int = -100,
             weights: list[float] | None = None) -> torch.Tensor:
    """Mean over depths of the cross-entropy of depth k's logits (B, T-k, V) against labels[:, k:] (B, T-k), each
    times weights[k - 1] when given (the trainer's share of the step's positions at that depth; 0 where this batch
    has none, whose mean would be NaN)."""
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        if weights is not None and weights[k - 1] == 0:
            losses.append(logits.sum().float() * 0.0)  # (in the graph: every rank's backward reaches the same weights)
            continue
        target = labels[:, k:]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=ignore_index)
        losses.append(ce if weights is None else ce * weights[k - 1])
    return torch.stack(losses).mean()
