"""Top Hessian eigenvalues: our ``lanczos`` against ``scipy.sparse.linalg.eigsh`` (ARPACK, implicitly
restarted Lanczos) on the same curvature operator (``op.to_scipy()``).

Both get the same relative tolerance and return no eigenvectors. Before timing, each result is
checked against a float64 reference (eigsh with a tight tolerance on a float64 copy of the operator);
reported are the eigenvalues' maximum relative difference between the two solvers, the number of
Hessian-vector products and the wall time.
"""
from __future__ import annotations

import copy

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

from unlearn_kernels.curvature import CurvatureOperator, hessian_operator
from unlearn_kernels.solvers import lanczos

from .common import Measurement, measure
from .hvp import Problem, digits_problem, seeded_mlp

BASELINE = "scipy eigsh"
QUICK = {"quick": True, "min_time": 0.05}
"""What the runner passes for ``--quick``."""
NUM_EIGS = 10
MAX_STEPS = 300
"""Most Lanczos steps of ours (it stops earlier at the tolerance)."""
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-5}
"""Relative residual tolerance given to both solvers, by the operator's dtype."""
REFERENCE_TOLERANCE = 1e-10


def top_eigsh(op: CurvatureOperator, num_eigs: int, tol: float) -> torch.Tensor:
    """The ``num_eigs`` largest eigenvalues (ascending, float64) by ARPACK on ``op.to_scipy()``."""
    vals = scipy.sparse.linalg.eigsh(op.to_scipy(), k=num_eigs, which="LA", tol=tol, return_eigenvectors=False,
                                     v0=np.random.default_rng(0).standard_normal(op.shape[0]))
    return torch.from_numpy(np.sort(vals))


def top_lanczos(op: CurvatureOperator, num_eigs: int, tol: float) -> torch.Tensor:
    """The ``num_eigs`` largest eigenvalues (ascending, float64) by our ``lanczos``."""
    result = lanczos(op, MAX_STEPS, which="LA", num_eigs=num_eigs, tol=tol, return_eigenvectors=False)
    return result.eigenvalues


def _problems(device: torch.device, quick: bool) -> list[tuple[Problem, torch.dtype]]:
    """(problem, dtype of the operator): the trained digits MLP in float64, a random-data MLP in float32."""
    gen = torch.Generator().manual_seed(0)
    n, hidden = (128, (32,)) if quick else (512, (128,))
    x, y = torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    wide = Problem(f"mlp 784-{'-'.join(map(str, hidden))}-10 n={n}", seeded_mlp(784, hidden).to(device).eval(),
                   x.to(device), y.to(device))
    digits = digits_problem((32,) if quick else (128,), epochs=1 if quick else 10, device=device)
    return [(digits, torch.float64), (wide, torch.float32)]


def run(device: torch.device, *, quick: bool = False, min_time: float = 0.5,
        with_compile: bool = True) -> tuple[list[Measurement], dict]:
    """Both solvers on each problem's Hessian (``hessian_operator(path="auto")``).

    Args:
        device: where to run.
        quick: smaller models and shorter training (seconds in all).
        min_time: seconds of timing per candidate (at least 5 calls each).
        with_compile: accepted from the runner; this suite has no torch.compile candidate.

    Returns:
        The measurements (``extra``: ``num_hvps`` of one call, ``eigenvalues``, and
        ``max_rel_diff_vs_eigsh``) and the suite's config.
    """
    del with_compile
    loss_fn = nn.CrossEntropyLoss()
    results: list[Measurement] = []
    cases = []
    for problem, dtype in _problems(device, quick):
        model = copy.deepcopy(problem.model).to(dtype)
        op = hessian_operator(model, loss_fn, (problem.x.to(dtype), problem.y))
        op64 = op if dtype == torch.float64 else hessian_operator(
            copy.deepcopy(problem.model).double(), loss_fn, (problem.x.double(), problem.y))
        exact = top_eigsh(op64, NUM_EIGS, REFERENCE_TOLERANCE)
        tol = TOLERANCE[dtype]
        gate = 100 * tol * exact.abs().max().item()
        case = f"{problem.name} {str(dtype)[6:]}"
        found = {}
        for name, solver in (("scipy eigsh", top_eigsh), ("ours lanczos", top_lanczos)):
            start = op.num_products
            found[name] = solver(op, NUM_EIGS, tol)
            hvps = op.num_products - start
            m = measure(case, name, lambda solver=solver: solver(op, NUM_EIGS, tol), exact, gate, device,
                        min_time=min_time, warmup=0)
            m.extra.update(num_hvps=hvps, eigenvalues=found[name].tolist())
            results.append(m)
        diff = ((found["ours lanczos"] - found["scipy eigsh"]).abs() / found["scipy eigsh"].abs()).max().item()
        results[-1].extra["max_rel_diff_vs_eigsh"] = diff
        cases.append({"name": case, "d": op.shape[0], "n": int(problem.y.shape[0]), "path": op.path,
                      "tolerance": tol, "gate_abs": gate, "reference_eigenvalues": exact.tolist()})
    config = {"cases": cases, "num_eigs": NUM_EIGS, "which": "largest algebraic", "max_steps_ours": MAX_STEPS,
              "ours": "lanczos(reorth='full', return_eigenvectors=False)",
              "eigsh": "which='LA', default ncv, v0 = a fixed Gaussian vector, return_eigenvectors=False",
              "reference": f"eigsh tol={REFERENCE_TOLERANCE} on a float64 operator", "min_time_s": min_time,
              "quick": quick}
    return results, config
