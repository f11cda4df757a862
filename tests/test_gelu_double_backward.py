"""ops.gelu_double_backward: GELU's second derivatives, (d gy, d x) = (ggx f'(x), ggx gy f''(x)) for its backward
gx = gy f'(x), exact and tanh-approximated; the C++ kernel and the reference held to float64 under the accuracy rule
on every device, against torch's own double backward, its derivatives to finite differences, and its refusals of bad
input."""
from __future__ import annotations

import pytest
import torch
from devices import backend_devices
from forward_mode import assert_forward_mode_runs_the_reference
from tolerance import assert_within_rule

from unlearn_kernels import ops
from unlearn_kernels.backends import BackendUnavailableError

PAIRS = backend_devices("gelu_double_backward")
APPROXIMATIONS = ("none", "tanh")


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(gy, x, ggx) in float64, x spread over [-6, 6] and beyond."""
    gen = torch.Generator().manual_seed(seed)
    gy, x, ggx = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    return gy, 3 * x, ggx


def _from_torch(gy, x, ggx, approximate) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gy, d x) by torch's own double backward of its GELU backward: an independent oracle."""
    gy, x = gy.clone().requires_grad_(), x.clone().requires_grad_()
    gx = torch.ops.aten.gelu_backward(gy, x, approximate=approximate)
    return torch.autograd.grad(gx, (gy, x), ggx)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_reference_is_torchs_double_backward(approximate):
    args = _inputs((6, 33))
    for ours, torchs in zip(ops.gelu_double_backward_ref(*args, approximate), _from_torch(*args, approximate)):
        torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", [(), (5,), (3, 17), (64, 65, 128), (0, 3)])
def test_meets_the_accuracy_rule(backend, device, approximate, shape):
    """One element, partial vectors, the small ViT's hidden layer (four tasks of the parallel loop), no element. The
    kernel's vectorized erf, exp and tanh are within a few units in the last place of libm's, which the plain float32
    reference takes on a lone element: 16 units of the output scale where 4 serve the other ops."""
    args64 = _inputs(shape)
    exact = ops.gelu_double_backward_ref(*args64, approximate)
    for dtype in (torch.float32, torch.float64):
        args = [t.to(device, dtype) for t in args64]
        outs = ops.gelu_double_backward(*args, approximate, backend=backend)
        for out, plain, ref in zip(outs, ops.gelu_double_backward_ref(*args, approximate), exact):
            assert out.device == args[0].device and out.dtype == dtype
            assert_within_rule(out.cpu(), plain.cpu(), ref, ulps=16.0)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_every_element_accurate_over_the_range(backend, device, approximate):
    """Element by element over [-8, 8] (float32): within 4 float32 eps of the float64 values (the scale of f' and
    f'' is 1). 1 - tanh(u)^2 computed as 1 - t * t cancelled to 0 at |x| ~ 5, 57 eps off (found by review r4)."""
    x = torch.linspace(-8, 8, 16001, dtype=torch.float32, device=device)
    one = torch.ones_like(x)
    exact = ops.gelu_double_backward_ref(one.double(), x.double(), one.double(), approximate)
    for out, ref in zip(ops.gelu_double_backward(one, x, one, approximate, backend=backend), exact):
        assert float((out.double() - ref).abs().max()) <= 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_extreme_inputs(backend, device, approximate):
    """Huge finite x: f' is 1 or 0 and f'' is 0 (x u'^2 overflowed into 0 * Inf = NaN before the clamp: review r4);
    an Inf or NaN x gives NaN, as torch's own double backward."""
    x = torch.tensor([1e9, -1e9, 1e30, -1e30, 40.0, -40.0, float("inf"), -float("inf"), float("nan")], device=device)
    one = torch.ones_like(x)
    d_gy, d_x = ops.gelu_double_backward(one, x, one, approximate, backend=backend)
    assert d_gy[:6].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] and d_x[:6].abs().max() == 0
    assert d_gy[6:].isnan().all() and d_x[6:].isnan().all()
    xt, gt = x[6:].clone().requires_grad_(), one[6:].clone().requires_grad_()
    torchs = torch.autograd.grad(torch.ops.aten.gelu_backward(gt, xt, approximate=approximate), (gt, xt), one[6:])
    assert all(t.isnan().all() for t in torchs)
    half = ops.gelu_double_backward(*(t.half() for t in (one[:6], x[:6].clamp(-30, 30), one[:6])), approximate)
    assert not any(t.isnan().any() for t in half)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_strided_inputs(backend, device):
    gy, x, ggx = (t.to(device).transpose(0, 1) for t in _inputs((9, 6, 2)))
    for out, ref in zip(ops.gelu_double_backward(gy, x, ggx, backend=backend),
                        ops.gelu_double_backward_ref(gy.contiguous(), x.contiguous(), ggx.contiguous())):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_derivatives(backend, device, approximate):
    """First and second derivatives of the op against finite differences, through the wrapper and through the
    registered op called directly (whose backward differentiates the reference)."""
    args = [t.to(device).requires_grad_() for t in _inputs((3, 5), seed=1)]
    assert torch.autograd.gradcheck(lambda *a: ops.gelu_double_backward(*a, approximate, backend=backend), args)
    assert torch.autograd.gradgradcheck(lambda *a: ops.gelu_double_backward(*a, approximate, backend=backend), args)
    if backend == "cpp":
        raw = torch.ops.unlearn_kernels.gelu_double_backward
        assert torch.autograd.gradcheck(lambda *a: raw(*a, approximate), args)
        assert torch.autograd.gradgradcheck(lambda *a: raw(*a, approximate), args)


