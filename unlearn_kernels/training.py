"""The training recipe shared by the original model and the retrain oracle.

One function, :func:`train`, trains a model in place with cross-entropy and a :class:`TrainConfig`.
It is deterministic for a seed: the shuffling order of each epoch comes from ``seed + epoch``, and
any other randomness inside the model (dropout) draws from a generator seeded with ``seed`` that is
forked from, and restored to, the global one. So seeds s and s + 1 share their epochs' orders, one
epoch apart (epoch e of s + 1 is epoch e + 1 of s): seeds meant to give independent shuffles of the
same data differ by more than the epochs (``RetrainReseeded``'s default offset is 1000).
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import (
    batch_statistics,
    batch_statistics_layer,
    check_choice,
    check_device,
    check_finite_inputs,
    check_finite_model,
    check_int,
    check_module,
    check_not_meta,
    check_number,
    check_seed,
    first_nonfinite_model_weight,
    is_out_of_memory,
    normalisation_buffers,
)
from .labeled import LabeledData

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")

#: called after every epoch with (epoch index from 0, mean training loss of that epoch)
ProgressCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. The defaults are a plain SGD recipe suited to the small models here.

    Attributes:
        epochs: passes over the data.
        batch_size: samples per step (the last batch of an epoch may be smaller). A last batch of one
            row joins the batch before it where a batch-norm layer of the model would get one value
            per channel from it in training mode (torch refuses that batch); see
            :func:`join_last_row`. Every other case keeps its batches.
        lr: learning rate (peak learning rate with the cosine schedule).
        weight_decay: L2 penalty, as the optimizer applies it (decoupled for "adamw").
        optimizer: "sgd", "adam" or "adamw".
        momentum: SGD momentum (ignored by Adam/AdamW).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        lr_schedule: "constant", or "cosine" (annealed to 0 over all steps, per step).
        seed: seeds shuffling (and model-internal randomness such as dropout).
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    label_smoothing: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        # numbers are checked and normalised (numpy scalars -> Python) in place: the recipe is frozen
        checked = {
            "epochs": check_int("TrainConfig: epochs", self.epochs, low=0),
            "batch_size": check_int("TrainConfig: batch_size", self.batch_size),
            "lr": check_number("TrainConfig: lr", self.lr, 0.0, strict=True),
            "weight_decay": check_number("TrainConfig: weight_decay", self.weight_decay, 0.0),
            "momentum": check_number("TrainConfig: momentum", self.momentum, 0.0, 1.0, strict_high=True),
            "label_smoothing": check_number("TrainConfig: label_smoothing", self.label_smoothing, 0.0, 1.0,
                                            strict_high=True),
            "seed": check_seed("TrainConfig: seed", self.seed),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        check_choice("TrainConfig: optimizer", self.optimizer, OPTIMIZERS)
        check_choice("TrainConfig: lr_schedule", self.lr_schedule, LR_SCHEDULES)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-friendly dict (what checkpoints record)."""
        return dataclasses.asdict(self)


@dataclass
class TrainStats:
    """What :func:`train` did.

    Attributes:
        epochs: epochs run.
        steps: optimizer steps, i.e. batch gradient evaluations.
        epoch_losses: mean training loss of each epoch (over the batches, as they were trained).
        train_accuracy: accuracy on the training batches during the last epoch (nan if no epoch ran).
        seconds: wall time.
    """

    epochs: int = 0
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    train_accuracy: float = float("nan")
    seconds: float = 0.0


