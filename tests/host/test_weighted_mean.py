"""BarycenterWeightedMean in a real ComfyUI, through the HTTP API only."""
from __future__ import annotations

import itertools

import pytest
import torch

from harness.graphs import Graph, conditioning, load_checkpoint, merge_node, sample_and_save
from tests.host.helpers import (assert_close_to, assert_non_degenerate, ckpt, image_array, saved_checkpoint,
                                sd15_family, storage_rounding, tensors_hash, unet)
from harness.checkpoints import load_state_dict, checkpoint

pytestmark = [pytest.mark.host, pytest.mark.weights]
_prefix = itertools.count()


def prefix(name: str) -> str:
    return f"checkpoints/{name}_{next(_prefix)}"


def test_nodes_are_registered(comfy):
    for node in ("BarycenterWeightedMean", "BarycenterWeightedMeanCLIP"):
        info = comfy.object_info(node)[node]
        req, opt = info["input"]["required"], info["input"].get("optional", {})
        label = "clip" if node.endswith("CLIP") else "model"
        assert {f"{label}_1", f"{label}_2", "weights", "device"} <= set(req)
        assert {f"{label}_{i}" for i in range(3, 9)} <= set(opt)
        assert info["output"] == ["CLIP" if label == "clip" else "MODEL", "STRING"]


PACK_NODES = [f"Barycenter{m}{t}" for m in ("WeightedMean", "GeometricMedian", "KarcherMean", "OTFusion")
              for t in ("", "CLIP")] + ["BarycenterSignElectedMedian", "BarycenterMergeReport"]


