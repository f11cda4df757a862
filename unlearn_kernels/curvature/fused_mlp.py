"""The fused Hessian path: an MLP under softmax cross entropy, through the compiled ``mlp_hvp`` op.

When the model is an ``nn.Sequential`` (nesting allowed) of ``nn.Linear`` layers, each optionally
followed by one elementwise activation (``nn.ReLU``, ``nn.GELU()`` in its exact form, ``nn.Tanh``,
``nn.Sigmoid``), with ``nn.Flatten`` allowed before the first Linear and ``nn.Identity`` / eval-mode
``nn.Dropout`` anywhere, and the loss is ``nn.CrossEntropyLoss`` (mean reduction, no class weights;
any label smoothing and ignore_index) or ``F.cross_entropy``, the exact Hessian of the mean loss is
applied to K vectors per batch in one compiled forward + R-forward + backward + R-backward pass
(:func:`unlearn_kernels.ops.mlp_hvp_flat`) instead of ``torch.func``'s forward-over-reverse. At fixed
weights the forward, the softmax and the gradient's backward are computed once per batch
(:func:`unlearn_kernels.ops.mlp_hvp_state`) and each product runs only the R-passes
(:func:`unlearn_kernels.ops.mlp_hvp_flat_cached`).
:func:`supports` says why a model/loss does not qualify; ``hessian_operator(path="auto")`` uses it.
:class:`FusedMLPLoss` computes the loss and its gradient per batch by one compiled forward and
backward (:func:`unlearn_kernels.ops.mlp_value_grad_flat`), for :class:`~.objective.Objective`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends import BackendUnavailableError, choose, status
from ..ops.mlp_hvp import (
    activation_codes,
    mlp_hvp_flat,
    mlp_hvp_flat_cached_prechecked,
    mlp_hvp_state,
    mlp_value_grad_flat,
)
from .base import CurvatureOperator
from .batches import DataSpec, RowMean
from .probes import LossFn
from .fused_common import (
    FusedDataError,
    all_ignored,
    none_ignored,
    is_class_labels,
    fused_labels,
    fused_reason,
    parse_cross_entropy,
    plain_sequential,
    sequential_leaves,
)
from .params import ParamSelection, flat_offsets

_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class _Chain:
    """The parsed MLP: one entry per Linear layer (parameter names in the model, activation name)."""

    flatten: bool
    weight_names: tuple[str, ...]
    bias_names: tuple[str | None, ...]
    activations: tuple[str, ...]

    def offsets(self, param_offsets: dict[str, int]) -> tuple[list[int], list[int]]:
        """The ops' weight_offsets and bias_offsets: where each layer's weight and bias start in the flat
        vector (``param_offsets``, by name), -1 for one that is not chosen (or absent)."""
        return ([param_offsets.get(n, -1) for n in self.weight_names],
                [param_offsets.get(n, -1) if n is not None else -1 for n in self.bias_names])

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        """A batch's inputs as the first Linear reads them (flattened after a leading nn.Flatten)."""
        return x.reshape(x.shape[0], -1) if self.flatten else x


