"""One merge of N ComfyUI inputs: validate, read effective weights once, solve, return patches.

Linear methods (weighted mean, geometric median, Karcher) give per-key coefficients a_i (and a_b
on the base in task-vector mode); the merged weight is Σ a_i x_i + a_b b, handed to ComfyUI as
patches on a clone of model_1 exactly like its own ModelMergeSimple: the first patch scales
model_1's weight by a_1 (strength_model), every other input adds a_i times its effective weight.
ComfyUI computes it on its load device when the model is used; no merged copy sits in RAM.
Tensor methods (element median, sign-elected median) give a tensor per key: a set-patch
(strength_patch 1, strength_model 0).
The Grams of the last few passes are kept (gram_cache.py): a merge re-queued on the same input
objects with other settings solves without reading the inputs again.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import fused as fused_kernels
from ..kernels.threads import PART_ELEMS, WorkerThreads, intra_op_threads
from ..kernels import (GramPass, MergeInputError, block_of, pairwise_distances, parse_weights, resolve,
                       scope_units, solve, task_vector_coefficients)
from . import gram_cache, host_api, staging
from .sources import Source


@dataclass
class MergeResult:
    merged: Any  # clone of input 1 (MODEL or CLIP) carrying the merge as patches
    report: dict

    def report_json(self) -> str:
        return json.dumps(self.report, separators=(",", ":"), allow_nan=False, default=_jsonable)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(type(x).__name__)


def validate(sources: list[Source], base: Source | None) -> list[str]:
    """Same family, same keys, same shapes; returns the keys to merge (model_1's order)."""
    if len(sources) < 2:
        raise MergeInputError(f"a merge needs at least two inputs; got {len(sources)}")
    first = sources[0]
    keys = first.keys()
    if not keys:
        raise MergeInputError(f"{first.name} has no weights to merge")
    shapes = {k: tuple(first.stored(k).shape) for k in keys}
    for other in sources[1:] + ([base] if base is not None else []):
        if other.kind != first.kind:
            raise MergeInputError(f"{other.name} is a {other.kind.upper()} but {first.name} is a {first.kind.upper()}")
        if other.family != first.family:
            raise MergeInputError(
                f"{other.name} is {other.family} but {first.name} is {first.family}: "
                f"only models of the same architecture can be merged")
        other_keys = set(other.keys())
        missing = [k for k in keys if k not in other_keys]
        extra = sorted(other_keys.difference(shapes))
        if missing or extra:
            what = (f"lacks {len(missing)} of {first.name}'s keys, e.g. '{missing[0]}'" if missing
                    else f"has {len(extra)} keys that {first.name} lacks, e.g. '{extra[0]}'")
            raise MergeInputError(f"{other.name} {what}: the models do not have the same architecture")
        for k in keys:
            s = tuple(other.stored(k).shape)
            if s != shapes[k]:
                raise MergeInputError(
                    f"key '{k}': {other.name} has shape {list(s)} but {first.name} has {list(shapes[k])}")
    return keys


@torch.no_grad()  # ComfyUI runs nodes in inference mode; a caller outside it may hold weights that require grad
def merge(sources: list[Source], *, method: str, weights="", base: Source | None = None,
          strength: float = 1.0, scope: str = "tensor", params: dict | None = None,
          device: str = "auto") -> MergeResult:
    params = dict(params or {})
    info = resolve(method, scope)
    method = info.name
    if info.needs_base and base is None:
        raise MergeInputError(f"{method} needs a base_model (it works on task vectors x_i - base)")
    if not (-16.0 <= float(strength) <= 16.0) or strength != strength:
        raise MergeInputError(f"strength must be a finite number in [-16, 16]; got {strength}")
    keys = validate(sources, base)
    keys, kept = drop_unloaded_keys(sources, base, keys)
    n = len(sources)
    w = parse_weights(weights, n)
    dev, device_note = host_api.compute_device(device)
    t0 = time.perf_counter()
    report: dict = {
        "method": method, "scope": scope, "models": [s.name for s in sources],
        "families": sources[0].family, "weights": w.tolist(),
        "base": base.name if base is not None else None, "strength": float(strength),
        "device": str(dev), "keys": len(keys),
    }
    if device_note:
        report["device_note"] = device_note
    if kept:
        report["kept_from_first"] = kept
    merged = sources[0].owner.clone()
    if info.linear:
        unit_ids, unit_names = _units(keys, scope)
        if method == "weighted_mean":
            coeffs = w.unsqueeze(0).expand(len(unit_names), n)
            record: dict = {}
        else:
            # GM needs only the centred block of the Gram (cheaper); Karcher the norms too
            full = method != "geometric_median"
            kernel = fused_kernels.status(n) if dev.type == "cpu" else dev.type
            cached = gram_cache.key_of(sources, base, keys, dev, full, kernel)
            grams = gram_cache.lookup(cached)
            report["gram"] = "reused" if grams is not None else "computed"
            if grams is None:
                # the (K, N+1, N+1) Grams are a few KB: the solvers run on the CPU (hundreds of tiny
                # steps: a GPU would spend them on launches and syncs)
                grams = _gram_pass(sources, base, keys, dev, full=full).cpu()
                gram_cache.store(cached, grams)
                if dev.type == "cpu" and not fused_kernels.enabled():
                    fused_kernels.suggest_once(len(sources))
            else:
                host_api.Progress(1)(1)
            t_read = time.perf_counter()
            # tiny CPU ops from here on: one thread (ATen forks above ~2k elements, and on a busy
            # machine a fork/join waits for a time slice: the index_add below took 80 ms at times)
            with intra_op_threads(1):
                unit_grams = torch.zeros((len(unit_names),) + grams.shape[1:], dtype=grams.dtype)
                unit_grams.index_add_(0, unit_ids, grams)
                sol = solve(method, unit_grams, w, **params)
                coeffs, record = sol.coeffs, sol.record
                ill = record.get("ill_posed")
                if ill is not None and bool(ill.any()):
                    report["ill_posed_note"] = _ill_posed_note(method, unit_names, ill)
                    host_api.log.warning("comfyui-barycenter: %s", report["ill_posed_note"])
                report["timing"] = {"read_s": t_read - t0, "solve_s": time.perf_counter() - t_read}
                if dev.type == "cpu":
                    report["cpu_gram_kernel"] = fused_kernels.status(n)
                report["distances"] = pairwise_distances(grams.sum(0)).tolist()
        add_linear_patches(merged, sources, base, keys, coeffs, unit_ids, strength)
        report["units"] = _unit_report(unit_names, coeffs, record)
    else:
        if info.tensor_group is not None and dev.type == "cpu":  # the sign-elected median's Gram pass
            report["cpu_gram_kernel"] = fused_kernels.status(n)
            if not fused_kernels.enabled():
                fused_kernels.suggest_once(n)
        report["units"] = _tensor_pass(merged, sources, base, keys, info, w, strength, scope, params, dev)
    host_api.release(dev)
    report.setdefault("timing", {})["total_s"] = time.perf_counter() - t0
    return MergeResult(merged, report)


# Weights ComfyUI creates but no SD checkpoint holds: current ComfyUI leaves them uninitialised
# (garbage, often NaN) and ignores them (SD1.x never uses CLIP-L's projection). Merged only when
# every input holds finite values; else model_1's is kept and the report says so.
UNLOADED_SUFFIXES = (".transformer.text_projection.weight",)


def drop_unloaded_keys(sources, base, keys):
    """(keys to merge, keys kept from model_1 because an input never loaded them)."""
    kept = []
    for key in [k for k in keys if k.endswith(UNLOADED_SUFFIXES)]:
        for s in sources + ([base] if base is not None else []):
            if not bool(torch.isfinite(s.stored(key)).all()):
                kept.append(key)
                break
    if not kept:
        return keys, []
    skip = set(kept)
    return [k for k in keys if k not in skip], kept


def _units(keys: list[str], scope: str):
    groups = scope_units(keys, scope)
    ids = [0] * len(keys)  # filled as a list, made a tensor once (a tensor write per unit costs ~5 us)
    names = []
    for u, idx in enumerate(groups):
        for i in idx:
            ids[i] = u
        first = keys[idx[0]]
        names.append(first if scope == "tensor" else block_of(first) if scope == "block" else "model")
    return torch.tensor(ids, dtype=torch.long), names


def _read_all(sources, base, key, dev, move=None):
    return next(_read_keys(sources, base, [key], dev, move))[1:3]


def _read_keys(sources, base, keys, dev, move=None):
    """(j, xs, base, held) for each key in order: the effective weights on `dev`; onto a GPU the
    stored tensors of consecutive keys travel together through the pinned ring
    (staging.moved_groups). held: some of them are copies made here (a LoRA, a conversion, a move),
    not the models' own tensors."""
    inputs = sources + ([base] if base is not None else [])
    n = len(sources)
    if move is None:
        groups = ((j, [None] * len(inputs)) for j in range(len(keys)))
    else:
        groups = staging.moved_groups([[s.stored(k) for s in inputs] for k in keys], move)
    for j, moved in groups:
        xs = [s.read(keys[j], dev, m) for s, m in zip(inputs, moved)]
        held = any(x is not s.stored(keys[j]) for x, s in zip(xs, inputs))
        yield j, xs[:n], xs[n] if base is not None else None, held


def _gram_pass(sources, base, keys, dev, full: bool = True) -> torch.Tensor:
    """One read of every input: the (N+1)x(N+1) fp64 Gram per key, stacked (K, N+1, N+1)."""
    largest = max(sources[0].stored(k).numel() for k in keys)
    host_api.make_room(dev, 4 * largest * (len(sources) + 2) * 2)
    progress = host_api.Progress(len(keys))
    # the fused loops run on the host's intra-op threads (kernels/fused.py): one pass thread for them
    fused = fused_kernels.enabled() and len(sources) <= fused_kernels.MAX_INPUTS
    workers = host_api.cpu_workers() if dev.type == "cpu" and not fused else 1
    move = staging.mover(dev)
    # the per-key checks run at the end (on a GPU the pass then queues work without waiting for
    # it); a key they flag is read again (reread) to be named or recomputed
    grams = GramPass(len(keys), full=full, workers=workers,
                     reread=lambda j: _read_all(sources, base, keys[j], dev, move))
    # one intra-op thread per op on CPU: the pass works on cache-sized chunks, and with several
    # threads each pays a fork/join (on a busy machine 10-25x slower than one thread); its keys
    # run on cpu_workers() Python threads instead (kernels/gram_pass.py)
    with fused_kernels.loop_threads(torch.get_num_threads()), intra_op_threads(1 if dev.type == "cpu" else None):
        try:
            for j, xs, b, held in _read_keys(sources, base, keys, dev, move):
                grams.add(j, xs, b, keys[j], held=held)  # not held: may run ahead
                progress(j + 1)  # may raise: ComfyUI's Cancel
            return grams.result()
        finally:
            grams.close()


def add_linear_patches(merged, sources, base, keys, coeffs, unit_ids, strength):
    """Hand Σ a_i x_i (+ a_b base) to ComfyUI as patches on `merged` (a clone of input 1): coeffs
    (U, N) per scope unit, unit_ids (K,) maps each key to its unit; task-vector mode with a base."""
    if base is not None:
        a, a_b = task_vector_coefficients(coeffs, strength)
        a = torch.cat([a, a_b[:, None]], dim=1)
        inputs = sources + [base]
    else:
        a, inputs = coeffs, sources
    rows = a.tolist()  # one host sync for all coefficients
    unit_ids = unit_ids.tolist()
    # A row per key: one add_patches call per input (current ComfyUI rebuilds a state dict per
    # call), then each key's new entry gets its own strength a_i; the first entry also scales the
    # weight so far (strength_model). When model_1 has no patches of its own, the clone's weight
    # is model_1's and is scaled by a_1, as ModelMergeSimple does. With patches (a LoRA on
    # model_1) the snapshot can leave its module patched in place, so the first entry zeroes the
    # weight (strength_model 0) and model_1 is added back from its own entry (one more pass).
    own = any(sources[0].has_patches(k) for k in keys)
    first = 0 if own else 1
    patcher = getattr(merged, "patcher", merged)  # CLIP holds its ModelPatcher
    for i in range(first, len(inputs)):
        merged.add_patches({key: inputs[i].patch_value(key) for key in keys}, 1.0, 1.0)
        for key, u in zip(keys, unit_ids):
            scale = 1.0 if i > first else (0.0 if own else rows[u][0])
            host_api.restrength_last_patch(patcher, key, rows[u][i], scale)


def _ill_posed_note(method: str, names: list[str], ill: torch.Tensor) -> str:
    bad = [names[u] for u in ill.nonzero()[:, 0].tolist()]
    shown = ", ".join(f"'{b}'" for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return (f"{method}: in {len(bad)} of {len(names)} units the inputs point in opposite directions "
            f"that cancel (no half-space holds them all: task vectors around their own average? is "
            f"base_model an average of the models?); they have no {method} mean and were merged as "
            f"the weighted mean ({shown}; 'ill_posed' in the units)")


def _unit_report(names, coeffs, record) -> list[dict]:
    rows = coeffs.tolist()
    fields = {}
    for field, values in record.items():  # to lists once, not once per unit
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if isinstance(values, (list, tuple)) and len(values) == len(names):
            fields[field] = values
    return [{"name": name, "coefficients": rows[u], **{f: v[u] for f, v in fields.items()}}
            for u, name in enumerate(names)]


def _tensor_pass(merged, sources, base, keys, info, w, strength, scope, params, dev) -> list[dict]:
    """Per-key tensor results (element / sign-elected median) as set-patches. A method with a
    tensor_group takes the keys into it, and it hands them back finished a batch at a time."""
    progress = host_api.Progress(len(keys))
    out_device = torch.device("cpu")
    units = []
    patches = {}
    move = staging.mover(dev)
    w_dev = w.to(dev)
    # on CPU the keys run on worker threads (a group's: its Gram passes and combines), each op on
    # one thread: torch's own threads wait for each other at every op, and with a core busy
    # elsewhere that made the sign-elected median 5-7x and the element median 3x slower (the
    # fused loops keep the host's threads)
    fused = info.tensor_group and fused_kernels.enabled() and len(sources) <= fused_kernels.MAX_INPUTS
    workers = host_api.cpu_workers() if dev.type == "cpu" and not fused else 1
    pool = WorkerThreads(workers) if workers > 1 else None
    group = info.tensor_group(len(sources), w, strength=strength, workers=pool, **params) if info.tensor_group else None
    # (key, item, whole) merged on the workers, in key order: a key, or one range of a large key of an
    # elementwise method (whole: its output, for the last range; False for the others)
    inflight: deque = deque()

    def keep(done):
        for key, result, record in done:
            dtype = sources[0].stored(key).dtype
            patches[key] = (result.to(dtype=dtype).to(out_device),)  # the dtype already: no copy on CPU
            units.append({"name": key, **{k: v for k, v in (record or {}).items() if _is_small(v)}})

    def merge_key(args):
        key, xs, b, dtype, out = args
        more = {} if out is None else {"out": out}
        return info.merge_tensors(xs, base=b, weights=w_dev, strength=strength, key=key, out_dtype=dtype,
                                  **more, **params)

    def submit(key, xs, b, dtype):
        """Queue a key: in ranges of PART_ELEMS entries if elementwise (a large key alone on one
        thread left the others idle behind it), at most 2 items per worker in flight."""
        numel = xs[0].numel()
        if not info.elementwise or numel <= PART_ELEMS:
            inflight.append((key, pool.submit(merge_key, (key, xs, b, dtype, None)), None))
            collect(2 * workers)
            return
        flat = [x.reshape(-1) for x in xs]
        fb = b.reshape(-1) if b is not None else None
        whole = torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device)
        fo = whole.view(-1)
        for a in range(0, numel, PART_ELEMS):
            e = min(numel, a + PART_ELEMS)
            part = ([f[a:e] for f in flat], fb[a:e] if fb is not None else None, dtype, fo[a:e])
            inflight.append((key, pool.submit(merge_key, (key, *part)), whole if e == numel else False))
            collect(2 * workers)

    def collect(left: int):  # the oldest items done, until `left` are in flight (errors in key order)
        while len(inflight) > left:
            key, item, whole = inflight.popleft()
            pool.wait_for(item)
            out, record = item.result()
            if whole is None:
                keep([(key, out, record)])
            elif whole is not False:  # a large key's last range
                keep([(key, whole, record)])

    with intra_op_threads(1 if pool is not None else None):
        try:
            for j, xs, b, _ in _read_keys(sources, base, keys, dev, move):
                key = keys[j]
                dtype = sources[0].stored(key).dtype
                if group is not None:
                    keep(group.add(xs, b, key=key, out_dtype=dtype))
                elif pool is None:
                    keep([(key, *merge_key((key, xs, b, dtype, None)))])
                else:  # at most 2 per worker in flight: each holds its inputs and its result
                    submit(key, xs, b, dtype)
                progress(j + 1)  # may raise: ComfyUI's Cancel
            if group is not None:
                keep(group.finish())
            collect(0)
        finally:
            if pool is not None:
                pool.close()
    merged.add_patches(patches, 1.0, 0.0)
    return units


def _is_small(v) -> bool:
    return isinstance(v, (int, float, bool, str)) or (isinstance(v, (list, tuple)) and len(v) <= 64)
