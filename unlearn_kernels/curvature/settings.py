"""What the products are computed under besides the weights, watched from construction on: every
module's training flag, hooks and instance ``forward``, torch.nn's modules' settings (their ``extra_repr`` and
public plain attributes) and the loss's (see :mod:`.base`), and whether a module runs other code than its
class's ``forward``."""
from __future__ import annotations

import functools
import numbers
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .params import WeightsKey, weights_key
from .probes import train_mode_problem

if TYPE_CHECKING:
    from .probes import LossFn

_PLAIN = (bool, int, float, str, type(None))


def _calls(module: nn.Module) -> tuple:
    """What decides how ``module`` is called: its hooks (the handles' ids, forward and backward) and a
    ``forward`` set on the instance (a hook added after construction would be left out of the cached
    products)."""
    return (tuple(module._forward_pre_hooks), tuple(module._forward_hooks), tuple(module._backward_pre_hooks),
            tuple(module._backward_hooks), "forward" in vars(module))


def _shows_settings(module: nn.Module) -> bool:
    """A module of torch.nn's or of this package's (a LoRA adapter's scale), whose ``extra_repr`` shows
    settings, not weights."""
    return type(module).__module__.startswith(("torch.nn.", "unlearn_kernels."))


#: the types of the attributes read as settings (:func:`plain_attributes`): plain values, and plain functions (a
#: TransformerEncoderLayer's ``activation``, compared by identity)
_SETTING_TYPES = (*_PLAIN, types.FunctionType, types.BuiltinFunctionType)
_EXACT = frozenset(_SETTING_TYPES)  # a set lookup first: isinstance alone doubled watched_state's cost


