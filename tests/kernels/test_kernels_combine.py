"""combine / task-vector coefficients / element median / sign-elected median."""
from __future__ import annotations

import itertools

import pytest
import torch

from kernels import MergeInputError, combine, element_median, parse_weights, sign_elected_median, task_vector_coefficients
from kernels.element_median import integer_weights, selection_network, sorting_network, weighted_plan
from kernels.sign_elected import TIE
from kernels.threads import intra_op_threads
from tests.kernels.kernels_ref import direct_weiszfeld, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2])
@pytest.mark.parametrize("chunk", [None, 100])
def test_combine_matches_fp64_and_returns_dtype(dtype, chunk):
    xs = [torch.randn(300, 7).to(dtype) for _ in range(3)]
    base = torch.randn(300, 7).to(dtype)
    c = [0.2, -0.3, 0.9]
    out = combine(xs, c, base, 0.2, dtype=torch.float32, chunk_elems=chunk)
    ref = sum(ci * x.double() for ci, x in zip(c, xs)) + 0.2 * base.double()
    assert out.dtype == torch.float32 and float((out.double() - ref).abs().max()) < 1e-5
    out16 = combine(xs, c, base, 0.2, dtype=torch.float16, chunk_elems=chunk)
    assert out16.dtype == torch.float16 and torch.equal(out16, out.to(torch.float16))
    assert combine(xs, torch.tensor(c, dtype=torch.float64), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_combine_exactness_shortcuts():
    x = torch.randn(1000)
    y = torch.randn(1000)
    assert torch.equal(combine([x, y], [1.0, 0.0]), x)
    assert torch.equal(combine([x, x.clone(), x.clone()], [1 / 3, 1 / 3, 1 / 3]), x)
    assert torch.equal(combine([x, x.clone()], [0.7, 0.3], y, 1e-17), x)
    assert not torch.equal(combine([x, y], [0.5, 0.5]), x)
    assert torch.equal(combine([x, y], [0.0, 0.0]), torch.zeros(1000))


def test_task_vector_coefficients_identity():
    c = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    a, ab = task_vector_coefficients(c, 0.7)
    assert torch.allclose(a, 0.7 * c) and torch.allclose(ab, torch.tensor([0.3, 0.3], dtype=torch.float64))
    xs = [torch.randn(50, dtype=torch.float64) for _ in range(3)]
    b = torch.randn(50, dtype=torch.float64)
    want = b + 0.7 * sum(ci * (x - b) for ci, x in zip(c[0], xs))
    assert torch.allclose(combine(xs, a[0], b, ab[0]), want, atol=1e-14)


def _brute_weighted_median(vals, w):
    """argmin_y Σ w_i |y - v_i| over candidates (the inputs and midpoints), smallest-ties -> midpoint."""
    cands = sorted(set(vals) | {(a + b) / 2 for a in vals for b in vals})
    f = lambda y: sum(wi * abs(y - v) for wi, v in zip(w, vals))
    best = min(f(y) for y in cands)
    mins = [y for y in cands if f(y) <= best + 1e-12]
    return (min(mins) + max(mins)) / 2


@pytest.mark.parametrize("wt", [None, [1, 2, 3], [1, 1, 1, 1], [2, 1, 1, 0], [0.5, 0.5], [1, 3, 1, 1, 2]])
def test_element_median_matches_brute_force(wt):
    n = 3 if wt is None else len(wt)
    g = torch.Generator().manual_seed(n)
    xs = [torch.randint(-4, 5, (200,), generator=g).double() for _ in range(n)]  # many ties
    w = parse_weights(wt, n)
    out = element_median(xs, w, chunk_elems=64)
    for j in range(200):
        vals = [float(x[j]) for x in xs]
        assert float(out[j]) == pytest.approx(_brute_weighted_median(vals, w.tolist()), abs=1e-12), (j, vals)


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_0_1_input(n):
    """0-1 principle (Knuth 5.3.4): a comparator network that sorts all 2^n 0/1 inputs sorts
    every input. The selection network for the middle positions gets them right on the same set."""
    net = sorting_network(n)
    mid = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    sel = selection_network(n, mid)
    assert len(sel) <= len(net)
    for bits in itertools.product((0, 1), repeat=n):
        full, part = list(bits), list(bits)
        for i, j in net:
            full[i], full[j] = min(full[i], full[j]), max(full[i], full[j])
        for i, j, lo, hi in sel:
            a, b = part[i], part[j]
            if lo:
                part[i] = min(a, b)
            if hi:
                part[j] = max(a, b)
        assert full == sorted(bits), (n, bits)
        assert [part[k] for k in mid] == [full[k] for k in mid], (n, bits)


def _sorted_weighted_median(xs, w):
    """The definition by torch.sort along the models (fp64 cumulative weights; the midpoint of a
    tie in the compute dtype)."""
    v = torch.stack([x.reshape(-1).to(torch.promote_types(x.dtype, torch.float32)) for x in xs])
    s, idx = torch.sort(v, dim=0)
    cw = torch.as_tensor(w, dtype=torch.float64)[idx].cumsum(0)
    k = (cw >= 0.5 - 1e-12).to(torch.int8).argmax(0)
    lo = s.gather(0, k[None])[0]
    hi = s.gather(0, (k + 1).clamp(max=len(xs) - 1)[None])[0]
    tie = ((cw.gather(0, k[None])[0] - 0.5).abs() <= 1e-12) & (k < len(xs) - 1)
    return torch.where(tie, (lo + hi) / 2, lo)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 12])
