"""Data-parallel curvature (curvature/distributed.py) with 2 and 3 gloo processes: products,
matmat, gradient and the objective equal to one process over all rows, the same Lanczos, cubic
step and CureNewton run (adaptive cubic regularisation, as the method runs it) on every rank, the
GGN, an empty shard, a failing rank that gives the others a clear error, ranks whose weights or
dtypes differ (the same clear error on every rank, at construction and after a weight change), and
the Newton methods on uneven or empty shards and on one rank's bad inputs; where a GPU is visible,
one NCCL rank.

Each test spawns its processes (torch.multiprocessing, a file store in tmp_path); the checks run
inside the workers, whose assertion errors fail the test through ``spawn``."""
from __future__ import annotations

import ast
import copy
import datetime
import functools
import gc
import math
import os
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp
from torch import nn

from unlearn_kernels.curvature import (
    DistributedObjective,
    DistributedOperator,
    ModelChanged,
    Objective,
    get_flat_parameters,
    ggn_operator,
    hessian_operator,
    set_flat_parameters,
)
from unlearn_kernels.curvature.distributed import WeightCheck, all_gather_objects, all_reduce_released
from unlearn_kernels.curvature.settings import value_text
from unlearn_kernels.labeled import LabeledData
from unlearn_kernels.methods import METHODS, CureNewtonLoRA
from unlearn_kernels.solvers import adaptive_cubic_newton, cubic_newton_step, lanczos

