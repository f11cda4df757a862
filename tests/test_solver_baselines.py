"""Newton-step baselines (pinv, damped, CG, MINRES, LiSSA) against their closed forms in float64."""
import math

import pytest
import torch
from spectra import sym_with_spectrum
from tolerance import relative_error

from unlearn_kernels.solvers import (
    DENSE_MAX_DIM,
    DENSE_SOLVE_MAX_DIM,
    DenseOperator,
    NonFiniteProduct,
    as_operator,
    conjugate_gradient,
    cubic_newton_step,
    damped_newton_step,
    damped_solver,
    lanczos,
    lissa,
    minres,
    pinv_newton_step,
)

D = 25


@pytest.fixture
def singular(rng):
    """Rank-deficient indefinite H (5 zero eigenvalues), and a g with a part outside range(H)."""
    lam = torch.cat([torch.zeros(5), torch.linspace(-2.0, 3.0, D - 5)]).double()
    H, U = sym_with_spectrum(lam, rng)
    return H, U, torch.randn(D, generator=rng, dtype=torch.float64)


@pytest.fixture
def spd(rng):
    H, _ = sym_with_spectrum(torch.linspace(0.1, 4.0, D, dtype=torch.float64), rng)
    return H, torch.randn(D, generator=rng, dtype=torch.float64)


def test_pinv_eigh_matches_torch_pinv(singular):
    H, _, g = singular
    out = pinv_newton_step(H, g)
    expected = -torch.linalg.pinv(H, hermitian=True) @ g
    assert torch.allclose(out.step, expected, rtol=1e-10, atol=1e-10)
    assert out.method == "pinv-eigh" and out.info["rank"] == D - 5 and out.num_hvps == 0
    assert out.residual == pytest.approx(float(torch.linalg.vector_norm(H @ out.step + g)), rel=1e-8)
    # The relative cutoff drops eigenvalues below rcond * max|lambda|.
    H2 = H + 1e-9 * torch.outer(g, g) / float(g @ g)
    assert pinv_newton_step(H2, g, rcond=1e-6).info["rank"] == D - 5
    assert pinv_newton_step(H2, g, rcond=1e-12).info["rank"] == D - 4


def test_pinv_minres_on_operator(singular):
    H, U, _ = singular
    g = U[:, 5:] @ torch.linspace(1.0, 2.0, D - 5, dtype=torch.float64)  # consistent: g in range(H)
    expected = -torch.linalg.pinv(H, hermitian=True) @ g
    out = pinv_newton_step(lambda v: H @ v, g, solver="minres", tol=1e-12)
    assert out.method == "pinv-minres" and out.converged
    assert torch.allclose(out.step, expected, rtol=1e-8, atol=1e-8)
    assert out.num_hvps >= out.iterations > 0
    assert pinv_newton_step(H, g, solver="minres", tol=1e-12).step.allclose(expected, rtol=1e-8, atol=1e-8)


def test_pinv_lanczos_truncated(singular):
    H, U, g = singular
    expected = -torch.linalg.pinv(H, hermitian=True) @ g
    # On the whole space (rank >= d, full reorthogonalisation) the truncated pseudo-inverse is the exact one.
    full = pinv_newton_step(lambda v: H @ v, g, solver="lanczos", rank=D)
    assert full.method == "pinv-lanczos" and full.info["rank"] == D - 5 and full.converged
    assert torch.allclose(full.step, expected, rtol=1e-8, atol=1e-8)
    assert full.residual == pytest.approx(float(torch.linalg.vector_norm(H @ full.step + g)), rel=1e-8)
    # With fewer steps: the pseudo-inverse of H on the Krylov space of g, Q pinv(Q^T H Q) Q^T g.
    k = 6
    part = pinv_newton_step(H, g, solver="lanczos", rank=k)
    assert part.info["lanczos_steps"] == k and part.info["rank"] <= k and part.num_hvps == k + 1
    assert not part.converged  # a truncated step is not the pseudo-inverse step (it was reported converged)
    Q = torch.linalg.qr(torch.stack([torch.linalg.matrix_power(H, j) @ g for j in range(k)], dim=1))[0]
    T = Q.T @ H @ Q
    projected = -Q @ torch.linalg.pinv(T, hermitian=True, rtol=1e-6) @ (Q.T @ g)
    assert torch.allclose(part.step, projected, rtol=0, atol=1e-7 * float(projected.norm()))


def test_pinv_lanczos_stops_where_the_krylov_space_of_g_ends(rng):
    # three distinct eigenvalues: the Krylov space of g has dimension 3 and the step on it is exact; rank=25 went
    # on restarting into random blocks g does not touch (26 products, info["rank"] 25 for a rank-3 answer)
    H, _ = sym_with_spectrum(torch.tensor([1.0, 2.0, 3.0]).repeat_interleave(10).double(), rng)
    g = torch.randn(30, generator=rng, dtype=torch.float64)
    out = pinv_newton_step(H, g, solver="lanczos", rank=25)
    assert torch.allclose(out.step, -torch.linalg.solve(H, g), rtol=1e-10, atol=1e-10)
    assert out.info["rank"] == 3 and out.info["lanczos_steps"] == 3 and out.num_hvps == 4 and out.converged
    assert out.info["dropped_coupling"] <= 100 * torch.finfo(torch.float64).eps * 3  # closed at rounding level


