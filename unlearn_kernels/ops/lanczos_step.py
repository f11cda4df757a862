"""One step of the Lanczos recurrence, fused: recurrence, CGS2 reorthogonalisation and norms.

Given hq = H q for the current Lanczos vector q, the previous vector q_prev with its coefficient
beta_prev, and an (m, d) matrix ``basis`` of vectors to orthogonalise against (m = 0: none)::

    alpha  = <hq, q>
    w      = hq - alpha q - beta_prev q_prev
    w      = w - basis^T (basis w)          (classical Gram-Schmidt, done twice: CGS2)
    beta   = ||w||
    q_next = w / beta

Alpha accumulates in float64 for float32 vectors too; alpha and beta come back as float64 0-dim
tensors on the vectors' device (no host synchronisation). When beta is at the rounding level of
the step, ``beta <= 16 eps ||hq||`` with eps the vectors' machine epsilon, the Krylov space is
invariant ("breakdown"): then beta is returned as exactly 0 and q_next as zeros.

Backends: C++ CPU, CUDA and Triton kernels, and the pure-PyTorch reference
:func:`lanczos_step_ref` (float64 throughout). The C++ kernel works at the memory floor of the
step, which is reading the basis: it forms w first, so the first pass needs one product
``basis w``; computes the second pass's coefficients ``c2 = basis w`` in the same sweep as the first
pass's update (while that tile of the basis is in cache); and makes the second update only when
``||c2|| > eps ||w||``, i.e. when it would change w by more than the rounding of storing it. It
reads the basis twice per step (three times when hq lies almost inside its span), with tile sums
in the vectors' dtype and float64 across tiles. The CUDA and Triton kernels follow the same scheme
with float64 sums, the decision taken on the device (no host synchronisation).
"""
from __future__ import annotations

import torch

from .. import _extension
from ..backends import choose
from ..contracts.lanczos_step import BREAKDOWN_RTOL_EPS, fake

_CPP_OPS = "unlearn_kernels"
_OP = "lanczos_step"


def lanczos_step_ref(
    hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch float64 reference of :func:`lanczos_step` (same arguments, validated)."""
    h, v, vp, b = hq.double(), q.double(), q_prev.double(), basis.double()
    alpha = torch.dot(h, v)
    w = h - alpha * v - beta_prev.to(h) * vp
    for _ in range(2):
        w = w - b.T @ (b @ w)
    beta = torch.linalg.vector_norm(w)
    breakdown = beta <= BREAKDOWN_RTOL_EPS * torch.finfo(hq.dtype).eps * torch.linalg.vector_norm(h)
    beta = torch.where(breakdown, torch.zeros_like(beta), beta)
    q_next = torch.where(breakdown, torch.zeros_like(w), w / torch.where(breakdown, 1.0, beta))
    return q_next.to(hq.dtype), alpha, beta


def _check_inputs(
    hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, basis: torch.Tensor
) -> None:
    named = {"hq": hq, "q": q, "q_prev": q_prev, "basis": basis}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hq.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_OP}: hq must be float32 or float64, got {hq.dtype}")
    if hq.dim() != 1:
        raise ValueError(f"{_OP}: hq must be 1-D (d,), got shape {tuple(hq.shape)}")
    d = hq.shape[0]
    for name, t in named.items():
        if t.dtype != hq.dtype:
            raise TypeError(f"{_OP}: {name} dtype {t.dtype} must equal hq dtype {hq.dtype}")
        if t.device != hq.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but hq is on {hq.device}")
    for name in ("q", "q_prev"):
        if named[name].shape != (d,):
            raise ValueError(f"{_OP}: {name} must have shape ({d},), got {tuple(named[name].shape)}")
    if basis.dim() != 2 or basis.shape[1] != d:
        raise ValueError(f"{_OP}: basis must have shape (m, {d}), got {tuple(basis.shape)}")


def _beta_tensor(beta_prev: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(beta_prev, torch.Tensor):
        if beta_prev.numel() != 1 or beta_prev.is_complex() or beta_prev.dtype == torch.bool:
            raise ValueError(f"{_OP}: beta_prev must be a real scalar, got a {beta_prev.dtype} tensor of shape "
                             f"{tuple(beta_prev.shape)}")
        return beta_prev.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(beta_prev, bool) or not isinstance(beta_prev, (int, float)):
        raise TypeError(f"{_OP}: beta_prev must be a float or a 0-dim tensor, got {type(beta_prev).__name__}")
    return torch.tensor(float(beta_prev), dtype=torch.float64, device=device)


def _triton_ops():
    from ..triton_kernels import lanczos_step  # noqa: F401  (defines the unlearn_kernels_triton op)

    return torch.ops.unlearn_kernels_triton


def lanczos_step(
    hq: torch.Tensor,
    q: torch.Tensor,
    q_prev: torch.Tensor | None,
    beta_prev: float | torch.Tensor,
    basis: torch.Tensor | None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused Lanczos step: ``alpha = <hq, q>``, ``w = hq - alpha q - beta_prev q_prev``,
    CGS2 reorthogonalisation of w against the rows of ``basis``, ``beta = ||w||``, ``q_next = w / beta``.

    Args:
        hq: (d,) float32/float64, the operator applied to q.
        q: (d,) the current (unit) Lanczos vector.
        q_prev: (d,) the previous Lanczos vector, or None on the first step (then beta_prev is
            ignored).
        beta_prev: the previous step's beta, a float or a 0-dim tensor (e.g. the ``beta`` this op
            returned last step, so that a GPU loop never synchronises).
        basis: (m, d) rows to reorthogonalise against (orthonormal, e.g. the Lanczos vectors so far
            for full reorthogonalisation), or None / an (0, d) tensor for none. Non-contiguous
            bases are copied.
        backend: "auto", "cpp", "cuda", "triton" or "reference" (see :func:`unlearn_kernels.backends`).

    Returns:
        ``(q_next, alpha, beta)``: q_next (d,) of the vectors' dtype, alpha and beta float64 0-dim
        tensors on their device. On breakdown (``beta <= 16 eps ||hq||``) beta is 0 and q_next zeros.
    """
    if q_prev is None and isinstance(q, torch.Tensor):  # beta_prev = 0 drops the term; q stands in
        q_prev, beta_prev = q, 0.0
    if basis is None and isinstance(hq, torch.Tensor) and hq.dim() == 1:
        basis = hq.new_empty((0, hq.shape[0]))
    _check_inputs(hq, q, q_prev, basis)
    beta_t = _beta_tensor(beta_prev, hq.device)
    name = choose(_OP, hq.device, backend)
    if name == "reference":
        if not bool(torch.isfinite(beta_t)):
            raise ValueError(f"{_OP}: beta_prev must be finite, got {float(beta_t)}")
        return lanczos_step_ref(hq, q, q_prev, beta_t, basis)
    basis = basis.contiguous()
    hq, q, q_prev = hq.contiguous(), q.contiguous(), q_prev.contiguous()
    if name == "triton":
        return _triton_ops().lanczos_step(hq, q, q_prev, beta_t, basis)
    return torch.ops.unlearn_kernels.lanczos_step(hq, q, q_prev, beta_t, basis)


if _extension.extension_loaded():
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}")(fake)
