"""Hessian-vector products at fixed weights, in units of one gradient on the same batch.

Candidates, each applying the exact Hessian of the mean cross entropy over one batch to a vector,
many times at the same weights (as Lanczos, the Krylov cubic solver and CureNewton do):

* ``ours:fused``: ``hessian_operator(..., path="fused")`` (MLPs: the compiled R-operator kernel;
  Conv-ReLU-MaxPool networks: ``FusedConvHessian``'s explicit R-passes; other models: not run), with
  its fixed-weight cache (forward, softmax and the gradient's backward kept; each product runs the
  R-passes only);
* ``ours:generic``: ``hessian_operator(..., path="generic")`` (mode "auto": double backward through
  the batch's gradient graph, which is kept at fixed weights);
* ``ours:fused-stream`` / ``ours:generic-stream``: the same with ``cache_bytes=0`` (every product
  recomputes the forward and the gradient);
* ``ours:generic-fwd``: ``mode="forward-over-reverse"`` (torch.func ``jvp(grad)``, no cache);
* ``ours:fused-aten-gemm`` (MLPs): ``ours:fused`` built and run within :func:`unlearn_kernels.aten_gemm`, its
  float32 GEMMs through ATen's GEMM (``torch.mm``'s, as the anchors') where ``ours:fused`` takes oneDNN's (the
  environment's ``cpu_gemm``): how much of our lead is the GEMM library's;
* ``ours:generic-aten-gemm`` (the MLPs and the ViT, whose work is mostly in linear layers): ``ours:generic`` built
  and run within :func:`unlearn_kernels.aten_gemm`, so that its graph has torch's own linear layers, as on a
  machine without the oneDNN route, where ``ours:generic``'s take :func:`unlearn_kernels.ops.gemm`'s (its
  convolutions' second derivatives are ours on both);
* ``curvlinops``: ``curvlinops.HessianLinearOperator`` (torch.func forward-over-reverse, vmapped);
* ``pyhessian``: PyHessian's ``dataloader_hv_product`` (forward, gradient with create_graph, double backward);
* ``autograd``: plain ``torch.autograd.grad`` double backward, the same three steps written out;
* ``pyhessian:cached-graph``: PyHessian's single-batch mode, which builds the gradient graph once and
  only back-propagates through it per product (valid at fixed weights, like our caches).

The "fastest anchor" is the fastest of curvlinops, pyhessian, autograd and pyhessian:cached-graph.
Every candidate is checked against a float64 double-backward reference before it is timed (the gate
also records its set-up's and first call's peak memory); then all candidates of a model (the unit,
the matvecs and the matmats) are timed interleaved, in bursts of calls round by round
(``common.measure_interleaved``), so that the slow phases of a shared machine hit them alike. The
unit is one ``loss + backward`` of the model on the batch (``torch.autograd.grad``, float32).
``matmat`` over K vectors is compared with K separate matvecs of the same operator and with K
products of the streaming one (K times the measured matvec median: the calls are independent).
The two large models (ResNet-18, the ViT) get the products only, no matmat and no streaming or
forward-mode variants, to keep the suite's time in bounds.
"""
from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from unlearn_kernels import aten_gemm
from unlearn_kernels.checkpoint import save_figure
from unlearn_kernels.report import new_figure
from unlearn_kernels.curvature import flatten_tensors, hessian_operator, unflatten_vector
from unlearn_kernels.curvature.fused_mlp import supports
from unlearn_kernels.data import load_digits_all
from unlearn_kernels.models import ResNet18, SmallViT
from unlearn_kernels.models.cnn import SmallCNN
from unlearn_kernels.models.mlp import MLP
from unlearn_kernels.training import init_model

from .common import (
    RESULTS_DIR,
    Measurement,
    check,
    measure_interleaved,
    package_version,
    peak_memory,
    plain_error_tolerance,
    unavailable,
    within_aten_gemm,
)

