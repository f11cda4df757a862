"""The weight-decayed objective (curvature.Objective), its Hessian as an operator
(curvature.RegularizedOperator) and the shared argument checks, against float64 autograd."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_kernels.checks import all_finite, check_choice, check_int, check_number, check_tensor, norm64
from unlearn_kernels.curvature import (
    Objective,
    RegularizedOperator,
    get_flat_parameters,
    hessian_operator,
    set_flat_parameters,
)

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
        assert torch.allclose(objective.gradient(), grad, atol=1e-12)
        v, g = objective.value_and_gradient()
        assert v == pytest.approx(value, rel=1e-12) and torch.allclose(g, grad, atol=1e-12)
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
    assert torch.allclose(objective.gradient(), grad, atol=1e-12)
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
    assert v == pytest.approx(value, rel=1e-12) and torch.allclose(g, grad, atol=1e-12)
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
    assert torch.allclose(reg.matmat(V), H @ V, atol=1e-10)
    assert torch.allclose(reg.matvec(V[:, 0]), H @ V[:, 0], atol=1e-10)
    assert reg.num_products == op.num_products == before + 4  # counted by the wrapped operator
    assert torch.allclose(reg.to_dense(), H, atol=1e-10)
    sp = reg.to_scipy()
    assert np.allclose(sp.matvec(V[:, 1].numpy()), (H @ V[:, 1]).numpy(), atol=1e-10)
    assert torch.equal(RegularizedOperator(op, 0.0).matvec(V[:, 0]), op.matvec(V[:, 0]))


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


def test_refuses_what_the_curvature_operators_refuse(problem):
    """Train-mode BatchNorm/dropout (the gradient once wrote BatchNorm's running statistics), labels
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

    def out_of_range(row, label):
        return (rf"^Objective: label y\[{row}\] = {label} \(rows counted within the batch\) is out of range for the "
                r"model's 3 classes \(and is not ignore_index=-100\)$")

    y_bad = y.clone()
    y_bad[[5, 9]] = torch.tensor([3, -2])
    with pytest.raises(ValueError, match=out_of_range(5, 3)):
        Objective(model, F.cross_entropy, (x, y_bad))
    later = Objective(model, F.cross_entropy, (x, y_bad), batch_size=4)  # the first batch is fine
    for call in (later.value, later.gradient):
        with pytest.raises(ValueError, match=out_of_range(1, 3)):
            call()
    with pytest.raises(ValueError, match=r"^Objective: the model cannot run on the data \(inputs x of shape \(40, 5\), "
                                         r"torch.float32; parameters torch.float64\): .*dtype"):
        Objective(model, F.cross_entropy, (x.float(), y))
    with pytest.raises(ValueError, match=r"^Objective: the loss rejects the targets y \(shape \(40, 1\), "
                                         r"torch.int64\)"):
        Objective(model, F.cross_entropy, (x, y[:, None]))


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