def _parse_model(model: nn.Module) -> _Chain | str:
    """The chain of Linear layers and activations of ``model``, or why it is not one."""
    if not plain_sequential(model):
        return f"the model is {type(model).__name__}, not an nn.Sequential of Linear layers and activations"
    flatten = False
    weights: list[str] = []
    biases: list[str | None] = []
    acts: list[str] = []
    seen: set[int] = set()
    for name, child in sequential_leaves(model):
        kind = type(child)
        # the exact class: a subclass of Dropout may compute something else in eval mode
        if kind is nn.Identity or (kind is nn.Dropout and not child.training):
            continue
        if kind is nn.Flatten:
            if weights:
                return f"layer {name!r} is a Flatten after a Linear; the fused path takes one only before the first"
            if (child.start_dim, child.end_dim) != (1, -1):
                return f"layer {name!r} is a Flatten that is not Flatten(1, -1)"
            flatten = True
        elif kind is nn.Linear:
            if id(child) in seen:
                return f"layer {name!r} reuses an earlier Linear (tied weights)"
            if not all(isinstance(t, nn.Parameter) for t in (child.weight, child.bias) if t is not None):
                return f"layer {name!r} has a weight or bias that is not a Parameter (a buffer: a constant)"
            seen.add(id(child))
            weights.append(f"{name}.weight")
            biases.append(f"{name}.bias" if child.bias is not None else None)
            acts.append("identity")
        elif kind in _ACTIVATIONS:
            if kind is nn.GELU and child.approximate != "none":
                return f"layer {name!r} is GELU(approximate={child.approximate!r}); the fused path has the exact erf form only"
            if not weights:
                return f"layer {name!r} ({kind.__name__}) comes before the first Linear"
            if acts[-1] != "identity":
                return f"layer {name!r} ({kind.__name__}) is a second activation after one Linear"
            acts[-1] = _ACTIVATIONS[kind]
        else:
            mode = " in training mode" if isinstance(child, nn.Dropout) else ""
            return f"layer {name!r} is {kind.__name__}{mode}"
    if not weights:
        return "the model has no Linear layer"
    return _Chain(flatten, tuple(weights), tuple(biases), tuple(acts))


def supports(model: nn.Module, loss_fn: LossFn, params: ParamSelection = None, backend: str = "auto", *,
             check_selection: bool = True) -> str | None:
    """None if :class:`FusedMLPHessian` applies to ``model``, ``loss_fn`` and ``params``, else why not.
    For ``backend`` "auto" that includes a compiled kernel for the parameters' device (the reference
    alone is slower than the generic path, which ``hessian_operator`` then takes); a backend named
    by the caller is checked by the operator itself. ``check_selection`` False: whether each chosen
    parameter is a layer's is not asked (see :func:`~.fused_common.fused_reason`).

    Raises what :func:`~unlearn_kernels.curvature.params.resolve_parameters` raises for a bad ``params``.
    """
    chain = _parse_model(model)
    tensors = dict(model.named_parameters(remove_duplicate=False))  # a tied parameter under each name

    def layer_params(chain: _Chain) -> list[torch.Tensor]:
        return [tensors[n] for n in (*chain.weight_names, *chain.bias_names) if n is not None]

    reason = fused_reason(chain, loss_fn, model, params, layer_params, "the Linear layers",
                          check_selection=check_selection)
    if reason is not None or backend != "auto":
        return reason
    device = layer_params(chain)[0].device  # type: ignore[arg-type]
    kernel = {"cpu": "cpp", "cuda": "cuda"}.get(device.type)
    if kernel is None:
        return f"no fused kernel for parameters on {device}"
    st = status("mlp_hvp", kernel)
    return None if st.usable else f"the {kernel} mlp_hvp kernel cannot run: {st.reason}"


