"""Independent fp64 references on full tensors (no Gram, no coefficient space)."""
from __future__ import annotations

import math

import numpy as np
import torch


def as_rows(xs):
    return torch.stack([x.reshape(-1).to(torch.float64) for x in xs])


def direct_weiszfeld(xs, w, iters=3000, tol=1e-14):
    """Plain Weiszfeld on the full points (start at the weighted mean); for medians not at an input."""
    X = as_rows(xs)
    w = torch.as_tensor(w, dtype=torch.float64)
    w = w / w.sum()
    y = (w[:, None] * X).sum(0)
    stop = tol * float((X - X.mean(0)).norm())
    for _ in range(iters):
        d = (X - y).norm(dim=1)
        if bool((d == 0).any()):
            break
        b = w / d
        y_new = (b[:, None] * X).sum(0) / b.sum()
        step = float((y_new - y).norm())
        y = y_new
        if step <= stop:
            break
    return y


def gm_objective(xs, w, y):
    X = as_rows(xs)
    w = torch.as_tensor(w, dtype=torch.float64)
    w = w / w.sum()
    return float((w * (X - y.reshape(-1).to(torch.float64)).norm(dim=1)).sum())


def scipy_geometric_median(points: np.ndarray, w: np.ndarray):
    """argmin Σ w_i ‖y - x_i‖ with scipy.optimize (BFGS on the exact gradient, then Nelder-Mead
    polish); small dimensions only."""
    from scipy.optimize import minimize

    w = w / w.sum()

    def f(y):
        return float(np.sum(w * np.linalg.norm(points - y, axis=1)))

    def g(y):
        diff = y - points
        d = np.linalg.norm(diff, axis=1)
        d = np.where(d == 0, np.inf, d)
        return np.sum((w / d)[:, None] * diff, axis=0)

    best = None
    for y0 in [points.T @ w] + list(points):
        r = minimize(f, y0, jac=g, method="BFGS", options={"gtol": 1e-13, "maxiter": 10000})
        r2 = minimize(f, r.x, method="Nelder-Mead",
                      options={"xatol": 1e-14, "fatol": 1e-16, "maxiter": 20000, "maxfev": 40000})
        for y in (r.x, r2.x):
            if best is None or f(y) < f(best):
                best = y
    return best, f(best)


def direct_karcher(xs, w, iters=1000, tol=1e-14):
    """Weighted Karcher mean of directions on full tensors, magnitude = weighted mean of norms.
    Zero tensors are left out of the direction and count 0 in the magnitude."""
    X = as_rows(xs)
    w = torch.as_tensor(w, dtype=torch.float64)
    w = w / w.sum()
    a = X.norm(dim=1)
    keep = a > 0
    wb = torch.where(keep, w, 0.0)
    wb = wb / wb.sum()
    U = torch.where(keep[:, None], X / torch.where(keep, a, 1.0)[:, None], 0.0)
    y = (wb[:, None] * U).sum(0)
    y = y / y.norm()
    for _ in range(iters):
        chord = (U - y).norm(dim=1)
        theta = 2 * torch.asin((chord / 2).clamp(max=1.0))
        cos = torch.cos(theta)
        sin = torch.sin(theta)
        fac = torch.where(theta > 0, theta / torch.where(sin > 0, sin, 1.0), 1.0)
        T = ((wb * fac)[:, None] * (U - cos[:, None] * y)).sum(0)
        tn = float(T.norm())
        if tn < tol:
            break
        y = math.cos(tn) * y + math.sin(tn) * T / tn
        y = y / y.norm()
    return (w * a).sum() * y


def direct_gram(xs, base=None):
    """Augmented Gram of [m, d_1..d_N] in fp64 by definition."""
    X = as_rows(xs)
    if base is not None:
        X = X - base.reshape(-1).to(torch.float64)
    m = X.mean(0)
    A = torch.cat([m[None], X - m])
    return A @ A.T


def apply(coeffs, xs, base=None, base_coeff=None):
    X = as_rows(xs)
    y = (torch.as_tensor(coeffs, dtype=torch.float64)[:, None] * X).sum(0)
    if base is not None and base_coeff is not None:
        y = y + float(base_coeff) * base.reshape(-1).to(torch.float64)
    return y


def rel(a, b):
    a = a.reshape(-1).to(torch.float64)
    b = b.reshape(-1).to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
