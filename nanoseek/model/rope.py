"""Rotary position embedding with DeepSeek's interleaved pairs and YaRN context extension.

DeepSeek rotates the pairs (x[2i], x[2i+1]) of the rope part of each query/key by angle pos·θ_i. transformers
offers the same (`rope_interleave=True`) and, for checkpoints whose weights were permuted, rotate-half pairs
(x[i], x[i + d/2]); `interleave` chooses. YaRN (used by V3 for 128K context) blends interpolated and
extrapolated frequencies per dimension with a linear ramp between the β_fast / β_slow correction dimensions, and
scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for V3). The matching
softmax-scale correction lives in `ModelConfig.softmax_scale`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq (D/2,), attention_factor) for the rope head dim D = qk_rope_head_dim."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = cfg.rope_scaling
    if not rs:  # (ModelConfig keeps YaRN alone here; plain RoPE is None)
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate by `factor`
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all) else yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """positions -> (cos, sin). The frequencies are a plain attribute, not a buffer, so that a model built on the
    meta device needs no re-initialisation of them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, D/2), float32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[..., None] * self.inv_freq  # (B, T, D/2)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (B, T, H, D) or (B, T, D); cos/sin (B, T, D/2). Rotation in float32, result in x's dtype."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
