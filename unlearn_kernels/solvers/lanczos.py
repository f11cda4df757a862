"""Lanczos tridiagonalisation of a symmetric operator, with the reorthogonalisation modes and the
two-pass low-memory mode the solvers need.

One Lanczos step is the fused kernel op :func:`unlearn_kernels.ops.lanczos_step.lanczos_step`
(recurrence, CGS2 reorthogonalisation, norms); this module drives it. The tridiagonal T (alphas
on the diagonal, betas beside it) is kept in float64 on the host, whatever the vectors' dtype, and
its eigenpairs (the Ritz pairs) come from LAPACK's ``dstevd``.

Reorthogonalisation (``reorth``):

* ``"full"``: every new vector against all stored Lanczos vectors (CGS2): the basis stays
  orthonormal to rounding; costs O(k d) per step.
* ``"selective"``: a simplified Parlett-Scott scheme: after every step the Ritz pairs whose error
  bound ``beta_k |s_ki|`` is below ``sqrt(eps) ||T||`` count as converged; when their number grows,
  their Ritz vectors are formed, the current vector is orthogonalised against them (beta becomes
  the norm of what is left), and every later step reorthogonalises against them only (they are
  where orthogonality is lost). Near invariance every pair converges and the residual vector is
  mostly lost orthogonality along them: the breakdown test comes after this projection. What the
  projections remove (up to ``sqrt(eps) ||T||`` per step, near repeated eigenvalues) is part of
  ``H Q`` that T does not hold: it is kept, in the coordinates of the Lanczos vectors, and counted
  in the residual norms, which would otherwise claim more accuracy than the Ritz pairs have. So
  the accuracy it reaches has a floor near ``sqrt(eps) ||H||``, which "full" and "none" go below:
  on a float64 problem with ``||H||`` = 800 (d = 300) the cubic solver's model gradient stayed at
  2e-4 after 250 steps (full: 2e-8), the smallest Ritz pairs' residuals at 3e-8 to 5e-8 (full:
  1e-10 in 126 steps). The residuals reported say so; use "full" (the default) for tight tolerances.
* ``"none"``: the plain three-term recurrence. Without reorthogonalisation a converged eigenvalue
  comes back as "ghost" copies (T holds it several times, each copy with a tiny residual bound).
  :func:`lanczos` keeps one Ritz pair per eigenvalue that the pairs of a block (the steps between
  two breakdowns) can tell apart (see :func:`distinct_pairs`), so within a block a ghost neither takes
  the place of a wanted eigenvalue nor counts as converged. A repeated eigenvalue shows once per block,
  as in exact arithmetic (the recurrence cannot tell its copies from ghosts); so each vector of a block
  after a restart is reorthogonalised against the earlier blocks' vectors (not its own block's): without it
  rounding regrew an earlier block's eigenvalue there, taken for a repeated copy (a simple top eigenvalue 10
  returned twice, in place of the second one, 5, on a rotated H of d = 200 whose v0 was the top eigenvector).

Breakdown: when beta falls to rounding level (the op returns 0, or beta <= 100 eps ||T||) the
Krylov space is invariant: beta is set to 0. With stored vectors the process then restarts from a
random vector orthogonal to everything stored (T gets a zero coupling there); without (two-pass
mode) it stops.

A forced restart (:meth:`LanczosProcess.restart` while beta > 0) drops a residual vector r that
is not rounding: the new block starts orthogonal to the stored vectors but not to r, so the
projection of H on the basis is T plus a rank-one coupling ``beta <r, q_j>`` between the vector r
was the residual of and every later vector ``q_j``; :meth:`LanczosProcess.ritz_pairs` then
diagonalises that dense matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg.lapack
import torch

from ..checks import (SMALLEST_SQUARED, check_bool, check_choice, check_fits_in_memory, check_int, check_number, check_seed,
                      norm64, scaled_norm)
from ..contracts.lanczos_step import STEP_BREAKDOWN_EPS
from ..ops.lanczos_step import lanczos_step
from .operators import SolverOperator, as_operator, check_vector

Reorth = Literal["full", "selective", "none"]
Which = Literal["LA", "SA", "BE"]
PROCESS_BREAKDOWN_EPS = 100.0
"""A beta below this many machine epsilons of ||T|| (largest |alpha|, beta so far) is a breakdown (the default of
:class:`LanczosProcess`'s ``breakdown_rtol``)."""


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v.double()).to(v.dtype)


@dataclass
class Coupling:
    """A residual vector r dropped at a forced restart, which every later vector still sees.

    Attributes:
        row: the index of the Lanczos vector r was the residual of (``H q_row = ... + beta r``).
        beta: the norm of that residual, the coupling T dropped.
        start: the index of the first vector after the restart (``row + 1``).
        weights: ``<r, q_j>`` for the vectors ``q_start, ..., q_{n-1}``: the projection of H has
            ``beta * weights`` in row ``row``, columns ``start:n`` (and symmetrically).
        rest: r less its components along those vectors (float64): the part of ``H q_row`` outside
            the basis, ``beta * rest``.
    """

    row: int
    beta: float
    start: int
    weights: list[float]
    rest: torch.Tensor


