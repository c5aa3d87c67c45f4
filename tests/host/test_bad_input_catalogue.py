"""Bad-input catalogue (issue 7): malformed or unusual inputs sent to a real ComfyUI over HTTP.

One test per case in CASES, three prompts each:
1. the case's input loaders -> BarycenterTestHashModel/CLIP: digests of the IN-MEMORY inputs;
2. the case itself: an HTTP 400 or a /history error whose message names the problem, or a result
   that is checked numerically against the kernels;
3. the same loaders (same node ids and inputs, so ComfyUI serves the same cached objects; the
   digest's object id shows it) -> digests again, which must equal those of prompt 1, plus a valid
   merge -> KSampler -> SaveImage, which must succeed.
The message (or result) seen per case is written to .cache/artifacts/bad_input_catalogue-<host>.json;
docs/reliability.md lists every case, and test_docs_table_lists_every_case keeps the two in step.
"""
from __future__ import annotations

import base64
import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness.checkpoints import LORAS, checkpoint, load_state_dict, lora
from harness.client import PromptRejected
from harness.graphs import Graph, conditioning, load_checkpoint, merge_node, sample_and_save
from harness.paths import CACHE
from harness.server import unets_in_half
from tests.host.helpers import assert_non_degenerate, ckpt, image_array, saved_checkpoint, unet
from tests.host.test_robust_nodes import NODES, FAMILY, assert_linear_close, captured, expected_linear

pytestmark = [pytest.mark.host, pytest.mark.weights]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "reliability.md"
GM, KM, WM = "BarycenterGeometricMedian", "BarycenterKarcherMean", "BarycenterWeightedMean"
SE = "BarycenterSignElectedMedian"
METHOD = {GM: "geometric_median", KM: "karcher", WM: "weighted_mean"}
UNET = "model.diffusion_model."
_n = itertools.count()


# --- what a case builds and what comes back -------------------------------------------------------

@dataclass
class Bad:
    """The bad prompt, the inputs to digest (links and their type), and the check of its outcome."""
    graph: Graph
    hashed: list  # [(link, "MODEL" | "CLIP", values_of)]
    check: Callable[["Outcome"], str]
    data: dict = field(default_factory=dict)  # what the check needs (file state dicts, prefixes)


@dataclass
class Outcome:
    comfy: object
    server: object
    bad: Bad
    before: list[dict]
    run: object = None
    rejected: PromptRejected | None = None

    @property
    def text(self) -> str:
        if self.rejected is not None:
            return json.dumps(self.rejected.body)
        return self.run.error_text if self.run is not None else ""


def sd15(seed: int, **kw) -> str:
    return ckpt(seed=seed, **{**FAMILY, **kw})


def files(*names_and_kw) -> list[dict]:
    return [unet(load_state_dict(checkpoint(seed=s, **{**FAMILY, **kw}))) for s, kw in names_and_kw]


def merge_case(node: str, names: list[str], check, *, settings: dict | None = None, clip: bool = False,
               output: str = "report", links: list | None = None, base: str | None = None, data=None) -> Bad:
    """Loaders for `names` (one per distinct name), a merge node over them, and one output:
    'report' (capture the report: the merge runs, nothing is sampled) or 'save' (CheckpointSave)."""
    g = Graph()
    loaders = {}
    for n in names:
        if n not in loaders:
            loaders[n] = load_checkpoint(g, n)
    idx = 1 if clip else 0
    kind = "CLIP" if clip else "MODEL"
    ins = links if links is not None else [Graph.out(loaders[n], idx) for n in names]
    opts = {**default_settings(node), **(settings or {})}
    if base is not None:
        loaders.setdefault(base, load_checkpoint(g, base))
        opts["base_model"] = Graph.out(loaders[base], 0)
    merged = merge_node(g, node, ins, **opts)
    data = dict(data or {})
    data["merge"] = merged
    if output == "save":
        prefix = f"checkpoints/catalogue-{next(_n)}-"
        first = loaders[names[0]]
        g.add("CheckpointSave", model=Graph.out(first, 0) if clip else Graph.out(merged, 0),
              clip=Graph.out(merged, 0) if clip else Graph.out(first, 1), vae=Graph.out(first, 2),
              filename_prefix=prefix)
        data["prefix"] = prefix
    else:
        data["capture"] = g.add("BarycenterTestCaptureText", text=Graph.out(merged, 1))
    hashed = [(Graph.out(l, idx), kind, "") for l in loaders.values()]
    return Bad(g, hashed, check, data)


