"""Bad input to the public solvers: a clear error naming the argument and the problem, before any work
(or, for a diverging iteration, a message that says so), and the same results as before for good input."""
import re
import warnings

import numpy as np
import pytest
import torch

from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.solvers import (
    KrylovCubicSolver,
    NonFiniteProduct,
    adaptive_cubic_newton,
    as_operator,
    conjugate_gradient,
    cubic_model_value,
    cubic_newton_step,
    damped_newton_step,
    damped_solver,
    lanczos,
    lissa,
    minres,
    pinv_newton_step,
    sphere_noise,
)

D = 6


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    return (A + A.T) / 2, torch.randn(D, generator=gen, dtype=torch.float64)


class Operator:
    """A minimal matvec operator whose attributes a test overrides."""

    def __init__(self, H, **attributes):
        self.H, self.shape, self.dtype, self.device = H, tuple(H.shape), H.dtype, H.device
        self.__dict__.update(attributes)

    def matvec(self, v):
        return self.H @ v


def test_sparse_matrix_is_refused_by_name(problem):
    """Was torch's NotImplementedError "Could not run 'aten::max' with arguments from the 'SparseCPU'
    backend ..." from the symmetry check."""
    H, g = problem
    with pytest.raises(TypeError, match=r"H must be a dense tensor, got layout torch.sparse_coo"):
        lanczos(H.to_sparse(), 3)
    with pytest.raises(TypeError, match=r"H must be a dense tensor"):
        cubic_newton_step(H.to_sparse(), g, 1.0)


def test_meta_tensors_are_refused_by_name(problem):
    """A matrix or vector on the meta device (shapes without values) met torch's "Tensor.item() cannot be
    called on meta tensors" in the finiteness checks of every solver."""
    H, g = problem
    meta = "is on the meta device (it has a shape but no values)"
    calls = [("H", lambda: lanczos(H.to("meta"), 3)), ("v0", lambda: lanczos(H, 3, v0=g.to("meta"))),
             ("H", lambda: cubic_newton_step(H.to("meta"), g, 1.0)),
             *[("g", lambda method=method: cubic_newton_step(H, g.to("meta"), 1.0, method=method))
               for method in ("dense", "krylov")],
             ("g", lambda: damped_newton_step(H, g.to("meta"), 0.1)), ("b", lambda: minres(H, g.to("meta")))]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"^{name} {re.escape(meta)}"):
            call()
    # an operator object on the meta device: torch's "Cannot copy out of meta tensor; no data!" in lanczos
    with pytest.raises(ValueError, match=r"^the operator's device is the meta device \(shapes without values\)"):
        lanczos(Operator(H.to("meta"), device=torch.device("meta")), 3)


def test_operator_shape_must_be_a_pair_of_non_negative_ints(problem):
    """A (True, True) shape was taken for (1, 1) (then randn's "received an invalid combination of
    arguments"), (-1, -1) met "num_eigs = 1 Ritz pairs need ... d = -1", and numpy ints were refused."""
    H, _ = problem
    with pytest.raises(TypeError, match=r"the operator must have a \(d, d\) tuple `shape` of ints, got \(True, True\)"):
        lanczos(Operator(H, shape=(True, True)), 3)
    with pytest.raises(ValueError, match=r"the operator must be square, \(d, d\) with d >= 0, got shape \(-1, -1\)"):
        lanczos(Operator(H, shape=(-1, -1)), 3)
    numpy_shape = lanczos(Operator(H, shape=(np.int64(D), np.int64(D))), 3)
    assert torch.equal(numpy_shape.eigenvalues, lanczos(Operator(H), 3).eigenvalues)


def test_operator_device_and_matvec_are_checked_when_wrapped(problem):
    """A device 'gpu' gave torch's RuntimeError listing twenty device types; a non-callable matvec
    gave "'int' object is not callable" at the first product."""
    H, g = problem
    with pytest.raises(ValueError, match=r"the operator's device 'gpu' is not a torch device"):
        lanczos(Operator(H, device="gpu"), 3)
    with pytest.raises(ValueError, match=r"device 'gpu' is not a torch device"):
        as_operator(lambda v: H @ v, D, dtype=torch.float64, device="gpu")
    with pytest.raises(TypeError, match=r"the operator's matvec \(and matmat, if any\) must be callable, got "
                                        r"matvec int"):
        lanczos(Operator(H, matvec=3), 3)
    with pytest.raises(TypeError, match=r"must be callable, got matvec method, matmat int"):
        cubic_newton_step(Operator(H, matmat=3), g, 1.0)


