"""Kernel tests: pure torch, no ComfyUI. The package is imported as top-level `kernels`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_peer(reason: str):
    """A missing peer fails loudly in CI (CI=true) and skips with the reason locally."""
    if IN_CI:
        pytest.fail(f"peer reference missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seeded():
    """Every kernel test starts from the same global RNG state (data made with torch.randn is
    reproducible; the kernels themselves never touch the global RNG)."""
    import torch

    torch.manual_seed(0)
    yield
