"""The interface every unlearning method implements."""
from __future__ import annotations

import abc
import copy
import functools
import itertools
import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checks import (
    check_finite_inputs,
    check_finite_model,
    check_module,
    check_not_meta,
    check_not_scripted,
    check_seed,
    first_nonfinite_model_weight,
    refusing_uncopyable,
)
from ..curvature.distributed import all_gather_objects
from ..curvature.params import WeightsKey, weights_key
from ..labeled import LabeledData
from ..training import check_dense_gradients, check_fits, model_device, seeded_rng, synchronize


@dataclass
class UnlearnResult:
    """What an unlearning method returns.

    Attributes:
        model: the unlearned model (a new module; the caller's model is never modified).
        seconds: wall time of the unlearning itself (on a CUDA device, until its queued kernels have run).
        hvps: Hessian-vector products used (0 for first-order methods).
        gradients: per-batch gradient evaluations used (a rough cost unit).
        diagnostics: method-specific values (step norm, gradient norm on D_r, epochs run, ...).
    """

    model: nn.Module
    seconds: float
    hvps: int = 0
    gradients: int = 0
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Unlearner(abc.ABC):
    """An unlearning method: ``unlearn(model, forget, retain) -> UnlearnResult``.

    Subclasses implement :meth:`_unlearn` on a private copy of the model; :meth:`unlearn` validates
    the inputs, copies the model (the user's model is never touched) and times the call.
    Hyper-parameters are constructor arguments with documented defaults.
    """

    #: short name used in tables and on the command line
    name: str = "unlearner"

    #: False for a method that trains none of the model's own parameters (a reference point, or a
    #: method that adds and trains adapters): a model without trainable parameters is then accepted
    trains_model_parameters: bool = True

    #: True for a method that trains the model in training mode: the model must give logits there too
    #: (checked before any work, on copies of its buffers)
    trains_in_training_mode: bool = False

    #: True for a method whose ``weight_decay`` is the L2 term of the objective it works on and whose
    #: ``loss_fn`` is that objective's loss (the Newton family): a study builds it with the training
    #: recipe's, the objective the original and the oracle were trained on
    uses_training_objective: bool = False

    #: for a method whose ``**kwargs`` are another method's options: that method, and the options of it
    #: that it does not take (a study records those defaults as the method's own)
    forwards_options_to: tuple[type[Unlearner], tuple[str, ...]] | None = None

    def unlearn(
        self,
        model: nn.Module,
        forget: LabeledData,
        retain: LabeledData,
        *,
        unseen: LabeledData | None = None,
        seed: int = 0,
    ) -> UnlearnResult:
        """Remove the influence of ``forget`` from ``model`` trained on ``forget`` + ``retain``.

        Args:
            model: the trained model f_orig (left unchanged).
            forget: D_f, the data to forget (non-empty).
            retain: D_r, the data that remains (non-empty).
            unseen: data the model never saw (validation split), used by methods that need it
                (e.g. LoTUS, RF-JSD style targets); None if unavailable.
            seed: seeds every random choice the method makes: an integer (Python or NumPy) in
                [0, 2**63) (torch's seed range, with room for the offsets a method adds to it).

        It may be called inside ``torch.no_grad()`` (the method uses autograd all the same) and on sets
        made inside ``torch.inference_mode()``, but not inside inference mode itself.

        Raises:
            TypeError: ``model`` is not an nn.Module (or cannot be copied: every method works on a
                copy), a set is not a LabeledData, ``seed`` not an integer.
            ValueError: before any work, naming the problem: ``seed`` out of range; a call inside
                ``torch.inference_mode()``; a model or sets on the meta device (no values); NaN/Inf in
                a parameter or a normalisation layer's running statistic of the model, or NaN in
                another buffer (which may hold Inf, as the curvature operators allow); a model
                without trainable parameters (requires_grad=True) for a method that trains them; an
                empty forget or retain set (or an empty ``unseen`` given), inputs with no features
                per sample, NaN/Inf in a set's inputs, samples whose shape does not fit the model
                (or no logits in training mode, for a method that trains in it),
                labels outside the model's classes, forget samples that are also in the retain set,
                or unseen samples that are also in the forget or retain set (same input and label).
                After the work: the method diverged (the same check of the unlearned model); the
                caller's model is unchanged.
        """
        work = self._checked_copy(model, forget, retain, unseen, seed=seed)
        seed = operator.index(seed)  # checked there (check_seed): a Python int from here on
        # inputs that require grad would collect gradients (and graphs) of the method's own passes, and
        # inference tensors cannot be saved for backward
        forget, retain = _detached(forget), _detached(retain)
        unseen = None if unseen is None else _detached(unseen)
        # seeded, and the caller's RNG state is left as it was; autograd on even under the caller's no_grad()
        device = model_device(work)
        with seeded_rng(seed, device), torch.enable_grad():
            synchronize(device)  # the copy's queued kernels are not the method's time
            start = time.perf_counter()
            result = self._unlearn(work, forget, retain, unseen=unseen, seed=seed)
            synchronize(device)  # a GPU method's last kernels may still be queued at its return
            result.seconds = time.perf_counter() - start
        check_finite_result(self.name, result.model)
        for p in result.model.parameters():  # the last step's gradients: memory, and a stale step for an optimizer
            p.grad = None
        return result

    def _checked_copy(self, model: nn.Module, forget: LabeledData, retain: LabeledData,
                      unseen: LabeledData | None, *, seed: int) -> nn.Module:
        """The input checks of :meth:`unlearn` (raising at the first problem), then the private copy
        of the model, which is run on one sample of each set. Data-parallel methods override it to
        agree with the other processes first (on the ``seed`` too, which a single process does not use here)."""
        work = checked_local_copy(self, model, forget, retain, unseen, seed)
        check_not_empty(self.name, rows_by_role(forget, retain, unseen))
        return work

    def check_model(self, model: nn.Module) -> None:
        """The checks of ``model`` that need no data, as :meth:`unlearn` makes them first: an
        nn.Module with finite weights (:func:`~unlearn_kernels.checks.first_nonfinite_weight`), and
        what the method's options name in it (parameters, adapter targets) exists. Raises
        TypeError/ValueError naming the problem."""
        _check_model(self.name, model)
        self._check_parameters(model)

    def _check_parameters(self, model: nn.Module) -> None:
        """The model has parameters for the method to train (unless it trains none of its own), none of
        them a sparse embedding (:func:`~unlearn_kernels.training.check_dense_gradients`)."""
        if self.trains_model_parameters and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{self.name}: the model has no trainable parameters (requires_grad=True)")
        if self.trains_model_parameters:
            check_dense_gradients(self.name, model)

    @abc.abstractmethod
    def _unlearn(
        self, model: nn.Module, forget: LabeledData, retain: LabeledData, *, unseen: LabeledData | None, seed: int
    ) -> UnlearnResult:
        """Unlearn in place on ``model`` (already a private copy) and return the result."""


