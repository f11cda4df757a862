"""pytest-benchmark view of the softmax-CE suite: ``pytest benchmarks/test_bench_softmax_ce.py``.
Each candidate is checked against float64 before it is timed; the candidates of one op and shape
are one group, side by side (pytest-benchmark's default ``--benchmark-group-by=group``)."""
import pytest
import torch

from unlearn_kernels import ops

from .common import check_plain, kernel_backends, plain_error_tolerance, synchronized
from .softmax_ce import eager_grad, eager_hvp

SHAPES = [(4096, 1000), (4096, 32000)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CANDIDATES = ["eager", "torch.compile", *kernel_backends(DEVICE)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def inputs(request):
    gen = torch.Generator().manual_seed(0)
    n, c = request.param
    z = (torch.randn(n, c, generator=gen) * 3).to(DEVICE)
    u = torch.randn(n, c, generator=gen).to(DEVICE)
    y = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    return z, u, y


def _candidate(name, op):
    if name == "eager":
        return eager_hvp if op == "hvp" else eager_grad
    if name == "torch.compile":
        return torch.compile(eager_hvp if op == "hvp" else eager_grad)
    if op == "hvp":
        return lambda z, u: ops.softmax_ce_hvp(z, u, backend=name, check_finite=False)
    return lambda z, y: ops.softmax_ce_grad(z, y, backend=name, check_finite=False)


def _run(benchmark, fn, args, exact, plain):
    out = fn(*args)
    floor = 16 * torch.finfo(out.dtype).eps * max(exact.abs().max().item(), 1)
    reference = plain(*args)
    check_plain(reference, exact)  # the eager candidate is the plain computation: its gate alone would pass it
    assert (out.double() - exact).abs().max().item() <= plain_error_tolerance(reference, exact, floor)
    benchmark(synchronized(fn, DEVICE), *args)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_softmax_ce_hvp(benchmark, inputs, candidate):
    z, u, _ = inputs
    benchmark.group = f"hvp {tuple(z.shape)}"
    _run(benchmark, _candidate(candidate, "hvp"), (z, u), ops.softmax_ce_hvp_ref(z.double(), u.double()), eager_hvp)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_softmax_ce_grad(benchmark, inputs, candidate):
    z, _, y = inputs
    benchmark.group = f"grad {tuple(z.shape)}"
    _run(benchmark, _candidate(candidate, "grad"), (z, y), ops.softmax_ce_grad_ref(z.double(), y), eager_grad)