class FusedMLPHessian(CurvatureOperator):
    """The exact Hessian of the mean softmax cross entropy of an MLP, by the compiled R-operator pass.

    Same arguments, vector layout and results as :class:`~unlearn_kernels.curvature.GenericHessian`
    for the models and losses :func:`supports` accepts; a ``matmat`` of K vectors runs one compiled
    call per batch for all K: :func:`~unlearn_kernels.ops.mlp_hvp_flat_cached` on the batch's kept
    state (:func:`~unlearn_kernels.ops.mlp_hvp_state`, about 4 N (d_1 + .. + d_L) numbers for a batch
    of N rows and layer widths d_l) while it fits in ``cache_bytes``, else
    :func:`~unlearn_kernels.ops.mlp_hvp_flat` (the whole pass). Parameters outside ``params`` get
    zero tangents (the operator is the Hessian block of the chosen parameters). Labels are taken as
    int64 (the kernels' type), so uint8 labels, which cross entropy and the generic path accept,
    work here too; other integer types fail at construction as they do on the generic path.
    Class-probability targets are refused at construction (the kernels take class labels only). A
    batch whose rows are all ``ignore_index`` contributes zero, as on the generic path (the kernels
    refuse it: it never reaches them).

    Args:
        backend: the ``mlp_hvp`` backend ("auto", "cpp", "cuda" or "reference"); one that is unknown or
            cannot run on the parameters' device is refused at construction.

    Raises:
        ValueError: :func:`supports` rejects the model or loss, batches are not (N, features) inputs of
            the parameters' dtype (N, ... with a leading nn.Flatten), or what the base class raises.
            Inputs of another shape and targets that are not (N,) class labels, where the model and
            the loss take them, are a :class:`FusedDataError` (first batch: at construction).
    """

    path = "fused"

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None, backend: str = "auto", cache_bytes: int | None = None,
    ) -> None:
        reason = supports(model, loss_fn, params, backend)
        if reason is not None:
            raise ValueError(f"FusedMLPHessian cannot be used: {reason}")
        self._chain: _Chain = _parse_model(model)  # type: ignore[assignment]
        self._label_smoothing, self._ignore_index = parse_cross_entropy(loss_fn)  # type: ignore[misc]
        self.backend = backend
        super().__init__(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)
        try:  # a backend that is unknown or cannot run here: now, not at the first product
            choose("mlp_hvp", self.device, backend)
            # the cached products' kernel, chosen once: each product calls it without the op's Python checks
            self._cached_kernel = choose("mlp_hvp_flat_cached", self.device, backend)
        except (ValueError, TypeError, BackendUnavailableError) as error:
            raise type(error)(f"FusedMLPHessian: {error}") from None
        # Per-product arguments of the op, fixed at construction (the tensors are live views).
        chain = self._chain
        self._weights_changed()
        self._weight_offsets, self._bias_offsets = chain.offsets(self._param_offsets)
        self._activation_codes = activation_codes(chain.activations, "FusedMLPHessian")

    def _weights_changed(self) -> None:
        self._weights = [self._tensor(n) for n in self._chain.weight_names]
        self._biases = [self._tensor(n) for n in self._chain.bias_names]

    def _probe_forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super()._probe_forward(x, y)
        self._inputs(x)
        fused_labels(type(self).__name__, y)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch's inputs as the (N, features) matrix the first Linear reads."""
        x = self._chain.matrix(x)
        if x.dim() != 2:
            raise FusedDataError(
                f"FusedMLPHessian: inputs of shape {tuple(x.shape)} are not (N, features) (and the model does not "
                "start with nn.Flatten); use hessian_operator(..., path='generic')"
            )
        if x.dtype != self.dtype:
            raise ValueError(f"FusedMLPHessian: inputs are {x.dtype} but the parameters are {self.dtype}")
        return x

    def _state(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[torch.Tensor, list[torch.Tensor] | None], int]:
        """The batch's inputs and its fixed-weight state (None when every row is ignored), and the
        bytes they hold: the inputs' unless they are the caller's data (a DataLoader's batch, a copy
        moved to the device or made by the input's reshape is held by the entry alone)."""
        inputs, labels = self._inputs(x), fused_labels(type(self).__name__, y)
        own = 0 if self.data.is_callers(inputs) else inputs.untyped_storage().nbytes()
        if all_ignored(labels, self._ignore_index):
            return (inputs, None), own
        state = mlp_hvp_state(inputs, labels, self._weights, self._biases, self._chain.activations,
                              label_smoothing=self._label_smoothing, ignore_index=self._ignore_index,
                              backend=self.backend)
        return (inputs, state), own + sum(t.numel() * t.element_size() for t in state)

    def _gradient(self) -> torch.Tensor:
        """The gradient from each batch's state: d_l^T h_{l-1} for W_l and the row sums of d_l for b_l
        (the state also serves the products that usually follow at the same weights)."""
        num_layers = len(self._weights)

        def per_batch(entry: tuple[torch.Tensor, list[torch.Tensor] | None]) -> torch.Tensor:
            inputs, state = entry
            grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
            if state is None:  # every row ignored: the batch contributes zero
                return grad
            layer_inputs, grads = [inputs, *state[:num_layers - 1]], state[num_layers - 1:2 * num_layers - 1]
            for w, h, d, wo, bo in zip(self._weights, layer_inputs, grads, self._weight_offsets, self._bias_offsets):
                if wo >= 0:
                    grad[wo:wo + w.numel()] = (d.T @ h).reshape(-1)
                if bo >= 0:
                    grad[bo:bo + w.shape[0]] = d.sum(0)
            return grad
        return self.cached_mean(self._state, per_batch)

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        mean = RowMean()
        acts = self._chain.activations
        for entry, n, batch in self.cached_pass(self._state):
            out = None  # stays None for a batch whose rows are all ignored: it contributes zero
            if entry is None:  # beyond the cache's budget: the whole pass, keeping no state
                x, y = batch
                labels = fused_labels(type(self).__name__, y)
                if not all_ignored(labels, self._ignore_index):
                    out = mlp_hvp_flat(
                        self._inputs(x), labels, self._weights, self._biases, acts, matrix,
                        self._weight_offsets, self._bias_offsets, label_smoothing=self._label_smoothing,
                        ignore_index=self._ignore_index, backend=self.backend,
                    )
            elif entry[1] is not None:
                inputs, state = entry
                out = mlp_hvp_flat_cached_prechecked(
                    self._cached_kernel, inputs, state, self._weights, self._biases, self._activation_codes, matrix,
                    self._weight_offsets, self._bias_offsets)
            mean.add(torch.zeros_like(matrix) if out is None else out, n, owned=True)
        return mean.result()


