"""One step of the Lanczos recurrence, fused: recurrence, Gram-Schmidt reorthogonalisation and norms.

Given hq = H q for the current Lanczos vector q, the previous vector q_prev with its coefficient
beta_prev, and an (m, d) matrix ``basis`` of vectors to orthogonalise against (m = 0: none)::

    alpha  = <hq, q>
    w      = hq - alpha q - beta_prev q_prev
    w      = w - basis^T (basis w)          (classical Gram-Schmidt, a second time when needed)
    beta   = ||w||
    q_next = w / beta

Alpha accumulates in float64 for float32 vectors too; alpha and beta come back as float64 0-dim
tensors on the vectors' device. When beta is at the rounding level of the step,
``beta <= 16 eps ||hq||`` with eps the vectors' machine epsilon, the Krylov space is invariant
("breakdown"): then beta is returned as exactly 0 and q_next as zeros.

Every backend checks beta_prev, alpha and beta once the step is done: NaN or Inf anywhere in hq, q,
q_prev or basis reaches alpha or beta, so the two scalars the step computes anyway cover the
vectors without another pass over them. On a GPU reading them back is one host synchronisation
per step (skipped while torch.compile traces the Triton op).

Backends: C++ CPU, CUDA and Triton kernels, and the pure-PyTorch reference
:func:`lanczos_step_ref` (float64 throughout). The kernels work near the memory floor of the
step, which is reading the basis. The C++ kernel forms w first, so the first pass needs one
product ``c1 = basis w``, and it makes one Gram-Schmidt pass where one is enough: when that pass
keeps more than half of ``||w||^2`` (the DGKS criterion with kappa = 1/sqrt(2), predicted from
``||c1||`` and checked on the result), which leaves the new vector as orthogonal to the basis as the
basis rows are to each other, up to rounding; that is the usual case in a Lanczos run with full
reorthogonalisation, where c1 is only the lost orthogonality. Then it reads the basis twice. When
hq lies almost inside the basis's span it makes the second pass (CGS2): its coefficients
``c2 = basis w`` in the same sweep as the first pass's update (while that tile of the basis is in
cache), and the second update only when ``||c2|| > eps ||w||``, i.e. when it would change w by more
than the rounding of storing it (three reads). The basis projections' tile sums are in the vectors'
dtype, float64 across tiles; squared norms are summed in float64 (float32 squares underflow for entries
below about 1e-23 and overflow above about 1e19). The CUDA and Triton kernels always take the CGS2 route (c2 in the first update's sweep,
the second update only above rounding), with float64 sums and the decision taken on the device.
"""
from __future__ import annotations

import functools
import numbers

import torch

from .. import _extension
from ..backends import choose
from ..checks import as_float, check_tensor
from ..contracts.lanczos_step import STEP_BREAKDOWN_EPS, check_args, check_values, fake
from ..contracts.lanczos_step import OP as _OP

_CPP_OPS = "unlearn_kernels"


