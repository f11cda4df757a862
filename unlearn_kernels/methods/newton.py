"""Newton-family unlearning (docs/methods.md, "Newton family"): CureNewton, its stochastic variant,
and the Newton-type baselines it is compared with, all on the same curvature operators.

Every method moves the chosen parameters w (flat) to lower the retain objective
``F(w) = L_r(w) + (weight_decay / 2) ||w||^2``, L_r the mean loss over D_r, using g = grad F(w)
(an :class:`~unlearn_kernels.curvature.Objective` over all of D_r) and H = its Hessian, an
operator from :func:`~unlearn_kernels.curvature.hessian_operator` (``path="auto"``: the fused MLP
kernel or the fused conv path where they apply, the generic operator's exact automatic mode otherwise, so any
twice-differentiable nn.Module that maps a batch to (batch, classes) outputs works; the methods check
that shape on a forget sample before any work) plus
``weight_decay I`` (:class:`~unlearn_kernels.curvature.RegularizedOperator`):

* :class:`CureNewton`: adaptive cubic-regularised Newton steps (ARC,
  :func:`~unlearn_kernels.solvers.adaptive_cubic_newton`), each minimising
  ``g^T s + 1/2 s^T H s + (M/6) ||s||^3`` and accepted only when F drops; H on a seeded subsample
  of D_r, g and the accept test on all of it;
* :class:`StochasticCureNewton`: T rounds of the gradient-descent subproblem solver on fresh
  mini-batches of D_r, the weights moving every round (the authors' StoCuReNU);
* :class:`NewtonPinv`: ``s = -pinv(H) g``;
* :class:`DampedNewton`: ``s = -(H + lambda I)^{-1} g``, solved exactly also when indefinite;
  :class:`DampedNewtonCG` the same system by conjugate gradients (stops at negative curvature);
* :class:`InfluenceNewton`: the influence-function update ``s = (n_f / n_r) (H + lambda I)^{-1}
  grad F_f(w)`` (equal to the Newton step on D_r when w minimises the training objective on D_f + D_r);
* :class:`LiSSANewton`: ``s = -(H + lambda I)^{-1} g`` by the LiSSA recursion.

Options shared by all (constructor arguments):

* ``params``: names of the parameters to update (e.g. the last layer's), one name or an ordered
  sequence of them (a set is refused: its order changes between processes, and the seeded draws
  with it); None = all trainable ones that the loss uses (see ``weight_decay``). Names, not
  tensors: the method works on a copy of the model, so the caller's tensors are not its.
* ``loss_fn``: the per-batch mean loss, ``F.cross_entropy`` by default (a torch loss, or a
  ``functools.partial`` of one, with a reduction other than the mean is refused; with class weights it
  needs ``batch_size=None``: each chunk's weighted mean divides by its own sum of weights).
* ``dtype``: compute g, H and s in this dtype (e.g. ``torch.float64``) on a converted copy of the
  model; the returned model keeps its own dtype. None = the parameters' dtype (float32 for a float16 or
  bfloat16 model: the curvature kernels and solvers compute in float32 or float64). One narrower than
  the parameters' is refused (rounding every weight to it could make the model worse with no step).
* ``batch_size``: stream the data through the objective and the operators in chunks of this many
  rows (same objective, same operator; default :data:`DEFAULT_BATCH_SIZE`, 2,048; None: all rows in
  one batch). The objective's compiled MLP pass on the CPU takes tensor data in one call whatever it is
  (see :class:`~unlearn_kernels.curvature.Objective`).
* ``weight_decay``: the L2 coefficient of F over the chosen parameters: pass the weight decay the
  model was trained with, so that the step aims at the retrained model's objective. 0 (the
  paper's L_r) by default. With ``params=None`` the parameters the eval-mode loss does not use (no
  gradient, e.g. a head that ``forward`` never calls) are left out, as training leaves them out of
  its decay: they come back unchanged.
* ``path``: the Hessian path ("auto", "generic" or "fused"; "fused" on a model that neither fused path
  takes is refused by ``check_model``, so before any work).
* ``process_group``: a ``torch.distributed`` process group for data-parallel unlearning: every rank
  calls ``unlearn`` with the same model, options and seed (other options are refused on every rank)
  and its own shard of D_f and D_r; F, its gradient and the Hessian products are reduced over all
  ranks' rows (weighted by shard size), and every rank takes the group's first rank's step (one broadcast:
  dense solves round apart with other thread counts), so every rank returns the same model. CureNewton's
  ``hessian_samples`` is one draw over all ranks' rows (each rank keeps its own), StoCuReNU's batch
  sizes count rows of each rank's shard, and ``M="auto"`` is refused (the Lipschitz estimate is not
  distributed). None (the default): one process.

Every method returns the model in eval mode (curvature is defined on the deterministic eval-mode
loss), never writes a non-finite value into it (a NaN/Inf step raises ValueError), reports the
Hessian-vector products from the operators' counters in ``UnlearnResult.hvps`` and counts every
gradient pass in ``gradients`` (batches per pass), including those each operator's construction takes
(the probe's two on the first batch with a row the loss counts, and the finite-difference check's where
the generic path makes one), and the probe
for parameters the loss does not use (with ``params=None``) (its probe product is in the operators' product
counters, so in ``hvps``). ``diagnostics`` hold at least ``step_norm`` (||w_new - w||), ``M`` (None for
the baselines), ``grad_norm_retain_before`` / ``_after`` (``||g||`` at the old and new weights),
``objective_before`` / ``_after`` (F), ``num_params`` and ``hessian_path``.

Sequential unlearning (a sequence of deletion requests): call ``unlearn`` again on the returned
model with the current remaining set; g and H are recomputed at the current weights.
"""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checks import (
    all_finite,
    check_batch_statistics,
    check_choice,
    check_int,
    check_number,
    check_option_names,
    is_out_of_memory,
    norm64,
)
from ..curvature import (
    PATHS,
    CurvatureOperator,
    DistributedObjective,
    Objective,
    RegularizedOperator,
    check_lipschitz_options,
    estimate_hessian_lipschitz,
    get_flat_parameters,
    hessian_operator,
    resolve_curvature_parameters,
    set_flat_parameters,
)
from ..curvature.probes import LossFn, checked_loss
from ..curvature.distributed import (
    GroupRef,
    all_reduce_released,
    broadcast_released,
    collective_device,
    text_fingerprint,
)
from ..curvature.factory import fused_path_refusal
from ..curvature.params import tie_pattern
from ..curvature.settings import value_text
from ..labeled import LabeledData
from ..training import model_device
from ..solvers import (
    DENSE_SOLVE_MAX_DIM,
    KRYLOV_DEFAULTS,
    KrylovCubicSolver,
    NewtonStep,
    adaptive_cubic_newton,
    check_arc_options,
    cubic_gd,
    damped_newton_step,
    damped_solver,
    pinv_solver,
    lanczos,
    lissa,
    pinv_newton_step,
)
from .base import (
    Unlearner,
    UnlearnResult,
    check_not_empty,
    checked_local_copy,
    rows_by_role,
    rows_in_other_ranks_sets,
)

#: rows per chunk of every pass over the data (objective, gradient, products): on the CPU, a pass over 29k
#: digits rows in chunks of 2,048 took 0.67x the time of one batch (the chunk's activations stay in cache)
DEFAULT_BATCH_SIZE = 2048


@dataclass
class _Workspace:
    """One request's state.

    ``model`` is the private copy returned to the caller, its chosen parameters of dtype
    ``model_dtype``; ``shadow`` is where curvature is computed: the model itself, or a copy converted
    to the compute dtype. ``w`` is the shadow's flat chosen parameters, ``retain`` D_r on the model's
    device, with floating inputs in the compute dtype where the shadow is a converted copy.
    """

    model: nn.Module
    model_dtype: torch.dtype
    shadow: nn.Module
    names: tuple[str, ...]
    w: torch.Tensor
    retain: LabeledData
    gradient_passes: int = 0
    hvps: int = 0


def _offset_seed(seed: int, count: int) -> int:
    """A base for the seeds ``base + k``, k < ``count``, of a method's successive solver calls (every one a
    torch seed, < 2**63, whatever seed in [0, 2**63) the caller gives): ``seed`` itself below
    ``2**63 - count``, folded back above."""
    return seed % (2**63 - count)


def _collective_device(model: Any) -> torch.device:
    """Where this rank's tensors for a collective live: on the model's device, as the curvature
    layer's (NCCL reduces CUDA tensors only, gloo either); the CPU for a model without parameters, a model on
    the meta device (:func:`~unlearn_kernels.curvature.distributed.collective_device`) or a non-model: refused by
    the input checks on this rank, which still takes part in the collective."""
    return collective_device(model_device(model)) if isinstance(model, nn.Module) else torch.device("cpu")


