"""The compiled passes' GEMM route (csrc/gemm.h): on a non-Intel x86 CPU with AVX-512 (and within
``onednn_gemm()`` on an Intel one), float32 CPU matmuls of enough work run through torch's own oneDNN matmul,
elsewhere (Intel CPUs, other dtypes, small GEMMs, ``torch.backends.mkldnn`` turned off) through ATen's GEMM.
Both routes are held to the float64 reference under the accuracy rule, for every
compiled pass that takes them (the MLP passes, the LoRA layer's forward, backward and JVP), on problems where
their GEMMs are above the route's threshold (the cached product's rows in several blocks, each block's products
added to the first's: the accumulating GEMMs; the LoRA layer with its adapter merged and apart, with a bias)."""
from __future__ import annotations

import contextlib
import platform
import threading
from collections.abc import Callable

import pytest
import torch
from tolerance import assert_within_rule
from torch.autograd import forward_ad

from unlearn_kernels import _extension, aten_gemm, cpu_gemm, onednn_gemm, ops
from unlearn_kernels.backends import BackendUnavailableError
from unlearn_kernels.ops import lora_linear, lora_linear_jvp, lora_linear_jvp_ref, lora_linear_ref

ROUTES = ("default", "onednn", "aten")


def route(name: str) -> contextlib.AbstractContextManager:
    """The GEMM route of the compiled passes: as this machine picks it, oneDNN's where the CPU can run it, or
    ATen's."""
    return {"default": contextlib.nullcontext, "onednn": onednn_gemm, "aten": aten_gemm}[name]()


def _problem(dtype: torch.dtype, n: int = 2100, k: int = 3, seed: int = 0) -> dict:
    """An MLP 64-128-128-10 (tanh, gelu, logits), n rows with two ignored, and K flat tangents over every
    parameter: with K = 3 the cached product takes ~340 rows a block (seven blocks), and each of its GEMMs,
    like the uncached pass's and the gradient's, has at least 1.3 M multiply-adds (the oneDNN route's
    threshold is 786,432)."""
    gen = torch.Generator().manual_seed(seed)
    dims = [64, 128, 128, 10]
    weights = [torch.randn(o, i, generator=gen, dtype=torch.float64) * 1.5 / i**0.5 for i, o in zip(dims, dims[1:])]
    biases = [torch.randn(o, generator=gen, dtype=torch.float64) * 0.5 for o in dims[1:]]
    target = torch.randint(0, 10, (n,), generator=gen)
    target[[5, n - 3]] = -100
    sizes = [w.numel() for w in weights] + [b.numel() for b in biases]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return dict(
        x=torch.randn(n, dims[0], generator=gen, dtype=torch.float64).to(dtype),
        target=target,
        weights=[w.to(dtype) for w in weights],
        biases=[b.to(dtype) for b in biases],
        activations=["tanh", "gelu", "identity"],
        V=torch.randn(starts[-1], k, generator=gen, dtype=torch.float64).to(dtype),
        weight_offsets=starts[:3],
        bias_offsets=starts[3:6],
    )


def _cast(p: dict, dtype: torch.dtype) -> dict:
    return {key: (value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point()
                  else [t.to(dtype) for t in value] if key in ("weights", "biases") else value)
            for key, value in p.items()}


def _model(p: dict) -> dict:
    return {key: p[key] for key in ("x", "target", "weights", "biases", "activations")}


