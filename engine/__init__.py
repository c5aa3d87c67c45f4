"""The merge engine: between the thin node classes and the pure-torch kernels.

Walks the keys of N ComfyUI models, reads each input's EFFECTIVE weight (its stored weight with its
own pending patches: a LoRA, an upstream merge), runs a kernel on the compute device, and hands the
result back as patches on a clone of model_1 (lazy per-key strengths for linear results,
set-patches for tensor results). The only place that touches ComfyUI's patcher API.
"""
from .merge import MergeResult, merge
from .sources import Source, model_source, clip_source

__all__ = ["MergeResult", "merge", "Source", "model_source", "clip_source"]
