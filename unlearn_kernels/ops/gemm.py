"""A matrix product with an optional bias row, ``a b + bias``, or a batch of products, through the compiled passes'
GEMM route.

torch's float32 CPU matmuls run through MKL, which takes its AVX2 path on AMD CPUs; the C++ kernel runs a
float32 GEMM of at least 786,432 multiply-adds through torch's own oneDNN matmul on a non-Intel x86 CPU with AVX-512
(2.0-2.3x MKL's speed on the AMD EPYC of docs/benchmarks.md, one thread), and ATen's GEMM otherwise (Intel CPUs,
whose MKL runs AVX-512 and beat oneDNN there, other dtypes, small GEMMs, within
:func:`unlearn_kernels.aten_gemm`): :func:`unlearn_kernels.cpu_gemm` names the
route. The generic curvature operators build the linear layers of their gradient graphs on it (see
:mod:`unlearn_kernels.curvature.graph_ops`), so that the double backward's GEMMs take that route too.

Backends: C++ CPU and the reference :func:`gemm_ref` (``torch.addmm`` / ``torch.mm``; "auto" takes it on
GPUs, where it is cuBLAS). Differentiable to any order in reverse mode: the C++ op's backward is this op again
(``ga = g b^T``, ``gb = a^T g``, ``gbias = sum of g's rows``), and it keeps only the operands that backward reads
(``b`` where ``a`` needs a gradient, ``a`` where ``b`` does), as ``torch.mm`` does. Forward-mode tangents and
torch.func's transforms (``jvp``, ``grad``, ``vmap``), for which the registered op has no rule, run the reference.
"""
from __future__ import annotations

import torch

from .. import _extension
from ..backends import choose, reverse_mode_only
from ..checks import check_one_floating_dtype_and_device, check_tensors

_OP = "gemm"


def gemm_ref(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`gemm`."""
    if a.dim() == 3:
        return torch.bmm(a, b)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _check_inputs(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensors(_OP, [("a", a), ("b", b)] + ([("bias", bias)] if bias is not None else []))
    if a.dim() != b.dim() or not (a.dim() == 2 or (a.dim() == 3 and a.shape[0] == b.shape[0])):
        raise ValueError(f"{_OP}: a and b must be 2-D, or 3-D with one batch size, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"{_OP}: a's columns must match b's rows, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    check_one_floating_dtype_and_device(_OP, [("a", a), ("b", b)])
    if bias is not None and a.dim() == 3:
        raise ValueError(f"{_OP}: a bias needs 2-D a and b, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if bias is not None and (bias.shape != (b.shape[1],) or bias.dtype != a.dtype or bias.device != a.device):
        raise ValueError(f"{_OP}: bias must be a ({b.shape[1]},) tensor of dtype {a.dtype} on {a.device}, got shape "
                         f"{tuple(bias.shape)}, {bias.dtype} on {bias.device}")


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``a b``, plus ``bias`` added to every row when given; or the batch of products ``a[i] b[i]``.

    Args:
        a: (M, K) floating tensor (any strides: a transposed view is read as it is), or (B, M, K).
        b: (K, N) tensor of a's dtype and device, or (B, K, N) for a batch.
        bias: None or (N,) tensor of a's dtype and device (2-D products only).
        backend: "auto" (C++ on the CPU, the reference elsewhere), "cpp" or "reference".

    Returns:
        A new (M, N) or (B, M, N) tensor; differentiable w.r.t. a, b and bias (to any order).

    Raises:
        TypeError: an argument that is not a tensor.
        ValueError: shapes, dtypes or devices that do not fit (named).
        BackendUnavailableError: a forced backend that cannot run here or on these tensors.
    """
    _check_inputs(a, b, bias)
    if choose(_OP, a.device, backend) == "reference" or reverse_mode_only(a, b, bias):
        return gemm_ref(a, b, bias)
    return torch.ops.unlearn_kernels.gemm(a, b, bias)


def _fake(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    a, b, bias = inputs
    need_a, need_b = ctx.needs_input_grad[:2]
    ctx.save_for_backward(a if need_b else None, b if need_a else None)  # what the backward reads, as torch.mm
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    a, b = ctx.saved_tensors
    need_a, need_b, need_bias = ctx.needs_input_grad
    return (gemm(grad, b.mT) if need_a else None, gemm(a.mT, grad) if need_b else None,
            grad.sum(0) if ctx.has_bias and need_bias else None)


if _extension.extension_loaded():
    torch.library.register_fake(f"unlearn_kernels::{_OP}")(_fake)
    torch.library.register_autograd(f"unlearn_kernels::{_OP}", _backward, setup_context=_setup_context)
