"""The public constructors of curvature operators: :func:`hessian_operator` picks a fused kernel path
(:mod:`.fused_mlp`, :mod:`.fused_conv`) where the model and loss qualify, else the generic one
(:mod:`.generic`), and builds a :class:`~unlearn_kernels.curvature.distributed.DistributedOperator` over a
process group; :func:`ggn_operator` the same for the generalised Gauss-Newton matrix."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checks import check_choice
from .base import CurvatureOperator
from .batches import DataSpec
from .distributed import DistributedOperator
from .fused_conv import FusedConvHessian
from .fused_conv import supports as conv_supports
from .fused_common import FusedDataError
from .fused_mlp import FusedMLPHessian
from .fused_mlp import supports as mlp_supports
from .generic import MODES, GenericHessian, GGNOperator
from .params import ParamSelection, parameter_names
from .probes import LossFn

PATHS = ("auto", "generic", "fused")
"""The paths :func:`hessian_operator` chooses between."""


def _on_every_rank(check: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``(check(), None)``, or ``(None, its TypeError / ValueError)``: with a process group a rank's refusal of
    its arguments is raised inside the construction's collective (``DistributedOperator(refusal=...)``), so
    that the other ranks learn of it at once instead of waiting for the group's timeout."""
    try:
        return check(), None
    except (TypeError, ValueError) as err:
        return None, err


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSpec,
    params: ParamSelection = None,
    path: str = "auto",
    *,
    batch_size: int | None = None,
    mode: str = "auto",
    cache_bytes: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> CurvatureOperator:
    """The Hessian of the mean loss over ``data`` w.r.t. ``params``, as a :class:`CurvatureOperator`.

    Args:
        model: any nn.Module, in eval mode if it has BatchNorm or dropout. It is never modified: it is as it
            was after every call. Not thread-safe: while a generic-path product or a gradient runs, the
            model holds the operator's tensors in place of its parameters (``torch.func.functional_call``),
            so no other thread may train or run it meanwhile (the methods work on a copy of the model).
        loss_fn: ``loss_fn(model(x), y) -> scalar``, a *mean-reduced* loss (``nn.CrossEntropyLoss()``,
            ``F.cross_entropy``, ``nn.MSELoss()``, ...). The operator is ``sum_b (n_b / N)`` times the
            Hessian of ``loss_fn`` on batch b (n_b = rows of batch b, N = all rows): the size-weighted
            mean of the per-batch mean losses' Hessians, which is the Hessian of the mean loss over the
            data when ``loss_fn`` is a plain mean over rows. It is not, and depends on the batching,
            when a batch's mean has another denominator (``ignore_index`` rows, which cross entropy
            leaves out of its mean; class weights) or the loss is not a mean (reduction="sum"). A batch
            whose rows are all ``ignore_index`` or of classes whose weight is 0 contributes zero, on every
            path.
        data: a LabeledData, an (x, y) pair of tensors, or a re-iterable of (x, y) batches (a list or
            a DataLoader with a fixed order and no dropped samples). Batches are moved to the
            parameters' device.
        params: None (all trainable parameters), or an iterable of parameter names / tensors (e.g.
            only the last layer, or the LoRA adapters, or a generator such as ``model.fc.parameters()``);
            the flat vector layout follows that order.
        path: "auto" (the fused kernel path when the model, the loss and the first batch allow, else
            generic), "generic" (:class:`GenericHessian`) or "fused" (error if not supported).
            ``operator.path`` says which ran; after "auto" fell back, ``operator.path_reason`` says why
            the fused path was not used (e.g. class-probability targets, which only the generic path takes).
        batch_size: split tensor data into chunks of this many rows (bounds memory; the same operator
            for a loss that is a plain mean over rows, see ``loss_fn``).
        mode: the generic path's differentiation mode, "auto", "reverse-over-reverse" or
            "forward-over-reverse" (see :class:`GenericHessian`; ``operator.mode`` and
            ``operator.mode_reason`` say what runs and why); the fused path computes the exact
            products by its own pass and ignores it.
        cache_bytes: memory budget of the fixed-weight cache (None: 1 GiB; 0: no cache). What does
            not change between products while the weights do not change is kept per batch (the fused
            path's activations and softmax, the generic path's gradient graphs) until it would exceed
            the budget; later batches are recomputed for every product.
        process_group: a ``torch.distributed`` process group whose ranks each pass their own shard of
            the rows as ``data``: returns a :class:`~unlearn_kernels.curvature.distributed.DistributedOperator`,
            the operator of the mean over all ranks' rows, identical on every rank.

    Raises:
        ValueError: train-mode BatchNorm/dropout or a BatchNorm without running statistics, NaN or
            Inf in tensor data or the first batch (a later batch of an iterable: at the product or
            gradient that reads it), NaN or Inf in a parameter
            or a BatchNorm running statistic or NaN in another buffer (at construction, and at the first
            product or gradient after the weights changed; see
            :class:`~unlearn_kernels.curvature.CurvatureOperator`), data that changes between
            passes, data the model or the loss cannot run on (a wrong input dtype or width, a wrong
            label dtype or shape: the first batch at construction, a later batch of another layout at
            the first pass that reads it, named "batch i of the data: ..."), a class label out of
            range, a loss that is not twice differentiable, an unknown path or mode, a bad
            ``cache_bytes``, a bad ``params`` selection, or an unsupported forced "fused" path (its
            model, loss or first batch: "hessian_operator: path='fused' cannot be used: ...").
            Integer labels the loss accepts (int64, uint8) work on every path.
    """
    if process_group is not None:
        def checked_names() -> tuple[str, ...]:
            check_choice("path", path, PATHS)
            check_choice("mode", mode, MODES)
            return parameter_names(model, params)  # a generator: read once

        names, refusal = _on_every_rank(checked_names)
        return DistributedOperator(
            lambda shard: hessian_operator(model, loss_fn, shard, names, path, batch_size=batch_size, mode=mode,
                                           cache_bytes=cache_bytes),
            model, data, names, process_group, refusal=refusal, kind="Hessian", loss_fn=loss_fn)
    check_choice("path", path, PATHS)
    check_choice("mode", mode, MODES)
    params = parameter_names(model, params)  # read by the support checks and the operator (a generator: once)
    reason = None
    if path != "generic":
        fused, reason = _fused_choice(model, loss_fn, params, check_selection=True)
        if fused is not None:
            try:
                return fused(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)
            except FusedDataError as err:  # data only the generic path takes (the probe's, before its gradients)
                reason = str(err)
        if path == "fused":
            raise ValueError(f"hessian_operator: path='fused' cannot be used: {reason}")
    operator = GenericHessian(model, loss_fn, data, params, batch_size=batch_size, mode=mode, cache_bytes=cache_bytes)
    operator.path_reason = reason
    return operator


