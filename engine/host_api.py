"""Shims over the few ComfyUI APIs that differ between the March-2024 snapshot and current ComfyUI."""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.utils


def calculate_weight(patcher, patches, weight: torch.Tensor, key: str) -> torch.Tensor:
    """Apply pending patches to `weight` (fp32, ours to modify) the way ComfyUI does at load time."""
    try:
        import comfy.lora as lora
        fn = getattr(lora, "calculate_weight", None)
    except ImportError:  # pragma: no cover
        fn = None
    if fn is not None:  # current ComfyUI
        return fn(patches, weight, key)
    return patcher.calculate_weight(patches, weight, key)  # snapshot


def compute_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    return mm.get_torch_device()


def make_room(device: torch.device, nbytes: int) -> None:
    """Ask ComfyUI to unload models until `nbytes` are free on a GPU (no-op on CPU)."""
    if device.type != "cpu":
        mm.free_memory(nbytes, device)


def release(device: torch.device) -> None:
    if device.type != "cpu":
        mm.soft_empty_cache()


def check_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar over keys, throttled to about 100 UI updates per merge."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.bar = comfy.utils.ProgressBar(self.total)  # positional: the snapshot takes no keyword
        self.step = max(self.total // 100, 1)

    def __call__(self, done: int) -> None:
        check_interrupted()
        if done % self.step == 0 or done == self.total:
            self.bar.update_absolute(done)
