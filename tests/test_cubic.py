"""The cubic-regularised Newton subproblem: every method against the float64 dense oracle, and the
oracle against the global optimality conditions and closed forms."""
import decimal
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spectra import sym_with_spectrum

from unlearn_kernels.curvature import GenericHessian
from unlearn_kernels.solvers import (
    KrylovCubicSolver,
    NonFiniteProduct,
    StepOverflow,
    cubic_gd,
    cubic_model_value,
    cubic_newton_step,
    sphere_noise,
    stochastic_cubic_gd,
)

D = 30


def model(H: torch.Tensor, g: torch.Tensor, M: float, s: torch.Tensor) -> float:
    s = s.double()
    return float(g @ s + 0.5 * s @ H @ s + M / 6.0 * torch.linalg.vector_norm(s) ** 3)


def assert_global_optimum(H, g, M, s, tol=1e-9):
    """(H + sigma I) s = -g with sigma = M ||s|| / 2, and H + sigma I PSD."""
    sigma = 0.5 * M * float(torch.linalg.vector_norm(s))
    scale = float(torch.linalg.matrix_norm(H, 2)) + sigma + 1.0
    residual = (H + sigma * torch.eye(H.shape[0], dtype=H.dtype)) @ s + g
    assert float(torch.linalg.vector_norm(residual)) <= tol * scale * (1 + float(torch.linalg.vector_norm(s)))
    assert float(torch.linalg.eigvalsh(H)[0]) + sigma >= -tol * scale


