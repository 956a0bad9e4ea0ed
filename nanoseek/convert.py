"""`nanoseek convert IN OUT`: re-write a deepseek_v3 model directory, e.g. DeepSeek's FP8 release to bf16 for
training, or a trained model to DeepSeek's FP8 block format for serving. Weights stream through `load_model`."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="model directory to read (any deepseek_v3 HF directory, FP8 ones included)")
    p.add_argument("output", help="model directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of the written weights (default bfloat16)")
    p.add_argument("--fp8", action="store_true", help="store attention/FFN weights as e4m3 with 128x128 block scales")
    p.add_argument("--overwrite", action="store_true", help="replace what OUTPUT already holds (refused otherwise)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import copy_tokenizer, load_model, read_config, save_model
    from .cli import UserError, writable_dir

    src, dst = Path(args.input), Path(args.output)
    if dst.resolve() == src.resolve():
        raise UserError("output must differ from input (the input would be overwritten while it is read)")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} is a file; name a model directory to write")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise UserError(f"{dst} is not empty; pass --overwrite to replace the model in it, or choose a new directory")
    writable_dir(args.output, "output")
    # FP8 -> FP8: quantise from float32, not from weights already rounded to --dtype (every FP8 value is then kept;
    # a scale may move by 1 ulp). Any other input loads in --dtype: float32 would double a large model's memory.
    fp8_in = read_config(src).quantization_config is not None
    model = load_model(src, dtype=torch.float32 if args.fp8 and fp8_in else DTYPES[args.dtype])
    save_model(model, dst, fp8=args.fp8, dtype=DTYPES[args.dtype])
    copy_tokenizer(src, dst)  # the output's tokenizer is the input's, or none (never an overwritten model's)
    if (src / "generation_config.json").is_file():  # its stop ids and sampling defaults (serve, chat, generate read them)
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
    print(json.dumps({"output": str(dst), "fp8": args.fp8, "dtype": args.dtype}))
    return 0