def test_pinv_lanczos_dropped_coupling_tells_an_exact_close_from_no_close():
    """info["dropped_coupling"] read 0.0 both where the Krylov space of g closed exactly (nothing to drop) and
    where the run stopped at rank steps without closing (nothing dropped either, but the step truncated): the
    second is None now."""
    H = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
    g = torch.zeros(30, dtype=torch.float64)
    g[0] = 2.0  # an eigenvector: the first coupling is exactly 0
    closed = pinv_newton_step(H, g, solver="lanczos", rank=10)
    assert closed.info["dropped_coupling"] == 0.0 and closed.info["lanczos_steps"] == 1 and closed.converged
    assert torch.allclose(closed.step, -g, rtol=0, atol=1e-15)
    truncated = pinv_newton_step(H, torch.ones(30, dtype=torch.float64), solver="lanczos", rank=5)
    assert truncated.info["dropped_coupling"] is None and truncated.info["lanczos_steps"] == 5
    assert not truncated.converged
    # g = 0: no run, nothing dropped; the same keys
    zero = pinv_newton_step(H, torch.zeros(30, dtype=torch.float64), solver="lanczos")
    assert zero.info == {"rank": 0, "lanczos_steps": 0, "dropped_coupling": None}


def test_auto_solvers_choose_by_dimension(singular, monkeypatch):
    H, _, g = singular
    op = lambda v: H @ v  # noqa: E731  (an operator: no dense matrix to read)
    assert pinv_newton_step(op, g).method == "pinv-eigh"  # d = 25 <= DENSE_MAX_DIM
    assert damped_newton_step(op, g, 0.5).method == "damped-eigh"
    assert D <= DENSE_MAX_DIM
    # damped solves: the eigendecomposition, then MINRES falling back to the LDL^T factorisation while
    # the float64 matrix fits in 1 GiB, then MINRES alone (with the memory to hold them: see below)
    import unlearn_kernels.checks as checks

    monkeypatch.setattr(checks, "available_memory", lambda device: 2**40)
    assert [damped_solver(d) for d in (1, DENSE_MAX_DIM, DENSE_MAX_DIM + 1, DENSE_SOLVE_MAX_DIM,
                                       DENSE_SOLVE_MAX_DIM + 1)] == ["eigh", "eigh", "minres-ldl", "minres-ldl",
                                                                     "minres"]
    assert 8 * DENSE_SOLVE_MAX_DIM**2 <= 2**30 < 8 * (DENSE_SOLVE_MAX_DIM + 1) ** 2


def test_damped_eigh_and_minres_solve_indefinite_systems(singular):
    H, _, g = singular
    lam = 0.5  # H + 0.5 I is indefinite (lambda_min = -2) and nonsingular
    expected = -torch.linalg.solve(H + lam * torch.eye(D, dtype=torch.float64), g)
    eig = damped_newton_step(H, g, lam, solver="eigh")
    assert eig.method == "damped-eigh" and eig.info["lambda_min"] == pytest.approx(-2.0, rel=1e-10)
    assert torch.allclose(eig.step, expected, rtol=1e-10, atol=1e-10)
    mr = damped_newton_step(H, g, lam, solver="minres", tol=1e-12)
    assert torch.allclose(mr.step, expected, rtol=1e-7, atol=1e-7)
    # LDL^T of the dense matrix built from d products; its D counts the negative eigenvalues of H + lam I
    ldl = damped_newton_step(lambda v: H @ v, g, lam, solver="ldl")
    assert ldl.method == "damped-ldl" and ldl.num_hvps == D and ldl.converged
    assert torch.allclose(ldl.step, expected, rtol=1e-10, atol=1e-10)
    assert ldl.residual == pytest.approx(float(torch.linalg.vector_norm(H @ ldl.step + lam * ldl.step + g)),
                                         rel=1e-3, abs=1e-13)
    assert ldl.info["negative_eigenvalues"] == int((torch.linalg.eigvalsh(H) + lam < 0).sum()) == 6
    # MINRES first: where it converges within its budget its step is returned, else the factorisation's
    # (20 distinct eigenvalues: MINRES needs about 20 iterations, more than the default budget of D // 4)
    well = damped_newton_step(lambda v: H @ v, g, lam, solver="minres-ldl", tol=1e-12, maxiter=D)
    assert well.method == "damped-minres" and well.num_hvps == well.iterations + 1 <= D + 1
    assert torch.allclose(well.step, expected, rtol=1e-7, atol=1e-7)
    short = damped_newton_step(lambda v: H @ v, g, lam, solver="minres-ldl", tol=1e-12)
    assert short.method == "damped-ldl" and short.info["minres_iterations"] == short.iterations == D // 4
    assert short.num_hvps == D // 4 + 1 + D and torch.allclose(short.step, expected, rtol=1e-10, atol=1e-10)
    assert short.info["negative_eigenvalues"] == 6
    # float32 in, float32 out (the factorisation runs in float64)
    ldl32 = damped_newton_step(H.float(), g.float(), lam, solver="ldl")
    assert ldl32.step.dtype == torch.float32 and torch.allclose(ldl32.step.double(), expected, atol=1e-4)
    # a singular H + damping I: the pseudo-inverse there (lambda = 0 is an eigenvalue of H)
    zero = damped_newton_step(H, g, 0.0, solver="eigh")
    assert torch.allclose(zero.step, pinv_newton_step(H, g, rcond=1e-12).step, rtol=1e-10, atol=1e-10)
    # ... which a factorisation cannot give: an exactly zero pivot is an error that says what to use
    with pytest.raises(ValueError, match=r"H \+ damping I is singular to working precision .*solver='eigh'"):
        damped_newton_step(torch.diag(torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)),
                           torch.ones(3, dtype=torch.float64), 0.0, solver="ldl")


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_damped_matches_solve(spd, solver):
    H, g = spd
    lam = 0.3
    out = damped_newton_step(H, g, lam, solver=solver, tol=1e-12)
    expected = -torch.linalg.solve(H + lam * torch.eye(D, dtype=torch.float64), g)
    assert out.converged and out.method == f"damped-{solver}"
    assert torch.allclose(out.step, expected, rtol=1e-9, atol=1e-9)
    true = torch.linalg.vector_norm((H + lam * torch.eye(D, dtype=torch.float64)) @ out.step + g)
    assert out.residual == pytest.approx(float(true), rel=1e-3, abs=1e-11)