@pytest.mark.parametrize("wt", ["equal", "random", "integer", "near"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_element_median_network_matches_sort(n, wt, dtype):
    g = torch.Generator().manual_seed(n)
    w = {"equal": torch.ones(n), "random": torch.rand(n, generator=g) + 0.05,
         "integer": torch.randint(1, 4, (n,), generator=g),
         "near": torch.tensor([0.5 + 1e-9, 0.5 - 1e-9 - (n - 2) / 1024] + [1 / 1024] * (n - 2),
                              dtype=torch.float64)}[wt]
    w = parse_weights(w.tolist(), n)  # fp64, as the nodes pass them
    if wt in ("integer", "near"):  # integer weights travel in fp32; 1/2 + 1e-9 against 1/2 - 1e-9 cannot
        assert (integer_weights(tuple(w.tolist())) is None) == (wt == "near")
    for xs in ([torch.randn(3001, generator=g).to(dtype) for _ in range(n)],
               [torch.randint(-2, 3, (3001,), generator=g).to(dtype) for _ in range(n)]):  # ties
        want = _sorted_weighted_median(xs, w)
        for chunk in (None, 1000):
            out = element_median(xs, w, chunk_elems=chunk)
            assert out.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert torch.equal(out, want), (n, wt, dtype, chunk)


@pytest.mark.parametrize("wt, plan", [
    ("3,1,1", ("input", 0)), ("1,2", ("input", 1)), ("1,1,5,1,1", ("input", 2)),
    ("1,2,2", ("select", (1,), None)), ("0.3,0.3,0.4", ("select", (1,), None)),
    ("2,2,3,3,3", ("select", (2,), None)),
    ("2,1,1", ("half", 0)), ("1,2,3", ("half", 2)), ("1,1,1,3", ("half", 3)), ("5,1,1,1,1,1", ("half", 0)),
    ("1,1,1,2", ("select", (2,), (1, 1, 1, 2))), ("1,1,2,2", ("select", (2, 3), (1, 1, 2, 2))),
    ("0.1,0.2,0.3,0.4", ("select", (4, 5), (1, 2, 3, 4))), ("1,1,2,3,3", ("select", (4, 5), (1, 1, 2, 3, 3))),
    ("1,2,3,5", None), ("2,3,4,5", None), ("1,2,3,4,5", None), ("0.1,0.25,0.3,0.35", None)])
def test_weights_that_decide_every_ordering_alike_take_the_short_way(wt, plan):
    """weighted_plan: a dominant model, a fixed order statistic, one model of weight exactly 1/2
    (x_k clamped to the others' range, averaged with x_k), or whole-number weights as repeated
    inputs where that network is the shorter (None: the weights travel through the sorting
    network); the result equals the sort definition, ties in the values included, in every dtype
    and chunking."""
    n = len(wt.split(","))
    w = parse_weights(wt, n)
    assert weighted_plan(tuple(w.tolist())) == plan
    g = torch.Generator().manual_seed(n)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for xs in ([torch.randn(3001, generator=g).to(dtype) for _ in range(n)],
                   [torch.randint(-2, 3, (3001,), generator=g).to(dtype) for _ in range(n)]):
            want = _sorted_weighted_median(xs, w)
            for chunk in (None, 1000):
                assert torch.equal(element_median(xs, w, chunk_elems=chunk), want), (wt, dtype, chunk)
            if plan is not None and plan[0] == "input":
                assert torch.equal(element_median(xs, w, out_dtype=dtype), xs[plan[1]])
    other = 1 if plan is None or plan[1] == 0 else 0  # a model the short way does not pick
    xs = [torch.randn(100, generator=g) for _ in range(n)]
    xs[other][7] = float("nan")
    with pytest.raises(MergeInputError, match=f"key 'k': model_{other + 1} contains NaN"):
        element_median(xs, w, key="k")


@pytest.mark.parametrize("n", [3, 4, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_element_median_reads_inputs_in_their_dtype(n, dtype):
    """Models of one dtype (an odd number, or any number in the compute dtype): the selection
    network reads the inputs themselves (no copies) and, for one middle value and an output in
    their dtype, its last comparator writes the result. The sort definition to the bit, the inputs
    untouched, NaN/Inf refused by model, and a chunk whose fp16 sum overflows is not taken for
    an Inf."""
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(3001, generator=g).to(dtype) for _ in range(n)]
    xs[1][::3] = xs[0][::3]  # ties
    before = [x.clone() for x in xs]
    want = _sorted_weighted_median(xs, parse_weights("", n))
    for chunk in (None, 1000):
        for odt in (dtype, torch.float32, torch.bfloat16):
            out = element_median(xs, chunk_elems=chunk, out_dtype=odt)
            assert out.dtype == odt and torch.equal(out, want.to(odt)), (chunk, odt)
    assert all(torch.equal(a, b) for a, b in zip(xs, before))
    big = [torch.full((3000,), 60000.0 - 64 * i, dtype=dtype) for i in range(n)]  # fp16 sums overflow
    assert torch.equal(element_median(big, out_dtype=dtype), ((big[(n - 1) // 2].double() + big[n // 2]) / 2).to(dtype))
    xs[n - 1][5] = float("inf")
    with pytest.raises(MergeInputError, match=f"key 'k': model_{n} contains Inf"):
        element_median(xs, out_dtype=dtype, key="k")


def test_element_median_task_mode_and_exact_values():
    xs = [torch.randn(500).half() for _ in range(3)]
    base = torch.randn(500).half()
    out = element_median(xs, None, base)  # strength 1: exactly the median of the inputs
    stacked = torch.stack([x.float() for x in xs])
    assert torch.equal(out, stacked.median(0).values)
    assert torch.equal(element_median(xs, [0, 1, 0]), xs[1].float())
    half = element_median(xs, None, base, strength=0.5)
    assert torch.allclose(half, base.float() + 0.5 * (out - base.float()))
    same = torch.randn(64)
    assert not torch.equal(element_median([same, same.clone(), same.clone()], None, torch.randn(64), strength=0.3), same)
    assert torch.equal(element_median([same, same.clone(), same.clone()], None, torch.randn(64)), same)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.float8_e4m3fn])
def test_element_median_task_scaling_per_chunk_is_the_formula_to_the_bit(dtype, out_dtype):
    """With a base and strength λ != 1 each chunk's median is scaled in the compute dtype as it is
    made: base + λ(median - base), rounded once to the output dtype, to the bit of that formula on
    the whole key (every weight plan: one model decides, one middle, two middles, a model of weight
    1/2, weights as repeated inputs, general weights; chunks of 700 and one chunk)."""
    g = torch.Generator().manual_seed(8)
    base = (torch.randn(3001, generator=g) * 0.05).to(dtype)
    for w, n in (([3, 1, 1], 3), (None, 3), (None, 4), ([2, 1, 1], 3), ([1, 1, 1, 2], 4),
                 ([0.3, 0.1, 0.45, 0.15], 4)):
        xs = [(base.float() + 0.01 * torch.randn(3001, generator=g)).to(dtype) for _ in range(n)]
        med = element_median(xs, w)
        b = base.float()
        for lam in (0.8, -0.5, 2.0):
            want = (b + lam * (med - b)).to(out_dtype or torch.float32)
            for chunk in (700, None):
                got = element_median(xs, w, base, strength=lam, chunk_elems=chunk, out_dtype=out_dtype)
                assert got.dtype == want.dtype and torch.equal(got.float(), want.float()), (w, n, lam, chunk)


def _sign_elected_reference(xs, base, w, p=0.0, masks=None):
    taus = torch.stack([(x.double() - base.double()).reshape(-1) for x in xs])
    if masks is not None:
        taus = taus * masks / (1 - p)
    total, mass = (w[:, None] * taus).sum(0), (w[:, None] * taus.abs()).sum(0)
    elected = torch.where(total.abs() > TIE * mass, torch.sign(total), 0.0)  # a (near) tie: no sign
    taus = taus * (torch.sign(taus) == elected)
    y = direct_weiszfeld(list(taus), w)
    return base.double().reshape(-1) + y


def test_sign_elected_median_matches_direct_reference():
    base = torch.randn(64, 48, dtype=torch.float64)
    xs = [base + 0.1 * torch.randn(64, 48, dtype=torch.float64) for _ in range(4)]
    w = parse_weights("1 2 1 1", 4)
    out, rec = sign_elected_median(xs, base, w, tol=1e-13, max_iter=2000, chunk_elems=1000)
    ref = _sign_elected_reference(xs, base, w)
    assert rel(out.reshape(-1) - base.reshape(-1), ref - base.reshape(-1)) < 1e-5
    assert rec["converged"] and len(rec["coefficients"]) == 4 and 0.3 < min(rec["kept_fraction"]) < 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sign_elected_exact_ties_elect_no_sign(dtype):
    """Task vectors of a few ulps with weights 3,1,1 (not binary fractions once normalised): many
    entries tie exactly (3a + b + c = 0), which fp32 sums broke by rounding."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(20_000, generator=g).to(dtype)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    steps = [torch.randint(-6, 7, (20_000,), generator=g).double() for _ in range(3)]
    xs = [(base.double() + ulp * s).to(dtype) for s in steps]
    w = parse_weights("3 1 1", 3)
    taus = torch.stack([x.double() - base.double() for x in xs])
    ties = int(((3 * taus[0] + taus[1] + taus[2]) == 0).sum())  # exact in fp64: integers times ulps
    assert ties > 300, ties
    out, rec = sign_elected_median(xs, base, w, tol=1e-13, max_iter=2000)
    ref = _sign_elected_reference(xs, base, w)
    assert rel(out.reshape(-1).double() - base.double(), ref - base.double()) < 1e-5


def test_sign_elected_drop_is_seeded_and_independent_of_the_chunking():
    base = torch.randn(4000)
    xs = [base + 0.1 * torch.randn(4000) for _ in range(3)]
    state = torch.random.get_rng_state()
    a, ra = sign_elected_median(xs, base, drop_rate=0.5, seed=3, key="k1", chunk_elems=999)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b, _ = sign_elected_median(xs, base, drop_rate=0.5, seed=3, key="k1", chunk_elems=999)
    assert torch.equal(a, b)
    whole, rw = sign_elected_median(xs, base, drop_rate=0.5, seed=3, key="k1")  # one chunk: same masks
    assert rw["kept_fraction"] == ra["kept_fraction"] and rel(whole, a) < 1e-6
    c, _ = sign_elected_median(xs, base, drop_rate=0.5, seed=4, key="k1", chunk_elems=999)
    d, _ = sign_elected_median(xs, base, drop_rate=0.5, seed=3, key="k2", chunk_elems=999)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert all(0.25 < f < 0.5 for f in ra["kept_fraction"]), ra  # (1-p) * (share agreeing with the sign)
    # rescale 1/(1-p): with the election off (all task vectors positive) the kept mean is unbiased
    pos = [base + 0.5 + 0.1 * torch.rand(4000) for _ in range(3)]
    e, _ = sign_elected_median(pos, base, drop_rate=0.5, seed=1, key="k")
    n, _ = sign_elected_median(pos, base)
    assert abs(float((e - base).mean()) / float((n - base).mean()) - 1) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sign_elected_kept_masks_equal_hashing_again(monkeypatch, dtype):
    """The combine reuses the Gram pass's drop masks (keys up to KEPT_MASK_BYTES) or hashes again
    (larger keys): the same bits, with chunks that do not divide the key, and a base of another dtype."""
    import kernels.sign_elected as se

    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 7001, generator=g)
    xs = [(base + 0.05 * torch.randn(3, 7001, generator=g)).to(dtype) for _ in range(4)]
    kw = dict(drop_rate=0.4, seed=9, key="k", chunk_elems=4096, out_dtype=dtype)
    kept, rk = se.sign_elected_median(xs, base, [1, 2, 1, 1], **kw)
    monkeypatch.setattr(se, "KEPT_MASK_BYTES", 0)
    again, ra = se.sign_elected_median(xs, base, [1, 2, 1, 1], **kw)
    assert torch.equal(kept, again) and rk == ra
    assert not torch.equal(kept, se.sign_elected_median(xs, base, [1, 2, 1, 1], **{**kw, "seed": 10})[0])


def _group_keys(seed=21, sizes=(700, 300, 5000, 40, 900, 900, 64)):
    g = torch.Generator().manual_seed(seed)
    keys = []
    for j, size in enumerate(sizes):
        base = torch.randn(size, generator=g)
        xs = [base + 0.1 * torch.randn(size, generator=g) for _ in range(3)]
        if j == 3:
            xs = [xs[0], xs[0].clone(), xs[0].clone()]
        keys.append((f"k{j}", xs, base))
    return keys


def _run_group(keys, kw, workers=0, budget=1500):
    """(results, sizes of the batches finished by add) of a SignElectedGroup over keys; workers:
    its keys on that many threads (each op on one thread, as the engine runs it on CPU)."""
    from kernels.sign_elected import SignElectedGroup
    from kernels.threads import WorkerThreads

    pool = WorkerThreads(workers) if workers else None
    try:
        group = SignElectedGroup(3, [1, 2, 1], budget=budget, workers=pool, **kw)
        got, batches = [], []
        for key, xs, base in keys:
            done = group.add(xs, base, key=key)
            batches += [len(done)] if done else []
            got += done
        return got + group.finish(), batches
    finally:
        if pool is not None:
            pool.close()


@pytest.mark.parametrize("drop", [0.0, 0.4])
@pytest.mark.parametrize("workers", [0, 3])
def test_sign_elected_group_equals_one_key_at_a_time(drop, workers):
    """The engine's SignElectedGroup (keys added in turn, their Grams solved in one batch, combined
    after) gives each key's one-key result: a budget that splits the keys into several batches
    (the drop masks' buffer reused by the next batch), a key larger than the budget alone, and a
    key whose inputs are identical (no Gram) among them; with worker threads (each key's passes
    one item) the same bits as in the caller."""
    keys = _group_keys()
    kw = dict(strength=0.8, drop_rate=drop, seed=5, tol=1e-12, max_iter=500, eps=1e-8)
    with intra_op_threads(1):
        got, batches = _run_group(keys, kw, workers)
        if workers:
            alone = _run_group(keys, kw)[0]
            assert all(torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(got, alone))
    assert len(batches) >= 3 and [k for k, _, _ in got] == [k for k, _, _ in keys]
    for (key, xs, base), (_, out, rec) in zip(keys, got):
        ref, ref_rec = sign_elected_median(xs, base, [1, 2, 1], key=key, **kw)
        assert rel(out, ref) < 1e-6, key
        assert rec["identical"] == ref_rec["identical"] == (key == "k3" and drop == 0)  # a drop masks them apart
        assert rec.get("kept_fraction") == ref_rec.get("kept_fraction")
        assert rec["coefficients"] == pytest.approx(ref_rec["coefficients"], abs=1e-9)


def test_sign_elected_identical_inputs_and_dropout_free_defaults():
    x = torch.randn(100)
    base = torch.randn(100)
    out, rec = sign_elected_median([x, x.clone(), x.clone()], base)
    assert torch.equal(out, x) and rec["identical"]


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_tensor_methods_write_the_output_dtype_as_a_conversion_would(out_dtype):
    """out_dtype (what the engine asks for: the model's dtype) gives the compute-dtype result rounded
    once, chunk by chunk or at the end: the bits of converting the default result."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(5003, generator=g)
    for n in (3, 4):
        xs = [(base + 0.1 * torch.randn(5003, generator=g)).to(torch.bfloat16) for _ in range(n)]
        xs[1] = xs[1].float()  # mixed input dtypes: the median can be an fp32 value
        for w in (None, parse_weights("1,2" + ",3" * (n - 2), n)):
            for b, lam in ((None, 1.0), (base, 1.0), (base, 0.5)):
                kw = dict(strength=lam, chunk_elems=1000)
                want = element_median(xs, w, b, **kw).to(out_dtype)
                got = element_median(xs, w, b, out_dtype=out_dtype, **kw)
                assert got.dtype == out_dtype and torch.equal(got.float(), want.float()), (n, w, lam)
        # a midpoint whose sum would overflow fp16 (2 x 45000 > 65504): summed in the compute dtype
        big = [torch.full((7,), v) for v in (40000.0, 50000.0, 40000.0, 50000.0)[:n]]
        for w in (None, parse_weights("1,1" + ",2" * (n - 2), n)):  # n = 4: midpoints of both paths
            assert torch.equal(element_median(big, w, out_dtype=out_dtype).float(),
                               element_median(big, w).to(out_dtype).float()), (n, w)
        for p in (0.0, 0.3):
            kw = dict(drop_rate=p, seed=2, key="k", strength=0.8, chunk_elems=1000)
            want = sign_elected_median(xs, base, **kw)[0].to(out_dtype)
            got = sign_elected_median(xs, base, out_dtype=out_dtype, **kw)[0]
            assert got.dtype == out_dtype and torch.equal(got.float(), want.float()), (n, p)


@pytest.mark.parametrize("drop", [0.0, 0.4])
def test_sign_elected_keys_split_into_parts_give_the_same_bits(drop):
    """A key's passes split into items of a few chunks each (the group's part_elems), on 3 worker
    threads or in the caller: the same bits and records as one item per key; also for a key whose
    fp32 products overflow and one whose products underflow (both recomputed rescaled)."""
    keys = _group_keys(sizes=(3000, 1001, 40, 2500))
    g = torch.Generator().manual_seed(3)
    for name, scale in (("huge", 1e25), ("tiny", 1e-25)):
        base = torch.randn(1300, generator=g)
        keys.append((name, [scale * (base + 0.1 * torch.randn(1300, generator=g)) for _ in range(3)], scale * base))
    kw = dict(strength=0.8, drop_rate=drop, seed=5, chunk_elems=128)
    with intra_op_threads(1):
        want = _run_group(keys, kw, budget=1 << 20)[0]
        assert all(torch.isfinite(out).all() for _, out, _ in want)
        for part in (128, 384, 1000):
            for workers in (0, 3):
                got = _run_group(keys, {**kw, "part_elems": part}, workers, budget=1 << 20)[0]
                for (key, out, rec), (_, ref, ref_rec) in zip(got, want):
                    assert torch.equal(out, ref) and rec == ref_rec, (key, part, workers)


@pytest.mark.parametrize("workers", [0, 3])
def test_sign_elected_group_raises_the_first_bad_key(workers):
    """NaN in two keys of one batch, their passes on worker threads: the error names the first."""
    keys = _group_keys(sizes=(700, 3000, 900, 40, 4000, 64))
    for j in (1, 4):
        keys[j][1][2] = keys[j][1][2].clone()
        keys[j][1][2][5] = float("nan")
    with intra_op_threads(1), pytest.raises(MergeInputError, match="key 'k1': model_3 contains NaN"):
        _run_group(keys, dict(drop_rate=0.0, seed=0), workers, budget=1 << 20)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_element_median_in_ranges_written_into_out_gives_the_whole_key_bits(dtype):
    """The engine's split of a large key: element_median over ranges of the flat inputs, each written
    into its range of one output (out=), equals the whole key's result (equal, whole-number and
    other weights; with a base at strength 1 and 0.8; identical inputs); a wrong out is refused."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, 77, generator=g)
    xs = [(base + 0.1 * torch.randn(40, 77, generator=g)).to(dtype if dtype.itemsize > 1 else torch.float16)
          for _ in range(4)]
    cases = [(xs, w, b, lam) for w in (None, [1, 1, 1, 2], [0.3, 0.1, 0.45, 0.15])
             for b, lam in ((None, 1.0), (base, 1.0), (base, 0.8))] + [([xs[0]] * 3, None, base, 0.8)]
    for inputs, w, b, lam in cases:
        want = element_median(inputs, w, b, strength=lam, out_dtype=dtype, chunk_elems=500)
        out = torch.full(base.shape, float("nan")).to(dtype)
        flat, fo = [x.reshape(-1) for x in inputs], out.view(-1)
        for a in range(0, base.numel(), 700):
            part = element_median([f[a:a + 700] for f in flat], w, None if b is None else b.reshape(-1)[a:a + 700],
                                  strength=lam, out_dtype=dtype, chunk_elems=500, out=fo[a:a + 700])
            assert part.data_ptr() == fo[a:].data_ptr()
        assert torch.equal(out.float(), want.float()), (w, lam)
    with pytest.raises(MergeInputError, match="out is torch.float64"):
        element_median(xs, out=torch.empty(base.shape, dtype=torch.float64), out_dtype=dtype)
