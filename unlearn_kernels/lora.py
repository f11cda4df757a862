"""LoRA adapters on frozen layers: ``y = base(x) + scale * B(A(x))`` with ``scale = alpha / rank``.

* :class:`LoRALinear` wraps a frozen ``nn.Linear``; its forward is the fused op
  :func:`unlearn_kernels.ops.lora_linear` (``x W^T + b + scale (x A^T) B^T`` with PEFT's shapes,
  A: (rank, in), B: (out, rank)), which also gives the forward-mode products the curvature
  operators take on adapter parameters.
* :class:`LoRAConv2d` wraps a frozen ``nn.Conv2d`` the way PEFT does: A is a convolution with the
  base layer's kernel, stride and padding to ``rank`` channels, B a 1x1 convolution back to the
  output channels (A: (rank, in, kh, kw), B: (out, rank, 1, 1)). It runs as two plain convolutions
  (the fused op is a linear-layer op).

A is initialised like PEFT (Kaiming-uniform with a = sqrt(5)) and B = 0, so a fresh adapter leaves
the model's outputs unchanged. Wrapping sets ``requires_grad=False`` on the base layer's
parameters; :func:`unload` restores the flags the base layer had when it was wrapped. A base
given back to training (``requires_grad_(True)``) gets its exact gradient where a plain layer runs
it (the convolutional adapter's two convolutions, a merged adapter's base layer alone); the fused op
of an unmerged :class:`LoRALinear` gives it none, and refuses it.

Model-level helpers: :func:`add_adapters` (targets by module name or glob pattern),
:func:`adapter_modules`, :func:`adapter_parameter_names` (the names to pass as ``params=`` to the
curvature operators and the Newton methods), :func:`merge` / :func:`unmerge`, :func:`unload`, and
:func:`from_peft` / :func:`to_peft` for PEFT LoRA models (``peft`` is an optional dependency,
imported only by these two).
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import math
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import ops
from .checks import all_finite, check_int, check_module, check_number

#: the layer types an adapter can wrap
ADAPTABLE = (nn.Linear, nn.Conv2d)


def check_rank_alpha(owner: str, rank: Any, alpha: Any) -> float:
    """Checks an adapter's rank (an int >= 1) and alpha (None or a finite number > 0) and returns alpha
    (None -> rank); ValueError names ``owner`` and the bad value."""
    rank = check_int(f"{owner}: rank", rank)
    return float(rank) if alpha is None else check_number(f"{owner}: alpha", alpha, 0.0, strict=True)


class _Adapter(nn.Module):
    """What the two adapters share: the frozen base layer, A, B, the scale and merging."""

    base: nn.Module
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    _base_type: type[nn.Linear] | type[nn.Conv2d]  # the layer class an adapter wraps
    _base_settings: tuple[str, ...]  # the base layer's settings an adapter reads through, as PEFT's layers do

    def __getattr__(self, name: str) -> Any:
        """nn.Module's attributes, then the base layer's settings (``in_features``, ``kernel_size``, ...): a
        forward that reads ``self.fc.in_features`` ran before the layer was adapted and failed after."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name not in self._base_settings:
                raise
            return getattr(base, name)

    def __init__(self, base: nn.Module, rank: int, alpha: float | None) -> None:
        owner = type(self).__name__
        if not isinstance(base, self._base_type):
            raise TypeError(f"{owner}: base must be an nn.{self._base_type.__name__}, got {type(base).__name__}")
        problem = _layer_problem(base)
        if problem:
            raise ValueError(f"{owner}: base layer: {problem}")
        alpha = check_rank_alpha(owner, rank, alpha)
        super().__init__()
        self.base = base
        self.rank = int(rank)  # a checked integer; a numpy one would travel on into diagnostics and configs
        self.alpha = alpha
        self.scale = alpha / self.rank  # the checked int: a numpy rank made the scale a numpy float
        # Whether the adapter is merged into base.weight: a Python bool for the forward (no device read),
        # mirrored in the persistent buffer lora_merged so that it travels with the state dict (a merged
        # model's state loaded into a fresh adapted model is merged there too, not given the delta twice).
        self._merged = False
        self.register_buffer("lora_merged", torch.tensor(False, device=base.weight.device))
        self._base_loaded_alone = False  # the last state loaded gave the base weight alone (a state in parts)
        # restored by unload(); the base is frozen while wrapped
        self.base_requires_grad = tuple(p.requires_grad for p in base.parameters())
        base.requires_grad_(False)

    def reset_adapter(self) -> None:
        """A ~ Kaiming-uniform (a = sqrt(5), PEFT's init), B = 0: the adapter adds nothing."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge before resetting the adapter")
        if self.lora_a.numel():  # a layer without inputs has an empty A (torch warns on initialising it)
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B A`` in the base weight's shape: what merging adds to the base weight."""
        a = self.lora_a.flatten(1)  # (rank, in * kh * kw); flatten, not reshape(-1): in may be 0
        b = self.lora_b.flatten(1)  # (out, rank)
        return (self.scale * (b @ a)).reshape(self.base.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        """The layer's effective weight: the base weight plus the adapter's ``scale B A`` (computed at
        each read, differentiable in A and B), or the base weight alone once merged (it holds the delta
        then). A model whose forward reads ``self.fc.weight`` (its dtype) or computes with it
        (``F.linear(h, self.fc.weight, self.fc.bias)``) runs with the adapter in; the base weight alone
        (PEFT's answer) left a forward that computes with it silently without the adapter."""
        return self.base.weight if self.merged else self.base.weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base.bias

    @property
    def merged(self) -> bool:
        """Whether the adapter is merged into the base weight (:meth:`merge`, :meth:`unmerge`; saved in
        the state dict as ``lora_merged``)."""
        return self._merged

    def _set_merged(self, merged: bool) -> None:
        self._merged = merged
        self.lora_merged.fill_(merged)
        self._base_loaded_alone = False  # the base weight changed since: a later adapter state is one alone

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``base.weight + scale B A``, what :meth:`merge` writes; ValueError where it holds NaN or Inf that
        the base weight does not (non-finite A or B, ``scale B A`` or the sum overflowing): merged, that
        would stay in the base weight for good, since unmerging cannot take it out again."""
        weight = self.base.weight
        merged = weight + self.delta_weight()
        if not merged.is_meta and not all_finite(merged) and all_finite(weight):  # meta tensors hold no values
            raise ValueError(f"{type(self).__name__}: the base weight plus the adapter's scale * B A holds NaN or "
                             "Inf (from A, B or an overflow): merging would write that into the base weight for "
                             "good; nothing was merged")
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the adapter into the base weight (forward then runs the base layer alone); ValueError,
        merging nothing, where the result is not finite (:meth:`merged_weight`)."""
        if not self.merged:
            self.base.weight.copy_(self.merged_weight())
            self._set_merged(True)


    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the adapter from the base weight again: equal up to the rounding of W + s B A in the
        weight's dtype (a few eps of |W| + |s B A| per entry; in bfloat16 or float16 an adapter far larger than
        the weight leaves little of it)."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight())
            self._set_merged(False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Loads the merged flag with the weights, so that the base weight and the flag agree afterwards.

        * A state with the base weight (a whole model's) takes the flag at its word, as describing that
          base weight; one saved before the flag was (no ``lora_merged`` key) still loads strictly and
          leaves the flag as it is.
        * A state of the adapter alone (A, B and perhaps the flag, without the base weight: the
          ``lora_`` keys, or ``adapter_parameter_names``, loaded with ``strict=False``) applies that
          adapter to this layer's own base weight: a merged adapter is unmerged first (the base weight
          sheds the old delta), and the loaded one is merged where its flag says the source was merged,
          else left unmerged. Taken at its word, the flag left a merged base weight holding the old delta
          under a loaded unmerged adapter (outputs 1.36 off), or an unmerged one under a merged flag
          (the loaded adapter ignored, and a later unmerge subtracted a delta never added).
        * After a state that gave the base weight alone, the adapter's keys with the flag are the rest of
          a state loaded in parts: the flag is taken at its word, as describing that base weight."""
        key = prefix + "lora_merged"
        has_base, has_flag = prefix + "base.weight" in state_dict, key in state_dict
        has_adapter = any(prefix + name in state_dict for name in ("lora_a", "lora_b"))
        adapter_alone = not has_base and (has_adapter or has_flag) and not self._base_loaded_alone
        if adapter_alone and self.merged:  # loads before its base
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if has_flag:
            loaded = bool(self.lora_merged)
            if adapter_alone:
                self._set_merged(False)  # the base weight holds no delta now
                if loaded:
                    self.merge()
            else:
                self._merged = loaded
        elif key in missing_keys:
            missing_keys.remove(key)
        self._base_loaded_alone = has_base and not (has_flag or has_adapter)

    def extra_repr(self) -> str:
        # every digit: the curvature operators compare a module's settings by it (a 6-digit scale hid a change)
        return f"rank={self.rank}, alpha={self.alpha!r}, scale={self.scale!r}, merged={self.merged}"


def _layer_problem(layer: nn.Linear | nn.Conv2d, parent: nn.Module | None = None) -> str | None:
    """Why a Linear or Conv2d layer (a child of ``parent``, where known) cannot take an adapter (None if
    it can)."""
    if isinstance(parent, nn.MultiheadAttention):  # its one child, out_proj: the adapter would never run
        return ("it is the out_proj of an nn.MultiheadAttention, which uses the layer's weight directly and never "
                "calls the layer")
    if isinstance(parent, nn.TransformerEncoderLayer):  # linear1 and linear2
        return ("it is a feed-forward layer of an nn.TransformerEncoderLayer, whose fast path (eval mode without "
                "gradients) uses the layer's weight directly and never calls the layer")
    plain = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    if type(layer).forward is not plain.forward:
        return (f"its class {type(layer).__name__} overrides {plain.__name__}'s forward; the adapter's formula and "
                "merging assume the plain layer's")
    # read from _parameters, not as layer.weight: a parametrization computes that, and spectral norm's
    # power iteration then writes its state into the caller's layer
    weight = None if parametrize.is_parametrized(layer, "weight") else layer._parameters.get("weight")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "it is a lazy layer whose weight is not initialised yet; run a forward pass first"
    if weight is None:  # recomputed at each call: a merge into it would be lost
        return "its weight is not a parameter but computed (a parametrization or weight norm); remove that first"
    if (layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks
            or "forward" in vars(layer)):
        # the fused op computes the layer's formula without calling it, and a merge would move the adapter's
        # update under the hooks: the adapted model would not be the given one at B = 0, nor the merged one
        return ("it has module hooks (forward or backward) or a forward set on the instance, which the adapter "
                "would skip or a merge would apply to the adapter's update; remove them first")
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)
                                         or layer.padding_mode != "zeros"):
        return (f"an adapted convolution needs groups=1, dilation=1 and zero padding, got groups={layer.groups}, "
                f"dilation={layer.dilation}, padding_mode={layer.padding_mode!r}")
    return None


class LoRALinear(_Adapter):
    """A frozen ``nn.Linear`` plus a low-rank residual: ``x W^T + b + scale (x A^T) B^T``.

    The base layer must compute ``nn.Linear``'s formula with a weight parameter: a subclass with its
    own forward, a lazy layer not yet initialised, a parametrized weight (weight norm, spectral
    norm), module hooks or a forward set on the instance are refused with ``ValueError``.

    Args:
        base: the layer to adapt (its parameters are frozen; it is used, not copied).
        rank: r >= 1.
        alpha: the scale is ``alpha / rank``; None means alpha = rank (scale 1).

    Attributes:
        lora_a: A, (rank, in_features). lora_b: B, (out_features, rank).
    """

    _base_type = nn.Linear
    _base_settings = ("in_features", "out_features")

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__(base, rank, alpha)
        kwargs = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **kwargs))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, **kwargs))
        self.reset_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b + scale (x A^T) B^T`` by the fused op (the base layer alone once merged); under
        ``torch.autocast`` it computes in the autocast dtype like ``nn.Linear`` (see the op), which refuses
        a base weight or bias that requires grad: it gives them no gradient."""
        if self.merged:
            return self.base(x)
        return ops.lora_linear(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.scale)


class LoRAConv2d(_Adapter):
    """A frozen ``nn.Conv2d`` plus PEFT's convolutional LoRA residual:
    ``conv(x, W) + b + scale * conv1x1(conv(x, A), B)``, A with the base's kernel, stride and padding.

    The base layer must have ``groups=1``, ``dilation=1`` and zero padding (what the merge formula
    ``W + scale * B A`` and PEFT's layer assume), and meet :class:`LoRALinear`'s other conditions
    (``nn.Conv2d``'s forward, a weight parameter); otherwise ``ValueError``.

    Args:
        base, rank, alpha: as in :class:`LoRALinear`.

    Attributes:
        lora_a: A, (rank, in_channels, kh, kw). lora_b: B, (out_channels, rank, 1, 1).
    """

    _base_type = nn.Conv2d
    _base_settings = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                      "padding_mode")

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None) -> None:
        super().__init__(base, rank, alpha)
        kwargs = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size, **kwargs))
        self.lora_b = nn.Parameter(torch.empty(base.out_channels, rank, 1, 1, **kwargs))
        self.reset_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base convolution plus the scaled low-rank residual (the base alone once merged)."""
        out = self.base(x)
        if self.merged:
            return out
        low = F.conv2d(x, self.lora_a, None, self.base.stride, self.base.padding)
        return out + self.scale * F.conv2d(low, self.lora_b)


Adapter = LoRALinear | LoRAConv2d


# ---------------------------------------------------------------------------------------------
# model-level helpers


def adapter_modules(model: nn.Module) -> dict[str, Adapter]:
    """Every LoRA adapter of ``model`` by its module name, in module order."""
    check_module("adapter_modules: model", model)
    return _adapters("adapter_modules", model)


def _adapters(owner: str, model: nn.Module) -> dict[str, Adapter]:
    """:func:`adapter_modules` for ``owner``, whose name the refusal of a PEFT model (:func:`_refuse_peft`) takes."""
    _refuse_peft(owner, model)
    return {name: m for name, m in model.named_modules() if isinstance(m, _Adapter)}


def adapter_parameter_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapter parameters (``<module>.lora_a``, ``<module>.lora_b``), e.g. for
    ``hessian_operator(..., params=...)`` or ``CureNewton(params=...)``; empty if there is none."""
    check_module("adapter_parameter_names: model", model)
    return tuple(f"{name}.{p}" if name else p  # name "": the model is itself an adapter
                 for name in _adapters("adapter_parameter_names", model) for p in ("lora_a", "lora_b"))


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of the Linear and Conv2d layers of ``model`` (module order) that an adapter can stand in
    for: not the model itself, not inside an existing adapter, none that :func:`add_adapters`
    would refuse for its kind (e.g. nn.MultiheadAttention's out_proj, whose weight its parent reads
    directly), and none used under a second name or sharing a parameter (tied weights). The methods'
    default targets: a layer that cannot take an adapter is left out, not refused, so that a model
    holding one (any torch Transformer layer, a tied layer) works with the defaults."""
    check_module("adaptable_layers: model", model)
    adapters = _adapters("adaptable_layers", model)
    modules = dict(model.named_modules())
    every_name = dict(model.named_modules(remove_duplicate=False))
    inside = {f"{name}.{child}" for name in adapters for child, _ in modules[name].named_modules() if child}
    return [name for name, module in modules.items()
            if name and name not in inside and isinstance(module, ADAPTABLE)
            and _layer_problem(module, modules[name.rpartition(".")[0]]) is None
            and _shared_problem(model, every_name, name) is None]


def refuse_a_bare_layer(owner: str, model: nn.Module) -> None:
    """ValueError naming ``owner`` where the model is itself a Linear or Conv2d layer or an adapter: an
    adapter replaces a submodule of the model, which a layer alone does not have."""
    if isinstance(model, (*ADAPTABLE, _Adapter)):
        raise ValueError(f"{owner}: the model is itself a {type(model).__name__} layer; wrap it, e.g. "
                         "nn.Sequential(model)")


def new_adapter_layers(owner: str, model: nn.Module, targets: Sequence[str] | None,
                       default: Callable[[nn.Module], Sequence[str]] = adaptable_layers, which: str = "") -> list[str]:
    """The layers of ``model`` that a method gives fresh adapters (checked; nothing is changed): those
    ``targets`` selects; else none on a model that already has adapters (those train); else
    ``default(model)``. ValueError naming ``owner`` where the model is itself a layer (an adapter
    replaces a submodule) or the default finds none (``which`` qualifies the layers, e.g. "hidden ")."""
    existing = _adapters(owner, model)
    refuse_a_bare_layer(owner, model)
    if targets is not None:  # a named layer with an adapter from an earlier request: that adapter trains
        return resolve_targets(model, targets, owner=owner, skip_adapted=True)
    if existing:
        return []
    layers = default(model)
    if not layers:
        raise ValueError(f"{owner}: the model has no {which}Linear or Conv2d layer that can take an adapter (naming "
                         "one with targets= says why it cannot)")
    return resolve_targets(model, layers, owner=owner)


def check_targets(owner: str, targets: Any) -> tuple[str, ...]:
    """Checks adapter targets (a module name or pattern, or a non-empty sequence of them) and returns
    them as a tuple; TypeError names ``owner`` and the bad value."""
    names = (targets,) if isinstance(targets, str) else targets
    if not isinstance(names, Sequence) or not names or not all(isinstance(t, str) and t for t in names):
        raise TypeError(f"{owner}: targets must be a module name or pattern, or a non-empty sequence of them, "
                        f"got {targets!r}")  # as given: '' rather than ('',)
    return tuple(names)


def resolve_targets(model: nn.Module, targets: str | Sequence[str], owner: str = "add_adapters",
                    skip_adapted: bool = False) -> list[str]:
    """Module names selected by ``targets`` (exact names first, else glob patterns), each a Linear or
    Conv2d layer without an adapter that can take one (see :func:`add_adapters`); TypeError/ValueError
    naming the first target that is not. With ``skip_adapted`` a target that selects layers with an
    adapter selects none of them instead of being refused.
    A layer that is also used elsewhere in the model (the same module under a second name, or one of
    its parameters shared with another module, as tied weights are) is refused with ValueError: an
    adapter would take only one of its uses, and freezing and merging would change the others.
    Changes nothing (what :func:`add_adapters` checks before it adds any adapter); ``owner`` prefixes
    the messages."""
    check_module(f"{owner}: model", model)
    refuse_a_bare_layer(owner, model)  # else "target '*' names no module of the model (modules: [])"
    targets = check_targets(owner, targets)
    modules = dict(model.named_modules(remove_duplicate=False))  # every name of a module used twice
    # PEFT's LoRA layers hold plain Linears (base_layer, lora_A, ...): adapters would nest (refused here); layers
    # inside an existing adapter (its .base) are not candidates
    inside = {f"{name}.{child}" for name in _adapters(owner, model) for child, _ in modules[name].named_modules()
              if child}
    chosen: list[str] = []
    for target in targets:
        if target in modules:
            module = modules[target]
            if isinstance(module, _Adapter) and skip_adapted:
                continue
            if isinstance(module, _Adapter) or target in inside:
                raise ValueError(f"{owner}: module {target!r} already has an adapter")
            if not isinstance(module, ADAPTABLE):
                raise TypeError(f"{owner}: target {target!r} is a {type(module).__name__}; adapters wrap "
                                f"{' or '.join(t.__name__ for t in ADAPTABLE)} layers")
            found = [target]
        else:
            matched = [n for n in modules if n and n not in inside and fnmatch.fnmatchcase(n, target)]
            if not matched:
                raise ValueError(f"{owner}: target {target!r} names no module of the model "
                                 f"(modules: {[n for n in modules if n][:12]}...)")
            found = [n for n in matched if isinstance(modules[n], ADAPTABLE)]
            adapted = [n for n in matched if isinstance(modules[n], _Adapter)]
            if not found and adapted and skip_adapted:
                continue
            if not found and adapted:
                raise ValueError(f"{owner}: pattern {target!r} matches no layer without an adapter: "
                                 f"{adapted[:6]} already have one")
            if not found:
                raise TypeError(f"{owner}: pattern {target!r} matches no Linear or Conv2d layer "
                                f"(it matches {matched[:6]})")
        for name in found:
            problem = _layer_problem(modules[name], modules[name.rpartition(".")[0]])
            if problem:
                raise ValueError(f"{owner}: layer {name!r}: {problem}")
            shared = _shared_problem(model, modules, name)
            if shared:
                raise ValueError(f"{owner}: {shared}")
        chosen += [n for n in found if n not in chosen]
    return chosen


def _shared_problem(model: nn.Module, modules: dict[str, nn.Module], name: str) -> str | None:
    """Why the layer ``name`` (or one of its parameters) is also used under another name, or None.
    ``modules``: ``model.named_modules(remove_duplicate=False)`` as a dict."""
    layer = modules[name]
    others = [n for n, m in modules.items() if m is layer and n != name]
    if others:
        return (f"layer {name!r} is also the model's module {others[0]!r} (one module under two names): an adapter "
                "would replace only one of them; give each use its own layer")
    own = {id(p) for p in layer.parameters()}
    inside = name + "."
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in own and not pname.startswith(inside):
            mine = next(f"{name}.{n}" for n, q in layer.named_parameters(remove_duplicate=False) if q is p)
            return (f"layer {name!r} shares its parameter {mine!r} with {pname!r} (tied weights): freezing or "
                    "merging an adapter would change the other layer too")
    return None


def _refuse_peft(owner: str, model: nn.Module) -> None:
    """ValueError naming ``owner`` where ``model`` holds PEFT modules: this module's functions see only this
    package's adapters, and would pass over PEFT's LoRA layers (merge nothing, unload nothing, offer their
    inner Linears as targets)."""
    peft = next(((n, m) for n, m in model.named_modules() if _is_peft(m)), None)
    if peft is not None:
        raise ValueError(f"{owner}: the model holds PEFT modules ({peft[0] or '(the model)'!r} is PEFT's "
                         f"{type(peft[1]).__name__}): convert it with unlearn_kernels.lora.from_peft first, whose "
                         "LoRA layers become this package's adapters")


def _is_peft(module: nn.Module) -> bool:
    """Whether ``module`` is one of PEFT's (a layer it injected, or the PeftModel wrapper)."""
    return type(module).__module__.split(".")[0] == "peft"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _wrap(layer: nn.Module, rank: int, alpha: float | None) -> Adapter:
    return LoRALinear(layer, rank, alpha) if isinstance(layer, nn.Linear) else LoRAConv2d(layer, rank, alpha)


