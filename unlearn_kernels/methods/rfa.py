"""RFA: residual feature alignment with LoRA (Qin, Zhu, Wang, Zhou, arXiv 2411.08443), our
reconstruction (the paper's body and code were not available; docs/methods.md says what is the
paper's and what is ours).

The model is frozen. Zero-initialised LoRA adapters (B = 0) wrap intermediate layers, so an adapted
layer's output is the frozen layer's output plus the adapter's "residual feature". Only the adapters
train, on

    L = L_align(D_r) + task_weight * CE(D_r) + lam * L_shift(D_f),

where a layer's distance between features h and h' of one sample is ``||h - h'||^2 / (n_l s_l^2)``
(n_l the layer's feature count, s_l^2 the mean square of the frozen model's features of that layer
on D_r, so that every layer weighs alike), summed over the adapted layers and averaged over samples.
L_align is the distance to the frozen model's own features (the residual driven to zero on D_r);
L_shift moves the D_f features to a target chosen by ``shift``:

* ``"neighbors"`` (default, label-free): the mean of the frozen model's features of the ``neighbors``
  nearest samples (Euclidean, in input space) of a reference pool of data the model never saw
  (``unseen``, or D_r when no unseen set is given), restricted to the classes of D_r: what the
  model does on similar data it did not fit. It reads no label of D_f, so it also works when D_f's
  labels are the wrong ones (mislabeled data), and for class unlearning it pulls toward the
  remaining classes.
* ``"unseen_class"``: the mean frozen feature of the unseen samples of the D_f sample's own label
  (sample unlearning with correct labels; needs ``unseen``).
* ``"other_class"``: the mean frozen feature of the D_r samples of the class the frozen model ranks
  highest after the D_f sample's label (class unlearning).
* ``"margin"`` (label-free): away from the frozen model's own features h0, along the unit direction
  u in which the frozen model's logit for its own prediction falls fastest (minus the gradient of
  that logit with respect to the layer's output), until the move ``<h - h0, u> / ||h0||`` reaches
  ``margin`` (the hinge ``max(0, margin - <h - h0, u> / ||h0||)^2``). A plain distance from h0
  would not do: its gradient vanishes at the start, where the residual is zero.

With ``merge=True`` (default) the adapters are merged into the weights and removed: the returned
model has the original architecture. With ``merge=False`` the returned model keeps the adapters,
unmerged, and its frozen weights are bit-identical to the given model's, except under an adapter
the given model had merged: that one is unmerged first (its base weight is the merged weight minus
the adapter's delta, up to float rounding). A model that already has adapters (an earlier
``merge=False`` request) trains those, with its current outputs as the frozen features (but one on a
layer the forward does not call, another task's head: no features, no gradient; it is left as it is).
A layer named in ``targets`` that the forward does not call, or calls twice, is refused before training.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_batch_statistics, check_choice, check_int, check_number
from ..labeled import LabeledData
from ..lora import (
    adaptable_layers,
    adapter_modules,
    add_adapters,
    check_rank_alpha,
    check_targets,
    new_adapter_layers,
    unload,
    unmerge,
)
from ..training import eval_mode, make_optimizer, model_device
from .base import UnlearnResult, check_finite_result
from .first_order import TrainedUnlearner, endless_batches, frozen_copy, optimizer_step

SHIFTS = ("neighbors", "unseen_class", "other_class", "margin")


def _eager(model: nn.Module) -> nn.Module:
    """The module whose forward calls hooks: a torch.compile'd model may replay a graph compiled before the hooks
    were added (dynamo does not guard on hooks); its eager module (the same modules, the same result) calls them."""
    return getattr(model, "_orig_mod", model)


def _called(model: nn.Module, probe: torch.Tensor, names: Sequence[str]) -> list[str]:
    """The named modules that ``model(probe)`` calls, in call order, once per call: one forward in eval mode
    under no_grad, every module's mode restored (a torch.compile'd model through its eager module: :func:`_eager`)."""
    modules = dict(model.named_modules())
    called: list[str] = []
    handles = [modules[n].register_forward_hook(lambda *_, n=n: called.append(n)) for n in names]
    try:
        with torch.no_grad(), eval_mode(model):
            _eager(model)(probe)
    finally:
        for handle in handles:
            handle.remove()
    return called


def hidden_layers(model: nn.Module, probe: torch.Tensor) -> tuple[str, ...]:
    """The default adapter targets: the Linear and Conv2d layers that can take an adapter
    (:func:`~unlearn_kernels.lora.adaptable_layers`) and that ``model(probe)`` calls once, but the output
    layer, the last Linear it calls (adaptable or not); in module order. ``probe``: a batch of inputs (see
    :func:`_called`). A layer the forward does not call (a head of another task) has no features to align; one
    it calls twice has two, of which the feature hooks keep one."""
    modules = dict(model.named_modules())
    adaptable = adaptable_layers(model)
    called = _called(model, probe, [n for n, m in modules.items() if n in adaptable or isinstance(m, nn.Linear)])
    linear = [n for n in called if isinstance(modules[n], nn.Linear)]
    return tuple(n for n in adaptable if called.count(n) == 1 and (not linear or n != linear[-1]))


def _check_called_once(owner: str, called: Sequence[str], layers: Sequence[str]) -> None:
    """ValueError, before training, naming a layer of ``layers`` that a forward (``called``: :func:`_called`'s
    list) does not call, or calls more than once: the first has no features to align, and of the second the feature
    hook keeps the last call's output, so the other calls' features would be neither aligned nor shifted."""
    for name in layers:
        count = called.count(name)
        if count == 0:
            raise ValueError(f"{owner}: layer {name!r} is not called by a forward of the model (another task's head, "
                             "say): it has no features to align (leave it out of targets=)")
        if count > 1:
            raise ValueError(f"{owner}: layer {name!r} is called {count} times in one forward: RFA aligns the features "
                             "of one call per layer (name other layers with targets=)")


class _Features:
    """Forward hooks that keep the outputs of the named modules of one model (the last forward)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}  # flattened to (N, n_l)
        self.raw: dict[str, torch.Tensor] = {}  # as the module returned them
        modules = dict(model.named_modules())
        self.names = tuple(names)
        self.handles = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self.raw[name] = output
            self.outputs[name] = output.flatten(1)
            # the rest of the model gets a copy: a module after the layer that writes in place (ReLU(inplace=True))
            # turned the kept features into its own output
            return output.clone()
        return hook

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.outputs.clear()
        self.raw.clear()
        logits = _eager(model)(x)
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"rfa: the model ran without calling the forward hooks on {missing}: a forward that "
                               "computes with those layers' weights without calling them (F.linear(h, "
                               "self.fc.weight)), whose features RFA cannot take (name other layers with targets=), "
                               "or a submodule compiled with torch.compile, which may replay a graph without them "
                               "(pass the eager model)")
        return logits, [self.outputs[n] for n in self.names]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class RFA(TrainedUnlearner):
    """Residual feature alignment with LoRA adapters on the hidden layers (see the module docstring).

    Defaults (ours): adapters of rank 8 (alpha = rank) on every Linear and Conv2d layer that can take
    one but the output layer; shift "neighbors" with 5 neighbours; lam 1; the task loss on D_r added
    (task_weight 1); Adam, lr 1e-2, 10 epochs over D_r in batches of 64 (one D_f batch per D_r
    batch, D_f cycling); no weight decay; merge afterwards.

    Args:
        epochs, lr, batch_size, optimizer, weight_decay: the adapters' training.
        rank, alpha: the adapters (scale alpha / rank; alpha None means rank).
        targets: module names or glob patterns of the layers to adapt (None: :func:`hidden_layers`).
        shift: one of :data:`SHIFTS`.
        lam: the weight of L_shift, > 0.
        neighbors: k of the "neighbors" target, >= 1 (where the pool holds fewer samples, each forget
            sample's target is the mean over the whole pool).
        margin: how far the "margin" target moves the features along u, relative to ||h0||, > 0.
        task_weight: weight of the cross entropy on D_r, >= 0 (0: features only).
        merge: merge the adapters into the weights (True) or return the model with its adapters.
    """

    name = "rfa"
    trains_in_training_mode = False  # its adapters train in eval mode, as the frozen model runs
    trains_model_parameters = False  # only the adapters it adds train; the model is frozen

    def __init__(self, epochs: int = 10, lr: float = 1e-2, batch_size: int = 64, rank: int = 8,
                 alpha: float | None = None, targets: str | Sequence[str] | None = None, shift: str = "neighbors",
                 lam: float = 1.0, neighbors: int = 5, margin: float = 1.0, task_weight: float = 1.0,
                 merge: bool = True, optimizer: str = "adam", weight_decay: float = 0.0) -> None:
        super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay)
        check_rank_alpha(self.name, rank, alpha)
        if targets is not None:
            targets = check_targets(self.name, targets)
        check_choice(f"{self.name}: shift", shift, SHIFTS)
        if not isinstance(merge, bool):
            raise TypeError(f"{self.name}: merge must be a bool, got {merge!r}")
        self.rank, self.alpha, self.targets, self.shift, self.merge = rank, alpha, targets, shift, merge
        self.lam = check_number(f"{self.name}: lam", lam, 0.0, strict=True)
        self.margin = check_number(f"{self.name}: margin", margin, 0.0, strict=True)
        self.task_weight = check_number(f"{self.name}: task_weight", task_weight, 0.0)
        self.neighbors = check_int(f"{self.name}: neighbors", neighbors)

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        adapters = [p for a in adapter_modules(model).values() for p in (a.lora_a, a.lora_b)]
        return make_optimizer(adapters, self.optimizer, self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                              owner=self.name)

    def _check_parameters(self, model: nn.Module) -> None:
        # the named layers exist and can take an adapter, or, for the default targets, some layer can: refused
        # here, not mid-method (which of those are hidden layers takes a forward: the unlearn call's)
        new_adapter_layers(self.name, model, self.targets)
        # the frozen model's features of a sample are targets for that sample in another batch
        check_batch_statistics(self.name, model, "a sample's features depend on the batch it comes in, and RFA "
                               "aligns them with features of the frozen model computed in other batches")

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        device = model_device(model)
        forget, retain = forget.to(device), retain.to(device)
        unseen = unseen.to(device) if unseen is not None else None
        if self.shift == "unseen_class":
            self._check_unseen_classes(forget, unseen)
        # the default targets: what a forward of a forget row calls (a copy: a model may write its input in place)
        probe = forget.x[:1].clone()
        new = new_adapter_layers(self.name, model, self.targets, lambda m: hidden_layers(m, probe), "hidden ")
        unmerge(model)  # adapters the model had merged (in this private copy): merged, A and B get no gradient
        if new:
            add_adapters(model, new, self.rank, self.alpha)
        # every adapter trains (an earlier request's too), so every adapted layer is in the loss: the earlier
        # ones were trained by the task loss alone, with no alignment of their features
        layers = tuple(adapter_modules(model))
        called = _called(model, probe, layers)
        # but an earlier request's adapter on a layer this forward never calls (another task's head): no features to
        # align, and no gradient to train it by; left as it is
        layers = tuple(n for n in layers if n in new or n in called)
        _check_called_once(self.name, called, layers)
        # the frozen features come from the plain layers (adapters merged in: B = 0 for fresh ones), at
        # the same module names, without paying for the adapters in every teacher forward
        teacher = unload(frozen_copy(model), merge=True).requires_grad_(False)
        student_features, teacher_features = _Features(model, layers), _Features(teacher, layers)
        try:
            scales = self._feature_scales(teacher, teacher_features, retain)
            goals = self._shift_targets(teacher, teacher_features, forget, retain, unseen)
            steps, last = self._train(model, teacher, student_features, teacher_features, forget, retain, goals,
                                      scales, seed)
        finally:
            student_features.remove()
            teacher_features.remove()
        if self.merge:
            # a diverged adapter is the method's failure, said as for any method (merging would refuse it first)
            check_finite_result(self.name, model)
            unload(model, merge=True)
        # a step's forward and backward run over a D_r and a D_f batch: two batch gradients, as NegGrad+ counts
        return UnlearnResult(model=model.eval(), seconds=0.0, gradients=2 * steps,
                             diagnostics={"layers": list(layers), "shift": self.shift, "merged": self.merge,
                                          "epochs": self.epochs, **last})

    # ----------------------------------------------------------------------------------------
    # the parts

    def _check_unseen_classes(self, forget: LabeledData, unseen: LabeledData | None) -> None:
        if unseen is None or len(unseen) == 0:
            raise ValueError(f"{self.name}: shift='unseen_class' needs unseen data (unseen=..., e.g. the validation "
                             "split)")
        missing = sorted(set(forget.y.unique().tolist()) - set(unseen.y.unique().tolist()))
        if missing:
            raise ValueError(f"{self.name}: shift='unseen_class' needs unseen samples of every forget class; none of "
                             f"{missing}")

    @torch.no_grad()
    def _all_features(self, teacher: nn.Module, features: _Features, data: LabeledData
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The frozen model's logits and per-layer features on ``data`` (eval mode, in batches)."""
        logits, per_layer = [], [[] for _ in features.names]
        for x, _ in data.loader(1024):
            z, hs = features(teacher, x)
            logits.append(z)
            for store, h in zip(per_layer, hs, strict=True):
                store.append(h)
        return torch.cat(logits), [torch.cat(s) for s in per_layer]

    def _feature_scales(self, teacher: nn.Module, features: _Features, retain: LabeledData) -> list[float]:
        """s_l^2: the mean square of the frozen features of each layer on D_r (floored above 0)."""
        _, hs = self._all_features(teacher, features, retain)
        return [max(float(_at_least_float32(h).square().mean()), 1e-12) for h in hs]

    def _shift_targets(self, teacher: nn.Module, features: _Features, forget: LabeledData, retain: LabeledData,
                       unseen: LabeledData | None) -> list[torch.Tensor]:
        """The per-layer D_f targets, one row per forget sample (for "margin": the frozen features and
        the directions u stacked, (N, 2, n_l))."""
        forget_logits, forget_h = self._all_features(teacher, features, forget)
        if self.shift == "margin":
            return [torch.stack([h, u], 1)
                    for h, u in zip(forget_h, self._away_directions(teacher, features, forget), strict=True)]
        if self.shift == "unseen_class":
            _, pool_h = self._all_features(teacher, features, unseen)
            return [_class_means(h, unseen.y, forget_logits.shape[1])[forget.y] for h in pool_h]
        if self.shift == "other_class":
            _, retain_h = self._all_features(teacher, features, retain)
            ranked = forget_logits.clone()
            ranked[torch.arange(len(forget)), forget.y] = -math.inf
            absent = torch.ones(ranked.shape[1], dtype=torch.bool, device=ranked.device)
            absent[retain.y.unique()] = False
            ranked[:, absent] = -math.inf  # only classes that D_r holds
            if not bool(torch.isfinite(ranked.amax(1)).all()):  # argmax would pick class 0, a mean of no rows
                raise ValueError(f"{self.name}: shift='other_class' needs a class of D_r other than a forget sample's "
                                 f"own label; D_r holds only class(es) {retain.y.unique().tolist()}")
            other = ranked.argmax(1)
            return [_class_means(h, retain.y, ranked.shape[1])[other] for h in retain_h]
        # neighbors: the pool is unseen data (else D_r), limited to the classes of D_r
        pool = unseen if unseen is not None and len(unseen) else retain
        pool = pool.subset(torch.isin(pool.y, retain.y.unique()))
        if len(pool) == 0:
            raise ValueError(f"{self.name}: the neighbours' pool (unseen data of the classes of D_r) is empty")
        k = min(self.neighbors, len(pool))
        # one row per sample, 1-D samples (x of shape (N,)) included
        distances = torch.cdist(forget.x.reshape(len(forget), -1).double(), pool.x.reshape(len(pool), -1).double())
        nearest = distances.topk(k, dim=1, largest=False).indices
        _, pool_h = self._all_features(teacher, features, pool)
        return [h[nearest].mean(1) for h in pool_h]

    def _away_directions(self, teacher: nn.Module, features: _Features, data: LabeledData) -> list[torch.Tensor]:
        """Per layer, per sample: the unit vector of minus the gradient of the frozen model's logit for
        its own prediction with respect to the layer's output."""
        directions: list[list[torch.Tensor]] = [[] for _ in features.names]
        # the layers' outputs must be on a graph: through the input's gradient, or, for integer inputs (token
        # ids) that cannot take one, through the frozen copy's parameters, whose flags are given back after
        frozen = [] if data.x.is_floating_point() else [p for p in teacher.parameters() if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            for x, _ in data.loader(1024):
                logits, _ = features(teacher, x.detach().requires_grad_(True) if x.is_floating_point() else x)
                own = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                # allow_unused: a layer whose output does not reach the logits (an auxiliary head) has direction 0
                grads = torch.autograd.grad(own, [features.raw[n] for n in features.names], allow_unused=True)
                for store, g, n in zip(directions, grads, features.names, strict=True):
                    g = -(torch.zeros_like(features.raw[n]) if g is None else g).flatten(1)
                    store.append(g / g.norm(dim=1, keepdim=True).clamp_min(1e-12))
        finally:
            for p in frozen:
                p.requires_grad_(False)
        return [torch.cat(d) for d in directions]

    def _distance(self, hs: list[torch.Tensor], targets: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
        """sum_l mean over samples of ||h - t||^2 / (n_l s_l^2)."""
        return sum(((_at_least_float32(h) - _at_least_float32(t)).square().mean(1) / s).mean()
                   for h, t, s in zip(hs, targets, scales, strict=True))

    def _margin_loss(self, hs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """sum_l mean over samples of max(0, margin - <h - h0, u> / ||h0||)^2."""
        total = 0.0
        for h, target in zip(hs, targets, strict=True):  # every layer's term (plain zip dropped a missing one)
            h, target = _at_least_float32(h), _at_least_float32(target)
            h0, u = target[:, 0], target[:, 1]
            moved = ((h - h0) * u).sum(1) / h0.norm(dim=1).clamp_min(1e-12)
            total = total + F.relu(self.margin - moved).square().mean()
        return total

    def _train(self, model: nn.Module, teacher: nn.Module, student: _Features, frozen: _Features,
               forget: LabeledData, retain: LabeledData, targets: list[torch.Tensor], scales: list[float],
               seed: int) -> tuple[int, dict[str, float]]:
        indexed_forget = LabeledData(forget.x, torch.arange(len(forget), device=forget.device))
        forget_batches = endless_batches(indexed_forget, self.batch_size, seed + 10_000)
        optimizer = self._make_optimizer(model)
        steps, last = 0, {}
        # eval mode, as the frozen model runs: the residual is aligned on the deterministic features (with
        # dropout on, the adapters learnt to make up for its noise on D_r), and normalisation statistics stay frozen
        model.eval()
        # Only the adapters take a gradient: the model's own trainable parameters got one at every step,
        # computed for nothing and summed up in the returned model's .grad, and adapters the caller froze
        # (an earlier request's) were not trained. Every flag comes back afterwards.
        adapters = {id(p) for group in optimizer.param_groups for p in group["params"]}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(id(p) in adapters)
        for epoch in range(self.epochs):
            for x, y in retain.loader(self.batch_size, shuffle=True, seed=seed + epoch):
                with torch.no_grad():
                    _, h0 = frozen(teacher, x)
                xf, rows = next(forget_batches)
                n = len(x)  # one forward of the adapted model over the D_r and the D_f batch
                logits, both = student(model, torch.cat([x, xf]))
                hs, hf = [h[:n] for h in both], [h[n:] for h in both]
                align = self._distance(hs, h0, scales)
                task = F.cross_entropy(logits[:n], y) if self.task_weight > 0 else torch.zeros((), device=x.device)
                batch_targets = [t[rows] for t in targets]
                shift = (self._margin_loss(hf, batch_targets) if self.shift == "margin"
                         else self._distance(hf, batch_targets, scales))
                optimizer_step(optimizer, align + self.task_weight * task + self.lam * shift)
                steps += 1
                last = {"align_loss": float(align.detach()), "task_loss": float(task.detach()),
                        "shift_loss": float(shift.detach())}
        optimizer.zero_grad(set_to_none=True)  # none left on the adapters either
        for p, flag in flags:
            p.requires_grad_(flag)
        return steps, last


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in a narrower float: the squares of float16 features above 256 overflow (s_l^2 was
    Inf, every distance term's gradient 0, and a float16 model came back unchanged)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _class_means(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Row c: the mean of the rows of ``h`` with label c (zeros for a class without rows)."""
    sums = torch.zeros(num_classes, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, y, h)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).to(h.dtype)
    return sums / counts.unsqueeze(1)
