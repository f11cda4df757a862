"""Curvature operators for any nn.Module (:func:`~unlearn_kernels.curvature.hessian_operator` and
:func:`~unlearn_kernels.curvature.ggn_operator` build them, or a fused or distributed one).

* :class:`GenericHessian`: exact Hessian-vector products, by double backward ("reverse-over-reverse":
  the gradient of each batch built with ``create_graph=True``, then one backward through it per
  vector) or by forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``). ``mode="auto"``
  (the default) takes double backward where it is exact (checked on the first batch) and keeps each
  batch's gradient graph while the weights do not change, so a product is one backward pass per
  batch; forward-over-reverse recomputes the forward and the gradient for every product.
* :class:`GGNOperator`: generalised Gauss-Newton products ``J^T H_loss J v``, with J the Jacobian of
  the model's outputs w.r.t. the parameters (a ``jvp`` then a ``vjp``) and ``H_loss`` the Hessian of
  the loss w.r.t. the outputs: :func:`unlearn_kernels.ops.softmax_ce_hvp` for cross entropy,
  ``2 / numel(outputs)`` times the identity for the mean squared error. At fixed weights the
  forward and its ``vjp`` are kept per batch.

Forward-mode products apply K vectors in one data pass with ``torch.func.vmap`` over the K tangents.
A model that vmap cannot batch (in-place ops on batched tensors, ``.item()``, data-dependent control
flow, ...) falls back to a loop over the K vectors, still in one data pass per batch;
``operator.uses_vmap`` says which ran and a RuntimeWarning is emitted once when it falls back. vmap
holds the activations of all K tangents at once: pass fewer columns per ``matmat`` (or a smaller
``batch_size``) to bound memory. What the fixed-weight cache holds is bounded by ``cache_bytes``
(see :class:`~unlearn_kernels.curvature.CurvatureOperator`).
"""
from __future__ import annotations

import abc
import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import all_finite, check_choice, is_out_of_memory
from ..ops import softmax_ce_hvp
from .base import CurvatureOperator
from .batches import DataSpec, RowMean
from .graph_ops import graph_ops
from .probes import check_loss_labels, LossFn
from .settings import own_call
from .params import ParamSelection, flatten_tensors

Tree = dict[str, torch.Tensor] | torch.Tensor
Tangents = dict[str, torch.Tensor]


def _index(tree: Tree, k: int) -> Tree:
    return {n: t[k] for n, t in tree.items()} if isinstance(tree, dict) else tree[k]


def _stack(trees: list[Tree]) -> Tree:
    if isinstance(trees[0], dict):
        return {n: torch.stack([t[n] for t in trees]) for n in trees[0]}
    return torch.stack(trees)


