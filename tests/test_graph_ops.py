"""curvature.graph_ops: convolutions whose second derivatives run as convolutions and one convolution backward,
eval-mode batch norms, layer norms, softmaxes and GELUs, held to torch's own double backward (float64) on every
device; float32 CPU linear layers on the compiled passes' GEMM route (ops.gemm), held to float64 under the accuracy
rule; and the generic Hessian operator that builds its gradient graphs under the mode."""
from __future__ import annotations

import contextlib
import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule
from torch import nn
from torch.autograd import forward_ad

from unlearn_kernels import aten_gemm, cpu_gemm, onednn_gemm
from unlearn_kernels.curvature import generic, hessian_operator
from unlearn_kernels.curvature.graph_ops import graph_ops
from unlearn_kernels.models import ResNet18

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _node_names(*outputs: torch.Tensor) -> set[str]:
    """The type names of the autograd nodes that ``outputs`` reach."""
    nodes, stack = set(), [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in nodes}

# (dims, stride, padding, dilation, groups, bias, input needs a gradient, weight needs a gradient)
CASES = [
    (1, 1, 1, 1, 1, True, True, True),
    (1, 2, 0, 1, 2, False, True, True),
    (2, 1, 1, 1, 1, True, True, True),
    (2, 2, 0, 1, 2, False, True, True),
    (2, (2, 1), (1, 0), (1, 2), 2, True, True, True),
    (2, 1, 2, 2, 1, True, False, True),  # a first layer: the input needs no gradient
    (2, 1, 1, 1, 1, True, True, False),  # a frozen weight: the input's curvature only
    (3, 1, 1, 1, 1, True, True, True),
    (3, 2, 1, 1, 2, False, False, True),
]


