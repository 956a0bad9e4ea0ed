"""FP8 training (DeepSeek-V3 recipe): quantisation bounds, FP8Linear / FP8Experts against float32, model conversion,
a short emulated-FP8 training run against the float32 one, and the FP8 checkpoint round trip. CPU tests exercise
the exact emulation; `gpu` tests compare the real FP8 GEMMs on CUDA with it.

Error bound used below (derived for e4m3fn, 3 mantissa bits, max 448): after scaling, v = x/s has |v| <= 448. A
normal v (|v| >= 2^-6) rounds to the nearest of 8 steps per binade, so |v - fp8(v)| <= 2^-4·|v|; a subnormal one is
off by at most half the subnormal step, 2^-10. Hence per element |x - deq| <= 2^-4·|x| + 2^-10·s, and per tile
max|x - deq| <= amax·2^-4. Without power-of-two rounding the tile max maps to exactly 448 and the largest binade
[256, 448] has half-step 16, so the per-tile error is at most 16·s = amax/28.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import nanoseek
from nanoseek.model.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8Experts,
    FP8Linear,
    convert_to_fp8,
    dequantize_tiles,
    fp8_linear,
    quantize_block,
    quantize_tiles,
    quantize_weight,
)
from nanoseek.model.moe import Experts, Gate
from nanoseek.model.layers import RMSNorm

REL = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731


def heavy_tailed(rows, cols, seed=0):
    """Gaussian values whose rows span 2^-12..2^12 and with a few outliers: stresses per-tile scaling."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-12, 13, (rows, 1), generator=g).float())
    x.view(-1)[torch.randint(0, x.numel(), (rows,), generator=g)] *= 100.0
    return x


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("cols", [128, 320, 1000])
def test_quantize_tiles_error_bound(pow2, cols):
    x = heavy_tailed(64, cols)
    q, s = quantize_tiles(x, pow2=pow2)
    kb = math.ceil(cols / BLOCK)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == (64, kb) and s.dtype == torch.float32
    deq = dequantize_tiles(q, s)
    err = (x - deq).abs()
    s_el = s.repeat_interleave(BLOCK, 1)[:, :cols]
    assert (err <= 2**-4 * x.abs() + 2**-10 * s_el + 1e-6 * x.abs()).all()
    pad = F.pad(x.abs(), (0, kb * BLOCK - cols)).view(64, kb, BLOCK).amax(-1)
    tile_err = F.pad(err, (0, kb * BLOCK - cols)).view(64, kb, BLOCK).amax(-1)
    assert (tile_err <= pad * (2**-4 if pow2 else 1 / 28) * (1 + 1e-5)).all()
    assert (q.float().abs().amax() <= 448) and torch.isfinite(deq).all()


def test_pow2_scales_are_powers_of_two():
    x = heavy_tailed(32, 384, seed=1)
    _, s = quantize_tiles(x, pow2=True)
    _, sw = quantize_weight(x, pow2=True)
    for scale in (s, sw):
        e = torch.log2(scale)
        assert torch.equal(e, e.round())
    _, s_plain = quantize_tiles(x)
    assert (s >= s_plain).all() and (s < 2 * s_plain).all()  # rounded up, never by more than 2x


def test_quantize_weight_matches_checkpoint_quantiser():
    w = heavy_tailed(200, 330, seed=2)  # partial blocks both ways
    q1, s1 = quantize_block(w)
    q2, s2 = quantize_weight(w)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_matches_float32(pow2):
    """Forward, dx and dW within 5% relative (Frobenius) of float32: e4m3 rounds each operand with RMS relative
    error ≈ 2^-4/√3 ≈ 0.036·0.7, and two rounded operands give ≈ 0.036 on Gaussian data (measured: 0.036)."""
    torch.manual_seed(0)
    lin = nn.Linear(320, 200, bias=True)
    fp8 = FP8Linear.from_linear(lin, pow2_scales=pow2)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    x = torch.randn(3, 40, 320)
    g = torch.randn(3, 40, 200)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = lin(x1)
    y_ref.backward(g)
    dw_ref, db_ref = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.weight.grad = lin.bias.grad = None
    y = fp8(x2)
    y.backward(g)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert REL(y, y_ref) < 0.05
    assert REL(x2.grad, x1.grad) < 0.05
    assert REL(lin.weight.grad, dw_ref) < 0.05
    assert torch.allclose(lin.bias.grad, db_ref, atol=1e-5)


def test_failed_compile_falls_back_to_eager(monkeypatch):
    """torch.compile is lazy: without Triton or a C compiler it fails at the first call (InductorError). The
    quantiser then warns once and runs eagerly instead of ending the run with a traceback."""
    from nanoseek.model import fp8

    def lazy_compile(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", lazy_compile)
    monkeypatch.setattr(fp8, "_WARNED", set())
    fp8._compiled.cache_clear()
    try:
        x = torch.randn(4, 256)
        with pytest.warns(UserWarning, match="torch.compile failed"):
            q, s = fp8._compiled(fp8._quantize_tiles_eager, tile=BLOCK, pow2=False)(x)
        ref_q, ref_s = quantize_tiles(x)
        assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)
    finally:
        fp8._compiled.cache_clear()


