"""Latent KV cache for MLA decoding: per layer, per sequence slot, only the normalised latent c (R values) and the
rotated rope key k_pe (Dr values) of every position are kept, side by side in one tensor `data` (layers, rows,
positions, R + Dr) with `kv` and `pe` as views of its two parts (so the decode fast path scores both in one bmm).
Preallocated; the caller passes the absolute position of each new token, so sequences in one batch may have
different lengths."""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers  # MTP layers attend too
        self.max_len = max_len
        R, Dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.data = torch.zeros(n_layers, batch_size, max_len, R + Dr, device=device, dtype=dtype)
        self.kv, self.pe = self.data.split([R, Dr], dim=-1)  # views: (L, B, S, R), (L, B, S, Dr)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2, with_mtp: bool = False) -> int:
        """Cache bytes one token costs across the main model's layers (with_mtp: and the MTP layers', as the
        engine's cache holds them)."""
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
        return layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes

    def update(self, layer: int, positions: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor, span: int):
        """Write c (B, T, R) and k_pe (B, T, Dr) at positions (B, T) of rows [0, B); return rows [0, B) of the
        first `span` positions: (B, span, R), (B, span, Dr)."""
        B = c.shape[0]
        kv, pe = self.kv[layer, :B], self.pe[layer, :B]
        kv.scatter_(1, positions[..., None].expand_as(c), c.to(kv.dtype))
        pe.scatter_(1, positions[..., None].expand_as(k_pe), k_pe.to(pe.dtype))
        return kv[:, :span], pe[:, :span]

    # --- rows are the engine's sequence slots ------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def rows(self, start: int, end: int) -> "LatentCache":
        """A cache sharing this one's storage whose rows [0, end - start) are rows [start, end) here, so a forward
        on a sub-batch (e.g. the prefill of newly admitted requests) writes straight into those slots."""
        view = LatentCache.__new__(LatentCache)
        view.max_len = self.max_len
        view.data, view.kv, view.pe = self.data[:, start:end], self.kv[:, start:end], self.pe[:, start:end]
        return view

    def copy_rows(self, src, dst, length: int | None = None) -> None:
        """Copy positions [0, length) of row(s) `src` into row(s) `dst` in every layer (MTP layers included).
        src/dst: ints or equal-length int lists/tensors."""
        n = self.max_len if length is None else length
        if not isinstance(src, int):
            src = torch.as_tensor(src, device=self.kv.device)
            dst = torch.as_tensor(dst, device=self.kv.device)
        self.data[:, dst, :n] = self.data[:, src, :n]
