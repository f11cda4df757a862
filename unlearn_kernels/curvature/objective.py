"""The training objective of a model as a function of its chosen parameters: value and gradient."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ..checks import check_choice, check_not_meta, check_number, normalisation_buffers
from .batches import BatchSource, DataSpec, RowMean
from .fused_mlp import FusedMLPLoss, supports as fused_mlp_supports
from .settings import loss_settings, watched_state
from .probes import (
    refuse_modes,
    check_finite_weights,
    check_per_sample_forward,
    checked_loss,
    check_loss_labels,
    LossFn,
    probe_forward,
    refuse_parameter_writes,
)
from .params import (
    FunctionalForward,
    ParameterSlots,
    ParamSelection,
    flatten_tensors,
    gradient_on_leaves,
    resolve_curvature_parameters,
    same_weights,
    weights_key,
)


T = TypeVar("T")


def _without_buffer_writes(model: nn.Module, run: Callable[[], T]) -> T:
    """``run()`` (a pass of the caller's model), then ValueError if it wrote a buffer (in place, by a new
    tensor, or a buffer slot registered or filled): the objective runs the model itself, so its calls
    would change the caller's model. Every module's buffer slots are restored first, as they were (the
    same tensors, their values; a shared buffer and a slot holding None included). Costs one copy of the
    buffers per call."""
    slots = [(m, dict(m._buffers), set(m._non_persistent_buffers_set)) for m in model.modules()]
    tensors = {id(b): b for _, held, _ in slots for b in held.values() if b is not None}
    saved = {key: b.detach().clone() for key, b in tensors.items()}
    before = weights_key(tensors.values())
    out = run()
    moved = [m for m, held, _ in slots if m._buffers.keys() != held.keys()
             or any(m._buffers[k] is not b for k, b in held.items())]
    if not moved and same_weights(weights_key(tensors.values()), before):
        return out
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    written = [f"{names[id(m)]}.{k}".lstrip(".") for m, held, _ in slots for k in m._buffers.keys() | held.keys()
               if m in moved or (held.get(k) is not None and not torch.equal(held[k], saved[id(held[k])]))]
    with torch.no_grad():
        for m, held, persistent in slots:
            m._buffers.clear()
            m._buffers.update(held)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(persistent)
        for key, b in tensors.items():
            b.copy_(saved[key])
    raise ValueError(f"Objective: the model's forward writes its buffer {sorted(written)[0] if written else '?'!r} "
                     "in eval mode: every value and gradient would change the model (restored; such a model is "
                     "refused)")


class Objective:
    """``F(w) = L(w) + (weight_decay / 2) ||w||^2``, w the chosen parameters of ``model`` and
    ``L = sum_b (n_b / N) loss_fn(model(x_b), y_b)`` over the batches b of n_b rows (N in all), as the
    curvature operators weight them: the size-weighted mean of the per-batch losses, which is the mean
    loss over the data when ``loss_fn`` is a plain mean over rows (not with ``ignore_index`` rows or
    class weights, whose batch means have other denominators, nor with reduction="sum": then L
    depends on the batching). A batch whose rows are all ``ignore_index`` or of classes whose weight is 0
    adds zero (not its NaN mean), as in the curvature operators.

    Like the curvature operators it reads the model's parameters live: after an in-place update
    (:func:`~unlearn_kernels.curvature.set_flat_parameters`) :meth:`value` and :meth:`gradient`
    are those of the new weights. It never modifies the model. Each call is one pass over the data
    (:attr:`num_data_passes`). Building one checks tensor data for NaN or Inf (see
    :class:`~unlearn_kernels.curvature.BatchSource`, which also checks an iterable's batches as they
    stream) and runs the model and the loss on the first batch without a graph, so that data they
    reject is named at construction, as the curvature operators' probe names it (a later batch of
    another layout: when a call first reads it, naming the batch). A parameter the
    forward does not use has zero gradient.

    Where the fused Hessian path applies (an ``nn.Sequential`` MLP under cross entropy with a compiled
    kernel for its device, see :func:`~unlearn_kernels.curvature.fused_mlp.supports`) each batch's value
    and gradient come from one compiled forward and backward
    (:func:`~unlearn_kernels.ops.mlp_value_grad_flat`, the loss in float64 from the logits) instead of
    autograd: the same function, rounded differently (``path="generic"`` keeps autograd); a batch the
    kernel cannot take (another input shape or dtype, class-probability targets) goes through autograd.

    Non-finite weights are refused as the curvature operators refuse them, with their message (one
    rule, :func:`~unlearn_kernels.checks.first_nonfinite_weight`: NaN or Inf in a parameter, chosen
    or not, or a normalisation layer's running statistic; NaN in another buffer, which may hold Inf),
    at construction and at every call, before any data is read: a ValueError naming the tensor, where
    a NaN value or gradient came back before. The check is a float64 sum per tensor, read back at once.

    Args:
        model: any nn.Module, in eval mode if it has BatchNorm or dropout (BatchNorm with running
            statistics).
        loss_fn: ``loss_fn(model(x), y) -> scalar``, a mean-reduced loss.
        data: a LabeledData, an (x, y) pair of tensors, or a re-iterable of (x, y) batches.
        params: the chosen parameters (None: every trainable one), as in
            :func:`~unlearn_kernels.curvature.hessian_operator`.
        weight_decay: the L2 coefficient, >= 0.
        batch_size: split tensor data into chunks of this many rows (the same objective for a loss
            that is a plain mean over rows, see above). The compiled MLP pass on the CPU takes tensor data
            in one call whatever it is: it takes its rows in cache-sized blocks itself, in a memory that
            does not grow with them (unless a label is the loss's ignore_index).
        path: "auto" (the compiled MLP pass where it applies, see above; :attr:`path` says which runs)
            or "generic" (autograd always).

    Raises:
        ValueError: a bad ``weight_decay``, mixed dtypes or devices among the chosen parameters,
            train-mode BatchNorm/dropout or a BatchNorm without running statistics, a model or loss
            that gives two values on the first batch (randomness in a custom forward), data the model or
            the loss cannot run on (first batch; a wrong input dtype or width, a wrong label dtype or
            shape) or a class label out of range
            (any batch, where the loss raises IndexError) or non-finite weights (see above, at every
            call too), a forward that writes the model's buffers (which every call would then change;
            restored first) or data written in place after construction (at the next call), named
            ``"Objective: ..."``; a bad ``params``
            selection or NaN or Inf in the data, as :func:`~unlearn_kernels.curvature.hessian_operator`
            names them. An empty data set is refused at the first call.
        TypeError: ``loss_fn`` is not callable, or ``data`` or ``params`` is of a wrong type.

    Attributes:
        param_names: the chosen parameters' names, in vector order.
        path: "fused" where the next pass takes the compiled MLP pass (for each batch it can take), else "generic"
            (autograd): a model or loss changed since construction so that the pass no longer applies (a hook
            added, GELU's tanh approximation, class weights) goes through autograd, as it would have been built.
        num_data_passes: passes over the data so far (one per value, gradient or value_and_gradient).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None, *,
                 weight_decay: float = 0.0, batch_size: int | None = None, path: str = "auto") -> None:
        check_choice("Objective: path", path, ("auto", "generic"))
        if not callable(loss_fn):
            raise TypeError(f"Objective: loss_fn must be callable (outputs, targets) -> scalar, "
                            f"got {type(loss_fn).__name__}")
        chosen = resolve_curvature_parameters(model, params)
        check_not_meta("Objective", model)
        devices = {p.device for p in chosen.values()}
        if len({p.dtype for p in chosen.values()}) > 1 or len(devices) > 1:
            raise ValueError("Objective: the chosen parameters mix dtypes or devices; choose parameters that share one "
                             "dtype and device")
        self._device = next(iter(devices))
        refuse_modes("Objective", self._device, "be built")  # its probes differentiate the loss
        self.model = model
        self.loss_fn = loss_fn
        self.param_names: tuple[str, ...] = tuple(chosen)
        self._fused = (FusedMLPLoss(model, loss_fn, chosen)
                       if path == "auto" and fused_mlp_supports(model, loss_fn, chosen) is None else None)
        # what the fused pass was chosen on: after a change of it, supports() decides again (see _fused_pass)
        self._fused_setup = None if self._fused is None else self._setup()
        self._fused_applies = self._fused is not None
        layers = () if self._fused is None else tuple(n for n in self._fused.layer_names if n not in chosen)
        # read at every call: replaced parameters are followed (the fused pass reads every layer's tensors)
        self._slots = ParameterSlots(model, (*chosen, *layers))
        self._functional = FunctionalForward(model)
        self.weight_decay = check_number("Objective: weight_decay", weight_decay, 0.0)
        self._statistics = normalisation_buffers(model)
        self._check_weights()
        check_per_sample_forward(model, "Objective")  # and a train-mode forward would write running stats
        self.data = BatchSource(data, self._device, batch_size)
        first = next(iter(self.data), None)  # an empty shard is allowed (DistributedObjective builds one)
        self._dtype = next(iter(chosen.values())).dtype
        # The compiled pass on the CPU takes its rows in cache-sized blocks itself (csrc/mlp_hvp.cpp), in a memory
        # that does not grow with them: tensor data goes to it in one call, not in batch_size chunks, which added a
        # call each (a pass over 28,888 rows in chunks of 2,048: 9-14% slower). Not where the pass cannot take the
        # data's batches (class-probability targets, say: autograd then takes them in chunks), nor where a label is
        # ignore_index (the chunks' means would then have other denominators: another function).
        whole = (next(self.data.whole(), None) if self._fused is not None and self._device.type == "cpu"
                 and self.data.tensor_data else None)
        self._fused_whole = (whole is not None and first is not None and self._fused.batch(*first) is not None
                             and self._fused.ignores_none(whole[1]))
        if first is not None:
            _without_buffer_writes(model, lambda: self.data.run_watching(self._probe, *first))
            self.data.watch_layouts(first, self._probe)
            _without_buffer_writes(model, lambda: self._refuse_random_values(*first))
        self.num_data_passes = 0

    def _probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The model and the loss on one batch (:func:`probe_forward`), on copies of the parameters made
        for the call: a forward that writes them (``nn.Embedding(max_norm=...)``) wrote the caller's model
        here, which the Objective never changes; refused, as by the curvature operators."""
        copies = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        probe_forward(functools.partial(self._functional, copies), self.loss_fn, x, y, self._dtype, owner="Objective")
        refuse_parameter_writes("Objective", copies)

    def _refuse_random_values(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """ValueError if two values of the loss on one batch differ: randomness that the check of the
        modules' training mode cannot see (``F.dropout(x, training=True)`` in a custom forward) made
        every value and gradient another draw (the curvature operators refuse it by comparing two
        gradients). Each run gets its own copy of the batch: a model may write its inputs (not its
        parameters: :meth:`_probe`, which runs first, refused that)."""
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        with torch.no_grad():
            first, second = (self._loss(self._functional(params, x.clone()), y.clone()).double() for _ in range(2))
        tol = max(1e-12, 16 * torch.finfo(self._dtype).eps)
        if torch.isfinite(first) and not abs(float(first - second)) <= tol * max(abs(float(first)), abs(float(second))):
            raise ValueError(f"Objective: two loss evaluations on the same batch differ ({float(first):.10g} and "
                             f"{float(second):.10g}): the model or loss is random (dropout, noise) or keeps state "
                             "between calls; call model.eval() and remove the randomness")

    @property
    def path(self) -> str:
        """"fused" where the next pass takes the compiled MLP pass (for each batch it can take), else "generic"."""
        return "generic" if self._fused_pass() is None else "fused"

    def _setup(self) -> tuple:
        """The modules' settings and calls and the loss's settings (what :func:`~.fused_mlp.supports` and the
        fused pass read: a hook, GELU's approximation, the loss's label smoothing or ignore_index)."""
        plain, buffers = loss_settings(self.loss_fn)
        return watched_state(self.model), plain, buffers

    def _fused_pass(self) -> FusedMLPLoss | None:
        """The compiled pass while the setup it was chosen on holds; after a change (a hook added, a loss
        setting changed) :func:`~.fused_mlp.supports` decides again, and where it refuses, autograd runs: the
        objective follows the model and the loss as autograd would."""
        if self._fused is None:
            return None
        state, plain, buffers = self._setup()
        seen_state, seen_plain, seen_buffers = self._fused_setup
        if state != seen_state or plain != seen_plain or not same_weights(buffers, seen_buffers):
            tensors = self._slots.current()
            self._fused_applies = fused_mlp_supports(self.model, self.loss_fn, self.param_names) is None
            if self._fused_applies:  # the loss's label smoothing and ignore_index read again
                self._fused = FusedMLPLoss(self.model, self.loss_fn, {n: tensors[n] for n in self.param_names})
            self._fused_setup = (state, plain, buffers)
        return self._fused if self._fused_applies else None

    def weights(self) -> torch.Tensor:
        """A flat copy of the chosen parameters (their dtype and device)."""
        with torch.no_grad():
            tensors = self._slots.current()
            return flatten_tensors(tensors[name].detach() for name in self.param_names)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return checked_loss(self.loss_fn, out, y, "Objective")

    def _check_weights(self) -> None:
        """ValueError naming the first parameter or buffer (of the whole model: all feed the forward)
        that the curvature operators would refuse, from the float64 sums of their weights key."""
        parameters, buffers = list(self.model.named_parameters()), list(self.model.named_buffers())
        sums = [entry[2] for entry in weights_key([t for _, t in parameters + buffers])]
        check_finite_weights("Objective", "objective", parameters, buffers, self._statistics, sums)

    def _pass(self, with_gradient: bool) -> tuple[float, torch.Tensor | None]:
        # the value alone may be taken inside inference mode
        refuse_modes("Objective", self._device, "take a gradient" if with_gradient else None)
        # a module put in training mode since construction: random values, or running statistics the
        # value's forward would write into the caller's model
        check_per_sample_forward(self.model, "Objective")
        self._check_weights()
        self.data.check_unchanged("Objective")
        # a forward may write a buffer on some batches only (the construction probe ran the first)
        return _without_buffer_writes(self.model, lambda: self._accumulate(with_gradient))

    def _accumulate(self, with_gradient: bool) -> tuple[float, torch.Tensor | None]:
        total = RowMean()  # of the batches' float64 values
        grad = RowMean() if with_gradient else None
        tensors = self._slots.current()
        params = {name: tensors[name] for name in self.param_names}
        fused_pass = self._fused_pass()
        for x, y in self.data.whole() if fused_pass is not None and self._fused_whole else self.data:
            n = y.shape[0]
            fused = None if fused_pass is None else fused_pass.batch(x, y)
            if fused is not None:
                try:
                    loss, part = fused_pass(tensors, *fused, with_gradient)
                except ValueError:  # a label out of range, named as the autograd pass names it
                    check_loss_labels(self.loss_fn, x.new_empty(0, fused_pass.num_classes), y, "Objective")
                    raise
                if with_gradient:
                    grad.add(part, n, owned=True)
            elif with_gradient:
                _, parts, loss = gradient_on_leaves(lambda leaves: self._loss(self._functional(leaves, x), y), params)
                grad.add(flatten_tensors(parts), n)
            else:
                with torch.no_grad():
                    loss = self._loss(self.model(x), y)
            # a batch whose mean has no row (every label ignore_index or of class weight 0) gives 0 (checked_loss)
            total.add(loss.detach().double().cpu(), n, owned=True)
        if total.rows == 0:
            raise ValueError("Objective: data is empty: it yields no samples")
        self.num_data_passes += 1
        value = float(total.result())
        w = flatten_tensors(p.detach() for p in params.values()) if self.weight_decay else None
        if w is not None:
            value += 0.5 * self.weight_decay * float(w.double().square().sum())
        if grad is None:
            return value, None
        gradient = grad.result()
        return value, gradient if w is None else gradient.add_(w, alpha=self.weight_decay)

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
