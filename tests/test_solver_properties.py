"""Property tests of the solvers against dense float64 oracles: random spectra and sizes, singular
Hessians, the hard case of the cubic subproblem, indefinite damped systems, and the adaptive
iteration's guarantee on random non-convex functions."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unlearn_kernels.solvers import adaptive_cubic_newton, cubic_newton_step, damped_newton_step, pinv_newton_step

SETTINGS = settings(max_examples=25, deadline=None)


def random_problem(d: int, seed: int, zeros: int, shift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A symmetric H with ``zeros`` exact zero eigenvalues and the rest Gaussian + shift (either
    sign, so H is singular and/or indefinite), its eigenvectors U, and a Gaussian g."""
    gen = torch.Generator().manual_seed(seed)
    lam = torch.randn(d, generator=gen, dtype=torch.float64) + shift
    lam[:min(zeros, d - 1)] = 0.0
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    H = (U * lam) @ U.T
    return 0.5 * (H + H.T), U, torch.randn(d, generator=gen, dtype=torch.float64)


@SETTINGS
@given(d=st.integers(1, 24), seed=st.integers(0, 2**16), zeros=st.integers(0, 6), shift=st.floats(-2, 2),
       log_M=st.floats(-3, 2), hard=st.booleans())
def test_dense_cubic_step_is_the_global_minimiser(d, seed, zeros, shift, log_M, hard):
    H, U, g = random_problem(d, seed, zeros, shift)
    lam, V = torch.linalg.eigh(H)
    if hard and d > 1:  # no component along the bottom eigenvector: the hard case when lam_min < 0
        g = g - (V[:, 0] @ g) * V[:, 0]
    M = 10.0**log_M
    out = cubic_newton_step(H, g, M, method="dense")
    s = out.step
    sigma = 0.5 * M * float(s.norm())
    scale = float(lam.abs().max()) + sigma + float(g.norm()) + 1.0
    # (H + sigma I) s = -g with H + sigma I PSD characterises the global minimiser
    assert float(((H + sigma * torch.eye(d, dtype=torch.float64)) @ s + g).norm()) <= 1e-9 * scale
    assert float(lam[0]) + sigma >= -1e-9 * scale
    # and no random point does better
    gen = torch.Generator().manual_seed(seed + 1)

    def m(v):
        return float(g @ v + 0.5 * v @ H @ v + M / 6 * v.norm() ** 3)

    for _ in range(20):
        assert m(s + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)) >= out.model_value - 1e-12 * scale


@SETTINGS
@given(d=st.integers(2, 24), seed=st.integers(0, 2**16), zeros=st.integers(0, 6), shift=st.floats(-2, 2))
def test_pinv_steps_equal_the_dense_pseudo_inverse(d, seed, zeros, shift):
    H, _, g = random_problem(d, seed, zeros, shift)
    lam = torch.linalg.eigvalsh(H)
    keep = lam.abs() > 1e-6 * lam.abs().max()
    if bool(((lam.abs() > 1e-7 * lam.abs().max()) & ~keep).any()):  # an eigenvalue at the cutoff: ambiguous
        return
    expected = -torch.linalg.pinv(H, hermitian=True, rtol=1e-6) @ g
    tol = 1e-8 * max(float(expected.norm()), 1.0) * float(lam.abs().max() / lam.abs()[keep].min())
    eigh = pinv_newton_step(H, g, solver="eigh")
    assert eigh.info["rank"] == int(keep.sum())
    assert float((eigh.step - expected).norm()) <= tol
    # Lanczos with d steps spans the whole space, or stops where the Krylov space of g closes: the exact step
    lanczos = pinv_newton_step(lambda v: H @ v, g, solver="lanczos", rank=d)
    assert float((lanczos.step - expected).norm()) <= 1e3 * tol


@SETTINGS
@given(d=st.integers(1, 24), seed=st.integers(0, 2**16), shift=st.floats(-2, 2), damping=st.floats(0, 2))
def test_damped_steps_solve_indefinite_systems(d, seed, shift, damping):
    H, _, g = random_problem(d, seed, 0, shift)
    A = H + damping * torch.eye(d, dtype=torch.float64)
    mu = torch.linalg.eigvalsh(A)
    cond = float(mu.abs().max() / mu.abs().min())
    if cond > 1e6:  # (nearly) singular: a solution is not defined to compare with
        return
    expected = -torch.linalg.solve(A, g)
    eigh = damped_newton_step(H, g, damping, solver="eigh")
    assert float((eigh.step - expected).norm()) <= 1e-12 * cond * max(float(expected.norm()), 1.0)
    ldl = damped_newton_step(H, g, damping, solver="ldl")
    assert float((ldl.step - expected).norm()) <= 1e-12 * cond * max(float(expected.norm()), 1.0)
    assert ldl.info["negative_eigenvalues"] == int((mu < 0).sum())
    minres = damped_newton_step(H, g, damping, solver="minres", tol=1e-12, maxiter=20 * d)
    assert float((minres.step - expected).norm()) <= 1e-9 * cond * max(float(expected.norm()), 1.0)


@SETTINGS
@given(d=st.integers(1, 10), seed=st.integers(0, 2**16), log_M=st.floats(-6, 6), log_scale=st.floats(-2, 2))
def test_adaptive_iteration_never_increases_f(d, seed, log_M, log_scale):
    # f(w) = sum_i c_i log(1 + (a_i^T w - y_i)^2) + 1/4 ||w||^4 / d: non-convex, bounded below
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=gen, dtype=torch.float64) * 10.0**log_scale
    y = 2 * torch.randn(3 * d, generator=gen, dtype=torch.float64)

    def value(w):
        return float(torch.log1p((X @ w - y) ** 2).sum() + 0.25 * float(w @ w) ** 2 / d)

    def gradient(w):
        r = X @ w - y
        return X.T @ (2 * r / (1 + r**2)) + float(w @ w) * w / d

    def hessian(w):
        r = X @ w - y
        return ((X.T * (2 * (1 - r**2) / (1 + r**2) ** 2)) @ X
                + (float(w @ w) * torch.eye(d, dtype=torch.float64) + 2 * torch.outer(w, w)) / d)

    w0 = torch.randn(d, generator=gen, dtype=torch.float64)
    out = adaptive_cubic_newton(value, gradient, hessian, w0, M=10.0**log_M, max_iterations=5)
    assert math.isfinite(out.value) and value(out.w) == out.value <= value(w0)
    assert out.steps == sum(t.accepted for t in out.trials)
    for t in out.trials:
        assert t.accepted == (t.ratio >= 0.1) and t.predicted > 0
        if t.accepted:
            assert t.actual > 0
    if out.stop_reason == "max_iterations":
        assert out.steps == 5
    assert out.stop_reason in ("max_iterations", "tolerance", "no_progress")


def test_random_problems_are_singular_and_indefinite():
    # the generator above makes the problems the properties are about (not only easy ones)
    H, _, _ = random_problem(8, 3, 3, -1.0)
    lam = torch.linalg.eigvalsh(H)
    assert int((lam.abs() < 1e-12).sum()) == 3 and float(lam[0]) < 0
