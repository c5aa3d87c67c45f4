"""Test-only ComfyUI nodes (V1 API), registered by the harness as a second custom-node folder
(`barycenter-test-nodes`, see harness/host.py:write_extra_paths). Never shipped with the pack.

BarycenterTestZeroConditioning: all-zero CONDITIONING of the family's shape, so graphs built on
CLIP-less tiny checkpoints (harness/checkpoints.py) can sample without a text encoder.
- sd15: [1, 77, 768]
- sdxl: [1, 77, 2048] with pooled_output [1, 1280] and the size keys SDXL's encode_adm reads
  (width, height, crop_w, crop_h, target_width, target_height).
Works in the March-2024 snapshot and in current ComfyUI.
"""
import torch

_CONTEXT = {"sd15": 768, "sdxl": 2048}
_POOLED = {"sdxl": 1280}


def zero_conditioning(arch: str, width: int = 1024, height: int = 1024, batch_size: int = 1):
    if arch not in _CONTEXT:
        raise ValueError(f"arch must be one of {sorted(_CONTEXT)}, not {arch!r}")
    cond = torch.zeros(batch_size, 77, _CONTEXT[arch])
    extra = {}
    if arch in _POOLED:
        extra = {
            "pooled_output": torch.zeros(batch_size, _POOLED[arch]),
            "width": int(width), "height": int(height), "crop_w": 0, "crop_h": 0,
            "target_width": int(width), "target_height": int(height),
        }
    return [[cond, extra]]


class BarycenterTestZeroConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 8, "max": 16384, "step": 8}
        return {
            "required": {"arch": (sorted(_CONTEXT),)},
            "optional": {"width": ("INT", dict(size)), "height": ("INT", dict(size))},
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero"
    CATEGORY = "_for_testing/barycenter"
    DESCRIPTION = "Zero conditioning of the right shape for CLIP-less test checkpoints (test-only)."

    def zero(self, arch, width=1024, height=1024):
        return (zero_conditioning(arch, width, height),)


class BarycenterTestCaptureText:
    """Output node: puts a STRING (e.g. a merge report) into /history as outputs[node]["text"]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/barycenter"

    def capture(self, text):
        return {"ui": {"text": [text]}}


NODE_CLASS_MAPPINGS = {"BarycenterTestZeroConditioning": BarycenterTestZeroConditioning,
                       "BarycenterTestCaptureText": BarycenterTestCaptureText}
NODE_DISPLAY_NAME_MAPPINGS = {"BarycenterTestZeroConditioning": "Zero Conditioning (Barycenter test)",
                              "BarycenterTestCaptureText": "Capture Text (Barycenter test)"}
