"""Writing over an existing model directory (`save_model`, `nanoseek convert --overwrite`) leaves exactly the new
model, or, if interrupted, a directory that fails to load; directories written by transformers load back."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
import nanoseek.checkpoint as ck
from nanoseek import convert
from nanoseek.checkpoint import CheckpointError

SINGLE, SHARDS_1M, SHARDS_2M = 4 << 30, 1 << 20, 2 << 20  # cpu-tiny is ~3.8 MiB: one file, 4-5 or 2-3 shards


def tiny(seed: int):
    torch.manual_seed(seed)
    return nanoseek.build_model(nanoseek.get_preset("cpu-tiny"))


def same_weights(a, b) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def weight_files(d) -> set[str]:
    return {f.name for f in d.iterdir() if f.name.endswith((".safetensors", ".safetensors.index.json"))}


@pytest.mark.parametrize("old, new", [(SHARDS_1M, SINGLE), (SINGLE, SHARDS_1M), (SHARDS_1M, SHARDS_2M)])
def test_save_over_a_model_leaves_only_the_new_weight_files(tmp_path, old, new):
    d = nanoseek.save_model(tiny(0), tmp_path / "m", max_shard_bytes=old)
    (d / "notes.txt").write_text("mine")
    (d / "model.safetensors.bak").write_text("mine too")
    model = tiny(1)
    nanoseek.save_model(model, d, max_shard_bytes=new)
    fresh = weight_files(nanoseek.save_model(model, tmp_path / "fresh", max_shard_bytes=new))
    assert weight_files(d) == fresh
    assert (d / "notes.txt").read_text() == "mine" and (d / "model.safetensors.bak").is_file()  # not weight files
    assert same_weights(model, nanoseek.load_model(d))


def test_sharded_over_single_file_is_what_transformers_loads(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    d = nanoseek.save_model(tiny(0), tmp_path / "m")
    model = tiny(1)
    nanoseek.save_model(model, d, max_shard_bytes=SHARDS_1M)
    hf = DeepseekV3ForCausalLM.from_pretrained(d).eval()  # prefers model.safetensors to the index when both exist
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("old, new", [(SHARDS_1M, SHARDS_1M), (SINGLE, SINGLE), (SINGLE, SHARDS_1M)])
def test_interrupted_overwrite_never_loads_a_mix(tmp_path, monkeypatch, old, new):
    """Ctrl-C / a kill / a full disk after any file: the directory is the new model or fails to load."""
    model = tiny(1)
    n_files = len(weight_files(nanoseek.save_model(model, tmp_path / "fresh", max_shard_bytes=new)))
    real_save, real_write = ck._atomic_save, ck.write_json
    for stop in range(n_files + 3):  # weight files, then generation_config, index, config.json
        d = nanoseek.save_model(tiny(0), tmp_path / f"m{stop}", max_shard_bytes=old)
        calls = []

        def once(real):
            def write(*a, **kw):
                if len(calls) == stop:
                    raise Interrupted
                calls.append(a)
                real(*a, **kw)
            return write

        monkeypatch.setattr(ck, "_atomic_save", once(real_save))
        monkeypatch.setattr(ck, "write_json", once(real_write))
        try:
            nanoseek.save_model(model, d, max_shard_bytes=new)
        except Interrupted:
            pass
        monkeypatch.setattr(ck, "_atomic_save", real_save)
        monkeypatch.setattr(ck, "write_json", real_write)
        try:
            back = nanoseek.load_model(d)
        except CheckpointError:
            continue
        assert same_weights(model, back), f"interrupted after {stop} files, the directory loads other weights"


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float64, "int8", "float8_e4m3fn"])
def test_save_refuses_non_float_dtypes(tmp_path, dtype):
    with pytest.raises(ValueError, match=r"float32, bfloat16 or float16.*fp8=True"):
        nanoseek.save_model(tiny(0), tmp_path / "m", dtype=dtype)
    assert not (tmp_path / "m").exists()  # refused before anything is written


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, "float16"])
def test_save_accepts_dtype_names(tmp_path, dtype):
    model = tiny(0)
    d = nanoseek.save_model(model, tmp_path / "m", dtype=dtype)
    name = str(dtype).replace("torch.", "")
    assert ck.read_config(d).torch_dtype == name
    back = nanoseek.load_model(d)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(getattr(torch, name)).float())


def test_convert_copies_every_tokenizer_file_and_drops_stale_ones(tmp_path):
    src = nanoseek.save_model(tiny(0), tmp_path / "in")
    for name, text in [("tokenizer.json", "{}"), ("tokenizer_config.json", "{}"), ("chat_template.jinja", "NEW"),
                       ("vocab.json", "{}"), ("merges.txt", "a b")]:
        (src / name).write_text(text)
    dst = nanoseek.save_model(tiny(1), tmp_path / "out")
    for name in ("chat_template.jinja", "chat_template.json", "special_tokens_map.json", "tokenizer.model",
                 "notes.txt"):
        (dst / name).write_text("OLD")
    convert.run(argparse.Namespace(input=str(src), output=str(dst), dtype="float32", fp8=False, overwrite=True))
    assert (dst / "chat_template.jinja").read_text() == "NEW"
    assert (dst / "merges.txt").read_text() == "a b" and (dst / "vocab.json").is_file()
    for name in ("chat_template.json", "special_tokens_map.json", "tokenizer.model"):  # the overwritten model's
        assert not (dst / name).exists(), name
    assert (dst / "notes.txt").read_text() == "OLD"
    assert same_weights(nanoseek.load_model(src), nanoseek.load_model(dst))


def test_convert_keeps_the_inputs_generation_config(tmp_path):
    src = nanoseek.save_model(tiny(0), tmp_path / "in")
    gen = '{"bos_token_id": 0, "eos_token_id": [1, 7], "do_sample": true, "temperature": 0.3, "top_p": 0.9}'
    (src / "generation_config.json").write_text(gen)  # its stop ids and sampling defaults are what serve uses
    convert.run(argparse.Namespace(input=str(src), output=str(tmp_path / "out"), dtype="float32", fp8=False,
                                   overwrite=False))
    assert (tmp_path / "out" / "generation_config.json").read_text() == gen


def test_config_names_the_dtype_the_weights_are_stored_in(tmp_path):
    bf16 = nanoseek.save_model(tiny(0), tmp_path / "bf16", dtype="bfloat16")
    out = nanoseek.save_model(nanoseek.load_model(bf16), tmp_path / "f32")  # loaded as float32, saved as it is
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.float32


def test_tied_head_is_the_embedding_after_build_save_and_load(tmp_path):
    cfg = nanoseek.get_preset("cpu-tiny")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = nanoseek.build_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3)  # as training moves the shared tensor
    back = nanoseek.load_model(nanoseek.save_model(model, tmp_path / "tied"))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.allclose(back(ids), model(ids), atol=1e-5)


def test_transformers_save_pretrained_dir_loads_without_mtp(tmp_path):
    """transformers drops the MTP layer (model.layers.{L}.*) but keeps num_nextn_predict_layers in config.json."""
    from transformers import DeepseekV3ForCausalLM

    model = tiny(0).eval()
    assert model.config.num_nextn_predict_layers == 1
    ours = nanoseek.save_model(model, tmp_path / "ours")
    DeepseekV3ForCausalLM.from_pretrained(ours).save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match=r"no MTP layer.*save_pretrained.*num_nextn_predict_layers=0") as w:
        back = nanoseek.load_model(tmp_path / "hf")
    assert len(w) == 1
    assert back.config.num_nextn_predict_layers == 0
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(back(ids), model(ids), rtol=0, atol=1e-5)


def test_whole_number_floats_are_written_as_floats_for_transformers(tmp_path):
    """transformers' configs are strict dataclasses: `--set routed_scaling_factor=2` wrote 2, which it refuses."""
    from transformers import AutoConfig

    cfg = nanoseek.get_preset("cpu-tiny").replace(routed_scaling_factor=2, rms_norm_eps=1, initializer_range=0)
    d = nanoseek.save_model(nanoseek.build_model(cfg), tmp_path / "m")
    assert AutoConfig.from_pretrained(d).routed_scaling_factor == 2.0
    assert nanoseek.load_model(d).config.routed_scaling_factor == 2.0


