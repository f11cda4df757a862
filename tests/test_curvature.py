"""Curvature operators against dense float64 Hessians/GGNs computed independently.

The oracles use ``torch.autograd.functional`` (reverse-over-reverse, one row at a time), not torch.func:
in torch 2.13 ``torch.func.hessian``/``jacrev(jacrev)`` give wrong Hessian blocks through
``F.layer_norm`` with an affine weight (checked against finite differences), while the operators'
``vmap(jvp(grad))`` agrees with double backward.
"""
from __future__ import annotations

import copy
import functools
import gc
import math
import re
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from custom_functions import Square, square_function
from tolerance import relative_error
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.data import DataLoader, TensorDataset

from unlearn_kernels.curvature import (
    CurvatureOperator,
    ModelChanged,
    Objective,
    estimate_hessian_lipschitz,
    flatten_tensors,
    get_flat_parameters,
    ggn_operator,
    hessian_operator,
    resolve_curvature_parameters,
    resolve_parameters,
    set_flat_parameters,
    unflatten_vector,
)
from unlearn_kernels.data import LabeledData
from unlearn_kernels.solvers import as_operator, cubic_newton_step

DT = torch.float64
N, C = 10, 3


# ----------------------------------------------------------------------------- models and data
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, C))


def layernorm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, C))


MODELS = {"mlp": (mlp, 4), "cnn": (cnn, 16), "layernorm": (layernorm_net, 4)}


def make(name: str, seed: int = 0, n: int = N) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    factory, features = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(DT)
    x = torch.randn(n, features, dtype=DT)
    y = torch.randint(0, C, (n,))
    return model, x, y


def uneven_batches(x: torch.Tensor, y: torch.Tensor, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


# ----------------------------------------------------------------------------- independent references
def flat_objective(model, batches, loss_fn, names):
    """w -> sum_b (n_b/N) loss_fn(model(x_b; w), y_b) over the parameters ``names`` (flat w)."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    total = sum(y.shape[0] for _, y in batches)

    def objective(w):
        params = dict(zip(names, unflatten_vector(w, shapes)))
        return sum(loss_fn(functional_call(model, params, (x,)), y) * (y.shape[0] / total) for x, y in batches)

    w0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    return objective, w0, shapes


def dense_hessian(model, batches, loss_fn, names=None):
    names = names or [n for n, _ in model.named_parameters()]
    objective, w0, _ = flat_objective(model, batches, loss_fn, names)
    return hessian(objective, w0)


def dense_gradient(model, batches, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    objective, w0, _ = flat_objective(model, batches, loss_fn, names)
    return jacobian(objective, w0)


def dense_ggn(model, batches, loss_fn, names=None):
    """sum_b (n_b/N) J_b^T (d^2 loss_fn / d out^2) J_b, each piece by torch.autograd.functional."""
    names = names or [n for n, _ in model.named_parameters()]
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    w0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    total = sum(y.shape[0] for _, y in batches)
    out = 0
    for x, y in batches:
        def outputs(w, x=x):
            return functional_call(model, dict(zip(names, unflatten_vector(w, shapes))), (x,))

        z = outputs(w0)
        jac = jacobian(outputs, w0).reshape(z.numel(), -1)
        h_out = hessian(lambda zz, y=y: loss_fn(zz, y), z).reshape(z.numel(), z.numel())
        out = out + (y.shape[0] / total) * jac.T @ h_out @ jac
    return out


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_and_ggn_match_dense_references(name):
    model, x, y = make(name)
    loss = nn.CrossEntropyLoss()
    batches = [(x, y)]
    H = hessian_operator(model, loss, (x, y), path="generic")
    assert H.path == "generic" and H.shape == (H.shape[0], H.shape[0]) and H.dtype == DT
    ref = dense_hessian(model, batches, loss)
    assert relative_error(H.to_dense(), ref) <= 1e-10
    G = ggn_operator(model, loss, (x, y))
    assert G.path == "ggn"
    ref_ggn = dense_ggn(model, batches, loss)
    assert relative_error(G.to_dense(chunk_size=7), ref_ggn) <= 1e-10
    # The GGN is not the Hessian for these nonlinear models (else the test above proves little).
    assert relative_error(ref_ggn, ref) > 1e-3
    assert relative_error(H.gradient(), dense_gradient(model, batches, loss)) <= 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_reverse_over_reverse_mode_matches_dense_reference(name):
    model, x, y = make(name, seed=3)
    loss = nn.CrossEntropyLoss()
    batches = uneven_batches(x, y)
    H = hessian_operator(model, loss, batches, path="generic", mode="reverse-over-reverse")
    assert H.mode == "reverse-over-reverse" and not H.uses_vmap
    ref = dense_hessian(model, batches, loss)
    assert relative_error(H.to_dense(chunk_size=5), ref) <= 1e-10
    V = torch.randn(H.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H.matmat(V), torch.stack([H.matvec(V[:, k]) for k in range(3)], 1),
                               rtol=1e-12, atol=1e-14)
    forward = hessian_operator(model, loss, batches, path="generic", mode="forward-over-reverse")
    assert forward.mode == "forward-over-reverse" and forward.mode_reason == "requested"
    assert relative_error(forward.matmat(V), H.matmat(V)) <= 1e-12
    auto = hessian_operator(model, loss, batches, path="generic")
    assert auto.mode == "reverse-over-reverse" and auto.mode_reason.startswith("auto: double backward is exact")


def test_unknown_mode_is_rejected_on_every_path():
    model, x, y = make("mlp")
    for path in ("auto", "generic"):
        with pytest.raises(ValueError, match="mode must be one of"):
            hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path=path, mode="reverse")


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(ignore_index=1),
        F.cross_entropy,
    ],
    ids=["smoothing", "ignore_index", "functional"],
)
def test_cross_entropy_options_over_uneven_batches(loss):
    model, x, y = make("mlp", seed=1)
    batches = uneven_batches(x, y)
    H = hessian_operator(model, loss, batches, path="generic")
    G = ggn_operator(model, loss, batches)
    assert relative_error(H.to_dense(), dense_hessian(model, batches, loss)) <= 1e-10
    assert relative_error(G.to_dense(), dense_ggn(model, batches, loss)) <= 1e-10


def test_batches_are_weighted_by_their_rows():
    """The operator is sum_b (n_b / N) times the batch curvatures, as documented: with ignore_index
    (each batch's mean is over its other rows) or reduction='sum' it depends on the batching. A batch
    whose rows are all ignored contributes zero, as on the generic path (the GGN once gave NaN)."""
    model, x, y = make("mlp", seed=1)
    y[8:] = 1  # the last batch of uneven_batches (rows 8 and 9): all ignored below
    batches = uneven_batches(x, y)
    ignore = nn.CrossEntropyLoss(ignore_index=1)
    for loss in (ignore, nn.CrossEntropyLoss(reduction="sum")):
        H = hessian_operator(model, loss, batches, path="generic").to_dense()
        assert relative_error(H, dense_hessian(model, batches, loss)) <= 1e-10
        assert relative_error(H, dense_hessian(model, [(x, y)], loss)) > 1e-2  # not the one-batch operator
    G = ggn_operator(model, ignore, batches).to_dense()
    assert relative_error(G, dense_ggn(model, batches, ignore)) <= 1e-10
    assert relative_error(G, ggn_operator(model, ignore, batches[:2]).to_dense() * (8 / N)) <= 1e-12


def test_mse_ggn_and_hessian():
    model, x, _ = make("layernorm", seed=2)
    y = torch.randn(N, C, dtype=DT)
    batches = uneven_batches(x, y, size=6)
    for loss in (nn.MSELoss(), F.mse_loss):
        assert relative_error(ggn_operator(model, loss, batches).to_dense(), dense_ggn(model, batches, loss)) <= 1e-10
    # torch 2.13 cannot run forward-over-reverse through F.mse_loss: double backward takes over
    # (checked by finite differences), with a warning when forward-over-reverse was asked for.
    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        forward = hessian_operator(model, nn.MSELoss(), batches, path="generic", mode="forward-over-reverse")
    assert forward.mode == "reverse-over-reverse" and "forward-over-reverse failed" in forward.mode_reason
    H = hessian_operator(model, nn.MSELoss(), batches, path="generic")
    assert H.mode == "reverse-over-reverse"
    assert relative_error(H.to_dense(), dense_hessian(model, batches, nn.MSELoss())) <= 1e-10
    assert relative_error(H.gradient(), dense_gradient(model, batches, nn.MSELoss())) <= 1e-12


def test_linear_model_ggn_equals_hessian():
    # For a model linear in its parameters the GGN is the exact Hessian.
    torch.manual_seed(3)
    model = nn.Linear(4, C).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    loss = nn.CrossEntropyLoss()
    H = hessian_operator(model, loss, (x, y), path="generic").to_dense()
    assert relative_error(ggn_operator(model, loss, (x, y)).to_dense(), H) <= 1e-12


def test_mean_weighting_over_a_dataloader_with_a_partial_last_batch():
    model, x, y = make("cnn", seed=4, n=11)
    loss = nn.CrossEntropyLoss()
    loader = LabeledData(x, y).loader(batch_size=4)  # batches of 4, 4, 3
    full = dense_hessian(model, [(x, y)], loss)
    for op, ref in ((hessian_operator(model, loss, loader, path="generic"), full),
                    (ggn_operator(model, loss, loader), dense_ggn(model, [(x, y)], loss))):
        assert relative_error(op.to_dense(), ref) <= 1e-10
    # Tensor data chunked with batch_size, and a LabeledData, give the same operator.
    chunked = hessian_operator(model, loss, LabeledData(x, y), path="generic", batch_size=5)
    assert relative_error(chunked.to_dense(), full) <= 1e-10
    assert relative_error(chunked.gradient(), dense_gradient(model, [(x, y)], loss)) <= 1e-12


# ----------------------------------------------------------------------------- interface
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_matmat_equals_matvecs_and_counters(kind):
    model, x, y = make("layernorm", seed=5)
    loss = nn.CrossEntropyLoss()
    batches = uneven_batches(x, y)
    if kind == "hessian":
        op = hessian_operator(model, loss, batches, path="generic")
        probes = 2  # a double-backward product and the forward-over-reverse one it is checked against
    else:
        op = ggn_operator(model, loss, batches)
        probes = 1
    # Construction probes on the first batch: two gradients and the products, all counted.
    assert (op.num_products, op.num_gradients, op.num_data_passes) == (probes, 2, 0)
    V = torch.randn(op.shape[0], 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    # The per-parameter tangents are contiguous (strided views of V slow every product down) and round-trip.
    tangents = op.unflatten_columns(V)
    assert all(t[k].is_contiguous() for t in tangents.values() for k in range(4))
    assert torch.equal(op.flatten_columns(tangents), V)
    M = op.matmat(V)
    assert (op.num_products, op.num_data_passes) == (probes + 4, 1)
    cols = torch.stack([op.matvec(V[:, k]) for k in range(4)], dim=1)
    assert (op.num_products, op.num_data_passes) == (probes + 8, 5)
    torch.testing.assert_close(M, cols, rtol=1e-12, atol=1e-14)
    op.gradient()
    assert (op.num_products, op.num_gradients, op.num_data_passes) == (probes + 8, 3, 6)
    # Symmetry: u^T C v = v^T C u.
    assert abs(float(V[:, 0] @ M[:, 1] - V[:, 1] @ M[:, 0])) <= 1e-12 * float(M.norm())
    # A matvec (the generic path's own, on views of the vector) is bit for bit a one-column matmat.
    for v in (V[:, 1], V[:, 1].contiguous()):
        assert torch.equal(op.matvec(v), op.matmat(v.unsqueeze(1))[:, 0])


def test_to_scipy_round_trip():
    model, x, y = make("mlp", seed=6)
    op = ggn_operator(model, nn.CrossEntropyLoss(), (x, y))
    A = op.to_scipy()
    assert A.shape == op.shape and A.dtype == np.float64
    rng = np.random.default_rng(0)
    v, V = rng.standard_normal(op.shape[0]), rng.standard_normal((op.shape[0], 3))
    dense = op.to_dense().numpy()
    np.testing.assert_allclose(A @ v, dense @ v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(A.matmat(V), dense @ V, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(A.rmatvec(v), dense @ v, rtol=1e-12, atol=1e-14)


def test_to_scipy_takes_complex_vectors():
    """A complex input was converted to float64: its imaginary part dropped (the identity took [1j, 2j, 3j] to
    zeros) with at most a ComplexWarning, which numpy shows once. Two real products now, for the curvature
    operators and the solvers' (dense) ones alike."""
    model, x, y = make("mlp", seed=6)
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(op.shape[0]), rng.standard_normal((op.shape[0], 2))
    dense = op.to_dense().numpy()
    for A in (op.to_scipy(), as_operator(op.to_dense()).to_scipy(), as_operator(op).to_scipy()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ComplexWarning
            got = A @ (a + 2j * a), A.matmat(1j * b), A.rmatvec(1j * a)
        assert all(out.dtype == np.complex128 for out in got)
        np.testing.assert_allclose(got[0], dense @ a * (1 + 2j), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[1], 1j * (dense @ b), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got[2], 1j * (dense @ a), rtol=1e-12, atol=1e-14)


def test_float32_operator():
    model, x, y = make("mlp", seed=7)
    ref = dense_hessian(model, [(x, y)], nn.CrossEntropyLoss())
    model32 = model.float()
    op = hessian_operator(model32, nn.CrossEntropyLoss(), (x.float(), y), path="generic")
    assert op.dtype == torch.float32
    assert relative_error(op.to_dense().double(), ref) <= 1e-5
    out = op.to_scipy() @ np.ones(op.shape[0])
    assert out.dtype == np.float64


def test_parameter_subsets_follow_the_given_order():
    model, x, y = make("mlp", seed=8)
    loss = nn.CrossEntropyLoss()
    order = ["2.bias", "0.weight"]
    ref = dense_hessian(model, [(x, y)], loss, names=order)
    by_name = hessian_operator(model, loss, (x, y), params=order, path="generic")
    by_tensor = hessian_operator(model, loss, (x, y), params=[model[2].bias, model[0].weight], path="generic")
    assert by_name.param_names == tuple(order) and by_name.shape == (C + 20, C + 20)
    assert relative_error(by_name.to_dense(), ref) <= 1e-10
    assert relative_error(by_tensor.to_dense(), ref) <= 1e-10
    last = ggn_operator(model, loss, (x, y), params=model[2].parameters())
    assert relative_error(last.to_dense(), dense_ggn(model, [(x, y)], loss, names=["2.weight", "2.bias"])) <= 1e-10
    # Default = trainable parameters only.
    model[0].weight.requires_grad_(False)
    assert resolve_parameters(model).keys() == {"0.bias", "2.weight", "2.bias"}


def test_flat_parameter_helpers():
    model, _, _ = make("mlp")
    flat = get_flat_parameters(model, ["2.weight", "0.bias"])
    torch.testing.assert_close(flat, torch.cat([model[2].weight.reshape(-1), model[0].bias]), rtol=0, atol=0)
    set_flat_parameters(model, flat * 2, ["2.weight", "0.bias"])
    torch.testing.assert_close(model[0].bias, flat[-5:] * 2, rtol=0, atol=0)
    pieces = unflatten_vector(flatten_tensors([torch.ones(2, 3), torch.zeros(4)]), [(2, 3), (4,)])
    assert [p.shape for p in pieces] == [(2, 3), (4,)]
    with pytest.raises(ValueError, match="length 10"):
        unflatten_vector(torch.ones(9), [(2, 3), (4,)])
    with pytest.raises(TypeError, match="dtype"):
        set_flat_parameters(model, flat.float(), ["2.weight", "0.bias"])
    # parameters of mixed dtypes: get_flat_parameters' (promoted) vector was refused by set_flat_parameters, and
    # a float32 one accepted (the float64 layer rounded without a word)
    mixed = copy.deepcopy(model)
    mixed[2].float()
    flat = get_flat_parameters(mixed)
    assert flat.dtype == torch.float64
    set_flat_parameters(mixed, flat * 2)
    torch.testing.assert_close(get_flat_parameters(mixed), (flat * 2).float().double(), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match=r"vector has dtype torch.float32 but the parameters mix dtypes; their flat "
                                        r"vector \(get_flat_parameters\) has torch.float64"):
        set_flat_parameters(mixed, flat.float())
    # NaN, or a finite value beyond a narrower parameter's range, was written into the model without a word (the
    # float32 layer's bias became Inf); every part is checked before any is written
    state = copy.deepcopy(mixed.state_dict())
    for where, value, rounded in ((0, math.nan, ""), (-1, 1e300, r" \(rounded to its dtype\)")):
        bad = flat.clone()
        bad[where] = value
        name = "0.weight" if where == 0 else "2.bias"
        with pytest.raises(ValueError, match=rf"^vector holds NaN or Inf for parameter '{name}'{rounded}: the model's "
                                             r"parameters are left as they were$"):
            set_flat_parameters(mixed, bad)
        assert all(torch.equal(v, state[k]) for k, v in mixed.state_dict().items())
    with pytest.raises(ValueError, match="no parameter named"):
        resolve_parameters(model, ["nope"])
    with pytest.raises(ValueError, match="given twice"):
        resolve_parameters(model, ["0.bias", model[0].bias])
    with pytest.raises(ValueError, match="not a parameter"):
        resolve_parameters(model, [torch.ones(3)])


def test_model_is_not_modified_and_updates_are_seen():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    model[1].running_mean.normal_()
    model.eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.CrossEntropyLoss()
    H = hessian_operator(model, loss, (x, y), path="generic")
    dense = H.to_dense()
    assert relative_error(dense, dense_hessian(model, [(x, y)], loss)) <= 1e-10
    ggn_operator(model, loss, (x, y)).to_dense()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # Parameters are read live: an in-place update is seen by later products.
    with torch.no_grad():
        model[3].weight.mul_(2.0)
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], loss)) <= 1e-10


def test_auto_path_records_its_choice():
    model, x, y = make("cnn")
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))  # no fused path takes convolutions
    assert op.path == "generic" and isinstance(op.path_reason, str) and op.path_reason
    assert hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic").path_reason is None
    with pytest.raises(ValueError, match="path='fused' cannot be used"):
        hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="fused")
    mlp_model, x, y = make("mlp")
    auto = hessian_operator(mlp_model, nn.CrossEntropyLoss(), (x, y))
    assert isinstance(auto, CurvatureOperator) and auto.path == "fused" and auto.path_reason is None
    assert relative_error(auto.to_dense(), dense_hessian(mlp_model, [(x, y)], nn.CrossEntropyLoss())) <= 1e-10


class _Cube(torch.autograd.Function):
    """x^3 with backward and jvp but no vmap rule, so torch.func.vmap cannot batch it."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * tangent


class _CubeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)

    def forward(self, x):
        return _Cube.apply(self.lin(x))


def test_vmap_fallback_loops_with_the_same_result():
    torch.manual_seed(10)
    model = _CubeNet().to(DT)
    x, y = torch.randn(N, 4, dtype=DT) * 0.5, torch.randint(0, C, (N,))
    loss = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning, match="falling back to a loop"):
        H = hessian_operator(model, loss, (x, y), path="generic", mode="forward-over-reverse")
    assert not H.uses_vmap and H.mode == "forward-over-reverse"
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], loss)) <= 1e-10
    with pytest.warns(RuntimeWarning, match="falling back to a loop"):
        G = ggn_operator(model, loss, (x, y))
    assert relative_error(G.to_dense(), dense_ggn(model, [(x, y)], loss)) <= 1e-10


# ----------------------------------------------------------------------------- safety
class _NoisyNet(nn.Module):
    """Random in its forward without an nn.Dropout module (only the probe can see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)

    def forward(self, x):
        return F.dropout(self.lin(x), p=0.5, training=True)


def test_determinism_probe():
    model, x, y = make("mlp")
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"Dropout.*model\.eval\(\)"):
        hessian_operator(nn.Sequential(model, nn.Dropout(0.1)).train(), loss, (x, y), path="generic")
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, C)).to(DT)
    with pytest.raises(ValueError, match=r"BatchNorm.*model\.eval\(\)"):
        ggn_operator(bn, loss, (x, y))
    bn.eval()
    ggn_operator(bn, loss, (x, y))  # fine in eval mode
    with pytest.raises(ValueError, match="differ.*model.eval"):
        hessian_operator(_NoisyNet().to(DT), loss, (x, y), path="generic")
    with pytest.raises(ValueError, match="different batches.*shuffle=False"):
        hessian_operator(model, loss, LabeledData(x, y).loader(batch_size=4, shuffle=True), path="generic")
    with pytest.raises(ValueError, match="drop_last"):
        ggn_operator(model, loss, LabeledData(x, y).loader(batch_size=4, drop_last=True))
    ggn_operator(model, loss, LabeledData(x, y).loader(batch_size=5, drop_last=True))  # drops nothing


