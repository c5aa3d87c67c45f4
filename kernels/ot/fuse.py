"""OT fusion of N models: align every model to an anchor group by group, then take a barycenter.

    merged, report = ot_fuse(read, shapes, n_models, weights=None, anchor=0, solver="exact",
                             epsilon=1e-3, rounds=1, barycenter="mean", soft=False,
                             device="cpu", out_dtype=None, progress=None)

``read(i, key)`` returns model i's (effective) weight for `key` on any device/dtype; it is called
about three times per key (by the two groups that touch most keys, then for the output), so it
should be cheap or cached by the caller. Nothing model-sized is held: maps are solved group by
group from the tensors of that group only, and the output is produced key by key (gather the
aligned rows/columns of each model's tensor, barycenter, cast). Peak memory is a few tensors of one
group, one n×n cost matrix, and the maps (hard: n integers per group and model; soft: n×n floats).

Alignment (Singh & Jaggi 2020, weight matching as in git re-basin): for group g and model m,
C[i, j] = Σ_slices ‖A_s[i] − B_s[j]‖² where A is the anchor and B model m with the maps of the
other groups applied; the map minimises Σ_i C[i, map(i)] (exact assignment, or entropic OT then
rounding); GroupNorm groups and attention heads are solved inside blocks, then over blocks
(solvers.solve_structured). The first sweep, in spec order (input to output), uses only the slices
whose other axes are fixed or already aligned (the sequential scheme of Singh & Jaggi); ``rounds``
> 1 repeats the sweep with every slice (coordinate descent: each step is an exact minimisation
of the total distance over one group, so later rounds never increase it).

Exact solver shortcut: before forming the n×n cost (n²·r multiply-adds) a cheap bound tries to
prove that the identity is optimal (``_identity_certified``); fine-tunes of one base pass it and
cost one n·r·64 projection per group instead. Anything else is solved in full.

The barycenter is taken per key with the pack's kernels (combine / gram_matrix + the geometric
median or Karcher solver; for those two all keys are solved in one batch after a Gram pass).

The report (JSON-serialisable) has, per group and model: identity fraction (share of units the
map leaves in place; for soft maps the mass on the diagonal), cost before (identity map) and
after (chosen map) summed over the slices used to solve the group, solver iterations (null for the exact solver), final marginal error and
whether the identity was certified; per model ("alignment"): size-weighted identity fraction and
the squared distance to the anchor over all keys before and after alignment; per key ("units"):
the barycenter coefficients and whether any map moved it.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch

from ..combine import combine
from ..errors import MergeInputError
from ..geometric_median import solve_geometric_median
from ..gram import gram_matrix
from ..inputs import nonfinite_kind, parse_weights
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
    """read(i, key) checked against the shape table, with a small LRU cache.

    The two groups that touch a key are solved close together (a transformer block's stream
    group, then its heads and GEGLU groups), so a cache of recently read tensors saves most
    second reads of effective weights (which recompute LoRA patches) at a bounded memory cost."""

    def __init__(self, read, shapes, device, cache_bytes: int):
        self.read, self.shapes, self.device = read, shapes, device
        self.budget, self.used = int(cache_bytes), 0
        self.cache: OrderedDict = OrderedDict()

    def __call__(self, i: int, key: str) -> torch.Tensor:
        return self.raw(i, key).to(device=self.device, dtype=torch.float32)

    def raw(self, i: int, key: str) -> torch.Tensor:
        hit = self.cache.get((i, key))
        if hit is not None:
            self.cache.move_to_end((i, key))
            return hit
        t = self.read(i, key)
        if not isinstance(t, torch.Tensor):
            raise MergeInputError(f"OT fusion: {_label(i)} returned no tensor for {key}")
        if tuple(t.shape) != self.shapes[key]:
            raise MergeInputError(
                f"OT fusion: {_label(i)} has a different architecture from the others: {key} is "
                f"{list(t.shape)}, expected {list(self.shapes[key])}")
        size = t.numel() * t.element_size()
        if size <= self.budget // 4:
            self.cache[(i, key)] = t
            self.used += size
            while self.used > self.budget:
                _, old = self.cache.popitem(last=False)
                self.used -= old.numel() * old.element_size()
        return t

    def forget(self, key: str, n_models: int) -> None:
        for i in range(n_models):
            old = self.cache.pop((i, key), None)
            if old is not None:
                self.used -= old.numel() * old.element_size()


def _rows(t: torch.Tensor, axis: int, offset: int, n: int) -> torch.Tensor:
    return t.narrow(axis, offset, n).movedim(axis, 0).reshape(n, -1)


def _is_identity(mp: torch.Tensor) -> bool:
    if mp.dim() == 1:
        return bool((mp == torch.arange(mp.numel(), device=mp.device)).all())
    return bool(torch.equal(mp, torch.eye(mp.shape[0], dtype=mp.dtype, device=mp.device)))


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b).double() ** 2)


_CERT_DIM = 64


def _row_sqdist(a: torch.Tensor, b: torch.Tensor, rows_per: int = 512) -> torch.Tensor:
    """(n,) fp64 ‖a_i - b_i‖², in row chunks (no full-size temporaries)."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], rows_per):
        d = b[i:i + rows_per] - a[i:i + rows_per]
        out[i:i + rows_per] = torch.linalg.vector_norm(d, dim=1).double().square()
    return out


