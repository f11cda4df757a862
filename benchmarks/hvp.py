"""Hessian-vector products, in units of one gradient on the same batch.

Candidates, each applying the exact Hessian of the mean cross entropy over one batch to a vector:

* ``ours:fused``: ``hessian_operator(..., path="fused")`` (the compiled R-operator MLP kernel; MLPs only);
* ``ours:generic``: ``hessian_operator(..., path="generic")`` (torch.func forward-over-reverse);
* ``ours:generic-ror``: the same with ``mode="reverse-over-reverse"`` (double backward, one gradient
  graph shared by the vectors of a matmat);
* ``curvlinops``: ``curvlinops.HessianLinearOperator`` (torch.func forward-over-reverse, vmapped);
* ``pyhessian``: PyHessian's ``dataloader_hv_product`` (forward, gradient with create_graph, double backward);
* ``autograd``: plain ``torch.autograd.grad`` double backward, the same three steps written out;
* ``pyhessian:cached-graph``: PyHessian's single-batch mode, which builds the gradient graph once and only
  back-propagates through it per product. It skips the forward and the gradient, so it is only valid at
  fixed weights on one batch whose double-backward graph is held in memory; it is listed apart and left
  out of the "fastest anchor" (every other candidate does one pass over the data per product, as the
  ``CurvatureOperator`` contract requires).

Every candidate is checked against a float64 double-backward reference before it is timed; then all
candidates of a model (the unit, the matvecs and the matmats) are timed interleaved, in bursts of calls
round by round (``common.measure_interleaved``), so that the slow phases of a shared machine hit them
alike. The unit is one ``loss + backward``
of the model on the batch (``torch.autograd.grad``, float32). ``matmat`` over K
vectors is compared with K separate matvecs (K times the measured matvec median: the calls are
independent).
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unlearn_kernels.curvature import flatten_tensors, hessian_operator, unflatten_vector
from unlearn_kernels.data import load_dataset
from unlearn_kernels.models.cnn import SmallCNN
from unlearn_kernels.models.mlp import MLP
from unlearn_kernels.training import TrainConfig, init_model, train

from .common import RESULTS_DIR, Measurement, check, measure_interleaved, plain_error_tolerance

ANCHORS = ("curvlinops", "pyhessian", "autograd")
"""The other libraries' (and plain PyTorch's) per-product HVPs: "fastest anchor" is the fastest of these."""
BASELINE = "autograd"
QUICK = {"quick": True, "min_time": 0.05}
"""What the runner passes for ``--quick``."""
K = 8
"""Vectors per matmat."""
OURS = {"ours:fused": {"path": "fused"}, "ours:generic": {"path": "generic"},
        "ours:generic-ror": {"path": "generic", "mode": "reverse-over-reverse"}}
"""Our candidates and their ``hessian_operator`` options."""


@dataclass
class Problem:
    """One model on one batch (float32, eval mode)."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


def seeded_mlp(in_features: int, hidden: tuple[int, ...], num_classes: int = 10, seed: int = 0) -> nn.Module:
    """The package's ReLU MLP (an ``nn.Sequential`` the fused path accepts), seeded."""
    return init_model(lambda: MLP(in_features, hidden, num_classes), seed)


def digits_problem(hidden: tuple[int, ...], epochs: int = 0, device: torch.device | str = "cpu") -> Problem:
    """An MLP 64-hidden-10 on the whole digits train split as one batch, trained ``epochs`` epochs
    with the default SGD recipe (0: the seeded initialisation), in eval mode."""
    data = load_dataset("digits").train
    model = seeded_mlp(64, hidden)
    if epochs:
        train(model, data, TrainConfig(epochs=epochs), device=device)
    name = f"digits mlp 64-{'-'.join(map(str, hidden))}-10 n={len(data)}" + (f" trained {epochs} ep" if epochs else "")
    return Problem(name, model.to(device).eval(), data.x.to(device), data.y.to(device))


def problems(device: torch.device, quick: bool = False) -> list[Problem]:
    """The benchmark's models and batches: a wide MLP and a small CNN on random data, and a small MLP
    on the real digits train split (where per-call overhead dominates)."""
    gen = torch.Generator().manual_seed(0)
    n_mlp, widths, n_cnn, channels = (128, (64,), 64, (8, 16)) if quick else (2048, (512, 512), 256, (16, 32, 64))
    out = [
        Problem(f"mlp 784-{'-'.join(map(str, widths))}-10 n={n_mlp}", seeded_mlp(784, widths),
                torch.randn(n_mlp, 784, generator=gen), torch.randint(0, 10, (n_mlp,), generator=gen)),
        Problem(f"cnn {'-'.join(map(str, channels))} 28x28 n={n_cnn}", init_model(lambda: SmallCNN(1, 10, channels), 0),
                torch.randn(n_cnn, 1, 28, 28, generator=gen), torch.randint(0, 10, (n_cnn,), generator=gen)),
    ]
    for p in out:
        p.model.to(device).eval()
        p.x, p.y = p.x.to(device), p.y.to(device)
    return out + [digits_problem((128,), device=device)]


