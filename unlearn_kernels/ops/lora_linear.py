"""Fused LoRA linear layer: ``y = x W^T + b + s (x A^T) B^T``, its backward and its JVP.

Shapes follow PEFT: x (..., in) with any leading dims, W (out, in), b (out,) or None, A (rank, in),
B (out, rank), s a Python float (PEFT's ``scaling``, alpha / rank). W and b are the frozen layer:
this op gives them no gradient, so they must not require one (a ValueError says so), and forward-mode
tangents on them are refused the same way.

A LoRA step costs the frozen layer's GEMMs plus rank-sized work: the adapter is folded into the
big GEMMs instead of running passes of its own. With W' = W + s B A (formed when there are enough
rows, N >= in * out / (in + out), and never in float16 / bfloat16, where rounding W' to the input
dtype would lose the part of s B A below half an ulp of W; otherwise the rank-r term s (x A^T) B^T is
accumulated into the big GEMM's output instead, addmm with beta = 1) and xa = x A^T (N, r)::

    forward    y = x W'^T + b                             (one big GEMM)
    backward   gx = gy W'                                 (one big GEMM)
               g = s gy B,  xa,  gA = g^T x,  gB = s gy^T xa   (rank-sized: one read of x and gy)
    JVP        [xa, x dA^T] = x [A; dA]^T                 (one GEMM for both)
               t = s [xa, x dA^T] [dB, B]^T               (one GEMM of inner size 2r)

Backends: C++ CPU and CUDA (ATen GEMMs; the same pass in ``csrc/cpu/lora_linear.cpp``, registered
for both devices), Triton (one strided matmul kernel whose epilogue adds the bias and the rank-r
product, so y and gx are each written once without merging) and the reference (the formulas in
plain ATen ops); :func:`lora_linear_ref` / :func:`lora_linear_jvp_ref` are the plain expressions.

How the transforms reach the kernels: :func:`lora_linear` runs an ``autograd.Function`` around the
registered op (forward mode has no registration API for custom ops, so a Function is the one place
that can carry both rules). Its ``backward`` calls the compiled backward op when no graph of the
backward is recorded; under ``create_graph=True`` or ``torch.func.grad`` (which always records
one) it runs the formulas above in differentiable ATen ops, recomputing xa from x and A so that
the graph reaches them: double backward and forward-over-reverse work. Its ``jvp`` (forward mode,
``torch.func.jvp``) is the JVP's folded GEMMs in ATen ops, so that ``torch.func.vmap`` over the
tangents batches them (``generate_vmap_rule``). :func:`lora_linear_jvp` runs output and tangent as
one compiled op when no graph is recorded.

Autocast: both public ops follow ``F.linear``'s policy. Where autocast is enabled for x's device type,
the entry point casts every floating-point input on that device except float64 ones to
``torch.get_autocast_dtype(device_type)`` (recorded casts, so that gradients reach the original
leaves in their own dtypes) and runs the op with autocast disabled, as does the Function's backward:
no ATen call inside the op is recast halfway. It is done here rather than with
``torch.library.register_autocast``, which casts to one fixed dtype at the registered op, below the
Function (whose saved inputs and backward would keep the uncast dtypes) and past the reference backend.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from .. import _extension
from ..backends import choose
from ..checks import derivative_possible
from ..contracts.lora_linear import check_args, fake_backward, fake_forward, fake_jvp

_CPP_OPS = "unlearn_kernels"
_OP = "lora_linear"


# --------------------------------------------------------------------------- references
def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`lora_linear`: ``x W^T + b + scale (x A^T) B^T`` (plain
    autograd: unlike the op, it differentiates W and b too)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def lora_linear_jvp_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    tangent_a: torch.Tensor | None,
    tangent_b: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`lora_linear_jvp`:
    ``(y, scale [(x dA^T) B^T + (x A^T) dB^T])``."""
    out = lora_linear_ref(x, weight, bias, lora_a, lora_b, scale)
    tangent = torch.zeros_like(out)
    if tangent_a is not None:
        tangent = tangent + scale * F.linear(F.linear(x, tangent_a), lora_b)
    if tangent_b is not None:
        tangent = tangent + scale * F.linear(F.linear(x, lora_a), tangent_b)
    return out, tangent


