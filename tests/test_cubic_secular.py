"""cubic_secular_solve: optimality conditions, brute-force minimisation, hard case, bad input."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from unlearn_kernels.backends import BackendUnavailableError
from unlearn_kernels.ops import OP_BACKENDS, cubic_secular_solve

BACKENDS = ["reference", "cpp"]  # the C++ kernel is always built: a missing one is a failure, not a skip


def model(lam: np.ndarray, c: np.ndarray, M: float, y: np.ndarray) -> float:
    return float(c @ y + 0.5 * lam @ (y * y) + M / 6.0 * np.linalg.norm(y) ** 3)


def brute_force_min(lam: np.ndarray, c: np.ndarray, M: float, seed: int = 0) -> float:
    """Smallest model value found by BFGS from several random starts (and from 0)."""
    rng = np.random.default_rng(seed)
    scale = 1.0 + np.abs(lam).max() / M + np.sqrt(np.linalg.norm(c) / M)

    def grad(y):
        return c + lam * y + 0.5 * M * np.linalg.norm(y) * y

    starts = [np.zeros_like(c)] + [scale * rng.standard_normal(c.shape) for _ in range(8)]
    return min(minimize(lambda y: model(lam, c, M, y), y0, jac=grad, method="BFGS",
                        options={"gtol": 1e-12, "maxiter": 10000}).fun for y0 in starts)


def check_optimality(lam, c, M, y, sigma, atol=1e-10):
    """Gradient of m zero, sigma = M ||y|| / 2, and lambda + sigma >= 0 (plain numpy)."""
    lam, c, y = (t.numpy() for t in (lam, c, y))
    scale = np.linalg.norm(c) + (np.abs(lam).max() + sigma) * np.linalg.norm(y) + 1e-300
    np.testing.assert_allclose(c + lam * y + 0.5 * M * np.linalg.norm(y) * y, 0.0, atol=atol * scale)
    np.testing.assert_allclose(sigma, 0.5 * M * np.linalg.norm(y), rtol=atol, atol=1e-300)
    assert lam.min() + sigma >= -atol * (1 + abs(lam.min()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 5, 40, 300])
@pytest.mark.parametrize("shift", [0.0, 3.0, -1.0])  # indefinite, positive definite, more negative
def test_random_problems_satisfy_optimality(backend, k, shift, rng):
    lam = (torch.randn(k, dtype=torch.float64, generator=rng) + shift).sort().values
    c = torch.randn(k, dtype=torch.float64, generator=rng)
    for M in (0.1, 1.0, 25.0):
        y, sigma, hard = cubic_secular_solve(lam, c, M, backend=backend)
        assert y.dtype == torch.float64 and y.shape == (k,) and isinstance(sigma, float) and hard is False
        check_optimality(lam, c, M, y, sigma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_matches_brute_force_minimisation(backend, k, rng):
    for trial in range(3):
        lam = torch.randn(k, dtype=torch.float64, generator=rng).sort().values * 2
        c = torch.randn(k, dtype=torch.float64, generator=rng)
        M = 0.5 + trial
        y, _, _ = cubic_secular_solve(lam, c, M, backend=backend)
        ours = model(lam.numpy(), c.numpy(), M, y.numpy())
        best = brute_force_min(lam.numpy(), c.numpy(), M, seed=trial)
        assert ours <= best + 1e-9 * (1 + abs(best))
        assert ours == pytest.approx(best, rel=1e-7, abs=1e-10)


def test_backends_agree(rng):
    lam = torch.randn(100, dtype=torch.float64, generator=rng).sort().values
    c = torch.randn(100, dtype=torch.float64, generator=rng)
    y_ref, s_ref, _ = cubic_secular_solve(lam, c, 2.0, backend="reference")
    y_cpp, s_cpp, _ = cubic_secular_solve(lam, c, 2.0, backend="cpp")
    torch.testing.assert_close(y_cpp, y_ref, rtol=1e-12, atol=1e-14)
    assert s_cpp == pytest.approx(s_ref, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_case_by_hand(backend):
    lam = torch.tensor([-2.0, 1.0, 3.0], dtype=torch.float64)
    c = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    M = 1.0
    y, sigma, hard = cubic_secular_solve(lam, c, M, backend=backend)
    assert hard is True and sigma == 2.0
    # y_i = -c_i / (lambda_i + 2) off the bottom; tau lifts ||y|| to 2 sigma / M = 4.
    rest = np.array([-0.1 / 3.0, -0.2 / 5.0])
    np.testing.assert_allclose(y[1:].numpy(), rest, rtol=1e-15)
    assert abs(float(y[0])) == pytest.approx(np.sqrt(16.0 - rest @ rest), rel=1e-14)
    check_optimality(lam, c, M, y, sigma)
    best = brute_force_min(lam.numpy(), c.numpy(), M)
    assert model(lam.numpy(), c.numpy(), M, y.numpy()) == pytest.approx(best, rel=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_case_from_eigh(backend, rng):
    """g orthogonal to the bottom eigenvector of a dense H: V^T g has a rounding-level bottom entry."""
    k = 30
    V = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=rng))[0]
    spectrum = torch.linspace(-3.0, 5.0, k, dtype=torch.float64)
    H = V @ torch.diag(spectrum) @ V.T
    g = V[:, 1:] @ (1e-2 * torch.randn(k - 1, dtype=torch.float64, generator=rng))
    lam, U = torch.linalg.eigh(H)
    coeffs = U.T @ g
    y, sigma, hard = cubic_secular_solve(lam, coeffs, 1.0, backend=backend)
    assert hard is True
    assert sigma == pytest.approx(3.0, rel=1e-12)
    check_optimality(lam, coeffs, 1.0, y, sigma, atol=1e-9)
    s = U @ y  # the step in the original coordinates
    grad = g + H @ s + 0.5 * torch.linalg.vector_norm(s) * s
    assert float(torch.linalg.vector_norm(grad)) <= 1e-9 * float(torch.linalg.vector_norm(s))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bottom", [1e-3, 1e-6, 1e-9])
def test_near_hard_case_converges(backend, bottom):
    lam = torch.tensor([-2.0, -2.0 + 1e-12, 1.0, 3.0], dtype=torch.float64)
    c = torch.tensor([bottom, 0.0, 0.1, 0.2], dtype=torch.float64)
    y, sigma, hard = cubic_secular_solve(lam, c, 1.0, backend=backend)
    assert hard is False
    check_optimality(lam, c, 1.0, y, sigma, atol=1e-9)
    best = brute_force_min(lam.numpy(), c.numpy(), 1.0)
    assert model(lam.numpy(), c.numpy(), 1.0, y.numpy()) <= best + 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient(backend):
    psd = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    y, sigma, hard = cubic_secular_solve(psd, torch.zeros(3, dtype=torch.float64), 3.0, backend=backend)
    assert torch.equal(y, torch.zeros(3, dtype=torch.float64)) and sigma == 0.0 and hard is False
    indefinite = torch.tensor([2.0, -1.5, 1.0], dtype=torch.float64)  # any order is accepted
    y, sigma, hard = cubic_secular_solve(indefinite, torch.zeros(3, dtype=torch.float64), 3.0, backend=backend)
    assert hard is True and sigma == 1.5
    expected = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)  # ||y|| = 2 sigma / M = 1 on the bottom
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", OP_BACKENDS["cubic_secular_solve"])
def test_empty_problem(backend, device):
    """k = 0: the minimiser over R^0 is the empty vector, so sigma = M ||y|| / 2 = 0 and no hard case."""
    for dtype in (torch.float64, torch.float32):
        empty = torch.empty(0, dtype=dtype, device=device)
        y, sigma, hard = cubic_secular_solve(empty, empty, 2.0, backend=backend)
        assert y.shape == (0,) and y.dtype == torch.float64 and y.device == empty.device
        assert isinstance(sigma, float) and sigma == 0.0 and hard is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsorted_and_float32_inputs(backend, rng):
    lam = torch.randn(12, dtype=torch.float64, generator=rng)
    c = torch.randn(12, dtype=torch.float64, generator=rng)
    perm = torch.randperm(12, generator=rng)
    y, sigma, _ = cubic_secular_solve(lam, c, 1.0, backend=backend)
    y_perm, sigma_perm, _ = cubic_secular_solve(lam[perm], c[perm], 1.0, backend=backend)
    torch.testing.assert_close(y_perm, y[perm], rtol=1e-12, atol=1e-14)
    assert sigma_perm == pytest.approx(sigma, rel=1e-12)
    y32, _, _ = cubic_secular_solve(lam.float(), c.float(), 1.0, backend=backend)
    assert y32.dtype == torch.float64
    check_optimality(lam.float().double(), c.float().double(), 1.0, y32, 0.5 * float(y32.norm()))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_inputs_on_every_device(backend, device, rng):
    """The k scalars are solved on the CPU wherever they live; y comes back on the inputs' device."""
    lam = torch.randn(20, dtype=torch.float64, generator=rng)
    c = torch.randn(20, dtype=torch.float64, generator=rng)
    y, sigma, hard = cubic_secular_solve(lam.to(device), c.to(device), 1.5, backend=backend)
    # the optimality conditions (plain numpy): on the CPU the comparison below is the reference with itself
    check_optimality(lam, c, 1.5, y.cpu(), sigma)
    y_cpu, sigma_cpu, hard_cpu = cubic_secular_solve(lam, c, 1.5, backend="reference")
    assert y.device.type == device.type and hard == hard_cpu
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-12, atol=1e-14)
    assert sigma == pytest.approx(sigma_cpu, rel=1e-12)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 0.0), {}, ValueError, "M must"),
        ((torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), -1.0), {}, ValueError, "M must"),
        ((torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), float("nan")), {}, ValueError,
         "M must"),
        ((torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 1.0), {}, ValueError, "shape"),
        ((torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64), 1.0), {}, ValueError, "1-D"),
        ((torch.tensor([1.0, float("inf")]), torch.ones(2), 1.0), {}, ValueError, "NaN or Inf"),
        ((torch.ones(2), torch.tensor([float("nan"), 1.0]), 1.0), {}, ValueError, "NaN or Inf"),
        ((torch.ones(2, dtype=torch.int64), torch.ones(2), 1.0), {}, TypeError, "floating point"),
        # "meta" stands for another device on a machine without a GPU
        ((torch.ones(2, device="meta"), torch.ones(2), 1.0), {}, ValueError,
         "^cubic_secular_solve: eigvals are on meta but coeffs are on cpu$"),
        ((torch.ones(2), torch.ones(2, device="meta"), 1.0), {}, ValueError, "^cubic_secular_solve: eigvals are on cpu "
         "but coeffs are on meta$"),
        # meta tensors hold no values (the check of values failed inside Tensor.item())
        *[((torch.ones(2, device="meta"), torch.ones(2, device="meta"), 1.0), {"backend": b}, ValueError,
           "^cubic_secular_solve: eigvals and coeffs are meta tensors, which hold no values to solve with$")
          for b in BACKENDS],
        (([1.0, 2.0], torch.ones(2), 1.0), {}, TypeError, "torch.Tensor"),
        ((torch.ones(2), torch.ones(2), 1.0), {"tol": 0.0}, ValueError, "tol"),
        ((torch.ones(2), torch.ones(2), 1.0), {"max_iter": 0}, ValueError, "max_iter"),
        ((torch.ones(2), torch.ones(2), 1.0), {"max_iter": 2**63}, ValueError, "max_iter must be an int <= "),
        ((torch.ones(2), torch.ones(2), 1.0), {"backend": ["cpp"]}, TypeError, "backend must be a str"),
        ((torch.ones(2), torch.ones(2), 1.0), {"backend": "triton"}, BackendUnavailableError, "triton"),
        ((torch.ones(2), torch.ones(2), 1.0), {"backend": "bogus"}, ValueError, "unknown backend"),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cubic_secular_solve(*args, **kwargs)


