"""The arithmetic floor of an exact Hessian-vector product at fixed weights: ``python -m benchmarks floors``.

At fixed weights a cached product (ours, PyHessian's single-batch mode) needs no forward and no
gradient: what is left are the tangent-dependent matmuls or convolutions, which no exact float32
product can skip. Per Linear or Conv2d layer with input h, output gradient d, weight W and tangent V
(Rh, Rd their R-derivatives): the R-forward ``Rh W^T + h V^T``, the R-backward to the layer's input
``Rd W + d V`` and the weight product ``Rd^T h + d^T Rh``; the first layer, whose input does not depend
on the weights, needs only ``h V^T`` and ``Rd^T h`` (for a convolution: the same six as convolutions,
``conv``, its input gradient and its weight gradient, in the fastest form we know: channels-last, and
the first layer's two as matmuls with its input's im2col matrix, which is fixed). This suite times exactly those
operations on tensors of the products' shapes (``floor``), interleaved with ours (``hessian_operator``'s
``ours:fused`` and ``ours:generic`` paths) and PyHessian's cached graph, on the wide MLP and the CNN of the hvp
suite; every
row's ``vs_floor`` is floor time / its time (1 = at the floor), and ``floor_bound`` on the anchor is
the most any exact product could gain on it (anchor time / floor time). Elementwise work (activations,
pooling, the loss rows) is left out of the floor, so it is a lower bound for products whose matmuls are
torch's, as the anchors' are. Our compiled MLP passes take oneDNN's GEMM where ``unlearn_kernels.cpu_gemm()``
says ``"onednn"`` (the environment's ``cpu_gemm``), which can run under this floor; ``ours:fused-aten-gemm``
(the MLP only) is ``ours:fused`` on torch's GEMM, against the floor of the same GEMM. The CNN's convolutions are
torch's (oneDNN's) on every path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from .common import Measurement, measure_interleaved
from .hvp import candidates, gate_tolerance, gated, problems, reference_hvp

BASELINE = "floor"
QUICK = {"quick": True, "min_time": 0.05}
"""What the runner passes for ``--quick``."""
CANDIDATES = ("ours:fused", "ours:fused-aten-gemm", "ours:generic", "pyhessian:cached-graph")
"""Timed beside the floor where the hvp suite has them (``ours:fused-aten-gemm``: on the MLP only)."""


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Size]]:
    """Each Linear / Conv2d layer of ``model`` in forward order with the shape of its input on ``x``."""
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].shape)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def floor_ops(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """The tangent-dependent matmuls / convolutions of one exact product, on random tensors of the
    right shapes (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    ops: list[Callable[[], object]] = []
    for i, (layer, shape) in enumerate(_layer_inputs(model, x)):
        def rand(*s: int) -> torch.Tensor:
            return torch.randn(*s, generator=gen).to(x.device)

        W = layer.weight.detach()
        V = rand(*W.shape)
        if isinstance(layer, nn.Linear):
            h, Rh = rand(*shape), rand(*shape)
            d, Rd = rand(shape[0], W.shape[0]), rand(shape[0], W.shape[0])
            ops += [lambda h=h, V=V: h @ V.T, lambda Rd=Rd, h=h: Rd.T @ h]
            if i:
                ops += [lambda Rh=Rh, W=W: Rh @ W.T, lambda Rd=Rd, W=W: Rd @ W, lambda d=d, V=V: d @ V,
                        lambda d=d, Rh=Rh: d.T @ Rh]
        else:
            kw = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
            h, Rh = rand(*shape), rand(*shape)
            out = F.conv2d(h, W, **kw).shape
            d, Rd = rand(*out), rand(*out)
            if i == 0:  # the input is fixed: both products are matmuls with its kept im2col matrix
                cols = F.unfold(h, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
                cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()
                Vm, Rd_rows = V.reshape(V.shape[0], -1), Rd.permute(0, 2, 3, 1).reshape(-1, V.shape[0])
                ops += [lambda cols=cols, Vm=Vm: cols @ Vm.T, lambda cols=cols, Rd_rows=Rd_rows: cols.T @ Rd_rows]
                continue
            # channels-last: oneDNN's faster layout for these convolutions
            h, Rh, d, Rd, W, V = (t.contiguous(memory_format=torch.channels_last) for t in (h, Rh, d, Rd, W, V))
            # the R-forward's h * V and the weight product's Rd^T h, as for a linear layer (these two were
            # left out: the CNN's floor was about a third short)
            ops += [lambda h=h, V=V, kw=kw: F.conv2d(h, V, **kw),
                    lambda h=h, W=W, Rd=Rd, kw=kw: conv2d_weight(h, W.shape, Rd, **kw)]
            if i:
                ops += [lambda Rh=Rh, W=W, kw=kw: F.conv2d(Rh, W, **kw),
                        lambda h=h, W=W, Rd=Rd, kw=kw: conv2d_input(h.shape, W, Rd, **kw),
                        lambda h=h, V=V, d=d, kw=kw: conv2d_input(h.shape, V, d, **kw),
                        lambda Rh=Rh, W=W, d=d, kw=kw: conv2d_weight(Rh, W.shape, d, **kw)]

    def run() -> None:
        with torch.no_grad():
            for op in ops:
                op()
    return run


def run(device: torch.device, *, quick: bool = False, min_time: float = 1.0) -> tuple[list[Measurement], dict]:
    """Floor, ours and PyHessian's cached graph on the hvp suite's wide MLP and CNN.

    Returns:
        The measurements (``extra``: ``vs_floor``; on PyHessian's row also ``floor_bound``) and the
        suite's config (the operations counted per case).
    """
    loss_fn = nn.CrossEntropyLoss()
    results: list[Measurement] = []
    cases = []
    for p in problems(device, quick):
        if not p.name.startswith(("mlp", "cnn")):
            continue
        d = sum(t.numel() for t in p.params)
        v = torch.randn(d, generator=torch.Generator().manual_seed(1)).to(device)
        exact = reference_hvp(p, loss_fn, v[:, None])[:, 0]
        tol = gate_tolerance(p, loss_fn, v, exact, exact.abs().max().item())
        case = f"{p.name} hvp"
        floor = Measurement(case, "floor", None, None, None, extra={"note": "the tangent-dependent matmuls / "
                                                                          "convolutions alone; no output checked"})
        timed: list[tuple[Measurement, Callable[[], object]]] = [(floor, floor_ops(p.model, p.x))]
        rows = {}
        builders = candidates(p, loss_fn, v)
        for name in (name for name in CANDIDATES if name in builders):
            rows[name], fn = gated(case, name, builders[name], exact, tol, device)
            if fn is not None:
                timed.append((rows[name], fn))
        measure_interleaved(timed, device, min_time=min_time)
        results.append(floor)
        for m in rows.values():
            if m.median_s and floor.median_s:
                m.extra["vs_floor"] = floor.median_s / m.median_s
            results.append(m)
        anchor = rows["pyhessian:cached-graph"]
        if anchor.median_s and floor.median_s:
            anchor.extra["floor_bound"] = anchor.median_s / floor.median_s
        layers = _layer_inputs(p.model, p.x)
        cases.append({"name": p.name, "d": d, "layers": [type(m).__name__ for m, _ in layers],
                      "operations": 2 + 6 * (len(layers) - 1)})
    config = {"cases": cases, "dtype": "float32", "min_time_s": min_time,
              "note": "floor: the tangent-dependent matmuls / convolutions of one exact product, timed alone on "
                      "tensors of the products' shapes; ours and PyHessian's single-batch mode at fixed weights"}
    return results, config
