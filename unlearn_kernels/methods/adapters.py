"""Any method on LoRA adapters only: add fresh adapters, let the method update just their parameters
(``params=`` the adapter names), merge them into the weights.

:class:`CureNewtonLoRA` (name ``cure_newton_lora``) is CureNewton in the low-rank space: the cubic-
regularised Newton step on the retain objective over the adapters' A and B. Its Hessian-vector
products come from the generic operator (the fused MLP kernel does not apply to adapted layers) in
its automatic mode: double backward through the LoRA op's differentiable backward, with each batch's
gradient graph kept while the weights do not change; the op's forward-mode rule serves the
operator's ``mode="forward-over-reverse"`` (docs/rfa.md compares the two).

At the start B = 0, so the gradient with respect to every A is zero (it is scale * B^T times the
output gradient) and the gradient lies in the B coordinates only, ``scale * G A^T`` for a layer whose
weight gradient is G. The Hessian there is ``[[0, C], [C^T, H_BB]]`` in (A, B): no curvature along
A alone, a coupling C between A and B, and the curvature of the weights seen through A along B. That
block matrix is indefinite whenever C is not zero, so a plain (or damped) Newton step is ill-posed
at B = 0; the cubic-regularised step is defined for indefinite H and uses the negative curvature of
the coupling, moving A and B together (a second-order move of the weights, ``scale dB (A + dA)``). We
keep PEFT's initialisation (A random, B = 0, the model's outputs unchanged) rather than warm-starting
the adapters, so that the step starts exactly from the trained model like full CureNewton.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from ..checks import check_option_names
from ..curvature.distributed import GroupRef
from ..curvature.params import check_not_wrapped
from ..labeled import LabeledData
from ..lora import (
    adapter_modules,
    adapter_parameter_names,
    add_adapters,
    check_rank_alpha,
    check_targets,
    new_adapter_layers,
    unload,
    unmerge,
)
from .base import Unlearner, UnlearnResult
from .newton import CureNewton, agree_on_inputs, check_per_sample_loss, narrower, options_text


class CureNewtonLoRA(Unlearner):
    """CureNewton on the parameters of fresh LoRA adapters, merged afterwards.

    Args:
        rank, alpha: the adapters (scale alpha / rank; alpha None means rank). Default rank 8.
        targets: module names or glob patterns of the layers to adapt (None: every Linear and Conv2d
            layer that can take an adapter, :func:`~unlearn_kernels.lora.adaptable_layers`, the output
            layer included: the retain objective involves all weights; on a model
            that already has adapters, those adapters and no new ones). Adapters the model already
            has train too (unmerged first, if merged). The diagnostics name the adapted layers
            (``layers``) and their ranks (``ranks``).
        **newton_options: CureNewton's options (``M``, ``weight_decay``, ...), except ``params``.
    """

    # No ``uses_training_objective``: CureNewton's weight_decay here would penalise ||A||^2 + ||B||^2,
    # not the training objective's decay of the merged weights W + scale B A, so a study passes none.
    name = "cure_newton_lora"
    trains_model_parameters = False  # only the adapters it adds
    forwards_options_to = (CureNewton, ("params",))

    def __init__(self, rank: int = 8, alpha: float | None = None, targets: str | Sequence[str] | None = None,
                 **newton_options: Any) -> None:
        if "params" in newton_options:
            raise TypeError(f"{self.name}: params is set to the adapters' parameters; do not pass it")
        check_rank_alpha(self.name, rank, alpha)
        if targets is not None:
            targets = check_targets(self.name, targets)
        self.rank, self.alpha, self.targets = rank, alpha, targets
        check_option_names(self.name, newton_options, CureNewton, {"params"})
        if newton_options.get("path") == "fused":  # else refused at the first product, after the adapters
            raise ValueError(f"{self.name}: path='fused' cannot be used: the fused paths take plain Linear and Conv2d "
                             "layers, not the LoRA layers this method trains (use 'auto' or 'generic')")
        try:  # the values, now rather than at the first call, under this method's name
            CureNewton(**newton_options)
        except (TypeError, ValueError) as error:
            raise self._under_own_name(error) from None
        # held weakly, as CureNewton holds it: a strong reference kept the group alive past destroy_process_group
        group = newton_options.pop("process_group", None)
        self._group = None if group is None else GroupRef(group, self.name)
        self.newton_options = newton_options

    def _under_own_name(self, error: TypeError | ValueError) -> TypeError | ValueError:
        """CureNewton's error (its message starts with its name) with this method's name instead."""
        return type(error)(f"{self.name}: {str(error).removeprefix(CureNewton.name + ': ')}")

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The process group (held weakly, see :class:`~unlearn_kernels.curvature.distributed.GroupRef`), or None."""
        return None if self._group is None else self._group()

    def _checked_copy(self, model: nn.Module, forget: LabeledData, retain: LabeledData,
                      unseen: LabeledData | None, *, seed: int) -> nn.Module:
        # with a process group the ranks agree on their inputs (and options) before any work, as CureNewton's do:
        # a rank refusing alone left the others waiting in CureNewton's collective until the group's timeout
        group = self.process_group
        if group is None:
            return super()._checked_copy(model, forget, retain, unseen, seed=seed)
        options = {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, **self.newton_options}
        return agree_on_inputs(self, group, options_text(type(self).__qualname__, options), model, forget, retain,
                               unseen, seed=seed)

    def _check_parameters(self, model: nn.Module) -> None:
        # else CureNewton refuses these, under its name, after the adapters
        check_not_wrapped(model, self.name)
        check_per_sample_loss(self.name, model)
        # the layers can take adapters: refused here, not mid-run
        layers = [*new_adapter_layers(self.name, model, self.targets), *adapter_modules(model)]
        dtype = self.newton_options.get("dtype")
        modules = dict(model.named_modules())
        for name in layers:  # an adapter takes its layer's dtype: CureNewton refused a narrower one after adding them
            weight = modules[name].weight
            if narrower(dtype, weight.dtype):
                raise ValueError(f"{self.name}: dtype={dtype} is narrower than the {weight.dtype} of layer {name!r}, "
                                 "whose adapter computes in it: rounding every adapter weight to it could make the "
                                 "model worse with no step; pass dtype=None or a wider one")

    def _unlearn(self, model: nn.Module, forget: LabeledData, retain: LabeledData, *,
                 unseen: LabeledData | None, seed: int) -> UnlearnResult:
        new = new_adapter_layers(self.name, model, self.targets)
        if new:
            add_adapters(model, new, self.rank, self.alpha)
        unmerge(model)  # adapters the model had merged (in this private copy): merged, A and B get no gradient
        adapters = adapter_modules(model)  # the new ones and those the model had (e.g. RFA's, unmerged): all train
        newton = CureNewton(params=adapter_parameter_names(model), process_group=self.process_group,
                            **self.newton_options)
        try:
            result = newton.unlearn(model, forget, retain, unseen=unseen, seed=seed)
        except (TypeError, ValueError) as error:
            # CureNewton's refusals of the model (a forward that writes a buffer, a loss that differs between two
            # evaluations) under this method's name, as its option errors; other errors and subclasses as raised
            if type(error) not in (TypeError, ValueError) or not str(error).startswith(CureNewton.name + ": "):
                raise
            raise self._under_own_name(error) from None
        merged = unload(result.model, merge=True)
        return UnlearnResult(model=merged.eval(), seconds=0.0, hvps=result.hvps, gradients=result.gradients,
                             diagnostics={**result.diagnostics, "layers": list(adapters),
                                          "ranks": [a.rank for a in adapters.values()]})
