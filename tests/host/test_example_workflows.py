"""Every API-format example workflow runs in the real host and produces its images; every one has
its editor (UI-format) twin describing the same graph."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.paths import CACHE, REPO_ROOT
from tests.host.helpers import assert_non_degenerate, image_array

pytestmark = pytest.mark.host
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*_api.json"))


@pytest.fixture(scope="module")
def demo_names(checkpoints_dir):
    from harness.demo import demo_checkpoints

    demo_checkpoints(checkpoints_dir, CACHE / "loras")


def test_there_are_examples_for_every_merge_node():
    used = {n["class_type"] for p in EXAMPLES for n in json.loads(p.read_text()).values()}
    for node in ("BarycenterWeightedMean", "BarycenterWeightedMeanCLIP", "BarycenterGeometricMedian",
                 "BarycenterGeometricMedianCLIP", "BarycenterKarcherMean", "BarycenterKarcherMeanCLIP",
                 "BarycenterSignElectedMedian", "BarycenterMergeReport"):
        assert node in used, f"no example workflow uses {node}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(comfy, demo_names, path: Path):
    prompt = json.loads(path.read_text())
    run = comfy.run(prompt)
    assert run.status == "success", f"{path.name}: {run.error_text}"
    saves = [k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage")]
    assert saves
    for k in saves:
        assert_non_degenerate(image_array(comfy, run, k))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_ui_twin_matches(path: Path):
    ui_path = path.with_name(path.name.replace("_api.json", ".json"))
    assert ui_path.exists(), f"{ui_path.name} missing: run `python -m harness.workflows`"
    ui = json.loads(ui_path.read_text())
    api = json.loads(path.read_text())
    assert sorted(n["type"] for n in ui["nodes"]) == sorted(v["class_type"] for v in api.values())
    links = sum(1 for v in api.values() for x in v["inputs"].values() if isinstance(x, list))
    assert len(ui["links"]) == links
