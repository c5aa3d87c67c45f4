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
from harness.server import gpu_host
from kernels import (GramPass, combine, element_median, parse_weights, scope_units, sign_elected_median,
                     solve, task_vector_coefficients)
from tests.host.helpers import (as_held, assert_non_degenerate, ckpt, image_array, saved_checkpoint, storage_eps,
                                storage_rounding, unet)

pytestmark = [pytest.mark.host, pytest.mark.weights]
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


def run_merge_and_save(comfy, server, node, names, settings, base=None, extra_nodes=None, report=False):
    """(the saved UNet, the run), or (the saved UNet, the merge's report) with report=True."""
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    if base is not None:
        settings = {**settings, "base_model": Graph.out(load_checkpoint(g, base), 0)}
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings)
    cap = capture(g, merged) if report else None
    prefix = f"checkpoints/{node}_{next(_n)}"
    g.add("CheckpointSave", model=Graph.out(merged, 0), clip=Graph.out(loaders[0], 1),
          vae=Graph.out(loaders[0], 2), filename_prefix=prefix)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    return unet(saved_checkpoint(server, prefix)), (captured(run, cap) if report else run)


def expected_linear(method, xs, settings, weights="", base=None, strength=1.0):
    keys = list(xs[0])
    names = ["diffusion_model." + k for k in keys]
    units = scope_units(names, settings.get("scope", "tensor"))
    w = parse_weights(weights, len(xs))
    # the engine's Gram pass (GramPass, centred-only for the geometric median): the same Grams, so
    # the solver takes the same steps (Grams differing by rounding move the coefficients by up to
    # its tolerance, more than the roundings checked below)
    pass_ = GramPass(len(keys), full=method != "geometric_median",
                     reread=lambda j: ([x[keys[j]].float() for x in xs], None if base is None else base[keys[j]].float()))
    for j, k in enumerate(keys):
        pass_.add(j, [x[k].float() for x in xs], None if base is None else base[k].float(), k)
    grams = pass_.result()
    unit_grams = torch.stack([grams[idx].sum(0) for idx in units])
    params = {"tol": settings["tolerance"], "max_iter": settings["max_iterations"]}
    if "eps" in settings:
        params["eps"] = settings["eps"]
    coeffs = solve(method, unit_grams, w, **params).coeffs
    per_key = torch.empty(len(keys), coeffs.shape[1], dtype=torch.float64)
    for u, idx in enumerate(units):
        per_key[idx] = coeffs[u]
    out, scale = {}, {}
    if base is None:
        a, a_b = per_key, None
    else:
        a, a_b = task_vector_coefficients(per_key, strength)
    for j, k in enumerate(keys):
        terms = [(c, x[k].double()) for c, x in zip(a[j].tolist(), xs)]
        if a_b is not None:
            terms.append((float(a_b[j]), base[k].double()))
        out[k] = sum(c * t for c, t in terms)
        scale[k] = sum(abs(c) * t.abs() for c, t in terms)  # fp32 rounding is relative to the terms
    return out, coeffs, scale


def assert_linear_close(saved, expected, scale, ulps=16):
    """saved (as ComfyUI computed it in fp32) equals the fp64 result up to `ulps` roundings of the
    terms Σ|a_i||x_i| (the order of the fp32 sums differs between ComfyUI versions), plus the
    roundings to the saved dtype (fp16 on a GPU host: of the result and of the inputs as loaded)."""
    eps = torch.finfo(torch.float32).eps
    for k, exact in expected.items():
        got = saved[k].double()
        tol = ulps * eps * scale[k] + 1e-12 + storage_rounding(saved[k], exact, scale[k])
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
    expected, _, scale = expected_linear(method, xs, settings)
    assert_linear_close(saved, expected, scale)


