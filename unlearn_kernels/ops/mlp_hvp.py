"""Exact Hessian-vector products of softmax cross entropy over an MLP, K tangents in one pass.

The MLP maps x (N, d_0) through layers ``h <- act_l(h W_l^T + b_l)``, l = 1..L (the last output is the
logits z). The loss is ``F.cross_entropy(z, target, label_smoothing=eps, ignore_index=...)`` (mean
over the rows whose target is not ``ignore_index``). :func:`mlp_hvp` returns H v, the Hessian of
that loss w.r.t. all weights and biases applied to K tangents v at once, exactly (no Gauss-Newton
approximation), by Pearlmutter's R-operator: one forward, one R-forward, one backward and one
R-backward, with the forward and backward shared by the K tangents (the weight gradients
themselves are never formed; measured costs are in docs/benchmarks.md).

Backends: C++ CPU (ATen matmuls + fused elementwise loops) and CUDA (cuBLAS through ATen + fused
kernels): the device-agnostic passes in ``csrc/mlp_hvp.cpp``, the device stages in
``csrc/{cpu,cuda}/mlp_hvp.*``; ``mlp_hvp_ref`` below (``torch.func`` jvp of grad)
is the pure-PyTorch reference. There is no Triton kernel. The op is not differentiable: its results
never require grad, whatever the backend (the compiled ops have no derivative formula).

:func:`mlp_hvp_flat` is the same product on flat parameter vectors (a (d, K) matrix of tangents in,
a (d, K) matrix of products out), the form curvature operators and solvers use: the splitting into
per-layer tangents and the gathering of the products happen in the compiled op, not in Python.

At fixed weights, :func:`mlp_hvp_state` computes once what does not depend on the tangents (the
forward, the softmax and the gradient's backward) and :func:`mlp_hvp_flat_cached` answers each
product from it with the R-passes alone.

:func:`mlp_value_grad_flat` is the same MLP's loss (in float64 from the logits) and its gradient on
flat vectors, a forward and a backward (per block of rows on the CPU) through the same passes and device stages (what
``curvature.Objective`` runs on such a model instead of autograd).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _extension
from ..backends import choose
from ..checks import all_finite, check_bool, check_int64, check_number, check_tensor
from ..contracts.softmax_ce import check_targets
from ..contracts.text import dtype_name, shape_text

_CPP_OPS = "unlearn_kernels"
_OP = "mlp_hvp"

#: Activation names accepted by :func:`mlp_hvp`, and their codes in the op schema.
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4}
_ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}
_ACTIVATION_FNS = {"identity": lambda a: a, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}

Products = tuple[list[torch.Tensor], list[torch.Tensor | None]]


# --------------------------------------------------------------------------- reference
def mlp_hvp_ref(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    v_weights: Sequence[torch.Tensor],
    v_biases: Sequence[torch.Tensor | None],
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    *,
    check_finite: bool = False,
) -> Products:
    """Pure-PyTorch reference of :func:`mlp_hvp` (``torch.func.jvp`` of ``torch.func.grad``, vmapped
    over the K tangents); same arguments (already validated) and return value. ``check_finite``
    checks the logits and their R-derivatives it computes as the compiled kernels do."""
    fns = [_ACTIVATION_FNS[a] for a in activations]
    has_bias = [b is not None for b in biases]

    def loss(ws: list[torch.Tensor], bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, present = x, iter(bs)
        for w, with_bias, fn in zip(ws, has_bias, fns):
            h = fn(F.linear(h, w, next(present) if with_bias else None))
        return F.cross_entropy(h, target, label_smoothing=label_smoothing, ignore_index=ignore_index), h

    # contiguous: jvp's make_dual refuses a primal whose elements share memory (an expanded tensor)
    primal = ([w.contiguous() for w in weights], [b.contiguous() for b in biases if b is not None])
    k = v_weights[0].shape[0]
    tangent = (
        [*v_weights],
        [vb if vb is not None else b.new_zeros((k, *b.shape)) for b, vb in zip(biases, v_biases) if b is not None],
    )
    grad = torch.func.grad(loss, argnums=(0, 1), has_aux=True)  # the logits z as aux: the jvp gives Rz too
    hvp = torch.func.vmap(lambda t: torch.func.jvp(grad, primal, t), out_dims=(None, 0))  # z unbatched
    (_, z), ((hv_w, hv_b), rz) = hvp(tangent)
    if check_finite:
        kept = target != ignore_index
        _check_logits(z, kept)
        _check_r_logits((rz * (torch.softmax(z, 1) * kept.unsqueeze(1))).sum(2), "v_weights and v_biases")
    present = iter(hv_b)
    return list(hv_w), [next(present) if with_bias else None for with_bias in has_bias]


#: The check_finite refusals, after "mlp_hvp: " for the products and the state, after "mlp_value_grad_flat: " for
#: the loss and its gradient (csrc/mlp_hvp.cpp raises them so for the compiled kernels).
_BAD_LOGITS = "the logits contain NaN or +Inf (check x, the weights and the biases)"
_BAD_R_LOGITS = ("the R-derivative of the logits contains NaN or Inf (check {}, then x and the weights: an Inf "
                 "weight under a saturating activation leaves the logits finite)")


def _check_logits(z: torch.Tensor, kept: torch.Tensor, op: str = _OP) -> None:
    """ValueError if the logits z (N, C) make the loss's rows non-finite, as the kernels flag them: a
    kept row (``kept``: (N,) bool) whose max is not finite (a NaN or +Inf, or all -Inf), or an ignored
    row with a NaN or Inf (it reaches every product through the backward's 0 * Inf)."""
    if not all_finite(torch.where(kept, z.amax(1), z.abs().amax(1))):
        raise ValueError(f"{op}: {_BAD_LOGITS}")


def _check_r_logits(dots: torch.Tensor, tangents: str) -> None:
    """ValueError naming ``tangents`` if some <p, Rz_k> in ``dots`` is not finite, as the kernels flag
    them: Rz_k a row of the R-derivative of the logits for tangent k, p the row's softmax, zero on an
    ignored row (where a NaN or Inf in Rz_k makes the product NaN)."""
    if not all_finite(dots):
        raise ValueError(f"{_OP}: {_BAD_R_LOGITS.format(tangents)}")


# --------------------------------------------------------------------------- validation
def _tensor_list(name: str, values: object, length: int | None, optional: bool, op: str = _OP,
                 what: str = "one per layer") -> list[torch.Tensor | None]:
    """``values`` as a list if it is a sequence of tensors (or None where ``optional``), else
    TypeError naming the entry. Cheap for a list or tuple of tensors: the flat ops run it for every
    product."""
    if type(values) not in (list, tuple) and (isinstance(values, torch.Tensor) or not isinstance(values, Sequence)):
        raise TypeError(f"{op}: {name} must be a list of tensors ({what}), got {type(values).__name__}")
    if length is not None and len(values) != length:
        raise ValueError(f"{op}: {name} has {len(values)} entries but there are {length} layers")
    for i, v in enumerate(values):
        if not (isinstance(v, torch.Tensor) or (optional and v is None)):
            kind = "a tensor or None" if optional else "a tensor"
            raise TypeError(f"{op}: {name}[{i}] must be {kind}, got {type(v).__name__}")
    return values if type(values) is list else list(values)


def _model_args(op: str, weights: object, biases: object, activations: object, *, count_biases: bool,
                none_for_no_biases: bool) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[int]]:
    """The model's arguments of every public function, checked in one order under ``op``'s name:
    ``(weights, biases, codes)``, the weights and biases as lists of tensors (None where a layer has no
    bias) and the activations' codes. ``count_biases``: biases must have one entry per weight here (the
    flat ops leave the count to their layout check, whose message counts the offsets too);
    ``none_for_no_biases``: biases None means no layer has a bias (mlp_hvp's signature)."""
    weights = _tensor_list("weights", weights, None, optional=False, op=op)
    if none_for_no_biases and biases is None:
        biases = [None] * len(weights)
    else:
        biases = _tensor_list("biases", biases, len(weights) if count_biases else None, optional=True, op=op)
    return weights, biases, activation_codes(activations, op)