# ---------------------------------------------------------------------------------------------
# input checks: one place for every method, before any work


def checked_local_copy(method: Unlearner, model: nn.Module, forget: LabeledData, retain: LabeledData,
                        unseen: LabeledData | None, seed: Any) -> nn.Module:
    """The checks of the call (the seed, inference mode), of the model and of the sets this process holds
    (emptiness aside), then the private copy of the model, run on one sample of each non-empty set (and made
    again where that forward wrote the copy's parameters or buffers: the method starts from the given ones). A
    data-parallel method runs them inside its first collective, so that a rank that fails any of them
    is named to the others there."""
    check_seed(f"{method.name}: seed", seed)
    # every tensor made under inference mode is an inference tensor, which autograd cannot use: refuse up front
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{method.name}: cannot unlearn inside torch.inference_mode() (the method trains with "
                         "autograd); call it outside")
    method.check_model(model)
    sets = _check_sets(method.name, forget, retain, unseen)
    work = _private_copy(method.name, model)
    state = _state_key(work)
    _check_fit(method, work, sets)
    if _state_key(work) != state:  # the probe's forward wrote the copy's own state (an Embedding with max_norm
        work = _private_copy(method.name, model)  # renormalises its rows in place): the given weights again
    return work


def _state_key(model: nn.Module) -> WeightsKey:
    """What changes when any of ``model``'s parameters or buffers is written (:func:`weights_key`)."""
    return weights_key(itertools.chain(model.parameters(), model.buffers()))


