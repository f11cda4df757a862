"""FusedConvHessian: the fused Hessian path for Conv-ReLU-MaxPool networks, against dense float64
Hessians (torch.autograd.functional), the generic path and the float32 accuracy rule."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_rule, relative_error
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

from unlearn_kernels.curvature import FusedConvHessian, GenericHessian, fused_conv, hessian_operator
from unlearn_kernels.curvature.fused_conv import supports
from unlearn_kernels.curvature.params import unflatten_vector
from unlearn_kernels.models import SmallCNN

DT = torch.float64
CLASSES = 3

# (factory, input shape): every kind of block the path takes
NETS = {
    "SmallCNN, 1 channel, odd sizes (ceil-mode pools)": (lambda: SmallCNN(1, CLASSES, (3, 4)), (1, 9, 7)),
    "SmallCNN, 3 channels, three blocks": (lambda: SmallCNN(3, CLASSES, (2, 3, 4)), (3, 8, 8)),
    "strided, no bias, no pool, a 2x2 kernel": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), nn.Conv2d(3, 4, 2), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)), (2, 9, 9)),
    "pools without ReLU, a 3x3 pool, no head bias": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()),
                              nn.MaxPool2d(3, ceil_mode=True), nn.Identity(), nn.AdaptiveAvgPool2d((1, 1)),
                              nn.Flatten(), nn.Dropout(0.3).eval(), nn.Linear(4, CLASSES, bias=False)), (2, 10, 10)),
}


# Later convolutions on maps no larger than their kernel run as dense matrices: tests that take
# ``dense`` run every network with that rule, with every later convolution dense, and with none.
DENSE_MODES = {"dense where it pays": 1, "every later conv dense": 10**6, "no dense conv": 0}


@pytest.fixture(params=list(DENSE_MODES))
def dense(request, monkeypatch) -> str:
    monkeypatch.setattr(fused_conv, "_DENSE_PIXELS_PER_TAP", DENSE_MODES[request.param])
    return request.param


def _make(name: str, n: int = 9, seed: int = 0, dtype: torch.dtype = DT, device: str | torch.device = "cpu"):
    factory, shape = NETS[name]
    torch.manual_seed(seed)
    model = factory().to(device=device, dtype=dtype)
    x = torch.randn(n, *shape, dtype=dtype, device=device)
    y = torch.randint(0, CLASSES, (n,), device=device)
    return model, x, y


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def _dense(model: nn.Module, batches, loss_fn, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense Hessian and gradient of sum_b (n_b / N) loss_fn(model(x_b), y_b) over ``names``."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    total = sum(y.shape[0] for _, y in batches)

    def objective(w: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, unflatten_vector(w, shapes)))
        return sum(loss_fn(functional_call(model, params, (x,)), y) * (y.shape[0] / total) for x, y in batches)

    w0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    return hessian(objective, w0), jacobian(objective, w0)


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.2, ignore_index=1)],
                         ids=["plain", "smoothing+ignore_index"])
def test_matches_the_dense_hessian_and_gradient(name, loss, dense):
    model, x, y = _make(name)
    batches = _batches(x, y)  # 4 + 4 + 1 rows: uneven batches
    names = [n for n, _ in model.named_parameters()]
    op = hessian_operator(model, loss, batches)
    assert isinstance(op, FusedConvHessian) and op.path == "fused" and op.path_reason is None
    dense_h, dense_g = _dense(model, batches, loss, names)
    assert relative_error(op.to_dense(chunk_size=40), dense_h) <= 1e-12
    assert relative_error(op.gradient(), dense_g) <= 1e-12


@pytest.mark.parametrize("pick", ["first conv", "middle", "last bias only", "head only", "weights only"])
def test_parameter_subsets_are_hessian_blocks(pick, dense):
    model, x, y = _make("SmallCNN, 3 channels, three blocks")
    all_names = [n for n, _ in model.named_parameters()]
    names = {"first conv": all_names[:2], "middle": [all_names[3], all_names[2]], "last bias only": [all_names[5]],
             "head only": all_names[-2:], "weights only": [n for n in all_names if n.endswith("weight")]}[pick]
    loss = nn.CrossEntropyLoss()
    op = FusedConvHessian(model, loss, (x, y), names)
    assert op.param_names == tuple(names)
    dense_h, dense_g = _dense(model, [(x, y)], loss, names)
    assert relative_error(op.to_dense(), dense_h) <= 1e-12
    assert relative_error(op.gradient(), dense_g) <= 1e-12


def test_matmat_equals_matvecs_and_the_generic_path(device, dense):
    model, x, y = _make("SmallCNN, 1 channel, odd sizes (ceil-mode pools)", n=13, device=device)
    loss = nn.CrossEntropyLoss()
    batches = _batches(x, y, 5)
    op = FusedConvHessian(model, loss, batches)
    generic = GenericHessian(model, loss, batches)
    V = torch.randn(op.shape[0], 3, dtype=DT, device=device, generator=torch.Generator(device).manual_seed(1))
    out = op.matmat(V)
    assert op.num_products == 3 and op.num_data_passes == 1  # construction makes no products
    torch.testing.assert_close(out, torch.stack([op.matvec(V[:, k]) for k in range(3)], dim=1), rtol=1e-13, atol=1e-15)
    assert relative_error(out, generic.matmat(V)) <= 1e-12
    assert relative_error(op.gradient(), generic.gradient()) <= 1e-12


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, hw", [
    (3, 4, (3, 3), (1, 1), (1, 1), (2, 2)),
    (2, 5, (3, 3), (1, 1), (1, 1), (3, 3)),
    (2, 3, (2, 3), (2, 1), (0, 1), (3, 2)),  # non-square kernel, stride and map
    (2, 3, (3, 3), (1, 2), (1, 1), (3, 3)),  # the row stride apart from the column stride, over 3 output rows
    (3, 2, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 2, (3, 3), (2, 2), (2, 2), (3, 3)),  # padding wider than the map's edge
])
def test_dense_layout_is_the_convolution_and_fold_its_adjoint(device, c_in, c_out, kernel, stride, padding, hw):
    block = fused_conv._Block("w", None, kernel, stride, padding, relu=False, pool=None, pool_ceil=False)
    gen = torch.Generator(device).manual_seed(4)
    h = torch.randn(5, c_in, *hw, dtype=DT, device=device, generator=gen)
    weight = torch.randn(c_out, c_in, *kernel, dtype=DT, device=device, generator=gen)
    z = F.conv2d(h, weight, None, stride, padding)
    layout = fused_conv._DenseLayout.build(block, c_in, c_out, hw, tuple(z.shape[2:]), h.device)
    assert layout is not None and layout.shape == (c_in * hw[0] * hw[1], c_out * z.shape[2] * z.shape[3])
    rows = h.permute(0, 2, 3, 1).reshape(5, -1) @ layout.expand(weight)
    torch.testing.assert_close(rows, z.permute(0, 2, 3, 1).reshape(5, -1), rtol=1e-13, atol=1e-13)
    grad = torch.randn(layout.shape, dtype=DT, device=device, generator=gen)
    assert float((layout.fold(grad, weight) * weight).sum()) == pytest.approx(
        float((grad * layout.expand(weight)).sum()), rel=1e-12)


def test_dense_layout_only_where_it_pays():
    block = fused_conv._Block("w", None, (3, 3), (1, 1), (1, 1), relu=True, pool=(2, 2), pool_ceil=False)
    assert fused_conv._DenseLayout.build(block, 4, 4, (3, 3), (3, 3), torch.device("cpu")) is not None
    assert fused_conv._DenseLayout.build(block, 4, 4, (4, 3), (4, 3), torch.device("cpu")) is None  # 12 > 9 taps
    assert fused_conv._DenseLayout.build(block, 128, 128, (3, 3), (3, 3), torch.device("cpu")) is None  # too big


def test_cache_budget_streaming_and_weight_changes():
    model, x, y = _make("SmallCNN, 1 channel, odd sizes (ceil-mode pools)", n=12)
    loss = nn.CrossEntropyLoss()
    batches = _batches(x, y)  # three equal batches
    cached = FusedConvHessian(model, loss, batches)
    streamed = FusedConvHessian(model, loss, batches, cache_bytes=0)
    V = torch.randn(cached.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    expected = streamed.matmat(V)
    torch.testing.assert_close(cached.matmat(V), expected, rtol=1e-13, atol=1e-15)
    assert cached.cached_batches == 3 and streamed.cached_batches == 0
    partial = FusedConvHessian(model, loss, batches, cache_bytes=int(1.5 * cached.cached_bytes / 3))
    torch.testing.assert_close(partial.matmat(V), expected, rtol=1e-13, atol=1e-15)
    assert partial.cached_batches == 1
    torch.testing.assert_close(cached.matmat(V), expected, rtol=1e-13, atol=1e-15)  # from the cache alone
    # an optimizer step changes every weight: the cache and the channels-last weight copies follow
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    fresh = FusedConvHessian(model, loss, batches, cache_bytes=0)
    after = cached.matmat(V)
    torch.testing.assert_close(after, fresh.matmat(V), rtol=1e-13, atol=1e-15)
    assert relative_error(after, expected) > 1e-3
    torch.testing.assert_close(cached.gradient(), fresh.gradient(), rtol=1e-13, atol=1e-15)


def test_float32_within_twice_the_pytorch_error(device):
    model, x, y = _make("SmallCNN, 1 channel, odd sizes (ceil-mode pools)", n=32, device=device)
    loss = nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=DT, device=device,
                    generator=torch.Generator(device).manual_seed(3))
    exact = FusedConvHessian(model, loss, (x, y)).matmat(V)
    m32 = model.float()
    fused = FusedConvHessian(m32, loss, (x.float(), y)).matmat(V.float())
    plain = GenericHessian(m32, loss, (x.float(), y), mode="reverse-over-reverse").matmat(V.float())
    assert_within_rule(fused, plain, exact, ulps=16.0)



def test_float32_one_channel_inputs_of_a_later_convolution(dense):
    """A later convolution with one input channel reads a channels-last map whose channel stride is 1, which torch
    calls contiguous; torch's float32 CPU conv2d misread it here (4-tap kernel, width stride 2, one output column):
    products 3e-2 to 1e23 off, or NaN, changing between calls (differential fuzzing found it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 1, stride=(1, 2), padding=(1, 0), bias=False), nn.ReLU(),
                          nn.Conv2d(1, 3, 4, stride=(1, 2), padding=(2, 0), bias=False), *_head(3)).double()
    x, y = torch.randn(2, 3, 7, 9, dtype=DT), torch.tensor([0, 2])
    loss = nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=DT,
                    generator=torch.Generator().manual_seed(3))
    exact = FusedConvHessian(model, loss, (x, y)).matmat(V)
    m32 = model.float()
    for _ in range(3):  # the misread values changed from call to call
        fused = FusedConvHessian(m32, loss, (x.float(), y)).matmat(V.float())
        plain = GenericHessian(m32, loss, (x.float(), y), mode="reverse-over-reverse").matmat(V.float())
        assert_within_rule(fused, plain, exact, ulps=16.0)

