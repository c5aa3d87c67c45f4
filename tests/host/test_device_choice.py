"""device=auto on a host whose device does not compute in float64 (Apple's MPS, DirectML, some
Intel GPUs): the merge runs on the CPU, and the report and the log say why. In-process, ComfyUI's
device choice replaced (no such device here: the probe fails as it does there, and the merge
falls back)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from harness.checkpoints import checkpoint
from tests.host.helpers import host_api_in_process
from tests.host.test_robust_nodes import FAMILY, NODES

pytestmark = pytest.mark.host


@pytest.fixture
def host_api():
    api = host_api_in_process()
    api._no_float64_note.cache_clear()  # each test asks (and logs) afresh
    yield api
    api._no_float64_note.cache_clear()


def test_cpu_is_cpu_and_a_float64_device_is_kept(host_api, monkeypatch):
    assert host_api.compute_device("cpu") == (torch.device("cpu"), None)
    monkeypatch.setattr(host_api.mm, "get_torch_device", lambda: torch.device("cpu"))
    assert host_api.compute_device("auto") == (torch.device("cpu"), None)
    assert host_api._no_float64_note("cpu") is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_computes_float64(host_api):
    assert host_api._no_float64_note("cuda:0") is None


def test_a_device_without_float64_merges_on_the_cpu_and_says_so(host_api, monkeypatch, caplog):
    monkeypatch.setattr(host_api.mm, "get_torch_device", lambda: torch.device("mps"))
    with caplog.at_level(logging.WARNING, logger=host_api.__name__):
        first = host_api.compute_device("auto")
        again = host_api.compute_device("auto")
    assert first == again and first[0] == torch.device("cpu")
    assert "mps does not compute in float64" in first[1] and "merged on the CPU" in first[1]
    error = host_api.error_line(pytest.raises(Exception, torch.full, (2, 2), 1.0, dtype=torch.float64, device="mps").value, 160)
    assert error in first[1], "the note gives the device's own error"
    assert sum("mps does not compute in float64" in r.getMessage() for r in caplog.records) == 1, "one warning"
    assert host_api.compute_device("cpu") == (torch.device("cpu"), None)


@pytest.mark.parametrize("node", ["BarycenterGeometricMedian", "BarycenterKarcherMean"])
def test_merge_node_on_such_a_host_equals_the_cpu_merge(host_api, monkeypatch, node):
    import comfy.sd

    from harness.loading import load_pack

    models = [comfy.sd.load_checkpoint_guess_config(str(checkpoint(seed=s, **FAMILY)), output_vae=False,
                                                    output_clip=False)[0] for s in (1, 2, 3)]
    settings = NODES[node][1]
    cls = load_pack().NODE_CLASS_MAPPINGS[node]

    def merge(device):  # outside inference mode (as a script might call it): current ComfyUI's weights require grad
        model, report = cls().merge(model_1=models[0], model_2=models[1], model_3=models[2], weights="",
                                    device=device, **settings)
        return json.loads(report)

    on_cpu = merge("cpu")
    monkeypatch.setattr(host_api.mm, "get_torch_device", lambda: torch.device("mps"))
    auto = merge("auto")
    assert auto["device"] == "cpu" and "mps does not compute in float64" in auto["device_note"]
    assert "device_note" not in on_cpu
    assert [u["coefficients"] for u in auto["units"]] == [u["coefficients"] for u in on_cpu["units"]]
