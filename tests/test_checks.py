"""The shared argument checks of unlearn_kernels.checks, through the ops that use them: a sparse
tensor and an integer too large for a float get one clear error on every backend."""
import argparse
import decimal
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from devices import backend_devices
from pathlike import EmptyPath
from unlearn_kernels.checkpoint import refuse_empty_path
from unlearn_kernels.checks import (
    as_float,
    check_module,
    check_not_meta,
    check_number,
    check_one_floating_dtype_and_device,
    check_one_shape,
    check_option_names,
    check_tensor,
    check_tensors,
    norm64,
    normalisation_buffers,
    scaled_norm,
)
from unlearn_kernels.cli import path_argument
from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.ops import cubic_secular_solve, lanczos_step, lora_linear, mlp_hvp, softmax_ce_grad


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_check_tensor_refuses_a_sparse_tensor():
    dense = torch.eye(3)
    assert check_tensor("x", dense) is dense
    for sparse in (dense.to_sparse(), dense.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"x must be a dense tensor, got layout torch\.sparse_c"):
            check_tensor("x", sparse)


def test_one_check_module_with_one_message_everywhere():
    """Two check_module functions (training's "model must be a torch.nn.Module", lora's "expected an
    nn.Module") and two inline copies gave one bad model two messages; one now, naming the argument."""
    from unlearn_kernels import lora, training
    from unlearn_kernels.curvature import resolve_parameters
    from unlearn_kernels.eval import weight_distance

    layer = nn.Linear(2, 2)
    assert check_module("x", layer) is layer
    for call, message in ((lambda: training.train(None, None, None), "train: model"),
                          (lambda: lora.merge("m"), "merge: model"),
                          (lambda: lora.from_peft(None), "from_peft: peft_model"),
                          (lambda: resolve_parameters(None), "model"),
                          (lambda: weight_distance(layer, 3), "weight_distance: model_b")):
        with pytest.raises(TypeError, match=rf"^{message} must be a torch\.nn\.Module, got \w+$"):
            call()
    assert not hasattr(lora, "check_module") or lora.check_module is check_module
    assert training.check_module is check_module


def test_non_finite_inputs_get_one_message_everywhere():
    """train and the evaluation said "NaN or Inf in the inputs at row N", the methods "the <role> set has
    inputs that are not finite (...)": one check (checks.check_finite_inputs), one wording naming the set."""
    from unlearn_kernels.data import LabeledData
    from unlearn_kernels.eval import predict_logits
    from unlearn_kernels.methods import METHODS
    from unlearn_kernels.training import TrainConfig, train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    bad = x.clone()
    bad[5, 1] = math.inf
    tail = r" has inputs that are not finite \(NaN or Inf; first at row 5\)$"
    for call, what in ((lambda: train(model, LabeledData(bad, y), TrainConfig(epochs=1)), "train: the training set"),
                       (lambda: predict_logits(model, LabeledData(bad, y)), "predict_logits: data"),
                       (lambda: METHODS["finetune"]().unlearn(model, LabeledData(x[:2], y[:2]), LabeledData(bad, y)),
                        "finetune: the retain set")):
        with pytest.raises(ValueError, match="^" + what + tail):
            call()


@pytest.mark.parametrize("value", [2**2000, -(2**2000)], ids=["2**2000", "-2**2000"])
def test_check_number_refuses_an_int_beyond_a_float(value):
    """It raised OverflowError from math.isfinite instead of naming the argument."""
    with pytest.raises(ValueError, match=r"^M must be a finite number > 0\.0, got -?\d+\.\.\.\d+$"):
        check_number("M", value, 0.0, strict=True)


@pytest.mark.parametrize("value, expected", [
    (2**2000, math.inf), (-(2**2000), -math.inf), (Fraction(2**2000), math.inf),  # float() raises OverflowError
    (3, 3.0), (-2.5, -2.5), (np.int64(-7), -7.0), (np.uint64(2**64 - 1), 2.0**64), (np.float32(0.5), 0.5),
    (math.inf, math.inf), (-math.inf, -math.inf), (np.float64("nan"), math.nan),
])
def test_as_float_gives_a_huge_number_an_infinity_of_its_sign(value, expected):
    """The one conversion behind check_number, lanczos_step's beta_prev and lora_linear's scale."""
    result = as_float(value)
    assert type(result) is float and (result == expected or math.isnan(result) and math.isnan(expected))


