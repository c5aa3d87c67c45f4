"""The OT fusion nodes on real ComfyUI objects, in both hosts (tests/ot/node_check.py, one process
per host): recovery of a permuted copy given as effective weights, lazy patches for same-base
inputs, messages for bad input."""
from __future__ import annotations

from pathlib import Path

import pytest

from ot_helpers import run_in_host

SCRIPT = Path(__file__).resolve().parent / "node_check.py"


@pytest.fixture(scope="module", params=["snapshot", "current"])
def result(request):
    return run_in_host(SCRIPT, request.param, timeout=900)


@pytest.mark.parametrize("kind", ["MODEL", "CLIP"])
def test_permuted_copy_is_recovered(result, kind):
    if kind not in result:
        pytest.skip("the CLIP case runs in the snapshot host only (node_check.py --clip for current)")
    c = result[kind]
    assert c["permuted_moved_keys"] > 100 and c["permuted_set_keys"] == c["permuted_moved_keys"]
    assert c["permuted_ot_max_diff"] == 0.0
    assert c["permuted_plain_max_diff"] > 0.05
    assert c["permuted_identity"] < 0.05
    label = "model" if kind == "MODEL" else "clip"
    assert c["report_models"] == [f"{label}_1", f"{label}_2"]


def test_same_base_is_lazy_and_equals_weighted_mean(result):
    c = result["MODEL"]
    assert c["same_base_identity"] == 1.0
    assert c["same_base_lazy_keys"] == c["same_base_keys"] and c["same_base_set_keys"] == 0
    assert c["same_base_vs_mean_max_diff"] == 0.0
    assert c["input_unchanged_max_diff"] == 0.0


def test_bad_input_messages(result):
    e = result["MODEL"]["errors"]
    assert e["anchor"] and "anchor 3 is out of range: model_3 is not connected" in e["anchor"]
    assert e["epsilon"] and "epsilon must be > 0" in e["epsilon"]
    assert result["mixed_kinds"] and "is not a CLIP" in result["mixed_kinds"]
