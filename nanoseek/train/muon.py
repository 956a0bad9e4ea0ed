"""Muon for the weight matrices, AdamW for everything else, in one optimiser (`--optimizer muon`).

Muon (Keller Jordan, 2024) replaces each matrix's update by the nearest semi-orthogonal matrix to its momentum,
so every direction of the matrix moves at the same rate. As Moonlight (Kimi, "Muon is Scalable for LLM Training",
2025) ran it on a DeepSeek-V3-architecture MoE, the update is rescaled to AdamW's RMS, so the same learning rate and
weight decay serve both kinds of parameter. For a matrix W (A, B) with gradient g, momentum μ, step size lr:

    m  = μ·m + g                          momentum buffer
    u  = g + μ·m                          Nesterov
    O  = NS5(u)                           ≈ U Vᵀ of u = U S Vᵀ (five Newton-Schulz iterations, below)
    W -= lr·(0.2·√max(A, B)·O + wd·W)

Newton-Schulz: X = u / ‖u‖_F (transposed so that A ≤ B), then five times X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X with
(a, b, c) = (3.4445, −4.7750, 2.0315), which pushes every singular value towards 1 (to about 0.7–1.2; exactness
is not needed). The routed experts' stacked (E, out, in) weights are E matrices, each orthogonalised on its own
(one batched iteration). Matrices of the same shape are stacked so that each iteration runs once per shape.

Muon takes the 2-D (and stacked 3-D) weights inside the layers; the token embedding, the output head, norms and
biases stay on AdamW (β 0.9/0.95, decoupled weight decay on the embedding and head, none on norms and biases).
"""

from __future__ import annotations

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """G (..., A, B) -> the semi-orthogonal factor of each trailing matrix (approximately), same shape."""
    a, b, c = NS_COEFFS
    X = G.reshape(-1, *G.shape[-2:])  # (n, A, B): batched matmuls of 3-D tensors (4-D ones ran at half the speed)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a·X + (b·A + c·A²)·X
    return (X.mT if tall else X).reshape(G.shape)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Matrices inside the layers; the embedding and output head are looked up / read out, not mixed."""
    return p.dim() >= 2 and "embed_tokens" not in name and "lm_head" not in name


class Muon(torch.optim.Optimizer):
    """Param groups carry `muon: bool`; Muon groups use `momentum`, the others AdamW's `betas` and `eps`."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8,
                 ns_steps: int = 5):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, ns_steps=ns_steps,
                                      weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for shape, ps in by_shape.items():
            bufs = []
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            grads = [p.grad for p in ps]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            nesterov = torch._foreach_add(grads, bufs, alpha=mu)
            update = newton_schulz(torch.stack(nesterov), group["ns_steps"])  # (n, *shape)
            scale = 0.2 * math.sqrt(max(shape[-2], shape[-1]))
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, list(update.unbind(0)), alpha=-lr * scale)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        m, v = [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            st["step"] += 1
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
        t = self.state[params[0]]["step"].item()  # every parameter of a group steps together
        grads = [p.grad for p in params]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**t))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1**t))
