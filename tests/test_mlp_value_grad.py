"""mlp_value_grad_flat (the MLP's mean cross entropy and its gradient in one compiled pass) and the
Objective's fused path that uses it.

Oracle: ``F.cross_entropy`` of the float64 model (the value) and ``torch.autograd.grad`` of it (the
gradient), written out here independently of the op's reference. Every backend runs on every device it
takes (the CUDA kernel too where a GPU is visible).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from devices import backend_devices
from torch import nn

from unlearn_kernels import ops
from unlearn_kernels.curvature import Objective
from unlearn_kernels.ops.mlp_hvp import ACTIVATIONS

PAIRS = backend_devices("mlp_value_grad_flat")
FNS = {"identity": lambda a: a, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _problem(dims, acts, bias, rng, n=11, dtype=torch.float64):
    layers = list(zip(dims[:-1], dims[1:]))
    has_bias = bias if isinstance(bias, list) else [bias] * len(layers)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)

    return dict(x=rand(n, dims[0]), target=torch.randint(0, dims[-1], (n,), generator=rng),
                weights=[rand(o, i, scale=1.5 / i**0.5) for i, o in layers],
                biases=[rand(o, scale=0.5) if b else None for (_, o), b in zip(layers, has_bias)],
                activations=acts)


def _layout(p, chosen=None):
    """Offsets of the chosen blocks (weights then biases per layer, in layer order), all by default."""
    weight_offsets, bias_offsets, start = [], [], 0
    for l, (w, b) in enumerate(zip(p["weights"], p["biases"])):
        weight_offsets.append(start if chosen is None or (l, "w") in chosen else -1)
        start += w.numel() if weight_offsets[-1] >= 0 else 0
        bias_offsets.append(start if b is not None and (chosen is None or (l, "b") in chosen) else -1)
        start += b.numel() if bias_offsets[-1] >= 0 else 0
    return weight_offsets, bias_offsets


def _oracle(p, weight_offsets, bias_offsets, smoothing=0.0, ignore_index=-100):
    """The float64 loss and its gradient by autograd, in the flat layout."""
    ws = [w.double().clone().requires_grad_() for w in p["weights"]]
    bs = [None if b is None else b.double().clone().requires_grad_() for b in p["biases"]]
    h = p["x"].double()
    for w, b, act in zip(ws, bs, p["activations"]):
        h = FNS[act](F.linear(h, w, b))
    loss = F.cross_entropy(h, p["target"], label_smoothing=smoothing, ignore_index=ignore_index)
    grads = torch.autograd.grad(loss, [t for t in (*ws, *bs) if t is not None])
    by_tensor = dict(zip([id(t) for t in (*ws, *bs) if t is not None], grads))
    size = sum(t.numel() for t, o in (*zip(ws, weight_offsets), *zip(bs, bias_offsets)) if o >= 0)
    flat = torch.zeros(size, dtype=torch.float64)
    for t, o in (*zip(ws, weight_offsets), *zip(bs, bias_offsets)):
        if o >= 0:
            flat[o:o + t.numel()] = by_tensor[id(t)].reshape(-1)
    return float(loss), flat


def _on(p, device):
    return {**p, "x": p["x"].to(device), "target": p["target"].to(device),
            "weights": [w.to(device) for w in p["weights"]],
            "biases": [None if b is None else b.to(device) for b in p["biases"]]}


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [[5, 4, 3], [6, 17, 3]])
def test_float64_value_and_gradient_match_autograd(act, bias, dims, rng):
    p = _problem(dims, [act, act], bias, rng)
    layout = _layout(p)
    value, grad = _oracle(p, *layout)
    for backend, device in PAIRS:
        v, g = ops.mlp_value_grad_flat(**_on(p, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                       backend=backend)
        assert v.dtype == torch.float64 and v.dim() == 0 and v.device.type == device
        assert g.dtype == torch.float64 and g.device.type == device
        assert abs(float(v) - value) <= 1e-13 * max(1.0, abs(value)), (backend, device)
        torch.testing.assert_close(g.cpu(), grad, rtol=1e-11, atol=1e-13)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("chosen", [None, {(2, "w"), (2, "b")}, {(1, "w")}, {(0, "b"), (3, "w")}])
def test_deeper_chain_with_smoothing_ignored_rows_and_a_chosen_subset(chosen, rng):
    p = _problem([6, 5, 4, 5, 4], ["gelu", "sigmoid", "relu", "tanh"], [True, False, True, True], rng, n=13)
    p["target"][[2, 7]] = -3
    layout = _layout(p, chosen)
    value, grad = _oracle(p, *layout, smoothing=0.2, ignore_index=-3)
    for backend, device in PAIRS:
        v, g = ops.mlp_value_grad_flat(**_on(p, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                       label_smoothing=0.2, ignore_index=-3, backend=backend)
        assert abs(float(v) - value) <= 1e-13 * max(1.0, abs(value)), (backend, device)
        torch.testing.assert_close(g.cpu(), grad, rtol=1e-11, atol=1e-13)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_over_several_loss_tiles_with_ignored_rows_at_their_edges(dtype, rng):
    # the CPU loss takes rows 64 at a time (the exps of a tile's logits in full vectors, which with 7 classes
    # span rows; its per-row logs a vector at a time): 133 rows are two full tiles and a partial one, with
    # ignored rows on both sides of each edge; the inputs are left as they were
    p = _problem([5, 6, 7], ["relu", "identity"], True, rng, n=133, dtype=dtype)
    p["target"][[0, 63, 64, 65, 127, 128, 132]] = -100
    layout = _layout(p)
    value, grad = _oracle(p, *layout, smoothing=0.1)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for backend, device in PAIRS:
        given = _on(p, device)
        inputs = [given["x"], *given["weights"], *given["biases"]]
        before = [t.clone() for t in inputs]
        v, g = ops.mlp_value_grad_flat(**given, weight_offsets=layout[0], bias_offsets=layout[1],
                                       label_smoothing=0.1, backend=backend)
        assert abs(float(v) - value) <= tol * max(1.0, abs(value)), (backend, device)
        torch.testing.assert_close(g.cpu().double(), grad.double(), rtol=tol * 100, atol=tol)
        assert all(torch.equal(a, b) for a, b in zip(inputs, before)), (backend, device)


def test_rows_of_many_classes_over_two_threads(rng):
    # with 3,000 classes the loss gives each thread a few rows at a time (its grain is 32,768 entries): the
    # tiles then start at rows that are not multiples of 64
    p = _problem([4, 5, 3000], ["tanh", "identity"], True, rng, n=133)
    p["target"][[1, 64, 100]] = -100
    layout = _layout(p)
    value, grad = _oracle(p, *layout, smoothing=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        v, g = ops.mlp_value_grad_flat(**p, weight_offsets=layout[0], bias_offsets=layout[1], label_smoothing=0.1,
                                       backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert abs(float(v) - value) <= 1e-13 * max(1.0, abs(value))
    torch.testing.assert_close(g, grad, rtol=1e-11, atol=1e-13)


@pytest.mark.every_backend  # its cuda pairs run inside the body: benchmarks/gpu_check.sh selects it by this mark
@pytest.mark.parametrize("chosen", [None, {(1, "w"), (1, "b")}])
def test_rows_in_several_blocks(chosen, rng):
    # the CPU pass takes rows in blocks of about 131,072 / (widest layer output) rows, at least 64: with a layer of
    # 2,048 units 133 rows are three blocks (64, 64, 5), each block's gradient added to the first's; the value
    # alone too, and a NaN in a kept row of the last block is still refused
    p = _problem([5, 2048, 4], ["tanh", "identity"], True, rng, n=133)
    p["target"][[0, 63, 64, 127, 130]] = -100
    layout = _layout(p, chosen)
    value, grad = _oracle(p, *layout, smoothing=0.1)
    for backend, device in PAIRS:
        v, g = ops.mlp_value_grad_flat(**_on(p, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                       label_smoothing=0.1, backend=backend)
        assert abs(float(v) - value) <= 1e-13 * max(1.0, abs(value)), (backend, device)
        torch.testing.assert_close(g.cpu(), grad, rtol=1e-11, atol=1e-13)
        v, g = ops.mlp_value_grad_flat(**_on(p, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                       label_smoothing=0.1, with_gradient=False, backend=backend)
        assert abs(float(v) - value) <= 1e-13 * max(1.0, abs(value)) and g.numel() == 0, (backend, device)
    for row in (131, 63):  # a kept row of the last block; an ignored row of the first, which later blocks pass
        bad = {**p, "x": p["x"].clone()}
        bad["x"][row, 2] = float("nan")
        for backend, device in PAIRS:
            with pytest.raises(ValueError, match="the logits contain NaN or"):
                ops.mlp_value_grad_flat(**_on(bad, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                        backend=backend)


@pytest.mark.parametrize("backend, device", PAIRS)
def test_value_only_and_float32(backend, device, rng):
    p = _problem([8, 12, 5], ["relu", "identity"], True, rng, n=40)
    layout = _layout(p)
    value, grad = _oracle(p, *layout)
    v, g = ops.mlp_value_grad_flat(**_on(p, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                   with_gradient=False, backend=backend)
    assert g.shape == (0,) and abs(float(v) - value) <= 1e-13 * abs(value)
    p32 = _on({**p, "x": p["x"].float(), "weights": [w.float() for w in p["weights"]],
               "biases": [b.float() for b in p["biases"]]}, device)
    v32, g32 = ops.mlp_value_grad_flat(**p32, weight_offsets=layout[0], bias_offsets=layout[1], backend=backend)
    assert v32.dtype == torch.float64 and g32.dtype == torch.float32
    assert abs(float(v32) - value) <= 1e-6 * abs(value)  # float32 logits, summed in float64
    torch.testing.assert_close(g32.cpu().double(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, device", backend_devices("mlp_value_grad_flat", compiled_only=True))
def test_float32_gradient_of_well_fit_rows_keeps_float32s_relative_accuracy(backend, device):
    """Rows fit to 1 - p_y between 2e-6 and 1e-4 (an unlearning method's retain rows, near an interpolating model):
    every entry of the float32 gradient within 1e-5 of float64, relative. The compiled passes took the target's
    p_y - 1 in float32 from 1 / sum, which kept ~6e-8 absolute: up to 1.05e-2 of the row's gradient; they now take
    it as minus the other classes' share. (torch's float32 cross entropy, the reference backend's, loses up to ~1e-3
    here too. With label smoothing the optimum's p_y - (1 - eps + eps / C) cancels against the float32 exponentials'
    own rounding, on every backend.)"""
    n = 41
    weight = torch.zeros(3, n, dtype=torch.float64)
    weight[0], weight[2] = torch.linspace(9.0, 13.0, n, dtype=torch.float64), -0.5
    # row i's logits are (margin_i, 0, -0.5): each row's gradient is a column of the weight's, apart from the others'
    p = {"x": torch.eye(n, dtype=torch.float64), "target": torch.zeros(n, dtype=torch.long), "weights": [weight],
         "biases": [None], "activations": ["identity"]}
    exact = _oracle(p, [0], [-1])[1]
    p32 = _on({**p, "x": p["x"].float(), "weights": [weight.float()]}, device)
    _, got = ops.mlp_value_grad_flat(**p32, weight_offsets=[0], bias_offsets=[-1], backend=backend)
    assert got.dtype == torch.float32
    assert float(((got.cpu().double() - exact).abs() / exact.abs()).max()) <= 1e-5


@pytest.mark.parametrize("backend, device", PAIRS)
def test_bad_input_raises_clear_errors(backend, device, rng):
    p = _on(_problem([5, 4, 3], ["relu", "identity"], True, rng), device)
    wo, bo = _layout(p)

    def call(error, match, **change):
        args = {**p, "weight_offsets": wo, "bias_offsets": bo, **change}
        with pytest.raises(error, match=match):
            ops.mlp_value_grad_flat(**args, backend=backend)

    call(ValueError, r"mlp_value_grad_flat: the chosen parameter blocks must tile the flat vector in order without "
                     r"gaps or overlaps, but bias_offsets\[1\] = 36 where row 24 was expected",
         weight_offsets=[0, 99])
    call(ValueError, r"mlp_value_grad_flat: bias_offsets\[0\] = 20 but layer 0 has no bias",
         biases=[None, p["biases"][1]])
    call(ValueError, r"mlp_value_grad_flat: weights, biases, weight_offsets and bias_offsets must have one entry per "
                     r"layer, got 2, 2, 1 and 2", weight_offsets=[0])
    call(ValueError, r"mlp_value_grad_flat: target\[0\] = 7 is out of range for 3 classes", target=torch.full_like(p["target"], 7))
    call(ValueError, r"mlp_value_grad_flat: every target is ignore_index=-100",
         target=torch.full_like(p["target"], -100))
    call(TypeError, r"mlp_value_grad_flat: target must be int64 class indices, got Double", target=p["target"].double())
    call(ValueError, r"mlp_value_grad_flat: weights\[1\] has shape \[3, 5\] but its input has 4 features",
         weights=[p["weights"][0], p["weights"][1].new_zeros(3, 5)])
    call(TypeError, r"mlp_value_grad_flat: with_gradient must be", with_gradient="yes")
    call(ValueError, r"mlp_value_grad_flat: activations\[1\] = 'swish' is not one of", activations=["relu", "swish"])
    bad_x = p["x"].clone()
    bad_x[3, 1] = float("nan")
    call(ValueError, r"mlp_value_grad_flat: the logits contain NaN or \+Inf \(check x, the weights and the biases\)", x=bad_x)
    minus_inf = [p["biases"][0], p["biases"][1].clone()]
    minus_inf[1][int(p["target"][0])] = -float("inf")  # a target class's logit -Inf: the row max is finite
    call(ValueError, r"mlp_value_grad_flat: the loss is not finite \(NaN or Inf in the logits", biases=minus_inf)
    v, g = ops.mlp_value_grad_flat(**{**p, "x": bad_x}, weight_offsets=wo, bias_offsets=bo, check_finite=False,
                                   backend=backend)
    assert torch.isnan(v)  # returned as it is
    call(ValueError, r"mlp_value_grad_flat: weight_offsets\[0\] = -2: an offset is a row of the flat gradient \(>= 0\), "
                     r"or -1 for a parameter that is not chosen", weight_offsets=[-2, 24])


@pytest.mark.parametrize("backend, device", PAIRS)
def test_non_finite_that_leaves_the_loss_finite_is_refused(backend, device, rng):
    """A NaN in an ignored row leaves the loss finite but reaches the gradient through 0 * NaN, and an Inf input
    under a saturating tanh leaves the logits finite with a NaN gradient: both returned a NaN gradient with
    check_finite=True before (mlp_hvp_flat refuses the first)."""
    p = _on(_problem([5, 4, 3], ["tanh", "identity"], True, rng), device)
    wo, bo = _layout(p)
    ignored_nan = p["x"].clone()
    ignored_nan[2, 1] = float("nan")
    target = p["target"].clone()
    target[2] = -100
    with pytest.raises(ValueError, match=r"^mlp_value_grad_flat: the logits contain NaN or \+Inf"):
        ops.mlp_value_grad_flat(**{**p, "x": ignored_nan, "target": target}, weight_offsets=wo, bias_offsets=bo,
                                backend=backend)
    saturated = p["x"].clone()
    saturated[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^mlp_value_grad_flat: the gradient is not finite"):
        ops.mlp_value_grad_flat(**{**p, "x": saturated}, weight_offsets=wo, bias_offsets=bo, backend=backend)
    v, g = ops.mlp_value_grad_flat(**{**p, "x": saturated}, weight_offsets=wo, bias_offsets=bo, with_gradient=False,
                                   backend=backend)
    assert torch.isfinite(v)  # no gradient, nothing to refuse


@pytest.mark.parametrize("backend, device", PAIRS)
def test_one_tensor_passed_for_two_layers_has_a_gradient_per_layer(backend, device, rng):
    """A tensor given for two layers (a shared zero bias, one weight twice): each layer's block is the gradient
    w.r.t. that layer's use, as for distinct copies (the reference summed the uses into every block, and added
    the use of a layer that was not chosen)."""
    W = torch.randn(4, 4, generator=rng, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    p = dict(x=torch.randn(7, 4, generator=rng, dtype=torch.float64), target=torch.randint(0, 4, (7,), generator=rng),
             weights=[W, W], biases=[b, b], activations=["tanh", "identity"])
    copies = {**p, "weights": [W.clone(), W.clone()], "biases": [b.clone(), b.clone()]}
    for chosen in (None, {(1, "w")}):
        layout = _layout(p, chosen)
        _, grad = _oracle(copies, *layout)
        _, g = ops.mlp_value_grad_flat(**_on(p, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                       backend=backend)
        torch.testing.assert_close(g.cpu(), grad, rtol=1e-11, atol=1e-13)


def test_opcheck_and_meta_shapes(rng):
    p = _problem([5, 4, 3], ["tanh", "relu"], [True, False], rng)
    wo, bo = _layout(p)
    args = (p["x"], p["target"], p["weights"], p["biases"], [3, 1], wo, bo, 0.1, -100, True, True)
    torch.library.opcheck(torch.ops.unlearn_kernels.mlp_value_grad_flat.default, args)
    meta = {**p, "x": p["x"].to("meta"), "target": p["target"].to("meta"),
            "weights": [w.to("meta") for w in p["weights"]], "biases": [None if b is None else b.to("meta")
                                                                        for b in p["biases"]]}
    for backend in ("reference", "auto"):
        v, g = ops.mlp_value_grad_flat(**meta, weight_offsets=wo, bias_offsets=bo, backend=backend)
        assert v.shape == () and v.dtype == torch.float64 and g.shape == (4 * 5 + 4 + 3 * 4,)


# ----------------------------------------------------------------------------- the Objective's fused path
def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(),
                         nn.Linear(7, 4)).to(dtype).eval()


@pytest.fixture
def kernel_calls(monkeypatch):
    """The compiled calls the Objective's fused pass makes (a list, one entry per batch): ``path`` and equal values
    alone would pass an Objective whose batches all fell back to autograd."""
    from unlearn_kernels.curvature import fused_mlp

    calls = []
    op = fused_mlp.mlp_value_grad_flat
    monkeypatch.setattr(fused_mlp, "mlp_value_grad_flat", lambda *a, **k: (calls.append(1), op(*a, **k))[1])
    return calls


@pytest.mark.parametrize("params", [None, ["5.weight", "5.bias"], ["3.weight", "1.bias"]])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=2)])
def test_objective_fused_path_equals_autograd(params, loss_fn, device, kernel_calls):
    model = _mlp().to(device)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(50, 3, 4, generator=gen, dtype=torch.float64).to(device),
            torch.randint(0, 4, (50,), generator=gen).to(device))
    fused = Objective(model, loss_fn, data, params, weight_decay=0.01, batch_size=16)
    plain = Objective(model, loss_fn, data, params, weight_decay=0.01, batch_size=16, path="generic")
    assert (fused.path, plain.path) == ("fused", "generic")
    for _ in range(2):  # and after the weights change in place
        kernel_calls.clear()
        (vf, gf), (vp, gp) = fused.value_and_gradient(), plain.value_and_gradient()
        # 50 rows in batches of 16, every batch through the kernel; on the CPU in one call, where no label is
        # ignore_index (with one, the batches' means have their own denominators: batched as autograd)
        whole = device.type == "cpu" and not bool((data[1] == getattr(loss_fn, "ignore_index", -100)).any())
        assert len(kernel_calls) == (1 if whole else 4)
        assert abs(vf - vp) <= 1e-13 and abs(fused.value() - vp) <= 1e-13
        torch.testing.assert_close(gf, gp, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(fused.gradient(), gp, rtol=1e-11, atol=1e-13)
        with torch.no_grad():
            model[5].weight.mul_(1.5)


def test_objective_fused_path_takes_what_the_kernel_cannot_through_autograd(kernel_calls):
    """Class-probability targets (not class labels) go through autograd per batch; a batch of only
    ignored rows adds zero on both paths; a non-MLP or a path='generic' keeps autograd."""
    model = _mlp()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 12, dtype=torch.float64, generator=gen)
    soft = torch.softmax(torch.randn(20, 4, dtype=torch.float64, generator=gen), 1)
    batches = [(x[:10], torch.randint(0, 4, (10,), generator=gen)), (x[10:], soft[10:])]
    fused, plain = (Objective(model, F.cross_entropy, batches, path=path) for path in ("auto", "generic"))
    assert fused.path == "fused"
    kernel_calls.clear()
    torch.testing.assert_close(fused.gradient(), plain.gradient(), rtol=1e-11, atol=1e-13)
    assert len(kernel_calls) == 1  # the labelled batch; the class-probability one through autograd
    ignored = [(x, torch.full((20,), -100)), (x, torch.randint(0, 4, (20,), generator=gen))]
    fused, plain = (Objective(model, F.cross_entropy, ignored, path=path) for path in ("auto", "generic"))
    (vf, gf), (vp, gp) = fused.value_and_gradient(), plain.value_and_gradient()
    assert abs(vf - vp) <= 1e-13
    torch.testing.assert_close(gf, gp, rtol=1e-11, atol=1e-13)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    assert Objective(cnn, F.cross_entropy, (torch.randn(5, 1, 4, 4, dtype=torch.float64),
                                            torch.randint(0, 3, (5,)))).path == "generic"
    with pytest.raises(ValueError, match=r"Objective: path must be one of \['auto', 'generic'\], got 'fused'"):
        Objective(model, F.cross_entropy, ignored, path="fused")


def test_objective_fused_path_returns_a_non_finite_value_and_leaves_the_model():
    """An overflowing step gives a non-finite loss, returned (as autograd's) for the caller to reject, not
    raised; the model is never written."""
    model = _mlp(torch.float32)
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    objective = Objective(model, F.cross_entropy, (x, y))
    assert objective.path == "fused"
    with torch.no_grad():
        model[5].weight.fill_(3e38)
        model[3].weight.fill_(3e38)
    filled = copy.deepcopy(model.state_dict())
    value, _ = objective.value_and_gradient()
    assert not torch.isfinite(torch.tensor(value))
    assert all(torch.equal(t, filled[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("backend, device", PAIRS)
def test_float32_loss_of_confident_rows_keeps_its_digits(backend, device, rng):
    """Rows the model fits with a margin of ~20 have a loss of ~1e-9, below float32's resolution next to 1: torch's
    float32 cross entropy rounds it to 0 or a multiple of 6e-8; the op's rows, from the row's max and its sum of
    exp(z - max) in float64, keep it to float32's rounding of the logits (a relative 1e-5 here)."""
    p = _problem([6, 10, 4], ["tanh", "identity"], True, rng, n=60)
    logits = F.linear(torch.tanh(F.linear(p["x"], p["weights"][0], p["biases"][0])), p["weights"][1], p["biases"][1])
    top = logits.topk(2).values
    margins = top[:, 0] - top[:, 1]
    keep = margins >= margins.median()  # the rows with the larger margins, scaled to at least 20
    scale = 20.0 / float(margins[keep].min())
    p = {**p, "x": p["x"][keep], "target": logits.argmax(1)[keep], "weights": [p["weights"][0], p["weights"][1] * scale],
         "biases": [p["biases"][0], p["biases"][1] * scale]}
    p32 = {**p, "x": p["x"].float(), "weights": [w.float() for w in p["weights"]],
           "biases": [b.float() for b in p["biases"]]}
    p32_in_64 = {**p32, "x": p32["x"].double(), "weights": [w.double() for w in p32["weights"]],
                 "biases": [b.double() for b in p32["biases"]]}
    layout = _layout(p)
    exact, _ = _oracle(p32_in_64, *layout)
    assert 0 < exact < 1e-6
    v32, _ = ops.mlp_value_grad_flat(**_on(p32, device), weight_offsets=layout[0], bias_offsets=layout[1],
                                     backend=backend)
    assert abs(float(v32) - exact) <= 1e-5 * exact, (backend, device)


def test_objective_follows_a_model_or_loss_changed_after_construction(kernel_calls):
    """A hook, another GELU form or other loss settings after construction: the fused pass, built on the old
    ones, kept computing the old function (autograd follows the change); now the pass is chosen again, and the
    objective equals autograd's (path says which runs)."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (30,), generator=gen)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double().eval()
    loss = nn.CrossEntropyLoss()
    fused, plain = (Objective(model, loss, (x, y), path=path) for path in ("auto", "generic"))

    def same(path):
        assert fused.path == path
        kernel_calls.clear()
        (vf, gf), (vp, gp) = fused.value_and_gradient(), plain.value_and_gradient()
        assert len(kernel_calls) == (path == "fused")
        assert abs(vf - vp) <= 1e-13
        torch.testing.assert_close(gf, gp, rtol=1e-11, atol=1e-13)

    same("fused")
    loss.label_smoothing = 0.5
    same("fused")  # the kernel takes label smoothing: read again
    loss.label_smoothing = 0.0
    handle = model[2].register_forward_hook(lambda module, inputs, out: 2 * out)
    same("generic")
    handle.remove()
    same("fused")
    model[1].approximate = "tanh"
    same("generic")
    model[1].approximate = "none"
    same("fused")