def test_cpp_op_checks_its_inputs():
    with pytest.raises(ValueError, match="M must"):
        torch.ops.unlearn_kernels.cubic_secular_solve(torch.ones(2, dtype=torch.float64),
                                                      torch.ones(2, dtype=torch.float64), -1.0, 1e-12, 100)


def test_opcheck(rng):
    lam = torch.randn(6, dtype=torch.float64, generator=rng)
    c = torch.randn(6, dtype=torch.float64, generator=rng)
    torch.library.opcheck(torch.ops.unlearn_kernels.cubic_secular_solve.default, (lam, c, 1.5, 1e-12, 100))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_M(backend):
    """A huge M gives the tiny step it should on both backends (the reference's slope underflowed to
    a ZeroDivisionError); an M so small that the step overflows is refused by name, not returned."""
    lam = torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64)
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    y, sigma, _ = cubic_secular_solve(lam, c, 1e300, backend=backend)
    # sigma ~ sqrt(M ||c|| / 2) and y ~ -c / sigma: ||y|| = 2 sigma / M
    assert torch.allclose(y, -c / sigma, rtol=1e-9) and sigma == pytest.approx((1e300 * float(c.norm()) / 2) ** 0.5)
    with pytest.raises(ValueError, match=r"the solution is not finite: M = 1e-320 is too small"):
        cubic_secular_solve(lam, c, 1e-320, backend=backend)


