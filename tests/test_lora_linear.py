"""lora_linear / lora_linear_jvp: every backend against the float64 formula (output, the three
gradients, the JVP), gradcheck, the torch.func transforms (jvp, vmap, forward-over-reverse, double
backward), opcheck on every registered op, and bad input."""
import pytest
import torch
from devices import AUTOCAST_DTYPE, backend_devices
from tolerance import assert_within_rule

from unlearn_kernels.backends import BackendUnavailableError
from unlearn_kernels.ops import lora_linear, lora_linear_jvp, lora_linear_jvp_ref, lora_linear_ref

CASES = backend_devices("lora_linear")  # (backend, device): also "cuda" where a GPU is visible
BACKENDS = [b for b, device in CASES if device == "cpu"]  # for the CPU-only tests
# (leading dims of x, in, out, rank): odd sizes, a 3-D x, rank 1 and 256 (the interpreter's cost grows
# with the number of 128-wide tiles: these stay at a few tiles). The C++ pass merges the adapter into
# the weight when N >= in * out / (in + out): the first and last shapes take that path, the others not.
# No rows, and no input features (in = 0: y is the bias, as F.linear gives).
SHAPES = [((7,), 13, 11, 3), ((2, 5), 33, 17, 1), ((37,), 300, 260, 256), ((0,), 8, 5, 2), ((130,), 20, 129, 16),
          ((2, 3), 0, 5, 2)]


def make(lead, n_in, n_out, rank, dtype, device, gen, bias=True):
    def rand(*shape, std=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * std).to(device=device, dtype=dtype)

    x = rand(*lead, n_in)
    weight = rand(n_out, n_in, std=max(n_in, 1)**-0.5)
    b = rand(n_out) if bias else None
    lora_a = rand(rank, n_in, std=max(n_in, 1)**-0.5)
    lora_b = rand(n_out, rank, std=rank**-0.5)
    return x, weight, b, lora_a, lora_b, 0.75


def exact(x, weight, bias, lora_a, lora_b, scale):
    """The layer written out in float64, independent of the package: ``x (W + s B A)^T + b``."""
    y = x.double() @ (weight.double() + scale * lora_b.double() @ lora_a.double()).T
    return y if bias is None else y + bias.double()


