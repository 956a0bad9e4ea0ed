"""Multi-head Latent Attention (DeepSeek-V2/V3).

Legend: B batch, T new tokens, S cached positions, H heads, Dn = qk_nope_head_dim, Dr = qk_rope_head_dim,
Dv = v_head_dim, R = kv_lora_rank (the latent), Q = q_lora_rank.

Keys and values come from a low-rank latent: c = RMSNorm(W_dkv x) (R values per token) and one shared rope key
k_pe = RoPE(W_kr x) (Dr values per token). Per head, k_nope = W_uk c and v = W_uv c, with W_uk and W_uv stacked in
`kv_b_proj`. Queries are q = W_uq RMSNorm(W_dq x) (or one q_proj when Q is None), split into a nope part and a
rope part.

Two ways to compute the same attention:
- naive (training, prefill without a cache): expand c into full per-head K and V and call SDPA.
- absorbed (decoding with a `LatentCache`): never expand. Since q_nope·k_nope = q_nope·(W_uk c) = (W_ukᵀ q_nope)·c,
  fold W_uk into the query and score against the cached latent directly; likewise apply W_uv after the weighted
  sum of latents. The cache holds only c and k_pe: R + Dr values per token per layer (576 for V3, against
  H·(Dn+Dr+Dv) = 40,960 for a full K/V cache: K is Dn+Dr wide per head, V is Dv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope


ABSORB_MAX_NEW_TOKENS = 8
LATENT_NORM_EPS = 1e-6  # the q and kv latents' norms: fixed, as in DeepSeek's code and transformers (not rms_norm_eps)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleave = cfg.rope_interleave
        self.scale = cfg.softmax_scale
        D, H, bias = cfg.hidden_size, self.n_heads, cfg.attention_bias
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, T, Dr/2)
        sin: torch.Tensor,
        positions: torch.Tensor | None = None,  # (B, T), needed with a cache
        cache=None,  # engine.cache.LatentCache
        span: int | None = None,  # cached positions to attend over (max position + 1)
        absorb: bool | None = None,  # default: absorbed for a few new tokens over a cache (decode), else naive
        mask: torch.Tensor | None = None,  # (B, 1, T, T) additive, training without a cache: 0 where attention may go
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, H, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, H, Dn), (B, T, H, Dr)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)  # (B, T, R)
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)  # (B, T, Dr)
        if cache is not None:
            c, k_pe = cache.update(self.layer_idx, positions, c, k_pe, span)  # (B, S, R), (B, S, Dr)
        if absorb is None:  # prefill expands the latent once; decoding a few tokens is cheaper in latent space
            absorb = cache is not None and T <= ABSORB_MAX_NEW_TOKENS
        if absorb:
            out = self._absorbed(q_nope, q_pe, c, k_pe, positions)
        else:
            out = self._naive(q_nope, q_pe, c, k_pe, positions if cache is not None else None, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def _naive(self, q_nope, q_pe, c, k_pe, positions, mask=None) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = c.shape[1]
        kv = self.kv_b_proj(c).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, S, H, Dn), (B, S, H, Dv)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, Dn+Dr)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, self.rope_dim)], dim=-1).transpose(1, 2)
        # Fused (flash) SDPA kernels want equal q/k and v widths: pad v with zeros, slice the output back.
        pad = q.shape[-1] - self.v_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        if positions is not None:
            mask = self._mask(positions, S)[:, None]  # (B, 1, T, S)
        causal = mask is None and T > 1  # without positions the keys are exactly the T queries' own tokens
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=self.scale)
        return out[..., : self.v_dim].transpose(1, 2)  # (B, T, H, Dv)

    def _absorbed(self, q_nope, q_pe, c, k_pe, positions) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = c.shape[1]
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, Dn, R), (H, Dv, R)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # query in latent space
        scores = torch.einsum("bthr,bsr->bhts", q_lat, c) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        scores = scores.float() * self.scale
        if positions is None:
            positions = torch.arange(S - T, S, device=c.device).expand(B, T)
        scores = scores.masked_fill(~self._mask(positions, S)[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(c.dtype)  # (B, H, T, S)
        o_lat = torch.einsum("bhts,bsr->bthr", probs, c)
        return torch.einsum("bthr,hdr->bthd", o_lat, w_uv)  # (B, T, H, Dv)

    @staticmethod
    def _mask(positions: torch.Tensor, S: int) -> torch.Tensor:
        """(B, T) query positions -> (B, T, S) bool, True where key slot s <= the query's position."""
        return torch.arange(S, device=positions.device)[None, None, :] <= positions[:, :, None]