def _pass_calls(p: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """Each compiled pass that takes the GEMM route, on the C++ CPU backend, as a call: the uncached product, the
    state of the cached one, the cached product (from a state made beforehand) and the loss with its gradient."""
    layout = dict(weight_offsets=p["weight_offsets"], bias_offsets=p["bias_offsets"])
    state = ops.mlp_hvp_state(**_model(p), backend="cpp")
    return {
        "mlp_hvp_flat": lambda: ops.mlp_hvp_flat(**_model(p), V=p["V"], **layout, backend="cpp"),
        "mlp_hvp_state": lambda: torch.cat([t.reshape(-1) for t in ops.mlp_hvp_state(**_model(p), backend="cpp")]),
        "mlp_hvp_flat_cached": lambda: ops.mlp_hvp_flat_cached(p["x"], state, p["weights"], p["biases"],
                                                               p["activations"], p["V"], **layout, backend="cpp"),
        "mlp_value_grad_flat": lambda: torch.cat([t.reshape(-1).to(p["x"].dtype) for t in
                                                  ops.mlp_value_grad_flat(**_model(p), **layout, backend="cpp")]),
    }


def _passes(p: dict) -> dict[str, torch.Tensor]:
    """The results of :func:`_pass_calls` but the state's: the products, the loss and its gradient."""
    calls = _pass_calls(p)
    value_grad = calls["mlp_value_grad_flat"]()
    return {"mlp_hvp_flat": calls["mlp_hvp_flat"](), "mlp_hvp_flat_cached": calls["mlp_hvp_flat_cached"](),
            "mlp_value_grad_flat value": value_grad[:1].double(), "mlp_value_grad_flat gradient": value_grad[1:]}


def _references(p: dict) -> dict[str, torch.Tensor]:
    """The same results from the pure-PyTorch references (in ``p``'s dtype)."""
    layout = dict(weight_offsets=p["weight_offsets"], bias_offsets=p["bias_offsets"])
    product = ops.mlp_hvp_flat_ref(**_model(p), V=p["V"], **layout)
    value, grad = ops.mlp_value_grad_flat_ref(**_model(p), **layout)
    return {"mlp_hvp_flat": product, "mlp_hvp_flat_cached": product, "mlp_value_grad_flat value": value.reshape(1),
            "mlp_value_grad_flat gradient": grad}


def test_aten_gemm_sets_the_flag_back_after_the_last_of_overlapping_runs():
    # two threads whose runs overlap (B enters while A is inside, and leaves last): the flag is set back to what it
    # was before the first, not to what B saw on entering; an exception inside a run sets it back too
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def a():
        with aten_gemm():
            a_inside.set()
            b_inside.wait(10)
        a_left.set()

    def b():
        a_inside.wait(10)
        with aten_gemm():
            b_inside.set()
            a_left.wait(10)
            seen.append(cpu_gemm())

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["aten"] and torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError, match="inside"), aten_gemm(), aten_gemm():
        raise RuntimeError("inside")
    assert torch.backends.mkldnn.enabled


def _cpuinfo(key: str) -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "")


def _machine_can_take_the_route() -> bool:
    """What csrc/gemm.cpp requires of the machine, read independently of it: x86-64 with AVX-512 BW, VL and DQ (the
    CPU's flags) and a torch built with oneDNN."""
    if platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available():
        return False
    return {"avx512bw", "avx512vl", "avx512dq"} <= set(_cpuinfo("flags").split())


def _machine_takes_the_route() -> bool:
    """Whether the route is this machine's default: it can take it and its CPU is not Intel's."""
    return _machine_can_take_the_route() and _cpuinfo("vendor_id") != "GenuineIntel"


def test_cpu_gemm_names_the_route(monkeypatch):
    assert cpu_gemm() == ("onednn" if _machine_takes_the_route() else "aten")
    with route("onednn"):
        assert cpu_gemm() == ("onednn" if _machine_can_take_the_route() else "aten")
        with route("aten"):  # wins
            assert cpu_gemm() == "aten"
        with route("onednn"):  # nested: the outer run keeps it
            pass
        assert cpu_gemm() == ("onednn" if _machine_can_take_the_route() else "aten")
    with route("aten"):
        assert cpu_gemm() == "aten"
    assert torch.backends.mkldnn.enabled  # set back
    assert cpu_gemm() == ("onednn" if _machine_takes_the_route() else "aten")
    monkeypatch.setattr(_extension, "extension_loaded", lambda: False)
    assert cpu_gemm() == "unavailable"
    with route("onednn"):  # does nothing without the extension
        assert cpu_gemm() == "unavailable"


@pytest.mark.parametrize("name", ROUTES)
def test_float32_passes_on_each_route_meet_the_accuracy_rule(name):
    p32 = _problem(torch.float32)
    exact = _references(_cast(p32, torch.float64))
    plain = _references(p32)
    with route(name):
        outputs = _passes(p32)
    for op, out in outputs.items():
        # the loss is a float64 number computed from float32 logits: held to float32's rule
        assert_within_rule(out.float(), plain[op].float(), exact[op], ulps=16.0)


