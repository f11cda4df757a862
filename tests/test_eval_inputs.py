"""Bad input to the evaluation layer (metrics, MIA, cost): a clear error naming the argument and the
problem, the caller's model left as it was, valid input's results unchanged."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_kernels.data import LabeledData
from unlearn_kernels.eval import (
    PeakMemory,
    avg_gap,
    gradient_norm,
    measure,
    mia_entropy,
    mia_loss,
    mia_salun_efficacy,
    predict_logits,
    speedup,
    tug_of_war,
    weight_distance,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()


def _data(rng: torch.Generator, n: int = 10) -> LabeledData:
    return LabeledData(torch.randn(n, 4, generator=rng, dtype=torch.float64), torch.randint(0, 3, (n,), generator=rng))


def _unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return (all(m.training for m in model.modules()) and all(p.grad is None and p.requires_grad
                                                             for p in model.parameters())
            and all(torch.equal(state[k], v) for k, v in model.state_dict().items()))


def test_mia_takes_logits_that_require_grad(rng):
    """Logits straight from a forward pass: numpy() refused them ("Can't call numpy() on Tensor that
    requires grad"); the score is the detached logits' one."""
    logits, y = torch.randn(20, 3, generator=rng), torch.randint(0, 3, (20,), generator=rng)
    tracked = logits.clone().requires_grad_()
    assert mia_entropy(tracked, tracked, tracked) == mia_entropy(logits, logits, logits)
    assert mia_loss(tracked, y, tracked, y) == mia_loss(logits, y, logits, y)
    assert mia_salun_efficacy(tracked, y, tracked, y, tracked, y) == mia_salun_efficacy(logits, y, logits, y, logits, y)


def test_mia_logits_must_have_the_same_classes(rng):
    """As mia_entropy already did: one model's outputs have one number of classes (a score was returned)."""
    a, b = torch.randn(20, 3, generator=rng), torch.randn(20, 5, generator=rng)
    y = torch.randint(0, 3, (20,), generator=rng)
    with pytest.raises(ValueError, match=r"^mia_loss: the logits must have the same number of classes, got "
                                         r"\{'forget_logits': 3, 'test_logits': 5\}"):
        mia_loss(a, y, b, y)
    with pytest.raises(ValueError, match=r"^mia_salun_efficacy: the logits must have the same number of classes, "
                                         r"got \{'retain_logits': 3, 'test_logits': 5, 'forget_logits': 3\}"):
        mia_salun_efficacy(a, y, b, y, a, y)


def test_summaries_refuse_a_table_or_keys_of_the_wrong_type():
    """Python's own "argument of type 'NoneType' is not iterable" / "object of type 'int' has no len()",
    and a list read as a table without the key."""
    gold = {"mia": 0.2, "acc_forget": 0.7, "acc_retain": 0.9, "acc_test": 0.8}
    with pytest.raises(TypeError, match="^avg_gap: metrics must be a mapping of metric names to values, got NoneType"):
        avg_gap(None, gold)
    with pytest.raises(TypeError, match="^tug_of_war: oracle_metrics must be a mapping of metric names to values, "
                                        "got list"):
        tug_of_war(gold, [0.7, 0.9, 0.8])
    with pytest.raises(TypeError, match="^avg_gap: keys must be a sequence of metric names, got NoneType"):
        avg_gap(gold, gold, keys=None)
    with pytest.raises(TypeError, match="^tug_of_war: keys must be a sequence of metric names, got generator"):
        tug_of_war(gold, gold, keys=(k for k in ("acc_forget",)))
    assert avg_gap(gold, {**gold, "mia": 0.6}, keys={"mia"}) == pytest.approx(0.4)  # a set still does


@pytest.mark.parametrize("seconds, retrain, bad, shown", [
    ("1", 2.0, "seconds", "'1'"),  # TypeError: '>' not supported between instances of 'str' and 'int'
    (None, 2.0, "seconds", "None"),
    (math.inf, math.inf, "seconds", "inf"),  # nan
    (1.0, math.inf, "retrain_seconds", "inf"),  # inf
    (torch.tensor([1.0, 2.0]), 2.0, "seconds", "tensor"),  # Boolean value of Tensor ... is ambiguous
])
def test_speedup_times_must_be_finite_positive_numbers(seconds, retrain, bad, shown):
    with pytest.raises(ValueError, match=rf"^speedup: {bad} must be a finite number > 0.0, got {shown}"):
        speedup(seconds, retrain)


def test_speedup_keeps_its_value():
    assert speedup(2.0, 30.0) == 15.0 and speedup(3, 7) == 7 / 3


@pytest.mark.parametrize("device", ["foo", 3.5, []])
def test_measure_refuses_what_is_not_a_device_name(device):
    """torch's "Expected one of cpu, cuda, ipu, ... device type at start of device string" or its
    "device() received an invalid combination of arguments"; fn is not called."""
    called = []
    shown = re.escape(repr(device))
    with pytest.raises(ValueError, match=f"^measure: device {shown} is not a device name: use cpu, cuda or cuda:N$"):
        measure(lambda: called.append(1), device=device)
    with pytest.raises(ValueError, match=f"^PeakMemory: device {shown} is not a device name"):
        PeakMemory(device)
    assert not called


def test_measure_refuses_a_cuda_device_that_is_not_visible(monkeypatch):
    """torch's "invalid device ordinal" at the first synchronize, inside the block (one GPU simulated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^measure: device 'cuda:3' cannot run here: 1 CUDA device\(s\) visible "
                                         r"\(cuda:0\)$"):
        measure(lambda: None, device="cuda:3")


def test_model_helpers_name_an_index_error_of_the_model():
    """A token id beyond an embedding's rows: torch's bare "IndexError: index out of range in self"."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten())
    data = LabeledData(torch.tensor([[1], [7]]), torch.tensor([0, 1]))
    for op, call in (("predict_logits", lambda: predict_logits(model, data)),
                     ("gradient_norm", lambda: gradient_norm(model, F.cross_entropy, data))):
        with pytest.raises(ValueError, match=f"^{op}: the model cannot run on the data: index out of range"):
            call()


def test_gradient_norm_and_predict_logits_refuse_non_finite_weights(rng):
    """gradient_norm returned nan; predict_logits returned NaN logits (the metrics then said only
    "logits contains NaN or Inf"). Both name the tensor now, by the one rule for weights."""
    model = _model().train()
    with torch.no_grad():
        model[3].bias[1] = math.nan
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^gradient_norm: the model's parameter '3.bias' has NaN or Inf values"):
        gradient_norm(model, F.cross_entropy, _data(rng))
    with pytest.raises(ValueError, match=r"^predict_logits: the model's parameter '3.bias' has NaN or Inf values"):
        predict_logits(model, _data(rng))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    bn[1].running_var[0] = math.inf
    with pytest.raises(ValueError, match=r"^gradient_norm: the model's buffer '1.running_var' has NaN or Inf"):
        gradient_norm(bn, F.cross_entropy, _data(rng))
    with pytest.raises(ValueError, match=r"^predict_logits: the model's buffer '1.running_var' has NaN or Inf"):
        predict_logits(bn, _data(rng))
    assert all(torch.equal(state[k], v) or (k == "3.bias") for k, v in model.state_dict().items())
    mask = nn.Sequential(nn.Linear(4, 3)).double()
    mask.register_buffer("additive_mask", torch.tensor([0.0, -math.inf]))  # Inf in another buffer: allowed
    assert predict_logits(mask, _data(rng)).isfinite().all()


@pytest.mark.parametrize("loss_fn, message", [
    # autograd's "element 0 of tensors does not require grad and does not have a grad_fn"
    (lambda z, y: F.cross_entropy(z.detach(), y), "loss_fn's result does not require grad"),
    # the same autograd error
    (lambda z, y: torch.tensor(1), "loss_fn must return a real floating-point scalar, got torch.int64"),
    # "grad can be implicitly created only for real scalar outputs but got torch.complex128"
    (lambda z, y: F.cross_entropy(z, y) * (1 + 1j), "loss_fn must return a real floating-point scalar, got "
                                                    "torch.complex128"),
    # returned nan
    (lambda z, y: F.cross_entropy(z, y) * math.nan, r"loss_fn returned nan on rows \[0, 8\)"),
    # returned inf
    (lambda z, y: F.cross_entropy(z, y) - math.inf, r"loss_fn returned -inf on rows \[0, 8\)"),
])
def test_gradient_norm_checks_what_loss_fn_returns(rng, loss_fn, message):
    model = _model().train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"^gradient_norm: {message}"):
        gradient_norm(model, loss_fn, _data(rng, 10), batch_size=8)
    assert _unchanged(model, state)


