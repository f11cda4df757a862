"""Newton-step baselines on the same operators as the cubic solvers (docs/methods.md, "Newton family").

Linear solvers for ``(H + damping I) x = b``, Hessian-vector products only:

* :func:`conjugate_gradient`: CG in torch (the "influence function" inverse-HVP); stops at
  negative curvature, which an indefinite ``H + damping I`` shows.
* :func:`minres`: ``scipy.sparse.linalg.minres`` (symmetric indefinite or singular systems).
* :func:`lissa`: the LiSSA recursion (Agarwal et al. 2017; Koh and Liang 2017).

Newton steps ``s = -(H + damping I)^{-1} g`` built on them:

* :func:`pinv_newton_step`: ``-pinv(H) g`` by the dense float64 eigendecomposition, a truncated
  eigendecomposition on the Lanczos space of g, or MINRES.
* :func:`damped_newton_step`: with a given damping, by the dense eigendecomposition, the dense
  symmetric-indefinite LDL^T factorisation, MINRES, CG or LiSSA (only the first three solve an
  indefinite system).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.linalg.lapack
import scipy.sparse.linalg
import torch

from ..checks import (
    all_finite,
    check_fits_in_memory,
    check_int,
    check_number,
    check_option_names,
    norm64,
    scaled_norm,
)
from .cubic import check_step_fits
from .lanczos import LanczosProcess, check_basis_fits, ritz_pairs
from .operators import NonFiniteProduct, SolverOperator, as_operator, check_vector, operator_and_vector


@dataclass
class LinearSolve:
    """An approximate solution x of ``(H + damping I) x = b``.

    Attributes:
        solution: x, of b's dtype and device.
        residual: ``||(H + damping I) x - b||`` (computed with one extra product).
        num_hvps: products used.
        iterations: CG/MINRES iterations, or LiSSA recursion steps taken over all repeats (fewer than
            ``depth * repeats`` where the recursion diverged).
        converged: the tolerance was met (LiSSA: the recursion stayed finite and left a residual of
            at most ``||b||``, see :func:`lissa`).
        info: solver-specific details (e.g. ``negative_curvature`` for CG).
    """

    solution: torch.Tensor
    residual: float
    num_hvps: int
    iterations: int
    converged: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class NewtonStep:
    """A Newton-type step ``s ~ -(H + damping I)^{-1} g`` (pinv: ``-pinv(H) g``).

    Attributes:
        step: s, of g's dtype and device.
        residual: ``||(H + damping I) s + g||`` (for pinv on a singular H the part of g outside
            range(H) remains).
        num_hvps, iterations, converged, info: as in :class:`LinearSolve`.
        method: "pinv-eigh", "pinv-lanczos", "pinv-minres", "damped-eigh", "damped-ldl", "damped-cg",
            "damped-minres" or "damped-lissa".
    """

    step: torch.Tensor
    residual: float
    num_hvps: int
    iterations: int
    converged: bool
    method: str
    info: dict[str, Any] = field(default_factory=dict)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double())


#: MINRES's default relative tolerance
MINRES_TOL = 1e-10
#: CG's true residual counts as converged up to this many epsilons of the working dtype times
#: ``||(H + damping I) x|| + ||b||``: the rounding of the residual itself
CG_ROUNDING_EPS = 100.0


def _true_residual(op: SolverOperator, x: torch.Tensor, b: torch.Tensor, damping: float) -> float:
    return norm64(op.matvec(x) + damping * x - b)


def _solved(sol: LinearSolve, b: torch.Tensor, tol: float) -> bool:
    """Whether a MINRES result (one run, :func:`_minres`) solves its system: scipy's success (or the true
    residual at ``tol``) and a true residual <= sqrt(tol) ||b||. scipy also reports success on an inconsistent
    system, where its iterate has grown so far along the null space that ``tol ||A|| ||x||`` exceeds the
    residual left outside the range."""
    return (sol.converged or sol.info["scipy_info"] == 0) and sol.residual <= math.sqrt(tol) * norm64(b)


def _check_fits(step: torch.Tensor, coords: torch.Tensor, g_coords: torch.Tensor, num_hvps: int, what: str,
                remedy: str, noun: str = "step") -> torch.Tensor:
    """``step`` (the float64 solution cast to g's dtype) if every entry is finite, else :class:`StepOverflow`, as
    the cubic solvers raise for a step beyond the dtype: the dense solves ran in float64 and their cast returned
    +-Inf reported converged with a residual of NaN (float32, H = diag(1e-10, 1), g = (1e30, 1): a step of
    norm 1e40). ``coords``: the float64 step's coordinates in an orthonormal basis (or the step itself), and
    ``g_coords`` g's there; the error carries the step's norm and the quadratic model's value at it,
    ``g^T s + s^T (H + damping I) s / 2 = g^T s / 2`` (s solves the system; for pinv on range(H); for
    :func:`minres`'s solution x of ``(H + damping I) x = b``, at the step ``s = -x`` with g = b)."""
    return check_step_fits(step, lambda: (scaled_norm(coords), 0.5 * float(g_coords.double() @ coords.double())),
                           num_hvps, what, remedy, noun)


_DAMPED_REMEDY = "H + damping I is too close to singular for g (add damping, or solve in float64)"
_PINV_REMEDY = "an eigenvalue that rcond keeps is too small for g (raise rcond, or solve in float64)"


# --------------------------------------------------------------------------- linear solvers
def conjugate_gradient(H: Any, b: torch.Tensor, *, damping: float = 0.0, tol: float = 1e-10,
                       maxiter: int | None = None, x0: torch.Tensor | None = None) -> LinearSolve:
    """Conjugate gradients for ``(H + damping I) x = b`` (the CG inverse-HVP of influence functions).

    Args:
        H: dense symmetric matrix or operator; ``H + damping I`` should be positive definite.
        b: (d,) right-hand side.
        damping: lambda >= 0.
        tol: stop when the recursive residual is ``<= tol ||b||``; ``converged`` asks it of the true
            residual (one more product), which the recursion can drift from, up to what rounding in the
            working dtype leaves of it (``100 eps (||(H + damping I) x|| + ||b||)``: float32 cannot
            show a residual of 1e-8 ||b||).
        maxiter: most iterations (default d).
        x0: start (default 0; a non-zero start costs one product).

    Returns:
        A :class:`LinearSolve`; ``info["negative_curvature"]`` is True if a direction p with
        ``p^T (H + damping I) p <= 0`` stopped the iteration (then ``converged`` is False).
    """
    op, b = operator_and_vector(H, b, "b")
    damping = check_number("damping", damping, 0.0)
    tol = check_number("tol", tol, 0.0)
    maxiter = op.shape[0] if maxiter is None else check_int("maxiter", maxiter, 1)
    if x0 is None:
        x = torch.zeros_like(b)
    else:
        x = check_vector(x0, "x0").clone()
        if x.shape != b.shape or x.device != b.device:
            raise ValueError(f"x0 must be a ({b.shape[0]},) vector on {b.device} like b, got shape {tuple(x.shape)} "
                             f"on {x.device}")
        if x.dtype != b.dtype:
            raise TypeError(f"x0 must have b's dtype {b.dtype}, got {x.dtype}")
    with op.fixed_weights():  # the iteration's products, at one H
        r = b.clone() if x0 is None else b - op.matvec(x) - damping * x
        p = r.clone()
        rs = _dot(r, r)
        target = tol * norm64(b)
        negative = False
        it = 0
        while math.sqrt(rs) > target and it < maxiter:
            Ap = op.matvec(p) + damping * p
            curvature = _dot(p, Ap)
            if curvature <= 0:
                negative = True
                break
            a = rs / curvature
            x = x + a * p
            r = r - a * Ap
            rs_new = _dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
            it += 1
        # the true residual (one more product): the recursive one drifts from it on an ill-conditioned system
        if it == 0:  # no step: r is exact
            residual, attainable = math.sqrt(rs), 0.0
        else:
            applied = op.matvec(x) + damping * x
            residual = norm64(applied - b)
            # what rounding in forming it leaves (float32: about 1e-5 ||b||, where tol 1e-8 asked for less)
            attainable = CG_ROUNDING_EPS * torch.finfo(b.dtype).eps * (norm64(applied) + norm64(b))
    converged = not negative and residual <= max(target, attainable)
    return LinearSolve(x, residual, op.num_hvps, it, converged, {"negative_curvature": negative})


#: :func:`minres` runs scipy at most this many times (from 0, with a tighter ``rtol``) where it stopped before
#: the true residual met the tolerance, keeping a run only where it at least halves the residual
MINRES_RUNS = 4


def minres(H: Any, b: torch.Tensor, *, damping: float = 0.0, tol: float = MINRES_TOL,
           maxiter: int | None = None) -> LinearSolve:
    """MINRES (``scipy.sparse.linalg.minres``, float64) for ``(H + damping I) x = b``.

    Works for symmetric indefinite and singular systems; for a consistent singular system started
    at 0 it returns the minimum-norm solution. An inconsistent one (b not in the range) has no
    solution, and in floating point the iterate may grow without bound along the null space.

    scipy runs on the normalised system ``(H + damping I) / a`` and ``b / ||b||``, ``a = ||(H + damping I) b||
    / ||b||`` (an estimate of ``||H + damping I||`` from the product MINRES takes first, so no extra one), and
    the solution is scaled back. scipy's stopping test is not invariant to those scales (its estimate of
    ``||A||`` includes ``||b||``): it stopped after 1 iteration at a relative residual of 0.124 for
    ``||b|| = 2.2e10`` on a 2x2 system, and at 1.07e-4 on eigenvalues in [1e-6, 1e-3], both reported
    converged at tol 1e-10. scipy's own test (``||r|| <= rtol ||A|| ||x||``) can stop short of ``tol`` on the
    true residual (``||A|| ||x||`` up to cond(A) ``||b||``): it is then run again from 0 with ``rtol`` lowered by
    the factor missed (at most :data:`MINRES_RUNS` runs, while iterations are left; from 0, not from its
    iterate, so that a consistent singular system keeps its minimum-norm solution), a run kept only where it
    halves the residual (an inconsistent system's residual stays: its first run is kept).

    Args:
        H, b, damping: the system (damping may be any finite number here).
        tol: relative tolerance: ``converged`` asks ``||(H + damping I) x - b|| <= tol ||b||`` of the true
            residual, or what rounding in the operator's dtype leaves of it (``100 eps (||(H + damping I) x|| +
            ||b||)``, as :func:`conjugate_gradient`); also scipy's ``rtol``.
        maxiter: most iterations, over all runs (default 5 d, scipy's).

    Returns:
        A :class:`LinearSolve`; ``residual`` is the true one (one product per run), and ``converged``
        says the tolerance was met by it (an inconsistent system, where scipy reports success, is not
        solved: H = 0 gives x = 0 and residual ``||b||``). ``info["scipy_info"]`` is scipy's flag of the run
        whose x is returned (0: its own test passed, else the iterations ran out), ``info["runs"]`` the runs made.

    Raises:
        StepOverflow: (a ValueError) the solution does not fit b's dtype (a float32 solution beyond 3.4e38).
    """
    op, b = operator_and_vector(H, b, "b")
    damping = check_number("damping", damping)
    tol = check_number("tol", tol, 0.0)
    if maxiter is not None:
        check_int("maxiter", maxiter, 1)
    return _minres(op, b, damping, tol, maxiter, MINRES_RUNS)


def _step_minres(H: SolverOperator, b: torch.Tensor, *, damping: float = 0.0, tol: float = MINRES_TOL,
                 maxiter: int | None = None) -> LinearSolve:
    """:func:`minres` as the Newton steps run it: one run of scipy (see :func:`_minres`)."""
    tol = check_number("tol", tol, 0.0)
    if maxiter is not None:
        check_int("maxiter", maxiter, 1)
    return _minres(H, b, damping, tol, maxiter, 1)


def _minres(op: SolverOperator, b: torch.Tensor, damping: float, tol: float, maxiter: int | None,
            max_runs: int) -> LinearSolve:
    """:func:`minres` on checked arguments, with at most ``max_runs`` runs of scipy (the Newton steps make one: they
    accept scipy's success with a true residual of at most ``sqrt(tol) ||g||``, see :func:`_solved`)."""
    budget = 5 * op.shape[0] if maxiter is None else maxiter
    bnorm = norm64(b)
    if bnorm == 0.0:  # x = 0 is exact
        return LinearSolve(torch.zeros_like(b), 0.0, 0, 0, True, {"scipy_info": 0, "runs": 0})
    iterations = 0

    def count(_: np.ndarray) -> None:
        nonlocal iterations
        iterations += 1

    with op.fixed_weights():  # the iteration's products, at one H
        products = op.to_scipy()
        b64 = b.double().cpu().numpy()
        unit = b64 / bnorm
        first = products.matvec(unit)  # H b / ||b||: the estimate of ||H + damping I||, and MINRES's first product
        scale = scaled_norm(first + damping * unit)
        scale = scale if 0.0 < scale < math.inf else 1.0
        cached: list[np.ndarray] = []

        def scaled(v: np.ndarray) -> np.ndarray:
            v = np.ravel(v)
            if cached:  # a run's first product is of b / ||b|| (to rounding): the estimate's product serves it
                u, Hu = cached
                cached.clear()
                along = float(u @ v)
                if np.linalg.norm(v - along * u) <= 8 * np.finfo(np.float64).eps * abs(along):
                    return along * Hu / scale
            return products.matvec(v) / scale

        A = scipy.sparse.linalg.LinearOperator(op.shape, matvec=scaled, rmatvec=scaled, dtype=np.float64)
        eps = torch.finfo(b.dtype).eps
        target = tol * bnorm
        x, residual, attainable, info, runs, rtol = torch.zeros_like(b), bnorm, 0.0, 0, 0, tol
        while runs < max_runs and iterations < budget:
            cached[:] = [unit, first]
            xs, run_info = scipy.sparse.linalg.minres(A, unit, shift=-damping / scale, rtol=rtol,
                                                      maxiter=budget - iterations, callback=count)
            runs += 1
            with np.errstate(over="ignore"):  # a solution beyond float64: StepOverflow below
                step64 = -torch.from_numpy(xs * bnorm / scale)  # the Newton step -x, for an overflow's message
            trial = _check_fits((-step64).to(device=b.device, dtype=b.dtype), step64, b.double().cpu(), op.num_hvps,
                                "minres", "H + damping I is too close to singular for b, or b is not in its range "
                                "(add damping, or solve in float64)", noun="solution")
            applied = op.matvec(trial) + damping * trial
            trial_residual = norm64(applied - b)
            if runs > 1 and not trial_residual <= 0.5 * residual:  # no progress (an inconsistent system): keep x
                break
            x, residual, info = trial, trial_residual, run_info
            # what rounding in forming it leaves (float32: about 1e-5 ||b||, where tol 1e-10 asked for less)
            attainable = CG_ROUNDING_EPS * eps * (norm64(applied) + bnorm)
            wanted = max(target, attainable)
            if residual <= wanted or info != 0:
                break
            rtol *= 0.5 * wanted / residual  # scipy's test missed the true residual by residual / wanted
    converged = residual <= max(target, attainable)
    return LinearSolve(x, residual, op.num_hvps, iterations, converged, {"scipy_info": int(info), "runs": runs})


#: :func:`lissa` counts a residual up to ``(1 + this) ||b||`` as converged (float32 products' rounding)
LISSA_RESIDUAL_SLACK = 1e-3


def lissa(H: Any, b: torch.Tensor, *, scale: float, damping: float = 0.0, depth: int = 100,
          repeats: int = 1, sample: Callable[[], Any] | None = None) -> LinearSolve:
    """LiSSA estimate of ``(H + damping I)^{-1} b``.

    Each repeat runs ``h_0 = b``, ``h_j = b + h_{j-1} - (H + damping I) h_{j-1} / scale``, which
    tends to ``scale (H + damping I)^{-1} b`` when ``0 < H + damping I < 2 scale``; the estimate is
    the mean of ``h_depth / scale`` over the repeats. (Koh and Liang write the damping relative to
    the scale: their ``damping`` is ``damping / scale`` here.)

    Args:
        H, b: the system; ``H`` is used for the final residual and, without ``sample``, for every step.
        scale: > 0, at least half the largest eigenvalue of ``H + damping I``.
        damping: lambda >= 0.
        depth: recursion steps per repeat.
        repeats: independent runs averaged (only useful with ``sample``).
        sample: optional function returning a fresh mini-batch operator (e.g. a CurvatureOperator
            on a random batch) for each recursion step: the stochastic LiSSA.

    Returns:
        A :class:`LinearSolve`. ``converged``: every iterate stayed finite and the residual is at most
        ``(1 + 1e-3) ||b||``: with every eigenvalue of ``H + damping I`` in ``[0, 2 scale]`` the
        truncated recursion leaves ``(I - (H + damping I) / scale)^(depth + 1) b``, of norm at most
        ``||b||``, so a larger residual means a component grew (negative curvature below -damping,
        or scale too small) even where the iterates stayed finite (1e-3 absorbs float32 rounding).
        Where the recursion diverged to NaN or Inf, ``solution`` is the mean over the repeats before it
        (0 where the first diverged) and ``residual`` that solution's (``||b||`` for 0), not converged.

    Raises:
        NonFiniteProduct: the operator's product of a vector of entries at most 1 is not finite (a non-finite Hessian,
            told apart from a recursion that overflowed by one more product on the iterate's direction).
    """
    op, b = operator_and_vector(H, b, "b")
    scale = check_number("scale", scale, 0.0, strict=True)
    damping = check_number("damping", damping, 0.0)
    check_int("depth", depth, 1)
    check_int("repeats", repeats, 1)
    if sample is not None and not callable(sample):
        raise TypeError(f"sample must be a callable returning an operator, got {type(sample).__name__}")
    with op.fixed_weights():  # H's products, at one H (a sampled step's operator checks its own)
        total = torch.zeros_like(b)
        sampled_hvps = steps = 0
        finite = True
        for _ in range(repeats):
            h = b.clone()
            for _ in range(depth):
                # the recursion diverged to Inf/NaN (scale too small): an operator that checks its input (a
                # CurvatureOperator) would refuse h with an error that does not say so
                if not all_finite(h):
                    finite = False
                    break
                step_op = op if sample is None else as_operator(sample(), b.shape[0], dtype=b.dtype, device=b.device,
                                                                        name="b")
                try:
                    Hh = step_op.matvec(h)
                except NonFiniteProduct as error:  # diverged within the product, or a non-finite operator: the
                    # operator's one more product, on h's direction, told them apart (both products count)
                    sampled_hvps += 0 if sample is None else step_op.num_hvps
                    if error.operator_fault:
                        raise NonFiniteProduct("the operator returned NaN or Inf for a vector of entries at most 1: "
                                               "the Hessian (or its product) is not finite, which no scale or damping "
                                               "of LiSSA can fix") from None
                    finite = False
                    break
                sampled_hvps += 0 if sample is None else step_op.num_hvps
                h = b + h - (Hh + damping * h) / scale
                steps += 1
            if not finite:
                break
            total += h / scale
        x = total / repeats
        finite = finite and all_finite(x)  # the last step may overflow after a finite product
        # the returned x's residual: a diverged recursion returns the repeats before it (x = 0 for the first,
        # whose residual is ||b||: it was reported as Inf)
        if not all_finite(x):
            residual = math.inf
        elif not bool(x.any()):
            residual = norm64(b)  # exact, without a product
        else:
            try:
                residual = _true_residual(op, x, b, damping)
            except NonFiniteProduct as error:  # finite, but its product overflows the dtype
                if error.operator_fault:
                    raise
                residual = math.inf
    converged = finite and residual <= (1.0 + LISSA_RESIDUAL_SLACK) * norm64(b)
    return LinearSolve(x, residual, op.num_hvps + sampled_hvps, steps, converged)


# --------------------------------------------------------------------------- Newton steps
#: "auto" solvers form the dense Hessian (d products, O(d^2) float64 memory, an O(d^3)
#: eigendecomposition: about 8 s at d = 4000 on one CPU thread) up to this many parameters
DENSE_MAX_DIM = 4096

#: "auto" damped solves beyond :data:`DENSE_MAX_DIM` fall back from MINRES to factoring the dense matrix
#: (LDL^T) while its float64 copy fits in 1 GiB (the solve holds about three such copies at its peak; the
#: factorisation takes 15 s at d = 9,610 on one CPU thread, where the eigendecomposition takes 6 minutes);
#: beyond it they run MINRES alone
DENSE_SOLVE_MAX_DIM = math.isqrt(2**30 // 8)

#: the float64 (d, d) matrices alive at the peak of each dense solve (measured at d = 2,500: 4.13 and 3.18)
_DENSE_COPIES = {"eigh": 4.25, "ldl": 3.25}


def _check_dense_fits(d: int, solver: str, device: torch.device | str) -> None:
    """ValueError, before any product, where ``solver``'s dense float64 matrices for d parameters do not fit
    in the memory available where it runs: the eigendecomposition on ``device``, LDL^T on the CPU."""
    check_fits_in_memory(f"solver {solver!r} (dense float64 matrices of d = {d:,})",
                         int(_DENSE_COPIES[solver] * d * d * 8), device if solver == "eigh" else "cpu",
                         "use an iterative solver ('minres', or 'lanczos' for the pseudo-inverse) or fewer parameters")


def _dense_fits(d: int, solver: str, device: torch.device | str) -> bool:
    """Whether :func:`_check_dense_fits` passes."""
    try:
        _check_dense_fits(d, solver, device)
    except ValueError:
        return False
    return True


def _dense64(op: SolverOperator) -> torch.Tensor:
    """The symmetrised dense matrix in float64 (a new tensor; d products for an operator)."""
    H64 = op.to_dense().double()
    return (H64 + H64.T).mul_(0.5)


def _eigh(op: SolverOperator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetrised dense matrix, and the matrix, in float64."""
    _check_dense_fits(op.shape[0], "eigh", op.device)
    H64 = _dense64(op)
    lam, U = torch.linalg.eigh(H64)
    return lam, U, H64


def _dense_residual(H64: torch.Tensor, step: torch.Tensor, g: torch.Tensor, damping: float) -> float:
    """``||(H + damping I) s + g||`` in float64 from the dense matrix: the returned step's (in g's dtype) against
    H itself, where the eigenbasis gives it against U diag(lam) U^T, off by the decomposition's backward error
    times ||s|| (20.1 reported for a true 5.6 with rcond = 0 and ||s|| = 1e16)."""
    s64 = step.double()
    return float(torch.linalg.vector_norm(H64 @ s64 + damping * s64 + g.double()))


def _negative_eigenvalues(LD: torch.Tensor, pivots: torch.Tensor) -> int:
    """How many eigenvalues of the factored matrix are negative (its inertia, by Sylvester's law: those
    of D). A 2x2 block of the Bunch-Kaufman D (negative pivots, LAPACK's convention) has a negative
    determinant, so one negative eigenvalue."""
    d, pivots = LD.diagonal().tolist(), pivots.tolist()
    negative, k = 0, 0
    while k < len(d):
        if pivots[k] < 0:
            negative, k = negative + 1, k + 2
        else:
            negative, k = negative + int(d[k] < 0), k + 1
    return negative


PINV_CLOSED_RTOL = 1e-6
"""pinv's Lanczos step counts as exact after a breakdown only where the coupling dropped there is at most this
times the smallest kept |Ritz value| (the step's first-order relative error; float64 rounding breakdowns stay
below 3e-8 at the default rcond)."""


def _spectral_step(lam: torch.Tensor, c: torch.Tensor, shift: float, rcond: float) -> tuple[torch.Tensor, int]:
    """Coefficients y = -c / (lam + shift) in an eigenbasis, 0 where ``|lam + shift| <= rcond max |lam + shift|``
    (the pseudo-inverse there); and the number kept (the rank)."""
    mu = lam + shift
    keep = mu.abs() > rcond * mu.abs().max()
    return torch.where(keep, -c / torch.where(keep, mu, 1.0), 0.0), int(keep.sum())


def pinv_newton_step(H: Any, g: torch.Tensor, *, rcond: float | None = None, solver: str = "auto", rank: int = 300,
                     tol: float = 1e-10, maxiter: int | None = None) -> NewtonStep:
    """The pseudo-inverse Newton step ``s = -pinv(H) g``.

    Args:
        H: dense symmetric matrix or operator.
        g: (d,) gradient.
        rcond: "eigh" and "lanczos": eigenvalues with ``|lambda| <= rcond max|lambda|`` count as 0; in
            [0, 1) (1 or more would count every eigenvalue as 0, a zero step); None: 1e-6. MINRES has
            no such cut-off: an rcond given with solver="minres" is a ValueError.
        solver: "eigh" (float64 eigendecomposition of the dense H, an operator made dense by d
            products: the exact pseudo-inverse), "lanczos" (the truncated pseudo-inverse: ``rank``
            Lanczos steps from g with full reorthogonalisation give ``H ~ Q T Q^T`` on the Krylov
            space of g, and the step is ``-Q pinv(T) Q^T g`` by the eigendecomposition of T, where
            g lives wholly; ``info["rank"]`` counts the Ritz values kept; ``converged`` only where
            that space closed (a coupling of exactly 0, or one dropped at the rounding level,
            ``info["dropped_coupling"]``, at most :data:`PINV_CLOSED_RTOL` times the smallest kept
            |Ritz value|; None where the run did not close, so dropped nothing: it stopped at ``rank``
            steps) or is the whole space, when the step is exact: a truncated step can be
            far from the pseudo-inverse one, longer too, since on an indefinite H the Ritz values
            between its negative and positive eigenvalues can lie near 0 where no eigenvalue does:
            eigenvalues in [-5, -1] and [1, 5] at d = 400 and rank 21 gave a step 48 times as long
            as -H^{-1} g, with a residual of 46 ||g||), "minres" (:func:`minres`:
            the minimum-norm solution, so the pseudo-inverse step, only when g lies in the range of H;
            otherwise its iterate grows along the null space of H and ``converged`` is False: use
            "eigh" or "lanczos"), or "auto" ("eigh" for a dense matrix or d <= :data:`DENSE_MAX_DIM`
            where its float64 matrices fit in the memory available, else "lanczos").
        rank: "lanczos": most Lanczos steps (products), the largest possible rank.
        tol, maxiter: MINRES settings.

    Every option is checked whichever solver runs (ValueError naming it). A step that does not fit g's dtype
    (a float32 step beyond 3.4e38) raises :class:`StepOverflow` (a ValueError) with its float64 norm.

    Returns:
        A :class:`NewtonStep`; ``info["rank"]`` for "eigh" and "lanczos" (and ``info["lanczos_steps"]`` and
        ``info["dropped_coupling"]``: 0.0 where the space closed exactly, the coupling dropped where it closed at
        the rounding level, None where it did not close).
    """
    op, g = operator_and_vector(H, g)
    given_rcond = rcond is not None
    rcond = check_number("rcond", 1e-6 if rcond is None else rcond, 0.0, 1.0, strict_high=True)
    # every option checked whichever solver runs (a bad value is an error, not ignored)
    rank = check_int("rank", rank, 1)
    check_number("tol", tol, 0.0)
    if maxiter is not None:
        check_int("maxiter", maxiter, 1)
    if solver not in ("auto", "eigh", "lanczos", "minres"):
        raise ValueError(f"solver must be 'auto', 'eigh', 'lanczos' or 'minres', got {solver!r}")
    if solver == "auto":
        solver = "eigh" if op.dense is not None else pinv_solver(op.shape[0], op.device)
    if solver == "minres":
        if given_rcond:
            raise ValueError("rcond applies to solver 'eigh' and 'lanczos' only: MINRES's minimum-norm solution "
                             "has no eigenvalue cut-off (leave rcond None, or use solver='eigh' or 'lanczos')")
        sol = _minres(op, g, 0.0, tol, maxiter, 1)
        # converged only where MINRES solved H s = -g: on an inconsistent system its step is not -pinv(H) g
        return NewtonStep(-sol.solution, sol.residual, sol.num_hvps, sol.iterations, _solved(sol, g, tol),
                          "pinv-minres", sol.info)
    if solver == "eigh":
        lam, U, H64 = _eigh(op)
        c = U.T @ g.double()
        y, kept = _spectral_step(lam, c, 0.0, rcond)
        s = _check_fits((U @ y).to(g.dtype), y, c, op.num_hvps, "pinv_newton_step (solver 'eigh')", _PINV_REMEDY)
        return NewtonStep(s, _dense_residual(H64, s, g, 0.0), op.num_hvps, 0, True, "pinv-eigh", {"rank": kept})
    gnorm = norm64(g)
    if gnorm == 0.0:
        return NewtonStep(torch.zeros_like(g), 0.0, 0, 0, True, "pinv-lanczos",
                          {"rank": 0, "lanczos_steps": 0, "dropped_coupling": None})
    # the truncated pseudo-inverse usually takes every one of its rank steps (the basis is then all written)
    if op.device.type == "cpu":  # elsewhere the process checks its whole reservation
        check_basis_fits(min(rank, op.shape[0]), op.shape[0], op.dtype, op.device)
    # the run stops at the first breakdown: the random vector a restart draws is never used
    proc = LanczosProcess(op, g, reorth="full", store_basis=True, capacity=rank, generator=torch.Generator())
    while not proc.exhausted:
        proc.step()
        if proc.betas[-1] == 0.0:
            # the Krylov space of g is invariant: the step on it is exact, and the blocks a restart would
            # add (random vectors g does not touch) only cost products and inflated the rank
            break
    theta, S = ritz_pairs(proc.alphas, proc.betas)
    theta, S = torch.from_numpy(theta), torch.from_numpy(S)
    c = gnorm * S[0, :]
    y, kept = _spectral_step(theta, c, 0.0, rcond)
    s = _check_fits(proc.combine((S @ y).numpy()), y, c, op.num_hvps, "pinv_newton_step (solver 'lanczos')",
                    _PINV_REMEDY)
    residual = norm64(op.matvec(s) + g)
    # exact only where the Krylov space of g is invariant (it closed, or it is the whole space); a truncated
    # step is not the pseudo-inverse step (it can be many times shorter), so it is not reported converged.
    # A space closed by dropping a rounding-level coupling beta is invariant only to first order in
    # beta / (the smallest kept |Ritz value|), which in float32 reached 10 (the step 70% off)
    smallest_kept = float(theta.abs()[theta.abs() > rcond * theta.abs().max()].min()) if kept else 0.0
    # the loop ends at the first breakdown (its coupling then set to 0); without one nothing was dropped
    dropped = proc.dropped if proc.betas[-1] == 0.0 else None
    closed = dropped is not None and dropped <= PINV_CLOSED_RTOL * smallest_kept
    exact = closed or proc.n >= op.shape[0]
    return NewtonStep(s, residual, op.num_hvps, proc.n, exact, "pinv-lanczos",
                      {"rank": kept, "lanczos_steps": proc.n, "dropped_coupling": dropped})


def pinv_solver(d: int, device: torch.device | str = "cpu") -> str:
    """The solver ``pinv_newton_step(..., solver="auto")`` picks for an operator of d parameters on
    ``device``: "eigh" up to :data:`DENSE_MAX_DIM` where its float64 matrices (about four d x d) fit in
    the memory available there, else "lanczos"; ValueError unless d is an int >= 1."""
    d = check_int("d", d, 1)
    return "eigh" if d <= DENSE_MAX_DIM and _dense_fits(d, "eigh", device) else "lanczos"


def damped_solver(d: int, device: torch.device | str = "cpu") -> str:
    """The solver ``damped_newton_step(..., solver="auto")`` picks for an operator of d parameters on
    ``device``: "eigh" up to :data:`DENSE_MAX_DIM`, "minres-ldl" up to :data:`DENSE_SOLVE_MAX_DIM`, else
    "minres", each dense one only where its float64 matrices fit in the memory available where it runs
    (about four d x d for "eigh", on ``device``; three for the fallback of "minres-ldl", on the CPU);
    ValueError unless d is an int >= 1."""
    d = check_int("d", d, 1)
    if d <= DENSE_MAX_DIM and _dense_fits(d, "eigh", device):
        return "eigh"
    if d <= DENSE_SOLVE_MAX_DIM and _dense_fits(d, "ldl", device):
        return "minres-ldl"
    return "minres"


def _ldl_step(op: SolverOperator, g: torch.Tensor, damping: float) -> NewtonStep:
    """``-(H + damping I)^{-1} g`` by the LDL^T factorisation of the dense float64 matrix, on the CPU
    (LAPACK's Bunch-Kaufman; torch's CUDA path for it is not tested here)."""
    _check_dense_fits(op.shape[0], "ldl", op.device)
    A = _dense64(op).cpu()
    A.diagonal().add_(damping)
    LD, pivots, info = torch.linalg.ldl_factor_ex(A)
    c = g.double().cpu().unsqueeze(1)
    x = torch.linalg.ldl_solve(LD, pivots, -c).squeeze(1)
    # An exactly singular matrix rarely gives an exactly zero pivot, but its rounding-level pivot gives a
    # reciprocal condition number below eps (LAPACK's test for "singular to working precision").
    rcond = 0.0 if int(info) != 0 else scipy.linalg.lapack.dsycon(
        LD.numpy(), pivots.numpy().astype(np.int32), float(A.abs().sum(0).max()), lower=1)[0]
    if rcond < torch.finfo(torch.float64).eps or not bool(torch.isfinite(x).all()):
        raise ValueError(f"H + damping I is singular to working precision (damping {damping:g}: reciprocal "
                         f"condition number {rcond:.1e}, or an overflowing solution); use solver='eigh' (the "
                         "pseudo-inverse) or a larger damping")
    x = _check_fits(x.to(g.dtype), x, c.squeeze(1), op.num_hvps, "damped_newton_step (solver 'ldl')",
                    _DAMPED_REMEDY)
    residual = norm64(A @ x.double() + c.squeeze(1))  # at the step returned, rounded to g's dtype
    return NewtonStep(x.to(g.device), residual, op.num_hvps, 0, True, "damped-ldl",
                      {"negative_eigenvalues": _negative_eigenvalues(LD, pivots)})


def damped_newton_step(H: Any, g: torch.Tensor, damping: float, *, solver: str = "auto",
                       **options: Any) -> NewtonStep:
    """The damped Newton step ``s = -(H + damping I)^{-1} g`` with a given damping.

    ``H + damping I`` may be indefinite (a network's Hessian is): "eigh", "ldl", "minres" and
    "minres-ldl" solve the system as it is; "cg" stops at the first direction of negative curvature
    and returns its iterate there (not the solution; ``info["negative_curvature"]``), "lissa" diverges.

    Args:
        H: dense symmetric matrix or operator.
        g: (d,) gradient.
        damping: lambda >= 0 (hand-tuned in the papers CureNewton compares with).
        solver: "eigh" (float64 eigendecomposition of the dense H, an operator made dense by d
            products; where ``H + damping I`` is singular, its pseudo-inverse with ``rcond``;
            ``info["lambda_min"]``), "ldl" (the dense float64 matrix factored as L D L^T with
            Bunch-Kaufman pivoting, a small fraction of the eigendecomposition's time: exact where
            ``H + damping I`` is not singular, an error where it is; ``info["negative_eigenvalues"]``
            counts those of ``H + damping I``), "minres" (:func:`minres`, default ``tol`` 1e-10;
            ``converged`` also needs a true residual <= ``sqrt(tol) ||g||``, which an inconsistent
            singular system does not give),
            "minres-ldl" (MINRES with at most ``maxiter`` iterations, default d // 4, then "ldl" if it
            has not solved the system, i.e. not converged to a true residual <= ``sqrt(tol) ||g||``
            (scipy reports success on an inconsistent singular system too): a well-conditioned system
            takes tens to hundreds of products, a nearly singular one more than building the dense
            matrix costs, so a failed attempt adds at most a quarter to the d products of the dense
            matrix; ``info["minres_iterations"]`` on the fallback), "cg" (:func:`conjugate_gradient`),
            "lissa" (:func:`lissa`), or "auto" ("eigh" for a dense matrix, else :func:`damped_solver`).
        **options: passed to the solver ("eigh": ``rcond`` in [0, 1), default 1e-12; "minres", "minres-ldl" and
            "cg": tol/maxiter; "lissa": scale/depth/repeats/sample).

    Raises:
        ValueError: "ldl" (or "minres-ldl" falling back to it) on a singular ``H + damping I``.
        StepOverflow: (a ValueError) "eigh", "ldl", "minres" and "minres-ldl": the step does not fit g's dtype
            (a float32 step beyond 3.4e38), with its float64 norm and quadratic model value ``g^T s / 2``.
    """
    op, g = operator_and_vector(H, g)
    damping = check_number("damping", damping, 0.0)
    if solver == "auto":
        solver = "eigh" if op.dense is not None else damped_solver(op.shape[0], op.device)
    solvers = {"cg": conjugate_gradient, "minres": _step_minres, "minres-ldl": _step_minres, "lissa": lissa,
               "eigh": ("rcond",), "ldl": ()}
    if solver not in solvers:
        raise ValueError("solver must be 'auto', 'eigh', 'ldl', 'minres', 'minres-ldl', 'cg' or 'lissa', "
                         f"got {solver!r}")
    check_option_names(f"solver {solver!r}", options, solvers[solver], {"H", "b", "damping"})
    if callable(solvers[solver]):  # a required option left out (lissa's scale) met Python's "lissa() missing 1
        # required keyword-only argument: 'scale'", naming a function the caller did not call
        missing = [p.name for p in inspect.signature(solvers[solver]).parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
                   and p.name not in options]
        if missing:
            raise TypeError(f"damped_newton_step: solver {solver!r} needs the option(s) {missing} (passed as "
                            f"keywords, e.g. damped_newton_step(H, g, damping, solver={solver!r}, {missing[0]}=...)"
                            + ("; scale > 0, at least half the largest eigenvalue of H + damping I" if
                               missing == ["scale"] else "") + ")")
    if solver == "ldl":
        return _ldl_step(op, g, damping)
    if solver == "minres-ldl":  # its fallback's memory is checked where it runs (_ldl_step)
        budget = options.get("maxiter")
        attempt = _step_minres(op, g, damping=damping,
                         **{**options, "maxiter": max(1, op.shape[0] // 4) if budget is None else budget})
        if _solved(attempt, g, options.get("tol", MINRES_TOL)):
            return NewtonStep(-attempt.solution, attempt.residual, attempt.num_hvps, attempt.iterations, True,
                              "damped-minres", attempt.info)
        dense = _ldl_step(as_operator(op, op.shape[0], dtype=op.dtype, device=op.device), g, damping)  # counts anew
        return replace(dense, num_hvps=attempt.num_hvps + dense.num_hvps, iterations=attempt.iterations,
                       info={**dense.info, "minres_iterations": attempt.iterations})
    if solver == "eigh":
        # rcond >= 1 counts every eigenvalue as 0: a zero step
        rcond = check_number("rcond", options.get("rcond", 1e-12), 0.0, 1.0, strict_high=True)
        lam, U, H64 = _eigh(op)
        c = U.T @ g.double()
        y, kept = _spectral_step(lam, c, damping, rcond)
        s = _check_fits((U @ y).to(g.dtype), y, c, op.num_hvps, "damped_newton_step (solver 'eigh')", _DAMPED_REMEDY)
        return NewtonStep(s, _dense_residual(H64, s, g, damping), op.num_hvps, 0, True, "damped-eigh",
                          {"rank": kept, "lambda_min": float(lam[0])})
    sol = solvers[solver](op, g, damping=damping, **options)
    converged = _solved(sol, g, options.get("tol", MINRES_TOL)) if solver == "minres" else sol.converged
    return NewtonStep(-sol.solution, sol.residual, sol.num_hvps, sol.iterations, converged, f"damped-{solver}",
                      sol.info)
