"""Which torch device a command runs on: `--device auto | cpu | cuda | cuda:N | mps`, checked before any work.

auto picks CUDA when there is a GPU, else (for inference) Apple's MPS, else the CPU. A device this machine does not
have is a one-line user error, not torch's assertion from deep inside the first tensor copy.
"""

from __future__ import annotations


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