def test_damped_indefinite(singular):
    H, _, g = singular
    lam = 0.5  # H + 0.5 I is indefinite (lambda_min = -2)
    cg = damped_newton_step(H, g, lam, solver="cg")
    assert not cg.converged and cg.info["negative_curvature"]
    mr = damped_newton_step(H, g, lam, solver="minres", tol=1e-12)
    expected = -torch.linalg.solve(H + lam * torch.eye(D, dtype=torch.float64), g)
    assert mr.converged and torch.allclose(mr.step, expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("step", [
    lambda H, g: damped_newton_step(H, g, 0.5, solver="eigh"),
    lambda H, g: damped_newton_step(H, g, 0.5, solver="ldl"),
    lambda H, g: pinv_newton_step(H, g, solver="eigh"),
])
def test_float32_residual_is_the_returned_steps(singular, step):
    # the residual was of the float64 solution before its rounding to float32: 1.6e-16 reported for 2.2e-7
    H, _, g = singular
    H, g = H.float(), g.float()
    out = step(H, g)
    assert out.step.dtype == torch.float32
    damping = 0.0 if out.method == "pinv-eigh" else 0.5
    A = H.double() + damping * torch.eye(D, dtype=torch.float64)  # the float32 matrix the solver was given
    true = torch.linalg.vector_norm(A @ out.step.double() + g.double())
    assert out.residual == pytest.approx(float(true), rel=1e-6)
    assert out.method == "pinv-eigh" or out.residual > 1e-9  # float32 rounding shows



@pytest.mark.parametrize("step", [
    lambda H, g: pinv_newton_step(H, g, rcond=0.0, solver="eigh"),
    lambda H, g: damped_newton_step(H, g, 0.0, rcond=0.0, solver="eigh"),
])
def test_an_eigh_residual_is_the_true_one_when_rounding_level_eigenvalues_are_inverted(step):
    """rcond = 0 keeps the zero eigenvalues' rounding noise (~1e-16), so the step is ~1e16 long: the residual was
    computed in the eigenbasis, exact for U diag(lam) U^T but not for H (20.1 reported for a true 5.6)."""
    generator = torch.Generator().manual_seed(3)
    H, _ = sym_with_spectrum(torch.tensor([-3.0, -1, 0, 0, 0, 1, 2, 3, 4, 5], dtype=torch.float64), generator)
    H = (H + H.T) / 2  # the solvers' symmetrised matrix, bit for bit: with ||s|| ~ 1e16 any rounding shows
    g = torch.randn(10, dtype=torch.float64, generator=generator)
    out = step(H, g)
    assert out.info["rank"] == 10 and float(out.step.norm()) > 1e12
    assert out.residual == pytest.approx(float(torch.linalg.vector_norm(H @ out.step + g)), rel=1e-12)

def test_a_matrix_or_products_that_require_grad_give_detached_steps(singular):
    # the solvers are not differentiable: the LDL^T, MINRES and pinv-MINRES paths failed with torch's "Can't call
    # numpy() on Tensor that requires grad", the eigh and cubic paths returned steps with a graph
    H, _, g = singular
    H = H.clone().requires_grad_(True)
    steps = [damped_newton_step(H, g, 0.5, solver=s) for s in ("eigh", "ldl", "minres-ldl", "minres")]
    steps += [pinv_newton_step(H, g, solver=s) for s in ("eigh", "minres", "lanczos")]
    steps.append(damped_newton_step(lambda v: H @ v, g, 0.5, solver="minres"))
    steps += [cubic_newton_step(H, g, 1.0, method=m) for m in ("dense", "krylov")]
    assert all(not out.step.requires_grad for out in steps)
    expected = -torch.linalg.solve(H.detach() + 0.5 * torch.eye(D, dtype=torch.float64), g)
    assert torch.allclose(steps[1].step, expected, rtol=1e-10, atol=1e-10) and H.grad is None


@pytest.mark.parametrize("solver", ["eigh", "ldl", "minres-ldl", "minres"])
def test_damped_solvers_return_the_step_on_the_gradients_device(singular, solver, device):
    H, _, g = singular
    H, g = H.to(device), g.to(device)
    expected = -torch.linalg.solve(H + 0.5 * torch.eye(D, dtype=torch.float64, device=device), g)
    out = damped_newton_step(lambda v: H @ v, g, 0.5, solver=solver, **({"tol": 1e-12} if "minres" in solver else {}))
    assert out.step.device == device and torch.allclose(out.step, expected, rtol=1e-7, atol=1e-7)



@pytest.mark.parametrize("diagonal", [[0.0] * 6, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], ids=["zero", "singular"])
def test_conjugate_gradient_stops_at_zero_curvature(diagonal):
    """p^T H p <= 0 stops CG (documented: negative_curvature covers zero); a test of < 0 divided by zero here."""
    H = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    b = torch.ones(6, dtype=torch.float64) if not any(diagonal) else torch.eye(6, dtype=torch.float64)[4]
    out = conjugate_gradient(H, b)
    assert not out.converged and out.info["negative_curvature"]

def test_conjugate_gradient_counts_and_start(spd):
    H, b = spd
    out = conjugate_gradient(H, b, tol=1e-12)
    assert torch.allclose(out.solution, torch.linalg.solve(H, b), rtol=1e-10, atol=1e-10)
    assert out.num_hvps == out.iterations + 1 <= D + 1  # and one for the true residual
    assert out.residual == pytest.approx(float(torch.linalg.vector_norm(H @ out.solution - b)), rel=1e-12)
    warm = conjugate_gradient(H, b, tol=1e-12, x0=out.solution)
    assert warm.iterations == 0 and warm.num_hvps == 1
    capped = conjugate_gradient(H, b, maxiter=3)
    assert capped.iterations == 3 and not capped.converged


def test_conjugate_gradient_reports_its_true_residual(rng):
    """The residual was CG's recursive one: 7.3e-12 and "converged" at tol 1e-12 on a system of condition
    1e8, where ||H x - b|| was 1.0e-7."""
    H, _ = sym_with_spectrum(torch.logspace(-8, 0, 60, dtype=torch.float64), rng)
    b = torch.randn(60, generator=rng, dtype=torch.float64)
    out = conjugate_gradient(H, b, tol=1e-12, maxiter=2000)
    true = float(torch.linalg.vector_norm(H @ out.solution - b))
    assert out.residual == pytest.approx(true, rel=1e-9)
    assert out.converged == (true <= 1e-12 * float(torch.linalg.vector_norm(b)))


def test_conjugate_gradient_converges_in_float32_to_what_rounding_leaves(rng):
    """In float32 the true residual cannot reach 1e-8 ||b|| (damped_newton_cg's tol): CG solved its systems
    (the step equal to MINRES's) and said converged=False, negative_curvature=False, in 2 to 11 of 200 iterations.
    Now the true residual counts up to 100 eps (||(H + damping I) x|| + ||b||); a float32 solve that drifted
    beyond that is still not converged."""
    H, _ = sym_with_spectrum(torch.linspace(1, 100, 60, dtype=torch.float64), rng)
    b = torch.randn(60, generator=rng, dtype=torch.float64)
    out = conjugate_gradient(H.float(), b.float(), tol=1e-8)
    exact = torch.linalg.solve(H, b)
    assert out.converged and not out.info["negative_curvature"]
    assert 1e-8 < out.residual / float(torch.linalg.vector_norm(b)) < 2.4e-5
    assert relative_error(out.solution.double(), exact) < 1e-5
    assert not conjugate_gradient(H.float(), b.float(), tol=1e-8, maxiter=3).converged  # stopped early: not solved


@pytest.mark.parametrize("bad, error, match", [
    (lambda b: b.float(), TypeError, "x0 must have b's dtype torch.float64, got torch.float32"),
    (lambda b: b.unsqueeze(1), ValueError, r"x0 must be a 1-D \(d,\) vector"),
    (lambda b: b[:-1], ValueError, r"x0 must be a \(\d+,\) vector on cpu like b, got shape"),
    (lambda b: torch.full_like(b, float("nan")), ValueError, "x0 contains NaN or Inf"),
])
def test_conjugate_gradient_names_a_bad_start(spd, bad, error, match):
    H, b = spd
    for operator in (H, lambda v: H @ v):  # a matrix and a function: the same message
        with pytest.raises(error, match=match):
            conjugate_gradient(operator, b, x0=bad(b))


def test_lissa_matches_closed_form(spd):
    H, b = spd
    lam = 0.2
    expected = torch.linalg.solve(H + lam * torch.eye(D, dtype=torch.float64), b)
    out = lissa(H, b, scale=4.5, damping=lam, depth=600)
    assert out.converged and torch.allclose(out.solution, expected, rtol=1e-8, atol=1e-8)
    assert out.num_hvps == 600 + 1  # + the residual product
    step = damped_newton_step(H, b, lam, solver="lissa", scale=4.5, depth=600)
    assert torch.allclose(step.step, -expected, rtol=1e-8, atol=1e-8)
    # Too small a scale makes the recursion diverge; it is reported, not raised.
    diverged = lissa(H, b, scale=1.0, depth=3000)
    assert not diverged.converged
    # also when only the last step overflows (its product was still finite)
    last = lissa(torch.tensor([[1e200]], dtype=torch.float64), torch.ones(1, dtype=torch.float64), scale=1e-200,
                 depth=1)
    assert not last.converged and last.residual == math.inf


def test_lissa_growing_but_finite_is_not_converged():
    """Negative curvature below -damping grows a component without overflowing: LiSSA said converged
    (its rule was "the iterates stayed finite") with a residual 9.8e7 times ||b|| here; damped_newton_step's
    "lissa" passed that on. Converged now also needs a residual of at most ||b||, the most the truncated
    recursion leaves when every eigenvalue of H + damping I is in [0, 2 scale]."""
    H = torch.diag(torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    out = lissa(H, b, scale=2.0, damping=0.1, depth=50)
    assert not out.converged and math.isfinite(out.residual) and out.residual > 1e6 * float(b.norm())
    assert not damped_newton_step(H, b, 0.1, solver="lissa", scale=2.0, depth=50).converged
    assert lissa(H, b, scale=2.0, damping=1.5, depth=50).converged  # H + 1.5 I in [0.5, 3.5]: in range


def test_lissa_slow_growth_just_past_the_range_is_not_converged():
    """The rule's boundary: one eigenvalue of H + damping I just past 2 scale grows its component slowly,
    to a residual of 1.21 ||b|| after 50 steps (computed here in float64), above the (1 + 1e-3) ||b||
    that counts as converged; a slack of 0.5 would have passed every other LiSSA test."""
    H = torch.diag(torch.tensor([0.5, 1.0, 1.5, 2.0041], dtype=torch.float64))
    b = torch.tensor([0.1, 0.1, 0.1, 1.0], dtype=torch.float64)
    out = lissa(H, b, scale=1.0, depth=50)
    residual = float(torch.linalg.vector_norm(H @ out.solution - b))
    assert out.residual == pytest.approx(residual, rel=1e-12) and 1.2 < residual / float(b.norm()) < 1.3
    assert not out.converged
    assert lissa(H, b, scale=1.1, depth=50).converged  # every eigenvalue in [0, 2 scale]


def test_lissa_divergence_on_a_curvature_operator_is_reported():
    """A curvature operator refuses a non-finite vector (ValueError "vector contains NaN or Inf"): a
    diverging recursion on one raised that error where on a dense H it is reported as not converged; and
    ``iterations`` said depth * repeats where the recursion stopped early."""
    from torch import nn

    from unlearn_kernels.curvature import hessian_operator

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (9,), generator=gen)
    H = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    g = H.gradient()
    for op in (H, H.to_dense(), H.matvec):
        out = lissa(op, g, scale=1e-3, depth=2000)
        # the zero solution returned, and its residual ||g|| (see test_lissa_reports_the_returned_solutions_residual)
        assert not out.converged and not out.solution.any() and out.residual == pytest.approx(float(g.norm()))
        assert 0 < out.iterations < 2000


def test_lissa_tells_a_non_finite_operator_from_its_own_divergence():
    # a NaN product of the first iterate was taken for divergence (zero solution, converged=False, and the
    # method layer's "raise scale or damping"); one more product on the iterate's direction tells them apart
    b = torch.ones(5, dtype=torch.float64)
    with pytest.raises(NonFiniteProduct, match="NaN or Inf for a vector of entries at most 1: the Hessian .* is not "
                                               "finite"):
        lissa(lambda v: torch.full_like(v, float("nan")), b, scale=10.0)
    H = torch.diag(torch.tensor([-1e300, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    diverged = lissa(H, b, scale=1.0)
    assert not diverged.converged and diverged.residual == float(b.norm())  # overflow with the iterate's size only
    sampled = lissa(H, b, scale=1.0, sample=lambda: H)  # the failed product and the probe count (the norm of the
    assert sampled.num_hvps == 3 and sampled.iterations == 1  # 1e300 iterate overflowed, and the probe)


def test_lissa_at_non_finite_weights_raises_instead_of_reporting_divergence():
    """At a NaN weight a curvature operator returned NaN products, which LiSSA took for its own
    divergence (``converged=False``, no error): the operator now refuses the weights by name, and
    LiSSA lets that ValueError through (it catches only a non-finite product)."""
    from torch import nn

    from unlearn_kernels.curvature import hessian_operator

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (9,), generator=gen)
    for path in ("generic", "fused"):
        H = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path=path)
        g = H.gradient()
        assert math.isfinite(lissa(H, g, scale=10.0, damping=0.1, depth=50).residual)  # finite weights: it runs
        saved = model[2].weight.detach().clone()
        with torch.no_grad():
            model[2].weight[1, 2] = float("nan")
        with pytest.raises(ValueError, match=r"^(GenericHessian|FusedMLPHessian): parameter '2.weight' has NaN"):
            lissa(H, g, scale=10.0, damping=0.1, depth=50)
        with torch.no_grad():
            model[2].weight.copy_(saved)


def test_lissa_stochastic(spd):
    H, b = spd
    gen = torch.Generator().manual_seed(3)

    def sample():
        E = 0.05 * torch.randn(D, D, generator=gen, dtype=torch.float64)
        return H + (E + E.T) / 2

    expected = torch.linalg.solve(H + 0.5 * torch.eye(D, dtype=torch.float64), b)
    out = lissa(H, b, scale=5.0, damping=0.5, depth=200, repeats=4, sample=sample)
    assert out.num_hvps == 4 * 200 + 1
    assert float(torch.linalg.vector_norm(out.solution - expected)) < 0.05 * float(torch.linalg.vector_norm(expected))


def test_operator_adapter(spd):
    H, b = spd
    dense = DenseOperator(H)
    sp = dense.to_scipy()
    assert torch.allclose(torch.as_tensor(sp.matvec(b.numpy())), H @ b)
    assert dense.num_products == 1
    wrapped = as_operator(dense)
    wrapped.matmat(torch.eye(D, dtype=torch.float64)[:, :3])
    assert wrapped.num_hvps == 3 and dense.num_products == 4
    counted = as_operator(lambda v: H @ v, D, dtype=torch.float64, device="cpu")
    counted.matvec(b)
    assert counted.num_hvps == 1 and torch.equal(counted.to_dense(), H)


def test_bad_inputs(spd):
    H, g = spd
    with pytest.raises(ValueError, match="damping"):
        damped_newton_step(H, g, -1.0)
    with pytest.raises(ValueError, match="solver"):
        damped_newton_step(H, g, 0.1, solver="qr")
    with pytest.raises(ValueError, match="solver"):
        pinv_newton_step(H, g, solver="svd")
    with pytest.raises(ValueError, match="rank"):
        pinv_newton_step(H, g, solver="lanczos", rank=0)
    with pytest.raises(TypeError, match=r"^solver 'eigh': unknown option\(s\) \['tol'\]; accepted: \['rcond'\]$"):
        damped_newton_step(H, g, 0.1, solver="eigh", tol=1e-3)
    with pytest.raises(TypeError, match=r"^solver 'ldl': unknown option\(s\) \['tol'\]; accepted: \[\]$"):
        damped_newton_step(H, g, 0.1, solver="ldl", tol=1e-3)
    # the iterative solvers' misspelt options: Python's "minres() got an unexpected keyword argument" before
    for solver, accepted in (("cg", "'maxiter', 'tol', 'x0'"), ("minres", "'maxiter', 'tol'"),
                             ("minres-ldl", "'maxiter', 'tol'"), ("lissa", "'depth', 'repeats', 'sample', 'scale'")):
        with pytest.raises(TypeError, match=rf"^solver '{solver}': unknown option\(s\) \['tols'\]; "
                                            rf"accepted: \[{accepted}\]$"):
            damped_newton_step(H, g, 0.1, solver=solver, tols=1e-3)
    with pytest.raises(ValueError, match="damping"):
        damped_newton_step(H, g, math.nan)
    with pytest.raises(ValueError, match="rcond"):
        pinv_newton_step(H, g, rcond=-1.0)
    with pytest.raises(ValueError, match="scale"):
        lissa(H, g, scale=0.0)
    with pytest.raises(ValueError, match="depth"):
        lissa(H, g, scale=1.0, depth=0)
    with pytest.raises(ValueError, match="dimension"):
        conjugate_gradient(H, g[:3])
    with pytest.raises(ValueError, match="b contains NaN"):
        minres(H, g * float("nan"))
    with pytest.raises(TypeError, match="operator"):
        as_operator("H")
    with pytest.raises(ValueError, match="symmetric"):
        pinv_newton_step(torch.triu(H), g)


def test_pinv_refuses_an_rcond_that_drops_every_eigenvalue(singular):
    """rcond >= 1 counts every eigenvalue as 0: the step was zero with ``converged=True`` (rank 0), for
    every solver that reads it; it is refused for every solver, as NewtonPinv refuses it."""
    H, _, g = singular
    for solver in ("auto", "eigh", "lanczos", "minres"):
        for rcond in (1.0, 2.0, math.inf):
            with pytest.raises(ValueError, match=r"^rcond must be a finite number in \[0, 1\), got"):
                pinv_newton_step(H, g, rcond=rcond, solver=solver)
    top = pinv_newton_step(H, g, rcond=0.99)  # just below 1: the largest eigenvalue is kept
    assert top.info["rank"] == 1 and top.step.abs().max() > 0
    # MINRES has no cut-off: an rcond given with it was silently ignored (rcond 0.3 left the full step)
    with pytest.raises(ValueError, match=r"^rcond applies to solver 'eigh' and 'lanczos' only"):
        pinv_newton_step(H, g, rcond=0.3, solver="minres")
    assert pinv_newton_step(H, g, solver="minres").step.shape == g.shape
    for rcond in (1.0, math.inf):  # the damped eigen-solve reads it the same way
        with pytest.raises(ValueError, match=r"^rcond must be a finite number in \[0, 1\), got"):
            damped_newton_step(H, g, damping=0.1, solver="eigh", rcond=rcond)


class _Products:
    """An operator object (shape, dtype, device, matvec) over a matrix, with a hook on each product."""

    def __init__(self, matrix: torch.Tensor, change=lambda out: out) -> None:
        self.matrix, self.change = matrix, change
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.change(self.matrix @ v)


def test_operator_products_are_held_to_what_it_declares(spd):
    """Products of another dtype or shape are named by every solver (LiSSA too: it no longer reads
    any ValueError as its own divergence), a non-symmetric operator is refused where its dense
    matrix is built, and a gradient that requires grad is taken as data."""
    H, g = spd
    lower = _Products(H, lambda out: out.float())
    for solve in (lambda op: minres(op, g), lambda op: conjugate_gradient(op, g),
                  lambda op: lissa(op, g, scale=10.0), lambda op: damped_newton_step(op, g, 0.1)):
        with pytest.raises(ValueError, match="returned a torch.float32 product on cpu, but it declares torch.float64"):
            solve(lower)
    with pytest.raises(ValueError, match=r"returned \(26,\) for a product, expected shape \(25,\)"):
        lissa(_Products(H, lambda out: torch.cat([out, out[:1]])), g, scale=10.0)
    skew = H + torch.triu(torch.ones_like(H), 1)
    with pytest.raises(ValueError, match="the operator's products must be symmetric"):
        damped_newton_step(_Products(skew), g, 0.1, solver="eigh")
    step = minres(H, g.clone().requires_grad_())
    assert not step.solution.requires_grad and torch.allclose(step.solution, minres(H, g).solution)


@pytest.mark.parametrize("asymmetry, refused", [(5e-3, False), (2e-2, True)])
def test_a_matrix_built_from_products_is_held_to_one_percent_asymmetry(spd, asymmetry, refused):
    """Rounding is not bounded relative to H (a confident model's float32 Hessian: 1.7e-3 of max |H|), so a
    matrix built from products may be that far from symmetric (its users take the symmetric part); beyond 1% of
    max |H| it is refused. A dense H given as such is used as given, and held to sqrt(eps): at 1% (0.8% in
    review) Lanczos certified a wrong eigenvalue."""
    H, g = spd
    skewed = H + asymmetry * float(H.abs().max()) * torch.triu(torch.ones_like(H), 1)
    products = _Products(skewed)
    if refused:
        with pytest.raises(ValueError, match=r"products must be symmetric: .* \(more than 0.01 of it\)"):
            damped_newton_step(products, g, 0.1, solver="eigh")
    else:
        damped_newton_step(products, g, 0.1, solver="eigh")
    with pytest.raises(ValueError, match=r"^H must be symmetric: .* \(more than 1.5e-08 of it\)"):
        as_operator(skewed)


def test_singular_systems_are_not_reported_solved(singular):
    """H + 0 I exactly singular: LDL^T gets a rounding-level pivot, not a zero one, and returned a step of
    norm 7e16 (residual 6 ||g||) marked converged; MINRES reports success on the inconsistent system with
    a step far along the null space (80 to 1000 times the pseudo-inverse's, by the CPU's rounding), which minres-ldl accepted and
    pinv-minres and damped-minres marked converged."""
    H, U, g = singular
    with pytest.raises(ValueError, match=r"singular to working precision \(damping 0: reciprocal condition number"):
        damped_newton_step(H, g, 0.0, solver="ldl")
    with pytest.raises(ValueError, match="singular to working precision"):  # MINRES's step is not accepted
        damped_newton_step(H, g, 0.0, solver="minres-ldl", maxiter=5 * D)
    for step in (pinv_newton_step(H, g, solver="minres"), damped_newton_step(H, g, 0.0, solver="minres")):
        assert step.info["scipy_info"] == 0 and not step.converged
        # far along the null space (how far is rounding's doing: 1000x with AVX-512 kernels, 83x without vectors)
        assert float(step.step.norm()) > 10 * float(pinv_newton_step(H, g).step.norm())
    # consistent (g in range(H)): MINRES's minimum-norm solution is the pseudo-inverse step, and converged
    inside = U[:, 5:] @ (U[:, 5:].T @ g)
    step = damped_newton_step(H, inside, 0.0, solver="minres-ldl", maxiter=5 * D)
    assert step.method == "damped-minres" and step.converged
    assert torch.allclose(step.step, pinv_newton_step(H, inside).step, rtol=1e-8, atol=1e-8)


def test_solves_that_would_not_fit_in_memory_are_refused_before_any_product(monkeypatch, spd):
    """A dense solve forced at large d failed in the allocator ("you tried to allocate 124470662416 bytes",
    naming neither the solver nor d), "minres-ldl" only after d // 4 products; newton_pinv's 300-vector
    Lanczos basis took 12.5 GiB on a ResNet-18 without a word. Each is refused before any product where the
    memory available (here made 1 MiB) cannot hold it, naming what to change."""
    import unlearn_kernels.checks as checks

    assert checks.available_memory("cpu") > 0  # Linux's MemAvailable
    monkeypatch.setattr(checks, "available_memory", lambda device: 2**20)
    H, g = spd
    big = as_operator(lambda v: v, 2000, dtype=torch.float32, device="cpu")
    refusals = [
        (lambda: damped_newton_step(big, g.new_ones(2000).float(), 0.1, solver="ldl"),
         r"^solver 'ldl' \(dense float64 matrices of d = 2,000\) needs 99\.2 MiB, more than the 1\.0 MiB available "
         r"on cpu: use an iterative solver \('minres', or 'lanczos' for the pseudo-inverse\) or fewer parameters$"),
        (lambda: damped_newton_step(big, g.new_ones(2000).float(), 0.1, solver="eigh"),
         r"^solver 'eigh' .* 129\.7 MiB"),
        (lambda: pinv_newton_step(big, g.new_ones(2000).float(), solver="eigh"), r"^solver 'eigh'"),
        (lambda: pinv_newton_step(big, g.new_ones(2000).float(), solver="lanczos", rank=300),
         r"^a Lanczos basis of 300 vectors of d = 2,000 \(torch.float32\) needs 2\.3 MiB, more than the 1\.0 MiB "
         r"available on cpu: take fewer Lanczos steps \(newton_pinv's rank"),
        (lambda: lanczos(big, 300, v0=torch.ones(2000), tol=0.0), r"^a Lanczos basis of 300 vectors of d = 2,000"),
    ]
    for call, message in refusals:
        with pytest.raises(ValueError, match=message):
            call()
    assert big.num_hvps == 0
    step = pinv_newton_step(big, g.new_ones(2000).float(), solver="lanczos", rank=30)  # 0.2 MiB: fits
    assert step.converged and step.info["rank"] == 1
    # "auto" takes what fits: MINRES for the damped step, the Lanczos pseudo-inverse; "minres-ldl" needs
    # its dense fallback only where MINRES does not converge (here at once)
    assert damped_solver(2000) == "minres" and damped_newton_step(big, g.new_ones(2000).float(), 0.1).method == \
        "damped-minres"
    assert pinv_newton_step(big, g.new_ones(2000).float(), rank=30).method == "pinv-lanczos"
    assert damped_newton_step(big, g.new_ones(2000).float(), 0.1, solver="minres-ldl").converged


def test_auto_checks_the_memory_where_the_dense_solve_runs(monkeypatch):
    """The eigendecomposition runs on the operator's device, the LDL^T factorisation on the CPU: "auto" read
    the CPU's memory for both (a full host with a roomy GPU left the GPU's eigh for MINRES)."""
    import unlearn_kernels.checks as checks

    monkeypatch.setattr(checks, "available_memory",
                        lambda device: 2**20 if torch.device(device).type == "cpu" else 2**40)
    assert damped_solver(2000, "meta") == "eigh" and damped_solver(2000, "cpu") == "minres"
    assert damped_solver(5000, "meta") == "minres"  # "minres-ldl"'s fallback factors on the CPU


def test_pinv_lanczos_in_float32_is_not_exact_where_its_dropped_coupling_exceeds_the_kept_spectrum():
    """A float32 Lanczos run "breaks down" where beta falls below 100 eps ||T|| (5.7e-4 here), while Ritz
    values down to 1.2e-4 are kept: the step on that space was 70% off the pseudo-inverse step of the same
    float32 matrix and was reported converged."""
    gen = torch.Generator().manual_seed(2)
    d = 50
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    H = ((Q * torch.logspace(-8, 2, d, dtype=torch.float64)) @ Q.T).float()
    H = (H + H.T) / 2
    g = torch.randn(d, generator=gen)
    lam, U = torch.linalg.eigh(H.double())
    keep = lam.abs() > 1e-6 * lam.abs().max()
    exact = U @ torch.where(keep, -(U.T @ g.double()) / torch.where(keep, lam, 1.0), 0.0)
    step = pinv_newton_step(H, g, solver="lanczos")
    assert step.info["lanczos_steps"] < d and step.info["dropped_coupling"] > 0.0  # a rounding-level stop
    assert relative_error(step.step.double(), exact) > 0.1 and step.converged is False
    # the same matrix in float64 closes exactly or fills the space: reported converged, and it is
    step64 = pinv_newton_step(H.double(), g.double(), solver="lanczos")
    assert step64.converged is True and relative_error(step64.step, exact) < 1e-8


def test_a_dense_matrix_that_requires_grad_gives_no_warning():
    """The symmetry check read float() of the matrix before detaching it: torch's "Converting a tensor with
    requires_grad=True to a scalar" warning, an error under -W error (r62)."""
    import warnings

    from unlearn_kernels.solvers import cubic_newton_step

    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = cubic_newton_step(H, torch.tensor([1.0, -1.0], dtype=torch.float64), 1.0).step
    assert not step.requires_grad


def test_lissa_reports_the_returned_solutions_residual():
    """A float32 recursion that overflowed at step 65 (scale 0.2 below half the largest eigenvalue 1) returned
    x = 0 with residual Inf, where ``residual`` is ||(H + damping I) x - b|| of the x returned: ||b|| = 1.414.
    Without ``scale``, damped_newton_step(solver="lissa") met Python's "lissa() missing 1 required keyword-only
    argument: 'scale'"."""
    H = torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float32))
    b = torch.ones(2, dtype=torch.float32)
    out = lissa(H, b, scale=0.2, depth=2000)
    assert out.iterations == 65 and not out.converged and not out.solution.any()
    assert out.residual == pytest.approx(math.sqrt(2.0), rel=1e-6)
    assert out.num_hvps == 65  # the iterate overflowed before a product; x = 0's residual needs none
    with pytest.raises(TypeError, match=r"^damped_newton_step: solver 'lissa' needs the option\(s\) \['scale'\] "
                                        r".*scale > 0, at least half the largest eigenvalue"):
        damped_newton_step(H, b, 0.1, solver="lissa")
    assert damped_newton_step(H, b, 0.1, solver="lissa", scale=1.0, depth=200).converged