def add_adapters(model: nn.Module, targets: str | Sequence[str], rank: int = 8, alpha: float | None = None
                 ) -> tuple[str, ...]:
    """Wraps the target layers of ``model`` (in place) in fresh LoRA adapters (B = 0: the outputs do
    not change) and returns their module names.

    Args:
        model: any nn.Module.
        targets: module names (``"1"``, ``"features.0"``) or glob patterns (``"features.*"``); an
            exact name must be an ``nn.Linear`` or ``nn.Conv2d``; a pattern selects the Linear and
            Conv2d layers among the modules it matches.
        rank: r >= 1.
        alpha: scale = alpha / rank; None means alpha = rank.

    Raises:
        ValueError: a bad rank or alpha, a target that names no module, a layer that already has
            an adapter, a layer the adapter cannot wrap (a Conv2d with groups, dilation or a padding_mode
            other than "zeros"; a Linear or Conv2d subclass with its own forward; a lazy layer not initialised
            yet; a parametrized weight; module hooks or a forward set on the instance, which the
            adapter would skip; nn.MultiheadAttention's out_proj or an
            nn.TransformerEncoderLayer's linear1/linear2, whose weights their parent uses without
            calling them), or a layer used elsewhere in the model too (the same module under
            two names, or a parameter tied to another module's). TypeError:
            ``model`` not an nn.Module, or a target that is not a Linear/Conv2d layer. Nothing is
            changed when it raises.
    """
    check_module("add_adapters: model", model)
    check_rank_alpha("add_adapters", rank, alpha)
    names = resolve_targets(model, targets)
    modules = dict(model.named_modules(remove_duplicate=False))
    adapters = {name: _wrap(modules[name], rank, alpha) for name in names}  # every check passed above
    for name, adapter in adapters.items():
        _set_module(model, name, adapter)
    return tuple(names)


