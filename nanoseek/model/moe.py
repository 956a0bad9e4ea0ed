"""DeepSeekMoE: a router, routed experts run as grouped matmuls over expert-sorted tokens, and shared experts.

Legend: N tokens (B·T flattened), D hidden, E routed experts, K experts per token, G expert groups, I expert width.

Router (V3, `topk_method="noaux_tc"`, `scoring_func="sigmoid"`):
  s = sigmoid(x Wᵀ)                                  scores_NE, float32
  b = e_score_correction_bias                        float32 buffer, no gradient, moved by aux-loss-free balancing
  group score = sum of the top-2 of (s + b) in each group; keep the best `topk_group` groups
  choose the top-K experts of (s + b) inside the kept groups
  weight each chosen expert by the *unbiased* s, normalise to sum 1 (`norm_topk_prob`), times routed_scaling_factor
V2's `softmax` scoring with `greedy` / `group_limited_greedy` (group score = max) is supported too.

Experts: the N·K (token, expert) pairs are sorted by expert, so each expert's tokens are one contiguous block, and
one `torch.nn.functional.grouped_mm` per projection runs all experts at once (no per-expert Python loop, no host
synchronisation; under autocast the experts' input is cast to bf16, since CUDA's grouped_mm takes no float32).
Where grouped_mm is unavailable (CUDA float32, widths not a multiple of 16 bytes, old PyTorch) a per-expert loop over
the same sorted blocks is the fallback; on the CPU a decode-sized batch (fewer pairs than experts) loops over only the
experts it hits, since grouped_mm visits every expert.

Balancing: the per-expert token counts of every forward are accumulated in `load` (float32, no gradient);
`update_bias(γ)` applies DeepSeek-V3's aux-loss-free rule b_i += γ·sign(mean load − load_i) and resets `load`.
With `aux_loss_alpha > 0` in training, the sequence-wise balance loss
  L = α Σ_i f_i P_i,  f_i = E/(K·T) · #(tokens of the sequence routed to i),  P_i = mean_t s_{t,i}/Σ_j s_{t,j}
is averaged over sequences and left in `aux_loss` for the trainer to add. A training forward may mark padding
(`token_mask`): it counts in neither, so rows padded to another length route and balance alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_groups, self.topk_groups = cfg.n_group or 1, cfg.topk_group or 1
        self.scoring, self.method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        """Keep the correction bias in float32 through model.to(dtype) / .half() / to_empty()."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            moved = self.e_score_correction_bias
            self.e_score_correction_bias = (
                torch.empty_like(moved, dtype=torch.float32) if bias.is_meta else bias.to(moved.device, torch.float32)
            )
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, K) float32, indices (N, K), scores (N, E) float32. Autocast is turned off here:
        it would run the linear in bf16 whatever its inputs, and bf16 sigmoid scores step by 2⁻⁸ (coarser than the
        bias step γ), which ties experts and changes the choice of about 2% of tokens."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x)
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_groups > 1 and self.method != "greedy":
            N = x.shape[0]
            grouped = choice.view(N, self.n_groups, -1)  # (N, G, E/G)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask[:, :, None].expand_as(grouped).reshape(N, -1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (M, in) rows sorted by group; w (E, in, out); offsets (E,) int32 cumulative row ends -> (M, out)."""
    w = w.to(x.dtype)  # under autocast Experts casts x to bf16; master weights stay float32 (grouped_mm: no autocast)
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], w.shape[-2], w.shape[-1]))
    native = hasattr(F, "grouped_mm") and aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)
    if native:
        return F.grouped_mm(x, w, offs=offsets)
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):  # fallback: one host sync, then a loop over experts
        out.append(x[start:end] @ w[e])
        start = end
    return torch.cat(out)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked, each matrix in nn.Linear orientation (out, in) as the checkpoints hold it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor):
        """x (N, D), weights/indices (N, K), counts (E,) tokens per expert -> (N, D)."""
        N, K = indices.shape
        order = indices.flatten().argsort(stable=True)  # (N·K,) pair ids sorted by expert
        token = order // K  # source token of each sorted pair
        xs = x[token]  # (N·K, D)
        if torch.is_autocast_enabled(x.device.type):  # the residual stream is float32; CUDA's grouped_mm needs bf16
            xs = xs.to(torch.get_autocast_dtype(x.device.type))
        if x.device.type == "cpu" and N * K < counts.numel():
            ys = self._hit_experts_only(xs, counts)  # decode-sized batch: most experts are idle
        else:
            offsets = counts.cumsum(0).to(torch.int32)
            h = F.silu(grouped_mm(xs, self.gate_proj.mT, offsets)) * grouped_mm(xs, self.up_proj.mT, offsets)
            ys = grouped_mm(h, self.down_proj.mT, offsets)  # (N·K, D)
        ys = ys * weights.flatten()[order, None]  # float32 weights promote, as transformers does
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


    def _hit_experts_only(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Per-expert loop over the experts that received tokens (on the CPU reading counts costs no sync)."""
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                h = F.silu(xs[start : start + n] @ self.gate_proj[e].T) * (xs[start : start + n] @ self.up_proj[e].T)
                out.append(h @ self.down_proj[e].T)
                start += n
        return torch.cat(out)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.aux_alpha = cfg.aux_loss_alpha if cfg.seq_aux else 0.0
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.load: torch.Tensor | None = None  # float32 tokens per expert since the last bias update (training)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). In training, `token_mask` (B, T) bool marks the real tokens: padding (False)
        is computed but counts in neither `load` nor the balance loss."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)
        flat_idx = indices.flatten()  # scatter_add_, not bincount: CUDA's bincount reads min/max back to the host
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx))  # (E,)
        y = self.experts(flat, weights, indices, counts).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            real = None if token_mask is None else token_mask.reshape(B, T)
            if real is not None:  # real tokens' picks only; a scatter, not a masked select (no host sync on CUDA)
                picks = real.reshape(-1, 1).expand(-1, self.top_k).reshape(-1).float()  # (N·K,)
                counts = torch.zeros(self.n_experts, device=x.device).scatter_add_(0, indices.flatten(), picks)
            self.load = counts.float() if self.load is None else self.load + counts
            self.aux_loss = self._sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, self.top_k), real)
        return y

    def _sequence_balance_loss(self, scores_BTE: torch.Tensor, indices_BTK: torch.Tensor,
                               real_BT: torch.Tensor | None = None) -> torch.Tensor | None:
        """α Σ_i f_i P_i per sequence over its real tokens (all, without `real_BT`), averaged over sequences."""
        if not self.aux_alpha:
            return None
        B, T, E = scores_BTE.shape
        share = scores_BTE / scores_BTE.sum(-1, keepdim=True)  # (B, T, E)
        picks = torch.ones(B, indices_BTK[0].numel(), device=scores_BTE.device)  # (B, T·K)
        if real_BT is None:
            P, n = share.mean(dim=1), T  # (B, E)
        else:  # padding counts in neither P nor f; a row of padding alone drops out of the mean
            real = real_BT.float()
            n = real.sum(1, keepdim=True).clamp(min=1)  # (B, 1) real tokens per sequence
            P = (share * real[..., None]).sum(1) / n
            picks = real[..., None].expand(B, T, self.top_k).reshape(B, -1)
        f = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(1, indices_BTK.reshape(B, -1), picks)
        per_seq = (f * (E / (self.top_k * n)) * P).sum(-1)  # (B,)
        if real_BT is None:
            return self.aux_alpha * per_seq.mean()
        keep = real_BT.any(1).to(per_seq.dtype)  # a weighted mean, not a boolean index (nonzero syncs on CUDA)
        return self.aux_alpha * (per_seq * keep).sum() / keep.sum().clamp(min=1)

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing step; `load` overrides the local counts (e.g. all-reduced across ranks)."""
        load = self.load if load is None else load
        if self.gate.e_score_correction_bias is not None and load is not None:
            self.gate.e_score_correction_bias += gamma * torch.sign(load.float().mean() - load.float())
        self.load = None