def _batch(shape=(1, 6, 6), dtype=torch.float32):
    return torch.randn(2, *shape, dtype=dtype), torch.zeros(2, dtype=torch.long)


def _head(c: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, CLASSES)]


@pytest.mark.parametrize(
    "model, loss, reason",
    [
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), *_head(2)), nn.CrossEntropyLoss(), "with groups=2, dilation=(1, 1)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2), *_head(2)), nn.CrossEntropyLoss(), "with groups=1, dilation=(2, 2)"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), *_head(2)), nn.CrossEntropyLoss(),
         "padding_mode='reflect'"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), *_head(2)), nn.CrossEntropyLoss(), "padding='same'"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, stride=2), *_head(2)), nn.CrossEntropyLoss(), "overlapping"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, padding=1), *_head(2)), nn.CrossEntropyLoss(), "overlapping"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU(), *_head(2)), nn.CrossEntropyLoss(),
         "does not directly follow a Conv2d"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), *_head(2)), nn.CrossEntropyLoss(), "Tanh among the conv blocks"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), *_head(2)), nn.CrossEntropyLoss(), "AvgPool2d"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
         nn.CrossEntropyLoss(), "output size 1"),
        # a None keeps that dimension: the parse read it with int() and raised a bare TypeError from path="auto"
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d((None, 1)), nn.Flatten(), nn.Linear(8, 3)),
         nn.CrossEntropyLoss(), "output size 1"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d((1, None)), nn.Flatten(), nn.Linear(8, 3)),
         nn.CrossEntropyLoss(), "output size 1"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3)), nn.CrossEntropyLoss(),
         "Flatten among the conv blocks"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.CrossEntropyLoss(),
         "does not end with"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), *_head(2), nn.ReLU()), nn.CrossEntropyLoss(), "after the Linear head"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5), *_head(2)), nn.CrossEntropyLoss(),
         "Dropout in training mode"),
        (nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss(), "is Linear among the conv blocks"),
        (nn.Sequential(nn.Identity()), nn.CrossEntropyLoss(), "no Conv2d"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), *_head(2)), nn.MSELoss(), "loss is MSELoss"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), *_head(2)), nn.CrossEntropyLoss(weight=torch.ones(3)), "class weights"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), *_head(2)).half(), nn.CrossEntropyLoss(), "float16"),
        (nn.Conv2d(1, 2, 3), nn.CrossEntropyLoss(), "not an nn.Sequential"),
    ],
)
def test_supports_names_the_reason(model, loss, reason):
    why = supports(model, loss)
    assert why is not None and reason in why, why
    with pytest.raises(ValueError, match="FusedConvHessian cannot be used"):
        FusedConvHessian(model, loss, _batch())


