"""The contract of ``lanczos_step`` shared by its Python backends (reference and Triton): the argument
checks and the checks of the values, word for word those of ``csrc/lanczos_step.h``, the breakdown
threshold and the fake (meta) implementation every namespace of the op registers."""
from __future__ import annotations

import math

import torch

from .text import dtype_name, shape_text

OP = "lanczos_step"
STEP_BREAKDOWN_EPS = 16.0
"""The step's breakdown threshold: a beta at most this many machine epsilons of ||hq|| is returned as 0
(``kStepBreakdownEps`` in csrc/lanczos_step.h; :data:`unlearn_kernels.solvers.lanczos.PROCESS_BREAKDOWN_EPS` is
the process's, relative to ||T||)."""


def check_args(hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor,
               basis: torch.Tensor) -> None:
    """Shapes, dtypes and devices (the C++ checks, in order: the shapes of hq and q first)."""
    if hq.dim() != 1:
        raise ValueError(f"{OP}: hq must be 1-D (d,), got shape {shape_text(hq)}")
    for name, t in (("q", q), ("q_prev", q_prev)):
        if t.shape != hq.shape:
            raise ValueError(f"{OP}: {name} must have the shape of hq {shape_text(hq)}, got {shape_text(t)}")
    d = hq.shape[0]
    if basis.dim() != 2 or basis.shape[1] != d:
        raise ValueError(f"{OP}: basis must have shape (m, {d}), got {shape_text(basis)}")
    if beta_prev.numel() != 1:
        raise ValueError(f"{OP}: beta_prev must hold one number, got shape {shape_text(beta_prev)}")
    if hq.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{OP}: hq must be float32 or float64, got {dtype_name(hq.dtype)}")
    for name, t in (("q", q), ("q_prev", q_prev), ("basis", basis)):
        if t.dtype != hq.dtype:
            raise TypeError(f"{OP}: {name} dtype {dtype_name(t.dtype)} must equal hq dtype {dtype_name(hq.dtype)}")
    for name, t in (("q", q), ("q_prev", q_prev), ("beta_prev", beta_prev), ("basis", basis)):
        if t.device != hq.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but hq is on {hq.device}")


def check_values(beta_prev: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> None:
    """After the step: beta_prev finite, then alpha and beta. A NaN or Inf anywhere in hq, q, q_prev
    or basis reaches alpha or beta (Inf in hq makes alpha non-finite even where the breakdown test
    zeroes beta), so these two scalars cover the vectors without another pass over them. One read of
    three numbers (on a GPU, one synchronisation)."""
    b_prev, a, b = torch.stack([beta_prev.reshape(()).double(), alpha, beta]).tolist()
    if not math.isfinite(b_prev):
        raise ValueError(f"{OP}: beta_prev must be finite, got NaN or Inf")
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{OP}: alpha or beta is not finite: hq, q, q_prev or basis contains NaN or Inf, "
                         "or their products overflow")


def fake(hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor,
         basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake (meta) implementation: the next vector (hq's dtype, contiguous), alpha and beta (float64).
    It checks the arguments too: under torch.compile it is what runs, and with inputs on mixed
    devices the dispatcher may pick the Meta kernel, which is the fake."""
    check_args(hq, q, q_prev, beta_prev, basis)
    scalar = hq.new_empty((), dtype=torch.float64)
    return torch.empty_like(hq, memory_format=torch.contiguous_format), scalar, scalar.clone()
