"""Optimal-transport fusion: function-preserving group specs, OT solvers, align-then-barycenter.

Pure torch + scipy + numpy; no ComfyUI import (the nodes are in nodes/ot_fusion.py).

    from kernels.ot import ot_fuse, build_spec, permute_state_dict

    merged, report = ot_fuse(read, shapes, n_models, weights=None, anchor=0, solver="exact",
                             epsilon=1e-3, rounds=1, barycenter="mean", soft=False, device="cpu",
                             out_dtype=None, progress=None, sink=None, linear=None)

- ``read(i, key)``: model i's effective weight for `key` (any device/dtype); ``shapes``: key ->
  shape (or one table per model, checked equal). The spec is built from ``shapes``
  (``build_spec``: SD1.x/SD2.x/SDXL UNets in ldm naming, CLIP text encoders as ComfyUI's CLIP
  patcher names them); an unknown architecture is refused with ``MergeInputError``.
- ``report``: JSON-serialisable; per group (name, size, structure, and per model: identity
  fraction, cost before/after, solver iterations, marginal error, certified identity), per model
  (identity fraction, distance to the anchor before/after), per key (coefficients, moved).
- ``permute_state_dict(sd, spec=None, seed=0)``: a function-preserving random permutation (tests,
  tiny-checkpoint generators); in a whole checkpoint only the UNet is permuted.
- Solvers: ``assign_exact`` (scipy), ``sinkhorn`` (log domain, batched, any device),
  ``solve_structured`` (GroupNorm groups / attention heads: inside blocks, then over blocks).
"""
from .fuse import BARYCENTERS, ot_fuse
from .maps import apply_key, apply_maps_state_dict, permute_state_dict, random_maps, state_dict_spec
from .solvers import SOLVERS, assign_exact, round_plan, sinkhorn, solve_plain, solve_structured
from .spec import Group, Slice, Spec, build_spec, clip_spec, mlp_spec, unet_spec

__all__ = [
    "ot_fuse", "BARYCENTERS", "SOLVERS",
    "Spec", "Group", "Slice", "build_spec", "unet_spec", "clip_spec", "mlp_spec",
    "permute_state_dict", "state_dict_spec", "random_maps", "apply_key", "apply_maps_state_dict",
    "assign_exact", "sinkhorn", "round_plan", "solve_plain", "solve_structured",
]
