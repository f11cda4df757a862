"""The accuracy rule every kernel is held to (flash-attention's): a kernel's error against a float64
reference is at most twice the error of the plain PyTorch computation in the same dtype, plus a few
units in the last place of the output scale (so that exact-zero reference errors do not demand a
bit-exact kernel). Float64 results have no higher-precision reference here, so they are held to a
relative 1e-12 of the output scale instead."""
import torch


def assert_within_rule(out: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, ulps: float = 4.0,
                       plain_ulps: float = 64.0) -> None:
    """``out``: the kernel's result; ``plain``: the PyTorch reference in the same dtype;
    ``exact``: the reference computed in float64. The plain reference is itself held to
    ``plain_ulps`` units in the last place of the output scale: the kernel's bound is twice its
    error, so a reference that lost precision (or a kernel compared with itself, as the reference
    backend is) would otherwise pass anything."""
    assert out.shape == exact.shape, (out.shape, exact.shape)
    assert out.dtype == plain.dtype, (out.dtype, plain.dtype)
    exact = exact.double()
    if out.dtype == torch.float64:
        scale = exact.abs().max().item() if out.numel() else 0.0
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12 * scale)
        return
    err = (out.double() - exact).abs().max().item() if out.numel() else 0.0
    plain_err = (plain.double() - exact).abs().max().item() if out.numel() else 0.0
    scale = exact.abs().max().item() if out.numel() else 0.0
    atol = ulps * torch.finfo(out.dtype).eps * max(scale, 1e-30)
    plain_bound = plain_ulps * torch.finfo(out.dtype).eps * max(scale, 1e-30)
    assert plain_err <= plain_bound, f"the plain PyTorch reference's own error {plain_err:.3e} > {plain_bound:.1e}"
    assert err <= 2 * plain_err + atol, f"kernel error {err:.3e} > 2 x PyTorch error {plain_err:.3e} + {atol:.1e}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())