@pytest.mark.parametrize("op", ["lanczos_step", "lora_linear"])
@pytest.mark.parametrize("value", [2**2000, -(2**2000)], ids=["2**2000", "-2**2000"])
def test_an_op_refuses_an_int_beyond_a_float_as_not_finite(op, value):
    """A huge int reaches the ops' checks as an infinity (through as_float), not as an OverflowError:
    lanczos_step's finiteness check, lora_linear's range check (too large for x's dtype)."""
    if op == "lanczos_step":
        q = torch.ones(6, dtype=torch.float64) / 6**0.5
        with pytest.raises(ValueError, match=r"^lanczos_step: beta_prev must be finite, got NaN or Inf$"):
            lanczos_step(2 * q, q, q.flip(0), value, None, backend="reference")
    else:
        x, w, a, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(2, 5), torch.randn(3, 2)
        # shortened to 40 characters
        with pytest.raises(ValueError, match=r"scale -?\d{10,20}\.\.\.\d+ is beyond the range of x's dtype"):
            lora_linear(x, w, None, a, b, value, backend="reference")


def test_refuse_empty_path_and_path_argument(tmp_path):
    """The one check of an empty path (which Path reads as the working folder): the caller's message, an
    os.PathLike of "" too; the command line's argparse type turns it into a usage error."""
    for empty in ("", EmptyPath()):
        with pytest.raises(ValueError, match=r"^--thing is an empty path: name a file$"):
            refuse_empty_path(empty, "--thing is an empty path: name a file")
    assert refuse_empty_path(str(tmp_path), "unused") == tmp_path
    assert refuse_empty_path(".", "unused") == Path(".")  # the working folder, named
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'' names no folder$"):
        path_argument("")
    assert path_argument("runs") == "runs"


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


def test_the_tensor_group_checks_name_every_tensor_and_what_it_has():
    """One message for the ops whose arguments must be dense tensors of one shape, dtype and device."""
    a, b, c = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4)
    check_tensors("op", [("a", a), ("b", b)])
    with pytest.raises(TypeError, match=r"^op: b must be a torch\.Tensor, got list$"):
        check_tensors("op", [("a", a), ("b", [1.0])])
    with pytest.raises(TypeError, match=r"^op: a must be a dense tensor, got layout torch\.sparse_coo"):
        check_tensors("op", [("a", a.to_sparse())])
    check_one_shape("op", [("a", a), ("b", b)], nonscalar=True)
    with pytest.raises(ValueError, match=r"^op: a, b and c must have one shape, got a \(2, 3\), b \(2, 3\) "
                                         r"and c \(2, 4\)$"):
        check_one_shape("op", [("a", a), ("b", b), ("c", c)])
    with pytest.raises(ValueError, match=r"^op: a and b must have one shape of at least one dim, got a \(\) "
                                         r"and b \(\)$"):
        check_one_shape("op", [("a", torch.zeros(())), ("b", torch.zeros(()))], nonscalar=True)
    check_one_floating_dtype_and_device("op", [("a", a), ("c", c)])
    with pytest.raises(ValueError, match=r"^op: a and b must have one floating dtype, got a torch\.float32 and "
                                         r"b torch\.float64$"):
        check_one_floating_dtype_and_device("op", [("a", a), ("b", b.double())])
    with pytest.raises(ValueError, match=r"^op: a must have one floating dtype, got a torch\.int64$"):
        check_one_floating_dtype_and_device("op", [("a", a.long())])
    with pytest.raises(ValueError, match=r"^op: a and b must be on one device, got a on cpu and b on meta$"):
        check_one_floating_dtype_and_device("op", [("a", a), ("b", b.to("meta"))])


def test_check_option_names_names_the_accepted_options():
    """One check of option names for every method and solver that passes options on (five copies raised
    ValueError or TypeError in three wordings, or let Python's "unexpected keyword argument" through)."""
    def solver(H, g, *, tol=1e-6, maxiter=None):
        return H, g, tol, maxiter

    check_option_names("solver 'x'", {"tol": 1.0}, solver, {"H", "g"})
    with pytest.raises(TypeError,
                       match=r"^solver 'x': unknown option\(s\) \['H', 'tols'\]; accepted: \['maxiter', 'tol'\]$"):
        check_option_names("solver 'x'", {"tols": 1.0, "H": 1}, solver, {"H", "g"})
    with pytest.raises(TypeError, match=r"^solver 'ldl': unknown option\(s\) \['tol'\]; accepted: \[\]$"):
        check_option_names("solver 'ldl'", ["tol"], ())
    check_option_names("wrapper", {"anything": 1}, lambda *args, **kwargs: None)  # **kwargs takes every name


