"""harness/checkpoints.py: determinism, options, detection by the host's ComfyUI, LoRA, sampling.

Runs against the host harness.host.ensure_host() picks (the snapshot, or COMFYUI_DIR). The 1.8 GiB
SDXL checkpoint with CLIP-L + CLIP-G is only made and loaded with BARYCENTER_BIG=1.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoints as ck
from harness.host import TEST_NODES, ensure_host, import_in_process
from harness.loading import load_file
from harness.paths import REPO_ROOT

BIG = os.environ.get("BARYCENTER_BIG") == "1"
UNET = "model.diffusion_model."


def unet_keys(sd):
    return [k for k in sd if k.startswith(UNET)]


# ----------------------------------------------------------------------------------------------
# pure-torch side
# ----------------------------------------------------------------------------------------------

def test_layout_is_detected_as_the_family():
    for arch, name, first_attn in (("sd15", "SD15", 1), ("sdxl", "SDXL", 4)):
        spec = ck.layout(arch)
        assert spec["detected"] == name
        attn = UNET + f"input_blocks.{first_attn}.1.transformer_blocks."
        assert any(k.startswith(attn) for k, _, _ in spec["tensors"])
        assert any(k.startswith("first_stage_model.taesd_decoder.") for k, _, _ in spec["tensors"])
        assert not any(k.startswith(("cond_stage_model.", "conditioner.")) for k, _, _ in spec["tensors"])
    sd15 = {k: s for k, s, _ in ck.layout("sd15")["tensors"]}
    assert sd15[UNET + "input_blocks.1.1.proj_in.weight"] == [320, 320, 1, 1]  # no linear proj
    assert UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight" in sd15
    sdxl = {k: s for k, s, _ in ck.layout("sdxl")["tensors"]}
    assert sdxl[UNET + "label_emb.0.0.weight"] == [1280, 2816]
    assert sdxl[UNET + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"] == [320, 2048]
    assert UNET + "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight" in sdxl


def test_clip_layouts_have_every_layer():
    l = {k for k, _, _ in ck.layout("sd15", clip=True)["tensors"]}
    assert sum(k.endswith("mlp.fc1.weight") for k in l if k.startswith("cond_stage_model.")) == 12
    if BIG:
        x = {k for k, _, _ in ck.layout("sdxl", clip=True)["tensors"]}
        assert sum(k.endswith("mlp.fc1.weight") for k in x if k.startswith("conditioner.embedders.0.")) == 12
        assert sum(k.endswith("mlp.c_fc.weight") for k in x if k.startswith("conditioner.embedders.1.")) == 32


def test_layouts_agree_between_hosts():
    """Snapshot and current ComfyUI lay the files out identically, so they share cached files."""
    current = os.environ.get("COMFYUI_DIR")
    if not current:
        pytest.skip("COMFYUI_DIR not set: only one host to compare")
    for arch, clip in (("sd15", False), ("sd15", True), ("sdxl", False)):
        assert ck.layout(arch, clip, host="snapshot")["tensors"] == ck.layout(arch, clip, host=current)["tensors"]


def test_same_arguments_same_bytes(tmp_path):
    first = ck.checkpoint("sd15", seed=11, base_seed=0, noise=0.1)
    t = time.perf_counter()
    assert ck.checkpoint("sd15", seed=11, base_seed=0, noise=0.1) == first
    assert time.perf_counter() - t < 1.0, "a cached checkpoint must come back at once"
    # regenerate from scratch in another process and cache folder (the CLI): byte-identical
    shutil.copytree(ck.CHECKPOINTS / "specs", tmp_path / "checkpoints" / "specs")
    env = dict(os.environ, BARYCENTER_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "harness.checkpoints", "sd15", "--seed", "11",
                           "--base-seed", "0", "--noise", "0.1", "--host", str(ensure_host().tree)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    again = Path(proc.stdout.strip())
    assert again == tmp_path / "checkpoints" / first.name
    assert ck.file_sha256(again) == ck.file_sha256(first)
    assert ck.read_options(first) == {"arch": "sd15", "seed": 11, "clip": False, "dtype": "fp16",
                                      "base_seed": 0, "noise": 0.1, "scale": 1.0, "offset": 0.0}
    assert [p.name for p in again.parent.iterdir() if p.suffix == ".tmp"] == []


def test_seeds_dtypes_and_values():
    a = ck.load_state_dict(ck.checkpoint("sd15", seed=0))
    b = ck.load_state_dict(ck.checkpoint("sd15", seed=1))
    assert a.keys() == b.keys()
    w = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(a[w], b[w])
    assert a[w].dtype == torch.float16
    assert abs(a[w].float().std().item() - 1 / math.sqrt(320)) < 0.003  # N(0, 1/fan_in)
    assert torch.equal(a[UNET + "out.0.weight"], torch.ones(320, dtype=torch.float16))  # norm scale
    dec_bias = [k for k in a if k.startswith("first_stage_model.taesd_decoder.") and k.endswith(".bias")
                and a[k].shape == (3,)]
    assert len(dec_bias) == 1 and torch.equal(a[dec_bias[0]], torch.full((3,), 0.5, dtype=torch.float16))
    for v in a.values():
        assert torch.isfinite(v.float()).all()

    for dtype, unet_dt, other_dt in (("fp32", torch.float32, torch.float32),
                                     ("bf16", torch.bfloat16, torch.bfloat16),
                                     ("fp8_e4m3fn", torch.float8_e4m3fn, torch.float16)):
        sd = ck.load_state_dict(ck.checkpoint("sd15", seed=0, dtype=dtype))
        assert {sd[k].dtype for k in unet_keys(sd)} == {unet_dt}
        assert {v.dtype for k, v in sd.items() if not k.startswith(UNET)} == {other_dt}
        # the same underlying values, only stored differently
        tol = {"fp32": 1e-3, "bf16": 1e-2, "fp8_e4m3fn": 0.08}[dtype]
        rel = (sd[w].float() - a[w].float()).norm() / a[w].float().norm()
        assert rel < tol, (dtype, rel)


def test_fine_tunes_of_one_base_and_outliers():
    base = ck.load_state_dict(ck.checkpoint("sd15", seed=0))
    ft1 = ck.load_state_dict(ck.checkpoint("sd15", seed=1, base_seed=0, noise=0.1))
    ft2 = ck.load_state_dict(ck.checkpoint("sd15", seed=2, base_seed=0, noise=0.1))
    out = ck.load_state_dict(ck.checkpoint("sd15", seed=1, base_seed=0, noise=0.1, scale=50))
    same = ck.load_state_dict(ck.checkpoint("sd15", seed=5, base_seed=0, noise=0.0))
    shifted = ck.load_state_dict(ck.checkpoint("sd15", seed=0, offset=3.0))
    w = UNET + "output_blocks.1.0.in_layers.2.weight"
    b, d1, d2, do = base[w].double(), ft1[w].double() - base[w].double(), ft2[w].double() - base[w].double(), \
        out[w].double() - base[w].double()
    assert 0.08 < d1.std() / b.std() < 0.12  # base + noise * sigma * N(seed)
    assert abs(torch.corrcoef(torch.stack([d1.flatten(), d2.flatten()]))[0, 1]) < 0.02  # independent
    assert 45 < do.std() / d1.std() < 55  # outlier: base + 50 * noise
    assert torch.corrcoef(torch.stack([do.flatten(), d1.flatten()]))[0, 1] > 0.95  # same direction
    for k in base:
        assert torch.equal(same[k], base[k]), k  # noise 0 == the base
        if k.startswith("first_stage_model."):
            assert torch.equal(ft1[k], base[k]) and torch.equal(out[k], base[k])  # VAE is the base's
    n = UNET + "input_blocks.1.0.in_layers.0.weight"  # a GroupNorm scale (1): noise with sigma 0.02
    assert 0.001 < (ft1[n].float() - 1).abs().mean() < 0.004
    assert abs((shifted[w].double() - b).mean() - 3 / math.sqrt(w_fan_in(base[w]))) < 1e-3
    with pytest.raises(ValueError):
        ck.checkpoint("sd15", seed=1, noise=0.1)  # noise without a base


def w_fan_in(t):
    return math.prod(t.shape[1:])


def test_lora_file_shape():
    p = ck.lora("sd15", seed=0, rank=4)
    assert p.parent == ck.LORAS
    sd = ck.load_state_dict(p)
    targets = ck.lora_targets(ck.layout("sd15"))
    assert len(sd) == 3 * len(targets) and len(targets) >= 20
    up = sd["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"]
    down = sd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"]
    assert up.shape == (320, 4, 1, 1) and down.shape == (4, 320, 1, 1)
    assert sd["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (4, 320, 3, 3)
    assert sd["lora_unet_input_blocks_1_1_proj_in.alpha"].item() == 4.0
    assert ck.lora("sd15", seed=0, rank=4) == p


def test_zero_conditioning_node_shapes():
    nodes = _test_nodes()
    node = nodes.NODE_CLASS_MAPPINGS["BarycenterTestZeroConditioning"]()
    (c15,) = node.zero("sd15")
    assert c15[0][0].shape == (1, 77, 768) and c15[0][1] == {}
    (cxl,) = node.zero("sdxl", width=64, height=96)
    assert cxl[0][0].shape == (1, 77, 2048) and cxl[0][1]["pooled_output"].shape == (1, 1280)
    assert cxl[0][1]["width"] == 64 and cxl[0][1]["target_height"] == 96
    assert set(nodes.BarycenterTestZeroConditioning.INPUT_TYPES()["required"]["arch"][0]) == {"sd15", "sdxl"}


def _test_nodes():
    return load_file(str(TEST_NODES.relative_to(REPO_ROOT) / "__init__.py"), "barycenter_test_nodes")


# ----------------------------------------------------------------------------------------------
# in the host's ComfyUI (in-process)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfy_host():
    host = import_in_process(ensure_host())
    import comfy.sd  # noqa: F401  (fails early if the tree cannot be imported)

    return host


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(path, clip):
    import comfy.sd

    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    try:
        with torch.inference_mode():
            model, clip_obj, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=clip)
    finally:
        logging.getLogger().removeHandler(handler)
    return model, clip_obj, vae, handler.messages


def _assert_loaded(arch, model, clip_obj, vae, warnings, clip):
    expected = {"sd15": ("BaseModel", "SD15"), "sdxl": ("SDXL", "SDXL")}[arch]
    assert (type(model.model).__name__, type(model.model.model_config).__name__) == expected
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert not any("Missing VAE keys" in m for m in warnings), warnings
    if clip:
        assert clip_obj is not None
        missing = [m for m in warnings if m.startswith("clip missing")]
        # the snapshot lists the two keys every SD1.5 checkpoint lacks (text_projection, logit_scale)
        for m in missing:
            assert "layers" not in m and "resblocks" not in m, m


CASES = [("sd15", False), ("sd15", True), ("sdxl", False)] + ([("sdxl", True)] if BIG else [])


@pytest.mark.parametrize("arch,clip", CASES)
def test_detected_by_checkpoint_loader(comfy_host, arch, clip):
    model, clip_obj, vae, warnings = _load(ck.checkpoint(arch, seed=0, clip=clip), clip)
    _assert_loaded(arch, model, clip_obj, vae, warnings, clip)
    if clip:
        with torch.inference_mode():
            tokens = clip_obj.tokenize("a photo of a cat")
            cond, pooled = clip_obj.encode_from_tokens(tokens, return_pooled=True)
        width = {"sd15": 768, "sdxl": 2048}[arch]
        assert cond.shape == (1, 77, width) and torch.isfinite(cond).all() and cond.std() > 0.1
        assert torch.isfinite(pooled).all()


def test_fp8_checkpoint_loads(comfy_host):
    model, _, vae, warnings = _load(ck.checkpoint("sd15", seed=0, dtype="fp8_e4m3fn"), False)
    _assert_loaded("sd15", model, None, vae, warnings, False)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampling_gives_a_finite_non_degenerate_image(comfy_host, arch):
    import nodes

    model, _, vae, _ = _load(ck.checkpoint(arch, seed=0), False)
    zero = _test_nodes().zero_conditioning(arch, 64, 64)
    with torch.inference_mode():
        (latent,) = nodes.common_ksampler(model, 1, 2, 7.0, "euler", "normal", zero, zero,
                                          {"samples": torch.zeros(1, 4, 8, 8)})
        img = vae.decode(latent["samples"])
    assert img.shape == (1, 64, 64, 3)
    assert torch.isfinite(img).all()
    assert 0.2 < img.mean().item() < 0.8 and img.std().item() > 0.05, (img.mean(), img.std())


def test_lora_loader_patches_the_weights(comfy_host):
    import comfy.lora
    import folder_paths
    import nodes

    p = ck.lora("sd15", seed=0)
    lsd = ck.load_state_dict(p)
    folder_paths.add_model_folder_path("loras", str(p.parent))
    model, _, _, _ = _load(ck.checkpoint("sd15", seed=0), False)
    targets = ck.lora_targets(ck.layout("sd15"))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert len(comfy.lora.load_lora(lsd, key_map)) == len(targets)  # every LoRA key is understood
    with torch.inference_mode():
        patched_model, _ = nodes.LoraLoader().load_lora(model, None, p.name, 1.0, 0.0)
        before = {k: v.clone() for k, v in model.model.state_dict().items()}
        patched_model.patch_model()
        try:
            after = {k: v.clone() for k, v in patched_model.model.state_dict().items()}
        finally:
            patched_model.unpatch_model()
        restored = model.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"diffusion_model." + k for k, _ in targets}
    k = "diffusion_model.input_blocks.1.1.proj_in.weight"
    up = lsd["lora_unet_input_blocks_1_1_proj_in.lora_up.weight"].float().flatten(1)
    down = lsd["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].float().flatten(1)
    diff = after[k].float() - before[k].float()
    assert torch.allclose(diff, (up @ down).reshape(diff.shape), atol=1e-5)
    assert diff.std() > 0.3 * before[k].float().std()  # clearly visible
    assert all(torch.equal(before[k], restored[k]) for k in before)
