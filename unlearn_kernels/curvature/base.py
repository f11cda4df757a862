"""The curvature-operator interface every Hessian/GGN implementation speaks.

A :class:`CurvatureOperator` is a symmetric d x d matrix C (the Hessian or the generalised Gauss-Newton
matrix of the mean loss over a data set, w.r.t. d chosen parameters) that is only ever applied to
vectors. With data in batches b of sizes n_b (N = sum n_b) and ``loss_fn`` a *mean-reduced* loss
(``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ...):

    L(w) = sum_b (n_b / N) loss_fn(model(x_b; w), y_b),       C = d^2 L / dw^2   (or its GGN)

the size-weighted mean of the per-batch losses. When ``loss_fn`` is a plain mean over the rows, L is
the mean loss over the data, so splitting the same data into different batches gives the same
operator (for models without batch coupling, which is why BatchNorm must be in eval mode and keep
running statistics). L is not that mean, and depends on the batching, when a batch's mean has another
denominator (rows with cross entropy's ``ignore_index``, left out of its mean; class weights) or the
loss is not a mean (reduction="sum"). A batch whose rows are all ``ignore_index`` or of classes whose
weight is 0 (its mean is 0/0) and a batch with no rows contribute zero on every path.

Writing a new operator (e.g. a fused kernel path): subclass, call ``super().__init__`` (it resolves
the parameters, wraps the data, rejects train-mode BatchNorm/dropout and BatchNorm without running
statistics, and runs the determinism probe), set the class attribute ``path`` and implement
:meth:`CurvatureOperator._matmat`; override ``_matvec`` and ``_gradient`` only for speed. Each
``_matmat``/``_matvec``/``_gradient`` call must do exactly one pass over the batches
(:meth:`CurvatureOperator.cached_pass` or :attr:`CurvatureOperator.data`); the public methods
validate the input, bring the fixed-weight cache up to date, detach the vectors going in and the
products coming out (no product is attached to a caller's graph) and update the counters. Helpers for
subclasses: :meth:`~CurvatureOperator.batch_forward`, :meth:`~CurvatureOperator.batch_loss`,
:meth:`~CurvatureOperator.loss_gradient`,
:meth:`~CurvatureOperator.flatten`, :meth:`~CurvatureOperator.unflatten`,
:meth:`~CurvatureOperator.unflatten_columns`.

Fixed weights. Solvers make tens of products at the same weights, so an operator may keep per batch
what does not depend on the vector (activations, a gradient graph), within ``cache_bytes``: a pass
through :meth:`CurvatureOperator.cached_pass` takes cached entries for the first batches and builds
(and keeps, while the budget allows) the others; batches beyond the budget are streamed as before.
The cache is dropped when a parameter or buffer changes: in-place updates (``optimizer.step()``,
``set_flat_parameters``, ``p.add_``) bump the tensors' version counters, ``p.data = ...`` moves
their data pointers, and writes that do neither (fused optimizer kernels, in-place writes through
``p.data``) change the sum of the values, or, where values only moved (units permuted through
``p.data``), a position checksum (values weighted by fixed, distinct weights;
:func:`~unlearn_kernels.ops.weights_fingerprint`); all are checked before every product (one pass over the
parameters and buffers, small beside a product over a batch), or, inside a :meth:`CurvatureOperator.fixed_weights`
run (a solver's iteration), at its two ends. Only a write that keeps every parameter's
version, pointer, sum and checksum would go unseen: call :meth:`CurvatureOperator.invalidate` after such a
one. (A buffer that
holds Inf, allowed below, has an infinite sum, or a NaN one if it holds +Inf and -Inf, whatever its
finite entries are: only its version and pointer follow it, and a
NaN sum that was NaN before counts as unchanged.) A change of the module tree itself (a submodule
replaced, appended or removed, a parameter or buffer registered or deleted) is refused at the next
call (:class:`~unlearn_kernels.curvature.params.ModelChanged`), as is a module put in training mode.
Tensor data written in place or replaced after construction is refused at the next call too (a
ValueError; the tensors' version counters, data pointers and the integer sums of their values' bits, which
a write that only moves values keeps: build a new operator after swapping columns in place): the caches and
checks are of the data given. Watched: an (x, y) pair or a LabeledData, a list or tuple of
tensor batches (their tensors, and which there are), a DataLoader over a TensorDataset (its tensors);
not other iterables.
A model that writes its own inputs in place (``ReLU(inplace=True)`` first) is given copies of the
batches, so no pass writes the caller's data.
The settings the products are computed under are taken at construction too: every module's training
flag, hooks and instance ``forward``, torch.nn's modules' settings as their ``extra_repr`` shows them (a
layer's ``eps``, a dropout's ``p``) and as their public plain attributes hold them (numbers, strings,
flags, tuples of them, plain functions: a TransformerEncoderLayer's ``norm_first`` or a
MultiheadAttention's ``batch_first``, which their empty ``extra_repr`` does not show), and the loss's
(torch.nn's losses' ``label_smoothing``, ``ignore_index``; the loss module's parameters and buffers, a
class ``weight`` or a learnable temperature, by their version counters, pointers, sums and checksums: the
operators differentiate the model's weights only): the fused paths read them once and the cached graphs
hold them, so a change of any is refused at the next call (a ValueError), before a kept graph is reused:
build a new operator after changing one.
(The plain settings of a module or loss of your own are not seen: its ``extra_repr`` may show its weights'
values, which the weights' checks follow, and its attributes may count its calls; nor are global module
hooks, which observers such as ``FlopCounterMode`` register around a product.)

Non-finite weights. The same float64 sums refuse them, at construction and at the first product,
matmat or gradient after a change (a ValueError naming the tensor, never a NaN product): a NaN or Inf
entry makes its tensor's sum non-finite, and only then are the entries themselves looked at (finite
float64 values could overflow the sum; float32 ones cannot: 2**128 times any possible number of
entries is far below float64's 2**1024). At unchanged weights this costs nothing. Parameters
(chosen or not: all feed the forward) and a normalisation layer's running statistics (BatchNorm's
``running_mean`` / ``running_var``, where a NaN or Inf makes the outputs NaN or a channel constant)
must be finite; other buffers must hold no NaN but may hold Inf (an additive ``-inf`` attention mask
is a common, harmless buffer). The rule is :func:`~unlearn_kernels.checks.first_nonfinite_weight`,
which :class:`~unlearn_kernels.curvature.Objective` and the methods' checks of the model apply too.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import scipy.sparse.linalg
import torch
from torch import nn

from ..checks import (
    all_finite,
    check_int,
    check_not_meta,
    check_tensor,
    is_out_of_memory,
    normalisation_buffers,
)
from .linear_operator import dense_by_products, to_scipy_operator
from .batches import Batch, BatchSource, DataSpec, RowMean, different_passes
from .params import (
    FunctionalForward,
    ParameterSlots,
    ParamSelection,
    WeightsKey,
    flat_offsets,
    flatten_tensors,
    gradient_on_leaves,
    resolve_curvature_parameters,
    same_weights,
    unflatten_vector,
    version_counter,
    weights_key,
)
from .probes import (
    LossFn,
    refuse_modes,
    check_finite_weights,
    check_per_sample_forward,
    checked_loss,
    differentiable_attention,
    every_row_ignored,
    has_attention,
    probe_forward,
    refuse_parameter_writes,
)
from .settings import (
    full_backward_hooked_module,
    loss_settings,
    module_settings,
    settings_change,
    watched_state,
)

Entry = Any
"""What a subclass caches for one batch (see :meth:`CurvatureOperator.cached_pass`)."""

DEFAULT_CACHE_BYTES = 2**30
"""The default memory budget (bytes) of an operator's fixed-weight cache: 1 GiB."""
PROBE_GRADIENTS = 2
"""The gradients every operator's construction takes on its probe batch (its determinism check), counted in
``num_gradients``."""