def check_per_sample_loss(owner: str, model: nn.Module) -> None:
    """ValueError naming the first batch-norm layer of ``model`` without running statistics
    (``track_running_stats=False``): it normalises with the batch's statistics in eval mode too, so a
    sample's loss depends on the rows batched with it. The Newton family's objective and curvature
    operators are means over samples, the same for any chunking of the data: with such a layer F, its
    gradient and its Hessian would change with ``batch_size`` and the Hessian's subsample, and a chunk
    of one row (a forget set of one row) could not be run at all. The curvature layer refuses such a
    layer too (:func:`~unlearn_kernels.curvature.probes.check_per_sample_forward`, as it refuses
    BatchNorm in training mode), but only when an operator or objective is built: this check makes
    the refusal before any work, under the method's name."""
    check_batch_statistics(owner, model, "the Newton methods take the loss, its gradient and its Hessian as means "
                           "over samples, which would then depend on how the data is chunked (batch_size, the "
                           "Hessian's subsample), and a chunk of one row could not be run at all; give the layer "
                           "running statistics, or use a first-order method")


def _torch_loss_options(loss_fn: Any) -> dict[str, Any]:
    """The ``reduction``, class ``weight`` and ``ignore_index`` of a torch loss: a module of torch.nn's losses
    (weight and ignore_index: cross entropy and NLL's), a function of torch.nn.functional, or a
    ``functools.partial`` of either (its keywords over the function's); {} for a loss of the user's own, taken at
    its word."""
    if isinstance(loss_fn, functools.partial):
        inner = _torch_loss_options(loss_fn.func)
        if getattr(loss_fn.func, "__module__", None) == F.__name__:  # F.cross_entropy(..., weight=, reduction=)
            inner.update({k: v for k, v in loss_fn.keywords.items() if k in ("weight", "reduction", "ignore_index")})
        return inner
    if isinstance(loss_fn, nn.modules.loss._Loss):
        if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            return {"reduction": loss_fn.reduction, "weight": loss_fn.weight, "ignore_index": loss_fn.ignore_index}
        return {"reduction": loss_fn.reduction}
    return {}


def _check_mean_loss(owner: str, loss_fn: LossFn, batch_size: Any, process_group: Any = None) -> None:
    """ValueError where ``loss_fn``'s values on chunks of the data do not combine into its value on all of it,
    as F, its gradient and the Hessian do (a mean over rows, weighted by the chunks' rows): a reduction other
    than the mean, or class weights or an ``ignore_index`` that is a class (each chunk's mean divides by its own
    sum of weights, or count of rows kept) unless the data is one chunk (``batch_size=None``, in one process: each
    rank's shard is a chunk too); read by
    :func:`_torch_loss_options`."""
    options = _torch_loss_options(loss_fn)
    reduction = options.get("reduction", "mean")
    if reduction != "mean":
        raise ValueError(f"{owner}: loss_fn has reduction={reduction!r}: the Newton methods take the loss as a mean "
                         "over rows (F, its gradient and Hessian combine the chunks of the data by their rows); use "
                         "reduction='mean'")
    if options.get("weight") is not None and batch_size is not None:
        raise ValueError(f"{owner}: loss_fn has class weights, whose mean over a chunk of the data divides by that "
                         f"chunk's sum of weights, so F would change with batch_size ({batch_size}): pass "
                         "batch_size=None (all rows in one chunk)")
    if options.get("weight") is not None and process_group is not None:
        raise ValueError(f"{owner}: loss_fn has class weights, whose mean over each rank's shard divides by that "
                         "shard's sum of weights, so F would change with how the rows are sharded: with a "
                         "process_group the loss must be a plain mean over rows (no class weights)")
    # an ignore_index below 0 matches no label the methods take (every label is a class in [0, C))
    ignored = options.get("ignore_index")
    if isinstance(ignored, int) and ignored >= 0 and (batch_size is not None or process_group is not None):
        chunks = (f"batch_size ({batch_size})" if process_group is None
                  else "how the rows are sharded over the process group")
        raise ValueError(f"{owner}: loss_fn has ignore_index={ignored}, a class label: each chunk's mean divides by "
                         f"its own count of rows not ignored, so F would change with {chunks} (a damped step by 0.77 "
                         "of its size between two shardings): pass batch_size=None in one process, or leave "
                         "ignore_index at its default")


def _check_not_another_word(owner: str, option: str, value: Any) -> None:
    """ValueError for a str other than "auto" given to an option that takes a number > 0 or "auto" (check_number's
    "a finite number" would hide the one word it takes)."""
    if isinstance(value, str) and value != "auto":
        raise ValueError(f"{owner}: {option} must be a number > 0 or 'auto', got {value!r}")


def narrower(dtype: torch.dtype | None, than: torch.dtype) -> bool:
    """Whether computing in ``dtype`` (None: in the weights' own) rounds weights of dtype ``than``: a copy in it
    could make the model worse on F with no step taken."""
    return dtype is not None and torch.finfo(dtype).eps > torch.finfo(than).eps


def options_text(owner: str, options: Mapping[str, Any]) -> str:
    """``owner(name=value, ...)`` for a method's constructor options, as text that is the same in every
    process for the same options (:func:`~unlearn_kernels.curvature.settings.value_text`)."""
    return f"{owner}({', '.join(f'{name}={value_text(value)}' for name, value in sorted(options.items()))})"


def _structure_text(model: nn.Module) -> str:
    """The model's parameters and buffers by name, shape, dtype and (parameters) trainable flag, and its
    tied parameters: what the ranks' collectives are sized by, before any value is compared (for a
    non-model, refused by the input checks inside the collective, its type)."""
    if not isinstance(model, nn.Module):
        return type(model).__name__
    parameters = [f"{n}{tuple(p.shape)}:{p.dtype}{'' if p.requires_grad else ':frozen'}"
                  for n, p in model.named_parameters()]
    # which slots share a parameter: ranks that tie one slot to different parameters blended two Hessians
    ties = [f"{name}={first}" for name, first in tie_pattern(model) if name != first]
    return "; ".join(parameters + [f"{n}{tuple(b.shape)}:{b.dtype}" for n, b in model.named_buffers()] + ties)


def agree_on_inputs(method: Unlearner, group: dist.ProcessGroup, options: str, model: nn.Module,
                    forget: LabeledData, retain: LabeledData, unseen: LabeledData | None, *, seed: int) -> nn.Module:
    """:meth:`Unlearner._checked_copy` of a data-parallel method: every rank checks its own shards and the
    ranks agree in one collective before any work: a rank whose inputs fail raises its own error and the
    others a RuntimeError naming it (no wait for the timeout), a rank's shard may be empty as long as each
    set has rows on some rank (``unseen`` given on every rank or on none), and every rank must have been
    given the same ``options`` (:func:`options_text`), a model of the same structure (parameter and buffer
    names, shapes, dtypes and trainable flags: the later collectives are sized by them, and ranks that
    differ crashed inside gloo) and the same ``seed`` (the ranks draw the same random vectors); otherwise
    every rank raises a ValueError saying what differs. Then the ranks compare their sets' rows (by hashes,
    confirmed on the rows): a rank whose forget samples another rank keeps in its retain set, or whose unseen
    samples another rank holds in its forget or retain set, raises the ValueError one process raises for them
    (naming the other rank), and the others a RuntimeError naming it."""
    # what the ranks must agree on: (its text, how a rank that differs is said to have been given it)
    agreed = {"options": (options, "other options"), "model": (_structure_text(model), "a model of another structure"),
              "seed": (str(seed), "another seed")}
    work, failure, rows = None, None, {}
    try:
        work = checked_local_copy(method, model, forget, retain, unseen, seed)
        rows = rows_by_role(forget, retain, unseen)
    except Exception as err:  # any: raised here after the others learn of it (a narrower catch left them waiting)
        failure = err
    roles = ("forget", "retain", "unseen")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # the set sizes and how many ranks were given each set, then per rank a failure flag and the fingerprints
    # (two numbers each) of what the ranks must agree on
    sizes, given, flags = 0, len(roles), 2 * len(roles)
    fingerprints = flags + world
    table = torch.zeros(fingerprints + 2 * len(agreed) * world, dtype=torch.float64, device=_collective_device(model))
    table[sizes:given] = torch.tensor([rows.get(role, 0) for role in roles], dtype=torch.float64)
    table[given:flags] = torch.tensor([float(role in rows) for role in roles], dtype=torch.float64)
    table[flags + rank] = float(failure is not None)
    mine = torch.tensor([half for text, _ in agreed.values() for half in text_fingerprint(text)], dtype=torch.float64)
    table[fingerprints + len(mine) * rank:fingerprints + len(mine) * (rank + 1)] = mine
    all_reduce_released(table, group, during=f"{method.name}, rank {rank} of {world}, agreeing on the inputs")
    if failure is not None:
        raise failure
    failed = [r for r, flag in enumerate(table[flags:fingerprints].tolist()) if flag]
    if failed:
        raise RuntimeError(f"{method.name}, rank {rank} of {world}: rank(s) {failed} refused their inputs (their own "
                           "error is raised there)")
    prints = table[fingerprints:].view(world, len(agreed), 2)
    # different options, models or seeds make different collectives: a crash inside gloo, a wait for the
    # timeout, another rank's "unknown call", or products of different vectors summed
    for index, (what, (text, given_other)) in enumerate(agreed.items()):
        others = [r for r in range(world) if not torch.equal(prints[r, index], prints[rank, index])]
        if others:
            raise ValueError(f"{method.name}, rank {rank} of {world}: rank(s) {others} were given {given_other}; "
                             "every rank must build the method alike and run it on the same model with the same "
                             f"seed. This rank's {what}: {text}")
    partly = [(role, int(n)) for role, n in zip(roles, table[given:flags].tolist()) if 0 < n < world]
    if partly:
        role, n = partly[0]
        raise ValueError(f"{method.name}: the {role} set is given on {n} of {world} ranks; give it on every rank (an "
                         "empty shard where a rank has none) or on none")
    totals = {role: int(n) for role, n in zip(roles, table[sizes:given].tolist()) if role in rows}
    check_not_empty(method.name, totals, " on every rank")
    # a sample forgotten on one rank and kept on another, or an unseen sample of one rank in another's forget or
    # retain set: each rank saw its own shards only (in the same three gathers, with or without unseen)
    comparing = f"{method.name}, rank {rank} of {world}, comparing the sets' rows"
    pairs = [("forget", "retain"), *([("unseen", "forget"), ("unseen", "retain")] if unseen is not None else [])]
    sets = {"forget": forget, "retain": retain, **({"unseen": unseen} if unseen is not None else {})}
    shared = rows_in_other_ranks_sets(sets, pairs, group, table.device, comparing)
    # per rank: whether it holds forget samples kept elsewhere, and unseen samples forgotten or kept elsewhere
    flags = torch.zeros(2, world, dtype=torch.float64, device=table.device)
    flags[0, rank] = float(bool(shared[("forget", "retain")]))
    flags[1, rank] = float(any(shared.get(("unseen", role)) for role in ("forget", "retain")))
    all_reduce_released(flags, group, during=comparing)
    if shared[("forget", "retain")]:
        found = shared[("forget", "retain")]
        row, other = found[0]
        raise ValueError(f"{method.name}: {len(found)} forget samples of rank {rank} are also in another rank's "
                         f"retain set (same input and label; first at forget row {row}, in rank {other}'s): a "
                         "sample cannot be both forgotten and kept")
    for role in ("forget", "retain"):
        found = shared.get(("unseen", role))
        if found:
            row, other = found[0]
            raise ValueError(f"{method.name}: {len(found)} unseen samples of rank {rank} are also in another rank's "
                             f"{role} set (same input and label; first at unseen row {row}, in rank {other}'s): "
                             "unseen data must be data the model was not trained on")
    kept, seen = ([r for r, flag in enumerate(row) if flag] for row in flags.tolist())
    if kept:
        raise RuntimeError(f"{method.name}, rank {rank} of {world}: rank(s) {kept} hold forget samples that "
                           "another rank keeps in its retain set (their own error is raised there)")
    if seen:
        raise RuntimeError(f"{method.name}, rank {rank} of {world}: rank(s) {seen} hold unseen samples that another "
                           "rank holds in its forget or retain set (their own error is raised there)")
    return work


