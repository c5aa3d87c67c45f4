"""Real key names and shapes of Stable Diffusion UNets, derived from the ldm architecture.

SD1.5: model_channels 320, channel_mult (1, 2, 4, 4), 2 res blocks per level, attention at
levels 0-2, transformer depth 1, context 768, 1x1-conv proj_in/proj_out -> 686 keys, ~859.5M params.
SDXL: model_channels 320, channel_mult (1, 2, 4), transformer depth (0, 2, 10), context 2048,
linear proj, label_emb (adm 2816) -> 1680 keys, ~2567M params.
Keys are named as ComfyUI names them ("diffusion_model." + ldm name).
"""
from __future__ import annotations


def _resblock(p, cin, cout, emb=1280):
    s = [(f"{p}.in_layers.0.weight", (cin,)), (f"{p}.in_layers.0.bias", (cin,)),
         (f"{p}.in_layers.2.weight", (cout, cin, 3, 3)), (f"{p}.in_layers.2.bias", (cout,)),
         (f"{p}.emb_layers.1.weight", (cout, emb)), (f"{p}.emb_layers.1.bias", (cout,)),
         (f"{p}.out_layers.0.weight", (cout,)), (f"{p}.out_layers.0.bias", (cout,)),
         (f"{p}.out_layers.3.weight", (cout, cout, 3, 3)), (f"{p}.out_layers.3.bias", (cout,))]
    if cin != cout:
        s += [(f"{p}.skip_connection.weight", (cout, cin, 1, 1)), (f"{p}.skip_connection.bias", (cout,))]
    return s


def _transformer(p, c, depth, ctx, linear):
    proj = (c, c) if linear else (c, c, 1, 1)
    s = [(f"{p}.norm.weight", (c,)), (f"{p}.norm.bias", (c,)),
         (f"{p}.proj_in.weight", proj), (f"{p}.proj_in.bias", (c,))]
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        s += [(f"{b}.attn1.to_q.weight", (c, c)), (f"{b}.attn1.to_k.weight", (c, c)),
              (f"{b}.attn1.to_v.weight", (c, c)), (f"{b}.attn1.to_out.0.weight", (c, c)),
              (f"{b}.attn1.to_out.0.bias", (c,)),
              (f"{b}.ff.net.0.proj.weight", (8 * c, c)), (f"{b}.ff.net.0.proj.bias", (8 * c,)),
              (f"{b}.ff.net.2.weight", (c, 4 * c)), (f"{b}.ff.net.2.bias", (c,)),
              (f"{b}.attn2.to_q.weight", (c, c)), (f"{b}.attn2.to_k.weight", (c, ctx)),
              (f"{b}.attn2.to_v.weight", (c, ctx)), (f"{b}.attn2.to_out.0.weight", (c, c)),
              (f"{b}.attn2.to_out.0.bias", (c,))]
        for n in (1, 2, 3):
            s += [(f"{b}.norm{n}.weight", (c,)), (f"{b}.norm{n}.bias", (c,))]
    s += [(f"{p}.proj_out.weight", proj), (f"{p}.proj_out.bias", (c,))]
    return s


