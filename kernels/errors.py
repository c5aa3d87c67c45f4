"""The one exception type the kernels raise for bad user input, and how other errors are quoted."""
from __future__ import annotations


class MergeInputError(ValueError):
    """Bad merge input. The message names what is wrong and where (key, model index, value)."""


def model_name(i: int) -> str:
    """0-based input index -> the 1-based name users see ("model_3")."""
    return f"model_{i + 1}"


def error_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' (cut at `limit`): an error quoted in a log line or a report."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