def test_mismatch_messages_name_the_vector_given(problem):
    """Every mismatch said "but the gradient has ...", also for lanczos's v0 and the linear solvers' b."""
    H, g = problem
    with pytest.raises(ValueError, match=r"the operator has dimension 6 but v0 has 4"):
        lanczos(H, 3, v0=g[:4])
    with pytest.raises(TypeError, match=r"the operator has dtype torch.float64 but v0 has torch.float32"):
        lanczos(H, 3, v0=g.float())
    with pytest.raises(ValueError, match=r"the operator has dimension 6 but b has 3"):
        conjugate_gradient(H, g[:3])
    with pytest.raises(ValueError, match=r"the operator has dimension 6 but g has 3"):
        cubic_newton_step(H, g[:3], 1.0)
    with pytest.raises(ValueError, match=r"the operator has dimension 3 but b has 6"):
        lissa(H, g, scale=10.0, sample=lambda: torch.eye(3, dtype=torch.float64))
    # a function with v0 (without: test_lanczos.py::test_bad_inputs)
    assert torch.allclose(lanczos(lambda v: H @ v, 6, v0=g).eigenvalues, lanczos(H, 6, v0=g).eigenvalues)


@pytest.mark.parametrize("scale", [1e-320, 1e300])
def test_lanczos_start_vector_of_extreme_norm_gives_its_direction(problem, scale):
    """v0 = 1e-320 * ones (a norm that underflows float64) failed with "the operator returned NaN or Inf"
    and 1e300 * ones (one that overflows) returned the eigenvalue 0.0: only v0's direction matters."""
    H, _ = problem
    ones = torch.ones(D, dtype=torch.float64)
    for two_pass in (False, True):
        reorth = "none" if two_pass else "full"
        expected = lanczos(H, 4, v0=ones, reorth=reorth, two_pass=two_pass)
        got = lanczos(H, 4, v0=ones * scale, reorth=reorth, two_pass=two_pass)
        torch.testing.assert_close(got.eigenvalues, expected.eigenvalues, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.eigenvectors, expected.eigenvectors, rtol=1e-10, atol=1e-12)


def test_lanczos_start_vector_is_detached(problem):
    """A v0 with requires_grad warned "Converting a tensor with requires_grad=True to a scalar" at every step."""
    H, g = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lanczos(H, 3, v0=g.clone().requires_grad_())
    assert torch.equal(out.eigenvalues, lanczos(H, 3, v0=g).eigenvalues)


def test_half_precision_is_refused_where_lanczos_runs(problem):
    """Was the kernel's "lanczos_step: hq must be float32 or float64, got Half" (an argument the caller
    never passed); the dense solvers still take half precision."""
    H, g = problem
    message = r"Lanczos needs float32 or float64 vectors, got the operator's dtype torch.float16"
    with pytest.raises(TypeError, match=message):
        lanczos(H.half(), 3)
    with pytest.raises(TypeError, match=message):
        cubic_newton_step(H.half(), g.half(), 1.0, "krylov")
    with pytest.raises(TypeError, match=r"Lanczos needs float32 or float64 vectors, got .* torch.bfloat16"):
        pinv_newton_step(H.bfloat16(), g.bfloat16(), solver="lanczos")
    assert cubic_newton_step(H.half(), g.half(), 1.0, "dense").step.dtype == torch.float16


