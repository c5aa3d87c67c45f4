"""Read the effective weights of one ComfyUI input (MODEL or CLIP), key by key, without copying it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import host_api

# Buffers that are not weights (CLIP position ids, logit scale): never merged, kept from model_1.
SKIPPED_SUFFIXES = (".position_ids", ".logit_scale")


@dataclass
class Source:
    """One merge input. `patcher` is a ComfyUI ModelPatcher; `entries` is its get_key_patches()."""

    name: str  # "model_2", "clip_1", "base_model": used in every message
    kind: str  # "model" or "clip"
    owner: Any  # the MODEL (ModelPatcher) or CLIP object the user connected
    patcher: Any
    family: str
    entries: dict = field(repr=False, default_factory=dict)

    def keys(self) -> list[str]:
        return [k for k in self.entries if not k.endswith(SKIPPED_SUFFIXES) and self.stored(k).is_floating_point()]

    def stored(self, key: str) -> torch.Tensor:
        """The stored (unpatched) tensor for `key`, as the model holds it."""
        first = self.entries[key][0]
        return first[0] if isinstance(first, tuple) else first

    def has_patches(self, key: str) -> bool:
        return len(self.entries[key]) > 1

    def read(self, key: str, device: torch.device, moved: torch.Tensor | None = None) -> torch.Tensor:
        """Effective weight of `key` on `device`. Read-only: may alias the model's own tensor.
        moved: the stored tensor already copied to `device` (engine/staging.py), a copy of ours."""
        entry = self.entries[key]
        first = entry[0]
        weight, convert = (first if isinstance(first, tuple) else (first, None))
        if moved is not None and moved is not weight:
            if convert is None and len(entry) == 1:
                return moved
            w = moved.to(torch.float32)
        elif convert is None and len(entry) == 1:
            # non_blocking only onto CUDA (MPS to CPU copies are not waited for: torch's MPS bugs)
            return weight if weight.device == device else weight.to(device, non_blocking=device.type == "cuda")
        else:
            w = weight.to(device=device, dtype=torch.float32, copy=True)
        if convert is not None:
            w = convert(w, inplace=True)
        if len(entry) > 1:
            w = host_api.calculate_weight(self.patcher, list(entry[1:]), w, key)
        return w

    def patch_value(self, key: str):
        """What add_patches takes to mean 'this input's effective weight' (as ModelMergeSimple does)."""
        return self.entries[key]


def _model_family(model) -> str:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(getattr(model, "model", model)).__name__


def _clip_family(clip) -> str:
    names = []
    for prefix, label in (("clip_l.", "CLIP-L"), ("clip_g.", "CLIP-G"), ("clip_h.", "CLIP-H"), ("t5xxl.", "T5-XXL")):
        if any(k.startswith(prefix) for k in clip.patcher.model.state_dict().keys()):
            names.append(label)
    return "+".join(names) or type(clip.cond_stage_model).__name__


def _key_patches(patcher, prefix=None) -> dict:
    """get_key_patches, with the stored weight taken from the patcher's backup when the model is
    loaded with its patches applied. The March-2024 snapshot leaves a loaded clone with the same
    patches patched (unload_model_clones skips it) and then returns the patched weight as the
    original: its patches would count twice. Current ComfyUI reads the backup itself."""
    entries = patcher.get_key_patches(prefix)
    backup = getattr(patcher, "backup", None) or {}
    for k, e in entries.items():
        if isinstance(e[0], tuple) or k not in backup:
            continue  # current ComfyUI's (weight, convert) entries, or not patched right now
        orig = backup[k]
        entries[k] = (orig,) if len(e) == 1 else [orig] + list(e[1:])
    return entries


def model_source(model, name: str) -> Source:
    if model is None or not hasattr(model, "get_key_patches"):
        raise TypeError(f"{name} is not a MODEL")
    entries = _key_patches(model, "diffusion_model.")
    return Source(name, "model", model, model, _model_family(model), entries)


def clip_source(clip, name: str) -> Source:
    if clip is None or not hasattr(clip, "patcher"):
        raise TypeError(f"{name} is not a CLIP")
    entries = _key_patches(clip.patcher)
    return Source(name, "clip", clip, clip.patcher, _clip_family(clip), entries)