def autograd_hvp(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 vectors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """H v by plain double backward: forward, gradient with create_graph, backward of <g, v>."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    return torch.autograd.grad(grads, params, vectors)


def _split(v: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return unflatten_vector(v, [p.shape for p in params])


def reference_hvp(p: Problem, loss_fn: nn.Module, V: torch.Tensor) -> torch.Tensor:
    """H V in float64 (double backward on a float64 copy), one column at a time."""
    model64 = copy.deepcopy(p.model).double()
    params = list(model64.parameters())
    cols = [flatten_tensors(autograd_hvp(model64, loss_fn, p.x.double(), p.y, _split(v, params)))
            for v in V.double().T]
    return torch.stack(cols, dim=1)


def candidates(p: Problem, loss_fn: nn.Module, v: torch.Tensor) -> dict[str, Callable[[], Callable[[], torch.Tensor]]]:
    """name -> builder; a builder sets the candidate up (untimed) and returns the timed call."""
    vs = _split(v, p.params)

    def ours(name: str) -> Callable[[], torch.Tensor]:
        op = hessian_operator(p.model, loss_fn, (p.x, p.y), **OURS[name])
        return lambda: op.matvec(v)

    def curvlinops() -> Callable[[], torch.Tensor]:
        from curvlinops import HessianLinearOperator

        op = HessianLinearOperator(p.model, loss_fn, p.params, [(p.x, p.y)])
        return lambda: op @ v

    def pyhessian(cached: bool) -> Callable[[], torch.Tensor]:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        # PyHessian writes .grad (with a graph) into the model's parameters: give it a copy.
        model = copy.deepcopy(p.model)
        if cached:
            h = hessian(model, loss_fn, data=(p.x, p.y), cuda=p.x.is_cuda)
            return lambda: flatten_tensors(hessian_vector_product(h.gradsH, h.params, _split(v, h.params)))
        h = hessian(model, loss_fn, dataloader=[(p.x, p.y)], cuda=p.x.is_cuda)
        return lambda: flatten_tensors(h.dataloader_hv_product(_split(v, h.params))[1])

    return {
        "ours:fused": lambda: ours("ours:fused"),
        "ours:generic": lambda: ours("ours:generic"),
        "ours:generic-ror": lambda: ours("ours:generic-ror"),
        "curvlinops": curvlinops,
        "pyhessian": lambda: pyhessian(False),
        "autograd": lambda: (lambda: flatten_tensors(autograd_hvp(p.model, loss_fn, p.x, p.y, vs))),
        "pyhessian:cached-graph": lambda: pyhessian(True),
    }


def _build(case: str, name: str, builder: Callable[[], Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor] | Measurement:
    try:
        return builder()
    except (ValueError, ImportError, RuntimeError) as exc:  # e.g. no fused path for a CNN
        return Measurement(case, name, None, None, None, f"unavailable: {type(exc).__name__}: {exc}"[:200])


def run(device: torch.device, *, quick: bool = False, min_time: float = 0.5,
        with_compile: bool = True) -> tuple[list[Measurement], dict]:
    """Every candidate on every problem, plus ``matmat`` of K vectors for our paths.

    Args:
        device: where to run.
        quick: small models (seconds in all).
        min_time: seconds of timing per candidate (at least 5 calls each).
        with_compile: accepted from the runner; this suite has no torch.compile candidate.

    Returns:
        The measurements (``extra`` holds ``gradient_units``, ``vs_fastest_anchor`` = fastest anchor time
        / candidate time, and for matmat rows ``vs_{K}_matvecs``) and the suite's config.
    """
    del with_compile
    loss_fn = nn.CrossEntropyLoss()
    timing = {"min_time": min_time, "warmup": 1}
    eps = torch.finfo(torch.float32).eps
    results: list[Measurement] = []
    cases = []
    for p in problems(device, quick):
        params = p.params
        d = sum(t.numel() for t in params)
        gen = torch.Generator().manual_seed(1)
        V = torch.randn(d, K, generator=gen).to(device)
        exact = reference_hvp(p, loss_fn, V)
        scale = exact.abs().max().item()

        # The unit: one gradient of the mean loss on the batch, checked against float64 too.
        model64 = copy.deepcopy(p.model).double()
        grad64 = flatten_tensors(torch.autograd.grad(loss_fn(model64(p.x.double()), p.y), list(model64.parameters())))
        grad_fn = lambda: flatten_tensors(torch.autograd.grad(loss_fn(p.model(p.x), p.y), params))  # noqa: E731
        grad = check(f"{p.name} gradient", "autograd", grad_fn, grad64, 64 * eps * max(grad64.abs().max().item(), 1.0))
        timed = [(grad, grad_fn)] if grad.status == "ok" else []

        # Gate: twice the error of plain float32 autograd double backward against float64.
        v = V[:, 0].contiguous()
        plain = flatten_tensors(autograd_hvp(p.model, loss_fn, p.x, p.y, _split(v, params)))
        tol = plain_error_tolerance(plain, exact[:, 0], 16 * eps * scale)

        case = f"{p.name} hvp"
        rows: dict[str, Measurement] = {}
        for name, builder in candidates(p, loss_fn, v).items():
            fn = _build(case, name, builder)
            if isinstance(fn, Measurement):
                rows[name] = fn
                continue
            rows[name] = check(case, name, fn, exact[:, 0], tol)
            if rows[name].status == "ok":
                timed.append((rows[name], fn))

        # matmat of K vectors in one data pass against K matvecs, for our paths.
        mm_case = f"{p.name} matmat K={K}"
        matmats: dict[str, Measurement] = {}
        for name, options in OURS.items():
            if rows[name].status != "ok":
                continue
            op = hessian_operator(p.model, loss_fn, (p.x, p.y), **options)
            fn = lambda op=op: op.matmat(V)  # noqa: E731
            matmats[name] = check(mm_case, name, fn, exact, 2 * tol)
            if matmats[name].status == "ok":
                timed.append((matmats[name], fn))

        measure_interleaved(timed, device, **timing)
        unit = grad.median_s
        results.append(grad)
        anchor_times = [rows[a].median_s for a in ANCHORS if rows[a].median_s]
        fastest = min(anchor_times) if anchor_times else None
        for m in rows.values():
            if m.median_s:
                m.extra["gradient_units"] = m.median_s / unit if unit else None
                m.extra["vs_fastest_anchor"] = fastest / m.median_s if fastest else None
        results.extend(rows.values())
        for name, m in matmats.items():
            if m.median_s:
                m.extra["gradient_units"] = m.median_s / unit if unit else None
                m.extra["gradient_units_per_vector"] = m.median_s / K / unit if unit else None
                m.extra[f"{K}_matvecs_s"] = K * rows[name].median_s
                m.extra[f"vs_{K}_matvecs"] = K * rows[name].median_s / m.median_s
            results.append(m)
        auto = hessian_operator(p.model, loss_fn, (p.x, p.y))
        cases.append({"name": p.name, "d": d, "n": int(p.y.shape[0]), "auto_path": auto.path,
                      "auto_path_reason": auto.path_reason, "gradient_s": unit, "tolerance": tol})
    config = {
        "cases": cases, "dtype": "float32", "K": K, "min_time_s": min_time, "quick": quick,
        "anchors": list(ANCHORS), "loss": "nn.CrossEntropyLoss() (mean)",
        "versions": {pkg: _version(pkg) for pkg in ("curvlinops-for-pytorch", "PyHessian")},
        "unit": "one loss + torch.autograd.grad of the model on the same batch (float32)",
        "reference": "float64 double backward on a float64 copy of the model",
        "note": "pyhessian:cached-graph reuses one gradient graph (no forward, no gradient per product); "
                "excluded from the fastest anchor",
    }
    return results, config


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def plot_gradient_units(results: Path = RESULTS_DIR / "hvp_cpu.json",
                        out: Path = Path(__file__).resolve().parent.parent / "docs" / "img" / "hvp_gradient_units.png") -> Path:
    """Bar chart: one HVP in gradient units, per candidate and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(results).read_text())
    rows = [r for r in data["results"] if r["case"].endswith(" hvp")]
    models = list(dict.fromkeys(r["case"][: -len(" hvp")] for r in rows))
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        units = [next((r["extra"].get("gradient_units") or 0.0 for r in rows
                       if r["candidate"] == name and r["case"] == f"{m} hvp"), 0.0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], units, width, label=name)
    ax.axhline(2.5, color="gray", linestyle="--", linewidth=1, label="target for ours:fused (2.5)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models, fontsize=8)
    ax.set_ylabel("time of one HVP / time of one gradient")
    ax.set_title(f"Hessian-vector product cost ({data['environment']['cpu_threads']} CPU thread(s); "
                 "missing bar: not applicable)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