def _check_mergeable(adapters: dict[str, Adapter]) -> None:
    """ValueError naming the first unmerged adapter whose merged weight would hold NaN or Inf
    (:meth:`LoRALinear.merged_weight`), before any is merged; one merged weight at a time."""
    for name, adapter in adapters.items():
        if not adapter.merged:
            try:
                adapter.merged_weight()
            except ValueError as error:
                raise ValueError(f"adapter {name!r}: {error}") from None


def merge(model: nn.Module) -> None:
    """Merges every adapter into its base weight (in place; :func:`unmerge` undoes it). ValueError,
    merging none, where an adapter's merged weight would hold NaN or Inf."""
    check_module("merge: model", model)
    adapters = _adapters("merge", model)
    _check_mergeable(adapters)
    for adapter in adapters.values():
        adapter.merge()


def unmerge(model: nn.Module) -> None:
    """Undoes :func:`merge` (in place; the base weights come back up to the rounding of the merged weights,
    see :meth:`LoRALinear.unmerge`)."""
    check_module("unmerge: model", model)
    for adapter in _adapters("unmerge", model).values():
        adapter.unmerge()


def unload(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replaces every adapter (in place) by its base layer, with the adapter merged into the weight
    (``merge=True``; ValueError, changing nothing, where a merged weight would hold NaN or Inf) or dropped
    (``merge=False``: the base weight as it was wrapped, up to float rounding where the adapter had
    been merged, see :func:`unmerge`), restores the
    base layer's ``requires_grad`` flags and returns ``model``: the plain architecture again.
    ``model`` must contain its adapters (for an adapter on its own, merge it and take ``.base``)."""
    check_module("unload: model", model)
    adapters = _adapters("unload", model)
    if "" in adapters:
        raise ValueError("unload: the model is itself an adapter and cannot replace itself; call merge() (or "
                         "unmerge()) and use its .base")
    if merge:
        _check_mergeable(adapters)  # every one before the first layer is replaced
    for name, adapter in adapters.items():
        if merge:
            adapter.merge()
        else:
            adapter.unmerge()
        for parameter, flag in zip(adapter.base.parameters(), adapter.base_requires_grad):
            parameter.requires_grad_(flag)
        _set_module(model, name, adapter.base)
    return model


# ---------------------------------------------------------------------------------------------
# PEFT interop


def _peft() -> ModuleType:
    try:
        return importlib.import_module("peft")
    except ImportError as err:
        raise ImportError("PEFT interop needs the optional dependency peft: pip install 'unlearn-kernels[peft]'"
                          ) from err


def _keep_rng(model: nn.Module) -> AbstractContextManager[None]:
    """The caller's global RNG state (the CPU's and that of each CUDA device ``model`` is on) restored on exit:
    new adapters draw a random initialisation that the copied A and B then overwrite."""
    cuda = sorted({t.device.index for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda)


def from_peft(peft_model: nn.Module) -> nn.Module:
    """A copy of a PEFT LoRA model (a ``PeftModel`` or a model with PEFT LoRA layers injected) with
    every PEFT LoRA layer replaced by :class:`LoRALinear` / :class:`LoRAConv2d` carrying the same
    A, B and scale; the PEFT model and the caller's global RNG state are not modified.

    Supported: plain LoRA on ``nn.Linear`` / ``nn.Conv2d`` layers with one active adapter (scaling
    alpha/r or rsLoRA's alpha/sqrt(r): the scale is copied). LoRA dropout is not carried over (the
    outputs agree in eval mode). A and B take the base layer's dtype (PEFT keeps float32 adapters on a
    bfloat16 or float16 layer: the outputs then agree to that dtype's rounding). Raises ValueError for
    DoRA and other variants, a LoRA bias, ``fan_in_fan_out``, several active adapters, other PEFT
    tuner layers or LoRA on other layer types (Embedding, ...), a base layer :func:`add_adapters`
    would refuse, a LoRA scaling that is not > 0 (PEFT allows a zero or negative ``lora_alpha``; the
    adapters here take alpha > 0), or no LoRA layer at all. The copy keeps the PEFT model's
    ``requires_grad`` flags: PEFT freezes every parameter but the adapters, so the layers without an
    adapter come frozen; ``requires_grad_(True)`` on them gives them back to training.
    """
    check_module("from_peft: peft_model", peft_model)
    peft = _peft()
    lora_layer = peft.tuners.lora.LoraLayer
    base = peft_model.get_base_model() if isinstance(peft_model, peft.PeftModel) else peft_model
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    layers = {name: m for name, m in modules.items() if isinstance(m, lora_layer)}
    if not layers:
        raise ValueError("from_peft: the model has no PEFT LoRA layer")
    inside = {f"{name}.{child}" for name, layer in layers.items() for child, _ in layer.named_modules() if child}
    for name, m in modules.items():
        if name not in layers and name not in inside and _is_peft(m):
            raise ValueError(f"from_peft: module {name!r} is a PEFT {type(m).__name__}, which has no counterpart here")
    replacements = {}
    for name, layer in layers.items():
        base_layer = layer.get_base_layer()
        # first: other layer types (Embedding, ...) keep their adapters elsewhere than lora_A
        if (type(layer) not in (peft.tuners.lora.Linear, peft.tuners.lora.Conv2d)
                or not isinstance(base_layer, ADAPTABLE)):
            raise ValueError(f"from_peft: layer {name!r} is a PEFT {type(layer).__name__} layer on "
                             f"{type(base_layer).__name__}; only LoRA on nn.Linear and nn.Conv2d is supported")
        problem = _layer_problem(base_layer, modules[name.rpartition(".")[0]])
        if problem:
            raise ValueError(f"from_peft: layer {name!r}: {problem}")
        active = list(layer.active_adapters)
        if len(active) != 1 or active[0] not in layer.lora_A:
            raise ValueError(f"from_peft: layer {name!r} needs exactly one active LoRA adapter that it holds, got "
                             f"active {active}, held {list(layer.lora_A)}")
        if layer.disable_adapters:  # PEFT's output is then the base layer's: converting would add the adapter back
            raise ValueError(f"from_peft: layer {name!r} has its adapters disabled (disable_adapter(), "
                             "disable_adapter_layers()); enable them, or use the base model without adapters")
        key = active[0]
        if key in layer.lora_variant or getattr(layer, "fan_in_fan_out", False) or layer.lora_B[key].bias is not None:
            raise ValueError(f"from_peft: layer {name!r} uses a LoRA variant (DoRA, ...), fan_in_fan_out or a LoRA "
                             "bias; only plain LoRA is supported")
        if layer.merged:
            layer.unmerge()  # on the copy
        rank = layer.r[key]
        # PEFT allows a lora_alpha <= 0, the adapters a scale > 0 only: checked here, where the layer is known
        scale = check_number(f"from_peft: layer {name!r} (lora_alpha={layer.lora_alpha[key]:g}, r={rank}): its "
                             "LoRA scaling", layer.scaling[key], 0.0, strict=True)
        with _keep_rng(base_layer):
            adapter = _wrap(base_layer, rank, scale * rank)
        with torch.no_grad():
            adapter.lora_a.copy_(layer.lora_A[key].weight)
            adapter.lora_b.copy_(layer.lora_B[key].weight)
        adapter.lora_a.requires_grad_(layer.lora_A[key].weight.requires_grad)  # frozen in a PEFT inference model
        adapter.lora_b.requires_grad_(layer.lora_B[key].weight.requires_grad)
        adapter.scale = scale  # exact, not alpha / rank re-rounded
        replacements[name] = adapter
    for name, adapter in replacements.items():
        _set_module(model, name, adapter)
    model.__dict__.pop("peft_config", None)  # PEFT's mark on the model it wrapped: this copy is not one
    return model


def to_peft(model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """A ``PeftModel`` (``peft.get_peft_model`` on a copy of ``model`` without its adapters) whose LoRA
    layers carry the adapters' A, B and scale; ``model`` and the caller's global RNG state are not modified.

    Needs at least one adapter, and one rank and one scale shared by all adapters (one
    ``LoraConfig``); otherwise ValueError. ``adapter_name`` must be a non-empty str without "." (PEFT
    keys its per-adapter modules by it): TypeError / ValueError otherwise.
    """
    check_module("to_peft: model", model)
    refuse_a_bare_layer("to_peft", model)  # else unload's refusal, which advised dropping the adapter (.base)
    adapters = _adapters("to_peft", model)
    if not isinstance(adapter_name, str):
        raise TypeError(f"to_peft: adapter_name must be a str, got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"to_peft: adapter_name must be a non-empty name without '.', got {adapter_name!r}")
    peft = _peft()
    if not adapters:
        raise ValueError("to_peft: the model has no LoRA adapter (add_adapters adds them)")
    ranks = {a.rank for a in adapters.values()}
    scales = {a.scale for a in adapters.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"to_peft: one LoraConfig needs one rank and one scale for all adapters, got ranks "
                         f"{sorted(ranks)} and scales {sorted(scales)}")
    rank, scale = ranks.pop(), scales.pop()
    work = copy.deepcopy(model)
    weights = {name: (a.lora_a.detach().clone(), a.lora_b.detach().clone()) for name, a in adapters.items()}
    unload(work, merge=False)
    config = peft.LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=0.0, bias="none",
                             target_modules="|".join(re.escape(n) for n in adapters))  # a string: full match
    with _keep_rng(work):
        peft_model = peft.get_peft_model(work, config, adapter_name=adapter_name)
    for name, (a, b) in weights.items():
        layer = peft_model.get_base_model().get_submodule(name)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
        layer.scaling[adapter_name] = scale
    return peft_model
