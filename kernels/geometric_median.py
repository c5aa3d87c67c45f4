"""Geometric median: argmin_y Σ w_i ‖y - p_i‖ (weighted Fermat-Weber point), in coefficient space.

Math. Every Weiszfeld iterate is y = Σ c_i p_i with c on the simplex, so with the centred Gram
G_ij = <d_i, d_j> (d_i = p_i - mean) the distances are quadratic forms,
‖p_i - y‖^2 = (e_i - c)^T G (e_i - c), and the whole solve runs on N x N numbers per unit.
- Start at the weighted mean, c = w.
- Weiszfeld step: c+ = β / Σβ with β_i = w_i / ‖p_i - y‖ (Weiszfeld 1937).
- Coincident points (Vardi & Zhang, PNAS 97(4):1423, 2000): when y is within eps·s of an input
  x_j (s = RMS distance of the points to their mean), y is snapped to x_j; with η the total
  weight of the inputs at x_j, T the Weiszfeld map over the other inputs and
  r = ‖Σ_{i not at x_j} w_i (p_i - y)/‖p_i - y‖‖, the step is
  y+ = (1 - η/r)^+ T + min(1, η/r) y. If r <= η, x_j is the median and the iteration stays
  there exactly (so weights (0,..,1,..,0) return that input, and a median at an input is found
  exactly instead of approached sublinearly).
- A median at an input is found first: x_j is the median (and the only one) when
  r_j = ‖Σ_{i not at x_j} w_i (p_i - p_j)/‖p_i - p_j‖‖ < η_j, the same condition at every input
  before any step (N^2 numbers per unit). Weiszfeld approaches such a median only linearly, at
  the rate Σ_{i≠j} w_i / w_j for two models: weighted 0.51 / 0.49 it ended 3e-4 of their distance
  short after 200 steps, unconverged; now coefficient 1 on model_1, at step 0.
- Newton (where the points span N-1 dimensions and no input is within eps·s): the Newton step
  of f(c) = Σ w_i ‖p_i - y‖ on the plane Σc = 1 (gradient -Σ w_i G u_i / d_i, Hessian
  Σ w_i (G/d_i - G u_i u_i^T G / d_i^3), u_i = e_i - c) is taken instead of the Weiszfeld point
  when it stays in the simplex and does not raise f above the Weiszfeld point's: each step does
  at least as well as Weiszfeld's (so it converges as Weiszfeld does), and near the median
  quadratically (tiny SD1.5 Grams: at most 7 / 9 steps instead of 92 / 146 at tol 1e-7 / 1e-10).
- Stop when the Weiszfeld step ‖T(y) - y‖ <= tol·s, per unit; converged units are frozen. On
  CUDA the loop always runs max_iter batched steps without a host sync; on CPU (where reading a
  flag is no sync) it stops once every unit has converged, checked every 8 steps, and takes
  plain steps (without Vardi-Zhang's ops) until a unit comes within eps·s of an input, then goes
  back to the last check and takes full steps from there. Same bits either way; `iterations` counts the steps
  each unit took. Tiny ops run on one CPU thread.
- Identical inputs (d-block exactly 0): coefficient 1 on the first positive-weight model.
Defaults: tol 1e-10, max_iter 200, eps 1e-6 (relative to s; sd-mecha uses an absolute 1e-6 as a
floor on distances, which on SD task vectors of norm ~1 is the same order).
Record per unit: iterations, converged, objective Σ w_i ‖p_i - y‖, distances ‖p_i - y‖ (K, N),
at_input (index of the input the median sits on, -1 if none), scale s, identical.
References: E. Weiszfeld, Tohoku Math. J. 43 (1937); Y. Vardi, C.-H. Zhang, "The multivariate
L1-median and associated data depth", PNAS 2000; Pillutla, Kakade, Harchaoui, "Robust aggregation
for federated learning", IEEE TSP 2022 (arXiv 1912.13445) for the model-as-one-point scope.
"""
from __future__ import annotations

import torch

from .gram import quad
from .solution import CHECK_EVERY, Solution, identical_units, one_hot_first, prepare, small_op_threads

DEFAULTS = {"tol": 1e-10, "max_iter": 200, "eps": 1e-6}


def solve_geometric_median(grams: torch.Tensor, weights, *, tol: float = DEFAULTS["tol"],
                           max_iter: int = DEFAULTS["max_iter"], eps: float = DEFAULTS["eps"]) -> Solution:
    """Batched weighted geometric median of K units. grams (K, N+1, N+1) (see gram.py), weights (N,)."""
    with small_op_threads(grams.device):
        return _weiszfeld(grams, weights, tol=tol, max_iter=max_iter, eps=eps)


