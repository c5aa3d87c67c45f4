"""Fuzz the merge nodes' inputs through ComfyUI's HTTP API (hypothesis).

Each example is one prompt: BarycenterGeometricMedian / KarcherMean / SignElectedMedian /
WeightedMean over 2..4 tiny SD1.5 models, with or without base_model, and generated settings:
weights text (numbers, wrong counts, negatives, NaN, blanks, separators, random unicode), scope,
tolerance, max_iterations, eps, strength, drop_rate, drop_seed, device. Every prompt must end in
one of three ways:
- success: the merged model samples an image;
- an execution error that is ours: a MergeInputError / ValueError whose message names the input
  (never IndexError, KeyError, ZeroDivisionError, AttributeError, TypeError, ... from inside);
- HTTP 400 from ComfyUI's own validation (a value outside a declared range or choice list);
and the server answers afterwards.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.client import PromptRejected
from harness.graphs import Graph, conditioning, load_checkpoint, merge_node, sample_and_save
from tests.host.helpers import ckpt

pytestmark = pytest.mark.host

FAMILY = dict(arch="sd15", base_seed=0, noise=0.05)
NODES = ["BarycenterGeometricMedian", "BarycenterKarcherMean", "BarycenterSignElectedMedian",
         "BarycenterWeightedMean"]
SCOPES = {"BarycenterGeometricMedian": ["tensor", "block", "model", "element"],
          "BarycenterKarcherMean": ["tensor", "block", "model"],
          "BarycenterSignElectedMedian": ["tensor"]}
# words an error of ours uses to name the input it is about
INPUT_WORDS = ("weight", "tol", "max_iter", "eps", "strength", "drop_rate", "seed", "base_model", "scope",
               "device", "model_", "key '")
OURS = ("MergeInputError", "ValueError")

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                    st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1.0, 0.5, 2.0]))


@st.composite
def weights_text(draw, n):
    kind = draw(st.sampled_from(["empty", "valid", "valid", "valid", "numbers", "text", "special"]))
    if kind == "valid":  # one non-negative number per model, not all zero
        vals = draw(st.lists(st.sampled_from([0, 0.25, 1, 2, 3.5, 1e-3, 100]), min_size=n, max_size=n)
                    .filter(lambda v: any(v)))
        return draw(st.sampled_from([",", ", ", ";", " "])).join(str(v) for v in vals)
    if kind == "empty":
        return draw(st.sampled_from(["", " ", "\t", ",", " , ; "]))
    if kind == "text":
        return draw(st.text(max_size=24))
    if kind == "special":
        return draw(st.sampled_from(["1e400, 1, 1", "0x10,1", "½,1", "１,２", "1,,2", "nan,1", "inf, 1",
                                     "-inf,2", "1_000,2", "+1,-0", "1 2 3 4 5 6 7 8 9 10 11 12 13",
                                     "١,٢", "1.5.2,3", "()", "[1, 2]", "True, False", "0,0,0,0"]))
    count = draw(st.sampled_from([n, n, n, n - 1, n + 1, 0, 1]))
    sep = draw(st.sampled_from([",", ", ", ";", " ", " ,\t"]))
    vals = [draw(numbers) for _ in range(max(count, 0))]
    return sep.join(repr(v) if draw(st.booleans()) else str(v) for v in vals)


def out_of_range_or(valid, invalid):
    """Mostly valid (1 in 8 invalid), so that a fair share of prompts reaches the merge."""
    return st.integers(0, 7).flatmap(lambda i: invalid if i == 0 else valid)


@st.composite
def node_settings(draw):
    node = draw(st.sampled_from(NODES))
    n = draw(st.integers(2, 4))
    s = {"weights": draw(weights_text(n)),
         "device": draw(out_of_range_or(st.sampled_from(["auto", "cpu"]), st.sampled_from(["cuda", "", "CPU"])))}
    with_base = draw(st.booleans())
    if node != "BarycenterWeightedMean":
        s["scope"] = draw(out_of_range_or(st.sampled_from(SCOPES[node]), st.sampled_from(["bogus", "", "Tensor"])))
        s["tolerance"] = draw(out_of_range_or(st.sampled_from([1e-12, 1e-7, 1e-3, 0.1]),
                                              st.sampled_from([0.0, -1e-3, 10.0, math.nan, "abc"])))
        s["max_iterations"] = draw(out_of_range_or(st.sampled_from([1, 2, 100]),
                                                   st.sampled_from([0, -1, 10 ** 6, 2.5, "x"])))
    if node in ("BarycenterGeometricMedian", "BarycenterSignElectedMedian"):
        s["eps"] = draw(out_of_range_or(st.sampled_from([1e-15, 1e-8, 1e-3, 1.0]),
                                        st.sampled_from([0.0, -1.0, 2.0, math.nan])))
    if node == "BarycenterSignElectedMedian":
        s["drop_rate"] = draw(out_of_range_or(st.sampled_from([0.0, 0.1, 0.5, 0.99]),
                                              st.sampled_from([1.0, -0.1, math.nan, math.inf])))
        s["drop_seed"] = draw(out_of_range_or(st.integers(0, 2 ** 63 - 1), st.sampled_from([-1, 2 ** 64, 1.5])))
    if with_base:
        s["strength"] = draw(out_of_range_or(st.sampled_from([-4.0, -1.0, 0.0, 0.5, 1.0, 4.0]),
                                             st.sampled_from([math.nan, math.inf, 100.0, -16.5])))
    return node, n, with_base, s


def _graph(node, n, with_base, s):
    g = Graph()
    loaders = [load_checkpoint(g, ckpt(seed=i + 1, **FAMILY)) for i in range(n)]
    if with_base:
        s = {**s, "base_model": Graph.out(load_checkpoint(g, ckpt(arch="sd15", seed=0)), 0)}
    merged = merge_node(g, node, [Graph.out(l, 0) for l in loaders], **s)
    pos, neg = conditioning(g, "sd15")
    save = sample_and_save(g, Graph.out(merged, 0), Graph.out(loaders[0], 2), pos, neg, prefix="fuzz/api")
    return g, save


def _check_one(comfy, case):
    node, n, with_base, s = case
    g, save = _graph(node, n, with_base, s)
    what = json.dumps({"node": node, "models": n, "base": with_base, **s}, default=str)
    try:
        run = comfy.run(g.prompt(), timeout=300)
    except PromptRejected as e:
        assert e.status == 400, (what, e.status, e.body)
        # a refusal about one of the merge node's own settings, not a broken graph
        errors = [err for ne in (e.body.get("node_errors") or {}).values() for err in ne.get("errors", [])] \
            if isinstance(e.body, dict) else []
        names = {str((err.get("extra_info") or {}).get("input_name")) for err in errors}
        assert errors and names <= set(s), (what, e.body)
        REJECTED.update(names)
        return "rejected"
    finally:
        assert comfy.alive(), f"the server stopped answering after {what}"
    if run.status == "success":
        imgs = run.images(save)
        assert imgs, (what, run.outputs)
        img = np.asarray(Image.open(io.BytesIO(comfy.view(imgs[0]))).convert("RGB"))
        assert img.shape == (64, 64, 3), (what, img.shape)
        return "success"
    err = run.error or {}
    etype = str(err.get("exception_type", ""))
    msg = str(err.get("exception_message", ""))
    assert etype.rsplit(".", 1)[-1] in OURS, f"not a clear error of ours: {etype}: {msg}\ninputs: {what}\n" + \
        "".join(err.get("traceback", [])[-6:])
    assert err.get("node_type") == node, (what, err.get("node_type"), etype, msg)
    assert msg.strip() and any(w in msg for w in INPUT_WORDS), f"message names no input: {msg!r}\ninputs: {what}"
    return "refused"


OUTCOMES: dict[str, int] = {}
REJECTED: set[str] = set()  # inputs ComfyUI's validation refused


# BARYCENTER_FUZZ_EXAMPLES=200 BARYCENTER_FUZZ_RANDOM=1: a longer exploratory run with fresh examples
@settings(max_examples=int(os.environ.get("BARYCENTER_FUZZ_EXAMPLES", 25)), deadline=None,
          derandomize=not os.environ.get("BARYCENTER_FUZZ_RANDOM"),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=node_settings())
def test_fuzzed_node_inputs_end_cleanly(comfy, case):
    outcome = _check_one(comfy, case)
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def test_fuzz_reached_every_outcome():
    """The generator is not lopsided: the examples above hit success, our refusal and HTTP 400."""
    print(f"[fuzz api] outcomes: {OUTCOMES}; HTTP 400 for: {sorted(REJECTED)}", file=sys.stderr)
    assert set(OUTCOMES) == {"success", "refused", "rejected"}, OUTCOMES
