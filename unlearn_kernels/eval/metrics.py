"""Evaluation metrics of unlearning (defined in docs/methods.md, "Metrics").

Most metrics are pure functions of logits (N x C) and integer labels (N,); :func:`predict_logits`
and the few model-level helpers turn a model and data into those tensors. Every value is computed in
float64 and returned as a Python float. Logarithms are natural (a Jensen-Shannon divergence is at
most ln 2). Logits must be finite: NaN or Inf raises ``ValueError``, as do empty sets and mismatched
shapes.

Accuracies and MIA scores are fractions in [0, 1] (not percentages) throughout.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from ..checks import (
    all_finite,
    as_int64,
    check_choice,
    check_finite_inputs,
    check_finite_model,
    check_has_values,
    check_int,
    check_module,
    check_not_meta,
    check_number,
    check_tensor,
    first_nonfinite_weight,
    is_out_of_memory,
)
from ..labeled import LabeledData
from ..training import check_data, eval_mode, join_last_row, model_device

#: the keys :func:`avg_gap` compares by default, as the study's records name them (the entropy MIA)
AVG_GAP_KEYS = ("mia_entropy", "acc_forget", "acc_retain", "acc_test")
#: the accuracies :func:`tug_of_war` multiplies
TOW_KEYS = ("acc_forget", "acc_retain", "acc_test")


# --------------------------------------------------------------------------- validation
def check_logits(name: str, logits: torch.Tensor) -> None:
    """A non-empty, finite, floating-point (N, C) tensor with values (not on the meta device)."""
    check_has_values(name, check_tensor(name, logits))
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(logits.shape)})")
    if not all_finite(logits):
        raise ValueError(f"{name} contains NaN or Inf")


def check_labels(name: str, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels, one per row of ``logits``, each a valid class index; returned as int64 (labels of
    any integer dtype are the ids they hold, as the data protocols read them: see
    :func:`~unlearn_kernels.checks.as_int64`), which the caller computes with."""
    check_has_values(name, check_tensor(name, labels))
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{name} has {labels.shape[0]} labels but the logits have {logits.shape[0]} rows")
    labels = as_int64(name, labels)  # first: torch compares no uint16/32/64 tensor on the CPU
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"{name} has labels outside [0, {logits.shape[1]}) (the number of classes)")
    return labels


def _check_pair(p_name: str, p_logits: torch.Tensor, q_name: str, q_logits: torch.Tensor) -> None:
    check_logits(p_name, p_logits)
    check_logits(q_name, q_logits)
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"{p_name} and {q_name} must have the same shape, got {tuple(p_logits.shape)} and {tuple(q_logits.shape)}"
        )


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=1)


def _js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row JS(p || q) of probability rows (float64), natural log; 0 log 0 = 0."""
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)  # rounding can make it -1e-17


def _js_lotus_probs(p: torch.Tensor, q: torch.Tensor, scale: float, eps: float) -> float:
    """The LoTUS-compatible JS of two probability matrices (see :func:`js_divergence_lotus`)."""
    p = p.double().clamp(eps, 1.0)
    q = q.double().clamp(eps, 1.0)
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)
    n = p.shape[0]
    # torch.nn.functional.kl_div(log x, m, reduction="batchmean") = sum m (log m - log x) / N
    kl_mp = (m * (m.log() - p.log())).sum() / n
    kl_mq = (m * (m.log() - q.log())).sum() / n
    return float(scale * 0.5 * (kl_mp + kl_mq))


# --------------------------------------------------------------------------- model helpers
def _check_model_data(op: str, model: nn.Module, data: LabeledData, batch_size: int) -> None:
    check_module(f"{op}: model", model)
    check_data(op, data)
    if len(data) == 0:
        raise ValueError(f"{op}: data is empty")
    check_int(f"{op}: batch_size", batch_size)
    # on the meta device: torch's "Tensor.item() cannot be called on meta tensors" at the first value read
    check_has_values(f"{op}: data's inputs x", data.x)
    check_not_meta(op, model)
    check_finite_inputs(op, "data", data.x)  # would silently give NaN logits / a NaN norm
    check_finite_model(op, model)  # the logits (and a loss or norm from them) would be NaN


@contextmanager
def _model_errors(op: str) -> Iterator[None]:
    """Torch's own error from running the model inside the block (wrong input width or dtype, a token
    id beyond an embedding's rows: an IndexError) re-raised as a ValueError naming ``op``."""
    try:
        yield
    except (RuntimeError, IndexError) as err:
        if is_out_of_memory(err):
            raise  # not the data's fault: callers may retry with a smaller batch_size
        raise ValueError(f"{op}: the model cannot run on the data: {err}") from err


