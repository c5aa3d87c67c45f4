"""Merge Report: the `report` JSON of a Barycenter merge node as a picture and a text summary.

The picture (matplotlib, Agg, no pyplot state) has four parts at fixed pixel positions
(`layout()`, which the tests use to find them):

- header: method, scope, models, base, time;
- left: heatmap of the pairwise Euclidean distances between the whole input models;
- right: bars of the mean coefficient each model received, with its input weight marked;
- below: heatmap of the coefficient per block (rows) and model (columns): tensor-scope units are
  aggregated by block (`block_of` from the kernels when they are importable, else the key up to its
  first numeric part), so a model that a geometric median down-weighted is a dark column;
- footer: convergence (units converged, iterations).

matplotlib is optional (the pack's `report` extra): without it the node returns the text summary and
a plain image that says so. The IMAGE is a float tensor [1, H, W, 3] in 0..1, like every ComfyUI image.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field

import numpy as np

try:  # the pack's own block rule, when the kernels import (not in a bare test process)
    from ..kernels import block_of as _kernel_block_of
except Exception:  # pragma: no cover - depends on how the module is loaded
    _kernel_block_of = None

CATEGORY = "advanced/model_merging/barycenter"

# Pixel geometry of the picture (top-left origin). Everything derives from these numbers.
WIDTH = 1100
HEADER = 96
TOP_PANEL = 400          # distances heatmap + coefficient bars
ROW_PX = 20              # one block row of the coefficient heatmap
HEATMAP_EXTRA = 90       # title + column labels + colour bar below the block rows
FOOTER = 56
MAX_ROWS = 64            # more blocks than this are grouped further (never for SD1.5/SDXL/CLIP)
LEFT_LABELS = 260        # room for block names left of the coefficient heatmap
DPI = 100

NOT_A_REPORT = ("Merge Report: the 'report' input is not a Barycenter merge report ({why}). Connect the "
                "'report' output (the second output) of a Barycenter merge node to it.")


class ReportError(ValueError):
    pass


@dataclass
class Parsed:
    method: str
    scope: str
    models: list[str]
    weights: list[float]
    base: str | None
    strength: float
    keys: int | None
    distances: list[list[float]] | None
    blocks: list[str] = field(default_factory=list)
    block_coeffs: list[list[float]] = field(default_factory=list)   # rows = blocks
    mean_coeffs: list[float] | None = None
    units: int = 0
    iterations: list[int] = field(default_factory=list)
    converged: int = 0
    with_convergence: int = 0
    timing: dict = field(default_factory=dict)
    device: str | None = None
    gram: str | None = None  # "computed", or "reused" from an earlier merge of the same inputs
    device_note: str | None = None  # why the merge ran elsewhere than device=auto would say
    ill_posed_note: str | None = None  # units whose inputs cancel: merged as the weighted mean

    @property
    def n(self) -> int:
        return len(self.models)


# ---------------------------------------------------------------------------------------- parsing

def fallback_block_of(key: str) -> str:
    """Block of a state-dict key without the kernels: everything up to the first numeric part
    (`diffusion_model.input_blocks.4`, `clip_l.transformer.text_model.encoder.layers.7`), else the
    first two dotted parts (`diffusion_model.time_embed`)."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def block_of(key: str) -> str:
    if _kernel_block_of is not None:
        try:
            return str(_kernel_block_of(key))
        except Exception:
            pass
    return fallback_block_of(key)


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def parse_report(text) -> Parsed:
    """Validate and digest a report string; ReportError (naming the problem) if it is not one."""
    if not isinstance(text, str):
        raise ReportError(NOT_A_REPORT.format(why=f"got a {type(text).__name__}, not a string"))
    stripped = text.strip()
    if not stripped:
        raise ReportError(NOT_A_REPORT.format(why="it is empty"))
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        head = stripped[:40].replace("\n", " ")
        raise ReportError(NOT_A_REPORT.format(why=f"not JSON; it starts with {head!r}")) from None
    if not isinstance(data, dict):
        raise ReportError(NOT_A_REPORT.format(why=f"JSON {type(data).__name__}, not an object"))
    missing = [k for k in ("method", "models", "units") if k not in data]
    if missing:
        raise ReportError(NOT_A_REPORT.format(why=f"JSON without {', '.join(repr(m) for m in missing)}"))
    models = data["models"]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ReportError(NOT_A_REPORT.format(why="'models' is not a list of input names"))
    units = data["units"]
    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise ReportError(NOT_A_REPORT.format(why="'units' is not a list of objects"))
    n = len(models)
    weights = data.get("weights")
    if not (isinstance(weights, list) and len(weights) == n and all(_number(w) is not None for w in weights)):
        weights = [1.0 / n] * n
    distances = data.get("distances")
    if not (isinstance(distances, list) and len(distances) == n
            and all(isinstance(r, list) and len(r) == n and all(_number(v) is not None for v in r)
                    for r in distances)):
        distances = None
    p = Parsed(method=str(data["method"]), scope=str(data.get("scope", "?")), models=list(models),
               weights=[float(w) for w in weights], base=data.get("base"),
               strength=_number(data.get("strength")) or 1.0, keys=data.get("keys"),
               distances=[[float(v) for v in r] for r in distances] if distances else None,
               units=len(units), timing=data.get("timing") if isinstance(data.get("timing"), dict) else {},
               device=data.get("device"), gram=data.get("gram") if isinstance(data.get("gram"), str) else None,
               device_note=data.get("device_note") if isinstance(data.get("device_note"), str) else None,
               ill_posed_note=data.get("ill_posed_note") if isinstance(data.get("ill_posed_note"), str) else None)
    # convergence
    for u in units:
        it = u.get("iterations")
        if _number(it) is not None:
            p.iterations.append(int(it))
        if isinstance(u.get("converged"), bool):
            p.with_convergence += 1
            p.converged += int(u["converged"])
    # coefficients per block
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for u in units:
        c = u.get("coefficients")
        if not (isinstance(c, list) and len(c) == n):
            continue
        vals = [_number(v) for v in c]
        if any(v is None for v in vals):
            continue
        name = str(u.get("name", "?"))
        block = block_of(name) if p.scope == "tensor" else name
        if block not in sums:
            sums[block] = np.zeros(n)
            counts[block] = 0
        sums[block] += np.asarray(vals, dtype=np.float64)
        counts[block] += 1
    if sums:
        names = list(sums)
        rows = [(sums[b] / counts[b]).tolist() for b in names]
        if len(names) > MAX_ROWS:  # group further, by first two dotted parts
            sums2: dict[str, np.ndarray] = {}
            counts2: dict[str, int] = {}
            for b, r in zip(names, rows):
                b2 = ".".join(b.split(".")[:2])
                sums2[b2] = sums2.get(b2, np.zeros(n)) + np.asarray(r)
                counts2[b2] = counts2.get(b2, 0) + 1
            names = list(sums2)[:MAX_ROWS]
            rows = [(sums2[b] / counts2[b]).tolist() for b in names]
        p.blocks = names
        p.block_coeffs = rows
        p.mean_coeffs = np.asarray(rows).mean(axis=0).tolist()
    return p


