"""Processes of a run: one, or one per device under torchrun (gloo on CPU, NCCL on CUDA), and the collectives the
training stages use. Rank 0 alone prepares data, evaluates and saves; the others wait for it in a collective."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_MIN = 60  # how long a process waits for the others (rank 0 evaluating, saving)
PREPARE_TIMEOUT = datetime.timedelta(days=7)  # how long the others wait for rank 0 to prepare the data


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    prepare_group: object = None  # wait_for_main's gloo group (made by init_distributed under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def wait_for_main(self) -> None:
        """A barrier for rank 0's data preparation (training a tokenizer, tokenizing a user's corpus), which may take
        longer than COLLECTIVE_TIMEOUT_MIN: a multi-GB corpus takes rank 0 hours. It runs in a gloo group of its own
        (made at start-up, when every rank is there) with a timeout of days, and is polled, so that a Ctrl-C or a
        SIGTERM reaches the waiting ranks at once; if rank 0 fails, torchrun stops the others."""
        if self.world_size == 1:
            return
        work = dist.barrier(group=self.prepare_group, async_op=True)
        while not work.is_completed():
            time.sleep(0.1)
        work.wait()  # raises what the barrier ended with

    def close(self) -> None:
        """End the process group on every rank together. A rank that exits with gloo still running could abort
        ("terminate called without an active exception") while the other rank was tearing down."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(n, ...) on every rank -> (world_size · n, ...) in rank order, on t's device."""
        if self.world_size == 1:
            return t
        parts = [torch.empty_like(t, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(parts, t.to(self.device).contiguous())  # NCCL gathers device tensors only
        return torch.cat(parts).to(t.device)

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Sum the parameters' gradients over the ranks, in one flat buffer (for updates whose ranks run different
        numbers of backward passes, which DDP cannot sync). A parameter that no rank has a gradient for keeps None,
        so the optimiser skips it as one process would."""
        if self.world_size == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        if not live:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in live])
        dist.all_reduce(flat)
        for p, g in zip(live, flat.split([p.numel() for p in live])):
            p.grad = g.view_as(p).clone()


STARTED_PROCESS_GROUP = False  # set by init_distributed; cli.main then leaves without the interpreter's teardown


def init_distributed(device: str = "auto") -> Dist:
    """Single process, or one process per device under torchrun (gloo on CPU, NCCL on CUDA)."""
    from ..device import resolve_device

    global STARTED_PROCESS_GROUP
    device = resolve_device(device, allow_mps=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device if device != "cuda" else "cuda:0"))
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu") or device.startswith("cuda:"):
        from ..cli import UserError

        raise UserError(f"--device {device} under torchrun: pass --device cuda (each process takes cuda:LOCAL_RANK) "
                        "or cpu")
    STARTED_PROCESS_GROUP = True
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # Rank 0 alone evaluates and saves while the others wait in a collective: NCCL's default 10 minutes would end a
    # run whose evaluation takes longer. A process that dies is caught by torchrun at once, whatever the timeout.
    timeout = datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN)
    if kind == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    prepare = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)  # for wait_for_main
    return Dist(rank, world, torch.device("cuda", local) if kind == "cuda" else torch.device("cpu"), prepare)