def test_fp8_without_fp8_tensor_cores_warns(monkeypatch):
    """--fp8 on an A100 (sm80) emulates: slower than bf16, so it must say so."""
    from nanoseek.model import fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    monkeypatch.setattr(fp8, "_WARNED", set())
    fp8._backends_for.cache_clear()
    try:
        with pytest.warns(UserWarning, match="A100 has no FP8 tensor cores"):
            assert fp8._backends_for(torch.device("cuda", 0)) == ()
    finally:
        fp8._backends_for.cache_clear()


def test_fp8_linear_is_deterministic_emulation():
    """The emulation is exactly deq(q(x)) · deq(q(W))ᵀ."""
    torch.manual_seed(1)
    x, w = torch.randn(16, 256), torch.randn(128, 256)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_weight(w)
    expect = dequantize_tiles(xq, xs) @ (wq.float() * ws.repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
    assert torch.allclose(fp8_linear(x, w), expect, atol=1e-5, rtol=1e-5)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nanoseek.build_model(nanoseek.get_preset("cpu-tiny"))


def experts_outputs_and_grads(models, x, weights, indices, counts, bf16_second: bool = False):
    """Each (float32 reference, FP8) experts module on the same routed batch -> their outputs and the gradients of
    sum(y²) w.r.t. the input and every parameter (the second under bf16 autocast on CUDA when asked)."""
    outs, grads = [], []
    for i, m in enumerate(models):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_second and i == 1):
            y = m(xi, weights, indices, counts)
        y.float().square().sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
        for p in m.parameters():
            p.grad = None
    return outs, grads


def test_fp8_experts_match_float32():
    """Row-wise FP8 experts: gate/up then down are two chained FP8 GEMMs per path (measured ≈ 0.065 relative on
    the output); the gradients of sum(y²) also carry y's own error (measured ≈ 0.07-0.085). Bounds: 0.09 / 0.12."""
    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny")
    ref = Experts(cfg)
    for p in ref.parameters():
        nn.init.normal_(p, 0, 0.05)
    fp8 = FP8Experts(ref)
    N, K, E = 64, cfg.num_experts_per_tok, cfg.n_routed_experts
    x = torch.randn(N, cfg.hidden_size)
    indices = torch.rand(N, E).topk(K, dim=-1).indices
    weights = torch.rand(N, K)
    counts = torch.bincount(indices.flatten(), minlength=E)
    outs, grads = experts_outputs_and_grads((ref, fp8), x, weights, indices, counts)
    assert REL(outs[1], outs[0]) < 0.09
    for a, b in zip(grads[1], grads[0]):
        assert REL(a, b) < 0.12