class _NewtonFamily(Unlearner):
    """Options, data preparation, objective, operators and the guarded update shared by the Newton methods."""

    uses_training_objective = True  # F = L + (weight_decay / 2) ||w||^2, the training objective

    #: what to change when the method's step takes the weights where the gradient is not finite
    _divergence_remedy = "regularise the step more"

    def __init__(self, *, params: str | Sequence[str] | None, loss_fn: LossFn, dtype: torch.dtype | None,
                 batch_size: int | None, weight_decay: float, path: str, process_group: Any) -> None:
        if params is not None:
            # a set's order follows string hashing, which changes between processes: the flat vector, and the
            # seeded draws over it, would too, so the same seed would not give the same model
            if isinstance(params, (set, frozenset)) or not isinstance(params, (str, Iterable)):
                raise TypeError(f"{self.name}: params must be None, a parameter name or an ordered sequence (list, "
                                f"tuple) of names, got {type(params).__name__}")
            params = (params,) if isinstance(params, str) else tuple(params)
            if not params or not all(isinstance(p, str) for p in params):
                raise TypeError(f"{self.name}: params must be None or parameter names such as 'fc.weight' (the "
                                "method works on a copy of the model, so tensors of the caller's model cannot be "
                                f"matched), got {params!r}")
        if not callable(loss_fn):
            raise TypeError(f"{self.name}: loss_fn must be callable (outputs, targets) -> scalar, "
                            f"got {type(loss_fn).__name__}")
        _check_mean_loss(self.name, loss_fn, batch_size, process_group)
        if dtype not in (None, torch.float32, torch.float64):  # the curvature kernels compute in these two
            raise TypeError(f"{self.name}: dtype must be None, torch.float32 or torch.float64, got {dtype!r}")
        check_choice(f"{self.name}: path", path, PATHS)
        self.params = params
        self.loss_fn = loss_fn
        self.dtype = dtype
        self.batch_size = None if batch_size is None else check_int(f"{self.name}: batch_size", batch_size)
        self.weight_decay = check_number(f"{self.name}: weight_decay", weight_decay, 0.0)
        self.path = path
        self._group = None if process_group is None else GroupRef(process_group, self.name)

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The process group (held weakly, see :class:`~unlearn_kernels.curvature.distributed.GroupRef`), or None."""
        return None if self._group is None else self._group()

    # -- preparation
    def _check_parameters(self, model: nn.Module) -> None:
        """No batch-norm layer without running statistics (:func:`check_per_sample_loss`); named
        ``params`` must exist in the model (they may be frozen); None needs trainable ones; either way
        what :func:`~unlearn_kernels.curvature.resolve_curvature_parameters` refuses is refused here, up front."""
        check_per_sample_loss(self.name, model)
        if self.params is None:
            super()._check_parameters(model)
        try:  # also a chosen sparse embedding, whose sparse gradient the operators do not take
            chosen = resolve_curvature_parameters(model, self.params)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{self.name}: {error}") from None
        # path="fused" on a model no fused path takes was refused at the first product: in a study, after the
        # original and the oracle had trained. Not on a half-precision model, which the method converts first;
        # with params=None the parameters the loss uses are chosen from the data, later.
        if self.path == "fused" and not any(p.dtype in (torch.float16, torch.bfloat16) for p in chosen.values()):
            reason = fused_path_refusal(model, self.loss_fn, self.params, check_selection=self.params is not None)
            if reason is not None:
                raise ValueError(f"{self.name}: path='fused' cannot be used: {reason}")

    def _cast(self, data: LabeledData, like: torch.Tensor, converted: bool) -> LabeledData:
        """``data`` on ``like``'s device; where the model was ``converted`` to the compute dtype, floating
        inputs in that dtype too (integer inputs, e.g. tokens, kept). An unconverted model takes the
        data as the caller gave it (a frozen bfloat16 backbone under a float32 head takes bfloat16)."""
        x = data.x.to(like.device)
        convert = converted and x.is_floating_point()
        return LabeledData(x.to(like.dtype) if convert else x, data.y.to(like.device))

    def _prepare(self, model: nn.Module, retain: LabeledData) -> _Workspace:
        model.eval()
        chosen = resolve_curvature_parameters(model, self.params)
        dtypes = {p.dtype for p in chosen.values()}
        if len(dtypes) > 1:
            raise ValueError(f"{self.name}: the chosen parameters mix dtypes {sorted(map(str, dtypes))}; "
                             "choose parameters of one dtype")
        names, model_dtype = tuple(chosen), dtypes.pop()
        if narrower(self.dtype, model_dtype):
            raise ValueError(f"{self.name}: dtype={self.dtype} is narrower than the chosen parameters' {model_dtype}: "
                             "the copy computed in it rounds every weight, so the model returned could be worse on F "
                             "than the one given with no step taken; pass dtype=None or a wider one")
        # the curvature kernels and solvers compute in float32 or float64: a half-precision model gets float32
        compute = self.dtype or (torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype)
        shadow = model if compute == model_dtype else copy.deepcopy(model).to(compute)
        w = get_flat_parameters(shadow, names)
        ws = _Workspace(model, model_dtype, shadow, names, w, self._cast(retain, w, shadow is not model))
        if self.params is None:
            ws.names = self._used_by_loss(ws)
            ws.w = get_flat_parameters(shadow, ws.names)
        return ws

    #: rows of D_r (at most ``batch_size``) the probe for parameters the loss does not use runs on
    USE_PROBE_ROWS = 256

    def _used_by_loss(self, ws: _Workspace) -> tuple[str, ...]:
        """``ws.names`` without the parameters the eval-mode loss does not depend on (no gradient on the
        first :attr:`USE_PROBE_ROWS` rows of D_r; with a process group, on no rank's): training skips
        their weight decay, and F's decay term over them would shrink them (a pseudo-inverse step to zero)
        although nothing else moves them. A parameter only later rows reach would be left out too. The
        probe counts as one gradient pass. ValueError if none is used (a loss made by an argmax, say, has
        no gradient at all); the model's or torch's error on the rows (a token id past an embedding, say) as a
        ValueError naming the method. With a process group a rank whose probe fails raises its error and the
        others a RuntimeError naming it (no wait for a timeout)."""
        params = dict(ws.shadow.named_parameters())
        names = ws.names
        # the flags of the parameters, whether this rank probed (the probe counts once, as one process's would), then
        # this rank's failure
        used = torch.zeros(len(names) + 2, dtype=torch.float64, device=_collective_device(ws.shadow))
        failure = None
        if len(ws.retain):
            rows = min(self.USE_PROBE_ROWS, self.batch_size or self.USE_PROBE_ROWS)
            try:
                with torch.enable_grad():
                    # a copy of the rows: a model that writes its input in place would write the caller's data
                    x = ws.retain.x[:rows].clone()
                    loss = checked_loss(self.loss_fn, ws.shadow(x), ws.retain.y[:rows], self.name)
                    # a loss with no graph (outputs made by an argmax, say) uses none: torch's grad would raise
                    grads = (torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                             if loss.requires_grad else [None] * len(names))
                used[:-2] = torch.tensor([g is not None for g in grads], dtype=torch.float64)
            except Exception as error:  # any: raised below, after the other ranks learn of it
                failure = error
                used[-1] = 1.0
            used[-2] = 1.0
        if self.process_group is not None:
            all_reduce_released(used, self.process_group, dist.ReduceOp.MAX,
                                during=f"{self._where()}, finding the parameters the loss uses")
        if isinstance(failure, (RuntimeError, IndexError)) and not is_out_of_memory(failure):
            raise ValueError(f"{self.name}: the model cannot run on its retain rows: {failure}") from failure
        if failure is not None:
            raise failure
        if used[-1]:
            raise RuntimeError(f"{self.name}: another rank failed to run the loss on its retain rows (its own error "
                               "is raised there)")
        ws.gradient_passes += int(used[-2])
        kept = tuple(name for name, flag in zip(names, used[:-2].tolist()) if flag)
        if not kept:
            raise ValueError(f"{self.name}: the loss depends on none of the model's trainable parameters")
        return kept

    def _checked_copy(self, model: nn.Module, forget: LabeledData, retain: LabeledData,
                      unseen: LabeledData | None, *, seed: int) -> nn.Module:
        """With a process group, every rank checks its own shards and the ranks agree in one collective
        before any work (:func:`agree_on_inputs`)."""
        if self.process_group is None:
            return super()._checked_copy(model, forget, retain, unseen, seed=seed)
        return agree_on_inputs(self, self.process_group, self._options_text(), model, forget, retain, unseen,
                               seed=seed)

    def _options_text(self) -> str:
        """The method's class and constructor options (the process group left out), see :func:`options_text`."""
        return options_text(type(self).__qualname__, {name: value for name, value in vars(self).items()
                                                      if name != "_group"})

    def _batches(self, data: LabeledData, objective: Objective | DistributedObjective) -> int:
        """Batch gradients in one pass of ``objective`` over ``data``: over every rank's rows with a process
        group, as one process over all of them (as ``hvps`` counts; this rank's own batches made the count
        differ between the ranks, and match neither)."""
        rows = objective.shards.num_rows if isinstance(objective, DistributedObjective) else len(data)
        return 1 if self.batch_size is None else math.ceil(rows / self.batch_size)

    def _agreed_solver(self, local: str, order: tuple[str, ...], model: nn.Module) -> str:
        """``local``, the solver that ``solver="auto"`` picks from this process's free memory; with a process
        group the last in ``order`` (the least memory-hungry) that any rank picked, so that every rank runs
        the same solver and so the same collectives (ranks with different free memory, GPUs of one machine
        say, took different paths and crashed gloo)."""
        group = self.process_group
        if group is None:
            return local
        index = torch.tensor([float(order.index(local))], dtype=torch.float64, device=_collective_device(model))
        all_reduce_released(index, group, dist.ReduceOp.MAX, during=f"{self._where()}, agreeing on the solver")
        return order[int(index.item())]

    def _where(self) -> str:
        """The method and this rank of its process group ("cure_newton, rank 0 of 2"), for a collective's errors."""
        group = self.process_group
        return f"{self.name}, rank {dist.get_rank(group)} of {dist.get_world_size(group)}"

    def _named(self, build: Callable[[], Any]) -> Any:
        """``build()``, its plain ValueError/TypeError (the curvature layer's refusal of the model, the
        loss or the data, which names the operator) led by the method's name."""
        try:
            return build()
        except (TypeError, ValueError) as error:
            if type(error) not in (TypeError, ValueError):  # a subclass carries more than its message
                raise
            raise type(error)(f"{self.name}: {error}") from error

    def _solving(self, solve: Callable[[], Any]) -> Any:
        """``solve()`` (a solver run on the method's operator and objective); the solver's own refusal of
        what it met (a non-finite F at the given weights, a non-finite product, a step beyond the dtype: a
        ValueError, :class:`~unlearn_kernels.solvers.NonFiniteProduct`, ``StepOverflow``) led by the method's
        name and followed by the note the method's own errors carry: the same exception, its attributes kept."""
        try:
            return solve()
        except ValueError as error:
            if len(error.args) != 1 or str(error).startswith(f"{self.name}: "):
                raise
            error.args = (f"{self.name}: {error}; the caller's model is unchanged",)
            raise

    def _objective(self, ws: _Workspace, data: LabeledData) -> Objective | DistributedObjective:
        """F over ``data`` (with a process group: over every rank's ``data``) at the shadow's live weights;
        autograd with ``path="generic"``, else the compiled MLP pass where it applies (a fused path forced
        for the Hessian may be the convolutional one, which the objective does not have)."""
        path = "generic" if self.path == "generic" else "auto"
        if self.process_group is not None:
            return self._named(lambda: DistributedObjective(
                ws.shadow, self.loss_fn, data, ws.names, process_group=self.process_group,
                weight_decay=self.weight_decay, batch_size=self.batch_size, path=path))
        return self._named(lambda: Objective(ws.shadow, self.loss_fn, data, ws.names, weight_decay=self.weight_decay,
                                             batch_size=self.batch_size, path=path))

    def _global_rows(self, data: LabeledData, device: torch.device) -> int:
        """Rows of ``data`` over every rank (this rank's alone without a process group); ``device``:
        the model's."""
        return len(data) if self.process_group is None else sum(self._shard_sizes(len(data), device))

    def _shard_sizes(self, rows: int, device: torch.device) -> list[int]:
        """Every rank's ``rows``, in rank order (one all_reduce over the process group)."""
        group = self.process_group
        sizes = torch.zeros(dist.get_world_size(group), dtype=torch.float64, device=device)
        sizes[dist.get_rank(group)] = rows
        all_reduce_released(sizes, group, during=f"{self._where()}, counting the rows")
        return [int(n) for n in sizes.tolist()]

    def _hessian(self, ws: _Workspace, data: LabeledData) -> CurvatureOperator:
        """The Hessian of the mean loss over ``data`` (reads the shadow's weights live); the gradients its
        construction took (its probes; the finite-difference check of a double backward) are counted."""
        op = self._named(lambda: hessian_operator(ws.shadow, self.loss_fn, data, ws.names, path=self.path,
                                                  batch_size=self.batch_size, process_group=self.process_group))
        ws.gradient_passes += op.num_gradients
        return op

    def _curvature(self, op: CurvatureOperator) -> RegularizedOperator:
        """The Hessian of F: ``op + weight_decay I``."""
        return RegularizedOperator(op, self.weight_decay)

    def _gradient(self, ws: _Workspace, objective: Objective, data: LabeledData, *,
                  moved: bool = False) -> torch.Tensor:
        """grad F over ``data`` (``objective``'s) at the shadow's current weights (counted, checked finite;
        ``moved``: the weights are no longer the given ones)."""
        g = objective.gradient()
        ws.gradient_passes += self._batches(data, objective)
        return self._check_finite(g, moved=moved)

    def _check_finite(self, g: torch.Tensor, *, moved: bool = False) -> torch.Tensor:
        if all_finite(g):
            return g
        if moved:  # the inputs and the given weights were checked finite: the method's own step overflowed
            raise ValueError(f"{self.name}: the step diverged: the gradient of the loss at the new weights is not "
                             f"finite (NaN/Inf); {self._divergence_remedy}; the caller's model is unchanged")
        raise ValueError(f"{self.name}: the gradient of the loss is not finite (NaN/Inf in the data, the model "
                         "or the loss); the caller's model is unchanged")

    # -- the update
    def _agreed(self, ws: _Workspace, value: torch.Tensor, what: str) -> torch.Tensor:
        """``value``, a flat tensor of ``ws.w``'s size and dtype (a step, new weights); with a process group the
        group's first rank's, bit for bit, on every rank (one broadcast of d numbers,
        :func:`~unlearn_kernels.curvature.distributed.broadcast_released`). The ranks' dense solves (eigh, LDL)
        run on each rank alone, and LAPACK's bits depend on its thread count: ranks with 1 and 2 threads took
        damped_newton steps 3e-13 apart (d = 3,610), and newton_pinv's product at its step refused the ranks'
        steps as different inputs. ``what``: what the ranks are doing, for the errors ("agreeing on the step").
        A rank that fails before it (its local solve) raises alone, as before: the others, which may still be in
        the solver's collectives, wait for the group's timeout."""
        group = self.process_group
        if group is None:
            return value
        first = dist.get_rank(group) == 0
        device = collective_device(ws.w.device)
        out = (value.detach().reshape(-1).to(device, ws.w.dtype).contiguous() if first
               else torch.empty(ws.w.numel(), dtype=ws.w.dtype, device=device))
        broadcast_released(out, group, during=f"{self._where()}, {what}")
        return out

    def _set(self, ws: _Workspace, w: torch.Tensor) -> None:
        """Write w (the compute dtype) into the returned model (its dtype) and the shadow, refusing
        non-finite values; ``ws.w`` becomes the shadow's (rounded) weights. With a process group the weights
        written are the group's first rank's w on every rank (:meth:`_agreed`): the one place every Newton
        method writes its result, so the ranks return the same model bit for bit whatever their solvers'
        rounding (one broadcast of d numbers)."""
        new = self._agreed(ws, w, "agreeing on the new weights").to(ws.model_dtype)
        if not all_finite(new):
            raise ValueError(f"{self.name}: the computed step is not finite (NaN/Inf; a singular or badly scaled "
                             "system, or overflow in the model's dtype: try dtype=torch.float64); the caller's model "
                             "is unchanged")
        set_flat_parameters(ws.model, new, ws.names)
        if ws.shadow is not ws.model:  # the shadow holds exactly the returned (rounded) weights
            set_flat_parameters(ws.shadow, new.to(ws.w.dtype), ws.names)
        ws.w = get_flat_parameters(ws.shadow, ws.names)

    def _apply(self, ws: _Workspace, step: torch.Tensor) -> None:
        """w <- w + step (a non-finite step makes w + step non-finite: refused by :meth:`_set`)."""
        self._set(ws, ws.w + step)

    def _quadratic_value(self, H: Any, g: torch.Tensor, s: torch.Tensor) -> float:
        """``g^T s + 1/2 s^T H s`` (one product), in float64."""
        return float(g.double() @ s.double() + 0.5 * (s.double() @ H.matvec(s).double()))

    def _one_step(self, model: nn.Module, retain: LabeledData, solve: Callable[..., dict[str, Any]]) -> UnlearnResult:
        """The common shape of the one-step baselines: F and H on D_r; ``solve(ws, H, g)`` returns the
        step and its diagnostics; the ranks agree on the step (:meth:`_agreed`: the group's first rank's, before
        anything compares or uses it: newton_pinv's check product refused ranks whose eigendecompositions
        rounded apart); ``model_value`` at it; apply; F and its gradient after."""
        ws = self._prepare(model, retain)
        objective = self._objective(ws, ws.retain)
        op = self._hessian(ws, ws.retain)
        before = objective.value()
        g = self._gradient(ws, objective, ws.retain)
        H = self._curvature(op)
        solved = self._solving(lambda: solve(ws, H, g))
        step, start = self._agreed(ws, solved.pop("step"), "agreeing on the step"), ws.w
        solved["model_value"] = self._quadratic_value(H, g, step)
        self._apply(ws, step)
        after = self._gradient(ws, objective, ws.retain, moved=True)
        # how far the returned model moved: the step rounded to the model's dtype (in bfloat16 most of a
        # small step can round away)
        diagnostics = {"step_norm": norm64(ws.w - start), "M": None, "grad_norm_retain_before": norm64(g),
                       "grad_norm_retain_after": norm64(after), "objective_before": before,
                       "objective_after": objective.value(), "num_params": op.shape[0], "hessian_path": op.path,
                       **solved}
        return UnlearnResult(model=ws.model, seconds=0.0, hvps=op.num_products + ws.hvps,
                             gradients=ws.gradient_passes, diagnostics=diagnostics)


# ---------------------------------------------------------------------------------------------
# CureNewton


#: damped_newton's and influence's default MINRES iterations beyond the dense sizes (d > DENSE_SOLVE_MAX_DIM):
#: the most "minres-ldl" spends before its dense fallback (a ResNet-18 at width 4, d = 44,622: scipy's
#: default of 5 d products was two hours, with the relative residual at 1.4e-3 after 8,000)
MINRES_BUDGET = DENSE_SOLVE_MAX_DIM // 4

#: the smallest M that ``M="auto"`` uses (a quadratic loss estimates ~0; M -> 0 is Newton's step)
MIN_AUTO_M = 1e-6


class CureNewton(_NewtonFamily):
    """CureNewton (Bui et al., arXiv 2406.14507; "CuReNU" at ICLR 2026) with an adaptive constant:
    cubic-regularised Newton steps on the retain objective F, ``w <- w + s``,
    ``s = argmin g^T s + 1/2 s^T H s + (M/6) ||s||^3``, repeated in the manner of adaptive cubic
    regularisation (ARC, :func:`~unlearn_kernels.solvers.adaptive_cubic_newton`).

    The minimiser satisfies ``(H + sigma I) s = -g`` with ``sigma = (M/2) ||s||`` and ``H + sigma I``
    PSD: damped Newton whose damping is set by the problem. Each step is solved by the Krylov
    (Lanczos) solver and tried on all of D_r: it is accepted when F drops by at least ``eta1`` of
    the decrease the cubic model predicts; otherwise M is multiplied by ``gamma`` and the step
    re-solved on the same Lanczos tridiagonal (no new products). A step whose ratio is at least
    ``eta2`` divides M by ``gamma`` for the next one. The returned model is therefore never worse on
    F than the one given, whatever M (> 0) starts the iteration. H is the Hessian on a seeded
    subsample of ``hessian_samples`` rows of D_r (cheaper products; the accept test guards against a
    step that only suits the sample), g and F use all of D_r. The operators are built once per
    call and read the weights live.

    Args:
        M: the cubic constant of the first step, > 0 (default 0.1, our choice: the paper's per
            experiment values were not available, and the iteration adapts M; docs/methods.md
            says how the defaults were chosen). ``"auto"``: estimate
            the Hessian's Lipschitz constant at the current weights on D_r with
            :func:`~unlearn_kernels.curvature.estimate_hessian_lipschitz` (its products are counted;
            at least :data:`MIN_AUTO_M`).
        max_iterations: most accepted steps (default 8). 1 is the one-step variant: one cubic step,
            with M raised until it lowers F.
        tol: stop once ``||g|| <= tol`` (default 1e-4).
        hvp_budget: stop before a new Lanczos run once this many products were used by the call,
            the generic path's construction probes and the ``M="auto"`` estimate included (those two
            always run in full: a budget below their cost, about 2 and 30 products, gives no step;
            with ``solver_options={"guard": True}`` the hard-case probe can add up to its
            ``probe_steps`` per step beyond it; 0: no step; None: no budget).
        hessian_samples: rows of D_r the Hessian is taken on (default 512; None or a number >= |D_r|:
            all of D_r), drawn from the unlearn seed (with a process group, over all ranks' rows in rank
            order: the sample one process draws over those rows).
        eta1, eta2, gamma, M_min: the accept threshold (0.1), the very-successful threshold (0.9),
            the factor M changes by (2.0) and the smallest M after lowering (1e-6).
        max_rejections: most rejected trials in a row at one point (default 1000); the last of them
            ends the call ("max_rejections"), with the last accepted weights.
        solver_options: options of :class:`~unlearn_kernels.solvers.KrylovCubicSolver` over
            :data:`~unlearn_kernels.solvers.KRYLOV_DEFAULTS` (``k_max`` 50, ``kappa`` 0.5, no
            hard-case probe); ``seed`` comes from the unlearn seed; ``two_pass`` is refused (a re-solve
            after a rejected step reuses the stored basis).
        lipschitz_options: passed to ``estimate_hessian_lipschitz`` when ``M="auto"``
            (``num_directions``, ``radius``, ``power_iterations``, ``quantile``).
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.

    Diagnostics (besides the shared ones): ``M`` (the constant the next step would use),
    ``M_initial``, ``steps`` (accepted), ``stop_reason`` ("tolerance", "max_iterations",
    "hvp_budget", "no_progress" or "max_rejections"), ``iterations`` (one record per trial:
    ``iteration``, ``M``, ``predicted``, ``actual``, ``ratio``, ``accepted``, ``step_norm``, ``hvps``,
    ``lanczos_steps``, ``grad_norm``), ``step_norms`` (of the accepted steps), ``hessian_samples`` (rows
    used, over every rank) and ``rounding_reverted`` (with another compute ``dtype``: rounding the result
    to the model's dtype undid the decrease of F, so the given weights were returned). The trials and
    ``stop_reason`` are those of the iterate in the compute dtype; ``objective_after`` and
    ``grad_norm_retain_after`` are of the returned (rounded) weights.
    """

    name = "cure_newton"

    def __init__(self, M: float | str = 0.1, max_iterations: int = 8, tol: float = 1e-4,
                 hvp_budget: int | None = None, hessian_samples: int | None = 512, *, eta1: float = 0.1,
                 eta2: float = 0.9, gamma: float = 2.0, M_min: float = 1e-6, max_rejections: int = 1000,
                 solver_options: Mapping[str, Any] | None = None, lipschitz_options: Mapping[str, Any] | None = None,
                 params: str | Sequence[str] | None = None, loss_fn: LossFn = F.cross_entropy,
                 dtype: torch.dtype | None = None, batch_size: int | None = DEFAULT_BATCH_SIZE,
                 weight_decay: float = 0.0,
                 path: str = "auto", process_group: Any = None) -> None:
        super().__init__(params=params, loss_fn=loss_fn, dtype=dtype, batch_size=batch_size,
                         weight_decay=weight_decay, path=path, process_group=process_group)
        _check_not_another_word(self.name, "M", M)
        if M == "auto" and process_group is not None:
            raise ValueError(f"{self.name}: M='auto' estimates the Lipschitz constant on one process's data; with a "
                             "process_group give M as a number")
        checked = check_arc_options(self.name, M=1.0 if M == "auto" else M, max_iterations=max_iterations, tol=tol,
                                    hvp_budget=hvp_budget, eta1=eta1, eta2=eta2, gamma=gamma, M_min=M_min,
                                    max_rejections=max_rejections)
        self.M = M if M == "auto" else checked["M"]
        self.max_iterations, self.tol, self.hvp_budget = (checked["max_iterations"], checked["tol"],
                                                          checked["hvp_budget"])
        self.eta1, self.eta2 = checked["eta1"], checked["eta2"]
        self.gamma, self.M_min, self.max_rejections = checked["gamma"], checked["M_min"], checked["max_rejections"]
        self.hessian_samples = (None if hessian_samples is None
                                else check_int(f"{self.name}: hessian_samples", hessian_samples))
        for option, value in (("solver_options", solver_options), ("lipschitz_options", lipschitz_options)):
            if value is not None and not isinstance(value, Mapping):  # else dict()'s own message, naming nothing
                raise TypeError(f"{self.name}: {option} must be None or a mapping of option names to values, "
                                f"got {type(value).__name__}")
        self.solver_options = dict(solver_options or {})
        if "seed" in self.solver_options:
            raise ValueError(f"{self.name}: solver_options must not set 'seed' (it comes from the unlearn seed)")
        if self.solver_options.get("two_pass"):
            # a rejected trial leaves the weights at the trial point, where a replayed basis would be built
            raise ValueError(f"{self.name}: solver_options two_pass is not supported: a re-solve after a rejected "
                             "step reuses the stored Lanczos basis")
        check_option_names(f"{self.name}: solver_options", self.solver_options, KrylovCubicSolver, ("H", "g", "seed"))
        try:  # the values, now rather than at the first step: the solver checks them as it is built
            KrylovCubicSolver(torch.zeros(1, 1), torch.zeros(1), **{**KRYLOV_DEFAULTS, **self.solver_options})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{self.name}: solver_options: {error}") from None
        if lipschitz_options and M != "auto":  # else given and silently unused
            raise ValueError(f"{self.name}: lipschitz_options configure the estimate M='auto' makes; with M={M!r} "
                             "there is none")
        self.lipschitz_options = dict(lipschitz_options or {})
        check_option_names(f"{self.name}: lipschitz_options", self.lipschitz_options, estimate_hessian_lipschitz,
                            ("model", "loss_fn", "data", "params", "seed", "batch_size", "path"))
        self.lipschitz_options = check_lipschitz_options(f"{self.name}: lipschitz_options", **self.lipschitz_options)

    def _sample(self, data: LabeledData, seed: int, device: torch.device) -> tuple[LabeledData, int]:
        """The seeded Hessian subsample of D_r (in the data's order), or all of it, and its rows over every
        rank. With a process group it is one draw over all ranks' rows in rank order, of which each rank keeps
        its own: the sample one process draws from those rows, whatever the shards' sizes (a draw of
        ``hessian_samples`` rows per rank, each rank's weighing the same, leaned towards the small shards).
        ``device``: the model's."""
        sizes = [len(data)] if self.process_group is None else self._shard_sizes(len(data), device)
        n = sum(sizes)
        if self.hessian_samples is None or self.hessian_samples >= n:
            return data, n
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:self.hessian_samples]
        start = 0 if self.process_group is None else sum(sizes[:dist.get_rank(self.process_group)])
        mine = chosen[(chosen >= start) & (chosen < start + len(data))] - start
        return data.subset(mine.sort().values.to(data.device)), self.hessian_samples

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        ws = self._prepare(model, retain)
        objective = self._objective(ws, ws.retain)
        sample, sampled_rows = self._sample(ws.retain, seed, ws.w.device)
        op = self._hessian(ws, sample)
        H = self._curvature(op)
        extra: dict[str, Any] = {}
        M = self.M
        if M == "auto":
            try:
                estimate = estimate_hessian_lipschitz(ws.shadow, self.loss_fn, ws.retain, params=ws.names, seed=seed,
                                                      batch_size=self.batch_size, path=self.path,
                                                      **self.lipschitz_options)
            except ValueError as error:  # its radius and options are this method's lipschitz_options: say so
                raise ValueError(f"{self.name}: M='auto' (lipschitz_options {self.lipschitz_options}): "
                                 f"{error}") from None
            ws.hvps += estimate.num_hvps
            ws.gradient_passes += estimate.num_gradients
            M = max(estimate.value, MIN_AUTO_M)
            extra["lipschitz_estimate"] = estimate.value
        start = ws.w

        def move(w: torch.Tensor) -> None:
            if not torch.equal(w, ws.w):
                set_flat_parameters(ws.shadow, w, ws.names)
                ws.w = w

        # Every trial point (but a non-finite one, which ARC rejects unevaluated) is evaluated with its
        # gradient in one pass over D_r: ARC asks for the gradient right after the value at each accepted
        # point (w0 included), and a rejected trial (rare) wastes only the backward half of its pass.
        last: dict[str, Any] = {"w": None, "gradient": None}

        def value(w: torch.Tensor) -> float:
            move(w)
            f, last["gradient"] = objective.value_and_gradient()
            last["w"] = w
            ws.gradient_passes += self._batches(ws.retain, objective)
            return f

        def gradient(w: torch.Tensor) -> torch.Tensor:
            moved = not torch.equal(w, start)  # a non-finite gradient away from w0: the step diverged
            if last["w"] is not w:
                move(w)
                return self._gradient(ws, objective, ws.retain, moved=moved)
            return self._check_finite(last["gradient"], moved=moved)

        def hessian(w: torch.Tensor) -> RegularizedOperator:
            move(w)  # the operator reads the weights live
            return H

        # the budget covers the whole call: what the probes and the M="auto" estimate used is spent
        budget = None if self.hvp_budget is None else max(0, self.hvp_budget - op.num_products - ws.hvps)
        # a non-finite F(w0), gradient or product raises ValueError here: the caller's model is a different copy
        result = self._solving(lambda: adaptive_cubic_newton(
            value, gradient, hessian, start.clone(), M=M, max_iterations=self.max_iterations, tol=self.tol,
            hvp_budget=budget, eta1=self.eta1, eta2=self.eta2, gamma=self.gamma, M_min=self.M_min,
            max_rejections=self.max_rejections, solver_options=self.solver_options,
            seed=_offset_seed(seed, self.max_iterations)))
        self._set(ws, result.w)
        # in another compute dtype the returned weights are rounded: F and its gradient are re-evaluated
        # there, and in the (rare) case that rounding undid the decrease the given weights are returned
        # (start is exact in the model's dtype: the shadow was converted from it)
        after, grad_after, reverted = result.value, norm64(result.gradient), False
        if ws.shadow is not ws.model:
            after, gradient_after = objective.value_and_gradient()
            ws.gradient_passes += self._batches(ws.retain, objective)
            grad_after = norm64(gradient_after)
            if after > result.initial_value:
                self._set(ws, start)
                after, grad_after, reverted = result.initial_value, result.initial_grad_norm, True
        diagnostics = {
            "step_norm": norm64(ws.w - start), "M": result.M, "M_initial": M, "steps": result.steps,
            "stop_reason": result.stop_reason, "iterations": [asdict(t) for t in result.trials],
            "step_norms": [t.step_norm for t in result.trials if t.accepted],
            "grad_norm_retain_before": result.initial_grad_norm,
            "grad_norm_retain_after": grad_after,
            "objective_before": result.initial_value, "objective_after": after,
            "hessian_samples": sampled_rows, "rounding_reverted": reverted, "num_params": op.shape[0],
            "hessian_path": op.path, **extra,
        }
        return UnlearnResult(model=ws.model, seconds=0.0, hvps=op.num_products + ws.hvps,
                             gradients=ws.gradient_passes, diagnostics=diagnostics)


