"""ops.softmax_double_backward: softmax's second derivatives over the last dim, (d gy, d y) of <ggx, gx> for its
backward gx = y (gy - sum(gy y)); the C++ kernel and the reference held to float64 under the accuracy rule on every
device, its derivatives to finite differences, and its refusals of bad input."""
from __future__ import annotations

import pytest
import torch
from devices import backend_devices
from forward_mode import assert_forward_mode_runs_the_reference
from tolerance import assert_within_rule

from unlearn_kernels import ops
from unlearn_kernels.backends import BackendUnavailableError

PAIRS = backend_devices("softmax_double_backward")


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(gy, y, ggx) in float64: y a softmax's output over the last dim, gy and ggx Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    gy, logits, ggx = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))
    return gy, torch.softmax(3 * logits, -1), ggx


def _from_torch(gy: torch.Tensor, y: torch.Tensor, ggx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gy, d y) by torch's own double backward of ``_softmax_backward_data``: an independent oracle."""
    gy, y = gy.clone().requires_grad_(), y.clone().requires_grad_()
    gx = torch._softmax_backward_data(gy, y, -1, y.dtype)
    return torch.autograd.grad(gx, (gy, y), ggx)


def test_reference_is_torchs_double_backward():
    gy, y, ggx = _inputs((4, 3, 17))
    for ours, torchs in zip(ops.softmax_double_backward_ref(gy, y, ggx), _from_torch(gy, y, ggx)):
        torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend, device", PAIRS)
@pytest.mark.parametrize("shape", [(5,), (3, 1), (6, 7), (2, 3, 8), (4, 16), (64, 4, 65), (3, 100), (0, 5), (4, 0)])
def test_meets_the_accuracy_rule(backend, device, shape):
    """Rows shorter, equal to and longer than a vector (and partial vectors), one-row and empty tensors."""
    gy64, y64, ggx64 = _inputs(shape)
    exact = ops.softmax_double_backward_ref(gy64, y64, ggx64)
    for dtype in (torch.float32, torch.float64):
        gy, y, ggx = (t.to(device, dtype) for t in (gy64, y64, ggx64))
        outs = ops.softmax_double_backward(gy, y, ggx, backend=backend)
        plains = ops.softmax_double_backward_ref(gy, y, ggx)
        for out, plain, ref in zip(outs, plains, exact):
            assert out.device == gy.device
            assert_within_rule(out.cpu(), plain.cpu(), ref)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_strided_inputs(backend, device):
    """Transposed and sliced views are read as the tensors they are."""
    gy, y, ggx = (t.to(device) for t in _inputs((9, 6, 2)))
    views = [t.transpose(0, 1) for t in (gy, y, ggx)]
    expected = ops.softmax_double_backward_ref(*(v.contiguous() for v in views))
    for out, ref in zip(ops.softmax_double_backward(*views, backend=backend), expected):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    sliced = [t[:, 1:5, 0] for t in (gy, y, ggx)]
    for out, ref in zip(ops.softmax_double_backward(*sliced, backend=backend),
                        ops.softmax_double_backward_ref(*(s.contiguous() for s in sliced))):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_derivatives(backend, device):
    """First and second derivatives of the op against finite differences (its backward is written in torch ops)."""
    gy, y, ggx = (t.to(device).requires_grad_() for t in _inputs((2, 3, 5), seed=1))

    def fn(gy, y, ggx):
        return ops.softmax_double_backward(gy, y, ggx, backend=backend)

    assert torch.autograd.gradcheck(fn, (gy, y, ggx))
    assert torch.autograd.gradgradcheck(fn, (gy, y, ggx))


def test_opcheck():
    """Also on transposed and channels-last inputs: the fake kernel's outputs are contiguous, as the C++ kernel's."""
    gy, y, ggx = (t.float().requires_grad_() for t in _inputs((3, 4, 9), seed=2))
    torch.library.opcheck(torch.ops.unlearn_kernels.softmax_double_backward.default, (gy, y, ggx))
    gy, y, ggx = (t.float() for t in _inputs((7, 3), seed=3))
    torch.library.opcheck(torch.ops.unlearn_kernels.softmax_double_backward.default, (gy.T, y.T, ggx.T))
    gy, y, ggx = (t.float().contiguous(memory_format=torch.channels_last) for t in _inputs((2, 3, 4, 5), seed=4))
    torch.library.opcheck(torch.ops.unlearn_kernels.softmax_double_backward.default, (gy, y, ggx))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_forward_mode_and_torch_func(backend):
    """Forward-mode tangents and torch.func's transforms get the op's derivatives (the registered op has a backward
    only: they run the reference), not a zero tangent."""
    assert_forward_mode_runs_the_reference(
        lambda *a: ops.softmax_double_backward(*a, backend=backend), ops.softmax_double_backward_ref,
        _inputs((3, 7), seed=3), _inputs((3, 7), seed=4), atol=1e-14)


def test_auto_on_every_device(device):
    """"auto" runs the C++ kernel on float32/float64 CPU tensors and the reference elsewhere (GPUs, bfloat16)."""
    gy, y, ggx = (t.float().to(device) for t in _inputs((8, 33), seed=5))
    for out, ref in zip(ops.softmax_double_backward(gy, y, ggx), ops.softmax_double_backward_ref(gy, y, ggx)):
        assert out.device == gy.device
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    low = [t.bfloat16() for t in (gy, y, ggx)]
    for out, ref in zip(ops.softmax_double_backward(*low), ops.softmax_double_backward_ref(*low)):
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    if device.type != "cpu":
        with pytest.raises(BackendUnavailableError, match="softmax_double_backward"):
            ops.softmax_double_backward(gy, y, ggx, backend="cpp")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5)), ValueError, "must have one shape"),
    ((torch.randn(()), torch.randn(()), torch.randn(())), ValueError, "at least one dim"),
    ((torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4)), ValueError, "one floating dtype"),
    ((torch.ones(3, 4, dtype=torch.long),) * 3, ValueError, "one floating dtype"),
    ((torch.randn(3, 4), [[0.25] * 4] * 3, torch.randn(3, 4)), TypeError, "y must be a torch.Tensor"),
    ((torch.randn(3, 4).to_sparse(),) * 3, TypeError, "gy must be a dense"),
])
def test_refuses_bad_input(backend, args, error, match):
    with pytest.raises(error, match=match):
        ops.softmax_double_backward(*args, backend=backend)


def test_cpp_refuses_dtypes_it_has_no_kernel_for():
    low = [torch.randn(3, 4).bfloat16() for _ in range(3)]
    with pytest.raises(BackendUnavailableError, match="takes float32 and float64, got torch.bfloat16"):
        ops.softmax_double_backward(*low, backend="cpp")


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5)), "must have one shape"),
    ((torch.randn(3, 4).bfloat16(),) * 3, "one of float32 and float64"),
])
def test_cpp_op_checks_its_own_input(args, match):
    """Callers of the registered op itself get the same checks from the C++ kernel."""
    with pytest.raises(ValueError, match=match):
        torch.ops.unlearn_kernels.softmax_double_backward(*args)


def test_fake_kernel_checks_its_input():
    """Tracing (fake or meta tensors) refuses what the kernel refuses: tensors on two devices."""
    cpu, meta = torch.randn(2, 3), torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.unlearn_kernels.softmax_double_backward(cpu, meta, cpu)