@pytest.mark.parametrize("path", ["generic", "fused", "ggn"])
def test_non_finite_data_and_labels_out_of_range_are_named(path):
    """Construction names the tensor and row of a NaN/Inf (tensor data in full, a loader's first batch
    before the determinism check, which NaN would fail as if the data changed), and a label out of
    range by its row, value and the number of classes instead of torch's IndexError, on every path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))

    def build(data, loss=F.cross_entropy, **options):
        if path == "ggn":
            return ggn_operator(model, loss, data, **options)
        op = hessian_operator(model, loss, data, path=path, **options)
        assert op.path == path
        return op

    build((x, y))
    for value in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[3, 1] = value
        with pytest.raises(ValueError, match=r"^the data's inputs x contain NaN or Inf \(first at row 3\)$"):
            build((x_bad, y))
        with pytest.raises(ValueError, match=r"^batch 0 of the data: its inputs x contain NaN or Inf "
                                             r"\(first at row 3, counted within the batch\)$"):
            build(LabeledData(x_bad, y).loader(batch_size=4))
    with pytest.raises(ValueError, match=r"^the data's inputs x contain NaN or Inf \(first at row 0\)$"):
        build((torch.full_like(x, float("nan")), y))
    # sparse data met "reshape is not implemented for sparse tensors" from inside the forward
    with pytest.raises(TypeError, match=r"^a batch's inputs x must be a dense tensor, got layout torch.sparse_coo"):
        build((x.to_sparse(), y))
    with pytest.raises(TypeError, match=r"^a batch's targets y must be a dense tensor, got layout torch.sparse_coo"):
        build([(x, y.to_sparse())])
    if path != "fused":  # float targets: the fused path takes cross entropy only
        targets = torch.randn(N, C, dtype=DT)
        targets[7, 0] = float("nan")
        with pytest.raises(ValueError, match=r"^the data's targets y contain NaN or Inf \(first at row 7\)$"):
            build((x, targets), F.mse_loss)

    def out_of_range(row, label, ignore_index=-100):
        return (rf"^label y\[{row}\] = {label} \(rows counted within the batch\) is out of range for the model's "
                rf"{C} classes \(and is not ignore_index={ignore_index}\)$")

    for label in (C, -3):
        y_bad = y.clone()
        y_bad[[2, 6]] = torch.tensor([label, C + 4])
        with pytest.raises(ValueError, match=out_of_range(2, label)):
            build((x, y_bad))
    y_ignored = y.clone()
    y_ignored[[1, 5]] = torch.tensor([-1, C])
    with pytest.raises(ValueError, match=out_of_range(5, C, ignore_index=-1)):
        build((x, y_ignored), nn.CrossEntropyLoss(ignore_index=-1))
    if path != "fused":  # a later batch, met by a gradient (the fused kernels name it themselves)
        y_late = y.clone()
        y_late[7] = C
        op = build((x, y_late), batch_size=5)
        with pytest.raises(ValueError, match=out_of_range(2, C)):
            op.gradient()
        if path == "ggn":  # its products never call the loss: the label is checked as the batch is read
            with pytest.raises(ValueError, match="^ggn_operator: " + out_of_range(2, C)[1:]):
                op.matvec(torch.ones(op.shape[0], dtype=DT))


class _UnusedParameterNet(nn.Module):
    """The ``mlp`` model plus a trainable layer its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.extra = nn.Linear(4, 5), nn.Linear(5, C), nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _padded(matrix: torch.Tensor, d: int) -> torch.Tensor:
    """``matrix`` (or a vector) in the top-left corner of zeros of size d."""
    out = matrix.new_zeros((d,) * matrix.dim())
    out[tuple(slice(0, n) for n in matrix.shape)] = matrix
    return out


@pytest.mark.parametrize("mode", ["auto", "forward-over-reverse", "reverse-over-reverse"])
def test_a_parameter_the_forward_does_not_use_has_zero_rows(mode):
    """An unused trainable parameter has zero gradient and zero Hessian/GGN rows and columns (it once
    raised torch's "appears to not have been used in the graph" from double backward and the objective)."""
    torch.manual_seed(0)
    model = _UnusedParameterNet().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    loss = nn.CrossEntropyLoss()
    used = [n for n, _ in model.named_parameters() if not n.startswith("extra")]
    d = sum(p.numel() for p in model.parameters())
    batches = uneven_batches(x, y)
    H = hessian_operator(model, loss, batches, path="generic", mode=mode)
    if mode != "auto":
        assert H.mode == mode
    assert relative_error(H.to_dense(), _padded(dense_hessian(model, batches, loss, used), d)) <= 1e-10
    objective, w0, _ = flat_objective(model, batches, loss, used)
    grad = _padded(jacobian(objective, w0), d)
    assert relative_error(H.gradient(), grad) <= 1e-12
    G = ggn_operator(model, loss, batches)
    assert relative_error(G.to_dense(), _padded(dense_ggn(model, batches, loss, used), d)) <= 1e-10
    value, obj_grad = Objective(model, loss, batches).value_and_gradient()
    assert relative_error(obj_grad, grad) <= 1e-12 and value == pytest.approx(float(objective(w0)), rel=1e-12)


def _fused_problem(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small float64 MLP or CNN that a fused path takes, its inputs and labels (seeded)."""
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT), torch.randn(N, 4, dtype=DT)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(2, C)).to(DT)
        x = torch.randn(N, 1, 5, 5, dtype=DT)
    return model, x, torch.randint(0, C, (N,))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_path_on_every_device_matches_the_dense_reference(kind, device):
    """The model and data on the device (cuda too where a GPU is visible: the fused MLP path runs the CUDA
    kernels there, the fused conv and generic paths cuDNN and cuBLAS): products, matmat, gradient, the GGN and a
    Krylov cubic step against the CPU's dense float64 oracles."""
    model, x, y = _fused_problem(kind)
    loss = nn.CrossEntropyLoss()
    ref, grad = dense_hessian(model, [(x, y)], loss), dense_gradient(model, [(x, y)], loss)
    moved, xd, yd = copy.deepcopy(model).to(device), x.to(device), y.to(device)
    V = torch.randn(ref.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    for path in ("fused", "generic"):
        H = hessian_operator(moved, loss, (xd, yd), path=path)
        assert H.path == path and H.device.type == device.type
        out = H.matmat(V.to(device))
        assert out.device.type == device.type and relative_error(out.cpu(), ref @ V) <= 1e-10, path
        assert relative_error(H.matvec(V[:, 0].to(device)).cpu(), ref @ V[:, 0]) <= 1e-10, path
        assert relative_error(H.gradient().cpu(), grad) <= 1e-12, path
        step = cubic_newton_step(H, H.gradient(), 1.0, method="krylov", kappa=1e-12, k_max=ref.shape[0])
        dense = cubic_newton_step(ref, grad, 1.0, method="dense")
        assert step.model_value == pytest.approx(dense.model_value, rel=1e-8), path
    G = ggn_operator(moved, loss, (xd, yd))
    assert relative_error(G.matmat(V.to(device)).cpu(), dense_ggn(model, [(x, y)], loss) @ V) <= 1e-10


def _temperature_loss() -> nn.CrossEntropyLoss:
    loss = nn.CrossEntropyLoss()
    loss.register_forward_pre_hook(lambda module, args: (args[0] / 4, args[1]))
    return loss


def _own_forward(model: nn.Module, kind: str) -> None:
    layer = model[-1]  # the Linear (head)
    layer.forward = lambda h: 3 * F.linear(h, layer.weight, layer.bias)


class _ScaledCall(nn.Sequential):
    """A Sequential whose __call__ scales the outputs (forward is Sequential's)."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) / 4


class _ScaledDropout(nn.Dropout):
    """A Dropout subclass whose forward scales (in eval mode too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


def _plain_tensor_weight(model: nn.Module, kind: str) -> None:
    layer = model[0]
    weight = layer.weight.detach().clone()
    del layer._parameters["weight"]
    layer.weight = weight  # an attribute, neither a parameter nor a buffer


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("change, reason", [
    ("loss hook", "the loss module has a forward hook"),
    ("own forward", "module '[24]' has a forward of its own"),
    ("call override", "the model has a forward of its own"),
    ("dropout subclass", "layer '1' is _ScaledDropout"),
    ("plain tensor weight", "layer '0' has a weight or bias that is (not|neither) a Parameter"),
])
def test_fused_paths_decline_what_their_passes_would_not_compute(kind, change, reason):
    """A hook on the loss module (temperature scaling), a forward set on a layer instance (as accelerate's
    hooks do): the fused paths computed the plain model's products (relative errors 3.8 and 0.84, no
    error); a conv weight held as a plain attribute made path='auto' fail with a bare KeyError. Each is
    declined now: path='auto' runs the generic path, exact."""
    model, x, y = _fused_problem(kind)
    loss = nn.CrossEntropyLoss()
    if change == "loss hook":
        loss = _temperature_loss()
    elif change == "own forward":
        _own_forward(model, kind)
    elif change == "call override":
        model.__class__ = _ScaledCall
    elif change == "dropout subclass":  # was taken for an eval-mode Dropout, an identity: off by 0.82
        model.insert(1, _ScaledDropout().eval())
    else:
        _plain_tensor_weight(model, kind)
    with pytest.raises(ValueError, match=f"path='fused' cannot be used: .*{reason}"):
        hessian_operator(model, loss, (x, y), path="fused")
    H = hessian_operator(model, loss, (x, y))
    assert H.path == "generic"
    names = [n for n, _ in model.named_parameters()]
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], loss, names)) <= 1e-10


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_fused_paths_decline_a_parameter_outside_their_layers(kind):
    """A parameter registered on the Sequential itself is in none of the layers the fused passes run:
    path='fused' says so, path='auto' falls back to the generic path, whose rows for it are zero."""
    model, x, y = _fused_problem(kind)
    assert hessian_operator(model, F.cross_entropy, (x, y)).path == "fused"
    used = [n for n, _ in model.named_parameters()]
    model.register_parameter("extra", nn.Parameter(torch.randn(3, dtype=DT)))  # first in named_parameters
    with pytest.raises(ValueError, match="path='fused' cannot be used: .*parameter 'extra' is in none of the"):
        hessian_operator(model, F.cross_entropy, (x, y), path="fused")
    H = hessian_operator(model, F.cross_entropy, (x, y))
    assert H.path == "generic" and "parameter 'extra'" in H.path_reason
    ref = torch.zeros(H.shape, dtype=DT)
    ref[3:, 3:] = dense_hessian(model, [(x, y)], F.cross_entropy, used)
    assert relative_error(H.to_dense(), ref) <= 1e-10
    # not chosen, the parameter is no obstacle
    assert hessian_operator(model, F.cross_entropy, (x, y), params=used).path == "fused"


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_class_probability_targets(kind):
    """Cross entropy takes (N, C) class probabilities, the fused kernels and the GGN only (N,) labels:
    path='auto' falls back to the generic path and says why, path='fused' and ggn_operator refuse
    them at construction (the fused path once failed at the first product, and the GGN returned a
    (d, N) product)."""
    model, x, y = _fused_problem(kind)
    targets = torch.softmax(torch.randn(N, C, dtype=DT, generator=torch.Generator().manual_seed(1)), dim=1)
    name = "FusedMLPHessian" if kind == "mlp" else "FusedConvHessian"
    says = f"targets y of shape ({N}, {C}), {DT} are not (N,) integer class labels"

    def ggn_says(rows):
        return "^" + re.escape(f"ggn_operator: cross entropy needs (N,) integer class labels, got targets y of "
                               f"shape ({rows}, {C})")

    later = [(x[:4], y[:4]), (x[4:], targets[4:])]
    for loss in (F.cross_entropy, nn.CrossEntropyLoss(label_smoothing=0.1)):
        H = hessian_operator(model, loss, (x, targets))
        assert H.path == "generic" and H.path_reason.startswith(f"{name}: {says}")
        assert relative_error(H.to_dense(), dense_hessian(model, [(x, targets)], loss)) <= 1e-10
        forced = f"hessian_operator: path='fused' cannot be used: {name}: {says}"
        with pytest.raises(ValueError, match="^" + re.escape(forced)):
            hessian_operator(model, loss, (x, targets), path="fused")
        with pytest.raises(ValueError, match=ggn_says(N)):
            ggn_operator(model, loss, (x, targets))
        # a later batch of probabilities: refused, by its number, by the product that reads it
        v = torch.ones(H.shape[0], dtype=DT)
        with pytest.raises(ValueError, match="^batch 1 of the data: " + ggn_says(N - 4)[1:]):
            ggn_operator(model, loss, later).matvec(v)
        with pytest.raises(ValueError, match="^" + re.escape(f"batch 1 of the data: {name}: targets y of shape "
                                                             f"({N - 4}, {C})")):
            hessian_operator(model, loss, later, path="fused").matvec(v)


def test_ggn_refuses_subclasses_of_its_losses():
    """A subclass may compute another loss in its forward: the GGN would be plain cross entropy's
    (once silently); the Hessian path runs its forward."""
    class ScaledCE(nn.CrossEntropyLoss):
        def forward(self, out, target):
            return 10.0 * super().forward(out, target)

    class ScaledMSE(nn.MSELoss):
        def forward(self, out, target):
            return 10.0 * super().forward(out, target)

    model, x, y = _fused_problem("mlp")
    for loss, data in ((ScaledCE(), (x, y)), (ScaledMSE(), (x, torch.randn(N, C, dtype=DT)))):
        message = rf"^ggn_operator: no loss Hessian for {type(loss).__name__}; .*not subclasses"
        with pytest.raises(ValueError, match=message):
            ggn_operator(model, loss, data)
    H = hessian_operator(model, ScaledCE(), (x, y))
    assert H.path == "generic"
    assert relative_error(H.to_dense(), 10 * dense_hessian(model, [(x, y)], F.cross_entropy)) <= 1e-10


def test_parameters_as_a_generator_or_tensors_on_every_path():
    """``model.fc.parameters()`` (a generator) once selected nothing after the fused support check
    read it, and tensors of the model were not found in estimate_hessian_lipschitz's private copy."""
    model, x, y = _fused_problem("mlp")
    names = ["2.weight", "2.bias"]
    ref = dense_hessian(model, [(x, y)], F.cross_entropy, names)
    for path in ("auto", "fused", "generic"):
        H = hessian_operator(model, F.cross_entropy, (x, y), params=model[2].parameters(), path=path)
        assert H.param_names == tuple(names) and relative_error(H.to_dense(), ref) <= 1e-10
    G = ggn_operator(model, F.cross_entropy, (x, y), params=model[2].parameters())
    assert relative_error(G.to_dense(), dense_ggn(model, [(x, y)], F.cross_entropy, names)) <= 1e-10
    by_name = estimate_hessian_lipschitz(model, F.cross_entropy, (x, y), params=names, num_directions=2)
    for chosen in ([model[2].weight, model[2].bias], model[2].parameters()):
        estimate = estimate_hessian_lipschitz(model, F.cross_entropy, (x, y), params=chosen, num_directions=2)
        assert estimate.ratios == by_name.ratios and estimate.value > 0


def test_lipschitz_estimate_checks_its_seed_and_radius():
    model, x, y = _fused_problem("mlp")
    before = copy.deepcopy(model.state_dict())
    for seed, error, says in ((1.5, TypeError, "must be an int, got float"),
                              (True, TypeError, "must be an int, got bool"),
                              (-1, ValueError, r"must be in \[0, 2\*\*63\), got -1")):
        with pytest.raises(error, match=rf"^estimate_hessian_lipschitz: seed {says}$"):
            estimate_hessian_lipschitz(model, F.cross_entropy, (x, y), seed=seed)
    # a radius the weights' dtype cannot resolve (once "vector contains NaN or Inf", or a ratio of 0)
    model32 = copy.deepcopy(model).float()
    for net, data, radius in ((model, (x, y), 1e-300), (model, (x, y), 1e-17), (model32, (x.float(), y), 1e-9)):
        dtype = next(net.parameters()).dtype
        with pytest.raises(ValueError, match=rf"^estimate_hessian_lipschitz: radius={radius!r} is too small for the "
                                             rf"{dtype} weights: .* off by [0-9.]+% of the radius \(over 10%\)"):
            estimate_hessian_lipschitz(net, F.cross_entropy, data, radius=radius)
    assert estimate_hessian_lipschitz(model, F.cross_entropy, (x, y), radius=1e-6).value > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fused_path_declines_tied_weights():
    """Two Linear modules sharing one weight (it once raised a KeyError from supports)."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=r"share a parameter \(tied weights\)"):
        hessian_operator(model, F.cross_entropy, (x, y), path="fused")
    H = hessian_operator(model, F.cross_entropy, (x, y))
    assert H.path == "generic" and "tied weights" in H.path_reason
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], F.cross_entropy)) <= 1e-10


@pytest.mark.parametrize("hook", ["forward", "pre", "global"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_fused_paths_decline_forward_hooks(hook, net):
    """A forward hook may change what a layer returns (or a pre-hook what it takes); the fused passes
    compute the layers themselves and once skipped the hooks: path="auto" took them and returned a
    Hessian 50-82% off. Now "auto" runs the generic path (the model's own forward) and says why."""
    torch.manual_seed(0)
    if net == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
        x = torch.randn(N, 4, dtype=DT)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(2, C)).to(DT)
        x = torch.randn(N, 1, 5, 5, dtype=DT)
    y = torch.randint(0, C, (N,))
    assert hessian_operator(model, F.cross_entropy, (x, y)).path == "fused"  # without the hook
    if hook == "forward":
        handle = model[0].register_forward_hook(lambda module, args, out: 2.0 * out)
    elif hook == "pre":
        handle = model[-1].register_forward_pre_hook(lambda module, args: (3.0 * args[0],))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: 1.5 * out if isinstance(module, nn.Linear) else None)
    try:
        H = hessian_operator(model, F.cross_entropy, (x, y))
        assert H.path == "generic" and "forward hook" in H.path_reason
        assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], F.cross_entropy)) <= 1e-10
    finally:
        handle.remove()


@pytest.mark.parametrize("change", ["replace", "replace_twice", "append", "register", "class"])
@pytest.mark.parametrize("build", ["fused", "generic", "ggn", "objective"])
def test_a_changed_module_tree_is_refused(change, build):
    """The operators and Objective read the parameters through the modules they found at construction:
    a submodule replaced (even by one of the same shape), appended, or a parameter registered after
    that was never seen (products 80% off, the cached graph of the old model reused). Now the next
    product, gradient or value raises ModelChanged naming the module. So does a module whose class is set to
    another (the Tanh made a Sigmoid: the same object, with settings that look alike, was taken for unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    if build == "objective":
        built = Objective(model, F.cross_entropy, (x, y), weight_decay=0.1)
        use = built.value_and_gradient
    else:
        built = (ggn_operator(model, F.cross_entropy, (x, y)) if build == "ggn"
                 else hessian_operator(model, F.cross_entropy, (x, y), path=build))
        use = built.gradient
        built.matvec(torch.ones(built.shape[0], dtype=DT))  # the cache is built
    if change.startswith("replace"):
        model[0] = nn.Linear(4, 5).to(DT)
        if change == "replace_twice":  # the first replacement freed: the next may take a freed module's id
            model[0] = nn.Linear(4, 5).to(DT)
        where = "'0'"
    elif change == "append":
        model.append(nn.Tanh())
        where = "'3'"
    elif change == "class":
        model[1].__class__ = nn.Sigmoid
        where = "'1'"
    else:
        model[1].register_parameter("gain", nn.Parameter(torch.ones((), dtype=DT)))
        where = "'1'"
    with pytest.raises(ModelChanged, match=f"the model's modules changed after .* \\(at module {where}:"):
        use()


def test_a_buffer_registered_by_the_forward_is_not_a_change():
    """A module that registers a buffer in its first forward (a cache) did nothing the operator must
    refuse; the tree check holds the modules and their parameters' names, not their buffers."""
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, C)

        def forward(self, x):
            if not hasattr(self, "seen"):
                self.register_buffer("seen", torch.ones((), dtype=x.dtype))
            return self.linear(x) * self.seen

    torch.manual_seed(0)
    model = Caching().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    H = hessian_operator(model, F.cross_entropy, (x, y))
    H.matvec(torch.ones(H.shape[0], dtype=DT))
    Objective(model, F.cross_entropy, (x, y)).value_and_gradient()


