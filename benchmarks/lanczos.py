"""Top Hessian eigenvalues: our ``lanczos`` against ``scipy.sparse.linalg.eigsh`` (ARPACK, implicitly
restarted Lanczos) on the same curvature operator (``op.to_scipy()``); and one Lanczos step: the
fused ``ops.lanczos_step`` against the same step in plain PyTorch.

Both solvers get the same relative tolerance and return no eigenvectors. Before timing, each result
is checked against a float64 reference: eigsh with a tight tolerance on the Hessian of a float64 copy of
the model by plain double backward (:func:`reference_operator`, none of the package's operators, so a
wrong product is caught: the gate's reference once moved with the kernel it checked); reported are the
eigenvalues' maximum relative difference between the two solvers, the number of Hessian-vector products
and the wall time.

The step cases take the state of a real run (the float32 Hessian of the larger MLP after
``STEP_BASIS - 1`` Lanczos steps with full reorthogonalisation: hq = H q and the stored basis),
and the same basis with an hq almost inside its span (where the second Gram-Schmidt pass is
needed). Candidates: ``torch float32`` (alpha, the recurrence and two classical Gram-Schmidt
passes ``w -= B^T (B w)`` as plain float32 tensor ops), and the op's compiled backends. Gate: the
flash-attention rule against the float64 reference step; the JSON also records each candidate's
orthogonality ``max_j |<b_j, q_next>|``. Timed interleaved.
"""
from __future__ import annotations

import copy

import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

from unlearn_kernels.curvature import CurvatureOperator, flatten_tensors, hessian_operator, unflatten_vector
from unlearn_kernels.data import load_dataset
from unlearn_kernels.ops import lanczos_step, lanczos_step_ref
from unlearn_kernels.solvers import lanczos
from unlearn_kernels.solvers.lanczos import LanczosProcess
from unlearn_kernels.solvers.operators import as_operator
from unlearn_kernels.training import TrainConfig, train

from .common import (
    Measurement,
    check,
    check_plain,
    kernel_backends,
    measure,
    measure_interleaved,
    plain_error_tolerance,
)
from .hvp import Problem, autograd_hvp, seeded_mlp

BASELINE = "scipy eigsh"
OURS = ("scipy eigsh", "ours lanczos")
"""The candidates that depend on the package (eigsh runs on its operator): the runner fails when one is wrong."""
QUICK = {"quick": True, "min_time": 0.05}
"""What the runner passes for ``--quick``."""
NUM_EIGS = 10
MAX_STEPS = 300
"""Most Lanczos steps of ours (it stops earlier at the tolerance)."""
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-5}
"""Relative residual tolerance given to both solvers, by the operator's dtype."""
REFERENCE_TOLERANCE = 1e-10
STEP_BASIS = 35
"""Basis vectors of the step cases (the Lanczos vectors after 34 steps, and the current one)."""
STEP_BASELINE = "torch float32"


def top_eigsh(op: CurvatureOperator | scipy.sparse.linalg.LinearOperator, num_eigs: int, tol: float) -> torch.Tensor:
    """The ``num_eigs`` largest eigenvalues (ascending, float64) by ARPACK on ``op.to_scipy()`` (or on ``op``
    itself, a scipy LinearOperator)."""
    linear = op if isinstance(op, scipy.sparse.linalg.LinearOperator) else op.to_scipy()
    vals = scipy.sparse.linalg.eigsh(linear, k=num_eigs, which="LA", tol=tol, return_eigenvectors=False,
                                     v0=np.random.default_rng(0).standard_normal(op.shape[0]))
    return torch.from_numpy(np.sort(vals))