def _second_order(case: tuple, device: torch.device, under_mode: bool, rng: torch.Generator):
    """(output, gradient, Hessian-vector product, output's grad_fn) of a tanh-squared loss of one convolution."""
    dims, stride, padding, dilation, groups, with_bias, x_grad, w_grad = case
    make = lambda *shape: torch.randn(*shape, generator=rng, dtype=torch.float64).to(device)  # noqa: E731
    x = make(3, 4, *[9] * dims).requires_grad_(x_grad)
    w = make(6, 4 // groups, *[3] * dims).requires_grad_(w_grad)
    b = make(6).requires_grad_() if with_bias else None
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    vectors = [make(*t.shape) for t in inputs]

    def grads():
        y = CONVS[dims](x, w, b, stride, padding, dilation, groups)
        return y, torch.autograd.grad((y.tanh() ** 2).sum(), inputs, create_graph=True)

    if under_mode:
        with graph_ops():
            y, g = grads()
    else:
        y, g = grads()
    hv = torch.autograd.grad(g, inputs, vectors)
    return y, g, hv, type(y.grad_fn).__name__


@pytest.mark.parametrize("case", CASES)
def test_second_derivatives_match_torch(case, device):
    ours = _second_order(case, device, True, torch.Generator().manual_seed(0))
    torchs = _second_order(case, device, False, torch.Generator().manual_seed(0))
    assert ours[3] == "_ConvBackward" and torchs[3] == "ConvolutionBackward0"
    # forward and gradient: the same kernels as torch's, bitwise on the CPU (cuDNN may pick an algorithm of another
    # summation order from one call to the next: there to rounding)
    if device.type == "cpu":
        assert torch.equal(ours[0], torchs[0])
        assert all(torch.equal(a, b) for a, b in zip(ours[1], torchs[1]))
    for a, b in [(ours[0], torchs[0]), *zip(ours[1], torchs[1]), *zip(ours[2], torchs[2])]:
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def test_gradgradcheck():
    """Second derivatives against finite differences of the backward (torch.autograd.gradgradcheck)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)

    def conv(x, w, b):
        with graph_ops():
            return F.conv2d(x, w, b, 2, 1)

    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))


def test_third_derivative_matches_torch():
    """Every op of the double backward is differentiable: the derivative of v . H v is torch's."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)

    def third(under_mode: bool) -> torch.Tensor:
        leaf = w.clone().requires_grad_()
        if under_mode:
            with graph_ops():
                y = F.conv2d(x, leaf, padding=1)
        else:
            y = F.conv2d(x, leaf, padding=1)
        g, = torch.autograd.grad((y.sin()).sum(), leaf, create_graph=True)
        hv, = torch.autograd.grad(g, leaf, v, create_graph=True)
        return torch.autograd.grad((hv * v).sum(), leaf)[0]

    ours, torchs = third(True), third(False)
    assert float((ours - torchs).abs().max()) <= 1e-12 * float(torchs.abs().max())


@pytest.mark.parametrize("call", [
    lambda x, w: F.conv2d(x, w, padding="same"),  # string padding
    lambda x, w: F.conv2d(x[0], w, padding=1),  # an unbatched input
])
def test_torch_runs_where_it_does_not_apply(call):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    with graph_ops():
        y = call(x, w)
        with torch.no_grad():
            plain = call(x, w)
    names = _node_names(y)
    assert "ConvolutionBackward0" in names and "_ConvBackward" not in names
    assert plain.grad_fn is None and torch.equal(plain, call(x, w).detach())
    with graph_ops():
        frozen = F.conv2d(x, w.detach(), padding=1)  # nothing needs a gradient
    assert frozen.grad_fn is None


def test_generic_operator_runs_convolutions_under_it(device, monkeypatch):
    """The generic Hessian's kept gradient graph holds our convolutions and batch norms; its products are plain
    double backward's, and its cache counts the tensors our Functions save as it counts torch's nodes'."""
    torch.manual_seed(0)
    model = ResNet18(10, 3, 8).double().eval().to(device)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    assert op.mode == "reverse-over-reverse" and op.cached_batches == 1
    names = _node_names(*op._cache[0][0].grads)
    assert {"_ConvGradientsBackward", "_ConvBackward", "_BatchNormGradientsBackward"} <= names
    assert not {"ConvolutionBackward0", "NativeBatchNormBackward0"} & names

    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    v = torch.randn(op.shape[0], dtype=torch.float64, device=device)
    pieces = [piece.view_as(p) for piece, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    reference = torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, pieces)])
    assert float((op.matvec(v) - reference).norm()) <= 1e-10 * float(reference.norm())
    monkeypatch.setattr(generic, "graph_ops", contextlib.nullcontext)  # torch's convolutions
    plain = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    assert "ConvolutionBackward0" in _node_names(*plain._cache[0][0].grads)
    if device.type == "cpu":  # on a GPU torch's batch norm may be cuDNN's, which keeps other tensors
        assert op.cached_bytes == plain.cached_bytes  # the same activations, gradients and weights kept


def test_numpy_integer_settings():
    """A stride, padding or dilation given as a numpy integer (which torch takes) is read as an int."""
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    with graph_ops():
        y = F.conv2d(x, w, None, np.int64(2), np.int64(1), np.int64(1))
    assert type(y.grad_fn).__name__ == "_ConvBackward" and torch.equal(y, F.conv2d(x, w, None, 2, 1, 1))


