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


def current_comfy_dir() -> str | None:
    """Current ComfyUI for the two-host checks: COMFYUI_DIR, else a dev checkout if present."""
    import os
    from pathlib import Path

    env = os.environ.get("COMFYUI_DIR")
    if env:
        return env
    dev = Path("/work/comfy-current")
    return str(dev) if (dev / "main.py").is_file() else None


def run_in_host(script, kind: str, timeout: float) -> dict:
    """Run a check script in its own process against the 'snapshot' or 'current' host; returns
    the JSON it prints last. Skips when no current ComfyUI tree is available."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    env = dict(os.environ)
    if kind == "snapshot":
        env.pop("COMFYUI_DIR", None)
    else:
        cur = current_comfy_dir()
        if cur is None:
            pytest.skip("no current ComfyUI tree (set COMFYUI_DIR)")
        env["COMFYUI_DIR"] = cur
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["host"] == kind
    return res
