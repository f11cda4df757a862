"""Symmetric test matrices with a chosen spectrum, for the solver tests (Lanczos, cubic, baselines,
ARC): exact answers are known in the eigenbasis."""
import torch


def sym_with_spectrum(lam: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U diag(lam) U^T, U)`` with a random orthogonal U drawn from ``gen``, in float64."""
    d = lam.shape[0]
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (U * lam.double()) @ U.T, U
