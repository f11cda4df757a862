"""Triton kernels for the softmax cross-entropy gradient and Hessian-vector product on logits.

Defines the ops ``unlearn_kernels_triton::softmax_ce_grad`` and ``unlearn_kernels_triton::softmax_ce_hvp``
(same schemas, semantics and errors as the C++ ops: the checks and messages come from
``unlearn_kernels.contracts.softmax_ce``; the public functions are in ``unlearn_kernels.ops.softmax_ce``). Each program
owns ``ROWS`` rows and sweeps their classes in ``BLOCK``-wide column blocks twice: pass 1 keeps an
online row max and rescaled sums (sum of exp, and <exp, u - u_top> relative to the row's top class for the
HVP and, with the target's indicator as u, the gradient), pass 2 writes the output.
So any number of classes works with a fixed register footprint and no (N, C) temporary.
Accumulation is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs.

Errors are found inside the kernels and written to a small int32 flag tensor, read back (one
synchronisation) only when something must be reported: always for the grad's target range (as the
C++ kernel does; the message names the first bad row), and for non-finite inputs when
``check_finite``. Under tracing (fake tensors, ``torch.compile``) the flags cannot be read, so the
checks are eager-mode only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..contracts import softmax_ce as contract
from . import can_read, define_op, float64_bits

# Largest column block and largest (rows x columns) tile one program holds in registers.
_MAX_BLOCK = 4096
_MAX_TILE = 4096

# The flag tensor has two int32 slots, set to 1 by any program that finds a problem:
# [0] bad logits; [1] a target out of range (grad) or a bad tangent (hvp). Kernels index them
# with literals (module globals inside kernels trip up torch.compile's kernel source capture).


@triton.jit
def _row_stats(z_ptr, u_ptr, y, rows, row_ok, C, z_stride, u_stride,
               ACC: tl.constexpr, TANGENT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over the rows. TANGENT: 0 none, 1 the tangent u at u_ptr, 2 the target's indicator u_j = [j == y].
    Returns, per row: the shift for exp (the row max, or 0 for an all -inf row), sum_j exp(z_j - shift),
    sum_j exp(z_j - shift) (u_j - u_top) with u_top the tangent at the row's top class (0s without a tangent),
    u_top, and whether the row is bad (a NaN, or a row max that is not finite). Relative to the top class, the sum
    holds no p_top u_top term to cancel at a well-fit row (p_top ~ 1); the top class may change from block to block,
    and the sum so far is moved to the new one (it adds s (u_top_old - u_top_new))."""
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    d = tl.zeros([ROWS], ACC)
    u_top = tl.zeros([ROWS], ACC)
    nan = tl.zeros([ROWS], tl.int32)
    z_row = z_ptr + rows * z_stride
    u_row = u_ptr + rows * u_stride
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(ACC)
        # tl.max does not promise to propagate NaN, so NaNs are tracked on their own.
        nan = tl.maximum(nan, tl.max((x != x).to(tl.int32), axis=1))
        block_max = tl.max(x, axis=1)
        m_new = tl.maximum(m, block_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps exp(-inf - -inf) out
        scale = tl.exp(m - shift)
        e = tl.exp(x - shift[:, None])
        if TANGENT != 0:
            if TANGENT == 1:
                u = tl.load(u_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            else:
                u = (cols[None, :] == y[:, None]).to(ACC)
            top = start + tl.argmax(x, axis=1)
            u_block_top = tl.sum(tl.where(cols[None, :] == top[:, None], u, 0.0), axis=1)
            u_new = tl.where(block_max > m, u_block_top, u_top)
            d = (d + s * (u_top - u_new)) * scale + tl.sum(e * (u - u_new[:, None]), axis=1)
            u_top = u_new
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    # The C++ kernel's condition: a row max that is not finite (NaN, +inf, or an all -inf row).
    bad = (nan > 0) | ~(tl.abs(m) < float("inf"))
    return shift, s, d, u_top, bad


@triton.jit
def _grad_kernel(z_ptr, y_ptr, out_ptr, flag_ptr, N, C, z_stride, smoothing_bits, ignore_index,
                 FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: from 2**31 rows on int32 wraps
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    kept = row_ok & (y != ignore_index)
    in_range = (y >= 0) & (y < C)
    active = kept & in_range
    tl.store(flag_ptr + 1, 1, mask=tl.max((kept & ~in_range).to(tl.int32), axis=0) > 0)

    # p_y - 1 = <p, [j == y]> - 1 = (y_top - 1) + d / s: where the target is the top class (y_top = 1) that is minus
    # the other classes' share, with no 1 / s - 1 to cancel at a well-fit row
    shift, s, d, y_top, bad = _row_stats(z_ptr, z_ptr, y, rows, active, C, z_stride, 0,
                                         ACC, 2, ROWS, BLOCK)
    tl.store(flag_ptr, 1, mask=tl.max((active & bad).to(tl.int32), axis=0) > 0)

    # The smoothing arrives as the bits of a float64 (Triton float arguments are fp32).
    smoothing = smoothing_bits.to(tl.int64).to(tl.float64, bitcast=True)
    off = (smoothing / C).to(ACC)  # smoothed target mass on every class
    extra = (smoothing - smoothing / C).to(ACC)  # the target's entry is p_y - 1 + extra
    inv_sum = 1.0 / tl.where(active, s, 1.0)  # rows not computed would divide by 0
    target_entry = (y_top - 1.0) + d * inv_sum + extra
    z_row = z_ptr + rows * z_stride
    out_row = out_ptr + rows * C
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(z_row[:, None] + cols[None, :], mask=mask & active[:, None], other=0.0).to(ACC)
        g = tl.exp(x - shift[:, None]) * inv_sum[:, None] - off
        g = tl.where(cols[None, :] == y[:, None], target_entry[:, None], g)
        g = tl.where(active[:, None], g, 0.0)  # ignored rows are zero
        tl.store(out_row[:, None] + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hvp_kernel(z_ptr, u_ptr, out_ptr, flag_ptr, N, C, z_stride, u_stride,
                FP64: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: from 2**31 rows on int32 wraps
    row_ok = rows < N
    # p (u - <p, u>) = p ((u - u_top) - <p, u - u_top>), as sum_j p_j = 1
    shift, s, d, u_top, bad = _row_stats(z_ptr, u_ptr, 0, rows, row_ok, C, z_stride, u_stride,  # no target (0)
                                         ACC, 1, ROWS, BLOCK)
    inv_sum = 1.0 / tl.where(row_ok, s, 1.0)  # padding rows would divide by 0
    mean_r = d * inv_sum  # <p, u - u_top>
    tl.store(flag_ptr, 1, mask=tl.max((row_ok & bad).to(tl.int32), axis=0) > 0)
    bad_u = row_ok & ~(tl.abs(mean_r) < float("inf"))
    tl.store(flag_ptr + 1, 1, mask=tl.max(bad_u.to(tl.int32), axis=0) > 0)

    z_row = z_ptr + rows * z_stride
    u_row = u_ptr + rows * u_stride
    out_row = out_ptr + rows * C
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(z_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        u = tl.load(u_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        p = tl.exp(x - shift[:, None]) * inv_sum[:, None]
        out = p * ((u - u_top[:, None]) - mean_r[:, None])
        tl.store(out_row[:, None] + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch helpers
def _launch_config(n_rows: int, n_cols: int) -> dict[str, int]:
    """Block sizes from the shape: whole rows in one block up to _MAX_BLOCK classes, then several
    rows per program while the tile stays within _MAX_TILE elements."""
    block = min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    rows = max(1, min(_MAX_TILE // block, triton.next_power_of_2(n_rows)))
    return {"ROWS": rows, "BLOCK": block, "num_warps": max(1, min(8, rows * block // 512))}


def _rows_dense(t: torch.Tensor) -> torch.Tensor:
    """Rows may be strided; the class dimension must be dense."""
    return t if t.stride(1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- ops
@define_op("unlearn_kernels_triton::softmax_ce_grad", contract.fake_grad)
def softmax_ce_grad(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, ignore_index: int, check_finite: bool
) -> torch.Tensor:
    """Triton ``softmax(logits) - t`` per row (t: label-smoothed one-hot target; rows with
    ``target == ignore_index`` are zero). Raises ValueError for targets out of range and, when
    ``check_finite``, for NaN/+Inf logits in the rows that are not ignored."""
    contract.check_grad_args(logits, target, label_smoothing)
    logits, target = _rows_dense(logits), target.contiguous()
    n_rows, n_cols = logits.shape
    out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    flags = torch.zeros(2, dtype=torch.int32, device=logits.device)
    cfg = _launch_config(n_rows, n_cols)
    wrap_triton(_grad_kernel)[(triton.cdiv(n_rows, cfg["ROWS"]),)](
        logits, target, out, flags, n_rows, n_cols, logits.stride(0), float64_bits(label_smoothing),
        ignore_index, FP64=logits.dtype == torch.float64, **cfg,
    )
    if can_read(flags):
        bad_logits, bad_target = flags.tolist()
        if bad_target:
            contract.check_targets(target, n_cols, ignore_index)
        if check_finite and bad_logits:
            raise ValueError(f"{contract.GRAD}: {contract.BAD_LOGITS}")
    return out


@define_op("unlearn_kernels_triton::softmax_ce_hvp", contract.fake_hvp)
def softmax_ce_hvp(logits: torch.Tensor, tangent: torch.Tensor, check_finite: bool) -> torch.Tensor:
    """Triton ``p * u - p * <p, u>`` per row with p = softmax(logits) and u = tangent. When
    ``check_finite``, raises ValueError for NaN/+Inf logits or a NaN/Inf tangent."""
    contract.check_hvp_args(logits, tangent)
    logits, tangent = _rows_dense(logits), _rows_dense(tangent)
    n_rows, n_cols = logits.shape
    out = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    flags = torch.zeros(2, dtype=torch.int32, device=logits.device)
    cfg = _launch_config(n_rows, n_cols)
    wrap_triton(_hvp_kernel)[(triton.cdiv(n_rows, cfg["ROWS"]),)](
        logits, tangent, out, flags, n_rows, n_cols, logits.stride(0), tangent.stride(0),
        FP64=logits.dtype == torch.float64, **cfg,
    )
    if check_finite and can_read(flags):
        bad_logits, bad_tangent = flags.tolist()
        if bad_logits:
            raise ValueError(f"{contract.HVP}: {contract.BAD_LOGITS}")
        if bad_tangent:
            raise ValueError(f"{contract.HVP}: {contract.BAD_TANGENT}")
    return out


contract.register_autograd("unlearn_kernels_triton")