def problem(kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H, g, M) of one kind: random indefinite, singular PSD, or hard case."""
    if kind == "indefinite":
        lam = torch.linspace(-1.0, 3.0, D, dtype=torch.float64)
        H, U = sym_with_spectrum(lam, gen)
        return H, torch.randn(D, generator=gen, dtype=torch.float64), 1.0
    if kind == "singular":
        lam = torch.cat([torch.zeros(10), torch.linspace(0.5, 4.0, D - 10)]).double()
        H, U = sym_with_spectrum(lam, gen)
        return H, torch.randn(D, generator=gen, dtype=torch.float64), 0.5
    # Hard case: g has no component on the bottom eigenvector, and M is small enough that
    # ||(H + I)^+ g|| < 2 / M, so sigma = -lambda_min = 1 and s has a component along u_1.
    lam = torch.linspace(-1.0, 3.0, D, dtype=torch.float64)
    H, U = sym_with_spectrum(lam, gen)
    c = torch.randn(D, generator=gen, dtype=torch.float64)
    c[0] = 0.0
    return H, U @ c, 0.05


KINDS = ["indefinite", "singular", "hard"]


# ----------------------------------------------------------------------------- dense oracle
@pytest.mark.parametrize("kind", KINDS)
def test_dense_oracle_global_optimality(kind, rng):
    H, g, M = problem(kind, rng)
    out = cubic_newton_step(H, g, M, method="dense")
    assert_global_optimum(H, g, M, out.step)
    assert out.hard_case == (kind == "hard")
    if kind == "hard":
        assert out.sigma == pytest.approx(1.0, abs=1e-12)
    assert out.model_value == pytest.approx(model(H, g, M, out.step), rel=1e-12)
    assert out.sigma == pytest.approx(0.5 * M * out.step_norm, rel=1e-10)
    assert out.residual < 1e-10 and out.converged and out.num_hvps == 0


@pytest.mark.parametrize("kind", KINDS)
def test_dense_oracle_reports_the_step_it_returns(kind, rng):
    """For a float32 g the oracle solves in float64 and returns the step in float32: its residual was the
    float64 solution's (about 1e-14) where the returned step's is about eps_32 ||H|| ||s|| (1e-6 here);
    residual and model value now describe the returned step (in float64, against the float32 H)."""
    H, g, M = problem(kind, rng)
    H32, g32 = H.float(), g.float()
    out = cubic_newton_step(H32, g32, M, method="dense")
    s = out.step.double()
    assert out.step.dtype == torch.float32 and out.step_norm == float(torch.linalg.vector_norm(s))
    true = float(torch.linalg.vector_norm(g32.double() + H32.double() @ s + 0.5 * M * out.step_norm * s))
    assert true > 1e-8  # the float32 rounding of the step, well above float64 rounding
    assert out.residual == pytest.approx(true, rel=1e-6)
    assert out.model_value == pytest.approx(model(H32.double(), g32.double(), M, s), rel=1e-12)


def test_dense_closed_form_1d():
    # m(s) = b s + a s^2 / 2 + M |s|^3 / 6 with b > 0: s < 0 solves b + a s - M s^2 / 2 = 0.
    for a, b, M in [(2.0, 1.0, 3.0), (-1.0, 0.5, 2.0), (0.0, 4.0, 1.0)]:
        out = cubic_newton_step(torch.tensor([[a]], dtype=torch.float64), torch.tensor([b], dtype=torch.float64), M,
                                method="dense")
        assert float(out.step[0]) == pytest.approx((a - math.sqrt(a * a + 2 * M * b)) / M, rel=1e-12)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_zero_gradient(method, rng):
    # g = 0: s = 0 for PSD H; else ||s|| = -2 lambda_min / M and m = (2/3) lambda_min^3 / M^2.
    lam = torch.linspace(-2.0, 1.0, 12, dtype=torch.float64)
    H, _ = sym_with_spectrum(lam, rng)
    g = torch.zeros(12, dtype=torch.float64)
    M = 4.0
    out = cubic_newton_step(H, g, M, method=method)
    assert out.step_norm == pytest.approx(1.0, rel=1e-10)
    assert out.model_value == pytest.approx(2.0 / 3.0 * (-8.0) / 16.0, rel=1e-10)
    psd = cubic_newton_step(H + 3 * torch.eye(12, dtype=torch.float64), g, M, method=method)
    assert psd.step_norm == 0.0 and psd.model_value == 0.0


@pytest.mark.parametrize("options", [{}, {"guard": False}, {"reorth": "none", "two_pass": True}])
def test_krylov_zero_gradient_beyond_the_probe(options, rng):
    # d = 200, more than the probe can fill: the stopping rule took s = 0 (residual 0 <= kappa ||g|| = 0) after
    # one product, a saddle reported as converged without the guard, and 120 products short of it with it
    lam = torch.linspace(-1.0, 3.0, 200, dtype=torch.float64)
    H, _ = sym_with_spectrum(lam, rng)
    g = torch.zeros(200, dtype=torch.float64)
    out = KrylovCubicSolver(H, g, **options).solve(1.0)
    assert out.converged and out.hard_case
    assert out.step_norm == pytest.approx(2.0, rel=1e-6) and out.model_value == pytest.approx(-2.0 / 3.0, rel=1e-9)
    assert model(H, g, 1.0, out.step) == pytest.approx(-2.0 / 3.0, rel=1e-9)
    psd = KrylovCubicSolver(H + 2 * torch.eye(200, dtype=torch.float64), g, **options).solve(1.0)
    assert psd.converged and psd.step_norm == 0.0


# ----------------------------------------------------------------------------- Krylov
# Whether the iteration converges near invariance (k_max = d) is decided by rounding: several
# problems per kind. 1234 is the rng fixture's seed; with 14 the main phase stops one step short.
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 14, 1234])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_krylov_matches_dense(kind, reorth, seed):
    H, g, M = problem(kind, torch.Generator().manual_seed(seed))
    ref = cubic_newton_step(H, g, M, method="dense")
    out = cubic_newton_step(H, g, M, method="krylov", reorth=reorth, k_max=D, kappa=1e-12, probe_steps=D)
    # "selective" keeps its basis orthogonal to about sqrt(eps) only: on the hard case the residual stops
    # near 1e-6 ||g||, short of kappa (it was reported converged: the estimate left out what the
    # selective projections removed)
    assert out.converged or (reorth, kind) == ("selective", "hard")
    true_residual = float(torch.linalg.vector_norm(g + H @ out.step + 0.5 * M * out.step_norm * out.step))
    assert true_residual - 1e-10 <= out.residual <= 1.1 * true_residual + 1e-10  # a bound, tight
    assert out.model_value == pytest.approx(ref.model_value, rel=1e-8)
    assert model(H, g, M, out.step) == pytest.approx(ref.model_value, rel=1e-8)
    diff = out.step - ref.step
    if kind == "hard":  # the minimiser is unique up to the sign of its bottom-eigenvector part
        u1 = torch.linalg.eigh(H).eigenvectors[:, 0]
        diff = diff - (diff @ u1) * u1
        assert abs(float(out.step @ u1)) == pytest.approx(abs(float(ref.step @ u1)), rel=1e-6)
    assert float(torch.linalg.vector_norm(diff)) < 1e-5 * (1 + ref.step_norm)
    assert_global_optimum(H, g, M, out.step, tol=1e-7)
    assert out.hard_case == (kind == "hard")
    assert out.num_hvps == out.iterations


@pytest.mark.parametrize("kind", ["indefinite", "hard"])
def test_every_method_on_every_device(kind, device):
    """H and g on the device (cuda too where a GPU is visible: the Lanczos steps run the CUDA kernel there): each
    method's step comes back on it and matches the CPU's dense float64 oracle."""
    H, g, M = problem(kind, torch.Generator().manual_seed(5))
    ref = cubic_newton_step(H, g, M, method="dense")
    for method, options in (("dense", {}), ("krylov", {"k_max": D, "kappa": 1e-12, "probe_steps": D}),
                            ("gd", {"K": 50000, "eta": 0.1, "tol": 1e-9, "noise": 1e-6 if kind == "hard" else 0.0})):
        out = cubic_newton_step(H.to(device), g.to(device), M, method=method, **options)
        assert out.step.device.type == device.type, method
        rel = 1e-7 if method == "gd" else 1e-8  # gd's documented tolerance (test_gd_matches_dense)
        assert out.model_value == pytest.approx(ref.model_value, rel=rel), method
        assert model(H, g, M, out.step.cpu()) == pytest.approx(ref.model_value, rel=rel), method


def test_krylov_without_guard_misses_hard_case(rng):
    H, g, M = problem("hard", rng)
    ref = cubic_newton_step(H, g, M, method="dense")
    unguarded = cubic_newton_step(H, g, M, method="krylov", k_max=20, kappa=1e-12, guard=False)
    # The Krylov space of g never sees u_1: a stationary point with sigma < 1, not the minimiser.
    assert unguarded.sigma < 0.99 and unguarded.model_value > ref.model_value + 1.0
    # probe_steps=D: the probe fills the space by continuing Lanczos (T exact, the hard case taken).
    filled = cubic_newton_step(H, g, M, method="krylov", k_max=20, kappa=1e-12, probe_steps=D)
    assert filled.hard_case and filled.model_value == pytest.approx(ref.model_value, rel=1e-8)
    # probe_steps=9: a probe block from a random restart, 9 steps in the 10 dimensions beside Q. It is
    # coupled to the main phase's residual vector, so its bottom Ritz vector has a coefficient on g of
    # the size of its Ritz error and the secular op takes the near-hard case: the same minimiser to that
    # accuracy, without the hard_case flag. (A probe kept orthogonal to the residual vector had an exact
    # zero there, and here 9 dimensions to span exactly, but failed the near-hard case: see below.)
    restarted = cubic_newton_step(H, g, M, method="krylov", k_max=20, kappa=1e-12, probe_steps=9)
    assert restarted.sigma > 1.0 - 1e-7 and restarted.model_value == pytest.approx(ref.model_value, rel=1e-7)


def near_hard_problem(seed: int, component: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectrum -logspace(-4, 2) and logspace(-4, 4) (lambda_min = -100, d = 40); g's component on the
    bottom eigenvector is ``component * ||c||``."""
    lam = torch.cat([-torch.logspace(-4, 2, 20), torch.logspace(-4, 4, 20)]).double()
    gen = torch.Generator().manual_seed(seed)
    H, U = sym_with_spectrum(lam, gen)
    c = torch.randn(40, generator=gen, dtype=torch.float64)
    c[19] = component * torch.linalg.vector_norm(c)
    return H, U @ c