def _private_copy(name: str, model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with its parameters' gradient hooks, which deepcopy leaves out (a hook
    that masks rows of a weight was dropped, and a trained method moved them); each hook is copied with
    the model (a bound method or a ``functools.partial`` over the model then acts on the copy; a plain
    function or closure is shared). A model that cannot be copied is a TypeError that says why a copy
    is made."""
    memo: dict[int, object] = {}
    with refusing_uncopyable(name, "every method works on a copy (the given model stays as it is)"):
        work = copy.deepcopy(model, memo)
        hooks = [[copy.deepcopy(list((getattr(p, kind) or {}).values()), memo) for p in model.parameters()]
                 for kind in ("_backward_hooks", "_post_accumulate_grad_hooks")]
    for copied, gradient_hooks, accumulate_hooks in zip(work.parameters(), *hooks):
        # a weight hooked and then frozen keeps its hooks, but torch registers none on a frozen tensor
        frozen = not copied.requires_grad and bool(gradient_hooks or accumulate_hooks)
        if frozen:
            copied.requires_grad_(True)
        for hook in gradient_hooks:
            copied.register_hook(hook)
        for hook in accumulate_hooks:
            copied.register_post_accumulate_grad_hook(hook)
        if frozen:
            copied.requires_grad_(False)
    return work


def _check_model(name: str, model: nn.Module) -> None:
    """``model`` is an nn.Module, off the meta device, whose weights pass the rule the curvature
    operators apply (:func:`~unlearn_kernels.checks.first_nonfinite_weight`: a NaN/Inf weight would
    make every method return a NaN model, or fail deep inside its work; an Inf in a buffer such as an
    additive mask is harmless, and the Newton methods' operators accept it)."""
    check_module(f"{name}: model", model)
    # a copy of one shares its autograd graph with the caller's: its parameters are not leaves, its
    # gradients land in the caller's .grad, and optimizers refuse it
    check_not_scripted(name, model, "whose copies share gradients with it")
    check_not_meta(name, model)
    check_finite_model(name, model)


def check_finite_result(name: str, model: nn.Module) -> None:
    """The unlearned model's weights pass the same rule as the given model's: a step size too large
    makes a first-order method return a NaN model without any error of its own (one pass, one
    read-back per tensor). ValueError naming the method, the tensor and the likely cause."""
    bad = first_nonfinite_model_weight(model)
    if bad is not None:
        kind, key, what = bad
        raise ValueError(f"{name}: the unlearned model has {what} in its {kind} {key!r} (the method diverged: lower "
                         "its learning rate or step size); the caller's model is unchanged")


def _detached(data: LabeledData) -> LabeledData:
    """``data`` with inputs that do not require grad, and as normal tensors if made inside
    ``torch.inference_mode()`` (autograd cannot save those for backward; cloned here, outside it).
    The caller's tensors are never written."""
    x, y = (data.x.detach() if data.x.requires_grad else data.x), data.y
    x, y = (x.clone() if x.is_inference() else x), (y.clone() if y.is_inference() else y)
    return data if x is data.x and y is data.y else LabeledData(x, y)


def rows_by_role(forget: LabeledData, retain: LabeledData, unseen: LabeledData | None) -> dict[str, int]:
    """Rows of each set by role (``unseen`` only if given)."""
    return {"forget": len(forget), "retain": len(retain), **({} if unseen is None else {"unseen": len(unseen)})}


def check_not_empty(name: str, rows: dict[str, int], where: str = "") -> None:
    """Every set (rows by role) has rows; ``where`` qualifies the message (e.g. " on every rank")."""
    for role, count in rows.items():
        if count == 0:
            raise ValueError(f"{name}: the {role} set is empty{where}")


def _check_sets(name: str, forget: LabeledData, retain: LabeledData,
                unseen: LabeledData | None) -> dict[str, LabeledData]:
    """The checks that need no forward pass (emptiness aside: see :func:`check_not_empty`); returns
    the sets by name (``unseen`` only if given)."""
    sets = {"forget": forget, "retain": retain, **({} if unseen is None else {"unseen": unseen})}
    for role, data in sets.items():
        if not isinstance(data, LabeledData):
            raise TypeError(f"{name}: the {role} set must be a LabeledData, got {type(data).__name__}")
    if len({data.device for data in sets.values()}) > 1:
        raise ValueError(f"{name}: the sets are on different devices: "
                         + ", ".join(f"{role} on {data.device}" for role, data in sets.items()))
    if forget.device.type == "meta":
        raise ValueError(f"{name}: the sets are on the meta device (they have no values)")
    for role, data in sets.items():
        # else every row of a set is the same empty sample: met as "forget samples also in the retain set"
        if math.prod(data.x.shape[1:]) == 0:
            raise ValueError(f"{name}: the {role} set has no input features per sample (x of shape "
                             f"{tuple(data.x.shape)})")
    for role, data in sets.items():
        check_finite_inputs(name, f"the {role} set", data.x)
    for role, data in sets.items():
        if data.x.shape[1:] != forget.x.shape[1:]:
            raise ValueError(f"{name}: the {role} samples have shape {tuple(data.x.shape[1:])} but the forget "
                             f"samples {tuple(forget.x.shape[1:])}")
    shared = _shared_rows(forget, retain)
    if shared:
        raise ValueError(f"{name}: {len(shared)} forget samples are also in the retain set (same input and label; "
                         f"first at forget row {shared[0]}): a sample cannot be both forgotten and kept")
    if unseen is not None:
        for role, data in (("forget", forget), ("retain", retain)):
            shared = _shared_rows(unseen, data)
            if shared:
                raise ValueError(f"{name}: {len(shared)} unseen samples are also in the {role} set (same input and "
                                 f"label; first at unseen row {shared[0]}): unseen data must be data the model was "
                                 "not trained on")
    return sets


def _row_bytes(data: LabeledData, dtype: torch.dtype) -> np.ndarray:
    """The bytes of each input row in ``dtype``, (N, bytes) uint8 (a uint8 view covers every dtype); -0.0
    is written as 0.0 (the same value, other bytes)."""
    x = data.x.detach().reshape(len(data), math.prod(data.x.shape[1:])).to(dtype)
    if x.is_floating_point() or x.is_complex():
        x = x + 0.0  # -0.0 + 0.0 is +0.0
    return x.contiguous().cpu().view(torch.uint8).numpy()


def _row_hashes(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes and label, vectorised (a random linear form over the row's
    64-bit words, zero-padded; uint64 arithmetic wraps around). A matrix-vector product: no (N, words)
    temporary (a product then a sum took 3.5 ms a set of 29k rows of 256 bytes in a call, this 0.4)."""
    n, width = rows.shape
    if width % 8:
        padded = np.zeros((n, -(-width // 8) * 8), dtype=np.uint8)
        padded[:, :width] = rows
        rows = padded
    words = np.ascontiguousarray(rows).view(np.uint64)
    weights = np.random.default_rng(0).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | np.uint64(1)
    return (words @ weights) ^ (labels.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


class _HashedRows(NamedTuple):
    """A set's rows as bytes (N, bytes), its labels and the rows' hashes (see :func:`_row_hashes`)."""

    rows: np.ndarray
    labels: np.ndarray
    hashes: np.ndarray


def _hashed(forget: LabeledData, retain: LabeledData,
            dtype: torch.dtype | None = None) -> tuple[_HashedRows, _HashedRows]:
    """Both sets hashed in ``dtype``, by default their promoted dtype (int32 and int64 token ids, float16
    and float32 inputs of a model that casts them: the same samples)."""
    dtype = dtype or torch.promote_types(forget.x.dtype, retain.x.dtype)
    return _hashed_set(forget, dtype), _hashed_set(retain, dtype)


def _hashed_set(data: LabeledData, dtype: torch.dtype) -> _HashedRows:
    """One set's rows hashed in ``dtype``."""
    rows, labels = _row_bytes(data, dtype), data.y.cpu().numpy()
    return _HashedRows(rows, labels, _row_hashes(rows, labels))


def _confirmed(forget: _HashedRows, candidates: dict[int, list[tuple[bytes, int, int]]]) -> list[tuple[int, int]]:
    """``(forget row, tag)`` for each forget row equal, in bytes and label, to a candidate ``(row bytes,
    label, tag)`` listed under its hash: a hash collision cannot raise a false error."""
    found = []
    for i, h in enumerate(forget.hashes.tolist()):
        if h in candidates:
            sample = (forget.rows[i].tobytes(), int(forget.labels[i]))
            tag = next((tag for row, label, tag in candidates[h] if (row, label) == sample), None)
            if tag is not None:
                found.append((i, tag))
    return found


def _by_hash(hashed: _HashedRows, indices: Iterable[int], tag: Callable[[int], int]) -> dict[int, list]:
    """The candidates ``(row bytes, label, tag(j))`` of rows ``indices`` of ``hashed``, by hash."""
    out: dict[int, list[tuple[bytes, int, int]]] = {}
    for j in indices:
        out.setdefault(int(hashed.hashes[j]), []).append((hashed.rows[j].tobytes(), int(hashed.labels[j]), tag(j)))
    return out


def _shared_rows(forget: LabeledData, retain: LabeledData) -> list[int]:
    """Rows of ``forget`` whose input and label also occur in ``retain``: candidates by a hash of the
    row's bytes and label, confirmed exactly; sets of different dtypes compared in their promoted dtype."""
    f, r = _hashed(forget, retain)
    candidates = _by_hash(r, np.nonzero(np.isin(r.hashes, f.hashes))[0], int)
    return [i for i, _ in _confirmed(f, candidates)]


def rows_in_other_ranks_sets(sets: dict[str, LabeledData], pairs: Sequence[tuple[str, str]], group: Any,
                             device: torch.device, during: str) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """For each ``(mine, theirs)`` of ``pairs`` (roles of ``sets``, this rank's shards by role), ``(row of mine,
    rank)`` for each sample of this rank's ``mine`` shard that another rank of ``group`` holds in its ``theirs``
    shard (each rank checks its own shards alone): candidates by the rows' hashes, gathered from every rank,
    confirmed exactly on the rows themselves, as :func:`_shared_rows` does in one process. Three gathers
    whatever the number of pairs (the sets' dtypes, the hashes of the ``mine`` sets, the candidates). A
    collective: every rank of ``group`` calls it with the same roles and pairs, with its tensors on ``device``;
    ``during`` leads the error of a collective that fails or times out (as in
    :func:`~unlearn_kernels.curvature.distributed.all_reduce_released`)."""
    rank = dist.get_rank(group)
    gather = functools.partial(all_gather_objects, group=group, device=device, during=during)
    # one dtype on every rank, promoted over all the ranks' sets: each rank's own promotion hashed the same
    # samples (int32 ids on one rank, int64 on another) as different bytes
    dtypes = gather([str(data.x.dtype) for data in sets.values()])
    common = next(iter(sets.values())).x.dtype
    for name in (name for names in dtypes for name in names):
        common = torch.promote_types(common, getattr(torch, name.removeprefix("torch.")))
    hashed = {role: _hashed_set(data, common) for role, data in sets.items()}
    asked = list(dict.fromkeys(mine for mine, _ in pairs))
    hashes = gather({role: hashed[role].hashes.tolist() for role in asked})
    # this rank's rows of each pair's theirs set that another rank's mine set may hold, by hash
    offered = []
    for mine, theirs in pairs:
        others = np.array([h for k, per_rank in enumerate(hashes) if k != rank for h in per_rank[mine]],
                          dtype=np.uint64)
        offered.append(_by_hash(hashed[theirs], np.nonzero(np.isin(hashed[theirs].hashes, others))[0],
                                lambda j: rank))
    gathered = gather(offered)
    found = {}
    for index, (mine, theirs) in enumerate(pairs):
        candidates: dict[int, list[tuple[bytes, int, int]]] = {}
        for k, per_rank in enumerate(gathered):
            if k != rank:
                for h, entries in per_rank[index].items():
                    candidates.setdefault(h, []).extend(entries)
        found[(mine, theirs)] = _confirmed(hashed[mine], candidates)
    return found


def _check_fit(method: Unlearner, model: nn.Module, sets: dict[str, LabeledData]) -> None:
    """One sample of each set through ``model`` (the private copy): the samples must fit it, it must
    return (1, C) logits (in training mode too, for a method that trains in it), and every label must be
    in [0, C)."""
    for role, data in sets.items():
        if len(data):  # a data-parallel shard may be empty: nothing to run
            check_fits(method.name, model, data, role, in_training_mode=method.trains_in_training_mode)
