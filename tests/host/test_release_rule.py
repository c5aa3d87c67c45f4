"""After a GPU merge the engine hands torch's cached blocks back only by ComfyUI's own rule
(model_management.free_memory's): emptying the cache after every merge made the sampler that
follows allocate its working memory afresh. In-process, ComfyUI's memory readings replaced."""
from __future__ import annotations

import pytest
import torch

from tests.host.helpers import host_api_in_process

pytestmark = pytest.mark.host


@pytest.mark.parametrize("vram, free_total, free_torch, empties", [
    ("NORMAL_VRAM", 75e9, 0.5e9, False),  # a large card: our temporaries are a small share
    ("NORMAL_VRAM", 6e9, 2e9, True),      # over a quarter of what is free: back to the driver
    ("HIGH_VRAM", 6e9, 2e9, False),       # --highvram: ComfyUI keeps its cache too
])
def test_release_follows_comfyuis_rule(monkeypatch, vram, free_total, free_torch, empties):
    host_api = host_api_in_process()
    mm = host_api.mm
    calls = []
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: calls.append("cuda"))
    monkeypatch.setattr(mm, "vram_state", getattr(mm.VRAMState, vram))
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free_total, free_torch))
    host_api.release(torch.device("cuda", 0))
    assert calls == (["cuda"] if empties else [])
    host_api.release(torch.device("cpu"))  # never on CPU
    assert calls == (["cuda"] if empties else [])
