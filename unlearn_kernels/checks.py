"""Argument checks, the rule for a model's non-finite weights and the float64 norm shared by the
training recipe and the curvature, solver and method layers.

One place for each: every layer imports these from here, so that the same bad value gets the same
message everywhere (the caller prefixes ``name`` with its own, e.g. ``"cure_newton: M"``).
"""
from __future__ import annotations

import cmath
import contextlib
import inspect
import math
import numbers
import operator
import reprlib
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad


def check_int(name: str, value: Any, low: int = 1, high: int = 2**63 - 1) -> int:
    """``value`` as an int if it is an integer (Python or numpy; not a bool) in [low, high] (the
    default ``high`` is the largest int64, what a C++ op or a tensor can take), else ValueError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if value > high:
        raise ValueError(f"{name} must be an int <= {high}, got {value!r}")
    return operator.index(value)


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                 strict: bool = False, strict_high: bool = False) -> float:
    """``value`` as a float if it is a finite real number (Python, numpy, or a one-element real
    tensor) in [low, high] (``strict`` excludes ``low``, ``strict_high`` excludes ``high``), else
    ValueError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # a bool tensor gives a bool: refused below
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(as_float(value))
    if bad or value < low or (strict and value == low) or value > high or (strict_high and value == high):
        # reprlib: a 2**2000 is shown in 40 characters, not 600
        raise ValueError(f"{name} must be a finite number{_interval(low, high, strict, strict_high)}, "
                         f"got {reprlib.repr(value)}")
    return float(value)


def as_float(value: numbers.Real) -> float:
    """``float(value)``, or an infinity of ``value``'s sign for a number beyond a float's range (an int
    such as 2**2000, where ``float`` and ``math.isfinite`` raise OverflowError): the one conversion of
    a real argument, so that a huge one is refused as not finite, not met as an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _interval(low: float, high: float, strict: bool, strict_high: bool) -> str:
    if high == math.inf:
        return "" if low == -math.inf else f" {'>' if strict else '>='} {low}"
    if low == -math.inf:
        return f" {'<' if strict_high else '<='} {high}"
    return f" in {'(' if strict else '['}{low:g}, {high:g}{')' if strict_high else ']'}"


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ValueError naming ``name`` and the choices."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """``value`` if it is a dense (strided) tensor, else TypeError naming ``name``: a sparse tensor
    would meet a different torch or kernel error on each backend, or none."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {value.layout} (call .to_dense() first)")
    return value


def check_module(name: str, value: Any) -> nn.Module:
    """``value`` if it is an nn.Module, else TypeError naming ``name`` (the caller's, with its prefix:
    ``"train: model"``, ``"from_peft: peft_model"``)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def check_tensors(owner: str, named: Iterable[tuple[str, Any]]) -> None:
    """:func:`check_tensor` on each ``(name, value)``, naming it ``"<owner>: <name>"``."""
    for name, value in named:
        check_tensor(f"{owner}: {name}", value)


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_one_shape(owner: str, named: list[tuple[str, torch.Tensor]], nonscalar: bool = False) -> None:
    """ValueError naming every tensor and its shape unless all have one shape (``nonscalar``: of at least one dim)."""
    shapes = [t.shape for _, t in named]
    if (nonscalar and not shapes[0]) or any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"{owner}: {_listing([name for name, _ in named])} must have one shape"
                         f"{' of at least one dim' if nonscalar else ''}, got "
                         + _listing([f"{name} {tuple(t.shape)}" for name, t in named]))


def check_one_floating_dtype_and_device(owner: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """ValueError naming every tensor and its dtype (device) unless all have one floating dtype (one device)."""
    names = _listing([name for name, _ in named])
    first = named[0][1]
    if not first.is_floating_point() or any(t.dtype != first.dtype for _, t in named):
        raise ValueError(f"{owner}: {names} must have one floating dtype, got "
                         + _listing([f"{name} {t.dtype}" for name, t in named]))
    if any(t.device != first.device for _, t in named):
        raise ValueError(f"{owner}: {names} must be on one device, got "
                         + _listing([f"{name} on {t.device}" for name, t in named]))


def check_has_values(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` unless it lives on the meta device (shapes without values), which a computation that reads
    values cannot take: ValueError naming ``name`` (not torch's "Tensor.item() cannot be called on meta
    tensors" at the first value read)."""
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device (it has a shape but no values): give it on cpu or cuda")
    return value


