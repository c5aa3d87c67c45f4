"""The tensor methods split a large key over the CPU worker threads: the element median merges it in
ranges written into one output, the sign-elected median runs each pass in ranges of whole chunks.
In a real ComfyUI (in process), with ranges of a few thousand entries on 3 workers, every merged
key has the bits of the whole-key merge (one range per key, in the caller), and an input's NaN in
a later range of a key is named with the key."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.host.helpers import host_api_in_process

pytestmark = pytest.mark.host

FAMILY = dict(arch="sd15", base_seed=0, noise=0.05)
SOLVER = {"tolerance": 1e-7, "max_iterations": 100, "eps": 1e-8}
MERGES = [
    ("BarycenterGeometricMedian", {**SOLVER, "scope": "element", "weights": "1,1,2"}),
    ("BarycenterGeometricMedian", {**SOLVER, "scope": "element", "weights": "", "strength": 0.8, "base": True}),
    ("BarycenterSignElectedMedian", {**SOLVER, "scope": "tensor", "weights": "1,2,1", "drop_rate": 0.3,
                                     "drop_seed": 7, "strength": 0.8, "base": True}),
]


@pytest.fixture(scope="module")
def loaded():
    api = host_api_in_process()
    import comfy.sd

    from harness.checkpoints import checkpoint
    from harness.loading import load_pack

    def load(**kw):
        return comfy.sd.load_checkpoint_guess_config(str(checkpoint(**kw)), output_vae=False, output_clip=False)[0]

    pack = load_pack()
    return (api, pack, sys.modules[pack.__name__ + ".engine.merge"], sys.modules[pack.__name__ + ".kernels.sign_elected"],
            [load(seed=s, **FAMILY) for s in (1, 2, 3)], load(arch="sd15", seed=0))


def _merge(loaded, node, settings, models=None):
    api, pack, _, _, inputs, base = loaded
    settings = dict(settings)
    if settings.pop("base", False):
        settings["base_model"] = base
    models = models or inputs
    out = pack.NODE_CLASS_MAPPINGS[node]().merge(**{f"model_{i + 1}": m for i, m in enumerate(models)},
                                                device="cpu", **settings)
    report = json.loads(out[1])
    report.pop("timing")
    return {k: v[-1][1][0] for k, v in out[0].patches.items()}, report


def _split(monkeypatch, loaded, part, workers):
    api, _, merge, se, _, _ = loaded
    monkeypatch.setattr(merge, "PART_ELEMS", part)
    monkeypatch.setattr(se, "PART_ELEMS", part)
    monkeypatch.setattr(api, "cpu_workers", lambda cap=8: workers)


@pytest.mark.parametrize("node,settings", MERGES)
def test_large_keys_merged_in_ranges_on_workers_give_the_whole_key_bits(loaded, monkeypatch, node, settings):
    _split(monkeypatch, loaded, 1 << 40, 1)
    whole, report = _merge(loaded, node, settings)
    big = [k for k, v in whole.items() if v.numel() > 3 * 8192]
    assert len(big) > 20, "the test models must have keys of several ranges"
    _split(monkeypatch, loaded, 8192, 3)
    got, again = _merge(loaded, node, settings)
    assert sorted(got) == sorted(whole) and again == report
    for k, v in whole.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_nan_in_a_later_range_names_the_input_and_key(loaded, monkeypatch):
    api, pack, merge, _, inputs, _ = loaded
    key = max(inputs[0].model.state_dict().items(), key=lambda kv: kv[1].numel())[0]
    numel = inputs[0].model.state_dict()[key].numel()
    bad = inputs[1].clone()
    nan = torch.zeros(inputs[0].model.state_dict()[key].shape)
    nan.view(-1)[numel - 5] = float("nan")  # the last range
    bad.add_patches({key: (nan,)}, 1.0)
    _split(monkeypatch, loaded, 8192, 3)
    with pytest.raises(Exception, match=f"key '{key}': model_2 contains NaN"):
        _merge(loaded, *MERGES[0], models=[inputs[0], bad, inputs[2]])
    assert not torch.isnan(inputs[1].model.state_dict()[key]).any()


@pytest.mark.parametrize("node,settings", [MERGES[0], MERGES[2]])
def test_cancel_while_ranges_are_queued_ends_the_workers(loaded, monkeypatch, node, settings):
    """ComfyUI's Cancel at the 40th key, with ranges of 8192 queued on 3 workers: the merge raises
    ComfyUI's interrupt, no worker thread is left, and the next merge gives the whole-key bits."""
    import threading

    import comfy.model_management as mm

    api = loaded[0]
    _split(monkeypatch, loaded, 1 << 40, 1)
    whole, _ = _merge(loaded, node, settings)
    _split(monkeypatch, loaded, 8192, 3)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 40:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(api, "check_interrupted", check)
    with pytest.raises(mm.InterruptProcessingException):
        _merge(loaded, node, settings)
    assert not [t for t in threading.enumerate() if t.name.startswith("gram-")]
    got, _ = _merge(loaded, node, settings)
    assert all(torch.equal(got[k], v) for k, v in whole.items())