def reference_operator(problem: Problem, loss_fn: nn.Module) -> scipy.sparse.linalg.LinearOperator:
    """The Hessian of the mean loss of a float64 copy of ``problem``'s model, each product by plain double
    backward (:func:`~benchmarks.hvp.autograd_hvp`): the eigenvalue gates' reference, independent of the
    package's operators."""
    model64 = copy.deepcopy(problem.model).double()
    params = list(model64.parameters())
    x, d = problem.x.double(), sum(p.numel() for p in params)

    def matvec(v: np.ndarray) -> np.ndarray:
        vectors = unflatten_vector(torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)).to(x.device),
                                   [p.shape for p in params])
        return flatten_tensors(autograd_hvp(model64, loss_fn, x, problem.y, vectors)).detach().cpu().numpy()

    return scipy.sparse.linalg.LinearOperator((d, d), matvec=matvec, dtype=np.float64)


def top_lanczos(op: CurvatureOperator, num_eigs: int, tol: float) -> torch.Tensor:
    """The ``num_eigs`` largest eigenvalues (ascending, float64) by our ``lanczos``."""
    result = lanczos(op, MAX_STEPS, which="LA", num_eigs=num_eigs, tol=tol, return_eigenvectors=False)
    return result.eigenvalues


def trained_digits(hidden: tuple[int, ...], epochs: int, device: torch.device) -> Problem:
    """The ReLU MLP 64-hidden-10 trained ``epochs`` epochs (the default SGD recipe) on the digits
    train split, which is also its batch; in eval mode."""
    data = load_dataset("digits").train
    model = seeded_mlp(64, hidden)
    train(model, data, TrainConfig(epochs=epochs), device=device)
    name = f"digits mlp 64-{'-'.join(map(str, hidden))}-10 n={len(data)} trained {epochs} ep"
    return Problem(name, model.to(device).eval(), data.x.to(device), data.y.to(device))


def _problems(device: torch.device, quick: bool) -> list[tuple[Problem, torch.dtype]]:
    """(problem, dtype of the operator): the trained digits MLP in float64, a random-data MLP in float32."""
    gen = torch.Generator().manual_seed(0)
    n, hidden = (128, (32,)) if quick else (512, (128,))
    x, y = torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    wide = Problem(f"mlp 784-{'-'.join(map(str, hidden))}-10 n={n}", seeded_mlp(784, hidden).to(device).eval(),
                   x.to(device), y.to(device))
    digits = trained_digits((32,) if quick else (128,), epochs=1 if quick else 10, device=device)
    return [(digits, torch.float64), (wide, torch.float32)]


def torch_step(hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: float,
               basis: torch.Tensor) -> torch.Tensor:
    """The Lanczos step in plain PyTorch in the vectors' dtype: the recurrence, two classical
    Gram-Schmidt passes against the rows of ``basis`` (CGS2), normalisation. Returns q_next."""
    alpha = torch.dot(hq, q)
    w = hq - alpha * q - beta_prev * q_prev
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w / torch.linalg.vector_norm(w)