ROWS, FEATURES, CLASSES = 37, 6, 4
RTOL = 1e-12


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 tanh MLP and all the rows (the same on every rank: the seed is fixed)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double().eval()
    x = torch.randn(ROWS, FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    return model, x, y


def shard(rank: int, bounds: list[int]) -> slice:
    return slice(bounds[rank], bounds[rank + 1])


def _spawn(worker, args: tuple, nprocs: int) -> None:
    """``mp.spawn(worker, args, nprocs)``, each process leaving through :func:`_leave_after` (see there)."""
    mp.spawn(_leave_after, args=(worker, *args), nprocs=nprocs)


def _leave_after(rank: int, worker, *args) -> None:
    """Runs ``worker(rank, *args)`` (its checks, then its ``destroy_process_group``); once it has returned,
    the process leaves without the interpreter's finalisation (``os._exit(0)``). gloo's worker threads can
    still drop a finished collective's objects then, and one that takes the GIL while CPython finalises
    aborts the process ("terminate called without an active exception"; a core dump of 2026-12-04 showed it
    in Py_FinalizeEx): PyTorch's own race at exit, which the package narrows for its tensors
    (``all_reduce_released``, tested below) but which still aborted rank 2 of the three-process equivalence
    test in one CI run of 2026-12-06 (not seen in 20 runs of that test and 12 of this file since). A failing
    worker raises as before, for spawn to report."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, store: str, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    err = float((a - b).norm() / b.norm())
    assert err <= RTOL, f"relative difference {err:.2e}"


def _cure_newton(model: nn.Module, objective, H) -> torch.Tensor:
    """What CureNewton runs: adaptive cubic regularisation of the objective with H read live at the
    current weights (3 accepted steps at most, seed 0); returns the final weights."""
    names = objective.param_names

    def move(w: torch.Tensor) -> None:
        set_flat_parameters(model, w, names)

    def value(w):
        move(w)
        return objective.value()

    def gradient(w):
        move(w)
        return objective.gradient()

    def hessian(w):
        move(w)
        return H

    return adaptive_cubic_newton(value, gradient, hessian, get_flat_parameters(model, names).clone(), M=0.1,
                                 max_iterations=3, seed=0).w


def _same_on_every_rank(t: torch.Tensor) -> None:
    """Every rank's tensor, gathered by the package's own collective (see all_reduce_released), compared
    bitwise; the collective's tensors on t's device (NCCL reduces CUDA tensors only)."""
    gathered = all_gather_objects(t.cpu(), dist.group.WORLD, t.device)
    assert all(torch.equal(theirs, t.cpu()) for theirs in gathered), "ranks disagree"


def _equivalence_worker(rank: int, world: int, store: str, bounds: list[int]) -> None:
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = shard(rank, bounds)
        loss = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(1)
        for path in ("fused", "generic"):
            single = hessian_operator(model, loss, (x, y), path=path)
            op = hessian_operator(model, loss, (x[part], y[part]), path=path, process_group=dist.group.WORLD)
            assert isinstance(op, DistributedOperator) and op.shape == single.shape
            assert op.shards.shard_sizes == [bounds[r + 1] - bounds[r] for r in range(world)]
            assert op.shards.num_rows == ROWS
            v = torch.randn(op.shape[0], dtype=torch.float64, generator=gen)
            V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=gen)
            for got, want in ((op.matvec(v), single.matvec(v)), (op.matmat(V), single.matmat(V)),
                              (op.gradient(), single.gradient())):
                _close(got, want)
                _same_on_every_rank(got)
            # with the construction's products (the generic path's check), as one process counts them: a rank
            # with an empty shard counts them too (0 were counted, and a budget allowed more work than one process)
            assert op.num_products == single.num_products == 4 + (path == "generic") * 2 and op.num_data_passes == 3
        ggn = ggn_operator(model, loss, (x[part], y[part]), process_group=dist.group.WORLD)
        _close(ggn.matvec(v), ggn_operator(model, loss, (x, y)).matvec(v))
        # Solvers run on it unchanged, with the same result on every rank.
        eig = lanczos(op, 20, which="LA", num_eigs=3, seed=0, return_eigenvectors=False).eigenvalues
        _same_on_every_rank(eig)
        _close(eig, lanczos(single, 20, which="LA", num_eigs=3, seed=0, return_eigenvectors=False).eigenvalues)
        step = cubic_newton_step(op, op.gradient(), 1.0, method="krylov", seed=0).step
        _same_on_every_rank(step)
        _close(step, cubic_newton_step(single, single.gradient(), 1.0, method="krylov", seed=0).step)
        # The objective, and CureNewton's iteration on it, each on its own copy of the model.
        models = {"sharded": copy.deepcopy(model), "single": copy.deepcopy(model)}
        objective = DistributedObjective(models["sharded"], loss, (x[part], y[part]), process_group=dist.group.WORLD,
                                         weight_decay=1e-3)
        reference = Objective(models["single"], loss, (x, y), weight_decay=1e-3)
        value, grad = objective.value_and_gradient()
        assert abs(value - reference.value()) <= RTOL * abs(reference.value())
        _close(grad, reference.gradient())
        w = _cure_newton(models["sharded"], objective,
                         hessian_operator(models["sharded"], loss, (x[part], y[part]), process_group=dist.group.WORLD))
        _same_on_every_rank(w)
        _close(w, _cure_newton(models["single"], reference, hessian_operator(models["single"], loss, (x, y))))
        # The Newton-family methods take the process group themselves: each rank passes its shards of D_f
        # and D_r and gets the weights one process gets from all rows.
        forget_part = torch.tensor_split(torch.arange(10), world)[rank]
        retain_part = torch.tensor_split(torch.arange(10, ROWS), world)[rank]
        data = {"all": (LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:])),
                "shard": (LabeledData(x[forget_part], y[forget_part]), LabeledData(x[retain_part], y[retain_part]))}
        # hessian_samples: one draw over all ranks' rows (a draw of 9 rows per rank, each weighing the same,
        # made another step); the generic path's construction check counts in hvps and the budget (it did not
        # with a process group: fewer products counted, and a budget allowed more steps than one process takes)
        # gradients: counted as one process over all rows takes them, as hvps (each rank counted its own shard's
        # batches, 27 and 123 against one process's 147 at batch_size 7)
        options = [("cure_newton", dict(max_iterations=3, hessian_samples=None)),
                   ("cure_newton", dict(max_iterations=3, hessian_samples=9)),
                   ("cure_newton", dict(max_iterations=3, hessian_samples=None, batch_size=7)),
                   ("cure_newton", dict(max_iterations=3, hessian_samples=None, path="generic", hvp_budget=12)),
                   ("newton_pinv", {}), ("damped_newton", dict(damping=0.1)), ("influence", dict(damping=0.1))]
        for name, kwargs in options:
            weights, counts = {}, {}
            for which, group in (("shard", dist.group.WORLD), ("all", None)):
                method = METHODS[name](weight_decay=1e-3, process_group=group, **kwargs)
                result = method.unlearn(model, *data[which], seed=0)
                weights[which] = get_flat_parameters(result.model, [n for n, _ in result.model.named_parameters()])
                counts[which] = (result.hvps, result.gradients)
            _same_on_every_rank(weights["shard"])
            _close(weights["shard"], weights["all"])
            assert counts["shard"] == counts["all"], (name, kwargs, counts)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "bounds"), [(2, [0, 20, ROWS]), (3, [0, 5, 30, ROWS])])
def test_equals_one_process_over_all_rows(world, bounds, tmp_path):
    _spawn(_equivalence_worker, (world, str(tmp_path / "store"), bounds), world)


def _empty_shard_worker(rank: int, world: int, store: str) -> None:
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, ROWS) if rank == 0 else slice(0, 0)  # rank 1 holds no rows
        op = hessian_operator(model, nn.CrossEntropyLoss(), (x[part], y[part]), process_group=dist.group.WORLD)
        assert op.shards.shard_sizes == [ROWS, 0] and (op.local is None) == (rank == 1)
        single = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
        v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
        _close(op.matvec(v), single.matvec(v))
        _close(op.gradient(), single.gradient())
        _close(op.to_dense(), single.to_dense())
        generic = hessian_operator(model, nn.CrossEntropyLoss(), (x[part], y[part]), path="generic",
                                   process_group=dist.group.WORLD)
        # the construction's check (two products) counts on the rank that made none too
        one_process = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
        assert generic.num_products == one_process.num_products == 2
        # the empty shard's rank checks its input too, inside the collective
        expect = (TypeError, "dtype torch.float32") if rank == 1 else (RuntimeError, r"rank\(s\) \[1\] failed while")
        with pytest.raises(expect[0], match=expect[1]):
            op.matvec(v.float() if rank == 1 else v)
        objective = DistributedObjective(model, nn.CrossEntropyLoss(), (x[part], y[part]),
                                         process_group=dist.group.WORLD)
        _close(objective.gradient(), Objective(model, nn.CrossEntropyLoss(), (x, y)).gradient())
        chosen = DistributedObjective(model, nn.CrossEntropyLoss(), (x[part], y[part]), model[2].parameters(),
                                      process_group=dist.group.WORLD)  # a generator: read once
        _close(chosen.gradient(), Objective(model, nn.CrossEntropyLoss(), (x, y), ["2.weight", "2.bias"]).gradient())
        with pytest.raises(ValueError, match="every rank's shard is empty"):
            hessian_operator(model, nn.CrossEntropyLoss(), (x[:0], y[:0]), process_group=dist.group.WORLD)
        # a method whose retain shard is empty on rank 1: the same step, hvps and gradients as one process (the
        # probe for the parameters the loss uses counted on the rank that ran it alone: 15 against 2)
        forget, retain = (slice(0, 5), slice(10, ROWS)) if rank == 0 else (slice(5, 10), slice(0, 0))
        results = [METHODS["cure_newton"](max_iterations=2, process_group=group).unlearn(
                   model, LabeledData(x[rows], y[rows]), LabeledData(x[kept], y[kept]), seed=0)
                   for group, rows, kept in ((dist.group.WORLD, forget, retain), (None, slice(0, 10), slice(10, ROWS)))]
        assert [(r.hvps, r.gradients) for r in results[:1]] == [(r.hvps, r.gradients) for r in results[1:]]
    finally:
        dist.destroy_process_group()


def test_empty_shards(tmp_path):
    """One empty shard: the operator of the other's rows; all empty: a ValueError on every rank."""
    _spawn(_empty_shard_worker, (2, str(tmp_path / "store")), 2)


def _newton_methods_match_one_process(model: nn.Module, shards: tuple[LabeledData, LabeledData],
                                      forget: LabeledData, retain: LabeledData) -> None:
    """CureNewton and the influence update, each rank on its ``shards`` (forget, retain) with the
    group, return on every rank the weights one process returns on all of ``forget`` and ``retain``."""
    for name, kwargs in {"cure_newton": {"max_iterations": 2, "hessian_samples": None},
                         "influence": {"damping": 0.1}}.items():
        sharded = METHODS[name](process_group=dist.group.WORLD, **kwargs).unlearn(model, *shards, seed=0).model
        single = METHODS[name](**kwargs).unlearn(model, forget, retain, seed=0).model
        names = [n for n, _ in single.named_parameters()]
        _same_on_every_rank(get_flat_parameters(sharded, names))
        _close(get_flat_parameters(sharded, names), get_flat_parameters(single, names))


def _method_shards_worker(rank: int, world: int, store: str) -> None:
    """The Newton methods with uneven shards: rank 0 holds all of D_f and none of D_r, rank 1 the
    reverse; a set empty on every rank, and one rank's bad inputs, are refused on every rank at once.
    The group's timeout is far above any plausible run: a rank left waiting on the collective would
    hang the test, not pass it, and a timeout's error would not match the input errors expected."""
    _init(rank, world, store, timeout_s=600.0)
    try:
        model, x, y = model_and_data()
        forget, retain = LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:])
        mine = (forget, retain.subset(torch.arange(0))) if rank == 0 else (forget.subset(torch.arange(0)), retain)
        _newton_methods_match_one_process(model, mine, forget, retain)
        method = METHODS["cure_newton"](process_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="the forget set is empty on every rank"):
            method.unlearn(model, forget.subset(torch.arange(0)), retain, seed=0)
        bad = LabeledData(retain.x.clone(), retain.y)
        bad.x[3, 0] = float("nan")
        expect = (ValueError, "not finite") if rank == 1 else (RuntimeError, r"rank\(s\) \[1\] refused their inputs")
        with pytest.raises(expect[0], match=expect[1]):
            method.unlearn(model, forget, bad if rank == 1 else retain, seed=0)
        # CureNewtonLoRA takes part in the same agreement: it checked each rank alone, so rank 1, without forget
        # rows, refused them and rank 0 waited in CureNewton's collective until the group's timeout
        uneven = (forget, retain.subset(torch.arange(0))) if rank == 0 else (forget.subset(torch.arange(0)), retain)
        lora = CureNewtonLoRA(rank=2, max_iterations=1, process_group=dist.group.WORLD)
        _same_on_every_rank(get_flat_parameters(lora.unlearn(model, *uneven, seed=0).model))
        with pytest.raises(expect[0], match=expect[1]):
            lora.unlearn(model, forget, bad if rank == 1 else retain, seed=0)
        with pytest.raises(ValueError, match=rf"rank {rank} of 2: rank\(s\) \[{1 - rank}\] were given other options"):
            CureNewtonLoRA(rank=2 + rank, process_group=dist.group.WORLD).unlearn(model, forget, retain, seed=0)
        # a sample forgotten on rank 0 and kept on rank 1: each rank's own check saw no overlap, and the
        # step treated it as both forgotten and kept; refused on every rank now, before any work
        kept = LabeledData(torch.cat([retain.x, forget.x[2:3]]), torch.cat([retain.y, forget.y[2:3]]))
        mine = (forget, retain.subset(torch.arange(0))) if rank == 0 else (forget.subset(torch.arange(0)), kept)
        expect = ((ValueError, r"1 forget samples of rank 0 are also in another rank's retain set \(same input and "
                               r"label; first at forget row 2, in rank 1's\)") if rank == 0 else
                  (RuntimeError, r"rank\(s\) \[0\] hold forget samples that another rank keeps in its retain set"))
        for name in ("cure_newton", "damped_newton"):
            with pytest.raises(expect[0], match=expect[1]):
                METHODS[name](process_group=dist.group.WORLD).unlearn(model, *mine, seed=0)
        # the same with rank 0's sets in float32: each rank hashed the rows in its own promoted dtype (float32
        # bytes on rank 0, float64 on rank 1), and the shared sample went through
        single = LabeledData(forget.x.float(), forget.y)
        kept = LabeledData(torch.cat([retain.x, single.x[2:3].double()]), torch.cat([retain.y, forget.y[2:3]]))
        mine = ((single, LabeledData(retain.x.float(), retain.y).subset(torch.arange(0))) if rank == 0
                else (forget.subset(torch.arange(0)), kept))
        with pytest.raises(expect[0], match=expect[1]):
            METHODS["damped_newton"](process_group=dist.group.WORLD).unlearn(_AsDouble(model), *mine, seed=0)
        # options that differ between ranks, refused on every rank before any work: other params made one rank
        # run one more collective (gloo aborted the process), another M other collectives ("unknown call")
        for name, options in (("damped_newton", {"params": None if rank == 0 else ["2.weight", "2.bias"]}),
                              ("cure_newton", {"M": 0.1 if rank == 0 else 5.0})):
            with pytest.raises(ValueError, match=rf"rank {rank} of 2: rank\(s\) \[{1 - rank}\] were given other "
                                                 "options; every rank must build the method alike"):
                METHODS[name](process_group=dist.group.WORLD, **options).unlearn(model, forget, retain, seed=0)
        # refusals of the call itself on one rank (a bad seed, inference mode, no model): that rank raised before
        # the first collective, and the other waited for the group's timeout (or paired the call with its next)
        method = METHODS["damped_newton"](process_group=dist.group.WORLD)
        for case, expect in (("seed", (ValueError, r"seed must be in \[0, 2\*\*63\), got -1")),
                             ("inference", (ValueError, r"cannot unlearn inside torch.inference_mode\(\)")),
                             ("model", (TypeError, "model must be a torch.nn.Module, got NoneType"))):
            if rank == 0:
                expect = (RuntimeError, r"rank\(s\) \[1\] refused their inputs")
            with torch.inference_mode(case == "inference" and rank == 1), pytest.raises(expect[0], match=expect[1]):
                method.unlearn(None if case == "model" and rank == 1 else model, forget, retain,
                               seed=-1 if case == "seed" and rank == 1 else 0)
        # a slot tied to another parameter on each rank (the same values): the ranks blended two Hessians
        tied = [nn.Linear(FEATURES, FEATURES).double() for _ in range(3)]
        tied[1].load_state_dict(tied[0].state_dict())
        tied[2].weight = tied[rank].weight
        with pytest.raises(ValueError, match=rf"rank\(s\) \[{1 - rank}\] were given a model of another structure"):
            method.unlearn(nn.Sequential(*tied, nn.Tanh(), nn.Linear(FEATURES, CLASSES).double()), forget, retain,
                           seed=0)
        # a token id past an embedding in a later row of rank 1's retain shard (the input check runs one sample):
        # the probe of the parameters the loss uses raised a raw IndexError there, and rank 0 waited for the
        # group's timeout
        embedded = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(6, CLASSES)).double()
        pairs = torch.cartesian_prod(torch.arange(10), torch.arange(10))  # distinct rows: no sample both forgotten
        tokens = pairs[torch.randperm(100, generator=torch.Generator().manual_seed(1))[:ROWS]]  # and kept
        retain_tokens = LabeledData(tokens[10:].clone(), y[10:])
        if rank == 1:
            retain_tokens.x[5, 1] = 12
        expect = ((ValueError, r"^damped_newton: the model cannot run on its retain rows: index out of range") if rank
                  else (RuntimeError, r"^damped_newton: another rank failed to run the loss on its retain rows"))
        with pytest.raises(expect[0], match=expect[1]):
            method.unlearn(embedded, LabeledData(tokens[:10], y[:10]), retain_tokens, seed=0)
        assert method.unlearn(model, forget, retain, seed=0).model is not None  # the ranks are in step
    finally:
        dist.destroy_process_group()


