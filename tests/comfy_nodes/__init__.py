"""Test-only ComfyUI nodes (V1 API), registered by the harness as a second custom-node folder
(`barycenter-test-nodes`, see harness/host.py:write_extra_paths). Never shipped with the pack.

BarycenterTestZeroConditioning: all-zero CONDITIONING of the family's shape, so graphs built on
CLIP-less tiny checkpoints (harness/checkpoints.py) can sample without a text encoder.
- sd15: [1, 77, 768]
- sdxl: [1, 77, 2048] with pooled_output [1, 1280] and the size keys SDXL's encode_adm reads
  (width, height, crop_w, crop_h, target_width, target_height).
BarycenterTestHashModel / BarycenterTestHashCLIP: output nodes that put a digest of an IN-MEMORY
MODEL / CLIP into /history (outputs[node]["text"], JSON): sha256 of the stored state dict (names,
dtypes, shapes, bytes), a digest of the pending patches (keys and count per key), the module's id()
(to show two prompts saw the same cached object) and the weight dtypes. Used to prove that a merge,
even a failing one, leaves its inputs as they were (tests/host/test_bad_input_catalogue.py).
Works in the March-2024 snapshot and in current ComfyUI.
"""
import base64
import hashlib
import json

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


def state_digest(module, patches: dict, values_of: str = "") -> dict:
    """Digest of a model as stored: weights (not patched in) and pending patches. values_of:
    comma-separated state-dict keys whose values come back too (fp32 bytes, base64)."""
    import comfy.model_management as mm

    # A model loaded for sampling has its patches written into its weights (backup kept): unload
    # everything first, so the digest is of the stored weights whatever ran before.
    mm.unload_all_models()
    sd = module.state_dict()
    weights = hashlib.sha256()
    dtypes = set()
    for name in sorted(sd):
        t = sd[name].detach()
        weights.update(f"{name}|{t.dtype}|{list(t.shape)};".encode())
        weights.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # no bytes copy
        if t.is_floating_point():
            dtypes.add(str(t.dtype).replace("torch.", ""))
    counts = sorted((k, len(v)) for k, v in patches.items())
    values = {k: base64.b64encode(sd[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).decode()
              for k in (x.strip() for x in values_of.split(",")) if k}
    return {"values": values, "weights": weights.hexdigest(),
            "patches": hashlib.sha256(json.dumps(counts).encode()).hexdigest(),
            "patch_count": sum(n for _, n in counts), "patched_keys": len(counts),
            "keys": len(sd), "object": id(module), "dtypes": sorted(dtypes)}


class _DigestNode:
    """Output node putting a digest of an in-memory MODEL/CLIP into /history (outputs[node]["text"])."""

    RETURN_TYPES = ()
    FUNCTION = "digest"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/barycenter"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # never served from the cache: each prompt digests the model anew

    @staticmethod
    def _ui(module, patches, values_of=""):
        return {"ui": {"text": [json.dumps(state_digest(module, patches, values_of))]}}


class BarycenterTestHashModel(_DigestNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "optional": {"values_of": ("STRING", {"default": ""})}}

    def digest(self, model, values_of=""):
        return self._ui(model.model, model.patches, values_of)


class BarycenterTestHashCLIP(_DigestNode):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",)}}

    def digest(self, clip):
        return self._ui(clip.patcher.model, clip.patcher.patches)


class BarycenterTestNoop:
    """Output node without inputs: a prompt that does nothing, to flush the server's queue flags."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    FUNCTION = "noop"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing/barycenter"

    def noop(self):
        return {}


NODE_CLASS_MAPPINGS = {"BarycenterTestZeroConditioning": BarycenterTestZeroConditioning,
                       "BarycenterTestNoop": BarycenterTestNoop,
                       "BarycenterTestCaptureText": BarycenterTestCaptureText,
                       "BarycenterTestHashModel": BarycenterTestHashModel,
                       "BarycenterTestHashCLIP": BarycenterTestHashCLIP}
NODE_DISPLAY_NAME_MAPPINGS = {"BarycenterTestZeroConditioning": "Zero Conditioning (Barycenter test)",
                              "BarycenterTestNoop": "No-op (Barycenter test)",
                              "BarycenterTestCaptureText": "Capture Text (Barycenter test)",
                              "BarycenterTestHashModel": "Hash Model (Barycenter test)",
                              "BarycenterTestHashCLIP": "Hash CLIP (Barycenter test)"}
