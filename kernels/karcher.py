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
- Directions that cancel: when no open half-space holds the u_i (0 in their convex hull, within
  SURROUND_MARGIN = 0.05: min over the simplex of ‖Σ λ_i u_i‖; e.g. task vectors taken from their
  own average), the objective is lowest orthogonal to every input, a direction the points' span
  holds only through rounding: the iteration ended there with a merged norm off by up to 100%
  (task vectors around their own average, found by a random stress against full-tensor
  references). Such units get the weighted mean Σ α_i p_i (the inputs' consensus: ~0 where they
  cancel) and `ill_posed`. Directions on one line (±u: a scalar key) are exempt: their Karcher
  mean is the heavier side, which the iteration gives (antipodal inputs contribute nothing).
- Identical inputs (d-block exactly 0), or all weight on one model: coefficient 1 on the first
  positive-weight model (the exact answer; the iteration would give it only up to rounding).
Defaults: tol 1e-10, max_iter 100, eps 1e-6.
Record per unit: iterations, converged, objective Σ ᾱ_i θ_i^2, angles θ_i (K, N), excluded
(K, N), magnitude, degenerate_start, antipodal, identical, ill_posed.
References: H. Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 30 (1977);
Buss & Fillmore, "Spherical averages and applications", ACM TOG 20 (2001); mergekit's `karcher`
merge method (arcee-ai) for the per-tensor use with equal weights.
"""
from __future__ import annotations

import math

import torch

from .errors import MergeInputError
from .gram import is_centred_only, point_products, quad
from .solution import Solution, identical_units, may_stop, one_hot_first, prepare, small_op_threads

DEFAULTS = {"tol": 1e-10, "max_iter": 100, "eps": 1e-6}
_ANTIPODAL_SIN = 1e-2  # see the docstring: the Gram's angle resolution near π
_DEGENERATE_MEAN = 1e-3  # ‖Σ ᾱ_i u_i‖ below this: direction lost in rounding (fp32 Grams)
SURROUND_MARGIN = 0.05  # directions whose convex hull comes this close to 0 cancel: no Karcher mean
_COLLINEAR = 1e-6  # 1 - |cos| of every pair at most this: one line through 0 (not surrounding)
_HULL_STEPS = 400  # accelerated projected-gradient steps for the hull's point nearest to 0


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

    coeffs = magnitude[:, None] * b
    coeffs = torch.where(alive[:, None], coeffs, 0.0)
    # directions that cancel (0 in or near their convex hull) have no Karcher mean: the iteration
    # ends on rounding noise in a direction orthogonal to every input, its norm wrong by up to 100%
    # (task vectors around their own average). The weighted mean there (closed form: converged),
    # flagged ill_posed; its angles and objective are the weighted mean's direction's.
    ill = alive & surrounds_zero(g, inv_a, wbar > 0)
    coeffs = torch.where(ill[:, None], wk, coeffs)
    done = done | ill
    nw = qp(wk[:, None, :])[:, 0].sqrt()
    b = torch.where(ill[:, None], wk / torch.where(nw > 0, nw, 1.0)[:, None], b)
    theta, _ = angles(b)
    theta = torch.where(excl, 0.0, theta)
    same = identical_units(g)
    first = torch.ones_like(same) if int((w > 0).sum()) == 1 else same  # one model has all the weight
    coeffs = torch.where(first[:, None], one_hot_first(w, k), coeffs)  # that model, exactly
    ill = ill & ~same
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
        "ill_posed": ill,
    }
    return Solution(coeffs, record)


def surrounds_zero(g: torch.Tensor, inv_a: torch.Tensor, use: torch.Tensor,
                   margin: float = SURROUND_MARGIN) -> torch.Tensor:
    """(K,) True where the unit directions u_i = p_i/‖p_i‖ (i in `use`) have a convex combination
    shorter than `margin`: min over the simplex of ‖Σ λ_i u_i‖ (no open half-space holds them all,
    or only just), and do not all lie on one line. g: augmented Grams (K, N+1, N+1); inv_a: (K, N)
    1/‖p_i‖. Directions pairwise within 90° never do (‖Σ λ_i u_i‖^2 >= Σ λ_i^2 >= 1/N), nor do
    directions all more than `margin` along their mean; the other units are solved: accelerated
    projected gradient (FISTA) on the simplex, step 1/(2 tr Q) with Q the directions' Gram,
    _HULL_STEPS steps without a host sync; the value reached bounds the minimum from above
    (within ~8N/steps^2 of it)."""
    k, n = inv_a.shape
    q = inv_a[:, :, None] * point_products(g) * inv_a[:, None, :]
    pair = use[:, :, None] & use[:, None, :]
    out = torch.zeros(k, dtype=torch.bool, device=g.device)
    # collinear directions (±u within ~1e-3 rad: a scalar key, or task vectors along one line)
    # have a Karcher mean on their two points, the heavier side; the iteration finds it
    collinear = ((1 - q.abs() <= _COLLINEAR) | ~pair).flatten(1).all(1)
    # a half-space with margin certifies the rest: every u_i·ū > margin for ū the unit mean
    # direction (then ‖Σ λ_i u_i‖ >= (Σ λ_i u_i)·ū > margin); fine-tunes' task vectors pass
    qm = torch.where(pair, q, 0.0)
    along = qm.sum(2) / qm.sum((1, 2)).clamp_min(1e-300).sqrt()[:, None]
    held = torch.where(use, along, math.inf).amin(1) > margin
    idx = (((q < 0) & pair).flatten(1).any(1) & ~collinear & ~held).nonzero()[:, 0]  # one host sync
    if idx.numel() == 0:
        return out
    q, use = q[idx], use[idx]
    lam = use.to(q.dtype) / use.sum(1, keepdim=True)
    step = (0.5 / q.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-300))[:, None]
    y, t = lam, 1.0
    for _ in range(_HULL_STEPS):
        nxt = _onto_simplex(y - step * 2 * (q @ y[..., None])[..., 0], use)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = nxt + ((t - 1) / t_next) * (nxt - lam)
        lam, t = nxt, t_next
    nearest = ((q @ lam[..., None])[..., 0] * lam).sum(1)  # ‖Σ λ_i u_i‖^2
    out[idx] = nearest <= margin ** 2
    return out


def _onto_simplex(v: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v onto {λ >= 0, Σ λ = 1, λ_i = 0 off `use`}
    (sort-based: Held, Wolfe & Crowder 1974; Duchi et al. 2008)."""
    n = v.shape[1]
    v = torch.where(use, v, -1e6)  # off-`use` entries sort last and never enter the support
    u = torch.sort(v, dim=1, descending=True).values
    css = u.cumsum(1) - 1
    j = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    r = ((u - css / j) > 0).to(v.dtype).mul(j).amax(1, keepdim=True)  # support size (>= 1)
    theta = css.gather(1, r.long() - 1) / r
    return torch.where(use, (v - theta).clamp_min(0), 0.0)
