"""pytest-benchmark view of the HVP suite: ``pytest benchmarks/test_bench_hvp.py``.

Every candidate of :mod:`benchmarks.hvp` (ours fused/generic with and without the fixed-weight cache and
generic forward-over-reverse, curvlinops, PyHessian in both modes, plain autograd) on two MLPs and a
small CNN, each checked against a float64 double-backward reference before it is timed, next to one
gradient on the same batch (the unit) and the floor of :mod:`benchmarks.floors` (the matmuls or
convolutions an exact product cannot skip, timed alone). Compare within a model with
``--benchmark-group-by=group``.
"""
import copy

import pytest
import torch
from torch import nn

from unlearn_kernels.curvature import flatten_tensors
from unlearn_kernels.models import SmallCNN
from unlearn_kernels.training import init_model

from .common import synchronized
from .floors import floor_ops
from .hvp import ANCHORS, OURS, Problem, candidates, digits_problem, reference_hvp, seeded_mlp

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOSS = nn.CrossEntropyLoss()
NAMES = ["gradient", "floor", *OURS, *ANCHORS]


def _mid_mlp() -> Problem:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 784, generator=gen), torch.randint(0, 10, (512,), generator=gen)
    return Problem("mlp 784-256-10 n=512", seeded_mlp(784, (256,)).to(DEVICE).eval(), x.to(DEVICE), y.to(DEVICE))


def _small_cnn() -> Problem:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    model = init_model(lambda: SmallCNN(1, 10, (8, 16)), 0).to(DEVICE).eval()
    return Problem("cnn 8-16 28x28 n=64", model, x.to(DEVICE), y.to(DEVICE))


@pytest.fixture(scope="module", params=["digits", "mlp", "cnn"])
def problem(request):
    p = {"digits": lambda: digits_problem((128,), device=DEVICE), "mlp": _mid_mlp, "cnn": _small_cnn}[request.param]()
    d = sum(t.numel() for t in p.params)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return p, v, reference_hvp(p, LOSS, v.unsqueeze(1))[:, 0]


def _gradient(p: Problem):
    def fn():
        return flatten_tensors(torch.autograd.grad(LOSS(p.model(p.x), p.y), p.params))

    model64 = copy.deepcopy(p.model).double()
    exact = flatten_tensors(torch.autograd.grad(LOSS(model64(p.x.double()), p.y), list(model64.parameters())))
    return fn, exact


@pytest.mark.parametrize("name", NAMES)
def test_hvp(benchmark, problem, name):
    p, v, exact = problem
    benchmark.group = p.name
    if name == "floor":  # the matmuls an exact product cannot skip (benchmarks.floors); no output to check
        benchmark(synchronized(floor_ops(p.model, p.x), DEVICE))
        return
    if name == "gradient":
        fn, exact = _gradient(p)
    else:
        try:
            fn = candidates(p, LOSS, v)[name]()
        except ImportError as exc:
            pytest.skip(f"{name} is not installed: {exc}")
    out = fn()
    # float32 against float64: a relative error far above float32 rounding means a wrong product.
    assert (out.double() - exact).abs().max().item() <= 1e-5 * max(exact.abs().max().item(), 1.0)
    benchmark(synchronized(fn, DEVICE))