def _offsets(op: str, name: str, values: object) -> list[int]:
    """``weight_offsets`` / ``bias_offsets`` as a list of int64 values (from a list, tuple, numpy
    array or integer tensor), else TypeError / ValueError naming the entry (the schema would raise
    the dispatcher's own error for a float or a huge int, and take a bool as 0 or 1)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    elif type(values) not in (list, tuple) and (isinstance(values, str) or not isinstance(values, Sequence)):
        raise TypeError(f"{op}: {name} must be a list of ints (one per layer), got {type(values).__name__}")
    for i, v in enumerate(values):  # a plain int in range passes without building a message
        if type(v) is not int or not -2**63 <= v < 2**63:
            return [check_int64(f"{op}: {name}[{j}]", u) for j, u in enumerate(values)]
    return values if type(values) is list else list(values)


def _options(op: str, label_smoothing: object, ignore_index: object, check_finite: object) -> tuple[float, int, bool]:
    """The loss options, checked once in the public function for every backend (the schema would
    truncate ``ignore_index=1.5`` to 1 and refuse ``check_finite="no"`` with the dispatcher's own
    error, the reference would take them as they are)."""
    return (check_number(f"{op}: label_smoothing", label_smoothing, 0.0, 1.0),
            check_int64(f"{op}: ignore_index", ignore_index), check_bool(f"{op}: check_finite", check_finite))


def _check_like(op: str, x: torch.Tensor, t: torch.Tensor, what: str, l: int) -> None:
    """``check_like`` in csrc/mlp_hvp.cpp: ``what[l]`` has x's dtype and device."""
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {what}[{l}] has dtype {dtype_name(t.dtype)} but x has {dtype_name(x.dtype)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {what}[{l}] is on {t.device} but x on {x.device}")


def _check_layers(op: str, x: torch.Tensor, weights, biases, activations) -> None:
    """``check_layers`` in csrc/mlp_hvp.cpp: x and the layers' shapes, dtypes and devices (the same
    checks in the same order with the same messages)."""
    num_layers = len(weights)
    if not weights:
        raise ValueError(f"{op}: at least one layer is needed, got 0 weights")
    if len(biases) != num_layers or len(activations) != num_layers:
        raise ValueError(f"{op}: weights, biases and activations must all have one entry per layer, got "
                         f"{num_layers}, {len(biases)} and {len(activations)}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (N, in_features), got shape {shape_text(x)}")
    if x.shape[0] == 0:
        raise ValueError(f"{op}: x has no rows (the mean loss over 0 samples is undefined)")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, got {dtype_name(x.dtype)}")
    in_features = x.shape[1]
    for l, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2:
            raise ValueError(f"{op}: weights[{l}] must be 2-D (out, in), got shape {shape_text(w)}")
        if w.shape[1] != in_features:
            raise ValueError(f"{op}: weights[{l}] has shape {shape_text(w)} but its input has {in_features} features "
                             f"({'x' if l == 0 else 'the previous layer' + chr(39) + 's output'})")
        _check_like(op, x, w, "weights", l)
        out = w.shape[0]
        if out == 0:
            raise ValueError(f"{op}: weights[{l}] has no output features")
        if b is not None:
            if b.shape != (out,):
                raise ValueError(f"{op}: biases[{l}] must have shape ({out},), got {shape_text(b)}")
            _check_like(op, x, b, "biases", l)
        in_features = out


def _check_model_inputs(x, target, weights, biases, activations, label_smoothing, op: str = _OP) -> None:
    """``check_model`` in csrc/mlp_hvp.cpp: :func:`_check_layers`, then the targets and the label
    smoothing (the checks of the ops without per-layer tangents); ``op`` names the op in messages."""
    _check_layers(op, x, weights, biases, activations)
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long:
        got = dtype_name(target.dtype) if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"{op}: target must be int64 class indices, got {got}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: target must have shape ({x.shape[0]},), got {shape_text(target)}")
    if target.device != x.device:
        raise ValueError(f"{op}: target is on {target.device} but x on {x.device}")
    check_number(f"{op}: label_smoothing", label_smoothing, 0.0, 1.0)


