"""The OT spec against ComfyUI's own UNet and CLIP classes, in both hosts.

Each host runs tests/ot/comfy_equivariance.py in its own process (two `comfy` packages cannot
share one interpreter): the PyPI snapshot (a28a9dc, March 2024) and current ComfyUI
(COMFYUI_DIR, or /work/comfy-current when present).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from ot_helpers import run_in_host

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "comfy_equivariance.py"


def _run(kind: str) -> dict:
    return run_in_host(SCRIPT, kind, timeout=600)


@pytest.fixture(scope="module", params=["snapshot", "current"])
def result(request):
    return _run(request.param)


def test_spec_permutation_preserves_outputs(result):
    for name, case in result["cases"].items():
        assert case["keys_moved"] > 0, name
        assert case["spec_permutation"] <= 1e-5, (name, case["spec_permutation"])


@pytest.mark.parametrize("trap", ["across_groupnorm_groups", "geglu_halves_separate_maps",
                                  "qk_across_head_boundary", "q_without_k", "one_sided"])
def test_each_trap_changes_outputs(result, trap):
    seen = 0
    for name, case in result["cases"].items():
        v = case.get("trap:" + trap)
        if v is None:
            continue
        seen += 1
        assert v > 1e-3, (name, trap, v)  # >= 100x the permutation's float noise
    assert seen >= 2, f"trap {trap} was not exercised"


def test_real_size_coverage(result):
    cov = result["coverage"]
    assert cov["SD15"]["groups"] == 88
    assert 783e6 < cov["SD15"]["params_in_groups"] < 785e6 and 859e6 < cov["SD15"]["params"] < 860e6
    assert cov["SDXL"]["groups"] == 241
    assert 2530e6 < cov["SDXL"]["params_in_groups"] < 2532e6
    assert cov["SD1ClipModel"]["groups"] == 24 and cov["SD1ClipModel"]["towers"] == ["clip_l"]
    assert cov["SDXLClipModel"]["groups"] == 24 + 64 and cov["SDXLClipModel"]["towers"] == ["clip_g", "clip_l"]
    assert cov["SD1ClipModel"]["sample_key"].startswith("clip_l.transformer.text_model.encoder.layers.")
