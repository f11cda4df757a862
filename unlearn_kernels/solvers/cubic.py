"""The cubic-regularised Newton subproblem (docs/methods.md, "Newton family"):

    minimise  m(s) = g^T s + 1/2 s^T H s + (M/6) ||s||^3

whose global minimiser satisfies ``(H + sigma I) s = -g``, ``sigma = (M/2) ||s||``, ``H + sigma I``
PSD. Three solvers, one entry point :func:`cubic_newton_step`:

* ``"dense"``: the float64 oracle: eigendecomposition of H, then the secular equation in the
  eigenbasis (the kernel op :func:`~unlearn_kernels.ops.cubic_secular.cubic_secular_solve`), hard
  case included. An operator is made dense by d products (small d only).
* ``"krylov"``: Lanczos from g (:class:`KrylovCubicSolver`); Hessian-vector products only.
* ``"gd"``: the Cauchy point, then gradient steps on m (Carmon and Duchi); with ``sample=`` the
  stochastic variant (StoCuReNU) that draws a fresh mini-batch (g, H) every outer round.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checks import (all_finite, check_bool, check_int, check_number, check_option_names, check_seed, norm64, norm_scale,
                      scaled_norm)
from ..ops.cubic_secular import SolutionOverflow, cubic_secular_solve
from .lanczos import PROCESS_BREAKDOWN_EPS, LanczosProcess, Reorth, replay, ritz_pairs
from .operators import NonFiniteProduct, SolverOperator, check_vector, operator_and_vector


@dataclass
class CubicStep:
    """A solution of the cubic subproblem and how it was obtained.

    Attributes:
        step: s, a (d,) tensor of g's dtype and device.
        model_value: m(s) (float64; for "krylov" computed in the subspace, exact when Q is orthonormal;
            -Inf where it lies below float64's range, as a tiny M's huge step can give).
        step_norm: ||s|| (scaled before squaring: finite for every finite step, 2e160 say).
        sigma: the multiplier of the optimality conditions, ``(M/2) ||s||``.
        residual: ``||g + H s + (M/2) ||s|| s||``, the norm of the model's gradient at s
            ("krylov": a bound, the free Lanczos estimate plus ``|(M/2) ||s|| - sigma| ||s||``, which holds
            the secular equation's tolerance and, for a basis that is not orthonormal, ``||s|| != ||y||``, plus
            the bound on what the Lanczos breakdowns dropped (:meth:`.lanczos.LanczosProcess.breakdown_error`;
            under "full" only a residual vector at rounding inside the basis's span is dropped), in float64
            on the computed basis: in float32 it leaves out the rounding of s, about
            ``eps32 (||H|| + sigma) ||s||``; under ``reorth="selective"``, whose basis is orthonormal to about
            sqrt(eps) only, an estimate: the true norm was up to 19% above it on d = 200 (not under "full" or
            "none"); "dense"/"gd": computed, at the returned s in its dtype).
        num_hvps: Hessian-vector products used.
        hard_case: the hard-case branch was taken (g has no component along H's bottom eigenvector).
        iterations: Lanczos steps ("krylov"), gradient steps ("gd"), 0 ("dense").
        converged: the solver's stopping rule held (always True for "dense"; for "gd" with ``noise``, on the
            perturbed model, so ``residual``, of the unperturbed one, may be above ``tol ||g||``).
        method: "dense", "krylov" or "gd".
    """

    step: torch.Tensor
    model_value: float
    step_norm: float
    sigma: float
    residual: float
    num_hvps: int
    hard_case: bool
    iterations: int
    converged: bool
    method: str


def _check_M(M: Any) -> float:
    return check_number("M", M, 0.0, strict=True)


class StepOverflow(ValueError):
    """A Newton-type step does not fit its dtype (a float32 step beyond 3.4e38): for the cubic model M is
    too small for this H and g; for the damped and pseudo-inverse steps (``baselines``) the damping or
    ``rcond`` is, or H is nearly singular. ``step_norm`` and ``model_value`` are the float64 solution's,
    ``num_hvps`` the products used (the adaptive loop records the trial as rejected and raises M)."""

    def __init__(self, message: str, step_norm: float, model_value: float, num_hvps: int) -> None:
        super().__init__(message)
        self.step_norm, self.model_value, self.num_hvps = step_norm, model_value, num_hvps


def check_step_fits(step: torch.Tensor, norm_and_value: Callable[[], tuple[float, float]], num_hvps: int,
                    what: str, remedy: str, noun: str = "step") -> torch.Tensor:
    """``step`` (a float64 solution cast to its dtype) if every entry is finite, else :class:`StepOverflow`
    carrying the float64 solution's norm and model value (``norm_and_value()``, asked only then), the message
    naming ``what`` solved and the ``remedy``: the cubic solvers' and the Newton baselines' one check."""
    if not all_finite(step):
        norm, value = norm_and_value()
        raise StepOverflow(f"{what}: the {noun}, of norm {norm:.3g}, does not fit {step.dtype}: {remedy}", norm,
                           value, num_hvps)
    return step


def _cubic_remedy(M: float) -> str:
    return f"M = {M!r} is too small for this H and g (raise M, or solve in float64)"


def _secular_solve(eigvals: torch.Tensor, coeffs: torch.Tensor, M: float, num_hvps: int,
                   method: str) -> tuple[torch.Tensor, float, bool]:
    """:func:`cubic_secular_solve`, with a solution beyond float64 (an M far too small) raised as
    :class:`StepOverflow` (norm Inf, model value -Inf), which the adaptive loop rejects like any step
    that does not fit its dtype."""
    try:
        return cubic_secular_solve(eigvals, coeffs, M)
    except SolutionOverflow:
        raise StepOverflow(f"cubic_newton_step (method {method!r}): the step does not fit float64: M = {M!r} is "
                           "too small for this H and g (raise M)", math.inf, -math.inf, num_hvps) from None


def _cubic_term(M: float, norm: float) -> float:
    """``(M/6) norm^3``, Inf rather than Python's OverflowError where it does not fit a float."""
    return M / 6.0 * norm * norm * norm


def _scaled_value(scale: float, linear: float, quadratic: float, norm: float, M: float) -> float:
    """The cubic model at ``s = scale u`` from u's terms (``linear = g^T u``, ``quadratic = u^T H u``,
    ``norm = ||u||``, u's entries at most 2): ``scale (g^T u + scale (u^T H u / 2 + scale (M/6) ||u||^3))``.
    Only the products by ``scale`` can overflow, and only where the value is beyond float64's range: then it
    is an infinity of the value's sign (a tiny M's huge step), never the NaN of Inf - Inf that the unscaled
    terms give. Taken where those are not finite (the model values' bits are otherwise the plain terms')."""
    return scale * (linear + scale * (0.5 * quadratic + scale * _cubic_term(M, norm)))


def cubic_model_value(g: torch.Tensor, s: torch.Tensor, Hs: torch.Tensor, M: float) -> float:
    """The cubic model ``m(s) = g^T s + 1/2 s^T H s + (M/6) ||s||^3`` in float64, from ``Hs = H s``
    (s scaled, so that a huge s gives its value, or an infinity of its sign beyond float64's range, not NaN).

    Raises:
        TypeError / ValueError: g, s or Hs not finite floating point (d,) vectors of one length, or M
            not a finite number >= 0 (naming which).
    """
    vectors = {name: check_vector(v, name) for name, v in (("g", g), ("s", s), ("Hs", Hs))}
    if len({v.shape for v in vectors.values()}) > 1:
        raise ValueError(f"cubic_model_value: g, s and Hs must have one length, got "
                         f"{', '.join(f'{n} {tuple(v.shape)}' for n, v in vectors.items())}")
    return _model_value(g, s, Hs, check_number("M", M, 0.0))


def _model_value(g: torch.Tensor, s: torch.Tensor, Hs: torch.Tensor, M: float) -> float:
    """:func:`cubic_model_value` of the solvers' own (checked) vectors."""
    g64, s64 = g.double(), s.double()
    plain = float(g64 @ s64 + 0.5 * (s64 @ Hs.double())) + _cubic_term(M, norm64(s))
    if math.isfinite(plain):
        return plain
    scale = norm_scale(s)
    u = s64 / scale
    # H u = Hs / scale: finite wherever H's products are
    return _scaled_value(scale, float(g64 @ u), float(u @ (Hs.double() / scale)), float(torch.linalg.vector_norm(u)), M)


def _eigenbasis_value(c: Any, lam: Any, y: Any, M: float) -> float:
    """The cubic model in an eigenbasis of H (eigenvalues ``lam``, gradient ``c``), at ``y``; float64
    tensors or numpy arrays."""
    plain = float(c @ y + 0.5 * (lam * y * y).sum()) + _cubic_term(M, math.sqrt(float((y * y).sum())))
    if math.isfinite(plain):
        return plain
    c, lam, y = (torch.as_tensor(v) for v in (c, lam, y))
    scale = norm_scale(y)
    u = y / scale
    return _scaled_value(scale, float(c @ u), float((lam * u * u).sum()), float(torch.linalg.vector_norm(u)), M)


# --------------------------------------------------------------------------- dense oracle
def dense_cubic_step(H: Any, g: torch.Tensor, M: float) -> CubicStep:
    """The float64 eigendecomposition oracle (see :func:`cubic_newton_step`, method "dense").

    The step is solved in float64 and returned in g's dtype; ``model_value`` and ``residual`` are
    those of the returned step (computed in float64, in the eigenbasis: no products), so for a
    float32 g the residual includes the step's rounding to float32 (about ``eps32 (||H|| + sigma) ||s||``),
    what a user of the step gets. ``sigma`` and ``hard_case`` are the float64 solution's.
    """
    op, g = operator_and_vector(H, g)
    M = _check_M(M)
    H64 = op.to_dense().double()
    lam, U = torch.linalg.eigh(0.5 * (H64 + H64.T))
    c = U.T @ g.double()
    y, sigma, hard = _secular_solve(lam, c, M, op.num_hvps, "dense")
    s = check_step_fits((U @ y).to(g.dtype), lambda: (scaled_norm(y), _eigenbasis_value(c, lam, y, M)), op.num_hvps,
                        "cubic_newton_step (method 'dense')", _cubic_remedy(M))
    y = U.T @ s.double()  # the returned step in the eigenbasis: its rounding to g's dtype included
    value = _eigenbasis_value(c, lam, y, M)
    residual = scaled_norm(c + lam * y + 0.5 * M * scaled_norm(y) * y)
    return CubicStep(s, value, scaled_norm(s), sigma, residual, op.num_hvps, hard, 0, True, "dense")


# --------------------------------------------------------------------------- Krylov
def _residual_bound(lanczos_residual: float, M: float, sigma: float, s_norm: float) -> float:
    """A bound on the model's gradient ``g + H s + (M/2) ||s|| s`` at ``s = Q y``: the small problem's
    solution has ``A y + ||g|| e1 = -sigma y`` (A the projection of H), so the gradient is
    ``((M/2) ||s|| - sigma) s`` plus the Lanczos residual ``H Q y - Q A y``. The first term is the
    secular equation's own tolerance (sigma = (M/2) ||y|| to a relative 1e-12, which times a large
    ||s|| is not negligible) and, when Q is not orthonormal, ``||s|| != ||y||``."""
    return lanczos_residual + abs(0.5 * M * s_norm - sigma) * s_norm


def _lanczos_residual(proc: LanczosProcess, y: np.ndarray) -> float:
    """``||H Q y - Q A y||``: the process's residual norm and its bound on the couplings its breakdowns dropped
    (:meth:`.lanczos.LanczosProcess.breakdown_error`: left out, a float32 near-hard case reported 6.2e-7 for a
    model gradient of 1.4e-3, and converged)."""
    return proc.residual_norm(y) + proc.breakdown_error(y)


class KrylovCubicSolver:
    """The cubic subproblem in the Krylov space of (H, g), by Lanczos from q1 = g / ||g||.

    After each step the k x k problem ``min ||g|| e1^T y + 1/2 y^T T y +
    (M/6) ||y||^3`` is solved by the secular op on the eigendecomposition of T (float64). The
    full-space model gradient at s = Q y has norm ``beta_k |e_k^T y|`` (free); the iteration stops
    when it is ``<= theta ||y||^2`` or ``<= kappa min(1, ||y||) ||g||``, or at ``k_max`` steps. For
    g = 0 (Lanczos then starts from a random vector) it also waits until the bottom Ritz pair has
    converged (residual bound ``<= kappa max|Ritz value|``): s = 0 is stationary there, and the minimiser
    only if H has no negative curvature.

    Hard-case guard (``guard``): in the hard case g has no component along H's bottom eigenvector,
    so the Krylov space of g never sees it and the subspace solution is a stationary point of m
    that is not its global minimiser; in the near-hard case (a tiny component) it sees it too late.
    After the main phase (k steps, basis Q, last residual vector r) the solver restarts Lanczos from
    a random vector orthogonal to Q (a "probe" block P, reorthogonalised like the main phase, at
    most ``probe_steps`` steps, until its bottom Ritz pair has converged to ``sqrt(eps) ||T||``).
    The probe is not kept orthogonal to r: in the near-hard case rounding and the tiny component put
    much of the bottom eigenvector into r, and a probe orthogonal to r cannot see that part. The
    projection of H on [Q, P] is then T_main and T_probe plus the rank-one coupling
    ``beta_k e_k w^T`` (``w_j = <r, p_j>``, recorded as the probe runs), a small dense matrix on
    whose eigendecomposition the secular op solves; g has no coefficient on the probe block. If the
    probe finds curvature below ``-sigma`` the secular op takes the hard case and adds that Ritz
    vector (or, near it, a large component along it). The part of r outside [Q, P] is tracked, so
    the residual estimate stays exact (see :class:`.lanczos.Coupling`). When the probe has changed
    the answer so that the stopping rule no longer holds (a larger sigma needs more of the Krylov
    space of g), the main phase resumes from that part of r, within what is left of ``k_max``.
    When the rest of the space is within the probe's budget (``d - k <= probe_steps``) the probe
    instead continues Lanczos until it spans the whole space: Q is then square and T exact.
    Likewise when T is nearly invariant (the last coupling below ``sqrt(eps) ||T||``, e.g. with
    repeated eigenvalues), the probe continues Lanczos from r, which rounding has then filled with
    the bottom eigenvector (with ``reorth="none"`` r is only rounding inside span(Q): the probe then
    always starts from a random vector). The guard needs the stored basis: it is on by default, and off in
    two-pass mode. (The alternative, perturbing g, was not chosen: it cannot certify
    ``H + sigma I`` PSD.)

    ``solve(M)`` runs the Lanczos iteration the first time (a first call that an exception cut short,
    a KeyboardInterrupt in a product say, counts as not made); later calls with another M (a rejected
    step) re-solve the small problem on the same T with no new products, unless ``extend=True``
    (then the iteration continues until the stopping rule holds for the new M; once the probe has run,
    no continuation of its block is g's Krylov space, so the iteration starts again from g, its products
    spent again and counted). In two-pass mode
    every solve pays a second Lanczos pass (n - 1 products) to form s = Q y.

    Args:
        H: dense symmetric matrix or operator (see :func:`~.operators.as_operator`).
        g: (d,) gradient.
        k_max: most Lanczos steps of the main phase (with the steps it resumes after the probe).
        reorth: "full", "selective" or "none" (see :mod:`.lanczos`).
        two_pass: store no Lanczos vectors (O(d) memory); s is formed by a second pass. Needs
            reorth="none". Every solve replays the products, so H must be the operator of the first
            pass then: an operator that reads a model's weights must find them as they were.
        guard: the hard-case probe (default: on unless two_pass).
        probe_steps: most steps of the probe block (or of filling the space, see above).
        kappa: relative tolerance of the ``kappa min(1, ||y||) ||g||`` rule.
        theta: tolerance of the ``theta ||y||^2`` rule; default ``kappa * M / 2`` (the residual is
            then a kappa fraction of the cubic term's gradient ``(M/2) ||y||^2``).
        seed: seeds the probe's (and, for g = 0, the start) vector.
    """

    def __init__(
        self,
        H: Any,
        g: torch.Tensor,
        *,
        k_max: int = 100,
        reorth: Reorth = "full",
        two_pass: bool = False,
        guard: bool | None = None,
        probe_steps: int = 20,
        kappa: float = 1e-6,
        theta: float | None = None,
        seed: int = 0,
    ) -> None:
        self.op, self.g = operator_and_vector(H, g)
        self.k_max = check_int("k_max", k_max, 1)
        self.probe_steps = check_int("probe_steps", probe_steps, 1)
        self.kappa = check_number("kappa", kappa, 0.0)
        self.theta = None if theta is None else check_number("theta", theta, 0.0)
        two_pass = check_bool("two_pass", two_pass)
        if two_pass and reorth != "none":
            raise ValueError("two_pass=True keeps no basis to reorthogonalise against: use reorth='none'")
        self.guard = (not two_pass) if guard is None else check_bool("guard", guard)
        if self.guard and two_pass:
            raise ValueError("the hard-case guard needs the stored basis: use guard=False with two_pass=True")
        self.two_pass = two_pass
        self.gnorm = norm64(self.g)
        self._seed, self._reorth = check_seed("seed", seed), reorth
        self._start()
        self._built = False  # a first solve built T to the end

    def _start(self) -> None:
        """A new Lanczos process from g (from the seed's random vector where g = 0), as at construction."""
        gen = torch.Generator().manual_seed(self._seed)
        if self.gnorm > 0:
            self._v0 = self.g
        else:  # g = 0: the coefficient vector is 0 and any start vector will do (the secular op
            # then returns 0, or the hard-case step along the bottom Ritz vector).
            self._v0 = torch.randn(self.g.shape[0], generator=gen, dtype=torch.float64).to(self.g)
        capacity = self.k_max + (self.probe_steps if self.guard else 0)
        # under "full" a breakdown is only the step op's (beta <= 16 eps ||H q||): the process's 100 eps ||T||
        # (1.2e-5 ||T|| in float32) dropped couplings that were not rounding (a float32 near-hard case's 2.7e-5,
        # whose later vector is the long step along the bottom eigenvector: a model gradient of 1.4e-3), and what
        # follows such a beta is made orthogonal to the basis whatever it holds. "selective" and "none" keep the
        # process's threshold: their next vector would not be (their dropped couplings are counted in the bound)
        rtol = 0.0 if self._reorth == "full" else PROCESS_BREAKDOWN_EPS
        self.process = LanczosProcess(self.op, self._v0, reorth=self._reorth, store_basis=not self.two_pass,
                                      capacity=capacity, generator=gen, breakdown_rtol=rtol)
        self._probed = False  # the guard's probe block has run

    # -- the small problem
    def _small_solve(self, M: float) -> tuple[np.ndarray, float, bool, float, float]:
        """(y, sigma, hard_case, model value, residual bound) of the k x k problem on the current T,
        the bound taken at ||Q y|| = ||y|| (see :func:`_residual_bound`)."""
        proc = self.process
        theta, S = proc.ritz_pairs()
        c = self.gnorm * S[0, :]
        y_eig, sigma, hard = _secular_solve(torch.from_numpy(theta), torch.from_numpy(c), M, self.op.num_hvps,
                                            "krylov")
        y_eig = y_eig.numpy()
        y = S @ y_eig
        residual = _residual_bound(_lanczos_residual(proc, y), M, sigma, scaled_norm(y))
        return y, sigma, hard, _eigenbasis_value(c, theta, y_eig, M), residual

    def _accept(self, M: float, y: np.ndarray, residual: float) -> bool:
        y_norm = scaled_norm(y)
        theta = self.kappa * M / 2.0 if self.theta is None else self.theta
        if self.gnorm == 0.0 and not self._bottom_converged():
            # g = 0: s = 0 is stationary (residual 0), the minimiser only if H has no negative curvature,
            # which the random start's Krylov space shows once its bottom Ritz pair has converged
            return False
        # theta * y_norm first: y_norm**2 alone overflows (Python's OverflowError) for a huge step
        return residual <= theta * y_norm * y_norm or residual <= self.kappa * min(1.0, y_norm) * self.gnorm

    def _bottom_converged(self) -> bool:
        theta, S = self.process.ritz_pairs()
        scale = max(float(np.abs(theta).max()), np.finfo(np.float64).tiny)
        return _lanczos_residual(self.process, S[:, 0]) <= self.kappa * scale

    # -- the Lanczos phases
    def _run_main(self, M: float, limit: int | None = None) -> None:
        """Lanczos steps until the stopping rule holds for M or the basis has ``limit`` (default
        ``k_max``) vectors."""
        proc = self.process
        limit = self.k_max if limit is None else limit
        if proc.n:  # extending an existing T: it may already satisfy the rule for this M
            y, _, _, _, residual = self._small_solve(M)
            if self._accept(M, y, residual):
                return
        while proc.n < limit and not proc.exhausted:
            proc.step()
            y, _, _, _, residual = self._small_solve(M)  # O(k^2), no product: after every step
            if self._accept(M, y, residual):
                return

    def _run_probe(self) -> None:
        proc = self.process
        # Without reorthogonalisation r is rounding noise inside span(Q), not what rounding carried out of it:
        # going on from it built no new direction (a hard case missed, reported converged), so the probe
        # always starts from a random vector made orthogonal to the stored basis.
        fresh_start = proc.reorth == "none"
        if self.op.shape[0] - proc.n <= self.probe_steps and not fresh_start:
            # The probe could reach the whole space: fill it by continuing Lanczos (T stays
            # tridiagonal; a breakdown restarts into what is left).
            while not proc.exhausted:
                proc.step()
            return
        tol = math.sqrt(torch.finfo(self.op.dtype).eps)
        # Start the probe block from a random vector (coupled to the residual vector, see the class
        # docstring), unless a breakdown already restarted, or T is nearly invariant: then the residual
        # vector is what rounding carried out of the Krylov space of g, the bottom eigenvector above
        # all (the hard case), and Lanczos goes on from it.
        if fresh_start or proc.betas[-1] > tol * max(np.abs(proc.alphas).max(), max(proc.betas)):
            if not proc.can_restart:  # the basis is full (a call cut short after it filled it): nothing to probe
                return
            proc.restart()
        start = proc.n  # the capacity (k_max + probe_steps, < d but for a fresh start) leaves probe_steps steps
        for _ in range(min(self.probe_steps, proc.capacity - proc.n)):
            proc.step()
            if proc.betas[-1] == 0.0:  # the probe block is invariant (it may have restarted again)
                return
            theta, S = ritz_pairs(proc.alphas[start:], proc.betas[start:])
            if abs(proc.betas[-1] * S[-1, 0]) <= tol * max(np.abs(theta).max(), np.abs(proc.alphas).max()):
                return

    def _resume_main(self, M: float, budget: int) -> None:
        """After the probe: when the answer no longer satisfies the stopping rule (the probe found
        curvature below -sigma, so sigma and the step changed), continue the main phase for at most
        ``budget`` more steps."""
        proc = self.process
        y, _, _, _, residual = self._small_solve(M)
        if budget <= 0 or self._accept(M, y, residual):
            return
        # The Krylov space of g goes on from its residual vector r. After a coupled restart the probe holds
        # part of r: restart from the rest (the probe's own residual vector becomes a coupling in turn).
        # Otherwise (no restart, or P already holds r) the last block goes on, which continues it.
        dropped = proc.couplings[0].rest if proc.couplings else None
        if dropped is not None and norm64(dropped) > math.sqrt(torch.finfo(self.op.dtype).eps) and proc.can_restart:
            proc.restart(dropped)
        self._run_main(M, proc.n + budget)

    def solve(self, M: float, *, extend: bool | None = None) -> CubicStep:
        """Solve for this M (see the class docstring).

        Args:
            M: the cubic regularisation constant, > 0.
            extend: continue the Lanczos iteration if the stopping rule fails for this M. Default:
                True until a call has built T to the end, False afterwards (no new products).
        """
        M = _check_M(M)
        # a tiny M gives a huge step: its norm and model value are scaled, but numpy arithmetic on its
        # coefficients (the residual's beta y_k, the plain model value's -Inf + Inf before its scaled one) may
        # still overflow to Inf or NaN, which numpy would warn of (an error under -W error); a step beyond the
        # dtype is StepOverflow, a model value beyond float64's range -Inf, both of which the adaptive loop
        # rejects
        with np.errstate(over="ignore", invalid="ignore"):
            return self._solve(M, extend)

    def _solve(self, M: float, extend: bool | None) -> CubicStep:
        proc = self.process
        # a first build that an exception (a KeyboardInterrupt in a product) cut short is no build: the next
        # call goes on with it, and the probe runs again (reported converged on the main phase alone before)
        extend = not self._built if extend is None else check_bool("extend", extend)
        if extend:
            with self.op.fixed_weights():  # the Lanczos iteration's products, at one H
                if self._probed:
                    # Past the probe's block no continuation of it is g's Krylov space (growing it, or the main
                    # block from what the probe left of its residual vector, ended short of the minimum): start
                    # again from g
                    self._start()
                    proc = self.process
                self._run_main(M)
                if self.guard and not self._probed:
                    main_steps = proc.n
                    self._run_probe()
                    self._probed = True  # once: an interrupted resume goes on from the probe, not into another one
                    self._resume_main(M, self.k_max - main_steps)
                self._built = True
        y, sigma, hard, value, _ = self._small_solve(M)
        s = replay(self.op, self._v0, proc.n, y) if self.two_pass else proc.combine(y)
        s = check_step_fits(s.to(self.g.dtype), lambda: (scaled_norm(y), value), self.op.num_hvps,
                            "cubic_newton_step (method 'krylov')", _cubic_remedy(M))
        s_norm = scaled_norm(s)
        # at the formed s: Q is orthonormal to about sqrt(eps) ("selective") or not at all ("none"), so
        # ||s|| = ||Q y|| is not ||y||
        residual = _residual_bound(_lanczos_residual(proc, y), M, sigma, s_norm)
        return CubicStep(
            step=s, model_value=value, step_norm=s_norm, sigma=sigma, residual=residual,
            num_hvps=self.op.num_hvps, hard_case=hard, iterations=proc.n,
            converged=self._accept(M, y, residual), method="krylov",
        )


# --------------------------------------------------------------------------- gradient descent
def _cauchy_point(op: SolverOperator, g: torch.Tensor, M: float) -> torch.Tensor:
    """argmin of m along -g: ``-R_c g / ||g||``, R_c = (r - q) / M with q = u^T H u (u = g / ||g||) and
    r = sqrt(q^2 + 2 M ||g||). Written with q and M r, not b = q / M: M ||g||^2 underflowed to 0
    (M = 1e-150, ||g|| = 1e-150: ZeroDivisionError) and b^2 overflowed."""
    gnorm = norm64(g)
    if gnorm == 0.0:
        return torch.zeros_like(g)
    q = float((g / gnorm).double() @ op.matvec(g / gnorm).double())
    r = math.hypot(q, math.sqrt(2.0 * gnorm) * math.sqrt(M))  # gnorm * M alone underflowed (1e-150 * 1e-180)
    # for q > 0 the same root without the difference that cancels when 2 M ||g|| << q^2 (a small M)
    radius = 2.0 * gnorm / (q + r) if q > 0 else (r - q) / M
    factor = -radius / gnorm
    if factor == 0.0 or torch.finfo(g.dtype).tiny <= abs(factor) <= torch.finfo(g.dtype).max:
        return g * factor
    # the factor alone beyond g's dtype (float32: g = 1e-30 with a step of 2e12 is a factor of 2e42, which
    # made the Cauchy point Inf and cubic_gd blame M; or below its normal range): the unit vector g / ||g||
    # in float64 times the radius
    return ((g.double() / gnorm) * -radius).to(g.dtype)


_DIVERGED = ("the iteration diverged (the step size eta = {eta:g} is too large for H and M = {M:g}: it needs "
             "eta < 1 / (||H|| + M ||s||)")


def _product_at(op: SolverOperator, s: torch.Tensor, step: int, eta: float, M: float) -> torch.Tensor:
    """``H s`` at a gradient-descent iterate; a non-finite iterate or product is most often the
    iteration's divergence (s overflowed), which NonFiniteProduct then says, rather than blaming H
    alone (or, for an operator that checks its input, naming only "vector")."""
    def diverged(detail: str) -> NonFiniteProduct:
        return NonFiniteProduct(
            f"cubic_gd: the product H s is not finite at gradient step {step} ({detail}): "
            + _DIVERGED.format(eta=eta, M=M)
            + "; at step 0, the start, e.g. the Cauchy point, is too long: M too small for g, or the noise too "
            "large), or H's products are not finite")

    if not all_finite(s):
        raise diverged("s itself holds NaN or Inf")
    try:
        return op.matvec(s)
    except NonFiniteProduct:
        norm = norm64(s)
    # one more product tells H from the iteration: at a unit vector along s (as LiSSA's check does)
    if norm > 0.0:
        try:
            op.matvec(s / norm)
        except NonFiniteProduct:
            raise NonFiniteProduct(f"cubic_gd: H's products are not finite: the product at a unit vector along the "
                                   f"iterate of gradient step {step} holds NaN or Inf (not the iteration's "
                                   "divergence)") from None
    raise diverged(f"||s|| = {norm:.3e}")


#: gradient descent on m from the Cauchy point (m <= 0 there) with a step size below 1 / L lowers m at
#: every step; a model value above both 0 (the zero step) and the round's first, with a model gradient
#: this many times the first one's, is the iteration running away (geometrically, when eta L >> 1)
_DIVERGENCE_GROWTH = 10.0


def _gd_steps(op: SolverOperator, g: torch.Tensor, M: float, s: torch.Tensor, K: int, eta: float,
              tol: float) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
    """K steps ``s <- s - eta (g + H s + (M/2)||s|| s)``, stopping early when the model gradient
    is <= tol ||g||. Returns (s, H s if known at the final s, steps taken, stopped early). Raises
    ValueError when the iteration runs away (see ``_DIVERGENCE_GROWTH``), NonFiniteProduct when it
    overflows."""
    gnorm = norm64(g)
    first_value = first_grad = math.nan
    for it in range(K):
        Hs = _product_at(op, s, it, eta, M)
        grad = g + Hs + (0.5 * M * norm64(s)) * s
        grad_norm, value = norm64(grad), _model_value(g, s, Hs, M)
        if it == 0:
            first_value, first_grad = value, grad_norm
        elif value > max(0.0, first_value) and grad_norm > _DIVERGENCE_GROWTH * first_grad:
            raise ValueError(
                f"cubic_gd: at gradient step {it} the model value rose to {value:.3e} (the zero step has 0, this "
                f"call's start {first_value:.3e}) and its gradient norm from {first_grad:.3e} to {grad_norm:.3e}: "
                + _DIVERGED.format(eta=eta, M=M) + ")")
        if tol > 0 and grad_norm <= tol * gnorm:
            return s, Hs, it, True
        s = s - eta * grad
    return s, None, K, False


def _finish(op: SolverOperator, g: torch.Tensor, M: float, s: torch.Tensor, Hs: torch.Tensor | None,
            num_hvps: int, iterations: int, converged: bool, eta: float) -> CubicStep:
    if Hs is None:
        Hs = _product_at(op, s, iterations, eta, M)
        num_hvps += 1
    s_norm = scaled_norm(s)
    residual = scaled_norm(g + Hs + (0.5 * M * s_norm) * s)
    return CubicStep(s, _model_value(g, s, Hs, M), s_norm, 0.5 * M * s_norm, residual, num_hvps, False,
                     iterations, converged, "gd")


def sphere_noise(d: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``radius * xi``, xi uniform on the unit sphere of R^d (a normalised Gaussian; float64, norm
    exactly ``radius`` up to rounding), as Carmon and Duchi and the StoCuReNU code perturb g: the
    perturbation's size does not grow with d, unlike N(0, radius^2 I) whose norm is ~radius sqrt(d)."""
    d, radius = check_int("d", d, 0), check_number("radius", radius, 0.0)
    z = torch.randn(d, generator=generator, dtype=torch.float64)
    return z * (radius / torch.linalg.vector_norm(z))


def _perturbed(g: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    if noise == 0:
        return g
    return g + sphere_noise(g.shape[0], noise, gen).to(g)


def _check_gd_options(K: int, eta: float, noise: float, tol: float) -> None:
    check_int("K", K, 0)
    check_number("eta", eta, 0.0, strict=True)
    check_number("noise", noise, 0.0)
    check_number("tol", tol, 0.0)


def cubic_gd(H: Any, g: torch.Tensor, M: float, *, K: int = 5, eta: float = 0.01, noise: float = 0.0,
             tol: float = 0.0, seed: int = 0) -> CubicStep:
    """Gradient descent on m from the Cauchy point (Carmon and Duchi, 2019).

    Args:
        H, g, M: the subproblem.
        K: gradient steps (default 5, the StoCuReNU authors' value, unverified; the oracle
            accuracy needs hundreds to thousands of steps with ``eta < 1 / (||H|| + M ||s||)``).
        eta: step size (default 0.01, the authors' value, unverified).
        noise: the norm of the perturbation ``noise * xi`` added to g for the iteration, xi uniform
            on the unit sphere (:func:`sphere_noise`; Carmon and Duchi perturb g so that the hard
            case cannot trap GD; 0: none). Value, residual and sigma are reported for the
            unperturbed g.
        tol: stop early when ``||grad m(s)|| <= tol ||g||`` (0: always K steps).
        seed: seeds the noise.

    Returns:
        A :class:`CubicStep`; ``converged`` says whether the tol rule stopped the iteration.

    Raises:
        NonFiniteProduct: an iterate or a product at it is not finite, which names the step and says
            the iteration diverged (eta too large, or M too small for the Cauchy point) or H is not finite.
        ValueError: the iteration ran away before overflowing: a model value above 0 (the zero
            step's) and above the first iterate's, with a model gradient 10 times the first one's (GD
            from the Cauchy point with eta < 1 / L lowers m at every step).
    """
    op, g = operator_and_vector(H, g)
    M = _check_M(M)
    _check_gd_options(K, eta, noise, tol)
    g_it = _perturbed(g, noise, torch.Generator().manual_seed(check_seed("seed", seed)))
    with op.fixed_weights():
        s = _cauchy_point(op, g_it, M)
        s, Hs, steps, stopped = _gd_steps(op, g_it, M, s, K, eta, tol)
        if noise != 0:
            Hs = None  # H s is reported for the true g, recompute it against the unperturbed model
        return _finish(op, g, M, s, Hs, op.num_hvps, steps, stopped, eta)


def stochastic_cubic_gd(sample: Callable[[], tuple[torch.Tensor, Any]], M: float = 5.0, *, T: int = 10,
                        K: int = 5, eta: float = 0.01, noise: float = 1e-3, tol: float = 0.0,
                        seed: int = 0) -> CubicStep:
    """Stochastic cubic-Newton subproblem solver (StoCuReNU, after Carmon and Duchi).

    Each of ``T`` outer rounds calls ``sample()`` for a fresh mini-batch estimate ``(g, H)``
    (H a dense matrix or operator), perturbs g by ``noise * xi`` with xi uniform on the unit sphere
    (:func:`sphere_noise`), and takes K gradient steps on that round's model; the first round
    starts at its Cauchy point, later rounds continue from the current s (the weights are fixed
    here: a method that moves the weights every round calls this with T=1). Defaults (M=5, T=10,
    K=5, eta=0.01, noise=1e-3) are the authors' reported values, unverified.

    Returns:
        A :class:`CubicStep` whose value, residual and sigma are for the last round's (g, H)
        without noise; num_hvps sums over all rounds.
    """
    if not callable(sample):
        raise TypeError(f"sample must be a callable returning (g, H), got {type(sample).__name__}")
    M = _check_M(M)
    check_int("T", T, 1)
    _check_gd_options(K, eta, noise, tol)
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    s: torch.Tensor | None = None
    hvps = steps = 0
    stopped = False
    for _ in range(T):
        drawn = sample()
        if not (isinstance(drawn, tuple) and len(drawn) == 2):
            raise TypeError("sample() must return a (g, H) pair")
        op, g = operator_and_vector(drawn[1], drawn[0])
        if s is not None and s.shape != g.shape:
            raise ValueError(f"sample() returned g of shape {tuple(g.shape)}, earlier rounds had {tuple(s.shape)}")
        g_it = _perturbed(g, noise, gen)
        s = _cauchy_point(op, g_it, M) if s is None else s
        s, _, taken, stopped = _gd_steps(op, g_it, M, s, K, eta, tol)
        steps += taken
        hvps += op.num_hvps
    step = _finish(op, g, M, s, None, 0, steps, stopped, eta)
    step.num_hvps += hvps
    return step


# --------------------------------------------------------------------------- entry point
def cubic_newton_step(H: Any, g: torch.Tensor | None, M: float, method: str = "krylov", **options: Any) -> CubicStep:
    """Minimise ``g^T s + 1/2 s^T H s + (M/6) ||s||^3`` (the CureNewton step is w + s).

    Args:
        H: the Hessian: a dense symmetric torch matrix, an operator with matvec/shape/dtype/device
            (e.g. a ``CurvatureOperator``), or a function ``v -> H v``. None with ``sample=``.
        g: the (d,) gradient. None with ``sample=``.
        M: the cubic regularisation constant (Hessian Lipschitz constant), > 0.
        method: "dense" (float64 eigendecomposition oracle), "krylov" (Lanczos;
            options of :class:`KrylovCubicSolver`) or "gd" (Cauchy point + gradient steps; options
            of :func:`cubic_gd`, or with ``sample=`` those of :func:`stochastic_cubic_gd`).

    Returns:
        A :class:`CubicStep`.

    Raises:
        ValueError: M <= 0, g of the wrong size or with NaN/Inf, H non-square, non-finite or of
            another dimension, a dense H (or, with method "dense", the matrix built from an
            operator's products) non-symmetric, an unknown method or option value. An operator or
            function is taken as symmetric, not checked (that would cost products): a non-symmetric
            one gives a wrong step with no error.
        TypeError: an option the method does not take (naming the ones it takes).
        StepOverflow: (a ValueError) methods "dense" and "krylov": the step does not fit g's dtype
            (M too small for this H and g).
    """
    if method == "dense":
        check_option_names("method 'dense'", options, ())
        return dense_cubic_step(H, g, M)
    if method in ("krylov", "gd"):
        target = KrylovCubicSolver if method == "krylov" else stochastic_cubic_gd if "sample" in options else cubic_gd
        check_option_names(f"method {method!r}", options, target, {"H", "g", "M"})
    if method == "krylov":
        return KrylovCubicSolver(H, g, **options).solve(M)
    if method == "gd":
        if "sample" in options:
            if H is not None or g is not None:
                raise ValueError("with sample= the (g, H) pairs come from sample(): pass H=None, g=None")
            return stochastic_cubic_gd(options.pop("sample"), M, **options)
        return cubic_gd(H, g, M, **options)
    raise ValueError(f"method must be 'dense', 'krylov' or 'gd', got {method!r}")