def as_device(name: str, value: Any, problem: str = "is not a device name: use cpu, cuda or cuda:N") -> torch.device:
    """``torch.device(value)``, or ValueError ``"<name> <value!r> <problem>"`` for what torch cannot read
    as a device (an unknown type, ''; torch's own message lists all twenty types it knows)."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {value!r} {problem}") from None


def check_device(name: str, value: Any, types: tuple[str, ...] | None = None) -> torch.device:
    """``value`` (a device name or a torch.device) as a torch device of one of ``types`` (None: any)
    that can run here, else ValueError naming ``name`` and the value: torch itself takes ``cpu:1``,
    and fails on a missing GPU only at the first tensor, with its own message per case."""
    device = as_device(name, value)
    if types is not None and device.type not in types:  # whether or not this machine has one
        raise ValueError(f"{name} {value!r}: only {' or '.join(types)} devices are supported here")
    if device.type == "cpu" and device.index:  # torch takes cpu:1 for the CPU: a typo, of cuda:1 perhaps
        problem = "there is one CPU device, cpu"
    elif device.type == "cuda" and not (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        problem = "no CUDA device is visible"
    elif device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        problem = f"{count} CUDA device(s) visible ({', '.join(f'cuda:{i}' for i in range(count))})"
    else:
        problem = _tensor_problem(device)
    if problem:
        raise ValueError(f"{name} {value!r} cannot run here: {problem}")
    return device


def _tensor_problem(device: torch.device) -> str | None:
    """Why a tensor cannot be made and read back on ``device`` (None when it can): the type is built
    into torch, present and visible, and holds data (meta does not). Torch raises several exception
    types for these, some with a page of text."""
    try:
        torch.zeros(1, device=device).item()
    except Exception as exc:
        first_sentence = str(exc).partition("\n")[0].partition(". ")[0] or type(exc).__name__
        return f"torch cannot make and read a tensor there ({first_sentence})"
    return None


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool if it is one (Python or numpy), else TypeError naming ``name`` (a flag
    such as ``check_finite``: 0, 1 or "no" are refused, not read as truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_int64(name: str, value: Any) -> int:
    """``value`` as an int if it is an integer (Python or numpy; not a bool) that an int64 holds
    (negative too: a label such as ``ignore_index=-100``, which a C++ op takes as int64_t), else
    TypeError (not an integer) / ValueError (out of range) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must be in the int64 range [-2**63, 2**63), got {value}")
    return value


def first_beyond_int64(t: torch.Tensor) -> int | None:
    """The first value of a uint64 tensor ``t`` from 2**63 up, which int64 cannot hold (the cast every
    caller makes would wrap it to a negative), or None (for every other dtype too)."""
    if t.dtype != torch.uint64:
        return None
    signed = t.view(torch.int64)  # the same bits: values from 2**63 up read negative
    wraps = signed < 0
    return int(signed[wraps][0]) + 2**64 if bool(wraps.any()) else None


def as_int64(name: str, t: torch.Tensor) -> torch.Tensor:
    """The integer tensor ``t`` (labels, indices) as int64: the ids it holds, whatever its width and sign
    (torch compares no uint16/32/64 tensor on the CPU, and indexes with int64); ValueError naming ``name``
    for a uint64 value int64 cannot hold (:func:`first_beyond_int64`). The one rule for integer ids."""
    beyond = first_beyond_int64(t)
    if beyond is not None:
        raise ValueError(f"{name} must lie in the int64 range, got {beyond}")
    return t.long()


