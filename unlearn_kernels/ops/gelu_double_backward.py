"""GELU's second derivatives, for the generic Hessian's GELUs.

GELU's backward is ``gx = gy f'(x)``. A double backward gets a cotangent ``ggx`` of ``gx`` and needs the derivatives
of ``<ggx, gx>`` w.r.t. ``gy`` and ``x``:

    d gy = ggx f'(x),    d x = ggx gy f''(x),

for the exact GELU ``f = x Phi(x)``: ``f' = Phi + x phi``, ``f'' = phi (2 - x^2)``; for the tanh approximation
``f = x (1 + t) / 2``, ``t = tanh(u)``, ``u = k (x + c x^3)``: ``f' = (1 + t) / 2 + x (1 - t^2) u' / 2``,
``f'' = (1 - t^2) (u' - x t u'^2 + x u'' / 2)`` (``1 - t^2`` and ``(1 + t) / 2`` in forms without cancellation;
beyond ``|x|`` = 30 or 40, where both are constant, at the bound; an Inf or NaN input gives NaN, as torch's own).
The C++ kernel computes both in one pass over the elements;
torch's own double backward of GELU makes about ten. :mod:`unlearn_kernels.curvature.graph_ops` builds the generic
Hessian's GELUs on it.

Backends: C++ CPU (float32 and float64) and the reference :func:`gelu_double_backward_ref` ("auto" takes it on GPUs
and for other dtypes). Differentiable to any order in reverse mode (the registered op's backward differentiates the
reference); forward-mode tangents and torch.func's transforms run the reference.
"""
from __future__ import annotations

import math

import torch

from .. import _extension
from ..backends import choose_for_dtype, reverse_mode_only
from ..checks import check_one_floating_dtype_and_device, check_one_shape, check_tensors

_OP = "gelu_double_backward"
_APPROXIMATIONS = ("none", "tanh")


def _derivatives(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(f'(x), f''(x)) of GELU, in torch ops, as the C++ kernel computes them: x clamped where both are constant to
    every float's precision (no overflow into 0 * Inf; an Inf or NaN x stays NaN, as torch's own), and the tanh
    form's 1 - t^2 and (1 + t) / 2 without cancellation."""
    x = x.clamp(-30.0 if approximate == "tanh" else -40.0, 30.0 if approximate == "tanh" else 40.0) + (x - x)
    if approximate == "tanh":
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        u = k * (x + c * x * x * x)
        u1, u2 = k * (1 + 3 * c * x * x), 6 * k * c * x
        e = torch.exp(-2 * u.abs())
        sech2 = 4 * e / ((1 + e) * (1 + e))
        return (torch.sigmoid(2 * u) + 0.5 * x * sech2 * u1,
                sech2 * (u1 - x * torch.tanh(u) * u1 * u1 + 0.5 * x * u2))
    phi = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0))) + x * phi, phi * (2 - x * x)


def gelu_double_backward_ref(gy: torch.Tensor, x: torch.Tensor, ggx: torch.Tensor,
                             approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`gelu_double_backward` (float16 and bfloat16 computed in float32, whose range
    the tanh form's x u'^2 needs up to the clamp)."""
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    first, second = _derivatives(x.to(wide), approximate)
    return (ggx.to(wide) * first).to(x.dtype), (ggx.to(wide) * gy.to(wide) * second).to(x.dtype)


def _check_inputs(gy: torch.Tensor, x: torch.Tensor, ggx: torch.Tensor, approximate: str) -> None:
    named = [("gy", gy), ("x", x), ("ggx", ggx)]
    check_tensors(_OP, named)
    check_one_shape(_OP, named)
    check_one_floating_dtype_and_device(_OP, named)
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"{_OP}: approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_double_backward(gy: torch.Tensor, x: torch.Tensor, ggx: torch.Tensor, approximate: str = "none", *,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The derivatives ``(d gy, d x)`` of ``<ggx, gx>`` for GELU's backward ``gx = gy f'(x)`` (see the module's
    docstring).

    Args:
        gy: the GELU output's gradient, floating, any shape.
        x: the GELU's input, of gy's shape, dtype and device.
        ggx: the cotangent of the input's gradient, likewise.
        approximate: "none" (the exact GELU) or "tanh", as ``F.gelu`` takes it.
        backend: "auto" (C++ for float32 and float64 CPU tensors, the reference elsewhere), "cpp" or "reference".

    Returns:
        Two new tensors of x's shape; differentiable w.r.t. all three inputs (to any order).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: shapes, dtypes, devices or an approximation that do not fit (named).
        BackendUnavailableError: a forced backend that cannot run here or on these tensors.
    """
    _check_inputs(gy, x, ggx, approximate)
    chosen = choose_for_dtype(_OP, x.device, x.dtype, backend, (torch.float32, torch.float64))
    if chosen == "reference" or reverse_mode_only(gy, x, ggx):
        return gelu_double_backward_ref(gy, x, ggx, approximate)
    return torch.ops.unlearn_kernels.gelu_double_backward(gy, x, ggx, approximate)


def _fake(gy, x, ggx, approximate):
    _check_inputs(gy, x, ggx, approximate)  # as the kernel checks them, for tracing (torch.compile)
    return x.new_empty(x.shape), x.new_empty(x.shape)  # contiguous, as the kernel's


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.approximate = inputs[3]


def _backward(ctx, *cotangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The derivatives of the reference's outputs (its torch ops, so any order)."""
    inputs = ctx.saved_tensors
    outputs, pullback = torch.func.vjp(lambda *t: gelu_double_backward_ref(*t, ctx.approximate), *inputs)
    return (*pullback(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outputs, cotangents))), None)


if _extension.extension_loaded():
    torch.library.register_fake(f"unlearn_kernels::{_OP}")(_fake)
    torch.library.register_autograd(f"unlearn_kernels::{_OP}", _backward, setup_context=_setup_context)