@pytest.mark.parametrize("build", ["fused", "generic", "objective"])
def test_training_mode_after_construction_is_refused(build):
    """model.train() after the operator or Objective was built: dropout made every product random, the
    fused and generic paths disagreed, and Objective's value wrote the caller's BatchNorm running
    statistics. Each call now refuses a module in training mode, as construction does."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, C)]
    if build == "objective":
        layers.insert(1, nn.BatchNorm1d(5))
    model = nn.Sequential(*layers).to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    built = (Objective(model, F.cross_entropy, (x, y)) if build == "objective"
             else hessian_operator(model, F.cross_entropy, (x, y), path=build))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with pytest.raises(ValueError, match=r"is in training mode"):
        built.value() if build == "objective" else built.matvec(torch.ones(built.shape[0], dtype=DT))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no running statistic written
    model.eval()  # back as it was: usable again
    built.value() if build == "objective" else built.matvec(torch.ones(built.shape[0], dtype=DT))


class _ScaledInTraining(nn.Module):
    """A module whose forward reads self.training (neither dropout nor BatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x if self.training else x


@pytest.mark.parametrize("path", ["fused", "generic", "ggn"])
def test_settings_changed_after_construction_are_refused(path):
    """The caches hold what was computed under the settings at construction: a module reading self.training
    put in training mode gave the old products (full cache) or a mix (partial), a label smoothing changed with
    half the batches cached gave exactly half of each, a BatchNorm's eps changed made the GGN asymmetric, a
    class weight set later was ignored by the fused paths. Each is refused at the next call."""
    torch.manual_seed(0)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    build = ggn_operator if path == "ggn" else functools.partial(hessian_operator, path=path)

    def refused(change, match, model=None, loss=None):
        model = model or nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
        loss = loss or nn.CrossEntropyLoss()
        op = build(model, loss, uneven_batches(x, y, 6))
        v = torch.randn(op.shape[0], dtype=DT)
        op.matvec(v)
        change(model, loss)
        with pytest.raises(ValueError, match=match):
            op.matvec(v)

    for attribute, value in (("label_smoothing", 0.3), ("ignore_index", 1)):
        refused(lambda model, loss: setattr(loss, attribute, value), r"the loss's settings .* changed after")
    refused(lambda model, loss: loss.register_buffer("weight", torch.ones(C, dtype=DT)), r"the loss's settings")
    if path != "fused":  # the fused MLP path takes neither module
        refused(lambda model, loss: model[1].train(), r"module '1' \(_ScaledInTraining\) was put in training mode",
                model=nn.Sequential(nn.Linear(4, 5), _ScaledInTraining(), nn.Tanh(), nn.Linear(5, C)).to(DT).eval())
        normed = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, C)).to(DT).eval()
        refused(lambda model, loss: setattr(model[1], "eps", 0.5),
                r"module '1' \(LayerNorm\) was given other settings \('\(5,\), eps=1e-05", model=normed)
    # a loss wrapping torch's (its settings were not read), a hook added after construction (left out of the
    # cached products, relative error 0.82), a partial's tensor keyword written in place (torch's autograd error)
    if path == "generic":  # the fused paths and the GGN take torch's losses only
        refused(lambda model, loss: setattr(loss.ce, "label_smoothing", 0.9), r"the loss's settings",
                loss=_WrapsCrossEntropy())
        weight = torch.ones(C, dtype=DT)
        refused(lambda model, loss: weight.mul_(2.0), r"the loss's settings",
                loss=functools.partial(F.cross_entropy, weight=weight))
    refused(lambda model, loss: model[2].register_forward_hook(lambda module, args, out: 3 * out),
            r"module '2' \(Linear\) was given a hook or its own forward")
    refused(lambda model, loss: loss.register_forward_hook(lambda module, args, out: 3 * out), r"the loss's settings")
    # a mode toggled and put back: nothing changed
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    op = build(model, F.cross_entropy, (x, y))
    v = torch.randn(op.shape[0], dtype=DT)
    first = op.matvec(v)
    model.train()
    model.eval()
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    # not refused: a loss of the user's own that counts its calls (the probes call it: every Newton method failed),
    # products inside FlopCounterMode (it registers global hooks to observe), a loss's backward hook registered and
    # removed (it leaves torch's private flag set)
    if path == "generic":  # the fused paths and the GGN take torch's losses only
        op = build(model, _LossCountingCalls(), (x, y))
        first = op.matvec(v)
        torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    loss = nn.CrossEntropyLoss()
    op = build(model, loss, (x, y))
    first = op.matvec(v)
    with FlopCounterMode(display=False):
        torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    loss.register_full_backward_hook(lambda module, grad_in, grad_out: None).remove()
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    # a module whose extra_repr shows its weights' values (a learnable temperature): a weight change is followed,
    # not refused as other settings (every product after a step failed)
    if path == "fused":  # the fused paths do not take such a module
        return
    tempered = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C), _Temperature()).to(DT).eval()
    op = build(tempered, F.cross_entropy, (x, y))
    op.matvec(v_t := torch.randn(op.shape[0], dtype=DT))
    set_flat_parameters(tempered, get_flat_parameters(tempered) + 0.01)
    fresh = build(tempered, F.cross_entropy, (x, y))
    torch.testing.assert_close(op.matvec(v_t), fresh.matvec(v_t), rtol=1e-12, atol=1e-14)


def _hvp_reference(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H v of the mean loss over (x, y) w.r.t. all the model's parameters, by torch.autograd.functional.hvp on
    float64 copies of the model and the loss (an independent float64 reference)."""
    model, loss_fn = copy.deepcopy(model).double(), copy.deepcopy(loss_fn)
    if isinstance(loss_fn, nn.Module):
        loss_fn.double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x = x.double() if x.is_floating_point() else x

    def objective(w):
        return loss_fn(functional_call(model, dict(zip(names, unflatten_vector(w, shapes))), (x,)), y)

    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hvp(objective, w0, v.double())[1]


class _TemperedCE(nn.Module):
    """Cross entropy of the outputs times a learnable temperature of the loss's own."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.0, dtype=DT))

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out * self.t, y)


@pytest.mark.parametrize("write", ["data", "no_grad"])
def test_a_loss_parameter_changed_after_construction_is_refused(write):
    """The loss's own parameters were not watched (only its buffers): a temperature doubled through .data after
    the first product gave cached products 0.31 (relative) off the float64 Hessian-vector product, and one doubled
    in place under no_grad torch's raw "modified by an inplace operation" from the kept graphs. The loss's
    parameters are settings the caches hold, as a class weight is: refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(40, 4, dtype=DT), torch.randint(0, C, (40,))
    loss = _TemperedCE()
    op = hessian_operator(model, loss, (x, y), batch_size=8, path="generic")
    v = torch.randn(op.shape[0], dtype=DT)
    assert relative_error(op.matvec(v), _hvp_reference(model, loss, x, y, v)) <= 1e-12
    if write == "data":
        loss.t.data.mul_(2.0)
    else:
        with torch.no_grad():
            loss.t.mul_(2.0)
    with pytest.raises(ValueError, match=r"GenericHessian: the loss's settings \(.*its parameters or buffers"):
        op.matvec(v)
    fresh = hessian_operator(model, loss, (x, y), batch_size=8, path="generic")  # the new temperature's
    assert relative_error(fresh.matvec(v), _hvp_reference(model, loss, x, y, v)) <= 1e-12


class _EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


@pytest.mark.parametrize("build", [functools.partial(hessian_operator, path="generic"), ggn_operator])
def test_settings_no_extra_repr_shows_are_refused_when_changed(build):
    """torch.nn's modules' settings were read from their extra_repr only, which is empty for a
    TransformerEncoderLayer and a MultiheadAttention: norm_first set after the first product gave cached products
    0.97 (relative) off the float64 Hessian-vector product, without a word. Their public plain attributes are
    watched too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _EncoderClassifier().to(DT).eval()
    x, y = torch.randn(12, 3, 4, dtype=DT), torch.randint(0, C, (12,))
    op = build(model, F.cross_entropy, (x, y), batch_size=4)
    v = torch.randn(op.shape[0], dtype=DT)
    if build is not ggn_operator:
        with sdpa_kernel(SDPBackend.MATH):  # the reference differentiates twice through attention
            assert relative_error(op.matvec(v), _hvp_reference(model, F.cross_entropy, x, y, v)) <= 1e-10
    op.matvec(v)
    model.enc.norm_first = True
    with pytest.raises(ValueError, match=re.escape("module 'enc' (TransformerEncoderLayer) was given other settings "
                                                   "(norm_first=False, now True)")):
        op.matvec(v)
    model.enc.norm_first = False  # back as it was: usable again
    op.matvec(v)
    model.enc.self_attn.batch_first = False
    with pytest.raises(ValueError, match=re.escape("module 'enc.self_attn' (MultiheadAttention) was given other "
                                                   "settings (batch_first=True, now False)")):
        op.matvec(v)


class _LossCountingCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.cross_entropy(out, y)


class _WrapsCrossEntropy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ce(out, y)


class _Temperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(1.5))

    def extra_repr(self) -> str:
        return f"t={self.t.item():.4f}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.t


@pytest.mark.parametrize("weighted", ["module", "partial"])
@pytest.mark.parametrize("first", [False, True])
def test_a_batch_whose_classes_all_weigh_zero_contributes_zero(weighted, first):
    """Class weights of 0 (a forgotten class): a batch whose labels all weigh 0 has torch's mean 0/0, and its
    gradient NaN: matvec, gradient and Objective.value() returned NaN; as the first batch, construction failed
    with "the gradient ... contains NaN or Inf". It now counts as a batch of ignore_index rows does: zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    weight = torch.ones(C, dtype=DT)
    weight[0] = 0.0
    loss = (nn.CrossEntropyLoss(weight=weight) if weighted == "module"
            else functools.partial(F.cross_entropy, weight=weight))
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(1, C, (N,))
    y[:5] = 0
    y[5] = -100  # ignored and zero-weight rows together
    counted, zero = (x[6:], y[6:]), (x[:6], y[:6])
    batches = [zero, counted] if first else [counted, zero]
    H = hessian_operator(model, loss, batches)
    share = (N - 6) / N  # the zero batch's rows still count in the weights n_b / N
    assert relative_error(H.to_dense(), dense_hessian(model, [counted], loss) * share) <= 1e-10
    assert relative_error(H.gradient(), dense_gradient(model, [counted], loss) * share) <= 1e-10
    objective = Objective(model, loss, batches)
    assert objective.value() == pytest.approx(loss(model(counted[0]), counted[1]).item() * share, rel=1e-12)
    assert relative_error(objective.gradient(), dense_gradient(model, [counted], loss) * share) <= 1e-10


def test_probes_skip_a_first_batch_of_ignored_rows():
    """The construction probes compare derivatives (two gradients; double backward against
    forward-over-reverse): on a first batch whose rows are all ignore_index every derivative is zero,
    so they passed whatever the model did (a noise layer's random products were accepted). They now
    take the first batch with a row the loss counts."""
    class Noise(nn.Module):
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Noise(), nn.Tanh(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    y[:4] = -100
    with pytest.raises(ValueError, match="two gradient evaluations on the same batch differ"):
        hessian_operator(model, F.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])
    deterministic = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    H = hessian_operator(deterministic, F.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])], path="generic")
    assert relative_error(H.to_dense(), dense_hessian(deterministic, [(x[4:], y[4:])], F.cross_entropy) * (N - 4) / N) <= 1e-10


def test_a_backward_hook_is_named_when_torch_func_cannot_run():
    """torch.func's gradient fails on a module with a full backward hook, with a message about
    autograd.Function's setup_context that names neither; the refusal now names the hooked module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    handle = model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    try:
        for build in (lambda: hessian_operator(model, F.cross_entropy, (x, y), path="generic"),
                      lambda: ggn_operator(model, F.cross_entropy, (x, y))):
            with pytest.raises(ValueError, match=r"module '2' has a backward hook or backward pre-hook, which "
                                                 r"torch.func cannot run through"):
                build()
    finally:
        handle.remove()
    hessian_operator(model, F.cross_entropy, (x, y), path="generic")  # without it


@pytest.mark.parametrize("register", ["register_hook", "register_post_accumulate_grad_hook"])
def test_a_gradient_hook_on_a_differentiated_parameter_is_refused(register):
    """The operators differentiate the loss functionally and never ran a parameter's gradient hook: a hook that
    masks rows of a weight left CureNewton and the other Newton methods moving those rows (0.48 on a hooked
    first layer). Refused by name on every path; a hooked parameter that is not differentiated is fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    handle = getattr(model[0].weight, register)(lambda grad: None)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    try:
        for build in (lambda: hessian_operator(model, F.cross_entropy, (x, y)),
                      lambda: hessian_operator(model, F.cross_entropy, (x, y), path="generic"),
                      lambda: ggn_operator(model, F.cross_entropy, (x, y))):
            with pytest.raises(ValueError, match=r"parameter '0.weight' has a gradient hook \(register_hook or "
                                                 r"register_post_accumulate_grad_hook\), which the curvature's"):
                build()
        last = ["2.weight", "2.bias"]
        H = hessian_operator(model, F.cross_entropy, (x, y), params=last)
        assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], F.cross_entropy, last)) <= 1e-10
    finally:
        handle.remove()
    hessian_operator(model, F.cross_entropy, (x, y))  # without it


def test_objective_refuses_parameters_whose_dtype_changed():
    """model.float() after an Objective was built: its value and gradient failed with torch's "mat1 and
    mat2 must have the same dtype"; now ModelChanged, as for the operators (one check, in ParameterSlots)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    objective = Objective(model, F.cross_entropy, (x, y))
    model.float()
    with pytest.raises(ModelChanged, match=r"the model's parameter '0.weight' is now \(5, 4\), torch.float32 on "
                                           r"cpu \(was \(5, 4\), torch.float64 on cpu\)"):
        objective.value()


def test_meta_model_or_data_is_refused_by_name():
    """A model or data on the meta device (shapes, no values): torch's "Cannot copy out of meta tensor"
    from the weights check, or ".item() cannot be called on meta tensors", before; now one message."""
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
    x, y = torch.randn(N, 4), torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match=r"the model's parameter '0.weight' is on the meta device"):
        hessian_operator(meta, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match=r"^Objective: the model's parameter '0.weight' is on the meta device"):
        Objective(meta, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match="a batch is on the meta device"):
        hessian_operator(nn.Linear(4, C), F.cross_entropy, (x.to("meta"), y.to("meta")))


def test_numpy_data_is_refused_with_the_conversion():
    """(numpy x, numpy y) said only "got ndarray"; LabeledData's own refusal names torch.as_tensor."""
    x, y = np.zeros((N, 4), np.float32), np.zeros(N, np.int64)
    for data in ((x, y), [(x, torch.from_numpy(y))]):
        with pytest.raises(TypeError, match=r"an \(x, y\) pair of tensors, got \w+ \(torch.as_tensor converts numpy"):
            hessian_operator(nn.Linear(4, C), F.cross_entropy, data)
    with pytest.raises(TypeError, match=r"pair of tensors, got tuple$"):
        hessian_operator(nn.Linear(4, C), F.cross_entropy, [(1, 2, 3)])


def test_partial_cross_entropy_ignore_index():
    """A functools.partial of F.cross_entropy with its own ignore_index: a batch of ignored rows is a
    zero term of Objective's value (it was NaN), as it is of the gradient and the operators."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    y[:4] = -1
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    plain = Objective(model, nn.CrossEntropyLoss(ignore_index=-1), batches).value_and_gradient()
    partial = Objective(model, functools.partial(F.cross_entropy, ignore_index=-1), batches).value_and_gradient()
    assert math.isfinite(partial[0]) and partial[0] == pytest.approx(plain[0], rel=1e-14)
    torch.testing.assert_close(partial[1], plain[1], rtol=1e-14, atol=1e-16)


def test_fused_mlp_declines_a_weight_that_is_a_buffer():
    """A Linear whose weight was re-registered as a buffer (frozen as a constant): the fused MLP path
    once failed in its support check with a bare KeyError; "auto" now runs the generic path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    weight = model[0].weight.detach().clone()
    del model[0].weight
    model[0].register_buffer("weight", weight)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    H = hessian_operator(model, F.cross_entropy, (x, y))
    assert H.path == "generic" and "not a Parameter" in H.path_reason
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], F.cross_entropy)) <= 1e-10