def test_sign_elected_and_element_median_equal_kernel(comfy, server):
    names, xs = family([1, 2, 3])
    base_name, base = base_files()
    _, settings = NODES["BarycenterSignElectedMedian"]
    saved, _ = run_merge_and_save(comfy, server, "BarycenterSignElectedMedian", names,
                                  {**settings, "drop_rate": 0.1, "drop_seed": 5}, base=base_name)
    w = parse_weights("", 3)
    # on the merge's device: the drop masks are the same everywhere, the elected signs' roundings not
    dev = "cuda" if gpu_host() else "cpu"
    for k in list(xs[0])[::7]:
        held = [as_held(x[k], saved[k].dtype).float().to(dev) for x in xs + [base]]
        exp, _ = sign_elected_median(held[:3], held[3], w, strength=1.0, drop_rate=0.1,
                                     seed=5, key="diffusion_model." + k, tol=1e-7, max_iter=100,
                                     eps=1e-8)
        exp = exp.cpu()
        err = (saved[k].double() - exp.double()).abs()
        assert bool((err <= 1e-5 * exp.double().abs() + 1e-6 + storage_rounding(saved[k], exp.double())).all()), k
    gm_settings = {**NODES["BarycenterGeometricMedian"][1], "scope": "element"}
    saved, _ = run_merge_and_save(comfy, server, "BarycenterGeometricMedian", names, gm_settings)
    for k in list(xs[0])[::7]:
        exp = element_median([as_held(x[k], saved[k].dtype).float() for x in xs], w)
        err = (saved[k].double() - exp.double()).abs()
        assert bool((err <= 1e-6 * exp.double().abs() + 1e-7 + storage_rounding(saved[k], exp.double())).all()), k


# --- robustness, norms, task vectors -----------------------------------------------------------

def capture(g: Graph, node_id: str, output: int = 1) -> str:
    return g.add("BarycenterTestCaptureText", text=Graph.out(node_id, output))


def captured(run, node_id) -> dict:
    text = run.outputs.get(str(node_id), {}).get("text")
    assert text, f"no captured text from node {node_id}: {run.outputs}"
    return json.loads(text[0] if isinstance(text, list) else text)


def test_geometric_median_resists_an_outlier(comfy, server):
    """4 models, one far away: the GM stays with the 3 inliers (and says so), the mean runs off."""
    names, xs = family([1, 2, 3])
    out_name, outlier = family([9], noise=2.0)
    names, xs = names + out_name, xs + outlier
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    gm = merge_node(g, "BarycenterGeometricMedian", [Graph.out(l, 0) for l in loaders],
                    **{**NODES["BarycenterGeometricMedian"][1], "scope": "model"})
    wm = merge_node(g, "BarycenterWeightedMean", [Graph.out(l, 0) for l in loaders])
    cap = capture(g, gm)
    for node, p in ((gm, "gm"), (wm, "wm")):
        g.add("CheckpointSave", model=Graph.out(node, 0), clip=Graph.out(loaders[0], 1),
              vae=Graph.out(loaders[0], 2), filename_prefix=f"checkpoints/outlier_{p}_{next(_n)}")
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    report = captured(run, cap)
    coeffs = report["units"][0]["coefficients"]
    assert coeffs[3] < 0.02 and min(coeffs[:3]) > 0.3, coeffs
    saved = {p: unet(saved_checkpoint(server, f"checkpoints/outlier_{p}_")) for p in ("gm", "wm")}
    dist = {p: 0.0 for p in saved}
    for k in xs[0]:
        inlier_mean = sum(x[k].double() for x in xs[:3]) / 3
        for p in saved:
            dist[p] += float((saved[p][k].double() - inlier_mean).pow(2).sum())
    spread = sum(float((xs[0][k].double() - xs[1][k].double()).pow(2).sum()) for k in xs[0]) ** 0.5
    gm_d, wm_d = dist["gm"] ** 0.5, dist["wm"] ** 0.5
    assert gm_d < 0.5 * spread < wm_d / 10, (gm_d, wm_d, spread)


def test_karcher_norm_is_weighted_mean_of_norms(comfy, server):
    names, xs = family([1, 2, 3])
    saved, _ = run_merge_and_save(comfy, server, "BarycenterKarcherMean", names,
                                  {**NODES["BarycenterKarcherMean"][1], "weights": "1,2,3"})
    w = [1 / 6, 2 / 6, 3 / 6]
    for k in xs[0]:
        want = sum(wi * float(x[k].double().norm()) for wi, x in zip(w, xs))
        got = float(saved[k].double().norm())
        # rounding each value to the saved dtype moves the norm by at most that relative rounding
        stored = 0.5 * storage_eps(saved[k].dtype)
        assert abs(got - want) <= (1e-5 + stored) * want + 1e-9, (k, got, want)