ANCHORS = ("curvlinops", "pyhessian", "autograd", "pyhessian:cached-graph")
"""The other libraries' (and plain PyTorch's) HVPs: "fastest anchor" is the fastest of these."""
BASELINE = "autograd"
QUICK = {"quick": True, "min_time": 0.05}
"""What the runner passes for ``--quick``."""
K = 8
"""Vectors per matmat."""
OURS = {
    "ours:fused": {"path": "fused"},
    "ours:generic": {"path": "generic"},
    "ours:fused-stream": {"path": "fused", "cache_bytes": 0},
    "ours:generic-stream": {"path": "generic", "cache_bytes": 0},
    "ours:generic-fwd": {"path": "generic", "mode": "forward-over-reverse"},
}
"""Our candidates and their ``hessian_operator`` options."""
MATMAT = ("ours:fused", "ours:generic")
"""Our candidates timed with matmat over K vectors too."""
EXPECTED_UNAVAILABLE = ("not an nn.Sequential of Linear layers and activations",)
"""Why a candidate of ours may be unavailable without failing the run: the fused path on a model whose structure
is not an MLP's (ResNet-18, the ViT); a missing or failing kernel on an MLP fails it."""
STREAM_OF = {"ours:fused": "ours:fused-stream", "ours:generic": "ours:generic-stream"}


@dataclass
class Problem:
    """One model on one batch (float32, eval mode). ``large``: products only (no matmat, no variants)."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    large: bool = False

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())


def seeded_mlp(in_features: int, hidden: tuple[int, ...], num_classes: int = 10, seed: int = 0,
               activation: str = "relu") -> nn.Module:
    """The package's MLP (an ``nn.Sequential`` the fused path accepts), seeded."""
    return init_model(lambda: MLP(in_features, hidden, num_classes, activation=activation), seed)


def digits_problem(hidden: tuple[int, ...], activation: str = "tanh", device: torch.device | str = "cpu") -> Problem:
    """An MLP 64-hidden-10 (seeded initialisation, eval mode) on all of digits (pixels / 16, float32, as rows of
    64) as one batch."""
    digits = load_digits_all()
    model = seeded_mlp(64, hidden, activation=activation)
    name = f"digits {activation} mlp 64-{'-'.join(map(str, hidden))}-10 n={len(digits)}"
    x = digits.x.to(device, torch.float32).view(len(digits), 64)
    return Problem(name, model.to(device).eval(), x, digits.y.to(device))


def digits_cnn_problem(channels: tuple[int, ...], device: torch.device | str = "cpu") -> Problem:
    """The package's SmallCNN (seeded) on all of digits as 8x8 images (pixels / 16, float32), one batch: the
    fidelity study's CNN, whose maps shrink to 4x4 and 2x2."""
    digits = load_digits_all()
    model = init_model(lambda: SmallCNN(1, 10, channels), 0)
    name = f"digits cnn {'-'.join(map(str, channels))} 8x8 n={len(digits)}"
    return Problem(name, model.to(device).eval(), digits.x.to(device, torch.float32), digits.y.to(device))