class _Projections:
    """Random r×k matrices with spectral norm <= 1, one per width r, shared by all models."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def __call__(self, r: int) -> torch.Tensor:
        if r not in self.cache:
            g = torch.Generator(device="cpu").manual_seed(1000003 + r)
            m = torch.randn(r, _CERT_DIM, generator=g, dtype=torch.float64)
            top = float(torch.linalg.eigvalsh(m.T @ m)[-1]) ** 0.5  # exact spectral norm
            self.cache[r] = (m / (top * (1 + 1e-6))).to(device=self.device, dtype=torch.float32)
        return self.cache[r]


def _identity_certified(rows, dsq, n: int, proj: _Projections) -> bool:
    """True if the identity is PROVABLY an optimal assignment for the cost
    C[i, j] = Σ_s ‖a_s[i] - b_s[j]‖², without forming C (the n×n×r product).

    With δ_i = b_i - a_i (concatenated over slices, ‖δ_i‖² = dsq[i]):
    C[i, j] >= (‖a_i - a_j‖ - ‖δ_j‖)², so if ‖a_i - a_j‖ >= ‖δ_i‖ + ‖δ_j‖ for all i != j, every
    row's minimum is on its diagonal and the identity is optimal. ‖a_i - a_j‖ >= ‖Pᵀ(a_i - a_j)‖
    for a random r×k matrix P of spectral norm <= 1 (k = 64): n·r·k work instead of n²·r.
    Same-base fine-tunes pass (their differences are far smaller than the distances between
    units); anything else fails and gets the full cost matrix. Margins (1e-3 relative, 1e-5 of
    the largest squared norm) cover the fp32 error of the projection."""
    r_total = sum(a.shape[1] for a, _ in rows)
    if n < 32 or r_total <= 4 * _CERT_DIM:
        return False
    pm = proj(r_total)
    p = torch.zeros(n, _CERT_DIM, dtype=torch.float32, device=pm.device)
    off = 0
    for a, _ in rows:
        p.addmm_(a, pm[off:off + a.shape[1]])
        off += a.shape[1]
    sq = p.square().sum(1)
    c = 1.0 + 1e-3
    delta = dsq.sqrt().to(torch.float32)
    # M_ij = ‖p_i - p_j‖² - c (δ_i + δ_j)² = sq_i + sq_j - 2 p_i·p_j - c δ_i² - c δ_j² - 2c δ_i δ_j
    u = sq - c * delta.square()
    mat = p @ p.T
    mat.mul_(-2.0).addr_(delta, delta, alpha=-2.0 * c)
    mat += u[:, None]
    mat += u[None, :]
    mat.fill_diagonal_(float("inf"))
    return bool(mat.min() >= 1e-5 * sq.max())  # NaN anywhere -> False


def _solve_group(gi, group, spec, ka, reader, anchor, models, maps, solver, epsilon, soft,
                 sk, cost_dtype, device, solved, proj, certify=True):
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

        try_cert = solver == "exact" and certify
        parts = []
        for part, slices in group.parts:
            # first sweep: only slices whose other axes are fixed or already aligned (the
            # sequential order of Singh & Jaggi); unaligned axes would add noise, not signal
            used = [s for s in slices if all(e[2] == gi or e[2] in solved for e in ka[s.key])] or list(slices)
            rows = [(_rows(anchor_t(s.key), s.axis, s.offset, n), _rows(model_t(s.key), s.axis, s.offset, n))
                    for s in used]
            dsq = sum(_row_sqdist(a, b) for a, b in rows) if try_cert else None
            parts.append((part, used, rows, dsq))
        certified = try_cert and all(_identity_certified(rows, dsq, n, proj) for _, _, rows, dsq in parts)
        if certified:
            new = {p: None for p in group.part_names}
            info = {"iterations": None, "marginal_error": 0.0}
            before = after = float(sum(float(dsq.sum()) for _, _, _, dsq in parts))
        else:
            costs = {}
            for part, used, rows, _ in parts:
                sim = torch.zeros(n, n, dtype=cost_dtype, device=device)
                na = torch.zeros(n, dtype=torch.float32, device=device)
                nb = torch.zeros(n, dtype=torch.float32, device=device)
                for a, b in rows:
                    sim.addmm_(a.to(cost_dtype), b.to(cost_dtype).T)
                    na += a.square().sum(1)
                    nb += b.square().sum(1)
                if not (bool(torch.isfinite(na).all()) and bool(torch.isfinite(nb).all())):
                    _raise_nonfinite(used, rows, anchor, m)
                # ‖a_i - b_j‖² = ‖a_i‖² + ‖b_j‖² - 2<a_i, b_j>
                sim = sim.to(torch.float32).mul_(-2.0)
                sim += na[:, None]
                sim += nb[None, :]
                costs[part] = sim.clamp_min_(0.0)
                del sim
            if group.blocks == 1 and len(costs) == 1:
                mp, info = solve_plain(costs[group.part_names[0]], solver, epsilon, soft, **sk)
                new = {p: mp for p in group.part_names}
            else:
                new, info = solve_structured(costs, group.blocks, solver, epsilon, soft, **sk)
            # cost of the identity and of the chosen map on the slices used (from the cost matrix)
            before = after = 0.0
            for part, c in costs.items():
                mp = new[part]
                before += float(c.diagonal().double().sum())
                if mp.dim() == 1:
                    after += float(c.gather(1, mp.to(c.device)[:, None]).double().sum())
                else:
                    after += float((mp.to(c.device) * c).double().sum())
            del costs
        ident = 0.0
        for part in group.part_names:
            mp = new[part]
            if mp is not None and _is_identity(mp):
                mp = None
            if mp is None:
                ident += 1.0
            elif mp.dim() == 1:
                ident += float((mp == torch.arange(n, device=mp.device)).double().mean())
            else:
                ident += float(torch.diagonal(mp).double().sum()) / n
            new[part] = None if mp is None else mp.to(device)
        del parts
        ident /= len(group.parts)
        maps[m][gi] = None if all(v is None for v in new.values()) else new
        stats[_label(m)] = {"identity_fraction": ident, "cost_before": before, "cost_after": after,
                            "iterations": info.get("iterations"),
                            "marginal_error": float(info.get("marginal_error", 0.0)),
                            "certified_identity": bool(certified)}
    return stats


def _raise_nonfinite(slices, rows, anchor: int, m: int):
    for s, (a, b) in zip(slices, rows):
        for who, t in ((anchor, a), (m, b)):
            if not bool(torch.isfinite(t).all()):
                raise MergeInputError(f"OT fusion: key '{s.key}': {_label(who)} contains NaN/Inf values")
    raise MergeInputError("OT fusion: the alignment cost overflows (weights beyond ~1e19?)")


def ot_fuse(read: Callable[[int, str], torch.Tensor], shapes, n_models: int, *, weights=None,
            anchor: int = 0, solver: str = "exact", epsilon: float = 1e-3, rounds: int = 1,
            barycenter: str = "mean", soft: bool = False, device=None, out_dtype=None,
            progress: Callable[[int, int], None] | None = None, spec: Spec | None = None,
            sink: Callable[[str, torch.Tensor], None] | None = None, tol: float = 1e-5,
            max_iter: int = 2000, cost_dtype=torch.float32, barycenter_params: dict | None = None,
            distances: bool = True, certify: bool = True,
            linear: Callable[[str, list], None] | None = None, cache_bytes: int = 1 << 30):
    """Fuse `n_models` models by OT alignment to `anchor` (0-based) and a barycenter.

    read(i, key): model i's (effective) weight for key, any device/dtype; called about three
        times per key (two group solves touch most keys, then the output).
    shapes: key -> shape (all models share it), or one table per model (checked to be equal).
    weights: per-model weights (sequence or comma string; None/"" = equal), normalised to sum 1.
    solver: "exact" (assignment; a cheap bound skips the cost matrix when it proves the identity
        optimal, see `certify`) or "sinkhorn" (entropic, relative epsilon, `tol`, `max_iter`).
    rounds: sweeps over the groups (coordinate descent); the first uses only slices whose other
        axes are fixed or already aligned.
    barycenter: "mean", "geometric_median" or "karcher" of the aligned tensors, one solve per key
        (all keys solved in one batch); `barycenter_params` go to the kernel (tol, max_iter, eps).
    soft: soft maps T̃ = n·T instead of permutations (n×n floats per group and model).
    device: where costs, solves and the output are computed. cost_dtype: the cost matmul's dtype.
    out_dtype: dtype of the merged tensors (default: the anchor's dtype per key).
    progress(done, total): called after every group solve and every output key; may raise to cancel.
    sink(key, tensor): if given, receives each merged tensor instead of the returned dict.
    linear(key, coeffs): if given, keys that no map moves are not computed; the caller gets the
        coefficients of Σ coeffs_i x_i over the (unaligned) inputs and may apply them lazily.
    distances: also report each model's squared distance to the anchor before/after alignment
        (one more pass over the weights; forces reading keys that `linear` would skip).
    cache_bytes: budget of the cache of recently read tensors (second reads of a key).
    Returns (merged dict key -> tensor on `device`, report dict; see the module docstring)."""
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
    reader = _Reader(read, table, device, cache_bytes)
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
    proj = _Projections(device)
    for r in range(rounds):
        for gi, g in enumerate(spec.groups):
            stats = _solve_group(gi, g, spec, ka, reader, anchor, models, maps, solver, epsilon, soft,
                                 sk, cost_dtype, device, solved, proj, certify)
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
    units = []
    for ki, key in enumerate(keys):
        row = w if coeffs is None else [float(c) for c in coeffs[ki].tolist()]
        entries = ka.get(key) or []
        moved = any(maps[m][e[2]] is not None and maps[m][e[2]].get(e[3]) is not None
                    for m in models for e in entries)
        units.append({"name": key, "coefficients": row, "moved": moved})
        if linear is not None and not moved and not distances:
            linear(key, row)  # Σ row_i x_i of the unaligned inputs: the caller may keep it lazy
        else:
            raw, xs, dt = aligned(key)
            if distances:
                ref = raw[anchor].to(torch.float32)
                for m in models:
                    d0 = _sqdist(raw[m].to(torch.float32), ref)
                    dist[_label(m)][0] += d0
                    dist[_label(m)][1] += d0 if xs[m] is raw[m] else _sqdist(xs[m].to(torch.float32), ref)
                del ref
            if linear is not None and not moved:
                linear(key, row)
            else:
                y = combine(xs, row, dtype=dt)
                if nonfinite_kind(y):  # one float sum per key; then name the input
                    for m in range(n_models):
                        kind = nonfinite_kind(raw[m])
                        if kind:
                            raise MergeInputError(f"OT fusion: key '{key}': {_label(m)} contains {kind} values")
                    raise MergeInputError(f"OT fusion: key '{key}': the merged tensor overflows {dt}")
                if sink is not None:
                    sink(key, y)
                else:
                    merged[key] = y
                del y
            del raw, xs
        reader.forget(key, n_models)
        done += 1
        if progress is not None:
            progress(done, total)
    t2 = time.perf_counter()

    alignment = {}
    for m in models:
        lab = _label(m)
        tot = sum(g.size for g in spec.groups)
        idf = sum(gr["models"][lab]["identity_fraction"] * g.size
                  for gr, g in zip(group_reports, spec.groups)) / max(tot, 1)
        alignment[lab] = {"identity_fraction": idf,
                          "distance_before": dist[lab][0] if distances else None,
                          "distance_after": dist[lab][1] if distances else None}
    report = {
        "method": "ot_fusion", "solver": solver, "epsilon": epsilon if solver == "sinkhorn" else None,
        "rounds": rounds, "barycenter": barycenter, "soft": bool(soft), "anchor": _label(anchor),
        "weights": w, "spec": spec.coverage(), "alignment": alignment, "groups": group_reports,
        "units": units, "seconds": {"align": t1 - t0, "output": t2 - t1},
    }
    return merged, report
