"""Karcher mean of directions on the unit sphere, magnitude averaged separately, in coefficient space.

Math. u_i = p_i / ‖p_i‖. The Karcher (Riemannian) mean minimises Σ ᾱ_i θ(u_i, y)^2 over unit y;
the result is (Σ α_i ‖p_i‖) · y. Everything is a linear combination of the p_i, so with the
augmented Gram of [m, d_1..d_N] (see gram.py) a vector Σ b_i p_i has squared norm
a^T G a with a = [Σ b_i, b_1..b_N]; no full-size tensor is touched while iterating.
- Norms ‖p_i‖ from the Gram in fp64. Zero-norm inputs (‖p_i‖ <= eps · max‖p‖) have no direction:
  they are excluded from the direction average (ᾱ renormalised over the others) but counted in
  the magnitude with their weight (they add 0). The record lists them in `excluded`.
- Angles: θ_i = 2·atan2(‖u_i - y‖, ‖u_i + y‖), which equals 2·asin(‖u_i - y‖/2) and stays
  accurate at both ends (no acos of a dot product near ±1); cos θ_i = (‖u_i+y‖^2 - ‖u_i-y‖^2)/4.
- Start at the normalised weighted mean of the u_i. If that mean (nearly) vanishes
  (‖Σ ᾱ_i u_i‖ <= 1e-3, e.g. two antipodal inputs with equal weights) its direction is lost in
  rounding and the Karcher mean is not unique: start at the highest-weight input (first on
  ties) and flag `degenerate_start`.
- Iterate (Riemannian gradient descent with unit step, as mergekit): tangent
  T = Σ ᾱ_i θ_i/sin θ_i (u_i - cos θ_i y); y+ = cos‖T‖ y + sin‖T‖ T/‖T‖, renormalised. An input
  within sin θ < 1e-2 of antipodal to y contributes nothing (flagged `antipodal`): exactly
  antipodal it has no log map, and near it the fp32 Gram resolves θ only to ~3e-4 rad, which
  θ/sin θ would amplify into a step of any size (a merged tensor several times longer than every
  input; found by tests/kernels/test_kernels_fuzz.py). Stop when ‖T‖ <= tol (radians), per unit; converged
  units are frozen; on CUDA max_iter batched steps without host syncs (on CPU the loop stops
  early once every unit has converged, checked every 8 steps; same result).
- Identical inputs (d-block exactly 0), or all weight on one model: coefficient 1 on the first
  positive-weight model (the exact answer; the iteration would give it only up to rounding).
Defaults: tol 1e-10, max_iter 100, eps 1e-6.
Record per unit: iterations, converged, objective Σ ᾱ_i θ_i^2, angles θ_i (K, N), excluded
(K, N), magnitude, degenerate_start, antipodal, identical.
References: H. Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 30 (1977);
Buss & Fillmore, "Spherical averages and applications", ACM TOG 20 (2001); mergekit's `karcher`
merge method (arcee-ai) for the per-tensor use with equal weights.
"""
from __future__ import annotations

import math

import torch

from .errors import MergeInputError
from .gram import is_centred_only, quad
from .solution import Solution, identical_units, may_stop, one_hot_first, prepare, small_op_threads

DEFAULTS = {"tol": 1e-10, "max_iter": 100, "eps": 1e-6}
_ANTIPODAL_SIN = 1e-2  # see the docstring: the Gram's angle resolution near π
_DEGENERATE_MEAN = 1e-3  # ‖Σ ᾱ_i u_i‖ below this: direction lost in rounding (fp32 Grams)


def solve_karcher(grams: torch.Tensor, weights, *, tol: float = DEFAULTS["tol"],
                  max_iter: int = DEFAULTS["max_iter"], eps: float = DEFAULTS["eps"]) -> Solution:
    """Batched weighted Karcher mean of K units. grams (K, N+1, N+1) (see gram.py), weights (N,)."""
    with small_op_threads(grams.device):
        return _karcher(grams, weights, tol=tol, max_iter=max_iter, eps=eps)


