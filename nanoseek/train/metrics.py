"""What a training run records about itself: RUN/metrics.jsonl (one JSON object per logged step, rewound on
resume), the JSON line a training command ends with, and the DeepSeek-V3-style cost row (device-hours, FLOPs, MFU
against the device's peak, dollars) that RUN/cost.json and the report's cost table hold.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from pathlib import Path

import torch

from .. import atomic

def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (the last one, cut by a kill mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines() if Path(path).is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class Metrics:
    """Appends one JSON object per logged step to RUN/metrics.jsonl; on resume, drops lines past the checkpoint so
    the file reads as one uninterrupted run, and removes the cost.json of an earlier stop (--stop-at): the run is
    going again, and its cost is final only when it ends."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():  # rewritten whole, then swapped in: a kill meanwhile loses no history
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            atomic.write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
            (self.path.parent / "cost.json").unlink(missing_ok=True)

    def log(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def run_summary(stage: str, run: Path, step: int, last: dict, cost: dict) -> dict:
    """The JSON a training command ends with. `step`: where the run is; `last`: the last row this invocation logged,
    or (a resumed run that was already done) the run's last logged row."""
    if not last:
        last = (read_metrics(run / "metrics.jsonl") or [{}])[-1]
    return {"stage": stage, "model": str(run / "model"), "steps": step, "final": last, "cost": cost}


# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, for MFU on GPUs: (pattern in the device's name,
# peak), the first that matches; the PCIe and NVL cards of a chip run slower than its SXM one.
GPU_PEAK_BF16 = [(r"\bH[18]00\b.*\bPCIe\b", 756e12), (r"\bH[12]00\b.*\bNVL\b", 835e12), (r"\bH(100|200|800)\b", 989e12),
                 (r"\bA[18]00\b", 312e12), (r"\bL40S\b", 362e12), (r"\b4090\b", 165e12)]


def datasheet_peak(name: str) -> float | None:
    """The bf16 peak of a GPU named `name` (torch.cuda.get_device_name), or None when the table does not know it."""
    return next((peak for pattern, peak in GPU_PEAK_BF16 if re.search(pattern, name)), None)


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU; measured once per device and CPU thread count, so a run's metrics
    and its cost table divide by the same peak."""
    return _peak_flops(torch.device(device), torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _peak_flops(device: torch.device, threads: int) -> tuple[float, str]:
    from ..device import cpu_name
    from ..flops import measured_peak_flops

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (peak := datasheet_peak(name)) is not None:
            return peak, f"{name} datasheet bf16 dense"
        return measured_peak_flops(device, torch.bfloat16, n=8192), f"{name} measured bf16 matmul"
    return measured_peak_flops("cpu"), f"{cpu_name()}, {threads} thread{'s' * (threads != 1)}, measured fp32 matmul"


def cost_summary(wall_s: float, n_devices: int, flops: float, peak: float, price_per_hour: float, device: str) -> dict:
    """DeepSeek-V3-style cost table row: device-hours, FLOPs, MFU against `peak` (FLOP/s of all the devices
    together) and dollars at `price_per_hour` per device."""
    hours = wall_s * n_devices / 3600
    return {
        "device": device,
        "devices": n_devices,
        "wall_s": round(wall_s, 2),
        "device_hours": round(hours, 5),
        "flops": float(f"{flops:.4g}"),
        "mfu": round(flops / max(wall_s, 1e-9) / peak, 4),
        "peak_flops": float(f"{peak:.4g}"),  # the FLOP/s of all the devices together that MFU divides by
        "price_per_device_hour": price_per_hour,
        "dollars": round(hours * price_per_hour, 4),
    }


def run_cost(run: Path, d, wall_s: float, flops: float, price_per_hour: float) -> dict:
    """The run's cost row (cost_summary), also written to RUN/cost.json. GPUs: one device per rank; a CPU is one
    device however many processes share its cores (each rank measured the peak of its share)."""
    peak, peak_how = device_peak_flops(d.device)
    shared_cpu = d.device.type != "cuda" and d.world_size > 1
    n_devices = 1 if shared_cpu else d.world_size
    device = f"{peak_how}, {d.world_size} processes" if shared_cpu else peak_how
    cost = cost_summary(wall_s, n_devices, flops, peak * d.world_size, price_per_hour, device)
    atomic.write_json(run / "cost.json", cost)
    return cost


class Timer:
    """Wall-clock seconds since it was made, less the time spent inside `excluding()` (a held-out evaluation, which
    no stage's cost counts)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    @contextlib.contextmanager
    def excluding(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t