def check_optimality_exact(lam, c, M, y, sigma, hard, rtol=1e-10):
    """The optimality conditions in exact rational arithmetic, where no square over- or underflows:
    ``||y (lam + sigma) + c|| <= rtol (||c|| + (max|lam| + sigma) ||y||)`` (off the hard case),
    ``sigma = M ||y|| / 2`` to rtol (or both below the smallest normal float), ``lam_min + sigma >= 0``."""
    lam, c, y = ([Fraction(float(v)) for v in t] for t in (lam, c, y))
    M, sigma, rtol = Fraction(M), Fraction(sigma), Fraction(rtol)
    y_norm2 = sum(yi * yi for yi in y)
    if not hard:
        residual2 = sum((yi * (li + sigma) + ci) ** 2 for yi, li, ci in zip(y, lam, c))
        scale2 = sum(ci * ci for ci in c) + (max(abs(li) for li in lam) + sigma) ** 2 * y_norm2
        assert residual2 <= rtol**2 * scale2
    tiny = Fraction(torch.finfo(torch.float64).tiny)
    assert abs(M * M * y_norm2 / 4 - sigma * sigma) <= 2 * rtol * sigma * sigma + tiny * tiny
    assert min(lam) + sigma >= 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [[1.0, 2.0, 3.0], [-1.0, 2.0, 3.0]])
