"""Adaptive cubic regularisation (solvers.adaptive_cubic_newton) on problems with known answers."""
import functools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from spectra import sym_with_spectrum

from unlearn_kernels.solvers import KRYLOV_DEFAULTS, StepOverflow, adaptive_cubic_newton, cubic_newton_step

D = 12


def spd(gen: torch.Generator, low: float = 0.5, high: float = 5.0) -> torch.Tensor:
    return sym_with_spectrum(torch.linspace(low, high, D, dtype=torch.float64), gen)[0]


def quadratic(A: torch.Tensor, b: torch.Tensor):
    """f(w) = 1/2 w^T A w - b^T w with its gradient; the minimiser is A^{-1} b."""
    return (lambda w: float(0.5 * w @ A @ w - b @ w)), (lambda w: A @ w - b)


def cauchy_loss(rng: torch.Generator):
    """f(w) = sum log(1 + (a_i^T w - y_i)^2) (Cauchy loss: non-convex) on 30 random rows, with its gradient, its
    exact Hessian and a random w0 (where the Hessian is indefinite)."""
    X = torch.randn(30, D, generator=rng, dtype=torch.float64)
    y = 3 * torch.randn(30, generator=rng, dtype=torch.float64)

    def value(w):
        return float(torch.log1p((X @ w - y) ** 2).sum())

    def gradient(w):
        r = X @ w - y
        return X.T @ (2 * r / (1 + r**2))

    def hessian(w):
        r = X @ w - y
        return (X.T * (2 * (1 - r**2) / (1 + r**2) ** 2)) @ X

    return value, gradient, hessian, torch.randn(D, generator=rng, dtype=torch.float64)


class CountedHessian:
    """``w -> H(w)`` handed to the loop as an operator with ``matvec`` only, which counts every product in
    :attr:`count`: the test's own count, not the solvers' (the operator has no ``num_products`` counter for them
    to read, and no ``matmat``: a block product goes through ``matvec`` column by column)."""

    def __init__(self, hessian):
        self.hessian, self.count = hessian, 0

    def __call__(self, w):
        H = self.hessian(w)
        return SimpleNamespace(shape=tuple(H.shape), dtype=H.dtype, device=H.device,
                               matvec=functools.partial(self._product, H))

    def _product(self, H, v):
        self.count += 1
        return H @ v


def test_quadratic_every_step_is_accepted_and_m_falls(rng):
    # On a quadratic the cubic model overestimates f by (M/6)||s||^3, so every ratio is >= 1: every
    # trial is accepted and M is divided by gamma each time; the iteration reaches A^{-1} b.
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    out = adaptive_cubic_newton(value, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64), M=1.0,
                                max_iterations=40, tol=1e-6, solver_options={"kappa": 1e-12, "k_max": D})
    assert out.stop_reason == "tolerance"
    assert torch.allclose(out.w, torch.linalg.solve(A, b), atol=1e-5)
    assert all(t.accepted and t.ratio >= 1.0 - 1e-9 for t in out.trials)
    assert [t.M for t in out.trials] == [2.0**-k for k in range(len(out.trials))]
    assert out.M == 2.0 ** -len(out.trials)
    assert out.value == pytest.approx(value(out.w), rel=1e-12) and out.initial_value == 0.0
    assert out.num_hvps == sum(t.hvps for t in out.trials) > 0
    # the same run capped at the steps it took: its last step reached the tolerance (it said "max_iterations")
    capped = adaptive_cubic_newton(value, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64), M=1.0,
                                   max_iterations=out.steps, tol=1e-6, solver_options={"kappa": 1e-12, "k_max": D})
    assert (capped.stop_reason, capped.steps) == ("tolerance", out.steps) and torch.equal(capped.w, out.w)


