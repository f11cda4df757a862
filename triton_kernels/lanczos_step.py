"""Triton kernels of one Lanczos step (op ``unlearn_kernels_triton::lanczos_step``).

The scheme of the C++ kernel (see csrc/cpu/lanczos_step.cpp), which reads the basis B (m x d) as
few times as it can; each program owns one BLOCK_D-wide column tile of every vector and walks
the rows of B in BLOCK_M-row chunks, accumulating in float64:

0. alpha = <hq, q> and ||hq||^2 (torch, on the device);
1. ``_pass1``: w = hq - alpha q - beta_prev q_prev, stored, and per tile partial sums of c1 = B w;
2. ``_pass2``: w -= B^T c1, stored, and per tile partial sums of c2 = B w and ||w||^2;
3. ``_pass3``: when ``||c2|| > eps ||w||`` (a flag computed on the device, read by the kernel),
   w -= B^T c2; in either case partial sums of ||w||^2.

The (tiles x m) partial sums are added up by torch on the device, so the CGS coefficients and the
flag never leave it; beta_prev, alpha and beta are read back once at the end, for the checks of the
values (one host synchronisation per step; none while tracing, when the checks are skipped).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..contracts import lanczos_step as contract
from ..contracts.lanczos_step import STEP_BREAKDOWN_EPS
from . import INTERPRETED, can_read, define_op


@triton.jit
def _rows_dot(w, b_ptr, out_ptr, cols, in_d, d, m, n_tiles, tile, BLOCK_M: tl.constexpr):
    """out[j, tile] = B[j, cols] . w for every row j (w a float64 tile)."""
    for j0 in range(0, m, BLOCK_M):
        rows = j0 + tl.arange(0, BLOCK_M)
        in_m = rows < m
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :],
                    mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float64)
        tl.store(out_ptr + rows * n_tiles + tile, tl.sum(b * w[None, :], axis=1), mask=in_m)


@triton.jit
def _pass1(hq_ptr, q_ptr, qp_ptr, b_ptr, w_ptr, alpha_ptr, beta_prev_ptr, bpart_ptr, d, m, n_tiles,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """w = hq - alpha q - beta_prev q_prev, stored; bpart[j, tile] = B_j . w (of the stored, rounded w)."""
    tile = tl.program_id(0).to(tl.int64)  # cols in int64: d may pass 2**31
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    alpha = tl.load(alpha_ptr)
    beta_prev = tl.load(beta_prev_ptr)
    w = (tl.load(hq_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
         - alpha * tl.load(q_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
         - beta_prev * tl.load(qp_ptr + cols, mask=in_d, other=0.0).to(tl.float64))
    w_stored = w.to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + cols, w_stored, mask=in_d)
    _rows_dot(w_stored.to(tl.float64), b_ptr, bpart_ptr, cols, in_d, d, m, n_tiles, tile, BLOCK_M)


@triton.jit
def _minus_projection(w, b_ptr, c_ptr, cols, in_d, d, m, BLOCK_M: tl.constexpr):
    """w - B[:, cols]^T c for one tile of columns (float64)."""
    for j0 in range(0, m, BLOCK_M):
        rows = j0 + tl.arange(0, BLOCK_M)
        in_m = rows < m
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :],
                    mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float64)
        c = tl.load(c_ptr + rows, mask=in_m, other=0.0)
        w -= tl.sum(c[:, None] * b, axis=0)
    return w


@triton.jit
def _pass2(b_ptr, w_ptr, c_ptr, part_ptr, bpart_ptr, d, m, n_tiles, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """w -= B^T c, stored; part[tile] = ||w||^2, bpart[j, tile] = B_j . w (of the stored, rounded w)."""
    tile = tl.program_id(0).to(tl.int64)  # cols in int64: d may pass 2**31
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    w = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
    w = _minus_projection(w, b_ptr, c_ptr, cols, in_d, d, m, BLOCK_M)
    w_stored = w.to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + cols, w_stored, mask=in_d)
    tl.store(part_ptr + tile, tl.sum(w * w, axis=0))
    _rows_dot(w_stored.to(tl.float64), b_ptr, bpart_ptr, cols, in_d, d, m, n_tiles, tile, BLOCK_M)


@triton.jit
def _pass3(b_ptr, w_ptr, c_ptr, again_ptr, part_ptr, d, m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """If the flag ``again`` is set, w -= B^T c in place; part[tile] = ||w||^2 either way."""
    tile = tl.program_id(0).to(tl.int64)  # cols in int64: d may pass 2**31
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    w = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
    if tl.load(again_ptr) != 0:  # the basis is read only when the second update is needed
        w = _minus_projection(w, b_ptr, c_ptr, cols, in_d, d, m, BLOCK_M)
        tl.store(w_ptr + cols, w.to(w_ptr.dtype.element_ty), mask=in_d)
    tl.store(part_ptr + tile, tl.sum(w * w, axis=0))


def _launch_config(d: int, m: int) -> dict[str, int]:
    """Tile sizes: on a GPU, register-sized tiles and many programs; in the interpreter (about
    1 ms per program) whole vectors in a few programs."""
    if INTERPRETED:
        return {"BLOCK_M": min(64, triton.next_power_of_2(max(m, 1))), "BLOCK_D": min(4096, triton.next_power_of_2(d))}
    return {"BLOCK_M": 4, "BLOCK_D": 512, "num_warps": 4}


def _step(
    hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step on contiguous inputs with d >= 1, beta_prev a 0-dim tensor."""
    d, m = hq.shape[0], basis.shape[0]
    f64 = {"dtype": torch.float64, "device": hq.device}
    w = torch.empty_like(hq)
    cfg = _launch_config(d, m)
    n_tiles = triton.cdiv(d, cfg["BLOCK_D"])
    grid = (n_tiles,)
    h64 = hq.double()
    alpha, hq_norm2 = torch.dot(h64, q.double()), torch.dot(h64, h64)
    bpart = torch.empty((m, n_tiles), **f64)
    wrap_triton(_pass1)[grid](hq, q, q_prev, basis, w, alpha, beta_prev, bpart, d, m, n_tiles, **cfg)
    c2_part = torch.empty((m, n_tiles), **f64)
    norm_part = torch.empty((n_tiles,), **f64)
    wrap_triton(_pass2)[grid](basis, w, bpart.sum(dim=1), norm_part, c2_part, d, m, n_tiles, **cfg)
    c2 = c2_part.sum(dim=1)
    # The second update only when it would move w by more than the rounding of storing it.
    eps = torch.finfo(hq.dtype).eps
    again = (c2.square().sum() > eps * eps * norm_part.sum()).to(torch.int32)
    wrap_triton(_pass3)[grid](basis, w, c2, again, norm_part, d, m, **cfg)
    # ||hq||^2 beyond float64: the breakdown test cannot be read; refused as an overflow (beta = Inf), as in C++
    overflow = ~torch.isfinite(hq_norm2)
    beta = torch.where(overflow, torch.inf, norm_part.sum().sqrt())
    breakdown = ~overflow & (beta <= STEP_BREAKDOWN_EPS * eps * hq_norm2.sqrt())
    beta = torch.where(breakdown, 0.0, beta)
    # 1/beta as two factors, a power of two (exact) and the rest: as one float32 factor it overflowed for
    # beta < 1.2e-38 (an Inf/NaN q_next) and lost digits above 8.5e37 (the C++ kernel scales in float64)
    scale = torch.where(breakdown, 0.0, 1.0 / beta)
    power = torch.where(breakdown, 1.0, torch.exp2(torch.round(torch.log2(scale) / 2)))
    w.mul_(power.to(w.dtype)).mul_((scale / power).to(w.dtype))
    return w, alpha, beta


@define_op("unlearn_kernels_triton::lanczos_step", contract.fake)
def lanczos_step(
    hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton Lanczos step (see ``unlearn_kernels.ops.lanczos_step``): the checks and messages of the
    C++ op, from ``unlearn_kernels.contracts.lanczos_step``."""
    contract.check_args(hq, q, q_prev, beta_prev, basis)
    hq, q, q_prev, basis = (t.contiguous() for t in (hq, q, q_prev, basis))
    beta_prev = beta_prev.reshape(())
    if hq.shape[0] == 0:
        zero = torch.zeros((), dtype=torch.float64, device=hq.device)
        w, alpha, beta = torch.empty_like(hq), zero, zero.clone()
    else:
        w, alpha, beta = _step(hq, q, q_prev, beta_prev, basis)
    if can_read(alpha):
        contract.check_values(beta_prev, alpha, beta)
    return w, alpha, beta
