"""The contract of ``lanczos_step`` shared by its Python backends (reference and Triton): the
breakdown threshold and the fake (meta) implementation every namespace of the op registers."""
from __future__ import annotations

import torch

BREAKDOWN_RTOL_EPS = 16.0
"""Breakdown threshold in units of the vectors' machine epsilon, relative to ||hq||."""


def fake(hq, q, q_prev, beta_prev, basis):
    """Fake (meta) implementation: the next vector (hq's dtype, contiguous), alpha and beta (float64)."""
    scalar = hq.new_empty((), dtype=torch.float64)
    return torch.empty_like(hq, memory_format=torch.contiguous_format), scalar, scalar.clone()