def test_wrong_curvature_is_rejected_until_m_is_large_enough(rng):
    # The Hessian given is a hundredth of the true one: the model promises far more decrease than f
    # delivers, so trials are rejected, M multiplied by gamma and the small problem re-solved on the
    # same tridiagonal (no new products), until a step is accepted; f never goes up.
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    w0 = torch.zeros(D, dtype=torch.float64)
    out = adaptive_cubic_newton(value, gradient, lambda w: 0.01 * A, w0, M=1e-4, max_iterations=5, gamma=3.0)
    rejected = [t for t in out.trials if not t.accepted]
    assert rejected and out.steps == 5
    values = [value(w0)]
    for t, nxt in zip(out.trials, out.trials[1:] + [None]):
        assert t.accepted == (t.ratio >= 0.1)
        if t.accepted:
            values.append(values[-1] - t.actual)
        if nxt is not None and nxt.iteration == t.iteration:  # a re-solve after a rejection
            assert not t.accepted and nxt.M == pytest.approx(3.0 * t.M) and nxt.hvps == 0
    assert all(a > b for a, b in zip(values, values[1:]))
    assert out.value == pytest.approx(values[-1], rel=1e-12) and out.value < value(w0)


@pytest.mark.parametrize("eta1, eta2, gamma", [(0.1, 0.9, 2.0), (0.5, 0.6, 1.5), (0.01, 5.0, 10.0)])
@pytest.mark.parametrize("M", [1e-6, 1e-2, 1.0, 1e2, 1e6])
def test_nonconvex_function_never_gets_worse(rng, M, eta1, eta2, gamma):
    """The Cauchy loss, exact Hessian, from a w0 where it is indefinite: whatever M > 0 starts the loop (the
    documented range, 1e-6 to 1e6) and whatever eta1, eta2 and gamma (the defaults; a strict accept test with
    little room to lower M; a lax one that never lowers it and raises it tenfold), the result is never worse than
    w0, its value and gradient are f's and grad f's at it, and w0 is left as given. Each trial follows the rules
    with the settings given: accepted iff ratio >= eta1; M times gamma after a rejection, divided by gamma
    (down to M_min, 1e-6) after a ratio >= eta2."""
    value, gradient, hessian, w0 = cauchy_loss(rng)
    assert float(torch.linalg.eigvalsh(hessian(w0))[0]) < 0  # indefinite where it starts
    given = w0.clone()
    out = adaptive_cubic_newton(value, gradient, hessian, w0, M=M, max_iterations=10, eta1=eta1, eta2=eta2,
                                gamma=gamma)
    assert torch.equal(w0, given)
    assert out.value == value(out.w) <= value(w0) == out.initial_value
    assert torch.equal(out.gradient, gradient(out.w))
    assert out.trials and out.steps == sum(t.accepted for t in out.trials)
    for t, nxt in zip(out.trials, out.trials[1:]):
        assert t.accepted == (t.ratio >= eta1)
        if not t.accepted:
            assert nxt.M == t.M * gamma
        else:
            assert nxt.M == (max(t.M / gamma, min(t.M, 1e-6)) if t.ratio >= eta2 else t.M)


@pytest.mark.parametrize("budget, stop", [(None, "max_iterations"), (1, "hvp_budget"), (7, "hvp_budget"),
                                          (25, "hvp_budget")])
def test_hvp_counts_are_the_products_made(rng, budget, stop):
    """The products counted at the operator, by the test, are the loop's ``num_hvps`` and the sum of its trials'
    ``hvps`` (an M of 1e-3 gives rejected trials, whose re-solves make no product). The budget is never exceeded,
    and a call it stops has used it exactly: the last Lanczos run's k_max is capped at what is left."""
    value, gradient, hessian, w0 = cauchy_loss(rng)
    counted = CountedHessian(hessian)
    out = adaptive_cubic_newton(value, gradient, counted, w0, M=1e-3, max_iterations=10, hvp_budget=budget)
    assert out.stop_reason == stop and any(not t.accepted for t in out.trials)
    assert counted.count == out.num_hvps == sum(t.hvps for t in out.trials) > 0
    if budget is not None:
        assert counted.count == budget  # stopped by it: used to the last product, not beyond


