"""Random weights for the OT tests (a module of its own: `conftest` is a shared module name)."""
from __future__ import annotations

import math

import torch


def random_state_dict(shapes: dict, seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shp in shapes.items():
        scale = 1.0 / math.sqrt(math.prod(shp[1:])) if len(shp) > 1 else 0.3
        out[k] = (torch.randn(shp, generator=g) * scale).to(dtype)
    return out


def noisy(sd: dict, seed: int, rel: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=g).to(v.dtype) if v.numel() > 1 else v
            for k, v in sd.items()}