def step_states(problem: Problem, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """``(case, (hq, q, q_prev, beta_prev, basis))``: the state of a Lanczos run on the problem's
    Hessian after ``STEP_BASIS - 1`` steps, and the same with hq moved almost into span(basis)."""
    model = copy.deepcopy(problem.model).to(dtype)
    op = as_operator(hessian_operator(model, nn.CrossEntropyLoss(), (problem.x.to(dtype), problem.y)))
    gen = torch.Generator().manual_seed(0)
    v0 = torch.randn(op.shape[0], generator=gen, dtype=torch.float64).to(op.device, dtype)
    proc = LanczosProcess(op, v0, reorth="full", store_basis=True, capacity=STEP_BASIS, generator=gen)
    for _ in range(STEP_BASIS - 1):
        proc.step()
    proc.basis[STEP_BASIS - 1] = proc.q
    basis, q, q_prev, beta_prev = proc.basis, proc.q, proc.q_prev, proc.betas[-1]
    hq = op.matvec(q)
    coef = torch.randn(STEP_BASIS, generator=gen, dtype=torch.float64).to(op.device, dtype)
    near = basis.T @ coef * hq.norm() + 1e-3 * hq  # the recurrence leaves a vector mostly inside the span
    name = f"step d={op.shape[0]} m={STEP_BASIS} {str(dtype)[6:]}"
    return [(f"{name} lanczos state", (hq, q, q_prev, beta_prev, basis)),
            (f"{name} hq near span", (near, q, q_prev, beta_prev, basis))]


def run_steps(problem: Problem, device: torch.device, min_time: float) -> tuple[list[Measurement], list[dict]]:
    """The step cases on the problem's float32 Hessian: ``torch float32`` and the op's compiled
    backends, gated, then timed interleaved."""
    results, cases = [], []
    backends = kernel_backends(device)
    for case, args in step_states(problem, torch.float32):
        hq, q, q_prev, beta_prev, basis = args
        exact = lanczos_step_ref(*(t.double() for t in (hq, q, q_prev)), torch.tensor(beta_prev, dtype=torch.float64),
                                 basis.double())[0]
        plain = torch_step(*args)
        check_plain(plain, exact)  # the baseline is the plain step, gated by itself; and the reference is the package's
        gate = plain_error_tolerance(plain, exact, 16 * torch.finfo(torch.float32).eps * exact.abs().max().item())
        candidates = {STEP_BASELINE: lambda args=args: torch_step(*args)}
        for b in backends:
            candidates[f"ours:{b}"] = lambda args=args, b=b: lanczos_step(*args, backend=b)[0]
        timed = []
        for name, fn in candidates.items():
            m = check(case, name, fn, exact, gate)
            if m.status == "ok":
                m.extra["orthogonality"] = (basis.double() @ fn().double()).abs().max().item()
                timed.append((m, fn))
            results.append(m)
        measure_interleaved(timed, device, min_time=min_time)
        base = next(m for m in results if m.case == case and m.candidate == STEP_BASELINE)
        for m, _ in timed:
            m.extra["speedup_vs_" + STEP_BASELINE] = base.median_s / m.median_s
        cases.append({"name": case, "d": hq.shape[0], "m": basis.shape[0], "gate_abs": gate})
    return results, cases


def run(device: torch.device, *, quick: bool = False, min_time: float = 0.5) -> tuple[list[Measurement], dict]:
    """Both solvers on each problem's Hessian (``hessian_operator(path="auto")``).

    Args:
        device: where to run.
        quick: smaller models and shorter training (seconds in all).
        min_time: seconds of timing per candidate (at least 5 calls each).

    Returns:
        The measurements (``extra``: ``num_hvps`` of one call, ``eigenvalues``, and
        ``max_rel_diff_vs_eigsh``; for the step cases ``orthogonality`` and the speedup against
        ``torch float32``) and the suite's config.
    """
    loss_fn = nn.CrossEntropyLoss()
    results: list[Measurement] = []
    cases = []
    problems = _problems(device, quick)
    wide = problems[-1][0]
    for problem, dtype in problems:
        model = copy.deepcopy(problem.model).to(dtype)
        op = hessian_operator(model, loss_fn, (problem.x.to(dtype), problem.y))
        exact = top_eigsh(reference_operator(problem, loss_fn), NUM_EIGS, REFERENCE_TOLERANCE)
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
    steps, step_cases = run_steps(wide, device, min_time)
    results += steps
    config = {"cases": cases, "step_cases": step_cases, "step_baseline": STEP_BASELINE, "num_eigs": NUM_EIGS,
              "which": "largest algebraic", "max_steps_ours": MAX_STEPS,
              "ours": "lanczos(reorth='full', return_eigenvectors=False)",
              "eigsh": "which='LA', default ncv, v0 = a fixed Gaussian vector, return_eigenvectors=False",
              "reference": f"eigsh tol={REFERENCE_TOLERANCE} on the float64 model's Hessian by plain double backward",
              "min_time_s": min_time}
    return results, config
