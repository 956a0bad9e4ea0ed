"""Hugging Face model directories in and out: `load_model` and `save_model`.

A model directory is what DeepSeek, transformers, vLLM and SGLang use: `config.json` (model_type deepseek_v3),
`model.safetensors` or shards plus `model.safetensors.index.json`, `generation_config.json`. Our module names are the
HF parameter names, with one exception (`_EXPERT` on load, `hf_state_dict` on save): routed experts are stacked in
one (E, out, in) tensor per projection here and stored one matrix per expert on disk (`mlp.experts.{e}.gate_proj.weight`).
MTP layers are written with the embedding and output head copies DeepSeek ships (`layers.{L+k}.embed_tokens`,
`layers.{L+k}.shared_head.head`); on load those copies are recognised and skipped, since the modules share them.

Loading streams one tensor at a time from safetensors into a model built on the meta device, so a checkpoint never
sits in memory twice. FP8 checkpoints (e4m3 weights + float32 `weight_scale_inv`) are dequantised on the fly;
`iter_tensors(path, dequantize=False)` yields the raw FP8 form. Nothing is unpickled. transformers' save_pretrained
drops the MTP layers but keeps num_nextn_predict_layers; such a directory loads without MTP, with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_json
from .config import ConfigError, ModelConfig
from .model.fp8 import BLOCK, dequantize_block, quantize_block
from .model.transformer import Transformer, build_model

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_SHARED = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight$")
_WEIGHT_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")  # a model's weights; other *.safetensors are not
_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what transformers and the tokenizers it wraps write beside a model (chat_template.jinja: transformers >= 4.50)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model")


class CheckpointError(Exception):
    """A model directory we cannot read; the message names the file and the tensor."""


# --- reading ------------------------------------------------------------------------------------------------------
def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'a file, not a model directory' if path.exists() else 'no such directory'}")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object of model settings (it holds {json.dumps(hf)[:40]})")
    try:
        return ModelConfig.from_hf(hf)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map of tensor name -> file name)")
        return {name: path / fname for name, fname in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors").is_file():  # transformers reads it alone: other *.safetensors are not weights
        files = [path / "model.safetensors"]
    else:  # shards without an index, else whatever there is
        files = [f for f in files if _WEIGHT_FILE.match(f.name)] or files
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not read)")
    out = {}
    for f in files:
        with _open(f) as sf:
            for name in sf.keys():
                if name in out:
                    raise CheckpointError(f"{path}: tensor {name} is in both {out[name].name} and {f.name}")
                out[name] = f
    return out


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None


def iter_tensors(path: str | Path, dequantize: bool = True, dtype=torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) one at a time, file by file. With `dequantize`, FP8 weights come out as real
    weights in `dtype` and their `weight_scale_inv` companions are not yielded."""
    path = Path(path)
    files = _tensor_files(path)
    block = BLOCK
    qc = read_config(path).quantization_config
    if qc and qc.get("quant_method", "fp8") != "fp8":
        raise CheckpointError(f"{path / 'config.json'}: quantization_config quant_method {qc.get('quant_method')!r} is "
                              "not supported (only DeepSeek's fp8 block format; dequantise the model first)")
    if qc and qc.get("weight_block_size"):
        sizes = qc["weight_block_size"]
        if len(set(sizes)) != 1:
            raise CheckpointError(f"{path / 'config.json'}: quantization_config weight_block_size {sizes}: only square "
                                  "blocks are read (DeepSeek's are [128, 128])")
        block = int(sizes[0])
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
        with _open(f) as sf:
            held = set(sf.keys())
            for name in names:
                if dequantize and name.endswith("_scale_inv"):
                    continue
                if name not in held:
                    raise CheckpointError(f"{path / 'model.safetensors.index.json'}: maps tensor {name} to {f.name}, "
                                          "which does not hold it")
                try:
                    t = sf.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{f}: tensor {name} is unreadable, the file may be truncated ({e})") from None
                if dequantize and t.is_floating_point() and t.element_size() == 1:  # any float8 (e4m3fn, e5m2, ...)
                    sname = name + "_scale_inv"
                    if sname not in files:
                        raise CheckpointError(f"{f}: FP8 tensor {name} has no {sname}")
                    if files[sname] == f:
                        scale = sf.get_tensor(sname)
                    else:
                        with _open(files[sname]) as sf2:
                            scale = sf2.get_tensor(sname)
                    want = tuple(-(-n // block) for n in t.shape)  # one scale per block x block tile
                    if t.dim() != 2 or tuple(scale.shape) != want:
                        raise CheckpointError(f"{f}: {sname} has shape {tuple(scale.shape)}, but {name} "
                                              f"{tuple(t.shape)} in {block}x{block} blocks needs {want} "
                                              "(see quantization_config.weight_block_size in config.json)")
                    t = dequantize_block(t, scale, dtype, block)
                yield name, t


def load_model(path: str | Path, device="cpu", dtype=torch.float32, strict: bool = True) -> Transformer:
    """Read any deepseek_v3 HF directory (ours or DeepSeek's; single file or sharded; bf16/fp16/fp32/FP8) into
    `dtype` (a torch dtype or its name, "bfloat16")."""
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in _SAVE_DTYPES:
            raise ValueError(f"dtype {dtype!r}: one of {', '.join(_SAVE_DTYPES)}")
        dtype = _SAVE_DTYPES[dtype]
    cfg = read_config(path)
    cfg.quantization_config = None  # weights are dequantised into `dtype`
    files = _tensor_files(path)
    L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    # transformers' save_pretrained drops the MTP layers but keeps num_nextn_predict_layers in config.json
    mtp_prefixes = tuple(f"model.layers.{i}." for i in range(L, L + n_mtp))
    no_mtp = n_mtp > 0 and not any(name.startswith(mtp_prefixes) for name in files)
    if no_mtp:
        cfg.num_nextn_predict_layers = 0
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    expected: dict[str, tuple] = {}  # every tensor we need: name -> shape
    for name, p in params.items():
        if name.endswith("mlp.experts.gate_proj") or name.endswith("mlp.experts.up_proj") or name.endswith(
            "mlp.experts.down_proj"
        ):
            base, proj = name.rsplit(".", 1)
            for e in range(p.shape[0]):
                expected[f"{base}.{e}.{proj}.weight"] = tuple(p.shape[1:])
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            expected[name] = tuple(p.shape)
    seen: set[str] = set()
    n_layers = L + cfg.num_nextn_predict_layers
    for name, t in iter_tensors(path, dequantize=True, dtype=dtype):
        where = f"{path / files[name].name}: tensor {name}"
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue  # (a tied head's copy, which some writers store: the head is the embedding, as in transformers)
        m = _MTP_SHARED.match(name)
        if m and int(m.group(1)) >= L:
            continue  # MTP's copies of the shared embedding / output head
        layer = re.match(r"^model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= n_layers and not strict:
            continue
        if name not in expected:
            raise CheckpointError(f"{where} is not part of this model (config.json does not describe it)")
        if not t.is_floating_point():  # e.g. int8 weights with their own scales: never copy raw integers as weights
            raise CheckpointError(f"{where} is stored as {t.dtype}; only float weights and DeepSeek's FP8 "
                                  "(float8 + weight_scale_inv) are read")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{where} has shape {tuple(t.shape)}, config.json implies {expected[name]}")
        em = _EXPERT.match(name)
        with torch.no_grad():
            if em:
                params[f"{em.group(1)}.{em.group(3)}"][int(em.group(2))].copy_(t)
            else:
                params[name].copy_(t)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing from the checkpoint{more}")
    if no_mtp:
        warnings.warn(f"{path}: config.json declares {n_mtp} MTP layer(s) but the weights have no MTP layer "
                      "(transformers' save_pretrained drops it); loaded without MTP (num_nextn_predict_layers=0)",
                      stacklevel=2)
    model.eval()
    return model


# --- writing ------------------------------------------------------------------------------------------------------
def _quantizable(name: str) -> bool:
    """The weights DeepSeek stores in FP8: attention and FFN projections; not the router, norms, embedding, head."""
    return ((".self_attn." in name or ".mlp." in name) and name.endswith(("proj.weight", "proj_with_mqa.weight"))
            and ".gate." not in name)


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every tensor of the model, experts split, MTP shared copies added."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith(("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")):
            base, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                yield f"{base}.{e}.{proj}.weight", t[e]
        else:
            yield name, t
    for k in range(cfg.num_nextn_predict_layers):
        idx = cfg.num_hidden_layers + k
        yield f"model.layers.{idx}.embed_tokens.weight", model.model.embed_tokens.weight.detach()
        yield f"model.layers.{idx}.shared_head.head.weight", model.lm_head.weight.detach()


def save_model(
    model: Transformer, path: str | Path, fp8: bool = False, max_shard_bytes: int = 4 << 30, dtype=None,
    tokenizer=None,
) -> Path:
    """Write an HF model directory that transformers / vLLM / SGLang load. `fp8` stores attention and FFN weights
    as e4m3 with 128×128 block scales (DeepSeek's format); `dtype` casts the rest (default: as in the model).
    `tokenizer` (a nanoseek or transformers tokenizer, or a directory to copy the tokenizer files from) replaces the
    directory's tokenizer files with its own: without them it holds weights alone, which eval, serve and vLLM cannot
    prompt.
    Over an existing model directory, the old model's weight files are replaced or removed; other files are kept."""
    from .tokenizer import Tokenizer

    if dtype is not None:
        dtype = _save_dtype(dtype)
    path = Path(path)
    same_dir = isinstance(tokenizer, (str, Path)) and Path(tokenizer).resolve() == path.resolve()
    if isinstance(tokenizer, (str, Path)) and not (Path(tokenizer) / "tokenizer.json").is_file() and not (
            Path(tokenizer) / "tokenizer_config.json").is_file():  # checked before anything is written
        raise ValueError(f"save_model: tokenizer {tokenizer} holds no tokenizer files (tokenizer.json)")
    if tokenizer is not None and not isinstance(tokenizer, (str, Path, Tokenizer)) and not hasattr(
            tokenizer, "save_pretrained"):
        raise ValueError(f"save_model: tokenizer must be a nanoseek or transformers tokenizer or a directory, not "
                         f"{type(tokenizer).__name__}")
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config.replace()
    if fp8:
        cfg.quantization_config = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_state_dict(model):
        t = t.detach().to("cpu")
        if fp8 and _quantizable(name) and t.dim() == 2:
            q, s = quantize_block(t)
            pieces = {name: q, name + "_scale_inv": s}
        else:
            if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
                t = t.to(dtype)
            pieces = {name: t}
        nbytes = sum(p.numel() * p.element_size() for p in pieces.values())
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1].update({k: v.contiguous().clone() for k, v in pieces.items()})
        size += nbytes
    n = len(shards)
    fnames = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = path / "model.safetensors.index.json"
    # Each file is replaced atomically, the directory is not. config.json and the index tell a loader what the
    # directory holds: they go first and come back last, so an overwrite cut short (Ctrl-C, kill, full disk) leaves a
    # directory that fails to load rather than one mixing old and new weights. (Training checkpoints do not rely on
    # this: train/loop.py writes each into a fresh directory and switches to it atomically.)
    (path / "config.json").unlink(missing_ok=True)
    index.unlink(missing_ok=True)
    for fname, shard in zip(fnames, shards):
        _atomic_save(shard, path / fname, {"format": "pt"})
    for f in path.iterdir():  # the old model's weight files that this one does not use
        if _WEIGHT_FILE.match(f.name) and f.name not in fnames:
            f.unlink()
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}  # DeepSeek-R1's recommended sampling
    write_json(path / "generation_config.json", gen, indent=2)
    if n > 1:
        weight_map = {k: fname for fname, shard in zip(fnames, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
        write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    if isinstance(tokenizer, (str, Path)):
        if not same_dir:  # (from its own directory: the files are already there)
            copy_tokenizer(tokenizer, path)
    elif isinstance(tokenizer, Tokenizer):
        copy_tokenizer(None, path)  # an earlier tokenizer's files would be read beside the new one's
        tokenizer.save(path)
    elif tokenizer is not None:  # transformers'
        copy_tokenizer(None, path)
        tokenizer.save_pretrained(path)
    hf_cfg = cfg.to_hf()  # torch_dtype: what the unquantised weights are stored in
    hf_cfg["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).replace("torch.", "")
    write_json(path / "config.json", hf_cfg, indent=2)
    return path


def copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    """dst's tokenizer files become src's (none when src is None): what src lacks is removed from dst, never left
    over from an earlier model."""
    for name in TOKENIZER_FILES:
        if src is not None and (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
        else:
            (dst / name).unlink(missing_ok=True)


def _save_dtype(dtype) -> torch.dtype:
    """float32 / bfloat16 / float16, as a torch dtype or its name. Any other cast would destroy the weights
    (integers round them to 0) or write FP8 without the block scales a loader needs."""
    name = str(dtype).replace("torch.", "")
    if name not in _SAVE_DTYPES:
        raise ValueError(f"save_model: dtype {dtype} is not float32, bfloat16 or float16 "
                         "(for DeepSeek's FP8 format pass fp8=True)")
    return _SAVE_DTYPES[name]


def _atomic_save(tensors: dict[str, torch.Tensor], dest: Path, meta: dict) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, dest)


