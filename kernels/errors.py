"""The one exception type the kernels raise for bad user input."""
from __future__ import annotations


class MergeInputError(ValueError):
    """Bad merge input. The message names what is wrong and where (key, model index, value)."""


def model_name(i: int) -> str:
    """0-based input index -> the 1-based name users see ("model_3")."""
    return f"model_{i + 1}"
