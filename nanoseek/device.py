"""Which torch device a command runs on: `--device auto | cpu | cuda | cuda:N | mps`, checked before any work.

auto picks CUDA when there is a GPU, else (for inference) Apple's MPS, else the CPU. A device this machine does not
have is a one-line user error, not torch's assertion from deep inside the first tensor copy. Also what a report
or benchmark says about the machine (`cpu_name`), whether torch.compile can build CPU code here (`has_cxx`), and
whether a model will fit in its free memory (`check_fits`), and the dtype a decoding verb loads weights in (`--dtype`).
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def resolve_device(device: str, allow_mps: bool = True) -> str:
    import torch

    from .cli import UserError

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if (allow_mps and mps) else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU that torch {torch.__version__} can use")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine shows {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1} (CUDA_VISIBLE_DEVICES may hide others)")
    if kind == "mps" and not mps:
        raise UserError(f"--device {device}: Apple's MPS is not available here")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: nanoseek runs on cpu, cuda or mps")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_argument(p) -> None:
    """`--dtype` of the verbs that decode: the weights' and KV cache's dtype."""
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and KV cache for decoding: auto (default) is bfloat16 on a GPU and float32 on the "
                        "CPU; float32 on a GPU gives transformers' float32 logits (and the CPU's answers), at more "
                        "memory and time")


def inference_dtype(name, device: str):
    """--dtype's name (or a torch dtype, or None for auto) -> the torch dtype to decode in on `device`."""
    import torch

    if name in (None, "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, name) if isinstance(name, str) else name


def cpu_name() -> str:
    """The CPU's model name with its family/model and AVX-512 (a VM's model name, "AMD EPYC", hides the generation;
    the first processor's family and model do not)."""
    cpu = platform.processor() or platform.machine()
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return cpu
    info = dict(map(str.strip, line.split(":", 1)) for line in first.splitlines() if ":" in line)
    details = [f"family {info['cpu family']}, model {info['model']}"] if "cpu family" in info else []
    details += ["AVX-512"] if "avx512f" in info.get("flags", "").split() else []
    return info.get("model name", cpu) + (f" ({', '.join(details)})" if details else "")


def has_cxx() -> bool:
    """A C++ compiler on the PATH: what torch.compile's inductor needs to build CPU kernels."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def free_bytes(device: str) -> int | None:
    """Memory a new allocation can use: free GPU memory, or the kernel's MemAvailable (None where unknown)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check_fits(need: float, device: str, what: str, fix: str) -> None:
    """A one-line error, before any work, when `need` bytes will not fit in the device's free memory."""
    from .cli import UserError

    free = free_bytes(device)
    if free is not None and need > free:
        raise UserError(f"{what} need {need / 2**30:.1f} GiB; {device} has {free / 2**30:.1f} GiB free: {fix}")