@pytest.mark.parametrize("seed,component", [(2, 1e-10), (3, 1e-10), (7, 1e-12)])
def test_guard_finds_the_near_hard_case(seed, component):
    # Near-hard case: rounding and g's tiny component put much of the bottom eigenvector into the main
    # phase's last residual vector. The probe was restarted orthogonal to that vector and could not see
    # that part: these seeds were reported converged with sigma = 48.3 < 100 = -lambda_min (H + sigma I not
    # PSD) and a model value 9x above the minimum. The probe is now coupled to it, and the main phase
    # resumes once the probe has changed sigma.
    H, g = near_hard_problem(seed, component)
    ref = cubic_newton_step(H, g, 1.0, method="dense")
    out = cubic_newton_step(H, g, 1.0, method="krylov", k_max=40)
    true = float(torch.linalg.vector_norm(g + H @ out.step + 0.5 * out.step_norm * out.step))
    # a bound, tight, up to the rounding of evaluating the true gradient (1.5e-15 against a bound of 5.9e-16 with
    # AVX2 kernels where the step is exact)
    assert true * (1 - 1e-6) - 1e-13 <= out.residual <= 1.1 * true + 1e-13
    assert out.converged and out.sigma >= 100.0 * (1 - 1e-12)
    assert out.model_value == pytest.approx(ref.model_value, rel=1e-8)
    assert model(H, g, 1.0, out.step) == pytest.approx(ref.model_value, rel=1e-8)



def test_the_probe_continues_from_the_residual_vector_near_the_hard_case():
    """Bottom eigenvalue -1 with the next at -0.99 (a small gap), g in five other eigendirections and 1e-11 along
    the bottom one: the main phase's Krylov space becomes nearly invariant and the probe continues Lanczos from its
    residual vector (which holds the bottom direction). Restarted from a random vector instead, the step took 50
    products, did not converge and was 2e-5 off the dense one; here 25 products, 3.4e-6 (Intel Xeon) or 1.1e-5 (AMD
    EPYC: so near the hard case the step's error is its residual amplified by 1 / (lambda_min + sigma), about 1e5,
    and rounding decides it), the cubic model's value within 5e-12 of the dense step's on both."""
    d = 400
    lam = torch.cat([torch.tensor([-1.0]), torch.linspace(-0.99, 10.0, d - 1)]).double()
    Q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    c = torch.zeros(d, dtype=torch.float64)
    c[[0, 100, 200, 300, 350, 399]] = torch.tensor([1e-11, 1.0, -0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    g = Q @ c
    dense = cubic_newton_step(H, g, 1.0, method="dense")
    out = cubic_newton_step(H, g, 1.0, method="krylov", k_max=30, probe_steps=20)
    assert out.converged and out.num_hvps <= 35
    assert out.model_value == pytest.approx(dense.model_value, rel=1e-10)
    assert float(torch.linalg.vector_norm(out.step - dense.step) / torch.linalg.vector_norm(dense.step)) < 5e-5

@pytest.mark.parametrize("seed", range(3))
def test_guard_finds_the_hard_case_when_the_krylov_space_is_nearly_invariant(seed):
    # repeated eigenvalues: the Krylov space of g (orthogonal to the bottom eigenvector) becomes invariant
    # to rounding within a few steps, and the residual vector left then is the bottom eigenvector,
    # which a restarted probe block was kept orthogonal to (the default probe missed it on every seed)
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = torch.cat([torch.tensor([-8.0]), torch.arange(-5.0, 8.0).repeat_interleave(3)]).double()
    basis = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))[0]
    H = (basis * eigenvalues) @ basis.T
    H = (H + H.T) / 2
    g = torch.randn(40, generator=gen, dtype=torch.float64)
    g -= basis[:, 0] * (basis[:, 0] @ g)
    dense = cubic_newton_step(H, g, 1.0, method="dense")
    krylov = cubic_newton_step(H, g, 1.0, method="krylov")
    assert dense.hard_case and krylov.hard_case
    assert krylov.model_value == pytest.approx(dense.model_value, rel=1e-8)