def test_the_row_check_reads_large_data_without_a_mask_of_it(monkeypatch):
    """torch.isfinite over the whole data at once (an abs copy and three masks: 1.75x the data, on a GPU too)
    made every operator's construction need that much memory beyond the data, whatever its cache budget. A
    finite sum now decides, and a non-finite one (a NaN, or finite entries that overflow when added) is
    followed by a check of a chunk of rows at a time, which finds the first bad row."""
    from unlearn_kernels import checks

    seen = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    monkeypatch.setattr(checks, "_CHECK_CHUNK", 1000)
    data = torch.randn(500, 10, 8)
    assert checks.first_nonfinite_row(data) is None and not seen
    data[321, 4, 2] = float("nan")
    assert checks.first_nonfinite_row(data) == 321 and max(seen) <= 1000
    assert checks.first_nonfinite_row(torch.full((400, 3), 3e38)) is None  # the sum overflows, no entry does
    assert not checks.all_finite(data) and checks.all_finite(torch.full((5000,), 60000.0, dtype=torch.float16))


def test_a_buffer_on_the_meta_device_is_refused_by_name():
    """check_not_meta names a meta buffer as it names a meta parameter (a version that looked at the parameters
    only let the buffer through to torch's error deep inside the first forward)."""
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("offset", torch.zeros(4))

        def forward(self, x):
            return self.fc(x + self.offset)

    model = Shift()
    check_not_meta("owner", model)  # every tensor has values
    model.offset = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match=r"^owner: the model's buffer 'offset' is on the meta device \(it has no "
                                         r"values\): materialise the model first"):
        check_not_meta("owner", model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"^GenericHessian: the model's buffer 'offset' is on the meta device"):
        hessian_operator(model, F.cross_entropy, (x, y))


def test_an_instance_norms_running_statistics_are_normalisation_buffers():
    """An InstanceNorm that tracks running statistics is a normalisation layer (_NormBase) like BatchNorm: an Inf
    running_var there is refused (a version that took BatchNorm only held it to the other buffers' rule, where
    an Inf is allowed)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.InstanceNorm1d(2, track_running_stats=True),
                          nn.Flatten(), nn.Linear(6, 3)).eval()
    assert normalisation_buffers(model) == {"2.running_mean", "2.running_var", "2.num_batches_tracked"}
    model[2].running_var.fill_(float("inf"))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"^GenericHessian: buffer '2\.running_var' has NaN or Inf values"):
        hessian_operator(model, F.cross_entropy, (x, y))


def test_scaled_norm_is_the_plain_norm_where_no_square_is_lost_and_scales_elsewhere():
    """scaled_norm keeps norm64's (numpy's, for an array) bits where no square over- or underflows, and scales
    where they would: squares beyond float64 (a norm of 1.4e200 read as Inf), and 2.3 million entries of
    1e-157, whose subnormal squares summed to a norm 3e-11 off although it lies above 1.5e-154 (the test of
    the norm alone let that through)."""
    v = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert scaled_norm(v) == norm64(v) and scaled_norm(v.numpy()) == float(np.linalg.norm(v.numpy()))
    assert scaled_norm(torch.tensor([1e200, -1e200], dtype=torch.float64)) == pytest.approx(2**0.5 * 1e200, rel=1e-15)
    tiny = torch.full((2_300_000,), 1e-157, dtype=torch.float64)
    tiny[::2] = 1.2345678901234e-157
    exact = float((decimal.Decimal(1_150_000) * (decimal.Decimal(1e-157)**2
                                                 + decimal.Decimal(1.2345678901234e-157)**2)).sqrt())
    assert scaled_norm(tiny) == pytest.approx(exact, rel=1e-11, abs=0.0)  # 3e-11 off unscaled; 2e-12: 2.3M terms
    assert scaled_norm(torch.zeros(3)) == 0.0 and scaled_norm(torch.zeros(0)) == 0.0
