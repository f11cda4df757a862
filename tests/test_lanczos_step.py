"""lanczos_step: every backend against plain numpy formulas, Gram-Schmidt orthogonality, breakdown, a
full Lanczos run against eigh, bad input and non-finite values (the same error from every backend)
and opcheck."""
import numpy as np
import pytest
import torch

from devices import backend_devices
from unlearn_kernels.backends import BackendUnavailableError
from unlearn_kernels.contracts.lanczos_step import fake as fake_step
from unlearn_kernels.ops import lanczos_step

# (backend, device): on the CPU the reference, C++ (always built: a missing one fails) and Triton
# through its interpreter where installed; on a GPU, when visible, the reference, CUDA and Triton.
PAIRS = backend_devices("lanczos_step")
COMPILED = backend_devices("lanczos_step", compiled_only=True)
# (d, m): empty basis; d below, at and past the Triton interpreter tile (4096) and the C++ block (8192).
SHAPES = [(1, 0), (7, 0), (33, 5), (1000, 3), (5001, 6), (20011, 4)]


def numpy_step(hq, q, q_prev, beta_prev, basis):
    """The op's formulas in float64 numpy: CGS2, then normalisation."""
    h, v, vp, B = (t.double().cpu().numpy() for t in (hq, q, q_prev, basis))
    alpha = h @ v
    w = h - alpha * v - beta_prev * vp
    for _ in range(2):
        w = w - B.T @ (B @ w)
    beta = np.linalg.norm(w)
    return w / beta, alpha, beta


def orthonormal_rows(m, d, dtype, gen):
    if m == 0:
        return torch.empty(0, d, dtype=dtype)
    return torch.linalg.qr(torch.randn(d, m, dtype=torch.float64, generator=gen))[0].T.contiguous().to(dtype)


def unit(d, dtype, gen):
    v = torch.randn(d, dtype=torch.float64, generator=gen)
    return (v / v.norm()).to(dtype)


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


