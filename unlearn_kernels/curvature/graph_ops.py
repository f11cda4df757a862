"""The ops the generic Hessian builds its kept gradient graphs with: convolutions whose second derivatives run at
the speed of a convolution's backward, eval-mode batch norms with second derivatives of a few passes, layer norms,
softmaxes and GELUs whose second derivatives are one C++ pass each, and linear layers on the compiled passes' GEMM
route.

**Convolutions.** PyTorch's double backward of a convolution (``_convolution_double_backward``) computes the
term for the weight, ``wgrad(gy, ggx)``, as a convolution of the input with the output gradient, batch and
channels swapped: a convolution whose kernel is the whole output map. On the CPU oneDNN runs that at a fraction
of its speed: in one Hessian-vector product of ResNet-18 (batch 64, 3x32x32, one thread of the AMD EPYC of
docs/benchmarks.md) the seven shapes of that term took 0.82 s of the product's 2.9 s, at 68 GFLOP/s where the
model's own convolutions run at 155-171. Under :class:`graph_ops`, ``F.conv1d`` / ``conv2d`` / ``conv3d`` run
as :class:`_Conv`, with the same forward and the same backward kernels (the gradient is bitwise torch's), its
backward a function whose own derivative, for the cotangents ``ggx``, ``ggW``, ``ggb`` of the gradients
w.r.t. the input, weight and bias, is

    d gy          = conv(ggx, W) + conv(x, ggW) + ggb
    (d x, d W)    = convolution_backward(gy, input=ggx, weight=ggW)  # conv_T(gy, ggW), wgrad(gy, ggx)

the second line one call of the backward kernels, which compute the weight term at full speed (the same
product then takes 2.3-2.5 s). The second derivatives differ from torch's by rounding only; every op in
them is differentiable, so higher derivatives are too.

**Batch normalisation in eval mode** (running statistics, no update: ``y = (x - m) s w + b`` with
``s = 1 / sqrt(v + eps)`` per channel) runs as :class:`_BatchNormEval`: torch's forward, and its native backward
kernel (the gradient bitwise torch's where torch's own takes that kernel, as on the CPU; where it takes cuDNN's,
equal to rounding), whose backward's derivative for the cotangents ``ggx``, ``ggw``, ``ggb`` is

    d gy = ggx s w + (x - m) s ggw + ggb     # the second and third terms one batch_norm of x
    d x  = gy s ggw
    d w  = sum over rows and positions of gy ggx s

four to five passes over the feature map where torch's general formula (``batchnorm_double_backward``, written
for training mode too) makes about twelve: in a ResNet-18 product (as above) the batch norms' second derivatives
took ~200 ms of 2.2 s in the profiler, ~80 ms since.

**Softmax over the last dim** of a float32 or float64 CPU tensor (attention's) runs as :class:`_Softmax`: torch's
forward and backward kernels, the backward's derivative :func:`unlearn_kernels.ops.softmax_double_backward`, a C++
kernel that computes both of its terms a row at a time, where torch's formula makes about ten passes over the
whole map (in the small ViT's product, as below, the four attention maps' second derivatives took 22 ms of
150 ms in the profiler; the product 1.12x faster with the op, interleaved).

**Layer norms over the last dim** of float32 or float64 CPU tensors run as :class:`_LayerNorm`: torch's forward and
backward kernels, the backward's derivative :func:`unlearn_kernels.ops.layer_norm_double_backward`, a C++ kernel
that computes all three of its terms a row at a time (torch's formula: dozens of passes over the tensor; in the
small ViT's product its nine layer norms' second derivatives took 15 ms of 150 ms in the profiler, and the product
ran 1.07-1.11x faster with the op, interleaved). Where a higher derivative is recorded the op's reference runs, whose
row statistics are functions of x: the third derivative is then exact, where torch's own takes its saved
statistics as constants (its third derivative of a layer norm w.r.t. the input is wrong; tested).

**GELU** (exact or tanh-approximated) of float32 or float64 CPU tensors runs as :class:`_Gelu`: torch's forward and
backward kernels, the backward's derivative :func:`unlearn_kernels.ops.gelu_double_backward` (one C++ pass where
torch's formula makes about ten; the small ViT's product 1.01-1.05x faster with it, in runs of 16 and 24
interleaved rounds).

**Linear layers and matrix products.** Where :func:`unlearn_kernels.cpu_gemm` is "onednn" (a non-Intel x86 CPU with
AVX-512, such as AMD's, whose float32 GEMMs torch's MKL runs on its AVX2 path; an Intel one only within
:func:`unlearn_kernels.onednn_gemm`), float32 CPU ``F.linear`` runs as
:func:`unlearn_kernels.ops.gemm` on the input's rows, and ``torch.matmul`` / ``@`` of two tensors of one batch
shape (attention's ``q @ k^T`` and ``weights @ v``) as its batched form; the op's backward is the op again, so
the gradient's GEMMs and the double backward's take oneDNN's matmul where they are large enough (2.0-2.3x MKL's
speed there; 2.2-2.3x on the small ViT's linear layers and 2.1-2.9x on its attention products, timed alone).
Forward and gradient then differ from torch's by float32 rounding; elsewhere (other dtypes and devices, Intel's and
other CPUs, within :func:`unlearn_kernels.aten_gemm`) both are torch's.

What these leave to torch: batch normalisation in training mode, without running statistics or with statistics
of another dtype, a layer norm over more than the last dim, a softmax over another dim or with a dtype argument,
a layer norm, softmax or GELU of another dtype or on a GPU, batch and layer norms of no rows, padding given as a string
("same", "valid"), an unbatched convolution or a 1-D input to a linear layer, a tensor subclass, a dtype that is
not floating point, no gradient needed, and calls under autocast, inside torch.func's transforms (``vmap``,
``grad``, ``jvp``), with forward-mode tangents or inside a ``torch.compile`` d function, which the replacements
would change or cannot take.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from ..backends import cpu_gemm
from ..ops import gelu_double_backward, gemm, layer_norm_double_backward, softmax_double_backward

_CONVOLUTIONS: dict[Callable[..., torch.Tensor], int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_PLAIN = (torch.Tensor, nn.Parameter)


def _channels(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast over ``like``'s (N, C, ...) maps."""
    return t.view(1, -1, *[1] * (like.dim() - 2))


