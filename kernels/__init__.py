"""Pure-torch merge kernels (no ComfyUI import): Gram pass, Gram-space solvers, combine, scopes.

Relative imports only: the package is imported as top-level `kernels` in tests and as
`<pack>.kernels` inside ComfyUI.
"""
from .blocks import SCOPES, block_of, scope_units
from .combine import combine, same_tensors, task_vector_coefficients
from .element_median import element_median
from .errors import MergeInputError, model_name
from .geometric_median import solve_geometric_median
from . import fused
from .gram import gram_matrix, pairwise_distances, point_norms
from .gram_pass import GramPass
from .inputs import check_inputs, parse_weights
from .karcher import solve_karcher
from .registry import REGISTRY, MethodInfo, resolve, solve
from .sign_elected import sign_elected_median
from .solution import Solution
from .weighted_mean import solve_weighted_mean

__all__ = [
    "fused", "MergeInputError", "model_name", "check_inputs", "parse_weights", "gram_matrix", "GramPass", "pairwise_distances",
    "point_norms", "Solution", "solve", "REGISTRY", "MethodInfo", "resolve", "task_vector_coefficients",
    "combine", "same_tensors", "element_median", "sign_elected_median", "block_of", "scope_units", "SCOPES",
    "solve_weighted_mean", "solve_geometric_median", "solve_karcher",
]