def _torch_func_hvp(under_mode: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    grad = torch.func.grad(lambda w: F.conv2d(x, w, padding=1).tanh().square().sum())
    with graph_ops() if under_mode else contextlib.nullcontext():
        return torch.func.jvp(grad, (w,), (v,))[1]


def test_torch_func_and_forward_ad_run_as_torch():
    """Inside torch.func's transforms, and with forward-mode tangents, torch's convolution runs (the Functions have no
    vmap rule and no jvp): the same results as without the mode."""
    assert torch.equal(_torch_func_hvp(True), _torch_func_hvp(False))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn_like(w)
    with forward_ad.dual_level(), graph_ops():
        out = F.conv2d(x, forward_ad.make_dual(w, t), padding=1)
        tangent = forward_ad.unpack_dual(out).tangent
    assert torch.equal(tangent, F.conv2d(x, t, padding=1))


def test_autocast_and_complex_run_as_torch():
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with graph_ops(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.conv2d(x, w, padding=1)
    assert y.dtype == torch.bfloat16 and "_ConvBackward" not in _node_names(y)
    z = torch.randn(2, 3, 6, 6, dtype=torch.complex128)
    k = torch.randn(4, 3, 3, 3, dtype=torch.complex128, requires_grad=True)
    with graph_ops():
        c = F.conv2d(z, k, padding=1)
    assert "_ConvBackward" not in _node_names(c) and torch.equal(c, F.conv2d(z, k, padding=1))


class _AutocastConv(nn.Module):
    """A conv run under autocast inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.conv(x)
        return self.head(z.float().tanh().mean((2, 3)))


class _VmappedConv(nn.Module):
    """A conv applied through torch.vmap inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.vmap(self.conv)(torch.stack([x, x.flip(-1)])).tanh().mean((0, 3, 4)))


@pytest.mark.parametrize("make, dtype", [(_AutocastConv, torch.float32), (_VmappedConv, torch.float64)])
def test_operator_on_models_that_torch_runs_the_convolution_of(make, dtype, monkeypatch):
    """Models whose convolutions run under autocast or inside torch.vmap keep double backward (the mode leaves their
    convolutions to torch): the same products as the operator without the mode."""
    torch.manual_seed(0)
    model = make().to(dtype)
    x, y = torch.randn(4, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (4,))
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    assert op.mode == "reverse-over-reverse"
    v = torch.randn(op.shape[0], dtype=dtype)
    monkeypatch.setattr(generic, "graph_ops", contextlib.nullcontext)
    plain = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    assert torch.equal(op.matvec(v), plain.matvec(v))


def _assert_left_to_torch(fresh_call, node: str) -> None:
    """``fresh_call()`` (new inputs each time) under the mode gives what it gives without: torch's values and a graph
    without ``node``, or torch's own error."""
    def outcome(under_mode: bool) -> torch.Tensor | str:
        try:
            with graph_ops() if under_mode else contextlib.nullcontext():
                return fresh_call()
        except (RuntimeError, TypeError, ValueError) as error:
            return str(error)

    ours, torchs = outcome(True), outcome(False)
    if isinstance(torchs, str):
        assert ours == torchs
    else:
        assert node not in _node_names(ours) and torch.equal(ours, torchs)


# ----------------------------------------------------------------------------- batch normalisation (eval mode)
# (input's shape, affine, input needs a gradient, weight needs a gradient)
BN_CASES = [((5, 4), True, True, True), ((3, 4, 7), True, True, True), ((3, 4, 5, 5), True, True, True),
            ((2, 4, 3, 3, 3), True, True, True), ((3, 4, 5, 5), False, True, True), ((3, 4, 5, 5), True, False, True),
            ((3, 4, 5, 5), True, True, False)]


def _batch_norm_orders(case: tuple, device: torch.device, under_mode: bool):
    """(output, gradient, H v, derivative of (H v)^2, output's grad_fn) of a loss of one eval-mode batch norm."""
    shape, affine, x_grad, w_grad = case
    gen = torch.Generator().manual_seed(4)
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    x = make(*shape).requires_grad_(x_grad)
    mean, var = make(shape[1]), make(shape[1]).exp()
    w, b = (make(shape[1]).requires_grad_(w_grad), make(shape[1]).requires_grad_()) if affine else (None, None)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    vectors = [make(*t.shape) for t in inputs]
    with graph_ops() if under_mode else contextlib.nullcontext():
        y = F.batch_norm(x, mean, var, w, b, False, 0.1, 1e-3)
        g = torch.autograd.grad(y.tanh().square().sum() + y.sum() * y.mean(), inputs, create_graph=True)
    hv = torch.autograd.grad(g, inputs, vectors, create_graph=True)
    third = torch.autograd.grad(sum(h.square().sum() for h in hv), inputs)
    return y, g, hv, third, type(y.grad_fn).__name__


@pytest.mark.parametrize("case", BN_CASES)
def test_batch_norm_derivatives_match_torch(case, device):
    """Forward: torch's kernel, bitwise. Gradient: torch's native backward kernel, bitwise where torch's own batch
    norm takes it (the CPU; on a GPU torch may take cuDNN's: then to rounding). Second and third derivatives to
    rounding."""
    ours, torchs = _batch_norm_orders(case, device, True), _batch_norm_orders(case, device, False)
    assert ours[4] == "_BatchNormEvalBackward" and torchs[4] in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0")
    assert torch.equal(ours[0], torchs[0])
    if torchs[4] == "NativeBatchNormBackward0":
        assert all(torch.equal(a, b) for a, b in zip(ours[1], torchs[1]))
    for a, b in [*zip(ours[1], torchs[1]), *zip(ours[2], torchs[2]), *zip(ours[3], torchs[3])]:
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def test_batch_norm_gradgradcheck():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def norm(x, w, b):
        with graph_ops():
            return F.batch_norm(x, mean, var, w, b, False, 0.1, 1e-5)

    assert torch.autograd.gradcheck(norm, (x, w, b))
    assert torch.autograd.gradgradcheck(norm, (x, w, b))


@pytest.mark.parametrize("call", [
    lambda x, m, v, w: F.batch_norm(x, m, v, w, None, True),  # training mode: batch statistics
    lambda x, m, v, w: F.batch_norm(x[..., 0].unsqueeze(0)[:, :, :1], m, v, w, None, True),  # one value per channel
    lambda x, m, v, w: F.batch_norm(x, None, None, w, None, False),  # eval mode without running statistics
    lambda x, m, v, w: F.batch_norm(x, m.float(), v.float(), w, None, False),  # statistics of another dtype
    lambda x, m, v, w: F.batch_norm(x, m.requires_grad_(), v, w, None, False),  # statistics that need a gradient
    lambda x, m, v, w: F.batch_norm(x, m[:3], v[:3], w, None, False),  # statistics of the wrong size
    lambda x, m, v, w: F.batch_norm(x[:0], m, v, w, None, False),  # no rows (torch's kernel divides by them)
])
def test_batch_norm_torch_runs_where_it_does_not_apply(call):
    """Torch's own batch norm runs: its values, its graph, or its own error."""
    def fresh_call() -> torch.Tensor:
        gen = torch.Generator().manual_seed(6)
        x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
        m, v = torch.randn(4, generator=gen, dtype=torch.float64), torch.rand(4, generator=gen, dtype=torch.float64)
        return call(x, m, v, w)

    _assert_left_to_torch(fresh_call, "_BatchNormEvalBackward")


# ----------------------------------------------------------------------------- layer norm over the last dim
# (input's shape, weight, bias, input needs a gradient)
LN_CASES = [((3, 5, 8), True, True, True), ((4, 8), False, False, True), ((4, 8), True, False, True),
            ((2, 3, 8), True, True, False), ((6, 1), True, True, True), ((2, 70), True, True, True)]


def _layer_norm_parts(case: tuple, device: torch.device):
    gen = torch.Generator().manual_seed(8)
    shape, with_weight, with_bias, x_grad = case
    make = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    n = shape[-1]
    x = make(*shape).requires_grad_(x_grad)
    w = make(n).requires_grad_() if with_weight else None
    b = make(n).requires_grad_() if with_bias else None
    return x, w, b, make(*shape)


def _layer_norm_hvp(x, w, b, weights, under_mode: bool, create_graph: bool = False):
    """(output, gradient, H v, output's grad_fn) of a loss of one layer norm, v seeded Gaussian."""
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    with graph_ops() if under_mode else contextlib.nullcontext():
        y = F.layer_norm(x, (x.shape[-1],), w, b, 1e-3)
        g = torch.autograd.grad((y.tanh() * weights).sum() + y.square().sum() * y.mean(), inputs, create_graph=True)
    gen = torch.Generator().manual_seed(10)
    vectors = [torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in inputs]
    hv = torch.autograd.grad(g, inputs, vectors, create_graph=create_graph)
    return y, g, hv, type(y.grad_fn).__name__


@pytest.mark.parametrize("case", LN_CASES)
def test_layer_norm_second_derivatives_match_torch(case, device):
    """On the CPU the layer norm's second derivatives run as ops.layer_norm_double_backward: torch's forward and
    gradient bitwise, second derivatives to rounding; on a GPU torch's own layer norm runs."""
    x, w, b, weights = _layer_norm_parts(case, device)
    ours, torchs = _layer_norm_hvp(x, w, b, weights, True), _layer_norm_hvp(x, w, b, weights, False)
    assert ours[3] == ("_LayerNormBackward" if device.type == "cpu" else "NativeLayerNormBackward0")
    assert torch.equal(ours[0], torchs[0]) and all(torch.equal(p, q) for p, q in zip(ours[1], torchs[1]))
    for p, q in zip(ours[2], torchs[2]):
        assert float((p - q).abs().max()) <= 1e-12 * float(q.abs().max())


def test_layer_norm_third_derivatives_against_finite_differences():
    """The double backward is differentiable again, in x through the row statistics too (gradcheck of H v as a
    function of x and w). Torch's own third derivative of a layer norm takes its saved statistics as constants:
    the same check fails for it."""
    x, w, b, weights = _layer_norm_parts(((3, 6), True, True, True), torch.device("cpu"))

    def hvp(x, w, under_mode=True):
        return _layer_norm_hvp(x, w, b.detach(), weights, under_mode, create_graph=True)[2]

    assert torch.autograd.gradcheck(hvp, (x, w))
    assert not torch.autograd.gradcheck(lambda x, w: hvp(x, w, False), (x, w), raise_exception=False)


@pytest.mark.parametrize("call", [
    lambda x, w: F.layer_norm(x, x.shape[-2:], None, None),  # over two dims
    lambda x, w: F.layer_norm(x.bfloat16(), (5,), w.bfloat16(), None),  # a dtype the C++ kernel does not take
    lambda x, w: F.layer_norm(x.detach(), (5,), w.detach(), None),  # nothing needs a gradient
    lambda x, w: F.layer_norm(x, (5,), w.double(), None),  # a weight of another dtype: torch's own error
    lambda x, w: F.layer_norm(x, (4,), None, None),  # a shape that does not fit: torch's own error
    lambda x, w: F.layer_norm(x[:0], (5,), w, None),  # no rows
    lambda x, w: F.layer_norm(x, 5, w, None),  # a shape torch refuses: its own error
    lambda x, w: F.layer_norm(x, torch.tensor([5]), w, None),
])
def test_layer_norm_torch_runs_where_it_does_not_apply(call):
    """Torch's own layer norm runs: its values, its graph, or its own error."""
    def fresh_call() -> torch.Tensor:
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
        return call(x, torch.randn(5, generator=gen, requires_grad=True))

    _assert_left_to_torch(fresh_call, "_LayerNormBackward")


# ----------------------------------------------------------------------------- GELU
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_derivatives_match_torch(approximate, device):
    """On the CPU GELU's second derivatives run as ops.gelu_double_backward: torch's forward and gradient bitwise,
    second and third derivatives to rounding; on a GPU torch's own GELU runs."""
    def orders(under_mode: bool):
        gen = torch.Generator().manual_seed(11)
        x = (3 * torch.randn(5, 7, generator=gen, dtype=torch.float64)).to(device).requires_grad_()
        weights, v = (torch.randn(5, 7, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
        with graph_ops() if under_mode else contextlib.nullcontext():
            y = F.gelu(x, approximate=approximate)
            g, = torch.autograd.grad((y.sin() * weights).sum(), x, create_graph=True)
        hv, = torch.autograd.grad(g, x, v, create_graph=True)
        third, = torch.autograd.grad(hv.square().sum(), x)
        return y, g, hv, third, type(y.grad_fn).__name__

    ours, torchs = orders(True), orders(False)
    assert ours[4] == ("_GeluBackward" if device.type == "cpu" else "GeluBackward0")
    assert torch.equal(ours[0], torchs[0]) and torch.equal(ours[1], torchs[1])
    for a, b in ((ours[2], torchs[2]), (ours[3], torchs[3])):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


@pytest.mark.parametrize("call", [
    lambda x: F.gelu(x.bfloat16()),  # a dtype the C++ kernel does not take
    lambda x: F.gelu(x.detach()),  # nothing needs a gradient
    lambda x: F.gelu(x, approximate="erf"),  # an approximation torch refuses: its own error
])
def test_gelu_torch_runs_where_it_does_not_apply(call):
    def fresh_call() -> torch.Tensor:
        return call(torch.randn(3, 4, generator=torch.Generator().manual_seed(12), requires_grad=True))

    _assert_left_to_torch(fresh_call, "_GeluBackward")


def test_gelu_module_is_taken():
    x = torch.randn(3, 4, requires_grad=True)
    for module in (nn.GELU(), nn.GELU(approximate="tanh")):
        with graph_ops():
            y = module(x)
        assert type(y.grad_fn).__name__ == "_GeluBackward" and torch.equal(y, module(x))


# ----------------------------------------------------------------------------- softmax over the last dim
SOFTMAXES = [
    lambda x: torch.softmax(x, -1),
    lambda x: F.softmax(x, dim=-1),
    lambda x: x.softmax(-1),
    lambda x: x.softmax(dim=2),  # the last dim by its index
]


def _softmax_orders(call, device: torch.device, under_mode: bool):
    """(output, gradient, H v, derivative of (H v)^2, output's grad_fn) of a loss of one softmax."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    v, weights = (torch.randn(3, 4, 9, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    with graph_ops() if under_mode else contextlib.nullcontext():
        y = call(x)
        g, = torch.autograd.grad((y.sin() * weights).sum(), x, create_graph=True)
    hv, = torch.autograd.grad(g, x, v, create_graph=True)
    third, = torch.autograd.grad(hv.square().sum(), x)
    return y, g, hv, third, type(y.grad_fn).__name__


@pytest.mark.parametrize("call", SOFTMAXES)
def test_softmax_derivatives_match_torch(call, device):
    """On the CPU the softmax's second derivatives run as ops.softmax_double_backward: torch's forward and gradient
    bitwise, second and third derivatives to rounding; on a GPU torch's own softmax runs."""
    ours, torchs = _softmax_orders(call, device, True), _softmax_orders(call, device, False)
    assert ours[4] == ("_SoftmaxBackward" if device.type == "cpu" else "SoftmaxBackward0")
    assert torchs[4] == "SoftmaxBackward0"
    assert torch.equal(ours[0], torchs[0]) and torch.equal(ours[1], torchs[1])
    for a, b in ((ours[2], torchs[2]), (ours[3], torchs[3])):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


@pytest.mark.parametrize("call", [
    lambda x: torch.softmax(x, 1),  # not the last dim
    lambda x: torch.softmax(x, -1, dtype=torch.float64),  # a dtype to compute in
    lambda x: torch.softmax(x, -1, torch.float64),  # the same, positional
    lambda x: x.softmax(-1, torch.float64),
    lambda x: F.softmax(x, -1, 3, torch.float64),
    lambda x: torch.softmax(x.bfloat16(), -1),  # a dtype the C++ kernel does not take
    lambda x: torch.softmax(x.detach(), -1),  # nothing needs a gradient
])
def test_softmax_torch_runs_where_it_does_not_apply(call):
    x = torch.randn(3, 4, 5, requires_grad=True)
    with graph_ops():
        y = call(x)
    assert "_SoftmaxBackward" not in _node_names(y) and torch.equal(y, call(x))


# ----------------------------------------------------------------------------- linear layers
_GEMM_NODE = "GeneratedBackwardFor_unlearn_kernels_gemm_defaultBackward"


@pytest.fixture(params=["default", "onednn"])
def gemm_route(request):
    """The test on this machine's own GEMM route, then within onednn_gemm() (oneDNN's wherever the CPU can run it):
    on an Intel CPU the default route is ATen's, and the mode leaves linear layers and matrix products to torch."""
    with onednn_gemm() if request.param == "onednn" else contextlib.nullcontext():
        yield request.param


def _layer_norm_mlp(dtype: torch.dtype) -> nn.Module:
    """An MLP the fused path does not take (LayerNorm), whose linear layers' GEMMs pass the oneDNN route's threshold
    at 1,024 rows."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Tanh(), nn.Linear(256, 256), nn.GELU(),
                         nn.Linear(256, 10)).to(dtype)


def test_linear_layers_take_the_gemm_route_where_the_machine_has_it(gemm_route):
    x = torch.randn(700, 64)
    w, b = torch.randn(128, 64, requires_grad=True), torch.randn(128, requires_grad=True)
    with graph_ops():
        ours = F.linear(x, w, b)
        batched = F.linear(x.view(7, 100, 64), w)
        with aten_gemm():
            atens = F.linear(x, w, b)
        plain = [F.linear(x.double(), w.double(), b.double()), F.linear(x[0], w, b)]  # float64, a 1-D input
        with torch.no_grad():
            plain.append(F.linear(x, w, b))
    onednn = cpu_gemm() == "onednn"
    assert (_GEMM_NODE in _node_names(ours)) == onednn and (_GEMM_NODE in _node_names(batched)) == onednn
    assert batched.shape == (7, 100, 128)
    for out in (atens, *plain):
        assert _GEMM_NODE not in _node_names(out)
    torch.testing.assert_close(ours, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_second_derivatives_meet_the_accuracy_rule(gemm_route):
    """The double backward of a float32 model built under the mode (its GEMMs on oneDNN's route where the machine
    has it) against float64 double backward, no less accurate than torch's own float32 double backward."""
    x64 = torch.randn(1024, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 10, (1024,), generator=torch.Generator().manual_seed(7))

    def hvp(dtype: torch.dtype, under_mode: bool) -> torch.Tensor:
        model = _layer_norm_mlp(dtype)
        params = list(model.parameters())
        vectors = [torch.ones_like(p) / p.numel() ** 0.5 for p in params]
        with graph_ops() if under_mode else contextlib.nullcontext():
            grads = torch.autograd.grad(F.cross_entropy(model(x64.to(dtype)), y), params, create_graph=True)
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, vectors)])

    assert_within_rule(hvp(torch.float32, True), hvp(torch.float32, False), hvp(torch.float64, False), ulps=16.0)