def problems(device: torch.device, quick: bool = False) -> list[Problem]:
    """The benchmark's models and batches: the tanh MLP and the small CNN on all of digits (per-call
    overhead dominates), then on random data (seeded) a wide ReLU MLP, the small CNN on 28x28 images,
    ResNet-18 on CIFAR-shaped input and the small ViT."""
    gen = torch.Generator().manual_seed(0)
    if quick:
        n_mlp, widths, n_cnn, channels, n_big, width = 128, (64,), 32, (8, 16), 4, 8
    else:
        n_mlp, widths, n_cnn, channels, n_big, width = 2048, (512, 512), 256, (16, 32, 64), 64, 64

    def data(n: int, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    out = [
        Problem(f"mlp 784-{'-'.join(map(str, widths))}-10 n={n_mlp}", seeded_mlp(784, widths), *data(n_mlp, 784)),
        Problem(f"cnn {'-'.join(map(str, channels))} 28x28 n={n_cnn}", init_model(lambda: SmallCNN(1, 10, channels), 0),
                *data(n_cnn, 1, 28, 28)),
        Problem(f"resnet18 width {width} 3x32x32 n={n_big}", init_model(lambda: ResNet18(10, 3, width), 0),
                *data(n_big, 3, 32, 32), large=True),
        Problem(f"vit 32x32 patch 4 n={n_big}", init_model(lambda: SmallViT(32, 4, 3, 10), 0), *data(n_big, 3, 32, 32),
                large=True),
    ]
    for p in out:
        p.model.to(device).eval()
        p.x, p.y = p.x.to(device), p.y.to(device)
    return [digits_problem((128,), device=device), digits_cnn_problem(channels, device=device)] + out


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

    def ours_on_atens_gemm(name: str) -> Callable[[], torch.Tensor]:
        with aten_gemm():  # built there too: the generic path's graph then has torch's own linear layers
            return within_aten_gemm(ours(name))

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

    out = {name: (lambda name=name: ours(name)) for name in OURS}
    out.update({
        "curvlinops": curvlinops,
        "pyhessian": lambda: pyhessian(False),
        "autograd": lambda: (lambda: flatten_tensors(autograd_hvp(p.model, loss_fn, p.x, p.y, vs))),
        "pyhessian:cached-graph": lambda: pyhessian(True),
    })
    # the CPU's GEMM route (aten_gemm() toggles oneDNN, which a GPU does not use: there they repeat the rows above)
    on_cpu = p.x.device.type == "cpu"
    if on_cpu and supports(p.model, loss_fn) is None:  # an MLP: the compiled passes' GEMMs (a CNN's convolutions
        out["ours:fused-aten-gemm"] = lambda: ours_on_atens_gemm("ours:fused")  # are torch's)
    if on_cpu and (supports(p.model, loss_fn) is None or isinstance(p.model, SmallViT)):  # mostly linear layers
        out["ours:generic-aten-gemm"] = lambda: ours_on_atens_gemm("ours:generic")
    if p.large:
        for name in ("ours:fused-stream", "ours:generic-stream", "ours:generic-fwd"):
            del out[name]
    return out


def gate_tolerance(p: Problem, loss_fn: nn.Module, v: torch.Tensor, exact: torch.Tensor, scale: float) -> float:
    """The products' correctness gate: twice the error of plain float32 double backward (H v) against
    the float64 ``exact``, plus 16 eps of ``scale``."""
    plain = flatten_tensors(autograd_hvp(p.model, loss_fn, p.x, p.y, _split(v, p.params)))
    return plain_error_tolerance(plain, exact, 16 * torch.finfo(torch.float32).eps * scale)


def gated(case: str, name: str, builder: Callable[[], Callable[[], torch.Tensor]], exact: torch.Tensor,
           tol: float, device: torch.device) -> tuple[Measurement, Callable[[], torch.Tensor] | None]:
    """Set-up and correctness gate, with the peak memory of both (the set-up may build a cache)."""
    with peak_memory(device) as peak:
        try:
            fn = builder()
        except (ValueError, ImportError, RuntimeError) as exc:  # e.g. no fused path for a CNN
            return Measurement(case, name, None, None, None, unavailable(exc)), None
        m = check(case, name, fn, exact, tol)
    m.peak_memory_bytes = peak.bytes if m.status == "ok" else None
    return m, (fn if m.status == "ok" else None)


def run(device: torch.device, *, quick: bool = False, min_time: float = 0.5) -> tuple[list[Measurement], dict]:
    """Every candidate on every problem, plus ``matmat`` of K vectors for our cached paths.

    Args:
        device: where to run.
        quick: small models (seconds in all).
        min_time: seconds of timing per candidate (at least 5 calls each).

    Returns:
        The measurements (``extra`` holds ``gradient_units``, ``vs_fastest_anchor`` = fastest anchor time
        / candidate time, and for matmat rows ``vs_{K}_matvecs`` and ``vs_{K}_streamed_products``) and
        the suite's config.
    """
    loss_fn = nn.CrossEntropyLoss()
    eps = torch.finfo(torch.float32).eps
    results: list[Measurement] = []
    cases = []
    for p in problems(device, quick):
        params = p.params
        d = sum(t.numel() for t in params)
        gen = torch.Generator().manual_seed(1)
        V = torch.randn(d, 1 if p.large else K, generator=gen).to(device)
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
        tol = gate_tolerance(p, loss_fn, v, exact[:, 0], scale)

        case = f"{p.name} hvp"
        rows: dict[str, Measurement] = {}
        for name, builder in candidates(p, loss_fn, v).items():
            rows[name], fn = gated(case, name, builder, exact[:, 0], tol, device)
            if fn is not None:
                timed.append((rows[name], fn))

        # matmat of K vectors in one data pass, for our cached paths.
        mm_case = f"{p.name} matmat K={K}"
        matmats: dict[str, Measurement] = {}
        for name in MATMAT if not p.large else ():
            if rows[name].status != "ok":
                continue

            def builder(name: str = name) -> Callable[[], torch.Tensor]:
                op = hessian_operator(p.model, loss_fn, (p.x, p.y), **OURS[name])
                return lambda: op.matmat(V)

            matmats[name], fn = gated(mm_case, name, builder, exact, 2 * tol, device)
            if fn is not None:
                timed.append((matmats[name], fn))

        # Large models: each call takes seconds, so no warm-up calls between rounds.
        measure_interleaved(timed, device, min_time=min_time, warmup=0 if p.large else 1)
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
                stream = rows.get(STREAM_OF[name])
                if stream is not None and stream.median_s:
                    m.extra[f"vs_{K}_streamed_products"] = K * stream.median_s / m.median_s
            results.append(m)
        auto = hessian_operator(p.model, loss_fn, (p.x, p.y))
        cases.append({"name": p.name, "d": d, "n": int(p.y.shape[0]), "auto_path": auto.path,
                      "auto_path_reason": auto.path_reason, "auto_mode": getattr(auto, "mode", None),
                      "auto_mode_reason": getattr(auto, "mode_reason", None), "gradient_s": unit, "tolerance": tol,
                      "fastest_anchor": min((a for a in ANCHORS if rows[a].median_s), key=lambda a: rows[a].median_s,
                                            default=None)})
    config = {
        "cases": cases, "dtype": "float32", "K": K, "min_time_s": min_time,
        "anchors": list(ANCHORS), "loss": "nn.CrossEntropyLoss() (mean)",
        "versions": {pkg: package_version(pkg) for pkg in ("curvlinops-for-pytorch", "PyHessian")},
        "unit": "one loss + torch.autograd.grad of the model on the same batch (float32)",
        "reference": "float64 double backward on a float64 copy of the model",
        "note": "all products at fixed weights; ours:* keep per-batch state (cache_bytes default) except *-stream; "
                "pyhessian:cached-graph keeps its gradient graph; peak_memory_bytes covers set-up and the first call",
    }
    return results, config


def plot_gradient_units(results: Path = RESULTS_DIR / "hvp_cpu.json",
                        out: Path = Path(__file__).resolve().parent.parent / "docs" / "img" / "hvp_gradient_units.png") -> Path:
    """Bar chart: one HVP in gradient units, per candidate and model."""
    data = json.loads(Path(results).read_text())
    rows = [r for r in data["results"] if r["case"].endswith(" hvp")]
    models = list(dict.fromkeys(r["case"][: -len(" hvp")] for r in rows))
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    from matplotlib import colormaps

    fig = new_figure(figsize=(12, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(names)
    colours = colormaps["tab20"]  # one colour a candidate: the default cycle has 10 for the suite's 11
    for i, name in enumerate(names):
        units = [next((r["extra"].get("gradient_units") or 0.0 for r in rows
                       if r["candidate"] == name and r["case"] == f"{m} hvp"), 0.0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], units, width, label=name, color=colours(i % 20))
    labels = [textwrap.fill(m, 20) for m in models]  # six long case names side by side
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], labels, fontsize=8)
    ax.set_ylabel("time of one HVP / time of one gradient")
    ax.set_title(f"Hessian-vector products at fixed weights ({data['environment']['cpu_threads']} CPU thread(s); "
                 "missing bar: not run or not applicable)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, covering none
    fig.tight_layout()
    save_figure(fig, out)
    return out


PLOT = plot_gradient_units  # the runner redraws the docs' plot whenever it replaces the committed CPU JSON
