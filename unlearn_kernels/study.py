"""The evaluation study: train the original model, unlearn with every method, retrain the oracle,
and measure everything against it, over several seeds (and optionally a sequence of requests).

Protocols: "random" (a stratified fraction of the train split), "mislabeled" (a stratified fraction
gets a wrong label, the original trains on the corrupted split, and the corrupted rows are forgotten
with their corrupted labels) and "class" (whole classes). :func:`default_scenarios` is the set a
plain ``unlearn-kernels run`` runs.

This is the layer that turns data, models and methods into numbers; :mod:`unlearn_kernels.report`
turns the numbers into a table, JSON and plots. Progress is reported through a callback (the
command line passes a progress bar or one line per phase); nothing here prints.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    cache_path,
    check_cache_dir,
    check_writable_folder,
    load_checkpoint,
    train_or_load,
    training_metadata,
)
from .checks import all_finite, check_choice, check_device, check_int, check_number, check_sklearn_seed
from .data import (
    DatasetSplits,
    ForgetRequest,
    LabeledData,
    available_datasets,
    class_forget,
    forget_count,
    load_dataset,
    mislabel,
    random_forget,
    remove_classes,
    sequential_class_forget,
    sequential_forget,
    split_forget,
)
from .eval import (
    AVG_GAP_KEYS,
    Measured,
    accuracy,
    activation_distance,
    avg_gap,
    gradient_norm,
    js_divergence,
    js_divergence_lotus,
    kl_divergence,
    measure,
    mia_entropy,
    mia_loss,
    mia_salun_efficacy,
    predict_logits,
    rf_jsd,
    speedup,
    tug_of_war,
    weight_distance,
)
from .lora import adapter_modules, unload
from .methods import METHODS, Retrain, RetrainReseeded, Unlearner, UnlearnResult
from .models import build_model
from .training import TrainConfig, check_converged, init_model, join_last_row, train, warm_up

#: the methods run by default, oracle first (it is the reference of every other row)
DEFAULT_METHODS = ("retrain", "original", "cure_newton", "stochastic_cure_newton", "newton_pinv", "damped_newton",
                   "influence", "lissa", "finetune", "gradient_ascent", "neggrad_plus", "random_labels", "salun",
                   "scrub", "bad_teacher", "ssd", "unsir", "lotus", "rfa")

#: the rows built from the training recipe (no method options): the oracle and a second, reseeded one
RECIPE_METHODS = ("retrain", "retrain_reseeded")

#: the methods of the three default scenarios: all but the two exact damped solves, which run MINRES and,
#: where it does not converge, build the dense Hessian and factor it (up to about 40 s a call on the digits
#: MLP, where the other methods take well under a second); ``--methods`` or ``--protocol`` runs them
SCENARIO_METHODS = tuple(m for m in DEFAULT_METHODS if m not in ("damped_newton", "influence"))

#: default training recipe per model family (the oracle is retrained with the same recipe)
DEFAULT_RECIPES = {
    "mlp": TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4),
    "cnn": TrainConfig(epochs=20, batch_size=64, lr=0.05, weight_decay=5e-4),
    "resnet18": TrainConfig(epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4, lr_schedule="cosine"),
    "vit": TrainConfig(epochs=50, batch_size=128, lr=1e-3, weight_decay=5e-2, optimizer="adamw", lr_schedule="cosine"),
}

PROTOCOLS = ("random", "mislabeled", "class")

#: the fraction the random and mislabeled protocols forget when none is given (``--forget-fraction``)
DEFAULT_FORGET_FRACTION = 0.1

#: folds of the loss MIA's cross-validation (``mia_loss``): every forget set needs at least this many rows
MIA_LOSS_FOLDS = 5

#: "gap closed" figures: record metric ``gap_closed_<name>`` = 1 - |m[key]| / |Original's m[key]|
GAP_CLOSED = {"acc_forget": "gap_acc_forget", "avg_gap": "avg_gap"}

Progress = Callable[[str, int, int], None]  # (phase, done, total)

#: how the refusals of the original model's training name its training set
ORIGINAL_ROLE = "original model's training"


def default_cache_dir() -> str:
    """Where trained original models are cached unless told otherwise: ``$XDG_CACHE_HOME/unlearn-kernels/
    checkpoints``, or ``~/.cache/unlearn-kernels/checkpoints`` without that variable (read at each call).
    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG Base Directory specification says.

    Raises:
        ValueError: no absolute folder to cache in: ``XDG_CACHE_HOME`` unset or relative, and no home
            folder (``HOME`` empty, where ``~`` is "/"; or unset with a user the password database does not
            know, as in a container run with an arbitrary uid, where ``~`` stays ``~`` and the cache would be
            made in the working folder).
    """
    xdg_cache = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg_cache):
        return str(Path(xdg_cache) / "unlearn-kernels" / "checkpoints")
    # an empty HOME is none (expanduser would give "/", the root folder); a relative ~ says there is none either
    home = os.path.expanduser("~") if os.environ.get("HOME") != "" else ""
    if not os.path.isabs(home):
        raise ValueError("no home folder to cache original models in: set XDG_CACHE_HOME to an absolute path, or "
                         "run with --no-cache (cache_dir=None)")
    return str(Path(home) / ".cache" / "unlearn-kernels" / "checkpoints")


def check_epochs(epochs: int) -> int:
    """The training recipe's epochs, an int >= 1: the oracle always runs, and one trained for no epoch
    would be the random initialisation (Retrain refuses it, but only after the original's training)."""
    return check_int("the training recipe's epochs (--epochs), which the retrain oracle uses,", epochs)


def _check_seeds(seeds: Any) -> tuple[int, ...]:
    """Distinct integers in [0, 2**32) (the data split's scikit-learn seed; a repeated seed would
    count twice in mean ± std), at least one."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds (--seeds) must be a sequence of ints, one study per seed, got {type(seeds).__name__}")
    seeds = tuple(check_sklearn_seed("seeds (--seeds)", s) for s in seeds)
    if not seeds:
        raise ValueError("at least one seed is needed (--seeds)")
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"seeds (--seeds) repeat a seed: {list(seeds)}")
    return seeds


@dataclass
class StudyConfig:
    """Everything a study needs; each field but ``model_kwargs`` has a command-line option of
    ``unlearn-kernels run`` (``cache_dir``: only ``--no-cache``, which sets None).

    Attributes:
        dataset: a name from :func:`unlearn_kernels.data.available_datasets`.
        root: directory of the local files for MNIST/CIFAR-style datasets.
        model: "mlp", "cnn", "resnet18" or "vit"; ``model_kwargs`` go to its constructor.
        protocol: "random" (stratified fraction of the train split), "mislabeled" (a stratified
            fraction of the train split relabelled with a uniformly drawn wrong class; the original
            trains on it, D_f is those rows with their wrong labels) or "class" (whole classes).
        forget_fraction: fraction for the random and mislabeled protocols, in (0, 1); None (the
            default) is :data:`DEFAULT_FORGET_FRACTION` for them. The class protocol takes none (it
            stays None).
        forget_classes: classes for the class protocol (also removed from the test accuracy); the
            other protocols take none.
        sequential: number of requests applied one after another (0 = a single request). Random:
            each request forgets ``forget_fraction`` of the original train split. Mislabeled: the
            corrupted rows are split into this many parts, one per request. Class: one class per
            request, in the order of ``forget_classes`` (which must hold this many classes).
        methods: method names (keys of ``unlearn_kernels.methods.METHODS``); "retrain" is always run.
            "retrain_reseeded" (not among the defaults) retrains a second oracle from another seed: its
            gaps to the oracle are what two retrained models differ by.
        method_options: ``{method: {option: value}}`` passed to the methods' constructors, over the
            study's own choice (for the Newton family the recipe's ``weight_decay``, 0 under AdamW,
            and its label smoothing, see :meth:`method_kwargs`). Checked when the config is built.
        seeds: one full study per seed (data split, forget set, training and methods all seeded).
        recipe: the training recipe (None = ``DEFAULT_RECIPES[model]``).
        device: where models train and run (a name or a torch.device, kept as its name; refused if
            it cannot run here).
        cache_dir: trained original models are cached here (None = no cache; an empty path, which
            would mean the working folder, is refused); the oracle is always retrained, since its
            training time is what speed-ups are measured against.
    """

    dataset: str = "digits"
    root: str | None = None
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    protocol: str = "random"
    forget_fraction: float | None = None
    forget_classes: tuple[int, ...] = ()
    sequential: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    recipe: TrainConfig | None = None
    device: str = "cpu"
    cache_dir: str | None = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        check_dataset_and_model(self.dataset, self.model)
        if not isinstance(self.model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a dict of the model's constructor arguments, got "
                            f"{type(self.model_kwargs).__name__}")
        if self.recipe is not None and not isinstance(self.recipe, TrainConfig):
            raise TypeError(f"recipe must be a TrainConfig or None, got {type(self.recipe).__name__}")
        if isinstance(self.methods, str):  # a str is a sequence of one-letter "methods"
            raise TypeError(f"methods must be a sequence of method names, not a single str ({self.methods!r})")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:  # a second run would continue from the first one's result and pool with it in mean ± std
            raise ValueError(f"methods (--methods) repeat {', '.join(repeated)}: each method runs once per request")
        # the oracle first: every other method is compared with its model of the same request
        self.methods = ("retrain", *(m for m in self.methods if m != "retrain"))
        check_choice("protocol (--protocol)", self.protocol, PROTOCOLS)
        if not isinstance(self.forget_classes, (tuple, list)) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in self.forget_classes):
            raise TypeError(f"forget_classes must be a tuple of class indices (ints), got {self.forget_classes!r}")
        self.forget_classes = tuple(int(c) for c in self.forget_classes)
        beyond = [c for c in self.forget_classes if not -2**63 <= c < 2**63]
        if beyond:
            raise ValueError(f"forget_classes (--forget-class) must lie in the int64 range, got {beyond[0]}")
        # an option of another protocol would be ignored without a word: refused, as the command line does
        if self.protocol == "class":
            if self.forget_fraction is not None:
                raise ValueError("forget_fraction (--forget-fraction) is for the random and mislabeled protocols, "
                                 "not the class protocol")
            if not self.forget_classes:
                raise ValueError("the class protocol needs at least one class to forget (--forget-class)")
            repeated = sorted({c for c in self.forget_classes if list(self.forget_classes).count(c) > 1})
            if repeated:
                raise ValueError(f"forget_classes (--forget-class) repeat {', '.join(map(str, repeated))}: "
                                 "give each class once")
        else:
            if self.forget_classes:
                raise ValueError(f"forget_classes (--forget-class) is for the class protocol, not the {self.protocol} "
                                 "protocol")
            if self.forget_fraction is None:
                self.forget_fraction = DEFAULT_FORGET_FRACTION
            check_number("forget_fraction (--forget-fraction)", self.forget_fraction, 0.0, 1.0, strict=True,
                         strict_high=True)
            self.forget_fraction = float(self.forget_fraction)  # a numpy or tensor scalar too: a float from here on
        self.sequential = check_int("sequential", self.sequential, low=0)
        check_epochs(self.train_recipe(0).epochs)
        if self.protocol == "class" and self.sequential and self.sequential != len(self.forget_classes):
            raise ValueError(f"the class protocol with {self.sequential} sequential requests forgets one class per "
                             f"request: give {self.sequential} classes (got {list(self.forget_classes)})")
        self.seeds = _check_seeds(self.seeds)
        check_cache_dir("cache_dir", self.cache_dir, "the original models")
        self.device = str(check_device("device", self.device))  # a torch.device too, kept as its name
        self._check_method_options()

    def _check_method_options(self) -> None:
        """Names, option names and values of ``method_options``, by building each method once."""
        if not isinstance(self.method_options, Mapping):
            raise TypeError(f"method_options must be a mapping {{method: {{option: value}}}}, got "
                            f"{type(self.method_options).__name__}")
        for name, options in self.method_options.items():
            if name not in METHODS:
                raise ValueError(f"method options for unknown method {name!r}; choose from {sorted(METHODS)}")
            if name in RECIPE_METHODS:
                offset = " with its seed offset by 1000 (RetrainReseeded(seed_offset=) in Python)" \
                    if name == "retrain_reseeded" else ""
                raise ValueError(f"{name} takes no method options here: it uses the training recipe (--epochs, --lr, "
                                 f"--batch-size){offset}")
            if name not in self.methods:
                raise ValueError(f"method options for {name!r}, which is not among the methods run "
                                 f"({', '.join(self.methods)})")
            if not isinstance(options, Mapping):
                raise TypeError(f"method options for {name!r} must be a mapping, got {type(options).__name__}")
            accepted = _constructor_defaults(METHODS[name])
            unknown = [option for option in options if option not in accepted]
            if unknown and not _takes_any_keyword(METHODS[name]):  # else its constructor judges them below
                raise ValueError(f"{name} takes no option {unknown[0]!r}; its options: "
                                 f"{', '.join(accepted) or 'none'}")
        for name in self.methods:
            if name not in RECIPE_METHODS:
                kwargs = self.method_kwargs(name)
                try:
                    METHODS[name](**kwargs)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{name} rejects the options {kwargs}: {exc}") from None

    def train_recipe(self, seed: int) -> TrainConfig:
        """The training recipe (``recipe``, else the model's default) with seed ``seed``."""
        base = self.recipe if self.recipe is not None else DEFAULT_RECIPES[self.model]
        return dataclasses.replace(base, seed=seed)

    def method_kwargs(self, name: str) -> dict[str, Any]:
        """The constructor arguments the study gives method ``name``: for the methods that work on the
        training objective, the recipe's weight decay and loss, then the user's ``method_options``.

        With SGD or Adam the recipe's weight decay is the L2 term of the training objective. AdamW's
        decoupled decay is not a term of any objective (a model trained with it is near a stationary
        point of the loss alone, far from one of loss + L2), so such methods get weight_decay 0. A
        recipe with label smoothing trains on the smoothed cross entropy: they get that loss."""
        kwargs: dict[str, Any] = {}
        if METHODS[name].uses_training_objective:
            recipe = self.train_recipe(0)
            kwargs["weight_decay"] = 0.0 if recipe.optimizer == "adamw" else recipe.weight_decay
            if recipe.label_smoothing:
                kwargs["loss_fn"] = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        return kwargs | dict(self.method_options.get(name, {}))

    def effective_method_options(self) -> dict[str, dict[str, Any]]:
        """Every constructor option of every method run (defaults filled in), as JSON-friendly values."""
        out = {}
        for name in self.methods:
            if name not in RECIPE_METHODS:
                options = _constructor_defaults(METHODS[name]) | self.method_kwargs(name)
                out[name] = {key: _json_value(value) for key, value in options.items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-friendly values, with the recipe and every method's effective options."""
        d = dataclasses.asdict(self)
        d["recipe"] = self.train_recipe(0).to_dict() | {"seed": "per study seed"}
        d["effective_method_options"] = self.effective_method_options()
        return _json_value(d)  # numpy or tensor values a caller gave (model_kwargs, method_options) too


def _constructor_defaults(cls: type) -> dict[str, Any]:
    """The named constructor parameters of ``cls`` with their defaults (``inspect.Parameter.empty`` if none),
    and those of the method its ``**kwargs`` go to (``forwards_options_to``: CureNewtonLoRA's are CureNewton's)."""
    parameters = inspect.signature(cls).parameters.values()
    named = {p.name: p.default for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    forwarded = getattr(cls, "forwards_options_to", None)
    if forwarded is None:
        return named
    target, excluded = forwarded
    return named | {k: v for k, v in _constructor_defaults(target).items() if k not in named and k not in excluded}


def _takes_any_keyword(cls: type) -> bool:
    """Whether the constructor of ``cls`` has a ``**kwargs`` parameter."""
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())


def _json_value(value: Any) -> Any:
    """``value`` as JSON: plain values as they are, tensors and numpy values as numbers or lists,
    containers element-wise, anything else by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is inspect.Parameter.empty:
        return "<required>"
    if isinstance(value, nn.CrossEntropyLoss):  # its repr does not show its options
        kind = type(value)
        name = "torch.nn.CrossEntropyLoss" if kind is nn.CrossEntropyLoss else f"{kind.__module__}.{kind.__qualname__}"
        weight = "" if value.weight is None else ", weight=<per-class weights>"
        return (f"{name}(label_smoothing={value.label_smoothing}, ignore_index={value.ignore_index}, "
                f"reduction={value.reduction!r}{weight})")
    name = getattr(value, "__qualname__", None)
    return f"{getattr(value, '__module__', None) or ''}.{name}".lstrip(".") if name else str(value)


def check_dataset_and_model(dataset: Any, model: Any) -> None:
    """ValueError for a dataset name not in :func:`~unlearn_kernels.data.available_datasets` or a model
    name without a recipe in :data:`DEFAULT_RECIPES` (the choices listed)."""
    if dataset not in available_datasets():
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(available_datasets())}")
    if model not in DEFAULT_RECIPES:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(DEFAULT_RECIPES)}")


def default_scenarios(forget_fraction: float | None = None, forget_classes: tuple[int, ...] = (3,),
                      **common: Any) -> dict[str, StudyConfig]:
    """The three scenarios of a plain ``unlearn-kernels run``: random forgetting, mislabeled data
    (both ``forget_fraction`` of the train split, None: :data:`DEFAULT_FORGET_FRACTION`) and class
    forgetting; ``common`` goes to every :class:`StudyConfig`."""
    return {
        "random": StudyConfig(protocol="random", forget_fraction=forget_fraction, **common),
        "mislabeled": StudyConfig(protocol="mislabeled", forget_fraction=forget_fraction, **common),
        "class": StudyConfig(protocol="class", forget_classes=tuple(forget_classes), **common),
    }


def build_scenario(config: StudyConfig, splits: DatasetSplits,
                   seed: int) -> tuple[LabeledData, list[ForgetRequest], str]:
    """The data of ``config``'s protocol on ``splits`` for ``seed``, as every study builds it: ``(train
    split the original model trains on, the requests, a cache-name tag for that split)``.

    Raises:
        ValueError: as the protocol's constructor, or a request forgets fewer than :data:`MIA_LOSS_FOLDS`
            rows (its loss MIA could not be measured: found here, before any training, not after it).
    """
    labels = splits.train.y
    train_split, cache_tag = splits.train, ""
    if config.protocol == "mislabeled":
        corruption = mislabel(labels, config.forget_fraction, seed=seed, num_classes=splits.num_classes)
        num_wrong = len(corruption.corrupted_idx)
        if config.sequential > num_wrong:  # split_forget's own message would name neither option
            raise ValueError(f"sequential (--sequential) asks for {config.sequential} requests, but the forget "
                             f"fraction (--forget-fraction) gives {num_wrong} wrong-label rows: lower sequential or "
                             "raise forget_fraction")
        requests = split_forget(len(labels), corruption.corrupted_idx, max(1, config.sequential), seed=seed,
                                description=corruption.description)
        # the corrupted split has its own cache file: a clean original is never overwritten or reused; the
        # fraction as repr writes it (":g" gave 0.1 and 0.1000001 one file, each run replacing the other's model)
        train_split, cache_tag = corruption.apply(splits.train), f"-mislabeled{config.forget_fraction!r}"
    elif config.protocol == "class":
        requests = (sequential_class_forget(labels, config.forget_classes) if config.sequential
                    else [class_forget(labels, config.forget_classes)])
        if bool(torch.isin(splits.test.y, torch.tensor(config.forget_classes)).all()):
            raise ValueError(f"the test split holds only the forgotten class(es) {list(config.forget_classes)}: no "
                             "test accuracy would be left to measure")
    elif config.sequential:
        count = forget_count(config.forget_fraction, len(labels))
        if config.sequential * count >= len(labels):  # sequential_forget's own message would name neither option
            raise ValueError(f"sequential (--sequential) asks for {config.sequential} requests of {count} rows (the "
                             f"forget fraction, --forget-fraction, {config.forget_fraction:g} of {len(labels)}), which "
                             f"would forget every row: lower sequential or forget_fraction (at most "
                             f"{(len(labels) - 1) // count} requests of this fraction fit)")
        requests = sequential_forget(labels, config.sequential, config.forget_fraction, seed=seed)
    else:
        requests = [random_forget(labels, config.forget_fraction, seed=seed)]
    for k, request in enumerate(requests):
        if len(request.forget_idx) < MIA_LOSS_FOLDS:
            which = f"request {k + 1} of {len(requests)}" if len(requests) > 1 else "the request"
            more = ("forget more classes" if config.protocol == "class" else
                    "raise forget_fraction (--forget-fraction)" + (" or lower sequential (--sequential)"
                                                                   if config.sequential else ""))
            raise ValueError(f"{which} forgets {len(request.forget_idx)} rows, fewer than the {MIA_LOSS_FOLDS} the "
                             f"loss MIA's {MIA_LOSS_FOLDS}-fold cross-validation needs: {more}")
    return train_split, requests, cache_tag


def check_scenario(config: StudyConfig) -> None:
    """Loads the first seed's data, builds its forget requests (labels only, no training) and the
    model, and checks each method's options against the model, so that a missing dataset, a class that
    does not occur, more requests than rows, a model that does not fit the data, a retain set of one
    row that the oracle cannot train a batch-norm layer on or a method option naming a layer the model
    does not have fail before any work.

    Raises:
        ValueError, FileNotFoundError, ImportError: as :func:`run_study` would on that seed.
    """
    seed = config.seeds[0]
    splits = load_dataset(config.dataset, root=config.root, seed=seed)
    train_split, requests, _ = build_scenario(config, splits, seed)
    # its initialisation draws from the seed's generator, not from the caller's global one
    model = init_model(lambda: build_model(config.model, splits.input_shape, splits.num_classes,
                                           **config.model_kwargs), seed)
    # batches of one row that a batch-norm layer cannot train on: the original's, then each oracle's
    batch_size = config.train_recipe(seed).batch_size
    join_last_row("study", model, train_split, batch_size, role=ORIGINAL_ROLE)
    for request in requests:
        join_last_row("retrain", model, request.apply(train_split)[1], batch_size, role="retain")
    for name in config.methods:  # what the options name in the model (parameters, adapter targets) exists
        if name not in RECIPE_METHODS:
            METHODS[name](**config.method_kwargs(name)).check_model(model)


def _model_info(config: StudyConfig) -> dict[str, Any]:
    """The model's name, options and dataset: what its checkpoints record beside its signature (the options
    as :meth:`StudyConfig.to_dict` writes them: a numpy or tensor value as a number or list, which the
    checkpoint's JSON metadata can hold)."""
    return {"name": config.model, "kwargs": _json_value(config.model_kwargs), "dataset": config.dataset}


def _model_factory(config: StudyConfig, splits: DatasetSplits) -> Callable[[], nn.Module]:
    """A function that builds ``config``'s model for the data of ``splits``, untrained."""
    return lambda: build_model(config.model, splits.input_shape, splits.num_classes, **config.model_kwargs)


def _original_path(config: StudyConfig, factory: Callable[[], nn.Module], seed: int, cache_tag: str) -> Path:
    """The cache file of the original model of ``seed`` (``cache_tag``: see :func:`build_scenario`)."""
    recipe = config.train_recipe(seed)
    return cache_path(Path(config.cache_dir), f"original-{config.dataset}-{config.model}-{seed}{cache_tag}",
                      init_model(factory, recipe.seed), recipe, _model_info(config), config.device)


def check_cache(config: StudyConfig) -> None:
    """Refuses, before any training, a cache folder (``cache_dir``) that could not take the original
    models the study trains: a file in its place, a folder that cannot be made or one that takes no
    writes. Such a folder passes only if it already holds every original the study needs (a
    read-only cache still serves its models). The originals cached for the study's seeds are read here
    (the seeds' data loaded to find them), so that a damaged one stops the run before any work: found
    when its seed was reached, it threw away the earlier seeds' results.

    Raises:
        ValueError: naming the folder, why it cannot be written and how many originals it lacks.
        CheckpointError: a cached original there is corrupt (as :func:`run_study` would raise).
    """
    if config.cache_dir is None:
        return
    try:
        check_writable_folder(config.cache_dir)
    except ValueError as exc:
        problem = str(exc)
    else:
        problem = None
    lacking = 0
    for seed in config.seeds:
        splits = load_dataset(config.dataset, root=config.root, seed=seed)
        train_split, _, cache_tag = build_scenario(config, splits, seed)
        factory, recipe = _model_factory(config, splits), config.train_recipe(seed)
        metadata = training_metadata(init_model(factory, recipe.seed), train_split, recipe, _model_info(config),
                                     config.device)
        lacking += load_checkpoint(_original_path(config, factory, seed, cache_tag), metadata) is None
    if lacking and problem is not None:
        raise ValueError(f"the checkpoint cache (cache_dir) {problem}, and it lacks {lacking} of the study's original "
                         "models, which could not be saved there after their training (run with --no-cache, or set "
                         "XDG_CACHE_HOME to a writable folder)")


def _make_method(config: StudyConfig, name: str, factory: Callable[[], nn.Module], recipe: TrainConfig,
                 model_info: dict) -> Unlearner:
    if name == "retrain":
        # never from the cache: its training time is the cost every speed-up is measured against
        return Retrain(factory, recipe, model_info=model_info)
    if name == "retrain_reseeded":
        return RetrainReseeded(factory, recipe, model_info=model_info)
    return METHODS[name](**config.method_kwargs(name))


def evaluate(model: nn.Module, *, forget: LabeledData, retain: LabeledData, test: LabeledData,
             unseen: LabeledData, original_unseen_logits: torch.Tensor, seed: int,
             with_rf_jsd: bool = True) -> tuple[dict, dict]:
    """Metrics of one model that need no oracle, and the logits the oracle comparisons need
    (``with_rf_jsd=False``: no RF-JSD, which the class protocol does not record).

    Raises:
        ValueError: the model's logits on one of the sets are not finite (weights so large that they overflow).
    """
    logits = {name: predict_logits(model, data) for name, data in
              (("forget", forget), ("retain", retain), ("test", test), ("unseen", unseen))}
    for name, values in logits.items():
        if not all_finite(values):
            raise ValueError(f"the model's logits on the {name} set are NaN or Inf (its weights overflow)")
    m = {
        "acc_forget": accuracy(logits["forget"], forget.y),
        "acc_retain": accuracy(logits["retain"], retain.y),
        "acc_test": accuracy(logits["test"], test.y),
        "acc_unseen": accuracy(logits["unseen"], unseen.y),
        "mia_entropy": mia_entropy(logits["retain"], logits["test"], logits["forget"], seed=seed),
        "mia_loss": mia_loss(logits["forget"], forget.y, logits["test"], test.y, seed=seed, folds=MIA_LOSS_FOLDS),
        "mia_efficacy": mia_salun_efficacy(logits["retain"], retain.y, logits["test"], test.y,
                                           logits["forget"], forget.y, seed=seed),
        "grad_norm_retain": gradient_norm(model, F.cross_entropy, retain),
    }
    if with_rf_jsd and bool(torch.isin(forget.y.unique(), unseen.y).all()):
        m["rf_jsd"] = rf_jsd(logits["forget"], forget.y, original_unseen_logits, unseen.y)
    return m, logits


def _plain(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a model that keeps LoRA adapters a copy with them merged (the oracle's
    parameter layout, for the weight distance)."""
    if not adapter_modules(model):
        return model
    return unload(copy.deepcopy(model), merge=True)


def _compare(metrics: dict, logits: dict, model: nn.Module, oracle: dict) -> None:
    """Adds the comparisons against the oracle (its metrics, forget logits and model)."""
    metrics["js_to_oracle"] = js_divergence(logits["forget"], oracle["logits"]["forget"])
    metrics["kl_to_oracle"] = kl_divergence(oracle["logits"]["forget"], logits["forget"])
    metrics["js_lotus_to_oracle"] = js_divergence_lotus(logits["forget"], oracle["logits"]["forget"])
    metrics["activation_distance"] = activation_distance(logits["forget"], oracle["logits"]["forget"])
    metrics["weight_distance"] = weight_distance(_plain(model), oracle["model"])
    metrics["avg_gap"] = avg_gap(metrics, oracle["metrics"])
    metrics["tug_of_war"] = tug_of_war(metrics, oracle["metrics"])
    for key in AVG_GAP_KEYS:
        metrics[f"gap_{key}"] = metrics[key] - oracle["metrics"][key]


def run_study(config: StudyConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Runs the study; returns ``{"config", "records"}`` where each record is one (seed, request,
    method) with its metrics, cost and diagnostics.

    Mislabeled protocol: ``acc_forget`` is measured against the corrupted labels (the ones trained
    on and forgotten) and ``acc_forget_true`` against the true labels. With an "original" row, every
    record gets ``gap_closed_acc_forget`` and ``gap_closed_avg_gap`` (see :func:`add_gap_closed`).
    """
    progress = progress or (lambda phase, done, total: None)
    check_cache(config)
    warm_up()  # the same timings whether the original model is trained here or loaded from the cache
    records: list[dict[str, Any]] = []
    device = torch.device(config.device)
    total = len(config.seeds) * max(1, config.sequential) * len(config.methods)
    done = 0
    for seed in config.seeds:
        splits = load_dataset(config.dataset, root=config.root, seed=seed)
        model_info = _model_info(config)
        factory = _model_factory(config, splits)
        recipe = config.train_recipe(seed)
        # before any training: bad input fails fast
        train_split, requests, cache_tag = build_scenario(config, splits, seed)
        progress(f"seed {seed}: " + ("the original model (from the cache, or trained)" if config.cache_dir is not None
                                     else "training the original model"), done, total)
        # its refusals (e.g. batches of one row a batch-norm layer cannot train on) name the study, which the
        # user ran, and the set as the original model's
        if config.cache_dir is not None:
            original, _ = train_or_load(_original_path(config, factory, seed, cache_tag), factory, train_split, recipe,
                                        model_info=model_info, device=device, owner="study", role=ORIGINAL_ROLE)
        else:
            original = init_model(factory, recipe.seed)
            train(original, train_split, recipe, device=device, owner="study", role=ORIGINAL_ROLE)
            check_converged("study", ORIGINAL_ROLE, recipe, original)
        unseen = splits.val
        original_unseen_logits = predict_logits(original, unseen)
        current = {name: original for name in config.methods}  # each method continues its own chain
        forgotten = torch.empty(0, dtype=torch.long)
        for step, request in enumerate(requests):
            forget, retain = request.apply(train_split)
            forgotten = torch.cat([forgotten, request.forget_idx])
            test = splits.test
            if config.protocol == "class":  # the classes forgotten so far can no longer be predicted
                gone = train_split.y[forgotten].unique()
                gone = gone[torch.isin(gone, splits.test.y)]  # a class the test split lacks: nothing to remove
                test = remove_classes(splits.test, gone.tolist()) if len(gone) else splits.test
            oracle: dict[str, Any] = {}
            for name in config.methods:  # retrain first
                progress(f"seed {seed} request {step + 1}/{len(requests)}: {name}", done, total)
                method = _make_method(config, name, factory, recipe, model_info)
                failure = None
                # the forgotten class's unseen data is no RF-JSD target (docs/rfa.md)
                scored = dict(forget=forget, retain=retain, test=test, unseen=unseen,
                              original_unseen_logits=original_unseen_logits, seed=seed,
                              with_rf_jsd=config.protocol != "class")
                try:
                    measured = measure(method.unlearn, current[name], forget, retain, unseen=unseen, seed=seed,
                                       device=device)
                    # inside the try: a model whose logits overflow is this method's failure, not the study's
                    metrics, logits = evaluate(measured.result.model, **scored)
                # any Exception (a refusal, a LinAlgError, a TypeError from a user's model) is the method's failed
                # record: one method must not discard every other row after the training; the type names the unexpected
                except Exception as exc:
                    if name == "retrain":  # the oracle is every row's reference: its failure ends the study
                        raise
                    failure = (str(exc) if isinstance(exc, (ValueError, RuntimeError))
                               else f"{type(exc).__name__}: {exc}")
                    # what a caller holds after the error: the model it passed, unchanged; measured with no cost
                    measured = Measured(UnlearnResult(model=current[name], seconds=0.0), 0.0, 0)
                    metrics, logits = evaluate(current[name], **scored)
                result = measured.result
                current[name] = result.model
                if config.protocol == "mislabeled":
                    true_y = splits.train.y[request.forget_idx]
                    metrics["acc_forget_true"] = accuracy(logits["forget"], true_y)
                    # grouped by D_f's (wrong) labels, rf_jsd rises as a method unlearns: by the true ones too
                    if bool(torch.isin(true_y.unique(), unseen.y).all()):
                        metrics["rf_jsd_true"] = rf_jsd(logits["forget"], true_y, original_unseen_logits, unseen.y)
                if len(requests) > 1:
                    so_far = predict_logits(result.model, train_split.subset(forgotten))
                    metrics["acc_forgotten_so_far"] = accuracy(so_far, train_split.y[forgotten])
                metrics.update(seconds=measured.seconds, peak_memory_bytes=measured.peak_memory_bytes,
                               hvps=result.hvps, gradients=result.gradients)
                metrics["failed"] = float(failure is not None)
                if failure is not None:  # what it cost before it was refused is unknown: no zeros in the means
                    del metrics["seconds"], metrics["peak_memory_bytes"], metrics["hvps"], metrics["gradients"]
                if name == "retrain":
                    oracle = {"metrics": metrics, "logits": logits, "model": result.model}
                _compare(metrics, logits, result.model, oracle)
                diagnostics = result.diagnostics | ({"failed": failure} if failure else {})
                records.append({"seed": seed, "request": step, "method": name, "metrics": metrics,
                                "diagnostics": _json_value(diagnostics),
                                "forget_size": len(forget), "retain_size": len(retain)})
                done += 1
        retrain_seconds = {(r["seed"], r["request"]): r["metrics"]["seconds"] for r in records
                           if r["method"] == "retrain" and r["seed"] == seed}
        for r in records:
            if r["seed"] == seed and not r["metrics"]["failed"]:  # a failed call has no time
                r["metrics"]["speedup"] = speedup(r["metrics"]["seconds"], retrain_seconds[(seed, r["request"])])
    add_gap_closed(records)
    progress("done", done, total)
    return {"config": config.to_dict(), "records": records}


def gap_closed(gap: float, original_gap: float) -> float | None:
    """``1 - |gap| / |original_gap|``: the share of the Original's gap to the oracle that a method
    closes (1: the oracle's value, 0: no better than not unlearning, < 0: further from the oracle);
    None where the Original's gap is 0."""
    base = abs(original_gap)
    return 1.0 - abs(gap) / base if base > 0 else None


def add_gap_closed(records: list[dict[str, Any]]) -> None:
    """Adds ``gap_closed_acc_forget`` and ``gap_closed_avg_gap`` to every record's metrics, in place.

    gap closed = 1 - |gap(method)| / |gap(Original)|, against the "original" record of the same seed and
    request (1: the oracle's value, 0: no better than not unlearning, < 0: further from the oracle than
    the Original). None where the Original's gap is 0; nothing is added without an "original" record.
    """
    originals = {(r["seed"], r["request"]): r["metrics"] for r in records if r["method"] == "original"}
    for r in records:
        reference = originals.get((r["seed"], r["request"]))
        if reference is None:
            continue
        for name, key in GAP_CLOSED.items():
            r["metrics"][f"gap_closed_{name}"] = gap_closed(r["metrics"][key], reference[key])