def _batch_bounds(op: str, model: nn.Module, data: LabeledData, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) rows of each batch of an eval-mode pass over ``data``: ``batch_size`` rows each, a
    last batch of one row joined to the one before it where a batch-norm layer without running
    statistics could not take it (:func:`~unlearn_kernels.training.join_last_row`, which refuses a set
    of one row, or ``batch_size`` 1, for such a layer). Every other model keeps the plain batches."""
    with _model_errors(op):  # the probe runs one row through the model
        join = join_last_row(op, model, data, batch_size, "data", training=False)
    stops = [*range(batch_size, len(data), batch_size), len(data)]
    if join:
        del stops[-2]
    return list(zip([0, *stops[:-1]], stops))


def _forward(op: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, which must be (batch, C) logits; torch's own error (wrong input width or dtype)
    is re-raised naming ``op``."""
    with _model_errors(op):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TypeError(f"{op}: the model must return (batch, C) logits, got {type(out).__name__}"
                        + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""))
    return out


def predict_logits(model: nn.Module, data: LabeledData, batch_size: int = 1024) -> torch.Tensor:
    """The model's logits on ``data``, shape (N, C), computed in batches in eval mode without grad.

    Inputs are moved to the model's device (that of its first parameter or buffer) and the logits
    stay there. The model is not modified: its train/eval flags (per submodule) are restored and no
    gradient is recorded. A batch-norm layer without running statistics (``track_running_stats=False``)
    normalises with the batch's statistics in eval mode too, so such a model's logits depend on the
    batches: a last batch of one row, which it cannot take, joins the one before it (see
    :func:`~unlearn_kernels.training.join_last_row`; a set of one row is refused for it).

    Raises:
        TypeError: ``model`` is not a module, ``data`` not a :class:`LabeledData`, or the model does
            not return (batch, C) logits.
        ValueError: an empty set, a bad ``batch_size``, inputs or a model on the meta device, NaN or Inf
            in the inputs, a weight that the rule of
            :func:`~unlearn_kernels.checks.first_nonfinite_weight` refuses (NaN or Inf in a
            parameter or a normalisation layer's running statistic, NaN in another buffer: the logits
            would be NaN), or samples the model cannot run on (torch's error from the forward pass: a
            wrong width or dtype, a token id beyond an embedding's rows), each naming ``predict_logits``.
    """
    _check_model_data("predict_logits", model, data, batch_size)
    device = model_device(model)
    outputs = []
    bounds = _batch_bounds("predict_logits", model, data, batch_size)
    with eval_mode(model), torch.no_grad():
        for start, stop in bounds:
            # copies: a model that writes its input in place would write the caller's data
            outputs.append(_forward("predict_logits", model, data.x[start:stop].to(device, copy=True)))
    return torch.cat(outputs)


