"""What a solver returns, and the steps all Gram-space solvers share."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .errors import MergeInputError
from .inputs import check_weights
from .threads import intra_op_threads


@dataclass
class Solution:
    """coeffs (K, N) fp64: unit k's result is Σ_i coeffs[k, i] p_i (p_i = x_i, or x_i - base).
    record: per-unit tensors (first dimension K), e.g. iterations, converged, objective."""
    coeffs: torch.Tensor
    record: dict = field(default_factory=dict)


def prepare(grams: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (K, N+1, N+1) Grams and N weights -> (fp64 symmetric grams, fp64 weights summing to 1).
    One host sync (finite check), before any iteration."""
    if not isinstance(grams, torch.Tensor) or grams.dim() not in (2, 3) or grams.shape[-1] != grams.shape[-2]:
        raise MergeInputError(f"grams must be a (K, N+1, N+1) tensor; got {getattr(grams, 'shape', type(grams))}")
    if grams.dim() == 2:
        grams = grams.unsqueeze(0)
    n = grams.shape[-1] - 1
    if n < 1:
        raise MergeInputError("grams must be at least 2x2 (one model)")
    g = grams.to(torch.float64)
    g = (g + g.transpose(-1, -2)) / 2
    w = check_weights(weights, n).to(g.device)
    if not bool(torch.isfinite(g).all()):
        bad = int((~torch.isfinite(g)).flatten(1).any(1).nonzero()[0, 0])
        raise MergeInputError(f"the Gram of unit {bad} has NaN/Inf entries (an input holds NaN/Inf)")
    return g, w


def identical_units(g: torch.Tensor) -> torch.Tensor:
    """(K,) True where all points of the unit coincide exactly (d-block trace exactly 0)."""
    return g[:, 1:, 1:].diagonal(dim1=-2, dim2=-1).sum(-1) <= 0


def one_hot_first(w: torch.Tensor, k: int) -> torch.Tensor:
    """(K, N) one-hot on the first model with a positive weight."""
    j = int((w > 0).nonzero()[0, 0])
    out = torch.zeros(k, w.numel(), dtype=torch.float64, device=w.device)
    out[:, j] = 1.0
    return out


CHECK_EVERY = 8  # CPU only: look at the convergence mask every this many steps


@contextlib.contextmanager
def small_op_threads(device: torch.device):
    """The solvers' tensors are tiny (K x N x N): on CPU run them on one thread (ATen parallelises
    some ops above 2048 elements, and a fork/join per tiny op costs more than the op)."""
    with intra_op_threads(1 if torch.device(device).type == "cpu" else None):
        yield


def may_stop(done: torch.Tensor, step: int) -> bool:
    """Early exit for CPU tensors only, where reading the mask is not a device sync: every
    CHECK_EVERY steps, True once every unit has converged. On CUDA the loop never syncs and
    always runs max_iter steps (converged units are frozen either way, so the result is the same)."""
    return done.device.type == "cpu" and (step + 1) % CHECK_EVERY == 0 and bool(done.all())
