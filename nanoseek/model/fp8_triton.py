"""Triton kernels for FP8 on sm90 (Hopper), used by fp8.py only where they reproduce its eager code at first use.

quantize_triton: one pass over x (R, C) that reads each 1×128 tile (or 128×128 block), takes its amax, scales, casts
to e4m3 and writes codes and float32 scales, instead of the ~6 kernels of the eager quantiser.
gemm_triton: out (M, N) = deq(a) (M, K) · deq(b)ᵀ with a in 1×128 tiles and b (N, K) in 128×128 blocks or 1×128
tiles, each 128-wide slice of the contraction multiplied by its two scales before it is added in float32 (DeepSeek's
promotion of partial sums); for the shapes cuBLASLt's block-scaled GEMM refuses (sides not multiples of 128).
Triton is imported on first use, so this module loads on machines without it.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _quant_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, q_ptr, s_ptr, R, C, sxr, sxc, BR: tl.constexpr, BLOCKWISE: tl.constexpr, POW2: tl.constexpr):
        # one program: rows [pr·BR, +BR) × columns [pc·128, +128) of x (R, C) (any strides); q, s row-major
        pr, pc = tl.program_id(0), tl.program_id(1)
        rows = pr * BR + tl.arange(0, BR)
        cols = pc * 128 + tl.arange(0, 128)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxr + cols[None, :].to(tl.int64) * sxc, mask=mask,
                    other=0.0).to(tl.float32)
        # IEEE divisions (tl.div_rn; Triton's `/` is approximate), so results equal the eager quantiser's
        amax = tl.max(tl.abs(x), axis=1)  # (BR,): per row of the 1×128 tile
        if BLOCKWISE:  # one scale for the whole 128×128 block, kept on every row
            amax = tl.zeros((BR,), dtype=tl.float32) + tl.max(amax, axis=0)
        s = tl.maximum(tl.div_rn(amax, tl.full((BR,), 448.0, tl.float32)), 1e-12)
        if POW2:
            s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        q = tl.div_rn(x, tl.broadcast_to(s[:, None], (BR, 128)))
        if BLOCKWISE:
            tl.store(s_ptr + pr * tl.cdiv(C, 128) + pc, tl.max(s, axis=0))
        else:
            tl.store(s_ptr + rows * tl.cdiv(C, 128) + pc, s, mask=rows < R)
        q = tl.minimum(tl.maximum(q, -448.0), 448.0).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], q, mask=mask)

    return kernel


def quantize_triton(x: torch.Tensor, pow2: bool, blockwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: x (R, C), C % 128 == 0 (and R for blocks) -> fp8 (R, C) contiguous, scales row-major."""
    R, C = x.shape
    BR = 128 if blockwise else 64
    q = torch.empty(R, C, device=x.device, dtype=torch.uint8)
    s = torch.empty(-(-R // BR) if blockwise else R, C // 128, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):  # Triton launches on the current device, not the tensors'
        _quant_kernel()[(-(-R // BR), C // 128)](x, q, s, R, C, x.stride(0), x.stride(1), BR=BR, BLOCKWISE=blockwise,
                                                 POW2=pow2, num_warps=8)
    return q.view(torch.float8_e4m3fn), s


@functools.lru_cache(maxsize=None)
def _gemm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, s_am, s_ak, s_bn, s_bk,
               B_BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        width = GROUP_M * grid_n  # grouped launch order: neighbouring programs share A rows in L2
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm, mn = rm < M, rn < N
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
        b_ptrs = b_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
        if B_BLOCK:
            sb_rows = rn // BK  # one scale per 128 output rows (weight blocks)
        else:
            sb_rows = rn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            mk = (k * BK + rk) < K
            a = tl.load(a_ptrs, mask=mm[:, None] & mk[None, :], other=0).to(tl.float8e4nv, bitcast=True)
            b = tl.load(b_ptrs, mask=mn[:, None] & mk[None, :], other=0).to(tl.float8e4nv, bitcast=True)
            sa = tl.load(sa_ptr + rm * s_am + k * s_ak, mask=mm, other=0.0)
            sb = tl.load(sb_ptr + sb_rows * s_bn + k * s_bk, mask=mn, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])  # promote each 128-slice to fp32
            a_ptrs += BK
            b_ptrs += BK
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])

    return kernel


def gemm_triton(aq, a_s, bq, b_s, b_block, out_dtype=torch.bfloat16):
    """aq (M, K), bq (N, K) fp8 codes; a_s / b_s their scales (as gemm_emulated in fp8.py) -> (M, N) out_dtype."""
    M, K = aq.shape
    N = bq.shape[0]
    out = torch.empty(M, N, device=aq.device, dtype=out_dtype)
    BM = BN = 128
    grid = (-(-M // BM) * -(-N // BN),)
    with torch.cuda.device(aq.device):
        _gemm_kernel()[grid](aq.view(torch.uint8), bq.view(torch.uint8), out, a_s, b_s, M, N, K, a_s.stride(0),
                             a_s.stride(1), b_s.stride(0), b_s.stride(1), B_BLOCK=b_block, BM=BM, BN=BN, BK=128,
                             GROUP_M=8, num_warps=8, num_stages=4)
    return out