def test_a_v2_router_is_written_as_deepseek_v2_and_transformers_agrees(tmp_path):
    """transformers' DeepseekV3 routes with V3's sigmoid and bias whatever config.json says: a softmax router saved
    as deepseek_v3 gave other logits (0.05 apart) there. As deepseek_v2 they agree; routers neither class has are
    refused."""
    from transformers import AutoModelForCausalLM

    from nanoseek.config import ConfigError

    cfg = nanoseek.get_preset("cpu-tiny").replace(scoring_func="softmax", topk_method="group_limited_greedy",
                                                   norm_topk_prob=False)
    torch.manual_seed(0)
    model = nanoseek.build_model(cfg)
    d = nanoseek.save_model(model, tmp_path / "v2")
    assert json.loads((d / "config.json").read_text())["model_type"] == "deepseek_v2"
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)
    assert nanoseek.load_model(d).config.scoring_func == "softmax"
    for bad in (dict(topk_method="greedy"), dict(scoring_func="softmax"), dict(moe_layer_freq=2)):
        with pytest.raises(ConfigError):
            nanoseek.get_preset("cpu-tiny").replace(**bad)
    v2 = dict(scoring_func="softmax", topk_method="greedy")
    for bad in (v2 | dict(norm_topk_prob=True), v2 | dict(norm_topk_prob=False, rope_interleave=False)):
        with pytest.raises(ConfigError):  # a new model: transformers' deepseek_v2 has neither
            nanoseek.get_preset("cpu-tiny").replace(**bad).check_portable()
        old = nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny").replace(**bad)), tmp_path / "o")
        assert nanoseek.load_model(old).config.scoring_func == "softmax"  # one made before the check still loads
    written = json.loads((d / "config.json").read_text())  # a V2 config.json leaves out V2's own defaults
    del written["norm_topk_prob"], written["routed_scaling_factor"]
    (d / "config.json").write_text(json.dumps(written))
    cfg = nanoseek.load_model(d).config
    assert (cfg.norm_topk_prob, cfg.routed_scaling_factor) == (False, 1.0)  # as transformers reads them


