"""Model internals: the two MLA paths agree, cached decoding equals a full forward, MoE routing and balancing
follow DeepSeek-V3's rules, MTP trains, and the V3 shape counts 671B / 37B."""

from __future__ import annotations

import math

import pytest
import torch

import nanoseek
from nanoseek.engine.cache import LatentCache
from nanoseek.model import build_model, param_counts
from nanoseek.model.moe import Gate, MoE, grouped_mm
from nanoseek.model.mtp import mtp_loss


def tiny(**kw):
    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny").replace(**kw)
    model = build_model(cfg)
    with torch.no_grad():  # larger weights than init so that differences would show
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    return model.eval()


YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "mscale": 1, "mscale_all_dim": 1}


@pytest.mark.parametrize("q_lora_rank, rope_scaling", [(96, None), (None, None), (96, YARN)])
def test_absorbed_equals_naive_attention(q_lora_rank, rope_scaling):
    """With YaRN (V3's config) the softmax scale is no longer 1/sqrt(d): the absorbed (decode) path must use it too."""
    model = tiny(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    attn = model.main_layers[1].self_attn
    x = torch.randn(2, 12, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(12).expand(2, 12))
    with torch.no_grad():
        naive = attn(x, cos, sin, absorb=False)
        absorbed = attn(x, cos, sin, absorb=True)
    assert (naive - absorbed).abs().max().item() < 1e-5


def test_cached_decode_equals_full_forward():
    model = tiny()
    B, T = 3, 14
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(model.config, B, 32)
        prefix = 5
        pos = torch.arange(prefix).expand(B, prefix)
        step_logits = [model(ids[:, :prefix], positions=pos, cache=cache)]
        for t in range(prefix, T):
            step_logits.append(model(ids[:, t : t + 1], positions=torch.full((B, 1), t), cache=cache))
    assert (torch.cat(step_logits, dim=1) - full).abs().max().item() < 1e-4


def test_packed_documents_equal_documents_alone():
    """With segments, each document of a packed row gets the logits (main and MTP) it gets when run alone."""
    model = tiny()
    lens = [5, 9, 4]
    docs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lens]
    packed = torch.cat(docs, dim=1)  # (1, 18)
    segments = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))[None]
    with torch.no_grad():
        logits, mtp = model(packed, segments=segments, return_mtp=True)
        start = 0
        for doc, n in zip(docs, lens):
            alone, alone_mtp = model(doc, return_mtp=True)
            assert (logits[:, start : start + n] - alone).abs().max().item() < 1e-4
            # MTP depth 1 at position i reads token i+1: compare where that token is in the same document
            assert (mtp[0][:, start : start + n - 1] - alone_mtp[0]).abs().max().item() < 1e-4
            start += n
        unmasked = model(packed)
    assert (unmasked[:, lens[0]:] - logits[:, lens[0]:]).abs().max().item() > 1e-3  # the mask does matter


def test_cache_handles_ragged_lengths():
    """Right-padded prompts of different lengths: each row's logits equal its own unpadded forward."""
    model = tiny()
    a, b = torch.randint(0, 512, (1, 9)), torch.randint(0, 512, (1, 4))
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    cache = LatentCache(model.config, 2, 16)
    with torch.no_grad():
        out = model(padded, positions=torch.arange(9).expand(2, 9), cache=cache)
        # next token for row 1 goes to position 4, overwriting its padding
        nxt = torch.tensor([[7], [7]])
        step = model(nxt, positions=torch.tensor([[9], [4]]), cache=cache)
        ref_a = model(torch.cat([a, nxt[:1]], 1))
        ref_b = model(torch.cat([b, nxt[:1]], 1))
    assert (out[0] - ref_a[0, :9]).abs().max() < 1e-4 and (out[1, :4] - ref_b[0, :4]).abs().max() < 1e-4
    assert (step[0, 0] - ref_a[0, 9]).abs().max() < 1e-4 and (step[1, 0] - ref_b[0, 4]).abs().max() < 1e-4


def test_v3_671b_parameter_count_on_meta():
    counts = param_counts(build_model(nanoseek.get_preset("v3-671b"), device="meta"))
    assert abs(counts["total"] / 671e9 - 1) < 0.01
    assert abs(counts["active"] / 37e9 - 1) < 0.03
    assert 11e9 < counts["mtp"] < 12e9  # one full MoE layer + eh_proj + norms (embedding/head shared)


def test_presets_sizes():
    tiny_total = param_counts(build_model(nanoseek.get_preset("cpu-tiny"), device="meta"))["total"]
    small_total = param_counts(build_model(nanoseek.get_preset("small"), device="meta"))["total"]
    assert 0.5e6 < tiny_total < 10e6 and 100e6 <= small_total <= 300e6


def test_gate_group_limited_routing_by_hand():
    """4 experts in 2 groups, 1 group kept, top-2: group choice and expert choice use biased scores, weights
    the unbiased ones, normalised and scaled."""
    cfg = nanoseek.get_preset("cpu-tiny").replace(
        hidden_size=4, n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5
    )
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(4))
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.5]))
    x = torch.tensor([[2.0, 1.0, 0.0, 0.0]])  # unbiased favours group 0, bias flips it to group 1
    w, idx, scores = gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]
    s = torch.sigmoid(torch.tensor(0.0))
    assert torch.allclose(w[0], torch.tensor([1.25, 1.25])) and torch.allclose(scores[0, 2], s)