def test_every_node_has_a_description_and_every_input_a_tooltip(comfy):
    """What the editor shows on hover: the node's description and each input's tooltip, as the
    host serves them in /object_info (the pack's nodes, not the test-only ones)."""
    info = comfy.object_info()
    ours = sorted(k for k in info if k.startswith("Barycenter") and not k.startswith("BarycenterTest"))
    assert ours == sorted(PACK_NODES), ours
    missing = []
    for node in ours:
        if len(info[node].get("description", "").strip()) < 20:
            missing.append(f"{node}: description")
        for group in ("required", "optional"):
            for name, spec in info[node]["input"].get(group, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if len(str(opts.get("tooltip", "")).strip()) < 10:
                    missing.append(f"{node}.{name}: tooltip")
    assert not missing, missing


def _merge_3(g: Graph, names, weights="1,2,1"):
    loaders = [load_checkpoint(g, n) for n in names]
    merged = merge_node(g, "BarycenterWeightedMean", [Graph.out(l, 0) for l in loaders], weights=weights)
    return loaders, merged


def test_weighted_mean_samples_an_image(comfy):
    g = Graph()
    loaders, merged = _merge_3(g, sd15_family(3))
    pos, neg = conditioning(g, "sd15")
    save = sample_and_save(g, Graph.out(merged), Graph.out(loaders[0], 2), pos, neg, prefix="wm_image")
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    assert_non_degenerate(image_array(comfy, run, save))


def test_weighted_mean_checkpoint_equals_formula(comfy, server):
    names = sd15_family(3)
    g = Graph()
    loaders, merged = _merge_3(g, names)
    p = prefix("wm_formula")
    g.add("CheckpointSave", model=Graph.out(merged), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=p)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    out = unet(saved_checkpoint(server, p))
    xs = [unet(load_state_dict(checkpoint(arch="sd15", seed=1 + i, base_seed=0, noise=0.05))) for i in range(3)]
    assert set(out) == set(xs[0]) and len(out) > 100
    for k in out:
        exact = (xs[0][k].double() + 2 * xs[1][k].double() + xs[2][k].double()) / 4
        assert_close_to(out[k], exact, k)


def _baked(comfy, server, build) -> dict[str, torch.Tensor]:
    """Run `build(g) -> (model_link, loader)` and save the model; returns the saved UNet."""
    g = Graph()
    model, loader = build(g)
    p = prefix("baked")
    g.add("CheckpointSave", model=model, clip=Graph.out(loader, 1), vae=Graph.out(loader, 2), filename_prefix=p)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    return unet(saved_checkpoint(server, p))


def test_effective_weights_lora_and_modelmergesimple(comfy, server):
    """Inputs carrying a LoRA or a ModelMergeSimple merge are merged by their effective weights."""
    a, b, c = sd15_family(3)
    from harness.checkpoints import lora

    lora_name = lora("sd15", seed=7).name

    def lora_model(g):
        ld = load_checkpoint(g, a)
        lm = g.add("LoraLoader", model=Graph.out(ld, 0), clip=Graph.out(ld, 1), lora_name=lora_name,
                   strength_model=1.0, strength_clip=1.0)
        return Graph.out(lm, 0), ld

    def mms_model(g):
        l1, l2 = load_checkpoint(g, b), load_checkpoint(g, c)
        mm = g.add("ModelMergeSimple", model1=Graph.out(l1, 0), model2=Graph.out(l2, 0), ratio=0.3)
        return Graph.out(mm, 0), l1

    lora_baked = _baked(comfy, server, lora_model)
    plain_a = unet(load_state_dict(checkpoint(arch="sd15", seed=1, base_seed=0, noise=0.05)))
    assert any(not torch.equal(lora_baked[k], plain_a[k].to(lora_baked[k].dtype)) for k in plain_a), \
        "the LoRA did not change model A: the test could not tell effective from stored weights"
    mms_baked = _baked(comfy, server, mms_model)

    def merged_of_patched(g):
        m1, ld = lora_model(g)
        m2, _ = mms_model(g)
        m3 = Graph.out(load_checkpoint(g, c), 0)
        node = merge_node(g, "BarycenterWeightedMean", [m1, m2, m3], weights="1,2,1")
        return Graph.out(node, 0), ld

    got = _baked(comfy, server, merged_of_patched)
    third = unet(load_state_dict(checkpoint(arch="sd15", seed=3, base_seed=0, noise=0.05)))
    for k in got:
        terms = (lora_baked[k].double(), 2 * mms_baked[k].double(), third[k].double())
        exact = sum(terms) / 4
        # on an fp16 host the merge reads the inputs' effective weights unrounded, the baked
        # copies are rounded: their roundings are relative to the terms, not to the result
        scale = sum(t.abs() for t in terms) / 4
        assert_close_to(got[k], exact, k, ulps=8, extra=storage_rounding(got[k], exact, scale))


def test_inputs_unchanged_after_merge(comfy, server):
    names = sd15_family(3)
    files_before = [tensors_hash(load_state_dict(checkpoint(arch="sd15", seed=1 + i, base_seed=0, noise=0.05)))
                    for i in range(3)]
    g = Graph()
    loaders, merged = _merge_3(g, names)
    pos, neg = conditioning(g, "sd15")
    sample_and_save(g, Graph.out(merged), Graph.out(loaders[0], 2), pos, neg, prefix="wm_unchanged")
    p = prefix("input_after")
    g.add("CheckpointSave", model=Graph.out(loaders[0], 0), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=p)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    after = unet(saved_checkpoint(server, p))
    original = unet(load_state_dict(checkpoint(arch="sd15", seed=1, base_seed=0, noise=0.05)))
    for k in original:
        assert torch.equal(after[k].float(), original[k].float()), f"model_1's {k} changed after the merge"
    files_after = [tensors_hash(load_state_dict(checkpoint(arch="sd15", seed=1 + i, base_seed=0, noise=0.05)))
                   for i in range(3)]
    assert files_before == files_after


@pytest.mark.parametrize("case,weights,needle", [
    ("wrong_length", "1,2", "3"),
    ("negative", "1,-1,1", "-1"),
    ("all_zero", "0,0,0", "zero"),
    ("text", "a,b,c", "a"),
])
def test_bad_weights_error_then_next_prompt_works(comfy, case, weights, needle):
    g = Graph()
    loaders, merged = _merge_3(g, sd15_family(3), weights=weights)
    pos, neg = conditioning(g, "sd15")
    sample_and_save(g, Graph.out(merged), Graph.out(loaders[0], 2), pos, neg, prefix=f"bad_{case}")
    run = comfy.run(g.prompt())
    assert run.status == "error"
    assert "weight" in run.error_text and needle in run.error_text, run.error_text
    test_weighted_mean_samples_an_image(comfy)


def test_sd15_with_sdxl_is_refused_then_next_prompt_works(comfy):
    g = Graph()
    l1, l2 = load_checkpoint(g, ckpt(arch="sd15", seed=1)), load_checkpoint(g, ckpt(arch="sdxl", seed=1))
    merged = merge_node(g, "BarycenterWeightedMean", [Graph.out(l1, 0), Graph.out(l2, 0)])
    pos, neg = conditioning(g, "sd15")
    sample_and_save(g, Graph.out(merged), Graph.out(l1, 2), pos, neg, prefix="bad_arch")
    run = comfy.run(g.prompt())
    assert run.status == "error"
    assert "model_2" in run.error_text and "SDXL" in run.error_text and "SD15" in run.error_text, run.error_text
    test_weighted_mean_samples_an_image(comfy)
