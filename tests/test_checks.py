"""The shared argument checks of unlearn_kernels.checks, through the ops that use them: a sparse
tensor and an integer too large for a float get one clear error on every backend."""
import pytest
import torch

from devices import backend_devices
from unlearn_kernels.checks import check_number, check_tensor
from unlearn_kernels.ops import cubic_secular_solve, lanczos_step, lora_linear, mlp_hvp, softmax_ce_grad


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_check_tensor_refuses_a_sparse_tensor():
    dense = torch.eye(3)
    assert check_tensor("x", dense) is dense
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"x must be a dense tensor, got layout torch\.sparse_c"):
            check_tensor("x", sparse)


@pytest.mark.parametrize("value", [2**2000, -(2**2000)], ids=["2**2000", "-2**2000"])
def test_check_number_refuses_an_int_beyond_a_float(value):
    """It raised OverflowError from math.isfinite instead of naming the argument."""
    with pytest.raises(ValueError, match=r"^M must be a finite number > 0\.0, got -?\d+\.\.\.\d+$"):
        check_number("M", value, 0.0, strict=True)


def _sparse_calls(device):
    """(op name, call with one sparse argument) for every op, on ``device``."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float64):
        return torch.randn(*shape, dtype=dtype, generator=gen).to(device)

    q = t(6)
    q = q / q.norm()
    logits, target = t(4, 3), torch.tensor([0, 2, 1, 0], device=device)
    x, w, a, b = t(4, 5), t(3, 5), t(2, 5), t(3, 2)
    return {
        "softmax_ce_grad": lambda backend: softmax_ce_grad(logits.to_sparse(), target, backend=backend),
        "lanczos_step": lambda backend: lanczos_step(t(6), q, None, 0.0, t(2, 6).to_sparse(), backend=backend),
        "cubic_secular_solve": lambda backend: cubic_secular_solve(t(4).to_sparse(), t(4), 1.0, backend=backend),
        "lora_linear": lambda backend: lora_linear(x.to_sparse(), w, None, a, b, 0.5, backend=backend),
        "mlp_hvp": lambda backend: mlp_hvp(x.to_sparse(), target, [w], [None], [], [t(3, 5)], backend=backend),
    }


@pytest.mark.parametrize("op, backend, device", [
    (op, backend, device) for op in ("softmax_ce_grad", "lanczos_step", "cubic_secular_solve", "lora_linear", "mlp_hvp")
    for backend, device in backend_devices(op)])
def test_every_op_refuses_a_sparse_argument_on_every_backend(op, backend, device):
    """A sparse tensor met a different torch or kernel error on each backend (NotImplementedError,
    "unsupported memory format"), or none: the reference of lanczos_step took a sparse basis."""
    with pytest.raises(TypeError, match=r"must be a dense tensor, got layout torch\.sparse_coo"):
        _sparse_calls(device)[op](backend)