class FusedMLPLoss:
    """The mean loss of a batch and its gradient w.r.t. the chosen parameters, for a model and loss that
    :func:`supports` accepts, by one compiled forward and backward
    (:func:`~unlearn_kernels.ops.mlp_value_grad_flat`: no autograd graph, the loss in float64 from the
    logits): :class:`~.objective.Objective`'s pass where it applies.

    Args:
        model, loss_fn: as accepted by :func:`supports` (checked by the caller).
        chosen: the chosen parameters by name, in the flat vector's order (each a Linear layer's weight or
            bias, as :func:`supports` checks).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, chosen: dict[str, torch.Tensor]) -> None:
        self._chain: _Chain = _parse_model(model)  # type: ignore[assignment]
        self._label_smoothing, self._ignore_index = parse_cross_entropy(loss_fn)  # type: ignore[misc]
        offsets, self._size = flat_offsets(chosen)
        self._weight_offsets, self._bias_offsets = self._chain.offsets(offsets)
        self._dtype = next(iter(chosen.values())).dtype
        self.num_classes: int = model.get_parameter(self._chain.weight_names[-1]).shape[0]
        #: every layer tensor the pass reads (the caller looks them up live, by name)
        self.layer_names: tuple[str, ...] = tuple(
            n for n in (*self._chain.weight_names, *self._chain.bias_names) if n is not None)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch as the op's (N, features) inputs and int64 labels, or None where the pass cannot
        take it (inputs of another shape or dtype, class-probability targets: the caller's autograd
        pass then does)."""
        x = self._chain.matrix(x)
        if x.dim() != 2 or x.dtype != self._dtype or not is_class_labels(y):
            return None
        return x, y.long()

    def ignores_none(self, labels: torch.Tensor) -> bool:
        """Whether no label is the loss's ``ignore_index`` (:func:`~.fused_common.none_ignored`): then the data
        may be passed in one call."""
        return none_ignored(labels, self._ignore_index)

    def __call__(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                 with_gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's mean loss (a float64 0-dim tensor; 0 where every row is ``ignore_index``, as the
        other paths add such a batch) and, with ``with_gradient``, its flat gradient. ``tensors``: the
        layer tensors by name (:attr:`layer_names`); ``x``, ``labels``: from :meth:`batch`. A loss that is
        not finite is returned as it is."""
        if all_ignored(labels, self._ignore_index):
            grad = torch.zeros(self._size, dtype=x.dtype, device=x.device) if with_gradient else None
            return torch.zeros((), dtype=torch.float64, device=x.device), grad
        value, grad = mlp_value_grad_flat(
            x, labels, [tensors[n] for n in self._chain.weight_names],
            [tensors[n] if n is not None else None for n in self._chain.bias_names], self._chain.activations,
            self._weight_offsets, self._bias_offsets, label_smoothing=self._label_smoothing,
            ignore_index=self._ignore_index, with_gradient=with_gradient, check_finite=False)
        return value, grad if with_gradient else None
