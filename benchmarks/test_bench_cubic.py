"""pytest-benchmark view of the cubic suite: ``pytest benchmarks/test_bench_cubic.py``.

The solvers of ``cubic_newton_step`` (dense where d allows, krylov, gd) on the synthetic indefinite
operators of :mod:`benchmarks.cubic` at two dimensions, float64 on the CPU. Each solver's step is
checked first: its model value must be within the suite's TARGET (relative) of the reference m*.
Compare within a dimension with ``--benchmark-group-by=group``.
"""
import math

import pytest
import torch

from unlearn_kernels.solvers import cubic_newton_step, lanczos

from .cubic import (
    DENSE_MAX, GD_MAX_STEPS, QUICK_DIMENSIONS, STOP_TOL, SYNTHETIC_M, TARGET, LowRankPlusDiagonal, reference_step,
    model_value_and_residual,
)


@pytest.fixture(scope="module", params=QUICK_DIMENSIONS, ids=lambda d: f"d={d}")
def case(request):
    d = request.param
    H = LowRankPlusDiagonal(d)
    g = torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / math.sqrt(d)
    m_star, s_norm, _ = reference_step(H, g, SYNTHETIC_M)
    lam_max = lanczos(H, 60, v0=g, tol=1e-6, return_eigenvectors=False).eigenvalues.max().item()
    return H, g, m_star, 1.0 / (lam_max + SYNTHETIC_M * s_norm)


@pytest.mark.parametrize("method", ["dense", "krylov", "gd"])
def test_cubic_newton_step(benchmark, case, method):
    H, g, m_star, eta = case
    if method == "dense" and g.shape[0] > DENSE_MAX:
        pytest.skip(f"the dense solver is timed up to d = {DENSE_MAX} (float64 eigh of a d x d matrix)")
    options = {"dense": {}, "krylov": {"k_max": 500, "kappa": STOP_TOL},
               "gd": {"K": GD_MAX_STEPS, "eta": eta, "tol": STOP_TOL}}[method]

    def solve():
        return cubic_newton_step(H, g, SYNTHETIC_M, method=method, **options)

    step = solve()
    assert abs(model_value_and_residual(H, g, step.step, SYNTHETIC_M)[0] - m_star) <= TARGET * abs(m_star)
    benchmark.group = f"cubic subproblem d={g.shape[0]}"
    benchmark(solve)