class _Reversed(nn.Sequential):
    """Sequential's forward, but its iteration (which that forward runs) in reverse."""

    def __iter__(self):
        return iter(reversed(list(self._modules.values())))


def test_a_sequential_that_reorders_its_layers_is_not_fused():
    """A Sequential subclass keeping Sequential's forward but iterating its layers in another order was parsed
    in registration order: path="auto" fused it and gave a Hessian 1.46 off (relative). It is generic now, and
    equal to the dense Hessian."""
    torch.manual_seed(0)
    model = _Reversed(nn.Linear(4, CLASSES), nn.Tanh(), nn.Linear(4, 4)).double()  # runs Linear(4,4) first
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % CLASSES
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    assert op.path == "generic"
    names = [n for n, _ in model.named_parameters()]
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, w)
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12)


def test_auto_path_falls_back_with_both_reasons_and_fused_refuses():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), *_head(2))
    x, y = _batch()
    op = hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    assert op.path == "generic" and "not a fused MLP" in op.path_reason and "Tanh" in op.path_reason
    with pytest.raises(ValueError, match="path='fused' cannot be used.*Tanh"):
        hessian_operator(model, nn.CrossEntropyLoss(), (x, y), path="fused")
    shared = nn.Conv2d(2, 2, 1)
    tied = nn.Sequential(nn.Conv2d(1, 2, 3), shared, shared, *_head(2))
    assert "tied" in supports(tied, nn.CrossEntropyLoss())


