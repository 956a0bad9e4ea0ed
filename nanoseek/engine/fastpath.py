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
of kv_b_proj); `refresh()` rewrites them in place, and the engine calls it whenever a kv_b_proj weight changed
(GRPO updates the model between rollouts). Float32 only (the CPU case); other dtypes keep the module path, whose
rounding this path would not reproduce. Tests: tests/test_engine.py checks it against the module path, step by step.

Compiled (`FastDecoder(model, compile=True)`; `nanoseek serve` and `chat` on the CPU): the same step runs through
`torch.compile` (inductor's generated C++: pointwise ops fused, no Python between ops). The graph only reads the
rows' past from the cache (a view whose length is marked dynamic, so one compilation serves every length; the batch
size too, so there are two graphs: one sequence, and any batch of 2 or more), scores each token's new latent beside
its past, and returns the new latents, which the caller writes. The routed experts are written as each (token,
chosen expert) pair's matrix-vector products, `(W[indices] * h).sum(-1)`, which inductor fuses into one loop that
reads each chosen expert's weights in place: no gathered copy, no per-expert call, no host sync. At batch 8 that is
4-5x faster than the eager grouped matmuls (bench/results/decode.md). In the one-sequence graph every projection
is written the same way (`_linear(..., "gemv")`), so inductor fuses it with the norms and activations around it
instead of calling a library matmul for a matrix-vector product; in the batch graph they are `(W xᵀ)ᵀ`, which MKL
runs faster than `x Wᵀ` at a few rows (see `_linear`). The first step of each graph compiles
(10-25 s on 2 cores, needs a C++ compiler); if compiling fails the decoder warns once and stays eager.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..model.layers import MLP
from ..model.moe import MoE


def _linear(x: torch.Tensor, lin: torch.nn.Linear, form: str) -> torch.Tensor:
    """x (n, in) -> lin(x) = x Wᵀ + b (n, out), in one of three forms of the same product:
    "lib"   F.linear (eager decoding).
    "wxt"   (W xᵀ)ᵀ, W (out, in) as stored (compiled batches, logits): MKL runs this order faster at a few rows than
            F.linear's x Wᵀ (see `logits`; in the compiled batch-8 step, 7% less time).
    "gemv"  a product and a sum (compiled, one token), which inductor fuses with the ops around it into one loop,
            instead of a library matmul call."""
    if form == "lib":
        return F.linear(x, lin.weight, lin.bias)
    y = (lin.weight @ x.t()).t() if form == "wxt" else (lin.weight * x[:, None, :]).sum(-1)
    return y if lin.bias is None else y + lin.bias