def test_vector_whose_norm_overflows_is_refused(problem):
    """A finite g of entries ~1e300 has an infinite float64 norm: conjugate_gradient and the "eigh"
    pseudo-inverse step returned residual inf marked converged, Krylov met "cubic_secular_solve: coeffs
    contains NaN or Inf", MINRES and Lanczos "the operator returned NaN or Inf"."""
    H, g = problem
    P = H @ H + torch.eye(D, dtype=torch.float64)
    huge = g * 1e300
    with pytest.raises(ValueError, match=r"b's squared norm overflows float64 \(largest \|entry\| 2.\d+e\+300\)"):
        conjugate_gradient(P, huge)
    with pytest.raises(ValueError, match=r"b's squared norm overflows float64"):
        minres(P, huge)
    for solver in ("eigh", "lanczos"):
        with pytest.raises(ValueError, match=r"g's squared norm overflows float64"):
            pinv_newton_step(H, huge, solver=solver)
    for method in ("dense", "krylov", "gd"):
        with pytest.raises(ValueError, match=r"g's squared norm overflows float64"):
            cubic_newton_step(H, huge, 1.0, method)


def test_krylov_flags_must_be_bools(problem):
    """guard="no" and two_pass="yes" were read as True, extend="x" as True (bool() of a string)."""
    H, g = problem
    with pytest.raises(TypeError, match=r"guard must be a bool, got str"):
        KrylovCubicSolver(H, g, guard="no")
    with pytest.raises(TypeError, match=r"two_pass must be a bool, got str"):
        KrylovCubicSolver(H, g, two_pass="yes", reorth="none", guard=False)
    with pytest.raises(TypeError, match=r"extend must be a bool, got str"):
        KrylovCubicSolver(H, g).solve(1.0, extend="x")


def test_diverging_gradient_descent_says_so(problem):
    """A step size too large (or an M too small for the Cauchy point) overflowed the iterate, and the
    error blamed H: "the operator returned NaN or Inf (non-finite Hessian or Hessian-vector product)".
    A run-away iteration is now stopped before it overflows: with eta = 10 the model value rose from
    -7.2 to 1.6e5 at the first step (a finite, useless step came back where K was too small to overflow)."""
    H, g = problem
    with pytest.raises(ValueError, match=r"cubic_gd: at gradient step 1 the model value rose to .*e\+0\d \(the zero "
                                         r"step has 0, this call's start -.*\) and its gradient norm from .* to .*: the "
                                         r"iteration diverged \(the step size eta = 10 is too large for H and M = 1"):
        cubic_newton_step(H, g, 1.0, "gd", eta=10.0, K=500)
    # (the Cauchy point itself is finite here since it is computed without M ||g||^2: the first step overflows)
    with pytest.raises(NonFiniteProduct, match=r"cubic_gd: the product H s is not finite at gradient step 1 "
                                               r"\(s itself holds NaN or Inf\): the iteration diverged .*M too small "
                                               r"for g"):
        cubic_newton_step(H, g, 1e-300, "gd")
    # a curvature operator checks its input: the overflowed iterate met "vector contains NaN or Inf"
    model = torch.nn.Linear(D, 2)
    x, y = torch.randn(40, D), torch.randint(0, 2, (40,))
    op = hessian_operator(model, torch.nn.functional.cross_entropy, (x, y))
    with pytest.raises(NonFiniteProduct, match=r"gradient step 1 \(s itself holds NaN or Inf\): the iteration "
                                               r"diverged \(the step size eta = 1e\+40 is too large"):
        cubic_newton_step(op, op.gradient(), 1.0, "gd", eta=1e40)  # float32: the first step overflows
    # a step size below 1 / L: never stopped (the model value falls at every step)
    L = float(torch.linalg.eigvalsh(H).abs().max())
    assert cubic_newton_step(H, g, 1.0, "gd", eta=0.5 / (L + 10.0), K=500).model_value < 0
    with pytest.raises(NonFiniteProduct, match=r"the operator returned NaN or Inf"):  # H's own NaN: as before
        cubic_newton_step(lambda v: v * float("nan"), g, 1.0, "gd")