def gradient_norm(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: LabeledData,
    batch_size: int = 1024,
) -> float:
    """||grad_w L(w)||_2 with L(w) = (1/N) sum_i loss(f_w(x_i), y_i) the mean loss over ``data``.

    The Newton residual (docs/methods.md) when ``data`` is D_r. ``loss_fn(logits, y)`` must
    return the *mean* loss over its batch (like ``torch.nn.functional.cross_entropy``); batches are
    re-weighted by their size so that the result is the full-data mean whatever ``batch_size`` is.
    The gradient is taken over the parameters with ``requires_grad`` in eval mode (BatchNorm uses
    running statistics, dropout is off; one without them takes the batch's, and a last batch of one
    row joins the one before it as in :func:`predict_logits`), accumulated in float64. The model is not
    modified: no ``.grad`` is written and the train/eval flags are restored.

    Raises:
        TypeError: ``model`` is not a module, ``data`` not a :class:`LabeledData`, ``loss_fn`` not callable.
        ValueError: an empty set, a bad ``batch_size``, inputs or a model on the meta device, NaN or Inf
            in the inputs, a parameter or a normalisation layer's running statistic that holds NaN or
            Inf (the norm would be NaN), no
            parameter that requires grad, samples the model cannot run on, labels outside the model's
            classes, a ``loss_fn`` result that is not a real floating-point scalar, does not depend on
            the parameters or is NaN or Inf, or a gradient that holds NaN or Inf.
    """
    _check_model_data("gradient_norm", model, data, batch_size)
    if not callable(loss_fn):
        raise TypeError(f"gradient_norm: loss_fn must be callable (e.g. torch.nn.functional.cross_entropy), "
                        f"got {type(loss_fn).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("gradient_norm: the model has no parameters that require grad")
    device = model_device(model)
    total = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    n = len(data)
    bounds = _batch_bounds("gradient_norm", model, data, batch_size)
    with eval_mode(model), torch.enable_grad():
        for start, stop in bounds:
            x = data.x[start:stop].to(device, copy=True)  # as in predict_logits
            y = data.y[start:stop].to(device)
            logits = _forward("gradient_norm", model, x)
            # before loss_fn: on CUDA a bad class is a device assert
            y = check_labels("gradient_norm: data.y", y, logits)
            loss = loss_fn(logits, y)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("gradient_norm: loss_fn must return a scalar tensor (the batch mean)")
            if not loss.is_floating_point():  # autograd's own error: "grad can be implicitly created only for..."
                raise ValueError(f"gradient_norm: loss_fn must return a real floating-point scalar, got {loss.dtype}")
            if not loss.requires_grad:  # autograd's own error: "element 0 of tensors does not require grad"
                raise ValueError("gradient_norm: loss_fn's result does not require grad, so it does not depend on the "
                                 "model's parameters (was it computed from detached logits, or under torch.no_grad?)")
            if not all_finite(loss):  # the norm would be NaN or Inf
                raise ValueError(f"gradient_norm: loss_fn returned {float(loss.detach())} on rows [{start}, {stop})")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g.double(), alpha=y.shape[0] / n)
    norm = math.sqrt(sum(float(acc.square().sum()) for acc in total))
    if not math.isfinite(norm):  # finite weights and loss, a NaN gradient: e.g. a sqrt at 0 in the model
        raise ValueError(f"gradient_norm: the gradient holds NaN or Inf (norm {norm})")
    return norm


