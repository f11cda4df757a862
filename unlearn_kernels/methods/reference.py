"""The two reference points of every comparison: the retrain oracle and the untouched original."""
from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..checkpoint import cache_path, check_cache_dir, data_fingerprint, model_signature, train_or_load
from ..checks import check_int, check_seed
from ..labeled import LabeledData
from ..training import (
    TrainConfig,
    check_config,
    check_model_factory,
    check_new_each_call,
    epoch_steps,
    init_model,
    join_last_row,
    model_device,
    train,
)
from .base import Unlearner, UnlearnResult


class Retrain(Unlearner):
    """The oracle f_gold: a fresh model from ``model_factory`` trained on D_r alone with ``config``.

    It never sees D_f. Use the recipe that trained the original model, so that the only difference
    between the two is the forget set. The initialisation and shuffling come from ``config.seed``
    (not from the ``seed`` given to :meth:`unlearn`), like the original's: vary ``config.seed`` for
    oracles over several seeds.

    Args:
        model_factory: builds an untrained model of the same architecture as the original.
        config: the training recipe.
        cache_dir: if given, oracles are cached there (one file per retain set, recipe and architecture) with
            :func:`~unlearn_kernels.checkpoint.train_or_load`, and reused when recipe, model, data,
            device, versions and training code match. ``gradients`` is the training cost either
            way; diagnostics say ``cached``.
        model_info: extra model description stored in (and matched against) the cache metadata,
            e.g. the name and kwargs given to ``build_model``.

    Raises:
        TypeError: ``model_factory`` is not a callable (a module instance is refused), ``config``
            not a TrainConfig, ``cache_dir`` not None, a str or an ``os.PathLike`` of a str,
            ``model_info`` not None or a mapping.
        ValueError: ``config.epochs`` is 0 (the oracle would be an untrained model), ``cache_dir`` is
            an empty path (pass None for no cache, "." for the working folder); from
            :meth:`unlearn`, before training: the factory's model differs from the
            model to unlearn (class, modules and their options, e.g. an activation, or the shape
            or dtype of a parameter or buffer), naming the first difference; two calls of the
            factory return models that share a parameter or a normalisation statistic (``lambda: model``, a backbone
            built outside the factory: training would change it in the model to unlearn, see
            :func:`~unlearn_kernels.training.check_new_each_call`); batches of one row that
            a batch-norm layer of the model cannot train on (``config.batch_size`` 1 or a retain set
            of one row; see :func:`~unlearn_kernels.training.join_last_row`).
        CheckpointError: from :meth:`unlearn`, a corrupt cached oracle in ``cache_dir`` (see
            :func:`~unlearn_kernels.checkpoint.train_or_load`; delete it to retrain).
    """

    name = "retrain"
    trains_model_parameters = False  # it trains a fresh model

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        config: TrainConfig,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        model_info: Mapping[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__  # RetrainReseeded's checks too
        check_model_factory(owner, model_factory)
        check_config(owner, config)
        # the recipe takes 0 epochs, but an oracle trained for none is the factory's random initialisation
        check_int(f"{owner}: config.epochs", config.epochs)
        self.cache_dir = check_cache_dir(f"{owner}: cache_dir", cache_dir, "the oracles")
        # else dict's own TypeError, which names neither the argument nor the method
        if model_info is not None and not isinstance(model_info, Mapping):
            raise TypeError(f"{owner}: model_info must be None or a mapping (e.g. a dict), got "
                            f"{type(model_info).__name__}")
        self.model_factory = model_factory
        self.config = config
        self.model_info = dict(model_info or {})

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        device = model_device(model)
        fresh = init_model(self.model_factory, self.config.seed)
        # checked before training: a wrong factory should fail in a second, not after the oracle's training
        difference = _first_difference(_architecture(fresh), _architecture(model))
        if difference is not None:
            raise ValueError(f"{self.name}: model_factory builds a different architecture from the model to unlearn: "
                             f"{difference}")
        if self.cache_dir is None:
            # a factory that hands out the caller's modules would have them trained here (train_or_load checks its own)
            check_new_each_call(self.name, self.model_factory, fresh, self.config.seed)
            # unlearn() checked the retain set on a model of this architecture: train() checks only its batches
            stats = train(fresh, retain, self.config, device=device, owner=self.name, role="retain",
                          data_checked=True)
            return UnlearnResult(model=fresh, seconds=0.0, gradients=stats.steps,
                                 diagnostics={"cached": False, "epochs": stats.epochs})
        # refuses batches of one row that no joining helps before a cached oracle is loaded too; and a
        # cached oracle's cost is still its training's steps
        joined = join_last_row(self.name, fresh, retain, self.config.batch_size, "retain")
        path = cache_path(self.cache_dir, f"retrain-{data_fingerprint(retain)[:16]}", fresh, self.config,
                          self.model_info, device)
        fresh, stats = train_or_load(path, self.model_factory, retain, self.config, model_info=self.model_info,
                                     device=device, owner=self.name, role="retain")
        steps = self.config.epochs * epoch_steps(len(retain), self.config.batch_size, joined)
        return UnlearnResult(model=fresh, seconds=0.0, gradients=steps,
                             diagnostics={"cached": stats is None, "epochs": self.config.epochs})


def _architecture(model: nn.Module) -> list[str]:
    """:func:`~unlearn_kernels.checkpoint.model_signature` as lines to compare: the class, the modules
    (name, class and options, e.g. ``'1': ReLU()``) in order, then the state."""
    signature = model_signature(model)
    return ([f"class {signature['class']}"]
            + [f"module {key!r}: {kind}({options})" for key, kind, options in signature["modules"]]
            + [f"state {key!r} of shape {tuple(shape)} and dtype {dtype}" for key, shape, dtype in signature["state"]])


def _first_difference(built: list[str], given: list[str]) -> str | None:
    """Where the factory's model (``built``) first differs from the model to unlearn (``given``), or None."""
    for index in range(max(len(built), len(given))):
        mine = built[index] if index < len(built) else "nothing more"
        theirs = given[index] if index < len(given) else "nothing more"
        if mine != theirs:
            return f"the factory's model has {mine}, the model to unlearn {theirs}"
    return None


class RetrainReseeded(Retrain):
    """A second oracle: the same recipe on D_r from another initialisation and shuffling
    (``config.seed + seed_offset``), never cached.

    Compared with :class:`Retrain` it measures how far two retrained models are from each other:
    the floor of every gap to the oracle (a method that returned a perfect retrain would show gaps
    of this size), so that a target on gaps can be read against it.

    Args:
        model_factory, config, model_info: as in :class:`Retrain` (nothing is cached, so
            ``model_info`` only describes the model).
        seed_offset: added to ``config.seed`` (default 1000), != 0; the sum must be a seed in
            [0, 2**63).

    Raises:
        TypeError: as :class:`Retrain`.
        ValueError: ``seed_offset`` is not a non-zero integer, ``config.epochs`` is 0, or
            ``config.seed + seed_offset`` is not in [0, 2**63); from :meth:`unlearn`, as :class:`Retrain`.
    """

    name = "retrain_reseeded"

    def __init__(self, model_factory: Callable[[], nn.Module], config: TrainConfig, *, seed_offset: int = 1000,
                 model_info: Mapping[str, Any] | None = None) -> None:
        if isinstance(seed_offset, bool) or not isinstance(seed_offset, numbers.Integral) or seed_offset == 0:
            raise ValueError(f"RetrainReseeded: seed_offset must be a non-zero int, got {seed_offset!r}")
        seed_offset = int(seed_offset)  # a numpy integer too
        super().__init__(model_factory, config, model_info=model_info)  # checks the factory and the recipe's type
        # named here: TrainConfig would report the sum as its own seed, which the caller never gave
        seed = check_seed(f"RetrainReseeded: config.seed + seed_offset ({config.seed} + {seed_offset})",
                          config.seed + seed_offset)
        self.config = dataclasses.replace(config, seed=seed)
        self.seed_offset = seed_offset


class Original(Unlearner):
    """No unlearning: returns (a copy of) the original model, weights and mode unchanged."""

    name = "original"
    trains_model_parameters = False

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        return UnlearnResult(model=model, seconds=0.0)
