"""One registry of merge methods: name -> MethodInfo; `solve` dispatches the Gram-space ones.

Linear methods return coefficients (a solver on Grams); tensor methods return a tensor per key
(`merge_tensors(xs, *, base, weights, strength, out_dtype, **params) -> (tensor, record)`, the
tensor in out_dtype: the model's, so no full-size fp32 result is made); one whose keys are best
solved together also has a `tensor_group`, which the engine uses; an `elementwise` one also takes
`out=` (a tensor to write the result into), and the engine may merge a key in ranges. Each method's math and
references are in its module's docstring (MethodInfo.doc).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import geometric_median as _gm
from . import karcher as _ka
from . import weighted_mean as _wm
from .errors import MergeInputError
from .inputs import check_params
from .solution import Solution

# by module path: kernels/__init__ re-exports functions named like these modules, which shadow the
# package attributes `element_median` / `sign_elected_median`
_em = importlib.import_module(__package__ + ".element_median")
_se = importlib.import_module(__package__ + ".sign_elected")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    linear: bool                      # result = Σ c_i p_i (coefficients) vs a tensor per key
    scopes: tuple[str, ...]
    solver: Callable | None = None    # (grams, weights, **params) -> Solution
    merge_tensors: Callable | None = None
    # keys added one by one, finished together (their Grams solved in one batch): SignElectedGroup
    tensor_group: Callable | None = None
    # merge_tensors' result at an entry depends only on the inputs there: the engine may merge a
    # key in ranges, each written into the key's output (merge_tensors' `out`)
    elementwise: bool = False
    defaults: dict = field(default_factory=dict)
    needs_base: bool = False
    needs_gram: bool = True
    doc: str = ""


def _element_merge(xs, *, base=None, weights=None, strength=1.0, chunk_elems=None, key="tensor", out_dtype=None,
                   out=None, **_ignored):
    return _em.element_median(xs, weights, base, strength=strength, chunk_elems=chunk_elems, key=key,
                              out_dtype=out_dtype, out=out), {}


def _sign_merge(xs, *, base=None, weights=None, strength=1.0, **params):
    return _se.sign_elected_median(xs, base, weights, strength=strength, **params)


REGISTRY: dict[str, MethodInfo] = {
    "weighted_mean": MethodInfo(
        "weighted_mean", True, ("tensor", "block", "model"), solver=_wm.solve_weighted_mean,
        needs_gram=False, doc=_wm.__doc__),
    "geometric_median": MethodInfo(
        "geometric_median", True, ("tensor", "block", "model", "element"),
        solver=_gm.solve_geometric_median, merge_tensors=_element_merge, defaults=dict(_gm.DEFAULTS),
        doc=_gm.__doc__),
    "karcher": MethodInfo(
        "karcher", True, ("tensor", "block", "model"), solver=_ka.solve_karcher,
        defaults=dict(_ka.DEFAULTS), doc=_ka.__doc__),
    "element_median": MethodInfo(
        "element_median", False, ("element", "tensor"), merge_tensors=_element_merge,
        needs_gram=False, elementwise=True, doc=_em.__doc__),
    "sign_elected_median": MethodInfo(
        "sign_elected_median", False, ("tensor",), merge_tensors=_sign_merge, tensor_group=_se.SignElectedGroup,
        defaults=dict(_se.DEFAULTS), needs_base=True, needs_gram=False, doc=_se.__doc__),
}

_ALL_PARAMS = set().union(*(m.defaults for m in REGISTRY.values()))


def resolve(method: str, scope: str) -> MethodInfo:
    """The MethodInfo that computes `method` at `scope`: geometric_median at scope 'element' is
    the (tensor) element_median; everything else is REGISTRY[method]."""
    if method not in REGISTRY:
        raise MergeInputError(f"unknown merge method '{method}'; known: {', '.join(sorted(REGISTRY))}")
    info = REGISTRY[method]
    if scope not in info.scopes:
        raise MergeInputError(f"{method} does not support scope '{scope}'; use one of {', '.join(info.scopes)}")
    if method == "geometric_median" and scope == "element":
        return REGISTRY["element_median"]
    return info


def solve(method: str, grams: torch.Tensor, weights, **params) -> Solution:
    """Solve K units at once. grams (K, N+1, N+1) (or one (N+1, N+1)); weights (N,).
    params: the method's own (see REGISTRY[method].defaults); parameters that belong to another
    method are ignored, unknown names and bad values (eps <= 0, tol < 0, max_iter < 0) refused."""
    if method not in REGISTRY:
        raise MergeInputError(f"unknown merge method '{method}'; known: {', '.join(sorted(REGISTRY))}")
    info = REGISTRY[method]
    if info.solver is None:
        raise MergeInputError(f"{method} gives a tensor per key, not coefficients: use its merge_tensors")
    unknown = sorted(set(params) - _ALL_PARAMS)
    if unknown:
        raise MergeInputError(f"{method}: unknown parameter(s) {', '.join(unknown)}; "
                              f"it takes {', '.join(info.defaults) or 'none'}")
    mine = check_params(method, {k: v for k, v in params.items() if k in info.defaults})
    return info.solver(grams, weights, **mine)