@pytest.mark.parametrize("node", ["BarycenterGeometricMedian", "BarycenterKarcherMean"])
def test_task_vector_mode(comfy, server, node):
    method, settings = NODES[node]
    names, xs = family([1, 2, 3])
    base_name, base = base_files()
    saved, _ = run_merge_and_save(comfy, server, node, names, {**settings, "strength": 0.7}, base=base_name)
    expected, _, scale = expected_linear(method, xs, settings, base=base, strength=0.7)
    assert_linear_close(saved, expected, scale)


def test_karcher_with_the_average_as_base_merges_as_the_weighted_mean_and_says_so(comfy, server, checkpoints_dir):
    """base_model = the average of the inputs: their task vectors cancel (0 in their hull), so no
    Karcher mean exists; each unit is merged as the weighted mean and the report says why."""
    from safetensors.torch import save_file

    names, xs = family([1, 2, 3])
    states = [load_state_dict(checkpoint(seed=s, **FAMILY)) for s in (1, 2, 3)]
    avg = {k: (sum(st[k].double() for st in states) / 3).to(states[0][k].dtype) for k in states[0]}
    base_name = "average_of_1_2_3_sd15.safetensors"
    save_file(avg, str(checkpoints_dir / base_name))
    settings = NODES["BarycenterKarcherMean"][1]
    saved, report = run_merge_and_save(comfy, server, "BarycenterKarcherMean", names, settings,
                                       base=base_name, report=True)
    units = report["units"]
    ill = [u for u in units if u["ill_posed"]]
    # the fp16 norm weights near 1, where the models differ by a few ulps, are exempt: there the
    # base's rounding to fp16 is as large as the task vectors, which then no longer cancel
    for u in units:
        x = xs[0][u["name"].removeprefix("diffusion_model.")].float()
        assert u["ill_posed"] or abs(float(x.abs().mean()) - 1) < 1e-3, u["name"]
    assert len(ill) > 0.8 * len(units), (len(ill), len(units))
    assert f"in {len(ill)} of {len(units)} units" in report["ill_posed_note"], report["ill_posed_note"]
    assert "base_model an average" in report["ill_posed_note"]
    for u in ill:
        assert u["coefficients"] == pytest.approx([1 / 3] * 3, abs=1e-15), u["name"]
    expected, _, scale = expected_linear("karcher", xs, settings, base=unet(avg))
    assert_linear_close(saved, expected, scale)


# --- effective weights, untouched inputs ---------------------------------------------------------

def _save(comfy, server, g, model, loader):
    p = f"checkpoints/eff_{next(_n)}"
    g.add("CheckpointSave", model=model, clip=Graph.out(loader, 1), vae=Graph.out(loader, 2), filename_prefix=p)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    return unet(saved_checkpoint(server, p))