class CurvatureOperator(abc.ABC):
    """A symmetric d x d curvature matrix (Hessian or GGN of the mean loss over data) as a linear operator.

    Vectors are flat over the chosen parameters (layout: :func:`~unlearn_kernels.curvature.params.
    resolve_parameters`), with the parameters' dtype and device (float64 is supported throughout).
    The model is never modified (it is as it was after every call; not thread-safe: see
    :func:`~unlearn_kernels.curvature.hessian_operator`): parameters are read (live: in-place updates to
    the model are seen by later products, and so are parameters replaced by tensors of the same shape,
    dtype and device;
    a parameter replaced by one of another shape, dtype or device needs a new operator), buffers are copied
    at construction and again after they change (followed as the parameters are, e.g. through
    ``load_state_dict``), and the forward runs through ``torch.func.functional_call``.

    Construction probes the first batch (its derivatives on the first batch with a row the loss does
    not ignore: two gradient evaluations and, in subclasses, one or two products; counted in
    ``num_gradients`` and ``num_products`` as if they were full ones) and raises ValueError for
    train-mode BatchNorm/dropout or a BatchNorm without running statistics (see
    :func:`check_per_sample_forward`), for data that changes between passes, for data the
    model or the loss cannot run on ("the model cannot run on the data: ...", "the loss rejects the
    targets y ...": a wrong dtype, input width or label shape), for a gradient that is not
    reproducible, and for a full backward hook or backward pre-hook of a module of the model or the
    loss (torch.func cannot run through one). The probes' gradients and :meth:`gradient` are plain
    ``torch.autograd`` (on detached leaves), which runs where torch.func cannot (a packed sequence
    through an RNN). NaN or Inf in the data is a ValueError naming the row (see :class:`BatchSource`:
    tensor data is checked in full at construction, an iterable's batches as each pass reads them).
    NaN or Inf in a parameter, or in a BatchNorm running statistic, and NaN in another buffer, is a
    ValueError naming it (``"GenericHessian: parameter 'fc.weight' has NaN or Inf values ..."``),
    raised at construction and by the first ``matvec``, ``matmat`` or ``gradient`` after the weights
    changed (see the module docstring). A class label out of range (where the loss raises IndexError,
    as cross entropy does on the CPU) is a ValueError naming it. A later batch of a new layout (the
    inputs' and targets' shapes past the rows, their dtypes) gets the same checks when a pass first
    reads it, and fails with a ValueError naming the batch and the first batch's shapes (see
    :class:`BatchSource`). Parameters the model's forward does not use get zero gradient and zero
    Hessian rows and columns; a tied parameter (one tensor in two modules, or a module called at two
    places) is one parameter, as in autograd.

    Attributes:
        shape: (d, d).
        dtype, device: those of the chosen parameters; vectors must match them.
        path: which implementation this is ("generic", "ggn", "fused").
        path_reason: set by ``hessian_operator(path="auto")`` when it fell back to "generic": why the
            fused path was not used (None otherwise).
        num_products: matrix-vector products so far (a matmat of K vectors counts K), construction
            probes included.
        num_gradients: gradients so far (``gradient()`` calls and the two construction probes).
        num_data_passes: passes over the batches so far (one per matvec, matmat or gradient call;
            cached batches count as passed).
        cache_bytes: the fixed-weight cache's budget in bytes (0: no cache).
        cached_batches, cached_bytes: what the cache holds now (batches, estimated bytes).
        param_names: the chosen parameters' names, in vector order.
        data: the :class:`BatchSource` (iterate it for one pass of (x, y) batches on ``device``).
    """

    path: str = "abstract"
    path_reason: str | None = None

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: DataSpec,
        params: ParamSelection = None,
        *,
        batch_size: int | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        """See :func:`~unlearn_kernels.curvature.hessian_operator` for the arguments."""
        chosen = resolve_curvature_parameters(model, params)
        check_not_meta(type(self).__name__, model)
        if cache_bytes is None:
            cache_bytes = DEFAULT_CACHE_BYTES
        cache_bytes = check_int("cache_bytes", cache_bytes, low=0)  # 0 turns the cache off
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        dtypes = {p.dtype for p in chosen.values()}
        devices = {p.device for p in chosen.values()}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"the chosen parameters mix dtypes {sorted(map(str, dtypes))} / devices "
                f"{sorted(map(str, devices))}; choose parameters that share one dtype and device"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.param_names: tuple[str, ...] = tuple(chosen)
        self.dtype: torch.dtype = dtypes.pop()
        self.device: torch.device = devices.pop()
        refuse_modes(type(self).__name__, self.device, "be built")  # its probes differentiate the loss
        self._shapes = [p.shape for p in chosen.values()]
        # Where each chosen parameter starts in the flat (d,) vector (row-major, in param_names order).
        self._param_offsets, d = flat_offsets(chosen)
        self.shape: tuple[int, int] = (d, d)
        # Detached views of the chosen parameters (no copy); the rest of the state is passed as
        # constants: other parameters detached, buffers cloned so no forward can write to the model.
        # The parameters themselves are kept to see changes (_sync_weights).
        self._live = {name: p for name, p in model.named_parameters()}
        self._live_buffers = dict(model.named_buffers())
        self._slots = ParameterSlots(model, self._live, buffer_names=self._live_buffers)
        self.params: dict[str, torch.Tensor] = {name: p.detach() for name, p in chosen.items()}
        self._constants: dict[str, torch.Tensor] = {
            name: p.detach() for name, p in model.named_parameters() if name not in chosen
        }
        # the buffers held to finiteness as the parameters are (the others to no NaN: see the module docstring)
        self._statistics = normalisation_buffers(model)
        self._copy_buffers()
        self._functional = FunctionalForward(model)
        self._attention = has_attention(model)
        self.num_products = 0
        self.num_gradients = 0
        self.num_data_passes = 0
        self.cache_bytes = cache_bytes
        self._drop_cache()
        self._weights_key = self._current_weights_key()
        self._check_finite_weights(self._weights_key)
        check_per_sample_forward(model)
        self._modules, self._loss_settings = module_settings(model), loss_settings(loss_fn)
        self.data = BatchSource(data, self.device, batch_size)
        self._probe_determinism()
        self._tree_seen = watched_state(model)  # what the checks of the module tree passed on (_sync_weights)
        self._fixed_depth = 0  # open fixed_weights() runs: their products skip _sync_weights
        self._run_key: WeightsKey | None = None  # the weights the outermost fixed_weights() run started at

    # ------------------------------------------------------------------ helpers for subclasses
    def _tensor(self, name: str | None) -> torch.Tensor | None:
        """A parameter or buffer by name (detached; a chosen parameter live), or None for None."""
        if name is None:
            return None
        return self.params[name] if name in self.params else self._constants[name]

    def batch_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` with the chosen parameters replaced by ``params`` (attention by
        differentiable ops, :func:`~unlearn_kernels.curvature.probes.differentiable_attention`)."""
        if self._attention:
            with differentiable_attention():
                return self._functional({**self._constants, **params}, x)
        return self._functional({**self._constants, **params}, x)

    def batch_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss_fn(model(x), y)`` as a function of ``params`` (a scalar, checked)."""
        return self._loss(self.batch_forward(params, x), y)

    def loss_gradient(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
        constants: dict[str, torch.Tensor] | None = None, create_graph: bool = False,
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """The gradient of :meth:`batch_loss` w.r.t. ``params`` (``constants`` in place of the operator's
        own where given), by torch.autograd on detached leaves of ``params``: ``(leaves, gradient)``, one
        entry each per parameter, in ``params``' order; with ``create_graph`` the gradient keeps its graph
        for a double backward (see :func:`~unlearn_kernels.curvature.params.gradient_on_leaves`)."""
        leaves, grads, _ = gradient_on_leaves(lambda chosen: self.batch_loss({**(constants or {}), **chosen}, x, y),
                                              params, create_graph)
        return leaves, grads

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss_fn(out, y)``, checked (see :func:`checked_loss`)."""
        return checked_loss(self.loss_fn, out, y)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A ``{name: tensor}`` dict over the chosen parameters as a flat (d,) vector."""
        return flatten_tensors(tensors[name] for name in self.param_names)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat (d,) vector as ``{name: view shaped like the parameter}``."""
        return dict(zip(self.param_names, unflatten_vector(vector, self._shapes)))

    def unflatten_columns(self, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (d, K) matrix as ``{name: (K, *param.shape) tensor}`` (column k becomes entry k)."""
        # One copy to (K, d): each entry k is then a contiguous tensor (views of the (d, K) layout are
        # strided by K, which made the elementwise ops of a generic matmat 1.5-4x slower per tangent).
        rows = torch.split(matrix.T.contiguous(), [int(math.prod(s)) for s in self._shapes], dim=1)
        return {name: r.reshape(matrix.shape[1], *s) for name, r, s in zip(self.param_names, rows, self._shapes)}

    def flatten_columns(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unflatten_columns`: ``{name: (K, *shape)}`` to a (d, K) matrix."""
        k = tensors[self.param_names[0]].shape[0]
        return torch.cat([tensors[name].reshape(k, -1) for name in self.param_names], dim=1).T

    # ------------------------------------------------------------------ fixed-weight cache
    @property
    def cached_batches(self) -> int:
        """How many batches the fixed-weight cache holds."""
        return len(self._cache)

    def invalidate(self) -> None:
        """Take the weights again as after a detected change: the fixed-weight cache is dropped (the next
        product rebuilds it), the copies of the buffers (BatchNorm statistics, masks) are made again,
        and so are a fused path's own copies of the weights; non-finite weights are refused as at
        every change. Needed only after a write that keeps every parameter's and buffer's version
        counter, data pointer, sum of values and position checksum (see the module docstring)."""
        key = self._current_weights_key()
        self._weights_key = None  # not taken until this succeeds: a refusal here is repeated at the next call
        self._take_weights(key)

    def _drop_cache(self) -> None:
        self._cache: list[tuple[Entry, int]] = []  # (entry, rows) of the first cached_batches batches
        self.cached_bytes = 0
        self._cache_complete = False  # every batch is cached
        self._cache_closed = self.cache_bytes == 0  # the budget is reached: later batches are streamed

    def _copy_buffers(self) -> None:
        # copies, so that no forward can write to the model's buffers
        self._constants.update({name: b.detach().clone() for name, b in self._live_buffers.items()})

    def _current_weights_key(self) -> WeightsKey:
        self._follow_slots()
        return self._held_weights_key()

    def _follow_slots(self) -> None:
        # a parameter or buffer object replaced in the model is followed (its data pointer differs)
        live = self._slots.current()
        self._live = {name: live[name] for name in self._live}
        self._live_buffers = {name: live[name] for name in self._live_buffers}

    def _held_weights_key(self) -> WeightsKey:
        return weights_key([*self._live.values(), *self._live_buffers.values()])

    def _sync_weights(self) -> None:
        """Before each product: if a parameter or buffer changed (version counter, data pointer or the sum
        of its values), drop the cache, re-take the views of parameters whose data was replaced and copy
        the buffers again (``load_state_dict`` writes both in place). A module put in training mode
        since (dropout: random products; BatchNorm: batch statistics) is refused as at construction. The
        checks of the module tree (training modes, parameter slots, modules' settings) run only where one
        look at it (:func:`watched_state`, ~5 us a module) differs from the last one they passed: they cost
        ~40 us, where all that runs before a digits-MLP product over its 1,797 rows takes ~75 us (the
        product ~1.5 ms)."""
        # the generic and GGN paths differentiate (a graph built in inference mode has no derivatives)
        refuse_modes(type(self).__name__, self.device, "take products or gradients")
        state = watched_state(self.model)
        tree_may_differ = state != self._tree_seen  # else the checks of the module tree would pass as before
        if tree_may_differ:
            check_per_sample_forward(self.model)
        self.data.check_unchanged(type(self).__name__)
        if tree_may_differ:
            self._follow_slots()  # the module tree first (ModelChanged)
            self._check_modules()
        self._check_loss()
        self._tree_seen = state
        key = self._held_weights_key()
        if not same_weights(key, self._weights_key):
            self._take_weights(key)

    def _check_modules(self) -> None:
        """ValueError where a module's training flag or settings (:func:`module_settings`) changed since
        construction: the fused paths read them once and the cached graphs hold them, so later products
        would mix old and new."""
        owner = type(self).__name__
        for (name, module, training, settings, calls), (_, _, was_training, was_settings, was_calls) in zip(
                module_settings(self.model), self._modules):
            if (training, settings, calls) != (was_training, was_settings, was_calls):
                change = (f"put in {'training' if training else 'eval'} mode" if training != was_training
                          else f"given other settings {settings_change(was_settings, settings)}"
                          if settings != was_settings
                          else "given a hook or its own forward, or had one removed")
                raise ValueError(f"{owner}: module {name or '(the model)'!r} ({type(module).__name__}) was {change} "
                                 "after the operator was built on it, whose caches hold what was computed before: "
                                 "build a new one on the model as it is now")

    def _check_loss(self) -> None:
        """ValueError where the loss module's settings (:func:`loss_settings`) changed since construction
        (see :meth:`_check_modules`)."""
        owner = type(self).__name__
        plain, tensors = loss_settings(self.loss_fn)
        if plain != self._loss_settings[0] or not same_weights(tensors, self._loss_settings[1]):
            raise ValueError(f"{owner}: the loss's settings (label_smoothing, ignore_index, a class weight or another "
                             "of its parameters or buffers, its mode, its hooks) changed after the operator was built "
                             "with it, whose caches hold what was computed before: build a new one")

    def _take_weights(self, key: WeightsKey) -> None:
        """After a change of the weights (``key``: :meth:`_current_weights_key`): views of the parameters
        (one whose data was replaced has a new one; ParameterSlots refuses another layout), copies of the
        buffers, no cache, and the subclass's own copies (:meth:`_weights_changed`)."""
        # before anything is taken from the new weights; the old key stays, so the next call checks again
        self._check_finite_weights(key)
        for name, p in self._live.items():
            (self.params if name in self.params else self._constants)[name] = p.detach()
        self._copy_buffers()
        self._weights_key = key
        self._drop_cache()
        self._weights_changed()

    def _check_finite_weights(self, key: WeightsKey) -> None:
        """ValueError naming the first parameter or buffer the module docstring refuses, read from the
        float64 sums in ``key`` (that of ``_current_weights_key``)."""
        check_finite_weights(type(self).__name__, "curvature", self._live.items(), self._live_buffers.items(),
                             self._statistics, (entry[2] for entry in key))

    def _weights_changed(self) -> None:
        """Hook for subclasses that keep references to parameter views: called after a change."""

    def cached_mean(self, prepare: Callable[[torch.Tensor, torch.Tensor], tuple[Entry, int]],
                    per_batch: Callable[[Entry], torch.Tensor]) -> torch.Tensor:
        """The mean over all rows of ``per_batch(entry)`` (batches weighted by their rows), the entries
        from :meth:`cached_pass` (``prepare`` builds those of streamed batches too). ``per_batch`` returns a new
        tensor, which the mean may keep as its running total (no copy: 37 ms of a ResNet-18 product)."""
        mean = RowMean()
        for entry, rows, batch in self.cached_pass(prepare):
            if entry is None:  # beyond the cache's budget: built for this pass only
                entry = prepare(*batch)[0]
            mean.add(per_batch(entry), rows, owned=True)
        return mean.result()

    def cached_pass(
        self, prepare: Callable[[torch.Tensor, torch.Tensor], tuple[Entry, int]],
    ) -> Iterator[tuple[Entry | None, int, Batch | None]]:
        """One pass over the batches as ``(entry, rows, batch)``.

        The first batches come from the cache (``batch`` is None); for the others ``prepare(x, y)``
        returns ``(entry, nbytes)`` and the entry is kept while the cache stays within
        ``cache_bytes`` (it must stay valid while the weights do not change). Once the budget is
        reached, later batches come as ``(None, rows, (x, y))``, for the caller to stream. When every
        batch is cached the data is not read at all.
        """
        if self._cache_complete:
            for entry, rows in self._cache:
                yield entry, rows, None
            return
        index = -1
        for index, (x, y) in enumerate(self.data):
            if index < len(self._cache):
                yield self._cache[index][0], self._cache[index][1], None
            elif self._cache_closed:
                yield None, y.shape[0], (x, y)
            else:
                entry, nbytes = prepare(x, y)
                if self.cached_bytes + nbytes <= self.cache_bytes:
                    self._cache.append((entry, y.shape[0]))
                    self.cached_bytes += nbytes
                else:
                    self._cache_closed = True
                yield entry, y.shape[0], (x, y)
        self._cache_complete = not self._cache_closed and index + 1 == len(self._cache)

    # ------------------------------------------------------------------ to implement
    @abc.abstractmethod
    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """C @ matrix for a validated (d, K) matrix, in one pass over the data."""

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """C @ vector for a validated (d,) vector, in one pass over the data."""
        return self._matmat(vector.unsqueeze(1)).squeeze(1)

    def _gradient(self) -> torch.Tensor:
        """Gradient of the mean loss, in one pass over the data (:meth:`loss_gradient` per batch)."""
        mean = RowMean()
        for x, y in self.data:
            mean.add(flatten_tensors(self.loss_gradient(self.params, x, y)[1]), y.shape[0])
        return mean.result()

    # ------------------------------------------------------------------ public interface
    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[CurvatureOperator]:
        """A run of products and gradients at unchanging weights (a solver's Lanczos or Krylov iteration):
        the checks that each call makes of the weights, the data and the module tree
        (:meth:`_sync_weights`: about 75 us on the digits MLP over its 1,797 rows, where the product itself
        takes 1.5 ms) run when the run starts and once more when it ends,
        not before every call (the refusal of autocast, inference mode and cached parametrizations still runs
        at every call). Whatever changed inside the run is refused at its end, as the next call would have
        refused it (a ValueError; the weights too, which between runs are simply taken again): the run's
        products may mix two models. Runs may nest (the outermost one checks). The solvers open one around each
        iteration; a caller need not."""
        outermost = self._fixed_depth == 0
        if outermost:
            self._sync_weights()
            self._run_key = self._weights_key
        self._fixed_depth += 1
        try:
            yield self
        finally:
            self._fixed_depth -= 1
        if outermost:
            self._sync_weights()
            self._refuse_a_change_in_the_run()

    def _refuse_a_change_in_the_run(self) -> None:
        """ValueError where the weights taken last (:meth:`_sync_weights`) are not those the outermost
        :meth:`fixed_weights` run started at."""
        if not same_weights(self._weights_key, self._run_key):
            raise ValueError(f"{type(self).__name__}: the weights changed during a run of products at fixed "
                             "weights (a solver's iteration), whose products may mix the two models: change "
                             "the weights between solves, not during one")

    def _sync_unless_fixed(self) -> None:
        if not self._fixed_depth:
            self._sync_weights()
        else:  # a mode entered inside the run (autocast, inference mode) would be gone by its end: every call
            refuse_modes(type(self).__name__, self.device, "take products or gradients")

    def _explained(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``; inside a :meth:`fixed_weights` run, an error it raises is first explained by the checks
        the run skips, which raise their own ValueError naming the cause: data written in place reaches the
        generic path's kept graphs as torch's "modified by an inplace operation", a NaN weight the GGN's loss
        Hessian as a NaN tangent; weights written in place reach a kept graph the same way, and are refused as
        at the run's end."""
        try:
            return compute()
        except (RuntimeError, ValueError):
            if self._fixed_depth:
                self._sync_weights()
                self._refuse_a_change_in_the_run()
            raise

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C @ v for a flat (d,) vector of the operator's dtype and device; returns a new (d,) tensor, not
        attached to any graph (neither ``v``'s, where it requires grad, nor a loss parameter's).

        The product of a finite ``v`` is not checked for overflow: on the generic path it may hold Inf or NaN
        where the computation leaves the dtype's range (float16 with entries of ~1e4, float32 near 1e37), as
        any torch computation would (the fused kernels refuse such an intermediate by name). The solvers
        check every product and tell the vector's overflow from the operator's
        (:class:`~unlearn_kernels.solvers.NonFiniteProduct`)."""
        self._check_input(v, ndim=1)
        self._sync_unless_fixed()
        out = self._explained(lambda: self._matvec(v.detach())).detach()  # see matmat
        self.num_products += 1
        self.num_data_passes += 1
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """C @ V for a (d, K) matrix: K products in one pass over the data; returns a new (d, K) tensor, not
        attached to any graph (see :meth:`matvec`)."""
        self._check_input(V, ndim=2)
        self._sync_unless_fixed()
        # C is a constant here: the caller's vectors enter detached (the fused conv path and forward-over-reverse
        # ran their products on them outside no_grad, and returned them attached to the caller's graph), and the
        # result leaves detached (a loss parameter that requires grad attached forward-over-reverse products)
        out = self._explained(lambda: self._matmat(V.detach())).detach()
        self.num_products += V.shape[1]
        self.num_data_passes += 1
        return out

    def gradient(self) -> torch.Tensor:
        """The flat (d,) gradient of the mean loss at the model's current parameters (one data pass)."""
        self._sync_unless_fixed()
        out = self._explained(self._gradient)
        self.num_gradients += 1
        self.num_data_passes += 1
        return out

    def to_dense(self, chunk_size: int = 256) -> torch.Tensor:
        """The d x d matrix, by matmat with identity columns, ``chunk_size`` (an int >= 1, else
        ValueError) per data pass (small d only)."""
        return dense_by_products(self.shape[0], self.dtype, self.device, self.matmat, chunk_size)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` taking and returning float64 numpy arrays.

        Inputs are converted to the operator's dtype and device, outputs back to float64 on the CPU
        (so a float32 operator computes in float32). Products are counted as usual.
        """
        return to_scipy_operator(self.shape, self.dtype, self.device, self.matvec, self.matmat)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, d={self.shape[0]}, dtype={self.dtype}, "
                f"device={self.device}, num_products={self.num_products})")

    # ------------------------------------------------------------------ checks
    def _check_input(self, tensor: torch.Tensor, ndim: int) -> None:
        what = "vector" if ndim == 1 else "matrix"
        check_tensor(what, tensor)
        d = self.shape[0]
        if tensor.dim() != ndim or tensor.shape[0] != d or (ndim == 2 and tensor.shape[1] == 0):
            expected = f"({d},)" if ndim == 1 else f"({d}, K) with K >= 1"
            raise ValueError(f"{what} must have shape {expected}, got {tuple(tensor.shape)}")
        if tensor.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {tensor.dtype} but the operator's parameters have {self.dtype}")
        if tensor.device != self.device:
            raise ValueError(f"{what} is on {tensor.device} but the operator's parameters are on {self.device}")
        if not all_finite(tensor):
            raise ValueError(f"{what} contains NaN or Inf")

    def _first_batch(self) -> Batch:
        for batch in self.data:
            return batch
        raise ValueError("data is empty: it yields no batches")

    def _probe_batch(self) -> Batch:
        """The batch the construction probes compare derivatives on: the first with a row the loss does
        not ignore (on a batch of ignored rows every derivative is zero, and any two agree), else the
        first. Only an all-ignored first batch makes it read on."""
        first = None
        for x, y in self.data:
            if first is None:
                first = (x, y)
            if not every_row_ignored(self.loss_fn, y):
                return x, y
        if first is None:
            raise ValueError("data is empty: it yields no batches")
        return first

    def probe_entry(self, prepare: Callable[[torch.Tensor, torch.Tensor], tuple[Entry, int]],
                    x: torch.Tensor, y: torch.Tensor) -> Entry:
        """``prepare(x, y)``'s entry for a construction probe on the probe batch (x, y) (see
        :meth:`_probe_batch`), kept as the fixed-weight cache's first entry when that batch is the first
        and the budget allows: the first pass then takes it instead of building it again."""
        entry, nbytes = prepare(x, y)
        first_counted = not every_row_ignored(self.loss_fn, self._first_batch()[1])  # then it is the probe batch
        if not self._cache and not self._cache_closed and first_counted and nbytes <= self.cache_bytes:
            self._cache.append((entry, y.shape[0]))
            self.cached_bytes = nbytes
        return entry

    def _probe_determinism(self) -> None:
        """Two passes must start with the same batch, the model and the loss must run on it, and two
        gradients on it must agree. (The data source has already refused NaN or Inf in it, which would
        fail the comparison as if the data changed between passes.)"""
        x1, y1 = self._first_batch()
        x2, y2 = self._first_batch()
        if not (x1.shape == x2.shape and y1.shape == y2.shape and torch.equal(x1, x2) and torch.equal(y1, y2)):
            raise different_passes("the first batch differs")
        self.data.run_watching(self._probe_forward, x1, y1)
        self.data.watch_layouts((x1, y1), self._probe_forward)
        self._refuse_backward_hooks()
        x, y = self._probe_batch()

        def batch() -> Batch:  # a model that writes its inputs (x.mul_(2)) gets its own copy each time, as a pass
            return (x.clone(), y.clone()) if self.data.copies else (x, y)

        try:  # both: a forward that writes a buffer (DDP's broadcast) fails the second time only
            g1 = flatten_tensors(self.loss_gradient(self.params, *batch())[1])
            g2 = flatten_tensors(self.loss_gradient(self.params, *batch())[1])
        except (RuntimeError, NotImplementedError) as err:
            if is_out_of_memory(err):
                raise
            raise ValueError(f"the loss cannot be differentiated w.r.t. the parameters: {err}") from err
        self.num_gradients += PROBE_GRADIENTS
        if not all_finite(g1):
            raise ValueError("the gradient of the loss on the probe batch (the first with a row the loss counts) "
                             "contains NaN or Inf")
        # Bitwise agreement is expected on CPU; a few ulps are allowed for nondeterministic GPU
        # reductions. Dropout and other randomness differ by far more.
        tol = max(1e-12, 16 * torch.finfo(self.dtype).eps)
        diff = float(torch.linalg.vector_norm(g1 - g2))
        if diff > tol * float(torch.linalg.vector_norm(g1)):
            raise ValueError(
                "two gradient evaluations on the same batch differ (relative difference "
                f"{diff / max(float(torch.linalg.vector_norm(g1)), 1e-300):.2e}): the model or loss is random "
                "(dropout, noise) or keeps state between calls; call model.eval() and remove the randomness"
            )

    def _refuse_backward_hooks(self) -> None:
        """ValueError naming a module backward hook of the model or the loss that torch.func cannot run
        through (:func:`full_backward_hooked_module`): forward-mode products cannot take it, and on the
        autograd paths it could change the gradient the curvature is the derivative of. Likewise a gradient
        hook on a differentiated parameter (``Tensor.register_hook``, ``register_post_accumulate_grad_hook``):
        the operators differentiate the loss functionally and never run it, so a hook that masks rows of a
        weight, say, would not keep a second-order step off them."""
        for what, module in (("the model", self.model), ("the loss", self.loss_fn)):
            hooked = full_backward_hooked_module(module, what) if isinstance(module, nn.Module) else None
            if hooked is not None:
                raise ValueError(f"{type(self).__name__}: {hooked}, which torch.func cannot run through and which "
                                 "could change the gradient autograd computes: remove it while the curvature is "
                                 "computed")
        for name in self.params:
            p = self._live[name]
            if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
                raise ValueError(f"{type(self).__name__}: parameter {name!r} has a gradient hook (register_hook or "
                                 "register_post_accumulate_grad_hook), which the curvature's products and gradients "
                                 "do not run, so a step would ignore what it does (masking rows, say): remove it, "
                                 "or freeze that parameter (requires_grad_(False)) or leave it out of params")

    def _probe_forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Run the model and the loss on the first batch (see :func:`probe_forward`); a subclass adds
        the checks of what its own products need of the data here, before the probe's gradients.
        It runs on copies of the parameters: a forward that writes its parameters in place
        (``nn.Embedding(max_norm=...)`` renormalises rows) would write the caller's model at every
        product, and its loss is no function of the weights the operator differentiates: refused."""
        copies = {name: self._tensor(name).clone() for name in self._live}
        buffers = {name: version_counter(self._constants[name]) for name in self._live_buffers}  # copies already
        probe_forward(functools.partial(self.batch_forward, copies), self.loss_fn, x, y, self.dtype)
        refuse_parameter_writes("", copies)
        # (torch.func's transforms refuse such a write later, naming only the in-place op)
        written = [name for name, version in buffers.items() if version_counter(self._constants[name]) != version]
        if written:
            raise ValueError(f"the model's forward writes its buffer {written[0]!r} in eval mode (a call counter, "
                             "say): its products would change with every call; such a model is refused")
