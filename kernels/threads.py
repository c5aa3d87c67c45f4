"""torch's intra-op thread count for a block of code (the count is process-wide)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the block with n intra-op threads (None: as it is), then restore the count."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