@pytest.mark.parametrize("seed", [2, 3, 7, 24])
def test_selective_residual_counts_the_step_norm(seed):
    """"selective" keeps Q orthonormal to about sqrt(eps) only, so ||s|| = ||Q y|| is not ||y||: on a clustered
    bottom in the hard case the model's gradient at s has (M/2) (||s|| - ||y||) Q y besides the Lanczos
    residual, and the estimate without it (and what the projections removed) claimed 5e-8 where the
    gradient was 4e-6 to 4e-3, and said converged."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(10, generator=gen, dtype=torch.float64)
    H, U = sym_with_spectrum(torch.cat([-1 - 1e-10 * r[:2], r[2:]]), gen)
    torch.randn(10, generator=gen, dtype=torch.float64)
    c = torch.randn(10, generator=gen, dtype=torch.float64)
    c[:2] = 0
    g = U @ c
    M, kappa = 1.0, 1e-6
    out = cubic_newton_step(H, g, M, method="krylov", reorth="selective", k_max=10, kappa=kappa)
    true = float(torch.linalg.vector_norm(g + H @ out.step + 0.5 * out.step_norm * out.step))
    # a bound, tight, up to the rounding of evaluating the true gradient (1.5e-15 against a bound of 5.9e-16 with
    # AVX2 kernels where the step is exact)
    assert true * (1 - 1e-6) - 1e-13 <= out.residual <= 1.1 * true + 1e-13
    # converged only where the true gradient meets the rule (theta ||s||^2 with theta = kappa M / 2, or kappa
    # min(1, ||s||) ||g||): how far Q drifts from orthonormal depends on the CPU's rounding (on an AMD EPYC
    # every seed drifted, on an Intel Xeon with AVX-512 only seed 24), so the test holds the rule, not a drift
    rule = max(kappa * M / 2 * out.step_norm**2, kappa * min(1.0, out.step_norm) * float(torch.linalg.vector_norm(g)))
    assert out.converged == (true <= rule) or abs(true - rule) <= 0.1 * rule


def test_krylov_residual_estimate_is_exact(rng):
    H, g, M = problem("indefinite", rng)
    for k in (3, 8, 15):
        for guard in (False, True):
            out = cubic_newton_step(H, g, M, method="krylov", k_max=k, kappa=0.0, guard=guard, probe_steps=5)
            s = out.step
            true = torch.linalg.vector_norm(g + H @ s + 0.5 * M * torch.linalg.vector_norm(s) * s)
            assert out.residual == pytest.approx(float(true), rel=1e-6, abs=1e-12)
            assert not out.converged
            assert out.model_value == pytest.approx(model(H, g, M, s), rel=1e-10)


@pytest.mark.parametrize("reorth", ["full", "selective", "none"])
def test_krylov_residual_counts_the_secular_tolerance(reorth):
    """The secular op solves sigma = (M/2) ||y|| to a relative 1e-12, and the model's gradient at s has
    ((M/2) ||s|| - sigma) s besides the Lanczos residual: with a large step (here ||s|| ~ 1e3, the whole
    space spanned so the Lanczos residual is 0) the estimate said 0 where the gradient was 2.6e-6, about
    2000 eps (||H|| ||s|| + ||g|| + (M/2) ||s||^2). It is now a bound up to rounding."""
    gen = torch.Generator().manual_seed(8)
    A = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    H = 0.5 * (A + A.T)
    g = 1e6 * torch.randn(8, generator=gen, dtype=torch.float64)
    out = cubic_newton_step(H, g, 1.0, method="krylov", reorth=reorth)
    s = out.step
    true = float(torch.linalg.vector_norm(g + H @ s + 0.5 * out.step_norm * s))
    rounding = torch.finfo(torch.float64).eps * (
        float(torch.linalg.matrix_norm(H, 2)) * out.step_norm + float(torch.linalg.vector_norm(g))
        + 0.5 * out.step_norm**2)
    assert true > 100 * rounding  # the secular tolerance is what the gradient holds
    assert true - 16 * rounding <= out.residual <= 1.1 * true + 16 * rounding


def test_krylov_stopping_rules(rng):
    H, g, M = problem("indefinite", rng)
    loose = cubic_newton_step(H, g, M, method="krylov", kappa=1e-2, theta=0.0, guard=False)
    y = loose.step_norm
    assert loose.converged and loose.iterations < D
    assert loose.residual <= 1e-2 * min(1.0, y) * float(torch.linalg.vector_norm(g))
    by_theta = cubic_newton_step(H, g, M, method="krylov", kappa=0.0, theta=1e-3, guard=False)
    assert by_theta.converged and by_theta.residual <= 1e-3 * by_theta.step_norm**2


def test_krylov_reuse_when_M_changes(rng):
    H, g, _ = problem("indefinite", rng)
    solver = KrylovCubicSolver(H, g, kappa=1e-12, k_max=D)
    first = solver.solve(1.0)
    hvps = first.num_hvps
    for M in (2.0, 10.0, 0.3):
        again = solver.solve(M)
        assert again.num_hvps == hvps  # only the small problem was re-solved
        assert again.model_value == pytest.approx(cubic_newton_step(H, g, M, method="dense").model_value, rel=1e-8)
    extended = KrylovCubicSolver(H, g, kappa=1e-3, guard=False)
    short = extended.solve(1.0)
    more = extended.solve(1.0, extend=True)  # the rule already holds: no new steps
    assert more.num_hvps == short.num_hvps
    tighter = KrylovCubicSolver(H, g, kappa=1e-3, guard=False)
    tighter.solve(1.0)
    tighter.kappa = 1e-12
    assert tighter.solve(1.0, extend=True).iterations > short.iterations


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_krylov_extend_after_the_probe_starts_again_from_g(seed):
    """With the guard on, a first solve ends in the probe's block: ``extend=True`` for a smaller M grew that
    block (a random start's Krylov space, which g has no coefficient on; 5e-3 to 7e-2 above the minimum), and
    resuming the main block from what the probe left of its residual vector still ended 5e-7 to 5e-3 above
    it. It starts again from g: the step of a fresh solver at that M, with the first build's products
    counted too."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(150, 150, generator=gen, dtype=torch.float64))
    H = Q @ torch.diag(torch.linspace(-1.0, 3.0, 150, dtype=torch.float64)) @ Q.T
    H = 0.5 * (H + H.T)
    g = torch.randn(150, generator=gen, dtype=torch.float64)
    solver = KrylovCubicSolver(H, g)  # k_max 100, probe_steps 20
    first = solver.solve(1.0)
    extended = solver.solve(0.01, extend=True)
    fresh = KrylovCubicSolver(H, g).solve(0.01)
    assert torch.equal(extended.step, fresh.step) and extended.model_value == fresh.model_value
    assert extended.converged and extended.num_hvps == first.num_hvps + fresh.num_hvps
    best = cubic_newton_step(H, g, 0.01, method="dense").model_value
    assert extended.model_value == pytest.approx(best, rel=1e-9)


def test_krylov_two_pass(rng):
    H, g, M = problem("indefinite", rng)
    one = cubic_newton_step(H, g, M, method="krylov", reorth="none", guard=False, k_max=20, kappa=0.0)
    two = cubic_newton_step(H, g, M, method="krylov", reorth="none", two_pass=True, k_max=20, kappa=0.0)
    assert float((one.step - two.step).abs().max()) < 1e-12
    assert two.num_hvps == one.num_hvps + 19
    ref = cubic_newton_step(H, g, M, method="dense")
    full = cubic_newton_step(H, g, M, method="krylov", reorth="none", two_pass=True, k_max=D, kappa=1e-12)
    assert full.model_value == pytest.approx(ref.model_value, rel=1e-8)


def test_krylov_float32(rng):
    H, g, M = problem("indefinite", rng)
    ref = cubic_newton_step(H, g, M, method="dense")
    out = cubic_newton_step(H.float(), g.float(), M, method="krylov", kappa=1e-6)
    assert out.step.dtype == torch.float32
    assert model(H, g, M, out.step) == pytest.approx(ref.model_value, rel=1e-5)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_float32_step_beyond_the_dtype_is_refused(method, rng):
    """With M so small that the step's norm exceeds float32's range, "dense" returned Inf entries (model
    value NaN, converged True) and "krylov" NaN ones, without an error."""
    H, g, _ = problem("indefinite", rng)
    assert cubic_newton_step(H.float(), g.float(), 1e-30, method=method).step.isfinite().all()
    with pytest.raises(StepOverflow, match=rf"method '{method}'\): the step, of norm 2e\+40, does not fit "
                                           r"torch.float32: M = 1e-40 is too small") as caught:
        cubic_newton_step(H.float(), g.float(), 1e-40, method=method)
    assert caught.value.step_norm > 3.4e38 and caught.value.model_value < 0 and isinstance(caught.value, ValueError)
    # in float64 the same step fits
    assert math.isfinite(cubic_newton_step(H, g, 1e-40, method=method).step_norm)


@pytest.mark.parametrize("method", ["dense", "krylov"])
@pytest.mark.parametrize("M", [1e-154, 1e-160])
def test_a_huge_float64_step_reports_its_norm_and_model_value(method, M):
    """With a tiny M on a small problem (bottom eigenvalue -1: ||s|| ~ 2 / M) the step fits float64 but its
    squares do not: step_norm was Inf, model_value NaN (Inf - Inf of its terms) and the residual Inf, with
    converged True. The figures are checked against a hand computation on the returned step's exact entries
    (Decimal, 40 digits): at M = 1e-154 the value (-6.7e307) fits float64, at 1e-160 (-6.7e319) it does not and
    is -Inf, the honest rounding."""
    H = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64))
    g = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    out = cubic_newton_step(H, g, M, method=method)
    with decimal.localcontext(prec=40):
        s = [decimal.Decimal(float(x)) for x in out.step]
        norm = sum(x * x for x in s).sqrt()
        value = (sum(decimal.Decimal(float(a)) * x for a, x in zip(g, s))
                 + sum(decimal.Decimal(float(h)) * x * x for h, x in zip(H.diagonal(), s)) / 2
                 + decimal.Decimal(M) / 6 * norm**3)
    assert float(norm) == pytest.approx(2.0 / M, rel=1e-12) and out.step_norm == pytest.approx(float(norm), rel=1e-15)
    assert out.model_value == pytest.approx(float(value), rel=1e-14)  # -inf == -inf at M = 1e-160
    assert math.isfinite(out.residual) and out.residual <= 1e-14 * out.step_norm and out.converged
    assert out.sigma == pytest.approx(0.5 * M * out.step_norm, rel=1e-12)
    # the public model value of the same step, from H s
    assert cubic_model_value(g, out.step, H @ out.step, M) == pytest.approx(float(value), rel=1e-14)


