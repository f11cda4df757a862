"""Curvature operators for any nn.Module through torch.func, and the public constructors.

* :class:`GenericHessian`: Hessian-vector products by forward-over-reverse differentiation,
  ``jvp(grad(L))``: one forward and one backward pass (each carrying tangents) per batch.
* :class:`GGNOperator`: generalised Gauss-Newton products ``J^T H_loss J v``, with J the Jacobian of
  the model's outputs w.r.t. the parameters (a ``jvp`` then a ``vjp``) and ``H_loss`` the Hessian of
  the loss w.r.t. the outputs: :func:`unlearn_kernels.ops.softmax_ce_hvp` for cross entropy,
  ``2 / numel(outputs)`` times the identity for the mean squared error.

Both apply K vectors in one data pass with ``torch.func.vmap`` over the K tangents. A model that vmap
cannot batch (in-place ops on batched tensors, ``.item()``, data-dependent control flow, ...) falls
back to a loop over the K vectors, still in one data pass per batch; ``operator.uses_vmap`` says
which ran and a RuntimeWarning is emitted once when it falls back. vmap holds the activations of all
K tangents at once: pass fewer columns per ``matmat`` (or a smaller ``batch_size``) to bound memory.
"""
from __future__ import annotations

import abc
import functools
import importlib
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import softmax_ce_hvp
from .base import CurvatureOperator, DataSpec, LossFn
from .distributed import DistributedOperator
from .params import ParamSelection

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


