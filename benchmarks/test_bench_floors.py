"""pytest-benchmark view of the floors suite: ``pytest benchmarks/test_bench_floors.py``.

The tangent-dependent matmuls / convolutions of one exact product (``floor``, :mod:`benchmarks.floors`)
next to our operator and PyHessian's cached graph, on the quick MLP and CNN of the hvp suite; the
products are checked against a float64 double-backward reference before they are timed. Compare
within a model with ``--benchmark-group-by=group``.
"""
import pytest
import torch
from torch import nn

from .common import synchronized
from .floors import floor_ops
from .hvp import candidates, problems, reference_hvp

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOSS = nn.CrossEntropyLoss()
NAMES = ["floor", "ours:generic", "pyhessian:cached-graph"]


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def problem(request):
    p = next(q for q in problems(DEVICE, quick=True) if q.name.startswith(request.param))
    v = torch.randn(sum(t.numel() for t in p.params), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return p, v, reference_hvp(p, LOSS, v.unsqueeze(1))[:, 0]


@pytest.mark.parametrize("name", NAMES)
def test_floor(benchmark, problem, name):
    p, v, exact = problem
    benchmark.group = p.name
    if name == "floor":
        fn = floor_ops(p.model, p.x)
    else:
        try:
            fn = candidates(p, LOSS, v)[name]()
        except ImportError as exc:
            pytest.skip(f"{name} is not installed: {exc}")
        out = fn()
        # float32 against float64: a relative error far above float32 rounding means a wrong product.
        assert (out.double() - exact).abs().max().item() <= 1e-5 * max(exact.abs().max().item(), 1.0)
    benchmark(synchronized(fn, DEVICE))
