"""Geometric median and Karcher mean against independent fp64 references on full tensors and
scipy.optimize; records, bounds, batching, task-vector mode, low-precision inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import combine, gram_matrix, parse_weights, solve, task_vector_coefficients
from tests.kernels.kernels_ref import (apply, direct_karcher, direct_weiszfeld, gm_objective, rel,
                                       scipy_geometric_median)


def _points(n, shape, seed, spread=1.0, offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = offset * torch.randn(shape, generator=g, dtype=torch.float64)
    return [(c + spread * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(n)]


def _gm(xs, w, base=None, **kw):
    g = gram_matrix(xs, base)
    sol = solve("geometric_median", g[None], w, **kw)
    return sol, apply(sol.coeffs[0], xs, base)


WEIGHTS = [None, [1, 2, 2], [0.3, 0.1, 0.25, 0.35], [1, 1, 1, 1, 3]]


@pytest.mark.parametrize("wt", WEIGHTS)
def test_gm_matches_direct_weiszfeld_on_full_tensors(wt):
    n = 3 if wt is None else len(wt)
    xs = _points(n, (40, 30), seed=n, offset=0.0)
    w = parse_weights(wt, n)
    if float(w.max()) >= 0.5:
        pytest.skip("median at an input: see the scipy/Vardi-Zhang tests")
    sol, y = _gm(xs, w, tol=1e-13, max_iter=2000)
    ref = direct_weiszfeld(xs, w)
    assert bool(sol.record["converged"][0])
    assert rel(y, ref) < 1e-5
    o, oref = float(sol.record["objective"][0]), gm_objective(xs, w, ref)
    assert abs(o - oref) <= 1e-6 * oref
    assert abs(gm_objective(xs, w, y) - o) <= 1e-9 * o


CASES = [
    # (points, weights): interior medians, a median at an input (angle >= 120 deg / heavy weight),
    # collinear points, duplicates, more points than dimensions
    (np.array([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0]]), np.array([1.0, 1.0, 1.0])),
    (np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 0.5]]), np.array([1.0, 1.0, 1.0])),
    (np.array([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0]]), np.array([3.0, 1.0, 1.0])),
    (np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [7.0, 0.0, 0.0]]), np.array([1.0, 2.0, 3.0, 1.0])),
    (np.array([[1.0, 2.0], [1.0, 2.0], [5.0, -1.0], [0.0, 4.0]]), np.array([1.0, 1.0, 1.0, 1.0])),
    (np.array([[0.3, -1.2, 2.0], [1.5, 0.2, -0.7], [-2.0, 1.0, 0.1], [0.9, 0.8, 0.4], [-0.4, -0.3, 1.9],
               [2.2, -1.7, -0.2]]), np.array([0.1, 0.3, 0.2, 0.15, 0.05, 0.2])),
]


@pytest.mark.parametrize("pts,w", CASES)
def test_gm_matches_scipy_minimisation(pts, w):
    xs = [torch.tensor(p) for p in pts]
    sol, y = _gm(xs, torch.tensor(w), tol=1e-14, max_iter=5000)
    yref, fref = scipy_geometric_median(pts, w)
    o = float(sol.record["objective"][0])
    assert o <= fref * (1 + 1e-6) and fref <= o * (1 + 1e-6)
    assert float(np.linalg.norm(y.numpy() - yref)) <= 1e-5 * max(float(np.linalg.norm(yref)), 1.0)


def test_gm_median_at_an_input_is_exact():
    """Vardi-Zhang: a weight >= 1/2 (or a 120+ degree angle) puts the median on the input;
    the solver lands there exactly (coefficient 1) instead of creeping towards it."""
    xs = _points(3, (50,), seed=7)
    w = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    sol, _ = _gm(xs, w)
    assert torch.equal(sol.coeffs[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert int(sol.record["at_input"][0]) == 0 and bool(sol.record["converged"][0])
    pts = [torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([5.0, 0.1])]
    pts = [p.double() for p in pts]
    sol, y = _gm(pts, None)
    assert torch.equal(sol.coeffs[0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert int(sol.record["iterations"][0]) < 50


def test_gm_record_and_max_iter_bound():
    xs = _points(4, (20,), seed=3)
    sol1 = solve("geometric_median", gram_matrix(xs)[None], None, max_iter=1, tol=1e-14)
    assert int(sol1.record["iterations"][0]) == 1 and not bool(sol1.record["converged"][0])
    sol0 = solve("geometric_median", gram_matrix(xs)[None], None, max_iter=0)
    assert torch.allclose(sol0.coeffs, torch.full((1, 4), 0.25, dtype=torch.float64))
    sol = solve("geometric_median", gram_matrix(xs)[None], None)
    r = sol.record
    assert bool(r["converged"][0]) and 0 < int(r["iterations"][0]) < 200
    assert set(r) >= {"iterations", "converged", "objective", "distances", "at_input", "identical"}
    assert abs(float(sol.coeffs.sum()) - 1) < 1e-12


def test_batched_units_equal_separate_solves_and_are_deterministic():
    units = [_points(3, (30,), seed=s, spread=0.1 + s) for s in range(6)]
    grams = torch.stack([gram_matrix(u) for u in units])
    w = parse_weights("1 2 3", 3)
    for method in ("geometric_median", "karcher"):
        batch = solve(method, grams, w)
        again = solve(method, grams, w)
        assert torch.equal(batch.coeffs, again.coeffs)  # same inputs, same device: bit-identical
        for k in range(6):
            single = solve(method, grams[k:k + 1], w)
            assert torch.allclose(single.coeffs[0], batch.coeffs[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("max_iter", [5, 8, 37, 200])
def test_gm_plain_steps_give_the_bits_of_full_steps(max_iter):
    """The CPU loop's plain Weiszfeld steps (falling back to Vardi-Zhang steps from the last look
    when a unit comes within eps of an input) give exactly what full steps throughout give:
    a batch mixing general units, medians at an input (weight >= 1/2, a wide angle), coincident
    and identical inputs, N = 3."""
    from kernels.geometric_median import _weiszfeld

    units = [_points(3, (30,), seed=s, spread=0.1 + s) for s in range(6)]
    a, b = _points(2, (30,), seed=11)
    units += [[a, a, b], [a, a, a], [a, b, (a + b) / 2 + 1e-3 * b]]
    units += [[torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([5.0, 0.1])]]
    grams = torch.stack([gram_matrix(u) for u in units[:-1]] + [gram_matrix([x.double() for x in units[-1]])])
    checked = 0
    for w in (None, [0.6, 0.2, 0.2], [1, 2, 3], [0, 1, 1]):
        w = parse_weights(",".join(map(str, w)) if w else "", 3)
        for tol, eps in ((1e-10, 1e-6), (1e-14, 1e-3), (1e-6, 0.0)):
            fast = _weiszfeld(grams, w, tol=tol, max_iter=max_iter, eps=eps)
            full = _weiszfeld(grams, w, tol=tol, max_iter=max_iter, eps=eps, plain_steps=False)
            assert torch.equal(fast.coeffs, full.coeffs)
            for f in ("iterations", "converged", "objective", "at_input"):
                assert torch.equal(fast.record[f], full.record[f]), f
            checked += int((fast.record["at_input"] >= 0).sum())
    assert checked > 0  # some units did take Vardi-Zhang steps


@pytest.mark.parametrize("wt", [None, [1, 2, 3], [0.2, 0.2, 0.2, 0.4]])
def test_karcher_matches_direct_iteration_on_full_tensors(wt):
    n = 3 if wt is None else len(wt)
    xs = _points(n, (25, 16), seed=10 + n, spread=0.6, offset=1.0)
    xs[1] = xs[1] * 3.0  # different norms
    w = parse_weights(wt, n)
    sol = solve("karcher", gram_matrix(xs)[None], w, tol=1e-13, max_iter=500)
    y = apply(sol.coeffs[0], xs)
    ref = direct_karcher(xs, w)
    assert bool(sol.record["converged"][0])
    assert rel(y, ref) < 1e-5
    # objective Σ ᾱ θ^2 recomputed on full tensors at both points
    def obj(v):
        X = torch.stack([x.reshape(-1) for x in xs])
        U = X / X.norm(dim=1, keepdim=True)
        u = v / v.norm()
        th = 2 * torch.asin(((U - u).norm(dim=1) / 2).clamp(max=1))
        return float((w * th ** 2).sum())
    assert abs(float(sol.record["objective"][0]) - obj(ref)) <= 1e-6 * obj(ref)
    mags = torch.stack([x.norm() for x in xs])
    assert abs(float(y.norm()) - float((w * mags).sum())) <= 1e-10 * float(y.norm())


def test_karcher_zero_norm_inputs_excluded_and_counted():
    xs = _points(3, (64,), seed=4, offset=1.0)
    xs.append(torch.zeros(64, dtype=torch.float64))
    w = parse_weights([1, 1, 1, 1], 4)
    sol = solve("karcher", gram_matrix(xs)[None], w, tol=1e-13)
    assert sol.record["excluded"][0].tolist() == [False, False, False, True]
    y = apply(sol.coeffs[0], xs)
    ref = direct_karcher(xs, w)  # direction from the three, magnitude /4 with the zero
    assert rel(y, ref) < 1e-5
    assert float(sol.coeffs[0, 3]) == 0.0


def test_karcher_zero_task_vector_is_excluded_in_fp16():
    """A model equal to the base (task vector exactly 0) with fp16 storage."""
    base = torch.randn(300, 64).half()
    xs = [(base.float() + 0.05 * torch.randn(300, 64)).half() for _ in range(3)]
    xs.insert(1, base.clone())
    sol = solve("karcher", gram_matrix(xs, base)[None], None)
    assert sol.record["excluded"][0].tolist() == [False, True, False, False]
    a, ab = task_vector_coefficients(sol.coeffs, 1.0)
    out = combine(xs, a[0], base, ab[0], dtype=torch.float32)
    ref = direct_karcher([x.double() - base.double() for x in xs], parse_weights(None, 4)) + base.double().reshape(-1)
    assert rel(out.double(), ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("short_at", [0, 1, 2])
def test_karcher_with_a_task_vector_1000x_shorter_than_the_others(dtype, short_at):
    """A fine-tune that barely moved from the base: its direction counts like the others'. From
    fp32 products its norm (and so its direction) was noise; the Gram's check recomputes such a
    key in fp64 (gram.py, "Norms"). Found by the fuzz: a merged norm 1.5x the longest input."""
    g = torch.Generator().manual_seed(7 + short_at)
    base = torch.randn(4000, generator=g, dtype=torch.float64)
    taus = [0.05 * torch.randn(4000, generator=g, dtype=torch.float64) for _ in range(3)]
    taus[short_at] *= 1e-3 if dtype == torch.float32 else 1e-2  # fp16/bf16 resolve less of it
    xs = [(base + t).to(dtype) for t in taus]
    b = base.to(dtype)
    sol = solve("karcher", gram_matrix(xs, b)[None], None, tol=1e-13, max_iter=500)
    stored = [x.double() - b.double() for x in xs]  # the task vectors as stored
    ref = direct_karcher(stored, parse_weights(None, 3))
    assert rel(apply(sol.coeffs[0], stored), ref) < 1e-6  # fp32 products: 1e-4..1e-3
    assert not bool(sol.record["excluded"][0].any())
    # applied as the patches are (fp32): the short input's coefficient is ~1/its relative norm
    a, ab = task_vector_coefficients(sol.coeffs, 1.0)
    out = combine(xs, a[0], b, ab[0], dtype=torch.float32).double()
    assert rel(out - b.double(), ref) < 1e-3


def test_karcher_point_1000x_shorter_and_antipodal_keeps_the_mean_norm():
    """The fuzz case itself (bf16, d = 1): two equal points and a short one on the other side."""
    xs = list(torch.tensor([[-1.0234375], [-1.0234375], [4.2152e-04]], dtype=torch.float64).to(torch.bfloat16))
    sol = solve("karcher", gram_matrix(xs)[None], None)
    y = combine(xs, sol.coeffs[0], dtype=torch.float64)
    norms = [float(x.double().abs()) for x in xs]
    assert float(y) == pytest.approx(-sum(norms) / 3, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["gram_matrix", "GramPass"])
def test_karcher_task_vectors_summing_to_zero_with_an_input_equal_to_the_base(dtype, path):
    """Mixes of A and B around the base (A+B)/2, one of them equal to it: ‖m‖^2 is ~0 and came out
    of the map slightly negative; clamping it to 0 gave the zero task vector a norm (1e-4 of the
    others') and a direction made of noise, and the merge came out at 3e-6 of the right length.
    In fp32 the task vectors lie on one line (±(A-B)): the Karcher mean is the heavier side with
    the mean norm. bf16 rounding takes them off the line: they surround 0, no Karcher mean."""
    from kernels import GramPass

    g = torch.Generator().manual_seed(5)
    a = torch.randn(4096, generator=g) * 0.05
    b = a + 0.01 * torch.randn(4096, generator=g)
    base = ((a + b) / 2).to(dtype)
    xs = [(r * a + (1 - r) * b).to(dtype) for r in (0.0, 0.5, 1.0, 0.3, 0.0, 1.0, 0.7)]
    assert torch.equal(xs[1], base)
    if path == "GramPass":
        gp = GramPass(1, full=True)
        gp.add(0, xs, base, "k")
        grams = gp.result()
    else:
        grams = gram_matrix(xs, base)[None]
    sol = solve("karcher", grams, None)
    assert sol.record["excluded"][0].tolist() == [False, True] + [False] * 5
    taus = [x.double() - base.double() for x in xs]
    y = apply(sol.coeffs[0], taus)
    if dtype == torch.float32:
        assert not bool(sol.record["ill_posed"][0])
        norms = [float(t.norm()) for t in taus]
        assert float(y.norm()) == pytest.approx(sum(norms) / 7, rel=1e-6)
    else:
        assert bool(sol.record["ill_posed"][0])
        assert rel(y, sum(taus) / 7) < 1e-12  # the weighted mean


def _hull_min_norm(units: np.ndarray) -> float:
    """min over the simplex of ‖Σ λ_i u_i‖ by scipy's SLSQP (rows of `units` are the u_i)."""
    from scipy.optimize import minimize

    n = len(units)
    q = units @ units.T
    r = minimize(lambda l: l @ q @ l, np.full(n, 1 / n), jac=lambda l: 2 * q @ l, method="SLSQP",
                 bounds=[(0, 1)] * n, constraints=[{"type": "eq", "fun": lambda l: l.sum() - 1}],
                 options={"ftol": 1e-15, "maxiter": 1000})
    return float(np.sqrt(max(r.fun, 0.0)))


@pytest.mark.parametrize("seed", range(40))
def test_karcher_ill_posed_exactly_where_the_directions_hull_comes_near_zero(seed):
    """The solver's half-space check against scipy's min-norm point of the directions' hull, on
    clouds built to land on both sides of the 0.05 margin: a cluster, points pushed across to
    the far side, some exactly around their own average."""
    from kernels.karcher import SURROUND_MARGIN

    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 9)), int(rng.choice([2, 3, 16, 300]))
    pts = rng.normal(size=(n, d)) * 0.1 + rng.normal(size=d)
    for i in rng.choice(n, size=int(rng.integers(0, n)), replace=False):
        pts[i] = -pts[i] * rng.uniform(0.2, 3) + rng.normal(size=d) * rng.choice([1e-3, 0.05, 0.3])
    if seed % 4 == 0:
        pts -= pts.mean(0)  # task vectors around their own average
    xs = list(torch.tensor(pts))
    sol = solve("karcher", gram_matrix(xs)[None], None)
    units = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    nearest = _hull_min_norm(units)
    collinear = bool((1 - np.abs(units @ units.T) <= 1e-6).all())
    ill = bool(sol.record["ill_posed"][0])
    if abs(nearest - SURROUND_MARGIN) > 0.01:  # FISTA's fixed steps bound it within ~0.01 here
        assert ill == (nearest < SURROUND_MARGIN and not collinear), (nearest, collinear, n, d)
    if ill:  # the weighted mean, in closed form
        assert torch.equal(sol.coeffs[0], torch.full((n,), 1 / n, dtype=torch.float64))
        assert bool(sol.record["converged"][0]) and bool(torch.isfinite(sol.record["angles"]).all())
    else:  # where it has one, the Karcher mean keeps the weighted mean of the norms
        y = apply(sol.coeffs[0], xs)
        want = float(np.linalg.norm(pts, axis=1).mean())
        assert float(y.norm()) == pytest.approx(want, rel=1e-6)


