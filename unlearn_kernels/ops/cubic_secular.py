"""The cubic-regularised model in an eigenbasis, solved by its secular equation.

Minimises ``m(y) = c^T y + 1/2 sum_i lambda_i y_i^2 + (M/6) ||y||^3`` over y in R^k, where lambda
are the eigenvalues of a symmetric H and c = V^T g the gradient in its eigenbasis (the dense
cubic-Newton solver passes H's eigendecomposition, the Krylov solver that of the Lanczos
tridiagonal). The global minimiser satisfies (Nesterov and Polyak 2006, Cartis et al. 2011)::

    y_i = -c_i / (lambda_i + sigma),   sigma = (M/2) ||y||,   sigma >= max(0, -lambda_min).

With t = sigma - max(0, -lambda_min) the secular function phi(t) = 1/||y|| - M / (2 sigma) is
increasing and concave, so Newton from the left of its root converges monotonically; iterates
that leave the bracket are replaced by bisection. Working in t (with shifted eigenvalues
lambda_i + max(0, -lambda_min), exactly 0 at the bottom) keeps lambda_min + sigma accurate when
it is tiny. Hard case: c vanishes on the bottom eigenspace and ||y(-lambda_min)|| < -2 lambda_min / M;
then sigma = -lambda_min and a multiple tau of the bottom eigen-coordinate lifts ||y|| to
2 sigma / M.

Backends: C++ CPU (the scalar loop in double precision) and the reference
:func:`cubic_secular_solve_ref`. The problem is k scalars: inputs on a GPU are solved on the CPU
and y is returned on the inputs' device.
"""
from __future__ import annotations

import math

import torch

from .. import _extension
from ..backends import choose
from ..checks import all_finite, check_int, check_number, check_tensor, scaled_norm

_CPP_OPS = "unlearn_kernels"
_OP = "cubic_secular_solve"
_EPS = torch.finfo(torch.float64).eps
CLUSTER_RTOL_EPS = 8.0
"""Eigenvalues within this many eps of the largest |lambda| of lambda_min form the bottom eigenspace."""
HARD_CASE_RTOL_EPS = 8.0
"""Coefficients below this many eps of ``||c|| + sigma ||y||`` on the bottom eigenspace count as zero."""


class SolutionOverflow(ValueError):
    """The minimiser does not fit float64: M is too small for these eigenvalues and coefficients. Its
    own type, so that a solver can tell it from a bad input and reject the M (the adaptive loop raises M)."""


