"""Bad model directories give one clear line naming the file and the tensor, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import CheckpointError


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    return nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny")), tmp_path / "m")


def rewrite(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_unknown_model_type(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type 'llama'"):
        nanoseek.load_model(model_dir)


def test_missing_tensor(model_dir):
    rewrite(model_dir, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight is missing"):
        nanoseek.load_model(model_dir)


def test_extra_tensor(model_dir):
    rewrite(model_dir, lambda t: t.__setitem__("model.layers.1.self_attn.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.mystery"):
        nanoseek.load_model(model_dir)


def test_wrong_shape(model_dir):
    rewrite(model_dir, lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \(7,\)"):
        nanoseek.load_model(model_dir)


def test_truncated_file(model_dir):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        nanoseek.load_model(model_dir)


def test_no_pickle_bin_only(tmp_path, model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        nanoseek.load_model(model_dir)


def test_cli_prints_one_line(model_dir, tmp_path):
    rewrite(model_dir, lambda t: t.pop("lm_head.weight"))
    r = subprocess.run([sys.executable, "-m", "nanoseek", "convert", str(model_dir), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "lm_head.weight is missing" in r.stderr and "Traceback" not in r.stderr


def test_cli_convert_fp8_round_trip(model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanoseek", "convert", str(model_dir), str(tmp_path / "o"), "--fp8",
                        "--dtype", "float32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["fp8"] is True
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    a, b = nanoseek.load_model(model_dir), nanoseek.load_model(tmp_path / "o")
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        rel = (a(ids) - b(ids)).norm() / a(ids).norm()
    assert rel < 0.05  # e4m3 keeps ~3 significant bits per weight; logits stay close


def test_fp8_weights_of_another_float8_type_are_scaled(model_dir, tmp_path):
    fp8 = nanoseek.save_model(nanoseek.load_model(model_dir), tmp_path / "fp8", fp8=True)
    name = "model.layers.0.mlp.down_proj.weight"
    assert load_file(str(fp8 / "model.safetensors"))[name].dtype == torch.float8_e4m3fn
    want = dict(nanoseek.load_model(fp8).named_parameters())[name]
    rewrite(fp8, lambda t: t.update({name: t[name].float().to(torch.float8_e5m2)}))  # as an e5m2 checkpoint stores it
    got = dict(nanoseek.load_model(fp8).named_parameters())[name]
    assert got.abs().max() < 1  # scaled back, not the raw codes (up to 448)
    assert torch.allclose(got, want, rtol=0.13, atol=0)  # e5m2 keeps 2 mantissa bits of e4m3's 3


@pytest.mark.parametrize("text", ["[]", "null", '"deepseek_v3"', "42"])
def test_config_not_an_object(model_dir, text):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object"):
        nanoseek.load_model(model_dir)


@pytest.mark.parametrize("index", [{"weight_map": []}, [], {"weight_map": {"model.norm.weight": 3}}, {}])
def test_index_without_weight_map_object(model_dir, index):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        nanoseek.load_model(model_dir)


def test_fp8_scale_shape_does_not_match_block_size(model_dir, tmp_path):
    fp8 = nanoseek.save_model(nanoseek.load_model(model_dir), tmp_path / "fp8", fp8=True)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]  # the scales were written for 128x128 blocks
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.layers\.0\.mlp\.down_proj\.weight_scale_inv "
                       r"has shape \(1, 2\), but .* \(96, 256\) in 64x64 blocks needs \(2, 4\)"):
        nanoseek.load_model(fp8)


def test_missing_mtp_layer_does_not_hide_a_missing_main_tensor(model_dir):
    """With the MTP layer absent (as transformers saves it) MTP is dropped, and what else is missing is named."""
    gone = lambda k: k.startswith("model.layers.4.") or k == "model.norm.weight"  # noqa: E731
    rewrite(model_dir, lambda t: [t.pop(k) for k in list(t) if gone(k)])
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is missing from the checkpoint$"):
        nanoseek.load_model(model_dir)


def test_partial_mtp_layer_is_an_error(model_dir):
    rewrite(model_dir, lambda t: t.pop("model.layers.4.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\.eh_proj\.weight is missing"):
        nanoseek.load_model(model_dir)


def test_other_safetensors_files_are_not_weights(model_dir):
    """Beside model.safetensors, a stray *.safetensors (an old copy, an adapter) used to be read too, the last file
    in name order winning each tensor: logits were off by 6, silently. transformers reads model.safetensors alone."""
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        want = nanoseek.load_model(model_dir)(ids)
    save_file({k: v + 1 for k, v in load_file(str(model_dir / "model.safetensors")).items()},
              str(model_dir / "zz_old.safetensors"))
    save_file({"lora_A": torch.zeros(2)}, str(model_dir / "adapter.safetensors"))
    with torch.no_grad():
        assert torch.equal(nanoseek.load_model(model_dir)(ids), want)
    shard = model_dir / "model-00001-of-00002.safetensors"  # model.safetensors wins over index-less shards too
    save_file({k: v + 1 for k, v in load_file(str(model_dir / "model.safetensors")).items()}, str(shard))
    with torch.no_grad():
        assert torch.equal(nanoseek.load_model(model_dir)(ids), want)
    shard.unlink()
    (model_dir / "model.safetensors").rename(model_dir / "weights.safetensors")  # no model.safetensors: every file,
    with pytest.raises(CheckpointError, match="is in both"):  # and a tensor in two of them is an error
        nanoseek.load_model(model_dir)


def test_paths_and_dtype_names(model_dir, tmp_path):
    with pytest.raises(nanoseek.CheckpointError, match="no such directory"):  # exported, for except clauses
        nanoseek.load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="a file, not a model directory"):
        nanoseek.load_model(model_dir / "config.json")
    assert next(nanoseek.load_model(model_dir, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'half'"):
        nanoseek.load_model(model_dir, dtype="half")


def test_an_atomic_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    """eval --out and the other whole-file writes go through a temporary file: a private 0600 results file came back
    0644 (found by a regression audit)."""
    import os

    from nanoseek import atomic

    private = tmp_path / "results.jsonl"
    private.write_text("old")
    os.chmod(private, 0o600)
    atomic.write_text(private, "new")
    assert private.read_text() == "new" and private.stat().st_mode & 0o777 == 0o600


def test_integer_weights_with_scales_are_refused_not_loaded_raw(model_dir, tmp_path):
    """int8 weights with block scales (SGLang's blockwise_int8) passed every shape check, and their raw codes
    (-127..127) became the weights while the scales were dropped."""
    fp8 = nanoseek.save_model(nanoseek.load_model(model_dir), tmp_path / "q", fp8=True)
    name = "model.layers.0.mlp.down_proj.weight"
    rewrite(fp8, lambda t: t.update({name: t[name].float().round().clamp(-127, 127).to(torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is stored as torch\.int8"):
        nanoseek.load_model(fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "blockwise_int8"
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'blockwise_int8' is not supported"):
        nanoseek.load_model(fp8)


def test_non_square_fp8_blocks_are_refused_by_name(model_dir, tmp_path):
    fp8 = nanoseek.save_model(nanoseek.load_model(model_dir), tmp_path / "q", fp8=True)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [128, 64]  # read as 128x128 before: loaded silently
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight_block_size \[128, 64\]: only square blocks"):
        nanoseek.load_model(fp8)


def test_an_index_that_names_the_wrong_file_says_so(model_dir):
    names = list(load_file(str(model_dir / "model.safetensors")))
    other = {n: torch.zeros(1) for n in ["x"]}
    save_file(other, str(model_dir / "other.safetensors"))
    weight_map = {n: "model.safetensors" for n in names} | {names[0]: "other.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"index\.json: maps tensor {names[0]} to other\.safetensors, which "
                                              "does not hold it"):
        nanoseek.load_model(model_dir)


def test_kimi_k2_is_read_as_the_deepseek_v3_architecture_it_names(model_dir):
    """Moonshot's Kimi-K2 config.json says model_type kimi_k2 with architectures [DeepseekV3ForCausalLM]."""
    want = nanoseek.load_model(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "kimi_k2", ["DeepseekV3ForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(nanoseek.load_model(model_dir)(ids), want(ids))
    cfg["architectures"] = ["KimiForCausalLM"]  # another architecture under that name: not ours to guess
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'kimi_k2' is not a DeepSeek-V3 architecture"):
        nanoseek.load_model(model_dir)


def test_a_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    cfg = nanoseek.get_preset("cpu-tiny")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    d = nanoseek.save_model(nanoseek.build_model(cfg), tmp_path / "tied")
    rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))  # as some writers do
    back = nanoseek.load_model(d)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_convert_fp8_of_an_fp8_model_is_exact(model_dir, tmp_path):
    """--fp8 quantised from weights first rounded to --dtype (bfloat16): FP8 -> FP8 moved the logits."""
    fp8 = nanoseek.save_model(nanoseek.load_model(model_dir), tmp_path / "a", fp8=True)
    r = subprocess.run([sys.executable, "-m", "nanoseek", "convert", str(fp8), str(tmp_path / "b"), "--fp8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(fp8 / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    quantised = [n for n, t in a.items() if t.dtype == torch.float8_e4m3fn]
    assert quantised and all(torch.equal(a[n].float(), b[n].float()) for n in quantised)
    assert all(torch.equal(a[n + "_scale_inv"], b[n + "_scale_inv"]) for n in quantised)


def test_the_cli_prints_our_warnings_as_one_line(tmp_path):
    """The missing-MTP warning came with a path and a line of nanoseek's source under it."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    ours = nanoseek.save_model(nanoseek.build_model(nanoseek.get_preset("cpu-tiny")), tmp_path / "ours")
    DeepseekV3ForCausalLM.from_pretrained(ours).save_pretrained(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "nanoseek", "convert", str(tmp_path / "hf"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("warning: ") and "no MTP layer" in r.stderr and r.stderr.count("\n") == 1