def default_settings(node: str) -> dict:
    base = node[:-4] if node.endswith("CLIP") else node
    return dict(NODES[base][1]) if base in NODES else {}


# --- checks -----------------------------------------------------------------------------------------

def error(*needles):
    """The prompt ran and failed; its /history error contains every needle."""
    def check(o: Outcome) -> str:
        assert o.rejected is None, f"rejected at queue time, expected a run error: {o.rejected.body}"
        assert o.run.status == "error", f"expected an error containing {needles}; outputs {o.run.outputs}"
        for n in needles:
            assert n in o.run.error_text, f"{n!r} not in: {o.run.error_text}"
        return o.run.error_text
    return check


def rejected(*needles):
    """POST /prompt answered HTTP 400 (ComfyUI's validation) and the body contains every needle."""
    def check(o: Outcome) -> str:
        assert o.rejected is not None, f"expected HTTP 400, the prompt ran: {o.run.status} {o.run.error_text}"
        assert o.rejected.status == 400, o.rejected
        for n in needles:
            assert n in o.text, f"{n!r} not in: {o.text}"
        return "HTTP 400: " + "; ".join(
            f"{e.get('message')}: {e.get('details')}" for ne in o.rejected.body.get("node_errors", {}).values()
            for e in ne.get("errors", []))
    return check


def succeeded(o: Outcome):
    assert o.rejected is None, o.rejected.body
    assert o.run.status == "success", o.run.error_text


def saved_unet(o: Outcome) -> dict:
    return unet(saved_checkpoint(o.server, o.bad.data["prefix"]))


def equals_kernel(method: str, xs_fn, *, weights="", every: int = 5, settings=None):
    """The saved merge equals the kernels' merge of the input files (every `every`-th key)."""
    def check(o: Outcome) -> str:
        succeeded(o)
        saved = saved_unet(o)
        xs = xs_fn(o)
        keys = sorted(xs[0])[::every]
        sub = [{k: x[k] for k in keys} for x in xs]
        s = settings or {"tolerance": 1e-7, "max_iterations": 100, "eps": 1e-8, "scope": "tensor"}
        if method == "weighted_mean":
            w = [float(v) for v in weights.split(",")] if weights else [1.0] * len(xs)
            w = [v / max(w) for v in w]
            w = [v / sum(w) for v in w]
            exp = {k: sum(wi * x[k].double() for wi, x in zip(w, sub)) for k in keys}
            scale = {k: sum(wi * x[k].double().abs() for wi, x in zip(w, sub)) for k in keys}
        else:
            exp, _, scale = expected_linear(method, sub, s, weights=weights)
        assert_linear_close(saved, exp, scale)
        return f"result equals the kernels' {method} of the inputs ({len(keys)} keys checked)"
    return check


def exact_copy_of(x_fn):
    def check(o: Outcome) -> str:
        succeeded(o)
        saved, x = saved_unet(o), x_fn()
        assert saved.keys() == x.keys()
        for k in x:
            assert torch.equal(saved[k].float(), x[k].float()), f"{k} differs from the input"
        return "result equals the input bit for bit"
    return check


def all_zero(o: Outcome) -> str:
    succeeded(o)
    saved = saved_unet(o)
    nonzero = [k for k, v in saved.items() if bool(v.float().abs().max() != 0)]
    assert not nonzero, f"not zero: {nonzero[:3]}"
    return f"result is all zero ({len(saved)} keys)"


# --- modified files ----------------------------------------------------------------------------------

def variant(checkpoints_dir: Path, tag: str, seed: int, edit) -> str:
    """A copy of sd15(seed) edited by `edit(state_dict)`, written once into the checkpoints folder."""
    src = checkpoint(seed=seed, **FAMILY)
    name = f"catalogue-{tag}-{src.stem}.safetensors"
    path = checkpoints_dir / name
    if not path.is_file():
        sd = dict(load_state_dict(src))
        edit(sd)
        tmp = path.with_name("." + name + ".tmp")
        save_file(sd, str(tmp))
        tmp.replace(path)
    return name


def set_value(key, value):
    def edit(sd):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[5] = value
    return edit


def reshaped(key, shape):
    def edit(sd):
        sd[key] = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(sd[key].dtype)
    return edit