def _check_inputs(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing) -> None:
    """The reference backend's copy of the compiled kernels' checks (``check_inputs`` in
    csrc/mlp_hvp.cpp): the same checks in the same order with the same messages, so every backend
    raises the same error."""
    check_tensor(f"{_OP}: x", x)
    num_layers = len(weights)
    counts = (num_layers, len(biases), len(activations), len(v_weights), len(v_biases))
    if len(set(counts)) > 1:
        raise ValueError(f"{_OP}: weights, biases, activations, v_weights and v_biases must all have one entry per "
                         f"layer, got {counts[0]}, {counts[1]}, {counts[2]}, {counts[3]} and {counts[4]}")
    _check_model_inputs(x, target, weights, biases, activations, label_smoothing)
    k = v_weights[0].shape[0] if v_weights[0].dim() == 3 else -1
    if k < 1:
        raise ValueError(f"{_OP}: v_weights[0] must be 3-D (K, out, in) with K >= 1, got shape {shape_text(v_weights[0])}")
    for l, (w, b, v, vb) in enumerate(zip(weights, biases, v_weights, v_biases)):
        out, inp = w.shape
        if v.shape != (k, out, inp):
            raise ValueError(f"{_OP}: v_weights[{l}] must have shape (K, out, in) = ({k}, {out}, {inp}), got {shape_text(v)}")
        _check_like(_OP, x, v, "v_weights", l)
        if vb is not None:
            if b is None:
                raise ValueError(f"{_OP}: v_biases[{l}] is given but layer {l} has no bias")
            if vb.shape != (k, out):
                raise ValueError(f"{_OP}: v_biases[{l}] must have shape (K, out) = ({k}, {out}), got {shape_text(vb)}")
            _check_like(_OP, x, vb, "v_biases", l)


def _check_targets(target: torch.Tensor, num_classes: int, ignore_index: int, op: str = _OP) -> None:
    """The target checks the compiled kernels do inside the pass, for the reference backend (before
    the finiteness of the logits, as there)."""
    check_targets(target, num_classes, ignore_index, op=op)
    if not bool((target != ignore_index).any()):
        raise ValueError(f"{op}: every target is ignore_index={ignore_index} (the mean loss over 0 samples is undefined)")


# --------------------------------------------------------------------------- public op
@torch.no_grad()  # not differentiable on any backend (the reference's graph, the kernels' None)
def mlp_hvp(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None,
    activations: Sequence[str],
    v_weights: Sequence[torch.Tensor],
    v_biases: Sequence[torch.Tensor | None] | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    check_finite: bool = True,
    backend: str = "auto",
) -> Products:
    """Exact Hessian-vector products of the mean softmax cross entropy of an MLP, K at once.

    Args:
        x: (N, d_0) float32/float64 inputs (flatten images first).
        target: (N,) int64 class indices in [0, C), or ``ignore_index`` (that row is left out of the mean).
        weights: L tensors W_l of shape (d_l, d_{l-1}), as ``nn.Linear.weight``.
        biases: L tensors b_l of shape (d_l,) or None (a layer without bias); None for no biases at all.
        activations: L names from :data:`ACTIVATIONS`, the activation after each layer ("gelu" is the
            exact erf form, ``nn.GELU()``; "identity" for none).
        v_weights: L tangents of shape (K, d_l, d_{l-1}): K directions for each weight.
        v_biases: L tangents of shape (K, d_l), or None (zero) per layer or for all layers. Only layers
            with a bias may have one.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy`` (it changes the gradient, hence the
            products through the activations' second derivatives).
        ignore_index: target value whose rows are left out, as in ``F.cross_entropy``: an int
            (Python or numpy, not a bool) in the int64 range.
        check_finite: a bool; True raises ValueError if the logits or their directional derivatives
            would make the loss's rows non-finite (a kept row with a NaN or +Inf or all -Inf, an ignored
            row with any NaN or Inf), the same test on every backend: a NaN or Inf in the inputs counts
            only through them (an infinite pre-activation that tanh, sigmoid or ReLU saturates passes, but
            for one case: the reference, by forward-mode AD, multiplies the inputs' zero tangent by an
            infinite first-layer weight under tanh or sigmoid, 0 * Inf = NaN, and refuses what the kernels
            compute as its finite limit).
            False passes non-finite values through to the products. On GPU it costs one synchronisation.
        backend: "auto", "cpp", "cuda" or "reference" (see :func:`unlearn_kernels.backends`).

    Returns:
        ``(hv_weights, hv_biases)``: hv_weights[l] of shape (K, d_l, d_{l-1}); hv_biases[l] of shape
        (K, d_l), or None for a layer without bias. Entry k of each is the Hessian applied to tangent k.
        Meta tensors (the reference backend, which "auto" picks for them) give meta products of these
        shapes, with no check of values (targets, finiteness): they hold none.

    Raises:
        ValueError / TypeError: a non-tensor argument, mismatched layer shapes, K, dtypes or devices,
            unknown activation names, options of the wrong type or range (label_smoothing,
            ignore_index, check_finite), targets out of range, or non-finite values (see
            ``check_finite``). The same error from every backend (but for the case ``check_finite`` names).
        BackendUnavailableError: a forced backend that cannot run here.
    """
    # Argument types and the plain Python options first, for every backend: the schema would raise
    # the dispatcher's own error (or truncate a float ignore_index) where the reference is clear.
    check_tensor(f"{_OP}: x", x)
    check_tensor(f"{_OP}: target", target)
    weights, biases, codes = _model_args(_OP, weights, biases, activations, count_biases=True,
                                         none_for_no_biases=True)
    num_layers = len(weights)
    v_weights = _tensor_list("v_weights", v_weights, num_layers, optional=False)
    v_biases = [None] * num_layers if v_biases is None else _tensor_list("v_biases", v_biases, num_layers, optional=True)
    label_smoothing, ignore_index, check_finite = _options(_OP, label_smoothing, ignore_index, check_finite)
    name = choose(_OP, x.device, backend)
    if name == "reference":  # the compiled kernels check their inputs themselves (csrc/mlp_hvp.cpp)
        _check_inputs(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing)
        if not x.is_meta:  # meta tensors hold no values to check: the products' shapes only
            _check_targets(target, weights[-1].shape[0], ignore_index)
        return mlp_hvp_ref(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing, ignore_index,
                           check_finite=check_finite and not x.is_meta)
    out = torch.ops.unlearn_kernels.mlp_hvp(
        x, target, weights, biases, codes, v_weights, v_biases, label_smoothing, ignore_index, check_finite)
    present = iter(out[num_layers:])
    return list(out[:num_layers]), [next(present) if b is not None else None for b in biases]