def ritz_pairs(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal with diagonal
    ``alphas`` and off-diagonal ``betas[:len(alphas) - 1]``, in float64 (LAPACK's ``dstevd``)."""
    k = len(alphas)
    if k == 1:  # dstevd's binding wants an off-diagonal of at least one entry
        return np.array([alphas[0]], dtype=np.float64), np.ones((1, 1))
    # T's entries come from products the operator wrapper has checked finite: no check here. LAPACK's driver is
    # called directly: scipy's eigh_tridiagonal (the same dstevd) cost three times as much around it, once per
    # Lanczos step of the cubic solver (35 us of about 45, a few % of a CureNewton call)
    theta, S, info = scipy.linalg.lapack.dstevd(np.asarray(alphas, dtype=np.float64),
                                                np.asarray(betas[:k - 1], dtype=np.float64), compute_v=1)
    if info:
        raise np.linalg.LinAlgError(f"the tridiagonal eigensolver (LAPACK dstevd) failed to converge (info {info})")
    return theta, S


def check_basis_fits(vectors: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
    """ValueError, before any product, where a basis of ``vectors`` Lanczos vectors of d entries does not
    fit in the memory available on ``device``."""
    check_fits_in_memory(f"a Lanczos basis of {vectors} vectors of d = {d:,} ({dtype})", vectors * d * dtype.itemsize,
                         device, "take fewer Lanczos steps (newton_pinv's rank, lanczos's k, the Krylov solver's "
                         "k_max) or fewer parameters")


class LanczosProcess:
    """The Lanczos recurrence on ``op`` from ``v0``, one product per :meth:`step`.

    State, after n steps: ``alphas``/``betas`` (lists of n floats; ``betas[j]`` couples vector j
    with j + 1, and the last one is the norm of the residual vector ``q``), the stored vectors
    ``basis[:n]`` (rows; only when ``store_basis``), ``couplings``: the residual vectors dropped at
    forced restarts (see :class:`Coupling`), which keep the projection of H on the basis and the
    residual norms exact (see :meth:`ritz_pairs`, :meth:`residual_norm`); with "selective", ``drift``:
    the parts of ``H q_j`` the purges removed, as pairs ``(j, g)`` meaning ``basis[:len(g)]^T g``;
    ``dropped``: the largest coupling a breakdown set to 0 (a beta at most ``breakdown_rtol`` eps ||T||; 0.0
    where every breakdown was the step op's 0), the error the closed space carries; ``breakdowns``: every
    breakdown as ``(row, bound)``: the coupling between ``basis[row]`` and the residual vector set to 0 there
    was at most ``bound`` (the beta dropped; for the step op's 0 the norm formed again, see ``breakdown_rtol``,
    else its threshold ``16 eps ||H q_row||``), which :meth:`breakdown_error` turns into a bound on what T
    leaves out (none recorded where the basis fills the space).

    Args:
        op: a validated operator.
        v0: the (d,) start vector (normalised here; must be non-zero).
        reorth: "full", "selective" or "none".
        store_basis: keep the Lanczos vectors (needed for "full"/"selective", restarts and Q y).
        capacity: most steps (the basis is allocated once, capacity x d).
        generator: random source for restart vectors.
        breakdown_rtol: a beta at most this many machine epsilons of ||T|| is a breakdown (default
            :data:`PROCESS_BREAKDOWN_EPS`). 0 with reorth="full": only a residual vector of exactly 0 is one;
            where the step op reads a breakdown (``beta <= 16 eps ||H q||``, returned as 0) the residual
            vector is formed again (float64, one pass over the basis) and the process goes on from it. The
            cubic solver takes 0 under "full": a beta of 100 eps ||T|| (1.2e-5 ||T|| in float32) or 16 eps
            ||H q|| is not always rounding (float32 Lanczos vectors have a residual of 8e-6 where the exact
            Krylov space is invariant to 1e-7), T keeps it, and what follows is made orthogonal to the basis
            whatever it holds.
    """

    def __init__(self, op: SolverOperator, v0: torch.Tensor, *, reorth: Reorth, store_basis: bool,
                 capacity: int, generator: torch.Generator, breakdown_rtol: float = PROCESS_BREAKDOWN_EPS) -> None:
        check_choice("reorth", reorth, ("full", "selective", "none"))
        if op.dtype not in (torch.float32, torch.float64):  # what the Lanczos step's kernels take
            raise TypeError(f"Lanczos needs float32 or float64 vectors, got the operator's dtype {op.dtype}: "
                            "convert H and the vector to float32")
        if reorth != "none" and not store_basis:
            raise ValueError(f"reorth={reorth!r} needs the stored basis; use reorth='none' in two-pass mode")
        d = op.shape[0]
        self.op = op
        self.reorth = reorth
        self.generator = generator
        self.capacity = min(capacity, d)
        if store_basis and op.device.type != "cpu":  # on the CPU only the rows written take memory
            check_basis_fits(self.capacity, d, op.dtype, op.device)
        self.basis = torch.empty((self.capacity, d), dtype=op.dtype, device=op.device) if store_basis else None
        self.q = _unit(v0)
        self.q_prev: torch.Tensor | None = None
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.restarts = 0
        self._block_start = 0  # the first step after the last restart
        self.couplings: list[Coupling] = []
        self._ritz = torch.empty((0, d), dtype=op.dtype, device=op.device)
        self._ritz_coef = np.zeros((0, 0))  # the Ritz vectors' coefficients in the basis (columns)
        self.drift: list[tuple[int, np.ndarray]] = []
        self._anorm = 0.0
        self.stopped = False
        self.dropped = 0.0  # the largest coupling a breakdown set to 0 (0.0: every breakdown was the op's 0)
        self.breakdowns: list[tuple[int, float]] = []  # (row, bound on the coupling set to 0 there)
        self.breakdown_rtol = check_number("breakdown_rtol", breakdown_rtol, 0.0)
        self.eps = torch.finfo(op.dtype).eps

    @property
    def n(self) -> int:
        """Steps taken (= Lanczos vectors, = size of T)."""
        return len(self.alphas)

    @property
    def can_restart(self) -> bool:
        """Whether a vector orthogonal to everything stored exists and fits in the capacity."""
        return self.basis is not None and self.n < self.capacity and self.n < self.op.shape[0]

    @property
    def exhausted(self) -> bool:
        """No further step is possible: capacity reached, or a breakdown that cannot restart."""
        return self.n >= self.capacity or self.stopped

    def step(self) -> torch.Tensor:
        """One Lanczos step (one product); returns ``H q`` for the vector just processed.
        On breakdown with a stored basis, restarts (see :meth:`restart`)."""
        j = self.n
        hq = self.op.matvec(self.q)
        if self.basis is not None:
            self.basis[j] = self.q
        against = self.basis[:j + 1] if self.reorth == "full" else None
        if self.reorth == "none" and self._block_start > 0:
            # the earlier blocks only: without it rounding regrows their eigenvalues here, which the block
            # structure then takes for repeated copies (within a block the ghosts are told apart)
            against = self.basis[:self._block_start]
        beta_prev = self.betas[-1] if j else 0.0
        q_next, alpha_t, beta_t = lanczos_step(hq, self.q, self.q_prev, beta_prev, against)
        alpha, beta = float(alpha_t), float(beta_t)
        recovered = None  # the norm of the residual vector behind the op's breakdown, where formed again
        if beta == 0.0 and self.breakdown_rtol == 0.0 and self.reorth == "full" and j + 1 < self.op.shape[0]:
            # the op's breakdown (beta <= 16 eps ||H q||) may hold a coupling that is not rounding (the
            # residual of float32 vectors): formed again, the process goes on from it (see breakdown_rtol)
            # where it is above eps ||H q||; below, what is left is rounding inside span(Q) (a decoupled
            # hard case: 6e-33 eps ||H q||), whose direction no reorthogonalisation makes new: a breakdown
            q_rec, recovered = self._recover(hq, alpha, beta_prev, against)
            if recovered > self.eps * norm64(hq):
                q_next, beta = q_rec, recovered
        q64 = self.q.double() if self.couplings else None
        for cp in self.couplings:
            # q is orthogonal to the vectors before the restart, but H q has the part beta <r, q> along
            # basis[row] (H is symmetric): it is the coupling entry, kept out of q_next (twice, like CGS2;
            # already done by "full"). r's part along q is taken off what stays outside the basis.
            weight = 0.0
            for _ in range(2):
                w = torch.dot(cp.rest, q64)
                cp.rest = cp.rest - w * q64
                weight += float(w)
            cp.weights.append(weight)
            row = self.basis[cp.row]
            for _ in range(2):
                q_next = q_next - torch.dot(row, q_next) * row
            shrink = norm64(q_next)
            beta *= shrink
            q_next = q_next / shrink if shrink > 0 else q_next
        self.alphas.append(alpha)
        self.betas.append(beta)
        self._anorm = max(self._anorm, abs(alpha), beta)
        self.q_prev, self.q = self.q, q_next
        if self.reorth == "selective":
            # Before the breakdown test: near invariance beta is the lost orthogonality (about
            # sqrt(eps)), and only the projection on the converged Ritz vectors removes it.
            self._purge()
            self._update_ritz()
        # every product so far below the smallest entry whose square is a normal float64 (the norms that
        # alpha and beta bound say when to look): the steps' norms lose those squares (beta 0, read as a
        # breakdown at every step, at 1e-170; eigenvalues off in the fourth digit at 1e-160), as the solvers
        # refuse for g
        # (float32 products below float32's smallest normal number are subnormal, their few digits as lost: an
        # H of entries ~1e-44 gave eigenvalues ~5e3)
        floor = max(SMALLEST_SQUARED, torch.finfo(hq.dtype).tiny)
        if self._anorm < floor * math.sqrt(hq.numel()) and 0.0 < float(hq.abs().max()) < floor:
            where = ("where their squares underflow float64" if floor == SMALLEST_SQUARED
                     else f"below {hq.dtype}'s smallest normal number (subnormal: digits lost)")
            raise ValueError(f"the products H q have entries all below {floor:.1e} (largest |entry| "
                             f"{float(hq.abs().max()):.3e}), {where}: scale the operator up")
        if self.betas[-1] <= self.breakdown_rtol * self.eps * self._anorm:
            # Drop the rounding-level coupling (an error of at most breakdown_rtol eps ||T|| in T), recorded for
            # breakdown_error: the op's 0 stands for a beta up to its threshold, 16 eps ||H q|| (one norm, at a
            # breakdown only), or the norm formed again. Where the basis fills the space the residual of a square
            # Q is the rounding of every step, which no bound here counts: not recorded
            if j + 1 < self.op.shape[0]:
                bound = (self.betas[-1] if float(beta_t) != 0.0 else recovered if recovered is not None
                         else STEP_BREAKDOWN_EPS * self.eps * norm64(hq))
                if bound > 0.0:
                    self.breakdowns.append((j, bound))
            self.dropped = max(self.dropped, self.betas[-1])
            self.betas[-1] = 0.0
            if self.can_restart:
                self.restart()
            else:
                self.stopped = True
        return hq

    def _recover(self, hq: torch.Tensor, alpha: float, beta_prev: float,
                 against: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The residual vector that the step op read as a breakdown (returned as 0), formed again at a
        breakdown only: ``w = H q - alpha q - beta_prev q_prev`` in float64, made orthogonal to ``against``
        twice; returns ``(w / ||w||, ||w||)`` (zeros and 0.0 where w is 0)."""
        w = hq.double() - alpha * self.q.double()
        if self.q_prev is not None:
            w = w - beta_prev * self.q_prev.double()
        for _ in range(2):
            w = w - (against.T @ (against @ w.to(against.dtype))).double()
        beta = norm64(w)
        return ((w / beta).to(hq.dtype) if beta > 0.0 else torch.zeros_like(hq)), beta

    def restart(self, start: torch.Tensor | None = None) -> None:
        """Continue from ``start`` (default: a random vector), made orthogonal to all stored vectors
        and normalised (needs the basis; ``start`` must not lie in their span). T gets a zero coupling
        there; a non-zero residual vector r (a forced restart, not a breakdown) becomes a
        :class:`Coupling`. The new vector is not made orthogonal to r: the new block can then reach
        what r holds (e.g. an eigenvector that rounding carried out of the Krylov space), at the price
        of a rank-one coupling to the block before."""
        if not self.can_restart:
            raise ValueError("no restart possible: two-pass mode stores no basis, or the space is exhausted")
        if self.n and self.betas[-1] > 0.0:
            self.couplings.append(Coupling(self.n - 1, self.betas[-1], self.n, [], self.q.double()))
            self.betas[-1] = 0.0
        against = self.basis[:self.n]
        if start is None:
            start = torch.randn(self.op.shape[0], generator=self.generator, dtype=torch.float64)
        v = start.to(device=self.op.device, dtype=self.op.dtype)
        for _ in range(2):
            v = v - against.T @ (against @ v)
        self.q, self.q_prev = _unit(v), None
        self.restarts += 1
        self._block_start = self.n

    def ritz_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors (columns) of the projection of H on the basis,
        in float64: T's (tridiagonal) without forced restarts, else T's with the couplings' entries."""
        if not self.couplings:
            return ritz_pairs(self.alphas, self.betas)
        off = np.asarray(self.betas[:self.n - 1], dtype=np.float64)
        A = np.diag(np.asarray(self.alphas, dtype=np.float64)) + np.diag(off, 1) + np.diag(off, -1)
        for cp in self.couplings:
            entries = cp.beta * np.asarray(cp.weights)
            A[cp.row, cp.start:cp.start + len(entries)] = entries
            A[cp.start:cp.start + len(entries), cp.row] = entries
        return np.linalg.eigh(A)

    def _update_ritz(self) -> None:
        # T's Ritz pairs, couplings left out: the vectors before a forced restart then count as converged,
        # so the later vectors are kept orthogonal to them
        theta, S = ritz_pairs(self.alphas, self.betas)
        bounds = np.abs(self.betas[-1] * S[-1, :])
        good = bounds <= np.sqrt(self.eps) * max(np.abs(theta).max(), np.finfo(np.float64).tiny)
        if good.sum() <= self._ritz.shape[0]:
            return
        self._ritz_coef = S[:, good]
        coef = torch.as_tensor(self._ritz_coef.T, dtype=self.op.dtype, device=self.op.device)
        self._ritz = coef @ self.basis[:self.n]
        self._purge()

    def _purge(self) -> None:
        """Project the residual vector off the converged Ritz vectors R (twice, like CGS2); beta becomes
        the norm of what is left. The removed ``beta R c`` stays in ``H q_j``, so it is kept as drift:
        R is ``_ritz_coef^T basis``, so it is ``basis^T (beta _ritz_coef c)``."""
        if not self._ritz.shape[0]:
            return
        removed = np.zeros(self._ritz.shape[0])
        for _ in range(2):
            c = self._ritz @ self.q
            self.q = self.q - self._ritz.T @ c
            removed += c.double().cpu().numpy()
        self.drift.append((self.n - 1, self.betas[-1] * (self._ritz_coef @ removed)))
        shrink = norm64(self.q)
        self.betas[-1] *= shrink
        self.q = self.q / shrink if shrink > 0 else self.q

    def residual_norm(self, z: np.ndarray) -> float:
        """``||H Q z - Q A z||`` for a coefficient vector z, A the projection of H on the basis (see
        :meth:`ritz_pairs`; exact up to rounding): the residual vector's part ``beta_n z_n q``, each
        coupling's ``beta z_row rest`` (not orthogonal to q: summed as vectors) and the drift's
        ``basis^T sum_j z_j g_j`` (Q orthonormal to about sqrt(eps) under "selective", about orthogonal
        to the others)."""
        tail = self.betas[-1] * z[-1]
        if self.couplings:
            outside = tail * self.q.double()
            for cp in self.couplings:
                outside = outside + (cp.beta * z[cp.row]) * cp.rest
            tail = scaled_norm(outside)
        parts = [tail]
        if self.drift:
            drift = np.zeros(self.n)
            for j, g in self.drift:
                drift[:len(g)] += z[j] * g
            parts.append(scaled_norm(drift))
        # scaled: z may be a huge step's coefficients (a tiny cubic M), whose squares overflow
        return scaled_norm(np.array(parts))

    def breakdown_error(self, z: np.ndarray) -> float:
        """A bound on the part of ``||H Q z - Q A z||`` that the breakdowns' dropped couplings hold, which
        :meth:`residual_norm` leaves out (0.0 where none was dropped; scalar work only). A breakdown at
        ``row`` dropped ``beta r`` from ``H q_row`` (r a unit vector orthogonal to the basis then), and with
        it the entries ``beta <r, q_j>`` of A between q_row and every later vector q_j (their products' part
        along q_row, which the reorthogonalisation removes): r is not orthogonal to a restart's vector (in a
        basis that fills the space the restart's vector is r). Their sum ``beta (z_row r + q_row <r, Q_later
        z_later>)`` has norm at most ``beta sqrt(z_row^2 + ||z_later||^2)``; the breakdowns' bounds are added
        (a true bound, to rounding). Near the hard case z_later is the long step along the bottom
        eigenvector: a coupling of 2.7e-5 dropped at a float32 breakdown held a model gradient of 1.4e-3."""
        if not self.breakdowns:
            return 0.0
        total = 0.0
        for row, bound in self.breakdowns:
            later = scaled_norm(z[row + 1:]) if row + 1 < len(z) else 0.0
            total += bound * math.hypot(float(z[row]), later)
        return total

    def combine(self, coeffs: np.ndarray) -> torch.Tensor:
        """``Q coeffs`` for a (n,) or (n, m) float64 array, from the stored basis."""
        if self.basis is None:
            raise ValueError("combine needs the stored basis; use replay() in two-pass mode")
        c = torch.as_tensor(coeffs, dtype=self.op.dtype, device=self.op.device)
        return self.basis[:self.n].T @ c


def replay(op: SolverOperator, v0: torch.Tensor, num_steps: int, coeffs: np.ndarray) -> torch.Tensor:
    """Second pass of two-pass Lanczos: regenerate q_0 .. q_{n-1} from ``v0`` with the same
    recurrence (no reorthogonalisation; ``num_steps - 1`` products) and return ``Q coeffs``
    without storing Q. ``coeffs`` is (n,) or (n, m) float64; memory is O(d (m + 3))."""
    c = torch.as_tensor(coeffs, dtype=op.dtype, device=op.device)
    q, q_prev, beta = _unit(v0), None, torch.zeros((), dtype=torch.float64)
    out = torch.zeros((op.shape[0],) + tuple(c.shape[1:]), dtype=op.dtype, device=op.device)
    with op.fixed_weights():
        for j in range(num_steps):
            out += q.unsqueeze(-1) * c[j] if c.dim() == 2 else q * c[j]
            if j + 1 < num_steps:
                q_next, _, beta = lanczos_step(op.matvec(q), q, q_prev, beta, None)
                q_prev, q = q, q_next
    return out


@dataclass
class LanczosResult:
    """What :func:`lanczos` returns.

    Attributes:
        eigenvalues: (m,) float64 Ritz values wanted by ``which``, ascending.
        eigenvectors: (d, m) Ritz vectors (the operator's dtype), or None if not asked for.
        alphas: (n,) float64 diagonal of T.
        betas: (n,) float64: ``betas[:-1]`` is T's off-diagonal (0 where a restart happened),
            ``betas[-1]`` the norm of the last residual vector.
        residual_bounds: (m,) float64 ``||H z - theta z||`` for each Ritz pair (computed from T, and
            for "selective" what its projections removed), in float64 on the computed basis: for a
            float32 operator they leave out the rounding of the Ritz vectors to float32 (about
            ``eps32 ||H||``), so a ``tol`` below that is met on paper only.
        converged: every wanted pair has ``residual_bound <= tol * max|theta|`` (the largest |Ritz value| of
            all, wanted or not), and there are
            ``num_eigs`` of them, or as many as steps taken (an invariant subspace ended the iteration); under
            reorth="none" fewer distinct eigenvalues than that may have been found (see the module docstring).
        num_hvps: products used (both passes).
        num_steps: n, the size of T.
        restarts: restarts after a breakdown.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    alphas: torch.Tensor
    betas: torch.Tensor
    residual_bounds: torch.Tensor
    converged: bool
    num_hvps: int
    num_steps: int
    restarts: int


GHOST_RTOL_EPS = 100.0
"""Ritz values closer than this many machine epsilons of ||T|| (plus their residual bounds) may be one
eigenvalue: ghost copies under reorth="none" agree to a few eps ||T||."""


def distinct_pairs(theta: np.ndarray, bounds: np.ndarray, eps: float) -> np.ndarray:
    """Indices (ascending) of Ritz pairs that certify distinct eigenvalues: each pair certifies an
    eigenvalue within its residual bound of its Ritz value, so two pairs whose intervals (widened by
    ``GHOST_RTOL_EPS * eps * max|theta|``, the rounding of the values themselves) overlap may be one
    eigenvalue seen twice. The pairs are taken in order of increasing bound; one that overlaps a pair
    already taken is dropped (the ghost copies of reorth="none", and an unconverged copy on its way
    there)."""
    slack = GHOST_RTOL_EPS * eps * max(np.abs(theta).max(initial=0.0), np.finfo(np.float64).tiny)
    kept: list[int] = []
    for i in np.argsort(bounds, kind="stable"):
        if all(abs(theta[i] - theta[j]) > bounds[i] + bounds[j] + slack for j in kept):
            kept.append(int(i))
    return np.sort(np.asarray(kept, dtype=np.int64))


def _distinct_blocks(proc: LanczosProcess) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (ascending), vectors and residual bounds of a reorth="none" process, ghost copies
    dropped (:func:`distinct_pairs`) within each block of T. A block ends at a breakdown (beta 0, the
    restart's vector orthogonal to the stored basis), so a value found again in a later block is a
    repeated eigenvalue, kept (``lanczos`` makes no forced restart: T is block tridiagonal)."""
    n = proc.n
    cuts = [j + 1 for j in range(n - 1) if proc.betas[j] == 0.0]
    thetas, vectors, bounds = [], [], []
    for a, b in zip([0, *cuts], [*cuts, n]):
        theta, S = ritz_pairs(proc.alphas[a:b], proc.betas[a:b])
        block_bounds = np.abs(proc.betas[b - 1] * S[-1, :])  # 0 for a block a breakdown closed
        keep = distinct_pairs(theta, block_bounds, proc.eps)
        padded = np.zeros((n, len(keep)))
        padded[a:b] = S[:, keep]
        thetas.append(theta[keep]), vectors.append(padded), bounds.append(block_bounds[keep])
    theta = np.concatenate(thetas)
    order = np.argsort(theta, kind="stable")
    return theta[order], np.concatenate(vectors, axis=1)[:, order], np.concatenate(bounds)[order]


def _scale(theta: np.ndarray) -> float:
    """What ``tol`` is relative to: the largest |Ritz value| (not 0)."""
    return max(float(np.abs(theta).max(initial=0.0)), np.finfo(np.float64).tiny)


def _wanted(theta: np.ndarray, which: Which, m: int) -> np.ndarray:
    """Indices (into ascending theta) of the m wanted Ritz values, ascending."""
    n = len(theta)
    m = min(m, n)
    if which == "LA":
        return np.arange(n - m, n)
    if which == "SA":
        return np.arange(m)
    top = (m + 1) // 2  # BE: half from each end, the extra one from the top (as ARPACK)
    return np.unique(np.concatenate([np.arange(m - top), np.arange(n - top, n)]))


def lanczos(
    H: Any,
    k: int,
    *,
    v0: torch.Tensor | None = None,
    reorth: Reorth = "full",
    two_pass: bool = False,
    which: Which = "LA",
    num_eigs: int | None = None,
    tol: float = 1e-10,
    seed: int = 0,
    return_eigenvectors: bool = True,
) -> LanczosResult:
    """Extreme eigenpairs of a symmetric operator by at most ``k`` Lanczos steps.

    Args:
        H: a dense symmetric matrix or an operator (see :func:`~.operators.as_operator`); a
            function ``v -> H v`` needs ``v0``.
        k: most Lanczos steps (capped at d).
        v0: start vector (default: Gaussian from ``seed``); only its direction matters.
        reorth: "full", "selective" or "none" (see the module docstring).
        two_pass: do not store the Lanczos vectors; Ritz vectors are formed by a second pass that
            regenerates them (about n more products), in O(d num_eigs) memory. Needs
            reorth="none"; stops at a breakdown (no restart without the basis).
        which: "LA" largest, "SA" smallest, "BE" both ends (half each, one more from the top).
        num_eigs: how many Ritz pairs to return (default 1, or 2 for "BE"), at most ``min(k, d)``;
            fewer only where an invariant subspace of smaller dimension ends the iteration.
        tol: stop early once every wanted pair has residual bound <= tol * max|theta| (the largest
            |Ritz value|, wanted or not; 0 runs all k steps). A bound certifies that a Ritz value is an
            eigenvalue, not that it is an extreme one: a start vector with no component along an
            eigenvector never sees it (nor, in rounding, one whose block falls just short of a breakdown:
            an invariant block is only taken for one when its beta reaches 100 eps ||T||). After
            a breakdown (the pairs of an invariant subspace, converged exactly) the process restarts
            from a random vector and stops no earlier than that block has converged its own wanted
            Ritz values (``num_eigs`` of them, or all it has), or has broken down in turn with no Ritz
            value beyond the least extreme wanted one (by more than the tolerance; then the space the
            earlier blocks left holds nothing beyond the wanted values: a null space of a low-rank H costs
            one product a block, not the rest of ``k``).
        seed: seeds the start and restart vectors (an int in [0, 2**63), Python or numpy).
        return_eigenvectors: form the Ritz vectors (one-pass: from the basis; two-pass: second pass).

    Returns:
        A :class:`LanczosResult`.
    """
    if v0 is None:
        if callable(H) and not isinstance(H, torch.Tensor) and not hasattr(H, "matvec"):
            raise ValueError("lanczos: a function v -> H v needs v0 (its length, dtype and device are the "
                             "operator's)")
        op = as_operator(H)
    else:  # v0 also gives the dimension, dtype and device of a function v -> H v
        v0 = check_vector(v0, "v0")
        op = as_operator(H, v0.shape[0], dtype=v0.dtype, device=v0.device, name="v0")
    d = op.shape[0]
    if d == 0:
        raise ValueError("H is empty (0 x 0): it has no eigenvalues")
    check_int("k", k, 1)
    check_choice("which", which, ("LA", "SA", "BE"))
    m = check_int("num_eigs", 2 if which == "BE" else 1, 1) if num_eigs is None else check_int("num_eigs", num_eigs, 1)
    if m > min(k, d):  # k steps give at most k Ritz pairs
        given = f"num_eigs = {m}" if num_eigs is not None else f"which='BE' (without num_eigs: {m})"
        raise ValueError(f"{given} Ritz pairs need at least as many Lanczos steps and dimensions: k = {k}, "
                         f"d = {d}")
    check_number("tol", tol, 0.0)
    two_pass, return_eigenvectors = check_bool("two_pass", two_pass), check_bool("return_eigenvectors",
                                                                               return_eigenvectors)
    if two_pass and reorth != "none":
        raise ValueError("two_pass=True keeps no basis to reorthogonalise against: use reorth='none'")
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    if v0 is None:
        v0 = torch.randn(d, generator=gen, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    elif not bool(v0.abs().max() > 0):
        raise ValueError("v0 must be non-zero")
    elif not 0.0 < norm64(v0) < math.inf:
        # only its direction matters: one whose norm underflows (or overflows) float64 would be normalised to
        # Inf (or 0) entries
        v0 = v0 / v0.abs().max()
    # the k steps fill the basis unless it converges first; off the CPU the process checks its reservation
    if not two_pass and op.device.type == "cpu":
        check_basis_fits(min(k, d), d, op.dtype, op.device)
    proc = LanczosProcess(op, v0, reorth=reorth, store_basis=not two_pass, capacity=k, generator=gen)

    def wanted_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The wanted Ritz values, vectors and residual bounds, and the scale of ``tol``: the largest |Ritz
        value| of all (T's norm, so that wanted values near 0, a null space, can converge too)."""
        if reorth == "none":  # one pair per eigenvalue each block tells apart: ghost copies dropped
            theta, S, bounds = _distinct_blocks(proc)
            idx = _wanted(theta, which, m)
            return theta[idx], S[:, idx], bounds[idx], _scale(theta)
        theta, S = proc.ritz_pairs()
        idx = _wanted(theta, which, m)
        bounds = np.array([proc.residual_norm(S[:, i]) for i in idx])
        return theta[idx], S[:, idx], bounds, _scale(theta)

    def converged(theta: np.ndarray, bounds: np.ndarray, scale: float) -> bool:
        """Every pair within tol, and as many as asked for (or as steps taken: an invariant subspace ended the
        iteration early)."""
        return len(theta) >= min(m, proc.n) and bool(np.all(bounds <= tol * scale))

    def block_converged(start: int, scale: float) -> bool:
        """Whether the block begun by the last restart (at step ``start``) has converged its own wanted Ritz
        values (as many as ``num_eigs``, on the wanted side): until then the space the restart opened may
        hold more extreme eigenvalues (the pairs of an invariant subspace converge exactly, extreme or not)."""
        if proc.n == start:
            return False
        theta, S = ritz_pairs(proc.alphas[start:], proc.betas[start:])
        return all(abs(proc.betas[-1] * S[-1, i]) <= tol * scale for i in _wanted(theta, which, m))

    bottom = {"LA": 0, "SA": m, "BE": m - (m + 1) // 2}[which]  # how many wanted values are at the low end
    top_wanted, bottom_wanted = bottom < m, bottom > 0  # the wanted sides ("BE" with one value: the top only)

    def least_extreme() -> np.ndarray | None:
        """The least extreme wanted value on each wanted side (top, then bottom), signed so that larger is more
        extreme (None while there are fewer than ``num_eigs`` pairs)."""
        theta = wanted_pairs()[0]
        if len(theta) < m:
            return None
        return np.array(([theta[bottom]] if top_wanted else []) + ([-theta[bottom - 1]] if bottom_wanted else []))

    def found_beyond(start: int, end: int, edge: np.ndarray | None) -> bool:
        """Whether the block of steps [start, end) has a Ritz value beyond ``edge`` on a wanted side, by more
        than the tolerance (None: the wanted values were not all there yet)."""
        if edge is None:
            return True
        theta, _ = ritz_pairs(proc.alphas[start:end], proc.betas[start:end])
        extremes = np.array(([theta[-1]] if top_wanted else []) + ([-theta[0]] if bottom_wanted else []))
        return bool(np.any(extremes > edge + tol * wanted_pairs()[3]))

    block_start = 0  # where the block after the last breakdown began
    edge_then: np.ndarray | None = None  # the least extreme wanted values when that block began
    with op.fixed_weights():  # the iteration's products, at one H
        while not proc.exhausted:
            restarts = proc.restarts
            proc.step()
            settled = False  # the block this step closed found nothing beyond the wanted values
            if proc.restarts > restarts:  # a breakdown closed a block, and a restart began the next
                if tol > 0:
                    # A closed block is an invariant subspace holding a copy of every eigenvalue its random start
                    # vector touches (all, with probability 1, of the space orthogonal to the earlier blocks): if it
                    # found nothing beyond the wanted values, that space holds nothing beyond them (a null space)
                    settled = block_start > 0 and not found_beyond(block_start, proc.n, edge_then)
                    edge_then = least_extreme()
                block_start = proc.n
            if tol > 0 and proc.n >= m:
                theta, _, bounds, scale = wanted_pairs()
                if converged(theta, bounds, scale) and (block_start == 0 or settled
                                                        or block_converged(block_start, scale)):
                    break
    theta, S, bounds, scale = wanted_pairs()
    vectors = None
    if return_eigenvectors:
        vectors = replay(op, v0, proc.n, S) if two_pass else proc.combine(S)
    return LanczosResult(
        eigenvalues=torch.as_tensor(theta),
        eigenvectors=vectors,
        alphas=torch.tensor(proc.alphas, dtype=torch.float64),
        betas=torch.tensor(proc.betas, dtype=torch.float64),
        residual_bounds=torch.as_tensor(bounds),
        converged=converged(theta, bounds, scale),
        num_hvps=op.num_hvps,
        num_steps=proc.n,
        restarts=proc.restarts,
    )