def test_a_huge_step_on_a_positive_definite_h_raises_no_numpy_warning():
    """H positive definite and tiny, g huge (a step of norm 1.1e160): in the Krylov solver's model value
    g^T s is -Inf and s^T H s +Inf, whose sum made numpy warn "invalid value encountered" before the scaled
    value was taken: under -W error "krylov" and the ARC loop on it failed. Both now give the dense oracle's
    figures (the value, -7.9e309, is below float64's range: -Inf)."""
    H = torch.diag(torch.tensor([1e-10, 2e-10, 3e-10], dtype=torch.float64))
    g = torch.tensor([1e150, -1e150, 5e149], dtype=torch.float64)
    dense = cubic_newton_step(H, g, 1e-300, method="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        krylov = cubic_newton_step(H, g, 1e-300, method="krylov")
    assert krylov.step_norm == pytest.approx(dense.step_norm, rel=1e-12) and dense.step_norm == pytest.approx(
        1.1303883305e160, rel=1e-9)
    assert krylov.model_value == dense.model_value == -math.inf


# ----------------------------------------------------------------------------- gradient descent
@pytest.mark.parametrize("kind", KINDS)
def test_gd_matches_dense(kind, rng):
    # Documented tolerance: GD stopped at ||grad m|| <= 1e-9 ||g|| reaches the oracle's value to
    # 1e-7 relative (in the hard case it needs the noise to leave the saddle of the Krylov space).
    H, g, M = problem(kind, rng)
    ref = cubic_newton_step(H, g, M, method="dense")
    out = cubic_newton_step(H, g, M, method="gd", K=50000, eta=0.1, tol=1e-9, noise=1e-6 if kind == "hard" else 0.0)
    assert out.converged
    assert out.model_value == pytest.approx(ref.model_value, rel=1e-7)
    assert model(H, g, M, out.step) == pytest.approx(out.model_value, rel=1e-12)
    # + the Cauchy point and the product at the final iterate (+ one for the unperturbed g)
    assert out.num_hvps == out.iterations + 2 + (1 if kind == "hard" else 0)


def test_gd_cauchy_point_and_defaults(rng):
    H, g, M = problem("indefinite", rng)
    zero_steps = cubic_newton_step(H, g, M, method="gd", K=0)
    # The Cauchy point minimises m along -g: the derivative of m(-r g / ||g||) in r vanishes there.
    r = zero_steps.step_norm
    gn = float(torch.linalg.vector_norm(g))
    curv = float(g @ H @ g) / gn**2
    assert -gn + curv * r + 0.5 * M * r * r == pytest.approx(0.0, abs=1e-10)
    assert zero_steps.num_hvps == 2
    default = cubic_newton_step(H, g, M, method="gd")
    assert default.iterations == 5 and default.model_value < zero_steps.model_value
    # a tiny M on positive curvature: r -> ||g|| / curvature (the root's difference cancelled to r = 0)
    spd = H @ H.T + torch.eye(H.shape[0], dtype=torch.float64)
    tiny = cubic_newton_step(spd, 1e-3 * g / gn, 1e-14, method="gd", K=0)
    assert tiny.step_norm == pytest.approx(1e-3 / (float(g @ spd @ g) / gn**2), rel=1e-9)
    # M ||g||^2 underflowing to 0 raised ZeroDivisionError (M = 1e-150 and ||g|| = 1e-150; M = 1e-300 and
    # ||g|| = 1e-20): the Cauchy point is r = ||g|| / curvature as above
    for M_tiny, scale in ((1e-150, 1e-150), (1e-300, 1e-20), (1e-120, 1e-110)):
        tiny = cubic_newton_step(spd, scale * g / gn, M_tiny, method="gd", K=0)
        assert tiny.step_norm == pytest.approx(scale / (float(g @ spd @ g) / gn**2), rel=1e-9)
    # zero curvature along g: r = sqrt(2 ||g|| / M), with ||g|| M (1e-330) below float64
    flat = cubic_newton_step(torch.zeros_like(spd), 1e-150 * g / gn, 1e-180, method="gd", K=0)
    assert flat.step_norm == pytest.approx(math.sqrt(2e30), rel=1e-12)


def test_gd_tells_a_non_finite_hessian_from_divergence(rng):
    """A product that is NaN at an ordinary iterate was reported as the iteration's divergence ("the step
    size eta = 0.01 is too large"): one more product at a unit vector along the iterate tells them apart."""
    H, g, M = problem("indefinite", rng)
    calls = []

    def nan_after_three(v):
        calls.append(1)
        return H @ v if len(calls) <= 3 else torch.full_like(v, float("nan"))

    with pytest.raises(NonFiniteProduct, match=r"^cubic_gd: H's products are not finite: the product at a unit "
                                               r"vector along the iterate of gradient step \d+ holds NaN"):
        cubic_newton_step(nan_after_three, g, M, method="gd", K=10, eta=1e-3)
    with pytest.raises(ValueError, match=r"the step size eta = 1e\+06 is too large"):  # divergence still says so
        cubic_newton_step(H, g, M, method="gd", K=200, eta=1e6)


def test_stochastic_gd(rng):
    H, g, M = problem("indefinite", rng)
    # A sampler that returns the exact (g, H) with no noise is deterministic GD with T*K steps.
    exact = stochastic_cubic_gd(lambda: (g, H), M, T=4, K=25, eta=0.05, noise=0.0)
    plain = cubic_newton_step(H, g, M, method="gd", K=100, eta=0.05)
    assert torch.allclose(exact.step, plain.step, rtol=0, atol=1e-14)
    assert exact.num_hvps == 4 * 25 + 2
    # Unbiased mini-batch noise: the iterate still approaches the oracle.
    gen = torch.Generator().manual_seed(5)

    def sample():
        E = 0.01 * torch.randn(D, D, generator=gen, dtype=torch.float64)
        return g + 0.01 * torch.randn(D, generator=gen, dtype=torch.float64), H + (E + E.T) / 2

    ref = cubic_newton_step(H, g, M, method="dense")
    noisy = cubic_newton_step(None, None, M, method="gd", sample=sample, T=40, K=50, eta=0.05)
    assert model(H, g, M, noisy.step) == pytest.approx(ref.model_value, rel=1e-2)
    with pytest.raises(TypeError, match="pair"):
        stochastic_cubic_gd(lambda: g, M)


# ----------------------------------------------------------------------------- operators
def test_operator_inputs(rng):
    H, g, M = problem("indefinite", rng)
    ref = cubic_newton_step(H, g, M, method="dense")

    class Op:  # duck-typed operator without a counter
        shape, dtype, device = (D, D), torch.float64, torch.device("cpu")

        def matvec(self, v):
            return H @ v

    for op in (Op(), lambda v: H @ v):
        for method, opts in (("krylov", {"kappa": 1e-12}), ("dense", {})):
            out = cubic_newton_step(op, g, M, method=method, **opts)
            assert out.model_value == pytest.approx(ref.model_value, rel=1e-8)
        assert cubic_newton_step(op, g, M, method="dense").num_hvps == D  # made dense by d products


def test_curvature_operator(rng):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(20, 3, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 2, (20,), generator=rng)
    op = GenericHessian(net, torch.nn.CrossEntropyLoss(), (x, y))
    g = op.gradient()
    H = op.to_dense()
    M = 0.5
    ref = cubic_newton_step(H, g, M, method="dense")
    before = op.num_products
    out = cubic_newton_step(op, g, M, method="krylov", kappa=1e-12, k_max=op.shape[0])
    assert out.num_hvps == op.num_products - before > 0
    assert out.model_value == pytest.approx(ref.model_value, rel=1e-8)
    assert_global_optimum(H, g, M, out.step, tol=1e-7)


def test_sphere_noise_has_the_given_norm():
    gen = torch.Generator().manual_seed(0)
    for d in (1, 10, 10_000):
        xi = sphere_noise(d, 1e-3, gen)
        assert xi.shape == (d,) and xi.dtype == torch.float64
        assert float(torch.linalg.vector_norm(xi)) == pytest.approx(1e-3, rel=1e-12)  # not ~1e-3 sqrt(d)
    # different draws point in different directions
    assert not torch.allclose(sphere_noise(50, 1.0, gen), sphere_noise(50, 1.0, gen))


def test_sphere_noise_is_centred_and_symmetric():
    """xi is uniform on the sphere: over many draws each coordinate averages to 0, half the coordinates are
    positive and E[xi xi^T] = I / d (torch.rand, normalised, put every draw in the positive orthant)."""
    gen = torch.Generator().manual_seed(0)
    d = 10
    Z = torch.stack([sphere_noise(d, 1.0, gen) for _ in range(4000)])
    assert float(Z.mean(0).abs().max()) < 0.03  # each coordinate's mean: 0 +- 0.005 (1 / sqrt(d * 4000))
    assert float((Z > 0).double().mean()) == pytest.approx(0.5, abs=0.02)
    assert torch.allclose(Z.T @ Z / len(Z), torch.eye(d, dtype=torch.float64) / d, atol=0.02)


def test_stochastic_gd_draws_fresh_noise_every_round(rng):
    """Round t perturbs g by the t-th draw of one generator seeded with seed (a generator re-seeded every round
    gave every round the same direction). Two rounds on the exact (g, H), rebuilt here: round 1 is cubic_gd on
    g + xi_1, round 2 continues with K gradient steps on the model of g + xi_2."""
    H, g, M = problem("indefinite", rng)
    K, eta, noise = 5, 0.01, 0.5
    out = stochastic_cubic_gd(lambda: (g, H), M, T=2, K=K, eta=eta, noise=noise, seed=3)
    gen = torch.Generator().manual_seed(3)
    xi_1, xi_2 = sphere_noise(D, noise, gen), sphere_noise(D, noise, gen)
    assert not torch.allclose(xi_1, xi_2)
    s = cubic_gd(H, g + xi_1, M, K=K, eta=eta).step
    for _ in range(K):
        s = s - eta * (g + xi_2 + H @ s + 0.5 * M * float(torch.linalg.vector_norm(s)) * s)
    torch.testing.assert_close(out.step, s, rtol=1e-12, atol=1e-12)


def test_gd_perturbs_g_by_sphere_noise(rng):
    # With K = 0 the step is the Cauchy point of the perturbed g: ||g_it - g|| is exactly the noise.
    H, g, M = problem("indefinite", rng)
    noise = 0.25
    out = cubic_gd(H, g, M, K=0, noise=noise, seed=7)
    g_it = g + sphere_noise(D, noise, torch.Generator().manual_seed(7))
    expected = cubic_gd(H, g_it, M, K=0)
    assert torch.allclose(out.step, expected.step, rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.vector_norm(g_it - g)) == pytest.approx(noise, rel=1e-12)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(rng):
    H, g, M = problem("indefinite", rng)
    for method in ("dense", "krylov", "gd"):
        for bad_M in (0.0, -1.0, float("nan"), float("inf"), "1"):
            with pytest.raises(ValueError, match="M must be"):
                cubic_newton_step(H, g, bad_M, method=method)
        with pytest.raises(ValueError, match="dimension"):
            cubic_newton_step(H, g[:-1], M, method=method)
        nan_g = g.clone()
        nan_g[0] = float("nan")
        with pytest.raises(ValueError, match="g contains NaN"):
            cubic_newton_step(H, nan_g, M, method=method)
        nan_H = H.clone()
        nan_H[1, 2] = nan_H[2, 1] = float("inf")
        with pytest.raises(ValueError, match="NaN or Inf"):
            cubic_newton_step(nan_H, g, M, method=method)
        with pytest.raises(ValueError, match="NaN or Inf"):
            cubic_newton_step(lambda v: v * float("nan"), g, M, method=method)
        with pytest.raises(ValueError, match="2-D|1-D"):
            cubic_newton_step(H, H, M, method=method)
        with pytest.raises(TypeError, match="torch.Tensor"):
            cubic_newton_step(H, g.tolist(), M, method=method)
        with pytest.raises(TypeError, match="dtype"):
            cubic_newton_step(H.float(), g, M, method=method)
    with pytest.raises(ValueError, match="method"):
        cubic_newton_step(H, g, M, method="newton")
    with pytest.raises(ValueError, match="k_max"):
        cubic_newton_step(H, g, M, method="krylov", k_max=0)
    with pytest.raises(ValueError, match="guard"):
        cubic_newton_step(H, g, M, method="krylov", reorth="none", two_pass=True, guard=True)
    with pytest.raises(ValueError, match="eta"):
        cubic_newton_step(H, g, M, method="gd", eta=0.0)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=12, deadline=None)
