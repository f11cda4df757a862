"""The cubic-regularised Newton subproblem ``min_s g^T s + 1/2 s^T H s + (M/6) ||s||^3``: how the
three solvers of ``cubic_newton_step`` (dense, krylov, gd) scale with the dimension d.

Operators: synthetic ``H = diag(D) + U diag(c) U^T`` (D spread evenly over [-0.2, 1], so H is
indefinite; U an orthonormal d x 10 basis with spikes c from 2 to 10) as a matvec closure of cost
O(10 d), for d from 1e3 to 1e6, and the Hessian of a trained digits MLP (float64). The same spectrum
shape at every d isolates the cost of d itself.

Every method gets the same kind of stopping rule, on the norm of the model's gradient (krylov: its
Lanczos residual estimate; gd: computed): ``<= 1e-5 ||g||``. The target is a model value within 1e-8
(relative) of the reference m*, computed by numpy and scipy, not by the package's solvers (see
``reference_step``: Woodbury solves for the synthetic operators at every d, numpy's eigh of the model's dense
Hessian). The check recomputes m(s) from the returned step (one extra product, untimed).
gd uses the step size 1 / (lambda_max + M ||s*||), with lambda_max from a 60-step Lanczos and ||s*||
from the reference (the best fixed step, a setting favourable to gd); a gd run that hits its step
cap before the target is reported as not reached and not timed. krylov runs with its hard-case
guard (the default: a probe block of up to 20 more products) and without it (``krylov:no-guard``).
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from torch import nn

from unlearn_kernels.checkpoint import save_figure
from unlearn_kernels.report import new_figure
from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.solvers import cubic_model_value, cubic_newton_step, lanczos

from .common import RESULTS_DIR, Measurement, measure
from .lanczos import trained_digits

BASELINE = "krylov"
OURS = ("dense", "krylov", "krylov:no-guard", "gd")
"""The package's candidates here (besides any named "ours..."): the runner fails when one is wrong."""
QUICK = {"quick": True, "min_time": 0.05}
"""What the runner passes for ``--quick``."""
DIMENSIONS = (1_000, 2_000, 10_000, 100_000, 1_000_000)
QUICK_DIMENSIONS = (1_000, 10_000)
DENSE_MAX = 2_000
"""Largest d for the dense method (float64 eigh: about 2 s at d = 2000, 7 s at 3000 on one core here)."""
TARGET = 1e-8
"""Relative model-value error to reach."""
STOP_TOL = 1e-5
"""Model-gradient tolerance of krylov (kappa) and gd (tol), relative to ||g||."""
GD_MAX_STEPS = 5_000
SYNTHETIC_M = 1.0
MODEL_M = 5.0
"""M for the real model (the StoCuReNU authors' reported default)."""


