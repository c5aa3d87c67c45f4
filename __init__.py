"""comfyui-barycenter: robust and geometric model merging for ComfyUI (MIT).

ComfyUI imports this file as the pack's entry point (V1 node API, which both the March-2024 and
current ComfyUI load).
"""
from .engine.host_api import warm_fused_kernels_on_start
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

warm_fused_kernels_on_start()  # only with BARYCENTER_CPU_KERNELS=fused (README)

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
