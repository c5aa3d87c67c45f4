"""Helpers for host tests: tiny checkpoints by name, images, saved checkpoints, tensor hashes."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from harness import checkpoints
from harness.graphs import Graph


def ckpt(**kw) -> str:
    """File name (as CheckpointLoaderSimple lists it) of a cached tiny checkpoint."""
    return checkpoints.checkpoint(**kw).name


def sd15_family(n: int, *, noise: float = 0.05, first_seed: int = 1, **kw) -> list[str]:
    """n fine-tune-like SD1.5 checkpoints: one random base (seed 0) plus n different noises."""
    return [ckpt(arch="sd15", seed=first_seed + i, base_seed=0, noise=noise, **kw) for i in range(n)]


def image_array(client, run, node_id) -> np.ndarray:
    imgs = run.images(node_id)
    assert imgs, f"no image from node {node_id}; outputs: {run.outputs}; error: {run.error_text}"
    return np.asarray(Image.open(io.BytesIO(client.view(imgs[0]))).convert("RGB"), dtype=np.float32)


def assert_non_degenerate(img: np.ndarray) -> None:
    assert img.ndim == 3 and img.shape[0] >= 32, img.shape
    assert img.std() > 2.0, f"flat image (std {img.std():.3f})"
    assert 2.0 < img.mean() < 253.0, f"black or white image (mean {img.mean():.1f})"


def saved_checkpoint(server, prefix: str) -> dict[str, torch.Tensor]:
    files = sorted((server.output_dir / Path(prefix).parent).glob(Path(prefix).name + "*.safetensors"))
    assert files, f"CheckpointSave wrote nothing for {prefix} in {server.output_dir}"
    return load_file(str(files[-1]))


def unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = "model.diffusion_model."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def assert_close_to(saved: torch.Tensor, exact: torch.Tensor, key: str, ulps: float = 2.0,
                    extra: torch.Tensor | float = 0.0) -> None:
    """saved equals exact (fp64) up to `ulps` units of the saved dtype's rounding, plus `extra`."""
    eps = torch.finfo(saved.dtype).eps
    err = (saved.double() - exact).abs()
    tol = ulps * eps * exact.abs() + 1e-30 + ulps * eps * exact.abs().max() * 1e-3 + extra
    bad = err > tol
    assert not bool(bad.any()), (f"{key}: {int(bad.sum())} of {bad.numel()} values off; "
                                 f"max err {float(err.max()):.3g}, max |x| {float(exact.abs().max()):.3g}")


def storage_eps(dtype: torch.dtype) -> float:
    """Relative size of one rounding to the dtype ComfyUI stored a result in: 0 for fp32/fp64 (a
    CPU host computes and saves fp32), the dtype's eps for fp16/bf16 (a GPU host, --fp16-unet)."""
    return 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps


def storage_rounding(saved: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Bound on the roundings to the dtype ComfyUI saved in: 0 for fp32 (a CPU host computes and
    saves fp32). On a GPU (or with --fp16-unet) ComfyUI keeps the UNet in fp16, from fp32 files
    too: the merged value is rounded (half an ulp of `exact`), and each input term up to twice
    (`scale` = Σ|a_i||x_i|): once when loaded, once more when the host applies an input's own
    patches (a LoRA on model_1, an upstream merge) in the stored dtype, as it does for patches
    nested in a merge. The subnormal spacing is the floor near zero."""
    if not storage_eps(saved.dtype):
        return torch.zeros((), dtype=torch.float64)
    info = torch.finfo(saved.dtype)
    inputs = 0.0 if scale is None else info.eps * scale
    return 0.5 * info.eps * exact.abs() + inputs + info.smallest_normal * info.eps


def as_held(x: torch.Tensor, saved_dtype: torch.dtype) -> torch.Tensor:
    """An input from an fp32 file as the host held it when it merged: unchanged on a CPU host
    (fp32), rounded to fp16 on a GPU host (it keeps the UNet in the dtype it saves). For
    results that pick or elect among input values (medians, signs), where a bound on the
    roundings does not apply: an element can pick another input."""
    return x if saved_dtype in (torch.float32, torch.float64) else x.to(saved_dtype)


def tensors_hash(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model_graph(g: Graph, model, clip, vae, prefix: str) -> str:
    return g.add("CheckpointSave", model=model, clip=clip, vae=vae, filename_prefix=prefix)


def host_api_in_process():
    """The pack's engine/host_api.py with ComfyUI imported in this process (no server)."""
    import importlib

    from harness.host import import_in_process
    from harness.loading import load_pack

    import_in_process()
    return importlib.import_module(load_pack().__name__ + ".engine.host_api")
