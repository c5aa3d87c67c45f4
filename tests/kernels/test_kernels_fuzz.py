"""Fuzz (hypothesis): the kernels on degenerate geometry and extreme magnitudes.

Geometry: coincident, duplicated, collinear, all-zero, one zero point, random; magnitudes from fp32
subnormals (1e-40) to 1e+30 and mixtures of them (fp16: its own range, subnormals included);
dtypes fp32/fp16/bf16. Properties: finite inputs give finite, sensible results (coefficients on
the simplex, results inside the inputs' bounding box, the geometric median of coincident points
is that point exactly, no better objective at an input, scale invariance under powers of two);
NaN/Inf in an input gives a MergeInputError naming the model and the key, never a NaN result.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import (MergeInputError, combine, element_median, gram_matrix, sign_elected_median, solve,
                     task_vector_coefficients)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# magnitudes each dtype holds as finite numbers (fp32 and bf16 share the exponent range)
MAGNITUDES = {"fp32": [1e-40, 1e-30, 1e-3, 1.0, 1e30], "bf16": [1e-40, 1e-30, 1e-3, 1.0, 1e30],
              "fp16": [1e-7, 1e-3, 1.0, 1e3]}
GEOMETRY = ["random", "coincident", "duplicates", "collinear", "all_zero", "one_zero"]


@st.composite
def clouds(draw, min_n=2, max_n=5):
    """(points (N, D) fp64 holding exactly the dtype's values, dtype, weights (N,), description)."""
    dname = draw(st.sampled_from(sorted(DTYPES)))
    n = draw(st.integers(min_n, max_n))
    d = draw(st.sampled_from([1, 3, 40, 1100]))  # 1100 crosses the 1024-element product sub-block
    geometry = draw(st.sampled_from(GEOMETRY))
    mags = MAGNITUDES[dname]
    mixed = draw(st.booleans())
    scale = [draw(st.sampled_from(mags)) for _ in range(n)] if mixed else [draw(st.sampled_from(mags))] * n
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    centre = rng.normal(size=d) * draw(st.sampled_from([0.0, 1.0]))
    pts = np.stack([(centre + rng.normal(size=d)) * s for s in scale])
    if geometry == "coincident":
        pts[:] = pts[0]
    elif geometry == "duplicates":
        pts[1:: 2] = pts[0]
    elif geometry == "collinear":
        v = rng.normal(size=d)
        t = rng.normal(size=n)
        pts = np.stack([(centre + ti * v) * scale[0] for ti in t])
    elif geometry == "all_zero":
        pts[:] = 0.0
    elif geometry == "one_zero":
        pts[draw(st.integers(0, n - 1))] = 0.0
    dtype = DTYPES[dname]
    x = torch.tensor(pts, dtype=torch.float64).to(dtype)
    assert bool(torch.isfinite(x).all()), "strategy must stay inside the dtype's range"
    if draw(st.booleans()):
        w = torch.tensor(rng.uniform(0.0, 1.0, size=n), dtype=torch.float64)
        w[draw(st.integers(0, n - 1))] += 0.5
        if draw(st.booleans()):
            w[draw(st.integers(0, n - 1))] = 0.0
            w[draw(st.integers(0, n - 1))] += 0.1
    else:
        w = torch.ones(n, dtype=torch.float64)
    return x, w / w.sum(), f"{dname} {geometry} n={n} d={d} scales={scale}"


def _box(xs):
    stack = torch.stack([x.double() for x in xs])
    return stack.min(0).values, stack.max(0).values, float(stack.abs().max())


def _in_box(y, xs, rel=1e-5):
    lo, hi, m = _box(xs)
    slack = rel * m + 1e-300
    yd = y.double()
    return bool(((yd >= lo - slack) & (yd <= hi + slack)).all())


@FUZZ
@given(clouds(), st.sampled_from([None, 16]))
def test_geometric_median_finite_in_box_and_optimal(cloud, chunk):
    x, w, what = cloud
    xs = list(x)
    sol = solve("geometric_median", gram_matrix(xs, chunk_elems=chunk, full=False)[None], w)
    c = sol.coeffs[0]
    assert bool(torch.isfinite(c).all()), what
    assert float(c.min()) >= -1e-12 and abs(float(c.sum()) - 1) <= 1e-9, (what, c)
    y = combine(xs, c, dtype=torch.float32, chunk_elems=chunk)
    assert bool(torch.isfinite(y).all()), what
    assert _in_box(y, xs), what
    if all(torch.equal(xs[0], v) for v in xs[1:]):
        assert torch.equal(y, xs[0].float()), f"GM of coincident points must be that point: {what}"
    # no input and not the weighted mean does better (fp64 objective, fp32 rounding of y allowed)
    pts = torch.stack([v.double() for v in xs])
    m = float(pts.abs().max())
    # (a median at an input is found before iterating; one just off an input Weiszfeld approaches
    # only linearly, at a rate near 1: such cases end unconverged after max_iter and say so)
    if m > 0 and bool(sol.record["converged"][0]):
        def objective(p):
            return float((w * (pts / m - p / m).norm(dim=1)).sum())
        best = min([objective(p) for p in pts] + [objective((w[:, None] * pts).sum(0))])
        # the fp32 Gram resolves distances to ~sqrt(1e-7)·diameter: two points much closer to
        # each other than to the pivot (model_1) are told apart only to that (gram.py)
        diam = float(torch.cdist(pts / m, pts / m).max())
        assert objective(y.double()) <= best * (1 + 1e-6) + 5e-4 * diam + 1e-6 * math.sqrt(pts.shape[1]), what


@FUZZ
@given(clouds(), st.sampled_from([None, 16]))
def test_karcher_finite_and_norm_is_mean_norm(cloud, chunk):
    x, w, what = cloud
    xs = list(x)
    sol = solve("karcher", gram_matrix(xs, chunk_elems=chunk)[None], w)
    c = sol.coeffs[0]
    assert bool(torch.isfinite(c).all()), what
    y = combine(xs, c, dtype=torch.float32, chunk_elems=chunk)
    assert bool(torch.isfinite(y).all()), what
    norms = torch.stack([v.double().norm() for v in xs])
    top = float(norms.max())
    got = float(y.double().norm())
    want = float((w * norms).sum())
    # points much shorter than the longest carry an absolute norm error ~1e-7·max‖x‖ (gram.py);
    # near-antipodal inputs (the mean direction nearly cancels) need large coefficients, and the
    # fp32 sums lose accuracy relative to the terms Σ|c_i|‖x_i‖
    terms = float((c.abs() * norms).sum())
    # fp32 subnormals are spaced 2^-149 apart: each rounding of the sum is absolute there
    grid = 4 * math.sqrt(x.shape[1]) * (float(c.abs().sum()) + 1) * 2.0 ** -149
    slack = 1e-4 * (top + terms) + grid
    rec = sol.record
    unique = not (bool(rec["degenerate_start"][0]) or bool(rec["antipodal"][0]))
    # near-antipodal inputs: the log map's θ/sin θ amplifies the fp32 Gram's ~1e-7 rounding
    # (angles near π resolve only to ~1e-3 rad), so the mean direction is ill-conditioned there
    pts = torch.stack([v.double() for v in xs])
    unit = pts / norms.clamp_min(1e-300)[:, None]
    cos = unit @ unit.T
    unique = unique and not bool((cos < -0.99).any())
    # a point much shorter than the longest (but not 0) gets its products in fp64 (gram.py,
    # "Norms"): before that its fp32 norm could be all error, and the merged norm above every input
    if bool(rec["ill_posed"][0]):  # directions that cancel: no Karcher mean, the weighted mean
        assert torch.allclose(c, w, rtol=1e-14, atol=0), (what, c, w)
        unique = False
    if unique:
        assert abs(got - want) <= slack, (what, got, want, c)
    assert got <= top + slack, (what, got, top)


@FUZZ
@given(clouds(), st.sampled_from(["geometric_median", "karcher"]), st.integers(-140, 120))
def test_solution_invariant_under_power_of_two_scaling(cloud, method, k):
    """Scaling every input by 2^k (exact while the values stay normal) changes no coefficient:
    the rescaled Gram path gives what the plain path gives."""
    x, w, what = cloud
    x = x.float()
    m = float(x.abs().max())
    if m == 0 or not (2.0 ** -60 < m < 2.0 ** 60):
        return
    tiny = x.abs()[x != 0].min() if bool((x != 0).any()) else torch.tensor(1.0)
    if float(tiny) * 2.0 ** k < 2.0 ** -126 or m * 2.0 ** k >= 2.0 ** 125:
        return  # some value would leave the normal range: not an exact scaling
    xk = x * 2.0 ** k
    full = method == "karcher"
    c0 = solve(method, gram_matrix(list(x), full=full)[None], w).coeffs[0]
    ck = solve(method, gram_matrix(list(xk), full=full)[None], w).coeffs[0]
    assert torch.allclose(c0, ck, rtol=1e-9, atol=1e-12), (what, k, c0, ck)


@FUZZ
@given(clouds(), clouds())
def test_unit_of_two_keys_with_different_magnitudes(a, b):
    """A block/model-scope unit sums the Grams of keys of very different magnitudes (fp64)."""
    xa, w, what = a
    xb = b[0]
    n = min(len(xa), len(xb))
    xa, xb, w = xa[:n], xb[:n], w[:n]
    if float(w.sum()) <= 0:
        return
    w = w / w.sum()
    for method, full in (("geometric_median", False), ("karcher", True)):
        g = gram_matrix(list(xa), full=full) + gram_matrix(list(xb), full=full)
        c = solve(method, g[None], w).coeffs[0]
        assert bool(torch.isfinite(c).all()), (method, what, b[2])
        for xs in (list(xa), list(xb)):
            y = combine(xs, c, dtype=torch.float32)
            assert bool(torch.isfinite(y).all()), (method, what, b[2])
            if method == "geometric_median":
                assert _in_box(y, xs), (what, b[2])


@FUZZ
@given(clouds(), st.sampled_from([None, 16]))
def test_element_median_finite_in_box(cloud, chunk):
    x, w, what = cloud
    xs = list(x)
    y = element_median(xs, w, chunk_elems=chunk)
    assert bool(torch.isfinite(y).all()), what
    assert _in_box(y, xs, rel=0.0), what  # a median (or a midpoint of two inputs) never leaves the box
    if all(torch.equal(xs[0], v) for v in xs[1:]):
        assert torch.equal(y.to(xs[0].dtype), xs[0]), what


@FUZZ
@given(clouds(min_n=3), st.sampled_from([0.0, 0.3]), st.integers(0, 2 ** 31 - 1), st.sampled_from([1.0, 0.5]))
def test_sign_elected_median_finite_and_bounded(cloud, drop, seed, strength):
    """Point 0 is the base. result - base = λ Σ c_i τ̃_i with c on the simplex and each entry of
    τ̃_i either 0 or τ_i/(1-p): inside [min(0, τ), max(0, τ)]/(1-p) times λ."""
    x, w, what = cloud
    base, xs, w = x[0], list(x[1:]), w[1:]
    if float(w.sum()) <= 0:
        return
    out, rec = sign_elected_median(xs, base, w / w.sum(), strength=strength, drop_rate=drop, seed=seed, key="k")
    assert bool(torch.isfinite(out).all()), what
    tau = torch.stack([v.double() - base.double() for v in xs])
    lo = tau.min(0).values.clamp(max=0) * strength / (1 - drop)
    hi = tau.max(0).values.clamp(min=0) * strength / (1 - drop)
    m = float(tau.abs().max()) / (1 - drop) + float(base.double().abs().max())
    got = out.double() - base.double()
    slack = 1e-5 * m + 1e-300
    assert bool(((got >= lo - slack) & (got <= hi + slack)).all()), what
    if drop == 0.0 and all(torch.equal(xs[0], v) for v in xs[1:]) and strength == 1.0:
        assert torch.equal(out.to(xs[0].dtype), xs[0]), what


# --- NaN / Inf in one input: a MergeInputError naming the model and the key, in every kernel --------

@FUZZ
@given(clouds(), st.data(), st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       st.booleans())
def test_nonfinite_input_named_by_every_kernel(cloud, data, bad, in_base):
    x, w, what = cloud
    xs = [v.clone() for v in x]
    base = xs[-1].clone() if in_base else None
    n = len(xs)
    if in_base:
        target, name = base, "base_model"
    else:
        j = data.draw(st.integers(0, n - 1))
        target, name = xs[j], f"model_{j + 1}"
    target.view(-1)[data.draw(st.integers(0, target.numel() - 1))] = bad
    kind = "NaN" if bad != bad else "Inf"
    key = "input_blocks.4.1.proj_in.weight"

    def refused(fn):
        with pytest.raises(MergeInputError) as e:
            fn()
        msg = str(e.value)
        assert name in msg and key in msg and kind in msg, (what, msg)

    refused(lambda: gram_matrix(xs, base, key=key, full=False))
    refused(lambda: gram_matrix(xs, base, key=key))
    refused(lambda: element_median(xs, w, base, key=key))
    sign_base = base if in_base else torch.zeros_like(xs[0])
    refused(lambda: sign_elected_median(xs, sign_base, w, key=key))


def test_overflowing_fp32_products_are_solved_not_refused():
    """1e30-sized fp32 inputs: their fp32 squares overflow; the Gram is recomputed scaled (was a
    'norms beyond ~1e19' refusal) and equals the Gram of the same points scaled down, times 2^2k."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5000, generator=g)
    for k in (100, -120):
        xk = x * 2.0 ** k
        for full in (False, True):
            a = gram_matrix(list(x), full=full)
            b = gram_matrix(list(xk), full=full)
            assert torch.equal(b, a * 4.0 ** k) if full else torch.equal(b[1:, 1:], a[1:, 1:] * 4.0 ** k)
        tv = task_vector_coefficients(solve("karcher", gram_matrix(list(xk[1:]), xk[0])[None], None).coeffs, 1.0)
        assert all(bool(torch.isfinite(t).all()) for t in tv)


@FUZZ
@given(clouds(), clouds(), st.booleans())
def test_batched_gram_pass_equals_gram_matrix(a, b, full):
    """GramPass (small and medium keys batched on CPU, the engine's path) flags the same extreme
    keys and hands them to gram_matrix: the same Grams, finite, whatever the magnitudes. Medium
    keys: the same points tiled past SMALL_KEY (off the sub-block), one batch per dtype, every
    entry times one fixed factor in [0.5, 1] for all points (coincident, collinear and zero points
    stay so; a value repeated 66k times would make every fp32 sub-block sum of 1024 equal terms
    err ~1e-5 in both kernels alike, a property of such data, not of the batching)."""
    from kernels import GramPass
    from kernels.gram_pass import SMALL_KEY

    n = min(len(a[0]), len(b[0]))
    keys = [list(a[0][:n]), list(b[0][:n])]
    factor = 0.5 + 0.5 * torch.rand(SMALL_KEY + 1001, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for c in (a, b):
        reps = -(-(SMALL_KEY + 1001) // c[0].shape[1])
        tiled = c[0][:n].double().repeat(1, reps)[:, : SMALL_KEY + 1001] * factor
        keys.append(list(tiled.to(c[0].dtype)))
    gp = GramPass(len(keys), full=full)
    for j, xs in enumerate(keys):
        gp.add(j, xs, None, key=f"k{j}")
    got = gp.result()
    for j, xs in enumerate(keys):
        want = gram_matrix(xs, key=f"k{j}", full=full)
        assert bool(torch.isfinite(got[j]).all()), (a[2], b[2])
        scale = float(want.abs().max()) + 1e-300
        # gram_matrix's fp32 sub-block sums carry a few 1e-7 each and an entry of [m, d] adds up
        # to four of them (~1e-6 of the largest seen, hypothesis seed 8); the batch is ~1e-9
        assert float((got[j] - want).abs().max()) <= 4e-6 * scale, (j, a[2], b[2], got[j], want)