@pytest.mark.parametrize("path", ["generic", "reverse-over-reverse", "fused", "ggn"])
def test_non_finite_data_after_the_first_batch(path):
    """NaN/Inf in a later batch: tensor data is checked in full at construction; a list or loader of
    batches fails the product or gradient that reads the bad batch (it once gave NaN silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    x_bad = x.clone()
    x_bad[9, 2] = float("nan")

    def build(data, **options):
        if path == "ggn":
            return ggn_operator(model, F.cross_entropy, data, **options)
        mode = "reverse-over-reverse" if path == "reverse-over-reverse" else "forward-over-reverse"
        return hessian_operator(model, F.cross_entropy, data, path="fused" if path == "fused" else "generic",
                                mode=mode, **options)

    with pytest.raises(ValueError, match=r"^the data's inputs x contain NaN or Inf \(first at row 9\)$"):
        build((x_bad, y), batch_size=4)
    with pytest.raises(ValueError, match=r"^the data's inputs x contain NaN or Inf \(first at row 9\)$"):
        Objective(model, F.cross_entropy, LabeledData(x_bad, y), batch_size=4)
    op = build(uneven_batches(x_bad, y))  # the first batch is fine
    message = r"^batch 2 of the data: its inputs x contain NaN or Inf \(first at row 1, counted within the batch\)$"
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):  # also once the first batches are cached
        with pytest.raises(ValueError, match=message):
            op.matvec(v)
    with pytest.raises(ValueError, match=message):
        op.gradient()
    with pytest.raises(ValueError, match=message):
        Objective(model, F.cross_entropy, uneven_batches(x_bad, y)).value()


@pytest.mark.parametrize("path", ["auto", "generic", "ggn"])
def test_data_the_model_or_loss_rejects_is_named_as_such(path):
    """Wrong label dtypes or shapes and wrong input dtypes or widths are reported as what they are,
    not as a loss that cannot be differentiated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, C)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))

    def build(data):
        if path == "ggn":
            return ggn_operator(model, F.cross_entropy, data)
        return hessian_operator(model, F.cross_entropy, data, path=path)

    for bad_y, says in ((y.int(), "expected target dtype"), (y.to(DT), "expected target dtype"),
                        (y[:, None], "target tensor expected")):
        expected = (f"the loss rejects the targets y (shape {tuple(bad_y.shape)}, {bad_y.dtype}) with the model's "
                    f"outputs (shape ({N}, {C})): ")
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}.*{says}"):
            build((x, bad_y))
    for bad_x, says in ((x.float(), "dtype"), (torch.randn(N, 6, dtype=DT), "shapes cannot be multiplied")):
        expected = (f"the model cannot run on the data (inputs x of shape {tuple(bad_x.shape)}, {bad_x.dtype}; "
                    f"parameters {DT}): ")
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}.*{says}"):
            build((bad_x, y))


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, C).to(DT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inner(x)
        return out, out


def test_a_tuple_output_under_mse_is_named_as_the_loss_rejecting_it():
    # MSE's AttributeError ('tuple' object has no attribute 'size') escaped as a raw torch error
    x, y = torch.randn(N, 4, dtype=DT), torch.randn(N, C, dtype=DT)
    expected = f"the loss rejects the targets y (shape {(N, C)}, {DT}) with the model's outputs (shape tuple)"
    for build in (lambda: hessian_operator(_TupleOut(), nn.MSELoss(), (x, y)),
                  lambda: ggn_operator(_TupleOut(), nn.MSELoss(), (x, y)),
                  lambda: Objective(_TupleOut(), nn.MSELoss(), (x, y))):
        with pytest.raises(ValueError, match=re.escape(expected)):
            build()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_data_written_in_place_after_construction_is_refused(kind):
    """A cached fused MLP product mixed old activations with the new inputs (relative error 4.4 against the
    old data, 0.75 against the new), the fused conv one kept the old data, the generic cached graphs
    failed inside autograd, the uncached paths read NaN written there unchecked."""
    model, x, y = _fused_problem(kind)
    builds = {"auto": lambda d: hessian_operator(model, F.cross_entropy, d),
              "generic": lambda d: hessian_operator(model, F.cross_entropy, d, path="generic"),
              "forward-over-reverse": lambda d: hessian_operator(model, F.cross_entropy, d, path="generic",
                                                                 mode="forward-over-reverse"),
              "uncached": lambda d: hessian_operator(model, F.cross_entropy, d, cache_bytes=0),
              "ggn": lambda d: ggn_operator(model, F.cross_entropy, d)}
    for name, build in builds.items():
        data = (x.clone(), y.clone())
        op = build(LabeledData(*data) if name == "ggn" else data)
        v = torch.randn(op.shape[0], dtype=op.dtype)
        op.matvec(v)
        data[0].mul_(3)
        for call in (lambda: op.matvec(v), op.gradient):
            with pytest.raises(ValueError, match=f"^{type(op).__name__}: the data \\(inputs x\\) was written in "
                                                 "place after it was built"):
                call()
    data = (x.clone(), y.clone())
    objective = Objective(model, F.cross_entropy, data)
    data[1][0] = (data[1][0] + 1) % C
    with pytest.raises(ValueError, match=r"^Objective: the data \(targets y\) was written in place"):
        objective.value()
    with torch.inference_mode():  # inference tensors keep no version counter
        frozen = (x.clone(), y.clone())
    assert torch.isfinite(hessian_operator(model, F.cross_entropy, frozen).gradient()).all()
    # a list of tensor batches is the caller's tensors too
    batches = [(x[:5].clone(), y[:5].clone()), (x[5:].clone(), y[5:].clone())]
    op = hessian_operator(model, F.cross_entropy, batches)
    batches[1][0].mul_(3)
    with pytest.raises(ValueError, match=r"the data \(batch 1's inputs x\) was written in place"):
        op.gradient()
    # a tuple of batches, and a DataLoader over a TensorDataset (its batches are new tensors every pass, the
    # cached fused product was not): off by 0.56 and 0.86 without a word
    from torch.utils.data import DataLoader, TensorDataset

    for data, where in ((tuple((x[i:i + 5].clone(), y[i:i + 5].clone()) for i in (0, 5)), "batch 1's inputs x"),
                        (DataLoader(TensorDataset(x.clone(), y.clone()), batch_size=5), "the DataLoader's dataset "
                                                                                         "tensor 0")):
        op = hessian_operator(model, F.cross_entropy, data)
        tensor = data[1][0] if isinstance(data, tuple) else data.dataset.tensors[0]
        tensor[-1].mul_(3)
        with pytest.raises(ValueError, match=re.escape(f"the data ({where}) was written in place")):
            op.gradient()


def test_running_statistics_made_in_inference_mode_are_taken():
    # weights_key read their version counter: torch's "Inference tensors do not track version counter"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    with torch.inference_mode():
        stats = (torch.zeros(5, dtype=DT), torch.ones(5, dtype=DT))
    model[1].running_mean, model[1].running_var = stats
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    plain = copy.deepcopy(model)
    plain[1].running_mean, plain[1].running_var = (t.clone() for t in stats)
    reference = dense_gradient(plain, [(x, y)], F.cross_entropy)
    # the operators run on copies of the buffers; the Objective's value runs the model itself (its gradient
    # meets torch's own refusal to save inference tensors for backward)
    assert relative_error(hessian_operator(model, F.cross_entropy, (x, y)).gradient(), reference) <= 1e-12
    assert Objective(model, F.cross_entropy, (x, y)).value() == pytest.approx(
        F.cross_entropy(plain(x), y).item(), rel=1e-12)


class _Doubles(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2.0)


@pytest.mark.parametrize("batch_size", [None, 8])
def test_a_model_that_writes_its_inputs_in_place_is_not_taken_for_changed_data(batch_size):
    # ReLU(inplace=True) as the first module writes x at every forward, the construction's probes too: the
    # version check refused the first product ("written in place after it was built"), where it worked before;
    # then, with chunks of one tensor (batch_size), the write to the second chunk invalidated the first's
    # cached gradient graph (they share a version counter): the second product failed inside torch's autograd.
    # The passes get copies of the batches: the caller's data is never written, and stays watched.
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    saved = x.clone()
    # a write that is not idempotent (x.mul_(2)): the probes' evaluations each get a copy too (two gradients
    # on one written copy differed: refused as "random")
    doubling = nn.Sequential(_Doubles(), nn.Linear(4, C)).to(DT).eval()
    H = hessian_operator(doubling, F.cross_entropy, (x, y), batch_size=batch_size).to_dense()
    assert relative_error(H, dense_hessian(doubling[1], [(2 * x, y)], F.cross_entropy)) <= 1e-10
    reference = dense_hessian(model, [(x.relu(), y)], F.cross_entropy)
    for path in ("auto", "generic"):
        op = hessian_operator(model, F.cross_entropy, (x, y), path=path, batch_size=batch_size)
        v = torch.randn(op.shape[0], dtype=DT)
        torch.testing.assert_close(op.matvec(v), op.matvec(v), rtol=0, atol=0)
        assert relative_error(op.to_dense(), reference) <= 1e-10
    objective = Objective(model, F.cross_entropy, (x, y), batch_size=batch_size)
    assert objective.value() == pytest.approx(F.cross_entropy(model(x.relu()), y).item(), rel=1e-12)
    assert torch.equal(x, saved)  # negative entries: a write would show
    with torch.no_grad():
        x[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"the data \(inputs x\) was written in place after it was built"):
        op.matvec(v)


@pytest.mark.parametrize("batch_size", [None, 8])
def test_the_torch_func_products_of_a_model_that_writes_its_inputs(batch_size):
    """The GGN refused such a model at construction (torch.func's "in-place operation ... would mutate a
    captured Tensor", reported as a missing derivative), and forward-over-reverse fell back to double backward
    with a warning: their transforms captured the batch the forward then wrote. Given copies, the GGN also ran
    its forwards on the batch its cache had written once already (0.41 off for x.mul_(2))."""
    torch.manual_seed(0)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    saved = x.clone()
    for first, applied in ((nn.ReLU(inplace=True), x.relu()), (_Doubles(), 2 * x)):
        model = nn.Sequential(first, nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
        G = ggn_operator(model, F.cross_entropy, (x, y), batch_size=batch_size)
        assert relative_error(G.to_dense(), dense_ggn(model[1:], [(applied, y)], F.cross_entropy)) <= 1e-10
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to another mode
            H = hessian_operator(model, F.cross_entropy, (x, y), mode="forward-over-reverse", batch_size=batch_size)
        assert H.mode == "forward-over-reverse"
        assert relative_error(H.to_dense(), dense_hessian(model[1:], [(applied, y)], F.cross_entropy)) <= 1e-10
    assert torch.equal(x, saved)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_uint8_labels_work_on_the_fused_paths(kind):
    """Cross entropy and the generic path accept uint8 labels, so path='auto' (which picks the fused
    path here) and path='fused' take them too, as int64."""
    model, x, y = _fused_problem(kind)
    ref = dense_hessian(model, [(x, y)], F.cross_entropy)
    grad = dense_gradient(model, [(x, y)], F.cross_entropy)
    for data, options in (((x, y.to(torch.uint8)), {}), ((x, y.to(torch.uint8)), {"cache_bytes": 0}),
                          (uneven_batches(x, y.to(torch.uint8)), {})):
        for path in ("auto", "fused"):
            H = hessian_operator(model, F.cross_entropy, data, path=path, **options)
            assert H.path == "fused"
            assert relative_error(H.to_dense(), ref) <= 1e-10 and relative_error(H.gradient(), grad) <= 1e-12


def test_missing_forward_mode_falls_back_to_double_backward():
    model, x, y = make("mlp")
    square = square_function(differentiable_backward=True)

    def loss(out, target):
        return square.apply(out - F.one_hot(target, C)).mean()

    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        H = hessian_operator(model, loss, (x, y), path="generic", mode="forward-over-reverse")
    assert H.mode == "reverse-over-reverse"
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], loss)) <= 1e-10
    # mode="auto" takes double backward, checked by finite differences (no forward mode to compare with).
    auto = hessian_operator(model, loss, (x, y), path="generic")
    assert auto.mode == "reverse-over-reverse" and auto.num_gradients > 2
    assert relative_error(auto.to_dense(), dense_hessian(model, [(x, y)], loss)) <= 1e-10


def test_requested_reverse_mode_is_checked_and_needs_no_forward_mode():
    model, x, y = make("mlp")
    no_jvp = square_function(differentiable_backward=True)  # double backward only: checked by finite differences
    H = hessian_operator(model, lambda out, t: no_jvp.apply(out - F.one_hot(t, C)).mean(), (x, y), path="generic",
                         mode="reverse-over-reverse")
    assert H.mode == "reverse-over-reverse"
    once = square_function(differentiable_backward=False)
    with pytest.raises(ValueError, match="not twice differentiable"):
        hessian_operator(model, lambda out, t: once.apply(out).mean(), (x, y), path="generic",
                         mode="reverse-over-reverse")


def test_fallback_check_survives_relu_kinks_in_float32():
    # A central difference of a ReLU MLP's gradient crosses kinks (relative error ~1 in float64 at the
    # default step) and in float32 drowns in rounding; the check must still accept the exact products.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 256), nn.ReLU(), nn.Linear(256, 3))
    x, y = torch.randn(512, 6), torch.randint(0, 3, (512,))
    square = square_function(differentiable_backward=True)

    def loss(out, target):
        return square.apply(out - F.one_hot(target, 3).to(out.dtype)).mean()

    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        H = hessian_operator(model, loss, (x, y), path="generic", mode="forward-over-reverse")
    H64 = hessian_operator(copy.deepcopy(model).double(), loss, (x.double(), y), path="generic",
                           mode="reverse-over-reverse")
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2))
    assert relative_error(H.matvec(v).double(), H64.matvec(v.double())) <= 1e-5


class _SquareDroppingCurvature(Square):
    """x^2 whose backward runs under no_grad: double backward runs without an error and silently drops the
    curvature through x; the jvp is right, so forward-over-reverse is exact."""

    generate_vmap_rule = True

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return 2 * x * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * x * tangent


def test_double_backward_that_drops_curvature_is_caught():
    """mode="auto" checks double backward against forward-over-reverse on the probe batch: the dropped
    curvature shows, the operator runs forward-over-reverse, exact, and keeps no gradient graph;
    mode="reverse-over-reverse" is refused."""
    model, x, y = make("mlp", n=200)

    def loss(out, target):
        return _SquareDroppingCurvature.apply(out - F.one_hot(target, C).to(out.dtype)).mean()

    def plain(out, target):
        return (out - F.one_hot(target, C).to(out.dtype)).square().mean()

    H = hessian_operator(model, loss, (x, y), path="generic")
    assert H.mode == "forward-over-reverse" and "disagrees" in H.mode_reason
    assert H.cached_batches == 0 and H.cached_bytes == 0
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], plain)) <= 1e-10
    with pytest.raises(ValueError, match="double backward disagrees with forward-over-reverse"):
        hessian_operator(model, loss, (x, y), path="generic", mode="reverse-over-reverse")


class _SquareDetachedInput(_SquareDroppingCurvature):
    """The same x^2 whose backward reads its input detached: double backward and forward-over-reverse (which
    differentiates the same backward) both drop the curvature through x, and agree."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x.detach() * grad


class _SquareOnceWithJvp(_SquareDetachedInput):
    """The same with a backward marked @once_differentiable: double backward drops its curvature, and so does
    forward-over-reverse through it."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquareActivation(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x)


@pytest.mark.parametrize("function", [_SquareDetachedInput, _SquareOnceWithJvp])
def test_a_custom_function_whose_curvature_no_mode_computes_is_refused_in_every_mode(function):
    """As a hidden activation, with a detached input mode "auto" took double backward as exact ("checked on the
    first batch": it agreed with forward-over-reverse) and every mode was 33% off; with @once_differentiable,
    "auto" fell back to forward-over-reverse, 72% off, which the refusal of "reverse-over-reverse" advised. Where
    a custom Function runs, the products are checked against finite differences of the gradient: every mode is
    refused."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), _SquareActivation(function), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    for mode in ("auto", "reverse-over-reverse", "forward-over-reverse"):
        with pytest.raises(ValueError, match="not twice differentiable|disagrees with forward-over-reverse"):
            hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic", mode=mode)



class _Reverse(torch.autograd.Function):
    """A gradient reversal layer (domain-adversarial training): identity forward, negated backward, with the
    forward-mode and vmap support torch.func needs. Its "Hessian" is the Jacobian of a field that is no gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return -grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


class _VmappedCube(_Cube):
    """x^3 with its true backward and jvp, and a vmap rule: a custom Function whose curvature is symmetric."""

    generate_vmap_rule = True


class _CubeActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x ** 3


@pytest.mark.parametrize("build", [
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic"),
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic", mode="forward-over-reverse"),
    lambda m, d: ggn_operator(m, F.cross_entropy, d),
], ids=["auto", "forward-over-reverse", "ggn"])
def test_a_custom_function_that_makes_the_curvature_non_symmetric_is_refused(build):
    """With a gradient reversal layer the generic operator (forward-over-reverse) and the GGN were built without a
    word, their dense matrices 160% and 93% from symmetric (|A - A^T| / |A|): Lanczos and the cubic solvers would
    run on them. The construction checks (A v)^T (A v) = v^T A (A v) where a custom Function runs; a custom
    Function with a true backward passes (one more product) and gives the plain model's matrix."""
    torch.manual_seed(0)
    layers = [nn.Linear(5, 6), nn.Tanh(), None, nn.Linear(6, 3)]
    x, y = torch.randn(30, 5, dtype=DT), torch.randint(0, 3, (30,))
    reversed_model = nn.Sequential(*layers[:2], _SquareActivation(_Reverse), layers[3]).to(DT)
    with pytest.raises(ValueError, match=r"the curvature is not symmetric on the probe batch: .* \(a gradient "
                                         r"reversal layer\?\)"):
        build(reversed_model, (x, y))
    cubed = nn.Sequential(*layers[:2], _SquareActivation(_VmappedCube), layers[3]).to(DT)
    plain = nn.Sequential(*layers[:2], _CubeActivation(), layers[3]).to(DT)
    checked, reference = build(cubed, (x, y)), build(plain, (x, y))
    assert checked.num_products == reference.num_products + 1
    torch.testing.assert_close(checked.to_dense(), reference.to_dense(), rtol=1e-10, atol=1e-12)


class _CheckpointedNet(nn.Module):
    """A hidden layer under activation checkpointing (non-reentrant: the recomputation in the backward runs the
    module with its own parameters, not the operator's leaves)."""

    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        self.hidden, self.out, self.checkpointed = nn.Linear(5, 6), nn.Linear(6, 3), checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def block(t: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.hidden(t))

        h = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.out(h)


def test_activation_checkpointing_is_named_where_the_hessian_refuses_it():
    """Double backward through the recomputation drops curvature (it disagrees with finite differences) and
    torch.func refuses its saved-tensor hooks, so every mode of the generic Hessian is refused; the message blamed
    custom Functions alone and now names checkpointing. The GGN needs first derivatives only: it runs, exact."""
    torch.manual_seed(0)
    model = _CheckpointedNet().to(DT)
    x, y = torch.randn(30, 5, dtype=DT), torch.randint(0, 3, (30,))
    for mode in ("auto", "reverse-over-reverse", "forward-over-reverse"):
        with pytest.raises(ValueError, match=r"activation checkpointing, torch.utils.checkpoint, is not twice "
                                             r"differentiable here: turn it off"):
            hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic", mode=mode)
    plain = _CheckpointedNet(checkpointed=False).to(DT)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(ggn_operator(model, nn.CrossEntropyLoss(), (x, y)).to_dense(),
                               ggn_operator(plain, nn.CrossEntropyLoss(), (x, y)).to_dense(), rtol=1e-12, atol=1e-14)

def _hinge_terms(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    zy = z.gather(1, y[:, None])
    return (1 + z - zy).clamp_min(0).scatter(1, y[:, None], 0.0)


class _SquaredHingeOnce(torch.autograd.Function):
    """The mean squared multiclass hinge loss with a backward that is not differentiable."""

    @staticmethod
    def forward(z, y):
        return _hinge_terms(z, y).square().sum() / z.shape[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, y = inputs
        ctx.save_for_backward(_hinge_terms(z, y), y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        m, y = ctx.saved_tensors
        dz = 2 * m / m.shape[0]
        return g * dz.scatter(1, y[:, None], -dz.sum(1, keepdim=True)), None


def test_the_check_covers_the_whole_probe_batch():
    """The check ran on the probe batch's first 32 rows for a while (2026-12-05): a loss whose curvature is
    zero there (rows inside a hinge margin) hid a backward that is not differentiable (the Hessian off by
    1.0, no error), and a loss that runs on whole batches only (per-row weights in a closure) was refused
    as "not twice differentiable". The whole probe batch is checked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT).eval()
    with torch.no_grad():
        model[2].weight.mul_(6)
        pool = torch.randn(2000, 5, dtype=DT)
        top2 = model(pool).topk(2, dim=1).values
        confident = pool[(top2[:, 0] - top2[:, 1]) > 1.5][:32]  # inside the margin: zero loss, zero curvature
        x = torch.cat([confident, torch.randn(96, 5, dtype=DT)])
        y = torch.cat([model(confident).argmax(1), torch.randint(0, 3, (96,))])
    with pytest.raises(ValueError, match="not twice differentiable"):
        hessian_operator(model, lambda z, t: _SquaredHingeOnce.apply(z, t), (x, y), path="generic")
    weights = torch.rand(len(y), dtype=DT) + 0.5

    def weighted(out, target):  # runs on the whole batch only
        return (F.cross_entropy(out, target, reduction="none") * weights).mean()

    H = hessian_operator(model, weighted, (x, y), path="generic")
    assert H.mode == "reverse-over-reverse" and H.cached_batches == 1
    assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], weighted)) <= 1e-10


def test_loss_that_is_not_twice_differentiable():
    model, x, y = make("mlp")
    square = square_function(differentiable_backward=False)

    def loss(out, target):
        return square.apply(out).mean()

    with pytest.raises(ValueError, match="not twice differentiable"):
        hessian_operator(model, loss, (x, y), path="generic")


def test_bad_inputs_raise_clear_errors():
    model, x, y = make("mlp")
    loss = nn.CrossEntropyLoss()
    op = ggn_operator(model, loss, (x, y))
    d = op.shape[0]
    with pytest.raises(ValueError, match=rf"shape \({d},\)"):
        op.matvec(torch.ones(d + 1, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.ones(d, 1, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.ones(d, 0, dtype=DT))
    with pytest.raises(TypeError, match="dtype"):
        op.matvec(torch.ones(d, dtype=torch.float32))
    with pytest.raises(ValueError, match="is on meta"):
        op.matvec(torch.ones(d, dtype=DT, device="meta"))
    with pytest.raises(ValueError, match="NaN"):
        op.matvec(torch.full((d,), float("nan"), dtype=DT))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op.matvec(np.ones(d))
    assert op.num_products == 1 and op.num_data_passes == 0  # the construction probe only
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"^to_dense: chunk_size must be an int >= 1, got {bad!r}$"):
            op.to_dense(bad)
    assert op.num_products == 1  # refused before any product
    for bad in (nn.L1Loss(), nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(weight=torch.ones(C, dtype=DT))):
        with pytest.raises(ValueError, match="ggn_operator"):
            ggn_operator(model, bad, (x, y))
    with pytest.raises(ValueError, match="scalar"):
        hessian_operator(model, nn.CrossEntropyLoss(reduction="none"), (x, y), path="generic")
    with pytest.raises(TypeError, match="one-shot iterator"):
        hessian_operator(model, loss, (b for b in [(x, y)]), path="generic")
    with pytest.raises(TypeError, match="data must be"):
        hessian_operator(model, loss, x, path="generic")
    with pytest.raises(ValueError, match="empty"):
        hessian_operator(model, loss, [], path="generic")
    with pytest.raises(ValueError, match="path must be"):
        hessian_operator(model, loss, (x, y), path="fast")
    for bad in (0, True, 2.0):  # True was once taken for batches of one row
        with pytest.raises(ValueError, match=f"batch_size must be an int >= 1, got {bad!r}"):
            hessian_operator(model, loss, (x, y), batch_size=bad, path="generic")
    with pytest.raises(ValueError, match="mix dtypes"):
        hessian_operator(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, C).to(DT)), loss, (x, y), path="generic")


# ----------------------------------------------------------------------------- fixed-weight cache
class _CountingBatches(list):
    """A list of batches that counts how often it is iterated (passes over the data)."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def _operators(kind: str, model, loss, batches, **options) -> CurvatureOperator:
    if kind == "ggn":
        return ggn_operator(model, loss, batches, **options)
    return hessian_operator(model, loss, batches, path="generic", mode=kind, **options)


@pytest.mark.parametrize("kind", ["reverse-over-reverse", "ggn"])
@pytest.mark.parametrize("name", ["mlp", "layernorm", "cnn"])
def test_cached_products_equal_uncached_ones(kind, name):
    model, x, y = make(name, seed=11, n=14)
    loss = nn.CrossEntropyLoss()
    batches = _CountingBatches(uneven_batches(x, y, size=5))
    cached = _operators(kind, model, loss, batches)
    streamed = _operators(kind, model, loss, batches, cache_bytes=0)
    # the construction probe's graph (or forward) of the first batch is kept: the first product does not rebuild it
    assert cached.cached_batches == 1 and cached.cache_bytes > 0 and streamed.cached_batches == 0
    V = torch.randn(cached.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(4))
    expected = streamed.matmat(V)
    first = cached.matmat(V)  # builds the cache
    assert cached.cached_batches == 3 and cached.cached_bytes > 0 and streamed.cached_batches == 0
    passes = batches.passes
    again = cached.matmat(V)  # from the cache alone: the data is not read
    assert batches.passes == passes
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cached.matvec(V[:, 1]), expected[:, 1], rtol=1e-12, atol=1e-14)
    if kind != "ggn":
        torch.testing.assert_close(cached.gradient(), streamed.gradient(), rtol=1e-12, atol=1e-14)
        assert relative_error(cached.to_dense(), dense_hessian(model, batches, loss)) <= 1e-10


class _MaskedNet(nn.Module):
    """An additive mask buffer holding -inf: its sum stays -inf whatever its finite entries are."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 5), nn.Linear(5, C)
        self.register_buffer("mask", torch.tensor([0.0, 0.0, -math.inf, 0.5, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(x) + self.mask).nan_to_num(neginf=-1.0))


def _unseen_write_problems():
    """(name, model, x, path, write): writes that keep every version counter, data pointer and sum."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, C)).to(DT).eval()
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    with torch.no_grad():  # values whose float64 sums are exact, so a permutation keeps them
        conv[2].weight.copy_(torch.randint(-2, 3, conv[2].weight.shape).to(DT) / 4)
        bn[1].running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]))
    masked = _MaskedNet().to(DT).eval()

    def permute(t: torch.Tensor) -> None:
        t.data.view(-1).copy_(t.data.view(-1).flip(0).clone())

    def set_entry(t: torch.Tensor) -> None:
        t.data[3] = -3.0

    x_img, x_vec = torch.randn(6, 2, 6, 6, dtype=DT), torch.randn(6, 4, dtype=DT)
    return [("conv weight, fused", conv, x_img, "fused", lambda m: permute(m[2].weight)),
            ("batchnorm statistic", bn, x_vec, "generic", lambda m: permute(m[1].running_mean)),
            ("mask entry", masked, x_vec, "generic", lambda m: set_entry(m.mask))]