@pytest.mark.parametrize("call, message", [
    (lambda H, g: damped_newton_step(H, g, 0.0, solver="eigh"), r"damped_newton_step \(solver 'eigh'\)"),
    (lambda H, g: damped_newton_step(H, g, 0.0, solver="ldl"), r"damped_newton_step \(solver 'ldl'\)"),
    (lambda H, g: damped_newton_step(H, g, 0.0, solver="minres"), r"minres: the solution"),
    (lambda H, g: damped_newton_step(H, g, 0.0, solver="minres-ldl"), r"minres: the solution"),
])
def test_a_damped_step_beyond_the_dtype_raises_step_overflow(call, message):
    """float32, H = diag(1e-10, 1), g = (1e30, 1): the step (-1e40, -1) is beyond float32's 3.4e38. The dense
    solves ran in float64 and cast it to (-inf, -1), returned with converged=True and residual NaN; MINRES's
    residual product then blamed H ("non-finite Hessian"). StepOverflow now, as cubic_newton_step raises."""
    from unlearn_kernels.solvers import StepOverflow

    H = torch.diag(torch.tensor([1e-10, 1.0], dtype=torch.float32))
    g = torch.tensor([1e30, 1.0], dtype=torch.float32)
    with pytest.raises(StepOverflow, match=rf"^{message}.*, of norm 1e\+40, does not fit torch.float32") as error:
        call(H, g)
    assert error.value.step_norm == pytest.approx(1e40, rel=1e-6)
    assert error.value.model_value == pytest.approx(-0.5e70, rel=1e-6)  # g^T s / 2
    # float64 holds it
    step = damped_newton_step(H.double(), g.double(), 0.0, solver="eigh")
    assert step.converged and step.step[0] == pytest.approx(-1e40, rel=1e-6)


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
def test_a_pinv_step_beyond_the_dtype_raises_step_overflow(solver):
    """float32, H = diag(1e-5, 1) (1e-5 kept by rcond 1e-6), g = (1e34, 1): -pinv(H) g = (-1e39, -1). "eigh"
    returned (-inf, -1) with converged=True and residual NaN, "lanczos" blamed H ("non-finite Hessian")."""
    from unlearn_kernels.solvers import StepOverflow

    H = torch.diag(torch.tensor([1e-5, 1.0], dtype=torch.float32))
    g = torch.tensor([1e34, 1.0], dtype=torch.float32)
    with pytest.raises(StepOverflow, match=rf"^pinv_newton_step \(solver '{solver}'\): the step, of norm 1e\+39, "
                                           r"does not fit torch.float32: .*raise rcond"):
        pinv_newton_step(H, g, solver=solver)