def removed(key):
    def edit(sd):
        del sd[key]
    return edit


def added(key):
    def edit(sd):
        sd[key] = torch.ones(3, dtype=torch.float16)
    return edit


# --- the cases -----------------------------------------------------------------------------------------

RES_BIAS = "input_blocks.1.0.in_layers.2.bias"
RES_WEIGHT = "input_blocks.1.0.in_layers.2.weight"
FIRST_CONV = "input_blocks.0.0.weight"


def case_sd15_with_sdxl(ctx):
    return merge_case(GM, [sd15(1), ckpt(arch="sdxl", seed=1)], error("model_2", "SDXL", "SD15"))


def case_clip_l_with_clip_g(ctx):
    return merge_case(GM + "CLIP", [sd15(1, clip=True), ckpt(arch="sdxl", seed=1, clip=True)],
                      error("clip_2", "CLIP-L+CLIP-G", "CLIP-L"), clip=True)


def case_base_model_other_arch(ctx):
    return merge_case(KM, [sd15(1), sd15(2)], error("base_model", "SDXL", "SD15"),
                      base=ckpt(arch="sdxl", seed=1))


def case_model_into_clip_input(ctx):
    g = Graph()
    la, lb = load_checkpoint(g, sd15(1, clip=True)), load_checkpoint(g, sd15(2, clip=True))
    clip = merge_node(g, "BarycenterWeightedMeanCLIP", [Graph.out(la, 1), Graph.out(lb, 0)])
    g.add("BarycenterTestCaptureText", text=Graph.out(clip, 1))
    return Bad(g, [(Graph.out(la, 1), "CLIP", ""), (Graph.out(lb, 0), "MODEL", "")],
               rejected("clip_2", "MODEL", "CLIP"))


def case_report_from_non_report_string(ctx):
    names = [sd15(1), sd15(2)]
    bad = merge_case(GM, names, error("is not a Barycenter merge report", "not JSON"))
    g = bad.graph
    first = g.add("BarycenterMergeReport", report=Graph.out(bad.data["merge"], 1))
    # its `summary` output is a STRING, but not a report: fed to a second Merge Report
    second = g.add("BarycenterMergeReport", report=Graph.out(first, 1))
    g.add("PreviewImage", images=Graph.out(second, 0))
    return bad


def case_one_model_only(ctx):
    g = Graph()
    la = load_checkpoint(g, sd15(1))
    merged = merge_node(g, GM, [Graph.out(la, 0)], **default_settings(GM))
    g.add("BarycenterTestCaptureText", text=Graph.out(merged, 1))
    return Bad(g, [(Graph.out(la, 0), "MODEL", "")], rejected("model_2", "Required input is missing"))


def case_missing_unet_key(ctx):
    """ComfyUI loads a file without one UNet key and leaves that weight uninitialised (torch.empty,
    'unet missing' in its log): the merge must use exactly what ComfyUI holds, or name the key."""
    name = variant(ctx.checkpoints_dir, "missing", 2, removed(UNET + RES_BIAS))
    names = [sd15(1), name, sd15(3)]

    def check(o: Outcome) -> str:
        raw = o.before[1]["values"]["diffusion_model." + RES_BIAS]
        held = torch.from_numpy(np.frombuffer(base64.b64decode(raw), dtype=np.float32).copy())
        if not bool(torch.isfinite(held).all()):
            kind = "NaN" if bool(torch.isnan(held).any()) else "Inf"
            error("model_2", RES_BIAS, kind)(o)
            return f"ComfyUI left the weight uninitialised ({kind} there): " + o.run.error_text
        x1, x3 = files((1, {}), (3, {}))
        xs = [{RES_BIAS: x1[RES_BIAS]}, {RES_BIAS: held.reshape(x1[RES_BIAS].shape)}, {RES_BIAS: x3[RES_BIAS]}]
        return ("ComfyUI left the weight uninitialised (finite there): "
                + equals_kernel("geometric_median", lambda _: xs, every=1)(o))

    bad = merge_case(GM, names, check, output="save")
    bad.hashed[1] = (bad.hashed[1][0], "MODEL", "diffusion_model." + RES_BIAS)
    return bad


def case_extra_unknown_key(ctx):
    name = variant(ctx.checkpoints_dir, "extra", 2, added(UNET + "not_a_layer.weight"))
    return merge_case(GM, [sd15(1), name, sd15(3)],
                      equals_kernel("geometric_median", lambda o: files((1, {}), (2, {}), (3, {}))), output="save")