@pytest.mark.parametrize("M", [1e-6, 1e-2, 1.0, 1e4])
def test_trial_records_are_those_of_the_points_evaluated(rng, M):
    """Every trial's record against the points ``value()`` was called at (w0, then each trial point in order):
    ``step_norm`` is ||p - w|| of its trial point p from the point w it started at, ``actual`` is f(w) - f(p),
    ``ratio`` is actual / predicted, ``predicted`` is -m(s) of the cubic model at s = p - w, recomputed here,
    ``m(s) = g^T s + 1/2 s^T H s + (M/6) ||s||^3`` with g and H of w and the trial's M, and ``grad_norm`` is
    ||g||. The loop moves to p exactly when the trial is accepted. M from 1e-6 (many rejections) to 1e4 (short
    steps, all accepted)."""
    value, gradient, hessian, w0 = cauchy_loss(rng)
    seen = []

    def recorded(w):
        seen.append(w.clone())
        return value(w)

    out = adaptive_cubic_newton(recorded, gradient, hessian, w0, M=M, max_iterations=6)
    assert out.stop_reason == "max_iterations" and len(seen) == 1 + len(out.trials)  # every trial evaluated
    assert torch.equal(seen[0], w0)
    w, steps = w0, 0
    for t, p in zip(out.trials, seen[1:]):
        s, g, H = p - w, gradient(w), hessian(w)
        assert t.iteration == steps
        assert t.step_norm == pytest.approx(float(s.norm()), rel=1e-12)
        assert t.actual == value(w) - value(p) and t.ratio == t.actual / t.predicted
        assert t.predicted == pytest.approx(-float(g @ s + 0.5 * s @ H @ s + t.M / 6 * s.norm() ** 3), rel=1e-12)
        assert t.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
        if t.accepted:
            w, steps = p, steps + 1
    assert torch.equal(out.w, w) and out.steps == steps


@pytest.mark.parametrize("probe_steps", [2, 5])
@pytest.mark.parametrize("budget", [1, 7, 13])
def test_the_guard_exceeds_the_budget_by_at_most_its_probe(rng, budget, probe_steps):
    """With the hard-case probe on (``guard=True``) the products counted at the operator, by the test, exceed
    the budget by at most ``probe_steps``, as adaptive_cubic_newton documents: the Lanczos run is capped at what is
    left, the probe's block is not. With a tight kappa the run uses all that is left, so the probe lands past it:
    a budget of 1 uses 1 + probe_steps, the bound itself. The count is ``num_hvps`` and the trials' sum still."""
    value, gradient, hessian, w0 = cauchy_loss(rng)
    counted = CountedHessian(hessian)
    out = adaptive_cubic_newton(value, gradient, counted, w0, M=1e-3, max_iterations=10, hvp_budget=budget,
                                solver_options={"guard": True, "probe_steps": probe_steps, "k_max": 6, "kappa": 1e-12})
    assert out.stop_reason == "hvp_budget"
    assert counted.count == out.num_hvps == sum(t.hvps for t in out.trials)
    assert budget <= counted.count <= budget + probe_steps


def test_budget_iterations_and_no_progress(rng):
    A, b = spd(rng, 1e-3, 1e3), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    w0 = torch.zeros(D, dtype=torch.float64)
    budget = adaptive_cubic_newton(value, gradient, lambda w: A, w0, max_iterations=100, hvp_budget=7,
                                   solver_options={"kappa": 1e-12})
    assert budget.stop_reason == "hvp_budget" and budget.num_hvps <= 7
    two = adaptive_cubic_newton(value, gradient, lambda w: A, w0, max_iterations=2)
    assert two.stop_reason == "max_iterations" and two.steps == 2
    # at the minimiser the predicted decrease is rounding: the iteration stops instead of raising M forever
    at_min = torch.linalg.solve(A, b)
    stuck = adaptive_cubic_newton(value, lambda w: gradient(w) + 1e-9, lambda w: A, at_min, max_iterations=3)
    assert stuck.stop_reason == "no_progress" and stuck.steps == 0 and torch.equal(stuck.w, at_min)
    # its last Lanczos run is in a trial record (none held it), unevaluated, at the M it stopped with
    last = stuck.trials[-1]
    assert stuck.num_hvps == sum(t.hvps for t in stuck.trials) > 0 and last.M == stuck.M
    assert not last.accepted and math.isnan(last.actual) and math.isnan(last.ratio)
    assert KRYLOV_DEFAULTS["guard"] is False


