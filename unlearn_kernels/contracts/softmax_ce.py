"""The contract of ``softmax_ce_grad`` / ``softmax_ce_hvp`` for the Python backends (reference and
Triton): argument checks and error messages identical to ``csrc/softmax_ce.h``, the first bad target
row, and the autograd formulas every namespace of the op registers."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import check_number
from .text import dtype_name, shape_text

GRAD = "softmax_ce_grad"
HVP = "softmax_ce_hvp"
#: the finiteness errors, after "<op>: " (the kernels detect these inside their pass)
BAD_LOGITS = "logits contain NaN or +Inf (or a row that is all -Inf)"
BAD_TANGENT = "tangent contains NaN or Inf"


LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_logits(op: str, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (N, C), got shape {shape_text(logits)}")
    if logits.dtype not in LOGIT_DTYPES:  # float8 passed is_floating_point, then each backend failed its own way
        raise TypeError(f"{op}: logits must be float16, bfloat16, float32 or float64, got {dtype_name(logits.dtype)}")
    if logits.shape[1] == 0:  # a softmax over no classes is undefined
        raise ValueError(f"{op}: logits must have at least one class (C >= 1), got shape {shape_text(logits)}")


def check_grad_args(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> None:
    """Shapes, dtypes, devices and the smoothing of ``softmax_ce_grad`` (the C++ checks, in order)."""
    _check_logits(GRAD, logits)
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{GRAD}: target must have shape (N,) = ({logits.shape[0]},), got {shape_text(target)}")
    if target.dtype != torch.int64:
        raise TypeError(f"{GRAD}: target must hold integer class indices (int64), got {dtype_name(target.dtype)}")
    if target.device != logits.device:
        raise ValueError(f"{GRAD}: target is on {target.device} but logits on {logits.device}")
    check_number(f"{GRAD}: label_smoothing", label_smoothing, 0.0, 1.0)


def check_hvp_args(logits: torch.Tensor, tangent: torch.Tensor) -> None:
    """Shapes, dtypes and devices of ``softmax_ce_hvp`` (the C++ checks, in order)."""
    _check_logits(HVP, logits)
    if tangent.shape != logits.shape:
        raise ValueError(f"{HVP}: tangent shape {shape_text(tangent)} must equal logits shape {shape_text(logits)}")
    if tangent.dtype != logits.dtype:
        raise TypeError(f"{HVP}: tangent dtype {dtype_name(tangent.dtype)} must equal logits dtype "
                        f"{dtype_name(logits.dtype)}")
    if tangent.device != logits.device:
        raise ValueError(f"{HVP}: tangent is on {tangent.device} but logits on {logits.device}")


def check_targets(target: torch.Tensor, num_classes: int, ignore_index: int, op: str = GRAD) -> None:
    """ValueError naming the FIRST row whose target is neither in [0, C) nor ``ignore_index`` (the
    message of every op with a softmax cross-entropy head, prefixed by ``op``)."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: target[{row}] = {int(target[row])} is out of range for {num_classes} classes "
                         f"(and is not ignore_index={ignore_index})")


# --------------------------------------------------------------------------- autograd
def _grad_setup_context(ctx, inputs, output):
    logits, target, _smoothing, ignore_index, _check = inputs
    ctx.save_for_backward(logits, target)
    ctx.ignore_index = ignore_index


def _hvp_setup_context(ctx, inputs, output):
    logits, tangent, _check = inputs
    ctx.save_for_backward(logits, tangent)


# The derivatives, written once over an ``hvp(logits, u)`` of the caller's choice (a namespace's op,
# or the public function with its backend), so that higher derivatives stay on one backend.
# The grad's Jacobian w.r.t. z is the (symmetric) softmax Hessian J = diag(p) - p p^T, zero on
# ignored rows; h = hvp(z, u) = p*u - p<p,u> moves with z as dh = q*u - q<p,u> - p<q,u>, q = J dz.
HvpOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A softmax-CE hvp op, ``hvp(logits, direction)``: the namespace's own, as :func:`register_autograd` passes it."""


def _probs(logits: torch.Tensor) -> torch.Tensor:
    low = logits.dtype in (torch.float16, torch.bfloat16)
    return torch.softmax(logits.float() if low else logits, dim=1).to(logits.dtype)


def grad_derivative(hvp: HvpOp, logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                    direction: torch.Tensor) -> torch.Tensor:
    """J G of ``softmax_ce_grad`` for a direction G: its backward (G an output gradient) and its jvp
    (G a tangent of the logits) alike, J being symmetric."""
    keep = (target != ignore_index).unsqueeze(1).to(direction.dtype)
    return hvp(logits, direction * keep)


def hvp_logits_vjp(hvp: HvpOp, logits: torch.Tensor, tangent: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """dh^T G = J (G*u - <p,u> G - <G,p> u): the gradient of ``softmax_ce_hvp`` w.r.t. the logits."""
    p = _probs(logits)
    inner = (grad_out * tangent - (p * tangent).sum(1, keepdim=True) * grad_out
             - (p * grad_out).sum(1, keepdim=True) * tangent)
    return hvp(logits, inner)


def hvp_logits_jvp(hvp: HvpOp, logits: torch.Tensor, tangent: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """dh = q*u - q<p,u> - p<q,u> with q = J dz: how ``softmax_ce_hvp`` moves with the logits."""
    p, q = _probs(logits), hvp(logits, dlogits)
    return q * tangent - q * (p * tangent).sum(1, keepdim=True) - p * (q * tangent).sum(1, keepdim=True)


def register_autograd(namespace: str) -> None:
    """The derivatives of ``<namespace>::softmax_ce_grad`` and ``::softmax_ce_hvp`` for callers of the
    registered ops, built from that namespace's own hvp op (so double backward works and stays on the
    same backend). Backward only: a registered op carries no forward-mode rule; the public functions
    in ``ops/softmax_ce.py`` add one."""
    ops = getattr(torch.ops, namespace)

    def hvp(logits, u):
        return ops.softmax_ce_hvp(logits, u, False)

    def grad_backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        return grad_derivative(hvp, logits, target, ctx.ignore_index, grad_out), None, None, None, None

    def hvp_backward(ctx, grad_out):
        logits, tangent = ctx.saved_tensors
        grad_logits = hvp_logits_vjp(hvp, logits, tangent, grad_out) if ctx.needs_input_grad[0] else None
        grad_tangent = hvp(logits, grad_out) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_tangent, None

    torch.library.register_autograd(f"{namespace}::{GRAD}", grad_backward, setup_context=_grad_setup_context)
    torch.library.register_autograd(f"{namespace}::{HVP}", hvp_backward, setup_context=_hvp_setup_context)


# --------------------------------------------------------------------------- fake
# The fakes check the arguments too: under torch.compile they are what runs, and with inputs on
# mixed devices the dispatcher may pick the Meta kernel, which is the fake.
def fake_grad(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, ignore_index: int,
              check_finite: bool) -> torch.Tensor:
    """The fake (meta) implementation of ``softmax_ce_grad``: a contiguous tensor like the logits."""
    check_grad_args(logits, target, label_smoothing)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def fake_hvp(logits: torch.Tensor, tangent: torch.Tensor, check_finite: bool) -> torch.Tensor:
    """The fake (meta) implementation of ``softmax_ce_hvp``: a contiguous tensor like the logits."""
    check_hvp_args(logits, tangent)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)