@given(d=st.integers(1, 12), seed=st.integers(0, 2**16), shift=st.floats(-3, 3), log_M=st.floats(-2, 2),
       hard=st.booleans())
def test_property_krylov_equals_dense(d, seed, shift, log_M, hard):
    gen = torch.Generator().manual_seed(seed)
    lam = torch.randn(d, generator=gen, dtype=torch.float64) + shift
    H, U = sym_with_spectrum(lam, gen)
    c = torch.randn(d, generator=gen, dtype=torch.float64)
    if hard and d > 1:
        c[torch.argmin(lam)] = 0.0
    g = U @ c
    M = 10.0**log_M
    ref = cubic_newton_step(H, g, M, method="dense")
    assert_global_optimum(H, g, M, ref.step)
    out = cubic_newton_step(H, g, M, method="krylov", k_max=d, kappa=1e-13, probe_steps=d, seed=seed)
    assert out.model_value == pytest.approx(ref.model_value, rel=1e-8, abs=1e-12)


def test_every_seeded_solver_checks_its_seed():
    from unlearn_kernels.solvers import adaptive_cubic_newton

    H = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
    g = torch.tensor([1.0, 0.5, -0.2], dtype=torch.float64)
    calls = {
        "krylov": lambda seed: cubic_newton_step(H, g, 1.0, seed=seed),
        "cubic_gd": lambda seed: cubic_gd(H, g, 1.0, noise=1e-3, seed=seed),
        "stochastic_cubic_gd": lambda seed: stochastic_cubic_gd(lambda: (g, H), 1.0, T=1, seed=seed),
        "arc": lambda seed: adaptive_cubic_newton(lambda w: float(g @ w + 0.5 * w @ H @ w), lambda w: g + H @ w,
                                                  lambda w: H, torch.zeros(3, dtype=torch.float64), seed=seed),
    }
    for name, call in calls.items():
        call(7)
        with pytest.raises(TypeError, match="seed must be an int, got str"):
            call("a")
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
            call(-1)