def test_opcheck():
    """Also on transposed inputs: the fake kernel's outputs are contiguous, as the C++ kernel's."""
    gy, x, ggx = (t.float().requires_grad_() for t in _inputs((3, 4, 9), seed=2))
    torch.library.opcheck(torch.ops.unlearn_kernels.gelu_double_backward.default, (gy, x, ggx, "none"))
    gy, x, ggx = (t.float().T for t in _inputs((7, 3), seed=3))
    torch.library.opcheck(torch.ops.unlearn_kernels.gelu_double_backward.default, (gy, x, ggx, "tanh"))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_forward_mode_and_torch_func(backend):
    """Forward-mode tangents and torch.func's transforms get the op's derivatives (the reference runs), not a zero
    tangent."""
    assert_forward_mode_runs_the_reference(
        lambda *a: ops.gelu_double_backward(*a, backend=backend), ops.gelu_double_backward_ref,
        _inputs((3, 7), seed=3), _inputs((3, 7), seed=4), atol=1e-12)


def test_auto_on_every_device(device):
    """"auto" runs the C++ kernel on float32/float64 CPU tensors and the reference elsewhere (GPUs, bfloat16)."""
    args = [t.float().to(device) for t in _inputs((8, 33), seed=5)]
    for out, ref in zip(ops.gelu_double_backward(*args), ops.gelu_double_backward_ref(*args)):
        assert out.device == args[0].device
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    low = [t.bfloat16() for t in args]
    for out, ref in zip(ops.gelu_double_backward(*low), ops.gelu_double_backward_ref(*low)):
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    if device.type != "cpu":
        with pytest.raises(BackendUnavailableError, match="gelu_double_backward"):
            ops.gelu_double_backward(*args, backend="cpp")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5)), ValueError, "must have one shape"),
    ((torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4)), ValueError, "one floating dtype"),
    ((torch.ones(3, 4, dtype=torch.long),) * 3, ValueError, "one floating dtype"),
    ((torch.randn(3, 4), [[0.5] * 4] * 3, torch.randn(3, 4)), TypeError, "x must be a torch.Tensor"),
    ((torch.randn(3, 4),) * 3 + ("erf",), ValueError, "approximate must be 'none' or 'tanh', got 'erf'"),
    ((torch.randn(3, 4).to_sparse(),) * 3, TypeError, "gy must be a dense"),
])
def test_refuses_bad_input(backend, args, error, match):
    with pytest.raises(error, match=match):
        ops.gelu_double_backward(*args, backend=backend)


def test_cpp_refuses_dtypes_it_has_no_kernel_for():
    with pytest.raises(BackendUnavailableError, match="takes float32 and float64, got torch.bfloat16"):
        ops.gelu_double_backward(*[torch.randn(3, 4).bfloat16() for _ in range(3)], backend="cpp")


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5), "none"), "must have one shape"),
    ((torch.randn(3, 4).bfloat16(),) * 3 + ("none",), "one of float32 and float64"),
    ((torch.randn(3, 4),) * 3 + ("erf",), "approximate must be 'none' or 'tanh'"),
])
def test_cpp_op_checks_its_own_input(args, match):
    """Callers of the registered op itself get the same checks from the C++ kernel."""
    with pytest.raises(ValueError, match=match):
        torch.ops.unlearn_kernels.gelu_double_backward(*args)


def test_fake_kernel_checks_its_input():
    """Tracing (fake or meta tensors) refuses what the kernel refuses: tensors on two devices (review r4)."""
    cpu, meta = torch.randn(3), torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.unlearn_kernels.gelu_double_backward(cpu, meta, cpu, "none")
