"""Argument checks and the float64 norm shared by the curvature, solver and method layers.

One place for each: every layer above imports these, so that the same bad value gets the same
message everywhere (the caller prefixes ``name`` with its own, e.g. ``"cure_newton: M"``).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an int (not a bool) ``>= low``, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float = -math.inf, *, strict: bool = False) -> float:
    """``value`` as a float if it is a finite real number ``>= low`` (``> low`` when ``strict``),
    else ValueError naming ``name``."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or (strict and value == low):
        bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def norm64(v: torch.Tensor) -> float:
    """The Euclidean norm of a tensor, accumulated in float64 (no overflow or loss in float32)."""
    return float(torch.linalg.vector_norm(v.double()))