def make_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
    owner: str = "make_optimizer",
) -> torch.optim.Optimizer:
    """The optimizer ``name`` ("sgd", "adam" or "adamw") over ``params``. Adam and AdamW refuse
    float16 parameters (a ValueError led by ``owner``): their eps (1e-8) rounds to 0 in float16, and a
    coordinate with a zero gradient is then 0/0 = NaN after the first step, whatever the learning rate.
    A learning rate or weight decay beyond the largest value of a trained parameter's dtype is refused
    too (a finite 1e39 for float32 failed at the first step with torch's "value cannot be converted to
    type float without overflow")."""
    # parameter groups (dicts) as torch's optimizers take them, each with its own options
    params = [dict(item, params=[item["params"]] if isinstance(item["params"], torch.Tensor) else list(item["params"]))
              if isinstance(item, dict) else item for item in params]
    groups = [(item["params"], item) if isinstance(item, dict) else ([item], {}) for item in params]
    for what, value in (("lr", lr), ("weight_decay", weight_decay)):
        for tensors, options in groups:
            given = options.get(what, value)
            dtype = next((p.dtype for p in tensors if p.requires_grad and given > torch.finfo(p.dtype).max), None)
            if dtype is not None:
                # an int beyond float64 (10**400) has no :g form
                shown = f"{given:g}" if isinstance(given, float) or abs(given) < 2**1000 else f"{Decimal(given):.4g}"
                raise ValueError(f"{owner}: {what} = {shown} does not fit the parameters' {dtype} (largest "
                                 f"{torch.finfo(dtype).max:.4g})")
    if name in ("adam", "adamw"):
        if any(p.dtype == torch.float16 and p.requires_grad for tensors, _ in groups for p in tensors):
            raise ValueError(f"{owner}: optimizer {name!r} cannot train float16 parameters: its eps (1e-8) is 0 in "
                             "float16, so a zero gradient gives NaN at the first step; use a float32 or bfloat16 "
                             "model, or optimizer 'sgd'")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")


def warm_up() -> None:
    """Pays the process's one-off cost of torch's optimizers now, outside any timed call: the first
    optimizer a process builds imports ``torch._dynamo`` (0.8 s and ~146 MiB on the digits machine),
    which would otherwise land in whichever measured call builds one first (the study's oracle, where
    the original model comes from the cache instead of a training run)."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def check_dense_gradients(owner: str, model: nn.Module, trained: Iterable[torch.Tensor] | None = None) -> None:
    """ValueError naming the first ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``sparse=True`` whose weight
    is trained: one of ``trained`` where given (the parameters a method differentiates, frozen or not),
    else one that requires grad. A method that trains or differentiates other parameters only, or none,
    takes such a model. Its sparse gradient failed mid-run with torch's bare errors ("add(sparse, dense)
    is not supported", "Adam does not support sparse gradients", "reshape is not implemented for sparse
    tensors")."""
    chosen = None if trained is None else {id(t) for t in trained}
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
                and (module.weight.requires_grad if chosen is None else id(module.weight) in chosen)):
            raise ValueError(f"{owner}: the model's embedding {name!r} has sparse=True, whose sparse gradients "
                             f"{owner} cannot use: set its .sparse = False (the same weights and outputs)")


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device``: a CUDA device runs them after the call that queued them
    returns, so a clock read without this times their launch only; nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Every submodule in training mode (``training``) or eval mode inside the block; on exit each one
    gets its own train/eval flag back (a model with mixed train/eval submodules comes back exactly as
    it was)."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was_training in flags:
            module.training = was_training


def eval_mode(model: nn.Module) -> AbstractContextManager[None]:
    """:func:`module_mode` in eval mode."""
    return module_mode(model, training=False)


#: held by the thread inside a :func:`seeded_rng` block: torch's generators are one per process
_SEEDED = threading.RLock()


def _unheld_seeded_lock_in_child() -> None:
    """A forked child's own, unheld :data:`_SEEDED`: a thread of the parent that held the lock at the fork
    (a DataLoader worker or a multiprocessing "fork" child started meanwhile) does not exist in the child,
    so the copied lock would never be released and the child's first seeded call would wait for ever."""
    global _SEEDED
    _SEEDED = threading.RLock()


