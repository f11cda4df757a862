"""weights_fingerprint: the C++ kernel against the reference and against sums written out in float64
(fractions where they must be exact), every dtype and layout it takes, what it sees and what it refuses."""
from fractions import Fraction
import math

import pytest
import torch

from devices import backend_devices
from unlearn_kernels.backends import BackendUnavailableError
from unlearn_kernels.ops import weights_fingerprint
from unlearn_kernels.ops.weights_fingerprint import RAMP_LENGTH

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def by_hand(t: torch.Tensor) -> tuple[float, float]:
    """The definition, value by value, summed exactly (Fractions of the float64 values) and rounded once."""
    values = t.detach().cpu().reshape(-1).to(torch.float64).tolist()
    total = sum(Fraction(float(v)) for v in values)
    checksum = Fraction(0)
    for i, v in enumerate(values):
        x = (i % RAMP_LENGTH) * GOLDEN
        checksum += Fraction(float(v)) * Fraction((x - math.trunc(x)) + 1.0) * (1 + i // RAMP_LENGTH)
    return float(total), float(checksum)


def examples(generator: torch.Generator) -> list[torch.Tensor]:
    """Tensors of every kind the operators fingerprint: weights, biases, half-precision, float8, integer (signed
    and unsigned) and bool buffers, a transposed (non-contiguous) view, an empty tensor, a 0-dim one."""
    return [torch.randn(128, 64, generator=generator), torch.randn(10, generator=generator),
            torch.randn(7, 5, dtype=torch.float64, generator=generator).t(),
            torch.randn(3, 4, generator=generator).half(), torch.randn(6, generator=generator).bfloat16(),
            torch.randn(2, 5, generator=generator).to(torch.float8_e4m3fn),
            torch.randn(5, generator=generator).to(torch.float8_e5m2),
            torch.arange(-5, 12), torch.arange(7, dtype=torch.int8), torch.arange(9, dtype=torch.uint8),
            *(torch.arange(60000, 60011).to(dtype) for dtype in (torch.uint16, torch.uint32, torch.uint64)),
            torch.tensor([True, False, True]), torch.zeros(0, 3), torch.tensor(2.5)]


@pytest.mark.parametrize(("backend", "device"), backend_devices("weights_fingerprint"))
def test_matches_the_definition(backend, device, rng):
    tensors = [t.to(device) for t in examples(rng)]
    got = weights_fingerprint(tensors, backend=backend)
    assert len(got) == len(tensors) and all(isinstance(v, float) for pair in got for v in pair)
    for t, (total, checksum) in zip(tensors, got):
        want_total, want_checksum = by_hand(t)
        scale = float(t.detach().double().abs().sum()) * 2 + 1e-300  # ramp weights are below 2
        assert total == pytest.approx(want_total, rel=0, abs=1e-14 * scale), t.dtype
        assert checksum == pytest.approx(want_checksum, rel=0, abs=1e-14 * scale), t.dtype


@pytest.mark.parametrize(("backend", "device"), backend_devices("weights_fingerprint"))
def test_long_tensors_weigh_each_chunk(backend, device, rng):
    """Past 65,521 values the ramp starts again, each chunk weighted by its number: a value moved from one
    chunk to the same position of the next changes the checksum."""
    n = 2 * RAMP_LENGTH + 17
    t = torch.randn(n, dtype=torch.float64, generator=rng).to(device)
    chunks = t.cpu().split(RAMP_LENGTH)
    full = torch.arange(RAMP_LENGTH, dtype=torch.float64) * GOLDEN
    full = full - full.trunc() + 1.0
    want = sum((c * full[:len(c)]).sum().item() * (k + 1) for k, c in enumerate(chunks))
    (total, checksum), = weights_fingerprint([t], backend=backend)
    assert total == pytest.approx(t.sum().item(), rel=1e-13)
    assert checksum == pytest.approx(want, rel=1e-12)
    moved = t.clone()
    moved[[3, RAMP_LENGTH + 3]] = moved[[RAMP_LENGTH + 3, 3]]
    (moved_total, moved_checksum), = weights_fingerprint([moved], backend=backend)
    assert moved_total == pytest.approx(total, rel=1e-13) and moved_checksum != checksum


@pytest.mark.parametrize(("backend", "device"), backend_devices("weights_fingerprint"))
def test_sees_values_that_only_moved(backend, device, rng):
    """A permutation keeps the sum (exactly, for these integer values) and changes the checksum, in a weight,
    a bias and a half-precision tensor alike; the same values give the same fingerprint at every call."""
    for t in (torch.arange(24.0).reshape(4, 6), torch.arange(10.0), torch.arange(12.0).half().reshape(3, 4)):
        t = t.to(device)
        flat = t.reshape(-1)
        permuted = flat[torch.randperm(flat.numel(), generator=rng).to(device)].reshape(t.shape)
        (a_sum, a_check), (b_sum, b_check), (c_sum, c_check) = weights_fingerprint([t, permuted, t.clone()],
                                                                                   backend=backend)
        assert a_sum == b_sum == c_sum and a_check == c_check and a_check != b_check
        # and at every call: the operators compare the fingerprint before each product with the last one
        assert weights_fingerprint([t], backend=backend) == [(a_sum, a_check)]


@pytest.mark.parametrize(("backend", "device"), backend_devices("weights_fingerprint"))
def test_nonfinite_values_show_and_empty_tensors_give_zeros(backend, device):
    """NaN and Inf reach both numbers on every backend (the operators refuse such weights from them); an empty
    tensor, alone or beside others, gives (0, 0)."""
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]], device=device)
    inf = torch.tensor([[1.0, float("inf")]], device=device)
    empty = torch.zeros(0, 3, device=device)
    (nan_sum, nan_check), (inf_sum, inf_check), nothing = weights_fingerprint([bad, inf, empty], backend=backend)
    assert math.isnan(nan_sum) and math.isnan(nan_check) and inf_sum == inf_check == math.inf
    assert nothing == (0.0, 0.0) and weights_fingerprint([empty], backend=backend) == [(0.0, 0.0)]