def test_save_model_writes_the_tokenizer_it_is_given(tmp_path):
    """DESIGN's model directory holds the tokenizer files; save_model wrote weights alone, which eval and serve
    cannot prompt. Given a Tokenizer or a directory, it writes them."""
    from conftest import tiny_model_dir
    from nanoseek.tokenizer import Tokenizer

    src, tok, _ = tiny_model_dir(tmp_path / "src", ["What is 2 + 2? The answer is 4."] * 20, "d.jsonl", [])
    model = nanoseek.load_model(src)
    for given, out in ((src, tmp_path / "copied"), (tok, tmp_path / "saved")):
        nanoseek.save_model(model, out, tokenizer=given)
        assert Tokenizer.from_dir(out).encode("2 + 2") == tok.encode("2 + 2")
        assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    nanoseek.save_model(model, tmp_path / "bare")
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    nanoseek.save_model(model, src, tokenizer=src)  # in place: its own files stay (a copy onto itself broke it)
    assert Tokenizer.from_dir(src).encode("2 + 2") == tok.encode("2 + 2") and nanoseek.load_model(src) is not None
    (tmp_path / "saved" / "chat_template.jinja").write_text("an earlier model's")
    nanoseek.save_model(model, tmp_path / "saved", tokenizer=src)
    assert not (tmp_path / "saved" / "chat_template.jinja").exists()  # not read beside the new tokenizer
    for bad in (tmp_path / "bare", tok.hf):  # no tokenizer files; a tokenizers.Tokenizer: refused before writing
        with pytest.raises(ValueError, match="save_model: tokenizer"):
            nanoseek.save_model(model, tmp_path / "never", tokenizer=bad)
    assert not (tmp_path / "never").exists()