def case_shape_differs_in_one_key(ctx):
    # 9 input channels: the layout of an SD1.5 inpainting UNet; ComfyUI detects it as SD15 as well
    name = variant(ctx.checkpoints_dir, "in9", 2, reshaped(UNET + FIRST_CONV, (320, 9, 3, 3)))
    return merge_case(GM, [sd15(1), name, sd15(3)],
                      error("model_2", FIRST_CONV, "[320, 9, 3, 3]", "[320, 4, 3, 3]"))


def case_shape_wrong_for_arch_in_file(ctx):
    name = variant(ctx.checkpoints_dir, "bias321", 2, reshaped(UNET + RES_BIAS, (321,)))
    bad = merge_case(GM, [sd15(1), name, sd15(3)], error("size mismatch", RES_BIAS, "321"))
    del bad.hashed[1]  # ComfyUI's loader refuses the file: there is no model_2 in memory
    return bad


def case_nan_in_one_tensor(ctx):
    name = variant(ctx.checkpoints_dir, "nan", 2, set_value(UNET + RES_WEIGHT, float("nan")))
    return merge_case(KM, [sd15(1), name, sd15(3)], error("model_2", RES_WEIGHT, "NaN"))


def case_nan_in_one_tensor_element(ctx):
    """The element median merges its keys on worker threads: the error still names the key."""
    name = variant(ctx.checkpoints_dir, "nan", 2, set_value(UNET + RES_WEIGHT, float("nan")))
    return merge_case(GM, [sd15(1), name, sd15(3)], error("model_2", RES_WEIGHT, "NaN"),
                      settings={"scope": "element"})


def case_nan_in_one_tensor_sign_elected(ctx):
    """The sign-elected median's Gram passes run on worker threads: the error still names the key."""
    name = variant(ctx.checkpoints_dir, "nan", 2, set_value(UNET + RES_WEIGHT, float("nan")))
    return merge_case(SE, [sd15(1), name, sd15(3)], error("model_2", RES_WEIGHT, "NaN"), base=sd15(4))


def case_inf_in_one_tensor(ctx):
    name = variant(ctx.checkpoints_dir, "inf", 3, set_value(UNET + RES_WEIGHT, float("inf")))
    return merge_case(GM, [sd15(1), sd15(2), name], error("model_3", RES_WEIGHT, "Inf"))


def _zero(seed):
    return ckpt(arch="sd15", seed=seed, scale=0.0)


def case_all_zero_models_gm(ctx):
    return merge_case(GM, [_zero(1), _zero(2), _zero(3)], all_zero, output="save")


def case_all_zero_models_karcher(ctx):
    return merge_case(KM, [_zero(1), _zero(2), _zero(3)], all_zero, output="save")


def case_identical_models_gm(ctx):
    return merge_case(GM, [sd15(1)] * 3, exact_copy_of(lambda: files((1, {}))[0]), output="save",
                      settings={"weights": "1,2,3"})


def case_identical_models_karcher(ctx):
    return merge_case(KM, [sd15(1)] * 3, exact_copy_of(lambda: files((1, {}))[0]), output="save")


def case_eight_models(ctx):
    seeds = list(range(1, 9))
    return merge_case(GM, [sd15(s) for s in seeds],
                      equals_kernel("geometric_median", lambda o: files(*[(s, {}) for s in seeds]), every=9),
                      output="save")


def case_twelve_models(ctx):
    seeds = list(range(1, 13))
    w = ",".join(str(s) for s in seeds)
    return merge_case(WM, [sd15(s) for s in seeds],
                      equals_kernel("weighted_mean", lambda o: files(*[(s, {}) for s in seeds]), weights=w, every=9),
                      output="save", settings={"weights": w})


def case_thirteen_models(ctx):
    bad = merge_case(WM, [sd15(s) for s in range(1, 13)], error("model_13", "12"))
    node = bad.graph.nodes[bad.data["merge"]]["inputs"]
    node["model_13"] = node["model_1"]  # one more than the node declares
    return bad


def weights_case(node, weights, check, output="report"):
    def build(ctx):
        return merge_case(node, [sd15(1), sd15(2), sd15(3)], check, settings={"weights": weights}, output=output)
    return build