class _AsDouble(nn.Module):
    """The inner model on its inputs cast to float64 (so float32 inputs fit it)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.double())


def test_newton_methods_with_empty_and_bad_shards(tmp_path):
    _spawn(_method_shards_worker, (2, str(tmp_path / "store")), 2)


class _CanFail(nn.Module):
    """The inner model, whose forward raises once ``fail`` is set."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.fail = inner, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("rank 1 ran out of memory (simulated)")
        return self.inner(x)


def _failure_worker(rank: int, world: int, store: str) -> None:
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        targets = y[part] if rank == 0 else y[part][:-1]  # rank 1's shard is malformed: no operator there
        expect = (ValueError, "inputs but") if rank == 1 else (RuntimeError, r"rank\(s\) \[1\] failed while building")
        with pytest.raises(expect[0], match=expect[1]):
            hessian_operator(model, nn.CrossEntropyLoss(), (x[part], targets), process_group=dist.group.WORLD)
        # Arguments refused on rank 1 alone (a parameter name, a path): rank 1 raised before the construction's
        # collective and rank 0 waited for the group's timeout; now rank 0 learns of it in that collective.
        shard = (x[part], y[part])
        builds = {
            "hessian params": lambda bad: hessian_operator(model, nn.CrossEntropyLoss(), shard,
                                                           ["2.weigth"] if bad else None,
                                                           process_group=dist.group.WORLD),
            "hessian path": lambda bad: hessian_operator(model, nn.CrossEntropyLoss(), shard, path="fuzed" if bad else
                                                         "auto", process_group=dist.group.WORLD),
            "ggn params": lambda bad: ggn_operator(model, nn.CrossEntropyLoss(), shard, ["2.weigth"] if bad else None,
                                                   process_group=dist.group.WORLD),
            "objective params": lambda bad: DistributedObjective(model, nn.CrossEntropyLoss(), shard,
                                                                 ["2.weigth"] if bad else None,
                                                                 process_group=dist.group.WORLD),
        }
        for name, build in builds.items():
            expect = ((ValueError, "no parameter named '2.weigth'|path must be one of") if rank == 1 else
                      (RuntimeError, r"rank\(s\) \[1\] failed while building"))
            with pytest.raises(expect[0], match=expect[1]):
                build(rank == 1)
        # The group is still usable: every rank took part in the reduction that reported the failure.
        wrapped = _CanFail(model)
        # no cache: every product runs the forward (the construction keeps the first batch's graph otherwise)
        op = hessian_operator(wrapped, nn.CrossEntropyLoss(), (x[part], y[part]), path="generic", cache_bytes=0,
                              process_group=dist.group.WORLD)
        wrapped.fail = rank == 1
        expect = (RuntimeError, "out of memory") if rank == 1 else (RuntimeError, r"rank\(s\) \[1\] failed while")
        with pytest.raises(expect[0], match=expect[1]):
            op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
        # A rank that refuses its input takes part too: the other raises at once, not at the timeout, and
        # the ranks stay in step (before, rank 0's matvec waited and was summed with rank 1's next call).
        wrapped.fail = False
        ones = torch.ones(op.shape[0], 2, dtype=torch.float64)
        good, bad = {"matvec": ones[:, 0], "matmat": ones}, {"matvec": ones[:, 0].float(), "matmat": ones.clone()}
        bad["matmat"][0, 1] = float("nan")
        errors = {"matvec": (TypeError, "dtype torch.float32"), "matmat": (ValueError, "NaN")}
        for name in ("matvec", "matmat"):
            expect = errors[name] if rank == 1 else (RuntimeError, rf"rank\(s\) \[1\] failed while computing a {name}")
            with pytest.raises(expect[0], match=expect[1]):
                getattr(op, name)((bad if rank == 1 else good)[name])
        single = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
        _close(op.matmat(ones), single.matmat(ones))
        # A model changed on one rank after an objective was built on it (ModelChanged): the objective read the
        # model before its collective, so rank 1 raised alone and rank 0 waited for the group's timeout.
        changed = copy.deepcopy(model)
        objective = DistributedObjective(changed, nn.CrossEntropyLoss(), shard, process_group=dist.group.WORLD)
        if rank == 1:
            changed[1] = nn.Tanh()
        expect = ((ModelChanged, "modules changed") if rank == 1 else
                  (RuntimeError, r"rank\(s\) \[1\] failed while computing the objective"))
        for call in (objective.value, objective.gradient):
            with pytest.raises(expect[0], match=expect[1]):
                call()
    finally:
        dist.destroy_process_group()


def test_failing_rank_gives_a_clear_error(tmp_path):
    _spawn(_failure_worker, (2, str(tmp_path / "store")), 2)


