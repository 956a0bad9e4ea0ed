"""Block-wise FP8 (e4m3) weights, DeepSeek-V3 checkpoint style.

DeepSeek ships every linear weight of attention and FFN as float8_e4m3fn values plus one float32 `weight_scale_inv`
per 128×128 block: real_weight[i, j] = fp8[i, j] · scale_inv[i // 128, j // 128]. Quantising picks
scale_inv = amax(block) / 448 (448 is e4m3's largest finite value), so every block uses the full FP8 range and one
outlier only costs precision inside its own block. Edge blocks of a matrix whose sides are not multiples of 128 are
simply smaller.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
BLOCK = 128


def _expand(scale: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    """(ceil(M/b), ceil(N/b)) block scales -> (M, N) elementwise scales."""
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def quantize_block(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (M, N) -> (fp8 (M, N), scale_inv (ceil(M/b), ceil(N/b)) float32)."""
    M, N = w.shape
    w32 = w.float()
    pad = torch.zeros(-(-M // block) * block, -(-N // block) * block, dtype=torch.float32, device=w.device)
    pad[:M, :N] = w32.abs()
    amax = pad.view(pad.shape[0] // block, block, pad.shape[1] // block, block).amax(dim=(1, 3))
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w32 / _expand(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def dequantize_block(q: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32, block: int = BLOCK) -> torch.Tensor:
    """fp8 (M, N) and its block scales -> real weights (M, N) in `dtype`."""
    return (q.float() * _expand(scale_inv.float(), q.shape, block)).to(dtype)
