"""In-process check of the OT fusion nodes on real ComfyUI objects (run as a script, one host per
process): MODEL/CLIP patchers from a tiny SD1.5 checkpoint (harness.checkpoints), loaded with
comfy.sd.load_checkpoint_guess_config; the pack imported as a package, as ComfyUI does.

Cases (results as one JSON line, the last line of stdout):
- permuted: model_2 = model_1 with its UNet (or CLIP) permuted by the spec, given as set-patches on
  a clone (so the engine reads it as an EFFECTIVE weight). OT fusion must return model_1's weights;
  the weighted-mean node must not.
- same_base (MODEL): two fine-tunes of one base: every key stays a lazy linear patch, equal to
  the weighted-mean node's result; the inputs are untouched.
- errors (MODEL): anchor not connected, epsilon 0; a MODEL given to the CLIP node.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness import checkpoints  # noqa: E402
from harness.host import import_in_process  # noqa: E402
from harness.loading import load_pack  # noqa: E402

HOST = import_in_process()

import comfy.sd  # noqa: E402


PACK = load_pack("barycenter_pack_under_test").__name__
ot_nodes = importlib.import_module(PACK + ".nodes.ot_fusion")
wm_nodes = importlib.import_module(PACK + ".nodes.weighted_mean")
engine = importlib.import_module(PACK + ".engine")
kernels_ot = importlib.import_module(PACK + ".kernels.ot")
errors = importlib.import_module(PACK + ".kernels.errors")
report_mod = importlib.import_module(PACK + ".nodes.report")


def load(seed: int, base_seed=0, noise=0.05):
    path = checkpoints.checkpoint("sd15", seed=seed, clip=True, base_seed=base_seed, noise=noise)
    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return out[0], out[1]


def effective(obj, kind: str) -> dict:
    src = engine.model_source(obj, "x") if kind == "MODEL" else engine.clip_source(obj, "x")
    return {k: src.read(k, torch.device("cpu")).float() for k in src.keys()}


def permuted_copy(obj, kind: str, seed: int):
    """A clone whose effective weights are a function-preserving permutation of obj's."""
    eff = effective(obj, kind)
    spec = kernels_ot.state_dict_spec({k: tuple(v.shape) for k, v in eff.items()})
    perm = kernels_ot.permute_state_dict(eff, spec, seed=seed)
    src = engine.model_source(obj, "x") if kind == "MODEL" else engine.clip_source(obj, "x")
    clone = obj.clone()
    patches = {k: (perm[k].to(src.stored(k).dtype),) for k in spec.key_axes()}
    clone.add_patches(patches, 1.0, 0.0)
    return clone, len(patches)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def args(**kw):
    base = {"weights": "", "anchor": 1, "solver": "exact", "epsilon": 1e-3, "rounds": 1, "barycenter": "mean",
            "device": "cpu"}
    base.update(kw)
    return base


def main():
    res = {"host": HOST.kind}
    with torch.inference_mode():
        m1, c1 = load(1)
        m2, c2 = load(2)
        cases = [("MODEL", m1, m2, ot_nodes.BarycenterOTFusion(), wm_nodes.BarycenterWeightedMean(), "model")]
        if HOST.kind == "snapshot" or "--clip" in sys.argv:  # CLIP-L (123M) once: the reading is the engine's
            cases.append(("CLIP", c1, c2, ot_nodes.BarycenterOTFusionCLIP(), wm_nodes.BarycenterWeightedMeanCLIP(),
                          "clip"))
        for kind, obj, other, node, wm, label in cases:
            case = {}
            ref = effective(obj, kind)
            perm, moved = permuted_copy(obj, kind, seed=5)
            merged, rep = node.merge(**args(**{f"{label}_1": obj, f"{label}_2": perm}))
            rep = json.loads(rep)
            case["permuted_moved_keys"] = moved
            case["permuted_ot_max_diff"] = max_diff(ref, effective(merged, kind))
            case["permuted_set_keys"] = rep["set_keys"]
            case["permuted_identity"] = rep["alignment"][f"{label}_2"]["identity_fraction"]
            plain, _ = wm.merge(**{f"{label}_1": obj, f"{label}_2": perm, "weights": "", "device": "cpu"})
            case["permuted_plain_max_diff"] = max_diff(ref, effective(plain, kind))
            report_mod.parse_report(json.dumps(rep))  # the Merge Report node accepts it
            case["report_models"] = rep["models"]
            if kind == "CLIP":  # CLIP-L cannot shrink (123M): the rest is covered by the MODEL case
                res[kind] = case
                continue
            # same base: all lazy, equal to the weighted mean node
            merged, rep = node.merge(**args(**{f"{label}_1": obj, f"{label}_2": other, "weights": "1,3"}))
            rep = json.loads(rep)
            plain, _ = wm.merge(**{f"{label}_1": obj, f"{label}_2": other, "weights": "1,3", "device": "cpu"})
            case["same_base_lazy_keys"] = rep["lazy_keys"]
            case["same_base_keys"] = rep["keys"]
            case["same_base_set_keys"] = rep["set_keys"]
            case["same_base_identity"] = rep["alignment"][f"{label}_2"]["identity_fraction"]
            case["same_base_vs_mean_max_diff"] = max_diff(effective(plain, kind), effective(merged, kind))
            # the inputs are untouched
            case["input_unchanged_max_diff"] = max_diff(ref, effective(obj, kind))
            # errors
            msgs = {}
            for name, kw in (("anchor", {"anchor": 3}), ("epsilon", {"solver": "sinkhorn", "epsilon": 0.0})):
                try:
                    node.merge(**args(**{f"{label}_1": obj, f"{label}_2": other}, **kw))
                    msgs[name] = None
                except errors.MergeInputError as e:
                    msgs[name] = str(e)
            case["errors"] = msgs
            res[kind] = case
        try:
            ot_nodes.BarycenterOTFusionCLIP().merge(**args(clip_1=c1, clip_2=m1))
            res["mixed_kinds"] = None
        except (errors.MergeInputError, TypeError) as e:
            res["mixed_kinds"] = f"{type(e).__name__}: {e}"
    print(json.dumps(res))


if __name__ == "__main__":
    main()
