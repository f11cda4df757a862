"""softmax_ce_grad / softmax_ce_hvp: the C++ CPU and reference backends (and the CUDA kernels, on
CUDA tensors, where torch sees a GPU) against the float64 formula, autograd, opcheck, a
finite-difference check, and bad input with the same error from every backend.
(Triton: test_softmax_ce_triton.py.)"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unlearn_kernels
from unlearn_kernels import ops
from unlearn_kernels.backends import BackendUnavailableError, register_ops
from unlearn_kernels.backends import status as backend_status
from unlearn_kernels.contracts import softmax_ce as contract
from tolerance import assert_within_rule

# backend -> the device of its inputs; the CUDA kernels run only where torch sees a GPU
DEVICES = {"cpp": "cpu", "reference": "cpu", **({"cuda": "cuda"} if torch.cuda.is_available() else {})}
BACKENDS = list(DEVICES)
# On CUDA: up to 1,024 classes a warp per row; above, a block per row, which keeps rows of 32 KB and more in shared
# memory between its passes, as much as fits (on an H100): (5, 12288) whole (float32 16-byte vectors), (3, 9001)
# whole in scalar loads, (4, 50000) in part (the hvp's float32 rows and every float64 row), (3, 50001) in part in
# scalar loads, (33, 4099) not at all in float32. On the CPU rows of under 16 classes go in tiles of rows ((1000, 7):
# two).
SHAPES = [(1, 1), (3, 2), (7, 10), (1000, 7), (64, 17), (256, 1000), (33, 4099), (5, 12288), (3, 9001), (4, 50000),
          (3, 50001)]


def _inputs(shape, dtype, rng, device="cpu", scale=3.0):
    z = (torch.randn(shape, generator=rng, dtype=torch.float64) * scale).to(dtype)
    u = torch.randn(shape, generator=rng, dtype=torch.float64).to(dtype)
    y = torch.randint(0, shape[1], (shape[0],), generator=rng)
    return z.to(device), u.to(device), y.to(device)


def _exact_grad(z, y, smoothing=0.0, ignore_index=-100):
    """Independent float64 formula: gradient of F.cross_entropy summed over rows, by autograd."""
    z64 = z.double().detach().requires_grad_(True)
    F.cross_entropy(z64, y, label_smoothing=smoothing, ignore_index=ignore_index, reduction="sum").backward()
    return z64.grad


def _exact_hvp(z, u):
    """Float64: the explicit per-row Hessian matrix for small C, else the closed form, applied to u less its entry at
    the row's top class (the same product: H 1 = 0), as u_top - <p, u> cancels at a well-fit row in float64 too
    (3.8e-4 of the row's largest entry at 1 - p ~ 1e-9 with a tangent offset by 100)."""
    p = torch.softmax(z.double(), dim=1)
    u = u.double() - u.double().gather(1, z.double().argmax(dim=1, keepdim=True))
    if z.shape[1] > 64:
        return p * u - p * (p * u).sum(1, keepdim=True)
    return torch.einsum("ni,nij->nj", u, torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1))


