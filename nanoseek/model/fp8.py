"""FP8 (e4m3) in nanoseek: DeepSeek-V3's block-wise checkpoint format, and its FP8 training recipe (V3 report §3.3).

Checkpoints. DeepSeek ships every linear weight of attention and FFN as float8_e4m3fn values plus one float32
`weight_scale_inv` per 128×128 block: real_weight[i, j] = fp8[i, j] · scale_inv[i // 128, j // 128]. Quantising
picks scale_inv = amax(block) / 448 (448 is e4m3's largest finite value), so every block uses the full FP8 range and
one outlier only costs precision inside its own block. Edge blocks of a matrix whose sides are not multiples of 128
are simply smaller (`quantize_block` / `dequantize_block`).

Training. A linear layer y = x Wᵀ costs three GEMMs per step, and all three run with FP8 operands:
    forward  y  (M, N) = x  (M, K) · Wᵀ       x in 1×128 tiles (one scale per token per 128 channels), W in 128×128
    dgrad    dx (M, K) = dy (M, N) · W        dy in 1×128 tiles along N (the contraction), W's blocks reused
    wgrad    dW (N, K) = dyᵀ (N, M) · x       dyᵀ and xᵀ both in 1×128 tiles along M (= 128×1 tiles of dy and x)
Each scale is amax(tile)/448 in float32 (`pow2_scales=True` rounds it up to 2^ceil(log2), so rescaling is exact),
products accumulate in float32 and every 128-wide slice of the contraction is multiplied by its two scales before
it is added, as DeepSeek promotes partial sums to FP32 CUDA cores. Fine tiles are the point: one outlier channel or
token only coarsens its own 128 values, which is why e4m3 (3 mantissa bits, more precision, less range than e5m2)
suffices for gradients too. The weight's FP8 copy and scales are made once per forward and reused (transposed; a
128×128 block is the same block either way round) by dgrad; x is saved in its own dtype and re-quantised along
tokens for wgrad (DeepSeek caches it in FP8 and re-tiles it; we trade that memory saving for one less rounding).
What stays in high precision, as in DeepSeek: the embedding, the router (`mlp.gate`), the output head, norms,
attention's softmax, and the optimizer's master weights (the module keeps its real `weight` parameter, so state
dicts, checkpoints and `MLA._absorbed`, which reads `kv_b_proj.weight`, are untouched).

Backends (chosen per device at first use, each checked against the emulation on random data before it is used):
  - "emulate" (CPU, any GPU without FP8 tensor cores): quantise → dequantise → float32 matmul. Bit-for-bit the same
    rounding of the operands; only the order of float32 accumulation differs from a real FP8 GEMM.
  - "cublas" (sm90): `torch.nn.functional.scaled_mm` with ScalingType.BlockWise1x128 / BlockWise128x128 (cuBLASLt,
    CUDA >= 12.9). Sides must be multiples of 128. On an H100 it ran 1.1 PFLOP/s against 0.75 for bf16.
  - "triton" (sm90): a small Triton kernel (fp8_triton.py) with the same per-128-slice scaled accumulation, for shapes
    cuBLAS refuses (e.g. kv_a_proj's 576 outputs). Correct but slow (0.42 PFLOP/s, below bf16).
  On CUDA a one-pass Triton kernel quantises (read, per-tile amax, scale, cast, write; used only if it reproduces
  the eager quantiser at first use), else `torch.compile` of the eager code (correct, but on an H100 it cost about
  as much as the FP8 GEMM it feeds). Force a GEMM backend with NANOSEEK_FP8_BACKEND=emulate|cublas|triton.

Routed experts (`FP8Experts`) use a coarser, honestly named recipe: *row-wise* FP8. PyTorch's grouped scaled GEMM
on sm90 (`torch._scaled_grouped_mm`) takes one scale per row (per token for activations, per output channel for
weights), not 1×128 / 128×128 blocks, so forward and dgrad run as row-wise FP8 grouped GEMMs and wgrad stays a bf16
grouped GEMM. The CPU emulates exactly that recipe.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_triton import gemm_triton, quantize_triton
from .moe import Experts, grouped_mm

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


# --- quantisation for training ------------------------------------------------------------------------------------
def _scale_of(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """amax (any shape) -> float32 scale with amax / scale <= 448; with pow2 the next power of two up (exactly:
    a float with a non-zero mantissa carries into its exponent and the mantissa is cleared)."""
    s = (amax.float() / FP8_MAX).clamp(min=1e-12)
    if pow2:
        s = ((s.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return s


def _quantize_tiles_eager(x: torch.Tensor, tile: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    kb = -(-K // tile)
    xp = x.float().contiguous()  # x may be a transposed view (tiling along tokens)
    if kb * tile != K:
        xp = F.pad(xp, (0, kb * tile - K))
    t = xp.view(M, kb, tile)
    s = _scale_of(t.abs().amax(dim=-1), pow2)  # (M, kb)
    q = (t / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(M, kb * tile)
    return (q if kb * tile == K else q[:, :K].contiguous()), s


_COMPILE = os.environ.get("NANOSEEK_FP8_COMPILE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _compiled(fn, **kw):
    """On CUDA the quantisers run `torch.compile`d: one fused read-reduce-scale-cast pass instead of ~6 kernels.
    torch.compile is lazy (a missing Triton or C compiler shows only at the first call), so a call that fails falls
    back to eager for good: eager is correct, just slower."""
    eager = functools.partial(fn, **kw)
    try:
        dyn = torch._dynamo.config  # one entry per dtype × layout (contiguous / transposed) × pow2: allow them all
        dyn.recompile_limit = max(getattr(dyn, "recompile_limit", 8), 64)
        compiled = torch.compile(eager, dynamic=True)
    except Exception as e:  # noqa: BLE001 - no inductor
        _warn_once(f"torch.compile unavailable for FP8 quantisation ({_why(e)}); using eager")
        return eager

    def call(x):
        nonlocal compiled
        if compiled is not None:
            try:
                return compiled(x)
            except Exception as e:  # noqa: BLE001 - e.g. InductorError: no Triton / no working C compiler
                _warn_once(f"torch.compile failed for FP8 quantisation ({_why(e)}); using eager")
                compiled = None
        return eager(x)

    return call


def _fast(x: torch.Tensor, *dims: int) -> bool:
    return x.is_cuda and _COMPILE and x.numel() > 0 and all(d % BLOCK == 0 for d in dims)


def quant_mismatch(a, b) -> str | None:
    """None if two (fp8, scale) results agree: scales within 1e-6 relative, at most 0.1% of the codes one step
    apart (rounding ties), dequantised values within 1e-3 relative. Bitwise equality is what we expect."""
    (q1, s1), (q2, s2) = a, b
    if s1.shape != s2.shape or q1.shape != q2.shape:
        return f"shapes {tuple(s1.shape)} vs {tuple(s2.shape)}"
    ds = ((s1 - s2).abs() / s2).max().item()
    diff = (q1.view(torch.uint8) != q2.view(torch.uint8)).float().mean().item()
    d1, d2 = q1.float(), q2.float()
    rel = ((d1 - d2).norm() / d2.norm().clamp(min=1e-30)).item()
    return None if ds <= 1e-6 and diff <= 1e-3 and rel <= 1e-3 else f"scale rel {ds:.2g}, codes {diff:.2%}, {rel:.2g}"


@functools.lru_cache(maxsize=None)
def _quant_impl(device: torch.device) -> str:
    """'triton' if the one-pass Triton quantiser reproduces the eager one on this device, else 'compile'."""
    g = torch.Generator().manual_seed(7)
    try:
        x = (torch.randn(384, 256, generator=g) * torch.exp2(torch.randint(-8, 9, (384, 1), generator=g))).to(device)
        for pow2 in (False, True):
            for inp in (x, x.t(), x.bfloat16(), x.bfloat16().t()):
                why = quant_mismatch(quantize_triton(inp, pow2, False), _quantize_tiles_eager(inp, BLOCK, pow2))
                assert why is None, f"tiles pow2={pow2} {inp.dtype} stride={inp.stride()}: {why}"
            why = quant_mismatch(quantize_triton(x, pow2, True), _quantize_weight_eager(x, pow2))
            assert why is None, f"blocks pow2={pow2}: {why}"
        BACKEND_REPORT["quantiser"] = "triton"
        return "triton"
    except Exception as e:  # noqa: BLE001 - Triton missing or different: the compiled quantiser is correct too
        BACKEND_REPORT["quantiser"] = f"compile (triton: {_why(e)})"
        return "compile"


def quantize_tiles(x: torch.Tensor, tile: int = BLOCK, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (fp8 (M, K), scale (M, ceil(K/tile)) float32): x ≈ fp8 · scale, one scale per 1×tile tile along
    the last dim (the last tile of a row may be shorter). Pass x.t() to tile along the first dim instead."""
    if tile == BLOCK and _fast(x, x.shape[1]):
        if _quant_impl(x.device) == "triton":
            return quantize_triton(x, pow2, False)
        return _compiled(_quantize_tiles_eager, tile=BLOCK, pow2=pow2)(x)
    return _quantize_tiles_eager(x, tile, pow2)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = BLOCK) -> torch.Tensor:
    """fp8 (M, K), scale (M, ceil(K/tile)) -> float32 (M, K)."""
    return q.float() * scale.repeat_interleave(tile, dim=1)[:, : q.shape[1]]