def _weiszfeld(grams: torch.Tensor, weights, *, tol: float = DEFAULTS["tol"],
               max_iter: int = DEFAULTS["max_iter"], eps: float = DEFAULTS["eps"],
               plain_steps: bool = True) -> Solution:
    g, w = prepare(grams, weights)
    G = g[:, 1:, 1:]
    k, n = G.shape[0], G.shape[1]
    dev = G.device
    eye = torch.eye(n, dtype=torch.float64, device=dev)
    z = torch.cat([eye[: n - 1, : n - 1], -torch.ones(1, n - 1, dtype=torch.float64, device=dev)])  # Σv = 0
    zt = z.T
    # Newton only where the points span N-1 dimensions (models always do unless two are equal):
    # on fewer (collinear, coincident) the Hessian is singular and Weiszfeld alone is taken
    if n > 1:
        ev = torch.linalg.eigvalsh(zt @ G @ z)
        spans = ev.min(1).values > 1e-8 * ev.max(1).values.clamp_min(0)
    diag = G.diagonal(dim1=-2, dim2=-1)
    scale = (diag.sum(-1) / n).clamp_min(0).sqrt()
    same = identical_units(g)
    thr = eps * scale  # coincidence radius
    pair = (diag[:, :, None] + diag[:, None, :] - 2 * G).clamp_min(0).sqrt() * (1 - eye)
    ar = torch.arange(k, device=dev)
    wk = w.expand(k, n)
    done = same.clone()
    c = wk.clone()
    if n > 1:  # a median at an input is found before iterating: Weiszfeld would only approach it
        vertex = median_input(G, wk, pair, thr)
        found = (vertex >= 0) & ~done
        c = torch.where(found[:, None], eye[vertex.clamp_min(0)], c)
        done = done | found
    iters = torch.zeros(k, dtype=torch.long, device=dev)
    tol2 = (tol * scale) ** 2

    def objective(c):  # Σ w_i ‖p_i - y‖ at coefficients c (K, N)
        return (wk * quad(G, eye - c[:, None, :]).clamp_min(0).sqrt()).sum(1)

    def newton_or(c, t, gu, dist):
        """The Newton step from c on the plane Σc = 1 where it exists and its objective is at most
        the Weiszfeld point t's, else t. Weiszfeld alone converges linearly, and slowly
        where the median is near an input (an angle near 120 degrees for 3 points: 150 steps)."""
        if n < 2:
            return t
        a = wk / dist
        grad = -(a[:, :, None] * gu).sum(1)                                 # ∇f = -Σ w_i G u_i / d_i
        hess = a.sum(1)[:, None, None] * G - gu.transpose(1, 2) @ ((a / dist ** 2)[:, :, None] * gu)
        step, info = torch.linalg.solve_ex(zt @ hess @ z, -(grad @ z))
        cn = c + step @ zt
        # in the simplex as every Weiszfeld iterate (c_i ∝ w_i/d_i > 0): a direction the summed
        # Gram cannot see (a key far smaller than the others of its unit) must not carry c off it
        ok = spans & (info == 0) & (dist > 0).all(1) & torch.isfinite(cn).all(1) & (cn >= 0).all(1)
        cn = torch.where(ok[:, None], cn, t)
        # at least as low (near the median both agree to rounding; directions the Gram cannot see
        # are excluded by `spans` and the simplex); convergence is judged on the Weiszfeld step
        return torch.where((ok & (objective(cn) <= objective(t)))[:, None], cn, t)

    def full_step(c):  # Weiszfeld with Vardi-Zhang's step at a coincident input
        u = eye - c[:, None, :]
        gu = u @ G
        dist = (gu * u).sum(-1).clamp_min(0).sqrt()                       # ‖p_i - y‖
        dmin = dist.min(dim=1).values
        j = (dist == dmin[:, None]).to(torch.int8).argmax(dim=1)          # first nearest input
        snap = dmin <= thr
        cs = torch.where(snap[:, None], eye[j], c)
        newton_dist = dist
        dist = torch.where(snap[:, None], pair[ar, j], dist)
        at = dist <= thr[:, None]                                         # inputs at y (only when snapped)
        beta = torch.where(at, 0.0, wk / torch.where(at, 1.0, dist))
        sb = beta.sum(1)
        t = torch.where((sb > 0)[:, None], beta / torch.where(sb > 0, sb, 1.0)[:, None], cs)
        eta = torch.where(at, wk, 0.0).sum(1)
        r = sb * quad(G, (t - cs)[:, None, :])[:, 0].clamp_min(0).sqrt()
        move = r > eta
        lam = torch.where(move, eta / torch.where(move, r, 1.0), 1.0)    # min(1, η/r)
        c_new = (1 - lam)[:, None] * t + lam[:, None] * cs
        step2 = quad(G, (c_new - c)[:, None, :])[:, 0]
        ahead = torch.where(move[:, None], newton_or(c, t, gu, newton_dist), c)
        return torch.where(snap[:, None], c_new, ahead), step2

    def plain_step(c):
        # full_step's arithmetic where no unit is within eps of an input (there snap, at and eta
        # are all off, lam is 0 or 1): the same bits with a third of the ops. `near` says where
        # it does not apply.
        u = eye - c[:, None, :]
        gu = u @ G
        dist = (gu * u).sum(-1).clamp_min(0).sqrt()
        near = (dist <= thr[:, None]).any(1)
        beta = wk / dist
        sb = beta.sum(1)
        t = beta / sb[:, None]
        q = quad(G, (t - c)[:, None, :])[:, 0]
        move = sb * q.clamp_min(0).sqrt() > 0
        ahead = torch.where(move[:, None], newton_or(c, t, gu, dist), c)
        return ahead, torch.where(move, q, 0.0), near

    # On CPU (where reading a flag costs no device sync) the loop takes plain steps and looks every
    # CHECK_EVERY steps: if a unit not yet converged came within eps of an input, it goes back to
    # the last look and takes full steps from there on; once every unit converged it stops.
    # Results are those of full steps throughout, bit for bit; on CUDA: full steps, no syncs.
    cpu = dev.type == "cpu"
    plain = cpu and plain_steps
    near = torch.zeros(k, dtype=torch.bool, device=dev)
    it = 0
    saved = (it, c, done, iters)
    while it < max_iter:
        if plain:
            c_new, step2, hit = plain_step(c)
            near = near | (hit & ~done)
        else:
            c_new, step2 = full_step(c)
        active = ~done
        c = torch.where(active[:, None], c_new, c)
        iters = iters + active.to(torch.long)
        done = done | (step2 <= tol2)
        it += 1
        if cpu and (it % CHECK_EVERY == 0 or it == max_iter):
            if plain and bool(near.any()):
                it, c, done, iters = saved
                plain = False
                continue
            saved = (it, c, done, iters)
            if bool(done.all()):
                break

    c = torch.where(same[:, None], one_hot_first(w, k), c)
    dist = quad(G, eye - c[:, None, :]).clamp_min(0).sqrt()
    onpt = (c == 1.0) & (c.abs().sum(1, keepdim=True) == 1.0)
    at_input = torch.where(onpt.any(1), onpt.to(torch.int8).argmax(1), torch.full_like(iters, -1))
    record = {
        "iterations": iters,
        "converged": done,
        "objective": (wk * dist).sum(1),
        "distances": dist,
        "at_input": at_input,
        "scale": scale,
        "identical": same,
    }
    return Solution(c, record)


