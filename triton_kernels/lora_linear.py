"""Triton kernels of the fused LoRA linear layer (ops ``unlearn_kernels_triton::lora_linear``,
``::lora_linear_backward`` and ``::lora_linear_jvp``).

One strided matmul kernel does all the work: ``C = alpha P Q^T + bias + beta L R^T``, a tile of C
per program, accumulated in float32 (float64 for float64 inputs) over the inner dimension of P Q^T
and then over the rank of L R^T, so the rank-r term and the bias are an epilogue of the big
product and C is written once. Transposed operands are strided views, never copies. The passes
(see ``unlearn_kernels.ops.lora_linear``):

* forward: xa = x A^T; y = x W^T + b + s xa B^T;
* backward: g = s gy B; gx = gy W + g A; gA = g^T x; xa again; gB = s gy^T xa;
* JVP: [xa, x dA^T] = x [A; dA]^T; y as in the forward; t = s [xa, x dA^T] [dB, B]^T.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..contracts.lora_linear import check_op_args, fake_backward, fake_forward, fake_jvp
from . import INTERPRETED, define_op, float64_bits


@triton.jit
def _matmul(p_ptr, q_ptr, l_ptr, r_ptr, bias_ptr, c_ptr, M, N, K, R, alpha_bits, beta_bits,
            s_pm, s_pk, s_qn, s_qk, s_lm, s_lr, s_rn, s_rr,
            HAS_LOW_RANK: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_F64: tl.constexpr, CAST_F32: tl.constexpr,
            DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """C[M, N] (contiguous) = alpha P[M, K] Q[N, K]^T + bias[N] (contiguous) + beta L[M, R] R[N, R]^T; alpha
    and beta arrive as the bits of float64s (Triton's float arguments are fp32)."""
    # int64 first: the rows (tile pid_m * BLOCK_M) pass 2**31 from tile 2**24 on, where int32 wraps negative
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = rows < M
    in_n = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC_F64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # a transposed view's k stride is a whole row
        in_k = ks < K
        p = tl.load(p_ptr + rows[:, None] * s_pm + ks[None, :] * s_pk, mask=in_m[:, None] & in_k[None, :], other=0.0)
        q = tl.load(q_ptr + ks[:, None] * s_qk + cols[None, :] * s_qn, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if CAST_F32:  # reduced-precision tl.dot is wrong in the interpreter
            p, q = p.to(tl.float32), q.to(tl.float32)
        acc += tl.dot(p, q, input_precision=DOT_PRECISION)
    acc = acc * alpha_bits.to(tl.int64).to(tl.float64, bitcast=True).to(acc.dtype)
    if HAS_LOW_RANK:
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
        for r0 in range(0, R, BLOCK_R):
            rs = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            in_r = rs < R
            lt = tl.load(l_ptr + rows[:, None] * s_lm + rs[None, :] * s_lr, mask=in_m[:, None] & in_r[None, :],
                         other=0.0)
            rt = tl.load(r_ptr + rs[:, None] * s_rr + cols[None, :] * s_rn, mask=in_r[:, None] & in_n[None, :],
                         other=0.0)
            if CAST_F32:
                lt, rt = lt.to(tl.float32), rt.to(tl.float32)
            low += tl.dot(lt, rt, input_precision=DOT_PRECISION)
        acc += low * beta_bits.to(tl.int64).to(tl.float64, bitcast=True).to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=in_n, other=0.0).to(acc.dtype)[None, :]
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


#: the most tiles on a CUDA grid's second axis (the first takes 2**31 - 1)
MAX_GRID_Y = 65_535


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _launch_config(m: int, n: int, k: int, rank: int, dtype: torch.dtype) -> dict[str, Any]:
    """Tile sizes, warps and the dtype's constexprs for a (m x k) (n x k)^T product plus a rank-``rank`` term."""
    if INTERPRETED:  # about 1 ms per program: few, large tiles
        cfg: dict[str, Any] = {"BLOCK_M": _block(m, 128), "BLOCK_N": _block(n, 128), "BLOCK_K": _block(k, 128),
                               "BLOCK_R": _block(rank, 64)}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32 if dtype == torch.float64 else 64,
               "BLOCK_R": _block(rank, 32), "num_warps": 8, "num_stages": 3}
    half = dtype in (torch.float16, torch.bfloat16)
    return {**cfg, "ACC_F64": dtype == torch.float64, "CAST_F32": INTERPRETED and half,
            # float32 products in full precision, as torch.matmul's default (no TF32); Triton's default
            # for float16 / bfloat16 operands, which accumulate in float32 either way
            "DOT_PRECISION": "tf32" if half and not INTERPRETED else "ieee"}