def setting_case(setting, value, check):
    def build(ctx):
        return merge_case(GM, [sd15(1), sd15(2)], check, settings={setting: value})
    return build


def dtype_case(a, b):
    def build(ctx):
        def check(o: Outcome) -> str:
            line = equals_kernel("karcher", lambda _: files((1, {"dtype": a}), (2, {"dtype": b})), weights="1,2",
                                 settings={"tolerance": 1e-7, "max_iterations": 100, "scope": "tensor"})(o)
            got = {str(v.dtype).replace("torch.", "") for v in saved_unet(o).values()}
            held = set(o.before[0]["dtypes"])
            # a GPU host (or --fp16-unet) saves its fp16 UNet in fp16 where model_1 holds a key in fp32
            assert got == held or (unets_in_half() and got <= held), f"saved {got}, model_1 holds {sorted(held)}"
            return f"{line}; stored as model_1 ({', '.join(sorted(got))})"
        return merge_case(KM, [sd15(1, dtype=a), sd15(2, dtype=b)], check, output="save",
                          settings={"weights": "1,2"})
    return build


def lora_case(lora_name_fn, what):
    """LoraLoader on model_1, then a merge with model_2 and model_3: the merge must use the weights
    ComfyUI itself uses (CheckpointSave of the LoRA'd model_1 alone, in the same prompt)."""
    def build(ctx):
        g = Graph()
        la, lb, lc = (load_checkpoint(g, sd15(s)) for s in (1, 2, 3))
        lo = g.add("LoraLoader", model=Graph.out(la, 0), clip=Graph.out(la, 1), lora_name=lora_name_fn(),
                   strength_model=1.0, strength_clip=0.0)
        merged = merge_node(g, GM, [Graph.out(lo, 0), Graph.out(lb, 0), Graph.out(lc, 0)], **default_settings(GM))
        alone, prefix = f"checkpoints/catalogue-{next(_n)}-lora-", f"checkpoints/catalogue-{next(_n)}-"
        for model, p in ((Graph.out(lo, 0), alone), (Graph.out(merged, 0), prefix)):
            g.add("CheckpointSave", model=model, clip=Graph.out(la, 1), vae=Graph.out(la, 2), filename_prefix=p)

        def check(o: Outcome) -> str:
            effective = unet(saved_checkpoint(o.server, alone))
            x1, x2, x3 = files((1, {}), (2, {}), (3, {}))
            changed = sum(not torch.equal(effective[k].float(), x1[k].float()) for k in x1)
            line = equals_kernel("geometric_median", lambda _: [effective, x2, x3], every=1)(o)
            patched = o.before[1]["patched_keys"]
            return f"{what}: ComfyUI patched {patched} keys, {changed} changed; {line}"

        return Bad(g, [(Graph.out(la, 0), "MODEL", ""), (Graph.out(lo, 0), "MODEL", ""),
                       (Graph.out(lb, 0), "MODEL", ""), (Graph.out(lc, 0), "MODEL", "")], check,
                   {"prefix": prefix})
    return build


def bad_shape_lora() -> str:
    """The tiny SD1.5 LoRA with one layer's lora_down for 100 input features instead of 320."""
    src = lora("sd15", seed=7)
    path = LORAS / f"catalogue-badshape-{src.name}"
    if not path.is_file():
        sd = dict(load_state_dict(src))
        key = next(k for k in sorted(sd) if k.endswith("attn1_to_q.lora_down.weight"))
        sd[key] = sd[key][:, :100].contiguous()
        tmp = path.with_name("." + path.name + ".tmp")
        save_file(sd, str(tmp))
        tmp.replace(path)
    return path.name


@dataclass
class Case:
    id: str
    what: str
    build: Callable


