"""Real SD1.5 / SDXL UNet configurations for ComfyUI's UNetModel (shapes only, on `meta`).

The family-defining fields come from the host's comfy/supported_models.py (SD15, SDXL:
unet_config + unet_extra_config); the structure ComfyUI reads from a checkpoint (levels, blocks,
transformer depths) is added here, and `check_detected` confirms that ComfyUI's own detector maps
the resulting key/shape table back to that family. Used by tests/ot and bench/bench_ot.py (which
import the host first).
"""
from __future__ import annotations

COMMON = dict(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
              use_checkpoint=False, use_temporal_resblock=False, use_temporal_attention=False)
STRUCTURE = {
    "SD15": dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1),
    "SDXL": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], num_classes="sequential",
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10),
}


def real_config(name: str) -> dict:
    import comfy.supported_models as sm

    cls = getattr(sm, name)
    cfg = dict(COMMON)
    cfg.update(STRUCTURE[name])
    cfg.update(cls.unet_config)
    cfg.update(cls.unet_extra_config)  # SD15: 8 heads; SDXL (BASE default): 64 channels per head
    if cfg.get("adm_in_channels") is None:
        cfg.pop("num_classes", None)
    return cfg


def meta_shapes(cfg: dict, prefix: str = "diffusion_model.") -> dict:
    """key -> shape of ComfyUI's UNetModel built on the meta device (no memory)."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import torch

    ops = getattr(comfy.ops, "disable_weight_init", comfy.ops)
    with torch.inference_mode():
        m = openaimodel.UNetModel(**cfg, device="meta", operations=ops)
    return {prefix + k: tuple(v.shape) for k, v in m.state_dict().items()}


def check_detected(shapes: dict, name: str, prefix: str = "diffusion_model.") -> str:
    """ComfyUI's detector on the table; raises if it is not the `name` family."""
    import comfy.model_detection as md
    import torch

    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    mc = md.model_config_from_unet(sd, prefix)
    got = type(mc).__name__ if mc is not None else None
    if got != name:
        raise AssertionError(f"ComfyUI detects {got}, expected {name}")
    return got