@pytest.mark.parametrize("case", range(3), ids=[p[0] for p in _unseen_write_problems()])
def test_invalidate_takes_weights_and_buffers_again(case):
    """invalidate() is the documented remedy for a write the operator cannot see: it only dropped the cache,
    so the fused conv path kept its channels-last weight copies (relative error 0.66 after a permuted conv
    weight) and every path its copies of the buffers (1.28 after a permuted BatchNorm mean, 0.85 after a
    mask entry changed)."""
    _, model, x, path, write = _unseen_write_problems()[case]
    y = torch.arange(x.shape[0]) % C
    loss = nn.CrossEntropyLoss()
    op = hessian_operator(model, loss, (x, y), path=path)
    op.to_dense(), op.gradient()  # the cache filled
    versions = [t._version for t in [*model.parameters(), *model.buffers()]]
    write(model)
    assert [t._version for t in [*model.parameters(), *model.buffers()]] == versions  # unseen
    op.invalidate()
    assert relative_error(op.to_dense(), dense_hessian(model, [(x, y)], loss)) <= 1e-10
    assert relative_error(op.gradient(), dense_gradient(model, [(x, y)], loss)) <= 1e-10


def test_a_refused_invalidate_is_refused_again():
    """invalidate() refused a NaN written unseen (a buffer holding +Inf and -Inf has a NaN sum before and
    after) but kept the old weights as taken, so the next matvec ran on the stale copies without an error."""
    class Clamped(nn.Module):  # a buffer of bounds holding -Inf and +Inf: its float64 sum is NaN
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.out = nn.Linear(4, 5), nn.Linear(5, C)
            self.register_buffer("mask", torch.tensor([0.0, 0.0, -math.inf, math.inf, 1.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.lin(x) + self.mask))

    torch.manual_seed(0)
    model = Clamped().to(DT).eval()
    x = torch.randn(8, 4, dtype=DT)
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, torch.arange(8) % C), path="generic")
    v = torch.randn(op.shape[0], dtype=DT)
    op.matvec(v)
    model.mask.data[0] = math.nan  # no version bump, the sum NaN as before: unseen
    for call in (op.invalidate, lambda: op.matvec(v), op.gradient):
        with pytest.raises(ValueError, match="buffer 'mask' has NaN values"):
            call()


def test_ggn_declines_a_loss_module_whose_call_is_not_its_class():
    """A pre-hook (temperature scaling) or a forward set on the loss module: the GGN's products never call the
    loss, so they were the plain class's (relative error 14.6) while its gradient followed the hook."""
    model, x, y = make("mlp")
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_pre_hook(lambda module, args: (args[0] / 4, args[1]))
    replaced = nn.MSELoss()
    replaced.forward = lambda out, target: F.mse_loss(out / 4, target)
    for loss in (hooked, replaced):
        with pytest.raises(ValueError, match=f"^ggn_operator: the {type(loss).__name__} has a forward hook or "
                                             "pre-hook, or a forward set on the instance"):
            ggn_operator(model, loss, (x, y if loss is hooked else F.one_hot(y, C).to(DT)))


def _change_weights(how: str, model: nn.Module, op: CurvatureOperator) -> None:
    """Change the model's weights the way a user would."""
    if how == "in place":
        with torch.no_grad():
            model[0].weight.mul_(1.5)
    elif how == "set_flat_parameters":
        set_flat_parameters(model, get_flat_parameters(model) * 0.9)
    elif how == "optimizer.step":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(torch.randn(6, 4, dtype=DT)), torch.arange(6) % C).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elif how == "fused Adam":  # a fused kernel writes in place without bumping the version counter
        opt = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)
        F.cross_entropy(model(torch.randn(6, 4, dtype=DT)), torch.arange(6) % C).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elif how == "data replaced":
        model[0].weight.data = model[0].weight.detach() * 2.0
    elif how == "load_state_dict(assign=True)":  # new parameter objects in the model
        model.load_state_dict({k: v * 0.8 for k, v in model.state_dict().items()}, assign=True)
    elif how == "parameter reassigned":
        model[0].weight = nn.Parameter(model[0].weight.detach() * 2.0)
    elif how == "through .data":  # in place through .data: no version counter sees it either
        model[0].weight.data.mul_(0.5)
    elif how == "units permuted through .data":  # a re-basin: every sum and the function stay, the coordinates move
        first, after = model[0], next(m for m in list(model)[1:] if isinstance(m, nn.Linear))
        order = [1, 0, *range(2, first.out_features)]
        first.weight.data.copy_(first.weight.data[order].clone())
        first.bias.data.copy_(first.bias.data[order].clone())
        after.weight.data.copy_(after.weight.data[:, order].clone())
    elif how == "a bias permuted through .data":  # values moved within a bias alone: its sum stays
        model[0].bias.data.copy_(model[0].bias.data.flip(0).clone())
    else:
        model[0].weight.data.mul_(0.5)
        op.invalidate()


@pytest.mark.parametrize("how", ["in place", "set_flat_parameters", "optimizer.step", "fused Adam", "data replaced",
                                 "load_state_dict(assign=True)", "parameter reassigned", "through .data",
                                 "units permuted through .data", "a bias permuted through .data", "invalidate"])
@pytest.mark.parametrize("kind", ["reverse-over-reverse", "ggn"])
def test_cache_is_dropped_when_the_weights_change(how, kind):
    model, x, y = make("mlp", seed=12)
    loss = nn.CrossEntropyLoss()
    batches = uneven_batches(x, y)
    op = _operators(kind, model, loss, batches)
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(5))
    before = op.matvec(v)
    assert op.cached_batches == 3
    _change_weights(how, model, op)
    after = op.matvec(v)
    fresh = _operators(kind, model, loss, batches, cache_bytes=0)
    torch.testing.assert_close(after, fresh.matvec(v), rtol=1e-12, atol=1e-14)
    assert relative_error(after, before) > 1e-3  # the change mattered
    if kind != "ggn":
        torch.testing.assert_close(op.gradient(), fresh.gradient(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", ["load_state_dict", "buffer in place", "buffer reassigned"])
@pytest.mark.parametrize("kind", ["forward-over-reverse", "reverse-over-reverse", "ggn"])
def test_buffers_are_followed(how, kind):
    """Buffers were copied at construction only: after ``load_state_dict`` (which writes parameters and
    buffers in place) the products mixed the new weights with the old BatchNorm statistics (relative
    error 1.1 against a new operator, 1.4 for a change of the statistics alone), and disagreed with
    ``Objective``, which runs the model as it is."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT, generator=gen), torch.randint(0, C, (N,), generator=gen)
    loss = nn.CrossEntropyLoss()
    op = _operators(kind, model, loss, (x, y))
    v = torch.randn(op.shape[0], dtype=DT, generator=gen)
    before = op.matvec(v)
    bn = model[1]
    if how == "load_state_dict":
        other = copy.deepcopy(model)
        with torch.no_grad():
            other[1].running_var.mul_(3.0)
        model.load_state_dict(other.state_dict())
    elif how == "buffer in place":
        with torch.no_grad():
            bn.running_var.mul_(3.0)
    else:
        bn.running_var = bn.running_var * 3.0
    after = op.matvec(v)
    assert relative_error(after, before) > 1e-2  # the change mattered
    fresh = _operators(kind, model, loss, (x, y), cache_bytes=0)
    torch.testing.assert_close(after, fresh.matvec(v), rtol=1e-12, atol=1e-14)
    if kind != "ggn":
        torch.testing.assert_close(op.gradient(), Objective(model, loss, (x, y)).gradient(), rtol=1e-12, atol=1e-14)


def test_a_replaced_parameter_of_another_shape_is_refused():
    model, x, y = make("mlp")
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="generic")
    model[0].weight.data = torch.zeros(3, 4, dtype=DT)
    with pytest.raises(ModelChanged, match=r"is now \(.*\) since the operator or objective was built"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))


class _BufferEveryCall(nn.Module):
    """A Linear that registers a new buffer (a cache of its last output) at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.register_buffer("last", out.detach().clone(), persistent=False)
        return out


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_module_tree_checks_skipped_at_an_unchanged_tree_still_see_every_change(path):
    """Before each product the module tree's checks (the per-sample check, the parameter slots, the settings)
    run only where one look at the tree (settings.watched_state) differs from the last that passed them. Changes
    that keep every module, flag, setting and tensor object, and which only the full checks saw, must change the
    look: a parameter given a view of another shape over the same data (same pointer, sums and version), the
    parameters of a model without buffers made float32 by model.float() (the same objects, given new data: the
    products failed inside torch or the fused kernel), and an attention layer's dropout raised while it is in
    training mode (its extra_repr shows nothing). A buffer that
    a forward registers anew at each call changes the look without being a change: no refusal, right products."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C)).to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    op = hessian_operator(model, F.cross_entropy, (x, y), path=path)
    v = torch.ones(op.shape[0], dtype=DT)
    op.matvec(v)
    model[0].weight.data = model[0].weight.data.view(4, 6)
    with pytest.raises(ModelChanged, match=r"parameter '0.weight' is now \(4, 6\), .* \(was \(6, 4\)"):
        op.matvec(v)
    model[0].weight.data = model[0].weight.data.view(6, 4)
    op.matvec(v)  # as it was: usable again
    model.float()
    with pytest.raises(ModelChanged, match=r"parameter '0.weight' is now \(6, 4\), torch.float32 on cpu \(was "
                                           r"\(6, 4\), torch.float64"):
        op.matvec(v)

    model, x = _SelfAttention().to(DT).eval(), torch.randn(8, 5, 4, dtype=DT)
    model.attention.dropout = 0.0
    model.attention.train()  # allowed: no dropout
    op = hessian_operator(model, F.cross_entropy, (x, y[:8]))
    op.matvec(torch.ones(op.shape[0], dtype=DT))
    model.attention.dropout = 0.5
    with pytest.raises(ValueError, match=r"module 'attention' \(MultiheadAttention\) is in training mode: dropout"):
        op.matvec(torch.ones(op.shape[0], dtype=DT))

    model, x = _BufferEveryCall().to(DT).eval(), torch.randn(N, 4, dtype=DT)
    op = hessian_operator(model, F.cross_entropy, (x, y))
    v = torch.randn(op.shape[0], dtype=DT)
    for _ in range(2):
        torch.testing.assert_close(op.matvec(v), op.to_dense() @ v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["reverse-over-reverse", "ggn"])
def test_cache_budget_falls_back_to_streaming(kind):
    """The streamed batches weigh their own rows: with equal batches, weighting them by the cached batch's
    rows passed; here the last one is smaller (4, 4, 2 rows)."""
    model, x, y = make("cnn", seed=13, n=10)
    loss = nn.CrossEntropyLoss()
    batches = _CountingBatches(uneven_batches(x, y, size=4))
    full = _operators(kind, model, loss, batches)
    V = torch.randn(full.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(6))
    expected = full.matmat(V)
    torch.testing.assert_close(expected, _operators(kind, model, loss, batches, cache_bytes=0).matmat(V), rtol=1e-12,
                               atol=1e-14)
    per_batch = full.cached_bytes / 3  # the first batch's entry is 0.4 of it: 1.5 of this keeps one batch only
    partial = _operators(kind, model, loss, batches, cache_bytes=int(1.5 * per_batch))
    torch.testing.assert_close(partial.matmat(V), expected, rtol=1e-12, atol=1e-14)
    assert partial.cached_batches == 1 and partial.cached_bytes <= partial.cache_bytes
    passes = batches.passes
    torch.testing.assert_close(partial.matmat(V), expected, rtol=1e-12, atol=1e-14)  # first batch cached, two streamed
    assert batches.passes == passes + 1 and partial.cached_batches == 1
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0"):
        _operators(kind, model, loss, batches, cache_bytes=-1)
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0, got 1000000000.0"):
        _operators(kind, model, loss, batches, cache_bytes=1e9)


@pytest.mark.parametrize("kind", ["reverse-over-reverse", "ggn"])
def test_the_cache_closes_at_the_first_batch_over_the_budget(kind):
    """Batches of 4, 52 and 4 rows with room for two small entries: the cache must close at the large batch.
    Left open, the last batch was cached in the large one's place and the next pass read it there (products
    1.47 off, relative). A budget of exactly the whole cache's size keeps every batch."""
    model, x, y = make("mlp", seed=13, n=60)
    loss = nn.CrossEntropyLoss()
    batches = [(x[:4], y[:4]), (x[4:56], y[4:56]), (x[56:], y[56:])]
    V = torch.randn(_operators(kind, model, loss, batches[:1]).shape[0], 2, dtype=DT,
                    generator=torch.Generator().manual_seed(7))
    expected = _operators(kind, model, loss, batches, cache_bytes=0).matmat(V)
    first_only = _operators(kind, model, loss, batches[:1])
    first_only.matmat(V)
    small_entry = first_only.cached_bytes  # the entry of a batch of 4 rows (the first and the last)
    partial = _operators(kind, model, loss, batches, cache_bytes=2 * small_entry)
    for _ in range(3):  # builds the cache, then reads it
        torch.testing.assert_close(partial.matmat(V), expected, rtol=1e-12, atol=1e-14)
        assert partial.cached_batches == 1 and partial.cached_bytes == small_entry
    full = _operators(kind, model, loss, batches)
    full.matmat(V)
    exact = _operators(kind, model, loss, batches, cache_bytes=full.cached_bytes)
    torch.testing.assert_close(exact.matmat(V), expected, rtol=1e-12, atol=1e-14)
    assert exact.cached_batches == full.cached_batches == 3 and exact.cached_bytes == full.cached_bytes


@pytest.mark.parametrize("path", ["generic", "ggn", "fused"])
def test_a_parameter_given_an_equal_copy_of_its_data_is_taken_again(path):
    """``w.data = w.data.clone()`` keeps the values, version counter, sum and checksum, but the operator's view of
    the old storage is stale, and here the caller reuses that storage (zeroes it): the weights key holds each
    tensor's data pointer, so the operator takes the parameter again (without it: 0.39-0.46 off, relative)."""
    model, x, y = make("mlp", seed=12)
    loss = nn.CrossEntropyLoss()

    def build(**options) -> CurvatureOperator:
        if path == "ggn":
            return ggn_operator(model, loss, (x, y), **options)
        return hessian_operator(model, loss, (x, y), path=path, **options)

    op = build(cache_bytes=0)
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(8))
    expected = op.matvec(v)
    old = model[0].weight.data
    model[0].weight.data = old.clone()
    old.zero_()
    torch.testing.assert_close(op.matvec(v), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(build().matvec(v), expected, rtol=1e-12, atol=1e-14)


def test_a_layer_called_twice_leaves_the_model_intact():
    """A module called at two places (registered under two names) made torch.func.functional_call
    leave a plain tensor in place of its Parameter (it dropped out of model.parameters() and the next
    product failed); the products are those of the shared weights."""
    torch.manual_seed(0)
    inner, head = nn.Linear(4, 4), nn.Linear(4, C)
    model = nn.Sequential(inner, nn.Tanh(), inner, nn.Tanh(), head).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_of(w: torch.Tensor) -> torch.Tensor:  # the model written out: no functional_call
        w1, b1, w2, b2 = unflatten_vector(w, [before[n].shape for n in names])
        h = torch.tanh(F.linear(torch.tanh(F.linear(x, w1, b1)), w1, b1))
        return F.cross_entropy(F.linear(h, w2, b2), y)

    w0 = flatten_tensors(before.values())
    for mode in ("reverse-over-reverse", "forward-over-reverse"):
        H = hessian_operator(model, F.cross_entropy, (x, y), mode=mode)
        assert relative_error(H.to_dense(), hessian(loss_of, w0)) <= 1e-10
        assert relative_error(H.gradient(), jacobian(loss_of, w0)) <= 1e-12
    ggn_operator(model, F.cross_entropy, (x, y)).matvec(w0)
    assert relative_error(Objective(model, F.cross_entropy, (x, y)).gradient(), jacobian(loss_of, w0)) <= 1e-12
    assert all(type(p) is nn.Parameter for p in (inner.weight, inner.bias))
    assert [n for n, _ in model.named_parameters()] == names
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_pruned_layer_keeps_no_graph_of_the_products():
    """torch.nn.utils.prune's pre-hook writes the computed weight as a plain attribute at every forward: from
    the operators' swapped-in tensors it kept their graph (or, after the GGN's jvp, a torch.func wrapper) in the
    model, which every method then refused ("cannot be copied") and torch.save could not write."""
    import torch.nn.utils.prune as prune
    from torch._C._functorch import is_functorch_wrapped_tensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C)).to(DT)
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    x, y = torch.randn(N, 6, dtype=DT), torch.randint(0, C, (N,))
    with torch.no_grad():  # the computed weight without a graph, as the guide advises
        model(x)
    computed = model[0].weight
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    for use in (lambda: hessian_operator(model, F.cross_entropy, (x, y), mode="reverse-over-reverse").matvec(v),
                lambda: hessian_operator(model, F.cross_entropy, (x, y), mode="forward-over-reverse").matvec(v),
                lambda: ggn_operator(model, F.cross_entropy, (x, y)).matvec(v),
                lambda: Objective(model, F.cross_entropy, (x, y)).gradient()):
        use()
        assert model[0].weight is computed and not is_functorch_wrapped_tensor(model[0].weight)
        copy.deepcopy(model)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_batches_with_no_rows_counted_contribute_zero_on_every_path(kind):
    """A batch whose rows are all ignore_index (cross entropy's mean over it is 0/0) and a batch with
    no rows contribute zero on every path, as their derivatives do: the fused MLP path raised, the
    fused conv path returned NaN, the objective's value was NaN (the empty batch: also the fused MLP
    path and the objective)."""
    model, x, y = _fused_problem(kind)
    loss = nn.CrossEntropyLoss(ignore_index=1)
    y[y == 1] = 0
    y[:2] = 1
    y[7:] = 1
    batches = [(x[:2], y[:2]), (x[2:5], y[2:5]), (x[5:5], y[5:5]), (x[5:7], y[5:7]), (x[7:], y[7:])]
    counted = [batches[1], batches[3]]
    share = sum(len(b[1]) for b in counted) / N  # the batches' weights n_b / N count every row
    H_ref, g_ref = dense_hessian(model, counted, loss) * share, dense_gradient(model, counted, loss) * share
    for path in ("fused", "generic"):
        H = hessian_operator(model, loss, batches, path=path)
        assert H.path == path
        assert relative_error(H.to_dense(), H_ref) <= 1e-10
        assert relative_error(H.gradient(), g_ref) <= 1e-12
    assert relative_error(ggn_operator(model, loss, batches).to_dense(),
                          ggn_operator(model, loss, counted).to_dense() * share) <= 1e-12
    value, grad = Objective(model, loss, batches).value_and_gradient()
    assert value == pytest.approx(Objective(model, loss, counted).value() * share, rel=1e-12)
    assert relative_error(grad, g_ref) <= 1e-12
    only_ignored = [batches[0], batches[4]]
    for path in ("fused", "generic"):
        assert not hessian_operator(model, loss, only_ignored, path=path).to_dense().any()
    assert Objective(model, loss, only_ignored).value() == 0.0


