"""Softmax cross entropy on logits: per-sample gradient and Hessian-vector product.

For logits z (N x C), p = softmax(z) row-wise, targets y and a tangent u (N x C):

* ``softmax_ce_grad(z, y)  = p - t`` with t the one-hot target (label-smoothed like
  ``torch.nn.functional.cross_entropy``: t = (1 - eps) onehot(y) + eps / C); rows with
  ``y == ignore_index`` are zero. This is the gradient of the *per-sample* loss, not of the mean.
* ``softmax_ce_hvp(z, u) = (diag(p) - p p^T) u = p * u - p * <p, u>``, the Hessian of the
  per-sample loss w.r.t. z (the same for every target and smoothing) applied to u.

Backends: C++ CPU, CUDA and Triton kernels (one fused pass per row, no N x C temporary) and the
pure-PyTorch references ``softmax_ce_grad_ref`` / ``softmax_ce_hvp_ref`` below. Both ops are
differentiable on every backend, in reverse and forward mode (``torch.func`` grad / jvp / vmap too):
d grad / dz [G] = hvp(z, G), and the hvp's own derivatives are in ``contracts/softmax_ce.py``.
"""
from __future__ import annotations

import functools

import torch

from .. import _extension
from ..backends import choose
from ..checks import check_bool, check_int64, check_number, check_tensor, derivative_possible
from ..contracts import softmax_ce as contract


# --------------------------------------------------------------------------- references
def softmax_ce_grad_ref(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`softmax_ce_grad` (reduced precision computed in fp32). As the kernels, the
    target's ``p_y - 1`` is minus the other classes' share of the row's exponentials: ``softmax - onehot`` (torch's
    float32 formula) loses 4e-2 of a well-fit row's gradient at ``1 - p_y ~ 1e-5``."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    num_classes = z.shape[1]
    keep = target != ignore_index
    index = torch.where(keep, target, 0).unsqueeze(1)
    e = torch.exp(z - z.amax(dim=1, keepdim=True))
    total = e.sum(dim=1, keepdim=True)
    others = e.scatter(1, index, 0.0).sum(dim=1, keepdim=True)
    grad = (e / total - label_smoothing / num_classes).scatter(
        1, index, label_smoothing - label_smoothing / num_classes - others / total)
    # where, not a product with the mask: an ignored row is zero even if it holds NaN or is all -inf
    return torch.where(keep.unsqueeze(1), grad, 0.0).to(logits.dtype)


