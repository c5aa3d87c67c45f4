"""Assignment and optimal-transport solvers for OT fusion.

- ``assign_exact``: exact linear assignment (scipy's ``linear_sum_assignment``, CPU, fp64).
- ``sinkhorn``: entropic OT in the log domain, batched, on any torch device. The cost is divided
  by its maximum (per problem) so ε is relative to the cost scale; ε-scaling from 1 down to ε;
  stops on the L1 error of the row marginal (columns are exact after each update), checked every
  ``check_every`` iterations (the only host syncs); fp64 when ε < 0.01 (fp32 loses the
  potentials' precision there; plain-domain Sinkhorn would underflow once cost/ε > ~88).
- ``round_plan``: a hard permutation from a plan (row argmax when that is already a permutation,
  else an assignment that maximises the transported mass).
- ``solve_structured``: the block solve used for GroupNorm groups and attention heads: assign
  inside every (anchor block, model block) pair, for every part (Q/K and V/O for heads), then
  assign the blocks on the summed within-block costs. Hard block maps; within-block maps hard or
  soft (T̃ = n·T).

A hard map is a LongTensor ``perm`` (aligned[i] = model[perm[i]]); a soft map is a float matrix
``M`` (n×n, rows sum to 1: aligned = M @ model).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import MergeInputError

SOLVERS = ("exact", "sinkhorn")


def assign_exact(cost: torch.Tensor) -> torch.Tensor:
    """Permutation minimising Σ_i cost[i, perm[i]] (square cost): scipy's linear_sum_assignment
    (shortest augmenting paths, fp64, CPU). Returns a CPU LongTensor.

    (scipy's sparse Jonker-Volgenant, min_weight_full_bipartite_matching, was ~1.5x faster on
    random 5120x5120 costs but stalled for many minutes on a real-shape SDXL GEGLU group, so it
    is not used.)"""
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise MergeInputError("OT fusion: the cost matrix has NaN/inf entries (NaN weights in a model?)")
    rows, cols = linear_sum_assignment(c)
    perm = np.empty(c.shape[0], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that never produces subnormal floats (they are ~100x slower on CPUs): terms
    below exp(-floor) of the largest are clamped there, a relative change < n·1e-26."""
    floor = -50.0 if x.dtype == torch.float32 else -300.0
    m = x.amax(dim=dim, keepdim=True)
    return (x - m).clamp_min_(floor).exp_().sum(dim).log_() + m.squeeze(dim)


def _stages(epsilon: float, factor: float = 0.25) -> list:
    out = []
    e = 1.0
    while e > epsilon * (1 + 1e-9):
        out.append(e)
        e *= factor
    out.append(epsilon)
    return out


def sinkhorn(cost: torch.Tensor, epsilon: float, *, tol: float = 1e-5, max_iter: int = 2000,
             check_every: int = 10, scaling: bool = True, normalize: bool = True, dtype=None):
    """Entropic OT between uniform marginals for a (n, n) or batched (B, n, m) cost.

    Returns (plan, info): plan has the cost's shape, rows sum to 1/n (total mass 1 per problem);
    info = {"iterations": int, "marginal_error": float, "epsilon": float}.
    dtype: None = fp64 when epsilon < 0.01, else fp32.
    """
    if not (epsilon > 0) or not math.isfinite(epsilon):
        raise MergeInputError(f"OT fusion: epsilon must be > 0, got {epsilon}")
    single = cost.dim() == 2
    c = cost[None] if single else cost
    if dtype is None:
        dtype = torch.float64 if epsilon < 0.01 else torch.float32
    c = c.to(dtype)
    if not torch.isfinite(c).all():
        raise MergeInputError("OT fusion: the cost matrix has NaN/inf entries (NaN weights in a model?)")
    bsz, n, m = c.shape
    if normalize:
        scale = c.flatten(1).amax(1).clamp_min(torch.finfo(dtype).tiny)
        c = c / scale[:, None, None]
    else:
        scale = torch.ones(bsz, dtype=dtype, device=c.device)
    log_a = -math.log(n)
    log_b = -math.log(m)
    f = torch.zeros(bsz, n, dtype=dtype, device=c.device)
    g = torch.zeros(bsz, m, dtype=dtype, device=c.device)
    total_iters = 0
    err = float("inf")
    stages = _stages(epsilon) if scaling else [epsilon]
    for si, eps in enumerate(stages):
        last = si == len(stages) - 1
        stage_tol = tol if last else max(tol, 1e-2)
        stage_max = max_iter if last else max(check_every, max_iter // 10)
        it = 0
        while it < stage_max:
            for _ in range(check_every):
                f = eps * (log_a - _lse((g[:, None, :] - c) / eps, dim=2))
                g = eps * (log_b - _lse((f[:, :, None] - c) / eps, dim=1))
            it += check_every
            row = _lse((f[:, :, None] + g[:, None, :] - c) / eps, dim=2).exp()
            err = float((row - 1.0 / n).abs().sum(1).max())  # one host sync per check_every iterations
            if err < stage_tol:
                break
        total_iters += it
    plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / epsilon)
    info = {"iterations": int(total_iters), "marginal_error": float(err), "epsilon": float(epsilon)}
    return (plan[0] if single else plan), info


