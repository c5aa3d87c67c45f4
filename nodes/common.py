"""Input declarations and the call into the engine, shared by every merge node."""
from __future__ import annotations

import re

from ..engine import clip_source, merge, model_source
from ..kernels import MergeInputError

MAX_INPUTS = 12  # model_1..model_12; the web extension shows one more as each is connected
CATEGORY = "advanced/model_merging/barycenter"

TIPS = {
    "weights": "Comma-separated weight per connected input, in order (e.g. 1,2,1). Empty = equal. "
               "Normalised to sum 1; negative or all-zero lists are refused.",
    "base_model": "Optional base: merge the task vectors (input - base) and add them back to the base "
                  "(task-vector mode).",
    "strength": "Task-vector mode only: result = base + strength * merge(inputs - base).",
    "device": "Where the merge is computed: auto = ComfyUI's torch device (the GPU when there is one; the CPU "
              "where that device has no float64, e.g. Apple MPS), or cpu.",
    "scope": "Which weights share one solve: tensor = each key alone, block = each UNet/CLIP block "
             "(input_blocks.4, clip_l.layers.7; Flux/SD3: double_blocks.3, joint_blocks.12), "
             "model = the whole model as one point.",
}


class MergeNode:
    """Common declarations of every merge node: a MODEL (or CLIP, with KIND = "CLIP") and a report.
    Subclasses set KIND, DESCRIPTION, INPUT_TYPES and merge(**kwargs)."""

    KIND = "MODEL"
    FUNCTION = "merge"
    CATEGORY = CATEGORY

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.RETURN_TYPES = (cls.KIND, "STRING")
        cls.RETURN_NAMES = (cls.KIND.lower(), "report")


def model_inputs(kind: str, *, with_base: bool = True, extra_required: dict | None = None,
                 extra_optional: dict | None = None) -> dict:
    """INPUT_TYPES for an N-input merge node of MODEL (kind='MODEL') or CLIP (kind='CLIP')."""
    label = "model" if kind == "MODEL" else "clip"
    required = {
        f"{label}_1": (kind, {"tooltip": f"First {kind}: the merged result is a clone of it."}),
        f"{label}_2": (kind, {"tooltip": f"Second {kind}."}),
        "weights": ("STRING", {"default": "", "multiline": False, "tooltip": TIPS["weights"]}),
    }
    required.update(extra_required or {})
    required["device"] = (["auto", "cpu"], {"default": "auto", "tooltip": TIPS["device"]})
    optional = {f"{label}_{i}": (kind, {"tooltip": f"Optional {kind} #{i}."}) for i in range(3, MAX_INPUTS + 1)}
    if with_base:
        optional["base_model" if kind == "MODEL" else "base_clip"] = (kind, {"tooltip": TIPS["base_model"]})
        optional["strength"] = ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01,
                                          "tooltip": TIPS["strength"]})
    optional.update(extra_optional or {})
    return {"required": required, "optional": optional}


def collect(kind: str, kwargs: dict):
    """The connected inputs in order (gaps allowed), plus the base, as engine sources."""
    label = "model" if kind == "MODEL" else "clip"
    make = model_source if kind == "MODEL" else clip_source
    # ComfyUI passes linked inputs the node does not declare (an API prompt with model_13): without
    # this check the 13th model was silently left out of the merge.
    beyond = sorted((int(m.group(1)) for k, v in kwargs.items() if v is not None
                     for m in [re.fullmatch(rf"{label}_(\d+)", k)] if m and int(m.group(1)) > MAX_INPUTS))
    if beyond:
        raise MergeInputError(f"{label}_{beyond[0]} is connected, but a merge node takes at most {MAX_INPUTS} inputs "
                              f"({label}_1 to {label}_{MAX_INPUTS}); merge the rest in a second node")
    sources = []
    for i in range(1, MAX_INPUTS + 1):
        value = kwargs.get(f"{label}_{i}")
        if value is not None:
            sources.append(make(value, f"{label}_{i}"))
    base_name = "base_model" if kind == "MODEL" else "base_clip"
    base = kwargs.get(base_name)
    return sources, (make(base, base_name) if base is not None else None)


def run_merge(kind: str, method: str, kwargs: dict, *, scope: str = "tensor", params: dict | None = None):
    """Node body shared by all merge nodes: returns (merged, report_json)."""
    sources, base = collect(kind, kwargs)
    strength = kwargs.get("strength", 1.0) if base is not None else 1.0
    try:
        result = merge(sources, method=method, weights=kwargs.get("weights", ""), base=base,
                       strength=strength, scope=scope, params=params, device=kwargs.get("device", "auto"))
    except MergeInputError as e:
        # ComfyUI shows the exception text in the UI and in /history; keep it about the inputs,
        # named as the node names them (kernels count "model_i" over the connected inputs).
        names = [s.name for s in sources]
        text = re.sub(r"\bmodel_(\d+)\b",
                      lambda m: names[int(m.group(1)) - 1] if int(m.group(1)) <= len(names) else m.group(0), str(e))
        # solver messages use the kernels' parameter names: say them as the node's inputs are named
        text = text.removeprefix(f"{method}: ")
        text = re.sub(r"\btol\b", "tolerance", re.sub(r"\bmax_iter\b", "max_iterations", text))
        raise MergeInputError(f"{method.replace('_', ' ')} merge: {text}") from None
    return result.merged, result.report_json()
