"""Benchmark of the fused LoRA linear op against PEFT's LoRA layer, the eager expression and the
frozen layer alone, forward and forward+backward, on the same inputs, checked against float64 first.

Candidates (the baseline is PEFT's layer):

* ``ours:<backend>``: ``ops.lora_linear`` (C++ on CPU; CUDA and Triton on GPU);
* ``ours:cpp-aten-gemm`` (CPU): ``ours:cpp`` within :func:`unlearn_kernels.aten_gemm`, its big float32 GEMMs
  through torch's own GEMM (``torch.mm``'s, as every other candidate's) where ``ours:cpp`` may take oneDNN's (the
  environment's ``cpu_gemm``): how much of our lead is the GEMM library's;
* ``peft``: ``peft.tuners.lora.Linear`` around the frozen ``nn.Linear`` (dropout 0);
* ``eager``: ``x W^T + b + s (x A^T) B^T`` in plain autograd (W and b frozen);
* ``torch.compile``: the eager expression compiled (unless ``--no-compile``/``--quick``);
* ``frozen linear``: ``F.linear(x, W, b)`` alone, the floor: its forward+backward gives the input
  gradient only, the two GEMMs a LoRA step cannot avoid.

forward+backward differentiates x, A and B (x only for the frozen layer) for a fixed upstream
gradient. The gate's call records each candidate's peak memory beside its time (``check``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn_kernels import ops

from .common import (
    Measurement,
    check,
    check_plain,
    kernel_backends,
    measure_interleaved,
    plain_error_tolerance,
    within_aten_gemm,
)

BASELINE = "peft"
FLOOR = "frozen linear"
# (tokens, in, out, rank, dtype); the 4096-wide case is added on GPU only.
DEFAULT_CASES = ((4096, 1024, 1024, 16, torch.float32), (4096, 1024, 1024, 64, torch.float32))
GPU_CASES = ((4096, 4096, 4096, 16, torch.float32), (4096, 4096, 4096, 16, torch.bfloat16))
QUICK = {"cases": ((1024, 512, 512, 16, torch.float32),), "min_time": 0.1}


eager = ops.lora_linear_ref  # the expression users write: x W^T + b + s (x A^T) B^T in plain autograd


def _peft_layer(weight, bias, lora_a, lora_b, alpha):
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    rank = lora_a.shape[0]
    layer = Linear(base, "default", config=LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0), r=rank,
                   lora_alpha=alpha)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def candidates(device, x, weight, bias, lora_a, lora_b, scale, alpha, grad_out, with_compile):
    """{name: (forward fn, forward+backward fn)}; each fn returns what the gate checks."""
    def grads(out, leaves):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, leaves, grad_out)])

    xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b))
    cands = {}
    for b in kernel_backends(device):
        cands[f"ours:{b}"] = (
            lambda b=b: ops.lora_linear(x, weight, bias, lora_a, lora_b, scale, backend=b),
            lambda b=b: grads(ops.lora_linear(xg, weight, bias, ag, bg, scale, backend=b), (xg, ag, bg)))
    if "ours:cpp" in cands:
        cands["ours:cpp-aten-gemm"] = tuple(within_aten_gemm(fn) for fn in cands["ours:cpp"])
    try:
        layer, pa, pb = _peft_layer(weight, bias, lora_a, lora_b, alpha)
        cands["peft"] = (lambda: layer(x), lambda: grads(layer(xg), (xg, pa, pb)))
    except ImportError as exc:  # the baseline is an optional library: its rows say "unavailable", ours still run
        cands["peft"] = (_raises(exc), _raises(exc))
    cands["eager"] = (lambda: eager(x, weight, bias, lora_a, lora_b, scale),
                      lambda: grads(eager(xg, weight, bias, ag, bg, scale), (xg, ag, bg)))
    if with_compile:
        compiled = torch.compile(eager)
        cands["torch.compile"] = (lambda: compiled(x, weight, bias, lora_a, lora_b, scale),
                                  lambda: grads(compiled(xg, weight, bias, ag, bg, scale), (xg, ag, bg)))
    cands[FLOOR] = (lambda: F.linear(x, weight, bias), lambda: grads(F.linear(xg, weight, bias), (xg,)))
    return cands


def exact_outputs(x, weight, bias, lora_a, lora_b, scale, grad_out):
    """float64 forward and gradients of the LoRA layer and of the frozen layer alone."""
    x, weight, bias, lora_a, lora_b, gy = (t.double() for t in (x, weight, bias, lora_a, lora_b, grad_out))
    xa, g = x @ lora_a.T, scale * gy @ lora_b
    lora_fwd = F.linear(x, weight, bias) + scale * xa @ lora_b.T
    gx = gy @ weight
    lora_grads = torch.cat([(gx + g @ lora_a).reshape(-1), (g.T @ x).reshape(-1), (scale * gy.T @ xa).reshape(-1)])
    return {"lora": (lora_fwd, lora_grads), "frozen": (F.linear(x, weight, bias), gx.reshape(-1))}


def run(device: torch.device, cases=None, with_compile: bool = True,
        min_time: float = 1.0) -> tuple[list[Measurement], dict]:
    """Every candidate on every case, forward and forward+backward, timed interleaved per case."""
    if cases is None:
        cases = DEFAULT_CASES + (GPU_CASES if device.type == "cuda" else ())
    gen = torch.Generator().manual_seed(0)
    results: list[Measurement] = []
    for tokens, n_in, n_out, rank, dtype in cases:
        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

        x, grad_out = rand(tokens, n_in), rand(tokens, n_out)
        weight, bias = rand(n_out, n_in, std=n_in**-0.5), rand(n_out)
        lora_a, lora_b = rand(rank, n_in, std=n_in**-0.5), rand(n_out, rank, std=rank**-0.5)
        alpha = 2 * rank
        scale = alpha / rank
        exact = exact_outputs(x, weight, bias, lora_a, lora_b, scale, grad_out)
        cands = candidates(device, x, weight, bias, lora_a, lora_b, scale, alpha, grad_out, with_compile)
        # The eager expression and the frozen layer in the same dtype set the gates.
        plain = {"lora": (_no_grad(cands["eager"][0]), cands["eager"][1]()),
                 "frozen": (_no_grad(cands[FLOOR][0]), cands[FLOOR][1]())}
        name = f"{tokens}x{n_in}->{n_out} r{rank} {str(dtype)[6:]}"
        for mode, idx in (("fwd", 0), ("fwd+bwd", 1)):
            case = f"{mode} {name}"
            timed = []
            for cand, fns in cands.items():
                kind = "frozen" if cand == FLOOR else "lora"
                ref = exact[kind][idx]
                floor = 16 * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)
                check_plain(plain[kind][idx], ref)  # the eager and frozen candidates are gated by themselves
                tol = plain_error_tolerance(plain[kind][idx], ref, floor)
                fn = fns[idx] if idx == 1 else (lambda f=fns[0]: _no_grad(f))
                m = check(case, cand, fn, ref, tol)
                results.append(m)
                if m.status == "ok":
                    timed.append((m, fn))
            measure_interleaved(timed, device, min_time=min_time)
            floor_m = next((m for m, _ in timed if m.candidate == FLOOR), None)
            for m, _ in timed:
                if floor_m is not None and m.median_s:
                    m.extra["vs_frozen_linear"] = floor_m.median_s / m.median_s
        del x, grad_out, weight, bias, lora_a, lora_b, exact, plain, cands
    config = {"cases": [[t, i, o, r, str(d)] for t, i, o, r, d in cases], "threads": torch.get_num_threads(),
              "baseline": BASELINE, "lora_alpha": "2 x rank (scale 2)", "peft_dropout": 0.0,
              "gate": "max abs error <= 2 x the eager expression's error against float64 + 16 eps",
              "forward": "under torch.no_grad", "forward+backward": "gradients of x, A, B (frozen linear: x)",
              "timing": "measure_interleaved per case", "min_time_s": min_time, "torch_compile": with_compile}
    return results, config


def _raises(exc: Exception):
    """A candidate's fn that fails as ``exc`` did (the gate's call reports it as "unavailable: <why>")."""
    def fn():
        raise exc
    return fn


def _no_grad(fn):
    with torch.no_grad():
        return fn()