def test_effective_weights_of_lora_modelmergesimple_and_own_merge(comfy, server):
    from harness.checkpoints import lora

    (a, b, c, d), _ = family([1, 2, 3, 4])
    lora_name = lora("sd15", seed=7).name

    def inputs(g):
        la, lb, lc, ld = (load_checkpoint(g, n) for n in (a, b, c, d))
        with_lora = g.add("LoraLoader", model=Graph.out(la, 0), clip=Graph.out(la, 1), lora_name=lora_name,
                          strength_model=0.8, strength_clip=0.0)
        mms = g.add("ModelMergeSimple", model1=Graph.out(lb, 0), model2=Graph.out(lc, 0), ratio=0.4)
        ours = merge_node(g, "BarycenterGeometricMedian", [Graph.out(lb, 0), Graph.out(lc, 0), Graph.out(ld, 0)],
                          **NODES["BarycenterGeometricMedian"][1])
        return [Graph.out(with_lora, 0), Graph.out(mms, 0), Graph.out(ours, 0), Graph.out(ld, 0)], la

    baked = []
    for i in range(4):
        g = Graph()
        models, la = inputs(g)
        baked.append(_save(comfy, server, g, models[i], la))
    # The outer merge is a Karcher mean: not robust, so a moved input (the LoRA) moves the result.
    g = Graph()
    models, la = inputs(g)
    settings = NODES["BarycenterKarcherMean"][1]
    merged = merge_node(g, "BarycenterKarcherMean", models, **settings)
    got = _save(comfy, server, g, Graph.out(merged, 0), la)
    expected, _, scale = expected_linear("karcher", baked, settings)
    plain = expected_linear("karcher", [family([1])[1][0]] + baked[1:], settings)[0]
    lora_gap = max(float((expected[k] - plain[k]).abs().max() / plain[k].abs().max()) for k in expected)
    assert lora_gap > 1e-2, "the LoRA did not change the merge: the test could not tell the routes apart"
    worst = max(float((got[k].double() - e).abs().max() / e.abs().max()) for k, e in expected.items())
    # a GPU host saves fp16: the baked inputs were rounded once, the merge once more
    stored = max(storage_eps(t.dtype) for t in got.values())
    assert worst < 1e-5 + 1.5 * stored, f"merged vs merge of baked weights: relative error {worst:.3g}"


def test_inputs_untouched_weights_and_images(comfy, server):
    names, xs = family([1, 2, 3])

    def alone(g, via_identity_merge):
        la = load_checkpoint(g, names[0])
        model = Graph.out(la, 0)
        if via_identity_merge:  # same weights (ratio 1), but a graph the cache has not seen
            model = Graph.out(g.add("ModelMergeSimple", model1=model, model2=model, ratio=1.0), 0)
        pos, neg = conditioning(g, "sd15")
        return la, sample_and_save(g, model, Graph.out(la, 2), pos, neg, prefix=f"alone_{next(_n)}", seed=3)

    g = Graph()
    _, save = alone(g, False)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    before = image_array(comfy, run, save)
    for node in ("BarycenterGeometricMedian", "BarycenterKarcherMean", "BarycenterSignElectedMedian"):
        settings = dict(NODES[node][1])
        base = base_files()[0] if node == "BarycenterSignElectedMedian" else None
        run_merge_and_save(comfy, server, node, names, settings, base=base)
    g = Graph()
    la, save = alone(g, True)
    p = f"checkpoints/untouched_{next(_n)}"
    g.add("CheckpointSave", model=Graph.out(la, 0), clip=Graph.out(la, 1), vae=Graph.out(la, 2), filename_prefix=p)
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    assert (image_array(comfy, run, save) == before).all(), "model_1's image changed after merging it"
    after = unet(saved_checkpoint(server, p))
    for k, v in xs[0].items():
        assert torch.equal(after[k].float(), v.float()), f"model_1's {k} changed"
    assert [unet(load_state_dict(checkpoint(seed=s, **FAMILY))) for s in (1, 2, 3)][0].keys() == xs[0].keys()


# --- CLIP ----------------------------------------------------------------------------------------

def test_clip_nodes_encode_and_sample(comfy, server):
    names = [ckpt(seed=s, clip=True, **FAMILY) for s in (1, 2, 3)]
    files = [load_state_dict(checkpoint(seed=s, clip=True, **FAMILY)) for s in (1, 2, 3)]
    for node in ("BarycenterGeometricMedianCLIP", "BarycenterKarcherMeanCLIP", "BarycenterWeightedMeanCLIP"):
        g = Graph()
        loaders = [load_checkpoint(g, n) for n in names]
        settings = {"weights": "1,1,2"}
        if "WeightedMean" not in node:
            settings.update(tolerance=1e-7, max_iterations=100, scope="block")
        if "GeometricMedian" in node:
            settings["eps"] = 1e-8
        clip = merge_node(g, node, [Graph.out(l, 1) for l in loaders], **settings)
        pos, neg = conditioning(g, "sd15", clip=Graph.out(clip, 0))
        save = sample_and_save(g, Graph.out(loaders[0], 0), Graph.out(loaders[0], 2), pos, neg, prefix=node)
        p = f"checkpoints/{node}_{next(_n)}"
        g.add("CheckpointSave", model=Graph.out(loaders[0], 0), clip=Graph.out(clip, 0),
              vae=Graph.out(loaders[0], 2), filename_prefix=p)
        run = comfy.run(g.prompt())
        assert run.status == "success", f"{node}: {run.error_text}"
        assert_non_degenerate(image_array(comfy, run, save))
        saved = saved_checkpoint(server, p)
        key = "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
        if "WeightedMean" in node:
            exact = (files[0][key].double() + files[1][key].double() + 2 * files[2][key].double()) / 4
            assert torch.allclose(saved[key].double(), exact, rtol=1e-3, atol=1e-5), node
        else:  # a barycenter of the three: changed from model_1, within their hull's scale
            assert not torch.equal(saved[key].float(), files[0][key].float()), node
            lo = torch.stack([f[key].float() for f in files]).abs().max(0).values
            assert bool((saved[key].float().abs() <= lo * 1.5 + 1e-3).all()), node