# The Triton interpreter is slow: it stops at d = 5001, which already spans two tiles.
@pytest.mark.parametrize(("backend", "device", "d", "m"),
                         [(b, dev, d, m) for b, dev in PAIRS for d, m in SHAPES
                          if not (interpreted(b, dev) and d > 6000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_numpy(backend, device, dtype, d, m, rng):
    basis = orthonormal_rows(m, d, dtype, rng).to(device)
    hq = torch.randn(d, dtype=dtype, generator=rng).to(device)
    q, q_prev = unit(d, dtype, rng).to(device), unit(d, dtype, rng).to(device)
    q_next, alpha, beta = lanczos_step(hq, q, q_prev, 0.7, basis, backend=backend)
    expected, alpha_np, beta_np = numpy_step(hq, q, q_prev, 0.7, basis)
    assert q_next.dtype == dtype and q_next.shape == (d,) and q_next.device == hq.device
    assert alpha.device == beta.device == hq.device
    assert alpha.dtype == beta.dtype == torch.float64 and alpha.dim() == beta.dim() == 0
    # Sums of products of the inputs in float64: alpha is float64-accurate even for float32 vectors.
    assert float(alpha) == pytest.approx(alpha_np, rel=1e-12, abs=1e-14)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float(beta) == pytest.approx(beta_np, rel=tol)
    np.testing.assert_allclose(q_next.double().cpu().numpy(), expected, rtol=0,
                               atol=tol * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize(("d", "m"), [(300, 40), (5001, 10)])
def test_cgs2_orthogonality(backend, device, d, m, rng):
    """hq almost inside span(basis): one Gram-Schmidt pass would leave ~eps ||hq|| / beta behind."""
    basis = orthonormal_rows(m, d, torch.float64, rng)
    q, q_prev = basis[0].clone(), basis[1].clone()
    hq = basis.T @ torch.randn(m, dtype=torch.float64, generator=rng) * 1e3
    hq += 1e-4 * torch.randn(d, dtype=torch.float64, generator=rng)
    basis, q, q_prev, hq = (t.to(device) for t in (basis, q, q_prev, hq))
    q_next, _, beta = lanczos_step(hq, q, q_prev, 2.0, basis, backend=backend)
    assert float(beta) > 0
    assert float((basis @ q_next).abs().max()) <= 1e-12
    assert float(q_next.norm()) == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize(("backend", "device"), COMPILED)
def test_one_pass_prediction_is_checked(backend, device, rng):
    """The C++ kernel predicts from ||basis w|| that one Gram-Schmidt pass will keep more than half of
    ||w||^2 (exact for orthonormal rows). Rows scaled by sqrt(1/2) break that prediction for an hq
    inside their span: the kernel must notice on the new norm and make the second pass, so the
    step equals CGS2 (without the check it would stop at one pass, about 0.5 ||w|| away)."""
    d, m = 5001, 6
    basis = orthonormal_rows(m, d, torch.float64, rng)
    hq = basis.T @ torch.randn(m, dtype=torch.float64, generator=rng) + 0.1 * unit(d, torch.float64, rng)
    q, q_prev = unit(d, torch.float64, rng), unit(d, torch.float64, rng)
    scaled = basis * 0.5**0.5
    q_next, _, beta = lanczos_step(*(t.to(device) for t in (hq, q, q_prev)), 0.3, scaled.to(device), backend=backend)
    expected, _, beta_np = numpy_step(hq, q, q_prev, 0.3, scaled)
    assert float(beta) == pytest.approx(beta_np, rel=1e-10)
    np.testing.assert_allclose(q_next.cpu().numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("near_span", [False, True])
def test_float32_orthogonality(backend, device, near_span, rng):
    """float32 at 35 basis vectors: the new vector is orthogonal to the basis to 1e-6, both when
    one Gram-Schmidt pass suffices (a random hq) and when hq lies almost inside span(basis) (then
    one pass leaves about 1e-4 behind and the second pass is needed)."""
    d, m = 5001 if interpreted(backend, device) else 20011, 35
    basis = orthonormal_rows(m, d, torch.float32, rng)
    hq = torch.randn(d, generator=rng)
    if near_span:
        hq = basis.T @ torch.randn(m, generator=rng) * hq.norm() + 1e-3 * hq
    basis, hq = basis.to(device), hq.to(device)
    q_next, _, beta = lanczos_step(hq, basis[-1], basis[-2], 0.5, basis, backend=backend)
    assert float(beta) > 0
    assert float((basis.double() @ q_next.double()).abs().max()) <= 1e-6
    assert float(q_next.double().norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_result_does_not_depend_on_threads(dtype, rng, threads):
    """The C++ kernel cuts d into a fixed number of blocks and adds their sums in block order."""
    d, m = 40011, 7
    basis = orthonormal_rows(m, d, dtype, rng)
    hq = torch.randn(d, dtype=dtype, generator=rng)
    args = (hq, unit(d, dtype, rng), unit(d, dtype, rng), 0.3, basis)
    parallel = lanczos_step(*args, backend="cpp")
    torch.set_num_threads(1)
    serial = lanczos_step(*args, backend="cpp")
    for a, b in zip(parallel, serial):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_breakdown_gives_zero(backend, device, dtype, rng):
    d, m = 50, 4
    basis = orthonormal_rows(m, d, dtype, rng).to(device)
    hq = basis.T @ torch.randn(m, dtype=dtype, generator=rng).to(device)  # inside span(basis): invariant subspace
    q_next, _, beta = lanczos_step(hq, basis[0], basis[1], 0.5, basis, backend=backend)
    assert float(beta) == 0.0 and torch.equal(q_next, torch.zeros(d, dtype=dtype, device=device))
    zero = torch.zeros(d, dtype=dtype, device=device)  # H q = 0
    q_next, alpha, beta = lanczos_step(zero, unit(d, dtype, rng).to(device), zero, 0.0, None, backend=backend)
    assert float(alpha) == 0.0 and float(beta) == 0.0 and torch.equal(q_next, zero)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy overflows, as intended
@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("case", ["finite beta", "beta beyond float64"])
def test_an_overflowing_norm_of_hq_is_refused_not_read_as_a_breakdown(backend, device, case, rng):
    """With float64 entries above ~1e154, ||hq||^2 is Inf and every beta passed the breakdown test: beta 0 and a
    zero q_next came back (a Lanczos run would stop as if its Krylov space were invariant), where the true
    beta was 1e150 or 7e200. The step is refused as an overflow now, by every backend alike."""
    d = 40
    q = torch.zeros(d, dtype=torch.float64)
    q[0] = 1.0
    if case == "finite beta":
        hq = torch.zeros(d, dtype=torch.float64)
        hq[0], hq[1] = 1e160, 1e150
    else:
        hq = torch.randn(d, dtype=torch.float64, generator=rng) * 1e200
    with pytest.raises(ValueError, match="^lanczos_step: alpha or beta is not finite: .* or their products overflow$"):
        lanczos_step(hq.to(device), q.to(device), None, 0.0, None, backend=backend)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_float32_vectors_of_extreme_magnitude(backend, device, scale, rng):
    """float32 products far from 1 give the step numpy gives: the C++ kernel summed w's squares in
    float32, so entries of 1e-30 squared to 0 (a false breakdown: beta 0, q_next zeros) and from about
    1e18 on they overflowed (refused as "alpha or beta is not finite")."""
    d, m = 1000, 5
    basis = orthonormal_rows(m, d, torch.float32, rng).to(device)
    hq = (torch.randn(d, dtype=torch.float64, generator=rng) * scale).float().to(device)
    q, q_prev = unit(d, torch.float32, rng).to(device), unit(d, torch.float32, rng).to(device)
    q_next, alpha, beta = lanczos_step(hq, q, q_prev, 0.5 * scale, basis, backend=backend)
    expected, alpha_np, beta_np = numpy_step(hq, q, q_prev, 0.5 * scale, basis)
    assert float(alpha) == pytest.approx(alpha_np, rel=1e-12)
    assert float(beta) == pytest.approx(beta_np, rel=2e-6)
    np.testing.assert_allclose(q_next.double().cpu().numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("beta", [1e-39, 1e-44, 3e41])
def test_a_float32_beta_whose_reciprocal_leaves_float32(backend, device, beta):
    """Triton scaled w by 1/beta rounded to float32: beta = 1e-39 gave q_next = [inf, nan, nan, nan] with
    no error, beta 3e41 (huge entries over 2^20 rows) lost digits; the exact q_next is e_1 here."""
    d = 4 if beta < 1 else 1 << 20
    hq = torch.zeros(d, dtype=torch.float32, device=device)
    hq[0] = beta if beta < 1 else 3e38
    q = torch.zeros(d, dtype=torch.float32, device=device)
    q[1] = 1.0
    if beta > 1:
        hq[:] = 3e38
        q[0], q[1] = 2 ** -0.5, -(2 ** -0.5)
    q_next, alpha, _ = lanczos_step(hq, q, None, 0.0, None, backend=backend)
    expected = torch.zeros(d, dtype=torch.float64)
    if beta < 1:
        expected[0] = 1.0
    else:
        expected[:] = d ** -0.5
    assert torch.isfinite(q_next).all() and float(alpha) == 0.0
    torch.testing.assert_close(q_next.double().cpu(), expected, rtol=0, atol=1e-7 * float(expected.abs().max()))


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_first_step_and_layouts(backend, device, rng):
    """q_prev=None / basis=None mean none; a strided basis and a tensor beta_prev are accepted."""
    d = 64
    f64 = {"dtype": torch.float64, "device": device}
    hq, q = torch.randn(d, dtype=torch.float64, generator=rng).to(device), unit(d, torch.float64, rng).to(device)
    first = lanczos_step(hq, q, None, 123.0, None, backend=backend)
    explicit = lanczos_step(hq, q, torch.zeros(d, **f64), 0.0, torch.empty(0, d, **f64), backend=backend)
    for a, b in zip(first, explicit):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    basis_t = orthonormal_rows(5, d, torch.float64, rng).to(device).T.contiguous().T  # column-major (5, d)
    q_prev = unit(d, torch.float64, rng).to(device)
    got = lanczos_step(hq, q, q_prev, torch.tensor(0.25, **f64), basis_t, backend=backend)
    expected, alpha_np, beta_np = numpy_step(hq, q, q_prev, 0.25, basis_t)
    np.testing.assert_allclose(got[0].cpu().numpy(), expected, atol=1e-13)
    assert float(got[1]) == pytest.approx(alpha_np, rel=1e-13) and float(got[2]) == pytest.approx(beta_np, rel=1e-13)


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_full_lanczos_run_finds_extreme_eigenvalues(backend, device, rng):
    """Lanczos with full reorthogonalisation built from repeated steps: T's extreme eigenvalues are
    those of A (the Krylov space is all of R^n after n steps)."""
    n = 40
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=rng))[0]
    spectrum = torch.cat([torch.tensor([-3.0, 7.5]), torch.linspace(-1.0, 2.0, n - 2, dtype=torch.float64)])
    A = (V @ torch.diag(spectrum) @ V.T).to(device)
    q = unit(n, torch.float64, rng).to(device)
    q_prev, beta = None, torch.zeros((), dtype=torch.float64, device=device)
    Q, alphas, betas = [q], [], []
    for _ in range(n):
        q_next, alpha, beta = lanczos_step(A @ q, q, q_prev, beta, torch.stack(Q), backend=backend)
        alphas.append(float(alpha))
        if float(beta) == 0.0:
            break
        betas.append(float(beta))
        q_prev, q = q, q_next
        Q.append(q)
    k = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: k - 1], 1) + np.diag(betas[: k - 1], -1)
    ritz = np.linalg.eigvalsh(T)
    exact = torch.linalg.eigvalsh(A).cpu().numpy()
    assert ritz[0] == pytest.approx(exact[0], abs=1e-10) and ritz[-1] == pytest.approx(exact[-1], abs=1e-10)
    Qm = torch.stack(Q[:k]).cpu()  # the Lanczos vectors stay orthonormal
    torch.testing.assert_close(Qm @ Qm.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)


def _bad_calls(device):
    """case -> (exception type, message after "lanczos_step: ", arguments); the vectors have d = 4."""
    f = {"device": device}
    hq, q, q_prev, basis = torch.ones(4, **f), torch.ones(4, **f) / 2, torch.zeros(4, **f), torch.empty(0, 4, **f)
    return {
        # the shapes of hq and q come first, whatever else is missing (here q_prev and basis)
        "2-D hq and q": (ValueError, r"hq must be 1-D \(d,\), got shape \[1, 4\]",
                         (hq[None], q[None], None, 0.0, None)),
        "0-D hq": (ValueError, r"hq must be 1-D \(d,\), got shape \[\]", (hq[0], q, None, 0.0, None)),
        "q shape": (ValueError, r"q must have the shape of hq \[4\], got \[5\]",
                    (hq, torch.ones(5, **f), q_prev, 0.0, basis)),
        "q_prev shape": (ValueError, r"q_prev must have the shape of hq \[4\], got \[1, 4\]",
                         (hq, q, q_prev[None], 0.0, basis)),
        "basis columns": (ValueError, r"basis must have shape \(m, 4\), got \[2, 5\]",
                          (hq, q, q_prev, 0.0, torch.ones(2, 5, **f))),
        "1-D basis": (ValueError, r"basis must have shape \(m, 4\), got \[4\]", (hq, q, q_prev, 0.0, hq)),
        "integer hq": (TypeError, "hq must be float32 or float64, got Long", (hq.long(), q, q_prev, 0.0, basis)),
        "q_prev dtype": (TypeError, "q_prev dtype Double must equal hq dtype Float",
                         (hq, q, q_prev.double(), 0.0, basis)),
        "basis dtype": (TypeError, "basis dtype Double must equal hq dtype Float",
                        (hq, q, q_prev, 0.0, basis.double())),
        "q device": (ValueError, f"q is on meta but hq is on {hq.device}", (hq, q.to("meta"), q_prev, 0.0, basis)),
        "beta_prev device": (ValueError, f"beta_prev is on meta but hq is on {hq.device}",
                             (hq, q, q_prev, torch.tensor(0.5, device="meta"), basis)),
        "beta_prev type": (TypeError, "beta_prev must be a float or a 0-dim tensor, got str",
                           (hq, q, q_prev, "0.5", basis)),
        "beta_prev shape": (ValueError, r"beta_prev must be a real scalar, got a torch.float32 tensor of shape \(2,\)",
                            (hq, q, q_prev, torch.ones(2), basis)),
        "q type": (TypeError, "q must be a torch.Tensor, got list", (hq, [0.5] * 4, q_prev, 0.0, basis)),
        "basis type": (TypeError, "basis must be a torch.Tensor, got int", (hq, q, q_prev, 0.0, 3)),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls("cpu")))
def test_bad_input_raises_the_same_error_from_every_backend(case, device):
    messages = {}
    for backend in [b for b, dev in PAIRS if dev == device.type]:
        exc, message, args = _bad_calls(device)[case]
        with pytest.raises(exc, match=f"^lanczos_step: {message}$") as info:
            lanczos_step(*args, backend=backend)
        messages[backend] = str(info.value)
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_beta_prev_of_any_real_kind(backend, device, rng):
    """A numpy scalar beta_prev is a number like a float (it was refused as "got float32"); an int past
    float64's range is reported as not finite (float() raised an OverflowError)."""
    d = 40
    hq, q, q_prev = (t.to(device) for t in (torch.randn(d, dtype=torch.float64, generator=rng),
                                            unit(d, torch.float64, rng), unit(d, torch.float64, rng)))
    for beta_prev in (np.float32(0.25), np.float64(0.25), np.int64(2)):
        expected = lanczos_step(hq, q, q_prev, float(beta_prev), None, backend=backend)
        for got, want in zip(lanczos_step(hq, q, q_prev, beta_prev, None, backend=backend), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^lanczos_step: beta_prev must be finite, got NaN or Inf$"):
        lanczos_step(hq, q, q_prev, 2**2000, None, backend=backend)


# Non-finite inputs make the interpreter's numpy arithmetic warn, as intended.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("beta_prev", [float("nan"), float("inf"), "-inf tensor"])
def test_non_finite_beta_prev(backend, device, beta_prev):
    if beta_prev == "-inf tensor":
        beta_prev = torch.tensor(float("-inf"), dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="^lanczos_step: beta_prev must be finite, got NaN or Inf$"):
        lanczos_step(torch.ones(4, device=device), torch.ones(4, device=device) / 2, torch.zeros(4, device=device),
                     beta_prev, None, backend=backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(("backend", "device"), PAIRS)
@pytest.mark.parametrize("name", ["hq", "q", "q_prev", "basis"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_vectors(backend, device, name, value, rng):
    """A NaN or Inf in any vector is reported through alpha or beta (Inf in hq included, where the
    breakdown test would zero beta), by every backend with the same message."""
    d, m = 40, 3
    basis = orthonormal_rows(m, d, torch.float64, rng)
    args = {"hq": torch.randn(d, dtype=torch.float64, generator=rng), "q": unit(d, torch.float64, rng),
            "q_prev": unit(d, torch.float64, rng), "basis": basis}
    args[name].view(-1)[17] = value
    args = {k: v.to(device) for k, v in args.items()}
    with pytest.raises(ValueError, match="^lanczos_step: alpha or beta is not finite: hq, q, q_prev or basis contains "
                                         "NaN or Inf, or their products overflow$"):
        lanczos_step(args["hq"], args["q"], args["q_prev"], 0.5, args["basis"], backend=backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [None, 0, 3])
def test_meta_tensors_give_the_fakes_shapes(backend, dtype, m):
    """Meta tensors hold no values: "auto" takes the reference for them, which checks the shapes,
    dtypes and devices but not the values (beta_prev, alpha and beta finite) and returns what the
    op's fake returns: q_next of hq's shape and dtype, alpha and beta float64 0-dim, all on meta."""
    meta = {"dtype": dtype, "device": "meta"}
    hq, q, q_prev = torch.empty(9, **meta), torch.empty(9, **meta), torch.empty(9, **meta)
    basis = None if m is None else torch.empty(m, 9, **meta)
    beta_prev = torch.empty((), dtype=torch.float64, device="meta")
    out = lanczos_step(hq, q, None if m is None else q_prev, beta_prev, basis, backend=backend)
    fake = fake_step(hq, q, q_prev, beta_prev, torch.empty(0 if m is None else m, 9, **meta))
    assert [(t.shape, t.dtype, t.device.type) for t in out] == [(t.shape, t.dtype, "meta") for t in fake]
    assert [(t.shape, t.dtype) for t in out] == [((9,), dtype), ((), torch.float64), ((), torch.float64)]
    with pytest.raises(ValueError, match=r"^lanczos_step: q must have the shape of hq \[9\], got \[4\]$"):
        lanczos_step(hq, q[:4], q_prev, beta_prev, basis, backend=backend)


def test_unavailable_backend():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        lanczos_step(torch.ones(4), torch.ones(4) / 2, None, 0.0, None, backend="cuda")


@pytest.mark.parametrize(("backend", "device"), COMPILED)
def test_opcheck(backend, device, rng):
    d, m = 40, 3
    args = tuple(t.to(device) for t in (
        torch.randn(d, generator=rng), unit(d, torch.float32, rng), unit(d, torch.float32, rng),
        torch.tensor(0.3, dtype=torch.float64), orthonormal_rows(m, d, torch.float32, rng)))
    op = _triton_ops() if backend == "triton" else torch.ops.unlearn_kernels
    torch.library.opcheck(op.lanczos_step.default, args)


def _triton_ops():
    from unlearn_kernels.triton_kernels import lanczos_step as _  # noqa: F401  (defines the op)

    return torch.ops.unlearn_kernels_triton


@pytest.mark.parametrize(("backend", "device"), PAIRS)
def test_results_never_require_grad(backend, device, rng):
    """The step is not differentiable: with an hq that requires grad the C++ op's alpha claimed
    requires_grad and a backward gave None (torch only warned), Triton's raised torch's "no autograd
    formula", the reference's gave a gradient."""
    hq = torch.randn(6, dtype=torch.float64, generator=rng).to(device).requires_grad_()
    q = unit(6, torch.float64, rng).to(device).requires_grad_()
    results = lanczos_step(hq, q, None, 0.0, None, backend=backend)
    assert not any(t.requires_grad for t in results)
