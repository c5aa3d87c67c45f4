"""OT solvers: exact assignment, log-domain Sinkhorn, rounding, structured (block) solves.

POT (`import ot`, a dev dependency) is the independent reference: `ot.emd` for the exact
optimum (with a large numItermax: at n = 2560 its default stops early with a warning, checked
below) and `ot.sinkhorn(method="sinkhorn_log")` for the entropic plan.
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from kernels.errors import MergeInputError
from kernels.ot.solvers import assign_exact, round_plan, sinkhorn, solve_plain, solve_structured

ot = pytest.importorskip("ot")


def sq_cost(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    b = torch.randn(n, d, generator=g, dtype=dtype)
    return torch.cdist(a, b) ** 2


def total(c: torch.Tensor, perm: torch.Tensor) -> float:
    return float(c.gather(1, perm[:, None]).sum())


def test_exact_matches_brute_force():
    c = sq_cost(6, 3, 0)
    best = min(itertools.permutations(range(6)), key=lambda p: sum(float(c[i, j]) for i, j in enumerate(p)))
    perm = assign_exact(c)
    assert sorted(perm.tolist()) == list(range(6))
    assert total(c, perm) == pytest.approx(sum(float(c[i, j]) for i, j in enumerate(best)), rel=1e-12)


def test_exact_matches_pot_emd_at_n_2560():
    """POT's network simplex with its default numItermax (1e5) stops early at this size and says
    so in a warning; with a large limit it reaches the optimum, which the assignment matches."""
    c = sq_cost(2560, 32, 1)
    perm = assign_exact(c)
    a = np.full(2560, 1.0 / 2560)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, log = ot.emd(a, a, c.numpy(), numItermax=10 ** 8, log=True)
    assert not [w for w in caught if "numItermax" in str(w.message)], [str(w.message) for w in caught]
    assert log["warning"] is None
    assert total(c, perm) / 2560 == pytest.approx(log["cost"], rel=1e-9)


def test_sinkhorn_matches_pot_sinkhorn_log():
    c = sq_cost(40, 5, 2)
    eps = 0.05
    plan, info = sinkhorn(c, eps, tol=1e-12, max_iter=20000, scaling=False, dtype=torch.float64)
    cn = (c / c.max()).numpy()
    a = np.full(40, 1.0 / 40)
    ref = ot.sinkhorn(a, a, cn, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
    assert info["marginal_error"] < 1e-10
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-9 / 40)
    # and with eps-scaling on the way down, the same fixed point
    plan2, _ = sinkhorn(c, eps, tol=1e-12, max_iter=20000, dtype=torch.float64)
    np.testing.assert_allclose(plan2.numpy(), ref, atol=1e-8 / 40)


def test_sinkhorn_approaches_exact_as_eps_shrinks():
    c = sq_cost(64, 8, 3)
    opt = total(c, assign_exact(c))
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        plan, info = sinkhorn(c, eps, max_iter=20000)
        gaps.append(float((plan * c).sum()) * 64 - opt)  # plan has mass 1: n * <P, C> vs Σ C[i, perm i]
        assert plan.dtype == (torch.float64 if eps < 0.01 else torch.float32)
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-6 * opt
    assert gaps[2] < gaps[1] / 3 and gaps[2] < 2e-3 * opt
    assert total(c, round_plan(plan)) == pytest.approx(opt, rel=1e-9)


def test_sinkhorn_recovers_permutation_large_n_without_underflow():
    """cost/eps reaches 1000: plain-domain Sinkhorn underflows there, the log domain does not."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(500, 20, generator=g, dtype=torch.float64)
    p = torch.randperm(500, generator=g)
    c = torch.cdist(a, a[p]) ** 2
    plan, info = sinkhorn(c, 1e-3)
    assert torch.isfinite(plan).all() and info["marginal_error"] < 1e-5
    assert torch.equal(round_plan(plan), torch.argsort(p))


def test_sinkhorn_batched_and_checks_eps():
    c = torch.stack([sq_cost(10, 3, s) for s in range(4)])
    plans, info = sinkhorn(c, 5e-2, tol=1e-12, max_iter=20000, dtype=torch.float64)
    assert plans.shape == (4, 10, 10)
    for b in range(4):
        single, _ = sinkhorn(c[b], 5e-2, tol=1e-12, max_iter=20000, dtype=torch.float64)
        torch.testing.assert_close(plans[b], single, atol=1e-12, rtol=1e-9)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(MergeInputError, match="epsilon"):
            sinkhorn(c, bad)


def test_round_plan_always_gives_a_permutation():
    flat = torch.full((5, 5), 1 / 25)  # argmax would pick column 0 everywhere
    perm = round_plan(flat)
    assert sorted(perm.tolist()) == list(range(5))


def test_soft_map_rows_sum_to_one():
    c = sq_cost(16, 4, 5)
    m, info = solve_plain(c, "sinkhorn", 0.05, soft=True)
    assert m.shape == (16, 16)
    torch.testing.assert_close(m.sum(1), torch.ones(16), atol=1e-4, rtol=0)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_structured_solve_recovers_block_permutation(solver):
    """Heads-like group: 4 blocks of 6, two parts sharing the block map but not the within maps."""
    g = torch.Generator().manual_seed(6)
    blocks, bs = 4, 6
    n = blocks * bs
    bperm = torch.randperm(blocks, generator=g)
    truth = {}
    costs = {}
    for part in ("qk", "vo"):
        within = torch.stack([torch.randperm(bs, generator=g) for _ in range(blocks)])
        perm = (bperm[:, None] * bs + within).reshape(n)
        a = torch.randn(n, 12, generator=g, dtype=torch.float64)
        b = torch.empty_like(a)
        b[perm] = a + 0.01 * torch.randn(n, 12, generator=g, dtype=torch.float64)  # b[perm[i]] ~ a[i]
        truth[part] = perm
        costs[part] = torch.cdist(a, b) ** 2
    maps, info = solve_structured(costs, blocks, solver, 1e-3, soft=False)
    for part in truth:
        assert torch.equal(maps[part].cpu(), truth[part]), part
    # a block-structured map: every block goes to one block
    for part in maps:
        assert ((maps[part].reshape(blocks, bs) // bs) == bperm[:, None]).all()


def test_structured_exact_is_optimal_over_block_maps():
    """Brute force over all block-structured permutations of a tiny 2x2 group."""
    c = {"": sq_cost(4, 2, 7)}
    maps, _ = solve_structured(c, 2, "exact", 1e-3, soft=False)
    best = float("inf")
    for bp in itertools.permutations(range(2)):
        for w0 in itertools.permutations(range(2)):
            for w1 in itertools.permutations(range(2)):
                perm = torch.tensor([bp[0] * 2 + w0[0], bp[0] * 2 + w0[1], bp[1] * 2 + w1[0], bp[1] * 2 + w1[1]])
                best = min(best, total(c[""], perm))
    assert total(c[""], maps[""]) == pytest.approx(best, rel=1e-12)
