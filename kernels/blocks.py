"""Scopes: which keys share one solve. `block_of` maps a key to its block; `scope_units` partitions.

Blocks (names without the "diffusion_model." prefix):
- UNet (SD1.x/SD2.x/SDXL, ldm names as ComfyUI uses them, "diffusion_model.<...>"; a checkpoint's
  "model.diffusion_model." prefix is accepted too): "time_embed", "label_emb", "input_blocks.<i>",
  "middle_block", "output_blocks.<i>", "out".
- CLIP text encoders ("clip_l.transformer.text_model...", "clip_g...."; the checkpoint names
  "cond_stage_model.transformer.text_model..." (SD1 CLIP-L), "conditioner.embedders.0.transformer..."
  (SDXL CLIP-L) and "conditioner.embedders.1.model..." (SDXL OpenCLIP bigG) are mapped to clip_l /
  clip_g): "clip_l.layers.<i>", "clip_l.embeddings", "clip_l.final_layer_norm",
  "clip_l.text_projection", "clip_l.logit_scale" (likewise clip_g).
- Other diffusion models in ComfyUI's naming: a numbered block list whose name ends in "blocks"
  or "layers" gives one block per entry (Flux "double_blocks.<i>", "single_blocks.<i>", SD3
  "joint_blocks.<i>", DiTs' "blocks.<i>"); T5 text encoders ("t5xxl.transformer.encoder.block.<i>")
  give "t5xxl.layers.<i>", "t5xxl.embeddings" (shared), "t5xxl.final_layer_norm".
- Anything else: the key's top-level module, i.e. its first dotted component after the known
  wrapper prefixes ("first_stage_model.encoder.down.0..." -> "first_stage_model"; inside a UNet,
  "diffusion_model.foo.3.weight" -> "foo"; a key without dots is its own block).
"""
from __future__ import annotations

import re

from .errors import MergeInputError

SCOPES = ("tensor", "block", "model", "element")

_CLIP_ALIASES = (
    ("cond_stage_model.transformer.", "clip_l.transformer."),
    ("cond_stage_model.model.", "clip_h.model."),
    ("conditioner.embedders.0.transformer.", "clip_l.transformer."),
    ("conditioner.embedders.1.model.", "clip_g.model."),
    ("text_encoders.clip_l.", "clip_l."),
    ("text_encoders.clip_g.", "clip_g."),
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|resblocks|block)\.(\d+)\.")


def block_of(key: str) -> str:
    """Block name of a state-dict key (see the module docstring)."""
    k = key
    if k.startswith("model.diffusion_model."):
        k = k[len("model."):]
    if k.startswith("diffusion_model."):
        parts = k[len("diffusion_model."):].split(".")
        head = parts[0]
        if head.endswith(("blocks", "layers")) and len(parts) > 1 and parts[1].isdigit():
            return f"{head}.{parts[1]}"
        return head
    for old, new in _CLIP_ALIASES:
        if k.startswith(old):
            k = new + k[len(old):]
            break
    m = re.match(r"(clip_[a-z]+|t5[a-z]*)\.(.*)$", k)
    if m:
        enc, rest = m.group(1), m.group(2)
        layer = _LAYER.search("." + rest)
        if layer:
            return f"{enc}.layers.{layer.group(1)}"
        for part in ("embeddings", "token_embedding", "positional_embedding", "shared", "final_layer_norm",
                     "ln_final", "text_projection", "logit_scale"):
            if re.search(rf"(?:^|\.){part}(?:\.|$)", rest):
                name = {"token_embedding": "embeddings", "positional_embedding": "embeddings", "shared": "embeddings",
                        "ln_final": "final_layer_norm"}.get(part, part)
                return f"{enc}.{name}"
        return f"{enc}.other"
    return k.split(".", 1)[0]


def scope_units(keys: list[str], scope: str) -> list[list[int]]:
    """Partition of key indices: 'tensor' and 'element' -> one unit per key (element scope is
    processed key by key), 'block' -> one unit per block_of(key) in first-seen order,
    'model' -> one unit."""
    if scope in ("tensor", "element"):
        return [[i] for i in range(len(keys))]
    if scope == "model":
        return [list(range(len(keys)))] if keys else []
    if scope == "block":
        order: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            order.setdefault(block_of(k), []).append(i)
        return list(order.values())
    raise MergeInputError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")