def weight_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """||w_a - w_b||_2: the L2 norm over all parameters (``named_parameters``, buffers such as
    BatchNorm statistics excluded) of the difference, in float64.

    Both models must have the same parameter names and shapes (e.g. f_un and f_gold of one
    architecture); otherwise ``ValueError``.

    Raises:
        TypeError: either model is not a torch.nn.Module.
        ValueError: different parameter names or shapes, no parameters, a model on the meta device, or a
            parameter that holds NaN or Inf (the distance would be NaN or Inf).
    """
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        check_module(f"weight_distance: {name}", model)
        check_not_meta(f"weight_distance: {name}", model)
    params_a = dict(model_a.named_parameters())
    params_b = dict(model_b.named_parameters())
    if params_a.keys() != params_b.keys():
        diff = sorted(params_a.keys() ^ params_b.keys())
        raise ValueError(f"weight_distance: the models have different parameters: {diff[:5]}")
    if not params_a:
        raise ValueError("weight_distance: the models have no parameters")
    total = 0.0
    with torch.no_grad():
        for name, a in params_a.items():
            b = params_b[name]
            if a.shape != b.shape:
                raise ValueError(
                    f"weight_distance: parameter {name!r} has shape {tuple(a.shape)} in model_a "
                    f"but {tuple(b.shape)} in model_b"
                )
        for label, params in (("model_a", params_a), ("model_b", params_b)):  # the distance would be NaN or Inf
            bad = first_nonfinite_weight(params.items(), (), ())
            if bad is not None:
                raise ValueError(f"weight_distance: {label}'s parameter {bad[1]!r} has NaN or Inf values "
                                 "(did an update diverge?)")
        for name, a in params_a.items():
            total += float((a.double() - params_b[name].to(a.device).double()).square().sum())
    return math.sqrt(total)