def test_a_later_batch_the_model_cannot_take_is_named():
    """A later batch of another input width or dtype is a ValueError naming the batch and the first
    batch's shapes on every path and in the objective (it was torch's own RuntimeError), checked once
    per new layout; the model and the data are left as they were."""
    model, x, y = make("layernorm")
    wide = torch.randn(2, 5, dtype=DT)
    batches = [(x[:4], y[:4]), (x[4:], y[4:]), (wide, y[:2])]
    state = copy.deepcopy(model.state_dict())
    first = (r"\(the first batch has inputs x of shape \(4, 4\), torch.float64 and targets y of shape \(4,\), "
             r"torch.int64\)$")
    for build in (lambda: hessian_operator(model, F.cross_entropy, batches),
                  lambda: ggn_operator(model, F.cross_entropy, batches),
                  lambda: Objective(model, F.cross_entropy, batches)):
        op = build()
        with pytest.raises(ValueError, match=r"^batch 2 of the data: (Objective: )?the model cannot run on the data "
                                             r"\(inputs x of shape \(2, 5\), torch.float64; .*" + first):
            op.gradient()
    H = hessian_operator(model, F.cross_entropy, [(x[:4], y[:4]), (x[4:].float(), y[4:])])
    with pytest.raises(ValueError, match=r"^batch 1 of the data: the model cannot run on the data \(inputs x of shape "
                                         r"\(6, 4\), torch.float32;"):
        H.matvec(x.new_ones(H.shape[0]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(batches[2][0], wide) and batches[2][0].shape == (2, 5)


def _path_operator(path: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> CurvatureOperator:
    if path.startswith("fused"):
        return hessian_operator(model, F.cross_entropy, (x, y), path="fused", **options)
    return _operators(path, model, F.cross_entropy, (x, y), **options)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", ["forward-over-reverse", "reverse-over-reverse", "ggn", "fused-mlp", "fused-conv"])
def test_non_finite_weights_are_named_at_construction_and_after_a_change(path, value):
    """NaN or Inf weights gave NaN products and gradients silently on the generic paths, the fused conv
    path and the GGN's gradient (the fused MLP path and the GGN's products raised an error of their
    kernels, naming no parameter), and at construction "the gradient of the loss on the first batch
    contains NaN or Inf". Every path now names the parameter (chosen or not), at construction and at
    the first product, matmat or gradient after the change; restored weights work again."""
    model, x, y = _fused_problem(path.removeprefix("fused-")) if path.startswith("fused") else make("mlp")
    cls = {"ggn": "GGNOperator", "fused-mlp": "FusedMLPHessian", "fused-conv": "FusedConvHessian"}.get(
        path, "GenericHessian")
    name, last = list(model.named_parameters())[-2]  # the last layer's weight
    message = rf"^{cls}: parameter '{re.escape(name)}' has NaN or Inf values \(did an update diverge\?\)"
    op = _path_operator(path, model, x, y)
    v = torch.randn(op.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    before, grad = op.matmat(v), op.gradient()
    saved = last.detach().clone()
    with torch.no_grad():
        last[0, 0] = value
    with pytest.raises(ValueError, match=message):
        _path_operator(path, model, x, y)
    # a parameter outside the selection feeds the forward too
    others = [n for n, _ in model.named_parameters() if n != name]
    with pytest.raises(ValueError, match=message):
        _path_operator(path, model, x, y, params=others)
    for call in (lambda: op.matvec(v[:, 0]), lambda: op.matmat(v), op.gradient, op.to_dense):
        with pytest.raises(ValueError, match=message):
            call()
    with torch.no_grad():
        last.copy_(saved)
    torch.testing.assert_close(op.matmat(v), before, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.gradient(), grad, rtol=1e-12, atol=1e-14)
    model[-1].bias.data[1] = value  # through .data: no version counter sees it, the sum does
    with pytest.raises(ValueError, match=rf"^{cls}: parameter '{re.escape(others[-1])}' has NaN or Inf values"):
        op.matvec(v[:, 0])


class _ClampedNet(nn.Module):
    """A hidden layer clamped to bounds kept in a buffer: [-inf, inf] (no bound), whose float64 sum is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, C)
        self.register_buffer("bounds", torch.tensor([-math.inf, math.inf]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)).clamp(self.bounds[0], self.bounds[1]))


@pytest.mark.parametrize("kind", ["reverse-over-reverse", "ggn"])  # the paths that cache
def test_a_buffer_holding_both_infinities_keeps_the_cache(kind):
    """A buffer with +inf and -inf (allowed: it holds no NaN) sums to NaN, and NaN != NaN made every
    product take the weights as changed: the cache was dropped and the data read again at each one
    (the digits MLP's product took 1.7x as long). The weights key compares NaN sums as equal; +inf and
    -inf in a parameter (NaN sum too) are still refused by name, and so is a NaN in the buffer."""
    torch.manual_seed(0)
    model = _ClampedNet().to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    batches = _CountingBatches(uneven_batches(x, y))
    op = _operators(kind, model, F.cross_entropy, batches)
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    first = op.matvec(v)
    passes = batches.passes
    assert torch.equal(op.matvec(v), first) and batches.passes == passes  # from the cache
    torch.testing.assert_close(first, _operators(kind, model, F.cross_entropy, (x, y), cache_bytes=0).matvec(v),
                               rtol=1e-12, atol=1e-14)
    cls = "GGNOperator" if kind == "ggn" else "GenericHessian"
    for tensor, value, message in (
            (model.fc2.weight, torch.tensor([math.inf, -math.inf], dtype=DT), "parameter 'fc2.weight' has NaN or Inf"),
            (model.bounds, torch.tensor([math.nan, math.inf], dtype=DT), "buffer 'bounds' has NaN")):
        saved = tensor.detach().clone()
        with torch.no_grad():
            tensor.view(-1)[:2] = value
        with pytest.raises(ValueError, match=rf"^{cls}: {message} values"):
            op.matvec(v)
        with torch.no_grad():
            tensor.copy_(saved)
    assert torch.equal(op.matvec(v), first)
    passes = batches.passes
    op.matvec(v)
    assert batches.passes == passes


class _MaskedNet(nn.Module):
    """A hidden layer under a softmax with an additive mask buffer (-inf: a unit left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, C)
        self.register_buffer("mask", torch.tensor([0.0, 0.0, -math.inf, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.bn(self.fc1(x)) + self.mask, dim=1))


@pytest.mark.parametrize("kind", ["forward-over-reverse", "reverse-over-reverse", "ggn"])
def test_non_finite_buffers(kind):
    """A NaN BatchNorm running statistic gave NaN products silently (an Inf running_var: finite ones, of a
    model whose channel is constant); NaN or Inf there is refused like a parameter. Another buffer may
    hold -inf (an additive mask: finite products) but no NaN."""
    torch.manual_seed(0)
    model = _MaskedNet().to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    op = _operators(kind, model, F.cross_entropy, (x, y))
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    before = op.matvec(v)
    assert bool(torch.isfinite(before).all())
    cls = "GGNOperator" if kind == "ggn" else "GenericHessian"
    for buffer, value, what in (("bn.running_mean", math.nan, "NaN or Inf"), ("bn.running_var", math.inf, "NaN or Inf"),
                                ("mask", math.nan, "NaN")):
        tensor = model.get_buffer(buffer)
        saved = tensor.clone()
        with torch.no_grad():
            tensor[0] = value
        with pytest.raises(ValueError, match=rf"^{cls}: buffer '{buffer}' has {what} values"):
            op.matvec(v)
        with pytest.raises(ValueError, match=rf"^{cls}: buffer '{buffer}' has {what} values"):
            _operators(kind, model, F.cross_entropy, (x, y))
        with torch.no_grad():
            tensor.copy_(saved)
        torch.testing.assert_close(op.matvec(v), before, rtol=1e-12, atol=1e-14)


def test_a_data_parallel_wrapper_is_refused_by_name():
    """torch.func's stateless calls refuse the wrapper: it was met as "the model cannot run on the data"."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match=r"the model is wrapped in DataParallel.*pass the wrapped model \(model"):
        hessian_operator(nn.DataParallel(model), nn.CrossEntropyLoss(), (x, y))


def test_an_embedding_with_a_padding_row_is_refused_by_name():
    """torch zeroes the padding row's gradient whatever the loss: forward-over-reverse products were not
    symmetric (max |H - H^T| 9e-3 against max |H| 0.23), which the solvers assume, with no error."""
    model = nn.Sequential(nn.Embedding(12, 6, padding_idx=0), nn.Flatten(), nn.Linear(30, 3)).eval()
    x, y = torch.randint(0, 12, (40, 5)), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match=r"params: '0.weight' is the weight of Embedding '0' with padding_idx=0"):
        hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    H = hessian_operator(model, nn.CrossEntropyLoss(), (x, y), params=["2.weight", "2.bias"]).to_dense()
    assert torch.equal(H, H.T) or float((H - H.T).abs().max()) <= 1e-6 * float(H.abs().max())
    # the refusal is the curvature operators': the parameter utilities take such a model
    assert get_flat_parameters(model).shape == (12 * 6 + 30 * 3 + 3,)
    assert get_flat_parameters(nn.DataParallel(model)).shape == (12 * 6 + 30 * 3 + 3,)
    # a spectral-norm embedding: refused too, and its weight is not computed (a power iteration would
    # write its state into the caller's model)
    normed = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Embedding(12, 6, padding_idx=0)),
                           nn.Flatten(), nn.Linear(30, 3)).train()
    u = normed[0].parametrizations.weight[0]._u.clone()
    with pytest.raises(ValueError, match=r"'0.parametrizations.weight.original' is the weight of ParametrizedEmb"):
        hessian_operator(normed.eval(), nn.CrossEntropyLoss(), (x, y))
    normed.train()
    with pytest.raises(ValueError, match="with padding_idx=0"):
        resolve_curvature_parameters(normed)
    assert torch.equal(normed[0].parametrizations.weight[0]._u, u)
    # scale_grad_by_freq: the backward divides a row's gradient by its count in the batch; the Hessian was 38%
    # off and not symmetric (0.59), the gradient 38% off, without a word
    scaled = nn.Sequential(nn.Embedding(12, 6, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(30, 3)).eval()
    for build in (hessian_operator, ggn_operator):
        with pytest.raises(ValueError, match=r"params: '0.weight' is the weight of Embedding '0' with "
                                             r"scale_grad_by_freq=True, whose backward divides"):
            build(scaled, nn.CrossEntropyLoss(), (x, y))
    # sparse=True: torch's "reshape is not implemented for sparse tensors" from the operators; named now
    sparse = nn.Sequential(nn.Embedding(12, 6, sparse=True), nn.Flatten(), nn.Linear(30, 3)).eval()
    for build in (hessian_operator, Objective):
        with pytest.raises(ValueError, match=r"'0.weight' is the weight of Embedding '0' with sparse=True"):
            build(sparse, nn.CrossEntropyLoss(), (x, y))
    # an EmbeddingBag's too: the Objective's gradient was 6x off (the operators refuse a bag anyway)
    bagged = nn.Sequential(nn.EmbeddingBag(12, 4, mode="sum", scale_grad_by_freq=True), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"'0.weight' is the weight of EmbeddingBag '0' with scale_grad_by_freq"):
        Objective(bagged, nn.CrossEntropyLoss(), (x, y))
    # an EmbeddingBag has no second derivative at all: refused as such, not for its padding row
    bag = nn.Sequential(nn.EmbeddingBag(12, 4, padding_idx=0, mode="mean"), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="the loss is not twice differentiable"):
        hessian_operator(bag, nn.CrossEntropyLoss(), (x, y))


@pytest.mark.parametrize("params", [None, ["2.weight", "2.bias"]])
def test_a_forward_that_writes_its_parameters_is_refused_before_it_writes_the_model(params):
    """nn.Embedding(max_norm=...) renormalises its rows in place at each forward: the probe wrote the
    caller's weights (max change 16.2 here) and the products were of a loss that is no function of the
    parameters; the weights not chosen are written too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 6, max_norm=1.0), nn.Flatten(), nn.Linear(30, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(5.0)
    x, y = torch.randint(0, 12, (40, 5)), torch.randint(0, 3, (40,))
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    for build in (hessian_operator, ggn_operator, Objective):
        with pytest.raises(ValueError, match=r"writes its parameter '0.weight' in place .*max_norm=None"):
            build(model, nn.CrossEntropyLoss(), (x, y), params=params)
    for name, p in model.named_parameters():  # the Objective's probe wrote them too (it runs the live model)
        assert torch.equal(p, saved[name]), name


def test_half_precision_sums_over_batches_do_not_overflow():
    """The batch loops summed rows x batch mean in the operator's dtype: in float16 the products over
    40,000 rows in batches came back Inf (true max |Hv| 4.0), and a bfloat16 gradient lost accuracy with
    every batch (relative error 9.7e-2 with batch_size=8); they sum in float32 now. A float16 mean over
    40,000 rows in one batch overflows inside torch's cross entropy (an Inf loss; at 80,000 rows a zero
    gradient too, with no error): refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 16, generator=gen)
    x[:, 0] *= 20
    y = torch.randint(0, 5, (40_000,), generator=gen)
    half = copy.deepcopy(model).half()
    x16 = x.half()
    exact = copy.deepcopy(half).double()
    v = torch.zeros(181, dtype=torch.float64)
    v[0] = 1.0
    reference = dense_hessian(exact, [(x16.double(), y)], F.cross_entropy) @ v
    for options in ({"batch_size": 2048}, {"batch_size": 8192, "mode": "forward-over-reverse"}):
        H = hessian_operator(half, F.cross_entropy, (x16, y), **options)
        assert relative_error(H.matvec(v.half()).double(), reference) <= 1e-2, options
    assert relative_error(ggn_operator(half, F.cross_entropy, (x16, y), batch_size=4096).matvec(v.half()).double(),
                          ggn_operator(exact, F.cross_entropy, (x16.double(), y)).matvec(v)) <= 1e-2
    # bfloat16 gradients: as accurate with small batches as in one
    brain = copy.deepcopy(model).bfloat16()
    xb, yb = x[:4000].bfloat16(), y[:4000]
    g64 = dense_gradient(copy.deepcopy(brain).double(), [(xb.double(), yb)], F.cross_entropy)
    for batch_size in (None, 8):
        g = hessian_operator(brain, F.cross_entropy, (xb, yb), batch_size=batch_size).gradient().double()
        assert relative_error(g, g64) <= 1e-2, batch_size
        g = Objective(brain, F.cross_entropy, (xb, yb), batch_size=batch_size).gradient().double()
        assert relative_error(g, g64) <= 1e-2, batch_size
    # a first batch whose rows the loss all ignores has a NaN mean in every dtype: not an overflow
    ignored = y[:20].clone()
    ignored[:10] = -100
    for build in (hessian_operator, Objective):
        build(half, F.cross_entropy, (x16[:20], ignored), batch_size=10)
    for build in (hessian_operator, ggn_operator):
        with pytest.raises(ValueError, match=r"the loss on a batch of 40000 rows is not finite in torch.float16 "
                                             r"\(its mean overflows, or the forward does\): use batches of a few "
                                             r"thousand rows"):
            build(half, F.cross_entropy, (x16, y))


def test_a_bfloat16_loss_that_overflows_in_the_forward_is_refused():
    """bfloat16 keeps float32's range, so its loss overflows in the forward (finite weights of 3e38) rather than in
    the mean: refused as float16's is, where the Objective otherwise returned NaN values."""
    model = nn.Sequential(nn.Linear(4, 3)).eval().bfloat16()
    with torch.no_grad():
        model[0].weight.fill_(3e38)
    data = (torch.ones(8, 4, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.long))
    for build in (Objective, hessian_operator):
        with pytest.raises(ValueError, match=r"the loss on a batch of 8 rows is not finite in torch.bfloat16 \(its "
                                             r"mean overflows, or the forward does\)"):
            build(model, F.cross_entropy, data)


class _CountsItsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)


def test_a_forward_that_writes_a_buffer_is_refused_by_name():
    """torch.func's transforms refused it naming only the op ("attempted to call in-place operation
    aten::add_"); the construction probe names the buffer, as Objective does. The caller's buffer is never
    written."""
    model = _CountsItsCalls().to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    for build in (functools.partial(hessian_operator, path="generic"), ggn_operator):
        with pytest.raises(ValueError, match=r"^the model's forward writes its buffer 'calls' in eval mode"):
            build(model, F.cross_entropy, (x, y))
    assert int(model.calls) == 0


def test_the_ggn_counts_the_loaders_batches_it_keeps():
    """A GGN entry keeps its batch (x, y) for its products, but counted only what autograd saved: over the last
    layer's parameters nothing saves x, and a DataLoader's batches (held by the cache alone) went uncounted,
    12x over a user's budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(2000, 6, dtype=DT), torch.randint(0, C, (2000,))
    head = ["2.weight", "2.bias"]
    chunked = ggn_operator(model, F.cross_entropy, (x, y), batch_size=100, params=head)
    loaded = ggn_operator(model, F.cross_entropy, DataLoader(TensorDataset(x, y), batch_size=100), params=head)
    for operator in (chunked, loaded):
        operator.matvec(torch.randn(operator.shape[0], dtype=DT))
    assert loaded.cached_batches == chunked.cached_batches == 20
    assert loaded.cached_bytes == chunked.cached_bytes + x.nbytes + y.nbytes


@pytest.mark.parametrize("build", [functools.partial(hessian_operator, path="generic"), ggn_operator,
                                   functools.partial(hessian_operator, path="fused")])
def test_a_dropped_operator_is_freed_at_once_and_counts_only_its_own_bytes(build):
    """The data source held the operator's bound probe method (a reference cycle): a dropped operator kept its
    cache until the cyclic collector ran. And the generic and GGN caches counted, for each chunk, the whole
    storage of the caller's data (a 1,000-row chunk of 100,000 rows: 41 MB instead of 0.16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(2000, 6, dtype=DT), torch.randint(0, C, (2000,))
    alone = build(model, F.cross_entropy, (x[:100].clone(), y[:100].clone()))
    chunked = build(model, F.cross_entropy, (x, y), batch_size=100)
    v = torch.randn(alone.shape[0], dtype=DT)
    alone.matvec(v)
    chunked.matvec(v)
    assert chunked.cached_batches == 20 and chunked.cached_bytes == 20 * alone.cached_bytes
    # a DataLoader's collated batches are the cache's own memory: counted (leaving them out too cached 8
    # batches of 7.6 MB under a 4 MB budget)
    loaded = build(model, F.cross_entropy, DataLoader(TensorDataset(x, y), batch_size=100))
    loaded.matvec(v)
    assert loaded.cached_bytes >= chunked.cached_bytes + 20 * 100 * 6 * 8
    gc.disable()
    try:
        dropped = weakref.ref(chunked)
        del chunked
        assert dropped() is None
    finally:
        gc.enable()


class _RowBlocks:
    """A re-iterable over row blocks of tensors it holds (as a Dataset of blocks would yield them): each
    batch is a view into the whole tensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        self.x, self.y, self.rows = x, y, rows

    def __iter__(self):
        return ((self.x[i:i + self.rows], self.y[i:i + self.rows]) for i in range(0, len(self.y), self.rows))


@pytest.mark.parametrize("build", [functools.partial(hessian_operator, path="generic"), ggn_operator,
                                   functools.partial(hessian_operator, path="fused")])
def test_slices_of_a_tensor_the_data_holds_count_nothing(build):
    """Since the entries count the batches they keep, a batch that is a slice of a larger tensor was charged
    that tensor's whole storage, once per batch (10 blocks of 40,000 rows: 1 of 10 fused entries cached under 64
    MiB, products 1.3-2.1x slower); the data holds that tensor anyway. The cache counts what chunks of the
    caller's tensors count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(2000, 6, dtype=DT), torch.randint(0, C, (2000,))
    blocks = build(model, F.cross_entropy, _RowBlocks(x, y, 100))
    chunked = build(model, F.cross_entropy, (x, y), batch_size=100)
    for operator in (blocks, chunked):
        operator.matvec(torch.ones(operator.shape[0], dtype=DT))
    assert blocks.cached_batches == chunked.cached_batches == 20
    assert blocks.cached_bytes == chunked.cached_bytes


@pytest.mark.parametrize("build", [functools.partial(hessian_operator, path="fused"),
                                   functools.partial(hessian_operator, path="generic"), ggn_operator])
def test_data_changed_where_no_version_counter_sees_it_is_refused(build):
    """A write through .data bumps no version counter: the cached products mixed the new inputs with the
    activations of the old (relative error 0.36 against the new data's Hessian, 0.85 against the old's). A
    TensorDataset's tensors replaced, or a batch added to a list, went unread once every batch was cached."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).to(DT).eval()
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))

    def refused(data, change, match, model=model):
        op = build(model, F.cross_entropy, data)
        v = torch.randn(op.shape[0], dtype=op.dtype)
        op.matvec(v)
        change()
        with pytest.raises(ValueError, match=match):
            op.matvec(v)

    inputs = x.clone()
    refused((inputs, y), lambda: inputs.data.add_(0.5), r"the data \(inputs x\) was written in place after it")
    # one value changed by 1 in large data: a float32 sum (4.1e7 on digits) rounded the change away
    big = torch.full((4000, 4), 2560.0, dtype=torch.float32)
    refused((big, torch.randint(0, C, (4000,))), lambda: big.data[0, 0].add_(1.0),
            r"the data \(inputs x\) was written in place", model=copy.deepcopy(model).float())
    # a write that only moves values (two columns swapped through numpy) keeps the bit sum: unseen by design (the
    # position checksum would cost a second pass before every product), documented in BatchSource._data_key
    loader = DataLoader(TensorDataset(x.clone(), y), batch_size=6)
    refused(loader, lambda: setattr(loader.dataset, "tensors", (x + 0.5, y)),
            r"the data \(the DataLoader's dataset tensor 0\) was replaced after it was built")
    batches = uneven_batches(x, y)
    refused(batches, lambda: batches.append((x[:3], y[:3])), r"the data's batches were replaced, added or removed")


def test_row_mean_weights_batches_by_rows_and_keeps_the_callers_tensors():
    """The one mean over batches (the operators' products and gradients, the Objective's value): rows-
    weighted, summed in float32 for half precision, a single batch's mean returned exactly as it is, and
    the caller's tensor written only when it is given up (``owned``)."""
    from unlearn_kernels.curvature.batches import RowMean

    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([4.0, -1.0], dtype=torch.float64)
    mean = RowMean()
    mean.add(a, 3)
    mean.add(b, 1)
    torch.testing.assert_close(mean.result(), (3 * a + b) / 4, rtol=0, atol=0)
    assert mean.rows == 4 and a.tolist() == [1.0, 2.0] and b.tolist() == [4.0, -1.0]
    one = RowMean()
    x = torch.randn(5, 2)
    one.add(x, 1797)
    result = one.result()
    assert torch.equal(result, x) and result.data_ptr() != x.data_ptr()  # exact, and a copy
    owned = RowMean()
    owned.add(x, 7, owned=True)
    assert owned.result().data_ptr() == x.data_ptr()  # given up: no copy
    half = RowMean()
    for _ in range(4):
        half.add(torch.full((3,), 60000.0, dtype=torch.float16), 100_000)  # rows x mean overflows float16
    assert half.result().dtype == torch.float16 and half.result().tolist() == [60000.0] * 3
    with pytest.raises(ValueError, match="data is empty"):
        RowMean().result()


class _OutOfMemory(nn.Module):
    """A linear model whose forward fails as torch's CPU allocator does, always or only when a graph is built."""

    def __init__(self, only_with_grad: bool) -> None:
        super().__init__()
        self.linear, self.only_with_grad = nn.Linear(4, C), only_with_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self.only_with_grad:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 124470662416 bytes. Error code 12")
        return self.linear(x)


@pytest.mark.parametrize("only_with_grad", [False, True], ids=["forward", "derivatives"])
def test_running_out_of_memory_is_not_blamed_on_the_model_or_the_loss(only_with_grad):
    """The construction probes turned the allocator's RuntimeError into ValueErrors saying the model cannot run
    on the data or the loss cannot be differentiated (or, for forward-over-reverse, fell back to finite
    differences): it passes through as it is, as CUDA's OutOfMemoryError did in the metrics."""
    from unlearn_kernels.checks import is_out_of_memory
    from unlearn_kernels.eval import predict_logits
    from unlearn_kernels.training import check_fits

    x, y = torch.randn(N, 4), torch.randint(0, C, (N,))
    for build in (hessian_operator, ggn_operator):
        with pytest.raises(RuntimeError, match="can't allocate memory") as raised:
            build(_OutOfMemory(only_with_grad), F.cross_entropy, (x, y))
        assert is_out_of_memory(raised.value) and not isinstance(raised.value, ValueError)
    if not only_with_grad:
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            predict_logits(_OutOfMemory(False), LabeledData(x, y))
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            check_fits("study", _OutOfMemory(False), LabeledData(x, y), "training")
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (10x4 and 5x3)"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


@pytest.mark.parametrize("build", [
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="fused"),
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic", mode="forward-over-reverse"),
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic", mode="reverse-over-reverse"),
    lambda m, d: ggn_operator(m, F.cross_entropy, d),
], ids=["fused", "forward-over-reverse", "reverse-over-reverse", "ggn"])
@pytest.mark.parametrize("data_kind", ["tensors", "batches"])
def test_inputs_that_require_grad_leave_products_and_gradients_detached(build, data_kind):
    """x with requires_grad: forward-over-reverse products and every path's gradient came back attached to the
    caller's graph (40 held products kept 297 MB of a batch's activations alive); derivatives are in the
    parameters only, so the results are those of the detached data, with no graph."""
    model, x, y = make("mlp")
    leaf = x.clone().requires_grad_()
    data = (leaf, y) if data_kind == "tensors" else uneven_batches(leaf, y)
    op, plain = build(model, data), build(model, (x, y))
    v = torch.randn(op.shape[0], dtype=DT)
    results = (op.matvec(v), op.matmat(v[:, None].repeat(1, 2)), op.gradient())
    assert not any(r.requires_grad or r.grad_fn is not None for r in results)
    for got, want in zip(results, (plain.matvec(v), plain.matmat(v[:, None].repeat(1, 2)), plain.gradient())):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert leaf.grad is None


_DETACHED_BUILDS = {
    "generic": lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic"),
    "forward-over-reverse": lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic",
                                                          mode="forward-over-reverse"),
    "ggn": lambda m, d: ggn_operator(m, F.cross_entropy, d),
    "fused": lambda m, d: hessian_operator(m, F.cross_entropy, d, path="fused"),
    "loss-parameter": lambda m, d: hessian_operator(m, _TemperedCE(), d, path="generic", mode="forward-over-reverse"),
}


@pytest.mark.parametrize("name", list(_DETACHED_BUILDS))
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_vectors_that_require_grad_give_products_on_no_graph(name, kind):
    """The fused conv path and the generic path's forward-over-reverse mode ran their products on the caller's
    vector outside no_grad: a v with requires_grad gave matvec and matmat results attached to the caller's graph
    (grad_fn SqueezeBackward1 on the fused conv path), unlike the other paths; a loss parameter that requires grad
    did so on forward-over-reverse. Every path's products are new tensors on no graph, equal to those of the
    detached vectors (and to the float64 Hessian-vector product)."""
    model, x, y = _fused_problem(kind)
    op = _DETACHED_BUILDS[name](model, (x, y))
    if name == "fused":
        assert type(op).__name__ == ("FusedMLPHessian" if kind == "mlp" else "FusedConvHessian")
    v = torch.randn(op.shape[0], 2, dtype=DT)
    leaf = v.clone().requires_grad_()
    results = (op.matvec(leaf[:, 0]), op.matmat(leaf))
    assert not any(r.requires_grad or r.grad_fn is not None for r in results)
    torch.testing.assert_close(results[0], op.matvec(v[:, 0]), rtol=0, atol=0)
    torch.testing.assert_close(results[1], op.matmat(v), rtol=0, atol=0)
    if name != "ggn":
        assert relative_error(results[1][:, 0], _hvp_reference(model, op.loss_fn, x, y, v[:, 0])) <= 1e-10
    assert leaf.grad is None


class _Stream(torch.utils.data.IterableDataset):
    """Rows of (x, y) one at a time, with or without a length."""

    def __init__(self, x, y, sized):
        self.x, self.y, self.sized = x, y, sized

    def __iter__(self):
        return iter(zip(self.x, self.y))

    def __len__(self):
        if self.sized is None:
            raise NotImplementedError
        if not self.sized:
            raise TypeError("no length")
        return len(self.x)


def _loaders_that_drop(x, y):
    dataset = TensorDataset(x, y)
    return {
        "batch_sampler": DataLoader(dataset, batch_sampler=torch.utils.data.BatchSampler(
            torch.utils.data.SequentialSampler(dataset), 4, drop_last=True)),
        "iterable without a length": DataLoader(_Stream(x, y, sized=False), batch_size=4, drop_last=True),
        "sampler over a subset": DataLoader(dataset, batch_size=4, sampler=range(7), drop_last=True),
        # 12 rows in all, but each worker batches its own 6 and drops 2 (a pass covered 8 of 12)
        "iterable over two workers": DataLoader(_Stream(x, y, sized=True), batch_size=4, drop_last=True, num_workers=2),
        "iterable whose length is not implemented": DataLoader(_Stream(x, y, sized=None), batch_size=4, drop_last=True),
    }


@pytest.mark.parametrize("kind", ["batch_sampler", "iterable without a length", "sampler over a subset",
                                  "iterable over two workers", "iterable whose length is not implemented"])
@pytest.mark.parametrize("build", [
    lambda m, d: hessian_operator(m, F.cross_entropy, d),
    lambda m, d: ggn_operator(m, F.cross_entropy, d),
    lambda m, d: Objective(m, F.cross_entropy, d),
], ids=["hessian", "ggn", "objective"])
def test_loaders_that_drop_samples_are_refused_in_every_form(kind, build):
    """drop_last through a batch sampler, over an IterableDataset without a length or over a sampler that draws
    fewer rows than the dataset went through: the operators covered 8 of 10 rows (a gradient 34% off)."""
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="drop_last=True"):
        build(model, _loaders_that_drop(x, y)[kind])


def test_a_sampler_whose_rows_fill_the_batches_drops_nothing():
    """drop_last over a sampler of 8 of 10 rows in batches of 4 drops nothing: it was refused ("drops 2 samples")."""
    model, x, y = make("mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=range(8), drop_last=True)
    op = hessian_operator(model, F.cross_entropy, loader)
    torch.testing.assert_close(op.gradient(), hessian_operator(model, F.cross_entropy, (x[:8], y[:8])).gradient(),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wrap", [
    lambda d: torch.utils.data.Subset(d, range(10)),
    lambda d: torch.utils.data.ConcatDataset([torch.utils.data.Subset(d, range(5)),
                                              torch.utils.data.Subset(d, range(5, 10))]),
], ids=["subset", "concat"])
def test_data_written_behind_a_subset_is_refused_at_the_next_streamed_pass(wrap):
    """Behind a Subset (what random_split gives) the data is not watched (summing a large base tensor at every
    product cost 14 times the product): a write is refused at the next pass over streamed batches."""
    model, x, y = make("mlp")
    x = x.clone()
    op = hessian_operator(model, F.cross_entropy, DataLoader(wrap(TensorDataset(x, y)), batch_size=4), cache_bytes=0)
    op.gradient()
    x.mul_(3)
    with pytest.raises(ValueError, match="different batches on two passes .*data written since the first pass"):
        op.gradient()


def test_unbatched_samples_are_named():
    """A DataLoader with batch_size=None gives one sample at a time: a bare IndexError from the row count."""
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="batch_size=None"):
        hessian_operator(model, F.cross_entropy, DataLoader(TensorDataset(x, y), batch_size=None))