# ---------------------------------------------------------------------------------------------
# the stochastic variant and the baselines


class StochasticCureNewton(_NewtonFamily):
    """Stochastic CureNewton (StoCuReNU): ``T`` rounds, each with a fresh random mini-batch of D_r for g
    (``grad_batch_size`` rows) and another for H (``hess_batch_size`` rows), solving the cubic
    subproblem by gradient descent from the Cauchy point (:func:`~unlearn_kernels.solvers.cubic_gd`:
    K steps of size eta, g perturbed by ``noise * xi`` with xi uniform on the unit sphere) and moving
    the weights by the result every round, as the authors' code does.

    Defaults M=5, T=10, K=5, eta=0.01, noise=1e-3 are the authors' reported values (unverified);
    the batch sizes 512 (g) and 256 (H) are our choice (theirs were not available); a batch larger
    than D_r is all of D_r. Batches come from ``seed``. ``grad_norm_retain_before/after`` and
    ``objective_before/after`` are on all of D_r (two extra gradient passes); ``step_norm`` is the
    total displacement, ``round_step_norms`` the steps of the rounds, and sigma, model_value and
    residual those of the last round.

    Args:
        M, T, K, eta, noise: the cubic constant, outer rounds, gradient steps per round, step size
            and the norm of the perturbation of g.
        grad_batch_size, hess_batch_size: rows of the mini-batches for g and H.
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.
    """

    name = "stochastic_cure_newton"
    _divergence_remedy = "raise M or lower eta"

    def __init__(self, M: float = 5.0, T: int = 10, K: int = 5, eta: float = 0.01, noise: float = 1e-3,
                 grad_batch_size: int = 512, hess_batch_size: int = 256, *, params: str | Sequence[str] | None = None,
                 loss_fn: LossFn = F.cross_entropy, dtype: torch.dtype | None = None,
                 batch_size: int | None = DEFAULT_BATCH_SIZE,
                 weight_decay: float = 0.0, path: str = "auto", process_group: Any = None) -> None:
        super().__init__(params=params, loss_fn=loss_fn, dtype=dtype, batch_size=batch_size,
                         weight_decay=weight_decay, path=path, process_group=process_group)
        self.M = check_number(f"{self.name}: M", M, 0.0, strict=True)
        self.T = check_int(f"{self.name}: T", T)
        self.K = check_int(f"{self.name}: K", K, low=0)
        self.eta = check_number(f"{self.name}: eta", eta, 0.0, strict=True)
        self.noise = check_number(f"{self.name}: noise", noise, 0.0)
        self.grad_batch_size = check_int(f"{self.name}: grad_batch_size", grad_batch_size)
        self.hess_batch_size = check_int(f"{self.name}: hess_batch_size", hess_batch_size)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        ws = self._prepare(model, retain)
        full = self._objective(ws, ws.retain)  # the gradient norms and F on all of D_r
        objective_before = full.value()
        before = norm64(self._gradient(ws, full, ws.retain))
        start = ws.w.clone()
        generator = torch.Generator().manual_seed(seed)
        round_seed = _offset_seed(seed, self.T)
        n = len(ws.retain)

        def batch(size: int) -> LabeledData:
            return ws.retain.subset(torch.randperm(n, generator=generator)[:size].to(ws.retain.device))

        hvps = iterations = 0
        round_norms = []
        for t in range(self.T):
            grad_data, hess_data = batch(self.grad_batch_size), batch(self.hess_batch_size)
            g = self._gradient(ws, self._objective(ws, grad_data), grad_data, moved=t > 0)
            op = self._hessian(ws, hess_data)
            sub = self._solving(lambda: cubic_gd(self._curvature(op), g, self.M, K=self.K, eta=self.eta,
                                                 noise=self.noise, seed=round_seed + t))
            self._apply(ws, sub.step)
            hvps += op.num_products
            iterations += sub.iterations
            round_norms.append(sub.step_norm)
        after = norm64(self._gradient(ws, full, ws.retain, moved=True))
        diagnostics = {"step_norm": norm64(ws.w - start), "sigma": sub.sigma, "model_value": sub.model_value,
                       "grad_norm_retain_before": before, "grad_norm_retain_after": after,
                       "objective_before": objective_before, "objective_after": full.value(),
                       "solver_iterations": iterations, "hard_case": sub.hard_case, "M": self.M,
                       "residual": sub.residual, "converged": sub.converged, "round_step_norms": round_norms,
                       "num_params": ws.w.shape[0], "hessian_path": op.path}
        return UnlearnResult(model=ws.model, seconds=0.0, hvps=hvps, gradients=ws.gradient_passes,
                             diagnostics=diagnostics)