def test_an_m_too_large_to_show_a_decrease_is_lowered(rng):
    """M = 1e14 on a float32 problem whose value is 100 at w0: the first step's predicted decrease
    (8.5e-7) is below what f can resolve there (16 eps |f| = 1.9e-4), and the loop stopped at once
    ("no_progress", the point unchanged), whatever the problem. M is now divided by gamma, with no new
    product, until the prediction shows; the iteration then runs as usual, and a rejection still ends
    in "no_progress"."""
    A, b = spd(rng).float(), torch.randn(D, generator=rng).float()
    quadratic_value, gradient = quadratic(A, b)

    def value(w):
        return quadratic_value(w) + 100.0

    w0 = torch.zeros(D)
    out = adaptive_cubic_newton(value, gradient, lambda w: A, w0, M=1e14, max_iterations=4)
    assert out.steps == 4 and out.stop_reason == "max_iterations" and out.value < value(w0)
    assert out.trials[0].M < 1e14 and out.trials[0].predicted > 16 * torch.finfo(torch.float32).eps * 100
    assert out.num_hvps == sum(t.hvps for t in out.trials)
    # never below M_min: with M_min = M, the step stays unresolvable and the loop stops as before
    kept = adaptive_cubic_newton(value, gradient, lambda w: A, w0, M=1e14, M_min=1e14, max_iterations=4)
    assert kept.stop_reason == "no_progress" and kept.steps == 0 and torch.equal(kept.w, w0)


def test_the_lowered_re_solves_are_capped_too():
    """f = 1 + ||w||^2 from w = (1e-9, 0): every step's decrease (at most 1e-18) is below what f resolves (16 eps),
    so M is lowered and the step re-solved; the lowerings had no cap: with gamma = 1.0001 and M = 1e3 the loop
    re-solved about 207,000 times (38 s) down to M_min. They count against max_rejections as rejections do: after
    10 here the call stops ("no_progress") at w0, M lowered 10 times."""
    w0 = torch.tensor([1e-9, 0.0], dtype=torch.float64)
    out = adaptive_cubic_newton(lambda w: float(1.0 + (w**2).sum()), lambda w: 2 * w,
                                lambda w: 2 * torch.eye(2, dtype=w.dtype), w0, M=1e3, gamma=1.0001, max_rejections=10)
    assert out.stop_reason == "no_progress" and out.steps == 0 and torch.equal(out.w, w0)
    assert len(out.trials) == 1 and out.M == pytest.approx(1e3 / 1.0001**10, rel=1e-12)


def test_the_resolution_of_f_follows_f_down():
    """The smallest decrease f can resolve was taken once, at w0, as 16 eps max(|f(w0)|, 1): from (-30, 1)
    Rosenbrock's f falls from 8.1e7 to below 1e-7, where that threshold (2.9e-7) stopped the run
    ("no_progress", ||w - w*|| = 2.9e-4) although f still resolved steps 1e15 times smaller. It is 16 eps |f|
    at each accepted point: the run reaches the minimiser. A scaled copy of f (times 1e-10, M scaled
    alike) ends there too, where the floor at 1 left it 7.5e-3 away."""
    def rosenbrock(w):
        return 100.0 * (w[1] - w[0] ** 2) ** 2 + (1.0 - w[0]) ** 2

    def gradient(w, c):
        w = w.detach().clone().requires_grad_(True)
        return c * torch.autograd.grad(rosenbrock(w), w)[0]

    for c in (1.0, 1e-10):
        out = adaptive_cubic_newton(lambda w: c * float(rosenbrock(w)), lambda w: gradient(w, c),
                                    lambda w: c * torch.autograd.functional.hessian(rosenbrock, w),
                                    torch.tensor([-30.0, 1.0], dtype=torch.float64), M=c, max_iterations=500,
                                    tol=1e-10 * c)
        assert out.stop_reason == "tolerance", c
        assert float(torch.linalg.vector_norm(out.w - 1.0)) < 1e-8, c