def plain_attributes(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    """(name, value) of a module's public plain attributes in ``vars`` order: bools, numbers, strings, None,
    plain functions and tuples of them (a kernel size, a normalised shape); settings that no ``extra_repr``
    shows (a TransformerEncoderLayer's ``norm_first``, a MultiheadAttention's ``batch_first``: their
    ``extra_repr`` is empty). ``training`` is left out: it is watched apart."""
    found = []
    for k, v in vars(module).items():  # a loop: ~1 us a module, before every product (watched_state)
        if k[0] == "_" or k == "training":
            continue
        if (type(v) in _EXACT or isinstance(v, _SETTING_TYPES)
                or isinstance(v, tuple) and all(isinstance(e, _SETTING_TYPES) for e in v)):
            found.append((k, v))
    return tuple(found)


def _settings(module: nn.Module) -> tuple[str, tuple]:
    """A torch.nn or package module's settings (:func:`module_settings`): its ``extra_repr`` and public plain
    attributes; ("", ()) for another's."""
    return (module.extra_repr(), plain_attributes(module)) if _shows_settings(module) else ("", ())


def module_settings(model: nn.Module) -> list[tuple[str, nn.Module, bool, tuple[str, tuple], tuple]]:
    """(name, module, training flag, settings, calls) of every module: the settings of torch.nn's own
    modules and this package's as their ``extra_repr`` shows them (a BatchNorm's eps, a Dropout's p, a
    convolution's stride, a LoRA adapter's scale) and as their public plain attributes hold them
    (:func:`plain_attributes`: a TransformerEncoderLayer's ``norm_first``, which its empty ``extra_repr``
    does not show), what the fused paths read once and the cached graphs hold; and how it is called
    (:func:`_calls`). Another module's ``extra_repr`` can show its weights' values (a learnable
    temperature), which are the weights' key's, and its attributes may count its calls: left out."""
    return [(name, module, module.training, _settings(module), _calls(module))
            for name, module in model.named_modules()]


def settings_change(was: tuple[str, tuple], now: tuple[str, tuple]) -> str:
    """What differs between two settings of a module (:func:`module_settings`), for a message:
    ``"('eps=1e-05', now 'eps=0.5')"`` or ``"(norm_first=False, now True)"``."""
    if was[0] != now[0]:
        return f"({was[0]!r}, now {now[0]!r})"
    before, after = dict(was[1]), dict(now[1])
    for key in (*before, *after):
        if key not in before or key not in after or before[key] is not after[key] and before[key] != after[key]:
            return f"({key}={before.get(key, '(unset)')!r}, now {after.get(key, '(unset)')!r})"
    return "(their order)"


def _tensors_seen(tensors: dict[str, torch.Tensor | None]) -> tuple:
    """(name, id, layout) of a module's own parameters or buffers (None where one is registered as None):
    their shape, dtype and device, which ``p.data = ...`` changes in the same object (``model.float()``)."""
    return tuple((name, id(t), None if t is None else (t.shape, t.dtype, t.device)) for name, t in tensors.items())


def watched_state(model: nn.Module) -> list[tuple]:
    """One look at all that the operators' checks of the module tree read, in one walk over it: per module
    its name, the module, its class, its training flag and what its train mode does (the per-sample check), its
    settings and calls (:func:`module_settings`), and its own parameters' and buffers' names, ids and
    layouts (the parameter slots, their ties and layouts). Equal to a look taken when those checks passed,
    they would pass again on the same tensors, so the operators skip them before a product (the modules
    are held, so no new one can take an old one's id; the parameters and buffers by the operator). Unequal
    is not yet a change: the checks then run (a buffer that a forward registers on the fly makes the look
    differ without being one)."""
    return [(name, module, type(module), module.training, train_mode_problem(module) if module.training else None,
             _settings(module), _calls(module),
             _tensors_seen(module._parameters), _tensors_seen(module._buffers))
            for name, module in model.named_modules()]


def loss_settings(loss_fn: LossFn) -> tuple[tuple, WeightsKey]:
    """A loss module's and its submodules' training flags and hooks, torch.nn's losses' public plain
    attributes (``label_smoothing``, ``ignore_index``, ``reduction``; not those of a loss of the user's
    own, which may count its calls: the probes call it) with the weights key of all their parameters and
    buffers (a class weight, a learnable temperature: the operators differentiate the model's weights
    only, so the loss's are fixed settings, held by the cached graphs); a ``functools.partial``'s keywords
    (the tensors' as a weights key); nothing for a plain function. (Global module hooks are not read:
    observers such as ``FlopCounterMode`` register them around a product.)"""
    if isinstance(loss_fn, nn.Module):
        plain = tuple((name, module.training, _calls(module), _settings(module)[1])
                      for name, module in loss_fn.named_modules())
        return plain, weights_key([*loss_fn.parameters(), *loss_fn.buffers()])
    if isinstance(loss_fn, functools.partial):
        keywords = loss_fn.keywords.items()
        plain = tuple(sorted((k, v) for k, v in keywords if isinstance(v, _PLAIN)))
        return plain, weights_key(v for _, v in sorted(keywords, key=lambda kv: kv[0]) if isinstance(v, torch.Tensor))
    return (), ()


#: tensors with more entries are described by their fingerprint (a float64 sum and position checksum), not listed
_LISTED_ENTRIES = 4096


def _attributes(value: Any) -> dict[str, Any]:
    """An object's public attributes, from its ``__dict__`` and ``__slots__`` (``training`` left out: no loss reads
    it, and a loss in eval mode computes what one in training mode does)."""
    found = dict(getattr(value, "__dict__", {}))
    for cls in type(value).__mro__:
        slots = getattr(cls, "__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if hasattr(value, slot):
                found.setdefault(slot, getattr(value, slot))
    return {k: v for k, v in found.items() if not k.startswith("_") and k != "training"}


def value_text(value: Any) -> str:
    """``value`` as text that is the same in every process for equal values and differs for different ones, for
    processes that must agree on what they were given (a loss, a method's options): numbers by value (0 and 0.0,
    numpy's and Python's alike), a tensor or numpy array by its entries (a large one by its fingerprint), a
    container by its items (a set sorted), a ``functools.partial`` by its function and arguments, a function or
    class by its qualified name (not its module, ``__main__`` in one process and ``__mp_main__`` in a spawned one,
    nor what a closure holds), a bound method by its object and name, a module by its class, public attributes,
    buffers and submodules, another object by its class and public attributes (``__dict__`` or ``__slots__``)."""
    module = type(value).__module__
    if module == "numpy" and getattr(value, "shape", None) == ():
        value = value.item()  # a numpy scalar (np.True_, np.str_, np.float64) as Python's
    elif module == "numpy" and hasattr(value, "tolist"):  # an array: by its entries, as a tensor
        return f"array({value_text(value.tolist())})" if value.dtype == object else value_text(torch.as_tensor(value))
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value)
    if isinstance(value, numbers.Integral):
        return repr(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return repr(int(number)) if number.is_integer() else repr(number)  # 2**60 and 2.0**60 alike
    if isinstance(value, numbers.Complex):
        return repr(complex(value))
    if isinstance(value, torch.Tensor):
        if value.numel() <= _LISTED_ENTRIES:
            return f"tensor({value_text(value.tolist())}, {value.dtype})"
        return f"tensor{tuple(value.shape)}, {value.dtype}, {weights_key([value])[0][2:]!r}"
    if isinstance(value, functools.partial):
        return f"partial({value_text(value.func)}, {value_text(value.args)}, {value_text(value.keywords)})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(sorted(f"{value_text(k)}: {value_text(v)}" for k, v in value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(value_text(v) for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(value_text(v) for v in value)) + "}"
    if isinstance(value, types.MethodType):
        return f"{value_text(value.__self__)}.{value.__func__.__qualname__}"
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return value.__qualname__
    if isinstance(value, nn.Module):
        buffers = {k: value_text(b) for k, b in value.named_buffers(recurse=False)}
        children = {k: value_text(child) for k, child in value.named_children()}
        return f"{type(value).__qualname__}{value_text(_attributes(value))}{buffers}{children}"
    if hasattr(value, "__dict__") or hasattr(type(value), "__slots__") or type(value).__repr__ is object.__repr__:
        # another object (a callable loss): by what it holds, never by its address
        return f"{type(value).__qualname__}{value_text(_attributes(value))}"
    return repr(value)


def hooked_module(model: nn.Module) -> str | None:
    """Where ``model`` has a module forward hook or pre-hook, as the start of a sentence ("module '0' has
    a forward hook or forward pre-hook", or a global one registered for every module); None without one."""
    from torch.nn.modules import module as torch_module  # where torch keeps the global hooks

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "a global module forward hook is registered (register_module_forward_hook / _pre_hook)"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{'module ' + repr(name) if name else 'the model'} has a forward hook or forward pre-hook"
    return None


def full_backward_hooked_module(model: nn.Module, what: str = "the model") -> str | None:
    """Where ``model`` (``what``, in the message) has a module backward hook that torch.func cannot run
    through (a full backward hook or a backward pre-hook, its own or a global one, which torch runs in an
    autograd.Function without ``setup_context``), as the start of a sentence ("module '0' has a backward
    hook or backward pre-hook"); None without one. A legacy ``register_backward_hook`` is a plain hook on
    the outputs' graph, which torch.func runs: not one of these."""
    from torch.nn.modules import module as torch_module  # where torch keeps the global hooks

    if torch_module._global_backward_pre_hooks or (torch_module._global_is_full_backward_hook
                                                   and torch_module._global_backward_hooks):
        return "a global module backward hook is registered (register_module_full_backward_hook / _pre_hook)"
    for name, module in model.named_modules():
        if module._backward_pre_hooks or (module._is_full_backward_hook and module._backward_hooks):
            return f"{'module ' + repr(name) if name else what} has a backward hook or backward pre-hook"
    return None


def own_call(module: nn.Module) -> bool:
    """Whether ``module`` runs other code than its class's ``forward`` when called: a forward hook or
    pre-hook (:func:`hooked_module`), a ``forward`` or ``_call_impl`` set on the instance (accelerate's
    hooks set ``forward``), or a class that overrides ``__call__`` or ``_call_impl``."""
    kind = type(module)
    return (hooked_module(module) is not None or "forward" in vars(module) or "_call_impl" in vars(module)
            or kind.__call__ is not nn.Module.__call__ or kind._call_impl is not nn.Module._call_impl)
