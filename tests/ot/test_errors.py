"""Bad input to OT fusion: each case is a MergeInputError whose message names the problem."""
from __future__ import annotations

import pytest
import torch

from ot_helpers import random_state_dict
from kernels.errors import MergeInputError
from kernels.ot import build_spec, ot_fuse


@pytest.fixture(scope="module")
def pair(tiny_shapes):
    shapes = tiny_shapes["clip"]
    a = random_state_dict(shapes, 1)
    b = random_state_dict(shapes, 2)
    return shapes, a, b


def fuse(shapes, *sds, **kw):
    return ot_fuse(lambda i, k: sds[i][k], shapes, len(sds), **kw)


def test_different_architectures_shape_tables(tiny_shapes):
    s15, sxl = tiny_shapes["sd15"], tiny_shapes["sdxl"]
    with pytest.raises(MergeInputError, match=r"model_2 has a different architecture from model_1"):
        ot_fuse(lambda i, k: None, [s15, sxl], 2)
    other = dict(s15)
    k = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    other[k] = (32, 64, 3, 3)
    with pytest.raises(MergeInputError, match=r"model_3 .*in_layers\.2\.weight is \[32, 64, 3, 3\]"):
        ot_fuse(lambda i, k: None, [s15, s15, other], 3)


def test_different_architectures_at_read_time(tiny_shapes):
    shapes = tiny_shapes["clip"]
    a = random_state_dict(shapes, 1)
    b = dict(a)
    k = "clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    b[k] = torch.zeros(128, 128)
    with pytest.raises(MergeInputError, match=r"model_2 has a different architecture.*mlp\.fc1\.weight is \[128, 128\]"):
        fuse(shapes, a, b)


def test_architecture_without_spec():
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_in.bias": (128,)}
    with pytest.raises(MergeInputError, match=r"no spec for this architecture"):
        ot_fuse(lambda i, k: torch.zeros(shapes[k]), shapes, 2)


def test_unknown_unet_variant_is_refused_not_guessed(tiny_shapes):
    shapes = dict(tiny_shapes["sd15"])
    shapes["diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.weight"] = (64, 64)  # video UNet
    with pytest.raises(MergeInputError, match=r"does not know this sd1-unet architecture.*time_stack"):
        build_spec(shapes)
    shapes = dict(tiny_shapes["sd15"])
    del shapes["diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"]
    with pytest.raises(MergeInputError, match=r"ff"):
        build_spec(shapes)


def test_unknown_clip_key_is_refused(tiny_shapes):
    shapes = dict(tiny_shapes["clip"])
    shapes["clip_l.transformer.text_model.encoder.layers.0.self_attn.rotary.weight"] = (64,)
    with pytest.raises(MergeInputError, match=r"not covered.*rotary"):
        build_spec(shapes)


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf"), "x"])
def test_epsilon_must_be_positive(pair, eps):
    shapes, a, b = pair
    with pytest.raises(MergeInputError, match=r"epsilon must be > 0"):
        fuse(shapes, a, b, solver="sinkhorn", epsilon=eps)


@pytest.mark.parametrize("anchor", [2, 5, -1])
def test_anchor_out_of_range(pair, anchor):
    shapes, a, b = pair
    with pytest.raises(MergeInputError, match=r"anchor .* out of range \(1\.\.2\)"):
        fuse(shapes, a, b, anchor=anchor)


def test_other_parameters(pair):
    shapes, a, b = pair
    with pytest.raises(MergeInputError, match=r"unknown solver"):
        fuse(shapes, a, b, solver="hungarian")
    with pytest.raises(MergeInputError, match=r"unknown barycenter"):
        fuse(shapes, a, b, barycenter="median")
    with pytest.raises(MergeInputError, match=r"rounds"):
        fuse(shapes, a, b, rounds=0)
    with pytest.raises(MergeInputError, match=r"3 weights for 2 models"):
        fuse(shapes, a, b, weights="1,2,3")
    with pytest.raises(MergeInputError, match=r"at least 2 models"):
        fuse(shapes, a)


def test_nan_weights_are_named(pair):
    shapes, a, b = pair
    b = dict(b)
    k = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    b[k] = b[k].clone()
    b[k][0, 0] = float("nan")
    with pytest.raises(MergeInputError, match=r"layers\.0\.mlp\.fc1\.weight': model_2 contains NaN/Inf"):
        fuse(shapes, a, b)


def test_nan_in_a_fixed_key_is_named(pair):
    shapes, a, b = pair
    b = dict(b)
    k = "clip_l.transformer.text_model.final_layer_norm.weight"
    b[k] = b[k].clone()
    b[k][3] = float("inf")
    with pytest.raises(MergeInputError, match=r"final_layer_norm\.weight': model_2 contains Inf"):
        fuse(shapes, a, b)
