"""Adaptive cubic regularisation (ARC): minimise a smooth function by cubic-regularised Newton steps
whose constant M adapts to what each step achieves (Cartis, Gould and Toint, 2011).

Each iteration, at the point w with value f and gradient g, the Krylov solver
(:class:`~.cubic.KrylovCubicSolver`) minimises the cubic model
``m(s) = g^T s + 1/2 s^T H s + (M/6) ||s||^3`` (H from ``hessian(w)``); the trial point w + s is
accepted when the actual decrease ``f(w) - f(w + s)`` is at least ``eta1`` times the decrease the
model predicts, ``-m(s)``. A rejected trial multiplies M by ``gamma`` and re-solves the small
problem on the same Lanczos tridiagonal (no new Hessian-vector products); a very successful one
(ratio >= ``eta2``) divides M by ``gamma`` for the next iteration. A step whose predicted decrease
is below what f can resolve (16 eps |f(w)| in w's precision: an M too large for the problem, whose
ratio would be rounding) divides M by ``gamma`` and re-solves, down to ``M_min`` and at most
``max_rejections`` times in one iteration, unless a rejection in this iteration raised M (then, or once
those re-solves are spent, the iteration stops: "no_progress"; that last trial is recorded
unevaluated). A trial whose f equals f(w) to the last bit stops it too ("no_progress": a raised M only
gives shorter steps). A trial whose step or model value overflows (an M far too small, in g's dtype or beyond
float64) is rejected without evaluating f. After ``max_rejections``
rejected trials in a row in one iteration the call stops ("max_rejections"): with ``gamma`` near 1 and
an M far too small, raising M to a workable value could otherwise take millions of trials. Since
``eta1 > 0`` and the predicted decrease is positive, every accepted step lowers f: the result is never
worse than w0.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import all_finite, check_int, check_number, check_option_names, check_seed, norm64
from .cubic import KrylovCubicSolver, StepOverflow
from .operators import check_vector

#: the Krylov solver's options for the iterations (an inexact subproblem solve suffices: the accept
#: test, not the subproblem's accuracy, keeps the iteration safe; the hard-case probe is off for the
#: same reason); ``solver_options`` of :func:`adaptive_cubic_newton` override them
KRYLOV_DEFAULTS: Mapping[str, Any] = {"k_max": 50, "kappa": 0.5, "guard": False}


@dataclass(frozen=True)
class ARCTrial:
    """One trial step of :func:`adaptive_cubic_newton`.

    Attributes:
        iteration: the index of the accepted step this trial tries to make (0, 1, ...).
        M: the cubic constant it was solved with.
        predicted: the decrease the cubic model predicts, ``-m(s)``.
        actual: ``f(w) - f(w + s)`` (-inf if f(w + s) is not finite, or the step or its model value
            overflowed: such a trial is rejected without evaluating f; NaN for the last trial of a
            "no_progress" stop, whose predicted decrease f cannot resolve: not evaluated either).
        ratio: ``actual / predicted`` (-inf for an overflowed trial, NaN for the "no_progress" one).
        accepted: whether w moved to w + s.
        step_norm: ||s||.
        hvps: Hessian-vector products this trial used (0 for a re-solve after a rejection; the
            first trial of an iteration has its Lanczos run's, also where M was lowered before it).
        lanczos_steps: the size of the Lanczos tridiagonal the step came from.
        grad_norm: ||g|| at w, where the step starts.
    """

    iteration: int
    M: float
    predicted: float
    actual: float
    ratio: float
    accepted: bool
    step_norm: float
    hvps: int
    lanczos_steps: int
    grad_norm: float


@dataclass
class ARCResult:
    """What :func:`adaptive_cubic_newton` returns.

    Attributes:
        w: the final point (the last accepted one; w0 if none was accepted).
        value: f(w).
        gradient: grad f(w).
        steps: accepted steps.
        num_hvps: Hessian-vector products used in all.
        M: the cubic constant the next step would have used (a warm start for a later call).
        stop_reason: "tolerance" (``||g|| <= tol`` at ``w``, also where the last step allowed reached it),
            "max_iterations", "hvp_budget",
            "no_progress" (the predicted decrease fell below the resolution of f after a rejection
            raised M, or with M at M_min, or a trial's f equals f(w) to the last bit: no step can be
            told apart from rounding) or
            "max_rejections" (that many trials in a row were rejected in one iteration; M is then the
            raised one the next trial would have used).
        trials: every trial in order.
        initial_value: f(w0).
        initial_grad_norm: ||grad f(w0)||.
    """

    w: torch.Tensor
    value: float
    gradient: torch.Tensor
    steps: int
    num_hvps: int
    M: float
    stop_reason: str
    trials: list[ARCTrial] = field(default_factory=list)
    initial_value: float = math.nan
    initial_grad_norm: float = math.nan


def check_arc_options(owner: str, *, M: Any, max_iterations: Any, tol: Any, hvp_budget: Any, eta1: Any,
                      eta2: Any, gamma: Any, M_min: Any, max_rejections: Any) -> dict[str, Any]:
    """The numeric options of :func:`adaptive_cubic_newton`, checked and normalised (ValueError
    naming ``"<owner>: <option>"``; methods that wrap the loop check them when they are built)."""
    prefix = f"{owner}: " if owner else ""
    eta1 = check_number(f"{prefix}eta1", eta1, 0.0, 1.0, strict=True, strict_high=True)
    return {"M": check_number(f"{prefix}M", M, 0.0, strict=True),
            "max_iterations": check_int(f"{prefix}max_iterations", max_iterations, 1),
            "tol": check_number(f"{prefix}tol", tol, 0.0),
            "hvp_budget": None if hvp_budget is None else check_int(f"{prefix}hvp_budget", hvp_budget, 0),
            "eta1": eta1,
            "eta2": check_number(f"{prefix}eta2", eta2, eta1, strict=True),
            "gamma": check_number(f"{prefix}gamma", gamma, 1.0, strict=True),
            "M_min": check_number(f"{prefix}M_min", M_min, 0.0, strict=True),
            "max_rejections": check_int(f"{prefix}max_rejections", max_rejections, 1)}


def _resolution(f: float, dtype: torch.dtype) -> float:
    """The smallest decrease of f that rounding cannot fake at a point where f has this value: 16 eps |f|
    in w's precision, taken at each accepted point (taken once at w0, with |f| floored at 1, it stopped
    a run with "no_progress" where f had fallen by orders of magnitude and still resolved its steps)."""
    return 16.0 * torch.finfo(dtype).eps * max(abs(f), torch.finfo(torch.float64).tiny)


def _value(value: Callable[[torch.Tensor], float], w: torch.Tensor, where: str) -> float:
    """``float(value(w))``, or TypeError saying what ``value`` returned at ``where`` (not float()'s message)."""
    f = value(w)
    try:
        return float(f)
    except (TypeError, ValueError, RuntimeError):
        shape = f" of shape {tuple(f.shape)}" if isinstance(f, torch.Tensor) else ""
        raise TypeError(f"adaptive_cubic_newton: value must return a real number (a float or a one-element tensor), "
                        f"got {type(f).__name__}{shape} at {where}") from None


def _checked_gradient(gradient: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, name: str) -> torch.Tensor:
    """``gradient(w)``, a finite (d,) vector of w's dtype and device (a float64 gradient of a float32 w
    would make the returned w float64; one of another length would fail inside torch's arithmetic)."""
    g = check_vector(gradient(w), name)
    if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
        raise ValueError(f"adaptive_cubic_newton: {name} is a {tuple(g.shape)} {g.dtype} tensor on {g.device}; it "
                         f"must be like w: {tuple(w.shape)} {w.dtype} on {w.device}")
    return g


def adaptive_cubic_newton(
    value: Callable[[torch.Tensor], float],
    gradient: Callable[[torch.Tensor], torch.Tensor],
    hessian: Callable[[torch.Tensor], Any],
    w0: torch.Tensor,
    *,
    M: float = 1.0,
    max_iterations: int = 10,
    tol: float = 0.0,
    hvp_budget: int | None = None,
    eta1: float = 0.1,
    eta2: float = 0.9,
    gamma: float = 2.0,
    M_min: float = 1e-6,
    max_rejections: int = 1000,
    solver_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> ARCResult:
    """Minimise f from w0 by adaptive cubic regularisation (see the module docstring).

    Args:
        value: ``w -> f(w)`` (a float; NaN/Inf rejects the trial). Not called at a trial point with
            NaN/Inf entries (a step that overflowed): that trial is rejected as such, so ``value`` may
            refuse non-finite points (as :class:`~unlearn_kernels.curvature.Objective` does).
        gradient: ``w -> grad f(w)``, a (d,) tensor of w's dtype and device.
        hessian: ``w -> H(w)``, an operator the solvers accept (a dense matrix, a curvature
            operator, an object with ``matvec``, ...). It may be a sampled or approximate Hessian:
            the accept test uses ``value`` only. Called once per accepted point.
        w0: the (d,) start point (floating point, finite).
        M: the cubic constant of the first trial, > 0.
        max_iterations: most accepted steps, >= 1 (1: one cubic step, with M raised until the
            step is accepted, at most ``max_rejections`` times).
        tol: stop when ``||grad f(w)|| <= tol`` (>= 0; checked before every step).
        hvp_budget: stop before a new Lanczos run once this many products were used; a run's
            ``k_max`` is capped at what is left (the hard-case probe, off by default, can add up to
            its ``probe_steps``; 0: no step; None: no budget).
        eta1: the accept threshold on the ratio, in (0, eta2).
        eta2: the "very successful" threshold on the ratio, in (eta1, inf).
        gamma: the factor M is raised by after a rejection and lowered by after a very
            successful step, > 1.
        M_min: the smallest M after lowering, > 0 (lowering never raises an M given below it).
        max_rejections: most rejected trials in a row in one iteration, >= 1 (default 1000: M raised by
            up to gamma**1000, 1e301 at gamma 2, so an M down to about 1e-300 of a workable one still
            reaches a step, while a gamma near 1 cannot run for ever); the last of them ends the call
            ("max_rejections") at the last accepted point (w0 if none). It caps the re-solves with M
            lowered in one iteration too (a step too short to show in f), after which the call ends
            ("no_progress").
        solver_options: options of :class:`~.cubic.KrylovCubicSolver` over
            :data:`KRYLOV_DEFAULTS` (not ``seed``, nor ``two_pass``: see the Raises).
        seed: seeds the Krylov solver's random vectors, an int in [0, 2**63): the solver of accepted
            step k gets ``(seed + k) % 2**63`` (so a seed near the top wraps around to 0 rather than
            leave torch's seed range).

    Returns:
        An :class:`ARCResult`.

    Raises:
        ValueError: bad options (``two_pass`` among the solver options: the re-solve after a rejected
            trial would replay the Lanczos products with an operator that, reading the model's weights, takes
            them at the trial point), a non-finite w0, f(w0) or gradient (what ``gradient`` returns at
            an accepted point must be finite, and of w's shape, dtype and device). TypeError: ``value``,
            ``gradient`` or ``hessian`` not callable, a w0 that is not float32 or float64, ``value``
            returning something that is not a number, ``solver_options`` not a mapping or with an unknown
            option.
    """
    for name, function in (("value", value), ("gradient", gradient), ("hessian", hessian)):
        if not callable(function):
            raise TypeError(f"adaptive_cubic_newton: {name} must be a function of w, got {type(function).__name__}")
    w = check_vector(w0, "w0")
    if w.dtype not in (torch.float32, torch.float64):  # the Krylov solver's Lanczos steps take these only
        raise TypeError(f"adaptive_cubic_newton: w0 must be float32 or float64, got {w.dtype}")
    checked = check_arc_options("", M=M, max_iterations=max_iterations, tol=tol, hvp_budget=hvp_budget, eta1=eta1,
                                eta2=eta2, gamma=gamma, M_min=M_min, max_rejections=max_rejections)
    M, max_iterations, tol, hvp_budget = checked["M"], checked["max_iterations"], checked["tol"], checked["hvp_budget"]
    eta1, eta2, gamma, M_min = checked["eta1"], checked["eta2"], checked["gamma"], checked["M_min"]
    max_rejections = checked["max_rejections"]
    seed = check_seed("seed", seed)
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be None or a mapping of KrylovCubicSolver option names to values, "
                        f"got {type(solver_options).__name__}")
    options = {**KRYLOV_DEFAULTS, **(solver_options or {})}
    if "seed" in options:
        raise ValueError("solver_options must not set 'seed': pass seed= (each step's solver gets "
                         "(seed + step) % 2**63)")
    check_option_names("solver_options", options, KrylovCubicSolver, {"H", "g", "seed"})
    if options.get("two_pass"):
        # a rejected trial's re-solve forms its step by replaying the Lanczos products with hessian(w)'s operator,
        # which, reading the model's weights, would take them at the trial point value() left (a wrong step)
        raise ValueError("solver_options two_pass is not supported: the re-solve after a rejected trial replays the "
                         "Lanczos products, which an operator that reads the model's weights would take at the "
                         "trial point")
    k_max = check_int("solver_options['k_max']", options.pop("k_max"), 1)
    try:  # the values now, before any work, not at the first step (a 1 x 1 problem: no products)
        KrylovCubicSolver(torch.zeros(1, 1), torch.zeros(1), seed=seed, **options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"solver_options: {error}") from None

    f = _value(value, w, "w0")
    if not math.isfinite(f):
        raise ValueError(f"adaptive_cubic_newton: f(w0) is not finite ({f})")
    g = _checked_gradient(gradient, w, "gradient(w0)")
    f0, g0_norm = f, norm64(g)
    resolution = _resolution(f, w.dtype)
    trials: list[ARCTrial] = []
    hvps = steps = 0
    stop = "max_iterations"
    while steps < max_iterations:
        gnorm = norm64(g)
        if gnorm <= tol:
            stop = "tolerance"
            break
        left = None if hvp_budget is None else hvp_budget - hvps
        if left is not None and left <= 0:
            stop = "hvp_budget"
            break
        solver = KrylovCubicSolver(hessian(w), g, k_max=k_max if left is None else min(k_max, left),
                                   seed=(seed + steps) % 2**63, **options)
        before = hvps  # products of earlier iterations; this solver's own count is cumulative
        recorded = 0  # of this solver's products, those given to a trial record (a lowered M's re-solve has none)
        rejections = 0  # trials rejected in a row in this iteration
        lowerings = 0  # re-solves with M lowered in this iteration: as capped as the rejections (gamma near 1)
        while True:
            try:
                sub = solver.solve(M)
            except StepOverflow as overflow:  # a step beyond the weights' dtype: rejected as a trial at Inf
                sub = None
                num_hvps, model_value, step_norm = overflow.num_hvps, overflow.model_value, overflow.step_norm
            else:
                num_hvps, model_value, step_norm = sub.num_hvps, sub.model_value, sub.step_norm
            hvps = before + num_hvps
            predicted = -model_value
            # a step beyond the weights' dtype, or one whose model value overflowed (a tiny M): rejected
            # unevaluated, M raised
            overflowed = sub is None or not math.isfinite(predicted)
            if not overflowed and not predicted > resolution:
                # a step too short to show in f: M, as given or as lowered, is too large; lower it and
                # re-solve (no products), unless a rejection raised it here (then it is as low as it may be)
                if not rejections and M / gamma >= M_min and lowerings < max_rejections:
                    M /= gamma
                    lowerings += 1
                    continue
                stop = "no_progress"
                # recorded unevaluated, so that every product of the call is in a trial
                trials.append(ARCTrial(steps, M, predicted, math.nan, math.nan, False, step_norm,
                                       num_hvps - recorded, solver.process.n, gnorm))
                break
            trial = None if overflowed else w + sub.step
            f_trial = _value(value, trial, "a trial point") if trial is not None and all_finite(trial) else math.nan
            actual = f - f_trial if math.isfinite(f_trial) else -math.inf
            ratio = actual / predicted if math.isfinite(predicted) else -math.inf
            accepted = ratio >= eta1
            trials.append(ARCTrial(steps, M, predicted, actual, ratio, accepted, step_norm, num_hvps - recorded,
                                   solver.process.n, gnorm))
            recorded = num_hvps
            if accepted:
                w, f = trial, f_trial
                resolution = _resolution(f, w.dtype)
                g = _checked_gradient(gradient, w, "gradient(w)")
                steps += 1
                if ratio >= eta2:  # lowered, never below M_min; an M given below it is not raised to it
                    M = max(M / gamma, min(M, M_min))
                break
            if actual == 0.0:
                # f(w + s) == f(w) to the last bit: f cannot show this step, nor the shorter ones a raised M gives
                # (where f rounds to 0, every trial was evaluated until max_rejections)
                stop = "no_progress"
                break
            M *= gamma
            rejections += 1
            if rejections >= max_rejections:  # w stays the last accepted point
                stop = "max_rejections"
                break
        if stop in ("no_progress", "max_rejections"):
            break
    if stop == "max_iterations" and norm64(g) <= tol:  # the last step reached the tolerance
        stop = "tolerance"
    return ARCResult(w=w, value=f, gradient=g, steps=steps, num_hvps=hvps, M=M, stop_reason=stop, trials=trials,
                     initial_value=f0, initial_grad_norm=g0_norm)