# --------------------------------------------------------------------------- flat-vector form
def _check_blocks(op: str, weights, biases, weight_offsets, bias_offsets, d: int | None) -> int:
    """The chosen blocks must tile [0, d) (any length for d None); returns their total size
    (``check_blocks`` in csrc/mlp_hvp.cpp: the same checks, with the same messages)."""
    if not (len(weight_offsets) == len(bias_offsets) == len(weights) == len(biases)):
        raise ValueError(
            f"{op}: weights, biases, weight_offsets and bias_offsets must have one entry per layer, got "
            f"{len(weights)}, {len(biases)}, {len(weight_offsets)} and {len(bias_offsets)}"
        )
    blocks = []
    for l, (w, b, wo, bo) in enumerate(zip(weights, biases, weight_offsets, bias_offsets)):
        if w.dim() != 2:
            raise ValueError(f"{op}: weights[{l}] must be 2-D (out, in), got shape {shape_text(w)}")
        for kind, offset in (("weight", wo), ("bias", bo)):  # not read as "not chosen": a sign slip would drop a block
            if offset < -1:
                raise ValueError(f"{op}: {kind}_offsets[{l}] = {offset}: an offset is a row of "
                                 f"{'the flat gradient' if d is None else 'V'} (>= 0), or -1 for a parameter that is "
                                 "not chosen")
        if wo >= 0:
            blocks.append((wo, w.numel(), l, False))
        if bo >= 0:
            if b is None:
                raise ValueError(f"{op}: bias_offsets[{l}] = {bo} but layer {l} has no bias")
            blocks.append((bo, w.shape[0], l, True))
    expected = 0
    # by offset alone, stably (layer order, weight before bias), as the C++ check: overlapping blocks
    # are reported alike
    for offset, size, l, is_bias in sorted(blocks, key=lambda block: block[0]):
        if offset != expected:
            where = "flat vector" if d is None else f"{d} rows of V"
            raise ValueError(
                f"{op}: the chosen parameter blocks must tile the {where} in order without gaps or "
                f"overlaps, but {'bias' if is_bias else 'weight'}_offsets[{l}] = {offset} where row {expected} was expected"
            )
        expected += size
    if d is not None and expected != d:
        raise ValueError(f"{op}: the chosen parameters have {expected} entries but V has {d} rows")
    return expected


def _check_flat_layout(weights, biases, weight_offsets, bias_offsets, d: int) -> None:
    """The chosen blocks must tile the d rows of V."""
    _check_blocks(_OP + "_flat", weights, biases, weight_offsets, bias_offsets, d)


def _check_tangent_matrix(op: str, x: torch.Tensor, V: torch.Tensor) -> None:
    """The flat ops' V has x's dtype and device (``check_flat_layout`` in csrc/mlp_hvp.cpp)."""
    if V.dtype != x.dtype:
        raise TypeError(f"{op}: V has dtype {dtype_name(V.dtype)} but x has {dtype_name(x.dtype)}")
    if V.device != x.device:
        raise ValueError(f"{op}: V is on {V.device} but x on {x.device}")


def _check_cached_args(x, state, weights, biases, activations, V, weight_offsets, bias_offsets) -> None:
    """The argument checks of :func:`mlp_hvp_flat_cached` that do not read values (``activations``
    by name): those of ``run_cached_flat`` in csrc/mlp_hvp.cpp, in its order with its messages."""
    op = _OP + "_flat_cached"
    _check_layers(op, x, weights, biases, activations)
    _check_tangent_matrix(_OP + "_flat", x, V)  # the C++ op's check_flat_layout, shared with mlp_hvp_flat
    _check_flat_layout(weights, biases, weight_offsets, bias_offsets, V.shape[0])
    num_layers = len(weights)
    if len(state) != 4 * num_layers + 1:
        raise ValueError(f"{op}: state must be the {4 * num_layers + 1} tensors mlp_hvp_state "
                         f"returns for {num_layers} layers, got {len(state)}")
    _check_state(op, x, state, weights, activations)


def _check_state(op: str, x, state, weights, activations) -> None:
    """Each state tensor has x's dtype and device and the shape mlp_hvp_state gives it for these x,
    weights and activations (a state kept from other data or another model would otherwise fail
    inside the products)."""
    num_layers, n = len(weights), x.shape[0]
    advice = "pass the state that mlp_hvp_state returned for these x, weights and activations"

    def check(i: int, present: bool, width: int) -> None:
        t = state[i]
        _check_like(op, x, t, "state", i)
        if present and (t.dim() != 2 or tuple(t.shape) != (n, width)):
            raise ValueError(f"{op}: state[{i}] has shape {list(t.shape)} but ({n}, {width}) was expected: {advice}")
        if not present and t.numel() != 0:
            raise ValueError(f"{op}: state[{i}] has shape {list(t.shape)} but is empty for this layer's activation: "
                             f"{advice}")

    for layer, activation in enumerate(activations):
        out = weights[layer].shape[0]
        if layer > 0:
            check(layer - 1, True, weights[layer].shape[1])
        check(num_layers - 1 + layer, True, out)
        check(2 * num_layers - 1 + layer, activation != "identity", out)
        check(3 * num_layers - 1 + layer, activation not in ("identity", "relu"), out)
    check(4 * num_layers - 1, True, weights[-1].shape[0])
    check(4 * num_layers, True, weights[-1].shape[0])


def _flat_tangents(weights, V, weight_offsets, bias_offsets) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """V's blocks as the per-layer tangents of :func:`mlp_hvp` (zero for a weight not chosen)."""
    k, cols = V.shape[1], V.T
    v_weights = [cols[:, o:o + w.numel()].reshape(k, *w.shape) if o >= 0 else w.new_zeros((k, *w.shape))
                 for w, o in zip(weights, weight_offsets)]
    v_biases = [cols[:, o:o + w.shape[0]].reshape(k, w.shape[0]) if o >= 0 else None
                for w, o in zip(weights, bias_offsets)]
    return v_weights, v_biases