def _baseline_diagnostics(result: Any, sigma: float, solver: str | None = None) -> dict[str, Any]:
    """The diagnostics of a NewtonStep/LinearSolve-based baseline (no M, no hard case; ``model_value`` is added by
    ``_one_step``, at the step the ranks agreed on); ``solver`` names it where the result does not (a LinearSolve)."""
    return {"sigma": sigma, "solver": solver or result.method,
            "solver_iterations": result.iterations, "residual": result.residual, "converged": result.converged,
            **result.info}


class NewtonPinv(_NewtonFamily):
    """Newton's step with the pseudo-inverse, ``w <- w - pinv(H) g`` (a baseline of CureNewton): on a
    singular or indefinite H it takes huge steps along near-zero curvature.

    Args:
        solver: "eigh" (the exact pseudo-inverse: float64 eigendecomposition of the dense Hessian,
            d products, O(d^2) memory and O(d^3) time), "lanczos" (the truncated pseudo-inverse on
            the ``rank``-dimensional Lanczos space of g; the number of eigenvalues kept is
            ``rank`` in the diagnostics), "minres" (MINRES's minimum-norm solution) or "auto" (the
            default: "eigh" up to d = :data:`~unlearn_kernels.solvers.DENSE_MAX_DIM` where it fits in the
            memory available, else "lanczos").
        rcond: "eigh" and "lanczos": eigenvalues with ``|lambda| <= rcond max |lambda|`` count as 0,
            in [0, 1) (None, the default: 1e-6); with solver="minres", which has no cut-off, an rcond is
            refused.
        rank: "lanczos": Lanczos steps, the largest possible rank (default 300).
        tol, maxiter: "minres": relative tolerance (1e-10) and iteration cap (None: scipy's 5 d).
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.
    """

    name = "newton_pinv"
    _divergence_remedy = "raise rcond"

    def __init__(self, solver: str = "auto", rcond: float | None = None, rank: int = 300, tol: float = 1e-10,
                 maxiter: int | None = None, *, params: str | Sequence[str] | None = None,
                 loss_fn: LossFn = F.cross_entropy, dtype: torch.dtype | None = None,
                 batch_size: int | None = DEFAULT_BATCH_SIZE,
                 weight_decay: float = 0.0, path: str = "auto", process_group: Any = None) -> None:
        super().__init__(params=params, loss_fn=loss_fn, dtype=dtype, batch_size=batch_size,
                         weight_decay=weight_decay, path=path, process_group=process_group)
        self.solver = check_choice(f"{self.name}: solver", solver, ("auto", "eigh", "lanczos", "minres"))
        # rcond >= 1 counts every eigenvalue as 0: a zero step, the model returned unchanged
        if rcond is not None:
            rcond = check_number(f"{self.name}: rcond", rcond, 0.0, 1.0, strict_high=True)
            if self.solver == "minres":
                raise ValueError(f"{self.name}: rcond applies to solver 'eigh' and 'lanczos' only: MINRES's "
                                 "minimum-norm solution has no eigenvalue cut-off")
        self.rcond = rcond
        self.rank = check_int(f"{self.name}: rank", rank)
        self.tol = check_number(f"{self.name}: tol", tol, 0.0)
        self.maxiter = None if maxiter is None else check_int(f"{self.name}: maxiter", maxiter)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        def solve(ws: _Workspace, H: RegularizedOperator, g: torch.Tensor) -> dict[str, Any]:
            solver = (self._agreed_solver(pinv_solver(H.shape[0], H.device), ("eigh", "lanczos"), ws.shadow)
                      if self.solver == "auto" else self.solver)
            result = pinv_newton_step(H, g, rcond=self.rcond, solver=solver, rank=self.rank, tol=self.tol,
                                      maxiter=self.maxiter)
            return {"step": result.step, **_baseline_diagnostics(result, 0.0)}

        return self._one_step(model, retain, solve)