def test_generic_operator_builds_linear_layers_on_the_gemm_route(monkeypatch, gemm_route):
    model = _layer_norm_mlp(torch.float32)
    x, y = torch.randn(1024, 64), torch.randint(0, 10, (1024,))
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    assert op.path == "generic" and op.mode == "reverse-over-reverse"
    assert (_GEMM_NODE in _node_names(*op._cache[0][0].grads)) == (cpu_gemm() == "onednn")
    v = torch.randn(op.shape[0])
    model64 = _layer_norm_mlp(torch.float64)
    exact = hessian_operator(model64, nn.CrossEntropyLoss(), (x.double(), y)).matvec(v.double())
    monkeypatch.setattr(generic, "graph_ops", contextlib.nullcontext)  # torch's linear layers
    plain = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    assert _GEMM_NODE not in _node_names(*plain._cache[0][0].grads)
    assert_within_rule(op.matvec(v), plain.matvec(v), exact, ulps=16.0)


@pytest.mark.parametrize("call", [
    lambda x, w, b: F.linear(x, w, b[0]),  # a 0-dim bias, which torch broadcasts
    lambda x, w, b: F.linear(x, w.double(), b.double()),  # mixed dtypes: torch's own error
    lambda x, w, b: F.linear(x, w[:, :3], b),  # sizes that do not fit: torch's own error
])
def test_linear_calls_the_gemm_does_not_take_run_as_torch(call):
    x = torch.randn(5, 4)
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    try:
        expected = call(x, w, b)
    except RuntimeError as err:
        with graph_ops(), pytest.raises(RuntimeError, match=re.escape(str(err)[:30])):
            call(x, w, b)
        return
    with graph_ops():
        out = call(x, w, b)
    assert torch.equal(out, expected) and _GEMM_NODE not in _node_names(out)


