"""The pack's front end in a real browser: headless Chromium (Debian's) driven by playwright-core
(npm, in .cache/node; `scripts/setup_browser.sh` installs both) opens the ComfyUI page of the
session's host (the March-2024 snapshot's built-in UI, or the current frontend with COMFYUI_DIR),
loads tests/browser/workflows/outlier_report.json, drags a link onto the merge node's next model
input, checks that inputs grow and shrink, reloads the saved workflow, queues it and waits for the
Merge Report picture to appear in the Preview Image node. Screenshots go to
.cache/artifacts/browser/<host>/ (and, with BARYCENTER_UPDATE_DOCS=1, the README's pictures to
docs/images/).

A missing browser skips locally and fails in CI (CI=true).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from harness.paths import CACHE, REPO_ROOT
from tests.conftest import skip_or_fail
from tests.host.helpers import ckpt

pytestmark = [pytest.mark.host, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
CHROMIUM = Path(os.environ.get("BARYCENTER_CHROMIUM", "/usr/bin/chromium"))
NODE_MODULES = CACHE / "node" / "node_modules"
DOCS = REPO_ROOT / "docs" / "images"
MAX_DOC_PNG = 300 * 1024

MERGE, REPORT, PREVIEW, OUTLIER_LOADER = 5, 6, 7, 4


@pytest.fixture(scope="session")
def browser_ready():
    node = shutil.which("node")
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if node is None:
        missing.append("node (apt-get install nodejs)")
    if not (NODE_MODULES / "playwright-core" / "package.json").exists():
        missing.append(f"playwright-core in {NODE_MODULES}")
    if missing:
        skip_or_fail("browser tests need " + ", ".join(missing) + ": run scripts/setup_browser.sh")
    return node


def _post(url: str, data) -> None:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def _names(inputs):
    return [i["name"] + ("*" if i["link"] is not None else "") for i in inputs]


def _shrink_png(src: Path, dest: Path) -> None:
    """Copy a PNG for the README, quantised to a palette when that keeps it under 300 KB."""
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    im = Image.open(src).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    if buf.tell() > 200 * 1024:
        buf = io.BytesIO()
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG", optimize=True)
    if buf.tell() > MAX_DOC_PNG:
        raise AssertionError(f"{dest.name} would be {buf.tell() // 1024} KB (> 300 KB)")
    dest.write_bytes(buf.getvalue())


def test_dynamic_inputs_and_report_in_browser(browser_ready, server, comfy, tmp_path):
    host = server.host.kind
    try:
        info = comfy.object_info()
    except Exception as e:  # pragma: no cover
        pytest.fail(f"object_info failed: {e}")
    if "BarycenterMergeReport" not in info or "BarycenterGeometricMedian" not in info:
        pytest.fail("the pack did not register its nodes (import failure?); server log:\n" + server.log_tail())
    merge_types = sorted(k for k, v in info.items() if k.startswith("Barycenter")
                         and ({"model_1", "clip_1"} & set(v["input"]["required"])))
    all_types = merge_types + ["BarycenterMergeReport"]
    clip_types = [t for t in merge_types if "clip_1" in info[t]["input"]["required"]]

    names = {f"INLIER_{i}": ckpt(arch="sd15", seed=i, base_seed=0, noise=0.05) for i in (1, 2, 3)}
    names["OUTLIER"] = ckpt(arch="sd15", seed=9, base_seed=0, noise=2.0)
    workflow = json.loads((HERE / "workflows" / "outlier_report.json").read_text())
    for n in workflow["nodes"]:
        if n["type"] == "CheckpointLoaderSimple":
            n["widgets_values"] = [names[n["widgets_values"][0]]]

    # first-run dialogs and overlays of the current frontend (ignored by the snapshot)
    _post(server.url + "/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                     "Comfy.Notification.ShowVersionUpdates": False})

    artifacts = CACHE / "artifacts" / "browser" / host
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    result = artifacts / "result.json"
    cfg = {
        "url": server.url + "/", "chromium": str(CHROMIUM), "nodeModules": str(NODE_MODULES),
        "artifacts": str(artifacts), "result": str(result), "workflow": workflow,
        "mergeTypes": merge_types, "allTypes": all_types, "clipType": clip_types[0] if clip_types else None,
        "mergeNode": MERGE, "reportNode": REPORT, "previewNode": PREVIEW, "loaderNodes": [1, 2, 3, OUTLIER_LOADER],
        "dragFrom": [OUTLIER_LOADER, 0], "dragTo": "model_4", "reloadExtraFrom": 1,
        "widgetValues": {"scope": "block"}, "runTimeoutMs": 120_000,
    }
    cfg_path = tmp_path / "driver.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.run([browser_ready, str(HERE / "driver.mjs"), str(cfg_path)], capture_output=True,
                          text=True, timeout=220)
    (artifacts / "driver.log").write_text(proc.stdout + proc.stderr)
    assert result.exists(), f"driver wrote no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(result.read_text())
    assert "fatal" not in out, out["fatal"] + "\n" + proc.stderr[-3000:]
    print(f"\n[browser] {host} frontend {out['frontend']}; screenshots in {artifacts}")

    assert out["frontend"]["extension"], "the barycenter.nodes extension was not registered in the page"
    ours = [e for e in out["pageErrors"] if "barycenter" in e.lower()]
    assert not ours, ours

    # a new node starts with two model inputs
    for t in merge_types:
        label = "clip" if t in clip_types else "model"
        assert out["fresh"][t] == [f"{label}_1", f"{label}_2"], (t, out["fresh"][t])

    # the workflow loads with its three links and one free input
    assert _names(out["loaded"]) == ["model_1*", "model_2*", "model_3*", "model_4"]
    # a real mouse drag onto model_4 connects it and shows model_5
    assert out["dragTarget"]["slot"] >= 0, out["dragTarget"]
    assert _names(out["afterDrag"]) == ["model_1*", "model_2*", "model_3*", "model_4*", "model_5"], out["drag"]
    assert _names(out["afterDisconnect"]) == ["model_1*", "model_2*", "model_3*", "model_4"]
    assert _names(out["afterReconnect"]) == ["model_1*", "model_2*", "model_3*", "model_4*", "model_5"]
    # grows one by one up to the node's 12, never beyond; shrinks back
    assert out["fill"]["counts"][-1] == 12 and max(out["fill"]["counts"]) == 12, out["fill"]["counts"]
    assert _names(out["fill"]["full"]) == [f"model_{k}*" for k in range(1, 13)]
    assert _names(out["fill"]["back"]) == ["model_1*", "model_2*", "model_3*", "model_4*", "model_5"]
    if clip_types:
        assert out["clip"]["start"] == ["clip_1", "clip_2"]
        assert _names(out["clip"]["after"]) == ["clip_1*", "clip_2*", "clip_3*", "clip_4"]

    # saved and reloaded: model_1..5 connected to the same outputs, one free slot
    reload = out["reload"]
    assert _names(reload["before"]["inputs"]) == [f"model_{k}*" for k in range(1, 6)] + ["model_6"]
    assert _names(reload["after"]["inputs"]) == [f"model_{k}*" for k in range(1, 6)] + ["model_6"]
    assert [i for i in reload["savedInputs"] if i.startswith("model_")] == [f"model_{k}" for k in range(1, 7)]
    links = {l["name"]: l for l in reload["after"]["links"]}
    for l in reload["after"]["links"]:
        assert l["targetSlot"] == l["slot"] and l["target"] == MERGE, l  # links point at their slot
    before = {l["name"]: (l["origin"], l["originSlot"]) for l in reload["before"]["links"]}
    assert {k: (v["origin"], v["originSlot"]) for k, v in links.items()} == before
    assert _names(reload["restored"]) == ["model_1*", "model_2*", "model_3*", "model_4*", "model_5"]

    # the queued workflow ran and the report picture is in the page
    assert out["queued"] is True, out["queued"]
    run = out["run"]
    assert not run["errorDialog"], run["errorDialog"]
    shown = [im for im in run["imgs"] + run["domImgs"] if im["complete"] and im["w"] > 0]
    assert shown, f"no report image in the page after {run['seconds']} s: {run}\n{server.log_tail(3000)}"
    assert shown[0]["w"] == 1100, shown[0]
    assert run["summary"] and "down-weighted: model_4" in run["summary"], run["summary"]

    # the picture itself, next to the screenshots
    with urllib.request.urlopen(shown[0]["src"], timeout=30) as r:
        (artifacts / "report.png").write_bytes(r.read())
    for name in ("01_loaded", "02_connected", "03_reloaded", "04_report_page", "05_report_nodes",
                 "06_merge_node", "07_all_nodes"):
        assert Path(out["screenshots"][name]).stat().st_size > 2000, name

    if os.environ.get("BARYCENTER_UPDATE_DOCS") == "1":
        shots = out["screenshots"]
        _shrink_png(Path(shots["06_merge_node"]), DOCS / f"merge_node_{host}.png")
        _shrink_png(Path(shots["05_report_nodes"]), DOCS / f"report_nodes_{host}.png")
        _shrink_png(Path(shots["07_all_nodes"]), DOCS / f"all_nodes_{host}.png")
        _shrink_png(artifacts / "report.png", DOCS / "report.png")
