"""The evaluation study: train the original model, unlearn with every method, retrain the oracle,
and measure everything against it, over several seeds (and optionally a sequence of requests).

This is the layer that turns data, models and methods into numbers; :mod:`unlearn_kernels.report`
turns the numbers into a table, JSON and plots. Progress is reported through a callback (the
command line passes tqdm bars); nothing here prints.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import DatasetSplits, ForgetRequest, LabeledData, class_forget, load_dataset, random_forget
from .data import remove_classes, sequential_forget
from .eval import (
    accuracy,
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
from .methods import METHODS, Retrain, Unlearner
from .models import build_model
from .checkpoint import train_or_load
from .training import TrainConfig, init_model, train

#: the methods run by default, oracle first (it is the reference of every other row)
DEFAULT_METHODS = ("retrain", "original", "cure_newton", "stochastic_cure_newton", "newton_pinv", "damped_newton",
                   "influence", "lissa", "finetune", "gradient_ascent", "neggrad_plus", "random_labels", "salun",
                   "scrub", "bad_teacher", "ssd", "lotus")

#: default training recipe per model family (the oracle is retrained with the same recipe)
DEFAULT_RECIPES = {
    "mlp": TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4),
    "cnn": TrainConfig(epochs=20, batch_size=64, lr=0.05, weight_decay=5e-4),
    "resnet18": TrainConfig(epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4, lr_schedule="cosine"),
    "vit": TrainConfig(epochs=50, batch_size=128, lr=1e-3, weight_decay=5e-2, optimizer="adamw", lr_schedule="cosine"),
}

#: metrics where the oracle's value is the target (reported as a gap to it)
GAP_METRICS = ("acc_forget", "acc_retain", "acc_test", "mia_entropy")

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unlearn-kernels" / "checkpoints"


@dataclass
class StudyConfig:
    """Everything a study needs; every field is a command-line option of ``unlearn-kernels run``.

    Attributes:
        dataset: a name from :func:`unlearn_kernels.data.available_datasets`.
        root: directory of the local files for MNIST/CIFAR-style datasets.
        model: "mlp", "cnn", "resnet18" or "vit"; ``model_kwargs`` go to its constructor.
        protocol: "random" (stratified fraction of the train split) or "class" (whole classes).
        forget_fraction: fraction for the random protocol, in (0, 1).
        forget_classes: classes for the class protocol (also removed from the test accuracy).
        sequential: number of requests applied one after another (0 = a single request); each
            request forgets ``forget_fraction`` of the original train split.
        methods: method names (keys of ``unlearn_kernels.methods.METHODS``); "retrain" is always run.
        seeds: one full study per seed (data split, forget set, training and methods all seeded).
        recipe: the training recipe (None = ``DEFAULT_RECIPES[model]``).
        device: where models train and run.
        cache_dir: trained original models are cached here (None = no cache); the oracle is always
            retrained, since its training time is what speed-ups are measured against.
    """

    dataset: str = "digits"
    root: str | None = None
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    protocol: str = "random"
    forget_fraction: float = 0.1
    forget_classes: tuple[int, ...] = ()
    sequential: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    recipe: TrainConfig | None = None
    device: str = "cpu"
    cache_dir: str | None = str(_default_cache_dir())

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        if "retrain" not in self.methods:
            self.methods = ("retrain", *self.methods)
        if self.protocol not in ("random", "class"):
            raise ValueError(f"unknown protocol {self.protocol!r}; choose 'random' or 'class'")
        if self.protocol == "random" and not 0.0 < self.forget_fraction < 1.0:
            raise ValueError(f"forget fraction must be in (0, 1), got {self.forget_fraction}")
        if self.protocol == "class" and not self.forget_classes:
            raise ValueError("the class protocol needs at least one class to forget (--forget-class)")
        if self.protocol == "class" and self.sequential:
            raise ValueError("sequential requests are defined for the random protocol only")
        if self.sequential < 0:
            raise ValueError(f"sequential must be >= 0, got {self.sequential}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but no CUDA device is visible")

    def train_recipe(self, seed: int) -> TrainConfig:
        base = self.recipe if self.recipe is not None else DEFAULT_RECIPES.get(self.model, TrainConfig())
        return dataclasses.replace(base, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = self.train_recipe(0).to_dict() | {"seed": "per study seed"}
        return d


def _requests(config: StudyConfig, splits: DatasetSplits, seed: int) -> list[ForgetRequest]:
    labels = splits.train.y
    if config.protocol == "class":
        return [class_forget(labels, config.forget_classes)]
    if config.sequential:
        return sequential_forget(labels, config.sequential, config.forget_fraction, seed=seed)
    return [random_forget(labels, config.forget_fraction, seed=seed)]


def _make_method(name: str, factory: Callable[[], nn.Module], recipe: TrainConfig, model_info: dict) -> Unlearner:
    if name == "retrain":
        # never from the cache: its training time is the cost every speed-up is measured against
        return Retrain(factory, recipe, model_info=model_info)
    return METHODS[name]()


def evaluate(model: nn.Module, *, forget: LabeledData, retain: LabeledData, test: LabeledData,
             unseen: LabeledData, original_unseen_logits: torch.Tensor, seed: int) -> tuple[dict, dict]:
    """Metrics of one model that need no oracle, and the logits the oracle comparisons need."""
    logits = {name: predict_logits(model, data) for name, data in
              (("forget", forget), ("retain", retain), ("test", test), ("unseen", unseen))}
    m = {
        "acc_forget": accuracy(logits["forget"], forget.y),
        "acc_retain": accuracy(logits["retain"], retain.y),
        "acc_test": accuracy(logits["test"], test.y),
        "mia_entropy": mia_entropy(logits["retain"], logits["test"], logits["forget"], seed=seed),
        "mia_loss": mia_loss(logits["forget"], forget.y, logits["test"], test.y, seed=seed),
        "mia_efficacy": mia_salun_efficacy(logits["retain"], retain.y, logits["test"], test.y,
                                           logits["forget"], forget.y, seed=seed),
        "grad_norm_retain": gradient_norm(model, F.cross_entropy, retain),
    }
    forget_classes = forget.y.unique()
    if bool(torch.isin(forget_classes, unseen.y).all()):
        m["rf_jsd"] = rf_jsd(logits["forget"], forget.y, original_unseen_logits, unseen.y)
    return m, logits


def _compare(metrics: dict, logits: dict, model: nn.Module, oracle: dict) -> None:
    """Adds the comparisons against the oracle (its metrics, forget logits and model)."""
    metrics["js_to_oracle"] = js_divergence(logits["forget"], oracle["logits"]["forget"])
    metrics["kl_to_oracle"] = kl_divergence(oracle["logits"]["forget"], logits["forget"])
    metrics["js_lotus_to_oracle"] = js_divergence_lotus(logits["forget"], oracle["logits"]["forget"])
    metrics["weight_distance"] = weight_distance(model, oracle["model"])
    gap_view = {"mia": metrics["mia_entropy"], **metrics}
    oracle_view = {"mia": oracle["metrics"]["mia_entropy"], **oracle["metrics"]}
    metrics["avg_gap"] = avg_gap(gap_view, oracle_view)
    metrics["tug_of_war"] = tug_of_war(metrics, oracle["metrics"])
    for key in GAP_METRICS:
        metrics[f"gap_{key}"] = metrics[key] - oracle["metrics"][key]


def run_study(config: StudyConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Runs the study; returns ``{"config", "records"}`` where each record is one (seed, request,
    method) with its metrics, cost and diagnostics."""
    progress = progress or (lambda phase, done, total: None)
    records: list[dict[str, Any]] = []
    device = torch.device(config.device)
    total = len(config.seeds) * max(1, config.sequential) * len(config.methods)
    done = 0
    for seed in config.seeds:
        splits = load_dataset(config.dataset, root=config.root, seed=seed)
        model_info = {"name": config.model, "kwargs": config.model_kwargs, "dataset": config.dataset}
        factory = lambda: build_model(config.model, splits.input_shape, splits.num_classes, **config.model_kwargs)  # noqa: E731
        recipe = config.train_recipe(seed)
        progress(f"seed {seed}: training the original model", done, total)
        cache = Path(config.cache_dir) if config.cache_dir else None
        if cache is not None:
            original, _ = train_or_load(cache / f"original-{config.dataset}-{config.model}-{seed}.pt", factory,
                                        splits.train, recipe, model_info=model_info, device=device)
        else:
            original = init_model(factory, recipe.seed)
            train(original, splits.train, recipe, device=device)
        requests = _requests(config, splits, seed)
        test = remove_classes(splits.test, config.forget_classes) if config.protocol == "class" else splits.test
        unseen = splits.val
        original_unseen_logits = predict_logits(original, unseen)
        current = {name: original for name in config.methods}  # each method continues its own chain
        forgotten = torch.empty(0, dtype=torch.long)
        for step, request in enumerate(requests):
            forget, retain = request.apply(splits.train)
            forgotten = torch.cat([forgotten, request.forget_idx])
            oracle: dict[str, Any] = {}
            for name in config.methods:  # retrain first
                progress(f"seed {seed} request {step + 1}/{len(requests)}: {name}", done, total)
                method = _make_method(name, factory, recipe, model_info)
                measured = measure(method.unlearn, current[name], forget, retain, unseen=unseen, seed=seed,
                                   device=device)
                result = measured.result
                current[name] = result.model
                metrics, logits = evaluate(result.model, forget=forget, retain=retain, test=test, unseen=unseen,
                                           original_unseen_logits=original_unseen_logits, seed=seed)
                if len(requests) > 1:
                    metrics["acc_forgotten_so_far"] = accuracy(predict_logits(result.model, splits.train.subset(forgotten)),
                                                               splits.train.y[forgotten])
                metrics.update(seconds=measured.seconds, peak_memory_bytes=measured.peak_memory_bytes,
                               hvps=result.hvps, gradients=result.gradients)
                if name == "retrain":
                    oracle = {"metrics": metrics, "logits": logits, "model": result.model}
                _compare(metrics, logits, result.model, oracle)
                records.append({"seed": seed, "request": step, "method": name, "metrics": metrics,
                                "diagnostics": _jsonable(result.diagnostics),
                                "forget_size": len(forget), "retain_size": len(retain)})
                done += 1
        retrain_seconds = {(r["seed"], r["request"]): r["metrics"]["seconds"] for r in records
                           if r["method"] == "retrain" and r["seed"] == seed}
        for r in records:
            if r["seed"] == seed:
                r["metrics"]["speedup"] = speedup(r["metrics"]["seconds"], retrain_seconds[(seed, r["request"])])
    progress("done", done, total)
    return {"config": config.to_dict(), "records": records}


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if isinstance(value, (int, float, str, bool, list, type(None))):
            out[key] = value
    return out
