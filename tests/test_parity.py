"""Our model against transformers' DeepseekV3ForCausalLM on the same weights, in float32."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import nanoseek
from nanoseek.model.fp8 import FP8_DTYPE

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8, "original_max_position_embeddings": 64}

CASES = {
    "q_lora+groups": {},
    "no_q_lora": {"q_lora_rank": None},
    "yarn": {"rope_parameters": YARN},
    "two_dense_layers": {"first_k_dense_replace": 2, "num_hidden_layers": 4},
    "all_dense": {"first_k_dense_replace": 3},
    "one_group_top1": {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 1},
    "rotate_half": {"rope_interleave": False},
}


def logits_pair(d, hf, ids):
    ours = nanoseek.load_model(d)
    with torch.no_grad():
        return ours(ids), hf(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf_dir, case):
    d, hf = hf_dir(**CASES[case])
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    a, b = logits_pair(d, hf, ids)
    assert (a - b).abs().max().item() <= 1e-4


def test_fp8_checkpoint_matches_dequantised_weights(hf_dir, tmp_path):
    """FP8 form (e4m3 + per-128x128 scale_inv) loads to the same logits as transformers on the dequantised
    weights. Shapes are wider than 128 so blocks and edge blocks both occur."""
    from transformers import DeepseekV3ForCausalLM

    d, _ = hf_dir(hidden_size=160, moe_intermediate_size=144, intermediate_size=272)
    fp8_dir = nanoseek.save_model(nanoseek.load_model(d), tmp_path / "fp8", fp8=True)
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv")
        assert w.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (2, 2)
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32  # router stays precise
    ours = nanoseek.load_model(fp8_dir)
    deq_dir = nanoseek.save_model(ours, tmp_path / "deq")
    hf = DeepseekV3ForCausalLM.from_pretrained(deq_dir).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_save_then_transformers_same_logits_with_mtp(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny")
    model = nanoseek.build_model(cfg)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
    out = nanoseek.save_model(model, tmp_path / "m")
    hf = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_mtp_tensors_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny")
    model = nanoseek.build_model(cfg)
    out = nanoseek.save_model(model, tmp_path / "m")
    L = cfg.num_hidden_layers
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.{L}.{name}.weight" in keys
    assert f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in keys
    back = nanoseek.load_model(out)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        (_, m1), (_, m2) = model(ids, return_mtp=True), back(ids, return_mtp=True)
    assert torch.equal(m1[0], m2[0])


def test_sharded_save_load(tmp_path):
    torch.manual_seed(0)
    model = nanoseek.build_model(nanoseek.get_preset("cpu-tiny"))
    out = nanoseek.save_model(model, tmp_path / "m", max_shard_bytes=1 << 20)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    back = nanoseek.load_model(out)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("changes", [
    dict(rms_norm_eps=1e-2),  # the q and kv latent norms keep 1e-6, as transformers' (0.09 apart before)
    dict(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=0),  # bench/ablate.py's dense model
    dict(n_routed_experts=None),
    dict(n_group=None, topk_group=None, n_shared_experts=None),
], ids=["latent_norm_eps", "dense_zero_experts", "dense_no_experts", "no_groups"])
def test_our_configs_load_in_transformers_as_the_same_model(tmp_path, changes):
    """Values our config takes (None / 0 for "no experts", "no groups") were written as they are: transformers
    refused the nulls and could not run a model with 0 routed experts."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = nanoseek.build_model(nanoseek.get_preset("cpu-tiny").replace(**changes))
    d = nanoseek.save_model(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in nanoseek.load_model(d).parameters()) == sum(p.numel() for p in model.parameters())
