"""From coefficients to tensors: task-vector coefficients and the weighted sum Σ c_i x_i (+ c_b base).

Task-vector mode: base + λ Σ c_i (x_i - base) == Σ (λ c_i) x_i + (1 - λ Σ c_i) base, so a
task-vector result is again a linear combination of the inputs and the base.

combine() computes in fp32 (fp64 when an input is fp64), chunk by chunk in a reused buffer (the
chunk stays in cache and no full-size fp32 temporary is allocated), pivoted on the largest
coefficient c_p as c_p (x_p + Σ (c_i/c_p) x_i) so the final multiply also writes the requested
dtype: one pass per input plus one. Exactness: terms with coefficient 0 are skipped; a single coefficient exactly 1
(others 0) returns a copy of that input; when all used inputs are bit-identical (same dtype) and
the coefficients sum to 1 (±1e-12) with base coefficient 0 (±1e-12) the result is that input,
bit-exact (Σ c_i x in floating point would not be).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import MergeInputError
from .gram import compute_dtype, default_chunk, scratch


def task_vector_coefficients(coeffs: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N) coefficients on task vectors -> ((K, N) on the inputs, (K,) on the base)."""
    lam = float(strength)
    if not math.isfinite(lam):
        raise MergeInputError(f"strength must be finite; got {strength}")
    c = coeffs.to(torch.float64)
    return lam * c, 1.0 - lam * c.sum(-1)


def _as_floats(c) -> list[float]:
    if isinstance(c, torch.Tensor):
        return [float(v) for v in c.detach().reshape(-1).tolist()]
    return [float(v) for v in c]


def same_tensors(xs: Sequence[torch.Tensor]) -> bool:
    """All bit-identical (same dtype and values); a cheap look at a few elements first."""
    first = xs[0]
    f0 = first.reshape(-1)
    for x in xs[1:]:
        if x is first:
            continue
        if x.dtype != first.dtype or x.shape != first.shape:
            return False
        fx = x.reshape(-1)
        if not torch.equal(f0[:64], fx[:64]) or not torch.equal(f0, fx):
            return False
    return True


def combine(xs: Sequence[torch.Tensor], coeffs_row, base: torch.Tensor | None = None,
            base_coeff: float | torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
            chunk_elems: int | None = None) -> torch.Tensor:
    """Σ_i c_i x_i (+ c_b base), computed in fp32 (fp64 for fp64 inputs), returned in `dtype`
    (default: xs[0].dtype), on xs[0].device."""
    cs = _as_floats(coeffs_row)
    if len(cs) != len(xs):
        raise MergeInputError(f"got {len(cs)} coefficients for {len(xs)} tensors")
    if any(not math.isfinite(c) for c in cs):
        raise MergeInputError(f"coefficients must be finite; got {cs}")
    dtype = dtype or xs[0].dtype
    terms = [(c, x) for c, x in zip(cs, xs) if c != 0.0]
    cb = 0.0 if base_coeff is None else float(base_coeff)
    if base is not None and cb != 0.0:
        terms.append((cb, base))
    elif base is None and cb != 0.0:
        raise MergeInputError("a base coefficient was given without a base tensor")
    if not terms:
        return torch.zeros(xs[0].shape, dtype=dtype, device=xs[0].device)
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1].to(dtype=dtype, copy=True)
    used = [x for c, x in zip(cs, xs) if c != 0.0]
    if used and abs(math.fsum(cs) - 1.0) <= 1e-12 and abs(cb) <= 1e-12 and same_tensors(used):
        return used[0].to(dtype=dtype, copy=True)

    cdt = compute_dtype(*[x for _, x in terms])
    shape = xs[0].shape
    dev = xs[0].device
    out = torch.empty(shape, dtype=dtype, device=dev)
    numel = out.numel()
    if numel == 0:
        return out
    # pivot on the largest coefficient: r = x_p + Σ (c_i/c_p) x_i, out = c_p · r (the last
    # multiply writes the output dtype directly): one pass per input plus one
    p = max(range(len(terms)), key=lambda i: abs(terms[i][0]))
    cp, xp = terms[p]
    rest = [(c / cp, x.reshape(-1)) for i, (c, x) in enumerate(terms) if i != p]
    fp = xp.reshape(-1)
    fo = out.view(-1)
    chunk = max(1, min(int(chunk_elems or default_chunk(dev)), numel))
    direct = dtype == cdt
    acc = None if direct else scratch("combine.acc", (chunk,), cdt, dev)
    mixed_ok = all(x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for _, x in rest)
    tmp = None if mixed_ok else scratch("combine.tmp", (chunk,), cdt, dev)
    for a in range(0, numel, chunk):
        e = min(numel, a + chunk)
        r = fo[a:e] if direct else acc[: e - a]
        r.copy_(fp[a:e])
        for c, x in rest:
            r.add_(x[a:e] if mixed_ok else tmp[: e - a].copy_(x[a:e]), alpha=c)
        if direct:
            r.mul_(cp)
        else:
            torch.mul(r, cp, out=fo[a:e])
    return out