# --------------------------------------------------------------------------- the pass in ATen ops
# On 2-D x (N, in); every matmul broadcasts, so the vmap rules reuse these with batched operands.
# They are the reference backend's kernels and the differentiable backward of every backend.
def _forward_aten(x, weight, bias, lora_a, lora_b, scale):
    out = torch.matmul(x, weight.mT)
    if bias is not None:
        out = out + bias
    return out + scale * torch.matmul(torch.matmul(x, lora_a.mT), lora_b.mT)


def _backward_aten(grad_out, x, weight, lora_a, lora_b, scale, output_mask):
    """(gx, gA, gB), None where output_mask says not needed."""
    need_x, need_a, need_b = output_mask
    g = torch.matmul(grad_out, lora_b) * scale if (need_x or need_a) else None
    gx = torch.matmul(grad_out, weight) + torch.matmul(g, lora_a) if need_x else None
    ga = torch.matmul(g.mT, x) if need_a else None
    gb = torch.matmul(grad_out.mT, torch.matmul(x, lora_a.mT)) * scale if need_b else None
    return gx, ga, gb


def _tangent_aten(x, lora_a, lora_b, scale, tangent_a, tangent_b):
    """scale [(x dA^T) B^T + (x A^T) dB^T]; with both tangents, [x A^T, x dA^T] = x [A; dA]^T is one
    GEMM and the tangent one more, of inner size 2r."""
    if tangent_a is None:
        return torch.matmul(torch.matmul(x, lora_a.mT), tangent_b.mT) * scale
    if tangent_b is None:
        return torch.matmul(torch.matmul(x, tangent_a.mT), lora_b.mT) * scale
    left = torch.matmul(x, _cat(lora_a, tangent_a, dim=-2).mT)  # [xa, x dA^T]
    return torch.matmul(left, _cat(tangent_b, lora_b, dim=-1).mT) * scale


def _cat(a, b, dim):
    """torch.cat after broadcasting the leading (batch) dims, which the vmap rules may leave unequal."""
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return torch.cat([a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])], dim=dim)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as the 2-D (N, in) the ops take. ``reshape(-1, in)`` cannot infer N when x is empty
    (in = 0 makes any N fit), so N is the product of the leading dims."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# --------------------------------------------------------------------------- autocast
def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs ``F.linear`` in on this device type; None where it is off (or absent)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _with_autocast_policy(op, **args):
    """``op(**args)``, where autocast is on for x's device type as autocast runs ``F.linear``: the
    floating-point tensors on that device other than float64 cast to its dtype (recorded casts), and
    autocast off inside the op; anything else (None, non-tensors for the checks to name) unchanged."""
    x = args["x"]
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    dtype = None if device_type is None else _autocast_dtype(device_type)
    if dtype is None:
        return op(**args)
    args = {name: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type else t for name, t in args.items()}
    with torch.autocast(device_type, enabled=False):
        return op(**args)


def _autocast_off(device_type: str):
    """A context that disables autocast on ``device_type`` where it is on (else does nothing)."""
    if _autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


# --------------------------------------------------------------------------- validation
def _check_inputs(op, x, weight, bias, lora_a, lora_b, scale, tangents=()):
    """The contract's checks, and the one the registered ops never see: a frozen tensor that requires grad."""
    check_args(op, x, weight, bias, lora_a, lora_b, scale, tangents)
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but the frozen layer gets no gradient from this op; "
                                 f"call {name}.requires_grad_(False) (only x, lora_a and lora_b are differentiated)")


# --------------------------------------------------------------------------- backends
@functools.cache
def _triton_ops():
    from ..triton_kernels import lora_linear  # noqa: F401  (defines the unlearn_kernels_triton ops)

    register("unlearn_kernels_triton", "triton")  # their autograd and vmap rules live here, beside the formulas
    return torch.ops.unlearn_kernels_triton


def _ops(backend: str):
    return _triton_ops() if backend == "triton" else torch.ops.unlearn_kernels


def _forward(backend, x, weight, bias, lora_a, lora_b, scale):
    if backend == "reference":
        return _forward_aten(x, weight, bias, lora_a, lora_b, scale)
    return _ops(backend).lora_linear(x, weight, bias, lora_a, lora_b, scale)