class _Setting(NamedTuple):
    """A convolution's arguments besides its tensors, as ``aten::convolution_backward`` takes them."""

    conv: Callable[..., torch.Tensor]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def backward(self, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        """(grad input, grad weight, grad bias) of the convolution of ``x`` by ``weight`` for the output gradient
        ``gy``, each only where ``mask`` asks (else None)."""
        zeros = [0] * len(self.stride)
        return torch.ops.aten.convolution_backward(
            gy, x, weight, [weight.shape[0]] if mask[2] else None, self.stride, self.padding, self.dilation,
            False, zeros, self.groups, list(mask),
        )


class _ConvGradients(torch.autograd.Function):
    """(gx, gW, gb) of a convolution as a function of (gy, x, W), with the derivative in the module's docstring."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, setting: _Setting,
                mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        ctx.setting = setting
        ctx.save_for_backward(gy, x, weight)
        ctx.set_materialize_grads(False)  # an unused gradient's cotangent stays None: no work for it
        return setting.backward(gy, x, weight, mask)

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor | None, ggw: torch.Tensor | None,
                 ggb: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        gy, x, weight = ctx.saved_tensors
        setting = ctx.setting
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = None
        if need_gy:
            terms = []
            if ggx is not None:
                terms.append(setting.conv(ggx, weight, None, setting.stride, setting.padding, setting.dilation,
                                          setting.groups))
            if ggw is not None:
                terms.append(setting.conv(x, ggw, ggb, setting.stride, setting.padding, setting.dilation,
                                          setting.groups))
            elif ggb is not None:
                terms.append(_channels(ggb, gy).expand_as(gy))
            d_gy = sum(terms[1:], terms[0]) if terms else None
        want_x, want_w = need_x and ggw is not None, need_w and ggx is not None
        d_x = d_w = None
        if want_x or want_w:
            # the kernels read only the shapes of the arguments whose results are not asked for
            d_x, d_w, _ = setting.backward(gy, ggx if want_w else x, ggw if want_x else weight,
                                           (want_x, want_w, False))
        return d_gy, d_x, d_w, None, None


class _Conv(torch.autograd.Function):
    """``conv(x, W, b)`` whose backward is :class:`_ConvGradients` (twice differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                setting: _Setting) -> torch.Tensor:
        ctx.setting = setting
        ctx.save_for_backward(x, weight)
        return setting.conv(x, weight, bias, setting.stride, setting.padding, setting.dilation, setting.groups)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        gx, gw, gb = _ConvGradients.apply(gy, x, weight, ctx.setting, mask)
        return gx, gw, gb, None


class _BatchNormGradients(torch.autograd.Function):
    """(gx, gw, gb) of an eval-mode batch norm as a function of (gy, x, w), with the derivative in the module's
    docstring."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                var: torch.Tensor, eps: float, mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        ctx.eps = eps
        ctx.save_for_backward(gy, x, weight, mean, var)
        ctx.set_materialize_grads(False)
        return torch.ops.aten.native_batch_norm_backward(gy, x, weight, mean, var, None, None, False, eps, list(mask))

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor | None, ggw: torch.Tensor | None,
                 ggb: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        gy, x, weight, mean, var = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        invstd = (var + ctx.eps).rsqrt()
        d_gy = d_x = d_w = None
        if need_gy:
            if ggw is not None:  # (x - m) s ggw + ggb: a batch norm of x by ggw and ggb, one pass
                d_gy = torch.batch_norm(x, ggw, ggb, mean, var, False, 0.0, ctx.eps, torch.backends.cudnn.enabled)
            elif ggb is not None:
                d_gy = _channels(ggb, gy).expand_as(gy)
            if ggx is not None:
                scale = _channels(invstd if weight is None else weight * invstd, ggx)
                d_gy = ggx * scale if d_gy is None else torch.addcmul(d_gy, ggx, scale)
        if need_x and ggw is not None:
            d_x = gy * _channels(ggw * invstd, gy)
        if need_w and ggx is not None:
            d_w = (gy * ggx).sum([d for d in range(gy.dim()) if d != 1]) * invstd
        return d_gy, d_x, d_w, None, None, None, None


class _BatchNormEval(torch.autograd.Function):
    """Eval-mode ``batch_norm(x, m, v, w, b)`` whose backward is :class:`_BatchNormGradients` (twice
    differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, var)
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        gx, gw, gb = _BatchNormGradients.apply(gy, x, weight, mean, var, ctx.eps, mask)
        return gx, gw, gb, None, None, None


class _LayerNormGradients(torch.autograd.Function):
    """(gx, gw, gb) of a layer norm over the last dim as a function of (gy, x, w), whose own backward is
    :func:`~unlearn_kernels.ops.layer_norm_double_backward`."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, rstd: torch.Tensor, eps: float,
                mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        ctx.eps = eps
        ctx.save_for_backward(gy, x, weight)
        ctx.set_materialize_grads(False)
        return torch.ops.aten.native_layer_norm_backward(gy, x, [x.shape[-1]], mean, rstd, weight, bias, list(mask))

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor | None, ggw: torch.Tensor | None,
                 ggb: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        gy, x, weight = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        if ggx is None and ggw is None and ggb is None:
            return (None,) * 8
        row = x.new_zeros(x.shape[-1])  # an absent weight is ones, an absent cotangent zeros
        d_gy, d_x, d_w = layer_norm_double_backward(
            gy, x, row + 1 if weight is None else weight, torch.zeros_like(x) if ggx is None else ggx,
            row if ggw is None else ggw, row if ggb is None else ggb, ctx.eps)
        return (d_gy if need_gy else None, d_x if need_x else None, d_w if need_w else None, *(None,) * 5)


class _LayerNorm(torch.autograd.Function):
    """``layer_norm(x, (n,), w, b)`` over the last dim whose backward is :class:`_LayerNormGradients` (twice
    differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        gx, gw, gb = _LayerNormGradients.apply(gy, x, weight, bias, mean, rstd, ctx.eps, mask)
        return gx, gw, gb, None


class _GeluGradients(torch.autograd.Function):
    """GELU's backward ``gx = gy f'(x)`` as a function of (gy, x), whose own backward is
    :func:`~unlearn_kernels.ops.gelu_double_backward`."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(gy, x)
        return torch.ops.aten.gelu_backward(gy, x, approximate=approximate)

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gy, x = ctx.saved_tensors
        return (*gelu_double_backward(gy, x, ggx, ctx.approximate), None)


class _Gelu(torch.autograd.Function):
    """``gelu(x)`` whose backward is :class:`_GeluGradients` (twice differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(x)
        return torch._C._nn.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, = ctx.saved_tensors
        return _GeluGradients.apply(gy, x, ctx.approximate), None


class _SoftmaxGradients(torch.autograd.Function):
    """Softmax's backward over the last dim, ``gx = y (gy - sum(gy y))``, as a function of (gy, y), whose own
    backward is :func:`~unlearn_kernels.ops.softmax_double_backward`."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gy, y)
        return torch._softmax_backward_data(gy, y, -1, y.dtype)

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gy, y = ctx.saved_tensors
        return softmax_double_backward(gy, y, ggx)


class _Softmax(torch.autograd.Function):
    """``softmax(x)`` over the last dim whose backward is :class:`_SoftmaxGradients` (twice differentiable)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch._softmax(x, -1, False)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> torch.Tensor:
        y, = ctx.saved_tensors
        return _SoftmaxGradients.apply(gy, y)


def _as_tuple(value: int | tuple[int, ...] | list[int], dims: int) -> tuple[int, ...]:
    """A stride, padding or dilation as ``dims`` ints (one int, or a numpy one, stands for every dimension)."""
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(operator.index(v) for v in value)
    return (operator.index(value),) * dims


def _torch_runs(tensors: list[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` (the input first) is left to torch whatever the op: no gradient needed, a
    tensor subclass or a dtype that is not floating point, or what the replacements would change: autocast
    (which casts the arguments after the mode has seen them), torch.func's transforms and forward-mode AD (the
    replacements have no vmap rule and no jvp), and torch.compile's tracing (a compiled function with a batched
    ``@`` traced through the mode gave wrong values and shapes)."""
    return (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not all(type(t) in _PLAIN and t.is_floating_point() for t in tensors)
            or not any(t.requires_grad for t in tensors)
            or torch.is_autocast_enabled(tensors[0].device.type) or torch._C._are_functorch_transforms_active()
            or any(forward_ad.unpack_dual(t).tangent is not None for t in tensors))


def _cpu_kernel_takes(x: torch.Tensor) -> bool:
    """Whether the double-backward ops' C++ kernels take ``x``: float32 or float64 on the CPU (elsewhere the
    replacements would run their references, no faster than torch's own)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _on_gemm_route(tensors: list[torch.Tensor]) -> bool:
    """Whether a linear layer's or matrix product's tensors go to :func:`~unlearn_kernels.ops.gemm`: float32 CPU
    tensors of a call not left to torch, where the GEMM route is oneDNN's."""
    return (not _torch_runs(tensors) and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and cpu_gemm() == "onednn")


def _convolution(conv: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The convolution as :class:`_Conv`, or None where torch's own runs (see the module's docstring)."""
    given = {**dict(zip(_ARGUMENTS, args)), **kwargs}
    x, weight, bias = given["input"], given["weight"], given.get("bias")
    padding = given.get("padding", 0)
    dims = _CONVOLUTIONS[conv]
    if isinstance(padding, str) or x.dim() != dims + 2 or _torch_runs([t for t in (x, weight, bias) if t is not None]):
        return None
    setting = _Setting(conv, _as_tuple(given.get("stride", 1), dims), _as_tuple(padding, dims),
                       _as_tuple(given.get("dilation", 1), dims), given.get("groups", 1))
    return _Conv.apply(x, weight, bias, setting)


def _batch_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.batch_norm`` in eval mode as :class:`_BatchNormEval`, or None where torch's own runs."""
    given = {**dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                        args)), **kwargs}
    x, mean, var = given["input"], given["running_mean"], given["running_var"]
    weight, bias = given.get("weight"), given.get("bias")
    if given.get("training", False) or mean is None or var is None or x.dim() < 2 or x.numel() == 0:
        return None
    channels = (x.shape[1],)
    params = [t for t in (weight, bias) if t is not None]
    # running statistics that need a gradient, or shapes and dtypes torch refuses with its own error
    if (any(t.shape != channels for t in (mean, var, *params)) or mean.requires_grad or var.requires_grad
            or any(t.dtype != x.dtype or t.device != x.device for t in (mean, var, *params))
            or _torch_runs([x, *params, mean, var])):
        return None
    return _BatchNormEval.apply(x, weight, bias, mean, var, float(given.get("eps", 1e-5)))


def _layer_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.layer_norm`` over the last dim of a float32 or float64 CPU tensor as :class:`_LayerNorm`, or None where
    torch's own runs."""
    given = {**dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args)), **kwargs}
    x, shape = given["input"], given["normalized_shape"]
    weight, bias, eps = given.get("weight"), given.get("bias"), given.get("eps", 1e-5)
    params = [t for t in (weight, bias) if t is not None]
    # a shape given otherwise than as a tuple, list or torch.Size of ints: torch's own error
    if (not isinstance(shape, (tuple, list)) or not all(type(n) is int for n in shape)
            or x.dim() < 1 or x.numel() == 0 or tuple(shape) != (x.shape[-1],) or not _cpu_kernel_takes(x)
            or isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0
            or any(t.shape != (x.shape[-1],) or t.dtype != x.dtype or t.device != x.device for t in params)
            or _torch_runs([x, *params])):
        return None
    return _LayerNorm.apply(x, weight, bias, float(eps))


def _gelu(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.gelu`` of a float32 or float64 CPU tensor as :class:`_Gelu`, or None where torch's own runs."""
    given = {**dict(zip(("input", "approximate"), args)), **kwargs}
    x, approximate = given["input"], given.get("approximate", "none")
    if (not isinstance(x, torch.Tensor) or approximate not in ("none", "tanh") or not _cpu_kernel_takes(x)
            or _torch_runs([x])):
        return None
    return _Gelu.apply(x, approximate)


def _softmax(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``softmax`` over the last dim of a float32 or float64 CPU tensor as :class:`_Softmax`, or None where torch's
    own runs."""
    # the third positional argument is F.softmax's _stacklevel, torch.softmax's and Tensor.softmax's dtype
    names = ("input", "dim", "_stacklevel", "dtype") if func is F.softmax else ("input", "dim", "dtype")
    given = {**dict(zip(names, args)), **kwargs}
    x, dim = given.get("input", given.get("self")), given.get("dim")
    if (not isinstance(x, torch.Tensor) or not isinstance(dim, int) or given.get("dtype") is not None or x.dim() < 1
            or dim not in (-1, x.dim() - 1) or not _cpu_kernel_takes(x) or _torch_runs([x])):
        return None
    return _Softmax.apply(x)


def _linear(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``F.linear`` as :func:`~unlearn_kernels.ops.gemm` on the input's rows, or None where torch's own runs."""
    given = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
    x, weight, bias = given["input"], given["weight"], given.get("bias")
    tensors = [t for t in (x, weight, bias) if t is not None]
    # what torch's own takes or refuses with its own error: other shapes (a 0-dim bias, no values), dtypes, devices
    if (x.dim() < 2 or x.numel() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or (bias is not None and bias.shape != (weight.shape[0],)) or not _on_gemm_route(tensors)):
        return None
    rows = gemm(x.reshape(-1, x.shape[-1]), weight.mT, bias)
    return rows if x.dim() == 2 else rows.reshape(*x.shape[:-1], weight.shape[0])


def _matmul(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``torch.matmul`` / ``@`` of two float32 CPU tensors of one batch shape (no broadcasting) as
    :func:`~unlearn_kernels.ops.gemm` on their flattened batch, or None where torch's own runs."""
    if kwargs or len(args) != 2 or not all(isinstance(t, torch.Tensor) for t in args):
        return None
    a, b = args
    if (a.dim() != b.dim() or a.dim() < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]
            or a.numel() == 0 or b.numel() == 0 or not _on_gemm_route([a, b])):
        return None
    if a.dim() == 2:
        return gemm(a, b)
    out = gemm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out if a.dim() == 3 else out.reshape(*a.shape[:-1], b.shape[-1])


class graph_ops(TorchFunctionMode):  # noqa: N801 (used as a context, like torch.no_grad)
    """A context under which convolutions, eval-mode batch norms, layer norms, softmaxes and GELUs record a backward
    whose own backward runs as convolutions and one convolution backward (a batch norm's as a few passes over the
    maps, a layer norm's, softmax's and GELU's as one C++ pass), and float32 CPU linear layers and matrix products run
    on the compiled passes' GEMM route (see the module's docstring). Graphs built under it stay so after it ends."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = None
        if func in _CONVOLUTIONS:
            out = _convolution(func, args, kwargs)
        elif func is F.batch_norm:
            out = _batch_norm(args, kwargs)
        elif func is F.gelu:
            out = _gelu(args, kwargs)
        elif func is F.layer_norm:
            out = _layer_norm(args, kwargs)
        elif func is torch.softmax or func is F.softmax or func is torch.Tensor.softmax:
            out = _softmax(func, args, kwargs)
        elif func is F.linear:
            out = _linear(args, kwargs)
        elif func is torch.matmul or func is torch.Tensor.matmul or func is torch.Tensor.__matmul__:
            out = _matmul(args, kwargs)
        return func(*args, **kwargs) if out is None else out
