"""The Triton backend of softmax_ce_grad / softmax_ce_hvp, against float64 references.

The test suite runs every Triton kernel through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything is imported), on CUDA tensors where torch sees a GPU and on CPU
tensors otherwise; at about 1 ms per program the inputs have few rows. That the kernels also compile
for a GPU is checked by tests/test_triton_compile.py, in a process without the interpreter.
Accuracy rule (flash-attention's): the kernel's error against the float64 reference is at most
twice the error of the plain PyTorch reference in the same dtype, plus a few ulps of the output's
scale.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from unlearn_kernels import _extension  # noqa: E402
from unlearn_kernels.ops.softmax_ce import (  # noqa: E402
    softmax_ce_grad,
    softmax_ce_grad_ref,
    softmax_ce_hvp,
    softmax_ce_hvp_ref,
)
from unlearn_kernels.triton_kernels import softmax_ce as _defines_ops  # noqa: E402, F401

OPS = torch.ops.unlearn_kernels_triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_2x(out: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, scale: float) -> None:
    """|out - exact| <= 2 |plain - exact| + 4 ulps(dtype) * scale, in the max norm."""
    assert out.dtype == plain.dtype and out.shape == exact.shape
    err = (out.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    atol = 4 * torch.finfo(out.dtype).eps * scale
    # the plain reference is bounded too: else a reference that lost precision loosens the bound to anything
    assert plain_err <= 64 * torch.finfo(out.dtype).eps * scale, f"plain PyTorch error {plain_err:.3g} too large"
    assert err <= 2 * plain_err + atol, f"error {err:.3g} > 2 x plain PyTorch error {plain_err:.3g} + {atol:.3g}"


def make_logits(gen: torch.Generator, n: int, c: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """(n, c) logits spread over ~+-12; layout "rows" gives strided rows (a column slice of a wider
    tensor), "transposed" a non-unit column stride (copied by the op)."""
    if layout == "rows":
        return (4 * torch.randn(n, c + 5, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)[:, 3 : 3 + c]
    if layout == "transposed":
        return (4 * torch.randn(c, n, generator=gen, dtype=torch.float64)).to(DEVICE, dtype).t()
    return (4 * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)


CASES = [  # (rows, classes, dtype, layout)
    (5, 10, torch.float32, "dense"),  # several rows per program
    (3, 50_000, torch.float32, "dense"),  # many column blocks, online max/sum
    (2, 50_000, torch.float64, "rows"),
    (7, 1000, torch.float64, "dense"),  # C not a multiple of the block
    (3, 4097, torch.float32, "rows"),  # one class into a second block
    (4, 33, torch.float64, "transposed"),
    (6, 300, torch.float16, "dense"),
    (6, 300, torch.bfloat16, "rows"),
]


@pytest.mark.parametrize("n,c,dtype,layout", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_grad_matches_reference(n, c, dtype, layout, rng):
    logits = make_logits(rng, n, c, dtype, layout)
    target = torch.randint(0, c, (n,), generator=rng).to(DEVICE)
    target[1] = 7 if c > 7 else 0  # an ignored row (ignore_index=7 below)
    target[0] = c - 1  # the last class, in the last (partial) block
    for smoothing, ignore_index in [(0.0, -100), (0.1, 7)]:
        out = softmax_ce_grad(logits, target, label_smoothing=smoothing, ignore_index=ignore_index, backend="triton")
        exact = softmax_ce_grad_ref(logits.double(), target, smoothing, ignore_index)
        plain = softmax_ce_grad_ref(logits, target, smoothing, ignore_index)
        assert out.is_contiguous()
        assert_within_2x(out, exact, plain, scale=1.0)
        if ignore_index == 7:
            assert (out[target == 7] == 0).all()


@pytest.mark.parametrize("n,c,dtype,layout", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_hvp_matches_reference(n, c, dtype, layout, rng):
    logits = make_logits(rng, n, c, dtype, layout)
    tangent = make_logits(rng, n, c, dtype, "rows" if layout == "dense" else "dense")
    out = softmax_ce_hvp(logits, tangent, backend="triton")
    exact = softmax_ce_hvp_ref(logits.double(), tangent.double())
    plain = softmax_ce_hvp_ref(logits, tangent)
    assert out.is_contiguous()
    assert_within_2x(out, exact, plain, scale=tangent.double().abs().max().item())


def test_empty_inputs():
    empty_rows, no_target = torch.empty(0, 5, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE)
    assert softmax_ce_grad(empty_rows, no_target, backend="triton").shape == (0, 5)
    no_classes = torch.empty(3, 0, device=DEVICE)
    with pytest.raises(ValueError, match=r"softmax_ce_hvp: logits must have at least one class \(C >= 1\)"):
        OPS.softmax_ce_hvp(no_classes, no_classes, True)  # the op itself checks, not only the wrapper


def test_hand_computed_values():
    logits = torch.tensor([[0.0, math.log(4.0)]], device=DEVICE)  # p = [1/5, 4/5]
    grad = OPS.softmax_ce_grad(logits, torch.tensor([1], device=DEVICE), 0.0, -100, True)
    torch.testing.assert_close(grad, torch.tensor([[0.2, -0.2]], device=DEVICE))
    # HVP with u = e_0: p_0 (1 - p_0), -p_0 p_1.
    hvp = OPS.softmax_ce_hvp(logits, torch.tensor([[1.0, 0.0]], device=DEVICE), True)
    torch.testing.assert_close(hvp, torch.tensor([[0.16, -0.16]], device=DEVICE))


# --------------------------------------------------------------------------- errors
def _cpp_message(fn) -> str | None:
    """The compiled kernel's message (C++ CPU, or CUDA on CUDA tensors) for the same bad input (None
    without the extension)."""
    if not _extension.extension_loaded():
        return None
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def test_target_out_of_range_raises_like_cpp():
    logits, target = torch.randn(4, 10, device=DEVICE), torch.tensor([1, 2, 12, -100], device=DEVICE)
    with pytest.raises(ValueError, match=r"target\[2\] = 12 is out of range for 10 classes") as info:
        OPS.softmax_ce_grad(logits, target, 0.0, -100, False)  # the op itself checks, not only the wrapper
    expected = _cpp_message(lambda: torch.ops.unlearn_kernels.softmax_ce_grad(logits, target, 0.0, -100, False))
    assert expected is None or str(info.value) == expected
    with pytest.raises(ValueError, match=r"target\[0\] = -1 is out of range"):
        softmax_ce_grad(logits, torch.tensor([-1, 0, 0, 0], device=DEVICE), backend="triton")


# Non-finite inputs make the interpreter's numpy arithmetic warn, as intended.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_bad_logits_raise_like_cpp(bad):
    logits, target = torch.randn(3, 20, device=DEVICE), torch.tensor([1, 2, 3], device=DEVICE)
    tangent = torch.randn(3, 20, device=DEVICE)
    if bad == "all -inf":
        logits[1] = float("-inf")
    else:
        logits[1, 5] = bad
    for op, call, cpp_call in [
        ("grad", lambda: OPS.softmax_ce_grad(logits, target, 0.0, -100, True),
         lambda: torch.ops.unlearn_kernels.softmax_ce_grad(logits, target, 0.0, -100, True)),
        ("hvp", lambda: OPS.softmax_ce_hvp(logits, tangent, True),
         lambda: torch.ops.unlearn_kernels.softmax_ce_hvp(logits, tangent, True)),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=f"softmax_ce_{op}: logits contain NaN or \\+Inf") as info:
            call()
        expected = _cpp_message(cpp_call)
        assert expected is None or str(info.value) == expected
    # Not checked: no error; ignored rows are never checked (as in the C++ kernel).
    OPS.softmax_ce_grad(logits, target, 0.0, -100, False)
    OPS.softmax_ce_hvp(logits, tangent, False)
    out = OPS.softmax_ce_grad(logits, torch.tensor([1, -100, 3], device=DEVICE), 0.0, -100, True)
    assert (out[1] == 0).all() and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_bad_tangent_raises(bad):
    logits, tangent = torch.randn(3, 20, device=DEVICE), torch.randn(3, 20, device=DEVICE)
    tangent[2, 7] = bad
    with pytest.raises(ValueError, match="softmax_ce_hvp: tangent contains NaN or Inf"):
        softmax_ce_hvp(logits, tangent, backend="triton")
    assert torch.isfinite(OPS.softmax_ce_hvp(logits, tangent, False)[:2]).all()  # other rows unaffected


def test_bad_arguments_raise():
    logits = torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="label_smoothing"):
        OPS.softmax_ce_grad(logits, torch.tensor([0, 1], device=DEVICE), 1.5, -100, True)
    with pytest.raises(ValueError, match="2-D"):
        OPS.softmax_ce_hvp(logits[0], logits[0], True)
    with pytest.raises(TypeError, match="tangent dtype"):
        OPS.softmax_ce_hvp(logits, logits.double(), True)
    with pytest.raises(TypeError, match="int64"):
        OPS.softmax_ce_grad(logits, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), 0.0, -100, True)


# --------------------------------------------------------------------------- autograd, opcheck, compile
def test_gradcheck_through_triton_ops(rng):
    logits = torch.randn(2, 5, generator=rng, dtype=torch.float64).to(DEVICE).requires_grad_()
    tangent = torch.randn(2, 5, generator=rng, dtype=torch.float64).to(DEVICE).requires_grad_()
    target = torch.tensor([3, -100], device=DEVICE)
    assert torch.autograd.gradcheck(lambda z: OPS.softmax_ce_grad(z, target, 0.2, -100, True), (logits,))
    assert torch.autograd.gradcheck(lambda z, u: OPS.softmax_ce_hvp(z, u, True), (logits, tangent))


def test_opcheck(rng):
    # In interpreter mode the ops are opaque custom_ops with a registered fake (wrap_triton cannot
    # trace interpreted kernels); with a GPU they are triton_ops. opcheck covers both.
    logits = torch.randn(3, 6, generator=rng, dtype=torch.float64).to(DEVICE).requires_grad_()
    tangent = torch.randn(3, 6, generator=rng, dtype=torch.float64).to(DEVICE).requires_grad_()
    torch.library.opcheck(OPS.softmax_ce_grad, (logits, torch.tensor([0, 5, -100], device=DEVICE), 0.1, -100, True))
    torch.library.opcheck(OPS.softmax_ce_hvp, (logits, tangent, True))


def test_torch_compile_fullgraph(rng):
    logits = torch.randn(3, 6, generator=rng).to(DEVICE)
    tangent = torch.randn(3, 6, generator=rng).to(DEVICE)
    target = torch.tensor([0, 5, 2], device=DEVICE)

    def f(z, y, u):
        return OPS.softmax_ce_grad(z, y, 0.1, -100, True) + OPS.softmax_ce_hvp(z, u, True)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, target, tangent), f(logits, target, tangent))