def _fused_choice(model: nn.Module, loss_fn: LossFn, params: ParamSelection, *, check_selection: bool
                  ) -> tuple[type[FusedMLPHessian] | type[FusedConvHessian] | None, str | None]:
    """The fused operator that takes ``model``, ``loss_fn`` and ``params`` whatever the data (the MLP's
    first), with None for the reason; or None and why neither does."""
    mlp_reason = mlp_supports(model, loss_fn, params, check_selection=check_selection)
    if mlp_reason is None:
        return FusedMLPHessian, None
    conv_reason = conv_supports(model, loss_fn, params, check_selection=check_selection)
    if conv_reason is None:
        return FusedConvHessian, None
    return None, f"not a fused MLP ({mlp_reason}) nor a fused conv net ({conv_reason})"


def fused_path_refusal(model: nn.Module, loss_fn: LossFn, params: ParamSelection = None, *,
                       check_selection: bool = True) -> str | None:
    """Why ``hessian_operator(..., path="fused")`` refuses ``model``, ``loss_fn`` and ``params`` whatever the
    data, or None where a fused path takes them (data it cannot take is found when it is built). With
    ``check_selection`` False the parameters chosen are not asked about (a caller that chooses them from the
    data later: a Newton method's parameters the loss uses). Raises what ``params`` raises there."""
    return _fused_choice(model, loss_fn, params, check_selection=check_selection)[1]


def ggn_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSpec,
    params: ParamSelection = None,
    *,
    batch_size: int | None = None,
    cache_bytes: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> GGNOperator | DistributedOperator:
    """The generalised Gauss-Newton matrix of the mean loss (see :class:`GGNOperator`).

    Arguments as in :func:`hessian_operator` (``process_group`` included; batches weighted by their
    rows as there); ``loss_fn`` must be ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` with (N,)
    class labels, or ``nn.MSELoss`` / ``F.mse_loss``, with mean reduction (not subclasses). Needs only
    first derivatives of the model.

    Raises:
        ValueError: an unsupported loss or targets ("ggn_operator: ..."), a label out of range (on any
            batch, when its forward is built), or what :func:`hessian_operator` raises for the data and
            the weights.
    """
    if process_group is not None:
        # read by the local operator and the wrapper (a generator: once)
        names, refusal = _on_every_rank(lambda: parameter_names(model, params))
        return DistributedOperator(
            lambda shard: GGNOperator(model, loss_fn, shard, names, batch_size=batch_size, cache_bytes=cache_bytes),
            model, data, names, process_group, refusal=refusal, kind="GGN", loss_fn=loss_fn)
    params = parameter_names(model, params)
    return GGNOperator(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)