def test_gradient_norm_refuses_a_non_finite_gradient(rng):
    """Finite weights and loss, a NaN gradient (sqrt's derivative at 0, times 0): it returned nan."""

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x @ self.w, self.w.square().sum().sqrt().expand(len(x))], dim=1)

    with pytest.raises(ValueError, match=r"^gradient_norm: the gradient holds NaN or Inf \(norm nan\)"):
        gradient_norm(Norm(), F.cross_entropy, LabeledData(torch.randn(6, 4, dtype=torch.float64, generator=rng),
                                                           torch.zeros(6, dtype=torch.long)))


def test_gradient_norm_keeps_its_value(rng):
    model, data = _model(), _data(rng, 13)
    expected = 0.0
    reference = copy.deepcopy(model).eval()
    grads = torch.autograd.grad(F.cross_entropy(reference(data.x), data.y), list(reference.parameters()))
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert gradient_norm(model, F.cross_entropy, data, batch_size=13) == pytest.approx(expected, rel=1e-12)


def test_weight_distance_refuses_non_finite_weights():
    """It returned nan (or inf)."""
    a, b = _model(), _model()
    with torch.no_grad():
        b[0].weight[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"^weight_distance: model_b's parameter '0.weight' has NaN or Inf values"):
        weight_distance(a, b)
    with torch.no_grad():
        b[0].weight[1, 2] = a[0].weight[1, 2] + 3.0
    assert weight_distance(a, b) == 3.0


def test_model_helpers_refuse_a_model_or_inputs_on_the_meta_device(rng):
    """torch's "Tensor.item() cannot be called on meta tensors" came from deep inside the finiteness checks; the
    metrics of logits named it already (check_has_values), the model helpers now do too."""
    data, meta = _data(rng), _model().to("meta")
    on_meta = LabeledData(data.x.to("meta"), data.y.to("meta"))
    for call, owner in ((lambda m, d: predict_logits(m, d), "predict_logits"),
                        (lambda m, d: gradient_norm(m, F.cross_entropy, d), "gradient_norm")):
        with pytest.raises(ValueError, match=rf"^{owner}: the model's parameter '0.weight' is on the meta device"):
            call(meta, data)
        with pytest.raises(ValueError, match=rf"^{owner}: data's inputs x is on the meta device"):
            call(_model(), on_meta)
    with pytest.raises(ValueError, match=r"^weight_distance: model_a: the model's parameter '0.weight' is on the "
                                         r"meta device"):
        weight_distance(meta, _model())
