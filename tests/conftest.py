"""Shared fixtures: tiny random DeepSeek-V3 checkpoints written by transformers itself."""

from __future__ import annotations

import pytest
import torch


def hf_tiny_config(**overrides):
    from transformers import DeepseekV3Config

    kw = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24,
        qk_nope_head_dim=16, first_k_dense_replace=1, max_position_embeddings=256, routed_scaling_factor=2.5,
        num_mtp_layers=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def randomize_hf(model, seed: int = 0):
    """Non-trivial weights everywhere, including a non-zero routing correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def tiny_model_dir(d, texts: list[str], data_name: str, records: list[dict]):
    """A random cpu-tiny model in `d` with a 300-token tokenizer trained on `texts`, and `records` as JSONL in
    d/data_name -> (d, tokenizer, data path)."""
    import json

    import nanoseek
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=300)
    tok.save(d)
    torch.manual_seed(0)
    cfg = nanoseek.get_preset("cpu-tiny").replace(vocab_size=320, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    nanoseek.save_model(nanoseek.build_model(cfg), d)
    data = d / data_name
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return d, tok, data


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: hf_dir(**config_overrides) -> (directory, transformers model)."""
    from transformers import DeepseekV3ForCausalLM

    def make(**overrides):
        torch.manual_seed(0)
        model = randomize_hf(DeepseekV3ForCausalLM(hf_tiny_config(**overrides)).eval())
        d = tmp_path / f"hf{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(d)
        return d, model

    return make


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler during the test (a CI runner may start the tests with SIGINT ignored)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