def grads_of(fn, x, lora_a, lora_b, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b)]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_float64(backend, device, shape, dtype, bias, rng):
    args = make(*shape, dtype, device, rng, bias=bias)
    x, weight, b, lora_a, lora_b, scale = args
    out = lora_linear(*args, backend=backend)
    assert out.shape == (*shape[0], shape[2]) and out.dtype == dtype
    assert_within_rule(out, lora_linear_ref(*args), exact(*args))

    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=rng).to(device=device, dtype=dtype)

    def ours(x_, a_, b_):
        return lora_linear(x_, weight, b, a_, b_, scale, backend=backend)

    def plain(x_, a_, b_):
        return lora_linear_ref(x_, weight, b, a_, b_, scale)

    def exact_fn(x_, a_, b_):
        return exact(x_, weight, b, a_, b_, scale)

    got = grads_of(ours, x, lora_a, lora_b, grad_out)
    want = grads_of(plain, x, lora_a, lora_b, grad_out)
    exact_grads = grads_of(exact_fn, x.double(), lora_a.double(), lora_b.double(), grad_out.double())
    for g, p, e in zip(got, want, exact_grads):
        assert_within_rule(g, p, e)


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("tangents", ["both", "a", "b", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jvp_matches_torch_func(backend, device, tangents, dtype, rng):
    args = make((3, 9), 21, 14, 5, dtype, device, rng)
    x, weight, b, lora_a, lora_b, scale = args
    ta = torch.randn_like(lora_a) if tangents in ("both", "a") else None
    tb = torch.randn_like(lora_b) if tangents in ("both", "b") else None
    out, tangent = lora_linear_jvp(*args, ta, tb, backend=backend)

    def f(a_, b_):
        return exact(x, weight, b, a_, b_, scale)

    dirs = tuple(torch.zeros_like(p, dtype=torch.float64) if t is None else t.double()
                 for p, t in ((lora_a, ta), (lora_b, tb)))
    exact_out, exact_tangent = torch.func.jvp(f, (lora_a.double(), lora_b.double()), dirs)
    plain_out, plain_tangent = lora_linear_jvp_ref(*args, ta, tb)
    assert_within_rule(out, plain_out, exact_out)
    assert_within_rule(tangent, plain_tangent, exact_tangent)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_no_input_features_is_the_bias(backend, device, rng):
    """in = 0 (x of shape (..., 0)): y = b, as F.linear gives, in every path that flattens x to rows:
    the op, its JVP, and vmap over x (which reshaped with -1, ambiguous on an empty x)."""
    x, weight, b, lora_a, lora_b, scale = make((2, 3), 0, 5, 2, torch.float64, device, rng)
    expected = torch.nn.functional.linear(x, weight, b)  # (2, 3, 5): the bias in every row
    torch.testing.assert_close(lora_linear(x, weight, b, lora_a, lora_b, scale, backend=backend), expected,
                               rtol=0, atol=0)
    ta, tb = torch.randn_like(lora_a), torch.randn_like(lora_b)
    out, tangent = lora_linear_jvp(x, weight, b, lora_a, lora_b, scale, ta, tb, backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(tangent, torch.zeros_like(expected), rtol=0, atol=0)
    batched = torch.func.vmap(lambda x_: lora_linear(x_, weight, b, lora_a, lora_b, scale, backend=backend))(x)
    torch.testing.assert_close(batched, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_gradcheck(backend, device, rng):
    x, weight, b, lora_a, lora_b, scale = make((4, 3), 6, 5, 2, torch.float64, device, rng)
    leaves = [t.requires_grad_() for t in (x, lora_a, lora_b)]

    def fn(x_, a_, b_):
        return lora_linear(x_, weight, b, a_, b_, scale, backend=backend)

    # The backward op (no graph of the backward is recorded). In the interpreter each kernel launch
    # costs tens of ms: Triton takes the fast mode (random projections of the Jacobian).
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=backend == "triton")
    if backend == "triton":  # the rest runs ATen ops around the forward
        return
    assert torch.autograd.gradgradcheck(fn, leaves)
    assert torch.autograd.gradcheck(fn, leaves, check_forward_ad=True, check_backward_ad=False,
                                    check_batched_grad=False)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_torch_func_transforms(backend, device, rng):
    """What the curvature operators do on adapter parameters: vmapped jvp, forward-over-reverse HVP
    vmapped over tangents, per-sample gradients (vmap over x), and reverse-over-reverse."""
    x, weight, b, lora_a, lora_b, scale = make((2, 6), 7, 5, 3, torch.float64, device, rng)
    k = 3
    ta = torch.randn(k, *lora_a.shape, dtype=torch.float64, generator=rng).to(device)
    tb = torch.randn(k, *lora_b.shape, dtype=torch.float64, generator=rng).to(device)

    def ours(a_, b_, x_=x):
        return lora_linear(x_, weight, b, a_, b_, scale, backend=backend)

    def ref(a_, b_, x_=x):
        return lora_linear_ref(x_, weight, b, a_, b_, scale)

    def close(got, want):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)

    jv = [torch.func.vmap(lambda a, bb, f=f: torch.func.jvp(f, (lora_a, lora_b), (a, bb))[1])(ta, tb)
          for f in (ours, ref)]
    close([jv[0]], [jv[1]])

    def hvp(f):
        grad = torch.func.grad(lambda p: f(*p).sin().sum())
        return torch.func.vmap(lambda a, bb: torch.func.jvp(grad, ((lora_a, lora_b),), ((a, bb),))[1])(ta, tb)

    close(hvp(ours), hvp(ref))
    xs = torch.randn(4, *x.shape, dtype=torch.float64, generator=rng).to(device)

    def per_sample(f):
        grad = torch.func.grad(lambda p, x_: f(*p, x_).sin().sum())
        return torch.func.vmap(grad, in_dims=(None, 0))((lora_a, lora_b), xs)

    close(per_sample(ours), per_sample(ref))
    jvp_op = torch.func.vmap(
        lambda a, bb: lora_linear_jvp(x, weight, b, lora_a, lora_b, scale, a, bb, backend=backend)[1])
    close([jvp_op(ta, tb)], [jv[1]])

    def ror(f):
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        grads = torch.autograd.grad(f(*leaves[1:], leaves[0]).sin().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * t[0]).sum() for g, t in zip(grads, (xs, ta, tb))), leaves)

    close(ror(ours), ror(ref))



