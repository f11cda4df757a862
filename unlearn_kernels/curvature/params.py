"""Flat parameter vectors: choose a subset of a model's parameters and map it to and from one vector.

Curvature operators act on flat vectors of length d = the total number of entries of the chosen
parameters, laid out in the order the parameters were given (``None`` = all trainable parameters in
``model.named_parameters()`` order). These helpers are the single definition of that layout.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..checks import all_finite, check_module, check_not_scripted, check_tensor
from ..lora import LoRALinear
from ..ops import weights_fingerprint

ParamSelection = None | str | torch.Tensor | Iterable[str | torch.Tensor]
"""What ``params`` arguments accept: None (all trainable), names, or the parameter tensors themselves."""


def check_not_wrapped(model: nn.Module, owner: str = "") -> None:
    """TypeError for a model wrapped in nn.DataParallel or DistributedDataParallel: torch.func's
    stateless calls, which every curvature operator and Objective makes, refuse such a wrapper."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"{owner + ': ' if owner else ''}the model is wrapped in {type(model).__name__}, which the "
                        "curvature operators cannot call through torch.func: pass the wrapped model (model.module); "
                        "for curvature over several processes give process_group=")


def resolve_parameters(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """The chosen parameters of ``model`` as an ordered ``{name: parameter}`` dict.

    Args:
        model: the module that owns the parameters.
        params: None for every parameter with ``requires_grad=True`` (in ``named_parameters`` order);
            or an iterable of parameter names (``"fc.weight"``) and/or parameter tensors of ``model``
            (e.g. ``model.fc.parameters()``), kept in the given order. A parameter with
            ``requires_grad=False`` may be named explicitly; a tied one (one tensor under several names) by
            any of its names, and is known by its first (``named_parameters``') name.

    Raises:
        TypeError: ``model`` is not an nn.Module, an entry is neither a name nor a tensor, or a
            parameter is not floating point.
        ValueError: an unknown name, a tensor that is not a parameter of ``model``, a duplicate, an
            empty selection, or the frozen base layer of an unmerged :class:`~unlearn_kernels.lora.LoRALinear`
            (its fused op gives the base no derivatives).
    """
    check_module("model", model)
    named = dict(model.named_parameters())
    if params is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("the model has no trainable parameters (requires_grad=True); pass params explicitly")
    else:
        if isinstance(params, (str, torch.Tensor)):
            params = [params]
        name_of = {id(p): name for name, p in named.items()}
        # every name of a tied parameter, to its first name
        first_name = {name: name_of[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
        chosen, given = {}, {}  # given: how each chosen parameter was named (or its name, for a tensor)
        for item in params:
            if isinstance(item, str):
                if item not in first_name:
                    listed = ", ".join(repr(n) for n in list(named)[:12]) + (", ..." if len(named) > 12 else "")
                    raise ValueError(f"params: the model has no parameter named {item!r}; its parameters: {listed}")
                name = first_name[item]
            elif isinstance(item, torch.Tensor):
                if id(item) not in name_of:
                    raise ValueError(
                        f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model"
                    )
                name = name_of[id(item)]
            else:
                raise TypeError(f"params entries must be parameter names or tensors, got {type(item).__name__}")
            shown = item if isinstance(item, str) else name
            if name in chosen:
                tied = "" if shown == given[name] else f" (as {given[name]!r} and {shown!r}: tied names of one tensor)"
                raise ValueError(f"params: parameter {shown!r} is given twice{tied}")
            chosen[name], given[name] = named[name], shown
        if not chosen:
            raise ValueError("params selects no parameters")
    for name, p in chosen.items():
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; curvature needs floating point parameters")
    _check_no_adapter_base(model, chosen)
    return chosen


def resolve_curvature_parameters(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """:func:`resolve_parameters` for the curvature operators and objectives, which also refuse what
    they cannot differentiate twice correctly: a model wrapped in nn.DataParallel
    (:func:`check_not_wrapped`), a TorchScript module or one holding one, and the weight of an embedding
    with a ``padding_idx`` (TypeError / ValueError naming it)."""
    if isinstance(model, nn.Module):
        check_not_wrapped(model)
        # torch.func's stateless calls cannot swap a scripted module's parameters (it failed with a pybind TypeError)
        check_not_scripted("", model, "whose parameters torch.func's stateless calls, which every curvature "
                                      "operator and Objective make, cannot replace")
    chosen = resolve_parameters(model, params)
    _check_embedding_gradients(model, chosen)
    return chosen


def _check_embedding_gradients(model: nn.Module, chosen: dict[str, nn.Parameter]) -> None:
    """ValueError naming a chosen embedding weight whose gradient torch changes: with ``sparse=True`` it is a sparse
    tensor (torch's "reshape is not implemented for sparse tensors" met it); with a ``padding_idx`` its
    backward gives that row a zero gradient whatever the loss, while the row still acts on the loss; with
    ``scale_grad_by_freq`` it divides each row's gradient by how often the batch uses it. Either way the
    derivatives of the gradient are not those of any function (products are not symmetric, and the
    solvers assume they are; with scale_grad_by_freq the gradient itself is not the loss's)."""
    chosen_ids = {id(p): name for name, p in chosen.items()}
    for module_name, module in model.named_modules():
        # (nn.EmbeddingBag is not twice differentiable at all: the operators refuse it as such; its padding rows are
        # left out of the bag, but scale_grad_by_freq gives even Objective a wrong gradient)
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        if module.sparse:
            change = ("sparse=True, whose backward gives a sparse gradient, which the operators and the objective "
                      "do not take (sparse=False computes the same dense)")
        elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
            change = (f"padding_idx={module.padding_idx}, whose row torch gives a zero gradient whatever the loss, "
                      "so its curvature is not symmetric")
        elif module.scale_grad_by_freq:
            change = ("scale_grad_by_freq=True, whose backward divides each row's gradient by how often the batch "
                      "uses it, so neither the gradient nor the curvature is the loss's")
        else:
            continue
        # the stored tensor, not module.weight: a parametrization would compute that (spectral norm's
        # power iteration writes its state into the caller's model)
        if parametrize.is_parametrized(module, "weight"):
            weight = getattr(module.parametrizations["weight"], "original", None)
        else:
            weight = module._parameters.get("weight")
        if weight is not None and id(weight) in chosen_ids:
            raise ValueError(
                f"params: {chosen_ids[id(weight)]!r} is the weight of {type(module).__name__} {module_name!r} "
                f"with {change}; leave the embedding out of params (or freeze it, requires_grad_(False))")


def _check_no_adapter_base(model: nn.Module, chosen: dict[str, nn.Parameter]) -> None:
    """ValueError naming a chosen parameter that is the frozen base layer of an unmerged LoRALinear:
    the fused op it runs gives the base no derivatives (it would refuse them with a message about
    ``requires_grad`` that the caller cannot act on)."""
    chosen_ids = {id(p): name for name, p in chosen.items()}
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear) and not module.merged:
            for p in module.base.parameters():
                if id(p) in chosen_ids:
                    raise ValueError(
                        f"params: {chosen_ids[id(p)]!r} is the frozen base layer of the LoRA adapter {module_name!r}, "
                        "which gives it no derivatives; choose the adapters' parameters "
                        "(lora.adapter_parameter_names(model)), or merge or unload the adapter first")


def parameter_names(model: nn.Module, params: ParamSelection = None) -> tuple[str, ...]:
    """The names of the chosen parameters of ``model``, in vector order: the selection in a form that
    can be used more than once (a generator such as ``model.fc.parameters()`` is consumed by its first
    use) and on a copy of the model (whose tensors are other objects). Raises what
    :func:`resolve_parameters` raises."""
    return tuple(resolve_parameters(model, params))


class ModelChanged(ValueError):
    """The model changed after an operator or objective was built on it in a way that it cannot follow
    (a submodule replaced, added or removed, a parameter registered or deleted, or a parameter or
    buffer of another shape, dtype or device, as ``model.float()`` makes): its products, gradients and
    cached state describe the model as it was, so it refuses to go on."""


def flat_offsets(chosen: dict[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """Where each chosen tensor starts in the flat vector (row-major, in the dict's order), and its length d."""
    offsets, d = {}, 0
    for name, tensor in chosen.items():
        offsets[name] = d
        d += tensor.numel()
    return offsets, d


class ParameterSlots:
    """Where each named parameter (and each of ``buffer_names``) of a model lives (its module's
    parameter or buffer dict and attribute), so that an object replaced there (``load_state_dict(...,
    assign=True)``, ``module.weight = nn.Parameter(...)``) is found by name; and the model's module
    tree, so that a change of the tree itself (``model[0] = nn.Linear(...)``, ``model.append(...)``),
    which the slots of the old modules cannot see, is refused instead of read as the old model. The
    tree holds the modules themselves (compared by identity: a replacement freed and replaced again
    cannot take an old module's id) and their parameters' names; buffers a forward registers on the
    fly (a cache) are not a change of the model."""

    def __init__(self, model: nn.Module, names: Iterable[str], *, buffer_names: Iterable[str] = ()) -> None:
        self._model = model
        self._tree = _module_tree(model)
        self._ties = tie_pattern(model)
        self._slots = {}
        self._layouts = {}
        for kind, selected in (("parameter", names), ("buffer", buffer_names)):
            for name in selected:
                prefix, _, attr = name.rpartition(".")
                module = model.get_submodule(prefix) if prefix else model
                owner = module._buffers if kind == "buffer" else module._parameters
                self._slots[name] = (kind, owner, attr)
                self._layouts[name] = _layout(owner[attr])

    def current(self) -> dict[str, torch.Tensor]:
        """The parameter and buffer objects the model holds now, by name (a parameter and a buffer
        cannot share a name), after one look at the module tree.

        Raises:
            ModelChanged: the model's module tree is not the one the slots were taken from, or a tensor
                is gone or has another shape, dtype or device.
        """
        tree = _module_tree(self._model)
        if tree != self._tree:
            differ = [new[0] for old, new in zip(self._tree, tree) if old != new]
            changed = differ[0] if differ else max(tree, self._tree, key=len)[min(len(tree), len(self._tree))][0]
            raise ModelChanged(
                f"the model's modules changed after the operator or objective was built on it (at module "
                f"{changed or '(the model)'!r}: replaced (or its class changed), added or removed, or a parameter "
                "registered or deleted "
                "there): build a new one on the model as it is now")
        ties = tie_pattern(self._model)
        if ties != self._ties:  # the same names in the same order: the tree is the same
            name, now, was = next((name, now, was) for (name, now), (_, was) in zip(ties, self._ties) if now != was)
            raise ModelChanged(
                f"the model's tied parameters changed after the operator or objective was built on it: {name!r} "
                f"was {'its own tensor' if was == name else 'the tensor of ' + repr(was)}, now "
                f"{'its own' if now == name else 'that of ' + repr(now)}: build a new one on the model as it is now")
        tensors = {}
        for name, (kind, owner, attr) in self._slots.items():
            tensor = owner.get(attr)
            if tensor is None or _layout(tensor) != self._layouts[name]:
                now = "deleted" if tensor is None else "now {}, {} on {}".format(*_layout(tensor))
                was = "{}, {} on {}".format(*self._layouts[name])
                raise ModelChanged(f"the model's {kind} {name!r} is {now} (was {was}) since the operator or "
                                   "objective was built on it: build a new one on the model as it is now")
            tensors[name] = tensor
        return tensors


def _layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    return tuple(tensor.shape), tensor.dtype, tensor.device


def tie_pattern(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(name, the first name that holds its tensor) for every parameter name of ``model``, a tied parameter
    under each of its names: which slots share one parameter (tied weights). The slots follow each
    parameter by its first name only, and the functional forward writes it under the others
    (:class:`FunctionalForward`): tying or untying after that is a change of the model. (Buffers are
    left out: a forward may register new ones.)"""
    first: dict[int, str] = {}
    return tuple((name, first.setdefault(id(t), name)) for name, t in model.named_parameters(remove_duplicate=False))


def _module_tree(model: nn.Module) -> list[tuple[str, nn.Module, type, tuple[str, ...]]]:
    """(name, module, its class, its parameters' names) of every module of ``model``: what the slots' validity
    depends on, read in a few microseconds per module (the class: a module whose ``__class__`` is set to another,
    a ReLU made a Tanh, is the same object computing another function)."""
    return [(name, module, type(module), tuple(module._parameters)) for name, module in model.named_modules()]


class FunctionalForward:
    """``model(*args)`` with some of its parameters and buffers replaced by given tensors (by their
    ``named_parameters`` / ``named_buffers`` names), leaving the model as it was.

    ``torch.func.functional_call`` with ``tie_weights=True`` swaps a tensor in under every name that
    holds it, and restores it under each name in the same order: for a module called at two places
    of the model (registered under two names, one slot) the second swap saves the first's tensor as
    the "original", so the call leaves that tensor in the model, a plain tensor in place of the
    Parameter (torch 2.13). Here each replaced tensor goes into each slot that holds it once: under
    its own name, and under the names of other modules' slots that hold the same tensor (tied
    weights, found at construction)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        named = [*model.named_parameters(), *model.named_buffers()]
        first = {id(t): name for name, t in named}
        slots = {id(t): {_slot(model, name)} for name, t in named}
        aliases: dict[str, list[str]] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            slot = _slot(model, name)
            if slot not in slots[id(t)]:
                slots[id(t)].add(slot)
                aliases.setdefault(first[id(t)], []).append(name)
        self.aliases = {name: tuple(others) for name, others in aliases.items()}

    def __call__(self, tensors: dict[str, torch.Tensor], *args: object) -> object:
        if self.aliases:
            tensors = {**tensors, **{alias: tensors[name] for name, others in self.aliases.items()
                                     if name in tensors for alias in others}}
        # a forward pre-hook may write a plain tensor attribute (torch.nn.utils.prune's and the legacy
        # weight_norm's computed weight): from the swapped-in tensors it would keep their graph, or a
        # torch.func wrapper, in the model (no deepcopy, no torch.save): each is put back after the call
        computed = [(module, key, value) for module in self.model.modules()
                    for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
        try:
            return torch.func.functional_call(self.model, tensors, args, tie_weights=False)
        finally:
            for module, key, value in computed:
                module.__dict__[key] = value


def gradient_on_leaves(
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], params: dict[str, torch.Tensor],
    create_graph: bool = False,
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]:
    """``(leaves, gradient, loss)``: the gradient of ``loss = loss_of(leaves)`` by torch.autograd w.r.t. detached leaves of
    ``params``, one entry each in ``params``' order; with ``create_graph`` the gradient keeps its graph for a
    double backward. Plain autograd runs where torch.func's transforms cannot (a packed sequence through an
    RNN). A parameter the loss does not use gets zeros, and so does every one of a loss with no graph at all
    (outputs made by an argmax, a model changed to bypass them), as torch.func.grad gives them."""
    leaves = [p.detach().requires_grad_() for p in params.values()]
    with torch.enable_grad():
        loss = loss_of(dict(zip(params, leaves)))
        grads = (torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True,
                                     materialize_grads=True)
                 if loss.requires_grad else tuple(torch.zeros_like(leaf) for leaf in leaves))
    return leaves, grads, loss


def _slot(model: nn.Module, name: str) -> tuple[int, str]:
    """(id of the owning module, attribute) of a parameter or buffer name: one per place a tensor is held."""
    prefix, _, attr = name.rpartition(".")
    return id(model.get_submodule(prefix) if prefix else model), attr


def flatten_tensors(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (a new tensor, in the given order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_vector(vector: torch.Tensor, shapes: Sequence[torch.Size | tuple[int, ...]]) -> list[torch.Tensor]:
    """Split a flat vector into views of the given shapes (inverse of :func:`flatten_tensors`).

    Raises:
        ValueError: ``vector`` is not 1-D or its length differs from the total size of ``shapes``.
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if vector.dim() != 1 or vector.shape[0] != sum(sizes):
        raise ValueError(f"expected a flat vector of length {sum(sizes)}, got shape {tuple(vector.shape)}")
    return [chunk.view(shape) for chunk, shape in zip(torch.split(vector, sizes), shapes)]


def get_flat_parameters(model: nn.Module, params: ParamSelection = None) -> torch.Tensor:
    """A copy of the chosen parameters of ``model`` as one flat vector (layout of :func:`resolve_parameters`)."""
    with torch.no_grad():
        return flatten_tensors(p.detach() for p in resolve_parameters(model, params).values())


def set_flat_parameters(model: nn.Module, vector: torch.Tensor, params: ParamSelection = None) -> None:
    """Write a flat vector into the chosen parameters of ``model`` in place (e.g. to apply an update).

    This modifies ``model``: call it on the copy you mean to change.

    Raises:
        ValueError: wrong length or shape, or a device that differs from the parameters'; NaN or Inf in
            ``vector``, or in a part rounded to its parameter's narrower dtype (1e6 for a float16 one), named
            by the parameter: nothing is written then.
        TypeError: a dtype other than :func:`get_flat_parameters`'s: the parameters' (of parameters of
            mixed dtypes the widest, each parameter then taking its part rounded to its own dtype).
    """
    chosen = resolve_parameters(model, params)
    first = next(iter(chosen.values()))
    check_tensor("vector", vector)
    # the dtype of get_flat_parameters' vector: its round trip must be accepted, a narrower vector refused
    flat_dtype = functools.reduce(torch.promote_types, (p.dtype for p in chosen.values()))
    if vector.dtype != flat_dtype:
        mixed = len({p.dtype for p in chosen.values()}) > 1
        kind = "mix dtypes; their flat vector (get_flat_parameters) has" if mixed else "have"
        raise TypeError(f"vector has dtype {vector.dtype} but the parameters {kind} {flat_dtype}")
    if vector.device != first.device:
        raise ValueError(f"vector is on {vector.device} but the parameters are on {first.device}")
    pieces = unflatten_vector(vector, [p.shape for p in chosen.values()])
    # every part checked before any is written (the model refuses non-finite weights everywhere after this): the
    # vector once (one read-back, not one per parameter: this runs at every Newton step), and on its own only a
    # part rounded to a narrower dtype, where rounding can make an Inf; the culprit named after a failure
    pieces = [piece.to(p.dtype) for p, piece in zip(chosen.values(), pieces)]
    finite = all_finite(vector)
    for (name, p), piece in zip(chosen.items(), pieces):
        narrower = p.dtype != vector.dtype
        if (not finite or narrower) and not all_finite(piece):
            rounded = " (rounded to its dtype)" if narrower else ""
            raise ValueError(f"vector holds NaN or Inf for parameter {name!r}{rounded}: the model's parameters "
                             "are left as they were")
    with torch.no_grad():
        for p, piece in zip(chosen.values(), pieces):
            p.copy_(piece)


WeightsKey = tuple[tuple[int, int, float, float], ...]
"""Per tensor (parameters, then buffers): its version counter, data pointer, float64 sum and position
checksum (:func:`~unlearn_kernels.ops.weights_fingerprint`)."""


def version_counter(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place write), None for an inference-mode tensor,
    which keeps none (and cannot be written in place outside inference mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def weights_key(tensors: Iterable[torch.Tensor]) -> WeightsKey:
    """What changes when the weights do: per tensor its version counter, data pointer (a replaced
    tensor), float64 sum and position checksum (in-place writes that bump no version counter: fused
    optimizer kernels, ``.data``; the checksum sees values that only moved), read back at once."""
    tensors = list(tensors)
    if not tensors:  # a loss without buffers, at every product: no fingerprint call
        return ()
    # an inference tensor (e.g. running statistics made under inference_mode) keeps no version: its sum still counts
    return tuple((version_counter(t), t.data_ptr(), total, checksum)
                 for t, (total, checksum) in zip(tensors, weights_fingerprint(tensors)))


def host_values(values: list[torch.Tensor], dtype: torch.dtype) -> list[float | int]:
    """0-dim tensors' values as Python numbers, read from their device at once: on the CPU one by one
    (a stacked copy costs more than the reads there), elsewhere one stacked copy
    in ``dtype`` (one synchronisation)."""
    if all(v.device.type == "cpu" for v in values):
        return [v.item() for v in values]
    where = values[0].device
    return torch.stack([v.to(where, dtype) for v in values]).tolist()


def same_weights(key: WeightsKey | None, old: WeightsKey | None) -> bool:
    """``key == old``, with a NaN sum equal to a NaN sum: a buffer may hold +Inf and -Inf (an additive
    mask and a clamp bound), whose sum is NaN at every call, and NaN != NaN would read as a change at
    every product (the cache dropped and rebuilt each time). None (weights not taken yet) is never the
    same."""
    if key is None or old is None:
        return False
    return key == old or (len(key) == len(old) and all(
        new == was or (new[:2] == was[:2] and all(a == b or (math.isnan(a) and math.isnan(b))
                                                  for a, b in zip(new[2:], was[2:])))
        for new, was in zip(key, old)))