@pytest.mark.parametrize("lam_scale", [1e-100, 1.0, 1e100])
@pytest.mark.parametrize("c_scale", [1e-100, 1.0, 1e100])
def test_extreme_magnitudes(backend, lam, lam_scale, c_scale):
    """M, eigenvalues and coefficients from 1e-200 to the largest float: every step here is
    representable and is solved to the optimality conditions, checked exactly. Before, 64 of these 144
    problems failed on the reference and the C++ kernel gave the unregularised Newton step for M ~ 1e308:
    2 M ||c|| and lambda_min^2 overflowed (the bracket's upper end became 0), ``torch.linalg.vector_norm``
    squared entries of 1e-200 to 0 (sigma off by 1e59 and more), sigma^2 underflowed to a
    ZeroDivisionError, and a huge M was refused as "too small"."""
    lam = torch.tensor(lam, dtype=torch.float64) * lam_scale
    c = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) * c_scale
    for M in (1e-200, 1e-8, 1.0, 1e8, 1e200, 1e300, 1e308, 1.7976931348623157e308):
        y, sigma, hard = cubic_secular_solve(lam, c, M, backend=backend)
        check_optimality_exact(lam, c, M, y, sigma, hard)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("lam", "c", "M"), [([1.0, 2.0], [1e-20, 0.0], 1e-3), ([1e4], [1e-3], 1e-4),
                                             ([-1.0, 2.0], [1e-3, 1.0], 1e-6)])
def test_small_step_against_large_curvature(backend, lam, c, M):
    """2 M ||c|| << lambda_min^2: the bracket's upper end, a difference of two close numbers, lost the
    root to cancellation (sigma 0, a ZeroDivisionError on the reference, sigma 9% off on the C++)."""
    lam, c = torch.tensor(lam, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
    y, sigma, hard = cubic_secular_solve(lam, c, M, backend=backend)
    assert hard is False and sigma > 0
    check_optimality(lam, c, M, y, sigma, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_root_far_below_the_resolution_of_sigma(backend):
    """sigma + lambda_min = t ~ 1e-21 beside an eigenvalue 2^-48 above lambda_min (outside the bottom
    cluster, so no hard case): the bracket test was relative to sigma (eps sigma = 2e-16 >> t), stopped
    with t still ~1e-16 off, and returned y_2 = -1.566 for -1.6 (||y|| 1.4% short of 2 sigma / M)."""
    delta = 2.0**-48
    lam = torch.tensor([-1.0, -1.0 + delta, 1.0], dtype=torch.float64)
    c = torch.tensor([0.0, 1.6 * (1 + 1e-6) * delta, 2.4], dtype=torch.float64)
    y, sigma, hard = cubic_secular_solve(lam, c, 1.0, backend=backend)
    assert hard is False
    check_optimality(lam, c, 1.0, y, sigma, atol=1e-12)
    torch.testing.assert_close(y, torch.tensor([0.0, -1.6, -1.2], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad_give_a_detached_solution(backend):
    # a solve, not a differentiable op: through the reference, autograd took sigma for a constant (dy/dc wrong);
    # through the C++ op, y carried a graph whose backward failed inside torch
    lam = torch.tensor([-1.0, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    y, sigma, _ = cubic_secular_solve(lam, c, 1.0, backend=backend)
    assert not y.requires_grad and y.grad_fn is None
    expected, _, _ = cubic_secular_solve(lam.detach(), c.detach(), 1.0, backend=backend)
    assert torch.equal(y, expected)
