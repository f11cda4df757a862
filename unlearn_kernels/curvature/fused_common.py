"""What both fused kernel paths (:mod:`.fused_mlp`, :mod:`.fused_conv`) share: the parse of an
``nn.Sequential`` into its layers, of a cross entropy into its options, the checks of the model, the
loss and the chosen parameters, and the labels the kernels take."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .params import ParamSelection, resolve_parameters
from .probes import LossFn
from .settings import hooked_module, own_call


def sequential_leaves(module: nn.Sequential, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of a Sequential's non-Sequential entries in call order (repeats included)."""
    for name, child in module._modules.items():
        if plain_sequential(child):
            yield from sequential_leaves(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential, or a subclass (like our MLP) that keeps Sequential's forward and the iteration it
    runs the layers in (a subclass whose ``__iter__`` reorders them got a wrong Hessian: the parse reads
    the layers in registration order)."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and type(module).__iter__ is nn.Sequential.__iter__)


class FusedDataError(ValueError):
    """Data the model and the loss take but a fused path does not (e.g. class-probability targets):
    ``hessian_operator(path="auto")`` then uses the generic path."""


def is_class_labels(y: torch.Tensor) -> bool:
    """Whether a batch's targets are (N,) integer class labels, what the fused kernels take (not class
    probabilities)."""
    return y.dim() == 1 and not (y.is_floating_point() or y.is_complex())


def all_ignored(labels: torch.Tensor, ignore_index: int) -> bool:
    """Whether every row of a batch is ``ignore_index``: the batch contributes zero (as on the other paths), where
    the kernels refuse it (a mean over 0 rows)."""
    return bool((labels == ignore_index).all())


def none_ignored(labels: torch.Tensor, ignore_index: int) -> bool:
    """Whether no row is ``ignore_index``: then the mean over all rows is the size-weighted mean of any chunks'
    means (each divides by its own rows)."""
    return not bool((labels == ignore_index).any())


def fused_labels(owner: str, y: torch.Tensor) -> torch.Tensor:
    """A batch's targets as the int64 (N,) class labels the fused kernels take (uint8 labels, which
    cross entropy accepts, would index as a mask); FusedDataError for other targets."""
    if not is_class_labels(y):
        raise FusedDataError(
            f"{owner}: targets y of shape {tuple(y.shape)}, {y.dtype} are not (N,) integer class labels (the fused "
            "kernels take no class probabilities); use hessian_operator(..., path='generic')"
        )
    return y.long()


def parse_cross_entropy(loss_fn: LossFn) -> tuple[float, int] | str:
    """(label_smoothing, ignore_index) of a supported cross entropy, or why the loss is not one."""
    if loss_fn is F.cross_entropy:
        return 0.0, -100
    if type(loss_fn) is not nn.CrossEntropyLoss:
        return f"loss is {getattr(loss_fn, '__name__', type(loss_fn).__name__)}, not nn.CrossEntropyLoss or F.cross_entropy"
    if loss_fn.reduction != "mean":
        return f"loss is CrossEntropyLoss(reduction={loss_fn.reduction!r}); the fused path needs reduction='mean'"
    if loss_fn.weight is not None:
        return "loss is CrossEntropyLoss with class weights"
    return float(loss_fn.label_smoothing), int(loss_fn.ignore_index)


def fused_reason(parsed: object, loss_fn: LossFn, model: nn.Module, params: ParamSelection,
                 layer_params: Callable[[object], list[torch.Tensor]], layers: str, *,
                 check_selection: bool = True) -> str | None:
    """The checks both fused paths share, or None when they pass: ``parsed`` is the path's parse of the
    model (a string: why it does not qualify), then the loss, ``params`` (raises what
    :func:`~unlearn_kernels.curvature.params.resolve_parameters` raises; each chosen parameter must
    be one of the layers' tensors, unless ``check_selection`` is False: for a caller that learns the
    parameters it will choose only later, from the data) and the layers' tensors (``layer_params(parsed)``:
    one dtype and device, float32 or float64)."""
    if isinstance(parsed, str):
        return parsed
    # a hook or a forward set on the instance (as accelerate's hooks do) may change what a layer or the
    # loss computes: not what the fused passes compute
    hooked = hooked_module(model)
    if hooked is not None:
        return hooked
    own = next((name for name, module in model.named_modules() if own_call(module)), None)
    if own is not None:
        return (f"{'module ' + repr(own) if own else 'the model'} has a forward of its own (set on the instance, "
                "or a class that overrides __call__)")
    loss = parse_cross_entropy(loss_fn)
    if isinstance(loss, str):
        return loss
    if isinstance(loss_fn, nn.Module) and own_call(loss_fn):
        return "the loss module has a forward hook or pre-hook, or a forward set on the instance"
    tensors = layer_params(parsed)
    layer_ids = {id(t) for t in tensors}
    if len(layer_ids) < len(tensors):  # the fused passes would miss the tied terms
        return f"{layers} share a parameter (tied weights)"
    # e.g. a parameter registered on the Sequential itself: the forward never uses it, and the fused
    # passes have no rows for it (the generic path gives it its zero rows)
    unused = [name for name, p in resolve_parameters(model, params).items() if id(p) not in layer_ids]
    if unused and check_selection:
        return f"parameter {unused[0]!r} is in none of {layers}"
    dtypes, devices = {p.dtype for p in tensors}, {p.device for p in tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        return f"{layers} mix dtypes or devices"
    dtype = dtypes.pop()
    if dtype not in (torch.float32, torch.float64):
        return f"the parameters are {dtype}; the fused paths take float32 or float64"
    return None
