"""Muon (train/muon.py): Newton-Schulz orthogonalises, the Muon step is the documented formula, the AdamW half is
torch's AdamW, and a Muon pretraining run resumes bit-identically."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nanoseek.train.loop import make_optimizer
from nanoseek.train.muon import newton_schulz

from test_pretrain import metrics, pretrain, weights


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (8, 64, 96), (3, 32, 32)])
def test_newton_schulz_is_close_to_the_orthogonal_factor(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    O = newton_schulz(G)
    assert O.shape == G.shape
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = (U.mT @ O @ Vh.mT).diagonal(dim1=-2, dim2=-1)  # O's singular values, in G's singular directions
    assert s.max() < 1.25
    # NS5 lifts every singular value but the tiniest (square random matrices have some near 0) to about 0.7-1.2
    assert s[S > 0.05 * S.amax(-1, keepdim=True)].min() > 0.6
    exact = U @ Vh
    cos = (O * exact).sum((-2, -1)) / (O.norm(dim=(-2, -1)) * exact.norm(dim=(-2, -1)))
    assert (cos > 0.95).all()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 4, bias=True)
        self.experts = nn.Parameter(torch.randn(3, 5, 6))


def _grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_muon_step_is_the_documented_formula_and_the_rest_is_adamw():
    torch.manual_seed(0)
    model, ref = Toy(), Toy()
    ref.load_state_dict(model.state_dict())
    lr, wd, mu = 0.01, 0.1, 0.95
    opt = make_optimizer(model, lr, wd, kind="muon")
    adam = torch.optim.AdamW([{"params": [ref.embed_tokens.weight], "weight_decay": wd},
                              {"params": [ref.proj.bias], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)
    bufs = {n: torch.zeros_like(p) for n, p in ref.named_parameters() if n in ("proj.weight", "experts")}
    for step in range(3):
        _grads(model, step)
        _grads(ref, step)
        opt.step()
        adam.step()
        with torch.no_grad():
            for name, buf in bufs.items():
                p = ref.get_parameter(name)
                buf.mul_(mu).add_(p.grad)
                update = newton_schulz(p.grad + mu * buf)
                p.mul_(1 - lr * wd).sub_(lr * 0.2 * math.sqrt(max(p.shape[-2:])) * update)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_muon_run_resumes_bit_identically(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(full, "--optimizer", "muon", "--save-every", "12")
    pretrain(part, "--optimizer", "muon", "--save-every", "12", "--stop-at", "12")
    pretrain(part, "--resume", "--save-every", "12")
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics(full)
    assert [r["loss"] for r in metrics(part)] == [r["loss"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
