"""Data-parallel curvature: one operator (and one objective) over data sharded across the ranks of a
process group.

Every rank builds its operator on its own shard of the rows (``hessian_operator(...,
process_group=pg)`` or ``ggn_operator(..., process_group=pg)``), and every product, matmat and
gradient is the sum of the ranks' local results weighted by their shard sizes::

    C v = sum_r (n_r / N) C_r v,        N = sum_r n_r,

with C_r the operator of the mean loss over rank r's n_r rows: the mean over all N rows, the same
operator one process would build on all the data. :class:`DistributedObjective` does the same for
the value and gradient of an :class:`~unlearn_kernels.curvature.objective.Objective`. One
``all_reduce`` per call (gloo on CPU, NCCL on GPU). Collectives return the same bits on every rank,
so solvers and methods that draw their random vectors from the same seed take the same steps on
every rank, and run on these objects unchanged. Every rank must make the same calls in the same
order (as with any collective).

A rank whose shard is empty takes part with zeros. A rank whose local computation fails still
takes part in the reduction and raises its own error; the others then raise a RuntimeError naming
it. A rank that never arrives (a crash, or a different sequence of calls) makes the others fail
after the process group's timeout (``torch.distributed.init_process_group(timeout=...)``) instead
of hanging: with gloo each waiting rank raises a RuntimeError that says so (tested); with NCCL the
group's watchdog aborts the process (NCCL reports errors asynchronously). The group is held weakly
(:class:`GroupRef`): ``destroy_process_group`` frees it while operators and objectives are alive.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..labeled import LabeledData
from .base import BatchSource, CurvatureOperator, DataSpec
from .objective import Objective
from .params import ParamSelection, resolve_parameters


class GroupRef:
    """A weak reference to a process group, for the objects that keep one (operators, objectives,
    methods): ``ref()`` is the group, or a RuntimeError naming ``owner`` once it was destroyed.

    torch.distributed's registry holds a group until ``destroy_process_group``; a group that something
    else keeps alive past that is destroyed at interpreter shutdown instead, which now and then aborted
    gloo processes of a script that ended with an operator still alive (PyTorch 2.13, "terminate called
    without an active exception").
    """

    def __init__(self, group: dist.ProcessGroup, owner: str) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{owner}: process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD "
                            f"after init_process_group), got {type(group).__name__}")
        self._ref, self._owner = weakref.ref(group), owner

    def __call__(self) -> dist.ProcessGroup:
        group = self._ref()
        if group is None:
            raise RuntimeError(f"{self._owner}: the process group was destroyed (destroy_process_group); build it "
                               "again on a live group")
        return group


def shard_rows(data: DataSpec, device: torch.device) -> int:
    """The number of rows in ``data`` (one pass over the batches of an iterable)."""
    if isinstance(data, LabeledData):
        return len(data)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return int(data[1].shape[0])
    return sum(int(y.shape[0]) for _, y in BatchSource(data, device))


class ShardGroup:
    """The ranks of a process group with their shard sizes, and the weighted all_reduce.

    Construction is itself a collective: every rank passes its row count and ``size`` (the
    dimension that must agree, e.g. the number of parameters), and whether building its local
    object failed.

    Attributes:
        rank, world_size: this rank's index in the group and the group's size.
        shard_sizes: rows per rank, in rank order; ``num_rows`` their sum.
        weight: this rank's share of the rows, ``n_rank / N``.
    """

    def __init__(self, process_group: dist.ProcessGroup, rows: int, size: int, device: torch.device,
                 failure: BaseException | None) -> None:
        self._group = GroupRef(process_group, "distributed curvature")
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        table = torch.zeros(self.world_size, 2, dtype=torch.float64, device=device)
        table[self.rank] = torch.tensor([rows, size], dtype=torch.float64)
        table = self.reduce(table, failure, "building its local operator or objective")
        self.shard_sizes = [int(n) for n in table[:, 0].tolist()]
        self.num_rows = sum(self.shard_sizes)
        if len({int(v) for v in table[:, 1].tolist()}) > 1:
            sizes = table[:, 1].long().tolist()
            raise ValueError(f"the ranks have different numbers of parameters {sizes}: every rank must pass the same "
                             "model and parameter selection")
        if self.num_rows == 0:
            raise ValueError("every rank's shard is empty: at least one rank needs rows")
        self.weight = self.shard_sizes[self.rank] / self.num_rows

    @property
    def group(self) -> dist.ProcessGroup:
        """The process group (a RuntimeError once it was destroyed; see :class:`GroupRef`)."""
        return self._group()

    def reduce(self, payload: torch.Tensor, failure: BaseException | None, what: str) -> torch.Tensor:
        """The sum of ``payload`` over the ranks (one all_reduce, with a failure flag per rank).
        Raises ``failure`` on the rank that failed, and a RuntimeError naming it on the others."""
        flat = payload.new_empty(payload.numel() + self.world_size)
        flat[:payload.numel()] = payload.reshape(-1)
        return self._all_reduce(flat, payload.shape, failure, what)

    def combine(self, local: Callable[[], torch.Tensor] | None, like: torch.Tensor, what: str) -> torch.Tensor:
        """``sum_r (n_r / N) result_r``: this rank's result (``local()``; zeros shaped like ``like``
        on an empty shard, where ``local`` is None), weighted and all-reduced."""
        flat = like.new_empty(like.numel() + self.world_size)  # the result, then one failure flag per rank
        out, failure = flat[:like.numel()].view_as(like), None
        if local is None:
            out.zero_()
        else:
            try:
                torch.mul(local(), self.weight, out=out)  # written in place: no copy of a d-long vector
            except Exception as err:  # reported to the other ranks, then raised here
                failure = err
        return self._all_reduce(flat, like.shape, failure, what)

    def _all_reduce(self, flat: torch.Tensor, shape: torch.Size, failure: BaseException | None,
                    what: str) -> torch.Tensor:
        """All-reduces ``flat`` (the payload, then a flag per rank, set here) and returns the payload's
        sum shaped ``shape``, or raises as :meth:`reduce` says."""
        payload, flags = flat[:flat.numel() - self.world_size], flat[flat.numel() - self.world_size:]
        flags.zero_()
        if failure is not None:
            payload.zero_()
            flags[self.rank] = 1
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        try:
            work.wait()
        except RuntimeError as err:
            raise RuntimeError(
                f"distributed curvature, rank {self.rank} of {self.world_size}: the all_reduce while {what} failed or "
                f"timed out ({err}): another rank crashed, or the ranks did not make the same sequence of calls"
            ) from err
        if failure is not None:
            raise failure
        failed = [r for r, flag in enumerate(flags.tolist()) if flag]
        if failed:
            raise RuntimeError(f"distributed curvature, rank {self.rank} of {self.world_size}: rank(s) {failed} failed "
                               f"while {what} (their own error is raised there)")
        return payload.view(shape)


def _build(build: Callable[[DataSpec], Any], data: DataSpec, device: torch.device,
           when_empty: bool) -> tuple[int, Any, BaseException | None]:
    """(rows, build(data) or None, the exception if either failed); ``build`` is not called on an
    empty shard unless ``when_empty``."""
    rows = 0
    try:
        rows = shard_rows(data, device)
        return rows, build(data) if rows or when_empty else None, None
    except Exception as err:  # reported to the other ranks by ShardGroup, then raised here
        return rows, None, err


class DistributedOperator:
    """The curvature of the mean loss over the union of the ranks' shards (see the module docstring).

    It speaks the :class:`~unlearn_kernels.curvature.base.CurvatureOperator` interface (``matvec``,
    ``matmat``, ``gradient``, ``to_dense``, ``to_scipy``, ``shape``, ``dtype``, ``device``,
    counters); every result is the global one, identical on every rank. It wraps this rank's local
    operator, whose construction made the data checks (determinism probe, train-mode modules) on
    the local shard, and reduces its results.

    Args:
        build: ``build(shard) -> CurvatureOperator``, the local operator on this rank's data (not
            called for an empty shard).
        model, params: the model and parameter selection ``build`` uses (for d, dtype and device on
            a rank with an empty shard).
        data: this rank's shard (any :data:`~unlearn_kernels.curvature.base.DataSpec`; may be empty).
        process_group: an initialised ``torch.distributed`` process group (e.g. ``dist.group.WORLD``).

    Attributes:
        local: this rank's operator (None on an empty shard).
        shards: the :class:`ShardGroup` (rank, world size, ``shard_sizes``, ``num_rows``).
        num_products, num_gradients, num_data_passes: this operator's calls (the same on every rank).

    Raises:
        ValueError: on every rank, when the ranks disagree on the parameter count or all shards are
            empty.
        RuntimeError: on the other ranks, when some rank's local operator cannot be built (that
            rank raises its own error).
        TypeError: ``process_group`` is not a ProcessGroup.
    """

    path = "distributed"
    path_reason: str | None = None
    # The interface methods that need only shape, dtype, device, matvec and matmat: one implementation.
    _check_input = CurvatureOperator._check_input
    to_dense = CurvatureOperator.to_dense
    to_scipy = CurvatureOperator.to_scipy

    def __init__(self, build: Callable[[DataSpec], CurvatureOperator], model: nn.Module, data: DataSpec,
                 params: ParamSelection, process_group: dist.ProcessGroup) -> None:
        chosen = resolve_parameters(model, params)
        first = next(iter(chosen.values()))
        self.dtype, self.device = first.dtype, first.device
        self.param_names = tuple(chosen)
        rows, self.local, failure = _build(build, data, self.device, when_empty=False)
        d = self.local.shape[0] if self.local is not None else sum(p.numel() for p in chosen.values())
        self.shards = ShardGroup(process_group, rows, d, self.device, failure)
        self.shape = (d, d)
        self.num_products = self.num_gradients = self.num_data_passes = 0

    def __repr__(self) -> str:
        return (f"DistributedOperator(rank={self.shards.rank}/{self.shards.world_size}, d={self.shape[0]}, "
                f"rows={self.shards.shard_sizes}, local={self.local!r})")

    def _local(self, fn: Callable[[CurvatureOperator], torch.Tensor]) -> Callable[[], torch.Tensor] | None:
        return None if self.local is None else (lambda: fn(self.local))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C @ v for a flat (d,) vector (one all_reduce); the same result on every rank."""
        self._check_input(v, ndim=1)
        out = self.shards.combine(self._local(lambda op: op.matvec(v)), v, "computing a matvec")
        self.num_products += 1
        self.num_data_passes += 1
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """C @ V for a (d, K) matrix: K products in one data pass and one all_reduce."""
        self._check_input(V, ndim=2)
        out = self.shards.combine(self._local(lambda op: op.matmat(V)), V, "computing a matmat")
        self.num_products += V.shape[1]
        self.num_data_passes += 1
        return out

    def gradient(self) -> torch.Tensor:
        """The flat (d,) gradient of the mean loss over all ranks' rows."""
        like = torch.empty(self.shape[0], dtype=self.dtype, device=self.device)
        out = self.shards.combine(self._local(lambda op: op.gradient()), like, "computing the gradient")
        self.num_gradients += 1
        self.num_data_passes += 1
        return out


