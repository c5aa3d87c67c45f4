"""Spec property check on ComfyUI's OWN model classes (run as a script, one host per process).

Builds tiny models from the host's classes: an SD1.5-like UNet (conv proj_in, 8 fixed heads),
an SDXL-like UNet (linear proj_in, 64-dim heads, label_emb, 2-block transformers) and CLIP text
encoders (comfy.clip_model.CLIPTextModel, quick_gelu and gelu) with random weights, then checks:

- a random permutation drawn from the OT spec leaves the outputs unchanged (fp32, relative
  max difference <= 1e-5);
- each trap changes them: permuting across GroupNorm groups, different maps on the two GEGLU
  halves, a Q/K map crossing a head boundary, Q permuted without K, a one-sided permutation.

Prints one JSON line (the last line of stdout): {"host": ..., "cases": {name: rel_diff}, ...}.
The host is the harness's: the PyPI snapshot, or COMFYUI_DIR when set.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from harness.host import import_in_process  # noqa: E402

HOST = import_in_process()

import comfy.clip_model  # noqa: E402
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel  # noqa: E402
import comfy.ops  # noqa: E402

from kernels.ot.maps import apply_maps_state_dict, random_maps, structured_random_perm  # noqa: E402
from kernels.ot.spec import Group, Spec, build_spec  # noqa: E402

OPS = getattr(comfy.ops, "disable_weight_init", comfy.ops)

SD1_TINY = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
                channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                transformer_depth_middle=1, context_dim=96, num_heads=8, num_head_channels=-1,
                use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
                adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False)
SDXL_TINY = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
                 channel_mult=[1, 2], transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
                 transformer_depth_middle=1, context_dim=96, num_heads=-1, num_head_channels=64,
                 use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=48, num_classes="sequential", use_temporal_resblock=False,
                 use_temporal_attention=False)
CLIP_TINY = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256,
                 hidden_act="quick_gelu", max_position_embeddings=77, eos_token_id=49407)


def randomize(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if v.dim() >= 2:
            fan_in = math.prod(v.shape[1:])
            t = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
            if "embedding" in k:
                t = torch.randn(v.shape, generator=g) * 0.5
        elif k.endswith("weight"):
            t = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
        else:
            t = 0.2 * torch.randn(v.shape, generator=g)
        sd[k] = t.to(v.dtype)
    module.load_state_dict(sd)
    return {k: v.clone() for k, v in sd.items()}


def rel(a, b) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def crossing_perm(n: int, blocks: int, gen) -> torch.Tensor:
    """A permutation of n that moves some unit to a different block of size n // blocks."""
    bs = n // blocks
    while True:
        p = torch.randperm(n, generator=gen)
        if bool((p // bs != torch.arange(n) // bs).any()):
            return p


def trap_spec(spec: Spec, groups) -> Spec:
    return Spec("trap", list(groups), [], spec.shapes)


def traps(spec: Spec, gen) -> dict:
    """name -> (Spec, maps) for each trap, on the first group of the right kind."""
    out = {}
    gn = next(g for g in spec.groups if g.kind == "groupnorm") if any(g.kind == "groupnorm" for g in spec.groups) else None
    if gn is not None:
        out["across_groupnorm_groups"] = (trap_spec(spec, [gn]), [{"": crossing_perm(gn.size, gn.blocks, gen)}])
        out_only = Group(gn.name + ":one-sided", gn.size, "channels", 1,
                         (("", tuple(s for s in gn.slices() if s.axis == 0)),))
        out["one_sided"] = (trap_spec(spec, [out_only]), [structured_random_perm(gn, gen)])
    ge = next((g for g in spec.groups if g.kind == "geglu"), None)
    if ge is not None:
        f = ge.size
        first = tuple(s for s in ge.slices() if s.offset == 0)
        second = tuple(s for s in ge.slices() if s.offset == f)
        ga = Group(ge.name + ":a", f, "channels", 1, (("", first),))
        gb = Group(ge.name + ":b", f, "channels", 1, (("", second),))
        out["geglu_halves_separate_maps"] = (trap_spec(spec, [ga, gb]),
                                             [{"": torch.randperm(f, generator=gen)}, {"": torch.randperm(f, generator=gen)}])
    hd = next(g for g in spec.groups if g.kind == "heads" and g.blocks >= 2)
    qk = dict(hd.parts)["qk"]
    cross = Group(hd.name + ":qk-crossing", hd.size, "channels", 1, (("", qk),))
    out["qk_across_head_boundary"] = (trap_spec(spec, [cross]), [{"": crossing_perm(hd.size, hd.blocks, gen)}])
    q_only = tuple(s for s in qk if ("to_q" in s.key or "q_proj" in s.key))
    gq = Group(hd.name + ":q-only", hd.size, "heads", hd.blocks, (("qk", q_only),))
    out["q_without_k"] = (trap_spec(spec, [gq]), [structured_random_perm(gq, gen)])
    if gn is None:  # CLIP: one-sided MLP
        mlp = next(g for g in spec.groups if g.kind == "channels")
        out_only = Group(mlp.name + ":one-sided", mlp.size, "channels", 1,
                         (("", tuple(s for s in mlp.slices() if s.axis == 0)),))
        out["one_sided"] = (trap_spec(spec, [out_only]), [{"": torch.randperm(mlp.size, generator=gen)}])
    return out


def check(model, sd, run, spec, seed) -> dict:
    ref = run(model)
    res = {}
    maps = random_maps(spec, seed)
    perm_sd = apply_maps_state_dict(sd, spec, maps)
    moved = sum(not torch.equal(perm_sd[k], sd[k]) for k in sd)
    model.load_state_dict(perm_sd)
    res["spec_permutation"] = max(rel(a, b) for a, b in zip(run(model), ref))
    res["keys_moved"] = moved
    gen = torch.Generator().manual_seed(seed + 1)
    for name, (tspec, tmaps) in traps(spec, gen).items():
        model.load_state_dict(apply_maps_state_dict(sd, tspec, tmaps))
        res["trap:" + name] = max(rel(a, b) for a, b in zip(run(model), ref))
    model.load_state_dict(sd)
    return res


def unet_case(cfg: dict, seed: int) -> dict:
    model = openaimodel.UNetModel(**cfg, operations=OPS)
    sd = randomize(model, seed)
    spec = build_spec({k: tuple(v.shape) for k, v in sd.items()})  # the builder takes any key prefix
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 5, cfg["context_dim"], generator=g)
    y = torch.randn(2, cfg["adm_in_channels"], generator=g) if cfg.get("adm_in_channels") else None

    def run(m):
        return [m(x, timesteps=t, context=ctx, y=y)]

    out = check(model, sd, run, spec, seed)
    out["family"] = spec.family
    out["groups"] = len(spec.groups)
    return out


def clip_case(act: str, seed: int) -> dict:
    cfg = dict(CLIP_TINY, hidden_act=act)
    model = comfy.clip_model.CLIPTextModel(cfg, torch.float32, "cpu", OPS)
    sd = randomize(model, seed)
    spec = build_spec({k: tuple(v.shape) for k, v in sd.items()})
    g = torch.Generator().manual_seed(seed + 7)
    tokens = torch.randint(0, 49000, (2, 77), generator=g)
    tokens[:, 12] = 49407  # end-of-text: the pooled output is read there (argmax / eos id)

    def run(m):
        return [o for o in m(tokens) if isinstance(o, torch.Tensor)]

    out = check(model, sd, run, spec, seed)
    out["family"] = spec.family
    out["groups"] = len(spec.groups)
    return out


def coverage_case() -> dict:
    """Real-size SD1.5/SDXL UNets and CLIP-L/SDXL CLIP on the meta device: group counts."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    from unet_configs import check_detected, meta_shapes, real_config

    out = {}
    for name in ("SD15", "SDXL"):
        shapes = meta_shapes(real_config(name))
        check_detected(shapes, name)
        out[name] = build_spec(shapes).coverage()
    for name, cls in (("SD1ClipModel", comfy.sd1_clip.SD1ClipModel), ("SDXLClipModel", comfy.sdxl_clip.SDXLClipModel)):
        with torch.device("meta"):
            m = cls(device="meta")
        spec = build_spec({k: tuple(v.shape) for k, v in m.state_dict().items()})
        out[name] = dict(spec.coverage(), towers=spec.info["towers"],
                         sample_key=next(s.key for s in spec.groups[0].slices()))
    return out


def main() -> None:
    torch.manual_seed(0)
    res = {"host": HOST.kind, "tree": str(HOST.tree), "cases": {}}
    with torch.inference_mode():
        res["cases"]["sd15_unet"] = unet_case(SD1_TINY, 1)
        res["cases"]["sdxl_unet"] = unet_case(SDXL_TINY, 2)
        res["cases"]["clip_quick_gelu"] = clip_case("quick_gelu", 3)
        res["cases"]["clip_gelu"] = clip_case("gelu", 4)
        res["coverage"] = coverage_case()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
