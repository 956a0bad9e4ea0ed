"""Which problems a GRPO step trains on: the task suite's cells (evenly, or weighted by how learnable each is now)
or a --data file's problems in seeded passes; its state is saved with the run's checkpoint."""

from __future__ import annotations

import hashlib
import json
import random

import torch


def task_cells(cfg) -> list[tuple[str, int]]:
    """The (family, level) cells that cfg.tasks names ("family" = all its levels, "family:level" = one)."""
    from ..cli import UserError
    from ..data.tasks import parse_cells

    try:
        return parse_cells(cfg.tasks)
    except ValueError as e:
        raise UserError(str(e)) from None


class Curriculum:
    """Which problems a step trains on. Uniform: an even mixture of the cells. Adaptive (`--adaptive-tasks`): each
    cell is drawn with weight p(1 − p) + 0.01, p the running (EMA 0.7) rollout accuracy of that cell, starting at
    0.5 — the cells the policy sometimes but not always solves, where a group's rewards differ and GRPO's advantage
    is non-zero; cells it never or always solves keep a small share so a change shows up. With `--data`: the file's
    problems in order of a seeded permutation, a new one for every pass over the file. Its state (cell accuracies,
    the position in the file) is saved with the checkpoint, so a resumed run samples as the uninterrupted one would."""

    def __init__(self, cfg, pool: list | None = None):  # cfg: a grpo.GRPOConfig
        self.cfg, self.pool = cfg, pool
        self.cells = [] if pool is not None else task_cells(cfg)
        self.accuracy = {f"{f}:{lv}": 0.5 for f, lv in self.cells}
        self.position = 0  # --data: problems drawn so far
        self._order: tuple[int, list[int]] = (-1, [])  # --data: (pass over the file, its order)

    def sample(self, step: int, round_: int, n: int):
        from ..data.tasks import cells_mixture, generate

        if self.pool is not None:
            picks = [self._from_file(j) for j in range(self.position, self.position + n)]
            self.position += n
            return picks
        seed = self.cfg.seed * 1_000_003 + step * 101 + round_
        if not self.cfg.adaptive_tasks:
            return cells_mixture(n, self.cells, seed=seed, split="train")
        rng = random.Random(f"curriculum-{seed}")
        weights = [(p := self.accuracy[f"{f}:{lv}"]) * (1 - p) + 0.01 for f, lv in self.cells]
        picks = rng.choices(range(len(self.cells)), weights=weights, k=n)
        out = []
        for i in sorted(set(picks)):
            f, lv = self.cells[i]
            out += generate(f, lv, picks.count(i), seed=seed, split="train")
        rng.shuffle(out)
        return out

    def _from_file(self, j: int):
        """The j-th problem drawn from --data: pass j // N over the file, in that pass's seeded order."""
        N, epoch = len(self.pool), j // len(self.pool)
        if self._order[0] != epoch:
            order = list(range(N))
            random.Random(f"data-{self.cfg.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self.pool[self._order[1][j % N]]

    def observe(self, problems, accuracy: torch.Tensor) -> None:
        """accuracy (P, G) of the rollouts of `problems`."""
        for prob, acc in zip(problems, accuracy.mean(dim=1).tolist()):
            key = f"{prob.family}:{prob.level}"
            if key in self.accuracy:
                self.accuracy[key] = 0.7 * self.accuracy[key] + 0.3 * acc

    def state_dict(self) -> dict:
        return {"cell_accuracy": dict(self.accuracy), "position": self.position, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """ValueError if the state is for other --data problems (a file edited since the run started)."""
        if state.get("fingerprint") not in (None, self.fingerprint()):
            raise ValueError("the --data problems are not those the run was trained on; resume with the file it "
                             "started with, or start a new run")
        self.accuracy.update(state.get("cell_accuracy", {}))
        self.position = state.get("position", 0)

    def fingerprint(self) -> str | None:
        """sha256 of the --data problems (question and answer, in order); None for the task suite."""
        if self.pool is None:
            return None
        return hashlib.sha256(json.dumps([(p.question, p.answer) for p in self.pool]).encode()).hexdigest()
