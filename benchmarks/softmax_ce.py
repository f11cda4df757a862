"""Benchmark of the softmax cross-entropy ops (gradient and HVP on logits) against eager PyTorch
and torch.compile of the same expression, on the same inputs, checked against float64 first."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn_kernels import ops

from .common import Measurement, check_plain, kernel_backends, measure, plain_error_tolerance, time_callable

DEFAULT_SHAPES = ((4096, 1000), (4096, 32000))
QUICK = {"shapes": ((512, 1000), (64, 32000)), "min_time": 0.1}
"""What the runner passes for ``--quick``."""


def eager_hvp(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z, dim=1)
    return p * u - p * (p * u).sum(dim=1, keepdim=True)


def eager_grad(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z, dim=1) - F.one_hot(y, z.shape[1]).to(z.dtype)


def _copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = sorted(time_callable(lambda: dst.copy_(src), device, min_time=0.3))[0]
    return 2 * nbytes / t


def _shape(n: int, c: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator, check: bool,
           compiled: tuple | None, min_time: float) -> list[Measurement]:
    """Every candidate on one (n, c) shape (its tensors are freed on return, before the next shape's)."""
    z = (torch.randn(n, c, generator=gen) * 3).to(device=device, dtype=dtype)
    u = torch.randn(n, c, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=gen).to(device)
    exact_hvp = ops.softmax_ce_hvp_ref(z.double(), u.double())
    exact_grad = ops.softmax_ce_grad_ref(z.double(), y)
    # Gate: twice the error of the eager expression in the same dtype against float64.
    floor = 16 * torch.finfo(dtype).eps
    plain_hvp, plain_grad = eager_hvp(z, u), eager_grad(z, y)
    # the eager expressions and the package's references agree, or the gates (from their difference) mean nothing:
    # a reference and a kernel wrong alike passed every candidate, eager at 25% error too
    check_plain(plain_hvp, exact_hvp)
    check_plain(plain_grad, exact_grad)
    tol_hvp = plain_error_tolerance(plain_hvp, exact_hvp, floor * max(exact_hvp.abs().max().item(), 1.0))
    tol_grad = plain_error_tolerance(plain_grad, exact_grad, floor)
    hvp_case, grad_case = f"hvp {n}x{c} {str(dtype)[6:]}", f"grad {n}x{c} {str(dtype)[6:]}"
    cands_hvp = {"eager": lambda: eager_hvp(z, u)}
    cands_grad = {"eager": lambda: eager_grad(z, y)}
    if compiled is not None:
        compiled_hvp, compiled_grad = compiled
        cands_hvp["torch.compile"] = lambda: compiled_hvp(z, u)
        cands_grad["torch.compile"] = lambda: compiled_grad(z, y)
    for b in kernel_backends(device):
        cands_hvp[f"ours:{b}"] = lambda b=b: ops.softmax_ce_hvp(z, u, backend=b, check_finite=check)
        cands_grad[f"ours:{b}"] = lambda b=b: ops.softmax_ce_grad(z, y, backend=b, check_finite=check)
    hvp_bytes = 3 * z.numel() * z.element_size()
    grad_bytes = 2 * z.numel() * z.element_size() + y.numel() * 8
    results = []
    for case, cands, exact, tol, nbytes in ((hvp_case, cands_hvp, exact_hvp, tol_hvp, hvp_bytes),
                                            (grad_case, cands_grad, exact_grad, tol_grad, grad_bytes)):
        for name, fn in cands.items():
            m = measure(case, name, fn, exact, tol, device, min_time=min_time)
            if m.median_s:
                m.extra["effective_GBps"] = nbytes / m.median_s / 1e9
            results.append(m)
    return results


def run(device: torch.device, shapes=DEFAULT_SHAPES, dtype=torch.float32, with_compile: bool = True,
        min_time: float = 0.5) -> tuple[list[Measurement], dict]:
    """All candidates on every shape; returns the measurements and the suite's config."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    # On GPU the finite check costs a synchronisation per call; eager PyTorch does no check either. (The
    # gradient checks its targets on every call, so it synchronises once per call all the same.)
    check = device.type == "cpu"
    compiled = (torch.compile(eager_hvp), torch.compile(eager_grad)) if with_compile else None
    results: list[Measurement] = []
    for n, c in shapes:
        results += _shape(n, c, device, dtype, gen, check, compiled, min_time)
    config = {"shapes": [list(s) for s in shapes], "dtype": str(dtype), "check_finite": check,
              "gate": "max abs error <= 2 x eager's error against float64 + 16 eps",
              "min_time_s": min_time, "torch_compile": with_compile,
              "bytes_model": "hvp: read z, u + write out; grad: read z + write out + targets"}
    if device.type == "cuda":
        config["copy_bandwidth_GBps"] = _copy_bandwidth(device, 1 << 30) / 1e9
    return results, config
