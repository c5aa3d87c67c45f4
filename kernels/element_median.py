"""Coordinate-wise weighted median: per element, argmin_y Σ w_i |y - x_i| (the 1-D geometric median).

Math. Per element, sort the values; the minimisers are the values where the cumulative weight
first reaches 1/2. If it reaches exactly 1/2 (±1e-12; e.g. an even number of equal weights) every
point between that value and the next is a minimiser: the midpoint is returned (the usual median).
Models with weight 0 are left out. Not a linear combination of the inputs (a different input
wins in each element), so the result is a tensor.
Task-vector mode: base + λ·median(x_i - base). The order of x_i - base is the order of x_i, so
median(x_i - base) = median(x_i) - base: with λ = 1 the result is median(x_i) itself (an input
value, exact); otherwise base + λ (median(x_i) - base) in fp32.
Exact values: the median of values that contain no tie is one of the inputs, converted exactly to
fp32 and back; identical inputs return that input bit-exactly.
References: the weighted median (Edgeworth 1888); as a robust merge, coordinate-wise median in
Yin et al., "Byzantine-robust distributed learning", ICML 2018.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .combine import same_tensors
from .errors import MergeInputError
from .gram import compute_dtype, default_chunk, locate_nonfinite, scratch
from .inputs import check_weights

_HALF_TOL = 1e-12


def element_median(xs: Sequence[torch.Tensor], weights=None, base: torch.Tensor | None = None, *,
                   strength: float = 1.0, chunk_elems: int | None = None, key: str = "tensor") -> torch.Tensor:
    """Weighted coordinate-wise median of xs (fp32 result; fp64 for fp64 inputs), on xs[0].device.
    NaN/Inf in an input is refused naming the key and the model (a median would hide it)."""
    n = len(xs)
    if n == 0:
        raise MergeInputError("element_median: no input tensors")
    locate_nonfinite(xs, base, key)
    w = check_weights(weights if weights is not None else torch.ones(n), n)
    dev = xs[0].device
    cdt = compute_dtype(*xs, base)
    lam = float(strength)
    keep = [i for i, v in enumerate(w.tolist()) if v > 0]
    xs = [xs[i] for i in keep]
    w = w[keep].to(dev)
    n = len(xs)
    if n == 1 or same_tensors(xs):
        med = xs[0].to(dtype=cdt, copy=True)
        return _task(med, base, lam, cdt)
    numel = xs[0].numel()
    out = torch.empty(xs[0].shape, dtype=cdt, device=dev)
    if numel == 0:
        return out
    fo = out.view(-1)
    flat = [x.reshape(-1) for x in xs]
    chunk = max(1, min(int(chunk_elems or default_chunk(dev)), numel))
    buf = scratch("element_median", (n, chunk), cdt, dev)
    equal = bool((w == w[0]).all())
    for a in range(0, numel, chunk):
        e = min(numel, a + chunk)
        v = buf[:, : e - a]
        for i in range(n):
            v[i].copy_(flat[i][a:e])
        if equal:
            s = torch.sort(v, dim=0).values
            fo[a:e] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
            continue
        s, idx = torch.sort(v, dim=0)
        cw = w[idx].cumsum(0)                                  # fp64 cumulative weights
        k = (cw >= 0.5 - _HALF_TOL).to(torch.int8).argmax(0)   # first reaching 1/2
        lo = s.gather(0, k[None])[0]
        tie = ((cw.gather(0, k[None])[0] - 0.5).abs() <= _HALF_TOL) & (k < n - 1)
        hi = s.gather(0, (k + 1).clamp(max=n - 1)[None])[0]
        fo[a:e] = torch.where(tie, (lo + hi) / 2, lo)
    return _task(out, base, lam, cdt)


def _task(med: torch.Tensor, base, lam: float, cdt) -> torch.Tensor:
    if base is None or lam == 1.0:  # without a base there are no task vectors to scale
        return med
    b = base.to(cdt)
    return b + lam * (med - b)