def _flat_products(V, weights, weight_offsets, bias_offsets, products: Products) -> torch.Tensor:
    """The chosen blocks of :func:`mlp_hvp`'s products in V's row layout."""
    k, (hv_w, hv_b) = V.shape[1], products
    out = V.new_empty((k, V.shape[0])).T
    for l, (w, wo, bo) in enumerate(zip(weights, weight_offsets, bias_offsets)):
        if wo >= 0:
            out[wo:wo + w.numel()] = hv_w[l].reshape(k, -1).T
        if bo >= 0:
            out[bo:bo + w.shape[0]] = hv_b[l].T
    return out


def mlp_hvp_flat_ref(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    V: torch.Tensor,
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`mlp_hvp_flat` (through :func:`mlp_hvp_ref`); same arguments
    (already validated) and return value."""
    v_weights, v_biases = _flat_tangents(weights, V, weight_offsets, bias_offsets)
    products = mlp_hvp_ref(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing, ignore_index,
                           check_finite=check_finite)
    return _flat_products(V, weights, weight_offsets, bias_offsets, products)


@torch.no_grad()  # not differentiable on any backend (the reference's graph, the kernels' None)
def mlp_hvp_flat(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    V: torch.Tensor,
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`mlp_hvp` on flat parameter vectors: H V for a (d, K) matrix V of K tangents.

    V's rows are the chosen parameters flattened (row-major) and stacked: ``weight_offsets[l]`` is
    the first row of W_l, ``bias_offsets[l]`` that of b_l, -1 for a parameter that is not chosen
    (its tangent is zero and its product is not returned: the result is the Hessian block of the
    chosen parameters applied to V). The chosen blocks must tile the d rows exactly, in any order.
    The compiled backends validate the tensors in C++ (this wrapper checks only the arguments'
    Python types and the options, a few microseconds, and runs no tensor op: on small models each
    Python-level tensor op is a visible share of a product).

    Args:
        x, target, weights, biases, activations, label_smoothing, ignore_index, check_finite, backend:
            as in :func:`mlp_hvp` (biases: one entry per layer, None for a layer without bias).
        V: (d, K) tangents, of x's dtype and device.
        weight_offsets, bias_offsets: one int per layer (see above): a list or tuple (numpy or
            torch integers too).

    Returns:
        The (d, K) products, in V's row layout (a transposed view of (K, d) storage: column k, the
        product with tangent k, is contiguous).

    Raises:
        ValueError / TypeError: what :func:`mlp_hvp` raises, V not (d, K) of x's dtype and device,
            offsets that do not tile V's rows.
        BackendUnavailableError: a forced backend that cannot run here.
    """
    op = _OP + "_flat"
    check_tensor(f"{op}: x", x)
    check_tensor(f"{op}: target", target)
    if check_tensor(f"{op}: V", V).dim() != 2 or V.shape[1] == 0:
        raise ValueError(f"{op}: V must be a 2-D (d, K) tensor with K >= 1, got {tuple(V.shape)}")
    weights, biases, codes = _model_args(op, weights, biases, activations, count_biases=False,
                                         none_for_no_biases=False)
    weight_offsets = _offsets(op, "weight_offsets", weight_offsets)
    bias_offsets = _offsets(op, "bias_offsets", bias_offsets)
    label_smoothing, ignore_index, check_finite = _options(op, label_smoothing, ignore_index, check_finite)
    if choose(op, x.device, backend) == "reference":  # the C++ op's checks in its order: layout, then mlp_hvp's
        _check_tangent_matrix(op, x, V)
        _check_flat_layout(weights, biases, weight_offsets, bias_offsets, V.shape[0])
        _check_inputs(x, target, weights, biases, activations, *_flat_tangents(weights, V, weight_offsets, bias_offsets),
                      label_smoothing)
        if not x.is_meta:  # meta tensors hold no values to check: the products' shapes only
            _check_targets(target, weights[-1].shape[0], ignore_index)
        return mlp_hvp_flat_ref(x, target, weights, biases, activations, V, weight_offsets, bias_offsets,
                                label_smoothing, ignore_index, check_finite=check_finite and not x.is_meta)
    return torch.ops.unlearn_kernels.mlp_hvp_flat(
        x, target, weights, biases, codes, V, weight_offsets, bias_offsets, label_smoothing, ignore_index, check_finite)


# --------------------------------------------------------------------------- value and gradient
_VALUE_GRAD_OP = "mlp_value_grad_flat"
_BAD_LOSS = "the loss is not finite (NaN or Inf in the logits: check x, the weights and the biases)"
_BAD_GRADIENT = ("the gradient is not finite (check x and the weights: an Inf under a saturating activation leaves "
                 "the logits finite)")


def mlp_value_grad_flat_ref(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    *,
    with_gradient: bool = True,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`mlp_value_grad_flat` (``F.cross_entropy`` of the float64 logits,
    differentiated by autograd); same arguments (already validated) and return value."""
    fns = [_ACTIVATION_FNS[a] for a in activations]

    def leaf(t: torch.Tensor | None, offset: int) -> torch.Tensor | None:
        # a leaf per layer and kind: a tensor passed for two layers (a shared zero bias) has a gradient per layer
        return t.detach().requires_grad_(with_gradient) if t is not None and offset >= 0 else t

    ws, bs = [leaf(w, o) for w, o in zip(weights, weight_offsets)], [leaf(b, o) for b, o in zip(biases, bias_offsets)]
    chosen = [(t, o) for t, o in (*zip(ws, weight_offsets), *zip(bs, bias_offsets)) if o >= 0]
    with torch.enable_grad():
        h = x
        for w, b, fn in zip(ws, bs, fns):
            h = fn(F.linear(h, w, b))
        if check_finite:
            _check_logits(h, target != ignore_index, _VALUE_GRAD_OP)
        value = F.cross_entropy(h.double(), target, label_smoothing=label_smoothing, ignore_index=ignore_index)
        if check_finite and not all_finite(value):
            raise ValueError(f"{_VALUE_GRAD_OP}: {_BAD_LOSS}")
        grad = x.new_empty(sum(t.numel() for t, _ in chosen) if with_gradient else 0)
        if with_gradient and chosen:
            for (t, o), g in zip(chosen, torch.autograd.grad(value, [t for t, _ in chosen])):
                grad[o:o + t.numel()] = g.reshape(-1)
    if check_finite and with_gradient and not all_finite(grad):
        raise ValueError(f"{_VALUE_GRAD_OP}: {_BAD_GRADIENT}")
    return value.detach(), grad


@torch.no_grad()  # not differentiable on any backend (the reference's graph, the kernels' None)
def mlp_value_grad_flat(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    with_gradient: bool = True,
    check_finite: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean softmax cross entropy of the MLP and its gradient w.r.t. the chosen parameters, by a
    forward and a backward through the compiled stages (no autograd graph): over blocks of rows on the
    CPU, over all rows at once on CUDA.

    The loss is ``F.cross_entropy(z, target, label_smoothing=..., ignore_index=...)`` of the logits z,
    evaluated in float64 from them (``logsumexp(z) - (1 - eps) z_t - (eps / C) sum_c z_c`` per kept
    row); the gradient is computed in x's dtype, the backward stopping at the lowest chosen layer (the target's
    ``p_y - 1`` as minus the other classes' share of the row's double sum of exponentials, so that a well-fit row,
    1 - p_y ~ 1e-5, keeps float32's relative accuracy, where ``1 / sum - 1`` lost up to 1e-2 of it). The C++
    CPU kernel takes the rows in blocks of about 131,072 / (widest layer output) rows (the weights' rows; at
    least 64), so that a
    block's activations stay in the cache from its forward to its backward, and adds each block's gradient
    to the first's (rounded accordingly); the CUDA kernel takes all rows at once.

    Args:
        x, target, weights, biases, activations, label_smoothing, ignore_index, backend: as in
            :func:`mlp_hvp` (biases: one entry per layer, None for a layer without bias).
        weight_offsets, bias_offsets: where each chosen weight (row-major) and bias starts in the flat
            gradient, -1 for a parameter that is not chosen; the chosen blocks tile it from 0.
        with_gradient: False: the value only (the backward is skipped; an empty gradient is returned).
        check_finite: a ValueError for logits with NaN or +Inf (a kept row's max, or any entry of an ignored row,
            which reaches the gradient through 0 * Inf), a loss or a gradient that is not finite (False: they are
            returned as they are).

    Returns:
        ``(value, grad)``: a float64 0-dim tensor on x's device, and the (d,) gradient in x's dtype
        (d the chosen parameters' total size; (0,) without ``with_gradient``).

    Raises:
        What :func:`mlp_hvp_flat` raises for the same model, targets and offsets (an offset layout that
        does not tile the flat vector from 0).
    """
    op = _VALUE_GRAD_OP
    check_tensor(f"{op}: x", x)
    check_tensor(f"{op}: target", target)
    weights, biases, codes = _model_args(op, weights, biases, activations, count_biases=True,
                                         none_for_no_biases=False)
    weight_offsets = _offsets(op, "weight_offsets", weight_offsets)
    bias_offsets = _offsets(op, "bias_offsets", bias_offsets)
    label_smoothing, ignore_index, check_finite = _options(op, label_smoothing, ignore_index, check_finite)
    with_gradient = check_bool(f"{op}: with_gradient", with_gradient)
    if choose(op, x.device, backend) == "reference":  # the C++ op's checks in its order: the model, then the layout
        _check_model_inputs(x, target, weights, biases, activations, label_smoothing, op)
        _check_blocks(op, weights, biases, weight_offsets, bias_offsets, None)
        if not x.is_meta:  # meta tensors hold no values to check: the results' shapes only
            _check_targets(target, weights[-1].shape[0], ignore_index, op)
        return mlp_value_grad_flat_ref(x, target, weights, biases, activations, weight_offsets, bias_offsets,
                                       label_smoothing, ignore_index, with_gradient=with_gradient,
                                       check_finite=check_finite and not x.is_meta)
    value, grad = torch.ops.unlearn_kernels.mlp_value_grad_flat(
        x, target, weights, biases, codes, weight_offsets, bias_offsets, label_smoothing, ignore_index, with_gradient,
        check_finite)
    return value, grad


# --------------------------------------------------------------------------- fixed weights
def mlp_hvp_state_ref(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    *,
    check_finite: bool = False,
) -> list[torch.Tensor]:
    """Pure-PyTorch reference of :func:`mlp_hvp_state` (act' and act'' by ``torch.func.jvp``, the
    gradient w.r.t. the logits by ``torch.func.grad``); same arguments (already validated) and return value.
    ``check_finite`` checks the logits it computes as the compiled kernels do."""
    fns = [_ACTIVATION_FNS[a] for a in activations]
    inputs, pre = [x], []
    for w, b, fn in zip(weights, biases, fns):
        pre.append(F.linear(inputs[-1], w, b))
        inputs.append(fn(pre[-1]))
    logits = inputs.pop()
    if check_finite:
        _check_logits(logits, target != ignore_index)
    kept = (target != ignore_index).to(x.dtype)
    p = torch.softmax(logits, dim=1) * kept.unsqueeze(1)
    g = torch.func.grad(lambda z: F.cross_entropy(z, target, label_smoothing=label_smoothing, ignore_index=ignore_index))(logits)
    empty = x.new_empty(0)
    grads, firsts, seconds = [], [], []
    for l in reversed(range(len(weights))):
        one = torch.ones_like(pre[l])
        first = torch.func.jvp(fns[l], (pre[l],), (one,))[1]
        second = torch.func.jvp(lambda a: torch.func.jvp(fns[l], (a,), (one,))[1], (pre[l],), (one,))[1]
        grads.insert(0, first * g)
        firsts.insert(0, first if activations[l] != "identity" else empty)
        seconds.insert(0, second * g if activations[l] not in ("identity", "relu") else empty)
        g = grads[0] @ weights[l]
    return [*inputs[1:], *grads, *firsts, *seconds, p, p / kept.sum()]


def mlp_hvp_flat_cached_ref(
    x: torch.Tensor,
    state: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    V: torch.Tensor,
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`mlp_hvp_flat_cached` (the R-forward, the loss's R-rows and
    the R-backward written out with einsum); same arguments (already validated) and return value.
    ``check_finite`` checks the R-derivative of the logits it computes as the compiled kernels do."""
    num_layers = len(weights)
    v_weights, v_biases = _flat_tangents(weights, V, weight_offsets, bias_offsets)
    inputs, grads = [x, *state[:num_layers - 1]], state[num_layers - 1:2 * num_layers - 1]
    firsts, seconds = state[2 * num_layers - 1:3 * num_layers - 1], state[3 * num_layers - 1:4 * num_layers - 1]
    p, q = state[-2], state[-1]
    # Rh_0 = 0 (x has no tangent): no Rh_0 terms, as in the kernel (0 * an infinite weight would be NaN)
    rh, ra = [None], []
    for l, w in enumerate(weights):
        r = torch.einsum("ni,koi->nko", inputs[l], v_weights[l])
        if l > 0:
            r = r + rh[l] @ w.T
        if v_biases[l] is not None:
            r = r + v_biases[l]
        ra.append(r)
        rh.append(r * firsts[l].unsqueeze(1) if firsts[l].numel() else r)
    dots = (rh[-1] * p.unsqueeze(1)).sum(2, keepdim=True)
    if check_finite:
        _check_r_logits(dots, "V")
    rg = q.unsqueeze(1) * (rh[-1] - dots)
    hv_w, hv_b = [None] * num_layers, [None] * num_layers
    for l in reversed(range(num_layers)):
        if firsts[l].numel():
            rg = rg * firsts[l].unsqueeze(1)
        if seconds[l].numel():
            rg = rg + seconds[l].unsqueeze(1) * ra[l]
        hv_w[l] = torch.einsum("nko,ni->koi", rg, inputs[l])
        hv_b[l] = rg.sum(0) if biases[l] is not None else None
        if l > 0:
            hv_w[l] = hv_w[l] + torch.einsum("no,nki->koi", grads[l], rh[l])
            rg = rg @ weights[l] + torch.einsum("no,koi->nki", grads[l], v_weights[l])
    return _flat_products(V, weights, weight_offsets, bias_offsets, (hv_w, hv_b))


@torch.no_grad()  # not differentiable on any backend (the reference's graph, the kernels' None)
def mlp_hvp_state(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    check_finite: bool = True,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """What stays fixed between :func:`mlp_hvp_flat` products while the weights do not change.

    For L layers: the inputs h_1 .. h_{L-1} of layers 2 .. L, then per layer d_l = act'(a_l) g_l (g_l
    the gradient of the loss w.r.t. the layer's output), act'(a_l) and act''(a_l) g_l (an empty
    tensor where the activation has no such term: no act' for the identity, no act'' term for the
    identity and ReLU), then softmax(z) and softmax(z) / (rows kept), both zero on ignored rows:
    4 L + 1 tensors, about 4 N (d_1 + .. + d_L) entries. :func:`mlp_hvp_flat_cached` takes it.

    Args:
        As in :func:`mlp_hvp` (biases: one entry per layer, None for a layer without bias;
        ``check_finite`` checks the logits).

    Raises:
        What :func:`mlp_hvp` raises for the same arguments.
    """
    op = _OP + "_state"
    check_tensor(f"{op}: x", x)
    check_tensor(f"{op}: target", target)
    weights, biases, codes = _model_args(op, weights, biases, activations, count_biases=True,
                                         none_for_no_biases=False)
    label_smoothing, ignore_index, check_finite = _options(op, label_smoothing, ignore_index, check_finite)
    if choose(op, x.device, backend) == "reference":
        _check_model_inputs(x, target, weights, biases, activations, label_smoothing)
        if not x.is_meta:  # meta tensors hold no values to check: the state's shapes only
            _check_targets(target, weights[-1].shape[0], ignore_index)
        return mlp_hvp_state_ref(x, target, weights, biases, activations, label_smoothing, ignore_index,
                                 check_finite=check_finite and not x.is_meta)
    return list(torch.ops.unlearn_kernels.mlp_hvp_state(
        x, target, weights, biases, codes, label_smoothing, ignore_index, check_finite))


@torch.no_grad()  # not differentiable on any backend (the reference's graph, the kernels' None)
def mlp_hvp_flat_cached(
    x: torch.Tensor,
    state: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    V: torch.Tensor,
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    *,
    check_finite: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`mlp_hvp_flat` from the ``state`` that :func:`mlp_hvp_state` returned for the same ``x``,
    weights, biases and activations (and the target and loss options it was given): only the
    R-forward, the loss's R-rows and the R-backward run, with no activation function and no softmax
    evaluated. Layers below the lowest chosen parameter are skipped (their tangents are zero). The C++
    CPU kernel takes the rows in blocks of about 131,072 / (K x widest layer output) rows (at least 64), so
    that a block's R-quantities stay in the cache from its R-forward to its R-backward, and adds each
    block's products to the first's (rounded accordingly); the CUDA kernel takes all rows at once.

    Args:
        x, weights, biases, activations: as given to :func:`mlp_hvp_state` (``x`` is not in the state).
        state: its result.
        V, weight_offsets, bias_offsets, check_finite, backend: as in :func:`mlp_hvp_flat`
            (``check_finite`` checks the R-derivative of the logits).

    Returns:
        The (d, K) products, as :func:`mlp_hvp_flat` returns them.

    Raises:
        ValueError / TypeError: a state that does not fit the layers and x, and what
            :func:`mlp_hvp_flat` raises for V and the offsets.
    """
    op = _OP + "_flat_cached"
    check_tensor(f"{op}: x", x)
    if check_tensor(f"{op}: V", V).dim() != 2 or V.shape[1] == 0:
        raise ValueError(f"{op}: V must be a 2-D (d, K) tensor with K >= 1, got {tuple(V.shape)}")
    state = _tensor_list("state", state, None, optional=False, op=op, what="those mlp_hvp_state returned")
    weights, biases, codes = _model_args(op, weights, biases, activations, count_biases=False,
                                         none_for_no_biases=False)
    weight_offsets = _offsets(op, "weight_offsets", weight_offsets)
    bias_offsets = _offsets(op, "bias_offsets", bias_offsets)
    check_finite = check_bool(f"{op}: check_finite", check_finite)
    return mlp_hvp_flat_cached_prechecked(choose(op, x.device, backend), x, state, weights, biases, codes, V,
                                          weight_offsets, bias_offsets, check_finite=check_finite)


@torch.no_grad()
def mlp_hvp_flat_cached_prechecked(
    kernel: str,
    x: torch.Tensor,
    state: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    codes: Sequence[int],
    V: torch.Tensor,
    weight_offsets: Sequence[int],
    bias_offsets: Sequence[int],
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """:func:`mlp_hvp_flat_cached` without its Python checks of the argument types, for a caller that made
    them once and calls it for many V at the same layout (a fused curvature operator: those checks took
    ~20 us, 2-3% of a product of the digits MLP at fixed weights). ``kernel``: the backend
    :func:`~unlearn_kernels.backends.choose` picked for this op and x's device; ``codes``: the activations'
    codes (:func:`activation_codes`); the rest as checked by :func:`mlp_hvp_flat_cached` (lists of tensors,
    lists of ints, a 2-D V). The compiled ops still check every shape, dtype and device (in C++), the
    reference path every argument, so a wrong tensor is still a clear error."""
    # No parameter chosen (V has no rows) leaves the compiled pass no layer to start from: the
    # reference checks the arguments and returns the empty product.
    if kernel == "reference" or V.shape[0] == 0:
        activations = [_ACTIVATION_NAMES[c] for c in codes]
        _check_cached_args(x, state, weights, biases, activations, V, weight_offsets, bias_offsets)
        return mlp_hvp_flat_cached_ref(x, state, weights, biases, activations, V, weight_offsets, bias_offsets,
                                       check_finite=check_finite and not V.is_meta)  # meta: no values to check
    return torch.ops.unlearn_kernels.mlp_hvp_flat_cached(
        x, state, weights, biases, codes, V, weight_offsets, bias_offsets, check_finite)


def activation_codes(activations: Sequence[str], op: str) -> list[int]:
    """The schema's codes of the activation names (the one check of the names, for every op and path);
    ``op`` names the public function in its errors."""
    if isinstance(activations, str) or not isinstance(activations, Sequence):
        raise TypeError(f"{op}: activations must be a list of names, got {type(activations).__name__}")
    for i, a in enumerate(activations):
        if a not in ACTIVATIONS:
            raise ValueError(f"{op}: activations[{i}] = {a!r} is not one of {sorted(ACTIVATIONS)}")
    return [ACTIVATIONS[a] for a in activations]


# --------------------------------------------------------------------------- fake
# The fakes check the arguments too: under torch.compile they are what runs, and with inputs on
# mixed devices (one of them on "meta") the dispatcher picks the Meta kernel, which is the fake.
def _fake(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing, ignore_index, check_finite):
    _check_inputs(x, target, weights, biases, activations, v_weights, v_biases, label_smoothing)
    k = v_weights[0].shape[0]
    hv_w = [v.new_empty(v.shape) for v in v_weights]
    hv_b = [w.new_empty((k, w.shape[0])) for w, b in zip(weights, biases) if b is not None]
    return hv_w + hv_b


def _fake_flat(x, target, weights, biases, activations, V, weight_offsets, bias_offsets, label_smoothing,
               ignore_index, check_finite):
    _check_tangent_matrix(_OP + "_flat", x, V)  # run_flat's order: the layout, then the model
    _check_flat_layout(weights, biases, weight_offsets, bias_offsets, V.shape[0])
    _check_model_inputs(x, target, weights, biases, activations, label_smoothing)
    return V.new_empty((V.shape[1], V.shape[0])).T  # the kernel's layout: (K, d) storage, transposed


def _fake_value_grad_flat(x, target, weights, biases, activations, weight_offsets, bias_offsets, label_smoothing,
                          ignore_index, with_gradient, check_finite):
    _check_model_inputs(x, target, weights, biases, activations, label_smoothing, _VALUE_GRAD_OP)
    d = _check_blocks(_VALUE_GRAD_OP, weights, biases, weight_offsets, bias_offsets, None)
    return x.new_empty((), dtype=torch.float64), x.new_empty(d if with_gradient else 0)


def _fake_state(x, target, weights, biases, activations, label_smoothing, ignore_index, check_finite):
    _check_model_inputs(x, target, weights, biases, activations, label_smoothing)
    n, codes = x.shape[0], [_CODE_NAMES[c] for c in activations]
    inputs = [x.new_empty((n, w.shape[1])) for w in weights[1:]]
    grads = [x.new_empty((n, w.shape[0])) for w in weights]
    firsts = [x.new_empty((n, w.shape[0]) if a != "identity" else (0,)) for w, a in zip(weights, codes)]
    seconds = [x.new_empty((n, w.shape[0]) if a not in ("identity", "relu") else (0,)) for w, a in zip(weights, codes)]
    return [*inputs, *grads, *firsts, *seconds, x.new_empty((n, weights[-1].shape[0])), x.new_empty((n, weights[-1].shape[0]))]


def _fake_flat_cached(x, state, weights, biases, activations, V, weight_offsets, bias_offsets, check_finite):
    _check_cached_args(x, state, weights, biases, [_CODE_NAMES[c] for c in activations], V, weight_offsets,
                       bias_offsets)
    return V.new_empty((V.shape[1], V.shape[0])).T


_CODE_NAMES = {code: name for name, code in ACTIVATIONS.items()}

if _extension.extension_loaded():
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}")(_fake)
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}_flat")(_fake_flat)
    torch.library.register_fake(f"{_CPP_OPS}::{_VALUE_GRAD_OP}")(_fake_value_grad_flat)
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}_state")(_fake_state)
    torch.library.register_fake(f"{_CPP_OPS}::{_OP}_flat_cached")(_fake_flat_cached)
