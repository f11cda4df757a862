"""pytest-benchmark view of the Lanczos suite: ``pytest benchmarks/test_bench_lanczos.py``.

One Lanczos step (``ops.lanczos_step``'s compiled backends against the same step in plain float32
PyTorch) on the state of a real run over the Hessian of an MLP on digits (at its seeded
initialisation), and the ten largest Hessian
eigenvalues by our ``lanczos`` and by scipy's ``eigsh``. Each candidate is checked against a float64
reference before it is timed (:mod:`benchmarks.lanczos` says how). Compare within a case with
``--benchmark-group-by=group``.
"""
import copy

import pytest
import torch
from torch import nn

from unlearn_kernels.backends import status
from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.ops import lanczos_step, lanczos_step_ref

from .common import check_plain, kernel_backends, plain_error_tolerance, synchronized
from .hvp import digits_problem
from .lanczos import (
    NUM_EIGS, REFERENCE_TOLERANCE, STEP_BASELINE, TOLERANCE, reference_operator, step_states, top_eigsh, top_lanczos,
    torch_step,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEP_CANDIDATES = [STEP_BASELINE] + [f"ours:{b}" for b in kernel_backends(DEVICE) if status("lanczos_step", b).usable]


@pytest.fixture(scope="module")
def problem():
    return digits_problem((128,), device=DEVICE)  # the seeded initialisation


@pytest.fixture(scope="module", params=["lanczos state", "hq near span"])
def step_case(request, problem):
    return next((case, args) for case, args in step_states(problem, torch.float32) if case.endswith(request.param))


@pytest.mark.parametrize("candidate", STEP_CANDIDATES)
def test_lanczos_step(benchmark, step_case, candidate):
    case, args = step_case
    hq, q, q_prev, beta_prev, basis = args
    exact = lanczos_step_ref(*(t.double() for t in (hq, q, q_prev)), torch.tensor(beta_prev, dtype=torch.float64),
                             basis.double())[0]
    if candidate == STEP_BASELINE:
        fn = lambda: torch_step(*args)  # noqa: E731
    else:
        fn = lambda: lanczos_step(*args, backend=candidate.removeprefix("ours:"))[0]  # noqa: E731
    floor = 16 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    plain = torch_step(*args)
    check_plain(plain, exact)  # the baseline is the plain step: its gate alone would pass it
    gate = plain_error_tolerance(plain, exact, floor)
    assert (fn().double() - exact).abs().max().item() <= gate
    benchmark.group = case
    benchmark(synchronized(fn, DEVICE))


@pytest.mark.parametrize("solver", ["ours:lanczos", "scipy eigsh"])
def test_top_eigenvalues(benchmark, problem, solver):
    op = hessian_operator(copy.deepcopy(problem.model).double(), nn.CrossEntropyLoss(),
                          (problem.x.double(), problem.y))
    reference = top_eigsh(reference_operator(problem, nn.CrossEntropyLoss()), NUM_EIGS, REFERENCE_TOLERANCE)
    solve = top_lanczos if solver == "ours:lanczos" else top_eigsh
    tol = TOLERANCE[torch.float64]
    values = solve(op, NUM_EIGS, tol)
    assert ((values - reference).abs() / reference.abs()).max().item() <= 100 * tol
    benchmark.group = f"top {NUM_EIGS} eigenvalues, {problem.name}"
    benchmark(solve, op, NUM_EIGS, tol)