def softmax_ce_hvp_ref(logits: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`softmax_ce_hvp` (reduced precision computed in fp32). As the kernels, the
    tangent is taken relative to each row's top class, ``p ((u - u_top) - <p, u - u_top>)`` (the same product, as
    sum_j p_j = 1): ``p u - p <p, u>`` (torch's formula) loses 4e-2 of a well-fit row's product at 1 - p ~ 1e-5."""
    low = logits.dtype in (torch.float16, torch.bfloat16)
    z, u = (logits.float(), tangent.float()) if low else (logits, tangent)
    p = torch.softmax(z, dim=1)
    r = u - u.gather(1, z.argmax(dim=1, keepdim=True))
    return (p * (r - (p * r).sum(dim=1, keepdim=True))).to(logits.dtype)


# --------------------------------------------------------------------------- checks
def _check_finite_ref(op: str, logits: torch.Tensor, tangent: torch.Tensor | None) -> None:
    """The reference backend's finiteness check: a finite row max, and a finite <p, u> (the kernels'
    conditions, which take <p, u - u_top> with u_top the tangent at the row's top class: the same verdict
    but for a finite tangent near the dtype's largest value, see ``softmax_ce_hvp``)."""
    if not bool(torch.isfinite(logits.amax(dim=1)).all()):
        raise ValueError(f"{op}: {contract.BAD_LOGITS}")
    if tangent is not None:
        mean_u = (torch.softmax(logits.double(), dim=1) * tangent.double()).sum(dim=1)
        if not bool(torch.isfinite(mean_u).all()):
            raise ValueError(f"{op}: {contract.BAD_TANGENT}")


@functools.cache
def _triton_ops():
    from ..triton_kernels import softmax_ce  # noqa: F401  (defines the unlearn_kernels_triton ops)

    return torch.ops.unlearn_kernels_triton


# --------------------------------------------------------------------------- public ops
def softmax_ce_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sample gradient of softmax cross entropy w.r.t. the logits, ``softmax(z) - t``.

    Args:
        logits: (N, C) floating point tensor, C >= 1 (float32/float64; float16/bfloat16 accumulate
            in fp32). Rows may be strided; non-contiguous classes are copied.
        target: (N,) integer class indices in [0, C), or ``ignore_index`` (that row's gradient is 0).
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) onehot + eps / C.
        ignore_index: target value whose rows are ignored, as in ``F.cross_entropy``: an int
            (Python or numpy, not a bool) in the int64 range.
        check_finite: a bool; True raises ValueError if the logits contain NaN/+Inf (checked inside
            the kernel). The targets' range is checked on every call, so on GPU this op synchronises
            once per call whatever ``check_finite`` says (the HVP, which takes no targets, does so only
            with ``check_finite``).
        backend: "auto", "cpp", "cuda", "triton" or "reference" (see :func:`unlearn_kernels.backends`).

    Returns:
        (N, C) contiguous tensor of the logits' dtype. Differentiable w.r.t. ``logits`` (backward, double
        backward, forward mode, ``torch.func`` grad / jvp / vmap; vmap on the reference backend needs
        ``check_finite=False`` and a target vmap does not batch, as its checks read values: the logits'
        finiteness and the targets' range). Meta
        tensors (the reference backend, which "auto" picks for them) give a meta result of that
        shape, with no check of values (targets in range, finiteness): they hold none.

    Raises:
        TypeError / ValueError: a non-tensor, a bad shape, dtype or device, a label_smoothing,
            ignore_index or check_finite of the wrong type or range, a target out of range, or
            non-finite logits (see ``check_finite``). The same error from every backend.
    """
    op = contract.GRAD
    device = check_tensor(f"{op}: logits", logits).device
    target = check_tensor(f"{op}: target", target)
    if not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
        target = target.long()  # any integer dtype; the op's own check names a wrong one
    # The plain Python options, once for every backend (the schema would truncate 1.5 to 1, or
    # raise the dispatcher's own error for "no"): the registered ops get them already checked.
    label_smoothing = check_number(f"{op}: label_smoothing", label_smoothing, 0.0, 1.0)
    ignore_index = check_int64(f"{op}: ignore_index", ignore_index)
    check_finite = check_bool(f"{op}: check_finite", check_finite)
    name = choose(op, device, backend)
    if torch.compiler.is_compiling() or not derivative_possible(logits):  # see _SoftmaxCEGrad
        return _grad_kernel(logits, target, label_smoothing, ignore_index, check_finite, name)
    return _SoftmaxCEGrad.apply(logits, target, label_smoothing, ignore_index, check_finite, name)


def softmax_ce_hvp(
    logits: torch.Tensor, tangent: torch.Tensor, *, check_finite: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Per-sample Hessian-vector product of softmax cross entropy w.r.t. the logits.

    Computes ``(diag(p) - p p^T) u = p * u - p * <p, u>`` row-wise with p = softmax(logits), in
    one fused pass per row with no (N, C) temporary.

    Args:
        logits: (N, C) floating point tensor, C >= 1 (float32/float64; float16/bfloat16 accumulate
            in fp32).
        tangent: (N, C) tensor u of the same dtype and device.
        check_finite: a bool; True raises ValueError if the logits contain NaN/+Inf or the tangent
            NaN/Inf.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        (N, C) contiguous tensor of the logits' dtype. Differentiable w.r.t. logits and tangent, as
        ``softmax_ce_grad`` is. Every backend takes the tangent relative to the row's top class,
        ``p ((u - u_top) - <p, u - u_top>)``, which keeps a well-fit row's digits (``u_top - <p, u>``
        cancels there); the compiled kernels sum ``exp(z - max) (u - u_top)`` over a row in float32 for
        float32 input. So a tangent whose entries differ by nearly the dtype's largest value (entries of
        both signs within a factor of two of it, 3e38 in float32, 1.7e308 in float64; or, in the kernels,
        differences of 3e37 over 16 equally likely classes in float32) overflows: the kernels refuse it as
        non-finite (or return Inf or NaN with ``check_finite=False``); the reference, whose check takes
        ``<p, u>`` in float64, returns Inf or NaN there.
        Meta tensors give a meta result of that shape, with no finiteness check.
    """
    op = contract.HVP
    device = check_tensor(f"{op}: logits", logits).device
    check_tensor(f"{op}: tangent", tangent)
    check_finite = check_bool(f"{op}: check_finite", check_finite)
    name = choose(op, device, backend)
    if torch.compiler.is_compiling() or not derivative_possible(logits, tangent):  # see _SoftmaxCEGrad
        return _hvp_kernel(logits, tangent, check_finite, name)
    return _SoftmaxCEHvp.apply(logits, tangent, check_finite, name)


# --------------------------------------------------------------------------- kernels + autograd
def _grad_kernel(logits, target, label_smoothing, ignore_index, check_finite, backend):
    # One check per path: the compiled kernels (C++, CUDA and Triton) check their inputs themselves,
    # with the same messages as the reference's checks here.
    if backend == "reference":
        contract.check_grad_args(logits, target, label_smoothing)
        if not logits.is_meta:  # meta tensors hold no values to check: the result's shape only
            contract.check_targets(target, logits.shape[1], ignore_index)
            if check_finite:
                _check_finite_ref(contract.GRAD, logits[target != ignore_index], None)
        return softmax_ce_grad_ref(logits, target, label_smoothing, ignore_index)
    ops = _triton_ops() if backend == "triton" else torch.ops.unlearn_kernels
    return ops.softmax_ce_grad(logits, target, label_smoothing, ignore_index, check_finite)


def _hvp_kernel(logits, tangent, check_finite, backend):
    if backend == "reference":
        contract.check_hvp_args(logits, tangent)
        if check_finite and not logits.is_meta:  # meta tensors hold no values to check
            _check_finite_ref(contract.HVP, logits, tangent)
        return softmax_ce_hvp_ref(logits, tangent)
    ops = _triton_ops() if backend == "triton" else torch.ops.unlearn_kernels
    return ops.softmax_ce_hvp(logits, tangent, check_finite)


def _hvp_on(backend: str):
    """The differentiable hvp on one backend, for the derivative formulas (higher derivatives too)."""
    return functools.partial(softmax_ce_hvp, check_finite=False, backend=backend)


# Eager calls of the public functions whose result may be differentiated run the kernels through these
# autograd.Functions, not through the ops' own registered autograd: a registered op carries no
# forward-mode rule, and torch.func.jvp (or forward_ad) through it gives a zero tangent without an error.
# Under torch.compile the registered ops are traced as they are (with their registered backward):
# Dynamo cannot trace a custom jvp.
class _SoftmaxCEGrad(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, label_smoothing, ignore_index, check_finite, backend):
        return _grad_kernel(logits, target, label_smoothing, ignore_index, check_finite, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, _smoothing, ignore_index, _check, backend = inputs
        ctx.save_for_backward(logits, target)
        ctx.save_for_forward(logits, target)
        ctx.ignore_index, ctx.backend = ignore_index, backend

    @staticmethod
    def backward(ctx, grad_out):
        logits, target = ctx.saved_tensors
        grad = contract.grad_derivative(_hvp_on(ctx.backend), logits, target, ctx.ignore_index, grad_out)
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dlogits, *_none):
        logits, target = ctx.saved_tensors
        return contract.grad_derivative(_hvp_on(ctx.backend), logits, target, ctx.ignore_index, dlogits)


class _SoftmaxCEHvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, tangent, check_finite, backend):
        return _hvp_kernel(logits, tangent, check_finite, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, tangent, _check, backend = inputs
        ctx.save_for_backward(logits, tangent)
        ctx.save_for_forward(logits, tangent)
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # an absent tangent arrives as None, not as zeros

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        logits, tangent = ctx.saved_tensors
        hvp = _hvp_on(ctx.backend)
        grad_logits = contract.hvp_logits_vjp(hvp, logits, tangent, grad_out) if ctx.needs_input_grad[0] else None
        grad_tangent = hvp(logits, grad_out) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_tangent, None, None

    @staticmethod
    def jvp(ctx, dlogits, dtangent, *_none):
        logits, tangent = ctx.saved_tensors
        hvp = _hvp_on(ctx.backend)
        moved = None if dtangent is None else hvp(logits, dtangent)
        if dlogits is not None:
            through_logits = contract.hvp_logits_jvp(hvp, logits, tangent, dlogits)
            moved = through_logits if moved is None else moved + through_logits
        return torch.zeros_like(logits, memory_format=torch.contiguous_format) if moved is None else moved


# --------------------------------------------------------------------------- fake + autograd
if _extension.extension_loaded():
    torch.library.register_fake(f"unlearn_kernels::{contract.GRAD}")(contract.fake_grad)
    torch.library.register_fake(f"unlearn_kernels::{contract.HVP}")(contract.fake_hvp)
    contract.register_autograd("unlearn_kernels")