@pytest.mark.parametrize("width", [6, 8])  # 6: unaligned, the loop fallback; 8: native grouped_mm
def test_grouped_mm_matches_loop(width):
    x = torch.randn(10, width)
    w = torch.randn(3, width, 4)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # expert 1 gets no tokens
    ref = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
    assert torch.allclose(grouped_mm(x, w, offsets), ref, atol=1e-5)


def test_router_stays_float32_and_experts_get_bf16_under_autocast(monkeypatch):
    """Training on a GPU runs under bf16 autocast (CPU autocast stands in for it): the router must still score in
    float32 (DeepSeek keeps the gate in high precision) and pick the same experts, and the experts' grouped matmuls
    must get bf16 input (CUDA's grouped_mm takes no float32; it would fall back to a per-expert loop)."""
    from nanoseek.model import moe as moe_mod

    model = tiny()
    moe = model.moe_layers()[0]
    x = torch.randn(64, model.config.hidden_size)
    w32, idx32, s32 = moe.gate(x)
    seen = []
    real = moe_mod.grouped_mm
    monkeypatch.setattr(moe_mod, "grouped_mm", lambda a, *r: seen.append(a.dtype) or real(a, *r))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, idx, s = moe.gate(x)
        out = moe(x[None])
    assert s.dtype == w.dtype == torch.float32
    assert torch.equal(idx, idx32) and torch.equal(s, s32)
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.allclose(out.float(), moe(x[None]), atol=0.05 * moe(x[None]).abs().max().item())


def test_aux_free_bias_update_and_float32_bias():
    model = tiny()
    moe = model.moe_layers()[0]
    model.train()
    model(torch.randint(0, 512, (2, 16)))
    load = moe.load.clone()
    before = moe.gate.e_score_correction_bias.clone()
    model.update_routing_bias(0.001)
    expected = before + 0.001 * torch.sign(load.mean() - load)
    assert torch.equal(moe.gate.e_score_correction_bias, expected) and moe.load is None
    assert load.sum().item() == 2 * 16 * model.config.num_experts_per_tok
    model(torch.randint(0, 512, (2, 16)))
    model(torch.randint(0, 512, (2, 16)))  # micro-batches of one step: their loads add up until the update
    assert moe.load.sum().item() == 2 * 2 * 16 * model.config.num_experts_per_tok
    model.update_routing_bias(0.0)
    assert not any(b.requires_grad for b in model.buffers())
    model.to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32


def test_sequence_balance_loss_by_hand():
    cfg = nanoseek.get_preset("cpu-tiny").replace(aux_loss_alpha=0.5)
    moe = MoE(cfg)
    scores = torch.tensor([[[0.2, 0.2, 0.6, 0.0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0, 0, 0]]])  # (1, T=2, E=8)
    idx = torch.tensor([[2, 0, 0, 1]])  # top-2 per token
    # f = E/(K·T)·counts = 8/4·[2,1,1,0,...]; P = mean_t s/sum s = [0.35, 0.35, 0.3, 0...]
    expected = 0.5 * (2 * 2 * 0.35 + 2 * 1 * 0.35 + 2 * 1 * 0.3)
    assert math.isclose(moe._sequence_balance_loss(scores, idx).item(), expected, rel_tol=1e-6)
    # sigmoid scores do not sum to 1: each token's are normalised first (sums 1.6 and 2.2)
    scores = torch.tensor([[[0.4, 0.2, 0.6] + [0.08] * 5, [0.5, 0.5] + [0.2] * 6]])
    p = (scores[0, 0] / 1.6 + scores[0, 1] / 2.2) / 2
    expected = 0.5 * 2 * (2 * p[0] + p[1] + p[2]).item()
    assert math.isclose(moe._sequence_balance_loss(scores, idx).item(), expected, rel_tol=1e-6)


def test_padding_counts_in_no_router_load_or_balance_loss():
    """Rows padded to a common length, with the padding marked: the router's loads and the balance loss are those of
    the rows alone (so a batch split differently over processes moves the routing bias alike)."""
    model = tiny(aux_loss_alpha=0.01)
    model.train()
    torch.manual_seed(1)
    rows = [torch.randint(3, 512, (1, n)) for n in (5, 12)]
    loads, aux = [], []
    for r in rows:
        model(r, return_mtp=True)
        loads.append([m.load.clone() for m in model.moe_layers()])
        aux.append(model.aux_loss())
        model.update_routing_bias(0.0)
    batch = torch.full((2, 12), 1)  # the pad id: any token
    batch[0, :5], batch[1] = rows[0][0], rows[1][0]
    real = batch != -1
    real[0, 5:] = False
    model(batch, return_mtp=True, token_mask=real)
    for m, a, b in zip(model.moe_layers(), *loads):
        assert torch.equal(m.load, a + b)
    assert torch.allclose(model.aux_loss(), (aux[0] + aux[1]) / 2, rtol=1e-5)
    model.update_routing_bias(0.0)
    model(batch, return_mtp=True)  # unmarked, the padding counts
    assert not all(torch.equal(m.load, a + b) for m, a, b in zip(model.moe_layers(), *loads))