CASES = [
    Case("sd15_unet_with_sdxl_unet", "SD1.5 UNet and SDXL UNet in one merge", case_sd15_with_sdxl),
    Case("clip_l_with_clip_g", "CLIP-L (SD1.5) and CLIP-L+G (SDXL) in one CLIP merge", case_clip_l_with_clip_g),
    Case("base_model_other_arch", "SD1.5 inputs, SDXL base_model", case_base_model_other_arch),
    Case("model_into_clip_input", "a MODEL output linked to clip_2 of a CLIP merge", case_model_into_clip_input),
    Case("report_from_non_report_string", "Merge Report fed another Merge Report's summary (a STRING)",
         case_report_from_non_report_string),
    Case("one_model_only", "only model_1 connected", case_one_model_only),
    Case("missing_unet_key", "model_2's file lacks one UNet key", case_missing_unet_key),
    Case("extra_unknown_key", "model_2's file has one unknown UNet key", case_extra_unknown_key),
    Case("shape_differs_in_one_key", "model_2 has 9 input channels (inpainting layout)", case_shape_differs_in_one_key),
    Case("shape_wrong_for_arch_in_file", "model_2's file has a bias of the wrong length",
         case_shape_wrong_for_arch_in_file),
    Case("nan_in_one_tensor", "one NaN in one tensor of model_2 (Karcher)", case_nan_in_one_tensor),
    Case("nan_in_one_tensor_element", "one NaN in one tensor of model_2 (geometric median, element scope)",
         case_nan_in_one_tensor_element),
    Case("nan_in_one_tensor_sign_elected", "one NaN in one tensor of model_2 (sign-elected median)",
         case_nan_in_one_tensor_sign_elected),
    Case("inf_in_one_tensor", "one Inf in one tensor of model_3 (geometric median)", case_inf_in_one_tensor),
    Case("all_zero_models_gm", "three all-zero models, geometric median", case_all_zero_models_gm),
    Case("all_zero_models_karcher", "three all-zero models, Karcher mean", case_all_zero_models_karcher),
    Case("identical_models_gm", "the same file three times, geometric median, weights 1,2,3",
         case_identical_models_gm),
    Case("identical_models_karcher", "the same file three times, Karcher mean", case_identical_models_karcher),
    Case("eight_models", "8 inputs, geometric median", case_eight_models),
    Case("twelve_models", "12 inputs, weighted mean, weights 1..12", case_twelve_models),
    Case("thirteen_models", "an API prompt with model_13 (the node declares 12)", case_thirteen_models),
    Case("weights_text", "weights 'a,b,c'", weights_case(GM, "a,b,c", error("weight 1", "'a'", "not a number"))),
    Case("weights_wrong_count", "weights '1,2' for 3 models",
         weights_case(KM, "1,2", error("2 weights", "3 models"))),
    Case("weights_negative", "weights '1,-2,1'", weights_case(WM, "1,-2,1", error("model_2", "-2"))),
    Case("weights_all_zero", "weights '0,0,0'", weights_case(GM, "0,0,0", error("all weights are zero"))),
    Case("weights_huge_1e308", "weights '1e308,1e308,1' (finite, their sum overflows)",
         weights_case(WM, "1e308,1e308,1", equals_kernel("weighted_mean",
                                                          lambda o: files((1, {}), (2, {}), (3, {})),
                                                          weights="1e308,1e308,1"), output="save")),
    Case("weights_overflow_1e400", "weights '1,1e400,1' (1e400 reads as inf)",
         weights_case(KM, "1,1e400,1", error("model_2", "inf"))),
    Case("weights_nan_text", "weights 'nan,1,1'", weights_case(GM, "nan,1,1", error("model_1", "nan"))),
    Case("weights_inf_text", "weights '1,1,-inf'", weights_case(WM, "1,1,-inf", error("model_3", "-inf"))),
    Case("tolerance_zero", "tolerance 0 (declared min 1e-12)", setting_case("tolerance", 0.0, rejected("tolerance"))),
    Case("tolerance_nan", "tolerance 'nan' (passes ComfyUI's range check)",
         setting_case("tolerance", "nan", error("tolerance must be finite", "nan"))),
    Case("max_iterations_zero", "max_iterations 0 (declared min 1)",
         setting_case("max_iterations", 0, rejected("max_iterations"))),
    Case("eps_negative", "eps -1 (declared min 1e-15)", setting_case("eps", -1.0, rejected("eps"))),
    *[Case(f"dtypes_{a}_{b}", f"model_1 {a}, model_2 {b} (Karcher, weights 1,2)", dtype_case(a, b))
      for a, b in itertools.combinations(["fp32", "fp16", "bf16", "fp8_e4m3fn"], 2)],
    *[Case(f"dtypes_{a}_{a}", f"two {a} models (Karcher, weights 1,2)", dtype_case(a, a))
      for a in ["fp32", "fp16", "bf16", "fp8_e4m3fn"]],
    Case("lora_sdxl_on_sd15", "an SDXL LoRA on SD1.5 model_1 (keys missing or of other shapes)",
         lora_case(lambda: lora("sdxl", seed=7).name, "SDXL LoRA on SD1.5")),
    Case("lora_shape_mismatch", "a LoRA whose lora_down for one layer has the wrong shape",
         lora_case(bad_shape_lora, "LoRA with one misshapen layer")),
]