# --- dtypes --------------------------------------------------------------------------------------

def test_fp16_bf16_fp8_inputs_merge(comfy, server):
    dtypes = ("fp16", "bf16", "fp8_e4m3fn")
    names = [ckpt(seed=s, dtype=dt, **FAMILY) for s, dt in zip((1, 2, 3), dtypes)]
    xs = [unet(load_state_dict(checkpoint(seed=s, dtype=dt, **FAMILY))) for s, dt in zip((1, 2, 3), dtypes)]
    assert {str(x[next(iter(x))].dtype) for x in xs} == {"torch.float16", "torch.bfloat16", "torch.float8_e4m3fn"}
    settings = NODES["BarycenterGeometricMedian"][1]
    saved, _ = run_merge_and_save(comfy, server, "BarycenterGeometricMedian", names, settings)
    expected, _, scale = expected_linear("geometric_median", xs, settings)
    assert_linear_close(saved, expected, scale)
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    merged = merge_node(g, "BarycenterKarcherMean", [Graph.out(l, 0) for l in loaders],
                        **NODES["BarycenterKarcherMean"][1])
    pos, neg = conditioning(g, "sd15")
    save = sample_and_save(g, Graph.out(merged, 0), Graph.out(loaders[0], 2), pos, neg, prefix="dtypes")
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    assert_non_degenerate(image_array(comfy, run, save))


# --- bad input: an error in /history naming the problem, then the next prompt works -------------

def _expect_error(comfy, g: Graph, *needles):
    run = comfy.run(g.prompt())
    assert run.status == "error", f"expected an error containing {needles}"
    for n in needles:
        assert n in run.error_text, f"{n!r} not in: {run.error_text}"
    ok = Graph()
    names, _ = family([1, 2])
    loaders = [load_checkpoint(ok, n) for n in names]
    merged = merge_node(ok, "BarycenterGeometricMedian", [Graph.out(l, 0) for l in loaders],
                        **NODES["BarycenterGeometricMedian"][1])
    pos, neg = conditioning(ok, "sd15")
    sample_and_save(ok, Graph.out(merged, 0), Graph.out(loaders[0], 2), pos, neg, prefix=f"after_{next(_n)}")
    after = comfy.run(ok.prompt())
    assert after.status == "success", f"the prompt after the bad one failed: {after.error_text}"
    return run


def _merge_graph(node, names, settings, base=None, sample=True):
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in names]
    if base is not None:
        settings = {**settings, "base_model": Graph.out(load_checkpoint(g, base), 0)}
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **settings)
    pos, neg = conditioning(g, "sd15")
    sample_and_save(g, Graph.out(merged, 0), Graph.out(loaders[0], 2), pos, neg, prefix=f"bad_{next(_n)}")
    return g


@pytest.mark.parametrize("node", ["BarycenterGeometricMedian", "BarycenterKarcherMean"])
def test_sd15_with_sdxl_refused(comfy, node):
    names = [ckpt(arch="sd15", seed=1), ckpt(arch="sdxl", seed=1)]
    _expect_error(comfy, _merge_graph(node, names, NODES[node][1]), "model_2", "SDXL", "SD15")