def _different_calls_worker(rank: int, world: int, store: str) -> None:
    """Ranks that make different calls at the same point with payloads of one size (a matvec against
    the gradient, the products of two operators): every rank raises the same RuntimeError naming the
    calls (they were summed before), and the ranks stay in step."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        loss, group = nn.CrossEntropyLoss(), dist.group.WORLD
        op = hessian_operator(model, loss, (x[part], y[part]), path="generic", process_group=group)
        ggn = ggn_operator(model, loss, (x[part], y[part]), process_group=group)
        v = torch.ones(op.shape[0], dtype=torch.float64)
        with pytest.raises(RuntimeError, match=r"made different calls at the same point \(rank 0: computing a matvec "
                                               r"on .* number 1; rank 1: computing the gradient on .* number 1\)"):
            op.matvec(v) if rank == 0 else op.gradient()
        with pytest.raises(RuntimeError, match=r"rank 0: computing a matvec on the group's distributed operator or "
                                               r"objective number 1; rank 1: computing a matvec on .* number 2\)"):
            (op if rank == 0 else ggn).matvec(v)
        single = hessian_operator(model, loss, (x, y), path="generic")
        _close(op.matvec(v), single.matvec(v))
    finally:
        dist.destroy_process_group()


def test_different_calls_are_refused_on_every_rank(tmp_path):
    _spawn(_different_calls_worker, (2, str(tmp_path / "store")), 2)


def _different_inputs_worker(rank: int, world: int, store: str) -> None:
    """Ranks that pass different vectors (a per-rank seed): each rank's product was of its own vector and the
    all_reduce returned their weighted sum, H v on no rank (0.996 and 0.625 off), and Lanczos with seed=rank gave
    each rank other eigenvalues, all without an error. Every rank raises the same ValueError now, at the first
    product, in float64 and in bfloat16 (the checksums travel as digits, exact in any dtype); the same vector
    passes."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            op = hessian_operator(copy.deepcopy(model).to(dtype), nn.CrossEntropyLoss(), (x[part].to(dtype), y[part]),
                                  path="generic", process_group=dist.group.WORLD)
            mine = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(rank)).to(dtype)
            refused = r"the ranks passed different inputs while computing a (matvec|matmat) \(checksums \(sum, sum of"
            calls = [lambda: op.matvec(mine[:, 0]), lambda: op.matmat(mine)]
            if dtype != torch.bfloat16:  # Lanczos takes float32 and float64
                calls.append(lambda: lanczos(op, 4, seed=rank, return_eigenvectors=False))
            for call in calls:
                with pytest.raises(ValueError, match=rf"^distributed curvature, rank {rank}: {refused}"):
                    call()
            same = torch.ones(op.shape[0], dtype=dtype)
            op.matvec(same)
            if dtype != torch.bfloat16:  # rounding apart (one formula, other thread counts): 1 ulp in every 7th entry
                near = torch.linspace(-1, 1, op.shape[0], dtype=dtype)
                if rank == 1:
                    near[::7] = torch.nextafter(near[::7], torch.tensor(2.0, dtype=dtype))
                op.matvec(near)  # refused at the float64 rule in float32
            if dtype == torch.float64:
                single = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
                _close(op.matvec(same), single.matvec(same))
    finally:
        dist.destroy_process_group()


def test_different_inputs_are_refused_on_every_rank(tmp_path):
    _spawn(_different_inputs_worker, (2, str(tmp_path / "store")), 2)


def _matmat_columns_worker(rank: int, world: int, store: str) -> None:
    """Ranks whose matmat inputs have different numbers of columns (2 on rank 0, 3 on rank 1) sent payloads of
    different sizes: gloo aborted rank 0's process (SIGABRT), the other got its "all_reduce failed". Every rank
    raises the same ValueError now, naming each rank's count; a rank whose input is no matrix raises its refusal
    and the others a RuntimeError naming it, at once; the same K passes."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        op = hessian_operator(model, nn.CrossEntropyLoss(), (x[part], y[part]), process_group=dist.group.WORLD)
        V = torch.ones(op.shape[0], 3, dtype=torch.float64)
        with pytest.raises(ValueError, match=rf"^distributed curvature, rank {rank}: the ranks passed matmat inputs "
                                             r"of different numbers of columns \(2, 3, in rank order\)"):
            op.matmat(V[:, :2 + rank])
        if rank == 1:
            with pytest.raises(ValueError, match=r"matrix must have shape \(\d+, K\) with K >= 1"):
                op.matmat(V[:, 0])  # a vector, no matrix
        else:
            with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] failed while computing a matmat"):
                op.matmat(V)
        single = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
        _close(op.matmat(V), single.matmat(V))
    finally:
        dist.destroy_process_group()


def test_matmat_inputs_of_different_widths_are_refused_on_every_rank(tmp_path):
    _spawn(_matmat_columns_worker, (2, str(tmp_path / "store")), 2)


def _bfloat16_tags_worker(rank: int, world: int, store: str) -> None:
    """The call tags travel in the payload's dtype: in bfloat16 the serial was one number, rounded above
    256 (301 became 300), so products of the 300th and 301st operators of a group were summed. Here the
    two ranks' operators carry those serials (set by hand: building 300 operators would only be slow)."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        model = model.to(torch.bfloat16)
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        op = hessian_operator(model, nn.CrossEntropyLoss(), (x[part].bfloat16(), y[part]), path="generic",
                              process_group=dist.group.WORLD)
        op.shards.serial = 300 + rank
        with pytest.raises(RuntimeError, match=r"rank 0: computing a matvec on the group's distributed operator or "
                                               r"objective number 300; rank 1: computing a matvec on .* number 301\)"):
            op.matvec(torch.ones(op.shape[0], dtype=torch.bfloat16))
        op.shards.serial = 2**16 - 1  # the largest serial sent; the same on both ranks passes
        op.matvec(torch.ones(op.shape[0], dtype=torch.bfloat16))
    finally:
        dist.destroy_process_group()


def test_call_tags_are_exact_in_bfloat16(tmp_path):
    _spawn(_bfloat16_tags_worker, (2, str(tmp_path / "store")), 2)


def _different_weights_worker(rank: int, world: int, store: str) -> None:
    """Ranks whose weights differ: at construction, or after one rank changed them (in place, through
    ``.data`` without a version bump, or on an empty shard's rank), every rank raises the same
    ValueError instead of blending two Hessians; the same update on every rank passes, one check per
    weight change and none per product."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        loss, group = nn.CrossEntropyLoss(), dist.group.WORLD
        moved, swapped = copy.deepcopy(model), copy.deepcopy(model)
        if rank == 1:
            with torch.no_grad():
                moved[0].weight.add_(1.0)
                # the same values in other places: sum and sum of squares agree, the weighted sum does not
                swapped[0].weight[[0, 1]] = swapped[0].weight[[1, 0]].clone()
        for build in (lambda m: hessian_operator(m, loss, (x[part], y[part]), path="fused", process_group=group),
                      lambda m: hessian_operator(m, loss, (x[part], y[part]), path="generic", process_group=group),
                      lambda m: ggn_operator(m, loss, (x[part], y[part]), process_group=group),
                      lambda m: hessian_operator(m, loss, (x[part], y[part]) if rank == 0 else (x[:0], y[:0]),
                                                 process_group=group),
                      lambda m: DistributedObjective(m, loss, (x[part], y[part]), process_group=group)):
            for differing in (moved, swapped):
                with pytest.raises(ValueError, match=r"the ranks hold different weights when the operator or "
                                                     r"objective was built \(checksums \(sum, sum of squares, "
                                                     r"position-weighted sum, non-finite pattern\) of the chosen "
                                                     r"parameters: \(.*\) on "
                                                     r"rank 0, \(.*\) on rank 1\)"):
                    build(differing)
        # The same weights at construction; then rank 1 alone moves them.
        v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
        for path in ("fused", "generic"):
            for how in ("add_", ".data", "empty shard"):
                mine = copy.deepcopy(model)
                data = (x[:0], y[:0]) if how == "empty shard" and rank == 1 else (x[part], y[part])
                every = (x[:20], y[:20]) if how == "empty shard" else (x, y)  # all ranks' rows
                single = hessian_operator(model, loss, every)
                op = hessian_operator(mine, loss, data, path=path, process_group=group)
                objective = DistributedObjective(mine, loss, data, process_group=group)
                checks = []
                check_weights = op.shards.check_weights
                op.shards.check_weights = lambda: checks.append(1) or check_weights()
                for _ in range(3):  # at fixed weights: no check
                    _close(op.matvec(v), single.matvec(v))
                objective.value()
                assert not checks
                if rank == 1:
                    with torch.no_grad():
                        (mine[2].bias.data if how == ".data" else mine[2].bias).add_(0.5)
                for call in (lambda: op.matvec(v), op.gradient, objective.value, objective.gradient):
                    with pytest.raises(ValueError, match=r"the ranks hold different weights after the weights "
                                                         r"changed .* on rank 0, .* on rank 1\)"):
                        call()
                # Rank 0 applies the same update: the ranks agree again, and the products are those at
                # the new weights, after one check.
                if rank == 0:
                    with torch.no_grad():
                        (mine[2].bias.data if how == ".data" else mine[2].bias).add_(0.5)
                checks.clear()
                moved_single = hessian_operator(mine, loss, every)
                for _ in range(3):
                    _close(op.matvec(v), moved_single.matvec(v))
                _close(op.gradient(), moved_single.gradient())
                _close(objective.gradient(), Objective(mine, loss, every).gradient())
                assert len(checks) == 1, checks
    finally:
        dist.destroy_process_group()


class _Scaled(nn.Module):
    """Logits times a scale kept in a buffer beside clamp bounds [-inf, inf] (no bound): the buffer's sum (and
    position checksum) is NaN whatever the scale, so a write to the scale through ``.data`` changes no part of
    the weights key."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bounds_and_scale", torch.tensor([-math.inf, math.inf, 1.0], dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        low, high, scale = self.bounds_and_scale
        return z.clamp(low, high) * scale


def _invalidate_worker(rank: int, world: int, store: str) -> None:
    """``invalidate()`` is the way out after a weight change that keeps every version counter, data pointer,
    sum and checksum (here rank 1 alone writes a buffer's finite entry through ``.data`` beside +-inf, whose sum
    stays NaN): the distributed operator had none (AttributeError). It drops the local cache and makes the next
    call compare the ranks' weights (without that, the product mixed the two ranks' different Hessians)."""
    _init(rank, world, store)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(FEATURES, 2), _Scaled()).double().eval()
        x = torch.randn(ROWS, FEATURES, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 2, (ROWS,), generator=gen)
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        op = hessian_operator(model, nn.CrossEntropyLoss(), (x[part], y[part]), process_group=dist.group.WORLD)
        v = torch.ones(op.shape[0], dtype=torch.float64)
        op.matvec(v)
        if rank == 1:
            model[1].bounds_and_scale.data[2] = 2.0  # the same version counter, data pointer, NaN sum and checksum
            op.invalidate()
        with pytest.raises(ValueError, match=r"the ranks hold different weights after the weights changed"):
            op.matvec(v)
    finally:
        dist.destroy_process_group()


