"""The checks of a model and a loss on a batch that every operator and the Objective make before
their first product: the model runs on the data, the loss accepts its outputs and the labels, no
forward writes its parameters, and nothing in train mode makes a sample's loss depend on its batch."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize

from ..checks import all_finite, check_batch_statistics, first_nonfinite_weight, is_out_of_memory
from .params import version_counter

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

def train_mode_problem(module: nn.Module) -> str | None:
    """What ``module``'s train-mode forward does to a sample's loss, or None: random (dropout, its own
    or inside attention or between stacked RNN layers; RReLU's random slopes) or dependent on the
    batch (BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm in training mode makes the loss and its curvature depend on how the data is batched"
    random = (isinstance(module, (nn.modules.dropout._DropoutNd, nn.RReLU))
              or (isinstance(module, nn.MultiheadAttention) and module.dropout > 0)
              or (isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1))
    if random:
        what = "its random slopes" if isinstance(module, nn.RReLU) else "dropout"
        return f"{what} in training mode {'makes' if what == 'dropout' else 'make'} the loss and its curvature random"
    return None


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds an nn.MultiheadAttention (nn.Transformer*Layer's too): see
    :func:`differentiable_attention`."""
    return any(isinstance(module, nn.MultiheadAttention) for module in model.modules())


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention by ops that have forward-mode and double-backward derivatives: without the inference
    fast path of nn.MultiheadAttention and nn.TransformerEncoderLayer (``aten::_native_multi_head_attention``,
    ``aten::_transformer_encoder_layer_fwd``, which an eval-mode layer takes when no input requires grad, as
    a jvp's detached parameters do not) and with ``F.scaled_dot_product_attention``'s math kernel (the fused
    ones have neither derivative). The fast path's setting is restored after."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def refuse_modes(owner: str, device: torch.device, needs_autograd: str | None) -> None:
    """ValueError inside a caller's mode that changes what the model's forward computes:
    ``torch.autocast`` for ``device``'s type (products and gradients in its lower precision, or refused
    by the fused kernels, instead of the parameters' dtype) and ``torch.nn.utils.parametrize.cached()``
    (every batch's forward would reuse the first one's parametrized weight, without its derivatives);
    and, unless ``needs_autograd`` is None, inside ``torch.inference_mode()``, where autograd records
    nothing: ``needs_autograd`` says what needs it ("be built", its probes differentiating the loss)."""
    if torch.is_autocast_enabled(device.type):
        raise ValueError(f"{_prefix(owner)}torch.autocast is on for {device.type}: the curvature is computed in the "
                         "parameters' dtype, not autocast's; call it outside autocast (or inside "
                         f"torch.autocast({device.type!r}, enabled=False))")
    if parametrize._cache_enabled:  # torch's own flag (no public reader)
        raise ValueError(f"{_prefix(owner)}torch.nn.utils.parametrize.cached() is on: its parametrized weights are "
                         "computed once and held without the derivatives the curvature needs; call it outside")
    if needs_autograd is not None and torch.is_inference_mode_enabled():
        raise ValueError(f"{_prefix(owner)}cannot {needs_autograd} inside torch.inference_mode(), where autograd "
                         "records nothing: call it outside")


def refuse_parameter_writes(owner: str, copies: dict[str, torch.Tensor]) -> None:
    """ValueError if a forward run on ``copies`` (fresh clones of the model's parameters) wrote one: its
    loss is then no function of the parameters, and every later pass would write the model."""
    written = [name for name, tensor in copies.items() if version_counter(tensor) != 0]
    if written:
        raise ValueError(f"{_prefix(owner)}the model's forward writes its parameter {written[0]!r} in place (an "
                         "nn.Embedding with max_norm renormalises its rows, say): the loss is then no function of "
                         "the parameters, and every pass would write the model; remove the write (max_norm=None)")


def check_finite_weights(owner: str, computed: str, parameters: Iterable[tuple[str, torch.Tensor]],
                         buffers: Iterable[tuple[str, torch.Tensor]], statistics: Container[str],
                         sums: Iterable[float]) -> None:
    """ValueError naming the first weight that :func:`~unlearn_kernels.checks.first_nonfinite_weight`
    refuses (its arguments, ``sums`` from the caller's
    :func:`~unlearn_kernels.curvature.params.weights_key`; ``owner`` starts the message, ``computed``
    is what is not computed), the one message of the curvature operators and the objective."""
    bad = first_nonfinite_weight(parameters, buffers, statistics, sums)
    if bad is not None:
        kind, name, what = bad
        raise ValueError(f"{owner}: {kind} {name!r} has {what} values (did an update diverge?): no {computed} is "
                         "computed at such weights")


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def checked_loss(loss_fn: LossFn, out: Any, y: torch.Tensor, owner: str = "") -> torch.Tensor:
    """``loss_fn(out, y)``, checked to be a scalar; a label out of range is a ValueError naming it
    (see :func:`check_loss_labels`). Messages start with ``"<owner>: "`` when an owner is given."""
    try:
        loss = loss_fn(out, y)
    except IndexError:
        check_loss_labels(loss_fn, out, y, owner)  # torch's message names neither the row nor the classes
        raise
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{_prefix(owner)}loss_fn must return a scalar tensor (a mean-reduced loss such as "
            "nn.CrossEntropyLoss()), got "
            + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__)
        )
    loss = loss.reshape(())
    if isinstance(out, torch.Tensor) and not all_finite(loss) and every_row_ignored(loss_fn, y):
        # the mean over no rows, 0/0: zero, with zero derivatives (torch's gradient is NaN where every class
        # weight is 0, and zero only where every label is ignore_index)
        return out.sum() * 0.0
    return loss


def probe_forward(forward: Callable[[torch.Tensor], Any], loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype, owner: str = "") -> None:
    """Run ``forward`` (the model at its parameters, of ``dtype``) and the loss on one batch, without
    a graph, so that data they reject (a wrong dtype, width or label shape, a label out of range) is
    a ValueError saying so, not a failure to differentiate or a raw torch error later."""
    with torch.no_grad():
        try:
            out = forward(x)
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            if is_out_of_memory(err):
                raise
            raise ValueError(f"{_prefix(owner)}the model cannot run on the data (inputs x of shape {tuple(x.shape)}, "
                             f"{x.dtype}; parameters {dtype}): {err}") from err
        try:
            loss = checked_loss(loss_fn, out, y, owner)
        except (RuntimeError, TypeError, IndexError, AttributeError) as err:  # MSE on a tuple: AttributeError
            if is_out_of_memory(err):
                raise
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{_prefix(owner)}the loss rejects the targets y (shape {tuple(y.shape)}, {y.dtype}) "
                             f"with the model's outputs (shape {shape}): {err}") from err
    # a half-precision mean over many rows overflows (float16 cross entropy over 80,000 rows: Inf, and a
    # zero gradient that no finiteness check would catch), or the forward itself does (bfloat16 keeps float32's
    # range, so there mostly the forward); finite data and weights are checked already (a batch whose mean has
    # no row is 0 already: checked_loss)
    if loss.dtype in (torch.float16, torch.bfloat16) and not all_finite(loss):
        raise ValueError(f"{_prefix(owner)}the loss on a batch of {y.shape[0]} rows is not finite in {loss.dtype} "
                         "(its mean overflows, or the forward does): use batches of a few thousand rows "
                         "(batch_size= for tensor data, a DataLoader's own batch size), or a float32 model")


def ignore_index_of(loss_fn: LossFn) -> int:
    """The class label ``loss_fn`` leaves out of its mean: its ``ignore_index`` attribute
    (``nn.CrossEntropyLoss``), or the keyword of a ``functools.partial`` of ``F.cross_entropy``, else
    cross entropy's default -100."""
    while isinstance(loss_fn, functools.partial) and "ignore_index" not in loss_fn.keywords:
        loss_fn = loss_fn.func
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords["ignore_index"]
    return getattr(loss_fn, "ignore_index", -100)


def class_weights_of(loss_fn: LossFn) -> torch.Tensor | None:
    """The class weights of a weighted loss (``nn.CrossEntropyLoss(weight=...)``, ``nn.NLLLoss``), or the
    ``weight`` keyword of a ``functools.partial``, else None."""
    while isinstance(loss_fn, functools.partial) and "weight" not in loss_fn.keywords:
        loss_fn = loss_fn.func
    if isinstance(loss_fn, functools.partial):
        weight = loss_fn.keywords["weight"]
    else:
        weight = loss_fn.weight if isinstance(loss_fn, nn.modules.loss._WeightedLoss) else None
    return weight if isinstance(weight, torch.Tensor) else None


def every_row_ignored(loss_fn: LossFn, y: torch.Tensor) -> bool:
    """Whether cross entropy's mean over the batch has no row: every class label in ``y`` is the loss's
    ``ignore_index`` (-100 by default, as in ``F.cross_entropy``) or of a class whose weight is 0. The
    mean is then 0/0 (NaN); every path takes such a batch as contributing zero to the loss, the gradient
    and the curvature (its rows still count in the weights n_b / N)."""
    if y.is_floating_point() or y.is_complex() or y.numel() == 0:
        return False
    counted = y[y != ignore_index_of(loss_fn)]
    weights = class_weights_of(loss_fn)
    if weights is not None and counted.numel():
        if bool(((counted < 0) | (counted >= weights.numel())).any()):  # the loss names a label out of range
            return False
        counted = counted[weights.to(counted.device)[counted] != 0]
    return counted.numel() == 0


def check_loss_labels(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor, owner: str = "") -> None:
    """ValueError naming the first class label in ``y`` outside the model's ``out.shape[1]`` classes
    (and not the loss's ``ignore_index``, -100 by default, as in ``F.cross_entropy``); nothing if
    there is none, or if ``y`` holds no class labels (floating point) or ``out`` has no class dim."""
    if y.is_floating_point() or y.is_complex() or out.dim() < 2:
        return
    classes, ignore_index = out.shape[1], ignore_index_of(loss_fn)
    bad = ((y < 0) | (y >= classes)) & (y != ignore_index)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{_prefix(owner)}label y[{', '.join(map(str, where))}] = {int(y[where])} (rows counted "
                         f"within the batch) is out of range for the model's {classes} classes (and is not "
                         f"ignore_index={ignore_index})")


def check_per_sample_forward(model: nn.Module, owner: str = "") -> None:
    """ValueError naming the first module of ``model`` that makes a sample's output depend on more than
    the sample: BatchNorm or randomness (dropout, RReLU) in training mode, or a BatchNorm without
    running statistics, which normalises with the batch's statistics in eval mode too. The operators'
    losses are means over samples, the same for any batching of the data."""
    for name, module in model.named_modules():
        problem = train_mode_problem(module) if module.training else None
        if problem is not None:
            raise ValueError(f"{_prefix(owner)}module {name or type(module).__name__!r} ({type(module).__name__}) is "
                             f"in training mode: {problem}; call model.eval() first (on a copy if you need train "
                             "mode elsewhere)")
    check_batch_statistics(owner, model, "the loss and its curvature would depend on how the data is batched")