def _short(name: str) -> str:
    for prefix in ("diffusion_model.", "transformer.text_model.", "text_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".transformer.text_model.", ".").replace("encoder.layers.", "layer ")


def down_weighted(p: Parsed, below: float = 0.5):
    """(index, coefficient/weight) of the model whose mean coefficient fell furthest below its input
    weight, if that is less than `below` times the weight (3+ models only), else None."""
    if p.mean_coeffs is None or p.n < 3:
        return None
    ratios = [c / w if w > 0 else float("inf") for c, w in zip(p.mean_coeffs, p.weights)]
    lo = int(np.argmin(ratios))
    return (lo, ratios[lo]) if ratios[lo] < below else None


def summary(p: Parsed) -> str:
    method = p.method.replace("_", " ")
    lines = [f"Barycenter merge report: {method}, scope {p.scope}, {p.n} models "
             f"({', '.join(p.models)})" + (f", base {p.base} (strength {p.strength:g})" if p.base else "")]
    lines.append("weights: " + ", ".join(f"{m} {w:.3f}" for m, w in zip(p.models, p.weights)))
    if p.mean_coeffs is not None:
        lines.append(f"blocks: {len(p.blocks)} (from {p.units} scope units)")
        lines.append("mean coefficient per model: " + ", ".join(f"{m} {c:.3f}" for m, c in zip(p.models, p.mean_coeffs)))
        low = down_weighted(p)
        if low is not None:
            lo, ratio = low
            lines.append(f"down-weighted: {p.models[lo]} got {p.mean_coeffs[lo]:.3f} "
                         f"({ratio:.2f}x its weight {p.weights[lo]:.3f})")
    else:
        lines.append(f"no per-model coefficients ({p.method} returns a tensor per key, not a combination "
                     f"of the inputs); {p.units} units")
    if p.distances is not None and p.n > 2:
        d = np.asarray(p.distances)
        mean_d = d.sum(1) / (p.n - 1)
        far = int(np.argmax(mean_d))
        rest = np.delete(mean_d, far).mean()
        lines.append(f"distances: {p.models[far]} is farthest from the others "
                     f"(mean distance to the others {mean_d[far]:.4g}; the rest {rest:.4g})")
    lines.append(convergence_line(p))
    total = _number(p.timing.get("total_s"))
    if total is not None:
        reused = " (Grams reused from an earlier merge of the same inputs)" if p.gram == "reused" else ""
        lines.append(f"time: {total:.2f} s on {p.device or '?'}{reused}")
    if p.device_note:
        lines.append(f"device: {p.device_note}")
    if p.ill_posed_note:
        lines.append(f"note: {p.ill_posed_note}")
    return "\n".join(lines)


def convergence_line(p: Parsed) -> str:
    parts = []
    if p.with_convergence:
        parts.append(f"{p.converged}/{p.with_convergence} units converged")
    if p.iterations:
        parts.append(f"iterations min {min(p.iterations)}, median {statistics.median(p.iterations):g}, "
                     f"max {max(p.iterations)}")
    return "convergence: " + ("; ".join(parts) if parts else "closed form (no iterations)")


# ----------------------------------------------------------------------------------------- layout

def layout(n_models: int, n_rows: int) -> dict:
    """Pixel boxes (x0, y0, x1, y1), top-left origin, of the picture's parts. `coefficients` is the
    block x model heatmap: cell (r, i) spans x0 + i*cell_w .. x0 + (i+1)*cell_w and y0 + r*ROW_PX .."""
    rows = max(1, n_rows)
    heat_h = rows * ROW_PX + HEATMAP_EXTRA
    height = HEADER + TOP_PANEL + heat_h + FOOTER
    top = HEADER
    # distances: a square on the left, labels left and below
    dist = (90, top + 40, 90 + 300, top + 40 + 300)
    bars = (560, top + 40, WIDTH - 40, top + 40 + 300)
    coef_top = HEADER + TOP_PANEL + 36
    coef = (LEFT_LABELS, coef_top, WIDTH - 140, coef_top + rows * ROW_PX)
    return {"width": WIDTH, "height": height, "distances": dist, "bars": bars, "coefficients": coef,
            "cell_w": (coef[2] - coef[0]) / max(1, n_models), "row_px": ROW_PX,
            "footer": (0, height - FOOTER, WIDTH, height)}


def _axes_rect(fig_w, fig_h, box):
    x0, y0, x1, y1 = box
    return [x0 / fig_w, 1 - y1 / fig_h, (x1 - x0) / fig_w, (y1 - y0) / fig_h]


# ------------------------------------------------------------------------------------------ render

def _import_matplotlib():
    import matplotlib  # noqa: F401  (optional dependency: the pack's `report` extra)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def render(p: Parsed) -> np.ndarray:
    """The report picture as uint8 [H, W, 3]."""
    try:
        Figure, FigureCanvasAgg = _import_matplotlib()
    except ImportError:
        return render_text_only(p, "matplotlib is not installed, so this merge report is text only. For the "
                                   "picture: pip install matplotlib into ComfyUI's Python "
                                   "(the pack's optional extra 'report').")
    n = p.n
    lay = layout(n, len(p.blocks))
    W, H = lay["width"], lay["height"]
    fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    labels = list(p.models) if n <= 6 else [m.replace("model_", "m").replace("clip_", "c") for m in p.models]
    method = p.method.replace("_", " ")
    fig.text(20 / W, 1 - 30 / H, f"Merge report: {method}", fontsize=20, weight="bold", va="center")
    sub = f"scope {p.scope} · {n} models · {p.units} units"
    if p.keys:
        sub += f" · {p.keys} keys"
    if p.base:
        sub += f" · task vectors on {p.base} (strength {p.strength:g})"
    total = _number(p.timing.get("total_s"))
    if total is not None:
        sub += f" · {total:.2f} s on {p.device or '?'}"
    fig.text(20 / W, 1 - 66 / H, sub, fontsize=12, color="#444444", va="center")
    low = down_weighted(p)
    if low is not None:
        i, ratio = low
        fig.text(1 - 20 / W, 1 - 30 / H, f"{p.models[i]} down-weighted: {p.mean_coeffs[i]:.3f} "
                 f"({ratio:.2f}× its weight)", fontsize=13, color="#d62728", ha="right", va="center")

    # distances
    ax = fig.add_axes(_axes_rect(W, H, lay["distances"]))
    ax.set_title("pairwise distance between inputs", fontsize=12, pad=8)
    if p.distances is not None:
        d = np.asarray(p.distances)
        im = ax.imshow(d, cmap="magma", vmin=0, vmax=max(float(d.max()), 1e-30), aspect="auto",
                       interpolation="nearest")
        ax.set_xticks(range(n), labels, fontsize=9)
        ax.set_yticks(range(n), labels, fontsize=9)
        if n <= 8:
            hi = float(d.max()) or 1.0
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{d[i, j]:.3g}", ha="center", va="center", fontsize=8,
                            color="black" if d[i, j] > 0.6 * hi else "white")
        dbox = lay["distances"]
        cax = fig.add_axes(_axes_rect(W, H, (dbox[2] + 14, dbox[1], dbox[2] + 28, dbox[3])))
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "not computed\n(the weighted mean does\nnot measure its inputs)", ha="center",
                va="center", fontsize=11, color="#666666", transform=ax.transAxes)

    # mean coefficient bars
    ax = fig.add_axes(_axes_rect(W, H, lay["bars"]))
    ax.set_title("mean coefficient per model (ticks: input weight)", fontsize=12, pad=8)
    if p.mean_coeffs is not None:
        x = np.arange(n)
        c = np.asarray(p.mean_coeffs)
        w = np.asarray(p.weights)
        low = down_weighted(p)
        colors = ["#d62728" if low is not None and i == low[0] else "#1f77b4" for i in range(n)]
        ax.bar(x, c, color=colors, width=0.7)
        ax.scatter(x, w, marker="_", s=600, color="black", linewidths=2, zorder=3)
        ax.axhline(0, color="#888888", linewidth=0.8)
        ax.set_xticks(x, labels, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        top = max(float(c.max()), float(w.max()), 1e-9)
        bottom = min(0.0, float(c.min()))
        ax.set_ylim(bottom, top * 1.15)
        if n <= 12:
            for i, v in enumerate(c):
                ax.text(i, max(v, 0) + top * 0.02, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"{method} returns a tensor per key:\nno per-model coefficients", ha="center",
                va="center", fontsize=11, color="#666666", transform=ax.transAxes)

    # block x model coefficient heatmap
    box = lay["coefficients"]
    ax = fig.add_axes(_axes_rect(W, H, box))
    what = {"tensor": "per block (mean over its keys)", "block": "per block",
            "model": "for the whole model"}.get(p.scope, f"per {p.scope} unit")
    ax.set_title(f"coefficient {what} (rows) and model (columns)", fontsize=12, pad=8)
    if p.block_coeffs:
        m = np.asarray(p.block_coeffs)
        vmin = min(0.0, float(m.min()))
        vmax = max(float(m.max()), float(max(p.weights)), 1e-9)
        im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(n), labels, fontsize=9)
        ax.xaxis.set_ticks_position("bottom")
        ax.set_yticks(range(len(p.blocks)), [_short(b) for b in p.blocks], fontsize=8)
        if n <= 8 and len(p.blocks) <= 40:
            for r in range(m.shape[0]):
                for i in range(n):
                    v = m[r, i]
                    ax.text(i, r, f"{v:.3f}", ha="center", va="center", fontsize=7,
                            color="black" if (v - vmin) > 0.6 * (vmax - vmin) else "white")
        cax = fig.add_axes(_axes_rect(W, H, (box[2] + 20, box[1], box[2] + 36, box[3])))
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no coefficients in this report", ha="center", va="center", fontsize=11,
                color="#666666", transform=ax.transAxes)

    fig.text(20 / W, (FOOTER / 2) / H, convergence_line(p), fontsize=12, va="center")
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def render_text_only(p: Parsed | None, message: str, text: str | None = None) -> np.ndarray:
    """A plain white picture with `message` (red) and the summary, drawn with Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    body = text if text is not None else (summary(p) if p is not None else "")
    lines = _wrap(message, 110) + [""] + [w for line in body.splitlines() for w in _wrap(line, 120)]
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    line_h = 22
    img = Image.new("RGB", (WIDTH, 40 + line_h * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    y = 20
    for i, line in enumerate(lines):
        draw.text((20, y), line, fill=(180, 0, 0) if i < len(_wrap(message, 110)) else (0, 0, 0), font=font)
        y += line_h
    return np.asarray(img, dtype=np.uint8)


def _wrap(s: str, width: int) -> list[str]:
    out = []
    for para in s.splitlines() or [""]:
        words, line = para.split(" "), ""
        for w in words:
            if line and len(line) + 1 + len(w) > width:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        out.append(line)
    return out


def to_image_tensor(rgb: np.ndarray):
    import torch

    return torch.from_numpy(rgb.astype(np.float32) / 255.0).unsqueeze(0).contiguous()


class BarycenterMergeReport:
    DESCRIPTION = ("Picture of a Barycenter merge's report: pairwise distances between the inputs, the "
                   "coefficient each model received per block (a down-weighted outlier shows as a dark "
                   "column) and the solver's convergence. Connect a merge node's 'report' output; send the "
                   "image to Preview Image or Save Image. Needs matplotlib for the picture (text otherwise).")
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "summary")
    OUTPUT_TOOLTIPS = ("The report picture.", "The same, as text.")
    FUNCTION = "render"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"report": ("STRING", {
            "forceInput": True,
            "tooltip": "The 'report' output of a Barycenter merge node (JSON)."})}}

    def render(self, report):
        parsed = parse_report(report)
        text = summary(parsed)
        rgb = render(parsed)
        return {"ui": {"text": [text]}, "result": (to_image_tensor(rgb), text)}


__all__ = ["BarycenterMergeReport", "ReportError", "parse_report", "summary", "render", "layout",
           "fallback_block_of", "render_text_only", "to_image_tensor"]