def median_input(G: torch.Tensor, wk: torch.Tensor, pair: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """(K,) index of the first input x_j that is the weighted geometric median, -1 where none is.
    x_j is the median iff r_j = ‖Σ_{i not at x_j} w_i (p_i - p_j)/‖p_i - p_j‖‖ <= η_j, the weight of
    the inputs at x_j (within thr; the subgradient condition, as in Vardi & Zhang's step), and the
    only one if r_j < η_j: that case is taken here. Weiszfeld reaches such a median only linearly,
    at a rate near 1 when the weights nearly balance (2 models weighted 0.51 / 0.49: 3e-4 of their
    distance short after 200 steps)."""
    n = G.shape[1]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    at = pair <= thr[:, None, None]                                     # (K, j, i): x_i at x_j
    pull = torch.where(at, 0.0, wk[:, None, :] / torch.where(at, 1.0, pair))
    v = pull - pull.sum(2, keepdim=True) * eye                          # Σ_i pull_ji (e_i - e_j)
    r = quad(G, v).clamp_min(0).sqrt()
    eta = torch.where(at, wk[:, None, :], 0.0).sum(2)
    ok = r < eta * (1 - 1e-9)  # strictly: then the median is x_j alone (a tie, 2 models weighted
    # 1:1, has every point between as median; the iteration keeps its midpoint there)
    return torch.where(ok.any(1), ok.to(torch.int8).argmax(1), -1)