def _backward(backend, grad_out, x, weight, lora_a, lora_b, scale, output_mask):
    """The compiled backward when no graph of it is needed; else the differentiable ATen formulas. So
    too for the legacy batched gradients of ``autograd.grad(..., is_grads_batched=True)`` and
    ``jacobian(vectorize=True)``, which reach no registered vmap rule (the C++ op would run once per
    vector, and a Python-defined op cannot run at all)."""
    if backend == "reference" or torch.is_grad_enabled() or torch._C._functorch.is_legacy_batchedtensor(grad_out):
        return _backward_aten(grad_out, x, weight, lora_a, lora_b, scale, output_mask)
    grads = _ops(backend).lora_linear_backward(grad_out, x, weight, lora_a, lora_b, scale, list(output_mask))
    if backend == "triton":  # the requested gradients only, in order
        present = iter(grads)
        grads = tuple(next(present) if need else None for need in output_mask)
    return grads


def _frozen_error(op: str) -> ValueError:
    return ValueError(f"{op}: weight and bias are frozen (this op gives them no gradient and takes no tangent "
                      "for them); differentiate only x, lora_a and lora_b")


class _LoRALinearFunction(torch.autograd.Function):
    """y from 2-D x through the chosen backend, with backward and forward-mode rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, lora_a, lora_b, scale, backend):
        return _forward(backend, x, weight, bias, lora_a, lora_b, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, lora_a, lora_b, scale, backend = inputs
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.save_for_forward(x, weight, lora_a, lora_b)
        ctx.scale, ctx.backend = scale, backend
        ctx.set_materialize_grads(False)  # absent tangents / gradients arrive as None, not zeros

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        if need_w or need_b:
            raise _frozen_error(_OP)
        if grad_out is None:  # the output does not reach the loss (set_materialize_grads(False))
            return None, None, None, None, None, None, None
        x, weight, lora_a, lora_b = ctx.saved_tensors
        with _autocast_off(x.device.type):  # a backward called under autocast computes in the saved dtypes
            gx, ga, gb = _backward(ctx.backend, grad_out, x, weight, lora_a, lora_b, ctx.scale,
                                   (need_x, need_a, need_lb))
        return gx, None, None, ga, gb, None, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, dlora_a, dlora_b, _dscale, _dbackend):
        if dweight is not None or dbias is not None:
            raise _frozen_error(_OP)
        x, weight, lora_a, lora_b = ctx.saved_tensors
        tangent = None
        if dlora_a is not None or dlora_b is not None:
            tangent = _tangent_aten(x, lora_a, lora_b, ctx.scale, dlora_a, dlora_b)
        if dx is not None:
            through_x = _forward_aten(dx, weight, None, lora_a, lora_b, ctx.scale)
            tangent = through_x if tangent is None else tangent + through_x
        if tangent is None:
            tangent = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        return tangent


# --------------------------------------------------------------------------- public ops
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """A frozen linear layer with a LoRA adapter: ``x W^T + b + scale (x A^T) B^T``.

    Args:
        x: (..., in) input, any leading dims, any strides; float16, bfloat16, float32 or float64 on
            CPU and GPU (float16/bfloat16 accumulated in float32).
        weight: (out, in) frozen weight W; must not require grad.
        bias: (out,) frozen bias or None; must not require grad.
        lora_a: (rank, in) adapter A (PEFT's ``lora_A.weight``), rank >= 1.
        lora_b: (out, rank) adapter B (PEFT's ``lora_B.weight``).
        scale: the adapter's scaling s (PEFT: lora_alpha / rank), a finite Python float.
        backend: "auto", "cpp", "cuda", "triton" or "reference" (see :func:`unlearn_kernels.backends`).

    Returns:
        (..., out) tensor of x's dtype. Differentiable w.r.t. x, lora_a and lora_b (backward, double
        backward, ``torch.func`` grad / jvp / vmap); W and b get no gradient.

    Under ``torch.autocast`` for x's device type it behaves like ``F.linear``: floating-point inputs
    other than float64 are cast to the autocast dtype (``torch.get_autocast_dtype``), the op runs in
    it with autocast off inside, and the output has that dtype; gradients flow back through the casts
    to x, lora_a and lora_b in their own dtypes. float64 inputs are left as they are. Outside autocast
    nothing is cast.

    A layer of a model's forward pass, like ``F.linear``: NaN or Inf in the tensors propagates to the
    output without a check (a check would read every input back on each call; the unlearning methods
    check the model's weights and data once, up front). One backend difference: with ``scale`` 0 the
    C++ kernel's BLAS calls skip the adapter's product (alpha 0), so a NaN or Inf in lora_a or lora_b
    does not reach its output, where the Triton and reference ones give NaN. Which non-finite value
    an Inf in x gives can differ too: where the C++ kernel folds the adapter into W (enough rows, see
    above), +-Inf where the unfolded sum meets Inf - Inf (NaN); the same entries are non-finite on
    every backend. A folded weight W + s B A that is not finite (a NaN or Inf in W, lora_a or lora_b,
    or s B A beyond the dtype's range) is not used on the CPU: the kernel sums unfolded there, as the
    reference does. On CUDA it is used as it is (the check would wait for the GPU at every call): there
    s B A beyond the dtype's range gives Inf where the reference's output is finite, and an Inf in
    lora_a or lora_b NaN where the unfolded sum is +-Inf.
    """
    return _with_autocast_policy(_lora_linear, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                                 scale=scale, backend=backend)


def _lora_linear(x, weight, bias, lora_a, lora_b, scale, backend):
    """:func:`lora_linear` once its autocast policy applied."""
    _check_inputs(_OP, x, weight, bias, lora_a, lora_b, scale)
    name = choose(_OP, x.device, backend)
    x2 = _rows(x)
    out = _LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scale), name)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def lora_linear_jvp(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    tangent_a: torch.Tensor | None,
    tangent_b: torch.Tensor | None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of :func:`lora_linear` and its directional derivative along tangents on the
    adapters, in one pass: ``(y, scale [(x dA^T) B^T + (x A^T) dB^T])``.

    Args:
        x, weight, bias, lora_a, lora_b, scale, backend: as in :func:`lora_linear`.
        tangent_a: (rank, in) tangent dA on lora_a, or None for zero.
        tangent_b: (out, rank) tangent dB on lora_b, or None for zero.

    Returns:
        ``(y, tangent_out)``, both (..., out). When autograd records a graph (an input requires
        grad), both are differentiable (through :func:`lora_linear` and ATen ops); otherwise one
        compiled op computes them. Under ``torch.autocast`` the inputs and tangents are cast as in
        :func:`lora_linear` and both results have the autocast dtype.
    """
    return _with_autocast_policy(_lora_linear_jvp, x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                                 scale=scale, tangent_a=tangent_a, tangent_b=tangent_b, backend=backend)


def _lora_linear_jvp(x, weight, bias, lora_a, lora_b, scale, tangent_a, tangent_b, backend):
    """:func:`lora_linear_jvp` once its autocast policy applied."""
    op = "lora_linear_jvp"
    _check_inputs(op, x, weight, bias, lora_a, lora_b, scale, (("tangent_a", tangent_a), ("tangent_b", tangent_b)))
    name = choose(op, x.device, backend)
    shape = (*x.shape[:-1], weight.shape[0])
    x2 = _rows(x)
    if tangent_a is None and tangent_b is None:
        out = lora_linear(x, weight, bias, lora_a, lora_b, scale, backend=name)
        return out, torch.zeros_like(out)
    # under forward-mode AD too (a dual, a torch.func transform): the compiled op's tangent would be zero
    recording = derivative_possible(*(t for t in (x2, lora_a, lora_b, tangent_a, tangent_b) if t is not None))
    if name == "reference" or recording:
        out = _LoRALinearFunction.apply(x2, weight, bias, lora_a, lora_b, float(scale), name)
        tangent = _tangent_aten(x2, lora_a, lora_b, float(scale), tangent_a, tangent_b)
    else:
        out, tangent = _ops(name).lora_linear_jvp(x2, weight, bias, lora_a, lora_b, float(scale), tangent_a, tangent_b)
    return out.reshape(shape), tangent.reshape(shape)


# --------------------------------------------------------------------------- registration
def _autograd_setup(backend: str):
    def setup_context(ctx, inputs, output):
        _LoRALinearFunction.setup_context(ctx, (*inputs, backend), output)

    return setup_context


def _autograd_backward(ctx, grad_out):
    return _LoRALinearFunction.backward(ctx, grad_out)[:6]


def _front(t, dim):
    return t if t is None or dim is None else t.movedim(dim, 0)


def _batched_dim(t, unbatched_dims: int):
    return 0 if t.dim() > unbatched_dims else None


def _vmap_forward(op):
    """vmap rule of a forward op: a batch of x only is more rows for the op; batched parameters
    run the ATen pass, whose matmuls broadcast over the batch."""

    def rule(info, in_dims, x, weight, bias, lora_a, lora_b, scale):
        x_dim, *param_dims = in_dims[:5]
        if all(d is None for d in param_dims):
            x = x.movedim(x_dim, 0)
            out = op(_rows(x), weight, bias, lora_a, lora_b, scale)
            return out.reshape(*x.shape[:2], weight.shape[0]), 0
        x, weight, bias, lora_a, lora_b = (_front(t, d) for t, d in zip((x, weight, bias, lora_a, lora_b), in_dims))
        if bias is not None and in_dims[2] is not None:
            bias = bias.unsqueeze(-2)
        out = _forward_aten(x, weight, bias, lora_a, lora_b, scale)
        return out, _batched_dim(out, 2)

    return rule


def _vmap_jvp(op):
    """vmap rule of a JVP op: unbatched primals (tangents batched, as in a curvature operator's
    matmat) run the op's forward once and the folded tangent GEMMs broadcast over the batch."""

    def rule(info, in_dims, x, weight, bias, lora_a, lora_b, scale, tangent_a, tangent_b):
        x, weight, bias, lora_a, lora_b, tangent_a, tangent_b = (
            _front(t, d) for t, d in zip((x, weight, bias, lora_a, lora_b, tangent_a, tangent_b), in_dims))
        if all(d is None for d in in_dims[:5]):
            out = op.lora_linear(x, weight, bias, lora_a, lora_b, scale)
        else:
            if bias is not None and in_dims[2] is not None:
                bias = bias.unsqueeze(-2)
            out = _forward_aten(x, weight, bias, lora_a, lora_b, scale)
        if tangent_a is None and tangent_b is None:
            tangent = torch.zeros_like(out)
        else:
            tangent = _tangent_aten(x, lora_a, lora_b, scale, tangent_a, tangent_b)
        return (out, tangent), (_batched_dim(out, 2), _batched_dim(tangent, 2))

    return rule


def _vmap_backward(returns_all: bool):
    """vmap rule of a backward op (autograd's ``is_grads_batched``, ``jacobian(vectorize=True)``): the
    ATen formulas, whose matmuls broadcast over the batch. ``returns_all``: the op returns all three
    gradients, None where not asked (C++), rather than the asked ones only (Triton)."""

    def rule(info, in_dims, grad_out, x, weight, lora_a, lora_b, scale, output_mask):
        tensors = (_front(t, d) for t, d in zip((grad_out, x, weight, lora_a, lora_b), in_dims))
        grads = _backward_aten(*tensors, scale, output_mask)
        if not returns_all:
            grads = [g for g in grads if g is not None]
        dims = [None if g is None else _batched_dim(g, 2) for g in grads]
        return (tuple(grads), tuple(dims)) if returns_all else (grads, dims)

    return rule


def register(namespace: str, backend: str) -> None:
    """Fake implementations, autograd and vmap rules of one namespace's ops (``backend`` names the
    backend whose backward op the autograd formula calls)."""
    ops_ns = getattr(torch.ops, namespace)
    if namespace == _CPP_OPS:  # the Triton module gives its ops their fake implementations itself
        torch.library.register_fake(f"{namespace}::lora_linear")(fake_forward)
        torch.library.register_fake(f"{namespace}::lora_linear_backward")(fake_backward)
        torch.library.register_fake(f"{namespace}::lora_linear_jvp")(fake_jvp)
    torch.library.register_autograd(f"{namespace}::lora_linear", _autograd_backward,
                                    setup_context=_autograd_setup(backend))
    torch.library.register_vmap(f"{namespace}::lora_linear", _vmap_forward(ops_ns.lora_linear))
    torch.library.register_vmap(f"{namespace}::lora_linear_jvp", _vmap_jvp(ops_ns))
    torch.library.register_vmap(f"{namespace}::lora_linear_backward", _vmap_backward(namespace == _CPP_OPS))


if _extension.extension_loaded():
    register(_CPP_OPS, "cpp")
