"""Fingerprints of tensors' values: what the curvature operators compare before every product to
see weights written in place without a version bump (fused optimizer kernels, writes through ``.data``).

Per tensor two float64 numbers over its row-major values t_0 .. t_{n-1}:

* the sum ``sum_i t_i`` (non-finite where a value is: the operators refuse such weights from it);
* the position checksum ``sum_i t_i r(i mod L) (1 + i div L)`` with ``L = 65521`` (a prime, so rows of a
  weight fall on other positions of the ramp unless L divides their width) and the ramp
  ``r(j) = 1 + frac(j g)``, g the golden ratio's fractional part: weights in [1, 2), no two alike, so values
  that only moved (hidden units permuted, a re-basin), which keep every sum, change it.

Both are accumulated in float64 from the values converted to float64 (exactly, but for integers beyond 2**53);
every dtype: a complex tensor as its real and imaginary parts side by side; a tensor that is not strided, e.g.
sparse, gets its sum and a checksum of 0.

Backends: C++ CPU (all tensors in one call, one pass over each: the ops of the reference cost ~15 us per
tensor and value, as much as 4% of a small model's product), CUDA (all tensors of one GPU in a launch per dtype
and one more: the reference launches about 37 kernels per tensor) and the reference
:func:`weights_fingerprint_ref` (tensors on several devices, sparse ones; one read-back).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch

from .. import _extension
from ..backends import BackendUnavailableError, check_backend_name, choose

_OP = "weights_fingerprint"
RAMP_LENGTH = 65521
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@functools.lru_cache(maxsize=None)
def _ramp(device: torch.device) -> torch.Tensor:
    """r(j) = 1 + frac(j g) for j < RAMP_LENGTH, float64 on ``device`` (the C++ kernel's values, bit for bit)."""
    j = torch.arange(RAMP_LENGTH, dtype=torch.float64)
    return (j * _GOLDEN).frac().add(1.0).to(device)


def _fingerprint_ref(t: torch.Tensor) -> torch.Tensor:
    """(sum, checksum) of one tensor as a (2,) float64 tensor on its device."""
    if t.layout != torch.strided:
        return torch.stack([t.sum(dtype=torch.float64), torch.zeros((), dtype=torch.float64, device=t.device)])
    flat = t.reshape(-1).to(torch.float64)
    chunks, tail = divmod(flat.numel(), RAMP_LENGTH)
    ramp = _ramp(t.device)
    checksum = torch.dot(flat[chunks * RAMP_LENGTH:], ramp[:tail]) * (chunks + 1)
    if chunks:  # chunk c (from 0) weighs 1 + c
        per_chunk = torch.mv(flat[:chunks * RAMP_LENGTH].view(chunks, RAMP_LENGTH), ramp)
        weights = torch.arange(1, chunks + 1, dtype=torch.float64, device=t.device)
        checksum = checksum + torch.dot(per_chunk, weights)
    return torch.stack([flat.sum(), checksum])


def weights_fingerprint_ref(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`weights_fingerprint`: a (n, 2) float64 tensor of (sum, checksum) rows
    on the first tensor's device."""
    where = tensors[0].device
    return torch.stack([_fingerprint_ref(t.detach()).to(where) for t in tensors])


def weights_fingerprint(tensors: Iterable[torch.Tensor], *, backend: str = "auto") -> list[tuple[float, float]]:
    """Per tensor ``(sum, position checksum)`` of its values as Python floats (see the module docstring).

    Args:
        tensors: any tensors (parameters and buffers), on any devices, as a sequence or an iterable
            (``model.parameters()``); read, not written, and not differentiated.
        backend: "auto" (C++ when every tensor is a strided CPU tensor, CUDA when all are strided on one
            GPU, else the reference), "cpp", "cuda" or "reference".

    Raises:
        TypeError: ``tensors`` is a tensor itself (not a sequence of them), or an entry is not a tensor
            (named by its index).
        ValueError: a tensor on the meta device (it holds no values), named by its index.
        BackendUnavailableError: a forced backend that cannot run here or on these tensors (the C++ and
            CUDA ones on tensors that are not all strided on one device of their kind).
    """
    if isinstance(tensors, torch.Tensor):  # iterating it would fingerprint its rows
        raise TypeError(f"{_OP}: tensors must be a sequence of tensors, got a tensor (give [tensor])")
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{_OP}: tensors must be a sequence of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)  # a generator (model.parameters()) is read once
    other = next(((i, t) for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)), None)
    if other is not None:
        raise TypeError(f"{_OP}: tensors[{other[0]}] must be a torch.Tensor, got {type(other[1]).__name__}")
    # a complex tensor as its real and imaginary parts side by side (the sums of float64 values)
    tensors = [torch.view_as_real(t.resolve_conj()) if t.is_complex() else t for t in (t.detach() for t in tensors)]
    if not tensors:
        check_backend_name(_OP, backend)  # no device to choose for: the name alone
        return []
    meta = next((i for i, t in enumerate(tensors) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"{_OP}: tensor {meta} is on the meta device: it holds no values to fingerprint")
    devices = {t.device for t in tensors}
    if len(devices) == 1 and all(t.layout == torch.strided for t in tensors):
        name = choose(_OP, devices.pop(), backend)
    else:  # the compiled kernels take one call's strided tensors of one device
        if backend not in ("auto", "reference"):
            choose(_OP, tensors[0].device, backend)  # an unknown or unusable backend is named as for one device
            raise BackendUnavailableError(f"{_OP}: backend {backend!r} needs strided tensors on one device, got "
                                          f"{sorted({str(t.layout) for t in tensors})} on {sorted(map(str, devices))}")
        name = "reference"
    values = (weights_fingerprint_ref(tensors) if name == "reference"
              else torch.ops.unlearn_kernels.weights_fingerprint(tensors))
    return [(total, checksum) for total, checksum in values.tolist()]


def _fake(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].new_empty((len(tensors), 2), dtype=torch.float64)


if _extension.extension_loaded():
    torch.library.register_fake(f"unlearn_kernels::{_OP}")(_fake)