def test_cubic_model_value_checks_its_arguments(problem):
    """It checked nothing: mismatched lengths leaked torch's messages, a (1, d) g passed silently, M = -1
    gave a value where the cubic solvers refuse it."""
    H, g = problem
    s = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
    expected = float(g @ s + 0.5 * s @ H @ s) + 2.0 / 6 * float(s.norm()) ** 3
    assert cubic_model_value(g, s, H @ s, 2.0) == pytest.approx(expected, rel=1e-14)
    with pytest.raises(ValueError, match=r"^cubic_model_value: g, s and Hs must have one length, got g \(6,\), "
                                         r"s \(5,\), Hs \(6,\)"):
        cubic_model_value(g, s[:5], H @ s, 2.0)
    with pytest.raises(ValueError, match=r"^g must be a 1-D \(d,\) vector, got shape \(1, 6\)"):
        cubic_model_value(g[None], s, H @ s, 2.0)
    for M in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^M must be a finite number >= 0"):
            cubic_model_value(g, s, H @ s, M)


def test_cubic_newton_step_names_a_misspelt_option(problem):
    """A misspelt option raised Python's "__init__() got an unexpected keyword argument" from inside."""
    H, g = problem
    for method in ("krylov", "gd"):
        with pytest.raises(TypeError,
                           match=rf"^method '{method}': unknown option\(s\) \['kmax'\]; accepted: \[.*'seed'"):
            cubic_newton_step(H, g, 1.0, method=method, kmax=3)


def test_sphere_noise_checks_its_arguments():
    """d = -1 met torch's "Trying to create tensor with negative dimension -1"; radius NaN gave NaNs."""
    with pytest.raises(ValueError, match=r"d must be an int >= 0, got -1"):
        sphere_noise(-1, 1.0, torch.Generator())
    with pytest.raises(ValueError, match=r"radius must be a finite number >= 0.0, got nan"):
        sphere_noise(3, float("nan"), torch.Generator())


@pytest.mark.parametrize("solver", ["eigh", "lanczos", "minres"])
@pytest.mark.parametrize("option, message", [
    ({"rank": 0}, r"rank must be an int >= 1, got 0"),
    ({"tol": -1.0}, r"tol must be a finite number >= 0.0, got -1.0"),
    ({"maxiter": 0}, r"maxiter must be an int >= 1, got 0"),
])
def test_pinv_step_checks_every_option_whichever_solver(problem, solver, option, message):
    """rank=0 with "eigh"/"minres", tol=-1 or maxiter=0 with "eigh"/"lanczos" were ignored."""
    H, g = problem
    with pytest.raises(ValueError, match=message):
        pinv_newton_step(H, g, solver=solver, **option)


def test_damped_solver_checks_d():
    """d = -1 gave "eigh"; d = "a" gave "'<=' not supported between instances of 'str' and 'int'"."""
    with pytest.raises(ValueError, match=r"d must be an int >= 1, got -1"):
        damped_solver(-1)
    with pytest.raises(ValueError, match=r"d must be an int >= 1, got 'a'"):
        damped_solver("a")


def test_arc_checks_its_functions_and_options_before_calling_them(problem):
    """Non-callables met "'int' object is not callable"; solver_options=[...] met "'list' object is not a
    mapping"; an unknown option failed only at the first solver, after value and gradient ran at w0; a
    value returning a vector met "only one element tensors can be converted to Python scalars"; a float16
    w0 reached the user's functions and then the Lanczos kernel."""
    H, g = problem
    P = H @ H + torch.eye(D, dtype=torch.float64)
    calls = []

    def value(w):
        calls.append(w)
        return float(0.5 * w @ P @ w + g @ w)

    gradient, hessian, w0 = (lambda w: P @ w + g), (lambda w: P), torch.zeros(D, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"adaptive_cubic_newton: value must be a function of w, got int"):
        adaptive_cubic_newton(3, gradient, hessian, w0)
    with pytest.raises(TypeError, match=r"adaptive_cubic_newton: hessian must be a function of w, got Tensor"):
        adaptive_cubic_newton(value, gradient, P, w0)
    with pytest.raises(TypeError, match=r"solver_options must be None or a mapping .* got list"):
        adaptive_cubic_newton(value, gradient, hessian, w0, solver_options=[("kappa", 0.1)])
    with pytest.raises(TypeError, match=r"^solver_options: unknown option\(s\) \['kapa'\]; accepted: \['guard', "):
        adaptive_cubic_newton(value, gradient, hessian, w0, solver_options={"kapa": 0.1})
    with pytest.raises(ValueError, match=r"solver_options: kappa must be a finite number >= 0.0, got -1"):
        adaptive_cubic_newton(value, gradient, hessian, w0, solver_options={"kappa": -1})
    with pytest.raises(TypeError, match=r"adaptive_cubic_newton: w0 must be float32 or float64, got torch.float16"):
        adaptive_cubic_newton(value, gradient, hessian, w0.half())
    assert not calls
    with pytest.raises(TypeError, match=r"value must return a real number .* got Tensor of shape \(6,\) at w0"):
        adaptive_cubic_newton(lambda w: w, gradient, hessian, w0)