if hasattr(os, "register_at_fork"):  # POSIX only: elsewhere a child process starts afresh
    os.register_at_fork(after_in_child=_unheld_seeded_lock_in_child)


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed the global RNG of the CPU (and of ``device`` if it is an accelerator) inside the block,
    restoring the caller's RNG state on exit, so that seeding here never disturbs the caller. One
    thread at a time runs such a block (another waits): two seeded calls in concurrent threads
    reseeded and restored the one generator under each other (other results than run one after the
    other, and the caller's state changed). ``seed``: an integer in [0, 2**63) (ValueError or TypeError
    naming it; torch took -1 as 2**64 - 1)."""
    seed = check_seed("seeded_rng: seed", seed)
    device = torch.device(device)
    accelerators = ([device.index if device.index is not None else torch.cuda.current_device()]
                    if device.type == "cuda" else [])
    with _SEEDED, torch.random.fork_rng(devices=accelerators):
        # exactly the generators forked (torch.manual_seed would reseed every GPU, restored or not)
        torch.default_generator.manual_seed(seed)
        for index in accelerators:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def init_model(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with its random initialisation drawn from ``seed`` (reproducible): the CPU's
    generator and, where a GPU is visible, the current GPU's (a factory may build on it). TypeError or
    ValueError naming the argument for a factory that is not a callable other than a module, or a seed
    that is not an integer in [0, 2**63)."""
    check_model_factory("init_model", factory)
    seed = check_seed("init_model: seed", seed)
    with seeded_rng(seed, "cuda" if torch.cuda.is_available() else "cpu"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory returned {type(model).__name__}, not an nn.Module")
    return model


def check_model_factory(owner: str, factory: Any) -> None:
    """TypeError naming ``owner`` unless ``factory`` is a callable other than a module (an nn.Module is
    callable too: it would be called as its forward, with no input)."""
    if isinstance(factory, nn.Module) or not callable(factory):
        raise TypeError(f"{owner}: model_factory must be a callable that builds a fresh model (e.g. "
                        f"lambda: MLP(...)), got {type(factory).__name__}")


def check_new_each_call(owner: str, factory: Callable[[], nn.Module], model: nn.Module, seed: int) -> None:
    """ValueError naming ``owner`` where another call of ``factory`` (seeded with ``seed``, as ``model``, its
    model of an earlier call, was) returns a model sharing the storage of a parameter or of a normalisation
    layer's statistic with ``model``: what training writes. Such a factory hands out modules that live on
    elsewhere (the model given to the caller, a pretrained backbone), which training ``model`` or loading
    weights into it would change in place. Other buffers (a constant held at module level, a mask) may be
    shared: training does not write them, and a checkpoint of the same factory holds their values. One more
    model is built to tell: ``model`` itself cannot show what else holds its tensors."""
    built = _storages(model)
    shared = next((built[key] for key in _storages(init_model(factory, seed)) if key in built), None)
    if shared is not None:
        kind, name = shared
        raise ValueError(f"{owner}: model_factory must build a new model each call; two calls returned models "
                         f"sharing the {kind} {name!r}, which training or loading weights into one would change in "
                         "every model that holds it (the caller's too): build new modules in the factory "
                         "(copy.deepcopy a shared one)")


def _storages(model: nn.Module) -> dict[tuple[torch.device, int], tuple[str, str]]:
    """``(kind, name)`` of ``model``'s first parameter or normalisation statistic (what training writes) on each
    storage (device, address) that holds data."""
    found: dict[tuple[torch.device, int], tuple[str, str]] = {}
    statistics = normalisation_buffers(model)
    written = [(name, t) for name, t in model.named_buffers() if name in statistics]
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", written)):
        for name, tensor in tensors:
            address = tensor.untyped_storage().data_ptr() if tensor.layout == torch.strided else 0
            if address:  # 0: no data (an empty or meta tensor), which two models cannot share
                found.setdefault((tensor.device, address), (kind, name))
    return found


def check_config(owner: str, config: Any) -> None:
    """TypeError naming ``owner`` unless ``config`` is a :class:`TrainConfig`."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{owner}: config must be a TrainConfig, got {type(config).__name__}")


def check_data(owner: str, data: Any) -> None:
    """TypeError naming ``owner`` unless ``data`` is a LabeledData."""
    if not isinstance(data, LabeledData):
        raise TypeError(f"{owner}: data must be a LabeledData, got {type(data).__name__}")


def probe_rows(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (non-empty) to run through ``model`` in eval mode to see what it makes of them:
    the first row; the first two (the one row twice) where a batch-norm layer of the model uses batch
    statistics in eval mode, which one row would fail on (what fits is the sample, not the batch size)."""
    if batch_statistics_layer(model) is not None:
        return x[[0, min(1, len(x) - 1)]]
    return x[:1].clone()  # a copy: a model that writes its input in place would write the caller's data


def _probe_output(owner: str, model: nn.Module, rows: torch.Tensor, training: bool, fails: str) -> Any:
    """``model(rows)`` in training mode (on copies of the buffers: running statistics stay as they are)
    or eval mode, each submodule's flag and the caller's RNG state restored; torch's and the model's
    own errors as ``ValueError(f"{owner}: {fails}: {error}")`` (running out of memory raised as it is)."""
    device = model_device(model)
    with module_mode(model, training), seeded_rng(0, device):
        try:
            if training:
                # the wrapped module: torch.func refuses DataParallel, which only scatters the batch
                inner = model.module if isinstance(model, nn.DataParallel) else model
                buffers = {name: b.clone() for name, b in inner.named_buffers()}
                return torch.func.functional_call(inner, buffers, (rows.to(device),))
            return model(rows.to(device))
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # torch's and the model's own checks
            if is_out_of_memory(error):
                raise
            raise ValueError(f"{owner}: {fails}: {error}") from error


def check_converged(owner: str, role: str, config: TrainConfig, model: nn.Module) -> None:
    """ValueError if :func:`train` left ``model`` with a NaN or Inf weight (the recipe diverged), naming
    ``owner``, the ``role`` of the data, the weight and the learning rate: for the trainings whose model
    is kept (the original, a cached oracle), where a later step would only say the weights are not finite."""
    bad = first_nonfinite_model_weight(model)
    if bad is not None:
        kind, name, what = bad
        raise ValueError(f"{owner}: training on the {role} set diverged: the model's {kind} {name!r} has {what} values "
                         f"after {config.epochs} epochs at lr={config.lr:g} (lower the learning rate)")


@torch.no_grad()
def check_fits(owner: str, model: nn.Module, data: LabeledData, role: str = "training", *,
               in_training_mode: bool = False) -> None:
    """ValueError unless one sample of ``data`` (two where :func:`probe_rows` says so) runs through
    ``model`` (eval mode, each submodule's flag restored) to (batch, C) logits, C >= 2, and every label of
    ``data`` is a class in [0, C): the check before any work that turns torch's errors deep inside (an
    IndexError, a CUDA device-side assert that leaves the process unusable, -100 skipped silently as
    ``ignore_index``) into one naming the problem. ``role`` names the set in the message. A model that
    draws random numbers in its forward leaves the caller's RNG state as it was. With
    ``in_training_mode`` (for a caller that trains the model in that mode) two samples also run in
    training mode, on copies of the buffers (running statistics stay as they are), and must give
    (2, C) logits too: torchvision's Inception3 and GoogLeNet return (logits, aux) there."""
    rows = probe_rows(model, data.x)
    out = _probe_output(owner, model, rows, False,
                        f"the {role} samples ({data.x.dtype}, shape {tuple(data.x.shape[1:])}) do not fit the model")
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(rows):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{owner}: the model must map a batch of {role} samples to (batch, classes) logits; "
                         f"{'one sample' if len(rows) == 1 else 'two samples'} gave {shape}")
    classes = out.shape[1]
    if classes < 2:  # every label would be class 0 and every cross-entropy 0: nothing to learn or unlearn
        raise ValueError(f"{owner}: the model maps {role} samples to (batch, {classes}) logits; cross-entropy needs "
                         f"two or more classes (a binary classifier gives two logits)")
    if in_training_mode:  # two rows: batch statistics need them
        rows = data.x[[0, min(1, len(data.x) - 1)]]
        out = _probe_output(owner, model, rows, True,
                            f"the model fails in training mode, which {owner} trains it in, on two {role} samples")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(rows), classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{owner}: in training mode, which {owner} trains it in, the model must map a batch of "
                             f"{role} samples to (batch, classes) logits as in eval mode ({classes} classes); two "
                             f"samples gave {shape}")
    bad = (data.y < 0) | (data.y >= classes)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"{owner}: the {role} set has labels outside the model's {classes} classes "
                         f"(first at row {row}: label {int(data.y[row])})")