class _AugmentedLater(torch.utils.data.Dataset):
    """Rows in a fixed order whose later half gets fresh noise at every read (the first batch stays the same)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = torch.randn_like(self.x[i]) if i >= len(self.x) // 2 else torch.zeros_like(self.x[i])
        return self.x[i] + noise, self.y[i]


# every path, each pass over the data read anew (no cache)
STREAMING_BUILDS = pytest.mark.parametrize("build", [
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="fused", cache_bytes=0),
    lambda m, d: hessian_operator(m, F.cross_entropy, d, path="generic", cache_bytes=0),
    lambda m, d: ggn_operator(m, F.cross_entropy, d, cache_bytes=0),
], ids=["fused", "generic", "ggn"])


@STREAMING_BUILDS
def test_data_whose_later_batches_change_between_passes_is_refused(build):
    """The construction compares the first batch of two passes only: a transform that changes later batches
    made products over streamed batches a different matrix each time (0.23-0.46 relative between two)."""
    model, x, y = make("mlp")
    op = build(model, DataLoader(_AugmentedLater(x, y), batch_size=4))
    v = torch.randn(op.shape[0], dtype=DT)
    op.matvec(v)
    with pytest.raises(ValueError, match=r"different batches on two passes \(batch [12] differs"):
        op.matvec(v)


class _FlippedLater(_AugmentedLater):
    """Rows in a fixed order whose later half has its features reversed at random reads (a random flip: every
    batch keeps its values, so its sums)."""

    def __getitem__(self, i):
        flip = i >= len(self.x) // 2 and bool(torch.randint(2, ()))
        return (self.x[i].flip(0) if flip else self.x[i]), self.y[i]


@STREAMING_BUILDS
def test_data_flipped_at_random_between_passes_is_refused(build):
    """Batches were compared between passes by their bit sums only, which a random flip keeps: products over
    streamed batches were another matrix at each call, unrefused. Their position checksums differ."""
    model, x, y = make("mlp")
    torch.manual_seed(1)
    op = build(model, DataLoader(_FlippedLater(x, y), batch_size=4))
    v = torch.randn(op.shape[0], dtype=DT)
    with pytest.raises(ValueError, match=r"different batches on two passes \(batch [12] differs"):
        for _ in range(4):  # (each read flips each later row or not at random: a few reads differ)
            op.matvec(v)


class _LosesItsLastBatch:
    """Re-iterable batches of 4 rows, of which passes after ``shrink`` is set miss the last (a stream that ran out)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.shrink = x, y, False

    def __iter__(self):
        batches = uneven_batches(self.x, self.y)
        return iter(batches[:-1] if self.shrink else batches)


@STREAMING_BUILDS
def test_data_that_yields_fewer_batches_on_a_later_pass_is_refused(build):
    """Its first batch unchanged, data that yields fewer batches than the first complete pass would make the
    products silently drop rows (0.14-0.40 relative, without the check of the batch count)."""
    model, x, y = make("mlp", n=12)
    data = _LosesItsLastBatch(x, y)
    op = build(model, data)
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op.matvec(v), build(model, (x, y)).matvec(v), rtol=1e-12, atol=1e-14)
    data.shrink = True
    with pytest.raises(ValueError, match=r"different batches on two passes \(2 batches where the first pass had 3"):
        op.matvec(v)

@pytest.mark.parametrize("loader", [
    lambda x, y: DataLoader(_AugmentedLater(x, y), batch_size=4),
    lambda x, y: DataLoader(TensorDataset(x, y), batch_size=4,
                            sampler=torch.utils.data.RandomSampler(range(len(x)), replacement=True)),
], ids=["augmented", "sampled with replacement"])
def test_an_objective_over_changing_data_is_refused(loader):
    """Objective had no check that passes agree: its value moved at fixed weights (1.1725, 1.1682, 1.1596), and
    ARC's accept test compares values."""
    model, x, y = make("mlp")
    objective = Objective(model, F.cross_entropy, loader(x, y))
    objective.value()
    with pytest.raises(ValueError, match="different batches on two passes"):
        objective.value()


class _TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.mid(torch.tanh(self.enc(x)))))


def test_a_tied_parameter_is_chosen_by_any_of_its_names():
    """params=["dec.weight"], the second name of a tied weight, was refused: "the model has no parameter named
    'dec.weight'". It is the tensor of 'enc.weight', the name the operator knows it by; naming both is a
    duplicate that says so, and a name given twice is named as given."""
    torch.manual_seed(0)
    model = _TiedAutoencoder().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 4, (N,))
    by_second = hessian_operator(model, F.cross_entropy, (x, y), ["dec.weight"])
    by_first = hessian_operator(model, F.cross_entropy, (x, y), ["enc.weight"])
    assert by_second.param_names == ("enc.weight",)
    torch.testing.assert_close(by_second.to_dense(), by_first.to_dense(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"parameter 'dec.weight' is given twice \(as 'enc.weight' and 'dec.weight': "
                                         r"tied names of one tensor\)"):
        hessian_operator(model, F.cross_entropy, (x, y), ["enc.weight", "dec.weight"])
    with pytest.raises(ValueError, match=r"parameter 'dec.weight' is given twice$"):
        hessian_operator(model, F.cross_entropy, (x, y), ["dec.weight", "dec.weight"])


@pytest.mark.parametrize("build", ["generic", "ggn", "objective"])
def test_tying_or_untying_weights_after_construction_is_refused(build):
    """Untying (load_state_dict(assign=True) of cloned tensors) after construction left products 1.62 and the
    Objective's gradient 0.80 off those of the model as it is, without a word: the operator followed the first
    name of a tied weight only, and wrote its tensor under the other names."""
    torch.manual_seed(0)
    model = _TiedAutoencoder().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 4, (N,))
    make_op = {"generic": lambda: hessian_operator(model, F.cross_entropy, (x, y)),
               "ggn": lambda: ggn_operator(model, F.cross_entropy, (x, y)),
               "objective": lambda: Objective(model, F.cross_entropy, (x, y))}[build]
    op = make_op()
    call = op.gradient
    call()
    model.load_state_dict({k: t.clone() for k, t in model.state_dict().items()}, assign=True)
    with pytest.raises(ModelChanged, match="tied parameters changed after the operator or objective was built on it: "
                                           "'dec.weight' was the tensor of 'enc.weight', now its own"):
        call()
    op = make_op()  # built on the untied model: tying it again is refused too
    model.dec.weight = model.enc.weight
    with pytest.raises(ModelChanged, match="'dec.weight' was its own tensor, now that of 'enc.weight'"):
        op.gradient()


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main, self.side, self.use_side = nn.Linear(4, C), nn.Linear(4, C), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + (self.side(torch.tanh(x)) if self.use_side else 0)