def test_a_trial_that_leaves_f_unchanged_to_the_last_bit_stops_the_iteration():
    """Where f rounds to 0 (a float32 loss on confidently classified rows), 16 eps |f| is 0: every trial was
    evaluated, each f(w + s) == f(w), and M was raised until max_rejections (1,000 passes over the data).
    A trial that leaves f unchanged to the last bit ends the iteration ("no_progress"): a raised M only
    gives shorter steps."""
    g = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
    calls = []

    def value(w):
        calls.append(1)
        return 0.0

    out = adaptive_cubic_newton(value, lambda w: g, lambda w: torch.eye(D, dtype=torch.float64),
                                torch.zeros(D, dtype=torch.float64), max_iterations=3)
    assert out.stop_reason == "no_progress" and out.steps == 0 and len(out.trials) == 1 and len(calls) == 2
    assert out.trials[0].actual == 0.0 and not out.trials[0].accepted


def test_a_no_progress_stop_after_a_rejection_counts_each_product_once(rng):
    """A rejection raises M (gamma 1e18) so far that the re-solve's predicted decrease is below f's resolution:
    the iteration stops ("no_progress") with that re-solve recorded unevaluated. It used no new product, so its
    record carries 0 hvps and the trials' hvps sum to num_hvps (recording the solver's whole count there
    counted the Lanczos run twice). f is 100 at w0, where it resolves decreases down to 1.9e-4."""
    A, b = spd(rng).float(), torch.randn(D, generator=rng).float()
    quadratic_value, gradient = quadratic(A, b)

    def value(w):
        return quadratic_value(w) + 100.0

    out = adaptive_cubic_newton(value, gradient, lambda w: 0.01 * A, torch.zeros(D), M=1e-4, gamma=1e18,
                                max_iterations=3, solver_options={"kappa": 1e-12})
    assert out.stop_reason == "no_progress" and out.steps == 0
    first, last = out.trials
    assert not first.accepted and first.ratio < 0.1 and first.hvps > 0
    assert last.M == first.M * 1e18 and math.isnan(last.ratio) and last.hvps == 0
    assert out.num_hvps == first.hvps == sum(t.hvps for t in out.trials)


def test_lowering_never_raises_an_m_below_m_min(rng):
    """M_min bounds the lowering after a very successful step: an M given below it stays where it is
    (the loop once set it to M_min, multiplying M = 0.1 by 100 after a step with ratio 1)."""
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    out = adaptive_cubic_newton(value, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64), M=0.1, M_min=10.0,
                                max_iterations=3)
    assert out.steps >= 2 and all(t.ratio >= 0.9 for t in out.trials)  # every step very successful
    assert [t.M for t in out.trials] == [0.1] * len(out.trials)


def test_non_finite_trial_value_is_a_rejection(rng):
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)

    def walled(w):  # f is +inf outside the ball of radius 0.05
        return value(w) if float(w.norm()) <= 0.05 else math.inf

    out = adaptive_cubic_newton(walled, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64), M=1e-3,
                                max_iterations=1)
    assert not out.trials[0].accepted and out.trials[0].actual == -math.inf
    assert out.steps == 1 and float(out.w.norm()) <= 0.05


def test_step_beyond_the_dtype_is_a_rejection(rng):
    """A float32 step of norm beyond 3.4e38 (an indefinite H and a tiny M) was Inf/NaN; the Krylov
    solver now raises StepOverflow, which the loop records as a rejected trial (actual -inf) before
    raising M, as it does for a trial point with NaN/Inf entries."""
    A = sym_with_spectrum(torch.linspace(-1.0, 5.0, D, dtype=torch.float64), rng)[0].float()
    b = torch.randn(D, generator=rng).float()

    def value(w):  # 1/2 w^T A w - b^T w + 1/4 ||w||^4: bounded below, indefinite at 0
        return float(0.5 * w @ A @ w - b @ w + 0.25 * (w @ w) ** 2)

    def gradient(w):
        return A @ w - b + (w @ w) * w

    def hessian(w):
        return A + (w @ w) * torch.eye(D) + 2.0 * torch.outer(w, w)

    w0 = torch.zeros(D)
    out = adaptive_cubic_newton(value, gradient, hessian, w0, M=1e-40, M_min=1e-45, gamma=1e4, max_iterations=3)
    first = out.trials[0]
    assert not first.accepted and first.actual == -math.inf and first.step_norm > 3.4e38
    assert first.ratio == -math.inf
    assert out.steps >= 1 and bool(torch.isfinite(out.w).all()) and out.value < value(w0)


