"""Function-preserving permutation groups of a model, as data.

A *group* is one set of hidden units that can be permuted without changing what the model
computes: the map acts on every (key, axis, offset) slice the group lists, all with the same
length `size`. Structure that restricts which permutations preserve the function is recorded
in the group:

- ``kind="channels"``: any permutation of the `size` units (plain hidden layer, transformer
  inner stream, CLIP MLP).
- ``kind="geglu"``: as channels, but the slices include both halves of a GEGLU projection
  (offsets 0 and F of ``ff.net.0.proj``); one map moves both halves.
- ``kind="groupnorm"``: `blocks` GroupNorm groups of `size // blocks` channels; a permutation must
  map whole groups onto whole groups (permute inside groups, then the groups).
- ``kind="heads"``: `blocks` attention heads of `size // blocks` dims, with two *parts*: ``qk``
  (rows of Q and K: one within-head map shared by Q and K) and ``vo`` (rows of V and columns of
  the output projection: a second within-head map). The head permutation is shared by both parts.

Every other group has a single part named ``""``. A map for a group is one permutation per part;
``aligned[key].index_select(axis, perm + offset)`` on the slice's range (see ``apply_maps``).

Builders (``build_spec`` picks by key names):

- SD1.x / SD2.x / SDXL UNets in ComfyUI/ldm naming (``diffusion_model.input_blocks.1.1.proj_in.weight``),
  any key prefix in front of ``input_blocks``. Heads: a convolutional ``proj_in`` means SD1.x,
  which always has 8 heads; a linear ``proj_in`` means SD2.x/SDXL, 64 dims per head.
- CLIP text encoders as ComfyUI's CLIP patcher names them
  (``clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight``, ``clip_g.…``), any number of
  towers; 64 dims per head (CLIP-L 12 heads, CLIP-G 20, CLIP-H 16).
- ``mlp_spec``: a chain of Linear layers given by name (used by the digits test).

Every key must land in a group or on the spec's explicit fixed list; anything else is refused
with ``MergeInputError`` (an architecture we do not know is not guessed).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ..errors import MergeInputError

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Slice:
    key: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    kind: str  # "channels" | "geglu" | "groupnorm" | "heads"
    blocks: int
    parts: tuple  # tuple[(part_name, tuple[Slice, ...]), ...]

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    @property
    def part_names(self) -> tuple:
        return tuple(p for p, _ in self.parts)

    def slices(self, part: str | None = None):
        for name, sl in self.parts:
            if part is None or name == part:
                yield from sl

    def structure(self) -> dict:
        if self.kind == "groupnorm":
            return {"kind": "groupnorm", "groupnorm_groups": self.blocks, "channels_per_group": self.block_size}
        if self.kind == "heads":
            return {"kind": "heads", "heads": self.blocks, "head_dim": self.block_size,
                    "maps": {"qk": "Q and K rows", "vo": "V rows and output-projection columns"}}
        if self.kind == "geglu":
            return {"kind": "geglu", "halves": 2, "hidden": self.size}
        return {"kind": self.kind}


@dataclass
class Spec:
    family: str
    groups: list
    fixed: list
    shapes: dict
    info: dict = field(default_factory=dict)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def key_axes(self) -> dict:
        """key -> list of (axis, offset, group index, part) for every slice on that key."""
        out: dict = {}
        for gi, g in enumerate(self.groups):
            for part, sl in g.parts:
                for s in sl:
                    out.setdefault(s.key, []).append((s.axis, s.offset, gi, part))
        return out

    def coverage(self) -> dict:
        in_group = set(self.key_axes())
        total = sum(_numel(self.shapes[k]) for k in self.shapes)
        grouped = sum(_numel(self.shapes[k]) for k in in_group)
        return {"family": self.family, "groups": len(self.groups), "keys": len(self.shapes),
                "keys_in_groups": len(in_group), "keys_fixed": len(self.fixed),
                "params": total, "params_in_groups": grouped}


def _numel(shape) -> int:
    return int(math.prod(shape)) if len(shape) else 1


# --------------------------------------------------------------------------------------------
# validation shared by all builders


def _finish(family: str, shapes: Shapes, groups: list, fixed: Iterable[str], info: dict) -> Spec:
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    fixed = sorted(set(fixed))
    for g in groups:
        if g.size <= 0 or g.blocks <= 0 or g.size % g.blocks:
            raise MergeInputError(f"OT spec: group {g.name} has size {g.size} not divisible into {g.blocks} blocks")
        for part, sl in g.parts:
            for s in sl:
                if s.key not in shapes:
                    raise MergeInputError(f"OT spec: group {g.name} needs key {s.key}, which the model lacks")
                shp = shapes[s.key]
                if s.axis >= len(shp) or shp[s.axis] < s.offset + g.size:
                    raise MergeInputError(
                        f"OT spec: key {s.key} has shape {list(shp)}, too small for group {g.name} "
                        f"(axis {s.axis}, offset {s.offset}, size {g.size})")
    # one axis range may belong to one group only
    seen: dict = {}
    for g in groups:
        for part, sl in g.parts:
            for s in sl:
                for other in seen.get((s.key, s.axis), []):
                    o_off, o_size, o_name = other
                    if s.offset < o_off + o_size and o_off < s.offset + g.size:
                        raise MergeInputError(f"OT spec: {s.key} axis {s.axis} claimed by {o_name} and {g.name}")
                seen.setdefault((s.key, s.axis), []).append((s.offset, g.size, g.name))
    grouped = {s.key for g in groups for s in g.slices()}
    uncovered = sorted(k for k in shapes if k not in grouped and k not in fixed)
    if uncovered:
        head = ", ".join(uncovered[:6]) + (f" … ({len(uncovered)} keys)" if len(uncovered) > 6 else "")
        raise MergeInputError(
            f"OT fusion does not know this {family} architecture: keys not covered by its spec: {head}")
    fixed = [k for k in fixed if k in shapes]
    return Spec(family, groups, fixed, shapes, info)


def _g(name, size, kind, blocks, **parts) -> Group:
    return Group(name, int(size), kind, int(blocks), tuple((p, tuple(sl)) for p, sl in parts.items()))


def _wb(key_stem: str, shapes: Shapes, axis: int = 0, offset: int = 0) -> list:
    """Slices for `stem.weight` and, when present, `stem.bias` (bias only on axis 0)."""
    out = [Slice(key_stem + ".weight", axis, offset)]
    if axis == 0 and key_stem + ".bias" in shapes:
        out.append(Slice(key_stem + ".bias", 0, offset))
    return out


# --------------------------------------------------------------------------------------------
# UNet (ldm / ComfyUI naming)

_UNET_ANCHOR = "input_blocks.0.0.weight"


def _unet_prefix(shapes: Shapes) -> str | None:
    for k in shapes:
        if k.endswith(_UNET_ANCHOR):
            return k[: -len(_UNET_ANCHOR)]
    return None


def unet_spec(shapes: Shapes, *, heads: int | None = None, head_dim: int | None = None,
              groupnorm_groups: int = 32) -> Spec:
    """Groups of an SD1.x/SD2.x/SDXL UNet. `heads`/`head_dim` override the family rule."""
    p = _unet_prefix(shapes)
    if p is None:
        raise MergeInputError("OT spec: not an ldm UNet (no input_blocks.0.0.weight)")
    keys = [k for k in shapes if k.startswith(p)]
    rel = {k[len(p):]: k for k in keys}
    has = lambda r: (p + r) in shapes  # noqa: E731
    shp = lambda r: tuple(shapes[p + r])  # noqa: E731

    proj_in = [r for r in rel if r.endswith(".proj_in.weight")]
    if not proj_in:
        raise MergeInputError("OT spec: UNet without spatial transformers is not a supported family")
    conv_proj = len(shp(proj_in[0])) == 4
    if heads is None and head_dim is None:
        if conv_proj:
            heads = 8  # SD1.x: num_heads fixed at 8 (comfy/supported_models.py SD15)
            family = "sd1-unet"
        else:
            head_dim = 64  # SD2.x / SDXL: num_head_channels 64
            family = "sdxl-unet" if has("label_emb.0.0.weight") else "sd2-unet"
    else:
        family = "unet"

    groups: list = []
    fixed: list = []
    G = groupnorm_groups

    def fix(*rs):
        for r in rs:
            if has(r):
                fixed.append(p + r)

    # embeddings
    if has("time_embed.0.weight") and has("time_embed.2.weight"):
        hid = shp("time_embed.0.weight")[0]
        groups.append(_g("time_embed.hidden", hid, "channels", 1,
                         **{"": _wb(p + "time_embed.0", shapes) + [Slice(p + "time_embed.2.weight", 1)]}))
    else:
        raise MergeInputError("OT spec: UNet without time_embed.0/2 is not a supported family")
    if has("label_emb.0.0.weight"):
        if not has("label_emb.0.2.weight"):
            raise MergeInputError("OT spec: label_emb without label_emb.0.2 is not supported")
        hid = shp("label_emb.0.0.weight")[0]
        groups.append(_g("label_emb.hidden", hid, "channels", 1,
                         **{"": _wb(p + "label_emb.0.0", shapes) + [Slice(p + "label_emb.0.2.weight", 1)]}))
    emb_dim = shp("time_embed.2.weight")[0]
    emb_out = _wb(p + "time_embed.2", shapes)
    if has("label_emb.0.2.weight"):
        if shp("label_emb.0.2.weight")[0] != emb_dim:
            raise MergeInputError("OT spec: label_emb output differs from time_embed output")
        emb_out += _wb(p + "label_emb.0.2", shapes)
    emb_in = []

    # blocks
    block_paths: list = []
    seen = set()
    for r in rel:
        m = re.match(r"^((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)\.", r)
        if m and m.group(1) not in seen:
            seen.add(m.group(1))
            block_paths.append(m.group(1))

    def order(bp):
        m = re.match(r"^(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?$", bp)
        part = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[m.group(1)]
        if part == 1:
            return (part, int(m.group(2)), 0)
        return (part, int(m.group(2)), int(m.group(3)))

    block_paths.sort(key=order)
    for bp in block_paths:
        b = bp + "."
        if has(b + "in_layers.2.weight"):  # ResBlock
            c = shp(b + "in_layers.2.weight")[0]
            for r, want in ((b + "out_layers.0.weight", (c,)), (b + "emb_layers.1.weight", None),
                            (b + "out_layers.3.weight", None)):
                if not has(r):
                    raise MergeInputError(f"OT spec: ResBlock {p}{bp} lacks {r}")
            if shp(b + "out_layers.0.weight") != (c,) or shp(b + "emb_layers.1.weight")[0] != c \
                    or shp(b + "out_layers.3.weight")[1] != c:
                raise MergeInputError(f"OT spec: ResBlock {p}{bp} has an unsupported layout "
                                      "(scale-shift norm or mismatched inner width)")
            if c % G:
                raise MergeInputError(f"OT spec: ResBlock {p}{bp} width {c} is not divisible by {G} GroupNorm groups")
            sl = (_wb(p + b + "in_layers.2", shapes) + _wb(p + b + "emb_layers.1", shapes)
                  + _wb(p + b + "out_layers.0", shapes) + [Slice(p + b + "out_layers.3.weight", 1)])
            groups.append(_g(f"resblock:{bp}", c, "groupnorm", G, **{"": sl}))
            emb_in.append(Slice(p + b + "emb_layers.1.weight", 1))
            fix(b + "in_layers.0.weight", b + "in_layers.0.bias", b + "out_layers.3.bias",
                b + "skip_connection.weight", b + "skip_connection.bias")
        elif has(b + "proj_in.weight"):  # SpatialTransformer
            c = shp(b + "proj_in.weight")[0]
            tb = sorted({int(m.group(1)) for r in rel
                         for m in [re.match(re.escape(b) + r"transformer_blocks\.(\d+)\.", r)] if m})
            out_sl = _wb(p + b + "proj_in", shapes)
            in_sl = [Slice(p + b + "proj_out.weight", 1)]
            fix(b + "norm.weight", b + "norm.bias", b + "proj_out.bias")
            sub_groups = []
            for t in tb:
                tp = f"{b}transformer_blocks.{t}."
                for n in ("norm1", "norm2", "norm3"):
                    out_sl += _wb(p + tp + n, shapes)
                for att in ("attn1", "attn2"):
                    a = tp + att + "."
                    need = [a + "to_q.weight", a + "to_k.weight", a + "to_v.weight", a + "to_out.0.weight"]
                    for r in need:
                        if not has(r):
                            raise MergeInputError(f"OT spec: attention {p}{a[:-1]} lacks {r}")
                    out_sl += _wb(p + a + "to_out.0", shapes)
                    in_sl.append(Slice(p + a + "to_q.weight", 1))
                    if att == "attn1":
                        in_sl += [Slice(p + a + "to_k.weight", 1), Slice(p + a + "to_v.weight", 1)]
                    inner = shp(a + "to_q.weight")[0]
                    if heads is not None:
                        h = heads
                    else:
                        h = inner // head_dim
                    if h <= 0 or inner % h:
                        raise MergeInputError(f"OT spec: attention {p}{a[:-1]} width {inner} does not split into heads")
                    qk = [Slice(p + a + "to_q.weight", 0), Slice(p + a + "to_k.weight", 0)]
                    vo = [Slice(p + a + "to_v.weight", 0), Slice(p + a + "to_out.0.weight", 1)]
                    for r in ("to_q.bias", "to_k.bias", "to_v.bias"):
                        if has(a + r):
                            (qk if r != "to_v.bias" else vo).append(Slice(p + a + r, 0))
                    sub_groups.append(_g(f"heads:{tp}{att}", inner, "heads", h, qk=qk, vo=vo))
                ff2 = tp + "ff.net.2.weight"
                ff0 = tp + "ff.net.0.proj.weight"
                if not (has(ff2) and has(ff0)):
                    raise MergeInputError(f"OT spec: transformer block {p}{tp[:-1]} has no GEGLU feed-forward")
                f = shp(ff2)[1]
                if shp(ff0)[0] != 2 * f:
                    raise MergeInputError(f"OT spec: {p}{ff0} is not a GEGLU projection (rows {shp(ff0)[0]} != 2*{f})")
                out_sl += _wb(p + tp + "ff.net.2", shapes)
                in_sl.append(Slice(p + ff0, 1))
                gsl = [Slice(p + ff0, 0, 0), Slice(p + ff0, 0, f)]
                if has(tp + "ff.net.0.proj.bias"):
                    gsl += [Slice(p + tp + "ff.net.0.proj.bias", 0, 0), Slice(p + tp + "ff.net.0.proj.bias", 0, f)]
                gsl.append(Slice(p + ff2, 1))
                sub_groups.append(_g(f"geglu:{tp}ff", f, "geglu", 1, **{"": gsl}))
            groups.append(_g(f"transformer:{bp}", c, "channels", 1, **{"": out_sl + in_sl}))
            groups.extend(sub_groups)
        elif has(b + "op.weight"):  # Downsample
            fix(b + "op.weight", b + "op.bias")
        elif has(b + "conv.weight") and bp != "input_blocks.0.0":  # Upsample
            fix(b + "conv.weight", b + "conv.bias")
        elif bp == "input_blocks.0.0":
            fix(b + "weight", b + "bias")
    groups.insert(2 if has("label_emb.0.0.weight") else 1,
                  _g("emb", emb_dim, "channels", 1, **{"": emb_out + emb_in}))
    fix("out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias")
    # buffers a BaseModel state dict may carry next to the UNet
    for k in shapes:
        if re.match(r"^(.*\.)?model_sampling\.", k):
            fixed.append(k)
    return _finish(family, shapes, groups, fixed, {"prefix": p, "heads": heads, "head_dim": head_dim})


# --------------------------------------------------------------------------------------------
# CLIP text encoders (ComfyUI CLIP patcher naming)

_CLIP_LAYER = re.compile(r"^(.*?text_model\.)encoder\.layers\.(\d+)\.(.*)$")


def clip_spec(shapes: Shapes, *, head_dim: int = 64) -> Spec:
    towers: dict = {}
    for k in shapes:
        m = _CLIP_LAYER.match(k)
        if m:
            towers.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not towers:
        raise MergeInputError("OT spec: not a CLIP text encoder (no text_model.encoder.layers)")
    groups: list = []
    fixed: list = []
    names = []
    for tower in sorted(towers):
        t = tower
        names.append(tower.split(".")[0] if "." in tower else tower)
        for i in sorted(towers[tower]):
            lp = f"{t}encoder.layers.{i}."
            need = [lp + "mlp.fc1.weight", lp + "mlp.fc2.weight", lp + "self_attn.q_proj.weight",
                    lp + "self_attn.k_proj.weight", lp + "self_attn.v_proj.weight", lp + "self_attn.out_proj.weight"]
            for r in need:
                if r not in shapes:
                    raise MergeInputError(f"OT spec: CLIP layer {lp[:-1]} lacks {r}")
            hidden = shapes[lp + "mlp.fc1.weight"][0]
            groups.append(_g(f"mlp:{lp}mlp", hidden, "channels", 1,
                             **{"": _wb(lp + "mlp.fc1", shapes) + [Slice(lp + "mlp.fc2.weight", 1)]}))
            width = shapes[lp + "self_attn.q_proj.weight"][0]
            if width % head_dim:
                raise MergeInputError(f"OT spec: CLIP layer {lp[:-1]} width {width} is not a multiple of {head_dim}")
            a = lp + "self_attn."
            groups.append(_g(f"heads:{a}", width, "heads", width // head_dim,
                             qk=_wb(a + "q_proj", shapes) + _wb(a + "k_proj", shapes),
                             vo=_wb(a + "v_proj", shapes) + [Slice(a + "out_proj.weight", 1)]))
            fixed += [lp + "layer_norm1.weight", lp + "layer_norm1.bias", lp + "layer_norm2.weight",
                      lp + "layer_norm2.bias", lp + "mlp.fc2.bias", a + "out_proj.bias"]
    for k in shapes:
        if re.match(r"^(.*?text_model\.)(embeddings\.|final_layer_norm\.)", k) \
                or re.search(r"(^|\.)(text_projection(\.weight)?|logit_scale)$", k):
            fixed.append(k)
    family = "clip"
    return _finish(family, shapes, groups, fixed, {"towers": names, "head_dim": head_dim})


# --------------------------------------------------------------------------------------------
# plain MLP


def mlp_spec(shapes: Shapes, layers: Sequence[str]) -> Spec:
    """Chain of Linear layers `layers[0] -> layers[1] -> …` (names without `.weight`).
    Each hidden width between two consecutive layers is one group; input and output stay fixed."""
    groups = []
    for i in range(len(layers) - 1):
        a, b = layers[i], layers[i + 1]
        n = shapes[a + ".weight"][0]
        if shapes[b + ".weight"][1] != n:
            raise MergeInputError(f"OT spec: {a} has {n} outputs but {b} takes {shapes[b + '.weight'][1]}")
        groups.append(_g(f"hidden:{a}", n, "channels", 1, **{"": _wb(a, shapes) + [Slice(b + ".weight", 1)]}))
    last = layers[-1]
    fixed = [k for k in (last + ".bias",) if k in shapes]
    return _finish("mlp", shapes, groups, fixed, {"layers": list(layers)})


# --------------------------------------------------------------------------------------------


def build_spec(shapes: Shapes, **overrides) -> Spec:
    """Spec for a ComfyUI MODEL (ldm UNet keys) or CLIP (text_model keys) from key -> shape."""
    if not shapes:
        raise MergeInputError("OT spec: the model has no weights")
    if _unet_prefix(shapes) is not None:
        return unet_spec(shapes, **overrides)
    if any(_CLIP_LAYER.match(k) for k in shapes):
        return clip_spec(shapes, **overrides)
    sample = ", ".join(sorted(shapes)[:3])
    raise MergeInputError(f"OT fusion has no spec for this architecture (keys like {sample}); "
                          "supported: SD1.x/SD2.x/SDXL UNets and CLIP text encoders")