def test_the_probe_without_reorthogonalisation_finds_the_hard_case():
    """reorth="none" with the (default) guard went on from the last residual vector, rounding noise inside the
    Krylov space of g when nothing reorthogonalises: a decoupled hard case (g exactly 0 on the bottom
    eigenvector of a diagonal H) returned a stationary point, model value -1.06e-8 where the minimum is
    -1.47e4, reported converged."""
    lam = torch.tensor([3.04495959, -4.17139043, 1.15261749, 0.60571846, 1.11858457], dtype=torch.float64)
    g = torch.tensor([2.01832855e-04, 0.0, 3.11575014e-05, 6.10456842e-05, -3.07236257e-05], dtype=torch.float64)
    M = 0.05737091953221014
    dense = cubic_newton_step(torch.diag(lam), g, M, method="dense")
    for reorth in ("full", "selective", "none"):
        out = cubic_newton_step(torch.diag(lam), g, M, method="krylov", reorth=reorth)
        assert out.hard_case and out.model_value == pytest.approx(dense.model_value, rel=1e-10)


class _InterruptedAt:
    """H's products, the k-th of which raises KeyboardInterrupt (a Ctrl-C during it)."""

    def __init__(self, H: torch.Tensor, k: int) -> None:
        self.H, self.k, self.n = H, k, 0
        self.shape, self.dtype, self.device = H.shape, H.dtype, H.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.n += 1
        if self.n == self.k:
            raise KeyboardInterrupt
        return self.H @ v