def test_convert_keeps_names_and_excluded_modules():
    model = tiny()
    before = {k: v for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    types_before = {n: type(m) for n, m in model.named_modules()}
    convert_to_fp8(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    assert {n: p for n, p in model.named_parameters()} == params_before  # same Parameter objects
    converted = {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}
    for n, t in types_before.items():
        leaf = n.rsplit(".", 1)[-1]
        if t is nn.Linear and leaf in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj", "eh_proj"):
            assert n in converted, n
        elif t is Experts:
            assert isinstance(model.get_submodule(n), FP8Experts)
        else:
            assert n not in converted and type(model.get_submodule(n)) is t, n
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert all(type(m) is Gate for n, m in model.named_modules() if n.endswith("mlp.gate"))
    assert all(type(m) is RMSNorm for n, m in model.named_modules() if "norm" in n.rsplit(".", 1)[-1])
    # MLA's absorbed (decode) path reads kv_b_proj.weight directly: still the real weight
    assert model.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32


def synthetic_batch(vocab, B=8, T=64, seed=0):
    """Random walks through one fixed random permutation of the vocabulary: t_{i+1} = perm[t_i] half the time,
    a uniformly random token otherwise. Learnable (the loss falls from ln V ≈ 6.2 towards its floor ≈ 3.8), with
    enough irreducible noise that a 1% relative gap is a real difference, not the noise of a near-zero loss."""
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    follow = torch.rand(B, T + 1, generator=g) < 0.5
    for i in range(T):
        ids[:, i + 1] = torch.where(follow[:, i + 1], perm[ids[:, i]], ids[:, i + 1])
    return ids


def train(model, steps=30, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids = synthetic_batch(model.config.vocab_size, seed=step)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_emulated_fp8_training_tracks_float32():
    ref = train(tiny(0).train())
    fp8 = train(convert_to_fp8(tiny(0)).train())
    assert ref[-1] < ref[0] - 1.0  # the task is learnable: the comparison is not between two flat lines
    assert abs(fp8[-1] - ref[-1]) / ref[-1] < 0.01, (ref[-1], fp8[-1])


def test_fp8_checkpoint_round_trip(tmp_path):
    model = convert_to_fp8(tiny(3)).train()
    train(model, steps=3)
    model.eval()
    nanoseek.save_model(model, tmp_path / "ck", fp8=True)
    stored = load_file(str(tmp_path / "ck" / "model.safetensors"))
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # FP8 in DeepSeek's checkpoints too (it was bf16)
    assert stored[kv_a].dtype == torch.float8_e4m3fn and kv_a + "_scale_inv" in stored
    loaded = nanoseek.load_model(tmp_path / "ck")
    assert list(loaded.state_dict()) == list(model.state_dict())
    sd, sd2 = model.state_dict(), loaded.state_dict()
    for k in sd:
        if k.endswith(("proj.weight", "proj_with_mqa.weight")) and ".gate." not in k and (".self_attn." in k or ".mlp." in k):
            q, s = quantize_block(sd[k])  # stored as DeepSeek FP8: reloads as the dequantised block weights
            torch.testing.assert_close(sd2[k], q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[
                : q.shape[0], : q.shape[1]])
        elif k.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            assert REL(sd2[k], sd[k]) < 0.04
        else:
            assert torch.equal(sd2[k], sd[k]), k
    # an FP8 model re-quantises its weights each forward; the block-quantised reload gives the same linear layers
    convert_to_fp8(loaded)
    ids = synthetic_batch(model.config.vocab_size)[:, :32]
    with torch.no_grad():
        assert REL(loaded(ids), model(ids)) < 0.03


# --- GPU: real FP8 GEMMs against the emulation --------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cublas", "triton"])
@pytest.mark.parametrize("shape", [(1024, 2048, 768), (512, 576, 320)])
def test_gpu_backend_matches_emulation(backend, shape):
    from nanoseek.model import fp8 as fp8mod

    fn, aligned_only = fp8mod._CANDIDATES[backend]
    M, K, N = shape
    if aligned_only and (K % 128 or N % 128):
        pytest.skip("cuBLAS block scaling needs multiples of 128")
    why = fp8mod._selfcheck(fn, torch.device("cuda"), ((M, K, N),))
    assert why is None, why


@pytest.mark.gpu
@needs_cuda
def test_gpu_quantisers_match_eager():
    from nanoseek.model import fp8 as fp8mod

    assert fp8mod._quant_impl(torch.device("cuda")) == "triton", fp8mod.BACKEND_REPORT
    x = heavy_tailed(512, 1024).cuda()
    for pow2 in (False, True):
        for inp in (x, x.bfloat16(), x.t(), x.bfloat16().t()):  # quantize_tiles: the one-pass Triton kernel
            assert fp8mod.quant_mismatch(quantize_tiles(inp, pow2=pow2),
                                         fp8mod._quantize_tiles_eager(inp, BLOCK, pow2)) is None
        assert fp8mod.quant_mismatch(quantize_weight(x, pow2), fp8mod._quantize_weight_eager(x, pow2)) is None


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_linear_matches_emulation():
    from nanoseek.model import fp8 as fp8mod

    dev = torch.device("cuda")
    assert fp8mod._backends_for(dev), fp8mod.BACKEND_REPORT
    torch.manual_seed(0)
    lin = nn.Linear(2048, 1536, bias=False, device=dev)
    x = torch.randn(4, 500, 2048, device=dev)  # 2000 tokens: wgrad pads the token dim to 2048
    g = torch.randn(4, 500, 1536, device=dev, dtype=torch.bfloat16)
    res = {}
    for backend in ("auto", "emulate"):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fp8_linear(xi, lin.weight, backend=backend)
        y.backward(g)
        res[backend] = (y, xi.grad, lin.weight.grad)
        lin.weight.grad = None
    for a, b in zip(res["auto"], res["emulate"]):
        assert REL(a, b) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_experts_match_float32():
    """Real row-wise FP8 grouped GEMMs (forward, dgrad) and the bf16 grouped wgrad against float32 experts."""
    from nanoseek.model import fp8 as fp8mod

    dev = torch.device("cuda")
    assert fp8mod._grouped_backend(dev) == "real", fp8mod.BACKEND_REPORT
    cfg = nanoseek.get_preset("small")
    torch.manual_seed(0)
    ref = Experts(cfg).to(dev)
    for p in ref.parameters():
        nn.init.normal_(p, 0, 0.02)
    N, K, E = 1000, cfg.num_experts_per_tok, cfg.n_routed_experts  # group sizes not multiples of 8
    x = torch.randn(N, cfg.hidden_size, device=dev)
    idx = torch.rand(N, E, device=dev).topk(K, -1).indices
    wts = torch.rand(N, K, device=dev)
    counts = torch.bincount(idx.flatten(), minlength=E)
    outs, grads = experts_outputs_and_grads((ref, FP8Experts(ref)), x, wts, idx, counts, bf16_second=True)
    assert REL(outs[1], outs[0]) < 0.09
    for a, b in zip(grads[1], grads[0]):
        assert REL(a, b) < 0.12
