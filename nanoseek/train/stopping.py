"""Stopping a training run cleanly on Ctrl-C or SIGTERM (what Slurm, Kubernetes, `docker stop` and `timeout` send).

Inside `StopOnSignal` the first signal only asks the run to stop: the step under way finishes, the loop saves a
checkpoint at that step and raises `Stopped`, and the command exits 130 (Ctrl-C) or 143 (SIGTERM). `--resume` then
continues as if the run had never stopped. A second Ctrl-C stops at once (one process only: under torchrun the
launcher forwards the terminal's Ctrl-C, so every worker sees two), losing the steps since the last checkpoint.
Under torchrun every rank adds its request to the step's all-reduce (`requested`), so all ranks stop at one step.
"""

from __future__ import annotations

import signal
import sys
import threading


class Stopped(KeyboardInterrupt):
    """A run that stopped on a signal after saving its checkpoint; the CLI prints `message`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.message, self.signum = message, signum


class StopOnSignal:
    """Context manager: while inside, SIGINT and SIGTERM set `signum` instead of ending the process."""

    def __init__(self, stage: str, world_size: int = 1):
        self.stage, self.world_size = stage, world_size
        self.signum: int | None = None
        self._before: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # (signal handlers live on the main thread)
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # a signal the parent ignores (`cmd &` in a script)
                    self._before[s] = signal.signal(s, self._handle)  # stays ignored
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        if self.signum is not None and exc_type is None:  # asked during the last step: the run is done and saved,
            # and the command still stops (a speedrun does not start its next stage)
            raise Stopped(f"{self.stage}: stopped after its last step, which is saved", self.signum)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and self.world_size == 1:
                raise KeyboardInterrupt  # the user insists
            return
        self.signum = signum
        from ..cli import close_bars, rank

        if rank() == 0:
            close_bars()  # the message on a line of its own, not after the progress bar
            again = " (Ctrl-C again to stop at once, losing the steps since the last checkpoint)" \
                if signum == signal.SIGINT and self.world_size == 1 else ""
            print(f"{self.stage}: stopping after this step to save a checkpoint{again}", file=sys.stderr, flush=True)

    @property
    def requested(self) -> float:
        """1.0 once this process was asked to stop, else 0.0: a value for the step's all-reduce (mean > 0: stop)."""
        return float(self.signum is not None)

    def agreed(self, reduced: float) -> bool:
        """Whether the run stops after this step, given the step's all-reduced `requested`. One process also heeds a
        signal that came after the reduce (during an evaluation or the logging): it waited a whole step otherwise."""
        return reduced > 0 or (self.world_size == 1 and self.signum is not None)

    def stopped(self, step: int, run) -> Stopped:
        return Stopped(f"{self.stage}: stopped at step {step}, its checkpoint saved in {run}: continue with --resume",
                       self.signum or signal.SIGINT)