def test_backends_report_lists_every_backend():
    report = unlearn_kernels.backends()
    for op in ("softmax_ce_grad", "softmax_ce_hvp"):
        assert set(report[op]) == {"cpp", "cuda", "triton", "reference"}
        assert report[op]["cpp"].usable, report[op]["cpp"].reason
        assert report[op]["reference"].usable
        if not torch.cuda.is_available():
            assert not report[op]["cuda"].usable and report[op]["cuda"].reason
    assert "softmax_ce_hvp" in repr(report)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hvp_matches_float64_formula(backend, shape, dtype, rng):
    z, u, _ = _inputs(shape, dtype, rng, DEVICES[backend])
    exact = _exact_hvp(z, u)
    out = ops.softmax_ce_hvp(z, u, backend=backend)
    assert out.dtype == dtype and out.is_contiguous()
    assert_within_rule(out, ops.softmax_ce_hvp_ref(z, u), exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_grad_matches_float64_formula(backend, shape, dtype, smoothing, rng):
    z, _, y = _inputs(shape, dtype, rng, DEVICES[backend])
    y[::3] = -100  # some ignored rows
    out = ops.softmax_ce_grad(z, y, label_smoothing=smoothing, backend=backend)
    assert_within_rule(out, ops.softmax_ce_grad_ref(z, y, smoothing), _exact_grad(z, y, smoothing))


# C = 33 a row at a time; C = 7 (under 16 classes) tiles of 585 rows in the C++ kernel
@pytest.mark.parametrize("classes", [33, 7])
def test_parallel_rows_match_serial(threads, classes, rng):
    """Many short rows split across threads; errors raised from worker threads still surface."""
    z, u, y = _inputs((5000, classes), torch.float32, rng)
    assert_within_rule(ops.softmax_ce_hvp(z, u, backend="cpp"), ops.softmax_ce_hvp_ref(z, u), _exact_hvp(z, u))
    assert_within_rule(ops.softmax_ce_grad(z, y, backend="cpp"), ops.softmax_ce_grad_ref(z, y), _exact_grad(z, y))
    y[[4900, 4321, 2500]] = torch.tensor([40, classes, -7])  # several bad rows in different threads' blocks
    with pytest.raises(ValueError, match=r"target\[2500\] = -7 is out of range"):
        ops.softmax_ce_grad(z, y, backend="cpp")
    z[4999, 0] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        ops.softmax_ce_hvp(z, u, backend="cpp")
    u[4999], z[4999, 0] = float("inf"), 0.0
    with pytest.raises(ValueError, match="tangent contains NaN or Inf"):
        ops.softmax_ce_hvp(z, u, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_targets(backend, rng):
    z, _, y = _inputs((20, 6), torch.float64, rng, DEVICES[backend])
    y[4] = 7  # ignore_index outside [0, C) is allowed
    out = ops.softmax_ce_grad(z, y.int(), ignore_index=7, backend=backend)
    torch.testing.assert_close(out, _exact_grad(z, y, ignore_index=7), rtol=1e-12, atol=1e-14)
    assert out[4].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, rng):
    big_z, big_u, _ = _inputs((40, 130), torch.float32, rng, DEVICES[backend])
    z, u = big_z[::2, 3:120], big_u[1::2, 5:122]  # strided rows, offset columns
    y = torch.randint(0, z.shape[1], (z.shape[0],), generator=rng).to(z.device)
    assert_within_rule(ops.softmax_ce_hvp(z, u, backend=backend), ops.softmax_ce_hvp_ref(z, u), _exact_hvp(z, u))
    assert_within_rule(ops.softmax_ce_grad(z, y, backend=backend), ops.softmax_ce_grad_ref(z, y), _exact_grad(z, y))
    z, u = big_z[::3, 3:10], big_u[::3, 5:12]  # strided rows of 7 classes: the C++ kernel's tiles
    assert_within_rule(ops.softmax_ce_hvp(z, u, backend=backend), ops.softmax_ce_hvp_ref(z, u), _exact_hvp(z, u))
    zt, ut = big_z[:, :40].t(), big_u[:, :40].t()  # column-major: classes not dense
    assert_within_rule(ops.softmax_ce_hvp(zt, ut, backend=backend), ops.softmax_ce_hvp_ref(zt, ut), _exact_hvp(zt, ut))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# C = 300 takes the CUDA kernels' scalar loads; 2048 (a multiple of 8, aligned, over 1024) their 16-byte vectors
# and a block per row; 16384 (rows of 32 KB) a row kept in shared memory; at C = 10 label smoothing's share per
# class (0.01) is far above float16's rounding
@pytest.mark.parametrize("shape", [(50, 300), (6, 2048), (3, 16384), (40, 10)])
# label smoothing, and logits near 100 (exp overflows float32 without the row's max taken off): the C++ kernel's
# reduced-precision gradient once dropped either and passed at smoothing 0 and |z| <= 12
@pytest.mark.parametrize(("smoothing", "offset"), [(0.0, 0.0), (0.1, 0.0), (0.0, 100.0)])
def test_reduced_precision_inputs_accumulate_in_fp32(backend, dtype, shape, smoothing, offset, rng):
    z, u, y = _inputs(shape, dtype, rng, DEVICES[backend])
    z = z + offset
    out = ops.softmax_ce_hvp(z, u, backend=backend)
    assert out.dtype == dtype
    assert_within_rule(out, ops.softmax_ce_hvp_ref(z, u), _exact_hvp(z, u))
    assert_within_rule(ops.softmax_ce_grad(z, y, label_smoothing=smoothing, backend=backend),
                       ops.softmax_ce_grad_ref(z, y, smoothing), _exact_grad(z, y, smoothing))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_maximum_in_the_last_column(backend, rng):
    """The row's largest logit (200: exp overflows without it taken off) in the last of 41 columns, which the C++
    kernel reads in its scalar tail: a row maximum that skipped the tail gave NaN gradients."""
    z, u, y = _inputs((6, 41), torch.float32, rng, DEVICES[backend])
    z[2, 40] = 200.0
    assert_within_rule(ops.softmax_ce_grad(z, y, backend=backend), ops.softmax_ce_grad_ref(z, y), _exact_grad(z, y))
    assert_within_rule(ops.softmax_ce_hvp(z, u, backend=backend), ops.softmax_ce_hvp_ref(z, u), _exact_hvp(z, u))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("column", [5, 59_990])
def test_long_rows_see_every_column(backend, column, rng):
    """Rows of 240 KB (float32, C = 60,000), which the CUDA kernels keep in shared memory between their passes only
    in part (the first columns: on an H100 about 29,000 for the hvp, which keeps z and u, 58,000 for the grad): a
    row maximum, a NaN logit and a bad tangent are seen both in the kept part (column 5) and in the part read twice
    (column 59,990)."""
    z, u, y = _inputs((3, 60_000), torch.float32, rng, DEVICES[backend])
    z[1, column] = 200.0
    assert_within_rule(ops.softmax_ce_grad(z, y, backend=backend), ops.softmax_ce_grad_ref(z, y), _exact_grad(z, y))
    assert_within_rule(ops.softmax_ce_hvp(z, u, backend=backend), ops.softmax_ce_hvp_ref(z, u), _exact_hvp(z, u))
    z_bad = z.clone()
    z_bad[2, column] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        ops.softmax_ce_hvp(z_bad, u, backend=backend)
    with pytest.raises(ValueError, match="logits contain NaN"):
        ops.softmax_ce_grad(z_bad, y, backend=backend)
    u_bad = u.clone()
    u_bad[0, column] = float("inf")
    with pytest.raises(ValueError, match="tangent contains NaN"):
        ops.softmax_ce_hvp(z, u_bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_are_masks_not_errors(backend, rng):
    z, u, y = _inputs((5, 8), torch.float64, rng, DEVICES[backend])
    z[:, 0] = float("-inf")
    y[:] = 1
    out = ops.softmax_ce_hvp(z, u, backend=backend)
    torch.testing.assert_close(out, _exact_hvp(z.clamp_min(-1e300), u), rtol=1e-12, atol=1e-14)
    assert torch.isfinite(ops.softmax_ce_grad(z, y, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    z = torch.zeros(0, 5, device=DEVICES[backend])
    assert ops.softmax_ce_hvp(z, z, backend=backend).shape == (0, 5)
    z, y = torch.zeros(0, 5, device=DEVICES[backend]), torch.zeros(0, dtype=torch.long, device=DEVICES[backend])
    assert ops.softmax_ce_grad(z, y, backend=backend).shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hvp_is_the_derivative_of_grad(backend, rng):
    """Central finite difference of softmax_ce_grad along u equals softmax_ce_hvp(z, u)."""
    z, u, y = _inputs((16, 9), torch.float64, rng, DEVICES[backend])
    eps = 1e-6
    fd = (ops.softmax_ce_grad(z + eps * u, y, backend=backend)
          - ops.softmax_ce_grad(z - eps * u, y, backend=backend)) / (2 * eps)
    torch.testing.assert_close(ops.softmax_ce_hvp(z, u, backend=backend), fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend, rng):
    z, u, y = _inputs((4, 5), torch.float64, rng, DEVICES[backend])
    y[1] = -100
    z.requires_grad_(True)
    u.requires_grad_(True)
    grad_fn = lambda z_: ops.softmax_ce_grad(z_, y, label_smoothing=0.05, backend=backend)  # noqa: E731
    hvp_fn = lambda z_, u_: ops.softmax_ce_hvp(z_, u_, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(grad_fn, (z,))
    assert torch.autograd.gradcheck(hvp_fn, (z, u))
    assert torch.autograd.gradgradcheck(grad_fn, (z,))
    assert torch.autograd.gradgradcheck(hvp_fn, (z, u))


@pytest.mark.parametrize("device", sorted({d for b, d in DEVICES.items() if b != "reference"}))
def test_opcheck_registered_ops(device, rng):
    z, u, y = _inputs((6, 7), torch.float64, rng, device)
    y[0] = -100
    z.requires_grad_(True)
    torch.library.opcheck(torch.ops.unlearn_kernels.softmax_ce_hvp.default, (z, u, True))
    torch.library.opcheck(torch.ops.unlearn_kernels.softmax_ce_grad.default, (z, y, 0.1, -100, True))


def test_torch_compile_traces_the_op(rng):
    z, u, _ = _inputs((8, 12), torch.float32, rng)
    compiled = torch.compile(lambda a, b: ops.softmax_ce_hvp(a, b, backend="cpp") * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z, u), 2 * ops.softmax_ce_hvp_ref(z, u))


# ----------------------------------------------------------------------------- well-fit rows
# Triton too where it runs (through the interpreter without a GPU: the calls that take it have few rows).
TRITON_TOO = BACKENDS + (["triton"] if backend_status("softmax_ce_grad", "triton").usable else [])
TRITON_TOO_DEVICES = {**DEVICES, "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def _well_fit(rows, classes, margin, rng):
    """float64 logits whose target is the top class by `margin` (a range) over a standard normal row: at C = 10 and
    margins 9-13, 1 - p_y is ~1e-5, where an unlearning method's retain rows sit. Rows of over 8,192 classes have
    their target in the last 1,000 and column 2 above the rest by half the smallest margin: Triton's 4,096-wide
    column blocks meet a top class in the first block and the row's own in the third. Row 0's target ties with a
    class half a row away (p = 1/2 each; in another Triton block on long rows), whose tangent is 1e-3 off."""
    z, u, y = _inputs((rows, classes), torch.float64, rng, scale=1.0)
    if classes > 8192:
        y = torch.randint(classes - 1000, classes, (rows,), generator=rng)
        z[:, 2] = z.amax(dim=1) + margin[0] / 2
    gap = torch.empty(rows, dtype=torch.float64).uniform_(*margin, generator=rng)
    z[torch.arange(rows), y] = z.amax(dim=1) + gap
    tie = (int(y[0]) + classes // 2) % classes
    z[0, tie], u[0, tie] = z[0, y[0]], u[0, y[0]] + 1e-3
    return z, u, y


def _row_relative_error(out, exact):
    """The largest |out - exact| of each row over that row's largest |exact|, the worst row's."""
    return ((out.double() - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)).max().item()


@pytest.mark.parametrize("backend", TRITON_TOO)
# bfloat16 for the C++ kernel's reduced-precision path (float16 holds a row's entries of ~1e-5 as subnormals)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# C = 10 one block everywhere; C = 10,000 several vector blocks (C++), three column blocks (Triton, see _well_fit),
# a block per row (CUDA)
@pytest.mark.parametrize(("classes", "margin"), [(10, (9.0, 13.0)), (10_000, (20.0, 24.0))])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
# a tangent whose entries share an offset: u_j - <p, u> rounds to eps |<p, u>| unless every class is taken relative
# to the top class (one C++ version took only the top class so: 4.6e-5 at an offset of 100)
@pytest.mark.parametrize("tangent_offset", [0.0, 100.0])
def test_well_fit_rows_keep_their_digits(backend, dtype, classes, margin, smoothing, tangent_offset, rng):
    """At a well-fit row (p_y ~ 1) p_y - 1 and u_y - <p, u> cancel in plain float32, as in torch's formula (4e-2 of
    the row's largest entry at 1 - p_y ~ 1e-5): every backend (the kernels and the references) takes the top class's
    share apart, so each row keeps the accuracy of its own scale."""
    z, u, y = _well_fit(16 if classes == 10 else 3, classes, margin, rng)
    z, u = z.to(dtype), (u + tangent_offset).to(dtype)
    exact_hvp, exact_grad = _exact_hvp(z, u), _exact_grad(z, y, smoothing)
    device = TRITON_TOO_DEVICES[backend]
    hvp = ops.softmax_ce_hvp(z.to(device), u.to(device), backend=backend).cpu()
    grad = ops.softmax_ce_grad(z.to(device), y.to(device), label_smoothing=smoothing, backend=backend).cpu()
    bound = 16 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
    assert _row_relative_error(hvp, exact_hvp) <= bound
    assert _row_relative_error(grad, exact_grad) <= bound
    if dtype == torch.float32 and smoothing == 0.0:  # torch's float32 formulas do cancel on these rows
        p = torch.softmax(z, dim=1)
        assert _row_relative_error(p * u - p * (p * u).sum(dim=1, keepdim=True), exact_hvp) > 100 * bound
        z_grad = z.clone().requires_grad_(True)
        F.cross_entropy(z_grad, y, reduction="sum").backward()
        assert _row_relative_error(z_grad.grad, exact_grad) > 100 * bound


# ----------------------------------------------------------------------------- bad input
# Every backend, Triton included where it runs, must raise the same error, word for word, for the same bad input.


def _bad_calls(z, u, y):
    """case -> (exception type, message regex, call(backend)); y has 4 rows, z and u are (4, 5)."""
    two_bad = y.clone()
    two_bad[1], two_bad[3] = -3, 5  # the message names the first bad row, whatever the kernel met first
    at_c = y.clone()
    at_c[2] = 5
    return {
        "1-D logits": (ValueError, r"softmax_ce_hvp: logits must be 2-D \(N, C\), got shape \[5\]$",
                       lambda b: ops.softmax_ce_hvp(z[0], u[0], backend=b)),
        "tangent shape": (ValueError, r"softmax_ce_hvp: tangent shape \[4, 3\] must equal logits shape \[4, 5\]$",
                          lambda b: ops.softmax_ce_hvp(z, u[:, :3], backend=b)),
        "tangent dtype": (TypeError, "softmax_ce_hvp: tangent dtype Double must equal logits dtype Float$",
                          lambda b: ops.softmax_ce_hvp(z, u.double(), backend=b)),
        "integer logits": (TypeError, "softmax_ce_hvp: logits must be float16, bfloat16, float32 or float64, got Long$",
                           lambda b: ops.softmax_ce_hvp(z.long(), u.long(), backend=b)),
        # a floating type too, which each backend failed on its own way (the Triton interpreter: wrong values)
        "float8 logits": (TypeError, "softmax_ce_grad: logits must be float16, bfloat16, float32 or float64, got "
                                     "Float8_e4m3fn$",
                          lambda b: ops.softmax_ce_grad(z.to(torch.float8_e4m3fn), y, backend=b)),
        "float target": (TypeError, r"softmax_ce_grad: target must hold integer class indices \(int64\), got Float$",
                         lambda b: ops.softmax_ce_grad(z, y.float(), backend=b)),
        "target shape": (ValueError, r"softmax_ce_grad: target must have shape \(N,\) = \(4,\), got \[2\]$",
                         lambda b: ops.softmax_ce_grad(z, y[:2], backend=b)),
        "smoothing": (ValueError, r"softmax_ce_grad: label_smoothing must be a finite number in \[0, 1\], got 1.5$",
                      lambda b: ops.softmax_ce_grad(z, y, label_smoothing=1.5, backend=b)),
        "smoothing bool": (ValueError,
                           r"softmax_ce_grad: label_smoothing must be a finite number in \[0, 1\], got True$",
                           lambda b: ops.softmax_ce_grad(z, y, label_smoothing=True, backend=b)),
        "target range": (ValueError, r"softmax_ce_grad: target\[1\] = -3 is out of range for 5 classes "
                                     r"\(and is not ignore_index=-100\)$",
                         lambda b: ops.softmax_ce_grad(z, two_bad, backend=b)),
        # one past the last class: the bound is exclusive (Triton zeroed such a row, the reference raised torch's error)
        "target equal to C": (ValueError, r"softmax_ce_grad: target\[2\] = 5 is out of range for 5 classes "
                                          r"\(and is not ignore_index=-100\)$",
                              lambda b: ops.softmax_ce_grad(z, at_c, backend=b)),
        "target device": (ValueError, "softmax_ce_grad: target is on meta but logits on (cpu|cuda:0)$",
                          lambda b: ops.softmax_ce_grad(z, y.to("meta"), backend=b)),
        "tangent device": (ValueError, "softmax_ce_hvp: tangent is on meta but logits on (cpu|cuda:0)$",
                           lambda b: ops.softmax_ce_hvp(z, u.to("meta"), backend=b)),
        # a softmax over no classes is undefined (no target is in range, and an empty row has no max)
        "no classes, grad": (ValueError, r"softmax_ce_grad: logits must have at least one class \(C >= 1\), "
                                         r"got shape \[4, 0\]$",
                             lambda b: ops.softmax_ce_grad(z[:, :0], y, backend=b)),
        "no classes, hvp": (ValueError, r"softmax_ce_hvp: logits must have at least one class \(C >= 1\), "
                                        r"got shape \[4, 0\]$",
                            lambda b: ops.softmax_ce_hvp(z[:, :0], u[:, :0], backend=b)),
        "no rows, no classes": (ValueError, r"softmax_ce_grad: logits must have at least one class \(C >= 1\), "
                                            r"got shape \[0, 0\]$",
                                lambda b: ops.softmax_ce_grad(z[:0, :0], y[:0], backend=b)),
        # The plain Python options are checked in the public function before any backend: the schema
        # would truncate 1.5 to 1 (and zero the rows labelled 1) or raise the dispatcher's own error.
        "ignore_index float": (TypeError, "softmax_ce_grad: ignore_index must be an int, got float$",
                               lambda b: ops.softmax_ce_grad(z, y, ignore_index=1.5, backend=b)),
        "ignore_index str": (TypeError, "softmax_ce_grad: ignore_index must be an int, got str$",
                             lambda b: ops.softmax_ce_grad(z, y, ignore_index="a", backend=b)),
        "ignore_index bool": (TypeError, "softmax_ce_grad: ignore_index must be an int, got bool$",
                              lambda b: ops.softmax_ce_grad(z, y, ignore_index=True, backend=b)),
        "ignore_index past int64": (ValueError, r"softmax_ce_grad: ignore_index must be in the int64 range "
                                                r"\[-2\*\*63, 2\*\*63\), got 1180591620717411303424$",
                                    lambda b: ops.softmax_ce_grad(z, y, ignore_index=2**70, backend=b)),
        "check_finite str, grad": (TypeError, "softmax_ce_grad: check_finite must be a bool, got str$",
                                   lambda b: ops.softmax_ce_grad(z, y, check_finite="no", backend=b)),
        "check_finite int, hvp": (TypeError, "softmax_ce_hvp: check_finite must be a bool, got int$",
                                  lambda b: ops.softmax_ce_hvp(z, u, check_finite=1, backend=b)),
        "smoothing str": (ValueError, r"softmax_ce_grad: label_smoothing must be a finite number in \[0, 1\], got 'a'$",
                          lambda b: ops.softmax_ce_grad(z, y, label_smoothing="a", backend=b)),
        # ... so a bad option is reported before a bad shape, by every backend alike
        "smoothing and shape": (ValueError, r"softmax_ce_grad: label_smoothing must be a finite number in \[0, 1\], "
                                            r"got 2.0$",
                                lambda b: ops.softmax_ce_grad(z[0], y, label_smoothing=2.0, backend=b)),
        "logits type": (TypeError, "softmax_ce_hvp: logits must be a torch.Tensor, got list$",
                        lambda b: ops.softmax_ce_hvp(z.tolist(), u, backend=b)),
        "target type": (TypeError, "softmax_ce_grad: target must be a torch.Tensor, got list$",
                        lambda b: ops.softmax_ce_grad(z, y.tolist(), backend=b)),
    }


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("case", sorted(_bad_calls(*_inputs((4, 5), torch.float32, torch.Generator()))))
def test_bad_input_raises_the_same_error_from_every_backend(case, rng):
    messages = {}
    for backend in TRITON_TOO:
        z, u, y = _inputs((4, 5), torch.float32, rng, TRITON_TOO_DEVICES[backend])
        exc, pattern, call = _bad_calls(z, u, y)[case]
        with pytest.raises(exc, match=pattern) as info:
            call(backend)
        messages[backend] = str(info.value)
    assert len(set(messages.values())) == 1, messages


@pytest.mark.parametrize("backend", TRITON_TOO)
def test_integer_ignore_index_of_any_kind(backend, rng):
    """A numpy or negative integer ignore_index works on every backend (and is not confused with a
    float that the schema would truncate: see the "ignore_index float" case above)."""
    z, _, y = _inputs((6, 4), torch.float64, rng, TRITON_TOO_DEVICES[backend])
    y[1] = 1
    for ignore_index in (np.int64(1), np.int32(1), 1):
        out = ops.softmax_ce_grad(z, y, ignore_index=ignore_index, backend=backend)
        torch.testing.assert_close(out, _exact_grad(z, y, ignore_index=1), rtol=1e-12, atol=1e-14)
        assert out[y == 1].abs().max() == 0 and out[y != 1].abs().min() > 0
    y[2] = -7
    out = ops.softmax_ce_grad(z, y, ignore_index=-7, check_finite=np.True_, backend=backend)
    torch.testing.assert_close(out, _exact_grad(z, y, ignore_index=-7), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", TRITON_TOO)
def test_ignored_rows_are_zero_whatever_they_hold(backend, rng):
    """An ignored row's gradient is 0 even where its logits are NaN or all -inf (the reference once
    multiplied the row by a 0 mask, which keeps a NaN, while the kernels wrote zeros)."""
    z, _, y = _inputs((5, 4), torch.float64, rng, TRITON_TOO_DEVICES[backend])
    z[1, 2], z[3] = float("nan"), float("-inf")
    y[1] = y[3] = -100
    out = ops.softmax_ce_grad(z, y, label_smoothing=0.1, backend=backend)
    assert out[[1, 3]].eq(0).all()
    kept = [0, 2, 4]
    torch.testing.assert_close(out[kept], _exact_grad(z[kept], y[kept], smoothing=0.1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_meta_tensors_give_the_fakes_shape(backend, dtype):
    """Meta tensors hold no values: "auto" takes the reference for them, which checks the shapes,
    dtypes and devices but no values (targets in range, finiteness) and returns what the op's fake
    returns, a meta tensor of the logits' shape and dtype; still differentiable."""
    z = torch.empty((5, 7), dtype=dtype, device="meta").t().requires_grad_(True)  # strided: (7, 5)
    y = torch.empty(7, dtype=torch.long, device="meta")
    u = torch.empty((7, 5), dtype=dtype, device="meta")
    for out, fake in ((ops.softmax_ce_grad(z, y, label_smoothing=0.1, backend=backend),
                       contract.fake_grad(z, y, 0.1, -100, True)),
                      (ops.softmax_ce_hvp(z, u, backend=backend), contract.fake_hvp(z, u, True))):
        assert out.device.type == "meta"
        expected = ((7, 5), dtype, (5, 1))
        assert (out.shape, out.dtype, out.stride()) == (fake.shape, fake.dtype, fake.stride()) == expected
    (grad,) = torch.autograd.grad(ops.softmax_ce_grad(z, y, backend=backend).sum(), z)
    assert grad.shape == z.shape and grad.device.type == "meta"
    # the argument checks still run
    with pytest.raises(ValueError, match=r"^softmax_ce_grad: target must have shape \(N,\) = \(7,\), got \[5\]$"):
        ops.softmax_ce_grad(z, y[:5], backend=backend)
    with pytest.raises(TypeError, match="^softmax_ce_hvp: check_finite must be a bool, got str$"):
        ops.softmax_ce_hvp(z, u, check_finite="yes", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
# a column of the vectorised body, and the last of 41, which the C++ kernel reaches in its scalar tail
@pytest.mark.parametrize(("classes", "column"), [(40, 17), (41, 40)])
def test_non_finite_inputs_are_reported(backend, value, classes, column, rng):
    z, u, y = _inputs((6, classes), torch.float32, rng, DEVICES[backend])
    z_bad = z.clone()
    z_bad[3, column] = value
    with pytest.raises(ValueError, match="logits contain NaN"):
        ops.softmax_ce_hvp(z_bad, u, backend=backend)
    with pytest.raises(ValueError, match="logits contain NaN"):
        ops.softmax_ce_grad(z_bad, y, backend=backend)
    u_bad = u.clone()
    u_bad[1, 2] = value
    with pytest.raises(ValueError, match="tangent contains NaN"):
        ops.softmax_ce_hvp(z, u_bad, backend=backend)
    # a bad tangent where the logit is -inf (p = 0 there; the CUDA kernel's threads may see only such columns)
    z_masked = z.clone()
    z_masked[1, :20] = float("-inf")
    u_bad[1, :2] = value
    with pytest.raises(ValueError, match="tangent contains NaN"):
        ops.softmax_ce_hvp(z_masked, u_bad, backend=backend)
    # check_finite=False skips the check (and the caller's tensors are untouched either way)
    assert torch.isnan(ops.softmax_ce_hvp(z, u_bad, check_finite=False, backend=backend)).any()
    assert torch.isfinite(z).all() and torch.isfinite(u).all()


def test_forced_backend_that_cannot_run_says_why(rng):
    z, u, _ = _inputs((2, 3), torch.float32, rng)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            ops.softmax_ce_hvp(z, u, backend="cuda")
    with pytest.raises(ValueError, match="^softmax_ce_hvp: unknown backend 'fortran'"):  # was unprefixed
        ops.softmax_ce_hvp(z, u, backend="fortran")
    with pytest.raises(ValueError, match="^softmax_ce_hvp: 'gpu' is not a device"):  # was torch's RuntimeError
        unlearn_kernels.choose_backend("softmax_ce_hvp", "gpu")
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        ops.softmax_ce_hvp(z.to("meta"), u.to("meta"), backend="cpp")
    if backend_status("softmax_ce_hvp", "triton").usable:  # the interpreter takes CPU tensors, not meta ones
        with pytest.raises(BackendUnavailableError, match="Triton kernels need CUDA tensors .*got meta"):
            ops.softmax_ce_hvp(z.to("meta"), u.to("meta"), backend="triton")


def test_triton_refuses_tensors_on_another_gpu_than_the_current_one(monkeypatch):
    """Triton launches its kernels on the current CUDA device, whatever device the tensors are on (an illegal
    address, or work on the wrong stream): a forced Triton backend refuses such tensors, naming the fix."""
    from unlearn_kernels.backends import _fits_device  # what choose() refuses a forced backend by, wherever it runs

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine (without one Triton refuses cuda)
    assert _fits_device("triton", torch.device("cuda:0")) is None
    assert _fits_device("triton", torch.device("cuda")) is None
    assert _fits_device("triton", torch.device("cuda:1")) == (
        "Triton kernels launch on the current CUDA device, cuda:0, not the tensors' cuda:1: call "
        "torch.cuda.set_device(1) first")
    if unlearn_kernels.backends()["softmax_ce_hvp"]["triton"].usable:  # and through choose(), where Triton runs
        with pytest.raises(BackendUnavailableError, match=r"cuda:1: call torch.cuda.set_device\(1\) first"):
            unlearn_kernels.choose_backend("softmax_ce_hvp", "cuda:1", "triton")


def test_backend_registry_knows_only_declared_ops_and_backends():
    with pytest.raises(ValueError, match="unknown op 'softmax_ce_jvp'"):
        backend_status("softmax_ce_jvp", "cpp")
    with pytest.raises(ValueError, match=r"softmax_ce_jvp: unknown backends \['fortran'\]"):
        register_ops({"softmax_ce_jvp": ("cpp", "fortran")})
    assert "softmax_ce_jvp" not in unlearn_kernels.backends()


def test_auto_uses_cpp_on_cpu():
    assert unlearn_kernels.choose_backend("softmax_ce_hvp", torch.device("cpu")) == "cpp"


# ----------------------------------------------------------------------------- forward mode
def _hvp_formula(z, u):
    """Float64 p*u - p<p,u>, written here: torch differentiates it on its own (forward mode too)."""
    p = torch.softmax(z, dim=1)
    return p * u - p * (p * u).sum(1, keepdim=True)


@pytest.mark.parametrize("backend", TRITON_TOO)
def test_forward_mode_and_torch_func_match_the_formulas(backend, rng):
    # A registered op carries no forward-mode rule: torch.func.jvp through the C++ and Triton kernels gave a
    # zero tangent without an error, forward_ad no tangent, and torch.func.grad torch's setup_context error.
    from torch.autograd import forward_ad

    z, u, y = _inputs((5, 7), torch.float64, rng, TRITON_TOO_DEVICES[backend])
    dz, du, _ = _inputs((5, 7), torch.float64, rng, TRITON_TOO_DEVICES[backend])
    y[2] = -100
    keep = (y != -100).unsqueeze(1).double()

    _, moved = torch.func.jvp(lambda a: ops.softmax_ce_grad(a, y, label_smoothing=0.1, backend=backend), (z,), (dz,))
    torch.testing.assert_close(moved, _exact_hvp(z, dz) * keep, rtol=1e-12, atol=1e-14)
    _, moved = torch.func.jvp(lambda a, b: ops.softmax_ce_hvp(a, b, backend=backend), (z, u), (dz, du))
    torch.testing.assert_close(moved, torch.func.jvp(_hvp_formula, (z, u), (dz, du))[1], rtol=1e-12, atol=1e-14)
    with forward_ad.dual_level():
        out = ops.softmax_ce_hvp(forward_ad.make_dual(z, dz), u, backend=backend)
        moved = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(moved, torch.func.jvp(lambda a: _hvp_formula(a, u), (z,), (dz,))[1],
                               rtol=1e-12, atol=1e-14)

    weights = torch.randn(5, 7, generator=rng, dtype=torch.float64).to(z.device)
    gradient = torch.func.grad(lambda a: (ops.softmax_ce_hvp(a, u, backend=backend) * weights).sum())(z)
    expected = torch.func.grad(lambda a: (_hvp_formula(a, u) * weights).sum())(z)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-14)
    # along the tangent alone, the logits constant: the forward rule runs (a check of the logits alone skipped it and
    # gave a zero tangent) and the backward fills the tangent's slot (read from the logits' flag it gave None)
    _, moved = torch.func.jvp(lambda b: ops.softmax_ce_hvp(z, b, backend=backend), (u,), (du,))
    torch.testing.assert_close(moved, _hvp_formula(z, du), rtol=1e-12, atol=1e-14)
    leaf = u.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad((ops.softmax_ce_hvp(z, leaf, backend=backend) * weights).sum(), leaf)
    torch.testing.assert_close(gradient, _hvp_formula(z, weights), rtol=1e-12, atol=1e-14)
    # forward over reverse: the Hessian of the summed loss along dz, through the grad op's two rules
    hessian_dz = torch.func.jvp(torch.func.grad(lambda a: (ops.softmax_ce_grad(a, y, backend=backend) * z.detach()).sum()),
                                (z,), (dz,))[1]
    expected = torch.func.jvp(torch.func.grad(lambda a: ((torch.softmax(a, 1) - F.one_hot(y.clamp(min=0), 7)) * keep
                                                         * z.detach()).sum()), (z,), (dz,))[1]
    torch.testing.assert_close(hessian_dz, expected, rtol=1e-12, atol=1e-14)


def test_vmap_over_the_ops(rng):
    z, u, _ = _inputs((3 * 4, 5), torch.float64, rng)
    z, u = z.reshape(3, 4, 5), u.reshape(3, 4, 5)
    expected = torch.stack([_exact_hvp(z[i], u[i]) for i in range(3)])
    for backend in ("cpp", "reference"):  # the reference's finiteness check reads values: vmap without it
        out = torch.func.vmap(lambda a, b: ops.softmax_ce_hvp(a, b, check_finite=False, backend=backend))(z, u)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