class _WithEmptyLayer(nn.Module):
    """A linear layer of no inputs (its output is its bias) beside a plain one: legal, and torch's graph takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.empty, self.layer = nn.Linear(0, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).tanh() + self.empty(x[:, :0])


@pytest.mark.parametrize("make, params", [
    (_layer_norm_mlp, None),
    (_layer_norm_mlp, ["0.weight", "5.weight"]),  # the middle layer not chosen: its input needs no copy
    (_WithEmptyLayer, None),
])
def test_operator_keeps_what_torchs_graph_keeps(make, params, monkeypatch, gemm_route):
    """The same bytes cached as with torch's own linear layers (ops.gemm keeps only what its backward reads), and the
    same products up to float32 rounding; a layer of no inputs runs as torch's."""
    model = make(torch.float32) if make is _layer_norm_mlp else make()
    x, y = torch.randn(512, 64 if make is _layer_norm_mlp else 8), torch.randint(0, 3, (512,))
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), params, mode="reverse-over-reverse")
    v = torch.randn(op.shape[0])
    monkeypatch.setattr(generic, "graph_ops", contextlib.nullcontext)
    plain = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), params, mode="reverse-over-reverse")
    assert op.cached_bytes == plain.cached_bytes
    expected = plain.matvec(v)
    assert float((op.matvec(v) - expected).norm()) <= 1e-5 * float(expected.norm())


