"""The opt-in fused CPU Gram kernels (BARYCENTER_CPU_KERNELS=fused) against the eager kernel."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

import kernels
from kernels import GramPass, MergeInputError, fused, gram_matrix
from kernels.threads import intra_op_threads

from tests.kernels.conftest import IN_CI

# sizes: a multiple of the sub-block, one with a tail, one just over the fused threshold
SIZES = (64 * 1024, 300_001, fused.MIN_BLOCKS * fused.SUB_BLOCK + 5)


def _models(n, dtype, size, seed=0, spread=3e-3):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(size, generator=g) * 0.05
    return [(ref + spread * torch.randn(size, generator=g)).to(dtype) for _ in range(n)]


def _gram(mode, monkeypatch, *args, **kw):
    monkeypatch.setenv(fused.ENV, mode)
    return gram_matrix(*args, **kw)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture
def fused_on(monkeypatch):
    """Fused kernels on; they must compile here (CI fails, a laptop without a compiler skips)."""
    monkeypatch.setenv(fused.ENV, "fused")
    gram_matrix(_models(2, torch.float32, SIZES[0]))
    if fused.failure():
        if IN_CI:
            pytest.fail(f"fused kernels do not compile in CI: {fused.failure()}")
        pytest.skip(f"fused kernels do not compile here: {fused.failure()}")
    return monkeypatch


@pytest.mark.parametrize("n,dtype", [(2, torch.float32), (3, torch.float16), (4, torch.bfloat16)])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("full", [True, False])
def test_fused_gram_equals_eager(fused_on, n, dtype, size, full):
    xs = _models(n, dtype, size, seed=n)
    base = _models(1, dtype, size, seed=99)[0] if not full else None  # the base cancels for full=False
    got = _gram("fused", fused_on, xs, base, full=full)
    ref = _gram("eager", fused_on, xs, base, full=full)
    assert _rel(got[1:, 1:], ref[1:, 1:]) < 1e-6
    assert _rel(got, ref) < 1e-6
    if not full:
        assert torch.equal(got[0], ref[0]), "the full=False marker row"


def test_fused_deterministic_across_calls_and_workers(fused_on):
    keys = [_models(3, torch.float16, s, seed=s) for s in SIZES * 2]

    def run(workers):
        gp = GramPass(len(keys), full=True, workers=workers)
        for j, xs in enumerate(keys):
            gp.add(j, xs, None, f"k{j}")
        return gp.result()

    one = run(1)
    assert torch.equal(one, run(1))
    assert torch.equal(one, run(2))
    for count in (1, 2, 3):  # the engine runs the compiled loops on the host's threads: any count, same bits
        with fused.loop_threads(count):
            assert torch.equal(one, run(1)), f"{count} intra-op threads"


def test_loop_threads_applies_to_the_compiled_loop_only(fused_on):
    xs = _models(3, torch.float32, SIZES[0])
    gram_matrix(xs, full=False)  # compiled
    seen = []
    inner = fused._compiled[(3, False)]

    def spy(*views):
        seen.append(torch.get_num_threads())
        return inner(*views)

    fused_on.setitem(fused._compiled, (3, False), spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with fused.loop_threads(3):
            gram_matrix(xs, full=False)
            assert torch.get_num_threads() == 1, "the count around the loop is restored"
        gram_matrix(xs, full=False)  # no loop_threads: the caller's count
    finally:
        torch.set_num_threads(threads)
    assert seen == [3, 1]


def test_fused_identical_inputs_exact_and_gm_returns_them(fused_on):
    x = _models(1, torch.float16, SIZES[1])[0]
    g = gram_matrix([x, x, x], full=False)
    assert bool((g[1:, 1:] == 0).all())
    sol = kernels.solve("geometric_median", g[None], None)
    y = kernels.combine([x, x, x], sol.coeffs[0].tolist(), dtype=x.dtype)
    assert torch.equal(y, x)


def test_fused_nan_names_model_and_key(fused_on):
    xs = _models(3, torch.float16, SIZES[0])
    xs[1] = xs[1].clone()
    xs[1][12345] = float("nan")
    with pytest.raises(MergeInputError, match=r"key 'down.0': model_2 contains NaN"):
        gram_matrix(xs, key="down.0")


@pytest.mark.parametrize("method", ["geometric_median", "karcher"])
def test_fused_solutions_equal_eager(fused_on, method):
    keys = [_models(3, torch.float16, s, seed=s) for s in SIZES]
    full = method == "karcher"
    got = torch.stack([_gram("fused", fused_on, xs, full=full) for xs in keys])
    ref = torch.stack([_gram("eager", fused_on, xs, full=full) for xs in keys])
    a = kernels.solve(method, got, None).coeffs
    b = kernels.solve(method, ref, None).coeffs
    assert float((a - b).abs().max()) < 1e-6


def test_not_applicable_inputs_take_the_eager_kernel(fused_on):
    size = SIZES[0]
    five = _models(5, torch.float16, size)
    mixed = [five[0], five[1].float(), five[2]]
    base = _models(1, torch.float16, size, seed=7)[0]
    cases = [(five, None, True), (mixed, None, True), (five[:3], base, True)]
    if hasattr(torch, "float8_e4m3fn"):
        cases.append(([x.to(torch.float8_e4m3fn) for x in five[:3]], None, True))
    for xs, b, full in cases:
        assert torch.equal(_gram("fused", fused_on, xs, b, full=full), _gram("eager", fused_on, xs, b, full=full))


def _without_a_compiler(monkeypatch):
    """A fresh fused module state whose every compile fails, as on a machine without a C++ compiler."""
    def no_compiler(*a, **k):
        raise RuntimeError("no C++ compiler found")

    for name, value in (("_compiled", {}), ("_ready", set()), ("_failed", [])):
        monkeypatch.setattr(fused, name, value)
    monkeypatch.setattr(fused.torch, "compile", no_compiler)


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    _without_a_compiler(monkeypatch)
    xs = _models(3, torch.float16, SIZES[1])
    ref = _gram("eager", monkeypatch, xs)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        first = _gram("fused", monkeypatch, xs)
        second = _gram("fused", monkeypatch, xs)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert "no C++ compiler found" in fused.status() and fused.status().startswith("eager")
    assert sum("no C++ compiler found" in r.getMessage() for r in caplog.records) == 1


def test_off_by_default(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    assert not fused.enabled() and fused.status() == "eager"


def test_the_fused_kernels_are_suggested_once_when_the_choice_is_unset(monkeypatch, caplog):
    monkeypatch.setattr(fused, "_suggested", [])
    with caplog.at_level(logging.INFO, logger=fused.__name__):
        monkeypatch.setenv(fused.ENV, "eager")
        fused.suggest_once(3)  # chosen: no advice
        monkeypatch.delenv(fused.ENV)
        fused.suggest_once(fused.MAX_INPUTS + 1)  # too many inputs for them
        assert not caplog.records
        for n in (2, 3, 4):
            fused.suggest_once(n)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert f"{fused.ENV}=fused" in caplog.records[0].getMessage()


def test_warm_up_compiles_every_variant_so_merges_do_not(fused_on):
    from torch._dynamo.utils import counters

    ready = fused.warm_up([torch.float32])
    want = [(n, full, torch.float32) for n in range(2, fused.MAX_INPUTS + 1) for full in (False, True)]
    assert sorted(ready, key=str) == sorted(want, key=str)
    graphs = counters["stats"]["unique_graphs"]
    for n in range(2, fused.MAX_INPUTS + 1):  # new sizes, both kinds: nothing compiles any more
        for size in SIZES:
            xs = _models(n, torch.float32, size, seed=size)
            for full in (False, True):
                assert _rel(_gram("fused", fused_on, xs, full=full), _gram("eager", fused_on, xs, full=full)) < 1e-6
    assert counters["stats"]["unique_graphs"] == graphs, "a merge compiled after the warm-up"


def test_warm_up_leaves_the_thread_count_alone(fused_on):
    calls = []
    fused_on.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    fused_on.setattr(fused, "_ready", set())  # every variant runs again through the compile path
    fused.warm_up([torch.float32])
    assert calls == [], "the warm-up changed the process-wide intra-op thread count"


def test_warm_up_does_nothing_when_off_and_stops_when_compiling_fails(monkeypatch, caplog):
    for name, value in (("_compiled", {}), ("_ready", set()), ("_failed", [])):
        monkeypatch.setattr(fused, name, value)
    monkeypatch.setenv(fused.ENV, "eager")
    assert fused.warm_up([torch.float32]) == [] and fused._compiled == {}
    attempts = []

    def no_compiler(*a, **k):
        attempts.append(a)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused.torch, "compile", no_compiler)
    monkeypatch.setenv(fused.ENV, "fused")
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert fused.warm_up([torch.float32, torch.float16]) == []
    assert len(attempts) == 1, "tried to compile again after the first failure"
    assert fused.status().startswith("eager") and "no C++ compiler found" in fused.status()
    assert sum("no C++ compiler found" in r.getMessage() for r in caplog.records) == 1


# --- the sign-elected median's fused loops (sign_elected.py) -----------------------------------

def _sign_elected(mode, monkeypatch, xs, base, weights=None, **kw):
    monkeypatch.setenv(fused.ENV, mode)
    return kernels.sign_elected_median(xs, base, weights, key="k", tol=1e-10, max_iter=200,
                                       out_dtype=xs[0].dtype, **kw)


def _task_vectors(n, dtype, size, seed):
    """A base and n fine-tunes of it whose task vectors disagree in sign on many entries."""
    base = _models(1, dtype, size, seed=seed + 100)[0]
    return [(base.float() + 3e-3 * t).to(dtype) for t in _models(n, torch.float32, size, seed=seed, spread=1.0)], base


@pytest.mark.parametrize("n,dtype", [(2, torch.float32), (3, torch.float32), (3, torch.float16),
                                     (4, torch.bfloat16)])
@pytest.mark.parametrize("size", SIZES)
def test_fused_sign_elected_equals_eager(fused_on, n, dtype, size):
    xs, base = _task_vectors(n, dtype, size, seed=n)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0][:n])
    got, rec = _sign_elected("fused", fused_on, xs, base, w)
    assert ("sign_elected", "elect", n, False, dtype) in fused._ready
    assert ("sign_elected", "combine", n, False, dtype) in fused._ready
    ref, ref_rec = _sign_elected("eager", fused_on, xs, base, w)
    assert got.dtype == dtype
    # rounding only: fp32 sums in another order, fused multiply-adds, and an elected sign that
    # flips within the tie margin (2^-18 of the entry's weighted magnitude) moves its entry by as little
    tau = max(float((x.float() - base.float()).abs().max()) for x in xs)
    err = (got.float() - ref.float()).abs()
    ulp = torch.finfo(dtype).eps * ref.float().abs()
    assert bool((err <= 2 * ulp + 1e-5 * tau).all()), float(err.max())
    assert max(abs(a - b) for a, b in zip(rec["coefficients"], ref_rec["coefficients"])) < 1e-6
    assert max(abs(a - b) for a, b in zip(rec["kept_fraction"], ref_rec["kept_fraction"])) <= 1e-4
    assert 0.3 < min(rec["kept_fraction"]) < 0.9, "the signs must disagree for the election to matter"


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_fused_sign_elected_bits_do_not_depend_on_threads_or_call_size(fused_on, drop):
    # 40 sub-blocks and a tail: calls of 16, 16 and 8 sub-blocks against one call of 40
    xs, base = _task_vectors(3, torch.float16, 40 * fused.SUB_BLOCK + 77, seed=5)
    one, rec = _sign_elected("fused", fused_on, xs, base, drop_rate=drop)
    for count in (1, 2, 3):
        with intra_op_threads(count):
            again, rec2 = _sign_elected("fused", fused_on, xs, base, drop_rate=drop)
        assert torch.equal(one, again) and rec2 == rec, f"{count} intra-op threads"
    se = sys.modules[kernels.sign_elected_median.__module__]
    fused_on.setattr(se, "FUSED_BLOCKS", 16)  # with a drop also masks hashed in other pieces
    again, rec2 = _sign_elected("fused", fused_on, xs, base, drop_rate=drop)
    assert torch.equal(one, again) and rec2 == rec, "calls of 16 sub-blocks"


def test_fused_sign_elected_nan_names_model_and_key(fused_on):
    xs, base = _task_vectors(3, torch.float32, SIZES[0], seed=1)
    xs[2] = xs[2].clone()
    xs[2][4321] = float("inf")
    with pytest.raises(MergeInputError, match=r"key 'k': model_3 contains Inf"):
        _sign_elected("fused", fused_on, xs, base)


def test_fused_sign_elected_overflow_recomputes_eagerly(fused_on):
    """fp32 task vectors whose products overflow in the fused loop: the key is recomputed rescaled,
    all eagerly, giving the eager kernel's bits and kept fractions (the loop's counts dropped)."""
    xs, base = _task_vectors(3, torch.float32, SIZES[0], seed=6)
    xs, base = [1e25 * x for x in xs], 1e25 * base
    got, rec = _sign_elected("fused", fused_on, xs, base)
    assert ("sign_elected", "elect", 3, False, torch.float32) in fused._ready
    ref, ref_rec = _sign_elected("eager", fused_on, xs, base)
    assert torch.isfinite(ref).all() and torch.equal(got, ref) and rec == ref_rec


def test_fused_sign_elected_with_a_drop_equals_eager(fused_on):
    xs, base = _task_vectors(3, torch.float16, SIZES[1], seed=4)
    got, rec = _sign_elected("fused", fused_on, xs, base, drop_rate=0.3, seed=1)
    assert ("sign_elected", "elect", 3, True, torch.float16) in fused._ready
    assert ("sign_elected", "combine", 3, True, torch.float16) in fused._ready
    ref, ref_rec = _sign_elected("eager", fused_on, xs, base, drop_rate=0.3, seed=1)
    tau = max(float((x.float() - base.float()).abs().max()) for x in xs) / 0.7
    err = (got.float() - ref.float()).abs()
    assert bool((err <= 2 * torch.finfo(torch.float16).eps * ref.float().abs() + 1e-5 * tau).all()), float(err.max())
    assert max(abs(a - b) for a, b in zip(rec["coefficients"], ref_rec["coefficients"])) < 1e-6
    # the same masks: with the drop, kept fractions move from ~0.6 to ~0.4; equal here but for a tie flip
    assert max(abs(a - b) for a, b in zip(rec["kept_fraction"], ref_rec["kept_fraction"])) <= 1e-4
    assert max(rec["kept_fraction"]) < 0.8 * min(_sign_elected("fused", fused_on, xs, base)[1]["kept_fraction"])


def test_sign_elected_with_five_inputs_or_unkept_masks_is_eager(fused_on):
    xs, base = _task_vectors(5, torch.float16, SIZES[0], seed=2)
    got, _ = _sign_elected("fused", fused_on, xs, base)
    ref, _ = _sign_elected("eager", fused_on, xs, base)
    assert torch.equal(got, ref)
    se = sys.modules[kernels.sign_elected_median.__module__]
    fused_on.setattr(se, "KEPT_MASK_BYTES", 1024)  # masks too large to keep: hashed in each pass, eager
    got, _ = _sign_elected("fused", fused_on, xs[:3], base, drop_rate=0.3, seed=1)
    ref, _ = _sign_elected("eager", fused_on, xs[:3], base, drop_rate=0.3, seed=1)
    assert torch.equal(got, ref)
    fused_on.setenv(fused.ENV, "fused")
    assert fused.status(5) != "fused" and fused.status(3) == "fused"


def test_sign_elected_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    _without_a_compiler(monkeypatch)
    xs, base = _task_vectors(3, torch.float16, SIZES[1], seed=3)
    ref, ref_rec = _sign_elected("eager", monkeypatch, xs, base)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        got, rec = _sign_elected("fused", monkeypatch, xs, base)
    assert torch.equal(got, ref) and rec == ref_rec
    assert sum("no C++ compiler found" in r.getMessage() for r in caplog.records) == 1
