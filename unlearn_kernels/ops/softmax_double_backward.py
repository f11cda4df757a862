"""Softmax's second derivatives over the last dim, for the generic Hessian's attention layers.

Softmax's backward is ``gx = y (gy - s)`` with ``s = sum(gy y)`` over the last dim (``y`` the softmax's output,
``gy`` its output's gradient). A double backward gets a cotangent ``ggx`` of ``gx`` and needs the derivatives of
``<ggx, gx>`` w.r.t. ``gy`` and ``y``:

    d gy = y (ggx - t),    d y = ggx (gy - s) - gy t,    t = sum(ggx y).

The C++ kernel computes both a row at a time (the row's two sums, then both outputs, while the row is in cache);
torch's own double backward of softmax makes about ten passes over the whole tensor (4.7 ms for a
(64, 4, 65, 65) float32 map against ~0.4 ms, one thread of the AMD EPYC of docs/benchmarks.md).
:mod:`unlearn_kernels.curvature.graph_ops` builds the generic Hessian's softmaxes over the last dim on it.

Backends: C++ CPU (float32 and float64) and the reference :func:`softmax_double_backward_ref` ("auto" takes it on
GPUs and for other dtypes). Differentiable to any order in reverse mode: the op's backward is written in torch ops.
Forward-mode tangents and torch.func's transforms, for which the registered op has no rule, run the reference.
"""
from __future__ import annotations

import torch

from .. import _extension
from ..backends import choose_for_dtype, reverse_mode_only
from ..checks import check_one_floating_dtype_and_device, check_one_shape, check_tensors

_OP = "softmax_double_backward"


def softmax_double_backward_ref(gy: torch.Tensor, y: torch.Tensor,
                                ggx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`softmax_double_backward`."""
    s = (gy * y).sum(-1, keepdim=True)
    t = (ggx * y).sum(-1, keepdim=True)
    return y * (ggx - t), ggx * (gy - s) - gy * t


def _check_inputs(gy: torch.Tensor, y: torch.Tensor, ggx: torch.Tensor) -> None:
    named = [("gy", gy), ("y", y), ("ggx", ggx)]
    check_tensors(_OP, named)
    check_one_shape(_OP, named, nonscalar=True)
    check_one_floating_dtype_and_device(_OP, named)


def softmax_double_backward(gy: torch.Tensor, y: torch.Tensor, ggx: torch.Tensor, *,
                            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The derivatives ``(d gy, d y)`` of ``<ggx, gx>`` for softmax's backward ``gx = y (gy - sum(gy y))`` over
    the last dim (see the module's docstring).

    Args:
        gy: the softmax output's gradient, any shape of at least one dim, floating.
        y: the softmax's output, of gy's shape, dtype and device.
        ggx: the cotangent of the softmax input's gradient, likewise.
        backend: "auto" (C++ for float32 and float64 CPU tensors, the reference elsewhere), "cpp" or "reference".

    Returns:
        Two new tensors of gy's shape; differentiable w.r.t. all three inputs (to any order).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: shapes, dtypes or devices that do not fit (named).
        BackendUnavailableError: a forced backend that cannot run here or on these tensors.
    """
    _check_inputs(gy, y, ggx)
    chosen = choose_for_dtype(_OP, gy.device, gy.dtype, backend, (torch.float32, torch.float64))
    if chosen == "reference" or reverse_mode_only(gy, y, ggx):
        return softmax_double_backward_ref(gy, y, ggx)
    return torch.ops.unlearn_kernels.softmax_double_backward(gy, y, ggx)


def _fake(gy: torch.Tensor, y: torch.Tensor, ggx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(gy, y, ggx)  # as the kernel checks them, for tracing (torch.compile)
    return gy.new_empty(gy.shape), gy.new_empty(gy.shape)  # contiguous, as the kernel's


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The derivatives of ``<a, d gy> + <b, d y>`` w.r.t. (gy, y, ggx), in torch ops (so differentiable again)."""
    gy, y, ggx = ctx.saved_tensors
    a = torch.zeros_like(y) if a is None else a
    b = torch.zeros_like(y) if b is None else b

    def total(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (u * w).sum(-1, keepdim=True)

    s, t = total(gy, y), total(ggx, y)
    ay, bggx, bgy = total(a, y), total(b, ggx), total(b, gy)
    need_gy, need_y, need_ggx = ctx.needs_input_grad
    grad_gy = b * (ggx - t) - y * bggx if need_gy else None
    grad_y = a * (ggx - t) - ggx * ay - gy * bggx - ggx * bgy if need_y else None
    grad_ggx = y * (a - ay) + b * (gy - s) - y * bgy if need_ggx else None
    return grad_gy, grad_y, grad_ggx


if _extension.extension_loaded():
    torch.library.register_fake(f"unlearn_kernels::{_OP}")(_fake)
    torch.library.register_autograd(f"unlearn_kernels::{_OP}", _backward, setup_context=_setup_context)
