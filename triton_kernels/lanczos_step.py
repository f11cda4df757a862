"""Triton kernels of one Lanczos step (op ``unlearn_kernels_triton::lanczos_step``).

The same three passes over the basis B (m x d) as the C++ kernel (see csrc/cpu/lanczos_step.cpp);
each program owns one BLOCK_D-wide column tile of every vector and walks the rows of B in
BLOCK_M-row chunks, accumulating in float64:

1. ``_pass1``: per tile partial sums of <hq, q>, ||hq||^2 and of B hq, B q, B q_prev;
2. ``_pass2``: w = hq - alpha q - beta_prev q_prev - B^T c1 with c1 = B hq - alpha B q - beta_prev B q_prev,
   stored, and per tile partial sums of B w and ||w||^2;
3. ``_pass3`` (only when m > 0): w -= B^T c2 with c2 = B w, and partial sums of ||w||^2.

The (tiles x m) partial sums are added up by torch on the device, so alpha, beta and the CGS
coefficients never leave it (no host synchronisation in a Lanczos loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..ops.lanczos_step import BREAKDOWN_RTOL_EPS, _fake
from . import INTERPRETED, define_op, jit


@jit
def _pass1(hq_ptr, q_ptr, qp_ptr, b_ptr, part_ptr, bpart_ptr, d, m, n_tiles,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[0|1, tile] = <hq, q>, ||hq||^2 on the tile; bpart[0|1|2, j, tile] = B_j . (hq | q | q_prev)."""
    tile = tl.program_id(0)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    h = tl.load(hq_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
    v = tl.load(q_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
    vp = tl.load(qp_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
    tl.store(part_ptr + tile, tl.sum(h * v, axis=0))
    tl.store(part_ptr + n_tiles + tile, tl.sum(h * h, axis=0))
    for j0 in range(0, m, BLOCK_M):
        rows = j0 + tl.arange(0, BLOCK_M)
        in_m = rows < m
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :],
                    mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float64)
        out = bpart_ptr + rows * n_tiles + tile
        tl.store(out, tl.sum(b * h[None, :], axis=1), mask=in_m)
        tl.store(out + m * n_tiles, tl.sum(b * v[None, :], axis=1), mask=in_m)
        tl.store(out + 2 * m * n_tiles, tl.sum(b * vp[None, :], axis=1), mask=in_m)


@jit
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


@jit
def _pass2(hq_ptr, q_ptr, qp_ptr, b_ptr, w_ptr, alpha_ptr, beta_prev_ptr, c_ptr, part_ptr, bpart_ptr,
           d, m, n_tiles, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """w = hq - alpha q - beta_prev q_prev - B^T c, stored; part[tile] = ||w||^2, bpart[j, tile] = B_j . w."""
    tile = tl.program_id(0)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    alpha = tl.load(alpha_ptr)
    beta_prev = tl.load(beta_prev_ptr)
    w = (tl.load(hq_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
         - alpha * tl.load(q_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
         - beta_prev * tl.load(qp_ptr + cols, mask=in_d, other=0.0).to(tl.float64))
    w = _minus_projection(w, b_ptr, c_ptr, cols, in_d, d, m, BLOCK_M)
    w_stored = w.to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + cols, w_stored, mask=in_d)
    tl.store(part_ptr + tile, tl.sum(w * w, axis=0))
    # The second projection sees the rounded vector that was stored.
    w = w_stored.to(tl.float64)
    for j0 in range(0, m, BLOCK_M):
        rows = j0 + tl.arange(0, BLOCK_M)
        in_m = rows < m
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :],
                    mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float64)
        tl.store(bpart_ptr + rows * n_tiles + tile, tl.sum(b * w[None, :], axis=1), mask=in_m)


@jit
def _pass3(b_ptr, w_ptr, c_ptr, part_ptr, d, m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """w -= B^T c in place; part[tile] = ||w||^2."""
    tile = tl.program_id(0)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    w = tl.load(w_ptr + cols, mask=in_d, other=0.0).to(tl.float64)
    w = _minus_projection(w, b_ptr, c_ptr, cols, in_d, d, m, BLOCK_M)
    tl.store(w_ptr + cols, w.to(w_ptr.dtype.element_ty), mask=in_d)
    tl.store(part_ptr + tile, tl.sum(w * w, axis=0))


def _blocks(d: int, m: int) -> dict[str, int]:
    """Tile sizes: on a GPU, register-sized tiles and many programs; in the interpreter (about
    1 ms per program) whole vectors in a few programs."""
    if INTERPRETED:
        return {"BLOCK_M": min(64, triton.next_power_of_2(max(m, 1))), "BLOCK_D": min(4096, triton.next_power_of_2(d))}
    return {"BLOCK_M": 4, "BLOCK_D": 512, "num_warps": 4}


@define_op("unlearn_kernels_triton::lanczos_step", _fake)
def lanczos_step(
    hq: torch.Tensor, q: torch.Tensor, q_prev: torch.Tensor, beta_prev: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton Lanczos step on contiguous, validated inputs (see ``unlearn_kernels.ops.lanczos_step``);
    beta_prev is a 0-dim float64 tensor on the vectors' device."""
    d, m = hq.shape[0], basis.shape[0]
    f64 = {"dtype": torch.float64, "device": hq.device}
    w = torch.empty_like(hq)
    if d == 0:
        return w, torch.zeros((), **f64), torch.zeros((), **f64)
    cfg = _blocks(d, m)
    n_tiles = triton.cdiv(d, cfg["BLOCK_D"])
    grid = (n_tiles,)
    part = torch.empty((2, n_tiles), **f64)
    bpart = torch.empty((3, m, n_tiles), **f64)
    wrap_triton(_pass1)[grid](hq, q, q_prev, basis, part, bpart, d, m, n_tiles, **cfg)
    alpha, hq_norm2 = part.sum(dim=1).unbind()
    beta_prev = beta_prev.reshape(())
    bh, bq, bp = bpart.sum(dim=2).unbind()
    c1 = bh - alpha * bq - beta_prev * bp
    c2_part = torch.empty((m, n_tiles), **f64)
    norm_part = torch.empty((n_tiles,), **f64)
    wrap_triton(_pass2)[grid](hq, q, q_prev, basis, w, alpha, beta_prev, c1, norm_part, c2_part,
                              d, m, n_tiles, **cfg)
    if m > 0:
        wrap_triton(_pass3)[grid](basis, w, c2_part.sum(dim=1), norm_part, d, m, **cfg)
    beta = norm_part.sum().sqrt()
    breakdown = beta <= BREAKDOWN_RTOL_EPS * torch.finfo(hq.dtype).eps * hq_norm2.sqrt()
    beta = torch.where(breakdown, 0.0, beta)
    w.mul_(torch.where(breakdown, 0.0, 1.0 / beta))
    return w, alpha, beta