@pytest.mark.parametrize("kind", ["reverse-over-reverse", "forward-over-reverse", "ggn"])
def test_chosen_parameters_the_output_no_longer_uses_have_zero_curvature(kind):
    """A model changed to bypass the chosen parameters (then invalidate()) made the reverse-over-reverse and GGN
    products raise torch's "element 0 of tensors does not require grad", and a GGN on a parameter the forward
    never uses was refused at construction ("the model's Jacobian-vector product ... failed"): zero, as
    documented for parameters the forward does not use."""
    torch.manual_seed(0)
    model = _Gated().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, C, (N,))
    op = _operators(kind, model, F.cross_entropy, (x, y), params=["side.weight", "side.bias"])
    v = torch.randn(op.shape[0], dtype=DT)
    assert op.matvec(v).abs().max() > 0
    model.use_side = False
    op.invalidate()
    assert op.matvec(v).abs().max() == 0 and op.matmat(v[:, None]).abs().max() == 0
    assert op.gradient().abs().max() == 0
    unused = _operators(kind, model, F.cross_entropy, (x, y), params=["side.weight"])  # unused from the start
    assert unused.matvec(torch.ones(unused.shape[0], dtype=DT)).abs().max() == 0


@pytest.mark.parametrize("build", ["fused", "generic", "ggn", "objective"])
def test_autocast_parametrize_caching_and_inference_mode_are_refused_by_name(build):
    """Under torch.autocast the generic path computed in bfloat16 without a word (2.7e-3 off) and the fused and
    GGN paths failed in their kernels; parametrize.cached() held the first batch's parametrized weight for every
    batch (0.85 off, also after the context); inside inference_mode the construction was refused as "the
    model's forward writes its parameter", and products and gradients of the generic and GGN paths (the
    Objective's gradient: zero) were wrong where they built their graphs there."""
    model, x, y = make("mlp")
    model = model.float()
    x = x.float()
    owner = {"fused": "FusedMLPHessian", "generic": "GenericHessian", "ggn": "GGNOperator",
             "objective": "Objective"}[build]

    def make_op():
        if build == "objective":
            return Objective(model, F.cross_entropy, (x, y))
        if build == "ggn":
            return ggn_operator(model, F.cross_entropy, (x, y))
        return hessian_operator(model, F.cross_entropy, (x, y), path=build)

    op = make_op()
    calls = [op.gradient] + ([] if build == "objective" else [lambda: op.matvec(torch.ones(op.shape[0]))])
    autocast = f"^{owner}: torch.autocast is on for cpu: the curvature is computed in the parameters' dtype"
    cached = rf"^{owner}: torch.nn.utils.parametrize.cached\(\) is on"
    for context, message in ((lambda: torch.autocast("cpu", dtype=torch.bfloat16), autocast),
                             (torch.nn.utils.parametrize.cached, cached)):
        for call in (make_op, *calls):
            with context(), pytest.raises(ValueError, match=message):
                call()
    inference = rf"^{owner}: cannot (be built|take a gradient|take products or gradients) inside " \
                r"torch.inference_mode\(\), where autograd records nothing"
    for call in (make_op, *calls):
        with torch.inference_mode(), pytest.raises(ValueError, match=inference):
            call()
    if build == "objective":
        with torch.inference_mode():  # the value needs no autograd
            assert op.value() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    assert torch.isfinite(op.gradient()).all()  # outside, as before


def test_a_lora_adapters_scale_changed_after_construction_is_refused():
    """An adapter's scale is a setting the cached graphs hold (0.89 off a fresh operator without a word)."""
    from unlearn_kernels.lora import add_adapters

    model, x, y = make("mlp")
    add_adapters(model, rank=2, targets=["0"])
    names = [n for n, _ in model.named_parameters() if "lora" in n]
    op = hessian_operator(model, F.cross_entropy, (x, y), params=names)
    op.matvec(torch.ones(op.shape[0], dtype=DT))
    built = model[0].scale
    for scale in (3.0, built * (1 + 1e-12)):  # in the last digits too (a 6-digit repr hid 1.500004)
        model[0].scale = scale
        with pytest.raises(ValueError, match=r"module '0' \(LoRALinear\) was given other settings"):
            op.matvec(torch.ones(op.shape[0], dtype=DT))


# ----------------------------------------------------------------------------- models torch.func cannot take
class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x)[0].mean(1))


def _eval_mode_attention(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An eval-mode float64 classifier over (8, 5, 4) sequences around nn.MultiheadAttention ("multihead") or
    nn.TransformerEncoderLayer ("encoder-layer"), and its data."""
    torch.manual_seed(0)
    if kind == "multihead":
        model = _SelfAttention()
    else:
        model = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True), nn.Flatten(),
                              nn.Linear(20, C))
    return model.to(DT).eval(), torch.randn(8, 5, 4, dtype=DT), torch.randint(0, C, (8,))


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("kind", ["multihead", "encoder-layer"])
def test_ggn_of_eval_mode_attention(kind, fast_path):
    """Inside torch.func.jvp the parameters are detached, so an eval-mode nn.MultiheadAttention(batch_first=True)
    took torch's inference fast path (aten::_native_multi_head_attention), and nn.TransformerEncoderLayer a fused
    attention kernel, neither with a forward-mode derivative: ggn_operator refused both models, blaming them. The
    products now match J^T H J, and the caller's fast-path setting is as it was."""
    model, x, y = _eval_mode_attention(kind)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fast_path)
    try:
        G = ggn_operator(model, F.cross_entropy, uneven_batches(x, y, 5))
        assert torch.backends.mha.get_fastpath_enabled() is fast_path
        dense = G.to_dense()
        assert torch.backends.mha.get_fastpath_enabled() is fast_path
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    assert relative_error(dense, dense_ggn(model, uneven_batches(x, y, 5), F.cross_entropy)) <= 1e-10


@pytest.mark.parametrize("mode", ["auto", "forward-over-reverse", "reverse-over-reverse"])
@pytest.mark.parametrize("kind", ["multihead", "encoder-layer"])
def test_hessian_of_eval_mode_attention(kind, mode):
    """The same fast path and fused attention kernels have no double-backward derivative either: the generic
    Hessian of an eval-mode nn.TransformerEncoderLayer was refused in every mode ("the loss is not twice
    differentiable"). Every batch forward of a model with attention now runs them by differentiable ops; the
    products match a dense Hessian by torch.autograd.functional (with the math kernel, which it needs too), and the
    caller's fast-path setting is as it was."""
    model, x, y = _eval_mode_attention(kind)
    H = hessian_operator(model, F.cross_entropy, uneven_batches(x, y, 5), path="generic",
                         **({} if mode == "auto" else {"mode": mode}))
    assert torch.backends.mha.get_fastpath_enabled()
    dense = H.to_dense()
    assert torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            expected = dense_hessian(model, uneven_batches(x, y, 5), F.cross_entropy)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert relative_error(dense, expected) <= 1e-10


class _PackedClassifier(nn.Module):
    """The usual text classifier: token ids (0 pads) packed by length through an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.rnn, self.head = nn.Embedding(12, 3), nn.LSTM(3, 4, batch_first=True), nn.Linear(4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = (x != 0).sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(x), lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][0][-1])


@pytest.mark.parametrize("mode", ["auto", "reverse-over-reverse", "forward-over-reverse", "streamed"])
def test_a_packed_sequence_rnn_on_the_double_backward_path(mode):
    """torch.func.grad cannot run through a packed sequence ("Cannot access data pointer of Tensor that doesn't
    have storage"), while plain autograd's double backward is exact: every operator refused the model, in
    mode="reverse-over-reverse" too, because the construction probes and the gradients used torch.func.grad.
    They use torch.autograd now; forward-over-reverse falls back to double backward (checked by differences),
    and the GGN, whose products need a torch.func.jvp, still refuses it, naming the jvp."""
    torch.manual_seed(0)
    model = _PackedClassifier().to(DT).eval()
    x, y = torch.randint(1, 12, (12, 5)), torch.randint(0, C, (12,))
    x[::2, 3:] = 0
    batches = uneven_batches(x, y, 5)
    if mode == "forward-over-reverse":
        with pytest.warns(RuntimeWarning, match="forward-over-reverse failed"):
            H = hessian_operator(model, F.cross_entropy, batches, mode=mode)
    else:  # streamed: no cache, every gradient and product a fresh pass
        H = hessian_operator(model, F.cross_entropy, batches, mode="auto" if mode == "streamed" else mode,
                             cache_bytes=0 if mode == "streamed" else None)
    assert H.mode == "reverse-over-reverse"
    assert relative_error(H.to_dense(), dense_hessian(model, batches, F.cross_entropy)) <= 1e-10
    assert relative_error(H.gradient(), dense_gradient(model, batches, F.cross_entropy)) <= 1e-12
    with pytest.raises(ValueError, match=r"^GGNOperator: the model's Jacobian-vector product \(torch.func.jvp\)"):
        ggn_operator(model, F.cross_entropy, batches)


def test_a_backward_hook_is_refused_on_the_double_backward_path_too():
    """The probes take their gradients with torch.autograd, which runs a module's full backward hook (and could
    change the gradient by it): such a hook, of the model or of the loss, is refused on every path, as when
    torch.func's gradient failed on it; a legacy register_backward_hook, which torch.func runs, is taken."""
    model, x, y = make("mlp")
    loss = nn.CrossEntropyLoss()
    for hooked, which in ((model[2], "module '2'"), (loss, "the loss")):
        handle = hooked.register_full_backward_pre_hook(lambda module, grad_out: None)
        try:
            with pytest.raises(ValueError, match=rf"^GenericHessian: {which} has a backward hook or backward pre-hook"):
                hessian_operator(model, loss, (x, y), path="generic", mode="reverse-over-reverse")
        finally:
            handle.remove()
    handle = model[2].register_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        H = hessian_operator(model, loss, (x, y), path="generic", mode="reverse-over-reverse")
        assert relative_error(H.to_dense(), dense_hessian(model, [(x, y)], loss)) <= 1e-10
    finally:
        handle.remove()


def test_a_torchscript_model_is_refused_by_name():
    """A scripted or traced model failed inside the operators with a pybind TypeError ("contains(): incompatible
    function arguments"); it is refused as the methods refuse it, naming the module."""
    model, x, y = make("mlp")
    inner = copy.deepcopy(model)
    inner[0] = torch.jit.trace(inner[0], x[:2])
    builds = (lambda m: hessian_operator(m, F.cross_entropy, (x, y)),
              lambda m: ggn_operator(m, F.cross_entropy, (x, y)), lambda m: Objective(m, F.cross_entropy, (x, y)),
              lambda m: estimate_hessian_lipschitz(m, F.cross_entropy, (x, y)))
    for scripted, where in ((torch.jit.script(model), "the model is"), (torch.jit.trace(model, x[:2]), "the model is"),
                            (inner, "the model's submodule '0' is")):
        for build in builds:
            with pytest.raises(TypeError, match=rf"^{where} a TorchScript module, .*cannot replace: pass the eager "
                                                r"nn.Module it was scripted or traced from$"):
                build(scripted)


def test_lipschitz_estimate_refuses_a_meta_or_uncopyable_model_by_name():
    """estimate_hessian_lipschitz met a meta-device model with torch's ".item() cannot be called on meta tensors"
    (or "Tensor on device meta is not on the expected device cpu!"), and a model its private copy cannot copy
    with deepcopy's raw RuntimeError or TypeError; both are named now, the model untouched."""
    import threading

    import torch.nn.utils.prune as prune

    model, x, y = make("mlp")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
    partly = copy.deepcopy(model)
    partly[2].to("meta")
    for net, name in ((meta, "0.weight"), (partly, "2.weight")):
        with pytest.raises(ValueError, match=rf"^estimate_hessian_lipschitz: the model's parameter '{name}' is on the "
                                             r"meta device \(it has no values\)"):
            estimate_hessian_lipschitz(net, F.cross_entropy, (x, y))
    pruned, locked = copy.deepcopy(model), copy.deepcopy(model)
    prune.l1_unstructured(pruned[0], "weight", amount=0.3)
    locked.lock = threading.Lock()
    copying = (r"^estimate_hessian_lipschitz: the model cannot be copied, and the estimate moves the weights of a "
               r"private copy \(the given model stays as it is\): ")
    for net, says in ((pruned, r"Only Tensors created explicitly by the user \(graph leaves\).*a layer pruned by "
                               r"torch.nn.utils.prune"),
                      (locked, "cannot pickle '_thread.lock' object")):
        before = copy.deepcopy(net.state_dict()) if net is locked else None
        with pytest.raises(TypeError, match=copying + says):
            estimate_hessian_lipschitz(net, F.cross_entropy, (x, y))
        if before is not None:
            assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("path", ["generic", "fused"])
def test_a_fixed_weights_run_checks_at_its_two_ends(path, monkeypatch):
    """Inside fixed_weights() the products and gradients skip the checks each call makes (weights, data, module
    tree): they run when the outermost run starts and ends, and the results are those of checked calls. A run
    that an exception ends does not check again; the next call outside does."""
    model, x, y = make("mlp")
    H = hessian_operator(model, F.cross_entropy, (x, y), path=path)
    v = torch.randn(H.shape[0], dtype=DT)
    product, gradient = H.matvec(v), H.gradient()
    calls = []
    sync = H._sync_weights
    monkeypatch.setattr(H, "_sync_weights", lambda: (calls.append(1), sync())[-1])
    with H.fixed_weights() as same:
        assert same is H
        with H.fixed_weights():
            inside = [H.matvec(v), H.matmat(v[:, None])[:, 0], H.matvec(v)]
            assert torch.equal(H.gradient(), gradient)
        assert len(calls) == 1
    assert len(calls) == 2
    assert torch.equal(inside[0], product) and torch.equal(inside[2], product)
    assert relative_error(inside[1], product) <= 1e-14
    with pytest.raises(RuntimeError, match="stop"):
        with H.fixed_weights():
            raise RuntimeError("stop")
    assert len(calls) == 3
    H.matvec(v)
    assert len(calls) == 4


@pytest.mark.parametrize("change, message", [
    ("weights", r"^FusedMLPHessian: the weights changed during a run of products at fixed weights"),
    ("data", r"^FusedMLPHessian: the data \(inputs x\) was written in place after it was built"),
    ("train", r"^FusedMLPHessian: module '0' \(Linear\) was put in training mode"),
])
def test_a_change_inside_a_fixed_weights_run_is_refused_when_it_ends(change, message):
    """What a product would have refused is refused at the end of the run in which it changed (the run's
    products may mix two states); a weight change, taken silently between runs, is refused there too. After
    it the operator computes at the new weights, as a new one does."""
    model, x, y = make("mlp")
    model.eval()
    H = hessian_operator(model, F.cross_entropy, (x, y), path="fused")
    v = torch.randn(H.shape[0], dtype=DT)
    with pytest.raises(ValueError, match=message):
        with H.fixed_weights():
            H.matvec(v)
            with torch.no_grad():
                {"weights": lambda: model[2].weight.mul_(1.5), "data": lambda: x.add_(0.25),
                 "train": lambda: model[0].train()}[change]()
            H.matvec(v)
    assert H._fixed_depth == 0
    if change == "weights":
        fresh = hessian_operator(model, F.cross_entropy, (x, y), path="fused")
        assert torch.equal(H.matvec(v), fresh.matvec(v))


@pytest.mark.parametrize("build", ["generic", "ggn"])
def test_a_change_inside_a_run_that_breaks_a_product_is_named_by_the_skipped_check(build):
    """Inside a run the per-call checks are skipped, so a change that breaks the next product reached the user in
    the product's words: data written in place as torch's "modified by an inplace operation" (the kept graphs of the
    generic path and the GGN hold the caller's x), a NaN weight on the GGN as "softmax_ce_hvp: tangent contains NaN
    or Inf" (r61). The skipped checks now explain such an error first, as outside a run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))

    def operator():
        return (hessian_operator(model, F.cross_entropy, (x, y), path="generic") if build == "generic"
                else ggn_operator(model, F.cross_entropy, (x, y)))

    for change, message in ((lambda: x.mul_(2), r"the data \(inputs x\) was written in place"),
                            (lambda: model[0].weight.data.__setitem__((0, 0), float("nan")),
                             r"parameter '0.weight' has NaN or Inf values")):
        H = operator()
        v = torch.randn(H.shape[0])
        before = (x.clone(), model[0].weight.detach().clone())
        with pytest.raises(ValueError, match=message):
            with H.fixed_weights():
                H.matvec(v)
                change()
                H.matvec(v)
        with torch.no_grad():
            x.copy_(before[0])
            model[0].weight.copy_(before[1])


@pytest.mark.parametrize("build", ["generic", "ggn"])
def test_a_weight_written_in_place_inside_a_run_is_refused_as_at_its_end(build):
    """An optimizer's write inside a run (it bumps the version counter that a kept graph checks) reached the user
    as torch's RuntimeError "modified by an inplace operation" at the next product (the generic path and the GGN on
    a conv net); the skipped check now names it as the run's end would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    H = (hessian_operator(model, F.cross_entropy, (x, y), path="generic") if build == "generic"
         else ggn_operator(model, F.cross_entropy, (x, y)))
    V = torch.randn(H.shape[0], 2)
    with pytest.raises(ValueError, match=rf"^{type(H).__name__}: the weights changed during a run of products at "
                                         "fixed weights"):
        with H.fixed_weights():
            H.matmat(V)
            with torch.no_grad():
                model[0].weight.add_(0.3)
            H.matmat(V)
    assert H._fixed_depth == 0
    fresh = (hessian_operator(model, F.cross_entropy, (x, y), path="generic") if build == "generic"
             else ggn_operator(model, F.cross_entropy, (x, y)))
    torch.testing.assert_close(H.matmat(V), fresh.matmat(V))  # then at the new weights, as a new operator

def test_the_solvers_take_their_products_in_one_fixed_weights_run(monkeypatch):
    """Each solver iteration (Krylov cubic, Lanczos, CG, MINRES, LiSSA, cubic GD) makes its products in one
    run at fixed weights: the operator checks the model twice, not before every product (through a
    RegularizedOperator too)."""
    from unlearn_kernels.curvature import RegularizedOperator
    from unlearn_kernels.solvers import conjugate_gradient, lanczos, lissa, minres

    model, x, y = make("mlp")
    H = hessian_operator(model, F.cross_entropy, (x, y), path="fused")
    calls = []
    sync = H._sync_weights
    monkeypatch.setattr(H, "_sync_weights", lambda: (calls.append(1), sync())[-1])
    g = torch.randn(H.shape[0], dtype=DT)
    solves = {
        "krylov": lambda op: cubic_newton_step(op, g, 1.0, method="krylov"),
        "gd": lambda op: cubic_newton_step(op, g, 1.0, method="gd", K=3),
        "lanczos": lambda op: lanczos(op, k=8),
        "cg": lambda op: conjugate_gradient(op, g, damping=10.0, maxiter=5),
        "minres": lambda op: minres(op, g, maxiter=5),
        "lissa": lambda op: lissa(op, g, scale=100.0, depth=5),
    }
    for name, solve in solves.items():
        for op in (H, RegularizedOperator(H, 0.1)):
            calls.clear()
            before = H.num_products
            solve(op)
            assert H.num_products - before >= 3 and len(calls) == 2, name


def test_a_fixed_weights_run_still_refuses_autocast_and_inference_mode_at_each_call():
    """The run skipped every per-call check: a product under autocast inside it came out at bfloat16 precision
    with no error, and the mode was gone by the run's end. The modes are refused at every call, as outside."""
    model, x, y = make("mlp")
    H = hessian_operator(model, F.cross_entropy, (x, y), path="generic")
    v = torch.randn(H.shape[0], dtype=DT)
    with H.fixed_weights():
        with pytest.raises(ValueError, match=r"^GenericHessian: torch.autocast is on for cpu"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                H.matvec(v)
        with pytest.raises(ValueError, match=r"^GenericHessian: cannot take products or gradients inside "
                                             r"torch.inference_mode\(\)"):
            with torch.inference_mode():
                H.matvec(v)
        H.matvec(v)


def test_an_operator_whose_fixed_weights_is_no_context_manager_is_named():
    """A duck-typed operator's own fixed_weights() that returns something else (here its matrix) failed with
    Python's bare "'Tensor' object does not support the context manager protocol"."""
    from unlearn_kernels.solvers import conjugate_gradient

    class Op:
        def __init__(self, A: torch.Tensor) -> None:
            self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            return self.A @ v

        def fixed_weights(self) -> torch.Tensor:
            return self.A

    with pytest.raises(TypeError, match=r"^the operator's fixed_weights\(\) must return a context manager .*got "
                                        r"Tensor from Op"):
        conjugate_gradient(Op(torch.eye(3, dtype=DT) * 2), torch.ones(3, dtype=DT))
