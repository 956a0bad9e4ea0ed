"""Decode fast path: one new token per sequence over the latent cache, the same math as `Transformer.hidden_states`
with the absorbed MLA, written with as few PyTorch ops as possible.

Why: at the sizes a CPU runs, a decode step costs per-op dispatch, not arithmetic (bench/results/decode.md): the
module path spends ~2600 aten calls per step on views, dtype casts, einsum plumbing and per-layer masks. Here a step
builds the rope tables and the attention mask once for all layers, and each layer is a short straight line:

    MLA   h = rmsnorm(x); qa = rmsnorm(h Wqaᵀ); q = qa Wqbᵀ -> q_nope (n, H, Dn), q_pe (n, H, Dr)
          ckv = h Wkvaᵀ -> c = rmsnorm(ckv[:R]), k_pe = rope(ckv[R:])          written into the cache at pos
          q_lat = q_nope W_uk·scale (per head, (H, Dn, R))                      absorbed query, scale folded in
          scores = mask + [q_lat ; rope(q_pe)·scale] · [c ; k_pe]ᵀ             ONE bmm against the cache rows
          x += (softmax(scores) c) W_uv Woᵀ                                     per-head W_uv, then o_proj
    FFN   dense: x += down(silu(gate h) * up h);   MoE: the model's own router and shared experts; for one token
          each chosen expert is `addmm`-ed into the residual with its routing weight as alpha, for several the
          module's grouped matmuls over expert-sorted tokens (measured faster than a per-expert loop from 4 tokens).

The cache stores [c ; k_pe] side by side (`LatentCache.data`), which is what lets one bmm score both parts.
Weights are used in place (views), except W_uk·scale and W_uvᵀ (per-head copies of `kv_b_proj`, together the size
of kv_b_proj); `refresh()` rebuilds them, and the engine calls it whenever a kv_b_proj weight changed (GRPO
updates the model between rollouts). Float32 only (the CPU case); other dtypes keep the module path, whose rounding
this path would not reproduce. Tests: tests/test_engine.py checks it against the module path, step by step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.layers import MLP
from ..model.moe import MoE


class FastDecoder:
    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.H, self.R, self.Dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.Dn, self.Dv, self.scale = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.softmax_scale
        self.interleave, self.eps = cfg.rope_interleave, cfg.rms_norm_eps
        self.layers = list(model.main_layers)
        self._versions = None
        self.refresh()

    @staticmethod
    def supports(model) -> bool:
        p = next(model.parameters())
        return p.dtype == torch.float32

    def _param_versions(self) -> tuple:
        """In-place updates (optimiser steps, load_state_dict) bump a tensor's version; the copies below derive
        from kv_b_proj alone, so only its weights are watched (identity too, in case one is replaced)."""
        return tuple((id(w), w._version) for w in (layer.self_attn.kv_b_proj.weight for layer in self.layers))

    def refresh(self) -> None:
        """(Re)build the per-head absorbed matrices from the current weights."""
        H, Dn, R = self.H, self.Dn, self.R
        self.w_uk, self.w_uv_t = [], []
        with torch.no_grad():
            for layer in self.layers:
                w = layer.self_attn.kv_b_proj.weight.view(H, Dn + self.Dv, R)
                self.w_uk.append((w[:, :Dn] * self.scale).contiguous())  # (H, Dn, R)
                self.w_uv_t.append(w[:, Dn:].transpose(1, 2).contiguous())  # (H, R, Dv)
        self._versions = self._param_versions()

    def refresh_if_changed(self) -> None:
        if self._param_versions() != self._versions:
            self.refresh()

    # --- one decode step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """ids, pos (n,) -> final normed hidden (n, D); writes each layer's latent at (row i, pos[i]) of the cache."""
        model = self.model
        n = ids.shape[0]
        span = int(pos.max()) + 1
        rows = torch.arange(n, device=ids.device)
        mask = torch.zeros(n, 1, span, device=ids.device).masked_fill_(
            torch.arange(span, device=ids.device) > pos[:, None, None], float("-inf"))  # (n, 1, span)
        cos, sin = self._rope_tables(pos)  # (n, Dr), for the keys
        q_cos, q_sin = cos[:, None] * self.scale, sin[:, None] * self.scale  # (n, 1, Dr), queries: scale folded in
        x = model.model.embed_tokens(ids)  # (n, D)
        for i, layer in enumerate(self.layers):
            x = self._attention(i, layer, x, (cos, sin, q_cos, q_sin), rows, pos, span, mask, cache)
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                x = self._moe(mlp, h, x)
            else:
                x = self._mlp(mlp, h, x)
        return F.rms_norm(x, x.shape[-1:], model.model.norm.weight, self.eps)

    def _rope_tables(self, pos: torch.Tensor):
        """Full-width tables so that rope(v) = v·cos + swap(v)·sin, swap exchanging the two halves of each pair."""
        cos, sin = self.model.rotary(pos[:, None])  # (n, 1, Dr/2)
        cos, sin = cos[:, 0], sin[:, 0]
        if self.interleave:  # pairs (v[2i], v[2i+1]): swap -> (v[2i+1], v[2i]), signs (-, +)
            return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)  # halves (v[:d/2], v[d/2:])

    def _rope(self, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleave:
            swapped = v.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        else:
            swapped = v.roll(self.Dr // 2, -1)
        return torch.addcmul(v * cos, swapped, sin)

    def _attention(self, i, layer, x, rope, rows, pos, span, mask, cache):
        attn, n = layer.self_attn, x.shape[0]
        cos, sin, q_cos, q_sin = rope
        H, R, Dn = self.H, self.R, self.Dn
        h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, self.eps)
        if attn.q_lora_rank:
            qa = F.rms_norm(F.linear(h, attn.q_a_proj.weight, attn.q_a_proj.bias), (attn.q_lora_rank,),
                            attn.q_a_layernorm.weight, self.eps)
            q = F.linear(qa, attn.q_b_proj.weight).view(n, H, Dn + self.Dr)
        else:
            q = F.linear(h, attn.q_proj.weight).view(n, H, Dn + self.Dr)
        ckv = F.linear(h, attn.kv_a_proj_with_mqa.weight, attn.kv_a_proj_with_mqa.bias)  # (n, R + Dr)
        latent = torch.cat((F.rms_norm(ckv[:, :R], (R,), attn.kv_a_layernorm.weight, self.eps),
                            self._rope(ckv[:, R:], cos, sin)), -1)  # (n, R + Dr): [c ; k_pe]
        data = cache.data[i]
        data.index_put_((rows, pos), latent)
        kv = data[:n, :span]  # (n, span, R + Dr)
        q_lat = torch.bmm(q[..., :Dn].transpose(0, 1), self.w_uk[i]).transpose(0, 1)  # (n, H, R), scaled
        q_pe = self._rope(q[..., Dn:], q_cos, q_sin)  # (n, H, Dr), scaled
        scores = torch.baddbmm(mask, torch.cat((q_lat, q_pe), -1), kv.transpose(1, 2))  # (n, H, span)
        o_lat = torch.bmm(scores.softmax(-1), kv[..., :R])  # (n, H, R)
        o = torch.bmm(o_lat.transpose(0, 1), self.w_uv_t[i]).transpose(0, 1).reshape(n, H * self.Dv)
        if attn.o_proj.bias is not None:
            x = x + attn.o_proj.bias
        return torch.addmm(x, o, attn.o_proj.weight.t())

    @staticmethod
    def _mlp(mlp: MLP, h, x):
        a = F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)
        return torch.addmm(x, a, mlp.down_proj.weight.t())

    def _moe(self, moe: MoE, h, x):
        weights, indices, _ = moe.gate(h)  # (n, K) each
        if moe.shared_experts is not None:
            x = self._mlp(moe.shared_experts, h, x)
        ex = moe.experts
        if len(h) > 1:  # several tokens: the module's expert-sorted grouped matmuls (fewer ops than a loop here)
            counts = torch.bincount(indices.flatten(), minlength=moe.n_experts)
            return x + ex(h, weights, indices, counts)
        # a single token: each chosen expert addmm-ed straight into the residual, its routing weight as alpha
        for e, w in zip(indices[0].tolist(), weights[0].tolist()):
            a = F.silu(F.linear(h, ex.gate_proj[e])) * F.linear(h, ex.up_proj[e])
            x = torch.addmm(x, a, ex.down_proj[e].t(), alpha=w)
        return x