def unet_shapes(kind: str = "sd15") -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape)] of the SD1.5 ("sd15") or SDXL ("sdxl") UNet, in ldm order."""
    if kind == "sd15":
        mult, depth, ctx, linear, adm = (1, 2, 4, 4), (1, 1, 1, 0), 768, False, None
    elif kind == "sdxl":
        mult, depth, ctx, linear, adm = (1, 2, 4), (0, 2, 10), 2048, True, 2816
    else:
        raise ValueError(f"unknown UNet kind {kind!r}")
    mc, emb, nres = 320, 1280, 2
    s = [("time_embed.0.weight", (emb, mc)), ("time_embed.0.bias", (emb,)),
         ("time_embed.2.weight", (emb, emb)), ("time_embed.2.bias", (emb,))]
    if adm:
        s += [("label_emb.0.0.weight", (emb, adm)), ("label_emb.0.0.bias", (emb,)),
              ("label_emb.0.2.weight", (emb, emb)), ("label_emb.0.2.bias", (emb,))]
    s += [("input_blocks.0.0.weight", (mc, 4, 3, 3)), ("input_blocks.0.0.bias", (mc,))]
    chans, ch, idx = [mc], mc, 1
    for lvl, m in enumerate(mult):
        for _ in range(nres):
            out = m * mc
            s += _resblock(f"input_blocks.{idx}.0", ch, out)
            ch = out
            if depth[lvl]:
                s += _transformer(f"input_blocks.{idx}.1", ch, depth[lvl], ctx, linear)
            chans.append(ch)
            idx += 1
        if lvl != len(mult) - 1:
            s += [(f"input_blocks.{idx}.0.op.weight", (ch, ch, 3, 3)), (f"input_blocks.{idx}.0.op.bias", (ch,))]
            chans.append(ch)
            idx += 1
    s += _resblock("middle_block.0", ch, ch)
    s += _transformer("middle_block.1", ch, depth[-1] if kind == "sdxl" else 1, ctx, linear)
    s += _resblock("middle_block.2", ch, ch)
    idx = 0
    for lvl, m in reversed(list(enumerate(mult))):
        for i in range(nres + 1):
            out = m * mc
            s += _resblock(f"output_blocks.{idx}.0", ch + chans.pop(), out)
            ch = out
            sub = 1
            if depth[lvl]:
                s += _transformer(f"output_blocks.{idx}.1", ch, depth[lvl], ctx, linear)
                sub = 2
            if lvl and i == nres:
                s += [(f"output_blocks.{idx}.{sub}.conv.weight", (ch, ch, 3, 3)),
                      (f"output_blocks.{idx}.{sub}.conv.bias", (ch,))]
            idx += 1
    s += [("out.0.weight", (mc,)), ("out.0.bias", (mc,)), ("out.2.weight", (4, mc, 3, 3)), ("out.2.bias", (4,))]
    return [("diffusion_model." + k, v) for k, v in s]


def clip_shapes(kind: str = "l") -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape)] of a CLIP text encoder as ComfyUI names it (clip_l: ViT-L/14, clip_g: bigG)."""
    width, layers, proj = (768, 12, None) if kind == "l" else (1280, 32, 1280)
    p = f"clip_{kind}.transformer.text_model"
    s = [(f"{p}.embeddings.token_embedding.weight", (49408, width)),
         (f"{p}.embeddings.position_embedding.weight", (77, width))]
    for i in range(layers):
        b = f"{p}.encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s += [(f"{b}.self_attn.{n}.weight", (width, width)), (f"{b}.self_attn.{n}.bias", (width,))]
        s += [(f"{b}.layer_norm1.weight", (width,)), (f"{b}.layer_norm1.bias", (width,)),
              (f"{b}.mlp.fc1.weight", (4 * width, width)), (f"{b}.mlp.fc1.bias", (4 * width,)),
              (f"{b}.mlp.fc2.weight", (width, 4 * width)), (f"{b}.mlp.fc2.bias", (width,)),
              (f"{b}.layer_norm2.weight", (width,)), (f"{b}.layer_norm2.bias", (width,))]
    s += [(f"{p}.final_layer_norm.weight", (width,)), (f"{p}.final_layer_norm.bias", (width,))]
    if proj:
        s += [(f"clip_{kind}.transformer.text_projection.weight", (proj, width))]
    return s


def synthetic_models(shapes, n_models: int = 3, seed: int = 0, spread: float = 0.01, dtype=None):
    """Deterministic fine-tune-like models: per key a base ~ N(0, 0.05^2) and n_models copies
    base + spread·0.05·N(0, 1), stored in `dtype` (default float16). Seeded per key, so another
    process (another venv with the same torch) regenerates the same tensors.
    Returns a list of n_models lists of tensors (one per key)."""
    import torch

    dtype = dtype or torch.float16
    models = [[] for _ in range(n_models)]
    for j, (_, shape) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        base = torch.randn(shape, generator=g) * 0.05
        for i in range(n_models):
            models[i].append((base + (spread * 0.05) * torch.randn(shape, generator=g)).to(dtype))
    return models


def checksum(tensors) -> float:
    import torch

    return float(sum(t.to(torch.float64).sum() for t in tensors))


def subset(shapes, fraction: float):
    """Every round(1/fraction)-th key (fraction 1: all)."""
    step = max(1, int(round(1.0 / fraction)))
    return shapes[::step]
