"""The DeepSeek-V3 causal LM: embeddings, decoder layers (dense first, then MoE), final norm, output head, and the
MTP modules stored after the main layers. Module names equal the Hugging Face parameter names, so a state dict
maps onto a checkpoint one to one (except stacked experts, see checkpoint.py).

Build with `build_model(cfg)`: the modules are created on the meta device (no memory, no init cost), materialised
on the target device, then `init_weights()` gives every tensor its starting value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from .block import DecoderLayer
from .layers import RMSNorm
from .moe import MoE, Experts, Gate
from .mtp import MTPLayer
from .rope import RotaryEmbedding


class Backbone(nn.Module):
    """Named `model` inside `Transformer`, like transformers' DeepseekV3Model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L = cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, i) for i in range(L)]
            + [MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)

    @property
    def main_layers(self) -> nn.ModuleList:
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.model.layers[self.config.num_hidden_layers :]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        positions: torch.Tensor | None = None,  # (B, T) absolute positions; required with a cache
        cache=None,  # engine.cache.LatentCache: decode with the absorbed latent cache
        return_mtp: bool = False,
        segments: torch.Tensor | None = None,  # (B, T) document index of each token of a packed row (training)
        token_mask: torch.Tensor | None = None,  # (B, T) bool, training: False on padding (no MoE balancing)
    ):
        """-> logits (B, T, V); with return_mtp, (logits, [logits of MTP depth k: (B, T-k, V)]).

        With `segments`, a row packs several documents: a token attends only to earlier tokens of its own document,
        and positions restart at 0 where a document starts, so each document is computed as if it were alone."""
        h, cos, sin, mask = self.hidden_states(input_ids, positions, cache, segments, token_mask)
        logits = self.lm_head(h)
        if not return_mtp:
            return logits
        return logits, self.mtp_logits(input_ids, h, cos, sin, mask, token_mask)

    def hidden_states(self, input_ids, positions=None, cache=None, segments=None, token_mask=None):
        """-> final normed hidden (B, T, D), the rope cos/sin used, and the document mask (B, 1, T, T) or None."""
        B, T = input_ids.shape
        mask = None
        if segments is not None:
            if cache is not None or positions is not None:
                raise ValueError("segments are for training forwards, without a cache or explicit positions")
            positions, mask = document_positions_and_mask(segments, self.model.embed_tokens.weight.dtype)
        elif positions is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs explicit positions")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        span = int(positions.max()) + 1 if cache is not None else None  # one host sync per forward, not per layer
        cos, sin = self.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.main_layers:
            x = layer(x, cos, sin, positions if cache is not None else None, cache, span, mask, token_mask)
        return self.model.norm(x), cos, sin, mask

    def mtp_logits(self, input_ids, h, cos, sin, mask=None, token_mask=None) -> list[torch.Tensor]:
        """Training-time MTP: depth k sees positions [0, T-k) and predicts the token k+1 ahead."""
        outs, h_prev, T = [], h, input_ids.shape[1]
        for k, layer in enumerate(self.mtp_layers, start=1):
            n = T - k
            if n <= 0:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])
            h_prev = layer(h_prev[:, :n], emb, cos[:, :n], sin[:, :n], mask=None if mask is None else mask[..., :n, :n],
                           token_mask=None if token_mask is None else token_mask[:, k:])  # padding of the tokens k ahead
            outs.append(self.lm_head(layer.shared_head.norm(h_prev)))
        return outs

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' sequence-wise balance losses from the last training forward."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def update_routing_bias(self, gamma: float, loads: list[torch.Tensor] | None = None) -> None:
        """Aux-loss-free balancing after an optimiser step; `loads` (one per MoE layer) e.g. all-reduced by DDP."""
        for i, m in enumerate(self.moe_layers()):
            m.update_bias(gamma, None if loads is None else loads[i])

    # --- initialisation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """How each tensor starts:
        - every linear weight, stacked expert weight, embedding and router weight: N(0, initializer_range²);
        - projections that write into the residual stream (o_proj, down_proj, experts' down_proj, eh_proj) are
          further divided by sqrt(2·num_hidden_layers), so the residual's variance does not grow with depth;
        - biases (attention_bias) 0; RMSNorm weights 1; the routing correction bias 0.
        """
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("o_proj", "down_proj", "eh_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, 0.0, std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_proj, 0.0, std)
                nn.init.normal_(module.up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, out_std)


def document_positions_and_mask(segments: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """segments (B, T) non-decreasing document indices -> positions (B, T) counted from each document's first token,
    and a (B, 1, T, T) additive float mask (0 where a token may attend: causal and within one document, else -inf;
    SDPA's CPU kernel takes it faster than a bool mask: 3% of a cpu-tiny training step). Built in the model's
    dtype, which SDPA requires of an additive mask (under autocast, autocast casts it with the queries)."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # index of the current document's first token
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = (same & causal)[:, None]
    additive = torch.zeros(B, 1, T, T, device=segments.device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return idx - first, additive


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, init: bool = True) -> Transformer:
    """Create on the meta device, materialise on `device` in `dtype`, optionally initialise."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype=dtype)
    if str(device) != "meta":
        model.to_empty(device=device)
        if cfg.tie_word_embeddings:  # to_empty gives every module its own tensor: tie the head to the embedding again
            model.lm_head.weight = model.model.embed_tokens.weight
        if init:
            model.init_weights()
    return model


def param_counts(model: Transformer) -> dict[str, int]:
    """Parameter counts: `total` and `active` (per token) of the main model, MTP modules counted apart."""
    cfg = model.config
    L = cfg.num_hidden_layers
    total = mtp = 0
    for name, p in model.named_parameters():
        idx = name.split(".")[2] if name.startswith("model.layers.") else None
        if idx is not None and int(idx) >= L:
            mtp += p.numel()
        else:
            total += p.numel()
    inactive = 0
    for layer in model.main_layers:
        if isinstance(layer.mlp, MoE):
            per_expert = sum(p[0].numel() for p in layer.mlp.experts.parameters())
            inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return {"total": total, "active": total - inactive, "mtp": mtp}