def _karcher(grams: torch.Tensor, weights, *, tol: float = DEFAULTS["tol"],
             max_iter: int = DEFAULTS["max_iter"], eps: float = DEFAULTS["eps"]) -> Solution:
    g, w = prepare(grams, weights)
    if bool(is_centred_only(g).any()):
        raise MergeInputError("karcher needs norms: compute the Grams with gram_matrix(..., full=True)")
    k, n = g.shape[0], g.shape[1] - 1
    dev = g.device
    eye = torch.eye(n, dtype=torch.float64, device=dev)

    def qp(b):  # b (K, R, N) coefficients on p -> (K, R) squared norms of Σ b_i p_i
        return quad(g, torch.cat([b.sum(-1, keepdim=True), b], dim=-1)).clamp_min(0)

    a = qp(eye.expand(k, n, n)).sqrt()                                  # ‖p_i‖
    amax = a.max(dim=1).values
    excl = a <= eps * amax[:, None]
    wk = w.expand(k, n)
    magnitude = (wk * a).sum(1)
    wd = torch.where(excl, 0.0, wk)
    swd = wd.sum(1)
    alive = swd > 0
    wbar = wd / torch.where(alive, swd, 1.0)[:, None]
    inv_a = torch.where(excl, 0.0, 1.0 / torch.where(excl, 1.0, a))
    U = torch.diag_embed(inv_a)                                         # rows: u_i in coefficients

    y0 = (wbar * inv_a)[:, None, :]
    ny = qp(y0)[:, 0].sqrt()
    degen = alive & (ny <= _DEGENERATE_MEAN)
    jbest = (wbar == wbar.max(1, keepdim=True).values).to(torch.int8).argmax(1)
    b = torch.where(degen[:, None], U[torch.arange(k, device=dev), jbest],
                    y0[:, 0] / torch.where(ny > 0, ny, 1.0)[:, None])

    def angles(b):
        minus = qp(U - b[:, None, :])
        plus = qp(U + b[:, None, :])
        theta = 2 * torch.atan2(minus.sqrt(), plus.sqrt())
        return theta, (plus - minus) / 4

    done = ~alive | identical_units(g)
    iters = torch.zeros(k, dtype=torch.long, device=dev)
    anti = torch.zeros(k, dtype=torch.bool, device=dev)
    for it in range(max_iter):
        theta, cos = angles(b)
        sin = torch.sin(theta)
        far = (sin < _ANTIPODAL_SIN) & (theta > math.pi / 2) & ~excl
        fac = torch.where(sin > 0, theta / torch.where(sin > 0, sin, 1.0), 1.0)
        cw = torch.where(far, 0.0, wbar * fac)
        t = cw * inv_a - (cw * cos).sum(1, keepdim=True) * b            # tangent T
        tau = qp(t[:, None, :])[:, 0].sqrt()
        sinc = torch.where(tau > 0, torch.sin(tau) / torch.where(tau > 0, tau, 1.0), 1.0)
        bn = torch.cos(tau)[:, None] * b + sinc[:, None] * t
        nb = qp(bn[:, None, :])[:, 0].sqrt()
        bn = bn / torch.where(nb > 0, nb, 1.0)[:, None]
        active = ~done & (tau > tol)
        b = torch.where(active[:, None], bn, b)
        iters += active.to(torch.long)
        anti = anti | (far.any(1) & ~done)
        done = done | ~active
        if may_stop(done, it):
            break

    theta, _ = angles(b)
    theta = torch.where(excl, 0.0, theta)
    coeffs = magnitude[:, None] * b
    coeffs = torch.where(alive[:, None], coeffs, 0.0)
    same = identical_units(g)
    if int((w > 0).sum()) == 1:  # one model carries all the weight: that model, exactly
        same = torch.ones_like(same)
    coeffs = torch.where(same[:, None], one_hot_first(w, k), coeffs)
    same = identical_units(g)
    record = {
        "iterations": iters,
        "converged": done,
        "objective": (wbar * theta ** 2).sum(1),
        "angles": theta,
        "excluded": excl,
        "magnitude": magnitude,
        "degenerate_start": degen,
        "antipodal": anti,
        "identical": same,
    }
    return Solution(coeffs, record)