def logits(lm_head: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """h (n, D) -> lm_head(h) (n, V), as (W hᵀ)ᵀ. With MKL on the CPU, the vocabulary product at a few rows is
    1.5-3x faster this way round than as F.linear's h Wᵀ (cold weights, V 4096 x D 256, 2 threads: 1 row 0.3 against
    0.65 ms, 8 rows 0.6 against 0.9-1.1 ms), and one row as two equal rows (a matrix product) beats the matrix-vector
    product (0.3 against 0.6 ms)."""
    return _linear(h if len(h) > 1 else torch.cat((h, h)), lm_head, "wxt")[: len(h)]


class FastDecoder:
    def __init__(self, model, compile: bool = False):
        self.model = model
        cfg = model.config
        self.H, self.R, self.Dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.Dn, self.Dv, self.scale = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.softmax_scale
        self.interleave, self.eps = cfg.rope_interleave, cfg.rms_norm_eps
        self.layers = list(model.main_layers)
        self._versions = None
        self.w_uk: list[torch.Tensor] = []  # per layer (H, Dn, R)
        self.w_uv_t: list[torch.Tensor] = []  # per layer (H, R, Dv)
        self.refresh()
        self._compiled = torch.compile(self._step) if compile else None
        self.compiled_steps = 0

    @property
    def compiling(self) -> bool:
        """Whether steps go through torch.compile (asked for, and compiling has not failed)."""
        return self._compiled is not None

    @staticmethod
    def supports(model) -> bool:
        p = next(model.parameters())
        return p.dtype == torch.float32

    def _param_versions(self) -> tuple:
        """In-place updates (optimiser steps, load_state_dict) bump a tensor's version; the copies below derive
        from kv_b_proj alone, so only its weights are watched (identity too, in case one is replaced)."""
        return tuple((id(w), w._version) for w in (layer.self_attn.kv_b_proj.weight for layer in self.layers))

    def refresh(self) -> None:
        """(Re)build the per-head absorbed matrices from the current weights, in place once they exist (so a
        compiled step keeps reading the same tensors)."""
        H, Dn, R = self.H, self.Dn, self.R
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                w = layer.self_attn.kv_b_proj.weight.view(H, Dn + self.Dv, R)
                uk, uv_t = w[:, :Dn] * self.scale, w[:, Dn:].transpose(1, 2)  # (H, Dn, R), (H, R, Dv)
                if i < len(self.w_uk):
                    self.w_uk[i].copy_(uk)
                    self.w_uv_t[i].copy_(uv_t)
                else:
                    self.w_uk.append(uk.contiguous())
                    self.w_uv_t.append(uv_t.contiguous())
        self._versions = self._param_versions()

    def refresh_if_changed(self) -> None:
        if self._param_versions() != self._versions:
            self.refresh()

    # --- one decode step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """ids, pos (n,) -> final normed hidden (n, D); writes each layer's latent at (row i, pos[i]) of the cache
        (the sequences hold rows [0, n))."""
        n, span = ids.shape[0], int(pos.max())
        if self._compiled is not None and span >= 2:
            L = len(self.layers)  # the cache may hold MTP layers after the main ones
            past = cache.data[:L, :n, :span]  # (L, n, span, R + Dr): every row's past, and stale slots beyond
            torch._dynamo.mark_dynamic(past, 2)  # one graph for every length (sizes 0 and 1 would specialise)
            if n > 1:  # and one for every batch of 2 or more
                for t, dim in ((past, 1), (ids, 0), (pos, 0)):
                    torch._dynamo.mark_dynamic(t, dim)
            try:
                h, latents = self._compiled(ids, pos, past, past_only=True)
            except Exception as e:  # e.g. no C++ compiler; raised while compiling, before anything is written
                warnings.warn(f"compiling the decode step failed, decoding without it: {type(e).__name__}: {e}")
                self._compiled = None
            else:
                cache.data[:L, torch.arange(n), pos] = torch.stack(latents)  # (L, n, R + Dr)
                self.compiled_steps += 1
                return h
        return self._step(ids, pos, cache.data, past_only=False)[0]

    def _step(self, ids, pos, data, past_only: bool):
        """-> (final normed hidden (n, D), each layer's new latent (n, R + Dr)). data: the cache's (layers, rows,
        positions, R + Dr) tensor. past_only False: the new latents are written into it at (row i, pos[i]).
        past_only True (the compiled step): data is (layers, n, span, R + Dr), the n rows up to the longest past,
        only read (a graph that wrote into its input would copy the whole input back after every step; the caller
        writes instead); each token is scored against its row's past and, beside it, its own latent."""
        model = self.model
        n = ids.shape[0]
        span = data.shape[2] if past_only else int(pos.max()) + 1
        # the one-sequence graph: every projection a fused matrix-vector product; batches compiled: (W xᵀ)ᵀ
        form = ("gemv" if n == 1 else "wxt") if past_only else "lib"
        rows = None if past_only else torch.arange(n, device=ids.device)
        # (n, 1, span): past_only, row i's valid past is [0, pos[i]); else [0, pos[i]] with the new latent at pos[i]
        stale = torch.arange(span, device=ids.device) >= pos[:, None, None] + (0 if past_only else 1)
        mask = torch.zeros(n, 1, span, device=ids.device).masked_fill(stale, float("-inf"))
        cos, sin = self._rope_tables(pos)  # (n, Dr), for the keys
        q_cos, q_sin = cos[:, None] * self.scale, sin[:, None] * self.scale  # (n, 1, Dr), queries: scale folded in
        x = model.model.embed_tokens(ids)  # (n, D)
        latents = []
        for i, layer in enumerate(self.layers):
            x, latent = self._attention(i, layer, x, (cos, sin, q_cos, q_sin), rows, pos, span, mask, data[i], form)
            latents.append(latent)
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                x = self._moe(mlp, h, x, form)
            else:
                x = self._mlp(mlp, h, x, form)
        return F.rms_norm(x, x.shape[-1:], model.model.norm.weight, self.eps), latents

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

    def _attention(self, i, layer, x, rope, rows, pos, span, mask, data, form):
        """-> (x + attention output, the token's latent [c ; k_pe]). rows None: data holds the rows' past only."""
        attn, n = layer.self_attn, x.shape[0]
        cos, sin, q_cos, q_sin = rope
        H, R, Dn = self.H, self.R, self.Dn
        h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, self.eps)
        if attn.q_lora_rank:
            qa = F.rms_norm(_linear(h, attn.q_a_proj, form), (attn.q_lora_rank,), attn.q_a_layernorm.weight,
                            attn.q_a_layernorm.eps)
            q = _linear(qa, attn.q_b_proj, form).view(n, H, Dn + self.Dr)
        else:
            q = _linear(h, attn.q_proj, form).view(n, H, Dn + self.Dr)
        ckv = _linear(h, attn.kv_a_proj_with_mqa, form)  # (n, R + Dr)
        latent = torch.cat((F.rms_norm(ckv[:, :R], (R,), attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps),
                            self._rope(ckv[:, R:], cos, sin)), -1)  # (n, R + Dr): [c ; k_pe]
        if form == "gemv":  # (1, H, Dn, 1) * (H, Dn, R) summed over Dn
            q_lat = (q[..., :Dn, None] * self.w_uk[i]).sum(-2)  # (n, H, R), scaled
        else:
            q_lat = torch.bmm(q[..., :Dn].transpose(0, 1), self.w_uk[i]).transpose(0, 1)  # (n, H, R), scaled
        q_all = torch.cat((q_lat, self._rope(q[..., Dn:], q_cos, q_sin)), -1)  # (n, H, R + Dr), scaled
        if rows is None:  # data (n, span, R + Dr) is the past; the new latent is scored beside it, not written
            scores = torch.cat((torch.baddbmm(mask, q_all, data.transpose(1, 2)), q_all @ latent[:, :, None]), -1)
            probs = scores.softmax(-1)  # (n, H, span + 1)
            o_lat = torch.baddbmm(probs[..., -1:] * latent[:, None, :R], probs[..., :-1], data[..., :R])  # (n, H, R)
        else:
            data.index_put_((rows, pos), latent)  # data: this layer's (rows, positions, R + Dr)
            kv = data[:n, :span]  # (n, span, R + Dr)
            scores = torch.baddbmm(mask, q_all, kv.transpose(1, 2))  # (n, H, span)
            o_lat = torch.bmm(scores.softmax(-1), kv[..., :R])  # (n, H, R)
        if form == "gemv":
            o = (o_lat[..., None] * self.w_uv_t[i]).sum(-2).reshape(n, H * self.Dv)
        else:
            o = torch.bmm(o_lat.transpose(0, 1), self.w_uv_t[i]).transpose(0, 1).reshape(n, H * self.Dv)
        if form != "lib":
            return x + _linear(o, attn.o_proj, form), latent
        if attn.o_proj.bias is not None:
            x = x + attn.o_proj.bias
        return torch.addmm(x, o, attn.o_proj.weight.t()), latent

    @staticmethod
    def _mlp(mlp: MLP, h, x, form: str):
        a = F.silu(_linear(h, mlp.gate_proj, form)) * _linear(h, mlp.up_proj, form)
        if form != "lib":
            return x + _linear(a, mlp.down_proj, form)
        return torch.addmm(x, a, mlp.down_proj.weight.t())  # the residual add fused in

    def _moe(self, moe: MoE, h, x, form: str):
        weights, indices, _ = moe.gate(h)  # (n, K) each
        if moe.shared_experts is not None:
            x = self._mlp(moe.shared_experts, h, x, form)
        ex = moe.experts
        if form != "lib":  # compiled: each (token, chosen expert) pair's matrix-vector products as one fused loop
            Wg, Wu, Wd = ex.gate_proj[indices], ex.up_proj[indices], ex.down_proj[indices]  # (n, K, I, D), (n, K, D, I)
            a = F.silu((Wg * h[:, None, None]).sum(-1)) * (Wu * h[:, None, None]).sum(-1)  # (n, K, I)
            return x + ((Wd * a[:, :, None]).sum(-1) * weights[..., None]).sum(1)  # (n, K, D) -> (n, D)
        if len(h) > 1:  # several tokens, eager: the module's expert-sorted grouped matmuls (fewer ops than a loop)
            counts = torch.bincount(indices.flatten(), minlength=moe.n_experts)
            return x + ex(h, weights, indices, counts)
        # a single token, eager: each chosen expert addmm-ed straight into the residual, its routing weight as alpha
        for e, w in zip(indices[0].tolist(), weights[0].tolist()):
            a = F.silu(F.linear(h, ex.gate_proj[e])) * F.linear(h, ex.up_proj[e])
            x = torch.addmm(x, a, ex.down_proj[e].t(), alpha=w)
        return x