def test_matrix_products_take_the_gemm_route_where_the_machine_has_it(gemm_route):
    """``@`` / ``torch.matmul`` of two float32 CPU tensors of one batch shape (attention's) run as ops.gemm's batch;
    broadcasting, mixed dimensions and other dtypes as torch's."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(8, 4, 65, 16, generator=gen, requires_grad=True)
    k = torch.randn(8, 4, 65, 16, generator=gen, requires_grad=True)
    with graph_ops():
        scores, via_function = q @ k.transpose(-2, -1), torch.matmul(q, k.transpose(-2, -1))
        plain = [q @ k[0].transpose(-2, -1),  # broadcast over the batch
                 q.double() @ k.double().transpose(-2, -1), q[0, 0] @ k[0, 0, 0]]  # float64; a matrix times a vector
    onednn = cpu_gemm() == "onednn"
    assert (_GEMM_NODE in _node_names(scores)) == onednn and (_GEMM_NODE in _node_names(via_function)) == onednn
    for out in plain:
        assert _GEMM_NODE not in _node_names(out)
    torch.testing.assert_close(scores, q @ k.transpose(-2, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[0], q @ k[0].transpose(-2, -1), rtol=0, atol=0)


def test_vit_products_under_the_accuracy_rule(monkeypatch, gemm_route):
    """The small ViT's products (linear layers and attention's products on the GEMM route, attention's softmax and the
    layer norms on their double-backward ops) against float64, no less accurate than torch's own float32 graph."""
    from unlearn_kernels.models import SmallViT

    torch.manual_seed(0)
    model = SmallViT(8, 4, 3, 10).eval()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    v = torch.randn(op.shape[0])
    model64 = copy.deepcopy(model).double()
    exact = hessian_operator(model64, nn.CrossEntropyLoss(), (x.double(), y), path="generic").matvec(v.double())
    assert {"_SoftmaxGradientsBackward", "_LayerNormGradientsBackward", "_GeluGradientsBackward"} <= _node_names(
        *op._cache[0][0].grads)
    monkeypatch.setattr(generic, "graph_ops", contextlib.nullcontext)
    plain = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    assert_within_rule(op.matvec(v), plain.matvec(v), exact, ulps=16.0)


@pytest.mark.parametrize("fn", [
    lambda x, y: (x @ y) * 2 + 1,
    lambda x, y: (x @ y).sin().sum(),
    lambda x, y: F.linear(x, y.mT[0]).flatten(1)[:, :3],
])
def test_compiled_functions_run_as_torch_under_the_mode(fn):
    """Inside torch.compile's tracing the mode leaves every call to torch: a compiled function with a batched ``@``
    traced through it gave wrong values and shapes."""
    torch._dynamo.reset()
    x, y = torch.randn(4, 8, 16, requires_grad=True), torch.randn(4, 16, 8)
    with graph_ops():
        compiled, eager = torch.compile(fn, backend="aot_eager")(x, y), fn(x, y)
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