class _TorchFuncOperator(CurvatureOperator):
    """Shared machinery: per-batch products over K stacked tangents, vmap with a loop fallback."""

    #: what the construction probe's ValueError says when the product's derivatives fail
    _derivative_error: str

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None,
    ) -> None:
        super().__init__(model, loss_fn, data, params, batch_size=batch_size)
        self.uses_vmap = True
        self._probe_product()

    @abc.abstractmethod
    def _batch_products(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        """The batch curvature (of ``loss_fn`` on this batch) applied to K tangents ``{name: (K, *shape)}``."""

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

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        tangents = self.unflatten_columns(matrix)
        total = torch.zeros_like(matrix)
        count = 0
        for x, y in self.data:
            total.add_(self.flatten_columns(self._batch_products(x, y, tangents)), alpha=y.shape[0])
            count += y.shape[0]
        return total / count

    def _probe_product(self) -> None:
        """One product on the first batch: checks the needed derivatives exist (and whether vmap works)."""
        x, y = self._first_batch()
        probe = torch.ones(self.shape[0], 1, dtype=self.dtype, device=self.device)
        try:
            out = self._batch_products(x, y, self.unflatten_columns(probe))
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(f"{type(self).__name__}: {self._derivative_error}: {err}") from err
        if not all(bool(torch.isfinite(t).all()) for t in out.values()):
            raise ValueError(f"{type(self).__name__}: a curvature-vector product on the first batch is not finite")


MODES = ("forward-over-reverse", "reverse-over-reverse")
"""The differentiation modes of :class:`GenericHessian`."""


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


class GenericHessian(_TorchFuncOperator):
    """The exact Hessian of the mean loss for any nn.Module, by forward-over-reverse (``jvp(grad)``).

    Forward-over-reverse needs a forward-mode derivative of every op's backward (custom
    ``autograd.Function`` s need ``setup_context`` and ``jvp``). When the construction probe finds one
    missing (or an op that fails under it, like ``F.mse_loss`` in torch 2.13), the operator switches to
    reverse-over-reverse with ``torch.autograd`` double backward (a loop over the K vectors), records
    ``mode = "reverse-over-reverse"`` and emits a RuntimeWarning. Plain autograd is used for that mode
    because it raises for ``once_differentiable`` backwards, where torch.func silently returns zeros.
    Piecewise-linear activations (ReLU) are fine: their second derivative is zero.
    Prefer :func:`hessian_operator`, which also picks a fused kernel path when one applies.

    ``mode="reverse-over-reverse"`` asks for double backward from the start (one gradient graph per
    batch, shared by the K vectors of a matmat; checked at construction against forward-over-reverse
    on the first batch, or against finite differences where that cannot run). On this project's
    CPU machine (docs/benchmarks.md) one product took 18% and 50% less time than
    forward-over-reverse on a wide and a small MLP and about the same on a CNN, and a matmat of 8
    vectors 1.2-1.4x less than forward-over-reverse's vmapped matmat (1.4-1.6x less than 8 of its
    own products). Forward-over-reverse stays the default: it is what the curvature libraries use,
    and it has not been measured against double backward on a GPU yet.

    Args:
        mode: "forward-over-reverse" (default, with the fallback above) or "reverse-over-reverse".

    Attributes:
        mode: "forward-over-reverse" or "reverse-over-reverse" (what runs).
    """

    path = "generic"
    _derivative_error = (
        "the loss is not twice differentiable by forward-over-reverse (torch.func.jvp of torch.func.grad) "
        "nor by double backward (torch.autograd); every op needs a derivative of its backward "
        "(custom autograd.Functions need a differentiable backward or a jvp). "
        "ggn_operator needs only first derivatives of the model"
    )

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None, mode: str = "forward-over-reverse",
    ) -> None:
        self.mode = _check_mode(mode)
        super().__init__(model, loss_fn, data, params, batch_size=batch_size)

    def _probe_product(self) -> None:
        if self.mode == "reverse-over-reverse":
            self.uses_vmap = False
            super()._probe_product()
            self._check_double_backward()
            return
        try:
            super()._probe_product()
        except ValueError as err:
            if not isinstance(err.__cause__, (RuntimeError, NotImplementedError)):
                raise
            self.mode, self.uses_vmap = "reverse-over-reverse", False
            super()._probe_product()
            self._check_against_finite_differences()
            warnings.warn(
                f"GenericHessian: forward-over-reverse failed ({err.__cause__}); using reverse-over-reverse "
                "(double backward, a loop over the vectors)", RuntimeWarning, stacklevel=4,
            )

    def _check_double_backward(self) -> None:
        """For a requested reverse-over-reverse mode: on the first batch, H v by double backward must
        agree with forward-over-reverse to rounding (a backward that is not differentiable makes
        double backward silently drop curvature); where forward-over-reverse cannot run, with
        finite differences of the gradient instead."""
        x, y = self._first_batch()
        v = torch.randn(self.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=self.dtype).to(self.device)
        tangents = self.unflatten_columns(v)
        hv = self.flatten_columns(self._double_backward(x, y, tangents))
        try:
            ref = self.flatten_columns(self._forward_over_reverse(x, y, tangents))
        except (RuntimeError, NotImplementedError):
            self._check_against_finite_differences(v, hv)
            return
        err = float((hv - ref).norm()) / max(float(ref.norm()), torch.finfo(self.dtype).tiny)
        if err > 10 * torch.finfo(self.dtype).eps ** 0.5:
            raise ValueError(
                f"GenericHessian: double backward disagrees with forward-over-reverse on the first batch (relative "
                f"difference {err:.1e}): a backward in the model or loss is not differentiable (e.g. marked "
                "@once_differentiable); use mode='forward-over-reverse'"
            )

    def _check_against_finite_differences(self, v: torch.Tensor | None = None, hv: torch.Tensor | None = None) -> None:
        """Double backward silently drops the curvature of a backward that is not differentiable (e.g.
        ``@once_differentiable``), so compare H v on the first batch with a central difference of the
        gradient, (g(w + h v) - g(w - h v)) / 2h, with a loose tolerance.

        The difference is taken in float64 (on float64 copies of the parameters, buffers and inputs;
        in the operator's dtype if the model cannot run in float64): in float32 its rounding error
        alone reached 3e-2 on a ReLU MLP. A piecewise-linear model (ReLU) has a gradient that jumps
        at its kinks, and a step that crosses one is off by jump / h (a relative error of 0.9 was
        seen in float64), so the check passes if any of three step sizes h0, h0/8, h0/64 agrees; a
        missing curvature term is wrong at every step size. ``v`` (d, 1) and its product ``hv`` on
        the first batch may be passed in when already computed."""
        x, y = self._first_batch()
        if v is None:
            v = torch.randn(self.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=self.dtype).to(self.device)
            hv = self.flatten_columns(self._batch_products(x, y, self.unflatten_columns(v)))
        hv, v = hv[:, 0].double(), v[:, 0].double()
        w = self.flatten(self.params).double()

        def as64(t: torch.Tensor) -> torch.Tensor:
            return t.double() if t.is_floating_point() else t

        # Float64 copies of the buffers and unchosen parameters override self._constants in batch_loss.
        constants64 = {n: as64(c) for n, c in self._constants.items()}
        x64, y64 = as64(x), as64(y)
        grad64 = torch.func.grad(lambda params: self.batch_loss({**constants64, **params}, x64, y64))
        grad_own = torch.func.grad(self.batch_loss)

        def grad64_at(shift: float) -> torch.Tensor:
            return self.flatten(grad64(self.unflatten(w + shift * v)))

        def grad_own_at(shift: float) -> torch.Tensor:
            return self.flatten(grad_own(self.unflatten((w + shift * v).to(self.dtype)), x, y)).double()

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
            f"GenericHessian: {self._derivative_error}; double backward disagrees with finite differences of the "
            f"gradient (relative differences {', '.join(f'{e:.1e}' for e in errors)} at three step sizes): a "
            "backward in the model or loss is not differentiable (e.g. marked @once_differentiable)"
        )

    def _batch_products(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        if self.mode == "reverse-over-reverse":
            return self._double_backward(x, y, tangents)
        return self._forward_over_reverse(x, y, tangents)

    def _forward_over_reverse(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        grad_fn = torch.func.grad(self.batch_loss)

        def hvp(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(lambda p: grad_fn(p, x, y), (self.params,), (tangent,))[1]

        return self._map(hvp, tangents)

    def _double_backward(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        """H v = d(g . v)/dw for each of the K tangents, with one graph of g per batch."""
        leaves = {n: p.detach().requires_grad_() for n, p in self.params.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(self.batch_loss(leaves, x, y), list(leaves.values()), create_graph=True)
        # Entries of g that do not depend on w (a loss linear in them) have zero Hessian rows.
        live = [(g, n) for g, n in zip(grads, leaves) if g.requires_grad]
        k = tangents[self.param_names[0]].shape[0]
        columns = []
        for i in range(k):
            if not live:
                columns.append({n: torch.zeros_like(p) for n, p in leaves.items()})
                continue
            hv = torch.autograd.grad(
                [g for g, _ in live], list(leaves.values()), grad_outputs=[tangents[n][i] for _, n in live],
                retain_graph=i + 1 < k, allow_unused=True, materialize_grads=True,
            )
            columns.append(dict(zip(leaves, hv)))
        return _stack(columns)


class GGNOperator(_TorchFuncOperator):
    """The generalised Gauss-Newton matrix ``sum_b (n_b/N) J_b^T H_loss,b J_b`` of the mean loss.

    Positive semi-definite; equal to the Hessian when the model is linear in the parameters. Supported
    losses (mean reduction only): ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` on (N, C) logits
    (``ignore_index`` rows contribute nothing and the mean is over the other rows, as in PyTorch; any
    ``label_smoothing``, which leaves the Hessian w.r.t. the logits unchanged; no class ``weight``), and
    ``nn.MSELoss`` / ``F.mse_loss`` (H_loss = 2 / numel(outputs) I).
    """

    path = "ggn"
    _derivative_error = (
        "the model's Jacobian-vector product (torch.func.jvp) or vector-Jacobian product failed; every op "
        "needs forward- and reverse-mode derivatives"
    )

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, data: DataSpec, params: ParamSelection = None,
        *, batch_size: int | None = None,
    ) -> None:
        self._loss_kind, self._ignore_index = _ggn_loss(loss_fn)
        super().__init__(model, loss_fn, data, params, batch_size=batch_size)

    def _batch_products(self, x: torch.Tensor, y: torch.Tensor, tangents: Tangents) -> Tangents:
        forward = functools.partial(self.batch_forward, x=x)
        out, vjp_fn = torch.func.vjp(forward, self.params)
        jv = self._map(lambda t: torch.func.jvp(forward, (self.params,), (t,))[1], tangents)  # (K, *out.shape)
        if self._loss_kind == "mse":
            u = jv * (2.0 / out.numel())
        else:
            if out.dim() != 2:
                raise ValueError(
                    f"ggn_operator: cross entropy needs (N, C) logits, the model returned shape {tuple(out.shape)}"
                )
            k, (n, c) = jv.shape[0], out.shape
            keep = (y != self._ignore_index).to(out.dtype)
            # softmax_ce_hvp works row-wise, so the K tangents are stacked as K*N rows.
            u = softmax_ce_hvp(out.expand(k, n, c).reshape(k * n, c), jv.reshape(k * n, c)).reshape(k, n, c)
            u = u * (keep / keep.sum()).unsqueeze(1)
        return self._map(lambda v: vjp_fn(v)[0], u)


def _ggn_loss(loss_fn: LossFn) -> tuple[str, int]:
    """("ce", ignore_index) or ("mse", 0) for a supported loss; a clear error otherwise."""
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)) and loss_fn.reduction != "mean":
        raise ValueError(
            f"ggn_operator: {type(loss_fn).__name__}(reduction={loss_fn.reduction!r}) is not supported; "
            "use reduction='mean' (the operator is the mean over the data)"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            raise ValueError(
                "ggn_operator: nn.CrossEntropyLoss with class weights is not supported; use hessian_operator"
            )
        return "ce", loss_fn.ignore_index
    if loss_fn is F.cross_entropy:
        return "ce", -100
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss:
        return "mse", 0
    raise ValueError(
        f"ggn_operator: no loss Hessian for {getattr(loss_fn, '__name__', type(loss_fn).__name__)}; supported: "
        "nn.CrossEntropyLoss, F.cross_entropy, nn.MSELoss, F.mse_loss (mean reduction). "
        "hessian_operator works with any twice-differentiable loss"
    )


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSpec,
    params: ParamSelection = None,
    path: str = "auto",
    *,
    batch_size: int | None = None,
    mode: str = "forward-over-reverse",
    process_group: torch.distributed.ProcessGroup | None = None,
) -> CurvatureOperator:
    """The Hessian of the mean loss over ``data`` w.r.t. ``params``, as a :class:`CurvatureOperator`.

    Args:
        model: any nn.Module, in eval mode if it has BatchNorm or dropout. It is never modified.
        loss_fn: ``loss_fn(model(x), y) -> scalar``, a *mean-reduced* loss (``nn.CrossEntropyLoss()``,
            ``F.cross_entropy``, ``nn.MSELoss()``, ...). The operator is ``sum_b (n_b / N)`` times the
            Hessian of ``loss_fn`` on batch b (n_b = rows of batch b), i.e. the mean over the data.
        data: a LabeledData, an (x, y) pair of tensors, or a re-iterable of (x, y) batches (a list or
            a DataLoader with a fixed order and no dropped samples). Batches are moved to the
            parameters' device.
        params: None (all trainable parameters), or an iterable of parameter names / tensors (e.g.
            only the last layer, or the LoRA adapters); the flat vector layout follows that order.
        path: "auto" (the fused kernel path when the model and loss allow, else generic), "generic"
            (:class:`GenericHessian`) or "fused" (error if not supported). ``operator.path`` says which
            ran; after "auto" fell back, ``operator.path_reason`` says why the fused path was not used.
        batch_size: split tensor data into chunks of this many rows (bounds memory; same operator).
        mode: the generic path's differentiation mode (see :class:`GenericHessian`); the fused path
            computes the exact products by its own pass and ignores it.

        process_group: a ``torch.distributed`` process group whose ranks each pass their own shard of
            the rows as ``data``: returns a :class:`~unlearn_kernels.curvature.distributed.DistributedOperator`,
            the operator of the mean over all ranks' rows, identical on every rank.
    Raises:
        ValueError: train-mode BatchNorm/dropout, data that changes between passes, a loss that is
            not twice differentiable, an unknown path or an unsupported forced "fused" path.
    """
    if path not in ("auto", "generic", "fused"):
        raise ValueError(f"path must be 'auto', 'generic' or 'fused', got {path!r}")
    _check_mode(mode)
    if process_group is not None:
        return DistributedOperator(
            lambda shard: hessian_operator(model, loss_fn, shard, params, path, batch_size=batch_size, mode=mode),
            model, data, params, process_group)
    reason = None
    if path != "generic":
        try:
            fused_mlp = importlib.import_module(f"{__package__}.fused_mlp")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.fused_mlp":
                raise
            reason = "the fused MLP path is not installed in this build"
        else:
            reason = fused_mlp.supports(model, loss_fn, params)
            if reason is None:
                return fused_mlp.FusedMLPHessian(model, loss_fn, data, params, batch_size=batch_size)
        if path == "fused":
            raise ValueError(f"hessian_operator: path='fused' cannot be used: {reason}")
    operator = GenericHessian(model, loss_fn, data, params, batch_size=batch_size, mode=mode)
    operator.path_reason = reason
    return operator


def ggn_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataSpec,
    params: ParamSelection = None,
    *,
    batch_size: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> GGNOperator | DistributedOperator:
    """The generalised Gauss-Newton matrix of the mean loss (see :class:`GGNOperator`).

    Arguments as in :func:`hessian_operator` (``process_group`` included); ``loss_fn`` must be cross
    entropy or MSE with mean reduction. Needs only first derivatives of the model.
    """
    if process_group is not None:
        return DistributedOperator(
            lambda shard: GGNOperator(model, loss_fn, shard, params, batch_size=batch_size),
            model, data, params, process_group)
    return GGNOperator(model, loss_fn, data, params, batch_size=batch_size)
