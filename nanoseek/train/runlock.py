"""One process at a time in a run directory.

Two `nanoseek pretrain --out RUN` started by mistake (two terminals, a rerun while the first still runs) used to
train side by side: their checkpoints shared temporary names, their metrics interleaved, and RUN/model could end up
with one run's weights beside the other's tokenizer, both reporting success. A stage now holds an exclusive,
non-blocking `flock` on its run directory itself (nothing is written into it) from the moment it reads or creates the
directory until the stage function returns; the kernel releases it when the process ends, kill -9 included, so no
stale lock is left. Under torchrun rank 0 holds it for every rank. Where flock does not exist (native Windows) there
is no lock.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_held: dict[tuple[int, int], int] = {}  # a run directory's (device, inode) -> the open descriptor holding its lock


def lock(run: Path) -> None:
    """Lock the existing directory `run` for this process (again: nothing to do), or raise UserError if another
    process holds it."""
    from ..cli import UserError, rank

    st = os.stat(run)
    key = (st.st_dev, st.st_ino)  # the directory itself, under whatever name or link it is reached
    if rank() != 0 or key in _held:
        return
    try:
        import fcntl
    except ImportError:  # native Windows
        return
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{run} is in use by another nanoseek process training there: wait for it to end, or choose "
                        "another --out") from None
    except OSError:  # a filesystem without locks (ENOLCK: some network and FUSE mounts): run unlocked, as before
        os.close(fd)
        return
    _held[key] = fd


def releasing(stage):
    """Decorator for a stage function: the locks it took are released when it returns or raises (a test, or a
    speedrun, may run several stages in one process and resume a directory from another)."""

    @functools.wraps(stage)
    def run_stage(*args, **kwargs):
        before = set(_held)
        try:
            return stage(*args, **kwargs)
        finally:
            for key in set(_held) - before:
                os.close(_held.pop(key))

    return run_stage