@pytest.mark.parametrize("k", [5, 14, 16])  # in the main phase (13 products), the probe's first, the probe
def test_a_solve_interrupted_by_ctrl_c_goes_on_where_it_stopped(k):
    """An interrupt during the hard-case probe left it marked as run: the next solve() skipped it and returned
    a stationary point (model value -0.0665 where the minimum is -5.3685), reported converged."""
    d = 40
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    H = Q @ torch.diag(torch.cat([torch.tensor([-2.0]), torch.linspace(1, 4, d - 1)]).double()) @ Q.T
    H = (H + H.T) / 2
    g = Q[:, 1:] @ torch.randn(d - 1, dtype=torch.float64, generator=gen) * 0.1  # the hard case
    dense = cubic_newton_step(H, g, 1.0, method="dense")
    solver = KrylovCubicSolver(_InterruptedAt(H, k), g)
    with pytest.raises(KeyboardInterrupt):
        solver.solve(1.0)
    out = solver.solve(1.0)
    assert out.converged and out.hard_case and out.model_value == pytest.approx(dense.model_value, rel=1e-8)


def test_a_solve_interrupted_after_the_probe_filled_the_basis_goes_on():
    """An interrupt in the small solve that follows the probe (the basis full: k_max + probe_steps vectors) made
    the next solve() probe again and fail in Lanczos's restart ("no restart possible: two-pass mode ...")."""
    d = 40
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    H = Q @ torch.diag(torch.cat([torch.tensor([-2.0]), torch.linspace(1, 4, d - 1)]).double()) @ Q.T
    H = (H + H.T) / 2
    g = Q[:, 1:] @ torch.randn(d - 1, dtype=torch.float64, generator=gen) * 0.1
    solver = KrylovCubicSolver(H, g, k_max=5, probe_steps=3)
    small_solve, calls = solver._small_solve, []

    def interrupted(M: float):
        calls.append(M)
        if len(calls) == 6:  # the first small solve after the probe
            raise KeyboardInterrupt
        return small_solve(M)

    solver._small_solve = interrupted
    with pytest.raises(KeyboardInterrupt):
        solver.solve(1.0)
    assert solver.process.n == solver.process.capacity
    out = solver.solve(1.0)
    assert out.iterations == solver.process.capacity and math.isfinite(out.model_value)


def _true_model_gradient(H, g, M, s) -> float:
    H, g, s = H.double(), g.double(), s.double()
    return float(torch.linalg.vector_norm(g + H @ s + 0.5 * M * torch.linalg.vector_norm(s) * s))


@pytest.mark.parametrize("reorth", ["full", "selective", "none"])
@pytest.mark.parametrize("seed", range(6))
def test_krylov_float32_breakdown_is_in_the_residual(reorth, seed):
    """A float32 near-hard case (d = 5, M = 0.075, ||s|| = 53): Lanczos broke down at beta = 2.7e-5 (below
    100 eps ||T|| = 3.5e-5, or the step op's 16 eps ||H q||) and restarted; the coupling it dropped, times the
    later block's long step along the bottom eigenvector, was left out of the residual: reported 6.6e-7 for a
    true model gradient of 9.3e-4, converged=True where the rule needs 1.1e-4 ("full", seed 0; "none" and
    "selective" alike). Under "full" the solver now keeps such a coupling in T (true gradient 1.1e-5); every
    reorth counts what it drops, so the residual (plus the documented float32 allowance) bounds the true
    gradient and converged means the rule holds."""
    d, M = 5, 0.075
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    H = Q @ torch.diag(torch.tensor([-2.0, 0.05, 1.3, 1.7, 3.0], dtype=torch.float64)) @ Q.T
    H32 = ((H + H.T) / 2).float()
    lam, U = torch.linalg.eigh(H32.double())
    g32 = (U[:, 1:] @ torch.tensor([1.0, -1.0, 0.5, 1.0], dtype=torch.float64) + 1e-9 * U[:, 0]).float()
    out = cubic_newton_step(H32, g32, M, method="krylov", reorth=reorth)
    true = _true_model_gradient(H32, g32, M, out.step)
    allowance = torch.finfo(torch.float32).eps * (3.0 + out.sigma) * out.step_norm  # the step's rounding
    assert true <= (1.2 if reorth == "selective" else 1.0) * out.residual + allowance
    if out.converged:
        assert true <= 1e-6 * M / 2 * out.step_norm ** 2 + allowance
    if reorth == "full":
        assert out.converged and true < 3e-5


def test_krylov_float32_clustered_g_zero_breakdown_is_in_the_residual():
    """g = 0, float32, eigenvalues -1 and 49 within 5e-8 of 1 (M = 1): the float32 Lanczos vectors left a
    coupling of 8.4e-6 (the exact Krylov space is invariant to 1e-7), dropped as a breakdown (below 100 eps
    ||T|| = 1.2e-5): reported residual 3.8e-8, true model gradient 1.7e-5, converged=True where the rule needs
    2e-6. Now T keeps it: true 2.4e-7."""
    import numpy as np

    d, M = 50, 1.0
    Q, _ = np.linalg.qr(np.random.default_rng(d).standard_normal((d, d)))
    ev = 1 + 1e-9 * np.arange(d)
    ev[0] = -1 - 1e-10
    H = Q @ np.diag(np.sort(ev)) @ Q.T
    H32 = torch.tensor(0.5 * (H + H.T), dtype=torch.float32)
    g = torch.zeros(d, dtype=torch.float32)
    out = cubic_newton_step(H32, g, M, method="krylov")
    true = _true_model_gradient(H32, g, M, out.step)
    allowance = torch.finfo(torch.float32).eps * (1.0 + out.sigma) * out.step_norm
    assert true <= out.residual + allowance
    assert out.converged and true <= 1e-6 * M / 2 * out.step_norm ** 2
    assert out.step_norm == pytest.approx(2.0, rel=1e-5)


def test_gd_cauchy_point_whose_factor_overflows_float32():
    """float32 H = [[-1]], g = [1e-30], M = 1e-12: the Cauchy point -2e12 fits float32, but it was formed as
    g * (-radius / ||g||), a factor of 2e42 that is Inf in float32: cubic_gd raised NonFiniteProduct blaming
    the step size and M ("the Cauchy point is too long: M too small"); dense and Krylov give -2.0e12."""
    H = torch.tensor([[-1.0]])
    g = torch.tensor([1e-30])
    dense = cubic_newton_step(H, g, 1e-12, method="dense")
    for K in (0, 5):
        out = cubic_newton_step(H, g, 1e-12, method="gd", K=K)
        assert out.step.dtype == torch.float32 and torch.isfinite(out.step).all()
        assert float(out.step[0]) == pytest.approx(float(dense.step[0]), rel=1e-6)