class _OneValue(Exception):
    """Raised by :func:`one_row_batch_norm`'s hook at the first layer found, ending the forward there."""


@torch.no_grad()
def one_row_batch_norm(model: nn.Module, sample: torch.Tensor, training: bool = True) -> str | None:
    """The name of the first batch-norm layer that uses batch statistics (see :func:`batch_statistics`)
    once ``model.train(training)`` is called and that would get one value per channel from a batch of
    one row, ``sample`` (shape (1, ...)); or None. In training mode that is a layer the model trains
    (not one it keeps frozen in eval mode) or one without running statistics; in eval mode only the latter.

    Torch refuses such a batch ("Expected more than 1 value per channel when training"): a
    ``BatchNorm1d`` on features does, a ``BatchNorm2d`` on maps larger than 1x1 does not. A model
    without such batch-norm layers costs no forward pass; otherwise one, in
    eval mode and without gradients, with hooks that read each layer's input shape (its running
    statistics do not move). Every submodule's train/eval flag and the random state are left as they
    were.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.train(training)  # what the pass sets: a model may keep its batch-norm layers frozen in eval mode
        norms = {module: name for name, module in model.named_modules() if batch_statistics(module, module.training)}
    finally:
        for module, flag in flags:
            module.training = flag
    if not norms:
        return None

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        # torch's own test: batch size times the spatial size
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] * math.prod(x.shape[2:]) == 1:
            raise _OneValue(norms[module])

    handles = [module.register_forward_pre_hook(hook) for module in norms]
    device = model_device(model)
    try:
        with eval_mode(model), seeded_rng(0, device):  # forked: a draw in the forward leaves the caller's RNG alone
            model(sample.to(device))
    except _OneValue as found:
        return found.args[0]
    finally:
        for handle in handles:
            handle.remove()
    return None


def join_last_row(owner: str, model: nn.Module, data: LabeledData, batch_size: int, role: str = "training",
                  training: bool = True) -> bool:
    """Whether a pass of ``model`` over batches of ``batch_size`` rows of ``data`` must join a last batch
    of one row to the batch before it (``data.loader(..., join_last_row=True)``): a pass that trains
    the model, or one in eval mode with ``training`` False.

    True only when ``len(data) % batch_size == 1`` and :func:`one_row_batch_norm` finds a layer: torch
    would raise at that batch, mid-training. Joining keeps every row in every epoch (dropping the row
    would train the model, an oracle too, on less than the data it is given); every case that trains
    without it keeps its batches, bit for bit.

    Raises:
        ValueError: before any step, naming ``owner``, the layer, ``batch_size`` and the rows of the
            ``role`` set, where every batch or the only batch would be one row for such a layer
            (``batch_size`` 1, or a set of one row): no joining helps there.
    """
    rows = len(data)
    if batch_size > 1 and rows % batch_size != 1:  # no batch of one row
        return False
    layer = one_row_batch_norm(model, data.x[:1].clone(), training)  # a copy, as in probe_rows
    if layer is None:
        return False
    if batch_size == 1 or rows == 1:
        problem, remedy = ((f"batch_size 1 makes every batch of the {role} set ({rows} rows) one row",
                            "use a batch_size of at least 2") if batch_size == 1 else
                           (f"the {role} set has 1 row (batch_size {batch_size})", "give it at least 2 rows"))
        cannot = ("cannot train on a batch of one row (one value per channel in training mode)" if training else
                  "cannot take a batch of one row, in eval mode either (it has no running statistics, "
                  "track_running_stats=False, and normalises with the batch's)")
        raise ValueError(f"{owner}: {problem}, and the model's batch-norm layer {layer!r} {cannot}: {remedy}")
    return True


def epoch_steps(rows: int, batch_size: int, joined: bool = False) -> int:
    """Batches, i.e. optimizer steps, in one epoch over ``rows`` rows: ceil(rows / batch_size), one
    fewer when a last batch of one row is joined to the one before it (:func:`join_last_row`)."""
    return -(-rows // batch_size) - int(joined)


def train(
    model: nn.Module,
    data: LabeledData,
    config: TrainConfig,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    *,
    owner: str = "train",
    role: str = "training",
    data_checked: bool = False,
    after_step: Callable[[], None] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``data`` with the recipe ``config``.

    The model is moved to ``device`` and left there in eval mode. Deterministic for ``config.seed``
    on a given device and torch version.

    Args:
        model: the model to train (modified in place).
        data: the training set (non-empty).
        config: the recipe.
        device: where to train.
        progress: called after every epoch with (epoch index, mean loss); e.g. a runner's
            ``lambda epoch, loss: bar.update(1)``. The library itself never prints.
        owner: what errors are named after: a method that trains through this function gives its own
            name (the caller never called ``train``).
        role: how errors name ``data`` (e.g. "retain").
        data_checked: ``data`` was checked against ``model`` already, as :meth:`Unlearner.unlearn
            <unlearn_kernels.methods.base.Unlearner.unlearn>` does (finite inputs that fit the model,
            labels among its classes): those checks are not run again.
        after_step: called after every optimizer step (e.g. to put back weights a method keeps fixed).

    Raises:
        TypeError: ``model`` is not an nn.Module, ``config`` not a TrainConfig, ``data`` not a LabeledData, or
            ``progress`` or ``after_step`` not a callable (or None).
        ValueError: before any step: a ``device`` that cannot run here (see
            :func:`~unlearn_kernels.checks.check_device`), empty data, a model without trainable
            parameters, a model on the meta device or with a weight that the rule of
            :func:`~unlearn_kernels.checks.first_nonfinite_weight` refuses (NaN or Inf in a parameter
            or a normalisation layer's running statistic: one step would make every weight NaN), NaN or
            Inf inputs, inputs the model cannot take (another dtype or width), labels outside the
            model's classes, or batches of one row that a batch-norm layer of the model cannot train on
            (``batch_size`` 1 or one row of data; a last batch of one row is joined to the one before
            it, see :func:`join_last_row`).
            Every such refusal comes before the model is moved to ``device``: it stays where it was.
            An error raised during the training leaves each submodule in the mode it had.
    """
    check_module(f"{owner}: model", model)
    check_data(owner, data)
    check_config(owner, config)
    device = check_device(f"{owner}: device", device)
    if len(data) == 0:
        raise ValueError(f"{owner}: the {role} set is empty")
    if not any(p.requires_grad for p in model.parameters()):  # else torch's errors, at the optimizer or backward
        raise ValueError(f"{owner}: the model has no trainable parameters (requires_grad=True): nothing to train")
    check_dense_gradients(owner, model)
    for what, callback in (("progress", progress), ("after_step", after_step)):
        if callback is not None and not callable(callback):  # else torch's TypeError after a step, the model changed
            raise TypeError(f"{owner}: {what} must be a callable or None, got {type(callback).__name__}")
    check_not_meta(owner, model)
    check_finite_model(owner, model)  # one NaN weight makes every weight NaN after the first step
    start = time.perf_counter()
    # every check before the model moves: a refused call leaves the caller's model where it was (the
    # probes run the model where it is, on rows moved there)
    if not data_checked:
        check_finite_inputs(owner, f"the {role} set", data.x)
        check_fits(owner, model, data, role, in_training_mode=True)
    join = join_last_row(owner, model, data, config.batch_size, role)
    model.to(device)
    data = data.to(device)
    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, owner=owner,
                               momentum=config.momentum, weight_decay=config.weight_decay)
    total_steps = config.epochs * epoch_steps(len(data), config.batch_size, join)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
                 if config.lr_schedule == "cosine" else None)
    stats = TrainStats()
    # each submodule's own mode back where a step fails (set to eval mode below where the training ends)
    with module_mode(model, training=True), seeded_rng(config.seed, device):
        for epoch in range(config.epochs):
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            batches = 0
            for x, y in data.loader(config.batch_size, shuffle=True, seed=config.seed + epoch, join_last_row=join):
                logits = model(x.detach())  # inputs that require grad: backward wrote the caller's x.grad
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                if scheduler is not None:
                    scheduler.step()
                # accumulate on device: no host synchronisation inside the loop
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(dim=1) == y).sum()
                batches += 1
            stats.epochs += 1
            stats.steps += batches
            stats.epoch_losses.append(loss_sum.item() / batches)
            stats.train_accuracy = correct.item() / len(data)
            if progress is not None:
                progress(epoch, stats.epoch_losses[-1])
    model.eval()
    stats.seconds = time.perf_counter() - start
    return stats