class DampedNewton(_NewtonFamily):
    """Damped Newton, ``w <- w - (H + damping I)^{-1} g`` with a hand-set damping (a baseline of
    CureNewton, whose damping is chosen by the problem), solved as it is also where
    ``H + damping I`` is indefinite.

    Args:
        damping: lambda >= 0 (default 0.01, the damping Koh and Liang use for influence functions).
        solver: "eigh" (float64 eigendecomposition of the dense Hessian: exact), "ldl" (the dense
            float64 matrix factored as L D L^T: exact, 1/25 of the eigendecomposition's time at d =
            9,610), "minres" (to ``tol``; ``converged`` also needs a true residual <= ``sqrt(tol) ||g||``),
            "minres-ldl" (MINRES, then "ldl" where MINRES has not
            converged within ``maxiter`` iterations, default d // 4) or "auto" (the default: "eigh" up
            to d = :data:`~unlearn_kernels.solvers.DENSE_MAX_DIM`, "minres-ldl" up to
            :data:`~unlearn_kernels.solvers.DENSE_SOLVE_MAX_DIM`, else "minres", a dense one only where it
            fits in the memory available: :func:`~unlearn_kernels.solvers.damped_solver`).
        tol, maxiter: MINRES's relative tolerance (1e-8; with float32 products the true residual
            stops improving near there, docs/methods.md gives measurements) and iteration cap
            (None: d // 4 for "minres-ldl"; for "auto" beyond the dense sizes, or where the dense
            fallback would not fit in memory, :data:`MINRES_BUDGET`, the most "minres-ldl" spends before
            its fallback, where scipy's 5 d took hours, and a step not solved to ``tol`` within it comes
            back with ``converged`` False; for "minres" chosen by name, scipy's 5 d).
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.
    """

    name = "damped_newton"
    _divergence_remedy = "raise damping"
    _solvers: tuple[str, ...] = ("auto", "eigh", "ldl", "minres", "minres-ldl")

    def __init__(self, damping: float = 0.01, solver: str = "auto", tol: float = 1e-8, maxiter: int | None = None, *,
                 params: str | Sequence[str] | None = None, loss_fn: LossFn = F.cross_entropy,
                 dtype: torch.dtype | None = None, batch_size: int | None = DEFAULT_BATCH_SIZE,
                 weight_decay: float = 0.0,
                 path: str = "auto", process_group: Any = None) -> None:
        super().__init__(params=params, loss_fn=loss_fn, dtype=dtype, batch_size=batch_size,
                         weight_decay=weight_decay, path=path, process_group=process_group)
        check_choice(f"{self.name}: solver", solver, self._solvers)
        self.damping = check_number(f"{self.name}: damping", damping, 0.0)
        self.solver = solver
        self.tol = check_number(f"{self.name}: tol", tol, 0.0)
        self.maxiter = None if maxiter is None else check_int(f"{self.name}: maxiter", maxiter)

    def _damped_solve(self, H: RegularizedOperator, b: torch.Tensor, model: nn.Module) -> NewtonStep:
        """``-(H + damping I)^{-1} b`` (``model``: the one H is of, for the ranks' agreement on the solver)."""
        solver = (self._agreed_solver(damped_solver(H.shape[0], H.device), ("eigh", "minres-ldl", "minres"), model)
                  if self.solver == "auto" else self.solver)
        auto_minres = self.solver == "auto" and solver == "minres"
        maxiter = MINRES_BUDGET if self.maxiter is None and auto_minres else self.maxiter
        options = {"tol": self.tol, "maxiter": maxiter} if solver in ("minres", "minres-ldl") else {}
        return damped_newton_step(H, b, self.damping, solver=solver, **options)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        def solve(ws: _Workspace, H: RegularizedOperator, g: torch.Tensor) -> dict[str, Any]:
            result = self._damped_solve(H, g, ws.shadow)
            return {"step": result.step, **_baseline_diagnostics(result, self.damping)}

        return self._one_step(model, retain, solve)


