"""The contract of the ``lora_linear`` ops shared by their namespaces (C++/CUDA and Triton): the
argument checks of the public functions, which the Triton ops run too (as the C++ ops run
``csrc/cpu/lora_linear.cpp``'s), and the fake (meta) implementations, which give the output shapes
without computing."""
from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence
from typing import Any

import torch

from ..checks import as_float, check_tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
               lora_b: torch.Tensor, scale: Any,
               tangents: Sequence[tuple[str, torch.Tensor | None]] = ()) -> None:
    """Types, dtypes, devices and shapes of the tensors (x (..., in), any leading dims), and a scale that
    is a finite Python number within x's dtype; ``tangents`` are (name, tensor or None) pairs."""
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        named["bias"] = bias
    named.update((name, t) for name, t in tangents if t is not None)
    for name, t in named.items():
        check_tensor(f"{op}: {name}", t)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must equal x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"{op}: x must have shape (..., {n_in}) to match weight (out, in) = "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"{op}: bias must have shape ({n_out},), got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[0] < 1 or lora_a.shape[1] != n_in:
        raise ValueError(f"{op}: lora_a must have shape (rank, {n_in}) with rank >= 1, got {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if lora_b.shape != (n_out, rank):
        raise ValueError(f"{op}: lora_b must have shape ({n_out}, {rank}) = (out, rank), got {tuple(lora_b.shape)}")
    for name, t in tangents:
        expected = lora_a.shape if name == "tangent_a" else lora_b.shape
        if t is not None and t.shape != expected:
            raise ValueError(f"{op}: {name} must have the shape {tuple(expected)} of its parameter, got {tuple(t.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a Python float, got {type(scale).__name__}")
    if isinstance(scale, float) and not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    largest = torch.finfo(x.dtype).max  # the kernels convert scale to x's dtype: beyond it, an Inf factor
    # as_float: an int beyond a float's range (2**2000) is +-inf, and too large for every dtype;
    # reprlib shows it in 40 characters, not 600
    if abs(as_float(scale)) > largest:
        raise ValueError(f"{op}: scale {reprlib.repr(scale)} is beyond the range of x's dtype {x.dtype} "
                         f"(largest finite {largest:g})")


def check_op_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: Any, tangents: Sequence[tuple[str, torch.Tensor | None]] = (),
                  grad_out: torch.Tensor | None = None) -> None:
    """:func:`check_args` for a registered op, which takes x as 2-D (N, in), and its ``grad_out`` (N, out)."""
    check_args(op, x, weight, bias, lora_a, lora_b, scale, tangents)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (N, in), got shape {tuple(x.shape)}")
    if grad_out is not None:
        check_tensor(f"{op}: grad_out", grad_out)
        expected = (x.shape[0], weight.shape[0])
        if grad_out.shape != expected:
            raise ValueError(f"{op}: grad_out must have shape {expected}, got {tuple(grad_out.shape)}")
        if grad_out.dtype != x.dtype:
            raise TypeError(f"{op}: grad_out dtype {grad_out.dtype} must equal x dtype {x.dtype}")
        if grad_out.device != x.device:
            raise ValueError(f"{op}: grad_out is on {grad_out.device} but x is on {x.device}")


def fake_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """y: (N, out) like x."""
    return x.new_empty(x.shape[0], weight.shape[0])


def fake_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: float, output_mask: Sequence[bool],
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_a, grad_b), each None where ``output_mask`` does not ask for it."""
    need_x, need_a, need_b = output_mask
    return tuple(t.new_empty(t.shape) if need else None for t, need in ((x, need_x), (lora_a, need_a), (lora_b, need_b)))


def fake_jvp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
             lora_b: torch.Tensor, scale: float, tangent_a: torch.Tensor, tangent_b: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, its tangent): both (N, out) like x."""
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])
