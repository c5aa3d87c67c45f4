"""Geometric median, Karcher and sign-elected merge nodes in a real ComfyUI (HTTP API only).

Each merged key saved by CheckpointSave is compared with the kernel result computed here from the
input files; robustness, norms, task vectors, effective weights and bad input are checked end to end.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from harness.checkpoints import checkpoint, load_state_dict
from harness.graphs import Graph, conditioning, load_checkpoint, merge_node, sample_and_save
from kernels import (combine, element_median, gram_matrix, parse_weights, scope_units, sign_elected_median,
                     solve, task_vector_coefficients)
from tests.host.helpers import assert_non_degenerate, ckpt, image_array, saved_checkpoint, unet

pytestmark = pytest.mark.host
_n = itertools.count()

FAMILY = dict(arch="sd15", base_seed=0, noise=0.05)
DEFAULTS = {"tolerance": 1e-7, "max_iterations": 100}
NODES = {
    "BarycenterGeometricMedian": ("geometric_median", {**DEFAULTS, "eps": 1e-8, "scope": "tensor"}),
    "BarycenterKarcherMean": ("karcher", {**DEFAULTS, "scope": "tensor"}),
    "BarycenterSignElectedMedian": ("sign_elected_median",
                                    {**DEFAULTS, "eps": 1e-8, "scope": "tensor", "drop_rate": 0.0, "drop_seed": 0}),
}


def family(seeds, **kw):
    opts = {**FAMILY, **kw}
    return [ckpt(seed=s, **opts) for s in seeds], [unet(load_state_dict(checkpoint(seed=s, **opts))) for s in seeds]


def base_files():
    return ckpt(arch="sd15", seed=0), unet(load_state_dict(checkpoint(arch="sd15", seed=0)))


def run_merge_and_save(comfy, server, node, names, settings, base=None, extra_nodes=None):
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    if base is not None:
        settings = {**settings, "base_model": Graph.out(load_checkpoint(g, base), 0)}
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings)
    prefix = f"checkpoints/{node}_{next(_n)}"
    g.add("CheckpointSave", model=Graph.out(merged, 0), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=prefix)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    return unet(saved_checkpoint(server, prefix)), run


def expected_linear(method, xs, settings, weights="", base=None, strength=1.0):
    keys = list(xs[0])
    names = ["diffusion_model." + k for k in keys]
    units = scope_units(names, settings.get("scope", "tensor"))
    w = parse_weights(weights, len(xs))
    grams = torch.stack([gram_matrix([x[k].float() for x in xs], None if base is None else base[k].float())
                         for k in keys])
    unit_grams = torch.stack([grams[idx].sum(0) for idx in units])
    params = {"tol": settings["tolerance"], "max_iter": settings["max_iterations"]}
    if "eps" in settings:
        params["eps"] = settings["eps"]
    coeffs = solve(method, unit_grams, w, **params).coeffs
    per_key = torch.empty(len(keys), coeffs.shape[1], dtype=torch.float64)
    for u, idx in enumerate(units):
        per_key[idx] = coeffs[u]
    out = {}
    if base is not None:
        a, a_b = task_vector_coefficients(per_key, strength)
    for j, k in enumerate(keys):
        terms = [x[k].double() for x in xs]
        if base is None:
            out[k] = sum(c * t for c, t in zip(per_key[j].tolist(), terms))
        else:
            out[k] = sum(c * t for c, t in zip(a[j].tolist(), terms)) + float(a_b[j]) * base[k].double()
    return out, coeffs


def assert_linear_close(saved, expected, ulps=16):
    eps = torch.finfo(torch.float32).eps
    for k, exact in expected.items():
        got = saved[k].double()
        tol = ulps * eps * (exact.abs() + exact.abs().max() * 1e-2) + 1e-12
        err = (got - exact).abs()
        assert bool((err <= tol).all()), f"{k}: max err {float(err.max()):.3g} (|x| max {float(exact.abs().max()):.3g})"


@pytest.mark.parametrize("node", ["BarycenterGeometricMedian", "BarycenterKarcherMean"])
def test_linear_node_image_and_checkpoint_equal_kernel(comfy, server, node):
    method, settings = NODES[node]
    names, xs = family([1, 2, 3])
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings)
    pos, neg = conditioning(g, "sd15")
    save = sample_and_save(g, Graph.out(merged, 0), Graph.out(loaders[0], 2), pos, neg, prefix=node)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    assert_non_degenerate(image_array(comfy, run, save))

    saved, _ = run_merge_and_save(comfy, server, node, names, settings)
    expected, _ = expected_linear(method, xs, settings)
    assert_linear_close(saved, expected)


def test_sign_elected_and_element_median_equal_kernel(comfy, server):
    names, xs = family([1, 2, 3])
    base_name, base = base_files()
    _, settings = NODES["BarycenterSignElectedMedian"]
    saved, _ = run_merge_and_save(comfy, server, "BarycenterSignElectedMedian", names,
                                  {**settings, "drop_rate": 0.1, "drop_seed": 5}, base=base_name)
    w = parse_weights("", 3)
    for k in list(xs[0])[::7]:
        exp, _ = sign_elected_median([x[k].float() for x in xs], base[k].float(), w, strength=1.0, drop_rate=0.1,
                                     seed=5, key="diffusion_model." + k, tol=1e-7, max_iter=100,
                                     eps=1e-8)
        assert torch.allclose(saved[k].float(), exp.float(), rtol=1e-5, atol=1e-6), k
    gm_settings = {**NODES["BarycenterGeometricMedian"][1], "scope": "element"}
    saved, _ = run_merge_and_save(comfy, server, "BarycenterGeometricMedian", names, gm_settings)
    for k in list(xs[0])[::7]:
        exp = element_median([x[k].float() for x in xs], w)
        assert torch.allclose(saved[k].float(), exp.float(), rtol=1e-6, atol=1e-7), k
