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

pytestmark = [pytest.mark.host, pytest.mark.weights]
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
    from harness.server import gpu_host

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
    # device changed so ComfyUI runs the node again (auto is the CPU on a CPU host): the computed
    # run's bytes. On a GPU host 'cpu' is another device, whose Grams are computed, not reused.
    again, rep = _merge(comfy, server, names, weights="1,2,3", scope="block", device="cpu")
    if not gpu_host():
        assert rep["gram"] == "reused"
        assert first.keys() == again.keys()
        assert all(first[k].dtype == again[k].dtype and first[k].equal(again[k]) for k in first)
    else:
        assert rep["gram"] == "computed" and rep["device"] == "cpu"

    _, rep = _merge(comfy, server, names, node="BarycenterKarcherMean")
    assert rep["gram"] == "computed"  # Karcher needs norms: the full Gram, another kind
    _, rep = _merge(comfy, server, names, node="BarycenterKarcherMean", weights="2,1,1")
    assert rep["gram"] == "reused"

    lora_name = lora("sd15", seed=7).name
    _, rep = _merge(comfy, server, names, lora=lora_name)
    assert rep["gram"] == "computed"  # model_2 is another object with its own patches
    _, rep = _merge(comfy, server, names, lora=lora_name, weights="1,1,2")
    assert rep["gram"] == "reused"


def _cache_module():
    """engine/gram_cache.py on its own (it imports no ComfyUI module)."""
    from harness.loading import load_file

    return load_file("engine/gram_cache.py", "barycenter_gram_cache_under_test")


class _Patcher:
    def __init__(self, weights):
        self.patches_uuid = "u"
        self.weights = weights


class _Source:
    def __init__(self, patcher, patches=None):
        self.owner = self.patcher = patcher
        self.entries = {k: [w] + list((patches or {}).get(k, [])) for k, w in patcher.weights.items()}

    def stored(self, key):
        return self.entries[key][0]


def test_cache_keys_hits_misses_and_eviction(monkeypatch):
    import torch

    gc_mod = _cache_module()
    keys = ["a", "b"]
    mk = lambda: _Patcher({"a": torch.zeros(3), "b": torch.ones(2)})  # noqa: E731
    p1, p2 = mk(), mk()
    s1, s2 = _Source(p1), _Source(p2)
    h = gc_mod.key_of([s1, s2], None, keys, "cpu", False, "eager")
    assert gc_mod.lookup(h) is None
    grams = torch.arange(8.0).view(2, 2, 2)
    gc_mod.store(h, grams)
    got = gc_mod.lookup(gc_mod.key_of([_Source(p1), _Source(p2)], None, keys, "cpu", False, "eager"))
    assert got is not None and torch.equal(got, grams) and got is not grams  # a copy: callers may not change it
    # anything else differs: a miss
    for other in ([_Source(p2), _Source(p1)], [_Source(p1), _Source(mk())],
                  [_Source(p1), _Source(p2, {"a": [("lora",)]})]):
        assert gc_mod.lookup(gc_mod.key_of(other, None, keys, "cpu", False, "eager")) is None
    for args in ((None, keys, "cpu", True, "eager"), (None, keys, "cuda:0", False, "cuda"),
                 (None, keys, "cpu", False, "fused"), (None, ["a"], "cpu", False, "eager"),
                 (_Source(mk()), keys, "cpu", False, "eager")):
        assert gc_mod.lookup(gc_mod.key_of([_Source(p1), _Source(p2)], *args)) is None
    # a new tensor for a key (same values): a miss
    p1.weights["a"] = torch.zeros(3)
    assert gc_mod.lookup(gc_mod.key_of([_Source(p1), _Source(p2)], None, keys, "cpu", False, "eager")) is None
    # only SIZE passes are kept, the least recently used go first
    gc_mod.clear()
    handles = []
    for _ in range(gc_mod.SIZE + 1):
        p = mk()
        handles.append((p, gc_mod.key_of([_Source(p), _Source(p2)], None, keys, "cpu", False, "eager")))
        gc_mod.store(handles[-1][1], grams)
    assert gc_mod.lookup(handles[0][1]) is None and gc_mod.lookup(handles[-1][1]) is not None
    # off: nothing is looked up or kept
    monkeypatch.setenv(gc_mod.ENV, "0")
    assert gc_mod.key_of([s1, s2], None, keys, "cpu", False, "eager") is None
    assert gc_mod.lookup(None) is None


def test_cache_never_matches_a_dead_input_or_one_without_weak_references():
    import gc

    import torch

    gc_mod = _cache_module()
    keys = ["a"]
    p1, p2 = _Patcher({"a": torch.zeros(3)}), _Patcher({"a": torch.ones(3)})
    h = gc_mod.key_of([_Source(p1), _Source(p2)], None, keys, "cpu", False, "eager")
    gc_mod.store(h, torch.zeros(1, 3, 3))
    key = h[0]
    del h, p1
    gc.collect()
    # a new object that took the dead one's place (same id, hence the same key) is another input
    p3 = _Patcher({"a": torch.zeros(3)})
    assert gc_mod.lookup((key, None, [_Source(p3), _Source(p2)])) is None
    assert key not in gc_mod._entries  # and the dead entry is gone

    class NoWeak:
        __slots__ = ("patches_uuid", "weights")

        def __init__(self):
            self.patches_uuid, self.weights = "u", {"a": torch.zeros(3)}

    assert gc_mod.key_of([_Source(NoWeak()), _Source(p2)], None, keys, "cpu", False, "eager") is None