# --- the runner ---------------------------------------------------------------------------------------

@dataclass
class Ctx:
    checkpoints_dir: Path


def inputs_graph(bad: Bad):
    """bad.graph pruned to the ancestors of the hashed inputs (same ids, so the same cache entries),
    plus a digest node per hashed input. Returns (graph, digest node ids)."""
    keep, stack = set(), [link[0] for link, _, _ in bad.hashed]
    while stack:
        n = stack.pop()
        if n not in keep:
            keep.add(n)
            stack += [v[0] for v in bad.graph.nodes[n]["inputs"].values() if isinstance(v, list)]
    g = Graph()
    g.nodes = {k: copy.deepcopy(v) for k, v in bad.graph.nodes.items() if k in keep}
    g._ids = itertools.count(max(int(k) for k in bad.graph.nodes) + 1)
    ids = []
    for link, kind, values_of in bad.hashed:
        if kind == "MODEL":
            ids.append(g.add("BarycenterTestHashModel", model=link, values_of=values_of))
        else:
            ids.append(g.add("BarycenterTestHashCLIP", clip=link))
    return g, ids


def digests(comfy, bad: Bad, extra=None):
    """Run the inputs graph (plus `extra(g)`, whose return value comes back as the third item)."""
    g, ids = inputs_graph(bad)
    extra_id = extra(g) if extra is not None else None
    run = comfy.run(g.prompt())
    assert run.status == "success", f"digest prompt failed: {run.error_text}"
    return [captured(run, i) for i in ids], run, extra_id


def valid_merge(g: Graph) -> str:
    """The next valid prompt's work: a weighted mean of two SD1.5 models -> KSampler -> SaveImage
    (returns its id). The weighted mean: no Gram pass, so ~40 cases stay cheap."""
    have = {v["inputs"].get("ckpt_name"): k for k, v in g.nodes.items() if v["class_type"] == "CheckpointLoaderSimple"}
    la, lb = (have.get(sd15(s)) or load_checkpoint(g, sd15(s)) for s in (1, 2))  # cached loaders when there
    merged = merge_node(g, WM, [Graph.out(la, 0), Graph.out(lb, 0)], weights="1,2")
    pos, neg = conditioning(g, "sd15")
    return sample_and_save(g, Graph.out(merged, 0), Graph.out(la, 2), pos, neg, prefix=f"catalogue_{next(_n)}")


def record(host_kind: str, case_id: str, observed: str) -> None:
    out = CACHE / "artifacts" / f"bad_input_catalogue-{host_kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    seen = json.loads(out.read_text()) if out.is_file() else {}
    seen[case_id] = observed
    out.write_text(json.dumps(seen, indent=1, sort_keys=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(comfy, server, checkpoints_dir, case):
    bad = case.build(Ctx(checkpoints_dir))
    before, _, _ = digests(comfy, bad)

    outcome = Outcome(comfy, server, bad, before)
    try:
        outcome.run = comfy.run(bad.graph.prompt())
    except PromptRejected as e:
        outcome.rejected = e
    observed = bad.check(outcome)
    assert comfy.alive(), "the server stopped answering"

    after, run, save = digests(comfy, bad, extra=valid_merge)
    assert_non_degenerate(image_array(comfy, run, save))
    for (link, kind, _), b, a in zip(bad.hashed, before, after):
        assert a["object"] == b["object"], f"{kind} from node {link[0]}: not the cached object of prompt 1"
        for field_ in ("weights", "patches", "keys", "dtypes"):
            assert a[field_] == b[field_], f"{kind} from node {link[0]}: {field_} changed by the bad prompt"
    record(server.host.kind, case.id, observed)


def test_docs_table_lists_every_case():
    text = DOCS.read_text()
    rows = set(re.findall(r"^\|\s*`([a-z0-9_]+)`\s*\|", text, flags=re.M))
    missing = [c.id for c in CASES if c.id not in rows]
    assert not missing, f"cases missing from {DOCS.name}: {missing}"
    unknown = sorted(rows - {c.id for c in CASES})
    assert not unknown, f"{DOCS.name} lists cases that CASES does not have: {unknown}"
    assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"