def lanczos_step_ref(
    hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch float64 reference of :func:`lanczos_step` (same arguments, validated)."""
    h, v, vp, b = hq.double(), q.double(), q_prev.double(), basis.double()
    alpha = torch.dot(h, v)
    w = h - alpha * v - beta_prev.to(h) * vp
    for _ in range(2):
        w = w - b.T @ (b @ w)
    hq_norm = torch.linalg.vector_norm(h)
    # ||hq||^2 beyond float64: the breakdown test cannot be read; refused as an overflow (beta = Inf), as the kernels
    overflow = ~torch.isfinite(hq_norm)
    beta = torch.where(overflow, torch.inf, torch.linalg.vector_norm(w))
    breakdown = ~overflow & (beta <= STEP_BREAKDOWN_EPS * torch.finfo(hq.dtype).eps * hq_norm)
    beta = torch.where(breakdown, torch.zeros_like(beta), beta)
    q_next = torch.where(breakdown, torch.zeros_like(w), w / torch.where(breakdown, 1.0, beta))
    return q_next.to(hq.dtype), alpha, beta


def _beta_tensor(beta_prev: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(beta_prev, torch.Tensor):
        if beta_prev.numel() != 1 or beta_prev.is_complex() or beta_prev.dtype == torch.bool:
            raise ValueError(f"{_OP}: beta_prev must be a real scalar, got a {beta_prev.dtype} tensor of shape "
                             f"{tuple(beta_prev.shape)}")
        if beta_prev.is_meta and device.type != "meta":  # no value to move (torch's "Cannot copy out of meta tensor")
            raise ValueError(f"{_OP}: beta_prev is on meta but hq is on {device}")
        return beta_prev.reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(beta_prev, bool) or not isinstance(beta_prev, numbers.Real):  # numpy scalars too
        raise TypeError(f"{_OP}: beta_prev must be a float or a 0-dim tensor, got {type(beta_prev).__name__}")
    # as_float: an int past float64's range is infinite, refused by the finiteness check (not an OverflowError)
    return torch.tensor(as_float(beta_prev), dtype=torch.float64, device=device)


@functools.cache
def _triton_ops():
    from ..triton_kernels import lanczos_step  # noqa: F401  (defines the unlearn_kernels_triton op)

    return torch.ops.unlearn_kernels_triton


@torch.no_grad()  # not differentiable on any backend (the reference's graph, the kernels' None)
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
    reorthogonalisation of w against the rows of ``basis`` (one or two classical Gram-Schmidt passes,
    see the module docstring), ``beta = ||w||``, ``q_next = w / beta``.

    Args:
        hq: (d,) float32/float64, the operator applied to q.
        q: (d,) the current (unit) Lanczos vector.
        q_prev: (d,) the previous Lanczos vector, or None on the first step (then beta_prev is
            ignored).
        beta_prev: the previous step's beta, a finite float or a 0-dim tensor (e.g. the ``beta``
            this op returned last step).
        basis: (m, d) rows to reorthogonalise against (orthonormal, e.g. the Lanczos vectors so far
            for full reorthogonalisation), or None / an (0, d) tensor for none. Non-contiguous
            bases are copied.
        backend: "auto", "cpp", "cuda", "triton" or "reference" (see :func:`unlearn_kernels.backends`).

    Returns:
        ``(q_next, alpha, beta)``: q_next (d,) of the vectors' dtype, alpha and beta float64 0-dim
        tensors on their device. On breakdown (``beta <= 16 eps ||hq||``) beta is 0 and q_next zeros.
        Meta tensors (the reference backend, which "auto" picks for them) give meta results of
        these shapes and dtypes, with no check of values (they hold none). The step is not
        differentiable: the results never require grad, whatever the backend.

    Raises:
        TypeError / ValueError: a bad shape, dtype or device (the shapes of hq and q are checked
            first), a non-finite beta_prev, or NaN or Inf in hq, q, q_prev or basis (seen as a
            non-finite alpha or beta; also raised when their products overflow). The same error
            from every backend, except where float32 intermediates overflow: the compiled kernels
            form w = hq - alpha q - beta_prev q_prev in the vectors' dtype, the reference in float64,
            so with entries near float32's largest value (beta_prev 3e38 and hq 3e38, say) the
            kernels refuse a step the reference computes.

    The norms are sums of squares in float64, unscaled (the step's cost is two passes over the basis): a
    float64 ``hq`` whose entries are all below about 1.5e-154 (:data:`~unlearn_kernels.checks.SMALLEST_SQUARED`)
    has squares that underflow, so its beta loses accuracy (1.6e-6 relative at 1e-160 for d = 1,000) and
    from about 1e-165 on reads as a breakdown (beta 0) with no error.
    :class:`~unlearn_kernels.solvers.lanczos.LanczosProcess` refuses such products before they reach the
    step; a direct caller scales ``hq`` up first.
    """
    for name, t in (("hq", hq), ("q", q), ("q_prev", q_prev), ("basis", basis)):
        if t is not None or name not in ("q_prev", "basis"):
            check_tensor(f"{_OP}: {name}", t)
    if q_prev is None:  # beta_prev = 0 drops the term; q stands in
        q_prev, beta_prev = q, 0.0
    if basis is None:  # no rows; of hq's last dimension, so that a bad hq is what the checks report
        basis = hq.new_empty((0, *hq.shape[-1:]))
    beta_t = _beta_tensor(beta_prev, hq.device)
    name = choose(_OP, hq.device, backend)
    # One check per path: the compiled kernels (C++, CUDA and Triton) check their inputs themselves,
    # with the same messages as the contract's checks here.
    if name == "reference":
        check_args(hq, q, q_prev, beta_t, basis)
        q_next, alpha, beta = lanczos_step_ref(hq, q, q_prev, beta_t, basis)
        if not hq.is_meta:  # meta tensors hold no values to check: the results' shapes only
            check_values(beta_t, alpha, beta)
        return q_next, alpha, beta
    ops = _triton_ops() if name == "triton" else torch.ops.unlearn_kernels
    return ops.lanczos_step(hq, q, q_prev, beta_t, basis)


if _extension.extension_loaded():
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}")(fake)