def test_invalidate_compares_the_weights_again(tmp_path):
    _spawn(_invalidate_worker, (2, str(tmp_path / "store")), 2)


def test_different_weights_are_refused_on_every_rank(tmp_path):
    _spawn(_different_weights_worker, (2, str(tmp_path / "store")), 2)


def _different_dtypes_worker(rank: int, world: int, store: str) -> None:
    """Rank 1 computes in float32, rank 0 in float64: every rank raises the same ValueError at
    construction (a product would crash gloo: the ranks' payloads differ in size), and the group
    stays usable."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        loss, group = nn.CrossEntropyLoss(), dist.group.WORLD
        mine, xs = (copy.deepcopy(model).float(), x[part].float()) if rank == 1 else (model, x[part])
        for build in (lambda: hessian_operator(mine, loss, (xs, y[part]), process_group=group),
                      lambda: hessian_operator(mine, loss, (xs, y[part]), path="generic", process_group=group),
                      lambda: hessian_operator(mine, loss, (xs[:0], y[:0]) if rank == 1 else (xs, y[part]),
                                               process_group=group),
                      lambda: DistributedObjective(mine, loss, (xs, y[part]), process_group=group)):
            with pytest.raises(ValueError, match="the ranks compute in different dtypes: rank 1 computes in float32, "
                                                 "rank 0 in float64"):
                build()
        op = hessian_operator(model, loss, (x[part], y[part]), process_group=group)
        v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
        _close(op.matvec(v), hessian_operator(model, loss, (x, y)).matvec(v))
    finally:
        dist.destroy_process_group()


def test_different_dtypes_are_refused_on_every_rank(tmp_path):
    _spawn(_different_dtypes_worker, (2, str(tmp_path / "store")), 2)


def _methods_disagree_worker(rank: int, world: int, store: str) -> None:
    """What the ranks' method calls must agree on, refused on every rank with the same ValueError before any
    collective is sized by it: a model of another structure (rank 1 without the last bias: damped_newton's
    first collective crashed gloo, SIGABRT on one rank and "connection reset" on the other), another seed (the
    Lanczos start vectors differed: products of different vectors summed, then blamed on the weights), and the
    unseen set given on one rank only (that rank raised alone, the other waited for the timeout). The group stays
    usable after each."""
    _init(rank, world, store, timeout_s=20.0)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        forget, retain = LabeledData(x[part][:3], y[part][:3]), LabeledData(x[part][3:], y[part][3:])
        group = dist.group.WORLD
        damped = METHODS["damped_newton"](process_group=group)
        lissa = METHODS["lissa"](process_group=group)
        other = copy.deepcopy(model)
        if rank == 1:
            other[2].bias = None
        with pytest.raises(ValueError, match=r"rank\(s\) \[[01]\] were given a model of another structure; "
                                             r"every rank must build the method alike .* This rank's model: "
                                             r"0.weight\(5, 6\)"):
            damped.unlearn(other, forget, retain)
        with pytest.raises(ValueError, match=r"rank\(s\) \[[01]\] were given another seed.* This rank's seed: "
                                             + str(rank)):
            lissa.unlearn(model, forget, retain, seed=rank)
        unseen = LabeledData(x[:0], y[:0]) if rank == 1 else None
        with pytest.raises(ValueError, match=r"^damped_newton: the unseen set is given on 1 of 2 ranks; give it on "
                                             r"every rank"):
            damped.unlearn(model, forget, retain, unseen=unseen)
        cure = METHODS["cure_newton"](max_iterations=1, process_group=group)
        _same_on_every_rank(get_flat_parameters(cure.unlearn(model, forget, retain, seed=3).model))
    finally:
        dist.destroy_process_group()


def test_method_calls_that_disagree_are_refused_on_every_rank(tmp_path):
    _spawn(_methods_disagree_worker, (2, str(tmp_path / "store")), 2)


def _meta_model_worker(rank: int, world: int, store: str) -> None:
    """A model on the meta device on rank 1 alone, refused there: that rank's collectives were on the meta device,
    where torch's all_reduce returns at once and sends nothing, so rank 0 never learnt of the refusal: its call
    was matched with rank 1's next one and returned a model, and its own next call waited for the group's
    timeout. The same for an operator or objective built on it. Rank 1 takes part on the CPU now: rank 0 raises
    at once naming it, the ranks stay in step, and the package's collective refuses a meta tensor."""
    _init(rank, world, store, timeout_s=20.0)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        forget, retain = LabeledData(x[part][:3], y[part][:3]), LabeledData(x[part][3:], y[part][3:])
        group, loss = dist.group.WORLD, nn.CrossEntropyLoss()
        mine = copy.deepcopy(model).to("meta") if rank == 1 else model
        expect = ((ValueError, "on the meta device") if rank == 1 else
                  (RuntimeError, r"rank 0 of 2: rank\(s\) \[1\] refused their inputs"))
        for name in ("cure_newton", "damped_newton"):
            with pytest.raises(expect[0], match=expect[1]):
                METHODS[name](process_group=group).unlearn(mine, forget, retain, seed=0)
        cure = METHODS["cure_newton"](max_iterations=1, process_group=group)
        _same_on_every_rank(get_flat_parameters(cure.unlearn(model, forget, retain, seed=0).model))
        shard = (x[part], y[part])
        builds = (lambda m: hessian_operator(m, loss, shard, process_group=group),
                  lambda m: ggn_operator(m, loss, shard, process_group=group),
                  lambda m: DistributedObjective(m, loss, shard, process_group=group))
        expect = ((ValueError, "meta device") if rank == 1 else
                  (RuntimeError, r"rank\(s\) \[1\] failed while building its local operator"))
        for build in builds:
            with pytest.raises(expect[0], match=expect[1]):
                build(mine)
        op = hessian_operator(model, loss, shard, process_group=group)
        v = torch.ones(op.shape[0], dtype=torch.float64)
        _close(op.matvec(v), hessian_operator(model, loss, (x, y)).matvec(v))
        with pytest.raises(ValueError, match="on the meta device has no values"):  # on every rank: no collective
            all_reduce_released(torch.zeros(3, device="meta"), group)
    finally:
        dist.destroy_process_group()


