"""OT fusion of N models: align every model to an anchor group by group, then take a barycenter.

    merged, report = ot_fuse(read, shapes, n_models, weights=None, anchor=0, solver="exact",
                             epsilon=1e-3, rounds=1, barycenter="mean", soft=False,
                             device="cpu", out_dtype=None, progress=None)

``read(i, key)`` returns model i's (effective) weight for `key` on any device/dtype; it is called
several times per key (once per group that touches the key while solving, once for the output),
so it should be cheap or cached by the caller. Nothing model-sized is held: maps are solved group
by group from the tensors of that group only, and the output is produced key by key (gather the
aligned rows/columns of each model's tensor, barycenter, cast). Peak memory is a few tensors of one
group plus the maps (hard maps: n integers per group and model; soft maps: n×n floats).

Alignment (Singh & Jaggi 2020, weight matching as in git re-basin): for group g and model m,
C[i, j] = Σ_slices ‖A_s[i] − B_s[j]‖² where A is the anchor and B model m with the maps of all
other groups already applied; the map minimises Σ_i C[i, map(i)] (exact assignment, or entropic OT
then rounding); GroupNorm groups and attention heads are solved inside blocks, then over blocks
(solvers.solve_structured). ``rounds`` > 1 repeats the sweep (coordinate descent over groups).

The report (JSON-serialisable) has, per group and model: identity fraction (share of units the
map leaves in place; for soft maps the mass on the diagonal), cost before (identity map) and
after (chosen map), solver iterations (null for the exact solver) and final marginal error; per
model: size-weighted identity fraction and the squared distance to the anchor over all keys,
before and after alignment.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import torch

from ..combine import combine
from ..errors import MergeInputError
from ..geometric_median import solve_geometric_median
from ..gram import gram_matrix
from ..inputs import parse_weights
from ..karcher import solve_karcher
from .maps import apply_key
from .solvers import SOLVERS, solve_plain, solve_structured
from .spec import Spec, build_spec

BARYCENTERS = ("mean", "geometric_median", "karcher")


def _label(i: int) -> str:
    return f"model_{i + 1}"


def _check_shapes(shapes, n_models: int) -> dict:
    if isinstance(shapes, Mapping):
        return {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    shapes = list(shapes)
    if len(shapes) != n_models:
        raise MergeInputError(f"OT fusion: got {len(shapes)} shape tables for {n_models} models")
    ref = {k: tuple(int(d) for d in v) for k, v in shapes[0].items()}
    for i, other in enumerate(shapes[1:], start=1):
        o = {k: tuple(int(d) for d in v) for k, v in other.items()}
        missing = sorted(set(ref) - set(o))
        extra = sorted(set(o) - set(ref))
        if missing or extra:
            what = (f"lacks {missing[0]}" if missing else f"has extra key {extra[0]}")
            raise MergeInputError(
                f"OT fusion: {_label(i)} has a different architecture from model_1 ({what}; "
                f"{len(missing)} missing, {len(extra)} extra keys)")
        for k in ref:
            if ref[k] != o[k]:
                raise MergeInputError(
                    f"OT fusion: {_label(i)} has a different architecture from model_1: {k} is "
                    f"{list(o[k])} there and {list(ref[k])} in model_1")
    return ref


def _check_weights(weights, n_models: int) -> list:
    # None / "" / [] = equal; comma text or numbers; refused: wrong count, negative, NaN, all 0
    return [float(x) for x in parse_weights(weights, n_models).tolist()]


def _coefficients(grams: torch.Tensor, w: list, method: str, params: dict) -> torch.Tensor:
    """(K, N) barycenter coefficients from the aligned tensors' Grams (the pack's kernels, batched
    over keys: one solve for every key at once, on N×N numbers per key)."""
    solver = solve_geometric_median if method == "geometric_median" else solve_karcher
    sol = solver(grams, torch.tensor(w, dtype=torch.float64, device=grams.device), **params)
    return sol.coeffs


class _Reader:
    """read(i, key) as fp32 on the compute device, with the shape checked against the table."""

    def __init__(self, read, shapes, device):
        self.read, self.shapes, self.device = read, shapes, device

    def __call__(self, i: int, key: str) -> torch.Tensor:
        return self.raw(i, key).to(device=self.device, dtype=torch.float32)

    def raw(self, i: int, key: str) -> torch.Tensor:
        t = self.read(i, key)
        if not isinstance(t, torch.Tensor):
            raise MergeInputError(f"OT fusion: {_label(i)} returned no tensor for {key}")
        if tuple(t.shape) != self.shapes[key]:
            raise MergeInputError(
                f"OT fusion: {_label(i)} has a different architecture from the others: {key} is "
                f"{list(t.shape)}, expected {list(self.shapes[key])}")
        return t


def _rows(t: torch.Tensor, axis: int, offset: int, n: int) -> torch.Tensor:
    return t.narrow(axis, offset, n).movedim(axis, 0).reshape(n, -1)


def _is_identity(mp: torch.Tensor) -> bool:
    if mp.dim() == 1:
        return bool((mp == torch.arange(mp.numel(), device=mp.device)).all())
    return bool(torch.equal(mp, torch.eye(mp.shape[0], dtype=mp.dtype, device=mp.device)))


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b).double() ** 2)


def _solve_group(gi, group, spec, ka, reader, anchor, models, maps, solver, epsilon, soft,
                 sk, cost_dtype, device, solved):
    """Solve group `gi` for every non-anchor model; returns {label: stats}.

    Maps that come out as the identity are stored as None (nothing to gather later)."""
    n = group.size
    anchor_cache: dict = {}

    def anchor_t(key):
        if key not in anchor_cache:
            anchor_cache[key] = reader(anchor, key)
        return anchor_cache[key]

    stats = {}
    for m in models:
        mcache: dict = {}

        def model_t(key):
            if key not in mcache:
                mcache[key] = apply_key(reader(m, key), ka[key], maps[m], spec.groups, skip_group=gi)
            return mcache[key]

        costs = {}
        for part, slices in group.parts:
            # first sweep: only slices whose other axes are fixed or already aligned (the
            # sequential order of Singh & Jaggi); unaligned axes would add noise, not signal
            ready = [s for s in slices if all(e[2] == gi or e[2] in solved for e in ka[s.key])]
            if ready:
                slices = ready
            sim = torch.zeros(n, n, dtype=cost_dtype, device=device)
            na = torch.zeros(n, dtype=torch.float32, device=device)
            nb = torch.zeros(n, dtype=torch.float32, device=device)
            for s in slices:
                a = _rows(anchor_t(s.key), s.axis, s.offset, n)
                b = _rows(model_t(s.key), s.axis, s.offset, n)
                sim.addmm_(a.to(cost_dtype), b.to(cost_dtype).T)
                na += a.square().sum(1)
                nb += b.square().sum(1)
            # ‖a_i - b_j‖² = ‖a_i‖² + ‖b_j‖² - 2<a_i, b_j>; rows/cols shifts do not move the optimum
            sim = sim.to(torch.float32).mul_(-2.0)
            sim += na[:, None]
            sim += nb[None, :]
            costs[part] = sim.clamp_min_(0.0)
        if group.blocks == 1 and len(costs) == 1:
            mp, info = solve_plain(costs[group.part_names[0]], solver, epsilon, soft, **sk)
            new = {p: mp for p in group.part_names}
        else:
            new, info = solve_structured(costs, group.blocks, solver, epsilon, soft, **sk)
        del costs
        # cost of the identity and of the chosen map, computed directly on all of the group's slices
        before = after = ident = 0.0
        for part, slices in group.parts:
            mp = new[part]
            same = _is_identity(mp)
            if mp.dim() == 1:
                ident += float((mp == torch.arange(n, device=mp.device)).double().mean())
            else:
                ident += float(torch.diagonal(mp).double().sum()) / n
            for s in slices:
                a = _rows(anchor_t(s.key), s.axis, s.offset, n)
                b = _rows(model_t(s.key), s.axis, s.offset, n)
                d0 = _sqdist(a, b)
                before += d0
                if same:
                    after += d0
                else:
                    b = b.index_select(0, mp.to(b.device)) if mp.dim() == 1 else mp.to(b.device) @ b
                    after += _sqdist(a, b)
            new[part] = None if same else mp.to(device)
        ident /= len(group.parts)
        maps[m][gi] = None if all(v is None for v in new.values()) else new
        stats[_label(m)] = {"identity_fraction": ident, "cost_before": before, "cost_after": after,
                            "iterations": info.get("iterations"),
                            "marginal_error": float(info.get("marginal_error", 0.0))}
    return stats


def ot_fuse(read: Callable[[int, str], torch.Tensor], shapes, n_models: int, *, weights=None,
            anchor: int = 0, solver: str = "exact", epsilon: float = 1e-3, rounds: int = 1,
            barycenter: str = "mean", soft: bool = False, device=None, out_dtype=None,
            progress: Callable[[int, int], None] | None = None, spec: Spec | None = None,
            sink: Callable[[str, torch.Tensor], None] | None = None, tol: float = 1e-5,
            max_iter: int = 2000, cost_dtype=torch.float32, barycenter_params: dict | None = None,
            distances: bool = True):
    """Fuse `n_models` models by OT alignment to `anchor` (0-based) and a barycenter.

    shapes: key -> shape (all models share it), or one table per model (checked to be equal).
    weights: per-model weights (sequence or comma string; None/"" = equal), normalised to sum 1.
    out_dtype: dtype of the merged tensors (default: the anchor's dtype per key).
    sink: if given, called as sink(key, tensor) for each merged tensor instead of collecting them
    (the returned dict is then empty).
    Returns (merged dict key -> tensor on `device`, report dict)."""
    if not isinstance(n_models, int) or n_models < 2:
        raise MergeInputError(f"OT fusion needs at least 2 models, got {n_models}")
    if not isinstance(anchor, int) or not 0 <= anchor < n_models:
        raise MergeInputError(f"OT fusion: anchor {anchor + 1 if isinstance(anchor, int) else anchor} "
                              f"is out of range (1..{n_models})")
    if solver not in SOLVERS:
        raise MergeInputError(f"OT fusion: unknown solver {solver!r} (use one of {', '.join(SOLVERS)})")
    try:
        eps_ok = math.isfinite(float(epsilon)) and float(epsilon) > 0
    except (TypeError, ValueError):
        eps_ok = False
    if not eps_ok:
        raise MergeInputError(f"OT fusion: epsilon must be > 0, got {epsilon}")
    epsilon = float(epsilon)
    if int(rounds) != rounds or rounds < 1:
        raise MergeInputError(f"OT fusion: rounds must be an integer >= 1, got {rounds}")
    rounds = int(rounds)
    if barycenter not in BARYCENTERS:
        raise MergeInputError(f"OT fusion: unknown barycenter {barycenter!r} (use one of {', '.join(BARYCENTERS)})")
    w = _check_weights(weights, n_models)
    table = _check_shapes(shapes, n_models)
    if spec is None:
        spec = build_spec(table)
    device = torch.device(device) if device is not None else torch.device("cpu")
    reader = _Reader(read, table, device)
    ka = spec.key_axes()
    models = [m for m in range(n_models) if m != anchor]
    maps = {m: [None] * len(spec.groups) for m in range(n_models)}
    sk = {"tol": tol, "max_iter": max_iter}
    keys = list(table)
    total = rounds * len(spec.groups) + len(keys) * (1 if barycenter == "mean" else 2)
    done = 0
    t0 = time.perf_counter()
    group_reports = []
    solved: set = set()
    for r in range(rounds):
        for gi, g in enumerate(spec.groups):
            stats = _solve_group(gi, g, spec, ka, reader, anchor, models, maps, solver, epsilon, soft,
                                 sk, cost_dtype, device, solved)
            solved.add(gi)
            if r == 0:
                group_reports.append({"name": g.name, "size": g.size, "structure": g.structure(),
                                      "models": stats})
            else:
                rep = group_reports[gi]["models"]
                for lab, st in stats.items():
                    st["cost_before"] = rep[lab]["cost_before"]  # identity cost of the first sweep
                    rep[lab] = st
            done += 1
            if progress is not None:
                progress(done, total)
    t1 = time.perf_counter()

    merged: dict = {}
    dist = {_label(m): [0.0, 0.0] for m in models}
    bparams = dict(barycenter_params or {})

    def aligned(key):
        raw = [reader.raw(m, key) for m in range(n_models)]
        dt = out_dtype if out_dtype is not None else raw[anchor].dtype
        raw = [t.to(device=device) for t in raw]
        entries = ka.get(key)
        xs = []
        for m in range(n_models):
            x = raw[m]
            if entries and m != anchor and any(maps[m][e[2]] is not None for e in entries):
                if any(maps[m][e[2]] is not None and maps[m][e[2]].get(e[3]) is not None
                       and maps[m][e[2]][e[3]].dim() == 2 for e in entries):
                    x = x.to(torch.float32)  # soft maps mix rows: do it in fp32
                x = apply_key(x, entries, maps[m], spec.groups)
            xs.append(x)
        return raw, xs, dt

    coeffs = None
    if barycenter != "mean":
        # pass 1: one Gram per key of the aligned tensors, then one batched solve for all keys
        grams = []
        for key in keys:
            _, xs, _ = aligned(key)
            grams.append(gram_matrix(xs, key=key))
            done += 1
            if progress is not None:
                progress(done, total)
        coeffs = _coefficients(torch.stack(grams), w, barycenter, bparams)
        del grams
    for ki, key in enumerate(keys):
        raw, xs, dt = aligned(key)
        if distances:
            ref = raw[anchor].to(torch.float32)
            for m in models:
                d0 = _sqdist(raw[m].to(torch.float32), ref)
                dist[_label(m)][0] += d0
                dist[_label(m)][1] += d0 if xs[m] is raw[m] else _sqdist(xs[m].to(torch.float32), ref)
            del ref
        del raw
        y = combine(xs, w if coeffs is None else coeffs[ki], dtype=dt)
        del xs
        if sink is not None:
            sink(key, y)
        else:
            merged[key] = y
        done += 1
        if progress is not None:
            progress(done, total)
    t2 = time.perf_counter()

    model_reports = {}
    for m in models:
        lab = _label(m)
        tot = sum(g.size for g in spec.groups)
        idf = sum(gr["models"][lab]["identity_fraction"] * g.size
                  for gr, g in zip(group_reports, spec.groups)) / max(tot, 1)
        model_reports[lab] = {"identity_fraction": idf, "distance_before": dist[lab][0],
                              "distance_after": dist[lab][1]}
    report = {
        "method": "ot_fusion", "solver": solver, "epsilon": epsilon if solver == "sinkhorn" else None,
        "rounds": rounds, "barycenter": barycenter, "soft": bool(soft), "anchor": _label(anchor),
        "weights": w, "spec": spec.coverage(), "models": model_reports, "groups": group_reports,
        "seconds": {"align": t1 - t0, "output": t2 - t1},
    }
    return merged, report