@pytest.mark.parametrize("M, gamma", [(1e-120, 2.0), (1e-250, 2.0), (1e-310, 10.0)])
def test_a_tiny_m_whose_model_value_overflows_is_a_rejection(rng, M, gamma):
    """An indefinite H and M = 1e-120 give a float64 step of norm ~1e120, whose cubic term (M/6)||s||^3
    overflowed Python's float power (OverflowError, not a ValueError); at M = 1e-250 the model value was
    NaN, taken for a step too short to show, and the call returned w0 with no trial ("no_progress"); at
    M = 1e-310 the step's norm, 2 sigma / M, is beyond float64 itself, and the secular solve's ValueError
    ended the call. All are rejections now: M rises until a step lowers f. The overflows are expected
    and handled, so they raise no numpy RuntimeWarning (under -W error the call failed with "overflow
    encountered in dot")."""
    A = sym_with_spectrum(torch.linspace(-1.0, 5.0, D, dtype=torch.float64), rng)[0]
    b = torch.randn(D, generator=rng, dtype=torch.float64)

    def value(w):  # bounded below, indefinite at 0
        return float(0.5 * w @ A @ w - b @ w + 0.25 * (w @ w) ** 2)

    def gradient(w):
        return A @ w - b + (w @ w) * w

    def hessian(w):
        return A + (w @ w) * torch.eye(D, dtype=torch.float64) + 2.0 * torch.outer(w, w)

    w0 = torch.zeros(D, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # doubling M from 1e-250 to a workable one takes some 800 trials, within the default cap
        out = adaptive_cubic_newton(value, gradient, hessian, w0, M=M, M_min=M, gamma=gamma, max_iterations=1)
    first = out.trials[0]
    assert not first.accepted and first.actual == -math.inf and first.M == M
    if M < 1e-300:  # one step alone: StepOverflow, the solvers' error for a step beyond the dtype
        assert first.step_norm == math.inf
        for method in ("dense", "krylov"):
            with pytest.raises(StepOverflow, match=f"method '{method}'.*does not fit float64: M = 1e-310"):
                cubic_newton_step(hessian(w0), gradient(w0), M, method=method)
    assert first.ratio == -math.inf  # as ARCTrial documents for an overflowed trial (a ratio of 0.0 was recorded)
    assert out.steps == 1 and out.stop_reason == "max_iterations" and out.value < value(w0)
    assert out.num_hvps == sum(t.hvps for t in out.trials)


def test_seed_near_the_top_of_torchs_range_wraps(rng, monkeypatch):
    """Step k's Krylov solver got ``seed + k``, past 2**63 - 1 for a seed near the top: the call failed at
    the second step ("seed must be in [0, 2**63), got 9223372036854775808"). It gets ``(seed + k) % 2**63``,
    the same seeds as before below the top."""
    import unlearn_kernels.solvers.arc as arc

    seeds = []

    class Recording(arc.KrylovCubicSolver):
        def __init__(self, H, *args, seed, **kwargs):
            if H.shape[0] > 1:  # not the 1 x 1 solver that checks the options up front
                seeds.append(seed)
            super().__init__(H, *args, seed=seed, **kwargs)

    monkeypatch.setattr(arc, "KrylovCubicSolver", Recording)
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    for seed, expected in ((2**63 - 2, [2**63 - 2, 2**63 - 1, 0, 1]), (5, [5, 6, 7, 8])):
        seeds.clear()
        out = adaptive_cubic_newton(value, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64),
                                    max_iterations=4, seed=seed)
        assert out.steps == 4 and seeds == expected