def _onednn_matmuls(capfd, fn) -> int:
    """How many oneDNN matmuls ``fn()`` ran, from oneDNN's own execution log (torch's verbose mode, on stdout)."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        fn()
    return capfd.readouterr().out.count("primitive,exec,cpu,matmul")


def test_each_pass_takes_the_route_the_machine_has_and_differs_from_atens_in_rounding_only(capfd):
    p32 = _problem(torch.float32)
    lora_args = (torch.randn(1024, 512), torch.randn(256, 512), torch.randn(256), torch.randn(4, 512),
                 torch.randn(256, 4), 0.5)
    calls = {**_pass_calls(p32), "lora_linear": lambda: lora_linear(*lora_args)}
    # where the machine takes the route, each pass runs oneDNN's matmul (oneDNN logs every one it executes); where it
    # does not (an Intel CPU, no AVX-512 BW/VL/DQ, no oneDNN in torch), none does; within onednn_gemm(), each does
    # wherever the CPU can; within aten_gemm(), none does anywhere
    for name, call in calls.items():
        assert (_onednn_matmuls(capfd, call) > 0) == _machine_takes_the_route(), name
        with route("onednn"):
            assert (_onednn_matmuls(capfd, call) > 0) == _machine_can_take_the_route(), name
        with route("aten"):
            assert _onednn_matmuls(capfd, call) == 0, name
    default = _passes(p32)
    with route("onednn"):
        onednn = _passes(p32)
    with route("aten"):
        aten = _passes(p32)
    for op in default:
        scale = aten[op].abs().max()
        assert (default[op] - aten[op]).abs().max() <= 1e-5 * scale, op
        assert (onednn[op] - aten[op]).abs().max() <= 1e-5 * scale, op


def test_float64_passes_take_atens_gemm_on_every_route():
    p64 = _problem(torch.float64, n=700)
    default = _passes(p64)
    with route("onednn"):
        onednn = _passes(p64)
    with route("aten"):
        aten = _passes(p64)
    for op in default:
        assert torch.equal(default[op], aten[op]) and torch.equal(onednn[op], aten[op]), op


@pytest.mark.parametrize("name", ROUTES)
@pytest.mark.parametrize("rows", [200, 1024])  # 200: the rank-r terms apart from the big GEMMs; 1024: merged into W
def test_lora_ops_on_each_route_meet_the_accuracy_rule(name, rows):
    gen = torch.Generator().manual_seed(rows)
    n_in, n_out, rank, scale = 512, 384, 16, 0.75

    def rand(*shape, std=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=gen) * std

    args64 = (rand(rows, n_in), rand(n_out, n_in, std=n_in**-0.5), rand(n_out), rand(rank, n_in, std=n_in**-0.5),
              rand(n_out, rank, std=rank**-0.5), scale)
    tangents64 = (rand(rank, n_in), rand(n_out, rank))
    grad_out64 = rand(rows, n_out)
    args32 = tuple(t.float() if isinstance(t, torch.Tensor) else t for t in args64)
    tangents32, grad_out32 = tuple(t.float() for t in tangents64), grad_out64.float()

    def grads(fn, args, grad_out):  # of x, A and B
        x, weight, bias, a, b, s = args
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        return torch.autograd.grad(fn(leaves[0], weight, bias, leaves[1], leaves[2], s), leaves, grad_out)

    def exact(x, weight, bias, a, b, s):  # written out, independent of the package
        return x @ (weight + s * b @ a).T + bias

    with route(name):
        out = lora_linear(*args32)
        got_grads = grads(lora_linear, args32, grad_out32)
        jvp_out, tangent = lora_linear_jvp(*args32, *tangents32)
    assert_within_rule(out, lora_linear_ref(*args32), exact(*args64))
    for got, plain, want in zip(got_grads, grads(lora_linear_ref, args32, grad_out32),
                                grads(exact, args64, grad_out64)):
        assert_within_rule(got, plain, want)
    x, weight, bias, a, b, s = args64
    _, exact_tangent = torch.func.jvp(lambda a_, b_: exact(x, weight, bias, a_, b_, s), (a, b), tangents64)
    plain_out, plain_tangent = lora_linear_jvp_ref(*args32, *tangents32)
    assert_within_rule(jvp_out, plain_out, exact(*args64))
    assert_within_rule(tangent, plain_tangent, exact_tangent)


@pytest.mark.parametrize("shape", [(1, 1024), (1, 1, 1024)])
def test_lora_layer_of_one_row_leaves_the_bias_alone(shape):
    # one row of a 1024 -> 1024 layer is above the oneDNN route's threshold, and the bias expanded to one row is the
    # bias itself: the output must be a buffer of its own (the GEMM adds into it), not the caller's bias
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(*shape, generator=gen), torch.randn(1024, 1024, generator=gen) / 32
    bias, lora_a, lora_b = torch.randn(1024, generator=gen), torch.randn(4, 1024, generator=gen) / 32, \
        torch.randn(1024, 4, generator=gen)
    kept = bias.clone()
    exact = x.double() @ (weight.double() + 0.5 * lora_b.double() @ lora_a.double()).T + bias.double()
    for call in (lambda: lora_linear(x, weight, bias, lora_a, lora_b, 0.5),
                 lambda: lora_linear_jvp(x, weight, bias, lora_a, lora_b, 0.5, torch.ones_like(lora_a), None)[0]):
        first, second = call(), call()
        assert torch.equal(bias, kept) and first.data_ptr() != bias.data_ptr()
        assert torch.equal(first, second)
        assert (first.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


# ----------------------------------------------------------------------------- the gemm op
GEMM_BACKENDS = ("cpp", "reference")


@pytest.mark.parametrize("name", ROUTES)
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("shape, transposed, with_bias", [
    ((1536, 128, 64), False, True),  # 12.6 M multiply-adds: above the route's threshold
    ((4160, 64, 192), True, False),  # a transposed a (a gradient's x^T g)
    ((7, 5, 3), False, True),  # below it: ATen's GEMM on every route
])
def test_gemm_meets_the_accuracy_rule(name, backend, shape, transposed, with_bias):
    gen = torch.Generator().manual_seed(4)
    m, k, n = shape
    a64 = torch.randn(k, m, generator=gen, dtype=torch.float64).T if transposed else \
        torch.randn(m, k, generator=gen, dtype=torch.float64)
    b64 = torch.randn(k, n, generator=gen, dtype=torch.float64)
    bias64 = torch.randn(n, generator=gen, dtype=torch.float64) if with_bias else None
    a, b = a64.float(), b64.float()
    bias = None if bias64 is None else bias64.float()
    with route(name):
        out = ops.gemm(a, b, bias, backend=backend)
    assert_within_rule(out, ops.gemm_ref(a, b, bias), ops.gemm_ref(a64, b64, bias64))
    assert_within_rule(ops.gemm(a64, b64, bias64, backend=backend), ops.gemm_ref(a64, b64, bias64),
                       ops.gemm_ref(a64, b64, bias64))


def test_gemm_takes_the_route_the_machine_has(capfd):
    a, b = torch.randn(1536, 128), torch.randn(128, 64)
    assert (_onednn_matmuls(capfd, lambda: ops.gemm(a, b)) > 0) == _machine_takes_the_route()
    with route("onednn"):
        assert (_onednn_matmuls(capfd, lambda: ops.gemm(a, b)) > 0) == _machine_can_take_the_route()
    with route("aten"):
        assert _onednn_matmuls(capfd, lambda: ops.gemm(a, b)) == 0
    assert _onednn_matmuls(capfd, lambda: ops.gemm(a[:6, :5], b[:5, :4])) == 0  # below the threshold


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_gemm_derivatives(backend):
    """First and second derivatives against finite differences (the C++ op's backward is the op again)."""
    gen = torch.Generator().manual_seed(5)
    a, b, bias = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                  for s in ((6, 5), (5, 4), (4,)))

    def fn(a, b, bias):
        return ops.gemm(a, b, bias, backend=backend)

    assert torch.autograd.gradcheck(fn, (a, b, bias))
    assert torch.autograd.gradgradcheck(fn, (a, b, bias))
    assert torch.autograd.gradcheck(lambda a, b: ops.gemm(a, b, backend=backend), (a, b))


