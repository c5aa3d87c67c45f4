"""Optimal-transport fusion: function-preserving group specs, OT solvers, align-then-barycenter.

Pure torch + scipy + numpy; no ComfyUI import. See fuse.ot_fuse for the entry point and
spec for the group tables (SD1.x/SD2.x/SDXL UNets, CLIP text encoders, plain MLPs).
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