def check_seed(name: str, value: Any, high_bits: int = 63) -> int:
    """``value`` as an int if it is an integer (Python or numpy; not a bool) in [0, 2**high_bits)
    (torch's seeds: 63 bits; scikit-learn's: 32), else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if not 0 <= value < 2**high_bits:
        raise ValueError(f"{name} must be in [0, 2**{high_bits}), got {value}")
    return value


def check_sklearn_seed(name: str, seed: int) -> int:
    """``seed`` as an int if :func:`check_seed` accepts it and it is below 2**32, the bound of the
    ``random_state`` of scikit-learn (and of numpy's legacy seeding); else TypeError / ValueError."""
    return check_seed(name, seed, high_bits=32)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (an integer or empty tensor always is).

    One sum decides in the usual case: a NaN or Inf entry makes it non-finite, and one scalar
    read-back (``.item()``) is ~10x cheaper than an elementwise ``isfinite(t).all()`` on the small
    vectors the solvers check at every product. Only a non-finite sum (also reached by finite entries
    that overflow when added) falls back to the elementwise check (:func:`first_nonfinite_row`).
    """
    return first_nonfinite_row(t.reshape(-1)) is None


#: entries :func:`first_nonfinite_row` checks elementwise at a time (its masks: a few bytes per entry)
_CHECK_CHUNK = 1 << 22


def first_nonfinite_row(t: torch.Tensor) -> int | None:
    """The first index along dim 0 whose slice of ``t`` holds NaN or Inf, or None (integer tensors
    are always finite). A finite sum decides at once; else the rows are checked a chunk at a time, so
    that the masks of ``torch.isfinite`` (1.75x the data at once) stay small beside data of gigabytes."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    total = t.sum().item()
    if cmath.isfinite(total) if t.is_complex() else math.isfinite(total):
        return None
    rows = t.reshape(t.shape[0], -1)
    step = max(1, _CHECK_CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        finite = torch.isfinite(rows[start:start + step]).all(dim=1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0, 0])
    return None


def check_finite_inputs(owner: str, what: str, x: torch.Tensor) -> None:
    """ValueError ``"<owner>: <what> has inputs that are not finite (NaN or Inf; first at row N)"``
    (``what``: the set as the caller calls it, ``"the retain set"``, ``"data"``) where a row of ``x``
    holds NaN or Inf (:func:`first_nonfinite_row`): the one refusal of such inputs before training,
    unlearning or evaluating on them, which would silently give a NaN model, NaN logits or a NaN norm."""
    row = first_nonfinite_row(x)
    if row is not None:
        raise ValueError(f"{owner}: {what} has inputs that are not finite (NaN or Inf; first at row {row})")


def normalisation_buffers(model: nn.Module) -> frozenset[str]:
    """The names of ``model``'s buffers that belong to a normalisation layer (BatchNorm's
    ``running_mean`` and ``running_var``): the buffers :func:`first_nonfinite_weight` holds to
    finiteness as it holds the parameters."""
    return frozenset(name for name, _ in model.named_buffers() if isinstance(
        model.get_submodule(name.rpartition(".")[0]), nn.modules.batchnorm._NormBase))


def first_nonfinite_weight(parameters: Iterable[tuple[str, torch.Tensor]], buffers: Iterable[tuple[str, torch.Tensor]],
                           statistics: Container[str],
                           sums: Iterable[float] | None = None) -> tuple[str, str, str] | None:
    """The first of a model's weights that the rule for them refuses, as ``(kind, name, what)``
    ("parameter" or "buffer", its name, "NaN or Inf" or "NaN"), or None if there is none.

    The rule, the same for the curvature operators, the objective and the methods' input and result
    checks: parameters and normalisation layers' running statistics (``statistics``, from
    :func:`normalisation_buffers`; a NaN or Inf there makes the outputs NaN or a channel constant)
    must be finite; other buffers must hold no NaN but may hold Inf (an additive ``-inf`` attention
    mask, infinite clamp bounds: common and harmless).

    ``sums``: the tensors' float64 sums, parameters then buffers, where the caller has them (the
    curvature operators' weights key): a tensor whose sum is finite holds no NaN or Inf and is not
    read again (float32 entries cannot overflow a float64 sum; finite float64 ones may, so a
    non-finite sum sends a parameter to the elementwise check). Without them each tensor is read here.
    """
    named = [*(("parameter", name, t) for name, t in parameters), *(("buffer", name, t) for name, t in buffers)]
    totals = [None] * len(named) if sums is None else list(sums)
    for (kind, name, t), total in zip(named, totals, strict=True):
        if total is not None and math.isfinite(total):
            continue
        t = t.detach()
        if kind == "parameter" or name in statistics:
            if not all_finite(t):
                return kind, name, "NaN or Inf"
        # Inf allowed: a NaN sum comes from a NaN entry, or from +Inf and -Inf
        elif (total is None or math.isnan(total)) and bool(torch.isnan(t).any()):
            return kind, name, "NaN"
    return None


def batch_statistics(module: nn.Module, training: bool) -> bool:
    """Whether ``module`` is a batch-norm layer that normalises with the statistics of the batch in the
    mode ``training``, as torch decides it: in training mode, and in eval mode too without running
    statistics (``track_running_stats=False``). Such a layer refuses a batch of one value per channel."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and (training or (module.running_mean is None and module.running_var is None)))


def batch_statistics_layer(model: nn.Module) -> str | None:
    """The name of the first batch-norm layer of ``model`` that normalises with the batch's statistics
    in eval mode too (no running statistics, ``track_running_stats=False``), or None: with one, a
    sample's output depends on the rows batched with it whatever the mode."""
    return next((name for name, module in model.named_modules() if batch_statistics(module, training=False)), None)


def check_batch_statistics(owner: str, model: nn.Module, consequence: str) -> None:
    """ValueError naming the first batch-norm layer of ``model`` without running statistics
    (:func:`batch_statistics_layer`), which normalises with each batch's statistics in eval mode too;
    ``consequence`` says what that breaks for ``owner`` (the prefix of the message; "" for none)."""
    name = batch_statistics_layer(model)
    if name is not None:
        raise ValueError(f"{owner + ': ' if owner else ''}the model's batch-norm layer {name!r} has no running "
                         f"statistics (track_running_stats=False) and normalises with each batch's own, in eval "
                         f"mode too: {consequence}")


def check_not_meta(owner: str, model: nn.Module) -> None:
    """ValueError naming the first parameter or buffer of ``model`` on the meta device (shapes without
    values), where torch's own error would come from deep inside the first read of a value."""
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for key, tensor in tensors:
            if tensor.is_meta:
                raise ValueError(f"{owner}: the model's {kind} {key!r} is on the meta device (it has no values): "
                                 "materialise the model first (e.g. to_empty(device=...) and load_state_dict)")


def check_not_scripted(owner: str, model: nn.Module, reason: str) -> None:
    """TypeError naming ``model``, or its first submodule, that is a TorchScript module
    (``torch.jit.script`` / ``torch.jit.trace``); ``reason`` says why ``owner`` (the prefix of the
    message; "" for none) cannot take one."""
    scripted = next((name for name, module in model.named_modules() if isinstance(module, torch.jit.ScriptModule)),
                    None)
    if scripted is not None:
        where = "the model is" if scripted == "" else f"the model's submodule {scripted!r} is"
        raise TypeError(f"{owner + ': ' if owner else ''}{where} a TorchScript module, {reason}: pass the eager "
                        "nn.Module it was scripted or traced from")


@contextlib.contextmanager
def refusing_uncopyable(owner: str, reason: str) -> Iterator[None]:
    """Around a ``copy.deepcopy`` of a model: what the copy raises for a model that cannot be copied (a
    tensor attribute that is not a graph leaf, an object that cannot be pickled, such as a lock) becomes
    a TypeError ``"<owner>: the model cannot be copied, and <reason>: <error>"``, with a hint for a layer
    pruned by torch.nn.utils.prune; running out of memory passes through as it is."""
    try:
        yield
    except (RuntimeError, TypeError) as error:
        if is_out_of_memory(error):
            raise
        hint = (" (a layer pruned by torch.nn.utils.prune holds a computed weight until a forward under "
                "torch.no_grad())") if "graph leaves" in str(error) else ""
        raise TypeError(f"{owner}: the model cannot be copied, and {reason}: {error}{hint}") from error


def first_nonfinite_model_weight(model: nn.Module) -> tuple[str, str, str] | None:
    """:func:`first_nonfinite_weight` of all of ``model``'s parameters and buffers, with its
    normalisation layers' running statistics (:func:`normalisation_buffers`) held to the parameters' rule."""
    return first_nonfinite_weight(model.named_parameters(), model.named_buffers(), normalisation_buffers(model))


def check_finite_model(owner: str, model: nn.Module) -> None:
    """ValueError ``"<owner>: the model's <kind> <name> has <what> values (did an update diverge?)"`` for
    the first weight of ``model`` that :func:`first_nonfinite_model_weight` refuses: the one refusal of a
    given model with a NaN or Inf weight (training, the methods, the evaluation, the Lipschitz estimate),
    before any work (a NaN weight makes every output, loss and update NaN). The model is on a device
    with values (:func:`check_not_meta` first)."""
    bad = first_nonfinite_model_weight(model)
    if bad is not None:
        kind, key, what = bad
        raise ValueError(f"{owner}: the model's {kind} {key!r} has {what} values (did an update diverge?)")


def norm64(v: torch.Tensor) -> float:
    """The Euclidean norm of a tensor, accumulated in float64 (no overflow or loss in float32)."""
    return float(torch.linalg.vector_norm(v.double()))


SMALLEST_SQUARED = math.sqrt(torch.finfo(torch.float64).tiny)
"""The smallest magnitude whose square is a normal float64 number (1.5e-154)."""


def norm_scale(v: torch.Tensor) -> float:
    """A power of two within a factor 2 below ``max |v_i|`` (``v / scale`` has entries of at most 2 in
    magnitude, and dividing by it is exact); 1.0 where v is empty, zero or not finite (nothing to scale)."""
    largest = float(v.abs().max()) if v.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 1.0
    return math.ldexp(1.0, math.frexp(largest)[1] - 1)


def scaled_norm(v: torch.Tensor | np.ndarray) -> float:
    """The Euclidean norm of ``v`` in float64, finite for every finite v (a step of norm 2e160 was reported
    as Inf): where the plain norm (:func:`norm64` of a tensor, numpy's of an array: the solvers' bits as
    before) over- or underflows, v is scaled by :func:`norm_scale` before squaring. For the norms the
    solvers report and the secular solve; the argument checks keep norm64, whose overflow is how they
    refuse a vector too large to square."""
    with np.errstate(over="ignore"):  # an overflowing square is what the scaled norm below is for
        plain = float(np.linalg.norm(v)) if isinstance(v, np.ndarray) else norm64(v)
    # no square lost: above SMALLEST_SQUARED sqrt(n) the subnormal squares' rounding is below eps of the sum
    # (NaN stays NaN)
    if SMALLEST_SQUARED * math.sqrt(max(1, v.size if isinstance(v, np.ndarray) else v.numel())) <= plain < math.inf \
            or not plain == plain:
        return plain
    v = torch.as_tensor(v).double()
    scale = norm_scale(v)
    return scale * float(torch.linalg.vector_norm(v / scale))


def check_option_names(what: str, options: Iterable[str], accepted: Callable[..., Any] | Iterable[str],
                       reserved: Iterable[str] = ()) -> None:
    """Refuse, before any work, a name in ``options`` that is not an accepted option: a keyword of the
    function ``accepted`` (a class: its constructor's), or one of the names ``accepted``, other than the
    ``reserved`` ones (set by the caller). TypeError, as Python's for an unexpected keyword argument, but
    naming the options that are accepted. A function that takes ``**kwargs`` accepts every name."""
    if callable(accepted):
        parameters = inspect.signature(accepted).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return
        names = {p.name for p in parameters}
    else:
        names = set(accepted)
    allowed = sorted(names - set(reserved))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{what}: unknown option(s) {unknown}; accepted: {allowed}")


#: what torch's allocators say when they run out (the CPU's "DefaultCPUAllocator: can't allocate memory: you
#: tried to allocate N bytes", another platform's "not enough memory"); CUDA raises torch.cuda.OutOfMemoryError
_OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (a RuntimeError from torch's CPU allocator, CUDA's
    OutOfMemoryError): the probes that turn a model's or loss's RuntimeError into a ValueError blaming
    the data or the loss let it through as it is."""
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error).lower() for text in _OUT_OF_MEMORY)


def derivative_possible(*tensors: torch.Tensor) -> bool:
    """Whether a derivative of the result may be asked for: autograd records, a tensor is a forward-mode
    dual, or a ``torch.func`` transform wraps it. The ops run their kernels through their autograd.Function
    only then (its call costs about 50 us on the CPU, three times softmax_ce's product of 64 x 10 logits):
    a registered op has no forward-mode rule, and forward-mode AD through it gave a zero tangent."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


def available_memory(device: torch.device | str) -> int | None:
    """The bytes that can still be allocated on ``device``: a GPU's free memory, the CPU's available
    memory (Linux's MemAvailable); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":  # free, and what torch's caching allocator holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_fits_in_memory(what: str, nbytes: int, device: torch.device | str, remedy: str) -> None:
    """ValueError, before the work, where ``what`` needs more than the memory available on ``device``
    (:func:`available_memory`; nothing is checked where that is unknown): an allocation of many GiB
    would otherwise fail deep inside with the allocator's message, or push the machine into swap."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {_size(nbytes)}, more than the {_size(free)} available on "
                         f"{torch.device(device)}: {remedy}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
