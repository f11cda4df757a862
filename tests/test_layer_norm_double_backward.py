"""ops.layer_norm_double_backward: a layer norm's second derivatives over the last dim, (d gy, d x, d w) of
<ggx, gx> + <ggw, gw> + <ggb, gb> for its backward; the C++ kernel and the reference held to float64 under the
accuracy rule on every device, against torch's own double backward, its derivatives to finite differences, and its
refusals of bad input."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from devices import backend_devices
from forward_mode import assert_forward_mode_runs_the_reference
from tolerance import assert_within_rule

from unlearn_kernels import ops
from unlearn_kernels.backends import BackendUnavailableError

PAIRS = backend_devices("layer_norm_double_backward")
EPS = 1e-5


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(gy, x, weight, ggx, ggw, ggb) in float64; x with rows of unequal means and spreads."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    gy, ggx = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + torch.randn(*shape[:-1], 1, generator=gen,
                                                                                   dtype=torch.float64)
    weight, ggw, ggb = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3))
    return gy, x, weight, ggx, ggw, ggb


def _from_torch(gy, x, weight, ggx, ggw, ggb) -> tuple[torch.Tensor, ...]:
    """(d gy, d x, d w) by torch's own double backward of F.layer_norm: an independent oracle."""
    gy, x, weight = (t.clone().requires_grad_() for t in (gy, x, weight))
    bias = torch.zeros_like(weight, requires_grad=True)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)
    grads = torch.autograd.grad(y, (x, weight, bias), gy, create_graph=True)
    return torch.autograd.grad(grads, (gy, x, weight), (ggx, ggw, ggb))


@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 64), (4, 1)])
def test_reference_is_torchs_double_backward(shape):
    args = _inputs(shape)
    for ours, torchs in zip(ops.layer_norm_double_backward_ref(*args, EPS), _from_torch(*args)):
        torch.testing.assert_close(ours, torchs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("shape", [(5,), (3, 1), (6, 7), (2, 3, 8), (4, 16), (4160, 64), (3, 100), (0, 5)])
def test_meets_the_accuracy_rule(backend, device, shape):
    """Rows shorter, equal to and longer than a vector (and partial vectors), one value a row, many rows (the small
    ViT's: d w sums 4,160 of them) and no rows."""
    args64 = _inputs(shape)
    exact = ops.layer_norm_double_backward_ref(*args64, EPS)
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device, dtype) for t in args64]
        outs = ops.layer_norm_double_backward(*args, EPS, backend=backend)
        plains = ops.layer_norm_double_backward_ref(*args, EPS)
        for out, plain, ref in zip(outs, plains, exact):
            assert out.device == args[0].device and out.dtype == dtype
            assert_within_rule(out.cpu(), plain.cpu(), ref)



