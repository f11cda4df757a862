"""The training objective of a model as a function of its chosen parameters: value and gradient."""
from __future__ import annotations

import torch
from torch import nn

from ..checks import check_number
from .base import BatchSource, DataSpec, LossFn
from .params import ParameterSlots, ParamSelection, flatten_tensors, resolve_parameters


class Objective:
    """``F(w) = L(w) + (weight_decay / 2) ||w||^2``, L the mean loss over ``data`` (batches weighted
    by their size, as the curvature operators weight them), w the chosen parameters of ``model``.

    Like the curvature operators it reads the model's parameters live: after an in-place update
    (:func:`~unlearn_kernels.curvature.set_flat_parameters`) :meth:`value` and :meth:`gradient`
    are those of the new weights. It never modifies the model. Each call is one pass over the data
    (:attr:`num_data_passes`); no construction probe, so building one costs only the check of tensor
    data for NaN or Inf (see :class:`~unlearn_kernels.curvature.BatchSource`, which also checks an
    iterable's batches as they stream). A parameter the forward does not use has zero gradient.

    Args:
        model: any nn.Module, in eval mode if it has BatchNorm or dropout.
        loss_fn: ``loss_fn(model(x), y) -> scalar``, a mean-reduced loss.
        data: a LabeledData, an (x, y) pair of tensors, or a re-iterable of (x, y) batches.
        params: the chosen parameters (None: every trainable one), as in
            :func:`~unlearn_kernels.curvature.hessian_operator`.
        weight_decay: the L2 coefficient, >= 0.
        batch_size: split tensor data into chunks of this many rows (same objective).

    Attributes:
        param_names: the chosen parameters' names, in vector order.
        num_data_passes: passes over the data so far (one per value, gradient or value_and_gradient).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None, *,
                 weight_decay: float = 0.0, batch_size: int | None = None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"Objective: loss_fn must be callable (outputs, targets) -> scalar, "
                            f"got {type(loss_fn).__name__}")
        chosen = resolve_parameters(model, params)
        devices = {p.device for p in chosen.values()}
        if len({p.dtype for p in chosen.values()}) > 1 or len(devices) > 1:
            raise ValueError("Objective: the chosen parameters mix dtypes or devices; choose parameters that share one "
                             "dtype and device")
        self.model = model
        self.loss_fn = loss_fn
        self.param_names: tuple[str, ...] = tuple(chosen)
        self._slots = ParameterSlots(model, chosen)  # read at every call: replaced parameters are followed
        self.weight_decay = check_number("Objective: weight_decay", weight_decay, 0.0)
        self.data = BatchSource(data, devices.pop(), batch_size)
        self.num_data_passes = 0

    def weights(self) -> torch.Tensor:
        """A flat copy of the chosen parameters (their dtype and device)."""
        with torch.no_grad():
            return flatten_tensors(p.detach() for p in self._slots.current().values())

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("Objective: loss_fn must return a scalar tensor (a mean-reduced loss), got "
                             + (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__))
        return loss.reshape(())

    def _pass(self, with_gradient: bool) -> tuple[float, torch.Tensor | None]:
        total = torch.zeros((), dtype=torch.float64)
        grad: torch.Tensor | None = None
        count = 0
        params = self._slots.current()
        for x, y in self.data:
            n = y.shape[0]
            if with_gradient:
                leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
                with torch.enable_grad():
                    loss = self._loss(torch.func.functional_call(self.model, leaves, (x,)), y)
                    # a parameter the forward does not use has zero gradient
                    parts = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                                materialize_grads=True)
                flat = flatten_tensors(parts).mul_(n)
                grad = flat if grad is None else grad.add_(flat)
            else:
                with torch.no_grad():
                    loss = self._loss(self.model(x), y)
            total += loss.detach().double().cpu() * n
            count += n
        if count == 0:
            raise ValueError("Objective: data is empty: it yields no samples")
        self.num_data_passes += 1
        value = float(total) / count
        w = self.weights() if self.weight_decay else None
        if w is not None:
            value += 0.5 * self.weight_decay * float(w.double().square().sum())
        if grad is not None:
            grad.div_(count)
            if w is not None:
                grad.add_(w, alpha=self.weight_decay)
        return value, grad

    def value(self) -> float:
        """F at the model's current weights, accumulated in float64 (one forward pass, no graph)."""
        return self._pass(False)[0]

    def gradient(self) -> torch.Tensor:
        """grad F at the model's current weights: a flat (d,) tensor of the parameters' dtype."""
        return self._pass(True)[1]  # type: ignore[return-value]

    def value_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Both, in one pass."""
        value, grad = self._pass(True)
        return value, grad  # type: ignore[return-value]