def test_rejections_in_a_row_are_capped(rng):
    """With gamma just above 1 and a Hessian a hundredth of the true one, every trial is rejected and M rises
    by 0.01% a trial: the loop went on for millions of trials (in CureNewton a pass over D_r each). After
    max_rejections rejected trials in a row (default 1000) it stops ("max_rejections") at the last accepted point,
    every trial recorded."""
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    f, gradient = quadratic(A, b)
    evaluations = 0

    def value(w):
        nonlocal evaluations
        evaluations += 1
        assert evaluations <= 2000, "the rejected trials have no cap"
        return f(w)

    w0 = torch.zeros(D, dtype=torch.float64)
    # the true Hessian at w0 (a quadratic: the step is accepted), a hundredth of it after: rejections
    out = adaptive_cubic_newton(value, gradient, lambda w: A if torch.equal(w, w0) else 0.01 * A, w0, M=1e-4,
                                gamma=1.0001, max_iterations=3)
    first, rest = out.trials[0], out.trials[1:]
    assert out.stop_reason == "max_rejections" and out.steps == 1 and first.accepted
    assert len(rest) == 1000 and not any(t.accepted for t in rest) and {t.iteration for t in rest} == {1}
    assert not torch.equal(out.w, w0) and out.value == f(out.w) == pytest.approx(f(w0) - first.actual, rel=1e-12)
    assert out.M == rest[-1].M * 1.0001 and out.num_hvps == sum(t.hvps for t in out.trials)
    # no step accepted: w0 comes back, with the cap given
    stuck = adaptive_cubic_newton(f, gradient, lambda w: 0.01 * A, w0, M=1e-4, gamma=1.0001, max_rejections=3)
    assert stuck.stop_reason == "max_rejections" and stuck.steps == 0 and torch.equal(stuck.w, w0)
    assert len(stuck.trials) == 3 and not any(t.accepted for t in stuck.trials) and stuck.value == f(w0)


@pytest.mark.parametrize("kwargs, message", [
    ({"M": 0.0}, "M must be"),
    ({"max_iterations": 0}, "max_iterations"),
    ({"tol": -1.0}, "tol"),
    ({"hvp_budget": -1}, "hvp_budget"),
    ({"eta1": 0.0}, "eta1"),
    ({"eta1": 1.0}, "eta1"),
    ({"eta1": 0.5, "eta2": 0.5}, "eta2"),
    ({"gamma": 1.0}, "gamma"),
    ({"M_min": 0.0}, "M_min"),
    ({"max_rejections": 0}, "max_rejections must be an int >= 1"),
    ({"solver_options": {"k_max": 0}}, "k_max"),
    ({"solver_options": {"seed": 1}}, "seed"),
    # a rejected trial's re-solve replayed the products at the trial's weights (an operator reading the model's): a
    # wrong step with no error
    ({"solver_options": {"two_pass": True, "reorth": "none", "guard": False}}, "two_pass is not supported"),
])
def test_bad_arguments(rng, kwargs, message):
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    with pytest.raises(ValueError, match=message):
        adaptive_cubic_newton(value, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64), **kwargs)
    with pytest.raises(ValueError, match="not finite"):
        adaptive_cubic_newton(lambda w: math.nan, gradient, lambda w: A, torch.zeros(D, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        adaptive_cubic_newton(value, lambda w: w * math.nan, lambda w: A, torch.ones(D, dtype=torch.float64))


def test_a_gradient_unlike_w_is_refused(rng):
    # a float64 gradient of a float32 w made the returned w float64 without an error; one of another length
    # failed inside torch's arithmetic ("The size of tensor a (4) must match ...")
    A, b = spd(rng), torch.randn(D, generator=rng, dtype=torch.float64)
    value, gradient = quadratic(A, b)
    with pytest.raises(ValueError, match=r"gradient\(w0\) is a \(%d,\) torch.float64 tensor on cpu; it must be like "
                                         r"w: \(%d,\) torch.float32 on cpu" % (D, D)):
        adaptive_cubic_newton(lambda w: value(w.double()), lambda w: gradient(w.double()), lambda w: A,
                              torch.zeros(D, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"gradient\(w0\) is a \(%d,\) .* must be like w: \(%d,\)" % (D - 1, D)):
        adaptive_cubic_newton(value, lambda w: gradient(w)[1:], lambda w: A, torch.zeros(D, dtype=torch.float64))