def test_backends_agree_and_nonfinite_values_show(rng):
    """The C++ kernel and the reference agree to rounding; NaN and Inf show in both numbers."""
    tensors = examples(rng)
    cpp = weights_fingerprint(tensors, backend="cpp")
    ref = weights_fingerprint(tensors, backend="reference")
    for (a, b), (c, d) in zip(cpp, ref):
        assert a == pytest.approx(c, rel=1e-12, abs=1e-12) and b == pytest.approx(d, rel=1e-12, abs=1e-12)
    bad = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    inf = torch.tensor([[1.0, float("inf")]])
    for backend in ("cpp", "reference"):
        (nan_sum, nan_check), (inf_sum, inf_check) = weights_fingerprint([bad, inf], backend=backend)
        assert math.isnan(nan_sum) and math.isnan(nan_check) and inf_sum == inf_check == math.inf


def test_sparse_and_complex_tensors():
    """A sparse tensor gets its sum and no checksum (from the reference, also where the others go to the C++
    kernel); a complex one is fingerprinted as its real and imaginary parts side by side."""
    sparse = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    dense = torch.tensor([[1.0, 2.0]])
    assert weights_fingerprint([sparse, dense]) == [(5.0, 0.0), weights_fingerprint([dense])[0]]
    complex_value = torch.tensor([[1.0 + 2.0j, -3.0 + 0.5j]])
    for backend in ("cpp", "reference"):
        assert (weights_fingerprint([complex_value], backend=backend)
                == weights_fingerprint([torch.view_as_real(complex_value)], backend=backend))
        assert weights_fingerprint([complex_value.conj()], backend=backend)[0][0] == 1.0 - 3.0 - 2.0 - 0.5
    with pytest.raises(BackendUnavailableError, match="backend 'cpp' needs strided tensors on one device"):
        weights_fingerprint([sparse], backend="cpp")


def test_nothing_to_fingerprint_and_inputs_untouched(rng):
    assert weights_fingerprint([]) == []
    weight = torch.randn(4, 3, generator=rng, requires_grad=True)
    before = weight.detach().clone()
    version = weight._version
    weights_fingerprint([weight, weight.t()], backend="cpp")  # a parameter that requires grad: read, not recorded
    assert torch.equal(weight.detach(), before) and weight._version == version


def test_backend_refusals():
    with pytest.raises(ValueError, match="weights_fingerprint: unknown backend 'gpu'"):
        weights_fingerprint([torch.ones(2)], backend="gpu")
    # without a GPU or a CUDA build: not here; with both: not on CPU tensors
    with pytest.raises(BackendUnavailableError, match="weights_fingerprint: backend 'cuda' cannot run (here|these "
                                                      "inputs: the CUDA kernel needs CUDA tensors, got cpu)"):
        weights_fingerprint([torch.ones(2)], backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs strided tensors on one device"):
        weights_fingerprint([torch.ones(2), torch.ones(2).to_sparse()], backend="cpp")
    for backend in ("auto", "cpp", "reference"):  # torch's own error was "Cannot copy out of meta tensor"
        with pytest.raises(ValueError, match="weights_fingerprint: tensor 1 is on the meta device: it holds no"):
            weights_fingerprint([torch.ones(2), torch.ones(2, device="meta")], backend=backend)
    # a number among the tensors was torch's "'float' object has no attribute 'detach'"; a bare tensor was
    # fingerprinted row by row
    with pytest.raises(TypeError, match=r"^weights_fingerprint: tensors\[0\] must be a torch.Tensor, got float$"):
        weights_fingerprint([1.0, torch.ones(2)])
    with pytest.raises(TypeError, match=r"^weights_fingerprint: tensors must be a sequence of tensors, got a tensor"):
        weights_fingerprint(torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"^weights_fingerprint: tensors must be a sequence of tensors, got int$"):
        weights_fingerprint(3)
    # a generator is read once: the check of its entries left nothing to fingerprint ([] came back)
    layer = torch.nn.Linear(3, 2)
    assert weights_fingerprint(layer.parameters()) == weights_fingerprint(list(layer.parameters())) != []


def test_opcheck(rng):
    """The registered op passes torch.library's checks (schema, fake tensor, autograd registration)."""
    tensors = [torch.randn(4, 3, generator=rng), torch.randn(3, generator=rng).double(), torch.arange(5)]
    torch.library.opcheck(torch.ops.unlearn_kernels.weights_fingerprint.default, (tensors,))


def test_no_tensors_still_checks_the_backend_name():
    """An empty list returned [] before the backend was looked at: any value passed, where every other op refuses
    an unknown backend (or one that is not a str) whatever its inputs."""
    assert weights_fingerprint([], backend="reference") == []
    with pytest.raises(ValueError, match=r"^weights_fingerprint: unknown backend 'bogus'"):
        weights_fingerprint([], backend="bogus")
    with pytest.raises(TypeError, match=r"^weights_fingerprint: backend must be a str"):
        weights_fingerprint([], backend=None)
