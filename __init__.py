"""comfyui-barycenter: robust and geometric model merging for ComfyUI (MIT).

ComfyUI imports this file as the pack's entry point (V1 node API, which both the March-2024 and
current ComfyUI load).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
