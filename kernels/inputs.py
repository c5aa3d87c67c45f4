"""Input validation: tensors of one key, per-model weights, numeric parameters."""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from .errors import MergeInputError, model_name

# Parameters that must be > 0, >= 0, or non-negative integers, wherever they appear.
_POSITIVE = ("eps",)
_NONNEG = ("tol",)
_COUNT = ("max_iter",)


def _named(xs: Sequence[torch.Tensor], base: torch.Tensor | None):
    out = [(model_name(i), x) for i, x in enumerate(xs)]
    if base is not None:
        out.append(("base_model", base))
    return out


def check_inputs(key: str, xs: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
                 check_finite: bool = True) -> None:
    """Refuse inputs a merge of `key` cannot use, with a message naming the key and the model.

    Checks: at least one input; all tensors; floating dtypes (fp64/32/16, bf16, fp8); one device;
    same shape (the message names both models and both shapes); and, unless check_finite=False,
    finite values (NaN/Inf names the model as "model_3", the base as "base_model"). The finite
    check reads every tensor once (a float32 sum per tensor, the exact scan only when it is not
    finite); a caller that already checks the Gram for NaN can skip it.
    """
    if len(xs) == 0:
        raise MergeInputError(f"key '{key}': no input tensors")
    named = _named(xs, base)
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise MergeInputError(f"key '{key}': {name} is a {type(x).__name__}, not a tensor")
        if not x.is_floating_point():
            raise MergeInputError(f"key '{key}': {name} has dtype {x.dtype}; only floating-point weights can be merged")
    first_name, first = named[0]
    for name, x in named[1:]:
        if tuple(x.shape) != tuple(first.shape):
            raise MergeInputError(f"key '{key}': {name} has shape {list(x.shape)} but {first_name} has "
                                  f"shape {list(first.shape)}")
        if x.device != first.device:
            raise MergeInputError(f"key '{key}': {name} is on {x.device} but {first_name} is on {first.device}; "
                                  f"move all inputs to one device")
    if check_finite:
        for name, x in named:
            bad = nonfinite_kind(x)
            if bad:
                raise MergeInputError(f"key '{key}': {name} contains {bad} values")


def nonfinite_kind(x: torch.Tensor, chunk: int = 1 << 24) -> str | None:
    """None if x is finite, else "NaN" or "Inf" (NaN wins). Cheap path: one float32 sum."""
    if x.numel() == 0:
        return None
    flat = x.reshape(-1)
    try:
        s = flat.sum(dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
        if bool(torch.isfinite(s)):
            return None
    except (RuntimeError, TypeError):  # dtypes without a sum kernel (fp8 on some builds)
        pass
    nan = inf = False
    for a in range(0, flat.numel(), chunk):
        part = flat[a:a + chunk].to(torch.float32 if x.dtype != torch.float64 else torch.float64)
        nan = nan or bool(torch.isnan(part).any())
        inf = inf or bool(torch.isinf(part).any())
    return "NaN" if nan else "Inf" if inf else None


_SPLIT = re.compile(r"[,;\s]+")


def parse_weights(weights: Sequence[float] | torch.Tensor | str | None, n: int) -> torch.Tensor:
    """Per-model weights -> float64 tensor (n,) summing to 1.

    None, "" or an empty sequence mean equal weights. Text is numbers separated by commas,
    semicolons or spaces ("1, 2, 0.5"). Refused with a message: a wrong count, a non-numeric
    entry, a negative, NaN or infinite weight, all weights zero.
    """
    if n < 1:
        raise MergeInputError(f"need at least one model; got {n}")
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if isinstance(weights, str):
        text = weights.strip()
        if not text:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        vals = []
        for j, tok in enumerate(t for t in _SPLIT.split(text) if t):
            try:
                vals.append(float(tok))
            except ValueError:
                raise MergeInputError(f"weight {j + 1} is '{tok}', not a number (weights are numbers "
                                      f"separated by commas, e.g. '1, 1, 2')") from None
    elif isinstance(weights, torch.Tensor):
        vals = [float(v) for v in weights.detach().reshape(-1).tolist()]
    else:
        vals = []
        for j, v in enumerate(weights):
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                raise MergeInputError(f"weight {j + 1} is {v!r}, not a number") from None
    if len(vals) == 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if len(vals) != n:
        raise MergeInputError(f"got {len(vals)} weights for {n} models; give one weight per model "
                              f"(or none for equal weights)")
    for i, v in enumerate(vals):
        if not math.isfinite(v):
            raise MergeInputError(f"weight of {model_name(i)} is {v}; weights must be finite numbers")
        if v < 0:
            raise MergeInputError(f"weight of {model_name(i)} is {v}; weights must be >= 0")
    vals, total = _sum_without_overflow(vals)
    if total <= 0:
        raise MergeInputError("all weights are zero; at least one model needs a positive weight")
    return torch.tensor(vals, dtype=torch.float64) / total


def _sum_without_overflow(vals: list[float]) -> tuple[list[float], float]:
    """(vals, their sum); finite weights whose sum overflows (1e308, 1e308) are first divided by the
    largest: math.fsum raises OverflowError there, which reached users as a bare traceback."""
    try:
        total = math.fsum(vals)
    except OverflowError:
        total = math.inf
    if math.isinf(total):
        top = max(vals)
        vals = [v / top for v in vals]
        total = math.fsum(vals)
    return vals, total


def check_weights(weights: torch.Tensor, n: int) -> torch.Tensor:
    """A weights tensor given to a solver: (n,), finite, >= 0, not all zero -> fp64, sum 1."""
    if not isinstance(weights, torch.Tensor):
        return parse_weights(weights, n)
    w = weights.detach().to(torch.float64).reshape(-1)
    if w.numel() != n:
        raise MergeInputError(f"got {w.numel()} weights for {n} models")
    vals = w.tolist()  # one host sync, outside any loop
    for i, v in enumerate(vals):
        if not math.isfinite(v) or v < 0:
            raise MergeInputError(f"weight of {model_name(i)} is {v}; weights must be finite and >= 0")
    vals, total = _sum_without_overflow(vals)
    if total <= 0:
        raise MergeInputError("all weights are zero; at least one model needs a positive weight")
    return torch.tensor(vals, dtype=torch.float64, device=w.device) / total


def check_params(method: str, params: dict) -> dict:
    """Refuse eps <= 0, tol < 0, max_iter not a non-negative integer, other non-numbers."""
    out = dict(params)
    for k, v in params.items():
        if k in _COUNT:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 0:
                raise MergeInputError(f"{method}: {k} must be a whole number >= 0; got {v!r}")
            out[k] = int(v)
            continue
        if k in _POSITIVE or k in _NONNEG:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise MergeInputError(f"{method}: {k} must be a number; got {v!r}") from None
            if not math.isfinite(f):
                raise MergeInputError(f"{method}: {k} must be finite; got {v!r}")
            if k in _POSITIVE and f <= 0:
                raise MergeInputError(f"{method}: {k} must be > 0; got {v!r}")
            if k in _NONNEG and f < 0:
                raise MergeInputError(f"{method}: {k} must be >= 0; got {v!r}")
            out[k] = f
    return out