def test_mtp_depth_k_reads_the_embedding_of_the_token_k_ahead_first():
    """DeepSeek-V3 §2.2: depth k at position i combines h_i^(k-1) with Emb(t_(i+k)), and DeepSeek's weights (as vLLM
    and SGLang load them) take eh_proj's input as [enorm(embedding); hnorm(hidden)]. transformers has no MTP to
    compare with: a model trained here from scratch works with either, DeepSeek's checkpoints with one only."""
    model = tiny()
    layer = model.mtp_layers[0]
    seen = {}
    layer.eh_proj.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    torch.manual_seed(2)
    ids = torch.randint(3, 512, (1, 10))

    def depth_1(ids):
        with torch.no_grad():
            return model(ids, return_mtp=True)[1][0]  # (1, T-1, V)

    base = depth_1(ids)
    D = model.config.hidden_size
    with torch.no_grad():
        assert torch.allclose(seen["x"][..., :D], layer.enorm(model.model.embed_tokens(ids[:, 1:])))
    changed = ids.clone()
    changed[0, 5] = 3 if ids[0, 5] != 3 else 4
    moved = (depth_1(changed) - base).abs().amax(-1)[0]  # (T-1,)
    assert moved[4] > 1e-3 and moved[:4].max() < 1e-6  # position 4 reads token 5; earlier ones see nothing of it


def test_mtp_loss_is_the_mean_over_depths():
    uniform = [torch.zeros(1, 5 - k, 7) for k in (1, 2)]  # two depths, 7 classes, every logit equal
    assert math.isclose(mtp_loss(uniform, torch.randint(0, 7, (1, 5))).item(), math.log(7), rel_tol=1e-6)


def test_mtp_and_main_loss_fall():
    model = tiny()
    model.train()
    ids = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits, mtp = model(inputs, return_mtp=True)
        main = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        extra = mtp_loss(mtp, labels)
        loss = main + 0.3 * extra + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_routing_bias(0.001)
        losses.append((main.item(), extra.item()))
    assert mtp[0].shape == (4, 31, 512)
    assert losses[-1][0] < 0.5 * losses[0][0] and losses[-1][1] < 0.7 * losses[0][1]
    assert model.model.layers[-1].eh_proj.weight.grad is not None


def test_rope_type_spelling_is_yarn_as_type_is():
    """transformers writes rope_scaling's kind as "type" or "rope_type"; RoPE read only "type", so a config given
    "rope_type" trained with YaRN's attention scale but plain frequencies, and differed from itself reloaded."""
    import dataclasses

    from nanoseek.config import get_preset
    from nanoseek.model.rope import rope_frequencies

    yarn = {"factor": 4, "original_max_position_embeddings": 128, "mscale_all_dim": 1}
    a = dataclasses.replace(get_preset("cpu-tiny"), rope_scaling={"type": "yarn", **yarn})
    b = dataclasses.replace(a, rope_scaling={"rope_type": "yarn", **yarn})
    (fa, ma), (fb, mb) = rope_frequencies(a), rope_frequencies(b)
    assert torch.equal(fa, fb) and ma == mb != 1.0 and a.softmax_scale == b.softmax_scale
    assert dataclasses.replace(a, rope_scaling={"rope_type": "default"}).rope_scaling is None


@pytest.mark.parametrize("changes, says", [
    ({"topk_group": 0}, "topk_group must be a positive integer or null"),  # 0 meant "no limit" here, 0 groups there
    ({"n_group": 0}, "n_group must be a positive integer or null"),  # transformers divides by it
    ({"num_key_value_heads": 2}, "num_key_value_heads 2 must equal num_attention_heads 4"),
    ({"rope_scaling": {"factor": 2.0}}, "has no type"),  # was dropped silently: plain RoPE
    ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}}, "'factor' >= 1"),
    ({"eos_token_id": "x"}, "eos_token_id must be a token id"),
])
def test_configs_transformers_would_read_otherwise_are_refused(changes, says):
    """Each was accepted, trained and saved as a directory transformers cannot run, or runs as another model."""
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        nanoseek.get_preset("cpu-tiny").replace(**changes)


def test_a_new_head_count_brings_the_key_value_heads_along():
    """`--set num_attention_heads=8` left num_key_value_heads at the preset's 4, which transformers uses to repeat the
    keys and values: its forward failed on our directory."""
    from transformers import DeepseekV3Config

    cfg = nanoseek.get_preset("cpu-tiny").replace(num_attention_heads=8)
    assert cfg.to_hf()["num_key_value_heads"] == 8
    assert DeepseekV3Config(**cfg.to_hf()).num_key_value_heads == 8
    with pytest.raises(ValueError, match="rope_parameters must be an object"):
        nanoseek.ModelConfig.from_hf({**cfg.to_hf(), "rope_parameters": "x"})
