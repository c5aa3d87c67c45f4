"""Determinism: the same prompt run twice gives bit-identical merged weights and the same report.

One prompt holds five merges (geometric median at tensor and element scope, Karcher at block scope,
sign-elected median with a DARE drop and a fixed seed, weighted mean), each saved by CheckpointSave,
on the CPU. Between the two runs POST /free with free_memory resets ComfyUI's executor cache, so
the second run computes every merge again; its history must not list a merge node as cached.
"""
from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoints import checkpoint
from harness.graphs import Graph, load_checkpoint, merge_node
from tests.host.helpers import ckpt

pytestmark = pytest.mark.host

FAMILY = dict(arch="sd15", base_seed=0, noise=0.05)
SOLVER = {"tolerance": 1e-7, "max_iterations": 100}
MERGES = {
    "gm_tensor": ("BarycenterGeometricMedian", {**SOLVER, "eps": 1e-8, "scope": "tensor", "weights": "1,2,3"}),
    "gm_element": ("BarycenterGeometricMedian", {**SOLVER, "eps": 1e-8, "scope": "element", "weights": "1,1,2"}),
    "karcher_block": ("BarycenterKarcherMean", {**SOLVER, "scope": "block"}),
    "sign_elected": ("BarycenterSignElectedMedian", {**SOLVER, "eps": 1e-8, "scope": "tensor",
                                                     "drop_rate": 0.3, "drop_seed": 1234, "strength": 0.8}),
    "weighted_mean": ("BarycenterWeightedMean", {"weights": "0.2, 0.5, 0.3"}),
}


def _prompt(prefix: str):
    g = Graph()
    loaders = [load_checkpoint(g, ckpt(seed=s, **FAMILY)) for s in (1, 2, 3)]
    base = load_checkpoint(g, ckpt(arch="sd15", seed=0))
    models = [Graph.out(l, 0) for l in loaders]
    merge_ids, capture_ids = {}, {}
    for name, (node, settings) in MERGES.items():
        settings = {**settings, "device": "cpu"}
        if node == "BarycenterSignElectedMedian":
            settings["base_model"] = Graph.out(base, 0)
        merge_ids[name] = merge_node(g, node, models, **settings)
        capture_ids[name] = g.add("BarycenterTestCaptureText", text=Graph.out(merge_ids[name], 1))
        g.add("CheckpointSave", model=Graph.out(merge_ids[name], 0), clip=Graph.out(loaders[0], 1),
              vae=Graph.out(loaders[0], 2), filename_prefix=f"{prefix}/{name}")
    return g.prompt(), merge_ids, capture_ids


def _cached_nodes(run) -> set[str]:
    cached = set()
    for kind, data in run.messages:
        if kind == "execution_cached":
            cached.update(str(n) for n in data.get("nodes", []))
    return cached


def _report(run, node_id) -> dict:
    text = run.outputs[str(node_id)]["text"]
    return json.loads(text[0] if isinstance(text, list) else text)


def test_same_prompt_twice_gives_identical_weights_and_report(comfy, server):
    prefix = f"determinism_{int(time.time() * 1000)}"
    prompt, merge_ids, capture_ids = _prompt(prefix)
    first = comfy.run(prompt)
    assert first.status == "success", first.error_text
    print(f"[determinism] first run {first.seconds:.1f} s", file=sys.stderr)
    runs = [first]
    for attempt in range(3):
        # free_memory resets the executor (its output cache) when the worker next looks at its
        # flags: it wakes for the flag itself, so give it a moment before queueing again
        comfy.free()
        time.sleep(2.0 + 2 * attempt)
        second = comfy.run(prompt)
        assert second.status == "success", second.error_text
        if not _cached_nodes(second) & set(merge_ids.values()):
            break
    else:
        pytest.fail(f"the merges stayed cached after POST /free: {_cached_nodes(second)}")
    runs.append(second)
    assert not _cached_nodes(second) & set(merge_ids.values())

    for name, node_id in merge_ids.items():
        files = sorted((server.output_dir / prefix).glob(f"{name}_*.safetensors"))
        assert len(files) == 2, f"{name}: expected two saved checkpoints, got {files}"
        a, b = (load_file(str(f)) for f in files)
        assert a.keys() == b.keys(), name
        merged_keys = [k for k in a if k.startswith("model.diffusion_model.")]
        assert merged_keys, name
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (name, k)
            assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), \
                f"{name}: {k} differs between two runs of the same prompt"
        # the merge really did something (not model_1 saved twice)
        m1 = load_file(str(checkpoint(seed=1, **FAMILY)))
        assert any(not torch.equal(a[k], m1[k]) for k in merged_keys), name

        # the report is identical but for its wall-clock timings
        r1, r2 = (_report(r, capture_ids[name]) for r in runs)
        print(f"[determinism] {name}: merge {r1['timing']['total_s']:.1f} s, {r2['timing']['total_s']:.1f} s",
              file=sys.stderr)
        assert r1.pop("timing") and r2.pop("timing")
        assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True), name

