"""N-way weighted mean of MODELs or CLIPs: Σ w_i x_i, or base + strength·Σ w_i (x_i − base)."""
from __future__ import annotations

from .common import MergeNode, model_inputs, run_merge


class BarycenterWeightedMean(MergeNode):
    DESCRIPTION = ("Weighted mean of 2 to 12 models (Euclidean barycenter, argmin Σ w_i‖y − x_i‖²). "
                   "Lazy like ComfyUI's own merges: LoRAs and earlier merges on the inputs count.")

    @classmethod
    def INPUT_TYPES(cls):
        return model_inputs(cls.KIND)

    def merge(self, **kwargs):
        return run_merge(self.KIND, "weighted_mean", kwargs, scope="model")


class BarycenterWeightedMeanCLIP(BarycenterWeightedMean):
    DESCRIPTION = "Weighted mean of 2 to 12 CLIP text encoders (same architecture)."
    KIND = "CLIP"