def test_a_model_on_the_meta_device_on_one_rank_is_refused_on_every_rank(tmp_path):
    _spawn(_meta_model_worker, (2, str(tmp_path / "store")), 2)


def _thread_counts_worker(rank: int, world: int, store: str) -> None:
    """Ranks with other thread counts (rank 0 one thread, rank 1 two): the dense solves (eigh, LDL) run on each
    rank alone, and LAPACK's rounding depends on its thread count, so each rank applied its own step: damped_newton's
    models came back 1e-14 apart here (d = 460; 3e-13 at d = 3,610) and newton_pinv's 5e-13 (at d = 3,610 its check
    product refused the ranks' steps as "different inputs"). Every rank takes the group's first rank's step now."""
    _init(rank, world, store)
    torch.set_num_threads(1 + rank)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double().eval()  # d = 460
    x = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (200,), generator=gen)
    forget = LabeledData(x[10 * rank:10 * rank + 10], y[10 * rank:10 * rank + 10])
    retain = LabeledData(x[20 + 90 * rank:110 + 90 * rank], y[20 + 90 * rank:110 + 90 * rank])
    try:
        for name, options in (("damped_newton", {"solver": "eigh"}), ("damped_newton", {"solver": "ldl"}),
                              ("newton_pinv", {"solver": "eigh"})):
            result = METHODS[name](process_group=dist.group.WORLD, **options).unlearn(model, forget, retain, seed=0)
            _same_on_every_rank(get_flat_parameters(result.model, [n for n, _ in model.named_parameters()]))
            assert result.diagnostics["step_norm"] > 0
            _same_on_every_rank(torch.tensor([result.diagnostics["model_value"]]))
    finally:
        dist.destroy_process_group()


def test_ranks_with_other_thread_counts_take_the_same_step(tmp_path):
    _spawn(_thread_counts_worker, (2, str(tmp_path / "store")), 2)