def quantize_weight(w: torch.Tensor, pow2: bool = False, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (fp8 (N, K), scale (ceil(N/b), ceil(K/b)) float32). Equals `quantize_block` when pow2 is False."""
    if block == BLOCK and _fast(w, *w.shape):
        if _quant_impl(w.device) == "triton":
            return quantize_triton(w, pow2, True)
        return _compiled(_quantize_weight_eager, pow2=pow2)(w)
    return _quantize_weight_eager(w, pow2, block)


def _quantize_weight_eager(w: torch.Tensor, pow2: bool, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wp = w.float()
    if (nb * block, kb * block) != (N, K):
        wp = F.pad(wp, (0, kb * block - K, 0, nb * block - N))
    t = wp.view(nb, block, kb, block)
    s = _scale_of(t.abs().amax(dim=(1, 3)), pow2)  # (nb, kb)
    q = (t / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(nb * block, kb * block)
    return q[:N, :K].contiguous(), s


# --- FP8 GEMMs: out (M, N) = deq(a) (M, K) · deq(b)ᵀ, a in 1×128 tiles, b (N, K) in 128×128 blocks or 1×128 tiles --
def gemm_emulated(aq, a_s, bq, b_s, b_block: bool, out_dtype=torch.float32) -> torch.Tensor:
    a = dequantize_tiles(aq, a_s)
    b = dequantize_block(bq, b_s) if b_block else dequantize_tiles(bq, b_s)
    return (a @ b.t()).to(out_dtype)


def _col_major(s: torch.Tensor) -> torch.Tensor:
    return s.t().contiguous().t()  # same shape, stride (1, rows): the "outer-dim-major" layout cuBLASLt wants


def _gemm_scaled_mm_v2(aq, a_s, bq, b_s, b_block, out_dtype=torch.bfloat16):
    ST = F.ScalingType
    if b_block:  # (L4, N/128) with stride (1, L4): contraction blocks padded to a multiple of 4
        kb = a_s.shape[1]
        sb, rb = F.pad(b_s, (0, -(-kb // 4) * 4 - kb)).t(), ST.BlockWise128x128
    else:
        sb, rb = _col_major(b_s), ST.BlockWise1x128
    return F.scaled_mm(aq, bq.t(), _col_major(a_s), ST.BlockWise1x128, sb, rb, output_dtype=out_dtype)


# name -> (gemm, needs sides that are multiples of 128)
_CANDIDATES = {
    "cublas": (_gemm_scaled_mm_v2, True),
    "triton": (gemm_triton, False),
}
_WARNED: set[str] = set()


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


_ALIGNED = ((320, 384, 256), (256, 512, 384))  # (M, K, N): K/128 = 3 and 4, N/128 = 2 and 3


def _selfcheck(fn, device, shapes=_ALIGNED) -> str | None:
    """Run `fn` on random operands whose tiles span 2^±6 in magnitude; None if it matches the emulation."""
    g = torch.Generator(device="cpu").manual_seed(1234)

    def operand(rows, cols, block_rows):  # magnitudes vary per tile/block, so a misplaced scale shows
        mag = torch.exp2(torch.randint(-6, 7, (-(-rows // block_rows), -(-cols // BLOCK)), generator=g).float())
        mag = mag.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
        return (torch.randn(rows, cols, generator=g) * mag).to(device)

    try:
        for M, K, N in shapes:
            for b_block in (True, False):
                aq, a_s = quantize_tiles(operand(M, K, 1))
                b = operand(N, K, BLOCK if b_block else 1)
                bq, b_s = quantize_weight(b) if b_block else quantize_tiles(b)
                ref = gemm_emulated(aq, a_s, bq, b_s, b_block)
                out = fn(aq, a_s, bq, b_s, b_block).float()
                err = ((out - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    return f"M,K,N={M},{K},{N} b_block={b_block}: relative error {err:.3g}"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "not this backend"
        return _why(e)


BACKEND_REPORT: dict[str, str] = {}  # candidate -> "ok" or why it was rejected (filled at first CUDA use)


@functools.lru_cache(maxsize=None)
def _backends_for(device: torch.device) -> tuple[str, ...]:
    """Usable real backends on this device, best first; () means emulate."""
    if device.type != "cuda":
        return ()
    if torch.cuda.get_device_capability(device) < (8, 9):
        _warn_once(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (they start at sm89: L40, H100): "
                   "FP8 is emulated, which is slower than plain bf16 training")
        return ()
    forced = os.environ.get("NANOSEEK_FP8_BACKEND", "")
    if forced == "emulate":
        return ()
    names = [forced] if forced else list(_CANDIDATES)
    ok = []
    for name in names:
        fn, aligned_only = _CANDIDATES[name]
        why = _selfcheck(fn, device, _ALIGNED + (() if aligned_only else ((200, 320, 192),)))
        BACKEND_REPORT[name] = why or "ok"
        if why is None:
            ok.append(name)
    if not ok:
        _warn_once(f"no FP8 GEMM backend works on {device} ({BACKEND_REPORT}); emulating FP8 (slow)")
    return tuple(ok)


def fp8_gemm(aq, a_s, bq, b_s, b_block: bool, out_dtype, backend: str = "auto") -> torch.Tensor:
    """(M, N) = deq(aq) · deq(bq)ᵀ with the best verified backend that takes these shapes."""
    if backend == "auto":
        backend = "emulate"
        aligned = aq.shape[1] % BLOCK == 0 and bq.shape[0] % BLOCK == 0
        for name in _backends_for(aq.device):
            if aligned or not _CANDIDATES[name][1]:
                backend = name
                break
    if backend != "emulate":
        try:
            return _CANDIDATES[backend][0](aq, a_s, bq, b_s, b_block, torch.bfloat16).to(out_dtype)
        except RuntimeError as e:  # a shape the library rejects: emulate this one, say so once
            _warn_once(f"FP8 {backend} GEMM failed for {tuple(aq.shape)}x{tuple(bq.shape)} ({e}); emulating")
    return gemm_emulated(aq, a_s, bq, b_s, b_block, out_dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# --- FP8Linear ----------------------------------------------------------------------------------------------------
class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, pow2: bool, backend: str, out_dtype: torch.dtype):
        # x (M, K), weight (N, K) -> y (M, N)
        with torch.autocast(x.device.type, enabled=False):
            xq, xs = quantize_tiles(x, pow2=pow2)  # (M, K), (M, K/128)
            wq, ws = quantize_weight(weight.detach(), pow2)  # (N, K), (N/128, K/128)
            y = fp8_gemm(xq, xs, wq, ws, True, out_dtype, backend)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(x, wq, ws)
        ctx.cfg = (pow2, backend, weight.dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wq, ws = ctx.saved_tensors
        pow2, backend, w_dtype, has_bias = ctx.cfg
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.contiguous()
            if ctx.needs_input_grad[0]:  # dgrad: dx (M, K) = dy (M, N) · W (N, K); W as (K, N) in 128×128 blocks
                gq, gs = quantize_tiles(dy, pow2=pow2)  # tiles along N
                dx = fp8_gemm(gq, gs, wq.t().contiguous(), ws.t().contiguous(), True, x.dtype, backend)
            if ctx.needs_input_grad[1]:  # wgrad: dW (N, K) = dyᵀ (N, M) · x (M, K), both tiled along M
                g, xx = dy, x
                if dy.is_cuda and dy.shape[0] % BLOCK:  # zero tokens change nothing; keeps real GEMMs aligned
                    pad = BLOCK - dy.shape[0] % BLOCK
                    g, xx = F.pad(dy, (0, 0, 0, pad)), F.pad(x, (0, 0, 0, pad))
                gq, gs = quantize_tiles(g.t(), pow2=pow2)  # (N, M), (N, M/128)
                xq, xs = quantize_tiles(xx.t(), pow2=pow2)  # (K, M), (K, M/128)
                dw = fp8_gemm(gq, gs, xq, xs, False, w_dtype, backend)
            if has_bias and ctx.needs_input_grad[2]:
                db = dy.float().sum(0)
        return dx, dw, db, None, None, None


def fp8_linear(x, weight, bias=None, pow2_scales: bool = False, backend: str = "auto") -> torch.Tensor:
    """F.linear with FP8 GEMMs in forward and backward. x (..., K), weight (N, K) -> (..., N)."""
    out_dtype = _compute_dtype(x)
    y = _FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias, pow2_scales, backend, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (DeepSeek-V3 recipe). `weight` stays the real (master) parameter."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, pow2_scales=False,
                 backend="auto"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.pow2_scales, self.backend = pow2_scales, backend

    @classmethod
    def from_linear(cls, lin: nn.Linear, pow2_scales: bool = False, backend: str = "auto") -> "FP8Linear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta", pow2_scales=pow2_scales,
                  backend=backend)
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameter objects: optimizer / state dict unchanged
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.pow2_scales, self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, pow2_scales={self.pow2_scales}"


# --- routed experts: row-wise FP8 grouped GEMMs -------------------------------------------------------------------
def quantize_rows(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (fp8 (..., K), scale (...) float32): one scale per row."""
    s = _scale_of(x.abs().amax(dim=-1), pow2)
    return (x.float() / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous(), s


def _qrows(x, pow2):
    return _compiled(quantize_rows, pow2=pow2)(x) if _fast(x) else quantize_rows(x, pow2)


def _grouped_emulated(xq, xs, wq, ws, offsets, out_dtype):
    """xq (M, K) rows sorted by group, wq (E, N, K), scales (M,), (E, N) -> (M, N)."""
    x = xq.float() * xs[:, None]
    w = wq.float() * ws[..., None]
    return grouped_mm(x, w.mT, offsets).to(out_dtype)


def _grouped_real(xq, xs, wq, ws, offsets, out_dtype):
    return torch._scaled_grouped_mm(xq, wq.mT, xs, ws, offs=offsets, out_dtype=torch.bfloat16).to(out_dtype)


@functools.lru_cache(maxsize=None)
def _grouped_backend(device: torch.device) -> str:
    if device.type != "cuda" or os.environ.get("NANOSEEK_FP8_BACKEND") == "emulate" or not hasattr(
        torch, "_scaled_grouped_mm"
    ):
        return "emulate"
    g = torch.Generator().manual_seed(0)
    try:
        x = (torch.randn(300, 256, generator=g) * torch.exp2(torch.randint(-6, 7, (300, 1), generator=g))).to(device)
        w = (torch.randn(4, 384, 256, generator=g) * torch.exp2(torch.randint(-6, 7, (4, 384, 1), generator=g)))
        offs = torch.tensor([37, 37, 200, 300], dtype=torch.int32, device=device)  # an empty group included
        (xq, xs), (wq, ws) = quantize_rows(x), quantize_rows(w.to(device))
        ref = _grouped_emulated(xq, xs, wq, ws, offs, torch.float32)
        err = ((_grouped_real(xq, xs, wq, ws, offs, torch.float32) - ref).norm() / ref.norm()).item()
        BACKEND_REPORT["grouped-rowwise"] = "ok" if err < 1e-2 else f"relative error {err:.3g}"
    except Exception as e:  # noqa: BLE001
        BACKEND_REPORT["grouped-rowwise"] = _why(e)
    if BACKEND_REPORT["grouped-rowwise"] != "ok":
        _warn_once(f"row-wise FP8 grouped GEMM unusable ({BACKEND_REPORT['grouped-rowwise']}); emulating experts")
        return "emulate"
    return "real"


def _wgrad_grouped(dy, x, offsets, out_dtype):
    """dW (E, N, K) = per group dy_gᵀ (N, m_g) · x_g (m_g, K) in bf16 on CUDA (float32 on the CPU)."""
    dt = torch.bfloat16 if dy.is_cuda else torch.float32
    a, b = dy.to(dt).t(), x.to(dt)  # tokens the outer (strided) dim of both, as grouped_mm's own backward has it
    try:
        return F.grouped_mm(a, b, offs=offsets).to(out_dtype)
    except Exception:  # noqa: BLE001 - unaligned sizes, old PyTorch: loop over the groups
        out, start = [], 0
        for end in offsets.tolist():
            out.append(a[:, start:end].float() @ b[start:end].float())
            start = end
        return torch.stack(out).to(out_dtype)


class _FP8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, pow2: bool, out_dtype: torch.dtype):
        # x (M, K) sorted by expert, w (E, N, K), offsets (E,) int32 -> (M, N)
        with torch.autocast(x.device.type, enabled=False):
            gemm = _grouped_real if _grouped_backend(x.device) == "real" else _grouped_emulated
            xq, xs = _qrows(x, pow2)  # per token
            wq, ws = _qrows(w.detach(), pow2)  # per expert output channel
            y = gemm(xq, xs, wq, ws, offsets, out_dtype)
        ctx.save_for_backward(x, w, offsets)
        ctx.cfg = (pow2, gemm)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        pow2, gemm = ctx.cfg
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.contiguous()
            if ctx.needs_input_grad[0]:  # dx (M, K) = dy (M, N) · W_e (N, K): W_eᵀ rows = input channels
                gq, gs = _qrows(dy, pow2)
                wtq, wts = _qrows(w.detach().mT, pow2)  # (E, K, N), scales (E, K)
                dx = gemm(gq, gs, wtq, wts, offsets, x.dtype)
            if ctx.needs_input_grad[1]:
                dw = _wgrad_grouped(dy, x, offsets, w.dtype)
        return dx, dw, None, None, None


class FP8Experts(Experts):
    """Drop-in for moe.Experts (same stacked parameters) running its projections as row-wise FP8 grouped GEMMs."""

    def __init__(self, experts: Experts, pow2_scales: bool = False):
        nn.Module.__init__(self)  # no new parameters: share the converted module's
        self.gate_proj, self.up_proj, self.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        self.pow2_scales = pow2_scales

    def forward(self, x, weights, indices, counts):
        """x (N, D), weights/indices (N, K), counts (E,) -> (N, D); same routing arithmetic as moe.Experts."""
        N, K = indices.shape
        if N * K < counts.numel():  # decode-sized batch: the high-precision per-expert path
            return super().forward(x, weights, indices, counts)
        order = indices.flatten().argsort(stable=True)
        token = order // K
        xs = x[token]  # (N·K, D) sorted by expert
        offsets = counts.cumsum(0).to(torch.int32)
        dt, p = _compute_dtype(x), self.pow2_scales
        h = F.silu(_FP8GroupedFn.apply(xs, self.gate_proj, offsets, p, dt)) * _FP8GroupedFn.apply(
            xs, self.up_proj, offsets, p, dt)
        ys = _FP8GroupedFn.apply(h, self.down_proj, offsets, p, dt)  # (N·K, D)
        ys = ys * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


# --- model conversion ---------------------------------------------------------------------------------------------
FP8_LINEAR_NAMES = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                    "gate_proj", "up_proj", "down_proj", "eh_proj")


def convert_to_fp8(model: nn.Module, pow2_scales: bool = False, experts: bool = True, backend: str = "auto"):
    """Swap FP8 in (in place) for attention projections, dense-MLP and shared-expert projections, MTP's eh_proj and,
    with `experts`, the routed experts (row-wise, see above). embed_tokens, lm_head, the router and norms stay.
    Parameters are shared, not copied: names, state dict and any optimizer built before keep working."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in FP8_LINEAR_NAMES:
                setattr(parent, name, FP8Linear.from_linear(child, pow2_scales, backend))
            elif experts and type(child) is Experts:
                setattr(parent, name, FP8Experts(child, pow2_scales))
    return model