def _loop(fn: Callable[[Tree], Tree], batched: Tree) -> Tree:
    k = next(iter(batched.values())).shape[0] if isinstance(batched, dict) else batched.shape[0]
    return _stack([fn(_index(batched, i)) for i in range(k)])


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _graph_bytes(roots: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages an autograd graph keeps alive: the tensors saved by the nodes
    reachable from ``roots`` (and the roots themselves), leaving out the storages of ``exclude``
    (what exists anyway: the parameters, the operator's constants and a batch that is a chunk of the
    caller's data, whose whole storage would otherwise count once for every chunk)."""
    seen_storages = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def count(t: torch.Tensor) -> None:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen_storages:
            seen_storages.add(storage.data_ptr())
            total += storage.nbytes()

    seen_nodes: set = set()
    stack = []
    for t in roots:
        count(t)
        stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        names = _SAVED_NAMES.get(type(node))
        if names is None:  # a custom autograd.Function's node holds what its ctx saved as saved_tensors
            custom = isinstance(node, torch.autograd.function.BackwardCFunction)
            names = _SAVED_NAMES[type(node)] = (
                ("saved_tensors",) if custom else tuple(n for n in dir(node) if n.startswith("_saved_")))
        for name in names:
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved tensor that was already freed
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    count(t)
        stack.extend(fn for fn, _ in node.next_functions)
    return total


class _TorchFuncOperator(CurvatureOperator):
    """Shared machinery: per-batch products over K stacked tangents, vmap with a loop fallback."""

    #: what the construction probe's ValueError says when the product's derivatives fail
    _derivative_error: str

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None, cache_bytes: int | None = None,
    ) -> None:
        super().__init__(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)
        self.uses_vmap = True
        probe = self._probe_product()
        if self._runs_custom_function:
            self._check_symmetric(probe)

    def _own_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, or a copy of it where the model writes its inputs (``data.copies``): torch.func refuses a
        forward that writes a batch its transform captured, and a kept batch must stay as it was for the
        next product."""
        return x.clone() if self.data.copies else x

    def _callers(self, *batch: torch.Tensor) -> list[torch.Tensor]:
        """The tensors of a batch that are (chunks of) the caller's data, which a cache entry's bytes
        leave out; a DataLoader's collated batch or a copy is the entry's own memory."""
        return [t for t in batch if self.data.is_callers(t)]

    @functools.cached_property
    def _runs_custom_function(self) -> bool:
        """Whether the loss on the probe batch runs a custom ``autograd.Function`` other than this package's
        (whose second derivatives its tests check: the LoRA op): one forward, its graph walked and dropped,
        once per operator (the probe asks it for each mode it checks)."""
        x, y = self._probe_batch()
        with torch.enable_grad():
            params = {name: p.detach().requires_grad_(True) for name, p in self.params.items()}
            loss = self.batch_loss(params, self._own_input(x), y)
        seen, stack = set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                function = getattr(node, "_forward_cls", None)
                if not getattr(function, "__module__", "").startswith("unlearn_kernels."):
                    return True
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
        return False

    def _check_symmetric(self, hv: torch.Tensor) -> None:
        """A custom ``autograd.Function`` whose backward is not the derivative of its forward (a gradient reversal
        layer: identity forward, negated backward) makes the products those of a matrix that is not symmetric,
        which no other probe sees (finite differences of the gradient differentiate the same backward), and
        Lanczos and the Krylov solvers then return meaningless values. With ``hv`` = A v for the probe vector v:
        (A v)^T (A v) and v^T A (A v) are equal for a symmetric A, up to rounding far below the tolerance (4e-9
        relative in float32 on a custom activation, d = 85,002; the reversal layer of the tests leaves them 17% and
        69% apart). One more product, only where such a Function runs."""
        x, y = self._probe_batch()
        twice = self.flatten_columns(self._probe_products(x, y, self.unflatten_columns(hv)))[:, 0].double()
        self.num_products += 1
        once, v = hv[:, 0].double(), self._probe_vector()[:, 0].double()
        square, mixed = float(once @ once), float(v @ twice)
        if square > 0.0 and not abs(square - mixed) <= 1e-2 * square:
            raise ValueError(
                f"{type(self).__name__}: the curvature is not symmetric on the probe batch: with A its matrix and v "
                f"a probe vector, (A v)^T (A v) = {square:.4g} but v^T A (A v) = {mixed:.4g}; a custom "
                "autograd.Function's backward is not the derivative of its forward (a gradient reversal layer?), so "
                "the loss has no Hessian for second-order methods to use"
            )

    @abc.abstractmethod
    def _probe_products(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        """The probe batch's curvature (of ``loss_fn`` on it) applied to K tangents ``{name: (K, *shape)}``,
        as the products compute it; what the fixed-weight cache would hold is kept there
        (:meth:`~unlearn_kernels.curvature.CurvatureOperator.probe_entry`)."""

    def _map(self, fn: Callable[[Tree], Tree], batched: Tree) -> Tree:
        """``fn`` applied to each entry along dim 0 of ``batched``: vmap, or a loop if only vmap fails."""
        if self.uses_vmap:
            try:
                return torch.func.vmap(fn)(batched)
            except (RuntimeError, NotImplementedError) as err:
                out = _loop(fn, batched)  # an error here is the op's own, not vmap's: let it propagate
                self.uses_vmap = False
                warnings.warn(
                    f"{type(self).__name__}: torch.func.vmap cannot batch this model ({err}); falling back to "
                    "a loop over the vectors (same results, slower)", RuntimeWarning, stacklevel=3,
                )
                return out
        return _loop(fn, batched)

    def _probe_vector(self) -> torch.Tensor:
        """The (d, 1) vector of the construction probes (seeded, so probes are reproducible)."""
        gen = torch.Generator().manual_seed(0)
        return torch.randn(self.shape[0], 1, generator=gen, dtype=self.dtype).to(self.device)

    def _probe_product(self) -> torch.Tensor:
        """One product on the probe batch (:meth:`_probe_batch`): checks the needed derivatives exist (and
        whether vmap works); returns it (d, 1) for :meth:`_probe_vector`. Counted in ``num_products``."""
        x, y = self._probe_batch()
        try:
            out = self._probe_products(x, y, self.unflatten_columns(self._probe_vector()))
        except (RuntimeError, NotImplementedError) as err:
            if is_out_of_memory(err):
                raise
            raise ValueError(f"{type(self).__name__}: {self._derivative_error}: {err}") from err
        self.num_products += 1
        if not all(all_finite(t) for t in out.values()):
            raise ValueError(f"{type(self).__name__}: a curvature-vector product on the probe batch (the first with a "
                             "row the loss counts) is not finite")
        return self.flatten_columns(out)


MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")
"""The differentiation modes of :class:`GenericHessian`."""


@dataclass
class _GradientGraph:
    """One batch's gradient, built with ``create_graph=True`` and kept for double backward."""

    leaves: list[torch.Tensor]  # the parameters as graph leaves (views of the parameters' data)
    grads: tuple[torch.Tensor, ...]  # the gradient, one entry per leaf
    live: list[int]  # the entries of grads that depend on the parameters (the others have zero Hessian rows)


class GenericHessian(_TorchFuncOperator):
    """The exact Hessian of the mean loss for any nn.Module, by double backward or forward-over-reverse.

    Modes:

    * ``"reverse-over-reverse"``: double backward with ``torch.autograd``: per batch the gradient is
      built with ``create_graph=True`` and each vector is one backward through it. At fixed weights
      the graphs are kept (within ``cache_bytes``; batches beyond it are rebuilt for every product),
      so a product costs one backward pass per batch and :meth:`gradient` reads the kept gradients.
      Double backward silently drops the curvature of a backward that is not differentiable (e.g.
      ``@once_differentiable``), so at construction it is checked against forward-over-reverse on
      the probe batch (the first with a row the loss counts), or against finite differences of the
      gradient where that cannot run; the probe's gradient graph of the first batch is kept for the
      products. Nothing in this mode needs torch.func, so it takes models torch.func cannot run
      through (a packed sequence through an RNN: ``mode="auto"`` then checks by finite differences).
    * ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, the K vectors of a matmat
      vmapped; the forward and the gradient are recomputed for every product (no cache). It needs a
      forward-mode derivative of every op's backward (custom ``autograd.Function`` s need
      ``setup_context`` and ``jvp``); when the construction probe finds one missing (or an op that
      fails under it, like ``F.mse_loss`` in torch 2.13), the operator switches to double backward
      (checked by finite differences) and emits a RuntimeWarning.
    * ``"auto"`` (default): double backward when its check passes, else forward-over-reverse. With the
      graphs kept, a product does strictly less work than plain double backward (no forward and no
      gradient), and without them the same work.

    Where the loss on the probe batch runs a custom ``autograd.Function`` (other than this package's),
    whose backward may drop curvature that both modes then drop (one that reads its input detached), every
    mode's probe product is also checked against finite differences of the gradient, and a mode that fails
    the check is refused.

    Piecewise-linear activations (ReLU) are fine: their second derivative is zero. Prefer
    :func:`hessian_operator`, which also picks a fused kernel path when one applies.

    Attributes:
        mode: "forward-over-reverse" or "reverse-over-reverse" (what runs).
        mode_reason: why that mode runs.
    """

    path = "generic"
    _derivative_error = (
        "the loss is not twice differentiable by forward-over-reverse (torch.func.jvp of torch.func.grad) "
        "nor by double backward (torch.autograd); every op needs a derivative of its backward "
        "(custom autograd.Functions need a differentiable backward or a jvp; activation checkpointing, "
        "torch.utils.checkpoint, is not twice differentiable here: turn it off). "
        "ggn_operator needs only first derivatives of the model"
    )

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None, mode: str = "auto", cache_bytes: int | None = None,
    ) -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.mode_reason: str | None = None
        super().__init__(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)

    def _probe_product(self) -> torch.Tensor:
        requested = self.mode
        if requested == "forward-over-reverse":
            try:
                out = super()._probe_product()
            except ValueError as err:
                if not isinstance(err.__cause__, (RuntimeError, NotImplementedError)):
                    raise
                self.mode, self.uses_vmap = "reverse-over-reverse", False
                out = super()._probe_product()
                self._check_against_finite_differences(out)
                self.mode_reason = f"forward-over-reverse failed ({err.__cause__})"
                warnings.warn(
                    f"GenericHessian: forward-over-reverse failed ({err.__cause__}); using reverse-over-reverse "
                    "(double backward, a loop over the vectors)", RuntimeWarning, stacklevel=4,
                )
            else:
                if self._runs_custom_function:  # its backward may drop curvature that forward-over-reverse drops too
                    self._check_against_finite_differences(out, "forward-over-reverse")
                self.mode_reason = "requested"
            return out
        self.mode, self.uses_vmap = "reverse-over-reverse", False
        # forward-over-reverse's product first (its transient memory is then not added to the gradient
        # graph the probe product keeps for the first batch), double backward's second, then compared
        reference = self._forward_over_reverse_probe()
        try:
            out = super()._probe_product()
            self._check_double_backward(out, reference)
            if reference is not None and self._runs_custom_function:
                # a custom Function's backward may drop curvature that forward-over-reverse, which differentiates
                # the same backward, drops too (one that reads a detached input): the two agreed on a wrong product
                self._check_against_finite_differences(out, "double backward")
        except ValueError as err:
            if requested == "reverse-over-reverse":
                raise
            self._drop_cache()  # the probe's gradient graph, which forward-over-reverse does not use
            self.mode, self.uses_vmap = "forward-over-reverse", True
            try:
                out = super()._probe_product()
                if self._runs_custom_function:  # through a custom backward it may drop curvature too
                    self._check_against_finite_differences(out, "forward-over-reverse")
            except ValueError as failed:  # both modes: say why double backward was not used too
                raise ValueError(f"{failed}; double backward cannot be used either ({err})") from failed
            self.mode_reason = f"auto: double backward cannot be used ({err})"
            return out
        self.mode_reason = "requested" if requested == "reverse-over-reverse" else (
            "auto: double backward is exact here (checked on the first batch) and keeps each batch's gradient "
            "graph at fixed weights, so a product is one backward pass"
        )
        return out

    def _forward_over_reverse_probe(self) -> torch.Tensor | None:
        """Forward-over-reverse's product of the probe vector on the probe batch (counted), or None where
        it cannot run."""
        x, y = self._probe_batch()
        try:
            out = self.flatten_columns(self._forward_over_reverse(x, y, self.unflatten_columns(self._probe_vector())))
        except (RuntimeError, NotImplementedError):  # also out of memory: the check by differences takes less
            return None
        self.num_products += 1
        return out

    def _check_double_backward(self, hv: torch.Tensor, reference: torch.Tensor | None) -> None:
        """The probe batch's double-backward product ``hv`` of the probe vector must agree with
        forward-over-reverse's (``reference``) to rounding (a backward that is not differentiable makes
        double backward silently drop curvature); where forward-over-reverse cannot run (``reference``
        None), with finite differences of the gradient instead. The whole batch: a missing term may
        vanish on some rows (a hinge loss inside its margin)."""
        if reference is None:
            self._check_against_finite_differences(hv)
            return
        err = float((hv - reference).norm()) / max(float(reference.norm()), torch.finfo(self.dtype).tiny)
        if err > 10 * torch.finfo(self.dtype).eps ** 0.5:
            raise ValueError(
                f"GenericHessian: double backward disagrees with forward-over-reverse on the probe batch (relative "
                f"difference {err:.1e}): a backward in the model or loss is not differentiable (e.g. marked "
                "@once_differentiable); mode='auto' takes forward-over-reverse (checked by finite differences "
                "where a custom autograd.Function runs)"
            )

    def _check_against_finite_differences(self, hv: torch.Tensor, mode: str = "double backward") -> None:
        """Double backward silently drops the curvature of a backward that is not differentiable (e.g.
        ``@once_differentiable``), and forward-over-reverse through such a backward too, so compare the probe
        batch's product ``hv`` of the probe vector v (made by ``mode``, named in the error) with a central
        difference of the gradient, (g(w + h v) - g(w - h v)) / 2h, with a loose tolerance.

        The difference is taken in float64 (on float64 copies of the parameters, buffers and inputs;
        in the operator's dtype if the model cannot run in float64): in float32 its rounding error
        alone reached 3e-2 on a ReLU MLP. A piecewise-linear model (ReLU) has a gradient that jumps
        at its kinks, and a step that crosses one is off by jump / h (a relative error of 0.9 was
        seen in float64), so the check passes if any of three step sizes h0, h0/8, h0/64 agrees; a
        missing curvature term is wrong at every step size. Each gradient is counted. The inputs are a
        copy: a model that writes its inputs in place must not change those the kept graph holds."""
        x, y = self._probe_batch()
        x = x.clone()
        hv, v = hv[:, 0].double(), self._probe_vector()[:, 0].double()
        w = self.flatten(self.params).double()

        def as64(t: torch.Tensor) -> torch.Tensor:
            return t.double() if t.is_floating_point() else t

        # Float64 copies of the buffers and unchosen parameters override self._constants in batch_loss.
        constants64 = {n: as64(c) for n, c in self._constants.items()}
        x64, y64 = as64(x), as64(y)
        # a model that writes its inputs (x.mul_(2)) gets a fresh copy for each gradient, as a pass does
        fresh = (lambda t: t.clone()) if self.data.copies else (lambda t: t)

        def grad64_at(shift: float) -> torch.Tensor:
            self.num_gradients += 1
            return flatten_tensors(self.loss_gradient(self.unflatten(w + shift * v), fresh(x64), y64,
                                                      constants=constants64)[1])

        def grad_own_at(shift: float) -> torch.Tensor:
            self.num_gradients += 1
            params = self.unflatten((w + shift * v).to(self.dtype))
            return flatten_tensors(self.loss_gradient(params, fresh(x), y)[1]).double()

        try:
            grad64_at(0.0)
            grad_at, eps = grad64_at, torch.finfo(torch.float64).eps
        except (RuntimeError, TypeError):  # a model or loss that only runs in its own dtype
            grad_at, eps = grad_own_at, torch.finfo(self.dtype).eps
        h0 = eps ** (1 / 3) * max(1.0, float(w.norm())) / float(v.norm())
        errors = []
        for h in (h0, h0 / 8, h0 / 64):
            fd = (grad_at(h) - grad_at(-h)) / (2 * h)
            errors.append(float((hv - fd).norm()) / max(float(fd.norm()), float(hv.norm()), torch.finfo(torch.float64).tiny))
            if errors[-1] <= 1e-2:
                return
        raise ValueError(
            f"GenericHessian: {self._derivative_error}; {mode} disagrees with finite differences of the "
            f"gradient (relative differences {', '.join(f'{e:.1e}' for e in errors)} at three step sizes): a "
            "backward in the model or loss is not differentiable (e.g. marked @once_differentiable)"
        )

    # ------------------------------------------------------------------ products
    def _probe_products(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        if self.mode == "reverse-over-reverse":
            return self._graph_products(self.probe_entry(self._graph, x, y), tangents)
        return self._forward_over_reverse(x, y, tangents)

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        tangents = self.unflatten_columns(matrix)
        if self.mode == "reverse-over-reverse":
            return self.cached_mean(self._graph,
                                    lambda graph: self.flatten_columns(self._graph_products(graph, tangents)))
        mean = RowMean()  # forward-over-reverse: no cache, every batch recomputed
        for x, y in self.data:
            mean.add(self.flatten_columns(self._forward_over_reverse(x, y, tangents)), y.shape[0])
        return mean.result()

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        if self.mode != "reverse-over-reverse":
            return super()._matvec(vector)
        # the vector as the parameters' views of it (contiguous, as a matmat's rows: the same values), without a
        # matmat's per-parameter stacks and (d, K) layout: ~0.07 ms of a digits-MLP product's 2.8, a d-sized copy
        tangents = list(self.unflatten(vector.contiguous()).values())
        return self.cached_mean(self._graph, lambda graph: flatten_tensors(self._graph_product(graph, tangents)))

    def _gradient(self) -> torch.Tensor:
        if self.mode != "reverse-over-reverse":
            return super()._gradient()
        mean = RowMean()
        for graph, rows, batch in self.cached_pass(self._graph):
            if graph is None:  # beyond the cache's budget: a plain gradient, no graph needed
                mean.add(flatten_tensors(self.loss_gradient(self.params, *batch)[1]), rows)
            else:
                mean.add(flatten_tensors(g.detach() for g in graph.grads), rows)
        return mean.result()

    def _forward_over_reverse(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        grad_fn = torch.func.grad(self.batch_loss)

        def hvp(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(lambda p: grad_fn(p, self._own_input(x), y), (self.params,), (tangent,))[1]

        return self._map(hvp, tangents)

    def _graph(self, x: torch.Tensor, y: torch.Tensor) -> tuple[_GradientGraph, int]:
        """The batch's gradient with its graph (for double backward), and the bytes the graph holds."""
        # a parameter the forward does not use has zero gradient, no graph (and zero Hessian rows)
        with graph_ops():  # convolutions' second derivatives and linear layers' GEMMs at full speed
            leaves, grads = self.loss_gradient(self.params, x, y, create_graph=True)
        graph = _GradientGraph(leaves, grads, [i for i, g in enumerate(grads) if g.requires_grad])
        return graph, _graph_bytes(grads, [*leaves, *self._constants.values(), *self._callers(x, y)])

    def _graph_products(self, graph: _GradientGraph, tangents: Tangents) -> Tangents:
        """H v = d(g . v)/dw for each of the K tangents: one backward through the kept graph each."""
        k = tangents[self.param_names[0]].shape[0]
        columns = [self._graph_product(graph, [tangents[n][i] for n in self.param_names]) for i in range(k)]
        return _stack([dict(zip(self.param_names, hv)) for hv in columns])

    def _graph_product(self, graph: _GradientGraph, vector: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """H v for one tangent ``vector`` (a tensor per parameter): one backward through the kept graph."""
        if not graph.live:
            return tuple(torch.zeros_like(p) for p in self.params.values())
        return torch.autograd.grad([graph.grads[j] for j in graph.live], graph.leaves,
                                   grad_outputs=[vector[j] for j in graph.live], retain_graph=True,
                                   allow_unused=True, materialize_grads=True)


class GGNOperator(_TorchFuncOperator):
    """The generalised Gauss-Newton matrix ``sum_b (n_b/N) J_b^T H_loss,b J_b`` of the mean loss.

    Positive semi-definite; equal to the Hessian when the model is linear in the parameters. Supported
    losses (mean reduction only; exactly these classes, not subclasses, whose ``forward`` may compute
    another loss): ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` on (N, C) logits with (N,) integer
    class labels (``ignore_index`` rows contribute nothing and the mean is over the other rows of the
    batch, as in PyTorch; any ``label_smoothing``, which leaves the Hessian w.r.t. the logits
    unchanged; no class ``weight``, no class-probability targets), and ``nn.MSELoss`` /
    ``F.mse_loss`` (H_loss = 2 / numel(outputs) I). Batches are weighted by their rows n_b, as in
    :func:`hessian_operator`.

    Every batch's labels are checked when its forward is built (each product, or once while it stays
    cached): targets that are not (N,) integer labels, and a label out of range, are a ValueError
    naming them (the products never call the loss, which would raise for the latter).

    Per batch, ``J v`` is a ``torch.func.jvp`` (vmapped over the K vectors) and ``J^T u`` a backward
    through the batch's forward graph, which is kept at fixed weights (within ``cache_bytes``). The jvp
    runs attention by ops with forward-mode derivatives: without nn.MultiheadAttention's inference fast
    path and with ``F.scaled_dot_product_attention``'s math kernel (the caller's settings are restored
    after).
    """

    path = "ggn"
    _derivative_error = (
        "the model's Jacobian-vector product (torch.func.jvp) or vector-Jacobian product failed; every op "
        "needs forward- and reverse-mode derivatives"
    )

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None, cache_bytes: int | None = None,
    ) -> None:
        self._loss_kind, self._ignore_index = _ggn_loss(loss_fn)
        super().__init__(model, loss_fn, data, params, batch_size=batch_size, cache_bytes=cache_bytes)

    def _probe_forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super()._probe_forward(x, y)
        self._check_targets(y)  # before the probe's gradients

    def _check_targets(self, y: torch.Tensor) -> None:
        # the cross-entropy Hessian of _ggn_products is that of (N,) class labels (and its ignore_index
        # mask would broadcast a probability target's (N, C) to a wrong shape)
        if self._loss_kind == "ce" and (y.dim() != 1 or y.is_floating_point() or y.is_complex()):
            raise ValueError(f"ggn_operator: cross entropy needs (N,) integer class labels, got targets y of shape "
                             f"{tuple(y.shape)}, {y.dtype} (class probabilities are not supported: use "
                             "hessian_operator)")

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[_ForwardGraph, int]:
        """The batch's outputs with their graph (for J^T u), and the bytes the graph holds; the batch's
        targets checked first."""
        self._check_targets(y)
        leaves = [p.detach().requires_grad_() for p in self.params.values()]
        with torch.enable_grad():  # x kept as given: the products' forwards run on it again
            out = self.batch_forward(dict(zip(self.param_names, leaves)), self._own_input(x))
        if self._loss_kind == "ce":
            check_loss_labels(self.loss_fn, out, y, "ggn_operator")  # the products never call the loss (which would)
        # the entry keeps the batch too: a DataLoader's batch is held by it alone (the graph may save no x
        # when the first layer is not chosen)
        return _ForwardGraph(x, y, out, leaves), _graph_bytes([out, x, y], [*leaves, *self._constants.values(),
                                                                            *self._callers(x, y)])

    def _probe_products(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        return self._ggn_products(self.probe_entry(self._forward, x, y), tangents)

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        tangents = self.unflatten_columns(matrix)
        return self.cached_mean(self._forward, lambda graph: self.flatten_columns(self._ggn_products(graph, tangents)))

    def _ggn_products(self, graph: _ForwardGraph, tangents: Tangents) -> Tangents:
        def forward(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.batch_forward(params, self._own_input(graph.x))

        out = graph.out.detach()
        jv = self._map(lambda t: torch.func.jvp(forward, (self.params,), (t,))[1], tangents)  # (K, *out.shape)
        if self._loss_kind == "mse":
            u = jv * (2.0 / out.numel())
        else:
            if out.dim() != 2:
                raise ValueError(
                    f"ggn_operator: cross entropy needs (N, C) logits, the model returned shape {tuple(out.shape)}"
                )
            k, (n, c) = jv.shape[0], out.shape
            keep = (graph.y != self._ignore_index).to(out.dtype)
            # softmax_ce_hvp works row-wise, so the K tangents are stacked as K*N rows.
            u = softmax_ce_hvp(out.expand(k, n, c).reshape(k * n, c), jv.reshape(k * n, c)).reshape(k, n, c)
            # a batch with every row ignored contributes zero, as cross entropy's derivatives do (not 0/0)
            u = u * (keep / keep.sum().clamp_min(1)).unsqueeze(1)
        if not graph.out.requires_grad:  # outputs that use none of the chosen parameters: J = 0
            return {name: torch.zeros(u.shape[0], *p.shape, dtype=p.dtype, device=p.device)
                    for name, p in self.params.items()}
        columns = [
            dict(zip(self.param_names, torch.autograd.grad(graph.out, graph.leaves, u[i], retain_graph=True,
                                                           allow_unused=True, materialize_grads=True)))
            for i in range(u.shape[0])
        ]
        return _stack(columns)


@dataclass
class _ForwardGraph:
    """One batch's forward, kept for the backward passes of J^T u."""

    x: torch.Tensor
    y: torch.Tensor
    out: torch.Tensor  # the outputs, with their graph
    leaves: list[torch.Tensor]  # the parameters as graph leaves (views of the parameters' data)


def _ggn_loss(loss_fn: LossFn) -> tuple[str, int]:
    """("ce", ignore_index) or ("mse", 0) for a supported loss; a clear error otherwise."""
    # the exact classes: a subclass may override forward (a scaled loss) and so its Hessian
    kind = type(loss_fn)
    if kind in (nn.CrossEntropyLoss, nn.MSELoss) and own_call(loss_fn):
        # the products never call the loss: they would be the plain class's (the gradient follows the hook)
        raise ValueError(f"ggn_operator: the {kind.__name__} has a forward hook or pre-hook, or a forward set on the "
                         "instance; its Hessian is not the class's: use hessian_operator")
    if kind in (nn.CrossEntropyLoss, nn.MSELoss) and loss_fn.reduction != "mean":
        raise ValueError(
            f"ggn_operator: {kind.__name__}(reduction={loss_fn.reduction!r}) is not supported; "
            "use reduction='mean' (the operator is the mean over the data)"
        )
    if kind is nn.CrossEntropyLoss:
        if loss_fn.weight is not None:
            raise ValueError(
                "ggn_operator: nn.CrossEntropyLoss with class weights is not supported; use hessian_operator"
            )
        return "ce", loss_fn.ignore_index
    if loss_fn is F.cross_entropy:
        return "ce", -100
    if kind is nn.MSELoss or loss_fn is F.mse_loss:
        return "mse", 0
    raise ValueError(
        f"ggn_operator: no loss Hessian for {getattr(loss_fn, '__name__', kind.__name__)}; supported: "
        "nn.CrossEntropyLoss, F.cross_entropy, nn.MSELoss, F.mse_loss (mean reduction; the classes themselves, "
        "not subclasses, whose forward may differ). hessian_operator works with any twice-differentiable loss"
    )
