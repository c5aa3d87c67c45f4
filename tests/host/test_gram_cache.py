"""Gram reuse across prompts (engine/gram_cache.py) in a real ComfyUI.

A merge re-queued on the same inputs with other weights, scope or device reuses the Grams and
saves exactly the bytes a computed run saves (and the kernel result from the files); another
method's Gram kind, or a changed input (a LoRA on one model) computes again.
"""
from __future__ import annotations

import itertools
import json

import pytest

from harness.graphs import Graph, load_checkpoint, merge_node
from tests.host.helpers import saved_checkpoint, unet
from tests.host.test_robust_nodes import NODES, assert_linear_close, capture, captured, expected_linear, family

pytestmark = pytest.mark.host
_n = itertools.count()


def _merge(comfy, server, names, node="BarycenterGeometricMedian", lora=None, **settings):
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    models = [Graph.out(l, 0) for l in loaders]
    if lora is not None:
        models[1] = Graph.out(g.add("LoraLoader", model=models[1], clip=Graph.out(loaders[1], 1), lora_name=lora,
                                    strength_model=0.8, strength_clip=0.0), 0)
    merged = merge_node(g, node, models, **{**NODES[node][1], **settings})
    report = capture(g, merged)
    prefix = f"checkpoints/gram_cache_{next(_n)}"
    g.add("CheckpointSave", model=Graph.out(merged, 0), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=prefix)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    return unet(saved_checkpoint(server, prefix)), captured(run, report)


def test_grams_reused_for_other_settings_with_the_same_bytes(comfy, server):
    from harness.checkpoints import lora

    names, xs = family([1, 2, 3])
    first, rep = _merge(comfy, server, names, weights="1,2,3", scope="block")
    assert rep["gram"] == "computed"
    other, rep = _merge(comfy, server, names, weights="", scope="tensor")
    assert rep["gram"] == "reused"
    from tests.host.test_report import rep as report_module
    text = report_module.summary(report_module.parse_report(json.dumps(rep)))
    assert "Grams reused from an earlier merge" in text, text
    settings = NODES["BarycenterGeometricMedian"][1]
    expected, _, scale = expected_linear("geometric_median", xs, settings)
    assert_linear_close(other, expected, scale)
    # device changed so ComfyUI runs the node again (auto is the CPU here): the computed run's bytes
    again, rep = _merge(comfy, server, names, weights="1,2,3", scope="block", device="cpu")
    assert rep["gram"] == "reused"
    assert first.keys() == again.keys()
    assert all(first[k].dtype == again[k].dtype and first[k].equal(again[k]) for k in first)

    _, rep = _merge(comfy, server, names, node="BarycenterKarcherMean")
    assert rep["gram"] == "computed"  # Karcher needs norms: the full Gram, another kind
    _, rep = _merge(comfy, server, names, node="BarycenterKarcherMean", weights="2,1,1")
    assert rep["gram"] == "reused"

    lora_name = lora("sd15", seed=7).name
    _, rep = _merge(comfy, server, names, lora=lora_name)
    assert rep["gram"] == "computed"  # model_2 is another object with its own patches
    _, rep = _merge(comfy, server, names, lora=lora_name, weights="1,1,2")
    assert rep["gram"] == "reused"
