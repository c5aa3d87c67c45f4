"""OT fusion merge nodes (MODEL and CLIP): align every input to an anchor by optimal transport over
its function-preserving unit groups (kernels/ot), then take a barycenter of the aligned inputs.

Effective weights come from the engine's sources (LoRA and earlier merges on an input count). The
result is a clone of model_1 carrying:
- lazy linear patches (Σ c_i x_i, like ComfyUI's own merges) on every key that no map moves: for
  fine-tunes of one base that is every key, so the node then costs a plain merge plus the
  alignment check;
- set-patches (strength_model 0) with the computed tensor on keys whose units were re-ordered
  (held on the CPU in model_1's dtype, as the pack's other tensor-valued merges do).
Node ids BarycenterOTFusion / BarycenterOTFusionCLIP (to be listed in nodes/__init__.py's _NODES,
e.g. as "OT Fusion Merge" / "OT Fusion Merge (CLIP)").
"""
from __future__ import annotations

import json
import re
import time

import torch

from ..engine import host_api
from ..engine.merge import add_linear_patches, drop_unloaded_keys, validate
from ..kernels import MergeInputError
from ..kernels.ot import BARYCENTERS, SOLVERS, ot_fuse
from .common import MAX_INPUTS, MergeNode, collect, model_inputs

TIPS = {
    "anchor": "Input the others are aligned to (1 = model_1). Its units keep their order.",
    "solver": "exact = optimal assignment (scipy); sinkhorn = entropic OT (log domain, runs on the GPU), "
              "rounded to a permutation.",
    "epsilon": "Sinkhorn only: entropy relative to the cost scale (cost / max cost). <= 1e-3 recovers "
               "permutations exactly; 5e-2 blurs. Must be > 0.",
    "rounds": "Sweeps over the unit groups (coordinate descent). 1 is enough for fine-tunes of one base; "
              "2-3 help unrelated models.",
    "barycenter": "How the aligned inputs are combined: weighted mean, geometric median (robust) or "
                  "Karcher mean (directions on the sphere), one solve per key.",
}


def _extra():
    return {
        "anchor": ("INT", {"default": 1, "min": 1, "max": MAX_INPUTS, "tooltip": TIPS["anchor"]}),
        "solver": (list(SOLVERS), {"default": "exact", "tooltip": TIPS["solver"]}),
        "epsilon": ("FLOAT", {"default": 1e-3, "min": 0.0, "max": 1.0, "step": 1e-4, "round": False,
                              "tooltip": TIPS["epsilon"]}),
        "rounds": ("INT", {"default": 1, "min": 1, "max": 10, "tooltip": TIPS["rounds"]}),
        "barycenter": (list(BARYCENTERS), {"default": "mean", "tooltip": TIPS["barycenter"]}),
    }