def cubic_secular_solve_ref(
    eigvals: torch.Tensor, coeffs: torch.Tensor, M: float, tol: float = 1e-12, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`cubic_secular_solve` on validated float64 CPU tensors.

    Returns ``(y, sigma, hard_case)`` as tensors: y (k,) float64, sigma 0-dim float64, hard_case
    0-dim bool (the layout of the dispatcher op)."""
    lam, c = eigvals, coeffs
    k = lam.shape[0]
    if k == 0:
        return lam.new_zeros(0), lam.new_zeros(()), torch.tensor(False)
    lam_min = float(lam.min())
    scale = float(lam.abs().max())
    shift = max(0.0, -lam_min)
    s = lam + shift  # lambda_i + sigma = s_i + t; s_i >= 0, and exactly 0 at lambda_min when it is < 0
    c_norm = scaled_norm(c)

    if lam_min < 0:
        # Hard case test at sigma = -lambda_min, on the coordinates off the bottom eigenspace.
        bottom = lam - lam_min <= CLUSTER_RTOL_EPS * _EPS * scale
        radius = 2.0 * shift / M
        c_bottom = scaled_norm(c[bottom])
        y_rest = torch.where(bottom, 0.0, -c / torch.where(bottom, 1.0, s))
        rest_norm = scaled_norm(y_rest)
        if c_bottom <= HARD_CASE_RTOL_EPS * _EPS * (c_norm + shift * radius) and rest_norm < radius:
            i = int(bottom.nonzero()[0, 0])
            ratio = rest_norm / radius  # tau = sqrt(radius^2 - rest^2), written so that radius^2 cannot overflow
            tau = radius * math.sqrt((1.0 - ratio) * (1.0 + ratio))
            y_rest[i] = -math.copysign(tau, float(c[i]))
            return y_rest, torch.tensor(shift, dtype=torch.float64), torch.tensor(True)
    elif c_norm == 0.0:
        return torch.zeros_like(c), lam.new_zeros(()), torch.tensor(False)

    def secular(t: float) -> tuple[float, float, float]:
        """phi(t), phi'(t) and the relative residual 1 - M ||y|| / (2 sigma) = phi ||y||."""
        d = s + t
        y = c / d
        y_norm = scaled_norm(y)
        if y_norm == 0.0:  # underflow (a huge M): phi = +inf as in the C++ kernel's arithmetic, bisect
            return math.inf, math.inf, 1.0
        sigma = shift + t
        if sigma == 0.0:  # sigma = M ||y|| / 2 underflows (a tiny M): phi = -inf as in the C++ kernel's arithmetic
            return -math.inf, math.inf, -math.inf
        # sum(c^2 / d^3) / ||y||^3 written with y / ||y||: ||y||^3 underflows for a huge M
        slope = float(((y / y_norm) ** 2 / d).sum()) / y_norm + M / (2.0 * sigma) / sigma
        residual = 1.0 - M * y_norm / (2.0 * sigma)
        return residual / y_norm, slope, residual

    # phi < 0 just right of t = 0, and phi(hi) >= 0 since ||y(sigma)|| <= ||c|| / (lambda_min + sigma):
    # hi = sigma_hi - shift, sigma_hi = (-lambda_min + sqrt(lambda_min^2 + 2 M ||c||)) / 2, written without
    # the difference that cancels when 2 M ||c|| << lambda_min^2, and with r = sqrt(2 M ||c||) and a hypot
    # so that no square overflows (an infinite 2 M ||c|| would give hi = 0: the Newton step for a huge M)
    lo = 0.0
    r = math.sqrt(2.0) * math.sqrt(M) * math.sqrt(c_norm)
    hi = 0.5 * r * (r / (abs(lam_min) + math.hypot(lam_min, r)))
    t = hi
    for _ in range(max_iter):
        phi, slope, residual = secular(t)
        # the bracket relative to t, not sigma: near the hard case y depends on lambda_min + sigma = t
        # (or on a tiny s_i + t), which the bracket must resolve when t << eps sigma
        if abs(residual) <= tol or hi - lo <= _EPS * t:
            break
        if phi > 0:
            hi = t
        else:
            lo = t
        t_newton = t - phi / slope
        t = t_newton if lo < t_newton < hi else 0.5 * (lo + hi)
    y = -c / (s + t)
    return y, torch.tensor(shift + t, dtype=torch.float64), torch.tensor(False)


def _check_inputs(eigvals: torch.Tensor, coeffs: torch.Tensor, M: float, tol: float, max_iter: int) -> None:
    for name, t in (("eigvals", eigvals), ("coeffs", coeffs)):
        check_tensor(f"{_OP}: {name}", t)
        if not t.is_floating_point():
            raise TypeError(f"{_OP}: {name} must be a floating point tensor, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{_OP}: {name} must be 1-D (k,), got shape {tuple(t.shape)}")
    if eigvals.shape != coeffs.shape:
        raise ValueError(f"{_OP}: eigvals shape {tuple(eigvals.shape)} must equal coeffs shape {tuple(coeffs.shape)}")
    if eigvals.device != coeffs.device:  # before the values are read (a meta tensor has none)
        raise ValueError(f"{_OP}: eigvals are on {eigvals.device} but coeffs are on {coeffs.device}")
    if eigvals.is_meta:  # sigma and hard_case are Python values: no meta result stands in for them
        raise ValueError(f"{_OP}: eigvals and coeffs are meta tensors, which hold no values to solve with")
    for name, t in (("eigvals", eigvals), ("coeffs", coeffs)):
        if not all_finite(t):
            raise ValueError(f"{_OP}: {name} contains NaN or Inf")
    check_number(f"{_OP}: M", M, 0.0, strict=True)
    check_number(f"{_OP}: tol", tol, 0.0, 1.0, strict=True, strict_high=True)
    check_int(f"{_OP}: max_iter", max_iter)


def cubic_secular_solve(
    eigvals: torch.Tensor,
    coeffs: torch.Tensor,
    M: float,
    *,
    tol: float = 1e-12,
    max_iter: int = 100,
    backend: str = "auto",
) -> tuple[torch.Tensor, float, bool]:
    """Global minimiser of ``coeffs^T y + 1/2 sum_i eigvals_i y_i^2 + (M/6) ||y||^3``.

    Args:
        eigvals: (k,) eigenvalues of the (symmetric) model Hessian, e.g. from ``torch.linalg.eigh``
            (any order; computed in float64).
        coeffs: (k,) the gradient in that eigenbasis, ``V^T g``.
        M: the cubic regularisation constant, > 0.
        tol: relative tolerance on the secular equation ``||y|| = 2 sigma / M``.
        max_iter: most Newton/bisection iterations (the last iterate is returned if reached).
        backend: "auto", "cpp" or "reference" (this op has no GPU kernel: it is k scalars).

    Returns:
        ``(y, sigma, hard_case)``: y (k,) float64 on the inputs' device, the multiplier
        ``sigma = M ||y|| / 2`` (``eigvals + sigma >= 0``), and whether the hard case was taken
        (then y has a component tau along the bottom eigen-coordinate that the gradient lacks).
        coeffs = 0 with eigvals >= 0 gives y = 0, sigma = 0. Not differentiable: y carries no
        autograd graph, whether or not the inputs require grad.

    Raises:
        SolutionOverflow: the solution's norm, 2 sigma / M, does not fit float64 (an M far too small).
    """
    _check_inputs(eigvals, coeffs, M, tol, max_iter)
    cpu = torch.device("cpu")  # k scalars: solved on the CPU wherever the inputs live
    # detached: a solve, not a differentiable op (autograd through the reference would take sigma for a
    # constant, a wrong gradient; through the C++ op, torch's "not used in the graph")
    lam, c = eigvals.detach().to(cpu, torch.float64), coeffs.detach().to(cpu, torch.float64)
    if choose(_OP, cpu, backend) == "reference":
        y, sigma, hard = cubic_secular_solve_ref(lam, c, float(M), float(tol), max_iter)
    else:
        y, sigma, hard = torch.ops.unlearn_kernels.cubic_secular_solve(lam, c, float(M), float(tol), max_iter)
    if not all_finite(y):
        raise SolutionOverflow(f"{_OP}: the solution is not finite: M = {M!r} is too small for these eigenvalues and "
                         "coefficients (the step's norm 2 sigma / M overflows)")
    return y.to(eigvals.device), float(sigma), bool(hard)


def _fake(eigvals, coeffs, M, tol, max_iter):
    return (
        torch.empty_like(coeffs, dtype=torch.float64),
        coeffs.new_empty((), dtype=torch.float64),
        coeffs.new_empty((), dtype=torch.bool),
    )


if _extension.extension_loaded():
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}")(_fake)