class DampedNewtonCG(DampedNewton):
    """Damped Newton by conjugate gradients, ``w <- w - (H + damping I)^{-1} g`` as CG finds it (the
    usual implementation of the baselines in the literature). CG stops at the first direction of
    negative curvature of ``H + damping I`` and returns its iterate there (``negative_curvature``
    in the diagnostics): on an indefinite Hessian this is not the damped Newton step
    (:class:`DampedNewton` solves the system).

    Args:
        damping: lambda >= 0 (default 0.01).
        tol, maxiter: CG's relative tolerance (1e-8) and iteration cap (200).
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.
    """

    name = "damped_newton_cg"

    def __init__(self, damping: float = 0.01, tol: float = 1e-8, maxiter: int = 200, *,
                 params: str | Sequence[str] | None = None, loss_fn: LossFn = F.cross_entropy,
                 dtype: torch.dtype | None = None, batch_size: int | None = DEFAULT_BATCH_SIZE,
                 weight_decay: float = 0.0,
                 path: str = "auto", process_group: Any = None) -> None:
        super().__init__(damping, "auto", tol, maxiter, params=params, loss_fn=loss_fn, dtype=dtype,
                         batch_size=batch_size, weight_decay=weight_decay, path=path, process_group=process_group)

    def _damped_solve(self, H: RegularizedOperator, b: torch.Tensor, model: nn.Module) -> NewtonStep:
        return damped_newton_step(H, b, self.damping, solver="cg", tol=self.tol, maxiter=self.maxiter)


