"""The weight-decayed objective (curvature.Objective), its Hessian as an operator
(curvature.RegularizedOperator) and the shared argument checks, against float64 autograd."""
import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_kernels.checks import (
    all_finite,
    check_choice,
    check_int,
    check_number,
    check_tensor,
    first_nonfinite_weight,
    norm64,
)
from unlearn_kernels.curvature import (
    Objective,
    RegularizedOperator,
    get_flat_parameters,
    ggn_operator,
    hessian_operator,
    set_flat_parameters,
)
from unlearn_kernels.data import LabeledData
from unlearn_kernels.methods import CureNewton
from unlearn_kernels.curvature.base import PROBE_GRADIENTS

WD = 0.03


@pytest.fixture
def problem(rng):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 5, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=rng)
    return model, x, y


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None):
    """F and grad F by autograd on the flat vector of the named parameters (all by default)."""
    named = dict(model.named_parameters())
    names = list(names or named)
    shapes = [named[n].shape for n in names]
    w = torch.cat([named[n].detach().reshape(-1) for n in names]).requires_grad_()

    def f(v):
        parts = torch.split(v, [math.prod(s) for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        out = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(out, y) + WD / 2 * v.square().sum()

    value = f(w)
    (grad,) = torch.autograd.grad(value, w)
    return float(value), grad, torch.autograd.functional.hessian(f, w.detach())


def test_value_and_gradient_match_autograd(problem):
    model, x, y = problem
    value, grad, _ = reference(model, x, y)
    whole = Objective(model, F.cross_entropy, (x, y), weight_decay=WD)
    chunked = Objective(model, F.cross_entropy, (x, y), weight_decay=WD, batch_size=7)  # uneven batches
    for objective in (whole, chunked):
        assert objective.value() == pytest.approx(value, rel=1e-12)
        assert torch.allclose(objective.gradient(), grad, rtol=1e-12, atol=1e-12)
        v, g = objective.value_and_gradient()
        assert v == pytest.approx(value, rel=1e-12) and torch.allclose(g, grad, rtol=1e-12, atol=1e-12)
    assert whole.num_data_passes == 3
    assert all(p.grad is None for p in model.parameters())  # no .grad written into the model


def test_reads_the_weights_live_and_takes_named_frozen_parameters(problem):
    model, x, y = problem
    model[2].weight.requires_grad_(False)  # frozen, but may be named explicitly
    names = ["2.weight", "2.bias"]
    objective = Objective(model, F.cross_entropy, (x, y), names, weight_decay=WD)
    w = get_flat_parameters(model, names)
    set_flat_parameters(model, w + 0.1, names)
    value, grad, _ = reference(model, x, y, names)
    assert objective.value() == pytest.approx(value, rel=1e-12)
    assert torch.allclose(objective.gradient(), grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(objective.weights(), w + 0.1)


def test_follows_parameters_replaced_in_the_model(problem):
    """load_state_dict(assign=True) puts new parameter objects into the model: the objective (and its
    weight decay) reads those."""
    model, x, y = problem
    objective = Objective(model, F.cross_entropy, (x, y), weight_decay=WD)
    model.load_state_dict({k: v * 0.7 for k, v in model.state_dict().items()}, assign=True)
    value, grad, _ = reference(model, x, y)
    assert objective.value() == pytest.approx(value, rel=1e-12)
    v, g = objective.value_and_gradient()
    assert v == pytest.approx(value, rel=1e-12) and torch.allclose(g, grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(objective.weights(), get_flat_parameters(model))


def test_regularized_operator_is_the_hessian_of_the_objective(problem):
    model, x, y = problem
    _, _, H = reference(model, x, y)
    op = hessian_operator(model, F.cross_entropy, (x, y), path="generic")
    reg = RegularizedOperator(op, WD)
    assert reg.shape == op.shape and reg.path == "generic"
    d = op.shape[0]
    V = torch.randn(d, 3, dtype=torch.float64)
    before = op.num_products
    assert torch.allclose(reg.matmat(V), H @ V, rtol=1e-10, atol=1e-10)
    assert torch.allclose(reg.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-10)
    assert reg.num_products == op.num_products == before + 4  # counted by the wrapped operator
    assert torch.allclose(reg.to_dense(), H, rtol=1e-10, atol=1e-10)
    sp = reg.to_scipy()
    assert np.allclose(sp.matvec(V[:, 1].numpy()), (H @ V[:, 1]).numpy(), rtol=1e-10, atol=1e-10)
    assert torch.equal(RegularizedOperator(op, 0.0).matvec(V[:, 0]), op.matvec(V[:, 0]))
    # a vector that requires grad: the shift's term is added detached, as C's products are (it was on v's graph)
    leaf = V.clone().requires_grad_()
    for out, plain in ((reg.matvec(leaf[:, 0]), reg.matvec(V[:, 0])), (reg.matmat(leaf), reg.matmat(V))):
        assert out.grad_fn is None and not out.requires_grad and torch.equal(out, plain)


def test_bad_input(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="weight_decay"):
        Objective(model, F.cross_entropy, (x, y), weight_decay=-1.0)
    with pytest.raises(TypeError, match="loss_fn"):
        Objective(model, "ce", (x, y))
    with pytest.raises(ValueError, match="scalar"):
        Objective(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y)).value()
    with pytest.raises(ValueError, match="empty"):
        Objective(model, F.cross_entropy, []).gradient()
    op = hessian_operator(model, F.cross_entropy, (x, y), path="generic")
    with pytest.raises(TypeError, match="CurvatureOperator"):
        RegularizedOperator(torch.eye(3), 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        RegularizedOperator(op, math.nan)
    # a shift the operator's dtype cannot hold: matvec raised torch's bare overflow, to_dense gave Inf
    op32 = hessian_operator(copy.deepcopy(model).float(), F.cross_entropy, (x.float(), y), path="generic")
    with pytest.raises(ValueError, match=r"^RegularizedOperator: weight_decay 1e\+39 overflows the operator's "
                                         r"torch.float32"):
        RegularizedOperator(op32, 1e39)
    assert RegularizedOperator(op, 1e39).weight_decay == 1e39  # float64 holds it


def test_checks():
    assert check_int("k", 3) == 3 and check_int("k", 0, low=0) == 0
    assert type(check_int("k", np.int64(4))) is int and check_number("x", np.float32(0.5)) == 0.5  # numpy scalars
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            check_int("k", bad)
    assert check_number("x", 2) == 2.0 and check_number("x", -5.0) == -5.0
    for bad, kwargs in ((math.inf, {}), (math.nan, {}), (False, {}), ("1", {}), (0.0, {"low": 0.0, "strict": True}),
                        (-1.0, {"low": 0.0})):
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_number("x", bad, **kwargs)
    # an upper bound, closed or open, and how the message states the interval
    assert check_number("p", 1.0, 0.0, 1.0) == 1.0 and check_number("p", 0.5, 0.0, 1.0, strict=True, strict_high=True) == 0.5
    for bad, kwargs, interval in ((1.0, {"strict_high": True}, r"in \[0, 1\)"), (0.0, {"strict": True}, r"in \(0, 1\]"),
                                  (1.5, {}, r"in \[0, 1\]"), (math.nan, {}, r"in \[0, 1\]")):
        with pytest.raises(ValueError, match=rf"^p must be a finite number {interval}, got"):
            check_number("p", bad, 0.0, 1.0, **kwargs)
    with pytest.raises(ValueError, match=r"^p must be a finite number < 2, got 2"):
        check_number("p", 2, high=2, strict_high=True)
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"^mode must be one of \['a', 'b'\], got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    t = torch.zeros(2)
    assert check_tensor("v", t) is t
    with pytest.raises(TypeError, match="^v must be a torch.Tensor, got list$"):
        check_tensor("v", [0.0, 0.0])
    big = torch.full((4,), 3e38, dtype=torch.float32)  # its float32 norm overflows
    assert norm64(big) == pytest.approx(6e38, rel=1e-6)


class _Sequence(nn.Module):
    """A classifier over (N, 5, 4) sequences around one randomised module in training mode."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 3)
        if kind == "MultiheadAttention":
            self.inner = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
        elif kind == "LSTM":
            self.inner = nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True)
        else:
            self.inner = nn.RReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "MultiheadAttention":
            return self.fc(self.inner(x, x, x)[0].mean(1))
        if self.kind == "LSTM":
            return self.fc(self.inner(x)[0][:, -1])
        return self.fc(self.inner(x).mean(1))


@pytest.mark.parametrize("kind", ["MultiheadAttention", "LSTM", "RReLU"])
def test_randomness_in_training_mode_outside_dropout_modules_is_refused(kind):
    """Attention's and stacked RNNs' own dropout and RReLU's random slopes are no nn.Dropout module: the
    Objective took them in training mode and gave another value and gradient at every call (1.1496 then 1.1616
    with attention). In eval mode, or without dropout, they are accepted."""
    torch.manual_seed(0)
    model = _Sequence(kind).train()
    x, y = torch.randn(16, 5, 4), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match=rf"^Objective: module 'inner' \({kind}\) is in training mode: .* random"):
        Objective(model, F.cross_entropy, (x, y))
    objective = Objective(model.eval(), F.cross_entropy, (x, y))
    assert objective.value() == objective.value()
    if kind != "RReLU":
        model.inner.dropout = 0.0
        Objective(model.train(), F.cross_entropy, (x, y))


class _MonteCarloDropout(nn.Module):
    """Dropout by F.dropout(training=True) in its own forward: random in either mode, and no module
    the training-mode check can name."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.fc = p, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, self.p, training=True))


def test_randomness_no_module_check_sees_is_refused():
    """A custom forward's F.dropout(training=True) made every value and gradient of the Objective another
    draw (the curvature operators refuse it by comparing two gradients): two values on the first batch are
    compared now. The same model without randomness, and a model that writes its inputs (each run gets its
    own copy), are accepted with the values computed by hand."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with pytest.raises(ValueError, match=r"^Objective: two loss evaluations on the same batch differ \(.*\): the "
                                         r"model or loss is random"):
        Objective(_MonteCarloDropout(0.3), F.cross_entropy, (x, y))
    plain = _MonteCarloDropout(0.0)
    assert Objective(plain, F.cross_entropy, (x, y)).value() == pytest.approx(
        float(F.cross_entropy(plain.fc(x), y)), rel=1e-6)
    writes = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3))
    given = x.clone()
    objective = Objective(writes, F.cross_entropy, (given, y))
    assert torch.equal(given, x)
    assert objective.value() == pytest.approx(float(F.cross_entropy(writes[1](x.relu()), y)), rel=1e-6)


def test_refuses_what_the_curvature_operators_refuse(problem):
    """Train-mode BatchNorm/dropout (the gradient once wrote BatchNorm's running statistics), a BatchNorm
    without running statistics, labels
    out of range and data the model cannot run on get the curvature operators' messages, not torch's."""
    model, x, y = problem
    batchnorm = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    dropout = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    before = copy.deepcopy(batchnorm.state_dict())
    for net, kind in ((batchnorm, "BatchNorm1d"), (dropout, "Dropout")):
        message = rf"module '1' \({kind}\) is in training mode"
        with pytest.raises(ValueError, match=f"^Objective: {message}"):
            Objective(net, F.cross_entropy, (x, y))
        with pytest.raises(ValueError, match=f"^{message}"):
            hessian_operator(net, F.cross_entropy, (x, y), path="generic")
    assert all(torch.equal(v, before[k]) for k, v in batchnorm.state_dict().items())
    Objective(batchnorm.eval(), F.cross_entropy, (x, y)).gradient()
    assert all(torch.equal(v, before[k]) for k, v in batchnorm.state_dict().items())

    # a BatchNorm without running statistics uses the batch's statistics in eval mode too: the loss of a
    # row depended silently on the rows batched with it (and a batch of one row failed in torch)
    no_stats = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3))
    no_stats = no_stats.double().eval()
    message = (r"the model's batch-norm layer '1' has no running statistics \(track_running_stats=False\) and "
               r"normalises with each batch's own, in eval mode too: the loss and its curvature would depend on how")
    with pytest.raises(ValueError, match=f"^Objective: {message}"):
        Objective(no_stats, F.cross_entropy, (x, y))
    for path in ("generic", "ggn"):
        with pytest.raises(ValueError, match=f"^{message}"):
            (ggn_operator if path == "ggn" else hessian_operator)(no_stats, F.cross_entropy, (x, y))

    def out_of_range(row, label):
        return (rf"^Objective: label y\[{row}\] = {label} \(rows counted within the batch\) is out of range for the "
                r"model's 3 classes \(and is not ignore_index=-100\)$")

    y_bad = y.clone()
    y_bad[[5, 9]] = torch.tensor([3, -2])
    with pytest.raises(ValueError, match=out_of_range(5, 3)):
        Objective(model, F.cross_entropy, (x, y_bad))
    # the first batch is fine; autograd meets row 5 as row 1 of the second batch, the compiled pass (which takes
    # tensor data in one call on the CPU) as row 5
    for path, row in (("generic", 1), ("auto", 5)):
        later = Objective(model, F.cross_entropy, (x, y_bad), batch_size=4, path=path)
        for call in (later.value, later.gradient):
            with pytest.raises(ValueError, match=out_of_range(row, 3)):
                call()
    with pytest.raises(ValueError, match=r"^Objective: the model cannot run on the data \(inputs x of shape \(40, 5\), "
                                         r"torch.float32; parameters torch.float64\): .*dtype"):
        Objective(model, F.cross_entropy, (x.float(), y))
    with pytest.raises(ValueError, match=r"^Objective: the loss rejects the targets y \(shape \(40, 1\), "
                                         r"torch.int64\)"):
        Objective(model, F.cross_entropy, (x, y[:, None]))


class _CountingForward(nn.Module):
    """A Linear whose eval-mode forward counts its calls in a buffer (in place, or by a new tensor)."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.linear, self.in_place = nn.Linear(5, 3), in_place
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            self.calls += 1
        else:
            self.calls = self.calls + 1
        return self.linear(x)


class _LateWrites(nn.Module):
    """A Linear whose forward registers a buffer (a lazy cache) or, on a batch of 3 rows, counts it."""

    def __init__(self, register: bool) -> None:
        super().__init__()
        self.linear, self.register = nn.Linear(5, 3), register
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.register and not hasattr(self, "cache"):
            self.register_buffer("cache", torch.ones(2))
        if len(x) == 3:
            self.seen = self.seen + 1
        return self.linear(x)


def test_buffers_written_later_or_registered_are_refused_and_restored():
    # a buffer registered by the forward gave a bare KeyError and stayed; one written on the last batch only passed
    # the construction probe (the first batch) and then changed at every value and gradient
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    lazy = _LateWrites(register=True).eval()
    with pytest.raises(ValueError, match="writes its buffer 'cache'"):
        Objective(lazy, nn.CrossEntropyLoss(), (x, y))
    assert [name for name, _ in lazy.named_buffers()] == ["seen"]
    late = _LateWrites(register=False).eval()
    objective = Objective(late, nn.CrossEntropyLoss(), (x, y), batch_size=4)
    for call in (objective.value, objective.gradient):
        with pytest.raises(ValueError, match="writes its buffer 'seen'"):
            call()
        assert float(late.seen) == 0.0


class _Scale(nn.Module):
    def __init__(self, shared: torch.Tensor | None, write: bool) -> None:
        super().__init__()
        self.register_buffer("s", shared)
        self.write = write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write:
            self.s = torch.ones(()) if self.s is None else self.s + 0.0
        return x if self.s is None else x * self.s


@pytest.mark.parametrize("shared", [True, False])
def test_the_restore_keeps_shared_buffers_and_slots_holding_none(shared):
    # named_buffers() lists a shared buffer once and a None one never: the restore deleted them as new buffers
    # (the model then failed: "'_Scale' object has no attribute 's'")
    scale = torch.ones(()) if shared else None
    model = nn.Sequential(_Scale(scale, write=False), _Scale(scale, write=True), nn.Linear(5, 3)).eval()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="writes its buffer '1.s'"):
        Objective(model, nn.CrossEntropyLoss(), (x, y))
    assert "s" in model[1]._buffers and model[1]._buffers["s"] is scale and model[0]._buffers["s"] is scale
    model[1].write = False
    assert model(x).shape == (8, 3)


@pytest.mark.parametrize("in_place", [True, False])
def test_a_forward_that_writes_its_buffers_is_refused_and_the_model_restored(in_place):
    # the objective runs the caller's model: the buffer went 0 -> 1 (construction) -> 2 (value) -> 3 (gradient)
    model = _CountingForward(in_place).eval()
    buffer = model.calls
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="^Objective: the model's forward writes its buffer 'calls' in eval mode"):
        Objective(model, nn.CrossEntropyLoss(), (x, y))
    assert model.calls is buffer and float(buffer) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.complex64])
def test_all_finite_agrees_with_the_elementwise_check(dtype):
    big = torch.finfo(torch.float16 if dtype == torch.float16 else torch.float32).max
    cases = [torch.zeros(0, dtype=dtype), torch.randn(50, dtype=dtype),
             torch.full((8,), big, dtype=dtype),  # finite entries whose sum overflows
             torch.full((3, 4), 1.0, dtype=dtype)]
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.randn(7, 3, dtype=dtype)
        t[4, 1] = bad
        cases.append(t)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    assert all_finite(torch.tensor([1, 2], dtype=torch.long))  # integers are always finite



@pytest.mark.parametrize("kind", ["parameter", "statistic", "buffer"])
def test_first_nonfinite_weight(kind):
    """The one rule for a model's weights gives the same answer from the float64 sums (the curvature
    operators' key) as from the entries: a parameter or normalisation statistic must be finite,
    another buffer hold no NaN (+inf and -inf, a NaN sum, are allowed there), and finite float64
    entries whose sum overflows are not refused."""
    name = "w" if kind == "parameter" else "b"
    what = "NaN" if kind == "buffer" else "NaN or Inf"
    for entries, refused in (([1e308, 1e308, -1e308, -1e308], False), ([1.0, -math.inf], kind != "buffer"),
                             ([math.inf, -math.inf], kind != "buffer"), ([1.0, math.nan], True)):
        t = torch.tensor(entries, dtype=torch.float64)
        parameters, buffers = ([(name, t)], []) if kind == "parameter" else ([], [(name, t)])
        statistics = {"b"} if kind == "statistic" else set()
        expected = ("parameter" if kind == "parameter" else "buffer", name, what) if refused else None
        assert first_nonfinite_weight(parameters, buffers, statistics) == expected, entries
        assert first_nonfinite_weight(parameters, buffers, statistics, [float(t.sum())]) == expected, entries


class _MaskedNet(nn.Module):
    """BatchNorm, then an additive mask buffer (-inf: a unit left out) under a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.register_buffer("mask", torch.tensor([0.0, 0.0, -math.inf, 0.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.bn(self.fc1(x)) + self.mask, dim=1))


def test_non_finite_weights_are_refused_by_name(problem):
    """value and gradient returned NaN silently at NaN or Inf weights; they are refused as the
    curvature operators refuse them (one rule, the same message), at construction and at every call,
    for a chosen parameter and for one outside the selection (it feeds the forward too). The model is
    left as it is, and restored weights work again."""
    model, x, y = problem
    objective = Objective(model, F.cross_entropy, (x, y), ["2.weight", "2.bias"], weight_decay=WD)
    value, grad = objective.value_and_gradient()
    for name, bad in (("2.weight", math.nan), ("0.bias", math.inf)):
        tensor = model.get_parameter(name)
        saved = tensor.detach().clone()
        with torch.no_grad():
            tensor[1] = bad
        held = tensor.detach().clone()
        message = rf"^Objective: parameter '{re.escape(name)}' has NaN or Inf values \(did an update diverge\?\)"
        for call in (objective.value, objective.gradient, objective.value_and_gradient):
            with pytest.raises(ValueError, match=message):
                call()
        with pytest.raises(ValueError, match=message):
            Objective(model, F.cross_entropy, (x, y))
        with pytest.raises(ValueError, match=message.replace("Objective", "GenericHessian")):
            hessian_operator(model, F.cross_entropy, (x, y), path="generic")
        assert torch.equal(tensor.detach().nan_to_num(), held.nan_to_num())  # not modified
        with torch.no_grad():
            tensor.copy_(saved)
    again, grad_again = objective.value_and_gradient()
    assert again == value and torch.equal(grad_again, grad)


def test_buffers_follow_the_curvature_operators_rule(rng):
    """A normalisation layer's running statistic must be finite; another buffer may hold Inf (an
    additive -inf mask: a finite objective) but no NaN. The objective and the operators agree."""
    model = _MaskedNet().double().eval()
    x, y = torch.randn(20, 5, generator=rng, dtype=torch.float64), torch.randint(0, 3, (20,), generator=rng)
    objective = Objective(model, F.cross_entropy, (x, y))
    assert math.isfinite(objective.value()) and all_finite(objective.gradient())
    for buffer, bad, what in (("bn.running_var", math.inf, "NaN or Inf"), ("mask", math.nan, "NaN")):
        tensor = model.get_buffer(buffer)
        saved = tensor.clone()
        with torch.no_grad():
            tensor[0] = bad
        for owner, call in (("Objective", objective.value), ("Objective", objective.gradient),
                            ("GenericHessian", lambda: hessian_operator(model, F.cross_entropy, (x, y),
                                                                        path="generic"))):
            with pytest.raises(ValueError, match=rf"^{owner}: buffer '{buffer}' has {what} values"):
                call()
        with torch.no_grad():
            tensor.copy_(saved)
    assert math.isfinite(objective.value())


def test_cure_newton_rejects_a_trial_point_with_non_finite_weights():
    """A tiny M on a float32 model with negative curvature makes the first cubic step overflow: its
    float64 norm, 2.3e39, does not fit float32. ARC rejected it because F was NaN there; the objective
    now refuses such weights, and the Krylov solver raises StepOverflow, so ARC records the trial as
    rejected without evaluating F (one pass fewer), with the step's float64 norm (NaN before), raises M
    and goes on to an accepted step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(200, 8), torch.randint(0, 3, (200,))
    result = CureNewton(M=1e-40, M_min=1e-40, gamma=1e6, max_iterations=1).unlearn(
        model, LabeledData(x[:20], y[:20]), LabeledData(x[20:], y[20:]))
    trials = result.diagnostics["iterations"]
    assert trials[0]["step_norm"] > 3.4e38 and trials[0]["actual"] == -math.inf and not trials[0]["accepted"]
    assert trials[-1]["accepted"] and result.diagnostics["steps"] == 1
    assert result.diagnostics["objective_after"] < result.diagnostics["objective_before"]
    # one pass of F (with its gradient) at w0 and at each trial but the non-finite one; the operator
    # probe's two; one for the parameters the loss uses
    assert result.gradients == PROBE_GRADIENTS + 1 + len(trials) - 1 + 1
