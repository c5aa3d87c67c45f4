"""BarycenterMergeReport: the report picture and summary.

- in-process (no server): parsing errors, layout, the matplotlib-less fallback;
- in a real ComfyUI (HTTP API only): 3 SD1.5 fine-tunes + 1 outlier merged by the geometric median,
  the report node's image saved by SaveImage shows the outlier's coefficient as a distinct (dark)
  column of the block heatmap, a red bar, and a bright row/column in the distance heatmap.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from harness.graphs import Graph, load_checkpoint, merge_node
from harness.loading import load_file
from tests.host.helpers import ckpt, image_array


rep = load_file("nodes/report.py", "barycenter_report_under_test")  # on its own, no ComfyUI


def luminance(rgb) -> float:
    r, g, b = (float(v) for v in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def synthetic(n=4, outlier=3, scope="tensor", distances=True, coefficients=True, method="geometric_median"):
    units = []
    blocks = ["time_embed.0", "input_blocks.1.1", "input_blocks.4.0", "middle_block.1", "output_blocks.3.0", "out.2"]
    for b in blocks:
        for t in ("weight", "bias"):
            c = np.full(n, 1.0)
            c[outlier] = 0.02
            c /= c.sum()
            u = {"name": f"diffusion_model.{b}.{t}", "iterations": 7, "converged": True}
            if coefficients:
                u["coefficients"] = c.tolist()
            units.append(u)
    d = np.ones((n, n))
    d[outlier, :] = d[:, outlier] = 30.0
    np.fill_diagonal(d, 0.0)
    r = {"method": method, "scope": scope, "models": [f"model_{i + 1}" for i in range(n)],
         "weights": [1 / n] * n, "base": None, "strength": 1.0, "device": "cpu", "keys": len(units),
         "units": units, "timing": {"total_s": 0.5}}
    if distances:
        r["distances"] = d.tolist()
    return json.dumps(r)


def cell_rgb(img, lay, row, col):
    """Colour of a coefficient-heatmap cell, sampled left of its centre (away from the value text)."""
    x0, y0, _, _ = lay["coefficients"]
    x = int(x0 + (col + 0.15) * lay["cell_w"])
    y = int(y0 + (row + 0.5) * lay["row_px"])
    return img[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)


def distance_rgb(img, lay, n, i, j):
    x0, y0, x1, y1 = lay["distances"]
    cw, ch = (x1 - x0) / n, (y1 - y0) / n
    x, y = int(x0 + (j + 0.2) * cw), int(y0 + (i + 0.2) * ch)
    return img[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)


def assert_outlier_visible(img: np.ndarray, n_models: int, n_rows: int, outlier: int, distances: bool = True):
    lay = rep.layout(n_models, n_rows)
    assert img.shape[:2] == (lay["height"], lay["width"]), (img.shape, lay)
    for r in range(n_rows):
        lum = [luminance(cell_rgb(img, lay, r, i)) for i in range(n_models)]
        inliers = [v for i, v in enumerate(lum) if i != outlier]
        # viridis: a small coefficient is dark purple, the inliers' ~1/3 bright yellow-green
        assert lum[outlier] < 0.5 * min(inliers), (r, lum)
        assert max(inliers) - min(inliers) < 40, (r, lum)
    # the bar of the down-weighted model is red (#d62728), in its column (the last quarter for model_4)
    x0, y0, x1, y1 = lay["bars"]
    box = img[y0:y1, x0:x1].astype(float)
    red = (np.abs(box[..., 0] - 214) < 30) & (np.abs(box[..., 1] - 39) < 30) & (np.abs(box[..., 2] - 40) < 30)
    assert red.sum() > 50, "no red bar for the down-weighted model"
    xs = np.nonzero(red)[1] / (x1 - x0)
    assert outlier / n_models - 0.05 < np.median(xs) < (outlier + 1) / n_models + 0.05, np.median(xs)
    if distances:  # magma: far is bright, near is dark
        near = luminance(distance_rgb(img, lay, n_models, 0, 1))
        far = luminance(distance_rgb(img, lay, n_models, 0, outlier))
        assert far > near + 80, (near, far)


# ------------------------------------------------------------------------------ in-process tests

@pytest.mark.parametrize("bad, why", [
    ("", "empty"),
    ("a photo of a cat", "not JSON"),
    ("[1, 2, 3]", "JSON list"),
    ('{"method": "x"}', "without 'models', 'units'"),
    ('{"method": "x", "models": [], "units": []}', "'models' is not a list"),
])
def test_not_a_report_is_a_clear_error(bad, why):
    with pytest.raises(ValueError) as e:
        rep.BarycenterMergeReport().render(bad)
    msg = str(e.value)
    assert "is not a Barycenter merge report" in msg and why in msg, msg
    assert "Connect the 'report' output" in msg


def test_synthetic_outlier_picture_and_summary():
    out = rep.BarycenterMergeReport().render(synthetic())
    image, text = out["result"]
    assert out["ui"]["text"] == [text]
    assert str(image.dtype) == "torch.float32" and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    img = (image[0].numpy() * 255).round()
    rows = int(re.search(r"blocks: (\d+)", text).group(1))
    assert rows == 6  # tensor-scope units grouped by block
    assert_outlier_visible(img, 4, rows, outlier=3)
    assert "down-weighted: model_4" in text and "model_4 is farthest" in text
    assert "12/12 units converged" in text


@pytest.mark.parametrize("field,prefix,note", [
    ("device_note", "device", "mps does not compute in float64 (the Gram and the solvers need it): merged on the CPU"),
    ("ill_posed_note", "note", "karcher: in 3 of 4 units the inputs point in opposite directions that cancel (...)"),
])
def test_notes_in_the_summary(field, prefix, note):
    _, text = rep.BarycenterMergeReport().render(json.dumps({**json.loads(synthetic()), field: note}))["result"]
    assert f"{prefix}: {note}" in text
    _, plain = rep.BarycenterMergeReport().render(synthetic())["result"]
    assert f"{prefix}:" not in plain


def test_block_fallback_rule():
    assert rep.fallback_block_of("diffusion_model.input_blocks.4.1.proj_in.weight") == "diffusion_model.input_blocks.4"
    assert rep.fallback_block_of("clip_l.transformer.text_model.encoder.layers.7.mlp.fc1.weight") == \
        "clip_l.transformer.text_model.encoder.layers.7"
    assert rep.fallback_block_of("diffusion_model.time_embed") == "diffusion_model.time_embed"


def test_reports_without_distances_or_coefficients_render():
    # plain weighted mean: no distances
    image, text = rep.BarycenterMergeReport().render(synthetic(distances=False, method="weighted_mean"))["result"]
    assert image.shape[0] == 1 and "distances" not in text.split("\n", 3)[-1].split("convergence")[0]
    # tensor results (sign-elected median): no coefficients at all
    image, text = rep.BarycenterMergeReport().render(synthetic(coefficients=False, method="sign_elected_median"))["result"]
    assert image.shape[0] == 1 and "no per-model coefficients" in text


def test_without_matplotlib_text_only(monkeypatch):
    def missing():
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(rep, "_import_matplotlib", missing)
    image, text = rep.BarycenterMergeReport().render(synthetic())["result"]
    img = (image[0].numpy() * 255).round()
    assert image.shape[3] == 3 and img.shape[1] == rep.WIDTH
    assert "down-weighted: model_4" in text  # the summary does not need matplotlib
    assert (img > 250).all(-1).mean() > 0.8  # a plain white picture ...
    red = (img[..., 0] > 150) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.sum() > 100  # ... with the message in red at the top
    assert np.nonzero(red)[0].max() < 120


# ---------------------------------------------------------------------------------- host tests

@pytest.mark.host
@pytest.mark.parametrize("scope", ["block", "model"])
def test_outlier_report_in_comfyui(comfy, scope):
    inliers = [ckpt(arch="sd15", seed=s, base_seed=0, noise=0.05) for s in (1, 2, 3)]
    outlier = ckpt(arch="sd15", seed=9, base_seed=0, noise=2.0)
    g = Graph()
    loaders = [load_checkpoint(g, n) for n in inliers + [outlier]]
    merged = merge_node(g, "BarycenterGeometricMedian", [Graph.out(l, 0) for l in loaders], scope=scope,
                        tolerance=1e-7, max_iterations=100, eps=1e-8)
    report = g.add("BarycenterMergeReport", report=Graph.out(merged, 1))
    save = g.add("SaveImage", images=Graph.out(report, 0), filename_prefix=f"report_{scope}")
    run = comfy.run(g.prompt())
    assert run.status == "success", run.error_text
    text = run.outputs[report]["text"][0]
    img = image_array(comfy, run, save)
    rows = int(re.search(r"blocks: (\d+)", text).group(1))
    if scope == "model":
        assert rows == 1
    else:
        assert rows >= 5, text  # SD1.5 blocks: time_embed, input_blocks.*, middle_block, output_blocks.*, out
    assert "down-weighted: model_4" in text, text
    assert "model_4 is farthest" in text, text
    assert re.search(r"convergence: (\d+)/\1 units converged", text), text
    assert_outlier_visible(img, 4, rows, outlier=3)


@pytest.mark.host
@pytest.mark.parametrize("value, why", [("a photo of a cat", "not JSON"), ('{"hello": 1}', "without")])
def test_wrong_string_fed_to_report_in_comfyui(comfy, value, why):
    g = Graph()
    report = g.add("BarycenterMergeReport", report=value)  # API format: a literal instead of a link
    g.add("PreviewImage", images=Graph.out(report, 0))
    run = comfy.run(g.prompt())
    assert run.status == "error"
    assert "is not a Barycenter merge report" in run.error_text and why in run.error_text, run.error_text
