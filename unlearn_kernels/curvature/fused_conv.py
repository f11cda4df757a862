"""The fused Hessian path for small convolutional networks under softmax cross entropy.

Models: an ``nn.Sequential`` (nesting allowed; our :class:`~unlearn_kernels.models.SmallCNN` is one)
of blocks ``Conv2d [-> ReLU] [-> MaxPool2d]``, then ``AdaptiveAvgPool2d(1) -> Flatten -> Linear``
(``nn.Identity`` and eval-mode ``nn.Dropout`` allowed anywhere). Convolutions: groups 1, dilation 1,
zero padding given as numbers; pools: kernel == stride, no padding, no dilation (non-overlapping
windows). Losses: those of the fused MLP path (``nn.CrossEntropyLoss`` with mean reduction, any
label smoothing and ignore_index, no class weights; ``F.cross_entropy``).

At fixed weights each batch keeps its forward state: every block's input, each pool's selected
positions, the ReLU masks, the gradient w.r.t. every convolution's output, the logits, and the first
convolution's input as an im2col matrix. A product is then only the tangent-dependent work, per block
(input h, output gradient d, weight W, tangent V; R marks the directional derivative):

    R-forward    Rz = conv(Rh, W) + conv(h, V) + Vb,        Rh_next = pool(mask * Rz)
    R-backward   Rd = mask * unpool(R d_out),   R d_in = conv_in(Rd, W) + conv_in(d, V),
                 R grad_W = conv_w(h, Rd) + conv_w(Rh, d),   R grad_b = sum Rd

and the softmax's R-rows at the head (``ops.softmax_ce_hvp``, which takes each row's tangent relative to its top
class, as the gradient ``ops.softmax_ce_grad`` takes p_y - 1: float32 keeps a well-fit row's digits). Two choices
make it faster than a double backward through the model's gradient graph (PyHessian's single-batch mode) on the
CPU, with the same convolutions: the state is stored channels-last (oneDNN's convolutions with 16-64 channels run
10-40% faster in that layout), and the first convolution, whose input does not depend on the weights, is a matmul
with its cached im2col matrix (a convolution with one or three input channels runs far below the
machine's matmul speed). Pooling and masks are one gather and one scatter per block over precomputed
flat indices. A later convolution whose input map has no more pixels than its kernel has taps (a 2x2
or 3x3 map under a 3x3 kernel) runs its products as one dense (C_in*H*W, C_out*H'*W') matrix, which
does no more multiply-adds than the convolution: on such maps oneDNN's convolutions cost far more than
their arithmetic (the weight gradient of a 32->64 channel convolution on 2x2 maps takes 6 ms for a
batch of 512, the same product as a matmul 0.5 ms). Measured on the digits CNN (8x8 inputs, batch
512): products 1.5x faster with the 2x2 block dense; equal at 3x3 maps; slower at 4x4, so not there.
:func:`supports` says why a model or loss does not qualify.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import softmax_ce_grad, softmax_ce_hvp
from .base import CurvatureOperator
from .batches import DataSpec
from .probes import check_loss_labels, LossFn
from .fused_common import (
    FusedDataError,
    fused_labels,
    fused_reason,
    parse_cross_entropy,
    plain_sequential,
    sequential_leaves,
)
from .params import ParamSelection

_CHANNELS_LAST = torch.channels_last
#: a convolution (not the first) runs as a dense matrix when its input map has at most this many
#: pixels per kernel tap ...
_DENSE_PIXELS_PER_TAP = 1
#: ... and that matrix has at most this many entries (4 MiB in float32 per batch; its layout's two
#: int64 index vectors, at most 16 MiB, are kept once per block and map size)
_DENSE_MAX_ENTRIES = 1 << 20


@dataclass(frozen=True)
class _Block:
    """One ``Conv2d [-> ReLU] [-> MaxPool2d]`` block."""

    weight: str
    bias: str | None
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    relu: bool
    pool: tuple[int, int] | None  # the pool's kernel (= its stride)
    pool_ceil: bool


@dataclass(frozen=True)
class _ConvNet:
    blocks: tuple[_Block, ...]
    head_weight: str
    head_bias: str | None


def _pair(value: int | tuple[int | None, ...]) -> tuple[int | None, int | None]:
    """A layer's size option as (height, width); None stays None (an AdaptiveAvgPool2d output size that
    keeps that dimension as it is)."""
    pair = (value, value) if isinstance(value, int) else (value[0], value[-1])
    return tuple(None if v is None else int(v) for v in pair)  # type: ignore[return-value]


def _registered(layer: nn.Module) -> bool:
    """The layer's weight and bias (unless None) are its parameters or buffers (a buffer is a constant);
    a plain tensor attribute is neither, and the operator could not follow it."""
    return all(name in layer._parameters or name in layer._buffers
               for name in ("weight", "bias") if getattr(layer, name) is not None)


def _parse_model(model: nn.Module) -> _ConvNet | str:
    """The blocks and head of ``model``, or why it is not a network this path takes."""
    if not plain_sequential(model):
        return f"the model is {type(model).__name__}, not an nn.Sequential of conv blocks and a Linear head"
    blocks: list[dict] = []
    stage = "blocks"  # then "pooled" (after the global average pool), "flat" (after Flatten), "done"
    head: tuple[str, str | None] | None = None
    seen: set[int] = set()
    for name, child in sequential_leaves(model):
        kind = type(child)
        # the exact class: a subclass of Dropout may compute something else in eval mode
        if kind is nn.Identity or (kind is nn.Dropout and not child.training):
            continue
        if stage == "done":
            return f"layer {name!r} ({kind.__name__}) comes after the Linear head"
        if kind is nn.Conv2d and stage == "blocks":
            if id(child) in seen:
                return f"layer {name!r} reuses an earlier Conv2d (tied weights)"
            seen.add(id(child))
            if child.groups != 1 or _pair(child.dilation) != (1, 1) or child.padding_mode != "zeros":
                return (f"layer {name!r} is a Conv2d with groups={child.groups}, dilation={child.dilation}, "
                        f"padding_mode={child.padding_mode!r}; the fused path has groups=1, dilation=1 and zero "
                        "padding")
            if isinstance(child.padding, str):
                return f"layer {name!r} is a Conv2d with padding={child.padding!r}; give the padding as numbers"
            if not _registered(child):
                return f"layer {name!r} has a weight or bias that is neither a Parameter nor a buffer"
            blocks.append({"weight": f"{name}.weight", "bias": f"{name}.bias" if child.bias is not None else None,
                           "kernel": _pair(child.kernel_size), "stride": _pair(child.stride),
                           "padding": _pair(child.padding), "relu": False, "pool": None, "pool_ceil": False})
        elif kind is nn.ReLU and stage == "blocks":
            if not blocks or blocks[-1]["relu"] or blocks[-1]["pool"]:
                return f"layer {name!r} (ReLU) does not directly follow a Conv2d"
            blocks[-1]["relu"] = True
        elif kind is nn.MaxPool2d and stage == "blocks":
            if not blocks or blocks[-1]["pool"]:
                return f"layer {name!r} (MaxPool2d) does not follow a Conv2d [-> ReLU]"
            kernel, stride = _pair(child.kernel_size), _pair(child.stride if child.stride else child.kernel_size)
            if kernel != stride or _pair(child.padding) != (0, 0) or _pair(child.dilation) != (1, 1) or child.return_indices:
                return f"layer {name!r} is a MaxPool2d with overlapping windows, padding or dilation"
            blocks[-1]["pool"], blocks[-1]["pool_ceil"] = kernel, bool(child.ceil_mode)
        elif kind is nn.AdaptiveAvgPool2d and stage == "blocks" and blocks:
            if _pair(child.output_size) != (1, 1):
                return f"layer {name!r} is AdaptiveAvgPool2d({child.output_size}); the fused path needs output size 1"
            stage = "pooled"
        elif kind is nn.Flatten and stage == "pooled":
            if (child.start_dim, child.end_dim) != (1, -1):
                return f"layer {name!r} is a Flatten that is not Flatten(1, -1)"
            stage = "flat"
        elif kind is nn.Linear and stage == "flat":
            if not _registered(child):
                return f"layer {name!r} has a weight or bias that is neither a Parameter nor a buffer"
            head = (f"{name}.weight", f"{name}.bias" if child.bias is not None else None)
            stage = "done"
        else:
            mode = " in training mode" if isinstance(child, nn.Dropout) else ""
            where = {"blocks": "among the conv blocks", "pooled": "after the global average pool",
                     "flat": "before the Linear head"}[stage]
            return f"layer {name!r} is {kind.__name__}{mode} {where}"
    if not blocks:
        return "the model has no Conv2d"
    if head is None:
        return "the model does not end with AdaptiveAvgPool2d(1) -> Flatten -> Linear"
    return _ConvNet(tuple(_Block(**b) for b in blocks), *head)


def supports(model: nn.Module, loss_fn: LossFn, params: ParamSelection = None, *,
             check_selection: bool = True) -> str | None:
    """None if :class:`FusedConvHessian` applies to ``model``, ``loss_fn`` and ``params``, else why not
    (``check_selection``: as in :func:`~.fused_mlp.supports`).

    Raises what :func:`~unlearn_kernels.curvature.params.resolve_parameters` raises for a bad ``params``.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))  # a tied parameter under each name

    def layer_params(net: _ConvNet) -> list[torch.Tensor]:
        names = [n for b in net.blocks for n in (b.weight, b.bias)] + [net.head_weight, net.head_bias]
        return [tensors[n] for n in names if n in tensors]  # not a layer's buffer (a constant)

    return fused_reason(_parse_model(model), loss_fn, model, params, layer_params, "the layers",
                        check_selection=check_selection)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, H, W) tensor as the contiguous (N, H, W, C) view of its memory."""
    return t.permute(0, 2, 3, 1)


def _conv_operand(t: torch.Tensor) -> torch.Tensor:
    """``t``, a map (N, C, H, W) or a weight (C_out, C_in, kH, kW), as torch's CPU convolutions read it right. With
    one (input) channel, channels-last memory has a channel stride of 1, which torch also calls contiguous, and its
    float32 CPU convolutions misread such operands (relative errors 3e-2 to 1e23 and NaN, changing between calls,
    for a 4-tap kernel at width stride 2 giving one output column; torch 2.13): a copy with the standard strides."""
    if t.shape[1] == 1 and t.stride(1) != t.shape[2] * t.shape[3]:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, H, W) tensor summed over everything but the channels."""
    return _nhwc(t).reshape(-1, t.shape[1]).sum(dim=0)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_nhwc`: a contiguous (N, H, W, C) tensor as channels-last (N, C, H, W)."""
    return t.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _DenseLayout:
    """A convolution on one input size as a dense (C_in*H*W, C_out*H'*W') matrix, rows and columns in
    NHWC order: entry ``at[k]`` of the flattened matrix is weight element ``src[k]`` (weights in
    (C_out, C_in, kh, kw) order), the other entries are zero."""

    at: torch.Tensor
    src: torch.Tensor
    shape: tuple[int, int]

    @staticmethod
    def build(block: _Block, c_in: int, c_out: int, in_hw: tuple[int, int], out_hw: tuple[int, int],
              device: torch.device) -> _DenseLayout | None:
        """The layout for ``block`` on ``in_hw`` maps, or None where the dense matrix would not pay (a
        map with more pixels than the kernel has taps, or a matrix over the size limit)."""
        (h, w), (ho, wo), (kh, kw) = in_hw, out_hw, block.kernel
        shape = (c_in * h * w, c_out * ho * wo)
        if h * w > _DENSE_PIXELS_PER_TAP * kh * kw or shape[0] * shape[1] > _DENSE_MAX_ENTRIES:
            return None
        grid = [t.reshape(-1) for t in torch.meshgrid(*(torch.arange(n, device=device) for n in (ho, wo, kh, kw)),
                                                       indexing="ij")]
        oy, ox, ky, kx = grid
        iy = oy * block.stride[0] - block.padding[0] + ky
        ix = ox * block.stride[1] - block.padding[1] + kx
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)  # taps that fall on the padding: no entry
        oy, ox, ky, kx, iy, ix = (t[inside].view(-1, 1, 1) for t in (oy, ox, ky, kx, iy, ix))
        c = torch.arange(c_in, device=device).view(1, -1, 1)
        o = torch.arange(c_out, device=device).view(1, 1, -1)
        at = ((iy * w + ix) * c_in + c) * shape[1] + (oy * wo + ox) * c_out + o
        src = ((o * c_in + c) * kh + ky) * kw + kx
        return _DenseLayout(at.reshape(-1), src.reshape(-1), shape)

    def expand(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (or a tangent of its shape) as the dense matrix."""
        flat = weight.new_zeros(self.shape[0] * self.shape[1])
        flat[self.at] = weight.reshape(-1)[self.src]
        return flat.view(self.shape)

    def fold(self, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. the weight ``like`` from one w.r.t. the dense matrix (the adjoint of
        :meth:`expand`: each weight element sums the entries it fills)."""
        return like.new_zeros(like.numel()).index_add_(0, self.src, grad.reshape(-1)[self.at]).view(like.shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, H, W) tensor as an (N, H*W*C) matrix (a view of its memory)."""
    return _nhwc(t).reshape(t.shape[0], -1)


@dataclass
class _BlockState:
    """What one block keeps at fixed weights (channels-last tensors, flat indices in NHWC order)."""

    h: torch.Tensor  # the block's input (for the first block: its im2col matrix, (N*L, K [+ 1]))
    z_shape: torch.Size  # the convolution's output shape (N, C, H, W)
    out_shape: torch.Size  # the block's output shape
    select: torch.Tensor | None  # the pool's chosen positions as flat NHWC indices into z (None: no pool)
    mask: torch.Tensor | None  # the ReLU's derivative: at the pool's output with a pool, else at z (None: no ReLU)
    dense: _DenseLayout | None  # the convolution's dense-matrix layout (None: it runs as a convolution)
    dense_weight: torch.Tensor | None  # the weight as that matrix
    d: torch.Tensor | None = None  # the loss gradient w.r.t. z


class FusedConvHessian(CurvatureOperator):
    """The exact Hessian of the mean softmax cross entropy of a small convolutional network (see the
    module docstring for the models), by explicit R-passes over a kept forward state.

    Same arguments, vector layout and results as :class:`~unlearn_kernels.curvature.GenericHessian`
    for the models and losses :func:`supports` accepts. Each batch's state (about the size of the
    network's activations, twice, plus the first convolution's im2col matrix and the dense matrices of
    convolutions on tiny maps) is kept while it fits in ``cache_bytes`` and recomputed for each product
    otherwise. Parameters outside ``params`` get zero tangents (the operator is the Hessian block of
    the chosen parameters). Labels are taken as int64, so uint8 labels work as on the generic path;
    class-probability targets are refused at construction.

    Raises:
        ValueError: :func:`supports` rejects the model or loss, batches are not (N, C, H, W) images
            of the parameters' dtype, or what the base class raises. Inputs of another shape and
            targets that are not (N,) class labels, where the model and the loss take them, are a
            :class:`~unlearn_kernels.curvature.fused_common.FusedDataError` (first batch: at construction).
    """

    path = "fused"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None, cache_bytes: int | None = None,
    ) -> None:
        reason = supports(model, loss_fn, params)
        if reason is not None:
            raise ValueError(f"FusedConvHessian cannot be used: {reason}")
        self._net: _ConvNet = _parse_model(model)  # type: ignore[assignment]
        self._label_smoothing, self._ignore_index = parse_cross_entropy(loss_fn)  # type: ignore[misc]
        self._in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        self._dense_layouts: dict[tuple, _DenseLayout | None] = {}
        super().__init__(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)
        self._weights_changed()

    def _weights_changed(self) -> None:
        blocks = self._net.blocks
        # the first convolution is a matmul (its weight as a matrix); the others run channels-last
        self._model_weights = [self._tensor(b.weight) for b in blocks]
        self._weights = [w if i == 0 else w.contiguous(memory_format=_CHANNELS_LAST)
                         for i, w in enumerate(self._model_weights)]
        self._biases = [self._tensor(b.bias) for b in blocks]
        self._head = (self._tensor(self._net.head_weight), self._tensor(self._net.head_bias))

    def _probe_forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super()._probe_forward(x, y)
        self._check_inputs(x)
        fused_labels(type(self).__name__, y)

    def _check_inputs(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self._in_channels:
            raise FusedDataError(
                f"FusedConvHessian: inputs of shape {tuple(x.shape)} are not (N, {self._in_channels}, H, W) images; "
                "use hessian_operator(..., path='generic')"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"FusedConvHessian: inputs are {x.dtype} but the parameters are {self.dtype}")

    # ------------------------------------------------------------------ the kept state
    def _state(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, int]:
        """A batch's fixed-weight state and the bytes it holds."""
        self._check_inputs(x)
        y = fused_labels(type(self).__name__, y)
        blocks: list[_BlockState] = []
        with torch.no_grad():
            h = x
            for i, (block, bias) in enumerate(zip(self._net.blocks, self._biases)):
                # the forward as the model runs it (its layout, its convolution), so that the ReLU masks
                # and the pools' choices are those of model(x) also where a value ties within rounding
                kept = self._im2col(x, block) if i == 0 else h.contiguous(memory_format=_CHANNELS_LAST)
                z = F.conv2d(h, self._model_weights[i], bias, block.stride, block.padding)
                act = z.relu() if block.relu else z
                if block.pool is None:
                    out, select = act, None
                    mask = _nhwc((z > 0).to(z.dtype)).reshape(-1) if block.relu else None
                else:
                    out, index = F.max_pool2d(act, block.pool, ceil_mode=block.pool_ceil, return_indices=True)
                    select = self._flat_select(index, z.shape)
                    mask = _nhwc((out > 0).to(z.dtype)).reshape(-1) if block.relu else None
                dense = self._dense_layout(i, h, z)
                dense_weight = None if dense is None else dense.expand(self._model_weights[i])
                blocks.append(_BlockState(kept, z.shape, out.shape, select, mask, dense, dense_weight))
                h = out
            pooled = h.mean(dim=(2, 3))
            head_w, head_b = self._head
            logits = F.linear(pooled, head_w, head_b)
            # the probe ran the loss on the first batch only; a later batch's label out of range would
            # index the wrong class (a negative one) or fail as a bare IndexError
            check_loss_labels(self.loss_fn, logits, y, type(self).__name__)
            weights = self._row_weights(y)
            # the ops take a well-fit row's p_y - 1 as minus the other classes' share: probs - onehot kept float32's
            # absolute error of ~6e-8 there, a few percent of the row's gradient
            dlogits = softmax_ce_grad(logits, y, label_smoothing=self._label_smoothing, ignore_index=self._ignore_index,
                                      check_finite=False) * weights[:, None]
            d_out = self._spread(dlogits @ head_w, blocks[-1].out_shape)
            for i in reversed(range(len(blocks))):
                st = blocks[i]
                st.d = self._unpool(d_out, st)
                if i:
                    d_in = self._conv_backward(st.d, st.h, self._weights[i], i, (True, False, False))[0]
                    d_out = _nhwc(d_in).reshape(-1)
        head = (pooled, logits, dlogits, weights)
        tensors = [t for st in blocks for t in (st.h, st.select, st.mask, st.d) if t is not None] + list(head)
        tensors += [st.dense_weight for st in blocks if st.dense_weight is not None]
        return (blocks, head), sum(t.numel() * t.element_size() for t in tensors)

    def _dense_layout(self, i: int, h: torch.Tensor, z: torch.Tensor) -> _DenseLayout | None:
        """Block ``i``'s dense layout from input ``h`` to output ``z`` (built once per block and map
        size, shared by the batches), or None where the convolution runs as one."""
        if i == 0:  # the first convolution is a matmul with its im2col matrix already
            return None
        key = (i, *h.shape[1:], *z.shape[1:], h.device)
        if key not in self._dense_layouts:
            self._dense_layouts[key] = _DenseLayout.build(self._net.blocks[i], h.shape[1], z.shape[1],
                                                          tuple(h.shape[2:]), tuple(z.shape[2:]), h.device)
        return self._dense_layouts[key]

    def _im2col(self, x: torch.Tensor, block: _Block) -> torch.Tensor:
        """The first convolution's input as an (N*L, K) matrix (rows: output pixels in NHWC order),
        with a column of ones when the convolution has a bias."""
        cols = F.unfold(x, block.kernel, padding=block.padding, stride=block.stride)  # (N, K, L)
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if block.bias is not None:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
        return cols.contiguous()

    @staticmethod
    def _first_conv(cols: torch.Tensor, block: _Block, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    shape: tuple[int, int, int, int]) -> torch.Tensor:
        """conv(x, weight) + bias for the first convolution as a matmul with x's im2col matrix ``cols``
        (None stands for zeros), as a channels-last tensor of ``shape`` (N, C, H, W)."""
        n, c, h, w = shape
        taps = cols.shape[1] - (block.bias is not None)
        mat = weight.reshape(c, taps) if weight is not None else cols.new_zeros(c, taps)
        if block.bias is not None:
            mat = torch.cat([mat, (bias if bias is not None else cols.new_zeros(c))[:, None]], dim=1)
        return _nchw((cols @ mat.T).view(n, h, w, c))

    @staticmethod
    def _first_grads(st: _BlockState, block: _Block, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """conv_w(x, d) and the bias sums for the first convolution and an output gradient ``d``
        (channels-last), as one matmul with the kept im2col matrix (its ones column gives the bias)."""
        grad = (st.h.T @ _nhwc(d).reshape(-1, d.shape[1])).T  # (C_out, K [+ 1])
        if block.bias is None:
            return grad, None
        return grad[:, :-1], grad[:, -1]

    @staticmethod
    def _flat_select(index: torch.Tensor, z_shape: torch.Size) -> torch.Tensor:
        """max_pool2d's per-plane argmax indices as flat indices into z's NHWC memory, in the NHWC
        order of the pool's output."""
        n, c, h, w = z_shape
        rows = torch.arange(n, device=index.device).view(n, 1, 1, 1) * (h * w * c)
        channels = torch.arange(c, device=index.device).view(1, c, 1, 1)
        return _nhwc(rows + index * c + channels).reshape(-1)

    def _row_weights(self, y: torch.Tensor) -> torch.Tensor:
        """Each row's weight in the mean loss: 1 / (rows not ignored), 0 for ignored rows (all 0 when
        every row is ignored: the batch contributes zero, as on the other paths, not 0/0)."""
        valid = (y != self._ignore_index).to(self.dtype)
        return valid / valid.sum().clamp_min(1)

    @staticmethod
    def _spread(d_pooled: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The global average pool's backward: (N, C) to a flat NHWC (N*H*W*C) gradient."""
        n, c, h, w = shape
        return (d_pooled / (h * w))[:, None, None, :].expand(n, h, w, c).reshape(-1)

    @staticmethod
    def _unpool(d_out_flat: torch.Tensor, st: _BlockState) -> torch.Tensor:
        """A block's output gradient (flat NHWC) back to its convolution's output (channels-last):
        through the pool's selected positions and the ReLU's mask."""
        if st.mask is not None:
            d_out_flat = d_out_flat * st.mask
        n, c, h, w = st.z_shape
        if st.select is None:
            return _nchw(d_out_flat.view(n, h, w, c))
        d_z = d_out_flat.new_zeros(n * h * w * c)
        d_z.scatter_(0, st.select, d_out_flat)
        return _nchw(d_z.view(n, h, w, c))

    @staticmethod
    def _pool(rz: torch.Tensor, st: _BlockState) -> torch.Tensor:
        """The block's R-forward after the convolution: the ReLU mask and the pool's selection."""
        if st.select is None:
            if st.mask is None:
                return rz
            n, c, h, w = st.out_shape
            return _nchw((_nhwc(rz).reshape(-1) * st.mask).view(n, h, w, c))
        n, c, h, w = st.out_shape
        out = _nhwc(rz).reshape(-1).index_select(0, st.select)
        if st.mask is not None:
            out.mul_(st.mask)
        return _nchw(out.view(n, h, w, c))

    def _conv_backward(self, d: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, i: int,
                       mask: tuple[bool, bool, bool]) -> tuple:
        block = self._net.blocks[i]
        return torch.ops.aten.convolution_backward(_conv_operand(d), _conv_operand(h), _conv_operand(weight), None,
                                                   block.stride, block.padding, (1, 1), False, (0, 0), 1, mask)

    @staticmethod
    def _dense_forward(st: _BlockState, r_h: torch.Tensor | None, v_dense: torch.Tensor | None,
                       v_b: torch.Tensor | None) -> torch.Tensor | None:
        """A dense block's R-forward ``Rz = Rh W + h V + Vb`` as matmuls (channels-last, None for zero)."""
        n, c, h, w = st.z_shape
        r_z = None
        if r_h is not None:
            r_z = _rows(r_h) @ st.dense_weight
        if v_dense is not None:
            term = _rows(st.h) @ v_dense
            r_z = term if r_z is None else r_z.add_(term)
        if v_b is not None:
            r_z = v_b.repeat(n, h * w) if r_z is None else r_z.view(n, h * w, c).add_(v_b).view(n, -1)
        return None if r_z is None else _nchw(r_z.view(n, h, w, c))

    @staticmethod
    def _dense_backward(st: _BlockState, r_d: torch.Tensor, r_h: torch.Tensor | None, v_w: torch.Tensor | None,
                        v_dense: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A dense block's R-backward as matmuls: ``R d_in = Rd W^T + d V^T`` (flat NHWC) and
        ``R grad_W``, the matrix gradient ``h^T Rd + Rh^T d`` folded into the weight's shape (None when
        V is None: the weight is not chosen)."""
        r_d_rows, d_rows = _rows(r_d), _rows(st.d)
        r_d_in = r_d_rows @ st.dense_weight.T
        if v_w is None:
            return r_d_in.reshape(-1), None
        r_d_in.add_(d_rows @ v_dense.T)
        grad = _rows(st.h).T @ r_d_rows
        if r_h is not None:
            grad.add_(_rows(r_h).T @ d_rows)
        return r_d_in.reshape(-1), st.dense.fold(grad, v_w)

    def _conv_r_backward(self, st: _BlockState, r_d: torch.Tensor, r_h: torch.Tensor | None,
                         v_w: torch.Tensor | None, weight: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``i``'s R-backward by convolutions: ``R d_in = conv_in(Rd, W) + conv_in(d, V)`` (flat NHWC)
        and ``R grad_W = conv_w(h, Rd) + conv_w(Rh, d)`` (None when V is None: the weight is not chosen)."""
        chosen = v_w is not None
        # conv_in(Rd, W) and conv_w(h, Rd) in one call; then conv_in(d, V) and conv_w(Rh, d) in another
        r_d_in, r_grad_w, _ = self._conv_backward(r_d, st.h, weight, i, (True, chosen, False))
        if chosen or r_h is not None:
            d_in, d_grad_w, _ = self._conv_backward(
                st.d, r_h if r_h is not None else st.h,
                v_w.contiguous(memory_format=_CHANNELS_LAST) if chosen else weight, i,
                (chosen, chosen and r_h is not None, False))
            if d_in is not None:
                r_d_in = r_d_in.add_(d_in)
            if d_grad_w is not None:
                r_grad_w = r_grad_w.add_(d_grad_w)
        return _nhwc(r_d_in).reshape(-1), r_grad_w

    # ------------------------------------------------------------------ products and gradient
    def _tangent(self, column: torch.Tensor, name: str | None) -> torch.Tensor | None:
        """The tangent of parameter ``name`` in a flat column (None: the parameter is not chosen)."""
        if name is None or name not in self._param_offsets:
            return None
        start, shape = self._param_offsets[name], self.params[name].shape
        return column[start:start + math.prod(shape)].view(shape)

    def _product(self, entry: tuple, column: torch.Tensor) -> torch.Tensor:
        """H v on one batch's state for one flat tangent ``column``."""
        blocks, (pooled, logits, dlogits, weights) = entry
        out = torch.zeros_like(column)

        def put(name: str | None, value: torch.Tensor) -> None:
            if name is not None and name in self._param_offsets:
                start = self._param_offsets[name]
                out[start:start + value.numel()].add_(value.reshape(-1))

        # R-forward
        r_h: torch.Tensor | None = None
        r_inputs: list[torch.Tensor | None] = []
        dense_tangents: list[torch.Tensor | None] = []  # V as its dense matrix, for the dense blocks
        for i, (block, st, weight) in enumerate(zip(self._net.blocks, blocks, self._weights)):
            v_w = self._tangent(column, block.weight)
            v_b = self._tangent(column, block.bias)
            r_inputs.append(r_h)
            dense_tangents.append(None if st.dense is None or v_w is None else st.dense.expand(v_w))
            r_z = None
            if i == 0:
                if v_w is not None or v_b is not None:
                    r_z = self._first_conv(st.h, block, v_w, v_b, tuple(st.z_shape))
            elif st.dense is not None:
                r_z = self._dense_forward(st, r_h, dense_tangents[i], v_b)
            else:
                if r_h is not None:
                    r_z = F.conv2d(_conv_operand(r_h), _conv_operand(weight), None, block.stride, block.padding)
                if v_w is not None:
                    term = F.conv2d(_conv_operand(blocks[i].h),
                                    _conv_operand(v_w.contiguous(memory_format=_CHANNELS_LAST)), None, block.stride,
                                    block.padding)
                    r_z = term if r_z is None else r_z.add_(term)
                if v_b is not None:
                    r_z = v_b.view(1, -1, 1, 1).expand(st.z_shape) if r_z is None else r_z.add_(v_b.view(1, -1, 1, 1))
            r_h = None if r_z is None else self._pool(r_z, st)
        # the head and the softmax's R-rows
        head_w, _ = self._head
        v_hw = self._tangent(column, self._net.head_weight)
        v_hb = self._tangent(column, self._net.head_bias)
        r_pooled = r_h.mean(dim=(2, 3)) if r_h is not None else None
        r_logits = torch.zeros_like(logits)
        if r_pooled is not None:
            r_logits += r_pooled @ head_w.T
        if v_hw is not None:
            r_logits += pooled @ v_hw.T
        if v_hb is not None:
            r_logits += v_hb
        # p (r - <p, r>) relative to each row's top class (the op): r_top - <p, r> cancelled at a well-fit row
        r_dlogits = softmax_ce_hvp(logits, r_logits, check_finite=False) * weights[:, None]
        head_grad = r_dlogits.T @ pooled
        if r_pooled is not None:
            head_grad += dlogits.T @ r_pooled
        put(self._net.head_weight, head_grad)
        put(self._net.head_bias, r_dlogits.sum(dim=0))
        r_d_pooled = r_dlogits @ head_w
        if v_hw is not None:
            r_d_pooled += dlogits @ v_hw
        # R-backward
        r_d_out = self._spread(r_d_pooled, blocks[-1].out_shape)
        for i in reversed(range(len(blocks))):
            block, st, weight = self._net.blocks[i], blocks[i], self._weights[i]
            v_w = self._tangent(column, block.weight)
            r_d = self._unpool(r_d_out, st)
            if i == 0:
                grad_w, grad_b = self._first_grads(st, block, r_d)
                put(block.weight, grad_w)
                if grad_b is not None:
                    put(block.bias, grad_b)
                continue
            if st.dense is not None:
                r_d_out, r_grad_w = self._dense_backward(st, r_d, r_inputs[i], v_w, dense_tangents[i])
            else:
                r_d_out, r_grad_w = self._conv_r_backward(st, r_d, r_inputs[i], v_w, weight, i)
            if r_grad_w is not None:
                put(block.weight, r_grad_w)
            put(block.bias, _channel_sums(r_d))
        return out

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        def per_batch(entry: tuple) -> torch.Tensor:
            return torch.stack([self._product(entry, matrix[:, k]) for k in range(matrix.shape[1])], dim=1)
        return self.cached_mean(self._state, per_batch)

    def _gradient(self) -> torch.Tensor:
        """The gradient from each batch's state (which also serves the products that usually follow)."""
        def per_batch(entry: tuple) -> torch.Tensor:
            blocks, (pooled, _, dlogits, _) = entry
            parts: dict[str, torch.Tensor] = {}
            for i, (block, st) in enumerate(zip(self._net.blocks, blocks)):
                if i == 0:
                    parts[block.weight], grad_b = self._first_grads(st, block, st.d)
                    if grad_b is not None:
                        parts[block.bias] = grad_b
                else:
                    parts[block.weight] = self._conv_backward(st.d, st.h, self._weights[i], i, (False, True, False))[1]
                    if block.bias is not None:
                        parts[block.bias] = _channel_sums(st.d)
            parts[self._net.head_weight] = dlogits.T @ pooled
            if self._net.head_bias is not None:
                parts[self._net.head_bias] = dlogits.sum(dim=0)
            return self.flatten(parts)
        return self.cached_mean(self._state, per_batch)