def round_plan(plan: torch.Tensor) -> torch.Tensor:
    """Hard permutation(s) from plan(s) (n, n) or (B, n, n); result on the plan's device."""
    single = plan.dim() == 2
    p = plan[None] if single else plan
    perm = p.argmax(dim=2)
    n = p.shape[1]
    counts = torch.zeros_like(perm).scatter_add_(1, perm, torch.ones_like(perm))
    bad = (counts != 1).any(dim=1)
    if bool(bad.any()):
        for b in torch.nonzero(bad).flatten().tolist():
            perm[b] = assign_exact(-p[b].to(torch.float64)).to(perm.device)
    assert perm.shape[1] == n
    return perm[0] if single else perm


def perm_cost(cost: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return cost.gather(-1, perm.to(cost.device).unsqueeze(-1)).squeeze(-1).sum(-1)


def solve_plain(cost: torch.Tensor, solver: str, epsilon: float, soft: bool, **sk):
    """One unstructured group: returns (map, info)."""
    n = cost.shape[0]
    if solver == "exact":
        perm = assign_exact(cost).to(cost.device)
        if soft:
            return torch.eye(n, dtype=torch.float32, device=cost.device)[perm], {"iterations": None, "marginal_error": 0.0}
        return perm, {"iterations": None, "marginal_error": 0.0}
    plan, info = sinkhorn(cost, epsilon, **sk)
    if soft:
        return (plan * n).to(torch.float32), info
    return round_plan(plan), info


def solve_structured(costs: dict, blocks: int, solver: str, epsilon: float, soft: bool, **sk):
    """Block-structured group. `costs`: part -> (n, n) cost; returns ({part: map}, info).

    Within-block problems for every (anchor block a, model block b) pair and every part are
    solved first; the block assignment then minimises Σ_parts within-cost(a, b)."""
    parts = list(costs)
    n = costs[parts[0]].shape[0]
    bs = n // blocks
    dev = costs[parts[0]].device
    # (parts, blocks_a, blocks_b, bs, bs)
    cb = torch.stack([costs[p].reshape(blocks, bs, blocks, bs).permute(0, 2, 1, 3) for p in parts])
    info = {"iterations": None, "marginal_error": 0.0}
    if solver == "exact":
        c64 = cb.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(c64).all():
            raise MergeInputError("OT fusion: the cost matrix has NaN/inf entries (NaN weights in a model?)")
        within = np.empty((len(parts), blocks, blocks, bs), dtype=np.int64)
        value = np.zeros((blocks, blocks))
        for pi in range(len(parts)):
            for a in range(blocks):
                for b in range(blocks):
                    r, cidx = linear_sum_assignment(c64[pi, a, b])
                    within[pi, a, b, r] = cidx
                    value[a, b] += c64[pi, a, b, r, cidx].sum()
        r, bperm = linear_sum_assignment(value)
        block_perm = torch.from_numpy(bperm.astype(np.int64))
        within_t = torch.from_numpy(within)
        soft_within = None
    else:
        # 1) every (anchor block, model block) pair, capped: only their values are needed to
        #    rank block pairs; 2) block assignment; 3) the chosen pairs again, to tolerance.
        flat = cb.reshape(-1, bs, bs)
        rough = dict(sk, tol=max(sk.get("tol", 1e-5), 1e-3), max_iter=min(sk.get("max_iter", 2000), 200))
        plans, i1 = sinkhorn(flat, epsilon, **rough)
        value = (plans * flat.to(plans.dtype)).sum((1, 2)).reshape(len(parts), blocks, blocks).sum(0)
        del plans
        bplan, i2 = sinkhorn(value, epsilon, **sk)
        block_perm = round_plan(bplan).cpu()
        ar = torch.arange(blocks)
        chosen = cb[:, ar.to(dev), block_perm.to(dev)].reshape(-1, bs, bs)  # (parts*blocks, bs, bs)
        plans, i3 = sinkhorn(chosen, epsilon, **sk)
        info = {"iterations": i1["iterations"] + i2["iterations"] + i3["iterations"],
                "marginal_error": max(i2["marginal_error"], i3["marginal_error"])}
        plans = plans.reshape(len(parts), blocks, bs, bs)
        if soft:
            soft_within = plans
            within_t = None
        else:
            within_t = round_plan(plans.reshape(-1, bs, bs)).reshape(len(parts), blocks, bs).cpu()
            soft_within = None
    out = {}
    ar = torch.arange(blocks)
    for pi, p in enumerate(parts):
        if soft_within is None:
            # within map of anchor block a -> model block π(a)
            w = within_t[pi, ar, block_perm] if within_t.dim() == 4 else within_t[pi]
            perm = (block_perm[:, None] * bs + w).reshape(n)
            if soft:
                out[p] = torch.eye(n, dtype=torch.float32, device=dev)[perm.to(dev)]
            else:
                out[p] = perm.to(dev)
        else:
            mat = torch.zeros(n, n, dtype=torch.float32, device=dev)
            for a in range(blocks):
                b = int(block_perm[a])
                mat[a * bs:(a + 1) * bs, b * bs:(b + 1) * bs] = (soft_within[pi, a] * bs).to(torch.float32)
            out[p] = mat
    return out, info