@pytest.mark.parametrize(("backend", "device"), CASES)
def test_adapter_gradients_when_x_needs_none(backend, device, rng):
    """The usual LoRA training step: only A and B need gradients. The backward returns one gradient per input slot
    (a backward that packed the two present ones into the first slots gave A's gradient to x, B's to A)."""
    x, weight, b, lora_a, lora_b, scale = make((9,), 7, 5, 3, torch.float64, device, rng)
    grad_out = torch.randn(9, 5, dtype=torch.float64, generator=rng).to(device)

    def adapter_grads(fn):
        leaves = [lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()]
        return torch.autograd.grad(fn(x, weight, b, *leaves, scale), leaves, grad_out)

    for got, want in zip(adapter_grads(lambda *a: lora_linear(*a, backend=backend)), adapter_grads(lora_linear_ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_vmap_over_stacked_weights_and_biases(backend, device, rng):
    """Several frozen layers at once (vmap over W and b): each batched bias is broadcast over its layer's rows."""
    x, _, _, lora_a, lora_b, scale = make((5,), 6, 4, 2, torch.float64, device, rng)
    weights = torch.randn(3, 4, 6, dtype=torch.float64, generator=rng).to(device)
    biases = torch.randn(3, 4, dtype=torch.float64, generator=rng).to(device)
    out = torch.func.vmap(lambda w, bias: lora_linear(x, w, bias, lora_a, lora_b, scale, backend=backend))(weights,
                                                                                                              biases)
    expected = torch.stack([lora_linear_ref(x, w, bias, lora_a, lora_b, scale) for w, bias in zip(weights, biases)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

def test_plain_backward_runs_the_compiled_op(rng):
    x, weight, b, lora_a, lora_b, scale = make((16,), 8, 6, 2, torch.float32, "cpu", rng)
    lora_b.requires_grad_()
    with torch.profiler.profile() as prof:
        lora_linear(x, weight, b, lora_a, lora_b, scale, backend="cpp").sum().backward()
    names = {e.name for e in prof.events()}
    assert "unlearn_kernels::lora_linear_backward" in names
    assert lora_b.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend, rng):
    _, weight, b, lora_a, lora_b, scale = make((1,), 12, 7, 3, torch.float64, "cpu", rng)
    wide = torch.randn(3, 9, 30, dtype=torch.float64, generator=rng)
    for x in (wide[:, :, ::2][..., :12], wide.transpose(0, 1)[..., 5:17]):  # feature stride 2; rows permuted
        assert not x.is_contiguous()
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        out = lora_linear(leaves[0], weight, b, leaves[1], leaves[2], scale, backend=backend)
        exact = lora_linear_ref(x.contiguous(), weight, b, lora_a, lora_b, scale)
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(out.sum(), leaves)
        want = grads_of(lambda x_, a_, b_: lora_linear_ref(x_, weight, b, a_, b_, scale), x.contiguous(), lora_a,
                        lora_b, torch.ones_like(exact))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_bias(backend, rng):
    # the Triton kernel reads the bias as a dense vector: a view with another stride must not reach it as one
    x, weight, _, lora_a, lora_b, scale = make((5,), 12, 7, 3, torch.float64, "cpu", rng)
    for b in (torch.randn(14, dtype=torch.float64, generator=rng)[::2], torch.tensor(0.5, dtype=torch.float64).expand(7)):
        assert not b.is_contiguous()
        out = lora_linear(x, weight, b, lora_a, lora_b, scale, backend=backend)
        torch.testing.assert_close(out, lora_linear_ref(x, weight, b.contiguous(), lora_a, lora_b, scale),
                                   rtol=1e-12, atol=1e-12)
        tangent = torch.randn(lora_b.shape, dtype=torch.float64, generator=rng)
        _, jvp = lora_linear_jvp(x, weight, b, lora_a, lora_b, scale, None, tangent, backend=backend)
        _, want = lora_linear_jvp_ref(x, weight, b.contiguous(), lora_a, lora_b, scale, None, tangent)
        torch.testing.assert_close(jvp, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_op_under_forward_mode_ad(backend, rng):
    """lora_linear_jvp under torch.func.jvp or forward_ad dual tensors (x and A moving): the compiled backends ran
    their registered op, which has no forward-mode rule: zero tangents without an error (torch.func), None or a
    raw "mm_out does not support forward AD" (duals). Every backend now gives the reference's tangents."""
    x, weight, b, lora_a, lora_b, scale = make((3,), 4, 5, 2, torch.float64, "cpu", rng)
    ta, tb, dx, da = (torch.randn(t.shape, dtype=torch.float64, generator=rng) for t in (lora_a, lora_b, x, lora_a))

    def ours(x_, a_):
        return lora_linear_jvp(x_, weight, b, a_, lora_b, scale, ta, tb, backend=backend)

    _, want = torch.func.jvp(lambda x_, a_: lora_linear_jvp_ref(x_, weight, b, a_, lora_b, scale, ta, tb),
                             (x, lora_a), (dx, da))
    _, got = torch.func.jvp(ours, (x, lora_a), (dx, da))
    with torch.autograd.forward_ad.dual_level():
        duals = ours(torch.autograd.forward_ad.make_dual(x, dx), torch.autograd.forward_ad.make_dual(lora_a, da))
        dual_tangents = [torch.autograd.forward_ad.unpack_dual(t).tangent for t in duals]
    for tangents in (got, dual_tangents):
        for g, w in zip(tangents, want):
            assert float(w.norm()) > 1.0
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_opcheck(backend, rng):
    ops_ns = torch.ops.unlearn_kernels if backend == "cpp" else _triton_ops()
    x, weight, b, lora_a, lora_b, scale = make((10,), 6, 5, 2, torch.float32, "cpu", rng)
    for with_bias in (b, None):
        torch.library.opcheck(ops_ns.lora_linear.default, (x, weight, with_bias, lora_a, lora_b, scale))
        torch.library.opcheck(ops_ns.lora_linear.default,
                              (x.clone().requires_grad_(), weight, with_bias, lora_a.clone().requires_grad_(),
                               lora_b.clone().requires_grad_(), scale))
    gy = torch.randn(10, 5, generator=rng)
    for mask in ([True, True, True], [False, True, True], [True, False, False]):
        torch.library.opcheck(ops_ns.lora_linear_backward.default, (gy, x, weight, lora_a, lora_b, scale, mask))
    ta, tb = torch.randn_like(lora_a), torch.randn_like(lora_b)
    for tangents in ((ta, tb), (ta, None), (None, tb), (None, None)):
        torch.library.opcheck(ops_ns.lora_linear_jvp.default, (x, weight, b, lora_a, lora_b, scale, *tangents))


def _triton_ops():
    from unlearn_kernels.triton_kernels import lora_linear as _  # noqa: F401  (defines the ops)

    return torch.ops.unlearn_kernels_triton


def _valid():
    return {"x": torch.ones(4, 6), "weight": torch.ones(5, 6), "bias": torch.ones(5), "lora_a": torch.ones(2, 6),
            "lora_b": torch.ones(5, 2), "scale": 1.0}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"lora_a": torch.ones(0, 6), "lora_b": torch.ones(5, 0)}, ValueError, "rank >= 1"),
        ({"lora_a": torch.ones(2, 7)}, ValueError, r"lora_a must have shape \(rank, 6\)"),
        ({"lora_b": torch.ones(5, 3)}, ValueError, r"lora_b must have shape \(5, 2\)"),
        ({"lora_b": torch.ones(4, 2)}, ValueError, r"lora_b must have shape \(5, 2\)"),
        ({"x": torch.ones(4, 7)}, ValueError, r"x must have shape \(\.\.\., 6\)"),
        ({"bias": torch.ones(6)}, ValueError, r"bias must have shape \(5,\)"),
        ({"weight": torch.ones(5, 6, 1)}, ValueError, "weight must be 2-D"),
        ({"lora_a": torch.ones(2, 6, dtype=torch.float64)}, TypeError, "lora_a dtype"),
        ({"x": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "x must be float16"),
        ({"lora_b": torch.ones(5, 2, device="meta")}, ValueError, "lora_b is on meta"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": -float("inf")}, ValueError, "scale must be finite, got -inf"),
        # an int past float64 is too large, not "not finite" (nor an OverflowError), shown in 40 characters
        ({"scale": 2**2000}, ValueError, r"scale 11481306952742545\d+\.\.\.\d+ is beyond the range of x's dtype "
                                         r"torch.float32 \(largest finite 3.40282e\+38\)$"),
        ({**{k: torch.ones(*v.shape, dtype=torch.float64) for k, v in _valid().items() if k != "scale"},
          "scale": -2**2000}, ValueError, r"scale -\d+\.\.\.\d+ is beyond the range of x's dtype torch.float64 "
                                          r"\(largest finite 1.79769e\+308\)$"),
        ({"scale": "2"}, TypeError, "scale must be a Python float"),
        ({"scale": True}, TypeError, "scale must be a Python float, got bool"),  # an int to Python, 1 to the kernels
        ({"scale": 1e39}, ValueError, r"scale 1e\+39 is beyond the range of x's dtype torch.float32"),
        ({**{k: torch.ones(*v.shape, dtype=torch.float16) for k, v in _valid().items() if k != "scale"}, "scale": 1e5},
         ValueError, "beyond the range of x's dtype torch.float16"),  # converted to float16, the factor would be Inf
        ({"weight": torch.ones(5, 6, requires_grad=True)}, ValueError, "weight requires grad"),
        ({"lora_a": [[1.0] * 6] * 2}, TypeError, "lora_a must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(change, error, match, backend):
    args = _valid()
    args.update(change)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(error, match=match):
        lora_linear(*args.values(), backend=backend)
    with pytest.raises(error, match=match):
        lora_linear_jvp(*args.values(), None, None, backend=backend)
    for k, v in before.items():  # nothing was modified
        assert torch.equal(args[k], v)


def test_bad_tangents():
    args = _valid()
    with pytest.raises(ValueError, match=r"tangent_a must have the shape \(2, 6\)"):
        lora_linear_jvp(*args.values(), torch.ones(3, 6), None)
    with pytest.raises(TypeError, match="tangent_b dtype"):
        lora_linear_jvp(*args.values(), None, torch.ones(5, 2, dtype=torch.float64))


def test_frozen_weight_gets_no_tangent():
    args = _valid()
    with pytest.raises(ValueError, match="weight and bias are frozen"):
        torch.func.jvp(lambda w: lora_linear(args["x"], w, None, args["lora_a"], args["lora_b"], 1.0),
                       (args["weight"],), (torch.ones(5, 6),))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_compiled_op_checks_its_inputs(backend):
    """The dispatcher ops of every namespace check their inputs themselves (for callers that bypass the
    Python op): shapes, dtypes, a scale outside x's dtype, the backward's grad_out, the JVP's tangents."""
    ops_ns = _triton_ops() if backend == "triton" else torch.ops.unlearn_kernels
    args = _valid()
    x, w, a, b = args["x"], args["weight"], args["lora_a"], args["lora_b"]
    with pytest.raises(ValueError, match="lora_b must have shape"):
        ops_ns.lora_linear(x, w, None, a, torch.ones(5, 3), 1.0)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        ops_ns.lora_linear(x, w, None, torch.ones(2, 5), b, 1.0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops_ns.lora_linear(torch.ones(2, 4, 6), w, None, a, b, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        ops_ns.lora_linear(x, w, None, a.double(), b, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops_ns.lora_linear(x, w, None, a, b, float("nan"))
    with pytest.raises(ValueError, match="beyond the range of x's dtype"):
        ops_ns.lora_linear(x, w, None, a, b, 1e39)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        ops_ns.lora_linear_backward(torch.ones(3, 5), x, w, a, b, 1.0, [True, True, True])
    with pytest.raises(ValueError, match="tangent_a must have"):
        ops_ns.lora_linear_jvp(x, w, None, a, b, 1.0, torch.ones(3, 6), None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_keeps_a_small_adapter_update(backend, dtype):
    """In float16 / bfloat16 an adapter update s B A far below half an ulp of W's entries must still
    reach the output: folded into W' = W + s B A in the input dtype (as the C++ pass did for every batch
    with N >= in * out / (in + out) rows) it rounded away, leaving 7-9% of the update, and a row's
    output depended on its batch's size. Measured as the least-squares slope of (y - x W^T) on the
    exact update (x A^T) B^T over the whole output: about 1 when kept, about 0 when lost."""
    gen = torch.Generator().manual_seed(0)
    n_in, n_out, rank, rows = 1024, 64, 8, 128  # 128 rows: above the merge threshold of 60
    x0 = torch.randn(n_in, generator=gen).sign()
    x = (x0 + 0.1 * torch.randn(rows, n_in, generator=gen)).to(dtype)
    weight = torch.randn(n_out, n_in, generator=gen).to(dtype)
    lora_a = (x0.repeat(rank, 1) / n_in**0.5).to(dtype)  # along the rows' shared direction
    size = 1e-3 if dtype == torch.bfloat16 else 2e-4  # the update: about an ulp of the output's entries
    lora_b = (torch.randn(n_out, rank, generator=gen) * size).to(dtype)
    out = lora_linear(x, weight, None, lora_a, lora_b, 1.0, backend=backend)
    base = x.double() @ weight.double().T
    update = (x.double() @ lora_a.double().T @ lora_b.double().T).flatten()
    slope = ((out.double() - base).flatten() @ update / (update @ update)).item()
    assert 0.8 < slope < 1.2, slope
    torch.testing.assert_close(out[:8], lora_linear(x[:8], weight, None, lora_a, lora_b, 1.0, backend=backend),
                               rtol=0, atol=float(out.abs().max()) * 2**-7)  # an ulp or two of the largest entry


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [5, 200])  # below and above the C++ pass's merge threshold (in * out / (in + out))
def test_reduced_precision_on_the_cpu_accumulates_in_float32(backend, dtype, rows):
    """The docstring said float16 / bfloat16 "on GPU"; the CPU takes them too, and accumulates in float32
    as documented: over 4000 products the error stays within an ulp of the largest output (0.46-0.55; a
    sum in the input dtype is off by 12-20)."""
    gen = torch.Generator().manual_seed(0)
    n_in, n_out, rank = 4000, 40, 4
    x = torch.randn(rows, n_in, generator=gen).to(dtype)
    weight = torch.randn(n_out, n_in, generator=gen).to(dtype)
    lora_a = (torch.randn(rank, n_in, generator=gen) / n_in**0.5).to(dtype)
    lora_b = torch.randn(n_out, rank, generator=gen).to(dtype)
    out = lora_linear(x, weight, None, lora_a, lora_b, 0.5, backend=backend)
    assert out.dtype == dtype and out.device.type == "cpu"
    exact = x.double() @ weight.double().T + 0.5 * (x.double() @ lora_a.double().T) @ lora_b.double().T
    assert (out.double() - exact).abs().max() <= torch.finfo(dtype).eps * exact.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gradients(backend, rng):
    """Autograd's batched vector-Jacobian products (``is_grads_batched``, ``jacobian(vectorize=True)``)
    run on every backend (they reach no registered vmap rule: a Python-defined op could not run under
    them) and equal one backward per vector; so does ``torch.func.vmap`` over ``autograd.grad``."""
    x, weight, b, lora_a, lora_b, scale = make((5,), 7, 6, 3, torch.float64, "cpu", rng)
    leaves = _leaves(x, lora_a, lora_b)
    out = lora_linear(leaves[0], weight, b, leaves[1], leaves[2], scale, backend=backend)
    vectors = torch.randn(4, *out.shape, dtype=torch.float64, generator=rng)
    looped = [torch.stack(g) for g in zip(*(torch.autograd.grad(out, leaves, v, retain_graph=True) for v in vectors))]
    batched = torch.autograd.grad(out, leaves, vectors, retain_graph=True, is_grads_batched=True)
    mapped = torch.func.vmap(lambda v: torch.autograd.grad(out, leaves, v, retain_graph=True))(vectors)
    for got, vmapped, want in zip(batched, mapped, looped):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vmapped, want, rtol=1e-12, atol=1e-12)
    jacobian = torch.autograd.functional.jacobian(
        lambda a: lora_linear(x, weight, b, a, lora_b, scale, backend=backend), lora_a, vectorize=True)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(
        lambda a: lora_linear_ref(x, weight, b, a, lora_b, scale), lora_a), rtol=1e-12, atol=1e-12)


def test_unavailable_backend():
    args = _valid()
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        lora_linear(*args.values(), backend="cuda")


@pytest.mark.parametrize("merged", [True, False])
def test_cpp_row_chunks_in_parallel(threads, merged, rng):
    """With several threads and N >= 512 rows the C++ pass splits its rank-r products over row chunks on
    worker threads (which must see the caller's grad mode); merged or not by the shape."""
    n_in, n_out = (40, 30) if merged else (1100, 1100)  # merged when N >= in * out / (in + out)
    x, weight, b, lora_a, lora_b, scale = make((520,), n_in, n_out, 8, torch.float64, "cpu", rng)
    grad_out = torch.randn(520, n_out, dtype=torch.float64, generator=rng)
    out = lora_linear(x, weight, b, lora_a, lora_b, scale, backend="cpp")
    torch.testing.assert_close(out, lora_linear_ref(x, weight, b, lora_a, lora_b, scale), rtol=1e-12, atol=1e-12)
    got = grads_of(lambda x_, a_, b_: lora_linear(x_, weight, b, a_, b_, scale, backend="cpp"), x, lora_a, lora_b,
                   grad_out)
    want = grads_of(lambda x_, a_, b_: lora_linear_ref(x_, weight, b, a_, b_, scale), x, lora_a, lora_b, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    ta, tb = torch.randn_like(lora_a), torch.randn_like(lora_b)
    for a, c in zip(lora_linear_jvp(x, weight, b, lora_a, lora_b, scale, ta, tb, backend="cpp"),
                    lora_linear_jvp_ref(x, weight, b, lora_a, lora_b, scale, ta, tb)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_propagate_like_f_linear(backend):
    """The documented contract: a forward-pass layer, unchecked; a NaN in one row of x gives a NaN
    row, an Inf a row with no finite entry (+-Inf where the C++ kernel folds the adapter into W,
    NaN where Inf - Inf is summed), and the other rows are exact, on every backend."""
    args = _valid()
    args["x"] = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 10
    args["x"][1, 2] = float("nan")
    args["x"][2, 4] = float("inf")
    out = lora_linear(*args.values(), backend=backend)
    expected = torch.nn.functional.linear(args["x"], args["weight"], args["bias"]) + (
        args["x"] @ args["lora_a"].T @ args["lora_b"].T)
    assert out[1].isnan().all()
    assert not out[2].isfinite().any()
    rows = [0, 3]
    torch.testing.assert_close(out[rows], expected[rows])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e37), (torch.float64, 1e306)], ids=str)
def test_an_adapter_whose_folded_weight_overflows_gives_the_finite_output(backend, dtype, scale):
    """Enough rows make the C++ kernel fold the adapter into the weight, W + s B A: where s B A overflows the dtype
    while s (x A^T) B^T does not, its output and input gradient were Inf in every entry (300 rows). Such a folded
    weight is not used on the CPU: every backend gives the finite output and gradients of the reference."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 24, dtype=dtype, generator=gen)
    lora_a, lora_b = torch.full((4, 24), 10.0, dtype=dtype), torch.full((20, 4), 10.0, dtype=dtype)
    x = torch.full((300, 24), 1e-10, dtype=dtype)
    results = []
    for op in (lambda *a: lora_linear(*a, backend=backend), lora_linear_ref):
        leaves = _leaves(x, lora_b)
        out = op(leaves[0], weight, None, lora_a, leaves[1], scale)
        grads = torch.autograd.grad(out, leaves, torch.full_like(out, 1e-30))
        results.append((out, *grads))
    for ours, plain in zip(*results):  # sums of 300 rows: float32 rounding apart
        assert ours.isfinite().all()
        torch.testing.assert_close(ours, plain, rtol=2e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inf_in_the_adapter_gives_the_references_non_finite_entries(backend):
    """An Inf in lora_b, with rows enough to fold the adapter into W: the folded weight holds it, and x W'^T met
    Inf - Inf (NaN) where the unfolded sum is +-Inf. The C++ kernel now sums unfolded there: the same values as
    the reference, NaN, +-Inf and finite alike."""
    gen = torch.Generator().manual_seed(0)
    x, weight, b, lora_a, lora_b, scale = make((300,), 24, 20, 4, torch.float64, "cpu", gen)
    lora_b[3, 1] = float("inf")
    ours, plain = lora_linear(x, weight, b, lora_a, lora_b, scale, backend=backend), lora_linear_ref(
        x, weight, b, lora_a, lora_b, scale)
    assert not ours[:, 3].isfinite().any()
    torch.testing.assert_close(ours, plain, equal_nan=True)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("shape", [((7,), 13, 11, 3), ((2, 5), 33, 17, 1), ((130,), 20, 129, 16)], ids=str)
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_after", "backward_inside"])
def test_autocast_follows_f_linear(backend, device, shape, backward_inside, rng):
    """Under autocast the op runs in the autocast dtype like F.linear (float32 leaves cast to it), its
    output has that dtype and matches the reference under the same autocast, and the gradients reach
    the float32 x, A and B in float32, as autograd's casts give (whether backward runs inside the
    autocast region or after it)."""
    low = AUTOCAST_DTYPE[device]
    x, weight, b, lora_a, lora_b, scale = make(*shape, torch.float32, device, rng)
    grad_out = torch.randn(*shape[0], shape[2], dtype=torch.float64, generator=rng).to(device=device, dtype=low)
    results = {}
    for name, fn in (("ours", lambda *a: lora_linear(*a, backend=backend)), ("plain", lora_linear_ref)):
        leaves = _leaves(x, lora_a, lora_b)
        with torch.autocast(device, dtype=low):
            out = fn(leaves[0], weight, b, leaves[1], leaves[2], scale)
            grads = torch.autograd.grad(out, leaves, grad_out) if backward_inside else None
        if grads is None:
            grads = torch.autograd.grad(out, leaves, grad_out)
        results[name] = out, grads
    (out, grads), (plain, plain_grads) = results["ours"], results["plain"]
    assert out.dtype == plain.dtype == low and out.shape == (*shape[0], shape[2])
    # the exact layer on the inputs as autocast rounds them
    rounded = [t.to(low).double() for t in (x, weight, b, lora_a, lora_b)]
    exact_leaves = _leaves(rounded[0], rounded[3], rounded[4])
    exact_out = exact(exact_leaves[0], rounded[1], rounded[2], exact_leaves[1], exact_leaves[2], scale)
    assert_within_rule(out, plain, exact_out)
    exact_grads = torch.autograd.grad(exact_out, exact_leaves, grad_out.double())
    for g, p, e, leaf in zip(grads, plain_grads, exact_grads, (x, lora_a, lora_b)):
        assert g.dtype == p.dtype == leaf.dtype == torch.float32
        assert torch.equal(g, g.to(low).float())  # computed in the autocast dtype, then cast back
        assert_within_rule(g.to(low), p.to(low), e)


@pytest.mark.parametrize(("backend", "device"), CASES)
def test_autocast_leaves_float64_alone(backend, device, rng):
    """Autocast does not cast float64 (F.linear stays float64): neither does the op; results and
    gradients are those without autocast, bit for bit."""
    x, weight, b, lora_a, lora_b, scale = make((3, 4), 9, 6, 2, torch.float64, device, rng)
    runs = []
    for enabled in (False, True):
        leaves = _leaves(x, lora_a, lora_b)
        with torch.autocast(device, dtype=AUTOCAST_DTYPE[device], enabled=enabled):
            assert torch.nn.functional.linear(x, weight, b).dtype == torch.float64
            out = lora_linear(leaves[0], weight, b, leaves[1], leaves[2], scale, backend=backend)
            runs.append((out, *torch.autograd.grad(out.sin().sum(), leaves)))
    for off, on in zip(*runs):
        assert on.dtype == torch.float64 and torch.equal(on, off)


@pytest.mark.parametrize(("backend", "device"), CASES)
@pytest.mark.parametrize("tangents", ["both", "b"])
def test_autocast_jvp(backend, device, tangents, rng):
    """lora_linear_jvp under autocast: inputs and tangents cast like the op's, both results in the
    autocast dtype, matching the reference under the same autocast."""
    low = AUTOCAST_DTYPE[device]
    x, weight, b, lora_a, lora_b, scale = make((3, 9), 21, 14, 5, torch.float32, device, rng)
    ta = torch.randn_like(lora_a) if tangents == "both" else None
    tb = torch.randn_like(lora_b)
    with torch.autocast(device, dtype=low):
        out, tangent = lora_linear_jvp(x, weight, b, lora_a, lora_b, scale, ta, tb, backend=backend)
        plain_out, plain_tangent = lora_linear_jvp_ref(x, weight, b, lora_a, lora_b, scale, ta, tb)
    assert out.dtype == tangent.dtype == low

    def rounded(t):
        return None if t is None else t.to(low).double()

    exact_out, exact_tangent = lora_linear_jvp_ref(*map(rounded, (x, weight, b, lora_a, lora_b)), scale,
                                                   rounded(ta), rounded(tb))
    assert_within_rule(out, plain_out, exact_out)
    assert_within_rule(tangent, plain_tangent, exact_tangent)


def test_triton_products_keep_the_row_count_on_the_grids_first_axis(monkeypatch):
    """With the GPU's tiles (128 columns), the backward's gradient of B computed A x^T, which put the N rows on the
    grid's second axis: CUDA allows 65,535 tiles there, so N >= 8,388,481 rows (4096 sequences of 2048 tokens)
    failed to launch. Every product of the forward, backward and JVP keeps N on the first axis now (launches
    captured, nothing computed), and a product that would pass the limit is refused by name."""
    from unlearn_kernels.triton_kernels import lora_linear as kernels

    grids = []

    class Capture:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(kernels, "INTERPRETED", False)  # the launch configuration of a GPU
    monkeypatch.setattr(kernels, "wrap_triton", Capture)
    rows = 65_535 * 128 + 1
    x, gy = torch.empty(rows, 1), torch.empty(rows, 3)
    weight, a, b = torch.empty(3, 1), torch.empty(2, 1), torch.empty(3, 2)
    ops_ns = _triton_ops()
    ops_ns.lora_linear(x, weight, None, a, b, 1.0)
    ops_ns.lora_linear_backward(gy, x, weight, a, b, 1.0, [True, True, True])
    ops_ns.lora_linear_jvp(x, weight, None, a, b, 1.0, a, b)
    assert len(grids) >= 7 and max(grid[1] for grid in grids) == 1
    with pytest.raises(ValueError, match=r"a product with 8388481 columns needs 65536 column tiles, beyond a GPU "
                                         r"grid's 65535"):
        kernels._mm(a, x)
