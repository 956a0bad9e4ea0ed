"""Which torch device a command runs on: `--device auto | cpu | cuda | cuda:N | mps`, checked before any work.

auto picks CUDA when there is a GPU, else (for inference) Apple's MPS, else the CPU. A device this machine does not
have is a one-line user error, not torch's assertion from deep inside the first tensor copy. Also what a report
or benchmark says about the machine (`cpu_name`), and whether torch.compile can build CPU code here (`has_cxx`).
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
    if kind == "mps" and not mps:
        raise UserError(f"--device {device}: Apple's MPS is not available here")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: nanoseek runs on cpu, cuda or mps")
    return device


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
