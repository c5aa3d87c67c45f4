"""Weighted mean: argmin_y Σ w_i ‖y - p_i‖^2 = Σ w_i p_i (the Euclidean barycenter).

Math. Coefficients are the normalised weights, whatever the Gram. Units whose inputs are all
identical (d-block of the Gram exactly zero) get the coefficient 1 on the first positive-weight
model instead, which is the same point and lets the combine return that input bit-exactly.
References: model soups, Wortsman et al., ICML 2022 (uniform and weighted weight averaging).
"""
from __future__ import annotations

import torch

from .solution import Solution, identical_units, one_hot_first, prepare


def solve_weighted_mean(grams: torch.Tensor, weights) -> Solution:
    g, w = prepare(grams, weights)
    k = g.shape[0]
    same = identical_units(g)
    coeffs = torch.where(same[:, None], one_hot_first(w, k), w.expand(k, -1))
    return Solution(coeffs, {"identical": same,
                             "iterations": torch.zeros(k, dtype=torch.long, device=g.device),
                             "converged": torch.ones(k, dtype=torch.bool, device=g.device)})