def _unseen_elsewhere_worker(rank: int, world: int, store: str) -> None:
    """Unseen samples of rank 0 that rank 1 keeps in its retain set, or forgets: each rank compared its unseen set
    with its own shards only, and the call went through on both, where one process refuses it. Refused now with
    one process's words and the other rank's, and the ranks stay in step."""
    _init(rank, world, store, timeout_s=20.0)
    try:
        model, x, y = model_and_data()
        forget = LabeledData(x[5 * rank:5 * rank + 5], y[5 * rank:5 * rank + 5])
        retain = LabeledData(x[10:20], y[10:20]) if rank == 0 else LabeledData(x[20:], y[20:])
        none = LabeledData(x[:0], y[:0])
        method = METHODS["damped_newton"](process_group=dist.group.WORLD)
        for role, rows in (("retain", slice(22, 24)), ("forget", slice(7, 8))):
            unseen = LabeledData(x[rows], y[rows]) if rank == 0 else none
            count = rows.stop - rows.start
            expect = ((ValueError, rf"^damped_newton: {count} unseen samples of rank 0 are also in another rank's "
                                   rf"{role} set \(same input and label; first at unseen row 0, in rank 1's\): unseen "
                                   "data must be data the model was not trained on") if rank == 0 else
                      (RuntimeError, r"rank 1 of 2: rank\(s\) \[0\] hold unseen samples that another rank holds in "
                                     "its forget or retain set"))
            with pytest.raises(expect[0], match=expect[1]):
                method.unlearn(model, forget, retain, unseen=unseen, seed=0)
        fresh = torch.randn(3, FEATURES, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        unseen = LabeledData(fresh, y[:3]) if rank == 0 else none
        _same_on_every_rank(get_flat_parameters(method.unlearn(model, forget, retain, unseen=unseen, seed=0).model))
    finally:
        dist.destroy_process_group()


def test_unseen_samples_in_another_ranks_sets_are_refused(tmp_path):
    _spawn(_unseen_elsewhere_worker, (2, str(tmp_path / "store")), 2)


def _memory_worker(rank: int, world: int, store: str) -> None:
    """solver="auto" of damped_newton and newton_pinv picks a dense solver where its matrices fit in free memory:
    rank 1 with (simulated) little free memory took MINRES or Lanczos while rank 0 took the dense path, and gloo
    aborted the process. The ranks take the least memory-hungry solver any of them picked, and the same step."""
    import unlearn_kernels.checks as checks

    _init(rank, world, store)
    try:
        if rank == 1:
            real = checks.available_memory
            # room for a Lanczos basis of d = 59 (28 KB), not for the dense solvers (about 90 and 118 KB)
            checks.available_memory = lambda device: 60_000 if torch.device(device).type == "cpu" else real(device)
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        forget, retain = LabeledData(x[part][:3], y[part][:3]), LabeledData(x[part][3:], y[part][3:])
        for name, solver in (("damped_newton", "damped-minres"), ("newton_pinv", "pinv-lanczos")):
            result = METHODS[name](process_group=dist.group.WORLD).unlearn(model, forget, retain)
            assert result.diagnostics["solver"] == solver, (name, result.diagnostics["solver"])
            _same_on_every_rank(get_flat_parameters(result.model))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_free_memory_take_the_same_solver(tmp_path):
    _spawn(_memory_worker, (2, str(tmp_path / "store")), 2)


def _bool_buffer_worker(rank: int, world: int, store: str) -> None:
    """Ranks whose models differ only in a bool buffer (a mask) were not told apart: the checksum left out
    buffers that are not floating point, and the operator blended two Hessians (0.44 and 0.72 off each rank's
    own). Refused now, on every rank."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()

        class Masked(nn.Module):
            def __init__(self, inner: nn.Module, mask: torch.Tensor) -> None:
                super().__init__()
                self.inner = inner
                self.register_buffer("mask", mask)

            def forward(self, inputs: torch.Tensor) -> torch.Tensor:
                return self.inner(inputs * self.mask)

        mask = torch.ones(FEATURES, dtype=torch.bool)
        mask[rank] = False  # rank 0 drops feature 0, rank 1 feature 1
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        with pytest.raises(ValueError, match="different weights"):
            hessian_operator(Masked(model, mask), nn.CrossEntropyLoss(), (x[part], y[part]),
                             process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_ranks_that_differ_in_a_bool_buffer_are_refused(tmp_path):
    _spawn(_bool_buffer_worker, (2, str(tmp_path / "store")), 2)


class _LogitMask(nn.Module):
    """A model whose logits get an additive mask buffer (-inf on a class: a buffer the operators allow)."""

    def __init__(self, inner: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mask", mask)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.inner(inputs) + self.mask


def _inf_mask_worker(rank: int, world: int, store: str) -> None:
    """An additive -inf mask made every sum of its half of the weights checksum infinite on every rank, which hid
    any other difference there: ranks masking different classes, and ranks whose first layer differed (only the
    last chosen), returned a blend of their Hessians (0.49 and 0.44 off each rank's own) without a word. Both are
    refused now on every rank, and equal models still give the one-process products."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        y = y % (CLASSES - 2)  # no row of the masked classes: a finite loss
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        group, loss = dist.group.WORLD, nn.CrossEntropyLoss()

        def mask(cls: int) -> torch.Tensor:
            m = torch.zeros(CLASSES, dtype=torch.float64)
            m[cls] = -math.inf
            return m

        with pytest.raises(ValueError, match=r"different weights .* non-finite pattern\) of the model's other"):
            hessian_operator(_LogitMask(model, mask(CLASSES - 1 - rank)), loss, (x[part], y[part]),
                             process_group=group)
        other = copy.deepcopy(model)
        if rank == 1:
            with torch.no_grad():
                other[0].weight.mul_(3.0)
        with pytest.raises(ValueError, match="different weights"):
            hessian_operator(_LogitMask(other, mask(CLASSES - 1)), loss, (x[part], y[part]), ["inner.2.weight"],
                             process_group=group)
        masked = _LogitMask(model, mask(CLASSES - 1))
        op = hessian_operator(masked, loss, (x[part], y[part]), process_group=group)
        v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
        _close(op.matvec(v), hessian_operator(masked, loss, (x, y)).matvec(v))
    finally:
        dist.destroy_process_group()


def test_ranks_that_differ_beside_an_inf_mask_are_refused(tmp_path):
    _spawn(_inf_mask_worker, (2, str(tmp_path / "store")), 2)


def test_a_moved_inf_entry_changes_the_weights_checksum():
    """The non-finite entries' places are compared exactly: a position-weighted sum of their codes, compared
    with the sums' tolerance (relative to the half's size), let one -inf of a 10^6-entry mask moved by 196,418
    places pass as the same weights (2.360679775 against 2.360684329). Two "ranks" compared in one process."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    model.register_buffer("mask", torch.zeros(1_000_000, dtype=torch.float64))
    check = WeightCheck(model, ["weight", "bias"])

    def checksum(where: int) -> torch.Tensor:
        model.mask.zero_()
        model.mask[where] = -math.inf
        return check.checksum(torch.device("cpu"))

    first = checksum(10)
    for moved in (11, 10 + 196_418, 10 + 317_811):  # Fibonacci numbers: their weights differ least
        with pytest.raises(ValueError, match="the ranks hold different weights"):
            check.compare(torch.stack([first, checksum(moved)]), 0, "now")
    check.compare(torch.stack([first, checksum(10)]), 0, "now")  # the same: no error
    # review r7: finite weights whose squares overflow (every sum Inf on both ranks), and a complex buffer's
    # imaginary part (dropped by the float64 cast), hid any difference
    for build in (lambda x: torch.tensor([1.7e308, 1.7e308, x], dtype=torch.float64),
                  lambda x: torch.tensor([1 + x * 1j], dtype=torch.complex128)):
        sums = []
        for x in (1.0, 2.0):
            model.mask = build(x)
            sums.append(WeightCheck(model, ["weight", "bias"]).checksum(torch.device("cpu")))
        with pytest.raises(ValueError, match="the ranks hold different weights"):
            WeightCheck(model, ["weight", "bias"]).compare(torch.stack(sums), 0, "now")


class _ScaledLoss(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.scale * F.cross_entropy(out, y)


def _scaled(out: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * F.cross_entropy(out, y)


class _Wrapped(nn.Module):
    """A loss of the user's own around torch's: its settings are its submodule's."""

    def __init__(self, smoothing: float) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ce(out, y)


class _Slotted:
    """A callable loss without a __dict__."""

    __slots__ = ("scale",)

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.scale * F.cross_entropy(out, y)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(out, y)


class _Config:
    """A plain object, whose default repr holds its address (other in every process)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


def test_what_the_ranks_compare_of_a_loss():
    """value_text, what the ranks compare of the loss they build with: equal for losses that compute the same
    (0 and 0.0, numpy's and Python's numbers, a loss module in eval mode: each was refused as another operator),
    other for losses that do not (a user module's attribute and a partial's positional argument passed unseen:
    the operators blended the ranks' Hessians, 0.32 and 0.83 off each rank's own)."""
    same = [(nn.CrossEntropyLoss(label_smoothing=0), nn.CrossEntropyLoss(label_smoothing=0.0)),
            (nn.CrossEntropyLoss(), nn.CrossEntropyLoss().eval()),
            (functools.partial(F.cross_entropy, label_smoothing=0), functools.partial(F.cross_entropy,
                                                                                     label_smoothing=0.0)),
            (nn.CrossEntropyLoss(label_smoothing=np.float64(0.1)), nn.CrossEntropyLoss(label_smoothing=0.1)),
            (nn.CrossEntropyLoss(weight=torch.ones(3)), nn.CrossEntropyLoss(weight=torch.ones(3)))]
    other = [(_ScaledLoss(1.0), _ScaledLoss(2.0)), (functools.partial(_scaled, 1.0), functools.partial(_scaled, 3.0)),
             (nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss()),
             (nn.CrossEntropyLoss(weight=torch.ones(3)), nn.CrossEntropyLoss(weight=2 * torch.ones(3)))]
    # review r7: a wrapped torch loss, a bound method, a slotted callable (vars() raised), a tensor attribute, a
    # numpy array (its repr elides the middle), an object by its default repr (an address), a set (hash order)
    same += [(functools.partial(_scaled, scale=_Config(2.0)), functools.partial(_scaled, scale=_Config(2.0))),
             (_Slotted(1.0), _Slotted(1.0)), (functools.partial(_scaled, scale={"a", "b", "c", "d"}),
                                              functools.partial(_scaled, scale={"d", "c", "b", "a"})),
             (functools.partial(_scaled, scale=2**60), functools.partial(_scaled, scale=2.0**60))]
    flat = np.zeros(2000)
    moved = flat.copy()
    moved[1000] = 1.0
    other += [(_Wrapped(0.0), _Wrapped(0.5)), (_Slotted(1.0).loss, _Slotted(2.0).loss), (_Slotted(1.0), _Slotted(2.0)),
              (functools.partial(_scaled, scale=flat), functools.partial(_scaled, scale=moved)),
              (functools.partial(_scaled, scale=_Config(1.0)), functools.partial(_scaled, scale=_Config(2.0))),
              (functools.partial(_scaled, scale=torch.zeros(5000)), functools.partial(_scaled, scale=torch.ones(5000)))]
    assert all(value_text(a) == value_text(b) for a, b in same)
    assert all(value_text(a) != value_text(b) for a, b in other)
    # a function by its qualified name, not its module (__main__ in one process, __mp_main__ in a spawned one)
    assert value_text(_scaled) == "_scaled"


def _other_setup_worker(rank: int, world: int, store: str) -> None:
    """Ranks that built another kind of operator, with another loss setting, or an objective with another weight
    decay, on the same model: each rank's products were all-reduced into a blend (norms 0.36 and 1.54, the same
    on both ranks) without a word. Refused now on every rank at construction, naming the other rank; what does
    not change the operator (the path, the mode) still may differ."""
    _init(rank, world, store)
    try:
        model, x, y = model_and_data()
        part = slice(0, 20) if rank == 0 else slice(20, ROWS)
        data, group = (x[part], y[part]), dist.group.WORLD
        refused = rf"rank {rank}: rank\(s\) \[{1 - rank}\] built another operator or objective than this rank's"
        with pytest.raises(ValueError, match=refused + r" \((Hessian|GGN) of the loss"):
            (hessian_operator if rank == 0 else ggn_operator)(model, nn.CrossEntropyLoss(), data, process_group=group)
        with pytest.raises(ValueError, match=refused):
            hessian_operator(model, nn.CrossEntropyLoss(label_smoothing=0.1 * rank), data, process_group=group)
        with pytest.raises(ValueError, match=refused + r" \(objective with weight decay"):
            DistributedObjective(model, nn.CrossEntropyLoss(), data, process_group=group, weight_decay=0.1 * rank)
        # parameters of the same sizes under other names (each layer's bias): "the ranks hold different weights",
        # whose advice, to broadcast them, would not have helped
        bias = ["0.bias"] if rank == 0 else ["2.bias"]
        torch.manual_seed(1)  # the same weights on both ranks
        other = nn.Sequential(nn.Linear(FEATURES, CLASSES), nn.Tanh(), nn.Linear(CLASSES, CLASSES)).double()
        with pytest.raises(ValueError, match=refused + rf" \(Hessian of the loss .* over the parameters '{bias[0]}'\)"):
            hessian_operator(other, nn.CrossEntropyLoss(), data, bias, process_group=group)
        op = hessian_operator(model, nn.CrossEntropyLoss(), data, path="fused" if rank == 0 else "generic",
                              mode="auto" if rank == 0 else "reverse-over-reverse", process_group=group)
        v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
        _close(op.matvec(v), hessian_operator(model, nn.CrossEntropyLoss(), (x, y)).matvec(v))
        objective = DistributedObjective(model, nn.CrossEntropyLoss(), data, process_group=group, weight_decay=0.1)
        single = Objective(model, nn.CrossEntropyLoss(), (x, y), weight_decay=0.1)
        assert objective.value() == pytest.approx(single.value(), rel=1e-12)
    finally:
        dist.destroy_process_group()


def test_ranks_that_build_other_operators_are_refused(tmp_path):
    _spawn(_other_setup_worker, (2, str(tmp_path / "store")), 2)


def _absent_worker(rank: int, world: int, store: str, given_up) -> None:
    _init(rank, world, store)
    model, x, y = model_and_data()
    part = slice(0, 20) if rank == 0 else slice(20, ROWS)
    # The ranks meet first under the default group's long timeout, so that only the call rank 1
    # skips can exceed the short timeout of the group the operator uses.
    dist.barrier()
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x[part], y[part]), process_group=group)
    if rank == 0:
        with pytest.raises(RuntimeError, match="failed or timed out"):
            op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
        given_up.set()
    else:
        # Busy elsewhere, never making the call, until rank 0 gave up; if rank 0 fails instead, spawn
        # ends this process.
        given_up.wait()
    # A group whose collective timed out cannot be torn down: its destructor aborted the process at
    # exit in about one run in four ("terminate called without an active exception"). Leave without
    # running destructors; the checks above have passed.
    os._exit(0)


def test_absent_rank_times_out(tmp_path):
    """A rank that never makes the call: the other fails after the group's timeout instead of hanging."""
    given_up = mp.get_context("spawn").Event()
    _spawn(_absent_worker, (2, str(tmp_path / "store"), given_up), 2)


def _absent_from_method_worker(rank: int, world: int, store: str, given_up) -> None:
    """The same for a method: rank 1 never calls damped_newton, and rank 0's first collective (agreeing on the
    inputs) timed out with gloo's bare message, which named neither the method nor what it waited for."""
    _init(rank, world, store)
    model, x, y = model_and_data()
    dist.barrier()
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"^damped_newton, rank 0 of 2, agreeing on the inputs: the all_reduce "
                                               r"failed or timed out \(.*\): another rank crashed, or the ranks did "
                                               r"not make the same sequence of calls"):
            METHODS["damped_newton"](process_group=group).unlearn(model, LabeledData(x[:10], y[:10]),
                                                                  LabeledData(x[10:], y[10:]), seed=0)
        given_up.set()
    else:
        given_up.wait()
    os._exit(0)  # as _absent_worker: a group whose collective timed out cannot be torn down