def test_karcher_refuses_centred_only_grams_and_takes_a_slightly_negative_mean_norm():
    from kernels import MergeInputError

    xs = [torch.randn(300, dtype=torch.float64) for _ in range(3)]
    part = gram_matrix(xs, full=False)
    for grams in (part[None], (part + part)[None]):  # one key, and summed over keys (block scope)
        with pytest.raises(MergeInputError, match="karcher needs norms"):
            solve("karcher", grams, None)
    full = gram_matrix(xs)
    full[0, 0] = -1e-12 * float(full.diagonal().max())  # ‖m‖^2 ~ 0, rounded below 0
    assert torch.isfinite(solve("karcher", full[None], None).coeffs).all()


@pytest.mark.parametrize("w", [[0.51, 0.49], [0.49, 0.51], [3, 1, 1], [1, 1, 2.5, 0.5]])
def test_geometric_median_at_an_input_found_exactly(w):
    """An input holding more weight than the pull of all the others is the median: found before
    any step, exactly (two models weighted 0.51 / 0.49 ended 3e-4 of their distance short
    after 200 Weiszfeld steps, unconverged)."""
    g = torch.Generator().manual_seed(len(w))
    xs = [torch.randn(2000, generator=g, dtype=torch.float64) for _ in w]
    sol = solve("geometric_median", gram_matrix(xs, full=False)[None], w)
    j = max(range(len(w)), key=lambda i: w[i])
    assert sol.coeffs[0].tolist() == [1.0 if i == j else 0.0 for i in range(len(w))]
    assert bool(sol.record["converged"][0]) and int(sol.record["iterations"][0]) == 0
    assert int(sol.record["at_input"][0]) == j