class InfluenceNewton(DampedNewton):
    """The influence-function update (Koh and Liang 2017) for removing D_f:
    ``w <- w + (n_f / n_r) (H + damping I)^{-1} grad F_f(w)``, F_f the objective over D_f and H the
    Hessian of F over D_r, the damped system solved as :class:`DampedNewton` solves it.

    It is the Newton step on D_r when w minimises the training objective on D_f + D_r (there
    ``n_r grad F_r = -n_f grad F_f``, the weight decay term included); it uses only D_f's gradient,
    so the residual gradient of an imperfectly trained model on D_r is ignored.
    ``grad_norm_forget`` is added to the diagnostics.

    Args:
        damping, solver, tol, maxiter: as in :class:`DampedNewton` (default damping 0.01).
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.
    """

    name = "influence"

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        def solve(ws: _Workspace, H: RegularizedOperator, g: torch.Tensor) -> dict[str, Any]:
            forget_data = self._cast(forget, ws.w, ws.shadow is not ws.model)
            g_forget = self._gradient(ws, self._objective(ws, forget_data), forget_data)
            result = self._damped_solve(H, -g_forget, ws.shadow)
            step = result.step * (self._global_rows(forget, ws.w.device) / self._global_rows(retain, ws.w.device))
            return {"step": step, "grad_norm_forget": norm64(g_forget),
                    **_baseline_diagnostics(result, self.damping)}

        return self._one_step(model, retain, solve)


class LiSSANewton(_NewtonFamily):
    """Damped Newton by the LiSSA recursion (Agarwal et al. 2017; Koh and Liang 2017):
    ``w <- w - (H + damping I)^{-1} g``, the inverse applied as ``h_depth / scale`` with
    ``h_j = g + h_{j-1} - (H + damping I) h_{j-1} / scale`` (``h_0 = g``), on the full D_r.

    The recursion converges when the spectrum of ``H + damping I`` lies in ``(0, 2 scale)``; negative
    curvature makes it grow. ``scale="auto"`` takes ``max |theta| + damping`` over the extreme Ritz
    values of ``lanczos_steps`` Lanczos steps (products counted). A recursion that overflows, or whose
    residual ``||(H + damping I) s + g||`` exceeds ``(1 + 1e-3) ||g||`` (a component grew), raises ValueError.
    Negative curvature below ``-damping`` makes a component grow slowly, unseen by the residual for many
    steps: where the auto scale's smallest Ritz value shows it, the step (the truncated recursion, as the
    papers take it on networks) is returned with ``converged`` False and that value as ``lambda_min`` in
    the diagnostics (None with a given scale, which runs no Lanczos). ``converged`` True says that the
    recursion did not grow, not that the system is solved: the truncated recursion's residual is the
    diagnostics' ``residual``.

    Args:
        damping: lambda >= 0 (default 0.01).
        depth: recursion steps (default 100).
        scale: > 0, or "auto" (the default).
        lanczos_steps: Lanczos steps for ``scale="auto"`` (default 20; at least 2, one Ritz value per end).
        params, loss_fn, dtype, batch_size, weight_decay, path, process_group: see the module docstring.
    """

    name = "lissa"
    _divergence_remedy = "raise scale or damping"

    def __init__(self, damping: float = 0.01, depth: int = 100, scale: float | str = "auto",
                 lanczos_steps: int = 20, *, params: str | Sequence[str] | None = None,
                 loss_fn: LossFn = F.cross_entropy, dtype: torch.dtype | None = None,
                 batch_size: int | None = DEFAULT_BATCH_SIZE,
                 weight_decay: float = 0.0, path: str = "auto", process_group: Any = None) -> None:
        super().__init__(params=params, loss_fn=loss_fn, dtype=dtype, batch_size=batch_size,
                         weight_decay=weight_decay, path=path, process_group=process_group)
        self.damping = check_number(f"{self.name}: damping", damping, 0.0)
        self.depth = check_int(f"{self.name}: depth", depth)
        _check_not_another_word(self.name, "scale", scale)
        self.scale = scale if scale == "auto" else check_number(f"{self.name}: scale", scale, 0.0, strict=True)
        self.lanczos_steps = check_int(f"{self.name}: lanczos_steps", lanczos_steps, low=2)  # both ends: two values

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        def solve(ws: _Workspace, H: RegularizedOperator, g: torch.Tensor) -> dict[str, Any]:
            scale, lambda_min = self.scale, None
            if scale == "auto":
                # one parameter: one eigenvalue, both ends (two were asked for: a refusal about Ritz pairs)
                ends = lanczos(H, self.lanczos_steps, which="BE", num_eigs=min(2, H.shape[0]),
                               return_eigenvectors=False, seed=seed)
                scale = float(ends.eigenvalues.abs().max()) + self.damping
                lambda_min = float(ends.eigenvalues.min())
                if not scale > 0:
                    raise ValueError(f"{self.name}: the Hessian is zero and damping is 0: no scale for LiSSA")
            # curvature below -damping: the recursion grows along it, slowly at first (its residual stays
            # under ||g|| for many steps), so the Ritz value says so before the residual can
            indefinite = lambda_min is not None and lambda_min + self.damping < 0
            result = lissa(H, g, scale=scale, damping=self.damping, depth=self.depth)
            # not converged: non-finite iterates, or a residual above ||g||, which the truncated recursion
            # cannot leave when every eigenvalue of H + damping I is in [0, 2 scale] (see lissa)
            if not result.converged:
                cause = (f"H + damping I has negative curvature, smallest Ritz value {lambda_min:.3g} below -damping "
                         f"{-self.damping:g}, along which it grows: raise damping above {-lambda_min:.3g} at least (a "
                         "Ritz value: the smallest eigenvalue may be lower)"
                         if indefinite else f"scale {scale:.3g} is below half the largest eigenvalue of H + damping "
                         "I, or H has strong negative curvature: raise scale or damping")
                raise ValueError(f"{self.name}: the LiSSA recursion diverged ({cause}); the caller's model is "
                                 "unchanged")
            step = -result.solution
            return {"step": step, "scale": scale,
                    **_baseline_diagnostics(result, self.damping, "lissa"),
                    "lambda_min": lambda_min, "converged": result.converged and not indefinite}

        return self._one_step(model, retain, solve)
