"""Shims over the few ComfyUI APIs that differ between the March-2024 snapshot and current ComfyUI."""
from __future__ import annotations

import os
import time

import torch

import comfy.model_management as mm
import comfy.utils


def _lora_calculate_weight():
    try:
        import comfy.lora as lora
    except ImportError:  # pragma: no cover
        return None
    return getattr(lora, "calculate_weight", None)


# current ComfyUI: comfy.lora.calculate_weight and 5-tuple patches; the snapshot: ModelPatcher's
# method and 3-tuple patches (strength_patch, value, strength_model).
_CALCULATE = _lora_calculate_weight()


def calculate_weight(patcher, patches, weight: torch.Tensor, key: str) -> torch.Tensor:
    """Apply pending patches to `weight` (fp32, ours to modify) the way ComfyUI does at load time."""
    if _CALCULATE is not None:
        return _CALCULATE(patches, weight, key)
    return patcher.calculate_weight(patches, weight, key)


def restrength_last_patch(patcher, key: str, strength_patch: float, strength_model: float) -> None:
    """Give the patch add_patches just appended to `key` its own strengths. Index 0 (strength of
    the patch) and 2 (factor on the weight so far) mean the same in the snapshot's 3-tuples and
    current ComfyUI's 5-tuples, so one add_patches call per input can carry a coefficient per key
    and ComfyUI applies it at load exactly as it applies ModelMergeSimple's ratio (no extra copy)."""
    entries = patcher.patches[key]
    last = entries[-1]
    entries[-1] = (float(strength_patch), last[1], float(strength_model)) + tuple(last[3:])


def compute_device(choice: str) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    return mm.get_torch_device()


def make_room(device: torch.device, nbytes: int) -> None:
    """Ask ComfyUI to unload models until `nbytes` are free on a GPU (no-op on CPU)."""
    if device.type != "cpu":
        mm.free_memory(nbytes, device)


def release(device: torch.device) -> None:
    """After a merge on a GPU: hand torch's cached blocks back to the driver by ComfyUI's own rule
    (free_memory's): only when they are over a quarter of the device's free memory. Emptying the
    cache after every merge made the sampler that follows allocate its working memory afresh."""
    if device.type == "cpu" or mm.vram_state == mm.VRAMState.HIGH_VRAM:
        return
    free_total, free_torch = mm.get_free_memory(device, torch_free_too=True)
    if free_torch > free_total * 0.25:
        mm.soft_empty_cache()


def cpu_workers(cap: int = 8) -> int:
    """Threads for the CPU Gram pass: the cores this process may run on, at most `cap`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(cap, n))


def check_interrupted() -> None:
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI progress bar over keys: an update at most every INTERVAL seconds, and at the end.
    Each update is a websocket message that the server's event loop sends while holding the GIL:
    a hundred of them made a 0.1 s merge of tiny models take 0.05 s longer. Cancel is looked at
    on every key."""

    INTERVAL = 0.1

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.bar = comfy.utils.ProgressBar(self.total)  # positional: the snapshot takes no keyword
        self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        check_interrupted()
        now = time.monotonic()
        if done >= self.total or now - self.last >= self.INTERVAL:
            self.bar.update_absolute(done)
            self.last = now
