"""The check that an op registered with a backward only still gives forward-mode tangents and torch.func's
transforms the derivatives of its reference (which it runs for them), not a zero tangent."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd import forward_ad


def assert_forward_mode_runs_the_reference(fn: Callable[..., Sequence[torch.Tensor]],
                                           reference: Callable[..., Sequence[torch.Tensor]],
                                           args: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                                           atol: float) -> None:
    """``fn``'s tangents through torch.func.jvp and through forward-mode dual tensors equal ``reference``'s (nonzero,
    float64, to 1e-12 relative and ``atol``)."""
    expected = torch.func.jvp(reference, tuple(args), tuple(tangents))[1]
    assert all(float(e.abs().max()) > 0 for e in expected)
    for got, want in zip(torch.func.jvp(fn, tuple(args), tuple(tangents))[1], expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=atol)
    with forward_ad.dual_level():
        outs = fn(*(forward_ad.make_dual(p, t) for p, t in zip(args, tangents)))
        for out, want in zip(outs, expected):
            torch.testing.assert_close(forward_ad.unpack_dual(out).tangent, want, rtol=1e-12, atol=atol)