# --------------------------------------------------------------------------- logit metrics
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Acc = (1/N) #{i : argmax_c logits[i, c] == y[i]}, a fraction in [0, 1].

    Ties take the first maximal class (``torch.argmax``). UA (unlearning accuracy) = 1 - Acc on D_f.
    """
    check_logits("accuracy: logits", logits)
    y = check_labels("accuracy: y", y, logits)
    return float((logits.argmax(dim=1) == y.to(logits.device)).double().mean())


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """(1/N) sum_i KL(p_i || q_i) with p_i = softmax(p_logits[i]), q_i = softmax(q_logits[i]),
    KL(p || q) = sum_c p_c (ln p_c - ln q_c). Not symmetric; 0 iff the distributions agree."""
    _check_pair("kl_divergence: p_logits", p_logits, "q_logits", q_logits)
    log_p = torch.log_softmax(p_logits.double(), dim=1)
    log_q = torch.log_softmax(q_logits.double().to(p_logits.device), dim=1)
    p = log_p.exp()
    # 0 ln(0 / q) = 0: a class of probability 0 in p adds nothing, also where ln q is -inf (logits far apart
    # enough that the softmax underflows; 0 * inf was NaN); ln q = -inf where p > 0 gives KL = inf
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=1).clamp_min(0.0)
    return float(kl.mean())


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """The standard Jensen-Shannon divergence, per sample, averaged over samples:
    (1/N) sum_i JS(p_i || q_i), JS(p || q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2,
    p_i, q_i the softmax of row i, natural log (so 0 <= JS <= ln 2). Symmetric.

    Equals the square of ``scipy.spatial.distance.jensenshannon`` averaged over rows. This is the
    default JS of the package (to f_gold on D_f); see :func:`js_divergence_lotus` for the variant
    behind the numbers in the LoTUS tables.
    """
    _check_pair("js_divergence: p_logits", p_logits, "q_logits", q_logits)
    return float(_js_rows(_probs(p_logits), _probs(q_logits.to(p_logits.device))).mean())


def js_divergence_lotus(
    p_logits: torch.Tensor, q_logits: torch.Tensor, scale: float = 1e4, eps: float = 1e-8
) -> float:
    """The "LoTUS-compatible" JS: the formula of the LoTUS code (Spartalis et al., CVPR 2025),
    which is not the standard JS, so that numbers can be compared with their tables.

    With P = softmax(p_logits), Q = softmax(q_logits) (N x C):

    1. clamp every entry to [eps, 1] (eps = 1e-8);
    2. divide the *whole matrix* by its global sum: P' = P / sum_ic P_ic, Q' likewise (each row
       then sums to about 1/N, not 1);
    3. M = (P' + Q') / 2;
    4. KL in the reversed direction with batch-mean reduction (``F.kl_div(P'.log(), M,
       reduction="batchmean")``): KL_b(M || P') = (1/N) sum_ic M_ic (ln M_ic - ln P'_ic);
    5. value = scale * 1/2 [KL_b(M || P') + KL_b(M || Q')], with scale = 1e4 by default (the factor
       the LoTUS tables report; use scale=1 for the raw value).

    When the clamp is inactive this is scale * (1/N) mean_i [1/2 KL(m_i || p_i) + 1/2 KL(m_i || q_i)]
    with m_i = (p_i + q_i)/2: the reversed KL and an extra 1/N, so it shrinks with N. Symmetric,
    0 for identical inputs.
    """
    _check_pair("js_divergence_lotus: p_logits", p_logits, "q_logits", q_logits)
    check_number("js_divergence_lotus: scale", scale, 0.0, strict=True)
    check_number("js_divergence_lotus: eps", eps, 0.0, 1.0, strict=True, strict_high=True)
    return _js_lotus_probs(_probs(p_logits), _probs(q_logits.to(p_logits.device)), scale, eps)


def activation_distance(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """(1/N) sum_i || softmax(logits_a[i]) - softmax(logits_b[i]) ||_2: the mean L2 distance between
    the two models' output distributions on the same samples (in [0, sqrt 2]). Symmetric."""
    _check_pair("activation_distance: logits_a", logits_a, "logits_b", logits_b)
    diff = _probs(logits_a) - _probs(logits_b.to(logits_a.device))
    return float(diff.norm(dim=1).mean())


def _class_mean_probs(logits: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    mean = _probs(logits[y == c]).mean(dim=0)
    return mean / mean.sum()  # the L1 normalisation of the definition (a no-op up to rounding)


def rf_jsd(
    unlearned_forget_logits: torch.Tensor,
    forget_y: torch.Tensor,
    original_unseen_logits: torch.Tensor,
    unseen_y: torch.Tensor,
    *,
    variant: Literal["standard", "lotus"] = "standard",
    lotus_scale: float = 1e4,
) -> float:
    """RF-JSD, the retrain-free Jensen-Shannon divergence of LoTUS (optimum 0, no f_gold needed).

    For each class c present in D_f (k classes): P_c = L1-normalised mean softmax of f_un over the
    D_f samples of class c (``unlearned_forget_logits``), Q_c = the same for f_orig over the unseen
    samples D_u of class c (``original_unseen_logits``).

    * ``variant="standard"`` (default): RF-JSD = (1/k) sum_c JS(P_c || Q_c), standard JS, natural log.
    * ``variant="lotus"``: the value of the LoTUS code: :func:`js_divergence_lotus`'s formula applied
      to the k x C matrices [P_c] and [Q_c] (classes in increasing order), times ``lotus_scale``.

    Classes of D_u absent from D_f are ignored. A class of D_f with no unseen sample raises
    ``ValueError`` (Q_c would be undefined).
    """
    check_logits("rf_jsd: unlearned_forget_logits", unlearned_forget_logits)
    forget_y = check_labels("rf_jsd: forget_y", forget_y, unlearned_forget_logits)
    check_logits("rf_jsd: original_unseen_logits", original_unseen_logits)
    unseen_y = check_labels("rf_jsd: unseen_y", unseen_y, original_unseen_logits)
    if unlearned_forget_logits.shape[1] != original_unseen_logits.shape[1]:
        raise ValueError(
            f"rf_jsd: the forget logits have {unlearned_forget_logits.shape[1]} classes but the unseen "
            f"logits {original_unseen_logits.shape[1]}"
        )
    check_choice("rf_jsd: variant", variant, ("standard", "lotus"))
    forget_y = forget_y.to(unlearned_forget_logits.device)
    unseen_y = unseen_y.to(original_unseen_logits.device)
    classes = torch.unique(forget_y).tolist()
    missing = sorted(set(classes) - set(torch.unique(unseen_y).tolist()))
    if missing:
        raise ValueError(f"rf_jsd: classes {missing} of the forget set have no unseen samples")
    p = torch.stack([_class_mean_probs(unlearned_forget_logits, forget_y, c) for c in classes])
    q = torch.stack([_class_mean_probs(original_unseen_logits, unseen_y, c) for c in classes]).to(p.device)
    if variant == "lotus":
        lotus_scale = check_number("rf_jsd: lotus_scale", lotus_scale, 0.0, strict=True)
        return _js_lotus_probs(p, q, lotus_scale, 1e-8)
    return float(_js_rows(p, q).mean())


# --------------------------------------------------------------------------- summaries
def _deltas(op: str, metrics: Mapping[str, float], oracle: Mapping[str, float], keys: Sequence[str]) -> list[float]:
    if isinstance(keys, str):  # else its characters would be taken as the keys
        raise TypeError(f"{op}: keys must be a sequence of metric names, got the string {keys!r}")
    if not isinstance(keys, Collection):  # None, a number, a generator (read twice by tug_of_war)
        raise TypeError(f"{op}: keys must be a sequence of metric names, got {type(keys).__name__}")
    for name, table in (("metrics", metrics), ("oracle_metrics", oracle)):
        if not hasattr(table, "keys"):  # a list or None: "metrics has no 'mia'", or Python's "not iterable"
            raise TypeError(f"{op}: {name} must be a mapping of metric names to values, got {type(table).__name__}")
    if len(keys) == 0:
        raise ValueError(f"{op}: keys is empty")
    deltas = []
    for key in keys:
        for name, table in (("metrics", metrics), ("oracle_metrics", oracle)):
            if key not in table:
                raise ValueError(f"{op}: {name} has no {key!r}")
            check_number(f"{op}: {name}[{key!r}]", table[key])
        deltas.append(abs(float(metrics[key]) - float(oracle[key])))
    return deltas


def avg_gap(
    metrics: Mapping[str, float], oracle_metrics: Mapping[str, float], keys: Sequence[str] = AVG_GAP_KEYS
) -> float:
    """Avg Gap = (1/|keys|) sum_k |metrics[k] - oracle_metrics[k]|, against the retrain oracle f_gold.

    The default keys (:data:`AVG_GAP_KEYS`) are the entropy MIA, Acc_f, Acc_r, Acc_test under the names of
    the study's records (``mia_entropy``, ``acc_forget``, ``acc_retain``, ``acc_test``), in the units given
    (fractions there; the literature reports them in percent, i.e. 100 x this value). Another MIA convention:
    name its key in ``keys``.

    Raises:
        TypeError: ``metrics`` or ``oracle_metrics`` is not a mapping, or ``keys`` is a string or not a
            collection of names.
        ValueError: ``keys`` is empty, or a key is missing or its value is not a finite number.
    """
    deltas = _deltas("avg_gap", metrics, oracle_metrics, keys)
    return sum(deltas) / len(deltas)


def tug_of_war(
    metrics: Mapping[str, float], oracle_metrics: Mapping[str, float], keys: Sequence[str] = TOW_KEYS
) -> float:
    """ToW = prod_{k in (acc_forget, acc_retain, acc_test)} (1 - |metrics[k] - oracle_metrics[k]|).

    Accuracies must be fractions in [0, 1] (``ValueError`` otherwise, to catch percentages); ToW is
    in [0, 1], 1 when f_un matches the oracle on all three.

    Raises:
        TypeError: as :func:`avg_gap`.
        ValueError: as :func:`avg_gap`, or a value outside [0, 1].
    """
    deltas = _deltas("tug_of_war", metrics, oracle_metrics, keys)  # first: every value is a finite number
    for name, table in (("metrics", metrics), ("oracle_metrics", oracle_metrics)):
        for key in keys:
            if not 0.0 <= float(table[key]) <= 1.0:
                raise ValueError(f"tug_of_war: {name}[{key!r}] = {table[key]} is not a fraction in [0, 1]")
    return math.prod(1.0 - d for d in deltas)
