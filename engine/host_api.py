"""Shims over the few ComfyUI APIs that differ between the March-2024 snapshot and current ComfyUI."""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time

import torch

import comfy.model_management as mm
import comfy.utils

from ..kernels import fused as fused_kernels
from ..kernels.errors import error_line

log = logging.getLogger(__name__)
WARM_UP_ENV = "BARYCENTER_FUSED_WARM_UP"


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


def compute_device(choice: str) -> tuple[torch.device, str | None]:
    """(device, note): cpu, or for `auto` ComfyUI's torch device when it computes in float64 (the
    Gram and the solvers' state need it). Apple's MPS has no float64 (nor have DirectML and some
    Intel GPUs): there `auto` merges on the CPU (on Apple silicon the same unified memory), and the
    note says why (the report carries it; the log says it once per device)."""
    if choice == "cpu":
        return torch.device("cpu"), None
    dev = torch.device(mm.get_torch_device())
    note = None if dev.type == "cpu" else _no_float64_note(str(dev))
    return (dev, None) if note is None else (torch.device("cpu"), note)


@functools.lru_cache(maxsize=None)
def _no_float64_note(device: str) -> str | None:
    """None when `device` runs a float64 matmul right, else why a merge goes to the CPU (asked, and
    logged, once per device)."""
    try:
        x = torch.full((2, 2), 1.0 + 2.0 ** -40, dtype=torch.float64, device=device)
        if float((x @ x)[0, 0].cpu()) == 2.0 * (1.0 + 2.0 ** -40) ** 2:
            return None
        why = "a float64 product came back rounded"
    except Exception as e:  # TypeError on MPS: "Cannot convert a MPS Tensor to float64 dtype ..."
        why = error_line(e, 160)
    note = f"{device} does not compute in float64 (the Gram and the solvers need it; {why}): merged on the CPU"
    log.warning("comfyui-barycenter: %s", note)
    return note


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


def warm_fused_kernels_on_start() -> bool:
    """With BARYCENTER_CPU_KERNELS=fused: compile the fused CPU Gram kernels in a background thread
    as soon as the server starts (after every node pack has been imported), so that a merge queued
    later does not spend 3-20 s compiling. True when the warm-up was arranged.
    BARYCENTER_FUSED_WARM_UP=0 leaves compiling to the first merge that needs each kernel."""
    if not fused_kernels.enabled() or os.environ.get(WARM_UP_ENV, "1").strip() == "0":
        return False
    server = sys.modules.get("server")  # ComfyUI's, imported before it loads node packs; absent in-process
    app = getattr(getattr(getattr(server, "PromptServer", None), "instance", None), "app", None)
    if app is None:
        return False

    def start():
        threading.Thread(target=_warm_up, name="barycenter-fused-warm-up", daemon=True).start()

    async def on_startup(_app):
        start()

    try:
        app.on_startup.append(on_startup)
    except RuntimeError:  # the server is already up (the pack loaded late): start now
        start()
    return True


def _warm_up() -> None:
    t0 = time.monotonic()
    dtypes = [torch.float32]  # ComfyUI's weights on a CPU host; also the host's UNet dtype
    try:
        unet = mm.unet_dtype()
        if unet in fused_kernels.DTYPES and unet not in dtypes:
            dtypes.append(unet)
        ready = fused_kernels.warm_up(dtypes)
    except Exception as e:  # never take the server down: a merge compiles on demand instead
        log.warning("comfyui-barycenter: warming up the fused CPU Gram kernels failed: %s: %s", type(e).__name__, e)
        return
    if ready:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        log.info("comfyui-barycenter: fused CPU Gram kernels ready (%d: 2-%d inputs, %s) in %.1f s",
                 len(ready), fused_kernels.MAX_INPUTS, names, time.monotonic() - t0)