class DistributedObjective:
    """``F(w)`` of an :class:`~unlearn_kernels.curvature.objective.Objective` over the union of the
    ranks' shards: ``value``, ``gradient`` and ``value_and_gradient`` are the shard-size-weighted sums
    of the local ones (the weight-decay term, the same on every rank, comes out once), reduced in
    float64 and identical on every rank.

    Args:
        model, loss_fn, data, params, weight_decay, batch_size: as for ``Objective``; ``data`` is
            this rank's shard (may be empty).
        process_group: an initialised ``torch.distributed`` process group.

    Attributes:
        local: this rank's Objective. ``shards``, ``param_names``, ``num_data_passes`` as for
        :class:`DistributedOperator`.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: DataSpec, params: ParamSelection = None, *,
                 process_group: dist.ProcessGroup, weight_decay: float = 0.0, batch_size: int | None = None) -> None:
        chosen = resolve_parameters(model, params)
        device = next(iter(chosen.values())).device
        rows, self.local, failure = _build(
            lambda shard: Objective(model, loss_fn, shard, params, weight_decay=weight_decay, batch_size=batch_size),
            data, device, when_empty=True)
        self.shards = ShardGroup(process_group, rows, sum(p.numel() for p in chosen.values()), device, failure)
        self.param_names = tuple(chosen)
        self.num_data_passes = 0

    def weights(self) -> torch.Tensor:
        """A flat copy of the chosen parameters (their dtype and device)."""
        return self.local.weights()

    def _reduced(self, with_gradient: bool) -> tuple[float, torch.Tensor]:
        w = self.local.weights()
        like = torch.empty(1 + (w.numel() if with_gradient else 0), dtype=torch.float64, device=w.device)

        def local() -> torch.Tensor:
            if not with_gradient:
                return torch.tensor([self.local.value()], dtype=torch.float64, device=w.device)
            value, grad = self.local.value_and_gradient()
            return torch.cat([torch.tensor([value], dtype=torch.float64, device=w.device), grad.double()])

        out = self.shards.combine(local if self.shards.shard_sizes[self.shards.rank] else None, like,
                                  "computing the objective")
        self.num_data_passes += 1
        return float(out[0]), out[1:].to(w.dtype)

    def value(self) -> float:
        """F at the model's current weights."""
        return self._reduced(False)[0]

    def gradient(self) -> torch.Tensor:
        """grad F at the model's current weights, a flat (d,) tensor of the parameters' dtype."""
        return self._reduced(True)[1]

    def value_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Both, in one pass and one all_reduce."""
        return self._reduced(True)