def test_minres_is_invariant_to_the_scale_of_b():
    """scipy's MINRES estimates ||A|| from the Lanczos coefficients including ||b||: for b = (1, -2) 1e10 on a
    2x2 SPD matrix it stopped after 1 iteration at a relative residual of 0.124 (the solution 5% off), reported
    converged; damped and pinv MINRES steps then were not converged. MINRES now runs on b / ||b|| and the
    matrix scaled by ||A b|| / ||b||, and ``converged`` is the true residual's <= tol ||b||."""
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    for size in (1.0, 1e10, 1e30, 1e100):
        b = torch.tensor([1.0, -2.0], dtype=torch.float64) * size
        expected = torch.linalg.solve(A, b)
        out = minres(A, b)
        assert out.converged and out.residual <= 1e-10 * float(b.norm())
        assert relative_error(out.solution, expected) < 1e-12
        assert out.num_hvps == out.iterations + 1 == 3  # the estimate's product is MINRES's first
        for step in (damped_newton_step(A, b, 0.0, solver="minres"), pinv_newton_step(A, b, solver="minres")):
            assert step.converged and relative_error(-step.step, expected) < 1e-12


def test_minres_converged_is_its_true_residual_at_tol():
    """Eigenvalues in [1e-6, 1e-3] (d = 50), ||b|| = 8.75: scipy stopped after 59 iterations at a relative
    residual of 2.0e-4 and said converged at tol 1e-10 (its test is ||r|| <= tol ||A|| ||x||, its ||A|| that of
    ||b||); damped_newton_step's MINRES was not converged. The normalised run reaches 1.0e-7 in 87 iterations; a
    second, from 0 with rtol lowered by what it missed, 2.0e-11 (190 in all)."""
    gen = torch.Generator().manual_seed(0)
    H, _ = sym_with_spectrum(torch.logspace(-6, -3, 50, dtype=torch.float64), gen)
    b = torch.randn(50, generator=gen, dtype=torch.float64)
    out = minres(H, b, tol=1e-10)
    true = float(torch.linalg.vector_norm(H @ out.solution - b))
    assert out.residual == pytest.approx(true, rel=1e-6) and true <= 1e-10 * float(b.norm()) and out.converged
    # the estimate's product serves each run's first
    assert out.info["runs"] == 2 and out.num_hvps == out.iterations + 1
    step = damped_newton_step(H, b, 0.0, solver="minres")
    assert step.converged and step.residual <= 1e-5 * float(b.norm())
    # a tolerance it cannot reach in its iterations: not converged
    short = minres(H, b, tol=1e-10, maxiter=10)
    assert not short.converged and short.iterations == 10