def test_a_vector_whose_squares_underflow_is_refused_by_every_solver():
    """g with entries below 1.5e-154 (its float64 norm underflows): CG returned a step 0.70 off, pinv's Lanczos
    1.00 off, both reported converged, and the Krylov cubic step had norm 8.4e8 where the true one is 2e-162."""
    H = torch.diag(torch.tensor([1.0, 3.0, 2.0, 1.5], dtype=torch.float64))
    g = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64) * 1e-162
    calls = {"cg": lambda: conjugate_gradient(H, g), "minres": lambda: minres(H, g),
             "pinv": lambda: pinv_newton_step(H, g, solver="lanczos", rank=2),
             "damped": lambda: damped_newton_step(H, g, 0.1),
             "krylov": lambda: cubic_newton_step(H, g, 1.0, method="krylov"),
             "dense": lambda: cubic_newton_step(H, g, 1.0, method="dense")}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"entries are all below 1.5e-154 \(largest \|entry\| 2.000e-162\), where "
                                             r"their squares underflow float64"):
            call()
    assert conjugate_gradient(H, g * 1e10).converged  # 1e-152: above the limit, solved


def test_an_overflowing_iterate_is_not_blamed_on_a_finite_hessian():
    """float32 CG on a finite PSD diagonal H with 16 zero eigenvalues (max |H| = 5): the iterate grows along
    the null space to |x| = 2.6e38 at iteration 30 and overflows, and the error said "the operator returned
    NaN or Inf (non-finite Hessian or Hessian-vector product)". Where the vector given to the operator is not
    finite, or its product overflows while the product at it scaled to entries at most 1 does not, the error
    now says the iterate grew beyond the dtype; an operator whose own products are not finite is still named."""
    ev = torch.linspace(0.0, 5.0, 50, dtype=torch.float64)
    ev[:16] = 0.0
    H = torch.diag(ev).float()
    g = torch.randn(50, generator=torch.Generator().manual_seed(1))
    grew = r"the solver's iterate grew beyond torch.float32's range \(not a non-finite Hessian"
    with pytest.raises(NonFiniteProduct, match=grew) as error:
        conjugate_gradient(H, g)
    assert error.value.operator_fault is False
    # a curvature operator refuses a non-finite vector itself ("vector contains NaN or Inf"): the same message
    model = torch.nn.Linear(D, 2)
    x, y = torch.randn(40, D), torch.randint(0, 2, (40,))
    op = as_operator(hessian_operator(model, torch.nn.functional.cross_entropy, (x, y)))
    v = torch.full((op.shape[0],), float("inf"))
    with pytest.raises(NonFiniteProduct, match=r"^the vector given to the operator holds NaN or Inf: " + grew):
        op.matvec(v)
    # a finite vector whose product overflows (3e38 * 5), while the product at it scaled to entries <= 1 is finite
    big = as_operator(H)
    with pytest.raises(NonFiniteProduct, match=r"^the operator's product of a vector of largest \|entry\| 3e\+38 "
                                               r"holds NaN or Inf, while .* is finite: " + grew):
        big.matvec(torch.full((50,), 3e38))
    assert big.num_hvps == 2  # the product and its probe
    # the operator's own NaN: as before, whatever the vector
    nan = as_operator(lambda v: v * float("nan"), 50, dtype=torch.float32, device="cpu")
    for vector in (torch.ones(50), torch.full((50,), 1e30)):
        with pytest.raises(NonFiniteProduct, match=r"^the operator returned NaN or Inf \(non-finite Hessian") as error:
            nan.matvec(vector)
        assert error.value.operator_fault is True