@pytest.mark.parametrize("seed", range(30))
def test_geometric_median_objective_as_low_as_scipy_with_dominant_weights(seed):
    """Low dimensions and one heavy weight, where the median sits at an input or just off it:
    the objective is scipy's (BFGS + Nelder-Mead from every input) to 1e-9."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    pts = rng.normal(size=(n, d))
    w = rng.uniform(0.1, 1.0, size=n)
    w[rng.integers(n)] += rng.uniform(0.0, 2.0)
    sol = solve("geometric_median", gram_matrix(list(torch.tensor(pts)), full=False)[None], w.tolist())
    y = apply(sol.coeffs[0], list(torch.tensor(pts)))
    _, best = scipy_geometric_median(pts, w)
    got = gm_objective(list(torch.tensor(pts)), w.tolist(), y)
    assert got <= best + 1e-9 * max(best, 1.0), (got, best, sol.record["converged"])


def test_karcher_antipodal_inputs_handled():
    u = torch.randn(40, dtype=torch.float64)
    xs = [u, -2 * u]
    sol = solve("karcher", gram_matrix(xs)[None], None)
    r = sol.record
    assert bool(r["degenerate_start"][0]) and bool(r["converged"][0])
    assert torch.isfinite(sol.coeffs).all()
    y = apply(sol.coeffs[0], xs)
    assert abs(float(y.norm()) - 1.5 * float(u.norm())) < 1e-9 * float(u.norm())  # mean of norms
    # an input antipodal to the mean of the others contributes no tangent (no NaN)
    v = torch.randn(40, dtype=torch.float64)
    v = v - (v @ u) / (u @ u) * u
    xs = [u, u + 1e-3 * v, -u]
    sol = solve("karcher", gram_matrix(xs)[None], [2, 2, 1])
    assert torch.isfinite(sol.coeffs).all()


def test_task_vector_mode_for_every_linear_method():
    base = torch.randn(80, dtype=torch.float64)
    xs = [base + 0.3 * torch.randn(80, dtype=torch.float64) for _ in range(4)]
    w = parse_weights("1 2 1 1", 4)
    for method in ("weighted_mean", "geometric_median", "karcher"):
        sol = solve(method, gram_matrix(xs, base)[None], w)
        taus = [x - base for x in xs]
        direct = solve(method, gram_matrix(taus)[None], w)
        assert torch.allclose(sol.coeffs, direct.coeffs, rtol=1e-9, atol=1e-12)
        for lam in (1.0, 0.5, 1.7):
            a, ab = task_vector_coefficients(sol.coeffs, lam)
            out = combine(xs, a[0], base, ab[0], dtype=torch.float64)
            want = base + lam * apply(sol.coeffs[0], taus)
            assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_storage_matches_fp64_reference(dtype):
    """Real storage: fp16/bf16/fp32 inputs, fp32 compute, against fp64 references on the same
    stored values."""
    base = torch.randn(128, 96, dtype=torch.float64)
    xs = [(base + 0.02 * torch.randn(128, 96, dtype=torch.float64)).to(dtype) for _ in range(3)]
    up = [x.double() for x in xs]
    w = parse_weights("1 1 2", 3)
    sol = solve("geometric_median", gram_matrix(xs)[None], w, tol=1e-12)
    y = apply(sol.coeffs[0], up)
    ref = direct_weiszfeld(up, w)
    oref = gm_objective(up, w, ref)
    assert abs(gm_objective(up, w, y) - oref) <= 1e-6 * oref
    assert float((y - ref).norm()) <= 1e-5 * float(torch.stack(up).std(0).norm())
    sol = solve("karcher", gram_matrix(xs)[None], w, tol=1e-12)
    y = apply(sol.coeffs[0], up)
    assert rel(y, direct_karcher(up, w)) < 1e-5