def test_gemm_opcheck():
    a, b, bias = torch.randn(6, 5, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.randn(4)
    torch.library.opcheck(torch.ops.unlearn_kernels.gemm.default, (a, b, bias))
    torch.library.opcheck(torch.ops.unlearn_kernels.gemm.default, (a, b, None))


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 4), torch.randn(4)), ValueError, "a and b must be 2-D"),
    ((torch.randn(3, 4), torch.randn(5, 2)), ValueError, "a's columns must match b's rows"),
    ((torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64)), ValueError, "one floating dtype"),
    ((torch.ones(3, 4, dtype=torch.long), torch.ones(4, 2, dtype=torch.long)), ValueError, "one floating dtype"),
    ((torch.randn(3, 4), torch.randn(4, 2), torch.randn(3)), ValueError, r"bias must be a \(2,\) tensor"),
    ((torch.randn(3, 4), [[1.0, 2.0]] * 4), TypeError, "b must be a torch.Tensor"),
    ((None, torch.randn(4, 2)), TypeError, "a must be a torch.Tensor"),
])
def test_gemm_refuses_bad_input(backend, args, error, match):
    with pytest.raises(error, match=match):
        ops.gemm(*args, backend=backend)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3, 4), torch.randn(5, 2), None), "a's columns must match b's rows"),
    ((torch.randn(3, 4), torch.randn(4, 2), torch.randn(2, 1)), r"bias must be a \(2,\) CPU tensor"),
])
def test_gemm_cpp_op_checks_its_own_input(args, match):
    """Callers of the registered op itself get the same checks from the C++ kernel."""
    with pytest.raises(ValueError, match=match):
        torch.ops.unlearn_kernels.gemm(*args)


