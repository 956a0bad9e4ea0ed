"""Token sampling for a batch of requests that may each want different settings.

`sample(logits, temperature, top_p, top_k, generator)` picks one token per row:
- temperature 0 (per row) is greedy argmax;
- otherwise logits / temperature, then top-k (keep the k most likely and any tied with the k-th; 0 = off), then
  top-p / nucleus (keep the smallest most-likely set whose mass reaches top_p, measured on the top-k-renormalised
  distribution, like transformers' TopKLogitsWarper then TopPLogitsWarper; 1.0 = off), then one draw.
Every parameter is a scalar or a per-row list/tensor of length B. The draw is inverse-CDF sampling with exactly one
uniform number per row, taken from that row's own `torch.Generator` when a list of generators is given, so a seeded
request samples the same tokens whatever else shares its batch. All work is tensor ops over (B, V); the only Python
loop is over rows, for the generators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Param = float | int | Sequence | torch.Tensor
Gen = torch.Generator | Sequence[torch.Generator | None] | None


def _rows(x: Param, B: int, dtype, device) -> torch.Tensor:
    """Scalar or length-B sequence/tensor -> (B,) tensor."""
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(B) if t.dim() == 0 else t.reshape(B)


def filtered_sorted(logits: torch.Tensor, temperature: Param = 1.0, top_p: Param = 1.0, top_k: Param = 0):
    """logits (B, V) -> (probs (B, V) sorted descending with filtered entries zeroed, not renormalised;
    order (B, V) the vocabulary id of each sorted entry). Rows with temperature 0 are treated as temperature 1."""
    B, V = logits.shape
    dev = logits.device
    t = _rows(temperature, B, torch.float32, dev)
    t = torch.where(t > 0, t, torch.ones_like(t))
    probs = (logits.float() / t[:, None]).softmax(dim=-1)  # (B, V)
    probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=dev)[None, :]  # (1, V)
    k = _rows(top_k, B, torch.long, dev)
    k = torch.where(k > 0, k, torch.full_like(k, V))
    kth = probs.gather(1, (k - 1).clamp(max=V - 1)[:, None])  # (B, 1) the k-th largest probability
    probs = probs.masked_fill(probs < kth, 0.0)  # top-k, keeping tokens tied with the k-th (transformers, vLLM)
    p = _rows(top_p, B, torch.float32, dev)
    mass_before = (probs.cumsum(-1) - probs) / probs.sum(-1, keepdim=True)  # renormalised over the top-k set
    # top-p (1 = off: the float sum reaches 1 before the tail ends); the best token always stays
    probs = probs.masked_fill((mass_before >= p[:, None]) & (rank > 0) & (p[:, None] < 1), 0.0)
    return probs, order


def filtered_probs(logits: torch.Tensor, temperature: Param = 1.0, top_p: Param = 1.0, top_k: Param = 0):
    """The distribution `sample` draws from, in vocabulary order: (B, V), rows sum to 1."""
    probs, order = filtered_sorted(logits, temperature, top_p, top_k)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def _uniforms(B: int, generator: Gen) -> torch.Tensor:
    """(B,) float64 uniforms in [0, 1) on the CPU: one draw per row from that row's generator."""
    if generator is None or isinstance(generator, torch.Generator):
        g = generator if generator is None or generator.device.type == "cpu" else None
        if g is None and generator is not None:  # a device generator: draw there, move here
            return torch.rand(B, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        return torch.rand(B, generator=g, dtype=torch.float64)
    if len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} rows")
    return torch.cat([_uniforms(1, g) for g in generator])


def sample(
    logits: torch.Tensor,  # (B, V)
    temperature: Param = 0.0,
    top_p: Param = 1.0,
    top_k: Param = 0,
    generator: Gen = None,
) -> torch.Tensor:
    """-> (B,) long token ids. See the module docstring."""
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)
    t = _rows(temperature, B, torch.float32, "cpu")
    if not bool((t > 0).any()):
        return greedy
    probs, order = filtered_sorted(logits, temperature, top_p, top_k)
    if probs.device.type == "mps":  # MPS has no float64 (pytorch#122602): the draw is made on the CPU
        probs, order = probs.cpu(), order.cpu()
    cdf = probs.double().cumsum(-1)  # (B, V), flat after the last kept token
    u = _uniforms(B, generator).to(cdf.device) * cdf[:, -1]
    j = torch.searchsorted(cdf, u[:, None], right=True)  # first sorted index whose cdf exceeds u
    kept = (probs > 0).sum(-1, keepdim=True)
    j = torch.minimum(j, kept - 1)  # guards u rounding up to the total
    drawn = order.gather(1, j)[:, 0].to(logits.device)
    return torch.where(t.to(logits.device) > 0, drawn, greedy)
