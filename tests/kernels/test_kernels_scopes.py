"""Scope map (block_of / scope_units) and the method registry."""
from __future__ import annotations

import pytest
import torch

from bench._shapes import clip_shapes, unet_shapes
from kernels import REGISTRY, MergeInputError, block_of, gram_matrix, resolve, scope_units, solve


def test_examples_from_the_spec():
    assert block_of("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == "input_blocks.4"
    assert block_of("diffusion_model.middle_block.1.proj_in.weight") == "middle_block"
    assert block_of("diffusion_model.out.2.weight") == "out"
    assert block_of("diffusion_model.output_blocks.11.1.norm.bias") == "output_blocks.11"
    assert block_of("diffusion_model.time_embed.0.weight") == "time_embed"
    assert block_of("diffusion_model.label_emb.0.2.bias") == "label_emb"
    assert block_of("clip_l.transformer.text_model.encoder.layers.7.mlp.fc1.weight") == "clip_l.layers.7"
    assert block_of("clip_g.transformer.text_model.encoder.layers.30.self_attn.q_proj.bias") == "clip_g.layers.30"
    assert block_of("clip_l.transformer.text_model.embeddings.token_embedding.weight") == "clip_l.embeddings"
    assert block_of("clip_g.transformer.text_model.final_layer_norm.weight") == "clip_g.final_layer_norm"
    assert block_of("clip_g.transformer.text_projection.weight") == "clip_g.text_projection"
    assert block_of("clip_l.logit_scale") == "clip_l.logit_scale"


def test_numbered_blocks_of_other_diffusion_models_and_t5():
    """ComfyUI's names for Flux, SD3 and DiT-style models, and its T5 encoder: one block per entry
    of a numbered block list; other top-level modules stay whole."""
    assert block_of("diffusion_model.double_blocks.3.img_attn.qkv.weight") == "double_blocks.3"
    assert block_of("diffusion_model.single_blocks.37.linear1.weight") == "single_blocks.37"
    assert block_of("diffusion_model.joint_blocks.12.context_block.attn.qkv.weight") == "joint_blocks.12"
    assert block_of("diffusion_model.blocks.0.self_attn.q.weight") == "blocks.0"
    assert block_of("diffusion_model.double_layers.2.attn.w1q.weight") == "double_layers.2"
    assert block_of("diffusion_model.img_in.weight") == "img_in"
    assert block_of("diffusion_model.final_layer.adaLN_modulation.1.bias") == "final_layer"
    assert block_of("diffusion_model.time_in.in_layer.weight") == "time_in"
    assert block_of("t5xxl.transformer.encoder.block.5.layer.1.DenseReluDense.wi_0.weight") == "t5xxl.layers.5"
    assert block_of("t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") \
        == "t5xxl.layers.0"
    assert block_of("t5xxl.transformer.shared.weight") == "t5xxl.embeddings"
    assert block_of("t5xxl.transformer.encoder.final_layer_norm.weight") == "t5xxl.final_layer_norm"


def test_checkpoint_names_and_fallback():
    assert block_of("model.diffusion_model.input_blocks.1.0.in_layers.2.weight") == "input_blocks.1"
    assert block_of("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc2.bias") == "clip_l.layers.3"
    assert block_of("conditioner.embedders.1.model.transformer.resblocks.30.attn.in_proj_weight") == "clip_g.layers.30"
    assert block_of("conditioner.embedders.1.model.ln_final.weight") == "clip_g.final_layer_norm"
    assert block_of("first_stage_model.encoder.down.0.block.0.conv1.weight") == "first_stage_model"
    assert block_of("diffusion_model.some_adapter.3.weight") == "some_adapter"
    assert block_of("alpha") == "alpha"


def test_sd15_and_sdxl_unets_and_clips_partition_into_the_expected_blocks():
    sd15 = [k for k, _ in unet_shapes("sd15")]
    blocks = {block_of(k) for k in sd15}
    assert len(sd15) == 686
    assert blocks == {"time_embed", "middle_block", "out"} | {f"input_blocks.{i}" for i in range(12)} | {
        f"output_blocks.{i}" for i in range(12)}
    sdxl = [k for k, _ in unet_shapes("sdxl")]
    assert {block_of(k) for k in sdxl} == {"time_embed", "label_emb", "middle_block", "out"} | {
        f"input_blocks.{i}" for i in range(9)} | {f"output_blocks.{i}" for i in range(9)}
    cl = {block_of(k) for k, _ in clip_shapes("l")}
    assert cl == {"clip_l.embeddings", "clip_l.final_layer_norm"} | {f"clip_l.layers.{i}" for i in range(12)}
    cg = {block_of(k) for k, _ in clip_shapes("g")}
    assert cg == {"clip_g.embeddings", "clip_g.final_layer_norm", "clip_g.text_projection"} | {
        f"clip_g.layers.{i}" for i in range(32)}


def test_scope_units_partition():
    keys = [k for k, _ in unet_shapes("sd15")] + [k for k, _ in clip_shapes("l")]
    for scope, count in (("tensor", len(keys)), ("element", len(keys)), ("block", 27 + 14), ("model", 1)):
        units = scope_units(keys, scope)
        assert len(units) == count
        assert sorted(i for u in units for i in u) == list(range(len(keys)))
    with pytest.raises(MergeInputError, match="unknown scope 'layer'"):
        scope_units(keys, "layer")


def test_block_scope_is_the_solve_on_summed_grams():
    """Summing the keys' Grams == the Gram of their concatenation: one solve per block."""
    xs1 = [torch.randn(30, dtype=torch.float64) for _ in range(3)]
    xs2 = [torch.randn(20, dtype=torch.float64) for _ in range(3)]
    cat = [torch.cat([a, b]) for a, b in zip(xs1, xs2)]
    g = gram_matrix(xs1) + gram_matrix(xs2)
    for m in ("geometric_median", "karcher"):
        assert torch.allclose(solve(m, g[None], None).coeffs, solve(m, gram_matrix(cat)[None], None).coeffs,
                              rtol=1e-10, atol=1e-12)


def test_registry_contents():
    assert {"weighted_mean", "geometric_median", "karcher", "element_median", "sign_elected_median"} <= set(REGISTRY)
    for name, info in REGISTRY.items():
        assert info.name == name and "Math." in info.doc and "References:" in info.doc
        assert info.linear == (info.solver is not None)
        assert (info.merge_tensors is not None) or info.linear
    assert REGISTRY["geometric_median"].scopes == ("tensor", "block", "model", "element")
    assert REGISTRY["sign_elected_median"].needs_base
    assert resolve("geometric_median", "element") is REGISTRY["element_median"]
    assert resolve("karcher", "block") is REGISTRY["karcher"]
    with pytest.raises(MergeInputError, match="does not support scope 'element'"):
        resolve("karcher", "element")
    g = gram_matrix([torch.randn(4), torch.randn(4)])[None]
    sol = solve("weighted_mean", g, [1, 3], tol=1e-3)  # another method's parameter: ignored
    assert sol.coeffs.tolist() == [[0.25, 0.75]]


def test_merge_tensors_entry_points():
    xs = [torch.randn(10) for _ in range(3)]
    base = torch.randn(10)
    out, rec = REGISTRY["element_median"].merge_tensors(xs, base=None, weights=torch.ones(3) / 3, strength=1.0)
    assert out.shape == (10,) and rec == {}
    out, rec = REGISTRY["sign_elected_median"].merge_tensors(xs, base=base, weights=None, strength=1.0,
                                                             drop_rate=0.1, seed=2, key="k")
    assert out.shape == (10,) and "coefficients" in rec
    for name, kw in (("element_median", {}), ("sign_elected_median", {"key": "k"})):  # as the engine calls them
        out, _ = REGISTRY[name].merge_tensors(xs, base=base, weights=None, strength=1.0, out_dtype=torch.float16, **kw)
        assert out.dtype == torch.float16