def _relabel(obj, names: list[str]):
    """model_i (i-th connected input, as the kernels count) -> the input's own name."""
    def one(s: str) -> str:
        return re.sub(r"\bmodel_(\d+)\b",
                      lambda m: names[int(m.group(1)) - 1] if int(m.group(1)) <= len(names) else m.group(0), s)
    if isinstance(obj, dict):
        return {one(k) if isinstance(k, str) else k: _relabel(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relabel(v, names) for v in obj]
    if isinstance(obj, str):
        return one(obj)
    return obj


class _LazyProgress:
    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = host_api.Progress(total)
        self.bar(done)


@torch.no_grad()  # as engine.merge: no autograd, whoever calls
def run_ot(kind: str, kwargs: dict):
    label = "model" if kind == "MODEL" else "clip"
    sources, _ = collect(kind, kwargs)
    names = [s.name for s in sources]
    t0 = time.perf_counter()
    try:
        keys = validate(sources, None)
        keys, kept = drop_unloaded_keys(sources, None, keys)  # as the other merges: model_1's value stays
        anchor_name = f"{label}_{int(kwargs.get('anchor', 1))}"
        if anchor_name not in names:
            raise MergeInputError(f"anchor {int(kwargs.get('anchor', 1))} is out of range: {anchor_name} is not "
                                  f"connected (connected: {', '.join(names)})")
        anchor = names.index(anchor_name)
        dev, device_note = host_api.compute_device(kwargs.get("device", "auto"))
        first = sources[0]
        shapes = {k: tuple(first.stored(k).shape) for k in keys}
        largest = max(first.stored(k).numel() for k in keys)
        cache = (1 << 30) if dev.type == "cpu" else (1 << 28)  # recently read weights, reused by the next group
        # a key per input in fp32, its aligned copies, the n×n costs of a group (Sinkhorn: fp64 temporaries)
        host_api.make_room(dev, 4 * largest * (2 * len(sources) + 4) + (1 << 30) + cache)
        set_patches: dict = {}
        lin_keys: list = []
        lin_rows: list = []

        def sink(key, tensor):
            set_patches[key] = (tensor.to(device="cpu", dtype=first.stored(key).dtype),)

        def linear(key, row):
            lin_keys.append(key)
            lin_rows.append(row)

        _, rep = ot_fuse(lambda i, k: sources[i].read(k, dev), shapes, len(sources),
                         weights=kwargs.get("weights", ""), anchor=anchor, solver=kwargs.get("solver", "exact"),
                         epsilon=kwargs.get("epsilon", 1e-3), rounds=kwargs.get("rounds", 1),
                         barycenter=kwargs.get("barycenter", "mean"), device=dev,
                         progress=_LazyProgress(), sink=sink, linear=linear, distances=False,
                         cache_bytes=cache)
    except MergeInputError as e:
        text = _relabel(str(e), names).replace("OT fusion: ", "")
        raise MergeInputError(f"OT fusion merge: {text}") from None
    merged = first.owner.clone()
    if lin_keys:
        distinct: dict = {}
        ids = torch.tensor([distinct.setdefault(tuple(r), len(distinct)) for r in lin_rows], dtype=torch.long)
        coeffs = torch.tensor(list(distinct), dtype=torch.float64)
        add_linear_patches(merged, sources, None, lin_keys, coeffs, ids, 1.0)
    if set_patches:
        merged.add_patches(set_patches, 1.0, 0.0)
    host_api.release(dev)
    rep = _relabel(rep, names)
    report = {"method": "ot_fusion", "scope": "tensor", "models": names, "family": first.family,
              "device": str(dev), **({"device_note": device_note} if device_note else {}),
              "keys": len(keys), "lazy_keys": len(lin_keys), "set_keys": len(set_patches),
              **({"kept_from_first": kept} if kept else {}),
              **{k: v for k, v in rep.items() if k not in ("method",)},
              "timing": {"total_s": time.perf_counter() - t0, **rep.get("seconds", {})}}
    return merged, json.dumps(report, separators=(",", ":"), allow_nan=False)


class BarycenterOTFusion(MergeNode):
    DESCRIPTION = ("OT fusion of 2 to 12 models: the hidden units of every input (ResBlock channels in whole "
                   "GroupNorm groups, attention heads, GEGLU units, transformer streams) are matched to the "
                   "anchor's by optimal transport, then the aligned models are averaged (mean, geometric "
                   "median or Karcher). For models that were trained apart; fine-tunes of one base align to "
                   "the identity and give the plain mean (see identity_fraction in the report).")

    @classmethod
    def INPUT_TYPES(cls):
        return model_inputs(cls.KIND, with_base=False, extra_required=_extra())

    def merge(self, **kwargs):
        return run_ot(self.KIND, kwargs)


class BarycenterOTFusionCLIP(BarycenterOTFusion):
    DESCRIPTION = ("OT fusion of 2 to 12 CLIP text encoders (CLIP-L, and CLIP-G in SDXL): MLP units and "
                   "attention heads of each layer matched to the anchor's, then averaged.")
    KIND = "CLIP"