def _mm(p: torch.Tensor, q: torch.Tensor, *, alpha: float = 1.0, bias: torch.Tensor | None = None,
        low: tuple[torch.Tensor, torch.Tensor] | None = None, beta: float = 1.0) -> torch.Tensor:
    """``alpha p q^T + bias + beta l r^T`` with ``low = (l, r)``; any strides, a contiguous result."""
    m, k = p.shape
    n = q.shape[0]
    out = torch.empty((m, n), dtype=p.dtype, device=p.device)
    if m == 0 or n == 0:
        return out
    l, r = low if low is not None else (p, q)  # placeholders, never read without HAS_LOW_RANK
    rank = l.shape[1] if low is not None else 0
    cfg = _launch_config(m, n, k, rank, p.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    if grid[1] > MAX_GRID_Y:  # the callers keep the rows (N, unbounded) on axis 0, up to 2**31 - 1 tiles
        raise ValueError(f"lora_linear (Triton): a product with {n} columns needs {grid[1]} column tiles, beyond a "
                         f"GPU grid's {MAX_GRID_Y}")
    wrap_triton(_matmul)[grid](
        p, q, l, r, bias.contiguous() if bias is not None else out, out, m, n, k, rank, float64_bits(alpha),
        float64_bits(beta),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), l.stride(0), l.stride(1), r.stride(0), r.stride(1),
        HAS_LOW_RANK=low is not None, HAS_BIAS=bias is not None, **cfg)
    return out


@define_op("unlearn_kernels_triton::lora_linear", fake_forward)
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """y on 2-D x (see ``unlearn_kernels.ops.lora_linear``)."""
    check_op_args("lora_linear", x, weight, bias, lora_a, lora_b, scale)
    return _mm(x, weight, bias=bias, low=(_mm(x, lora_a), lora_b), beta=scale)


def _fake_backward_list(*args) -> list[torch.Tensor]:
    return [t for t in fake_backward(*args) if t is not None]


# A Python-defined op cannot return None: it returns the requested gradients only, in order.
@define_op("unlearn_kernels_triton::lora_linear_backward", _fake_backward_list)
def lora_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scale: float,
                         output_mask: list[bool]) -> list[torch.Tensor]:
    """The gradients [gx, gA, gB] that output_mask asks for."""
    check_op_args("lora_linear_backward", x, weight, None, lora_a, lora_b, scale, grad_out=grad_out)
    need_x, need_a, need_b = output_mask
    grads = []
    if need_x or need_a:
        g = _mm(grad_out, lora_b.t(), alpha=scale)  # s gy B, (N, r)
        if need_x:
            grads.append(_mm(grad_out, weight.t(), low=(g, lora_a.t())))
        if need_a:
            grads.append(_mm(g.t(), x.t()))
    if need_b:
        # s gy^T xa with xa = x A^T (N, r), whose N rows take the grid's first axis (computed as A x^T they took the
        # second, whose 65,535 tiles N exceeded from 8.4M rows)
        grads.append(_mm(grad_out.t(), _mm(x, lora_a).t(), alpha=scale))
    return grads


@define_op("unlearn_kernels_triton::lora_linear_jvp", fake_jvp)
def lora_linear_jvp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float, tangent_a: torch.Tensor | None,
                    tangent_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s [(x dA^T) B^T + (x A^T) dB^T]); an absent tangent is zero."""
    check_op_args("lora_linear_jvp", x, weight, bias, lora_a, lora_b, scale,
                  (("tangent_a", tangent_a), ("tangent_b", tangent_b)))
    rank = lora_a.shape[0]
    left = _mm(x, torch.cat([lora_a, tangent_a]) if tangent_a is not None else lora_a)  # [xa, x dA^T]
    xa = left[:, :rank]
    out = _mm(x, weight, bias=bias, low=(xa, lora_b), beta=scale)
    if tangent_a is not None and tangent_b is not None:
        tangent = _mm(left, torch.cat([tangent_b, lora_b], dim=1), alpha=scale)
    elif tangent_a is not None:
        tangent = _mm(left[:, rank:], lora_b, alpha=scale)
    elif tangent_b is not None:
        tangent = _mm(xa, tangent_b, alpha=scale)
    else:
        tangent = torch.zeros_like(out)
    return out, tangent
