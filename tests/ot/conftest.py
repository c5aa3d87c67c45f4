"""Fixtures for the OT tests: key/shape tables of tiny UNets and CLIPs built from ComfyUI's own
classes (the harness's host, in-process, on the meta device) and random weights for them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kernels.threads import intra_op_threads

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run small problems: one thread is as fast on an idle machine and far faster on
    a shared 2-core one (two spinning OpenMP threads against other processes)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def comfy_host():
    from harness.host import import_in_process

    return import_in_process()


@pytest.fixture(scope="session")
def tiny_shapes(comfy_host):
    """name -> key/shape table, ComfyUI naming (diffusion_model.*, clip_l.transformer.*)."""
    import comfy.clip_model
    import comfy.ops

    from comfy_equivariance import CLIP_TINY, SD1_TINY, SDXL_TINY
    from unet_configs import meta_shapes

    ops = getattr(comfy.ops, "disable_weight_init", comfy.ops)
    with torch.inference_mode():
        clip = comfy.clip_model.CLIPTextModel(CLIP_TINY, torch.float32, "meta", ops)
    return {
        "sd15": meta_shapes(SD1_TINY),
        "sdxl": meta_shapes(SDXL_TINY),
        "clip": {"clip_l.transformer." + k: tuple(v.shape) for k, v in clip.state_dict().items()},
    }