def test_clip_l_with_clip_g_refused(comfy):
    g = Graph()
    l1 = load_checkpoint(g, ckpt(arch="sd15", seed=1, clip=True))
    l2 = load_checkpoint(g, ckpt(arch="sdxl", seed=1, clip=True))
    clip = merge_node(g, "BarycenterGeometricMedianCLIP", [Graph.out(l1, 1), Graph.out(l2, 1)],
                      tolerance=1e-7, max_iterations=100, eps=1e-8, scope="tensor")
    pos, neg = conditioning(g, "sd15", clip=Graph.out(clip, 0))
    sample_and_save(g, Graph.out(l1, 0), Graph.out(l1, 2), pos, neg, prefix="bad_clip")
    _expect_error(comfy, g, "clip_2", "CLIP-L+CLIP-G", "CLIP-L")


@pytest.mark.parametrize("weights,needle", [("1,2", "3"), ("1,-2,1", "-2"), ("0,0,0", "zero")])
def test_bad_weights_refused(comfy, weights, needle):
    names, _ = family([1, 2, 3])
    settings = {**NODES["BarycenterKarcherMean"][1], "weights": weights}
    _expect_error(comfy, _merge_graph("BarycenterKarcherMean", names, settings), "weight", needle)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_or_inf_in_one_input_names_input_and_key(comfy, checkpoints_dir, bad):
    from safetensors.torch import save_file

    src = load_state_dict(checkpoint(seed=2, **FAMILY))
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert key in src
    src[key] = src[key].clone()
    src[key].view(-1)[5] = float(bad)
    name = f"broken_{bad}_sd15.safetensors"
    save_file(src, str(checkpoints_dir / name))
    names, _ = family([1])
    g = _merge_graph("BarycenterGeometricMedian", [names[0], name, ckpt(seed=3, **FAMILY)],
                     NODES["BarycenterGeometricMedian"][1])
    _expect_error(comfy, g, "model_2", "input_blocks.1.0.in_layers.2.weight", bad.replace("nan", "NaN").replace("inf", "Inf"))


@pytest.mark.parametrize("setting,value", [("tolerance", 0.0), ("max_iterations", 0), ("eps", -1.0),
                                           ("tolerance", float("nan"))])
def test_solver_settings_out_of_range_rejected(comfy, setting, value):
    """ComfyUI validates declared ranges at queue time: HTTP 400 naming the input and the value."""
    from harness.client import PromptRejected

    names, _ = family([1, 2])
    g = _merge_graph("BarycenterGeometricMedian", names, {**NODES["BarycenterGeometricMedian"][1], setting: value})
    if value != value:
        # NaN passes ComfyUI's range check (every comparison is False): the node must refuse it.
        node = [k for k, v in g.nodes.items() if v["class_type"] == "BarycenterGeometricMedian"][0]
        g.nodes[node]["inputs"][setting] = "nan"
        _expect_error(comfy, g, "tol", "nan")
        return
    with pytest.raises(PromptRejected) as e:
        comfy.queue(g.prompt())
    assert setting in json.dumps(e.value.body), e.value.body
    _expect_error(comfy, _merge_graph("BarycenterGeometricMedian", names,
                                      {**NODES["BarycenterGeometricMedian"][1], "weights": "1,2,3"}), "weight")


def test_sign_elected_without_base_refused(comfy):
    names, _ = family([1, 2, 3])
    _expect_error(comfy, _merge_graph("BarycenterSignElectedMedian", names, NODES["BarycenterSignElectedMedian"][1]),
                  "base_model")


def test_progress_events_from_the_merge_node(comfy):
    names, _ = family([1, 2, 3])
    g = _merge_graph("BarycenterKarcherMean", names, {**NODES["BarycenterKarcherMean"][1], "tolerance": 3e-7})
    merge_id = [k for k, v in g.nodes.items() if v["class_type"] == "BarycenterKarcherMean"][0]
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    ours = [e["data"] for e in comfy.events("progress") if str(e["data"].get("node")) == merge_id
            and e["data"].get("prompt_id", run.prompt_id) == run.prompt_id]
    assert ours, "no progress event from the merge node"
    assert ours[-1]["value"] == ours[-1]["max"] and ours[-1]["max"] > 100