class LowRankPlusDiagonal:
    """``H = diag(D) + U diag(c) U^T`` in float64, an operator with ``matvec``/``shape``/``dtype``/``device``.

    Args:
        d: dimension.
        rank: columns of U (orthonormal, seeded).
        seed: seeds U.
    """

    def __init__(self, d: int, rank: int = 10, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.diag = -0.2 + 1.2 * (torch.arange(d, dtype=torch.float64) + 0.5) / d
        self.basis = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0]
        self.spikes = torch.linspace(2.0, 10.0, rank, dtype=torch.float64)
        self.shape = (d, d)
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` in O(rank d)."""
        return self.diag * v + self.basis @ (self.spikes * (self.basis.T @ v))


def model_value_and_residual(H, g: torch.Tensor, s: torch.Tensor, M: float) -> tuple[float, float]:
    """m(s) and the norm of its gradient ``||g + H s + (M/2) ||s|| s||``, in float64, with one product of H."""
    Hs = H.matvec(s)
    gradient = g + Hs + 0.5 * M * torch.linalg.vector_norm(s) * s
    return cubic_model_value(g, s, Hs, M), float(torch.linalg.vector_norm(gradient))

#: the suite's cases are float64 CPU problems (the dense oracle)
DEVICES = ("cpu",)


def _problems(quick: bool) -> list[tuple[str, object, torch.Tensor, float]]:
    """(name, operator, g, M) for each case."""
    out = []
    for d in QUICK_DIMENSIONS if quick else DIMENSIONS:
        g = torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / math.sqrt(d)
        out.append((f"synthetic d={d}", LowRankPlusDiagonal(d), g, SYNTHETIC_M))
    problem = trained_digits((8,) if quick else (16,), epochs=1 if quick else 10, device=torch.device("cpu"))
    # batch_size bounds the memory of the dense method's d-column matmat (same operator).
    op = hessian_operator(copy.deepcopy(problem.model).double(), nn.CrossEntropyLoss(),
                          (problem.x.double(), problem.y), batch_size=256)
    out.append((f"{problem.name} d={op.shape[0]}", op, op.gradient(), MODEL_M))
    return out


def _secular_root(step_at: Callable[[float], np.ndarray], low: float, M: float) -> float:
    """The sigma in (low, inf) with ``||s(sigma)|| = 2 sigma / M`` (scipy's brentq): on that interval
    ``H + sigma I`` is positive definite, ``||s||`` falls and ``2 sigma / M`` rises, so the root is the
    global minimiser's (the easy case; the hard case, where no root lies above ``low``, is refused)."""
    def phi(sigma: float) -> float:
        return float(np.linalg.norm(step_at(sigma))) - 2.0 * sigma / M

    a = low + 1e-12 * max(1.0, abs(low))
    if phi(a) <= 0:
        raise ValueError("the reference's secular equation has no root above -lambda_min (the hard case)")
    b = max(2.0 * a, 1.0)
    while phi(b) > 0:
        b *= 2.0
    return scipy.optimize.brentq(phi, a, b, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)


def reference_step(H, g: torch.Tensor, M: float) -> tuple[float, float, str]:
    """(m*, ||s*||, how), by numpy and scipy, not by the package's solvers (the candidates): the
    synthetic operators by the Woodbury identity on their diagonal-plus-low-rank form (any d; H +
    sigma I is positive definite for sigma > -min D, as the rank-10 part is PSD), the model's Hessian
    (d <= DENSE_MAX) by numpy's eigh of its dense matrix; sigma from the secular equation either way."""
    gn = g.numpy()
    if isinstance(H, LowRankPlusDiagonal):
        D, B, S = H.diag.numpy(), H.basis.numpy(), H.spikes.numpy()

        def step_at(sigma: float) -> np.ndarray:
            inv = 1.0 / (D + sigma)
            first = inv * gn
            core = np.diag(1.0 / S) + B.T @ (inv[:, None] * B)
            return -(first - inv * (B @ np.linalg.solve(core, B.T @ first)))

        s = step_at(_secular_root(step_at, max(0.0, -float(D.min())), M))
        Hs = D * s + B @ (S * (B.T @ s))
        how = "numpy: Woodbury solves, sigma by scipy's brentq"
    elif g.shape[0] <= DENSE_MAX:
        A = H.to_dense().numpy()
        lam, U = np.linalg.eigh((A + A.T) / 2)
        c = U.T @ gn

        def step_at(sigma: float) -> np.ndarray:
            return -c / (lam + sigma)

        y = step_at(_secular_root(step_at, max(0.0, -float(lam[0])), M))
        s, Hs = U @ y, U @ (lam * y)
        how = "numpy: eigh of the dense matrix, sigma by scipy's brentq"
    else:
        raise ValueError(f"no independent reference for a d = {g.shape[0]} operator that is not synthetic")
    norm = float(np.linalg.norm(s))
    return float(gn @ s + 0.5 * s @ Hs + M / 6.0 * norm**3), norm, how


def run(device: torch.device, *, quick: bool = False, min_time: float = 0.5) -> tuple[list[Measurement], dict]:
    """dense (d <= DENSE_MAX), krylov (with and without the hard-case guard) and gd on every case
    (float64, CPU).

    Args:
        device: must be the CPU (the synthetic operators and the solvers' small problems live there).
        quick: d in QUICK_DIMENSIONS, a less trained model (seconds in all).
        min_time: seconds of timing per candidate (at least 5 calls each).

    Returns:
        The measurements (``extra``: ``d``, ``num_hvps``, ``iterations``, ``rel_model_error``) and the
        suite's config.
    """
    if device.type != "cpu":
        raise ValueError(f"the cubic suite runs on the CPU (synthetic float64 operators), got device {device}")
    results: list[Measurement] = []
    cases = []
    for name, H, g, M in _problems(quick):
        d = g.shape[0]
        m_star, s_norm, how = reference_step(H, g, M)
        lam_max = lanczos(H, 60, v0=g, tol=1e-6, return_eigenvectors=False).eigenvalues.max().item()
        eta = 1.0 / (lam_max + M * s_norm)
        methods: dict[str, Callable] = {
            "krylov": lambda: cubic_newton_step(H, g, M, method="krylov", k_max=500, kappa=STOP_TOL),
            # The hard-case guard's probe block costs up to probe_steps (20) more products.
            "krylov:no-guard": lambda: cubic_newton_step(H, g, M, method="krylov", k_max=500, kappa=STOP_TOL,
                                                         guard=False),
            "gd": lambda: cubic_newton_step(H, g, M, method="gd", K=GD_MAX_STEPS, eta=eta, tol=STOP_TOL),
        }
        if d <= DENSE_MAX:
            methods = {"dense": lambda: cubic_newton_step(H, g, M, method="dense"), **methods}
        for method, solve in methods.items():
            steps = []

            def value(solve=solve) -> torch.Tensor:
                steps.append(solve())
                return torch.tensor([steps[-1].model_value], dtype=torch.float64)

            m = measure(name, method, value, torch.tensor([m_star], dtype=torch.float64), TARGET * abs(m_star),
                        device, min_time=min_time, warmup=0)
            if not steps:  # the solver raised: measure reported it
                results.append(m)
                continue
            first = steps[0]
            value, residual = model_value_and_residual(H, g, first.step, M)
            rel = abs(value - m_star) / abs(m_star)
            # gradient descent may stop short of the target: at its step cap, or by its own tolerance, which its
            # step must then meet (a wrong step reported converged stays wrong)
            stopped_short = (residual <= STOP_TOL * float(torch.linalg.vector_norm(g)) * (1 + 1e-9)
                             if first.converged else first.iterations == GD_MAX_STEPS)
            if m.status == "wrong" and method == "gd" and stopped_short:
                m.status = (f"stopped by its tolerance short of the target after {first.iterations} steps"
                            if first.converged else f"not reached in {first.iterations} steps")
            elif rel > TARGET:  # the solver's own value agreed but the step does not give it: wrong, so untimed
                m.status, m.median_s, m.iqr_s = "wrong", None, None
            m.extra.update(d=d, num_hvps=first.num_hvps, iterations=first.iterations, rel_model_error=rel,
                           converged=first.converged, hard_case=first.hard_case)
            results.append(m)
        cases.append({"name": name, "d": d, "M": M, "reference": how, "m_star": m_star, "step_norm": s_norm,
                      "lambda_max": lam_max, "gd_eta": eta})
    config = {"cases": cases, "target_rel_model_error": TARGET, "stop_tol": STOP_TOL, "gd_max_steps": GD_MAX_STEPS,
              "krylov": "k_max=500, kappa=stop_tol, full reorthogonalisation, hard-case guard on (default) or off",
              "dense_max_d": DENSE_MAX, "dtype": "float64", "min_time_s": min_time}
    return results, config


def plot_scaling(results: Path = RESULTS_DIR / "cubic_cpu.json",
                 out: Path = Path(__file__).resolve().parent.parent / "docs" / "img" / "cubic_scaling.png") -> Path:
    """Time and Hessian-vector products against d for each method on the synthetic cases (log-log)."""
    data = json.loads(Path(results).read_text())
    rows = [r for r in data["results"]
            if r["case"].startswith("synthetic") and r["median_s"] is not None]
    fig = new_figure(figsize=(10, 4))
    ax_t, ax_h = fig.subplots(1, 2)
    for method in ("dense", "krylov", "krylov:no-guard", "gd"):
        pts = sorted((r["extra"]["d"], r["median_s"], r["extra"]["num_hvps"]) for r in rows if r["candidate"] == method)
        if pts:
            d, t, h = zip(*pts)
            ax_t.plot(d, t, "o-", label=method)
            ax_h.plot(d, h, "o-", label=method)
    for ax, label in ((ax_t, "median time to 1e-8 model value (s)"), (ax_h, "Hessian-vector products")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dimension d")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Cubic subproblem, synthetic low-rank + diagonal H "
                 f"(float64, {data['environment']['cpu_threads']} CPU thread(s))")
    fig.tight_layout()
    save_figure(fig, out)
    return out


PLOT = plot_scaling  # the runner redraws the docs' plot whenever it replaces the committed CPU JSON
