"""Maps over a spec's groups: apply them to tensors, draw random function-preserving ones.

``maps`` is a list with one entry per spec group: ``{part: map}``, where a map is a LongTensor
permutation (aligned[i] = original[perm[i]] along the slice's axis) or a soft (n, n) matrix
(aligned = M @ original along that axis). ``None`` for a group means the identity.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .spec import Group, Spec, build_spec


def _is_perm(m) -> bool:
    return m.dim() == 1


def apply_key(t: torch.Tensor, entries, maps, groups, skip_group: int | None = None) -> torch.Tensor:
    """Apply to one tensor every map listed in `entries` [(axis, offset, group index, part)].

    `skip_group` leaves that group's slices alone (used while solving that group)."""
    by_axis: dict = {}
    for axis, offset, gi, part in entries:
        if gi == skip_group or maps[gi] is None:
            continue
        m = maps[gi].get(part)
        if m is None:
            continue
        by_axis.setdefault(axis, []).append((offset, groups[gi].size, m))
    for axis, items in by_axis.items():
        hard = [(o, n, m) for o, n, m in items if _is_perm(m)]
        if hard:
            length = t.shape[axis]
            idx = torch.arange(length, device=t.device)
            for o, n, m in hard:
                idx[o:o + n] = m.to(t.device) + o
            t = t.index_select(axis, idx)
        soft = [(o, n, m) for o, n, m in items if not _is_perm(m)]
        if soft:
            t = t.clone()
            for o, n, m in soft:
                seg = t.narrow(axis, o, n)
                moved = seg.movedim(axis, 0)
                flat = moved.reshape(n, -1)
                mixed = (m.to(device=t.device, dtype=torch.float32) @ flat.to(torch.float32)).to(t.dtype)
                seg.copy_(mixed.reshape(moved.shape).movedim(0, axis))
    return t


def structured_random_perm(group: Group, gen: torch.Generator) -> dict:
    """A random permutation per part that preserves the model's function for this group."""
    n, b = group.size, group.blocks
    if b == 1:
        perm = torch.randperm(n, generator=gen)
        return {p: perm for p in group.part_names}
    bs = n // b
    block_perm = torch.randperm(b, generator=gen)
    out = {}
    for p in group.part_names:
        within = torch.stack([torch.randperm(bs, generator=gen) for _ in range(b)])
        out[p] = (block_perm[:, None] * bs + within).reshape(n)
    return out


def random_maps(spec: Spec, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(int(seed))
    return [structured_random_perm(g, gen) for g in spec.groups]


def apply_maps_state_dict(sd: Mapping[str, torch.Tensor], spec: Spec, maps) -> dict:
    ka = spec.key_axes()
    return {k: (apply_key(v, ka[k], maps, spec.groups) if k in ka else v) for k, v in sd.items()}


def state_dict_spec(shapes) -> Spec:
    """Spec for the UNet (or, without one, the CLIP towers) inside a larger state dict, e.g. a
    whole checkpoint (`model.diffusion_model.*` next to VAE and text-encoder keys); the other keys
    are simply not in it. A dict that is only a UNet or only a CLIP gets the full, checked spec."""
    from .spec import _CLIP_LAYER, _unet_prefix

    p = _unet_prefix(shapes)
    if p is not None:
        sub = {k: v for k, v in shapes.items() if k.startswith(p)}
    else:
        towers = {m.group(1) for k in shapes for m in [_CLIP_LAYER.match(k)] if m}
        sub = {k: v for k, v in shapes.items() if any(k.startswith(t) for t in towers)}
    return build_spec(sub or shapes)


def permute_state_dict(sd: Mapping[str, torch.Tensor], spec: Spec | None = None, seed: int = 0,
                       return_maps: bool = False):
    """A function-preserving random permutation of a state dict (UNet, CLIP, or any spec).

    The result computes the same function as `sd` (up to float rounding) but its hidden units
    are shuffled group by group (GroupNorm groups, heads and GEGLU halves kept intact); fusing it
    with `sd` by OT returns `sd`. `spec` defaults to `state_dict_spec`: in a whole checkpoint the
    UNet is permuted and every other key is returned unchanged. Same seed, same permutation."""
    if spec is None:
        spec = state_dict_spec({k: tuple(v.shape) for k, v in sd.items()})
    maps = random_maps(spec, seed)
    out = apply_maps_state_dict(sd, spec, maps)
    return (out, maps) if return_maps else out