def test_bad_inputs_raise_clear_errors():
    model, x, y = _make("SmallCNN, 1 channel, odd sizes (ceil-mode pools)")
    # the first batch is probed by the base class (the model's own error, named)
    with pytest.raises(ValueError, match="expected input.*to have 1 channels"):
        FusedConvHessian(model, nn.CrossEntropyLoss(), (x.expand(-1, 2, -1, -1), y))
    # a later batch of a new layout is probed as the first was, before it is read, and named
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT)
    for bad, message in [(x[:3, 0], "to have 1 channels"), (x[:3].expand(-1, 2, -1, -1), "to have 1 channels"),
                         (x[:3].float(), r"\(inputs x of shape \(3, 1, 9, 7\), torch.float32; parameters "
                                         r"torch.float64\)")]:
        op = FusedConvHessian(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (bad, y[:3])])
        with pytest.raises(ValueError, match=r"^batch 1 of the data: the model cannot run on the data .*" + message):
            op.matvec(v)
    # a later batch's label out of range: the probe ran the loss on the first batch only, and the kept
    # state indexed the classes with it (-1 silently took the last class, C failed as an IndexError)
    for label in (-1, CLASSES):
        y_late = y.clone()
        y_late[5] = label
        op = FusedConvHessian(model, nn.CrossEntropyLoss(), _batches(x, y_late))
        with pytest.raises(ValueError, match=rf"^FusedConvHessian: label y\[1\] = {label} \(rows counted within the "
                                             rf"batch\) is out of range for the model's {CLASSES} classes"):
            op.matvec(v)
    op = FusedConvHessian(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        op.matvec(torch.full((op.shape[0],), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="must have shape"):
        op.matvec(torch.ones(op.shape[0] + 1, dtype=DT))


def test_float32_keeps_a_well_fit_models_digits():
    """At rows the model fits well (1 - p_y ~ 5e-6 here) the head's p_y - 1 and r_top - <p, r> cancel in float32:
    the fused products were 1.2e-5 of their largest entry off float64, the gradient 7.7e-6. The ops
    (softmax_ce_grad / softmax_ce_hvp) take each row's top class apart: 8e-7 and 4e-7."""
    model, x, _ = _make("SmallCNN, 1 channel, odd sizes (ceil-mode pools)", n=32)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        top2 = logits.topk(2, dim=1).values
        model[-1].weight.mul_(12 / (top2[:, 0] - top2[:, 1]).median())  # margins of ~12 on the model's own labels
        model[-1].bias.mul_(12 / (top2[:, 0] - top2[:, 1]).median())
        y = logits.argmax(dim=1)
    loss = nn.CrossEntropyLoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    exact = FusedConvHessian(model, loss, (x, y))
    fused = FusedConvHessian(copy.deepcopy(model).float(), loss, (x.float(), y))
    for ours, truth in ((fused.matmat(V.float()), exact.matmat(V)), (fused.gradient(), exact.gradient())):
        assert float((ours.double() - truth).abs().max()) <= 2e-6 * float(truth.abs().max())
