"""A layer norm's second derivatives over the last dim, for the generic Hessian's layer norms.

A layer norm over the last dim, ``y = x^ w + b`` with ``x^ = (x - mean) rstd`` per row, has the backward
``gx = P(gy w)``, ``gw = sum over rows of gy x^``, ``gb = sum over rows of gy``, where
``P(u) = rstd (u - mean(u) - x^ mean(u x^))``. A double backward gets cotangents ``(a, c, e)`` of ``(gx, gw, gb)``
and needs the derivatives of ``<a, gx> + <c, gw> + <e, gb>`` w.r.t. ``gy``, ``x`` and ``w``:

    d gy = w P(a) + c x^ + e
    d x  = -(rstd^2 / n) [x^ (A - n g_ a_ - 3 m T) + T (g - g_) + n m (a - a_)] + P(c gy)
    d w  = sum over rows of gy P(a)

with ``g = gy w``, ``g_ = mean(g)``, ``a_ = mean(a)``, ``m = mean(g x^)``, ``T = sum(a x^)``, ``A = sum(a g)`` per
row. The C++ kernel computes them a row at a time (the row's statistics, its sums, then the outputs while the row is
in cache); torch's own double backward of a layer norm makes dozens of passes over the whole tensor.
:mod:`unlearn_kernels.curvature.graph_ops` builds the generic Hessian's layer norms over the last dim on it.

Backends: C++ CPU (float32 and float64) and the reference :func:`layer_norm_double_backward_ref` ("auto" takes it on
GPUs and for other dtypes). Both compute the row statistics from ``x``. Where a graph is being recorded (a
derivative of higher order) or under forward-mode AD or torch.func's transforms, the reference runs: its torch ops
are differentiable, in ``x`` through the statistics too (the registered op called directly differentiates through
the reference likewise).
"""
from __future__ import annotations

import torch

from .. import _extension
from ..backends import choose_for_dtype, reverse_mode_only
from ..checks import check_one_floating_dtype_and_device, check_one_shape, check_tensors
from ..contracts.text import shape_text

_OP = "layer_norm_double_backward"


def layer_norm_double_backward_ref(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ggx: torch.Tensor, ggw: torch.Tensor, ggb: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`layer_norm_double_backward`."""
    n = x.shape[-1]
    centred = x - x.mean(-1, keepdim=True)
    # the biased variance as a mean of squares: var() warns of "degrees of freedom <= 0" on zero rows
    rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    xh = centred * rstd

    def project(u: torch.Tensor) -> torch.Tensor:
        return rstd * (u - u.mean(-1, keepdim=True) - xh * (u * xh).mean(-1, keepdim=True))

    g = gy * weight
    pa = project(ggx)
    a_mean, g_mean = ggx.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    m, t = (g * xh).mean(-1, keepdim=True), (ggx * xh).sum(-1, keepdim=True)
    big_a = (ggx * g).sum(-1, keepdim=True)
    d_gy = weight * pa + ggw * xh + ggb
    d_x = (-(rstd * rstd / n) * (xh * (big_a - n * g_mean * a_mean - 3 * m * t) + t * (g - g_mean)
                                 + n * m * (ggx - a_mean))
           + project(ggw * gy))
    return d_gy, d_x, (gy * pa).reshape(-1, n).sum(0)


def _check_inputs(gy, x, weight, ggx, ggw, ggb, eps) -> None:
    named = [("gy", gy), ("x", x), ("weight", weight), ("ggx", ggx), ("ggw", ggw), ("ggb", ggb)]
    check_tensors(_OP, named)
    check_one_shape(_OP, [("gy", gy), ("x", x), ("ggx", ggx)], nonscalar=True)
    n = x.shape[-1]
    if n == 0:  # the mean and variance over no features are undefined (the reference's reshape raised torch's error)
        raise ValueError(f"{_OP}: x's last dim must be at least 1 (a layer norm over 0 features is undefined), got "
                         f"shape {shape_text(x)}")
    if not (weight.shape == ggw.shape == ggb.shape == (n,)):
        raise ValueError(f"{_OP}: weight, ggw and ggb must be ({n},) tensors (x's last dim), got shapes "
                         f"{tuple(weight.shape)}, {tuple(ggw.shape)} and {tuple(ggb.shape)}")
    check_one_floating_dtype_and_device(_OP, named)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{_OP}: eps must be a number >= 0, got {eps!r}")


def layer_norm_double_backward(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ggx: torch.Tensor, ggw: torch.Tensor, ggb: torch.Tensor,
    eps: float, *, backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The derivatives ``(d gy, d x, d w)`` of ``<ggx, gx> + <ggw, gw> + <ggb, gb>`` for a layer norm's backward
    over the last dim (see the module's docstring).

    Args:
        gy: the layer norm output's gradient, any shape of at least one dim with a last dim of at least 1, floating.
        x: the layer norm's input, of gy's shape, dtype and device.
        weight: the (n,) weight (ones for a layer norm without one), n = x's last dim.
        ggx: the cotangent of the input's gradient, of x's shape (zeros where there is none).
        ggw, ggb: the (n,) cotangents of the weight's and the bias's gradients (zeros where there are none).
        eps: the layer norm's eps (>= 0).
        backend: "auto" (C++ for float32 and float64 CPU tensors, the reference elsewhere), "cpp" or "reference".

    Returns:
        Three new tensors: d gy and d x of x's shape, d w of shape (n,); differentiable (to any order, through the
        reference).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: shapes (a last dim of 0 too), dtypes, devices or eps that do not fit (named).
        BackendUnavailableError: a forced backend that cannot run here or on these tensors.
    """
    _check_inputs(gy, x, weight, ggx, ggw, ggb, eps)
    tensors = (gy, x, weight, ggx, ggw, ggb)
    chosen = choose_for_dtype(_OP, x.device, x.dtype, backend, (torch.float32, torch.float64))
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if chosen == "reference" or recording or reverse_mode_only(*tensors):
        return layer_norm_double_backward_ref(*tensors, float(eps))
    return torch.ops.unlearn_kernels.layer_norm_double_backward(*tensors, float(eps))


def _fake(gy, x, weight, ggx, ggw, ggb, eps):
    _check_inputs(gy, x, weight, ggx, ggw, ggb, eps)  # as the kernel checks them, for tracing (torch.compile)
    return x.new_empty(x.shape), x.new_empty(x.shape), weight.new_empty(weight.shape)  # contiguous, as the kernel's


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:6])
    ctx.eps = inputs[6]


def _backward(ctx, *cotangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """For a caller of the registered op itself: the derivatives of the reference's outputs (its torch ops, so any
    order; the wrapper above never records a graph through the C++ op)."""
    inputs = ctx.saved_tensors
    outputs, pullback = torch.func.vjp(lambda *t: layer_norm_double_backward_ref(*t, ctx.eps), *inputs)
    grads = pullback(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outputs, cotangents)))
    return (*grads, None)


if _extension.extension_loaded():
    torch.library.register_fake(f"unlearn_kernels::{_OP}")(_fake)
    torch.library.register_autograd(f"unlearn_kernels::{_OP}", _backward, setup_context=_setup_context)