def test_gemm_auto_on_every_device(device):
    """"auto" runs the C++ kernel on the CPU and the reference (cuBLAS) on a GPU; both against float64."""
    gen = torch.Generator().manual_seed(8)
    a64, b64, bias64 = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((1536, 128), (128, 64), (64,)))
    a, b, bias = (t.float().to(device) for t in (a64, b64, bias64))
    out = ops.gemm(a, b, bias)
    assert out.device == a.device
    assert_within_rule(out.cpu(), ops.gemm_ref(a, b, bias).cpu(), ops.gemm_ref(a64, b64, bias64))
    if device.type != "cpu":
        with pytest.raises(BackendUnavailableError, match="gemm"):
            ops.gemm(a, b, bias, backend="cpp")


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_gemm_forward_mode_and_torch_func(backend):
    """Forward-mode tangents and torch.func's transforms get the product's derivatives (the registered op has a
    backward only: they run the reference), not a zero tangent."""
    gen = torch.Generator().manual_seed(9)
    a, da, b, db = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((6, 5), (6, 5), (5, 4), (5, 4)))
    expected = da @ b + a @ db
    tangent = torch.func.jvp(lambda a, b: ops.gemm(a, b, backend=backend), (a, b), (da, db))[1]
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)
    with forward_ad.dual_level():
        out = ops.gemm(forward_ad.make_dual(a, da), forward_ad.make_dual(b, db), backend=backend)
        torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, expected, rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda a: ops.gemm(a, b, backend=backend).square().sum())(a)
    torch.testing.assert_close(grad, 2 * (a @ b) @ b.T, rtol=1e-12, atol=1e-12)


def test_gemm_keeps_only_what_its_backward_reads():
    """As torch.mm: b is kept where a needs a gradient, a where b does (a frozen layer keeps no input copy)."""
    x, w = torch.randn(5, 4), torch.randn(4, 3)
    saved = lambda out: [None if t is None else t.shape for t in out.grad_fn.saved_tensors]  # noqa: E731
    assert saved(ops.gemm(x, w.requires_grad_())) == [x.shape, None]
    assert saved(ops.gemm(x.requires_grad_(), w.detach())) == [None, w.shape]


@pytest.mark.parametrize("name", ROUTES)
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_batched_gemm_meets_the_accuracy_rule(name, backend, capfd):
    """A batch of products (attention's shapes: 256 heads x 65 tokens x 16), on oneDNN's route where the machine
    has it."""
    gen = torch.Generator().manual_seed(10)
    a64, b64 = torch.randn(256, 65, 16, generator=gen, dtype=torch.float64), \
        torch.randn(256, 65, 16, generator=gen, dtype=torch.float64).mT  # a transposed batch, as k^T
    a, b = a64.float(), b64.float()
    with route(name):
        out = ops.gemm(a, b, backend=backend)
        matmuls = _onednn_matmuls(capfd, lambda: ops.gemm(a, b, backend=backend))
    assert_within_rule(out, ops.gemm_ref(a, b), ops.gemm_ref(a64, b64))
    takes = {"default": _machine_takes_the_route(), "onednn": _machine_can_take_the_route(), "aten": False}[name]
    assert (matmuls > 0) == (backend == "cpp" and takes)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_batched_gemm_derivatives(backend):
    gen = torch.Generator().manual_seed(11)
    a, b = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((3, 4, 5), (3, 5, 2)))
    fn = lambda a, b: ops.gemm(a, b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b)) and torch.autograd.gradgradcheck(fn, (a, b))
    torch.library.opcheck(torch.ops.unlearn_kernels.gemm.default, (a.float(), b.float(), None))


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 3, 4), torch.randn(3, 4, 5)), "3-D with one batch size"),
    ((torch.randn(2, 3, 4), torch.randn(4, 5)), "3-D with one batch size"),
    ((torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(5)), "a bias needs 2-D a and b"),
])
def test_batched_gemm_refuses_bad_input(backend, args, match):
    with pytest.raises(ValueError, match=match):
        ops.gemm(*args, backend=backend)
    with pytest.raises(ValueError, match=match):
        torch.ops.unlearn_kernels.gemm(*args, *([None] if len(args) == 2 else []))
