"""First-order unlearning baselines: fine-tuning, gradient ascent, NegGrad+, random labels, SalUn,
SCRUB, Bad Teacher, SSD and UNSIR.

Every method works on the private copy the :class:`~.base.Unlearner` base class hands it, trains
on the model's own device, returns the model in eval mode, and is deterministic for its ``seed``
(seeded shuffling and seeded random labels/initialisations). ``UnlearnResult.gradients`` counts
batch gradient evaluations (one forward + backward on one batch); teacher forward passes are free.

The defaults follow the papers (ResNet-18 on CIFAR-10). Where a paper's value is tied to that scale
(a learning rate or step count that barely moves a small model in a few dozen steps), the default
is scaled for the small models of this package and the docstring says so.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int, check_number
from ..labeled import LabeledData, wrong_labels
from ..training import (
    TrainConfig,
    eval_mode,
    join_last_row,
    make_optimizer,
    model_device,
    probe_rows,
    seeded_rng,
    train,
)
from .base import Unlearner, UnlearnResult, check_finite_result

# ---------------------------------------------------------------------------------------------
# helpers shared by the methods


def endless_batches(data: LabeledData, batch_size: int, seed: int, join_last_row: bool = False
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of ``data`` forever, reshuffled (seed, seed + 1, ...) on every pass
    (``join_last_row`` as in :meth:`~unlearn_kernels.labeled.LabeledData.loader`)."""
    for pass_index in itertools.count():
        yield from data.loader(batch_size, shuffle=True, seed=seed + pass_index, join_last_row=join_last_row)


@torch.no_grad()
def _num_classes(model: nn.Module, data: LabeledData) -> int:
    """Width of the model's logits (one eval-mode forward on :func:`~unlearn_kernels.training.probe_rows`;
    each submodule's mode is restored)."""
    with eval_mode(model):
        return model(probe_rows(model, data.x)).shape[-1]


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy without gradients: a teacher. Its forward runs on copies of its tensor
    arguments: the student runs on the same batch after it, and a model that writes its input in place
    (``x.sub_(mean)``) would otherwise hand the student the batch as the teacher's pass left it."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    teacher.register_forward_pre_hook(_copied_arguments)
    return teacher


def _copied_arguments(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A forward pre-hook: the call's tensor arguments replaced by copies."""
    return tuple(arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args)


def _random_teacher(model: nn.Module, seed: int) -> nn.Module:
    """A frozen copy of ``model`` with fresh random weights: every module's ``reset_parameters()``;
    parameters owned by a module without one are drawn from N(0, 0.02^2) (the usual init of
    embeddings and tokens)."""
    fresh = frozen_copy(model)
    with seeded_rng(seed, model_device(model)), torch.no_grad():
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for parameter in module.parameters(recurse=False):
                    parameter.normal_(0.0, 0.02)
    return fresh


def _distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the batch (Hinton et al.'s distillation loss), in float32
    at least: in bfloat16 the KL of two equal distributions came out -0.003, the size of SCRUB's real values."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student, teacher = student_logits.to(dtype), teacher_logits.to(dtype)
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                    reduction="batchmean") * temperature**2


#: how errors name the set :func:`flagged_mix` builds
MIXED_ROLE = "training (D_f and a sample of D_r)"

#: how errors name the set :class:`RandomLabels` and :class:`SalUn` train on
RELABELLED_ROLE = "training (D_r and D_f with random labels)"

#: how errors name the sets :class:`UNSIR` impairs and repairs the model on
IMPAIR_ROLE, REPAIR_ROLE = "impair (noise and a retain subset)", "repair (the retain subset)"


def flagged_mix(forget: LabeledData, retain: LabeledData, retain_fraction: float, seed: int) -> tuple[LabeledData, int]:
    """All of D_f plus a seeded random ``retain_fraction`` of D_r, as one set whose "labels" are flags
    (1 = forget sample, 0 = retain sample), and the number of retain samples taken."""
    device = forget.x.device
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(retain), generator=generator)[: round(retain_fraction * len(retain))]
    retain_x = retain.x[chosen.to(device)]
    flags = torch.cat([torch.ones(len(forget), dtype=torch.long, device=device),
                       torch.zeros(len(retain_x), dtype=torch.long, device=device)])
    return LabeledData(torch.cat([forget.x, retain_x]), flags), len(retain_x)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step of ``optimizer`` on ``loss`` (gradients cleared first)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class TrainedUnlearner(Unlearner):
    """Shared hyper-parameters of the methods that run an optimizer (validated once, here; ``epochs``
    must be at least 1: with 0 the call would return the model unchanged)."""

    trains_in_training_mode = True

    def __init__(self, *, epochs: int, lr: float, batch_size: int, optimizer: str = "sgd", momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
        # the recipe takes 0 epochs (no training); an unlearning call with 0 would return the model unchanged
        check_int(f"{self.name}: epochs", epochs)
        try:  # the recipe's checks, one place for them
            recipe = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                                 weight_decay=weight_decay)
        except (TypeError, ValueError) as error:  # named after the method, not the recipe
            raise type(error)(f"{self.name}: {str(error).removeprefix('TrainConfig: ')}") from None
        self.epochs, self.lr, self.batch_size = recipe.epochs, recipe.lr, recipe.batch_size
        self.optimizer, self.momentum, self.weight_decay = recipe.optimizer, recipe.momentum, recipe.weight_decay

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model.parameters(), self.optimizer, self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay, owner=self.name)

    def _config(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
                           momentum=self.momentum, seed=seed, weight_decay=self.weight_decay)