def test_rank_absent_from_a_method_times_out_with_the_methods_name(tmp_path):
    given_up = mp.get_context("spawn").Event()
    _spawn(_absent_from_method_worker, (2, str(tmp_path / "store"), given_up), 2)


def _nccl_worker(rank: int, world: int, store: str) -> None:
    """One NCCL rank on the GPU: operator, objective and the Newton methods with the process group
    equal the same calls without one (NCCL reduces CUDA tensors only: every collective must get
    tensors on the model's device)."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model, x, y = model_and_data()
        model, x, y = model.cuda(), x.cuda(), y.cuda()
        group = dist.group.WORLD
        v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64, device="cuda")
        single = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
        op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), process_group=group)
        _close(op.matvec(v), single.matvec(v))
        _close(op.gradient(), single.gradient())
        objective = DistributedObjective(model, nn.CrossEntropyLoss(), (x, y), process_group=group, weight_decay=0.1)
        _close(objective.gradient(), Objective(model, nn.CrossEntropyLoss(), (x, y), weight_decay=0.1).gradient())
        forget, retain = LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:])
        _newton_methods_match_one_process(model, (forget, retain), forget, retain)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a GPU")
def test_nccl_on_one_cuda_device(tmp_path):
    """The GPU backend, one rank (NCCL takes one GPU per process; the machines lend one)."""
    _spawn(_nccl_worker, (1, str(tmp_path / "store")), 1)


def _destroyed_group_worker(rank: int, world: int, store: str) -> None:
    """Operators, objectives and methods hold the group weakly: destroy_process_group frees it (a group
    that lived on into interpreter shutdown aborted gloo processes), and a later call says why it fails."""
    _init(rank, world, store)
    model, x, y = model_and_data()
    group = dist.group.WORLD
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), process_group=group)
    objective = DistributedObjective(model, nn.CrossEntropyLoss(), (x, y), process_group=group)
    methods = [METHODS["cure_newton"](process_group=group), METHODS["cure_newton_lora"](rank=2, process_group=group)]
    alive = weakref.ref(group)
    del group
    dist.destroy_process_group()
    gc.collect()
    assert alive() is None, "an operator, objective or method kept the destroyed process group alive"
    with pytest.raises(RuntimeError, match="distributed curvature: the process group was destroyed"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="the process group was destroyed"):
        objective.value()
    for method in methods:  # cure_newton_lora held it strongly: alive after destroy, torch's error at the call
        with pytest.raises(RuntimeError, match=f"^{method.name}: the process group was destroyed"):
            method.unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]), seed=0)


def test_destroyed_process_group_is_not_kept_alive(tmp_path):
    _spawn(_destroyed_group_worker, (1, str(tmp_path / "store")), 1)


def _held_destroyed_group_worker(rank: int, world: int, store: str) -> None:
    """A group destroyed while the caller still holds it (``pg = dist.new_group(...)`` in scope): the objects
    went on computing on it (an operator) or met torch's "Group ... is not registered" (a method) (r68); they
    now say it was destroyed, and a new object on it is refused so."""
    _init(rank, world, store)
    model, x, y = model_and_data()
    group = dist.new_group([0])
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), process_group=group)
    method = METHODS["cure_newton"](process_group=group)
    dist.destroy_process_group(group)
    with pytest.raises(RuntimeError, match="distributed curvature: the process group was destroyed"):
        op.gradient()
    with pytest.raises(RuntimeError, match="^cure_newton: the process group was destroyed"):
        method.unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]), seed=0)
    with pytest.raises(RuntimeError, match="the process group was destroyed"):
        hessian_operator(model, nn.CrossEntropyLoss(), (x, y), process_group=group)


def test_a_destroyed_process_group_the_caller_still_holds(tmp_path):
    _spawn(_held_destroyed_group_worker, (1, str(tmp_path / "store")), 1)


def test_bad_process_group():
    model, x, y = model_and_data()
    with pytest.raises(TypeError, match="ProcessGroup"):
        hessian_operator(model, nn.CrossEntropyLoss(), (x, y), process_group="gloo")
    with pytest.raises(TypeError, match="cure_newton: process_group must be a torch.distributed ProcessGroup"):
        METHODS["cure_newton"](process_group="gloo")
    # new_group's handle on the ranks it leaves out is an int: say so, not "got int"
    with pytest.raises(ValueError, match="this rank is not a member of process_group"):
        hessian_operator(model, nn.CrossEntropyLoss(), (x, y), process_group=dist.GroupMember.NON_GROUP_MEMBER)
    with pytest.raises(ValueError, match="cure_newton: this rank is not a member of process_group"):
        METHODS["cure_newton"](process_group=dist.GroupMember.NON_GROUP_MEMBER)


def _collectives_worker(rank: int, world: int, store: str) -> None:
    _init(rank, world, store)
    try:
        # gloo's worker thread lets go of a collective's tensor after wait() returned in about a third of the
        # calls: a tensor whose last Python reference went first then took the GIL in that thread, which
        # aborted the process when it had begun to exit. The package's collective returns after the release.
        for i in range(2000):
            t = torch.full((3,), float(rank + i), dtype=torch.float64)
            all_reduce_released(t, dist.group.WORLD)
            assert t._use_count() == 1, f"call {i}: the worker still holds the tensor"
            assert t.tolist() == [float(sum(r + i for r in range(world)))] * 3
        m = torch.tensor([float(rank)])
        all_reduce_released(m, dist.group.WORLD, dist.ReduceOp.MAX)
        assert m.item() == world - 1
        # objects of other sizes and kinds per rank, in rank order, as dist.all_gather_object gives them
        mine = {"rank": rank, "rows": list(range(5 * rank)), "blob": bytes(range(rank * 100 % 256))}
        assert all_gather_objects(mine, dist.group.WORLD, torch.device("cpu")) == [
            {"rank": r, "rows": list(range(5 * r)), "blob": bytes(range(r * 100 % 256))} for r in range(world)]
        assert all_gather_objects(None, dist.group.WORLD, torch.device("cpu")) == [None] * world
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_return_once_gloo_let_go_of_the_tensor(tmp_path, world):
    _spawn(_collectives_worker, (world, str(tmp_path / "store")), world)


def test_every_collective_of_the_package_waits_for_the_release():
    """The package calls torch.distributed's collectives only inside all_reduce_released and broadcast_released
    (one place, the release wait they share): a direct call would leave its tensors to the exit race described
    there."""
    package = Path(__file__).resolve().parents[1] / "unlearn_kernels"
    collectives = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                   "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "gather",
                   "gather_object", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
                   "monitored_barrier"}
    calls = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in collectives
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "dist"):
                calls.append((path.relative_to(package).as_posix(), node.func.attr))
    assert calls == [("curvature/distributed.py", "all_reduce"), ("curvature/distributed.py", "broadcast")], calls
