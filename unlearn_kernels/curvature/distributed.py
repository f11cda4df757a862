"""Data-parallel curvature: one operator (and one objective) over data sharded across the ranks of a
process group.

Every rank builds its operator on its own shard of the rows (``hessian_operator(...,
process_group=pg)`` or ``ggn_operator(..., process_group=pg)``), and every product, matmat and
gradient is the sum of the ranks' local results weighted by their shard sizes::

    C v = sum_r (n_r / N) C_r v,        N = sum_r n_r,

with C_r the operator of the mean loss over rank r's n_r rows: the mean over all N rows, the same
operator one process would build on all the data. Each shard weighs as a batch does in one process:
for a loss whose batch mean has another denominator (cross entropy's ``ignore_index`` rows, class
weights) this is the operator one process builds with the shards as its batches, not with one batch
(see ``hessian_operator``'s ``loss_fn``). :class:`DistributedObjective` does the same for
the value and gradient of an :class:`~unlearn_kernels.curvature.objective.Objective`. One
``all_reduce`` per call (gloo on CPU, NCCL on GPU). Collectives return the same bits on every rank,
so solvers and methods that draw their random vectors from the same seed take the same steps on
every rank, and run on these objects unchanged, as far as their own computations between products round
alike on every rank. A dense factorisation does not: LAPACK's bits depend on its thread count (ranks with 1
and 2 threads took damped_newton steps 3e-13 apart at d = 3,610, and newton_pinv's product at its step refused
them as different inputs), so the Newton-family methods take the group's first rank's step and weights on every
rank (one broadcast of d numbers, :func:`broadcast_released`, before the step is used and when the weights are
written). Every rank must make the same calls in the same order (as with any collective). A rank's collective
tensors live on its model's device, or on the CPU where that is the meta device (:func:`collective_device`): a
rank whose model is on the meta device is refused by its own checks and still takes part, so the others raise at
once naming it (a collective of meta tensors sends nothing: their call was matched with its next one).

The ranks must hold the same model: construction compares, in its one collective, the number of parameters,
the dtype, what each rank builds (the operator's kind or an objective's weight decay, the loss and its
settings: :func:`~unlearn_kernels.curvature.settings.value_text`) and a float64 checksum of the weights (sum,
sum of squares and a position-weighted sum of the finite entries of the chosen parameters, and of the model's
other parameters and buffers, with where and which entries are Inf or NaN: a -inf mask buffer), and every rank
raises the same ValueError naming what differs (a different dtype would otherwise crash gloo at the first
product, different weights would silently blend two Hessians). Each product's all_reduce carries, beside the
failure flags, one flag per rank: "my weights changed since the last check" (for the operator, read from the
local operator's own change detection, so it costs nothing); when any rank set it, every rank takes part in
one more small all_reduce of the checksums, and the same ValueError is raised on every rank if they differ. So
the check costs one collective of a few numbers per weight change, none per product at fixed weights, and no
product computed at different weights is ever returned.

A rank whose shard is empty takes part with zeros. A rank whose local computation fails, or that
refuses its matvec or matmat input, still takes part in the reduction and raises its own error; the
others then raise a RuntimeError naming it (but for a matmat input that is not a 2-D tensor with at least
one column: its payload's size is unknown, so that rank raises alone and the others wait for the
timeout below). A rank that never arrives (a crash, or a call the others
do not make) makes the others fail after the process group's timeout
(``torch.distributed.init_process_group(timeout=...)``), or at once when its process ended, instead
of hanging: with gloo each waiting rank raises a RuntimeError that says so (tested); with NCCL the
group's watchdog aborts the process (NCCL reports errors asynchronously). Each all_reduce also carries
what every rank is doing (the call's kind and which operator or objective of the group),
so ranks that make different calls at the same point with payloads of one size (a matvec on one rank
and a gradient on another, or products of two operators) all raise a RuntimeError naming the calls
instead of summing them; payloads of different sizes abort gloo ("Received data size doesn't match
expected size"), so a matmat first agrees on its number of columns (one small all_reduce). The group is held weakly
(:class:`GroupRef`): ``destroy_process_group`` frees it while operators and objectives are alive.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import struct
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..labeled import LabeledData
from .base import CurvatureOperator
from .batches import BatchSource, DataSpec
from .objective import Objective
from .params import (
    ParameterSlots,
    ParamSelection,
    WeightsKey,
    resolve_curvature_parameters,
    same_weights,
    weights_key,
)
from .settings import value_text


class GroupRef:
    """A weak reference to a process group, for the objects that keep one (operators, objectives,
    methods): ``ref()`` is the group, or a RuntimeError naming ``owner`` once it was destroyed.

    torch.distributed's registry holds a group until ``destroy_process_group``; a group that something
    else keeps alive past that keeps its worker threads running into interpreter shutdown, where a
    worker thread that still held a collective's tensor aborted the process (see
    :func:`all_reduce_released`).
    """

    def __init__(self, group: dist.ProcessGroup, owner: str) -> None:
        if group is dist.GroupMember.NON_GROUP_MEMBER:  # an int (-100): "got int" would not say why
            raise ValueError(f"{owner}: this rank is not a member of process_group (new_group returns "
                             "GroupMember.NON_GROUP_MEMBER on the ranks it leaves out): only the group's ranks may "
                             "pass it")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{owner}: process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD "
                            f"after init_process_group), got {type(group).__name__}")
        self._ref, self._owner = weakref.ref(group), owner
        self()  # a group destroyed already

    def __call__(self) -> dist.ProcessGroup:
        group = self._ref()
        if group is not None:
            try:  # destroyed while the caller still holds it: torch no longer has it registered
                dist.get_rank(group)
            except (ValueError, RuntimeError):
                group = None
        if group is None:
            raise RuntimeError(f"{self._owner}: the process group was destroyed (destroy_process_group); build it "
                               "again on a live group")
        return group


_yield = getattr(os, "sched_yield", lambda: time.sleep(0))  # a spin of sleep(0) kept the core from the worker


def all_reduce_released(tensor: torch.Tensor, group: dist.ProcessGroup,
                        op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *, during: str | None = None) -> None:
    """``dist.all_reduce(tensor, op, group)`` that returns once the backend has let go of ``tensor``;
    with ``during`` (who calls it and what for, "cure_newton, rank 0 of 2, agreeing on the inputs"), the
    backend's error when it fails or times out (another rank crashed or made other calls) is a RuntimeError
    saying so, led by ``during``. A tensor on the meta device is refused (ValueError, before any
    communication): torch's all_reduce of one returns at once and sends nothing, so the other ranks' call
    would be matched with this rank's next one (see :func:`collective_device`).

    Every collective of the package goes through here (or :func:`all_gather_objects`, or
    :func:`broadcast_released`). gloo's worker
    thread drops its reference to a collective's tensors a moment after ``wait()`` has returned (in 35%
    of 20,000 all_reduces, PyTorch 2.13). Where the caller's own reference was gone by then, the tensor
    owned its Python object and the worker's drop took the GIL; when the interpreter had begun to exit,
    CPython ended that thread inside a C++ destructor and the process aborted ("terminate called
    without an active exception"): a process whose last call was a collective died now and then at
    exit (1 in 6 runs of the distributed tests here). Waiting here (a yield or two) closes that window for
    the package's tensors. CPU tensors only: NCCL's watchdog releases its work on its own schedule,
    and waiting for it would stall the host on the GPU (not tested without a GPU)."""
    _run_released(lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True), tensor, "all_reduce", during)


def broadcast_released(tensor: torch.Tensor, group: dist.ProcessGroup, *, during: str | None = None) -> None:
    """``dist.broadcast(tensor, src=<the group's first rank>, group=group)``, run as :func:`all_reduce_released`
    runs its collective (returns once the backend has let go of ``tensor``, ``during`` leads its errors, a meta
    tensor refused): every rank's ``tensor`` then holds the group's first rank's, bit for bit. A collective:
    every rank of ``group`` calls it with a tensor of the same size and dtype."""
    src = dist.get_global_rank(group, 0)
    _run_released(lambda: dist.broadcast(tensor, src=src, group=group, async_op=True), tensor, "broadcast", during)


def _run_released(start: Callable[[], Any], tensor: torch.Tensor, name: str, during: str | None) -> None:
    """Runs the collective ``start()`` (asynchronous, on ``tensor``; ``name`` for the errors), waits for it and
    then for the backend's release of ``tensor`` (see :func:`all_reduce_released`)."""
    if tensor.is_meta:  # torch returns at once, sending nothing: the other ranks would pair it with a later call
        raise ValueError(f"{during or name}: a tensor on the meta device has no values, and torch's {name} of one "
                         "sends nothing (the other ranks' call would be matched with this rank's next one): put the "
                         "collective's tensors on the CPU or a GPU (collective_device)")
    before = tensor._use_count() if hasattr(tensor, "_use_count") else None
    try:
        work = start()
        work.wait()
    except RuntimeError as err:
        if during is None:
            raise
        raise RuntimeError(f"{during}: the {name} failed or timed out ({err}): another rank crashed, or the "
                           "ranks did not make the same sequence of calls") from err
    del work  # its Python handle holds the tensors too
    if before is None or tensor.device.type != "cpu":
        return
    deadline = time.monotonic() + 10.0  # the worker lets go within microseconds; never wait for good
    while tensor._use_count() > before and time.monotonic() < deadline:
        _yield()  # gives up the GIL and the core to the worker thread


def collective_device(device: torch.device) -> torch.device:
    """Where a rank's tensors for a collective live, given the device of its model: that device (NCCL reduces
    CUDA tensors only), but the CPU for the meta device. A collective of meta tensors sends nothing (torch
    returns at once), so a rank whose model is on the meta device, refused by its own checks, would not tell
    the others of its refusal: their call was matched with its next one. On the CPU it takes part, the others
    raise at once naming it, and the ranks stay in step."""
    return torch.device("cpu") if device.type == "meta" else device


def all_gather_objects(obj: Any, group: dist.ProcessGroup, device: torch.device, *,
                       during: str | None = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, as ``dist.all_gather_object`` gives them, by
    :func:`all_reduce_released` (its internal tensors would be left to the race described there; ``during``
    as there): the sizes, then one row of bytes per rank. ``device``: where the collective's tensors live
    (CUDA for NCCL). A collective: every rank of ``group`` calls it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    data = pickle.dumps(obj)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = len(data)
    all_reduce_released(sizes, group, during=during)
    lengths = sizes.tolist()
    table = torch.zeros(world, max(lengths), dtype=torch.uint8, device=device)
    table[rank, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    all_reduce_released(table, group, during=during)  # one rank's bytes per row: the sum is the gather
    rows = table.cpu()
    return [pickle.loads(rows[k, :lengths[k]].numpy().tobytes()) for k in range(world)]


def shard_rows(data: DataSpec, device: torch.device) -> int:
    """The number of rows in ``data`` (one pass over the batches of an iterable)."""
    if isinstance(data, LabeledData):
        return len(data)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return int(data[1].shape[0])
    return sum(int(y.shape[0]) for _, y in BatchSource(data, device))


_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the construction's table names by their 1-based index (0: any other)."""
_CHECKSUM_RTOL = 1e-12
"""Checksums agree within this fraction of their scale: identical weights give identical bits, but a
sum's rounding may depend on how the reduction was split (threads, devices)."""


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else 0


def _dtype_name(code: int) -> str:
    if code > 0:
        return str(_DTYPES[code - 1]).removeprefix("torch.")
    return "a dtype other than float64/32/16/bfloat16" if code == 0 else "an unstated dtype"


class WeightCheck:
    """The weights every rank must hold identically, as a float64 fingerprint, and whether they
    changed since the ranks last compared them.

    ``checksum()`` is (sum, sum of squares, position-weighted sum, and the non-finite pattern as two numbers)
    of the chosen parameters, then of the model's other parameters and buffers (ten float64 numbers, from one
    float64 copy of the weights). The weighted sum tells apart weights that differ only in where their values
    sit (two weights swapped, a transposed matrix), which the first two cannot. Where a half holds Inf or NaN
    (an additive -Inf mask, a buffer the operators allow, made every sum of its half infinite on every rank,
    which hid any other difference there) the sums are over its finite entries and the pattern is a hash of
    the positions and kinds (+Inf, -Inf, NaN) of the others, compared exactly (and of every value, where the
    sums of the finite entries overflow); else it is 0. A complex tensor counts as its real and imaginary parts.
    ``changed()`` compares ``key()`` (anything that changes when the weights do) with its value when
    the ranks last agreed; by default the key is, per parameter of the model, its version counter,
    data pointer, float64 sum and position checksum, and the same of its buffers (the change detection of
    the curvature operators' cache).

    Args:
        model: the model whose weights the ranks must share.
        chosen: the names of the chosen parameters.
        key: the change key (default: the one above, read through the model's parameter slots, so a
            replaced parameter is followed).
    """

    SIZE = 10
    PER_HALF = SIZE // 2

    def __init__(self, model: nn.Module, chosen: Iterable[str], key: Callable[[], WeightsKey] | None = None) -> None:
        self._model = model
        self._slots = ParameterSlots(model, [name for name, _ in model.named_parameters()])
        self._chosen = tuple(chosen)
        self._key = self._parameters_key if key is None else key
        self._checked: WeightsKey | None = None  # the key when the ranks last agreed
        self._pending: WeightsKey | None = None  # the key when checksum() last ran

    def _parameters_key(self) -> WeightsKey:
        return weights_key([*self._slots.current().values(), *(b for _, b in self._model.named_buffers())])

    def changed(self) -> bool:
        """Whether the weights changed since the ranks last agreed (always True before the first check)."""
        return not same_weights(self._key(), self._checked)

    def counts(self) -> tuple[int, int]:
        """How many numbers each half of the checksum sums (the chosen ones, the others)."""
        live = self._slots.current()
        chosen = sum(live[name].numel() for name in self._chosen)
        return chosen, sum(t.numel() for t in self._others(live))

    def _others(self, live: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        buffers = [b for _, b in self._model.named_buffers()]  # integer and bool ones (masks) too
        return [p for name, p in live.items() if name not in self._chosen] + buffers

    def checksum(self, device: torch.device) -> torch.Tensor:
        """(sum, sum of squares, weighted sum, non-finite pattern) of the chosen parameters, then of the
        rest, float64 on ``device`` (see the class docstring); entry i of a half is weighted by
        1 + frac(i * golden ratio), an equidistributed sequence, so that values moved to other places (a
        swap, a transposed matrix) change the sum.
        (Values traded between two positions whose weights differ by less than the tolerance pass
        unseen; 200 random swaps each among 10^5, 10^6 and 10^7 numbers were all caught.)"""
        self._pending = self._key()
        live = self._slots.current()
        halves = []
        with torch.no_grad():
            for tensors in ([live[name] for name in self._chosen], self._others(live)):
                # one float64 copy per half, then three reductions: a few ops, not a few per tensor
                # a complex tensor as its real and imaginary parts (a float64 cast would drop the latter)
                flat = torch.cat([(torch.view_as_real(t.resolve_conj()) if t.is_complex() else t).detach().reshape(-1)
                                  .to(device, torch.float64) for t in tensors]
                                 or [torch.zeros(0, dtype=torch.float64, device=device)])
                sums = _sums(flat)
                pattern = (0.0, 0.0)
                if not bool(sums.isfinite().all()):  # an Inf or NaN entry (a -inf mask), or squares beyond float64
                    finite = torch.isfinite(flat)
                    where = (~finite).nonzero().reshape(-1)
                    # which entries, and +Inf 1, -Inf 2, NaN 3: hashed, compared exactly on every rank
                    codes = torch.where(flat[where].isnan(), 3, torch.where(flat[where] > 0, 1, 2)).to(torch.int8)
                    marks = where.cpu().numpy().tobytes() + codes.cpu().numpy().tobytes()
                    flat = flat.where(finite, 0.0)
                    sums = _sums(flat)
                    if not bool(sums.isfinite().all()):  # finite entries whose squares overflow: every value hashed
                        marks += flat.cpu().numpy().tobytes()
                    pattern = text_fingerprint(marks)
                halves += [sums, torch.tensor(pattern, dtype=torch.float64, device=device)]
        return torch.cat(halves)

    def agreed(self) -> None:
        """The ranks compared the checksum of the last ``checksum()`` call and agree."""
        self._checked = self._pending

    def forget(self) -> None:
        """Count the weights as changed, so that the next call compares them again (after a change
        the key cannot see)."""
        self._checked = None

    def compare(self, table: torch.Tensor, rank: int, when: str) -> None:
        """Raise a ValueError if the ranks' checksums (rows of ``table``, world x SIZE, in rank order)
        differ; else record that they agree."""
        rows = table.tolist()
        for half, (count, what) in enumerate(zip(self.counts(), ("of the chosen parameters",
                                                                  "of the model's other parameters and buffers"))):
            differ = _differing([tuple(row[self.PER_HALF * half:self.PER_HALF * (half + 1)]) for row in rows], count)
            if differ:
                raise ValueError(
                    f"distributed curvature, rank {rank}: the ranks hold different weights {when} (checksums (sum, "
                    f"sum of squares, position-weighted sum, non-finite pattern) {what}: {differ}): every rank "
                    "must hold the same model (e.g. broadcast rank 0's weights with dist.broadcast(p.data, src=0) for "
                    "each parameter and buffer) and apply the same updates")
        self.agreed()


_GOLDEN = (math.sqrt(5) - 1) / 2
"""The checksum's position weights step by this irrational fraction, so no two positions share a weight."""

_CHUNK = 1 << 20
"""Positions per piece of the weighted sum: its weights take 8 MB at a time, not another copy of the model."""


_INPUT_SUMS = ("sum", "sum of squares", "position-weighted sum")
"""What a product's input checksum holds (:func:`_sums`), compared across the ranks at every product."""
_INPUT_DIGITS = 8 * len(_INPUT_SUMS)
"""The checksum's float64 numbers as base-256 digits (their bytes): exact in every dtype, bfloat16 included."""


def _sums(flat: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, position-weighted sum: entry i weighted by 1 + frac(i * golden ratio)) of a flat
    tensor, in float64, as one (3,) tensor; in pieces of :data:`_CHUNK` positions, each taken to float64 on its own
    (a product's input is not copied whole)."""
    totals = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start:start + _CHUNK].to(torch.float64)
        weights = torch.arange(start, start + piece.numel(), dtype=torch.float64, device=flat.device)
        totals += torch.stack([piece.sum(), torch.dot(piece, piece),
                               torch.dot(piece, weights.mul_(_GOLDEN).frac_().add_(1))])
    return totals


def text_fingerprint(text: str | bytes) -> tuple[float, float]:
    """A hash of ``text`` as two integers that float64 holds exactly (so that an all_reduce can carry it)."""
    number = int.from_bytes(hashlib.blake2b(text.encode() if isinstance(text, str) else text, digest_size=7).digest(),
                            "big")
    return float(number >> 28), float(number & (2**28 - 1))


def _close(a: float, b: float, scale: float, rtol: float) -> bool:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return math.isfinite(a - b) and abs(a - b) <= rtol * scale


def _differing(rows: list[tuple[float, ...]], count: int, rtol: float = _CHECKSUM_RTOL) -> str | None:
    """The ranks' checksums (one row per rank, in rank order: :func:`_sums` of ``count`` numbers, then any
    entries compared exactly) listed for a message where a rank's differ from rank 0's beyond ``rtol`` of
    their scale; None where they agree. |sum| <= sqrt(n * sum of squares), and twice that with weights up to 2."""
    squares = max((abs(row[1]) for row in rows if math.isfinite(row[1])), default=0.0)
    scales = (math.sqrt(count * squares), squares, 2 * math.sqrt(count * squares), *(0.0,) * (len(rows[0]) - 3))
    differ = [r for r, row in enumerate(rows) if not all(_close(a, b, scale, rtol)
                                                          for a, b, scale in zip(row, rows[0], scales))]
    if not differ:
        return None
    listed = ", ".join(f"({', '.join(f'{v:.17g}' for v in rows[r])}) on rank {r}" for r in [0, *differ[:3]])
    return listed + (f" and {len(differ) - 3} more rank(s)" if len(differ) > 3 else "")


_INPUT_ROUNDING_EPS = 8.0
"""Products' inputs agree within this many epsilons of their dtype (at least :data:`_CHECKSUM_RTOL`) of their
checksums' scale: ranks that compute one formula with other thread counts or devices round its last bits
apart (float32 vectors 1 ulp apart in places were refused at the float64 rule), which changes a product no
more than its own rounding does. Vectors that differ for another reason (another seed) are apart by far more
in float32 and float64; in float16 and bfloat16 only differences above a few percent of the scale are seen."""


_CALLS = ("building its local operator or objective", "comparing the ranks' weights", "computing a matvec",
          "computing a matmat", "computing the gradient", "computing the objective")
"""What a ShardGroup's all_reduce can be doing, tagged by its 1-based index in every call."""
_FAILED, _KIND, _SERIAL_LOW, _SERIAL_HIGH, _MOVED = range(5)
"""The rows of flags after the payload, one entry per rank (the last only where the weights are checked)."""
_DIGIT = 256
"""The serial is sent as two base-256 digits (modulo 2**16): integers up to 256 are exact in every floating
dtype, bfloat16 included (a rank's entry is summed with zeros only, so it arrives exactly)."""
_SERIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per process group, how many ShardGroups this process built on it: the ranks build them in the same
order (construction is collective), so the n-th one names the same operator or objective on every rank."""


class ShardGroup:
    """The ranks of a process group with their shard sizes, the weighted all_reduce, and the check
    that every rank holds the same weights.

    Construction is itself a collective: every rank passes its row count and ``size`` (the
    dimension that must agree, e.g. the number of parameters), its ``dtype``, its ``setup`` (what it
    builds: the operator's kind, the loss, options; compared as :func:`text_fingerprint`), ``weights`` (a
    :class:`WeightCheck`), the products and gradients its local object's construction took (``products``,
    ``gradients``), and whether building its local object failed. Every rank raises the same ValueError when
    the sizes, dtypes, setups or weights differ.

    Attributes:
        rank, world_size: this rank's index in the group and the group's size.
        setup_products, setup_gradients: the most products and gradients a rank's construction took (an empty
            shard's takes none): what one process over all rows takes.
        shard_sizes: rows per rank, in rank order; ``num_rows`` their sum.
        weight: this rank's share of the rows, ``n_rank / N``.
        weights: the :class:`WeightCheck` (None: the weights are not compared).
    """

    def __init__(self, process_group: dist.ProcessGroup, rows: int, size: int, device: torch.device,
                 failure: BaseException | None, dtype: torch.dtype | None = None,
                 weights: WeightCheck | None = None, setup: str = "", products: int = 0,
                 gradients: int = 0) -> None:
        self._group = GroupRef(process_group, "distributed curvature")
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.serial = _SERIALS[process_group] = _SERIALS.get(process_group, 0) + 1
        self.device, self.weights = device, weights
        # per rank: rows, size, dtype code, the setup's fingerprint (two numbers), products, gradients, the weights'
        # checksum
        table = torch.zeros(self.world_size, 7 + WeightCheck.SIZE, dtype=torch.float64, device=device)
        table[self.rank, :7] = torch.tensor([rows, size, _dtype_code(dtype) if dtype is not None else -1,
                                             *text_fingerprint(setup), products, gradients], dtype=torch.float64)
        if weights is not None and failure is None:
            try:
                table[self.rank, 7:] = weights.checksum(device)
            except Exception as err:  # reported to the other ranks, then raised here
                failure = err
        table = self.reduce(table, failure, "building its local operator or objective")
        self.shard_sizes = [int(n) for n in table[:, 0].tolist()]
        self.num_rows = sum(self.shard_sizes)
        if len({int(v) for v in table[:, 1].tolist()}) > 1:
            sizes = table[:, 1].long().tolist()
            raise ValueError(f"the ranks have different numbers of parameters {sizes}: every rank must pass the same "
                             "model and parameter selection")
        codes = table[:, 2].long().tolist()
        if len(set(codes)) > 1:
            others = ", ".join(f"rank {r} computes in {_dtype_name(c)}" for r, c in enumerate(codes) if c != codes[0])
            raise ValueError(f"the ranks compute in different dtypes: {others}, rank 0 in {_dtype_name(codes[0])}: "
                             "every rank must pass the same model in the same dtype")
        setups = [tuple(row) for row in table[:, 3:5].tolist()]
        if len(set(setups)) > 1:
            others = [r for r, fingerprint in enumerate(setups) if fingerprint != setups[self.rank]]
            raise ValueError(f"distributed curvature, rank {self.rank}: rank(s) {others} built another operator or "
                             f"objective than this rank's ({setup}): every rank must build the same kind (Hessian, "
                             "GGN, objective) with the same loss, loss settings, parameters and options")
        self.setup_products, self.setup_gradients = int(table[:, 5].max()), int(table[:, 6].max())
        if weights is not None:
            weights.compare(table[:, 7:], self.rank, "when the operator or objective was built")
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
        flat = payload.new_empty(payload.numel() + _MOVED * self.world_size)
        flat[:payload.numel()] = payload.reshape(-1)
        return self._all_reduce(flat, payload.shape, failure, what)[0]

    def combine(self, local: Callable[[], torch.Tensor | None] | None, like: torch.Tensor, what: str,
                given: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_r (n_r / N) result_r``: this rank's result (``local()``; zeros shaped like ``like``
        where ``local`` is or returns None, as on an empty shard), weighted and all-reduced.

        With :attr:`weights`, the all_reduce also carries one flag per rank, set where the weights
        changed since the ranks last compared them (asked after ``local()``, which may itself look
        at the weights); if any rank set it, every rank takes part in one more all_reduce of the
        checksums and raises the same ValueError if they differ. With ``given`` (the vector or matrix
        the product is of, which ``local()`` has checked), the same all_reduce carries its checksum (sum,
        sum of squares, position-weighted sum, each float64 as 8 base-256 digits: exact in every dtype),
        and every rank raises the same ValueError if the ranks' differ: each rank's product is of its own
        input, so different ones made a blend of products that is none of them."""
        # per rank: the failure and call tags, weights changed, then the input's checksum (sent by every call, 0 without
        # an input, so that calls of one payload size have one size: the tags tell them apart)
        rows = _MOVED + (self.weights is not None) + _INPUT_DIGITS
        flat = like.new_empty(like.numel() + rows * self.world_size)  # the result, then the flags
        out, failure, sums = flat[:like.numel()].view_as(like), None, None
        try:
            result = None if local is None else local()
            if given is not None:
                sums = _sums(given.detach().reshape(-1)).tolist()
            if result is None:
                out.zero_()
            else:
                torch.mul(result, self.weight, out=out)  # written in place: no copy of a d-long vector
        except Exception as err:  # reported to the other ranks, then raised here
            failure = err
        moved = None
        if self.weights is not None:
            moved = False
            try:
                moved = self.weights.changed()
            except Exception as err:  # reported to the other ranks, then raised here
                failure = err if failure is None else failure
        sent = [0] * _INPUT_DIGITS if sums is None else [d for value in sums for d in struct.pack("<d", value)]
        out, any_moved, received = self._all_reduce(flat, like.shape, failure, what, moved, sent)
        if given is not None:
            self._check_inputs([struct.unpack(f"<{len(_INPUT_SUMS)}d", bytes(r)) for r in received], given.numel(),
                               max(_CHECKSUM_RTOL, _INPUT_ROUNDING_EPS * torch.finfo(given.dtype).eps), what)
        if any_moved:
            self.check_weights()
        return out

    def _check_inputs(self, sums: list[tuple[float, ...]], count: int, rtol: float, what: str) -> None:
        """The same ValueError on every rank if the ranks' input checksums (``_sums`` of each, in rank
        order) differ by more than ``rtol`` of their scale (the rounding of the input's dtype)."""
        differ = _differing(sums, count, rtol)
        if differ:
            raise ValueError(f"distributed curvature, rank {self.rank}: the ranks passed different inputs while "
                             f"{what} (checksums ({', '.join(_INPUT_SUMS)}) {differ}): each rank's product is of "
                             "its own input, so the combined result would be none of them; every rank must pass the "
                             "same vectors (the same seeds, start vectors and arguments)")

    def check_weights(self) -> None:
        """Every rank's checksum in one all_reduce; the same ValueError on every rank if they differ."""
        table = torch.zeros(self.world_size, WeightCheck.SIZE, dtype=torch.float64, device=self.device)
        failure = None
        try:
            table[self.rank] = self.weights.checksum(self.device)
        except Exception as err:  # reported to the other ranks, then raised here
            failure = err
        table = self.reduce(table, failure, "comparing the ranks' weights")
        self.weights.compare(table, self.rank, "after the weights changed")

    def _all_reduce(self, flat: torch.Tensor, shape: torch.Size, failure: BaseException | None,
                    what: str, moved: bool | None = None,
                    digits: Sequence[int] = ()) -> tuple[torch.Tensor, bool, list[list[int]]]:
        """All-reduces ``flat`` (the payload, then per rank a failure flag, the call's tags (its kind and
        this group's serial modulo 2**16, as two digits), a weights-changed flag (``moved``, unless None) and
        ``digits`` (integers in [0, 256), the flags' last rows); set here) and returns the payload's sum shaped
        ``shape``, whether any rank's weights changed and every rank's digits (in rank order), or raises as
        :meth:`reduce` says; a RuntimeError on every rank if the ranks' tags differ."""
        n = math.prod(shape)
        payload, flags = flat[:n], flat[n:].view(-1, self.world_size)
        flags.zero_()
        if failure is not None:
            payload.zero_()
            flags[_FAILED, self.rank] = 1
        flags[_KIND, self.rank] = _CALLS.index(what) + 1
        flags[_SERIAL_LOW, self.rank] = self.serial % _DIGIT
        flags[_SERIAL_HIGH, self.rank] = self.serial // _DIGIT % _DIGIT
        if moved:
            flags[_MOVED, self.rank] = 1
        if digits and failure is None:
            flags[len(flags) - len(digits):, self.rank] = torch.tensor(digits, dtype=flags.dtype)
        all_reduce_released(flat, self.group,
                            during=f"distributed curvature, rank {self.rank} of {self.world_size}, {what}")
        if failure is not None:
            raise failure
        flags = flags.tolist()  # one read-back
        self._check_tags([(int(kind), int(low) + _DIGIT * int(high))
                          for kind, low, high in zip(flags[_KIND], flags[_SERIAL_LOW], flags[_SERIAL_HIGH])])
        failed = [r for r, flag in enumerate(flags[_FAILED]) if flag]
        if failed:
            raise RuntimeError(f"distributed curvature, rank {self.rank} of {self.world_size}: rank(s) {failed} failed "
                               f"while {what} (their own error is raised there)")
        received = [[int(row[r]) for row in flags[len(flags) - len(digits):]] for r in range(self.world_size)]
        return payload.view(shape), moved is not None and any(flags[_MOVED]), received

    def _check_tags(self, tags: list[tuple[int, int]]) -> None:
        """The same RuntimeError on every rank if the ranks' (kind, serial) tags differ."""
        if len(set(tags)) == 1:
            return

        def said(kind: int, serial: int) -> str:
            doing = _CALLS[kind - 1] if 0 < kind <= len(_CALLS) else "an unknown call"
            return f"{doing} on the group's distributed operator or objective number {serial}"

        listed = "; ".join(f"rank {r}: {said(*tag)}" for r, tag in enumerate(tags))
        raise RuntimeError(f"distributed curvature, rank {self.rank} of {self.world_size}: the ranks made different "
                           f"calls at the same point ({listed}), so their results cannot be combined: every rank must "
                           "make the same calls on the same operators and objectives in the same order")


def _resolved(model: nn.Module, params: ParamSelection,
              refusal: BaseException | None) -> tuple[dict[str, torch.Tensor], torch.device, BaseException | None]:
    """(the chosen parameters, the device of this rank's collectives, the refusal of the arguments): a
    rank that refuses its arguments (``refusal``, or a bad ``params`` here) still takes part in the
    construction's collective, which raises its error there and a RuntimeError naming it on the other
    ranks at once, instead of leaving them waiting for the group's timeout."""
    chosen: dict[str, torch.Tensor] = {}
    if refusal is None:
        try:
            chosen = resolve_curvature_parameters(model, params)
        except (TypeError, ValueError) as err:
            refusal = err
    first = next(iter(chosen.values()), None)
    if first is None and isinstance(model, nn.Module):
        first = next(model.parameters(), None)
    return chosen, torch.device("cpu") if first is None else collective_device(first.device), refusal


def _parameters_text(names: Sequence[str]) -> str:
    """The chosen parameters, for the setup the ranks compare: all names where few, else the first and last with
    their number and a hash of all (parameters of the same sizes under other names were taken for other weights,
    and the refusal said to broadcast them)."""
    if len(names) <= 4:
        return "the parameters " + ", ".join(repr(name) for name in names)
    digest = hashlib.blake2b("\n".join(names).encode(), digest_size=4).hexdigest()
    return f"{len(names)} parameters {names[0]!r} ... {names[-1]!r} (names {digest})"


def _setup(describe: Callable[[], str], failure: BaseException | None) -> tuple[str, BaseException | None]:
    """(``describe()``, failure), or ("", its exception) where it fails: what the ranks compare of what they build
    (no text where the arguments were refused already: that refusal is raised first)."""
    if failure is not None:
        return "", failure
    try:
        return describe(), None
    except Exception as err:  # reported to the other ranks by ShardGroup, then raised here
        return "", err


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
    ``matmat``, ``gradient``, ``to_dense``, ``to_scipy``, ``invalidate``, ``shape``, ``dtype``, ``device``,
    counters); every result is the global one, identical on every rank. It wraps this rank's local
    operator, whose construction made the data checks (determinism probe, modules that couple the
    samples) on the local shard, and reduces its results.

    Args:
        build: ``build(shard) -> CurvatureOperator``, the local operator on this rank's data (not
            called for an empty shard).
        model, params: the model and parameter selection ``build`` uses (for d, dtype and device on
            a rank with an empty shard).
        data: this rank's shard (any :data:`~unlearn_kernels.curvature.batches.DataSpec`; may be empty).
        process_group: an initialised ``torch.distributed`` process group (e.g. ``dist.group.WORLD``).
        refusal: this rank's error in the arguments of the function that builds the operator (an
            unknown path or parameter), raised here after the construction's collective.
        kind: what ``build`` builds ("Hessian", "GGN"), compared between the ranks with ``loss_fn``
            (:func:`~unlearn_kernels.curvature.settings.value_text`).
        loss_fn: the loss ``build`` uses.

    Attributes:
        local: this rank's operator (None on an empty shard).
        shards: the :class:`ShardGroup` (rank, world size, ``shard_sizes``, ``num_rows``).
        num_products, num_gradients, num_data_passes: this operator's calls (the same on every rank);
            ``num_products`` and ``num_gradients`` start at the local construction's (its probes, the generic
            path's check), as a single process's operator's do.

    Raises:
        ValueError: on every rank, when the ranks disagree on the parameter count, the dtype, the kind
            of operator or the loss and its settings (at construction), or the weights (at construction,
            and at the first product after the weights changed), or all shards are empty.
        RuntimeError: on the other ranks, when some rank's arguments are refused or its local operator
            cannot be built (that rank raises its own error).
        TypeError: ``process_group`` is not a ProcessGroup.
    """

    path = "distributed"
    path_reason: str | None = None
    # The interface methods that need only shape, dtype, device, matvec and matmat: one implementation.
    _check_input = CurvatureOperator._check_input
    to_dense = CurvatureOperator.to_dense
    to_scipy = CurvatureOperator.to_scipy

    def __init__(self, build: Callable[[DataSpec], CurvatureOperator], model: nn.Module, data: DataSpec,
                 params: ParamSelection, process_group: dist.ProcessGroup, *,
                 refusal: BaseException | None = None, kind: str = "operator", loss_fn: Any = None) -> None:
        chosen, self.device, refusal = _resolved(model, params, refusal)
        self.dtype = next((p.dtype for p in chosen.values()), None)
        self.param_names = tuple(chosen)
        # before the build, whose probes call the loss (a loss of the user's own may count its calls)
        setup, refusal = _setup(lambda: f"{kind} of the loss {value_text(loss_fn)} over "
                                        f"{_parameters_text(self.param_names)}", refusal)
        rows, self.local, failure = ((0, None, refusal) if refusal else
                                     _build(build, data, self.device, when_empty=False))
        d = self.local.shape[0] if self.local is not None else sum(p.numel() for p in chosen.values())
        # The local operator notices every weight change before its products (its cache depends on it):
        # its key costs nothing more to read. An empty shard's rank keys the weights itself.
        key = None if not isinstance(self.local, CurvatureOperator) else (lambda: self.local._weights_key)
        self.shards = ShardGroup(process_group, rows, d, self.device, failure, self.dtype,
                                 None if refusal else WeightCheck(model, self.param_names, key), setup,
                                 products=0 if self.local is None else self.local.num_products,
                                 gradients=0 if self.local is None else self.local.num_gradients)
        self.shape = (d, d)
        # the local construction's products and gradients (its probes, the generic path's check) count, as they
        # do in one process
        self.num_products, self.num_gradients = self.shards.setup_products, self.shards.setup_gradients
        self.num_data_passes = 0

    def __repr__(self) -> str:
        return (f"DistributedOperator(rank={self.shards.rank}/{self.shards.world_size}, d={self.shape[0]}, "
                f"rows={self.shards.shard_sizes}, local={self.local!r})")

    def _local(self, fn: Callable[[CurvatureOperator], torch.Tensor]) -> Callable[[], torch.Tensor] | None:
        return None if self.local is None else (lambda: fn(self.local))

    def _product(self, X: torch.Tensor, ndim: int) -> torch.Tensor:
        """The local ``matvec`` (``ndim`` 1) or ``matmat`` (2) of ``X``, combined. ``X`` is checked inside
        the collective: a rank that refuses its input still takes part, so the others raise at once
        instead of waiting for the timeout (or pairing this call with that rank's next one). The
        payload is sized by the operator, never by a bad ``X``, so every rank's has the same size."""
        shape = (self.shape[0],)
        if ndim == 2:
            shape += (self._agreed_columns(X),)

        def local() -> torch.Tensor | None:
            self._check_input(X, ndim)
            return None if self.local is None else (self.local.matvec if ndim == 1 else self.local.matmat)(X)

        like = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.shards.combine(local, like, "computing a matvec" if ndim == 1 else "computing a matmat", given=X)

    def _agreed_columns(self, X: Any) -> int:
        """K, the columns of a matmat's ``X``, once the ranks agree on it: their payloads are sized by it, and
        payloads of different sizes abort gloo's process (SIGABRT: 2 columns on one rank, 3 on the other) where
        they should raise. One small all_reduce of every rank's K; the same ValueError on every rank where they
        differ, and a rank whose ``X`` has no K (not a matrix) raises its refusal, the others a RuntimeError
        naming it."""
        failure = None
        if not (isinstance(X, torch.Tensor) and X.dim() == 2 and X.shape[1] > 0):
            try:
                self._check_input(X, 2)
            except Exception as err:  # reported to the other ranks, then raised here
                failure = err
        table = torch.zeros(self.shards.world_size, dtype=torch.float64, device=self.device)
        if failure is None:
            table[self.shards.rank] = X.shape[1]
        counts = [int(k) for k in self.shards.reduce(table, failure, "computing a matmat").tolist()]
        if len(set(counts)) > 1:
            raise ValueError(f"distributed curvature, rank {self.shards.rank}: the ranks passed matmat inputs of "
                             f"different numbers of columns ({', '.join(map(str, counts))}, in rank order): every "
                             "rank must pass the same vectors (the same seeds, start vectors and arguments)")
        return counts[0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """C @ v for a flat (d,) vector (one all_reduce); the same result on every rank."""
        out = self._product(v, 1)
        self.num_products += 1
        self.num_data_passes += 1
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """C @ V for a (d, K) matrix: K products in one data pass and one all_reduce (and a small one before it,
        of the ranks' K)."""
        out = self._product(V, 2)
        self.num_products += V.shape[1]
        self.num_data_passes += 1
        return out

    def invalidate(self) -> None:
        """Take this rank's weights again (see ``CurvatureOperator.invalidate``: the cache dropped, the buffers
        copied again; needed only after a weight change that keeps every parameter's version counter, data
        pointer and sum) and compare the ranks' weights again at the next call, as after a change that is
        seen. Not a collective: a rank may call it alone."""
        self.shards.weights.forget()
        if self.local is not None:
            self.local.invalidate()

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
    float64 and identical on every rank. The ranks' weights are compared as for
    :class:`DistributedOperator` (at construction, and at the first call after they changed).

    Args:
        model, loss_fn, data, params, weight_decay, batch_size, path: as for ``Objective``; ``data`` is
            this rank's shard (may be empty).
        process_group: an initialised ``torch.distributed`` process group.

    Attributes:
        local: this rank's Objective. ``shards``, ``param_names``, ``num_data_passes`` as for
        :class:`DistributedOperator`.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, data: DataSpec, params: ParamSelection = None, *,
                 process_group: dist.ProcessGroup, weight_decay: float = 0.0, batch_size: int | None = None,
                 path: str = "auto") -> None:
        chosen, device, refusal = _resolved(model, params, None)
        self.param_names = tuple(chosen)  # the selection again for the local Objective (params may be a generator)
        # before the build, whose probes call the loss (as for DistributedOperator)
        setup, refusal = _setup(lambda: f"objective with weight decay {value_text(weight_decay)} of the loss "
                                        f"{value_text(loss_fn)} over {_parameters_text(self.param_names)}", refusal)
        rows, self.local, failure = (0, None, refusal) if refusal else _build(
            lambda shard: Objective(model, loss_fn, shard, self.param_names, weight_decay=weight_decay,
                                    batch_size=batch_size, path=path),
            data, device, when_empty=True)
        dtype = next((p.dtype for p in chosen.values()), None)
        self._size, self._dtype, self._device = sum(p.numel() for p in chosen.values()), dtype, device
        self.shards = ShardGroup(process_group, rows, self._size, device, failure, dtype,
                                 None if refusal else WeightCheck(model, self.param_names), setup)
        self.num_data_passes = 0

    def weights(self) -> torch.Tensor:
        """A flat copy of the chosen parameters (their dtype and device)."""
        return self.local.weights()

    def _reduced(self, with_gradient: bool) -> tuple[float, torch.Tensor]:
        # sized from construction, not from the model: a model changed since (ModelChanged) is this rank's
        # failure inside the collective, which the others then raise at once, not after the group's timeout
        like = torch.empty(1 + (self._size if with_gradient else 0), dtype=torch.float64, device=self._device)

        def local() -> torch.Tensor:
            if not with_gradient:
                return torch.tensor([self.local.value()], dtype=torch.float64, device=self._device)
            value, grad = self.local.value_and_gradient()
            return torch.cat([torch.tensor([value], dtype=torch.float64, device=self._device), grad.double()])

        out = self.shards.combine(local if self.shards.shard_sizes[self.shards.rank] else None, like,
                                  "computing the objective")
        self.num_data_passes += 1
        return float(out[0]), out[1:].to(self._dtype)

    def value(self) -> float:
        """F at the model's current weights."""
        return self._reduced(False)[0]

    def gradient(self) -> torch.Tensor:
        """grad F at the model's current weights, a flat (d,) tensor of the parameters' dtype."""
        return self._reduced(True)[1]

    def value_and_gradient(self) -> tuple[float, torch.Tensor]:
        """Both, in one pass and one all_reduce."""
        return self._reduced(True)