# ---------------------------------------------------------------------------------------------
# methods


class Finetune(TrainedUnlearner):
    """Fine-tuning on D_r alone (Warnecke et al. 2023; Jia et al. 2023, "FT"): catastrophic forgetting
    of D_f is left to happen on its own.

    Defaults: 10 epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4 (Jia et al.'s FT setting);
    batch 64 instead of 256 for the small data sets here.
    """

    name = "finetune"

    def __init__(self, epochs: int = 10, lr: float = 0.01, batch_size: int = 64, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        # the retain set was checked by unlearn(): train() checks only its batches, under this method's name
        stats = train(model, retain, self._config(seed), device=model_device(model), owner=self.name, role="retain",
                      data_checked=True)
        return UnlearnResult(model=model, seconds=0.0, gradients=stats.steps,
                             diagnostics={"epochs": stats.epochs, "train_accuracy": stats.train_accuracy})


class GradientAscent(TrainedUnlearner):
    """Gradient ascent on the forget loss (Thudi et al. 2022; Graves et al. 2021, "GA"/"NegGrad").

    Minimises -CE(D_f) with SGD. Unbounded: more epochs or a larger lr destroys the model.
    Defaults: 5 epochs as in Jia et al. (2023), who search lr in [1e-6, 1e-4] with 4,500 forget
    samples on ResNet-18; scaled here to lr 1e-2, because a forget set of a few hundred samples
    gives only a handful of steps per epoch (on an MLP over digits, forgetting one class, 3e-2
    already destroys the model). SGD momentum 0.9, batch 64. No weight decay (it would fight the
    ascent).
    """

    name = "gradient_ascent"

    def __init__(self, epochs: int = 5, lr: float = 1e-2, batch_size: int = 64, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        forget = forget.to(model_device(model))
        join = join_last_row(self.name, model, forget, self.batch_size, "forget")
        optimizer = self._make_optimizer(model)
        model.train()
        steps = 0
        for epoch in range(self.epochs):
            for x, y in forget.loader(self.batch_size, shuffle=True, seed=seed + epoch, join_last_row=join):
                optimizer_step(optimizer, -F.cross_entropy(model(x), y))
                steps += 1
        return UnlearnResult(model=model.eval(), seconds=0.0, gradients=steps, diagnostics={"epochs": self.epochs})


class NegGradPlus(TrainedUnlearner):
    """NegGrad+ (Kurmanji et al. 2023): descent on D_r and ascent on D_f in one combined loss,

        loss = alpha * CE(D_r batch) - (1 - alpha) * CE(D_f batch),

    one D_r batch and one D_f batch per step (D_f batches cycle). The minus sign is in the loss,
    so the optimizer (momentum, weight decay) sees the true gradient of the combined objective.

    Defaults: SGD lr 0.01, momentum 0.9, weight decay 5e-4, 5 epochs over D_r, batch 64. alpha is tuned per
    experiment in Kurmanji et al., with the retain term weighted close to 1; 0.95 here (on an MLP
    over digits forgetting one class, 0.95 forgets partly, 0.9 fully at some cost in retain accuracy).
    """

    name = "neggrad_plus"

    def __init__(self, alpha: float = 0.95, epochs: int = 5, lr: float = 0.01, batch_size: int = 64,
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)
        self.alpha = check_number(f"{self.name}: alpha", alpha, 0.0, 1.0)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        device = model_device(model)
        forget, retain = forget.to(device), retain.to(device)
        join_retain = join_last_row(self.name, model, retain, self.batch_size, "retain")
        join_forget = join_last_row(self.name, model, forget, self.batch_size, "forget")
        optimizer = self._make_optimizer(model)
        forget_batches = endless_batches(forget, self.batch_size, seed + 1, join_forget)
        model.train()
        steps = 0
        for epoch in range(self.epochs):
            for x_r, y_r in retain.loader(self.batch_size, shuffle=True, seed=seed + epoch, join_last_row=join_retain):
                x_f, y_f = next(forget_batches)
                loss = self.alpha * F.cross_entropy(model(x_r), y_r) - (1 - self.alpha) * F.cross_entropy(model(x_f), y_f)
                optimizer_step(optimizer, loss)
                steps += 2
        return UnlearnResult(model=model.eval(), seconds=0.0, gradients=steps,
                             diagnostics={"epochs": self.epochs, "alpha": self.alpha})


class RandomLabels(TrainedUnlearner):
    """Random labelling (Golatkar et al. 2020; Hayase et al. 2020, "RL"): fine-tune on D_r together
    with D_f relabelled with random *wrong* labels (drawn once, uniform over the other classes).

    Defaults: 10 epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4 (SalUn's RL baseline setting);
    batch 64.
    """

    name = "random_labels"

    def __init__(self, epochs: int = 10, lr: float = 0.01, batch_size: int = 64, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)

    def _relabelled_union(self, model: nn.Module, forget: LabeledData, retain: LabeledData, seed: int) -> LabeledData:
        device = model_device(model)
        forget, retain = forget.to(device), retain.to(device)
        # unlearn() refused a model with fewer than two classes
        wrong = wrong_labels(forget.y, _num_classes(model, forget), torch.Generator().manual_seed(seed))
        return LabeledData(torch.cat([retain.x, forget.x]), torch.cat([retain.y, wrong]))

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        # both sets were checked by unlearn() and the wrong labels are among the model's classes
        stats = train(model, self._relabelled_union(model, forget, retain, seed), self._config(seed),
                      device=model_device(model), owner=self.name, role=RELABELLED_ROLE, data_checked=True)
        return UnlearnResult(model=model, seconds=0.0, gradients=stats.steps, diagnostics={"epochs": stats.epochs})


class SalUn(RandomLabels):
    """SalUn, saliency unlearning (Fan et al., ICLR 2024).

    1. Saliency: g = gradient of the forget loss CE(D_f) (summed over batches, eval mode); the mask
       keeps the ``mask_fraction`` of all trainable weights with the largest |g| (one global threshold;
       frozen parameters are neither ranked nor trained).
    2. Random-label training (as :class:`RandomLabels`, with its optimizer and that optimizer's own
       weight decay: coupled for SGD and Adam, decoupled for AdamW) of the masked weights only:
       gradients are multiplied by the mask, and after every step the unmasked weights are put back,
       so they stay exactly as they were (the decay would move them).

    Defaults: mask_fraction 0.5 (the paper's sparsity), 10 epochs, SGD lr 0.01, momentum 0.9,
    weight decay 5e-4, batch 64.
    """

    name = "salun"

    def __init__(self, mask_fraction: float = 0.5, epochs: int = 10, lr: float = 0.01, batch_size: int = 64,
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)
        self.mask_fraction = check_number(f"{self.name}: mask_fraction", mask_fraction, 0.0, 1.0, strict=True)

    def _saliency_mask(self, model: nn.Module, forget: LabeledData) -> tuple[dict[str, torch.Tensor], int]:
        """Boolean masks per trainable parameter, and the number of batch gradients it cost."""
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        join = join_last_row(self.name, model, forget, self.batch_size, "forget", training=False)
        model.eval()
        # summed over the batches in float32 at least: in a half-precision .grad the sum over a large
        # forget set loses accuracy (bfloat16) or overflows to Inf (float16), and the top-k with it
        total = {name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                 for name, p in params.items()}
        batches = 0
        for x, y in forget.to(model_device(model)).loader(self.batch_size, join_last_row=join):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()
            for name, p in params.items():
                if p.grad is not None:
                    total[name] += p.grad
            batches += 1
        model.zero_grad(set_to_none=True)
        saliency = torch.cat([t.abs().flatten() for t in total.values()])
        keep = torch.zeros_like(saliency, dtype=torch.bool)
        keep[torch.topk(saliency, max(1, round(self.mask_fraction * saliency.numel()))).indices] = True
        masks, offset = {}, 0
        for name, p in params.items():
            masks[name] = keep[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return masks, batches

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        data = self._relabelled_union(model, forget, retain, seed)
        # a set that no joining of batches can train is refused before the saliency pass, not after it
        join_last_row(self.name, model, data, self.batch_size, RELABELLED_ROLE)
        masks, mask_batches = self._saliency_mask(model, forget)
        masked = [(p, masks[name], p.detach().clone()) for name, p in model.named_parameters() if name in masks]
        # the optimizer's weight decay is applied as it applies it (AdamW's is not a gradient term), and
        # the step's change to the unmasked weights (decay, momentum of it) undone
        handles = [p.register_hook(lambda grad, mask=mask: grad * mask) for p, mask, _ in masked]

        def put_back_unmasked() -> None:
            with torch.no_grad():
                for p, mask, start in masked:
                    p.copy_(torch.where(mask, p, start))

        try:
            stats = train(model, data, self._config(seed), device=model_device(model), owner=self.name,
                          role=RELABELLED_ROLE, data_checked=True, after_step=put_back_unmasked)
        finally:
            for handle in handles:
                handle.remove()
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return UnlearnResult(model=model, seconds=0.0, gradients=mask_batches + stats.steps,
                             diagnostics={"epochs": stats.epochs, "mask_fraction": kept / total})


class SCRUB(TrainedUnlearner):
    """SCRUB (Kurmanji et al., NeurIPS 2023): the student (the model) moves away from the teacher (a
    frozen copy of the original) on D_f and stays close to it on D_r.

    Each epoch: if epoch < ``max_steps``, one "max" pass over D_f minimising -KL(teacher || student);
    then one "min" pass over D_r minimising gamma * CE + alpha * KL(teacher || student). KL is the
    distillation loss at temperature T, times T^2.

    Defaults from the authors' code: T 4, alpha 0.001, gamma 0.99, max_steps 2, SGD momentum 0.9,
    weight decay 5e-4, forget batch 32, 5 epochs; retain batch 64 (theirs 128). Their lr 5e-4 (with step decay)
    is scaled to 1e-2 for the small models here, where 5e-4 leaves the student almost where it was.
    """

    name = "scrub"

    def __init__(self, epochs: int = 5, max_steps: int = 2, lr: float = 1e-2, batch_size: int = 64,
                 forget_batch_size: int = 32, temperature: float = 4.0, alpha: float = 0.001, gamma: float = 0.99,
                 optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)
        self.max_steps = check_int(f"{self.name}: max_steps", max_steps, low=0)
        self.forget_batch_size = check_int(f"{self.name}: forget_batch_size", forget_batch_size)
        self.temperature = check_number(f"{self.name}: temperature", temperature, 0.0, strict=True)
        self.alpha = check_number(f"{self.name}: alpha", alpha, 0.0)
        self.gamma = check_number(f"{self.name}: gamma", gamma, 0.0)
        if self.max_steps == 0 and self.gamma == 0:  # the min pass alone distils the model into itself: it stays
            raise ValueError(f"{self.name}: max_steps=0 runs no max pass, and with gamma=0 the min pass only distils "
                             "the model into itself (its KL to the teacher starts at its minimum, 0): set max_steps "
                             "or gamma above 0")

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        device = model_device(model)
        forget, retain = forget.to(device), retain.to(device)
        # the forget set is trained on only if a max pass runs
        join_forget = self.max_steps > 0 and join_last_row(self.name, model, forget, self.forget_batch_size, "forget")
        join_retain = join_last_row(self.name, model, retain, self.batch_size, "retain")
        teacher = frozen_copy(model)
        optimizer = self._make_optimizer(model)
        model.train()
        steps = 0
        forget_kl = retain_loss = math.nan
        for epoch in range(self.epochs):
            if epoch < self.max_steps:
                kl_sum, batches = torch.zeros((), device=device), 0
                for x, _ in forget.loader(self.forget_batch_size, shuffle=True, seed=seed + epoch,
                                          join_last_row=join_forget):
                    with torch.no_grad():
                        target = teacher(x)
                    kl = _distill_kl(model(x), target, self.temperature)
                    optimizer_step(optimizer, -kl)
                    kl_sum, batches = kl_sum + kl.detach(), batches + 1
                forget_kl = kl_sum.item() / batches
                steps += batches
            loss_sum, batches = torch.zeros((), device=device), 0
            for x, y in retain.loader(self.batch_size, shuffle=True, seed=seed + epoch, join_last_row=join_retain):
                with torch.no_grad():
                    target = teacher(x)
                logits = model(x)
                loss = self.gamma * F.cross_entropy(logits, y) + self.alpha * _distill_kl(logits, target, self.temperature)
                optimizer_step(optimizer, loss)
                loss_sum, batches = loss_sum + loss.detach(), batches + 1
            retain_loss = loss_sum.item() / batches
            steps += batches
        return UnlearnResult(model=model.eval(), seconds=0.0, gradients=steps,
                             diagnostics={"epochs": self.epochs, "forget_kl_last_max_pass": forget_kl,
                                          "retain_loss_last_pass": retain_loss})


class BadTeacher(TrainedUnlearner):
    """Bad Teacher (Chundawat et al., AAAI 2023): distil from two teachers. D_f samples take their
    targets from an incompetent teacher (a randomly initialised copy of the model), D_r samples from
    the competent one (the original): loss = KL(target || softmax(student / T)), batch mean.

    The data are all of D_f plus a random ``retain_fraction`` of D_r, shuffled together.
    Defaults from the authors' code: 1 epoch, Adam, T 1, retain_fraction 0.3, no weight decay;
    their lr 1e-4 (about 70 steps of batch 256 for ResNet-18 on CIFAR-10) is scaled to 3e-3, and their batch
    256 to 64, for the small data sets here, where one epoch is a handful of steps.
    Their loss is ``kl_div`` with elementwise-mean reduction; batch mean is the true KL (a constant
    factor of the number of classes, absorbed by Adam's scale invariance).
    """

    name = "bad_teacher"

    def __init__(self, epochs: int = 1, lr: float = 3e-3, batch_size: int = 64, temperature: float = 1.0,
                 retain_fraction: float = 0.3, optimizer: str = "adam", momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)
        self.temperature = check_number(f"{self.name}: temperature", temperature, 0.0, strict=True)
        self.retain_fraction = check_number(f"{self.name}: retain_fraction", retain_fraction, 0.0, 1.0)

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        device = model_device(model)
        forget, retain = forget.to(device), retain.to(device)
        competent = frozen_copy(model)
        incompetent = _random_teacher(model, seed)
        mixed, num_retain = flagged_mix(forget, retain, self.retain_fraction, seed)
        join = join_last_row(self.name, model, mixed, self.batch_size, MIXED_ROLE)
        optimizer = self._make_optimizer(model)
        model.train()
        steps = 0
        for epoch in range(self.epochs):
            for x, is_forget in mixed.loader(self.batch_size, shuffle=True, seed=seed + epoch, join_last_row=join):
                with torch.no_grad():
                    bad = F.softmax(incompetent(x) / self.temperature, dim=1)
                    good = F.softmax(competent(x) / self.temperature, dim=1)
                    flag = is_forget.unsqueeze(1).to(bad.dtype)  # not x's: integer or bool inputs
                    target = flag * bad + (1 - flag) * good
                loss = F.kl_div(F.log_softmax(model(x) / self.temperature, dim=1), target, reduction="batchmean")
                optimizer_step(optimizer, loss)
                steps += 1
        return UnlearnResult(model=model.eval(), seconds=0.0, gradients=steps,
                             diagnostics={"epochs": self.epochs, "retain_samples": num_retain})


class SSD(Unlearner):
    """Selective Synaptic Dampening (Foster et al., AAAI 2024): no training, one multiplicative edit.

    Importances are diagonal Fisher estimates as in the authors' code, the mean over batches of the
    squared batch gradient of CE: I_f on D_f, I_D on the full training set D = D_r + D_f (shuffled, so
    D_f samples are mixed into D's batches). Every weight with I_f > alpha * I_D is multiplied by
    min(lambda * I_D / I_f, 1). Importances are computed in eval mode (BatchNorm statistics are not
    touched). Frozen parameters are left as they are; ``dampened_fraction`` in the diagnostics is the
    share of the trainable weights dampened.

    Defaults: alpha 10, lambda 1 (the paper's values for ResNet-18/CIFAR); batch 64.
    """

    name = "ssd"

    def __init__(self, alpha: float = 10.0, lam: float = 1.0, batch_size: int = 64) -> None:
        self.alpha = check_number(f"{self.name}: alpha", alpha, 0.0, strict=True)
        self.lam = check_number(f"{self.name}: lam", lam, 0.0, strict=True)
        self.batch_size = check_int(f"{self.name}: batch_size", batch_size)

    def _importance(self, model: nn.Module, data: LabeledData, role: str, seed: int
                    ) -> tuple[dict[str, torch.Tensor], int]:
        """Mean squared batch gradient per parameter, and the number of batches (``role`` names
        ``data`` in an error)."""
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        # in float32 at least: half-precision squares underflow to 0 (and sums overflow), which would
        # turn the dampening factors lam * I_D / I_f into 0/0 or x/0
        importance = {name: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                      for name, p in params.items()}
        join = join_last_row(self.name, model, data, self.batch_size, role, training=False)
        batches = 0
        for x, y in data.loader(self.batch_size, shuffle=True, seed=seed, join_last_row=join):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            for name, p in params.items():
                if p.grad is not None:
                    importance[name] += p.grad.to(importance[name].dtype).square()
            batches += 1
        model.zero_grad(set_to_none=True)
        return {name: imp / batches for name, imp in importance.items()}, batches

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        device = model_device(model)
        model.eval()
        forget, retain = forget.to(device), retain.to(device)
        full = LabeledData(torch.cat([retain.x, forget.x]), torch.cat([retain.y, forget.y]))
        forget_imp, forget_batches = self._importance(model, forget, "forget", seed)
        full_imp, full_batches = self._importance(model, full, "training (D_r and D_f)", seed + 1)
        dampened = 0
        trainable = sum(p.numel() for name, p in model.named_parameters() if name in forget_imp)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in forget_imp:
                    continue
                i_f, i_d = forget_imp[name], full_imp[name]
                factor = (self.lam * i_d / i_f).clamp(max=1.0)
                # with lam > alpha some selected weights get the factor 1: they are not dampened
                selected = (i_f > self.alpha * i_d) & (factor < 1.0)
                p[selected] *= factor[selected]
                dampened += int(selected.sum())
        return UnlearnResult(model=model, seconds=0.0, gradients=forget_batches + full_batches,
                             diagnostics={"dampened_weights": dampened,
                                          "dampened_fraction": dampened / trainable})


class UNSIR(TrainedUnlearner):
    """UNSIR (Tarun, Chundawat, Mandal, Kankanhalli, IEEE TNNLS 2023, "Fast Yet Effective Machine
    Unlearning"): impair the model with error-maximising noise, then repair it on retained data.

    1. Noise: one noise input n_i of the forget inputs' shape per forget sample (x_i, y_i), drawn from
       N(0, 1) and moved by Adam (``noise_lr``, ``noise_steps`` steps; the model frozen, in eval mode)
       to raise the model's loss on the forget label while staying small, minimising
       -CE(f(n_i), y_i) + ``noise_l2`` * ||n_i||^2. The paper learns one batch of noise per forgotten
       class, labelled with that class; a noise input per forget sample, labelled with the sample's
       label, is that for a class request and carries it over to requests of single samples. Each
       n_i's objective is its own (a sum over the batch, Adam per element), so the noise does not
       depend on how the forget set is cut into batches.
    2. Impair: ``epochs`` pass(es) over the noise, labelled y_i, shuffled with a retain subset, at ``lr``.
    3. Repair: ``repair_epochs`` pass(es) over the retain subset at ``repair_lr`` (a fresh optimizer).

    The retain subset keeps at most ``retain_per_class`` rows of each class of D_r, drawn with the
    seed (the paper: 1,000 per class of CIFAR-10; None keeps all of D_r). The inputs must be floating
    point: the noise is optimised in input space.

    Defaults from the paper: noise Adam lr 0.1 for 40 steps (5 x 8), noise_l2 0.1, impair and repair
    one epoch each with Adam at lr 0.02 and 0.01, no weight decay; batch 64 instead of 256 for the
    small data sets here. Cost: ``noise_steps`` forward and backward passes over D_f (the paper's one
    batch of noise per class costs ``noise_steps`` passes over a batch), then the two epochs.
    """

    name = "unsir"

    def __init__(self, epochs: int = 1, lr: float = 0.02, repair_epochs: int = 1, repair_lr: float = 0.01,
                 noise_steps: int = 40, noise_lr: float = 0.1, noise_l2: float = 0.1,
                 retain_per_class: int | None = 1000, batch_size: int = 64, optimizer: str = "adam",
                 momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay)
        self.repair_epochs = check_int(f"{self.name}: repair_epochs", repair_epochs, low=0)
        self.repair_lr = check_number(f"{self.name}: repair_lr", repair_lr, 0.0, strict=True)
        self.noise_steps = check_int(f"{self.name}: noise_steps", noise_steps, low=0)
        self.noise_lr = check_number(f"{self.name}: noise_lr", noise_lr, 0.0, strict=True)
        self.noise_l2 = check_number(f"{self.name}: noise_l2", noise_l2, 0.0)
        self.retain_per_class = (None if retain_per_class is None
                                 else check_int(f"{self.name}: retain_per_class", retain_per_class))

    def _retain_subset(self, retain: LabeledData, seed: int) -> LabeledData:
        """At most ``retain_per_class`` rows of each class of ``retain``, a seeded random choice, in the
        order they had."""
        if self.retain_per_class is None:
            return retain
        order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed)).to(retain.y.device)
        labels = retain.y[order]
        # rank of each drawn row among the drawn rows of its class: rows ranked below the cap are kept
        by_class = torch.argsort(labels, stable=True)
        sorted_labels = labels[by_class]
        first_of_class = torch.searchsorted(sorted_labels, sorted_labels)
        rank = torch.empty_like(by_class)
        rank[by_class] = torch.arange(len(labels), device=labels.device) - first_of_class
        kept = order[rank < self.retain_per_class].sort().values
        return LabeledData(retain.x[kept], retain.y[kept])

    def _noise(self, model: nn.Module, forget: LabeledData, seed: int) -> tuple[torch.Tensor, int]:
        """The error-maximising noise, one input per forget sample, and the batch gradients it cost."""
        generator = torch.Generator().manual_seed(seed)
        # optimised in float32 at least (Adam's moments in half precision lose the small steps)
        dtype = torch.promote_types(forget.x.dtype, torch.float32)
        noise = torch.randn(forget.x.shape, generator=generator, dtype=dtype).to(forget.x.device)
        join = join_last_row(self.name, model, forget, self.batch_size, "forget", training=False)
        model.eval()
        batches = 0
        starts = list(range(0, len(forget), self.batch_size))
        if join:  # a last batch of one row goes with the one before it
            starts.pop()
        for start, end in zip(starts, starts[1:] + [len(forget)]):
            rows = slice(start, end)
            part = noise[rows].clone().requires_grad_(True)
            labels = forget.y[rows]
            optimizer = torch.optim.Adam([part], lr=self.noise_lr)
            for _ in range(self.noise_steps):
                # a copy for the model (one that writes its input in place would write the leaf)
                loss = (-F.cross_entropy(model(part.to(forget.x.dtype, copy=True)), labels, reduction="sum")
                        + self.noise_l2 * part.square().sum())
                optimizer.zero_grad(set_to_none=True)
                part.grad, = torch.autograd.grad(loss, part)
                optimizer.step()
                batches += 1
            noise[rows] = part.detach()
        return noise.to(forget.x.dtype), batches

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        if not forget.x.is_floating_point():
            raise ValueError(f"{self.name}: needs floating-point inputs (its noise is optimised in input space); "
                             f"the forget set's inputs are {forget.x.dtype}")
        device = model_device(model)
        forget, retain = forget.to(device), retain.to(device)
        subset = self._retain_subset(retain, seed)
        # the sets that no joining of batches can train are refused before the noise is made: the impair set
        # (the noise has the forget inputs' shape) and the repair's subset
        join_last_row(self.name, model, LabeledData(torch.cat([forget.x, subset.x]), torch.cat([forget.y, subset.y])),
                      self.batch_size, IMPAIR_ROLE)
        if self.repair_epochs:
            join_last_row(self.name, model, subset, self.batch_size, REPAIR_ROLE)
        noise, noise_batches = self._noise(model, forget, seed)
        impair = LabeledData(torch.cat([noise, subset.x]), torch.cat([forget.y, subset.y]))
        # the noise and D_r's rows are finite, fit the model and hold its labels (unlearn() checked D_f and D_r)
        impaired = train(model, impair, self._config(seed), device=device, owner=self.name, role=IMPAIR_ROLE,
                         data_checked=True)
        check_finite_result(self.name, model)  # a diverged impair said as such, not as the repair's NaN model
        # another shuffle for the repair; folded back at the top seed (2**63 - 1 + 1 is no torch seed)
        repair_config = dataclasses.replace(self._config((seed + 1) % 2**63), epochs=self.repair_epochs,
                                            lr=self.repair_lr)
        repaired = train(model, subset, repair_config, device=device, owner=self.name, role=REPAIR_ROLE,
                         data_checked=True) if self.repair_epochs else None
        return UnlearnResult(
            model=model.eval(), seconds=0.0,
            gradients=noise_batches + impaired.steps + (repaired.steps if repaired else 0),
            diagnostics={"noise_norm_mean": noise.flatten(1).norm(dim=1).mean().item(),
                         "retain_samples": len(subset), "impair_accuracy": impaired.train_accuracy,
                         "repair_accuracy": repaired.train_accuracy if repaired else math.nan})