def test_the_reference_on_no_rows_warns_of_nothing():
    """No rows: empty d gy and d x, a zero d w, and no warning (var() warned "degrees of freedom <= 0")."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d_gy, d_x, d_w = ops.layer_norm_double_backward_ref(*_inputs((0, 5)), EPS)
    assert d_gy.shape == d_x.shape == (0, 5) and torch.equal(d_w, torch.zeros(5, dtype=torch.float64))

@pytest.mark.parametrize("backend, device", PAIRS)
def test_strided_inputs_and_threads(backend, device):
    """Transposed views are read as the tensors they are; two threads give the one-thread result (to rounding: d w's
    row sums are split between them)."""
    gy, x, weight, ggx, ggw, ggb = (t.to(device) for t in _inputs((2000, 2, 24)))
    views = [t.transpose(0, 1) for t in (gy, x, ggx)]
    expected = ops.layer_norm_double_backward_ref(views[0].contiguous(), views[1].contiguous(), weight,
                                                  views[2].contiguous(), ggw, ggb, EPS)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outs = ops.layer_norm_double_backward(views[0], views[1], weight, views[2], ggw, ggb, EPS, backend=backend)
            for out, ref in zip(outs, expected):
                torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_derivatives(backend, device):
    """Where a graph is recorded the reference runs, whose statistics come from x: first and second derivatives
    against finite differences."""
    args = [t.to(device).requires_grad_() for t in _inputs((3, 5), seed=1)]

    def fn(*args):
        return ops.layer_norm_double_backward(*args, EPS, backend=backend)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_registered_op_called_directly_is_differentiable():
    """The C++ op called through torch.ops (no wrapper) with inputs that need a gradient: its registered backward
    differentiates the reference (first and second derivatives against finite differences)."""
    args = [t.requires_grad_() for t in _inputs((3, 5), seed=6)]

    def fn(*args):
        return torch.ops.unlearn_kernels.layer_norm_double_backward(*args, EPS)

    assert type(fn(*args)[1].grad_fn).__name__ != "CppFunction"
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_opcheck():
    """Also on transposed inputs: the fake kernel's outputs are contiguous, as the C++ kernel's."""
    args = [t.float() for t in _inputs((3, 4, 9), seed=2)]
    torch.library.opcheck(torch.ops.unlearn_kernels.layer_norm_double_backward.default, (*args, EPS))
    gy, x, weight, ggx, ggw, ggb = (t.float() for t in _inputs((5, 2, 6), seed=3))
    views = [t.transpose(0, 1) for t in (gy, x, ggx)]
    torch.library.opcheck(torch.ops.unlearn_kernels.layer_norm_double_backward.default,
                          (views[0], views[1], weight, views[2], ggw, ggb, EPS))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_forward_mode_and_torch_func(backend):
    """Forward-mode tangents and torch.func's transforms get the op's derivatives (the reference runs), not a zero
    tangent."""
    assert_forward_mode_runs_the_reference(
        lambda *a: ops.layer_norm_double_backward(*a, EPS, backend=backend),
        lambda *a: ops.layer_norm_double_backward_ref(*a, EPS), _inputs((3, 7), seed=3), _inputs((3, 7), seed=4),
        atol=1e-12)


def test_auto_on_every_device(device):
    """"auto" runs the C++ kernel on float32/float64 CPU tensors and the reference elsewhere (GPUs, bfloat16)."""
    args = [t.float().to(device) for t in _inputs((8, 33), seed=5)]
    for out, ref in zip(ops.layer_norm_double_backward(*args, EPS), ops.layer_norm_double_backward_ref(*args, EPS)):
        assert out.device == args[0].device
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    low = [t.bfloat16() for t in args]
    for out, ref in zip(ops.layer_norm_double_backward(*low, EPS), ops.layer_norm_double_backward_ref(*low, EPS)):
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    if device.type != "cpu":
        with pytest.raises(BackendUnavailableError, match="layer_norm_double_backward"):
            ops.layer_norm_double_backward(*args, EPS, backend="cpp")


def _bad(change: dict) -> list:
    """The six tensors and eps of a valid call, with some replaced."""
    args = dict(zip(("gy", "x", "weight", "ggx", "ggw", "ggb"), (t.float() for t in _inputs((3, 4)))), eps=EPS)
    args.update(change)
    return list(args.values())


# A last dim of 0: the C++ kernel returned empty results where the reference raised torch's reshape error.
_NO_FEATURES = dict(gy=torch.randn(3, 0), x=torch.randn(3, 0), weight=torch.randn(0), ggx=torch.randn(3, 0),
                    ggw=torch.randn(0), ggb=torch.randn(0))
_NO_FEATURES_MESSAGE = (r"^layer_norm_double_backward: x's last dim must be at least 1 \(a layer norm over 0 features "
                        r"is undefined\), got shape \[3, 0\]$")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("change, error, match", [
    ({"ggx": torch.randn(3, 5)}, ValueError, "gy, x and ggx must have one shape"),
    ({"gy": torch.randn(()), "x": torch.randn(()), "ggx": torch.randn(())}, ValueError, "at least one dim"),
    (_NO_FEATURES, ValueError, _NO_FEATURES_MESSAGE),
    ({"weight": torch.randn(5)}, ValueError, r"must be \(4,\) tensors"),
    ({"ggb": torch.randn(4, 1)}, ValueError, r"must be \(4,\) tensors"),
    ({"ggw": torch.randn(4, dtype=torch.float64)}, ValueError, "one floating dtype, got .*ggw torch.float64"),
    ({"eps": -1.0}, ValueError, "eps must be a number >= 0"),
    ({"eps": True}, ValueError, "eps must be a number >= 0"),
    ({"x": [[0.5] * 4] * 3}, TypeError, "x must be a torch.Tensor"),
    ({"x": torch.randn(3, 4).to_sparse()}, TypeError, "x must be a dense"),
])
def test_refuses_bad_input(backend, change, error, match):
    with pytest.raises(error, match=match):
        ops.layer_norm_double_backward(*_bad(change), backend=backend)


def test_cpp_refuses_dtypes_it_has_no_kernel_for():
    with pytest.raises(BackendUnavailableError, match="takes float32 and float64, got torch.bfloat16"):
        ops.layer_norm_double_backward(*[t.bfloat16() for t in _bad({})[:6]], EPS, backend="cpp")


@pytest.mark.parametrize("change, match", [
    ({"ggx": torch.randn(3, 5)}, "must have one shape"),
    ({"weight": torch.randn(5)}, r"must be \(4,\) tensors"),
    (_NO_FEATURES, _NO_FEATURES_MESSAGE),
    ({"x": torch.randn(3, 4, dtype=torch.float64)}, "every tensor must be float32"),
    ({"eps": -1.0}, "eps must be >= 0"),
])
def test_cpp_op_checks_its_own_input(change, match):
    """Callers of the registered op itself get the same checks from the C++ kernel."""
    with pytest.raises(ValueError, match=match):
        torch.ops.unlearn_kernels.layer_norm_double_backward(*_bad(change))


def test_fake_kernel_checks_its_input():
    """Tracing (fake or meta tensors) refuses what the kernel refuses: tensors on two devices."""
    cpu, meta, row = torch.randn(2, 3), torch.empty(2, 3, device="meta"), torch.randn(3)
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.unlearn_kernels.layer_norm_double_backward(cpu, meta, row, cpu, row, row, EPS)
