"""Properties (hypothesis): order invariance, translation (GM) and orthogonal equivariance,
breakdown, one-hot weights, N=1 and identical inputs (bit-exact); the weighted element median's
integer weights against exact arithmetic."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernels import (combine, element_median, gram_matrix, parse_weights, sign_elected_median, solve,
                     task_vector_coefficients)
from tests.kernels.kernels_ref import apply

LINEAR = ("weighted_mean", "geometric_median", "karcher")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def clouds(draw, min_n=1, max_n=6):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, d)) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    pts += rng.normal(size=d) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    if n > 2 and draw(st.booleans()):  # duplicates
        pts[draw(st.integers(1, n - 1))] = pts[0]
    if draw(st.booleans()):
        w = rng.uniform(0.0, 1.0, size=n)
        w[draw(st.integers(0, n - 1))] += 0.1
    else:
        w = np.ones(n)
    return torch.tensor(pts), torch.tensor(w)


def _solve(method, pts, w, **kw):
    sol = solve(method, gram_matrix(list(pts))[None], w, **kw)
    return sol, apply(sol.coeffs[0], list(pts))


def _unique_karcher(pts, w) -> bool:
    """The weighted inputs' directions lie within 84° of their mean direction: inside an open
    hemisphere, where the Karcher mean is unique (Afsari 2011). Spread wider (a 2-D cloud around
    the origin), it has several local minima and the order of the inputs may pick another one."""
    norms = pts.norm(dim=1)
    if not bool((norms[w > 0] > 0).all()):
        return False
    u = pts[w > 0] / norms[w > 0, None]
    m = (w[w > 0, None] * u).sum(0)
    return float(m.norm()) > 1e-9 and bool((u @ (m / m.norm()) > 0.1).all())


def _scale(pts):
    return float((pts - pts.mean(0)).norm()) + float(pts.norm()) * 1e-12 + 1e-300


@SETTINGS
@given(clouds(), st.randoms(use_true_random=False))
def test_order_invariance(cloud, rnd):
    pts, w = cloud
    perm = list(range(len(pts)))
    rnd.shuffle(perm)
    for method in LINEAR:
        sol, y = _solve(method, pts, w)
        if method == "karcher":
            r = sol.record
            assume(bool(r["converged"][0]) and not bool(r["degenerate_start"][0]) and not bool(r["antipodal"][0])
                   and _unique_karcher(pts, w))
        _, yp = _solve(method, pts[perm], w[perm])
        tol = 1e-7 * (_scale(pts) if method != "karcher" else float(pts.norm(dim=1).max()))
        assert float((y - yp).norm()) <= tol, method


@SETTINGS
@given(clouds(), st.integers(0, 2 ** 31 - 1))
def test_gm_translation_and_orthogonal_equivariance(cloud, seed):
    pts, w = cloud
    d = pts.shape[1]
    g = torch.Generator().manual_seed(seed)
    t = 10 * torch.randn(d, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    _, y = _solve("geometric_median", pts, w)
    _, yt = _solve("geometric_median", pts + t, w)
    tol = 1e-6 * _scale(pts)
    assert float((yt - (y + t)).norm()) <= tol + 1e-12 * float(t.norm())
    for method in LINEAR:
        sol, y = _solve(method, pts, w)
        if method == "karcher":
            assume(bool(sol.record["converged"][0]) and not bool(sol.record["degenerate_start"][0])
                   and _unique_karcher(pts, w))
        _, yq = _solve(method, pts @ q.T, w)
        tol = 1e-6 * (_scale(pts) if method != "karcher" else float(pts.norm(dim=1).max()))
        assert float((yq - q @ y).norm()) <= tol, method


@SETTINGS
@given(st.integers(2, 8), st.integers(0, 2 ** 31 - 1))
def test_breakdown_two_of_five_far_away(d, seed):
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(5, d, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v = v / v.norm()
    moved = pts.clone()
    moved[3:] += 1e6 * v + torch.randn(2, d, generator=g, dtype=torch.float64)
    inliers = pts[:3]
    spread = float(torch.cdist(inliers, inliers).max())
    _, gm_clean = _solve("geometric_median", pts, None)
    _, gm_moved = _solve("geometric_median", moved, None)
    _, mean_moved = _solve("weighted_mean", moved, None)
    assert float((gm_moved - gm_clean).norm()) < float(torch.cdist(pts, pts).max())
    assert float((gm_moved - inliers.mean(0)).norm()) < spread
    assert float((mean_moved - pts.mean(0)).norm()) > 1e5


@SETTINGS
@given(clouds(min_n=2), st.data(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_one_hot_weights_return_that_input_exactly(cloud, data, dtype):
    pts, _ = cloud
    n = len(pts)
    j = data.draw(st.integers(0, n - 1))
    w = torch.zeros(n, dtype=torch.float64)
    w[j] = 1.0
    xs = [p.to(dtype) for p in pts]
    for method in LINEAR:
        sol = solve(method, gram_matrix(xs)[None], w)
        assert torch.equal(combine(xs, sol.coeffs[0]), xs[j]), method
    assert torch.equal(element_median(xs, w).to(dtype), xs[j])


@SETTINGS
@given(clouds(min_n=1, max_n=1), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_single_input_returns_it(cloud, dtype):
    pts, _ = cloud
    x = pts[0].to(dtype)
    base = (pts[0] * 0.5 + 1).to(dtype)
    for method in LINEAR:
        sol = solve(method, gram_matrix([x])[None], None)
        assert torch.equal(combine([x], sol.coeffs[0]), x), method
        sol = solve(method, gram_matrix([x], base)[None], None)
        a, ab = task_vector_coefficients(sol.coeffs, 1.0)
        assert torch.equal(combine([x], a[0], base, ab[0]), x), method
    assert torch.equal(element_median([x]).to(dtype), x)
    out, _ = sign_elected_median([x], base)
    assert torch.equal(out.to(dtype), x)


@SETTINGS
@given(clouds(min_n=1, max_n=1), st.integers(2, 6), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.sampled_from(["", "1 2 3 4 5 6"]))
def test_identical_inputs_return_them_bit_exactly(cloud, n, dtype, wt):
    pts, _ = cloud
    x = pts[0].to(dtype)
    xs = [x.clone() for _ in range(n)]
    base = (pts[0] * 0.3 - 2).to(dtype)
    w = parse_weights(" ".join(wt.split()[:n]) if wt else "", n)
    for method in LINEAR:
        sol = solve(method, gram_matrix(xs)[None], w)
        assert bool(sol.record["identical"][0]) if "identical" in sol.record else True
        assert torch.equal(combine(xs, sol.coeffs[0]), x), method
        sol = solve(method, gram_matrix(xs, base)[None], w)
        a, ab = task_vector_coefficients(sol.coeffs, 1.0)
        assert torch.equal(combine(xs, a[0], base, ab[0]), x), method
        # block/model scope with other keys in the unit: coefficients not one-hot, combine still exact
        assert torch.equal(combine(xs, w), x), method
    assert torch.equal(element_median(xs, w).to(dtype), x)
    assert torch.equal(element_median(xs, w, base).to(dtype), x)
    out, _ = sign_elected_median(xs, base, w)
    assert torch.equal(out.to(dtype), x)


@SETTINGS
@given(st.integers(2, 10), st.integers(0, 2 ** 31 - 1), st.sampled_from(["uniform", "integer", "near"]))
def test_integer_weights_decide_every_subset_as_exact_arithmetic(n, seed, kind):
    """Where integer_weights gives thresholds, every proper subset is classed (reached 1/2 - tol,
    and a tie within 1/2 + tol) as the exact rational sum of the fp64 weights classes it."""
    from fractions import Fraction

    from kernels.element_median import _HALF_TOL, integer_weights

    rng = np.random.default_rng(seed)
    raw = {"uniform": rng.uniform(0.01, 1.0, n), "integer": rng.integers(1, 5, n).astype(float),
           "near": np.r_[0.5 + rng.uniform(-1e-6, 1e-6), rng.dirichlet(np.ones(n - 1)) * 0.5]}[kind]
    w = tuple(parse_weights(raw.tolist(), n).tolist())
    got = integer_weights(w)
    if got is None:
        return  # the fp64 weights are carried: nothing to check here
    q, reach, tie = got
    lo, hi = Fraction(1, 2) - Fraction(_HALF_TOL), Fraction(1, 2) + Fraction(_HALF_TOL)
    for mask in range(1, (1 << n) - 1):
        members = [j for j in range(n) if mask >> j & 1]
        exact = sum(Fraction(w[j]) for j in members)
        qs = sum(q[j] for j in members)
        assert qs < 2 ** 24 and qs == int(qs)  # exact in fp32
        assert (qs >= reach) == (exact >= lo), (w, members)
        if exact >= lo:
            assert (qs <= tie) == (exact <= hi), (w, members)
