"""Geometric median, Karcher mean and sign-elected median merge nodes (MODEL and CLIP)."""
from __future__ import annotations

from .common import TIPS, MergeNode, model_inputs, run_merge

SOLVER = {
    "tolerance": ("FLOAT", {"default": 1e-7, "min": 1e-12, "max": 1e-1, "step": 1e-8, "round": False,
                            "tooltip": "Stop when the relative change of the solution falls below this."}),
    "max_iterations": ("INT", {"default": 100, "min": 1, "max": 10000,
                               "tooltip": "Upper bound on solver iterations per scope unit. The data is read "
                                          "once whatever this is: iterations run on N×N numbers."}),
}
EPS = ("FLOAT", {"default": 1e-8, "min": 1e-15, "max": 1.0, "step": 1e-9, "round": False,
                 "tooltip": "Weiszfeld smoothing: distances below eps (relative to the inputs' spread) "
                            "count as coincident points."})


def _solver_params(kwargs, *, eps: bool) -> dict:
    p = {"tol": float(kwargs["tolerance"]), "max_iter": int(kwargs["max_iterations"])}
    if eps:
        p["eps"] = float(kwargs["eps"])
    return p


class BarycenterGeometricMedian(MergeNode):
    DESCRIPTION = ("Geometric median of 2 to 12 models (Weiszfeld, argmin Σ w_i‖y − x_i‖): a robust merge "
                   "whose result an outlier model cannot drag away (breakdown point 0.5). Solved on the "
                   "inputs' Gram matrix: one read of the weights. scope=element is the coordinate-wise median.")
    SCOPES = ["tensor", "block", "model", "element"]

    @classmethod
    def INPUT_TYPES(cls):
        return model_inputs(cls.KIND, extra_required={
            "scope": (cls.SCOPES, {"default": "tensor", "tooltip": TIPS["scope"] +
                                   " element = coordinate-wise weighted median (not a linear combination)."}),
            **SOLVER, "eps": EPS})

    def merge(self, **kwargs):
        scope = kwargs["scope"]
        if scope == "element":
            return run_merge(self.KIND, "element_median", kwargs, scope="tensor", params={})
        return run_merge(self.KIND, "geometric_median", kwargs, scope=scope,
                         params=_solver_params(kwargs, eps=True))


class BarycenterGeometricMedianCLIP(BarycenterGeometricMedian):
    DESCRIPTION = "Geometric median of 2 to 12 CLIP text encoders (same architecture)."
    KIND = "CLIP"


class BarycenterKarcherMean(MergeNode):
    DESCRIPTION = ("Karcher mean of 2 to 12 models: the Riemannian centre of mass of their directions on the "
                   "unit sphere, scaled by the weighted mean of their norms. Solved on the Gram matrix: one "
                   "read of the weights.")

    @classmethod
    def INPUT_TYPES(cls):
        return model_inputs(cls.KIND, extra_required={
            "scope": (["tensor", "block", "model"], {"default": "tensor", "tooltip": TIPS["scope"]}),
            **SOLVER})

    def merge(self, **kwargs):
        return run_merge(self.KIND, "karcher", kwargs, scope=kwargs["scope"],
                         params=_solver_params(kwargs, eps=False))


class BarycenterKarcherMeanCLIP(BarycenterKarcherMean):
    DESCRIPTION = "Karcher mean of 2 to 12 CLIP text encoders (same architecture)."
    KIND = "CLIP"


class BarycenterSignElectedMedian(MergeNode):
    DESCRIPTION = ("Sign-elected median (TIES sign election + geometric median of the agreeing task vectors, "
                   "optional DARE drop): base + strength·GM(masked x_i − base). Needs base_model.")

    @classmethod
    def INPUT_TYPES(cls):
        return model_inputs(cls.KIND, extra_required={
            "scope": (["tensor"], {"default": "tensor", "tooltip": "One solve per key (the masks are per element)."}),
            "drop_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01,
                                    "tooltip": "DARE: drop this fraction of each task vector's entries at "
                                               "random (survivors rescaled by 1/(1-p)). 0 = off."}),
            "drop_seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1,
                             "tooltip": "Seed of the DARE drop. The same seed drops the same entries on "
                                        "CPU and GPU, so it gives the same merge (up to rounding)."}),
            **SOLVER, "eps": EPS})

    def merge(self, **kwargs):
        params = _solver_params(kwargs, eps=True)
        params.update(drop_rate=float(kwargs["drop_rate"]), seed=int(kwargs["drop_seed"]))
        return run_merge(self.KIND, "sign_elected_median", kwargs, scope=kwargs["scope"], params=params)
