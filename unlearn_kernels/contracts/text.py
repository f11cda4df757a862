"""How the C++ checks print tensors' properties, for Python messages that match them word for word."""
from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as C++ prints an ``at::ScalarType`` ("Float", "Long", ...)."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def shape_text(t: torch.Tensor) -> str:
    """The shape as C++ prints an ``IntArrayRef`` ("[2, 3]")."""
    return str(list(t.shape))
