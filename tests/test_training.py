"""The training recipe (determinism, a step held to a hand-computed SGD update) and checkpoints
(atomic writes, reuse only on matching metadata, corrupt files)."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unlearn_kernels.checkpoint as checkpoint
from unlearn_kernels.checkpoint import (
    CheckpointError,
    atomic_write,
    cache_path,
    data_fingerprint,
    load_checkpoint,
    model_signature,
    read_checkpoint,
    save_checkpoint,
    train_or_load,
    training_metadata,
)
from unlearn_kernels.data import LabeledData
from unlearn_kernels.methods import Retrain, RetrainReseeded
from unlearn_kernels.models import MLP, ResNet18, SmallViT
from unlearn_kernels.study import StudyConfig, run_study
from unlearn_kernels.training import (
    TrainConfig,
    check_fits,
    init_model,
    join_last_row,
    make_optimizer,
    one_row_batch_norm,
    seeded_rng,
    train,
)


def blobs(n: int = 96, seed: int = 0) -> LabeledData:
    """Three well separated Gaussian blobs in 4-D."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    return LabeledData(centres[y] + 0.5 * torch.randn(n, 4, generator=g), y)


def factory() -> MLP:
    return MLP(4, hidden=(8,), num_classes=3)


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


CONFIG = TrainConfig(epochs=6, batch_size=16, lr=0.1, seed=3)


# ------------------------------------------------------------------------------------- training


def test_train_learns_and_reports_stats():
    data = blobs()
    seen = []
    model = init_model(factory, 0)
    stats = train(model, data, CONFIG, progress=lambda epoch, loss: seen.append((epoch, loss)))
    assert stats.epochs == 6 and stats.steps == 6 * math.ceil(96 / 16)
    assert seen == list(enumerate(stats.epoch_losses))
    assert stats.epoch_losses[-1] < 0.25 * stats.epoch_losses[0]
    assert stats.train_accuracy > 0.95
    assert not model.training
    with torch.no_grad():
        assert (model(data.x).argmax(1) == data.y).float().mean() > 0.95


def test_inputs_that_require_grad_are_left_alone_and_train_as_detached_ones():
    """train's backward reached the caller's inputs: x.grad was written (norm 0.19) where the methods and the
    curvature operators leave it None."""
    data = blobs()
    leaf = data.x.clone().requires_grad_()
    model, reference = init_model(factory, 0), init_model(factory, 0)
    train(model, LabeledData(leaf, data.y), CONFIG)
    train(reference, data, CONFIG)
    assert leaf.grad is None and torch.equal(weights(model), weights(reference))


def test_train_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    data = blobs()
    state = torch.random.get_rng_state()
    a = init_model(factory, 0)
    train(a, data, CONFIG)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = init_model(factory, 0)
    train(b, data, CONFIG)
    assert torch.equal(weights(a), weights(b))
    c = init_model(factory, 0)
    train(c, data, TrainConfig(**{**CONFIG.to_dict(), "seed": 4}))  # other shuffling order
    assert not torch.equal(weights(a), weights(c))


def test_each_epoch_shuffles_with_seed_plus_epoch():
    """The module's promise: epoch e's batch order is the loader's shuffle from ``seed + e`` (a fresh order
    each epoch, the same for the same seed)."""
    x, y = torch.arange(32, dtype=torch.float32).unsqueeze(1), (torch.arange(32) >= 16).long()

    class Recorder(torch.nn.Linear):
        def __init__(self):
            super().__init__(1, 2)
            self.orders = []

        def forward(self, inputs):
            if self.training and len(inputs) == 32:  # not the two-row probe of the input checks
                self.orders.append(inputs[:, 0].long().tolist())
            return super().forward(inputs)

    model = Recorder()
    train(model, LabeledData(x, y), TrainConfig(epochs=3, batch_size=32, lr=0.01, seed=5))
    data = LabeledData(x, y)
    expected = [next(iter(data.loader(32, shuffle=True, seed=5 + epoch)))[0][:, 0].long().tolist()
                for epoch in range(3)]
    assert model.orders == expected and len({tuple(order) for order in expected}) == 3


def test_init_model_is_seeded():
    assert torch.equal(weights(init_model(factory, 1)), weights(init_model(factory, 1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_init_model_seeds_a_factory_that_builds_on_the_gpu():
    """A factory that initialises on the GPU draws from the GPU's generator, which init_model seeds too
    (it seeded the CPU's only: two such models differed)."""
    def on_gpu():
        with torch.device("cuda"):
            return factory()

    state = torch.cuda.get_rng_state()
    a, b = init_model(on_gpu, 1), init_model(on_gpu, 1)
    assert weights(a).is_cuda and torch.equal(weights(a), weights(b))
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert not torch.equal(weights(init_model(factory, 1)), weights(init_model(factory, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        init_model(lambda: "not a model", 0)


def test_init_model_seeds_the_weights():
    """Seeds give their own weights, one seed the same ones (the only check of that sat in a test skipped
    without CUDA: init_model with its seed ignored passed every test here)."""
    assert torch.equal(weights(init_model(factory, 1)), weights(init_model(factory, 1)))
    assert not torch.equal(weights(init_model(factory, 1)), weights(init_model(factory, 2)))


def test_one_full_batch_sgd_step_matches_hand_computed_update():
    """epochs=1, one batch, no momentum: w1 = w0 - lr * (grad CE + wd * w0), checked in float64."""
    data = blobs(20)
    data64 = LabeledData(data.x.double(), data.y)
    model = init_model(factory, 0).double()
    w0 = [p.detach().clone() for p in model.parameters()]
    ce = F.cross_entropy(model(data64.x), data64.y, label_smoothing=0.1)
    g = torch.autograd.grad(ce, list(model.parameters()))
    config = TrainConfig(epochs=1, batch_size=64, lr=0.3, momentum=0.0, weight_decay=0.01, label_smoothing=0.1)
    train(model, data64, config)
    for p, p0, gi in zip(model.parameters(), w0, g):
        torch.testing.assert_close(p.detach(), p0 - 0.3 * (gi + 0.01 * p0), rtol=1e-12, atol=1e-12)


def _adam(w, g, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8):
    """One Adam update of w (as torch's default, written out): the new w, m and v."""
    m = betas[0] * m + (1 - betas[0]) * g
    v = betas[1] * v + (1 - betas[1]) * g * g
    return w - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps), m, v


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("adam", "constant"), ("adamw", "constant"),
                                                 ("adamw", "cosine")])
def test_full_batch_steps_match_the_documented_optimizer_written_out(optimizer, schedule):
    """Three full-batch float64 steps against the updates written out here: SGD and Adam with weight decay as
    an L2 term of the gradient, AdamW's decoupled decay w <- (1 - lr wd) w, and the cosine schedule
    lr_t = lr (1 + cos(pi t / T)) / 2 over the T steps. (AdamW built as Adam, Adam ignoring weight_decay, or a
    cosine schedule that never stepped all passed the tests that only watched the loss fall.)"""
    data = blobs(16)
    data64 = LabeledData(data.x.double(), data.y)
    model = init_model(factory, 0).double()
    weights = [p.detach().clone() for p in model.parameters()]
    lr, wd, steps = 0.05, 0.1, 3
    state = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
    for t in range(steps):
        rate = lr * (1 + math.cos(math.pi * t / steps)) / 2 if schedule == "cosine" else lr
        params = [w.clone().requires_grad_() for w in weights]
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], params)),
                                         (data64.x,))
        grads = torch.autograd.grad(F.cross_entropy(out, data64.y), params)
        for i, (w, g) in enumerate(zip(weights, grads)):
            if optimizer == "sgd":
                weights[i] = w - rate * (g + wd * w)
            elif optimizer == "adam":
                weights[i], *state[i] = _adam(w, g + wd * w, *state[i], t + 1, rate)
            else:
                weights[i], *state[i] = _adam(w * (1 - rate * wd), g, *state[i], t + 1, rate)
    train(model, data64, TrainConfig(epochs=steps, batch_size=16, lr=lr, optimizer=optimizer, momentum=0.0,
                                     weight_decay=wd, lr_schedule=schedule))
    for p, w in zip(model.parameters(), weights):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer, schedule", [("adam", "constant"), ("adamw", "cosine"), ("sgd", "cosine")])
def test_other_optimizers_and_schedules_train(optimizer, schedule):
    lr = 0.1 if optimizer == "sgd" else 0.05
    stats = train(init_model(factory, 0), blobs(),
                  TrainConfig(epochs=5, batch_size=16, lr=lr, optimizer=optimizer, lr_schedule=schedule))
    assert stats.epoch_losses[-1] < 0.5 * stats.epoch_losses[0]


@pytest.mark.parametrize("field, value, message", [
    ("epochs", -1, "epochs must be an int >= 0"), ("epochs", 2.5, "epochs must be an int"),
    ("batch_size", 0, "batch_size must be an int >= 1"), ("batch_size", True, "batch_size must be an int"),
    ("lr", 0.0, "lr must be a finite number > 0"), ("lr", math.inf, "lr must be a finite number"),
    ("weight_decay", math.nan, "weight_decay must be a finite number >= 0"), ("weight_decay", -1e-4, "weight_decay"),
    ("momentum", 1.0, r"momentum must be a finite number in \[0, 1\)"), ("momentum", math.nan, "momentum must be a finite number"),
    ("label_smoothing", 1.0, r"label_smoothing must be a finite number in \[0, 1\)"), ("label_smoothing", "0.1", "label_smoothing"),
    ("seed", -1, r"seed must be in \[0, 2\*\*63\)"),
    ("optimizer", "lbfgs", r"optimizer must be one of \["), ("lr_schedule", "step", r"lr_schedule must be one of \["),
])
def test_bad_config_raises(field, value, message):
    with pytest.raises(ValueError, match="TrainConfig: " + message):
        TrainConfig(**{field: value})


def test_config_refuses_a_seed_that_is_not_an_int_and_normalises_numpy_numbers():
    with pytest.raises(TypeError, match="TrainConfig: seed must be an int, got str"):
        TrainConfig(seed="0")
    config = TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), seed=np.uint8(7))
    assert (config.epochs, config.lr, config.seed) == (3, 0.5, 7)
    assert (type(config.epochs), type(config.lr), type(config.seed)) == (int, float, int)


def test_train_rejects_empty_data_and_wrong_config():
    empty = LabeledData(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        train(factory(), empty, CONFIG)
    with pytest.raises(TypeError, match="TrainConfig"):
        train(factory(), blobs(), {"epochs": 1})


def test_train_refuses_data_the_model_cannot_train_on_before_any_step():
    """NaN inputs trained a NaN model silently; labels beyond the logits (a device assert on CUDA) or
    -100 (skipped as ignore_index) and float64 inputs to a float32 model failed inside torch or not at all."""
    data = blobs()
    nan_x = data.x.clone()
    nan_x[5, 2] = math.nan
    too_high = data.y.clone()
    too_high[7] = 3
    ignored = data.y.clone()
    ignored[7] = -100
    cases = [(LabeledData(nan_x, data.y),
              r"the training set has inputs that are not finite \(NaN or Inf; first at row 5\)"),
             (LabeledData(data.x, too_high),
              r"training set has labels outside the model's 3 classes \(first at row 7: label 3\)"),
             (LabeledData(data.x, ignored), r"first at row 7: label -100"),
             (LabeledData(data.x.double(), data.y), "do not fit the model"),
             (LabeledData(data.x[:, :3], data.y), "do not fit the model")]
    for bad, message in cases:
        model = init_model(factory, 0)
        before = weights(model).clone()
        with pytest.raises(ValueError, match=message):
            train(model, bad, CONFIG)
        assert torch.equal(weights(model), before)
    with pytest.raises(TypeError, match="data must be a LabeledData"):
        train(factory(), (data.x, data.y), CONFIG)
    # one logit: every label must be 0 to pass the label check, and every cross-entropy is then 0
    one_logit = torch.nn.Linear(4, 1)
    before = one_logit.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^train: the model maps training samples to \(batch, 1\) logits; "
                                         r"cross-entropy needs two or more classes"):
        train(one_logit, LabeledData(data.x, torch.zeros_like(data.y)), CONFIG)
    assert torch.equal(one_logit.weight, before)


def batch_norm_net(hidden: int = 8) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 3))


class FrozenBatchNorm(torch.nn.Sequential):
    """Keeps its batch-norm layer in eval mode when trained (a common way to freeze its statistics)."""

    def train(self, mode: bool = True):
        super().train(mode)
        self[1].eval()
        return self


def test_a_last_batch_of_one_row_joins_the_one_before_it_for_a_batch_norm_layer():
    """With 2 * 16 + 1 rows the last batch was one row, and torch raised mid-training ("Expected more
    than 1 value per channel when training") from the model's BatchNorm1d."""
    data = blobs(33)
    model = init_model(batch_norm_net, 0)
    stats = train(model, data, CONFIG)
    assert stats.steps == 6 * 2 and stats.epochs == 6 and stats.train_accuracy > 0.9  # every row counted
    assert not model.training and model[1].num_batches_tracked == 12
    # the cosine schedule anneals over the steps taken
    assert train(init_model(batch_norm_net, 0), data, TrainConfig(epochs=2, batch_size=16, lr_schedule="cosine")
                 ).steps == 4
    # the same rows in the same order as the plain loader, the last two batches as one
    plain = list(data.loader(16, shuffle=True, seed=4))
    joined = data.loader(16, shuffle=True, seed=4, join_last_row=True)
    assert [len(y) for _, y in plain] == [16, 16, 1] and len(joined) == 2
    for (x, y), (px, py) in zip(joined, [plain[0], (torch.cat([plain[1][0], plain[2][0]]),
                                                    torch.cat([plain[1][1], plain[2][1]]))]):
        assert torch.equal(x, px) and torch.equal(y, py)
    unshuffled = [y for _, y in data.loader(16, join_last_row=True)]
    assert [len(y) for y in unshuffled] == [16, 17] and torch.equal(torch.cat(unshuffled), data.y)


def test_batches_are_unchanged_where_no_batch_of_one_row_meets_a_batch_norm_layer():
    """No model without such a layer (or with a BatchNorm2d on maps larger than 1x1, or one its
    train() keeps in eval mode), and no data size without a last batch of one row, changes its
    batches: the plain loader, the same steps."""
    data = blobs(33)
    for make in (factory, lambda: FrozenBatchNorm(*batch_norm_net())):
        assert train(init_model(make, 0), data, CONFIG).steps == 6 * 3
    assert train(init_model(batch_norm_net, 0), blobs(34), CONFIG).steps == 6 * 3
    images = LabeledData(torch.randn(33, 1, 4, 4, generator=torch.Generator().manual_seed(0)), data.y)
    conv = init_model(lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2),
                                                  torch.nn.Flatten(), torch.nn.Linear(32, 3)), 0)
    assert one_row_batch_norm(conv, images.x[:1]) is None and train(conv, images, CONFIG).steps == 6 * 3
    assert join_last_row("owner", conv, images, 16) is False
    assert blobs(34).loader(16, shuffle=True, join_last_row=True).batch_size == 16  # the plain loader: 34 % 16 != 1


def test_one_row_batch_norm_names_the_layer_and_leaves_the_model_and_the_rng_alone():
    model = init_model(lambda: MLP(4, hidden=(8,), num_classes=3), 0)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert one_row_batch_norm(model, blobs(2).x[:1]) is None and not calls  # no batch norm: no forward pass
    net = init_model(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), batch_norm_net()), 0)
    net.eval()
    net[2].train()
    flags = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    assert one_row_batch_norm(net, blobs(2).x[:1]) == "2.1"
    assert torch.equal(torch.rand(2), expected)
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    # ResNet18 on 8x8 digits: its last stage's BatchNorm2d works on 1x1 maps
    resnet = init_model(lambda: ResNet18(10, in_channels=1, width=2), 0)
    assert one_row_batch_norm(resnet, torch.zeros(1, 1, 8, 8)) == "layers.3.0.bn1"
    assert one_row_batch_norm(resnet, torch.zeros(1, 1, 32, 32)) is None


@pytest.mark.parametrize("rows, batch_size, message", [
    (17, 1, r"batch_size 1 makes every batch of the training set \(17 rows\) one row"),
    (1, 16, r"the training set has 1 row \(batch_size 16\)"),
])
def test_batches_of_one_row_no_joining_helps_are_refused_before_any_step(rows, batch_size, message):
    model = init_model(batch_norm_net, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^train: {message}, and the model's batch-norm layer '1' cannot train on "
                                         r"a batch of one row \(one value per channel in training mode\): "):
        train(model, blobs(rows), TrainConfig(epochs=1, batch_size=batch_size))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert train(init_model(factory, 0), blobs(rows), TrainConfig(epochs=1, batch_size=batch_size)).steps == rows


def test_train_refuses_a_model_with_non_finite_weights_before_any_step():
    """One NaN weight trained silently: after the first step every parameter of the caller's model was NaN
    (and an Inf BatchNorm running variance trained too). Refused now as every other entry point refuses it
    (checks.check_finite_model), the model untouched; a model on the meta device is named, not met by torch."""
    data = blobs()
    for net, key, value, what in ((factory, "1.weight", math.nan, "parameter"),
                                  (batch_norm_net, "1.running_var", math.inf, "buffer")):
        model = init_model(net, 0)
        with torch.no_grad():
            dict([*model.named_parameters(), *model.named_buffers()])[key].view(-1)[0] = value
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"^finetune: the model's {what} '{re.escape(key)}' has NaN or Inf "
                                             r"values \(did an update diverge\?\)$"):
            train(model, data, CONFIG, owner="finetune")
        after = model.state_dict()
        assert all(torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in after.items())
    with pytest.raises(ValueError, match=r"^train: the model's parameter '0.weight' is on the meta device"):
        train(nn.Sequential(nn.Linear(4, 3, device="meta")), data, CONFIG)


class _RecordsMoves(nn.Sequential):
    """Records its ``to`` calls (what train() does with device=)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.moves: list[tuple] = []

    def to(self, *args, **kwargs):
        self.moves.append(args)
        return super().to(*args, **kwargs)


def test_a_refused_train_leaves_the_model_where_it_was():
    """train() moved the caller's model to ``device`` and then checked the data: a refused call with
    device="cuda" left the model on the GPU. Every refusal now comes before the move (recorded here as
    ``to`` calls, which need no GPU); a call that trains moves it once."""
    data = blobs()
    nan_x = data.x.clone()
    nan_x[5, 2] = math.nan
    too_high = data.y.clone()
    too_high[7] = 3
    for bad, config, message in ((LabeledData(nan_x, data.y), CONFIG, "inputs that are not finite"),
                                 (LabeledData(data.x, too_high), CONFIG, "labels outside the model's 3 classes"),
                                 (data, TrainConfig(batch_size=1), "batch_size 1 makes every batch")):
        torch.manual_seed(0)
        model = _RecordsMoves(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        with pytest.raises(ValueError, match=message):
            train(model, bad, config)
        assert model.moves == []
    train(model, data, TrainConfig(epochs=1))
    assert model.moves == [(torch.device("cpu"),)]


def test_train_names_its_owner_and_set_and_skips_checks_its_caller_made():
    """A method that trains through train() (finetune, random_labels, salun, retrain) was reported as
    "train: ...", a function its caller never called; and it ran the input checks unlearn() had made."""
    data = blobs(17)
    nan_x = data.x.clone()
    nan_x[3, 1] = math.inf
    too_high = data.y.clone()
    too_high[2] = 5
    cases = [(LabeledData(nan_x, data.y), CONFIG,
              r"the retain set has inputs that are not finite \(NaN or Inf; first at row 3\)"),
             (LabeledData(data.x, too_high), CONFIG, r"the retain set has labels outside the model's 3 classes"),
             (LabeledData(data.x[:, :3], data.y), CONFIG, r"the retain samples \(torch.float32, shape \(3,\)\)"),
             (LabeledData(data.x[:0], data.y[:0]), CONFIG, "the retain set is empty"),
             (data, TrainConfig(batch_size=1), r"batch_size 1 makes every batch of the retain set \(17 rows\) one row")]
    for bad, config, message in cases:
        model = init_model(batch_norm_net, 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=f"^finetune: {message}"):
            train(model, bad, config, owner="finetune", role="retain")
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # checked already: no check's forward pass (an epoch-free recipe makes no other); unchecked: eval and training mode
    for checked, forwards in ((False, 2), (True, 0)):
        model, calls = init_model(factory, 0), []
        model.register_forward_hook(lambda *args: calls.append(1))
        train(model, data, TrainConfig(epochs=0), owner="finetune", role="retain", data_checked=checked)
        assert len(calls) == forwards


def no_running_statistics_net(hidden: int = 8) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden, track_running_stats=False),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 3))


def test_a_batch_norm_layer_without_running_statistics_fits_and_trains():
    """Such a layer normalises with the batch's statistics in eval mode too: check_fits ran one row
    through it in eval mode, and torch's "Expected more than 1 value per channel" was reported as
    samples that "do not fit the model"."""
    model = init_model(no_running_statistics_net, 0)
    for rows in (1, 2, 33):
        check_fits("owner", model, blobs(rows))  # a set of one row: its row twice
    too_high = blobs(5).y.clone()
    too_high[4] = 3
    with pytest.raises(ValueError, match=r"^owner: the training set has labels outside the model's 3 classes"):
        check_fits("owner", model, LabeledData(blobs(5).x, too_high))
    flat = torch.nn.Sequential(*no_running_statistics_net(), torch.nn.Flatten(0))
    with pytest.raises(ValueError, match=r"logits; two samples gave \(6,\)$"):
        check_fits("owner", flat, blobs(5))
    # trained end to end, its last batch of one row joined; a set of one row refused as no batch can help
    stats = train(model, blobs(33), CONFIG)
    assert stats.steps == 6 * 2 and stats.train_accuracy > 0.9
    with torch.no_grad():
        assert (model(blobs(33).x).argmax(1) == blobs(33).y).float().mean() > 0.9
    with pytest.raises(ValueError, match=r"^train: the training set has 1 row \(batch_size 16\), and the model's "
                                         r"batch-norm layer '1' cannot train on a batch of one row"):
        train(init_model(no_running_statistics_net, 0), blobs(1), CONFIG)
    # kept in eval mode by its model, it still takes the batch's statistics: joined too
    frozen = init_model(lambda: FrozenBatchNorm(*no_running_statistics_net()), 0)
    assert one_row_batch_norm(frozen, blobs(2).x[:1]) == "1" and train(frozen, blobs(33), CONFIG).steps == 6 * 2
    # a pass in eval mode: only such a layer needs the joining, one with running statistics does not
    assert join_last_row("owner", model, blobs(33), 16, training=False)
    assert not join_last_row("owner", init_model(batch_norm_net, 0), blobs(33), 16, training=False)
    with pytest.raises(ValueError, match=r"^owner: the forget set has 1 row \(batch_size 16\), and the model's "
                                         r"batch-norm layer '1' cannot take a batch of one row, in eval mode either"):
        join_last_row("owner", model, blobs(1), 16, "forget", training=False)


def test_seeded_rng_restores_state():
    state = torch.random.get_rng_state()
    with seeded_rng(5):
        a = torch.rand(3)
    with seeded_rng(5):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)



def test_seeded_blocks_of_concurrent_threads_run_one_after_the_other():
    """Two seeded blocks in concurrent threads reseeded and restored torch's one generator under each other:
    the first block's second draw came from the second's seed, and the caller's state changed."""
    import threading

    expected = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected.append(torch.rand(2))
    state = torch.random.get_rng_state()
    draws, first_drew, second_inside, first_done = {}, threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with seeded_rng(1):
            one = torch.rand(1)
            first_drew.set()
            second_inside.wait(timeout=0.5)  # the old code: the second block has reseeded by now
            draws[1] = torch.cat([one, torch.rand(1)])
        first_done.set()

    def second() -> None:
        first_drew.wait(timeout=5)
        with seeded_rng(2):
            one = torch.rand(1)
            second_inside.set()
            first_done.wait(timeout=0.5)
            draws[2] = torch.cat([one, torch.rand(1)])

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(draws[1], expected[0]) and torch.equal(draws[2], expected[1])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_another_thread_holds_the_seeded_lock_can_seed():
    """A fork (a DataLoader worker, multiprocessing's "fork" start) while another thread was inside a seeded
    block copied the held lock into the child, where no thread would release it: its first seeded call hung."""
    import multiprocessing
    import threading

    def seeded_draw() -> None:
        with seeded_rng(3):
            torch.rand(1)

    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with seeded_rng(1):
            inside.set()
            leave.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    child = None
    try:
        assert inside.wait(timeout=10)
        child = multiprocessing.get_context("fork").Process(target=seeded_draw)
        child.start()
        child.join(timeout=20)
        assert child.exitcode == 0, f"the child's exit code: {child.exitcode} (None: it hung in its seeded call)"
    finally:
        if child is not None and child.is_alive():
            child.kill()
            child.join()
        leave.set()
        holder.join()


# ------------------------------------------------------------------------------------- checkpoints


def test_fingerprint_sees_values_dtype_and_shape():
    data = blobs(10)
    assert data_fingerprint(data) == data_fingerprint(LabeledData(data.x.clone(), data.y.clone()))
    x = data.x.clone()
    x[3, 2] += 1e-6
    assert data_fingerprint(LabeledData(x, data.y)) != data_fingerprint(data)
    assert data_fingerprint(LabeledData(data.x.double(), data.y)) != data_fingerprint(data)
    assert data_fingerprint(LabeledData(data.x.reshape(10, 2, 2), data.y)) != data_fingerprint(data)
    y = data.y.clone()
    y[0] = 2 - y[0]
    assert data_fingerprint(LabeledData(data.x, y)) != data_fingerprint(data)


def test_save_and_load_roundtrip(tmp_path):
    model = init_model(factory, 0)
    meta = {"recipe": CONFIG.to_dict(), "shape": (4,), "note": "x"}
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, meta)
    state = load_checkpoint(path, meta)  # a tuple in `meta` compares equal to the stored list
    assert state is not None and state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert read_checkpoint(path)[0]["shape"] == [4]
    assert load_checkpoint(path, {**meta, "note": "y"}) is None
    assert load_checkpoint(tmp_path / "absent.pt", meta) is None
    assert os.listdir(path.parent) == ["model.pt"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, init_model(factory, 0), {"version": 1})
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, init_model(factory, 1), {"version": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]


def test_atomic_write_text_permissions_and_failure(tmp_path):
    """What results.json and the benchmark JSON are written with: the file gets the permissions a
    plain open() gives (not mkstemp's 0600), and a failed write leaves the old file alone."""
    path = atomic_write(tmp_path / "results.json", lambda handle: handle.write('{"a": 1}'))
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == '{"a": 1}' and os.stat(path).st_mode & 0o777 == 0o666 & ~mask

    def broken(handle):
        handle.write("{half")
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        atomic_write(path, broken)
    assert path.read_text() == '{"a": 1}' and os.listdir(tmp_path) == ["results.json"]


def test_a_full_disk_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A full disk's write or fsync raises OSError(28) with no file name: the command line printed
    "[Errno 28] No space left on device", naming no file. atomic_write names its target; an error that
    names a file of its own keeps it."""
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    path = tmp_path / "results.json"
    with pytest.raises(OSError) as raised:
        checkpoint.save_json({"a": 1}, path)
    assert str(raised.value) == f"[Errno 28] No space left on device: {str(path)!r}"
    assert os.listdir(tmp_path) == []

    def refused(handle):
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere")

    with pytest.raises(PermissionError) as raised:
        atomic_write(path, refused)
    assert raised.value.filename == "/elsewhere"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_only_the_temporaries_no_live_write_holds_are_removed(tmp_path):
    """A checkpoint write killed by SIGKILL left its temporary in the cache folder for good. Runs may share
    the cache at once, so a temporary is removed only when no write holds its lock (a killed one holds none)."""
    import fcntl

    path = tmp_path / "model.pt"
    # named as atomic_write names its temporaries
    orphan, live = tmp_path / ".model.pt.k3x9_a1b.tmp", tmp_path / ".model.pt.z8y7_c2d.tmp"
    another_files = tmp_path / ".other.pt.k3x9_a1b.tmp"
    for temporary in (orphan, live, another_files):
        temporary.write_bytes(b"half")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a live atomic_write holds it
        assert checkpoint.remove_orphan_temporaries(path) == [orphan]
        assert not orphan.exists() and live.exists() and another_files.exists()
    finally:
        os.close(fd)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_atomic_write_holds_its_temporary_locked_until_it_is_moved(tmp_path, monkeypatch):
    """Another run's clean-up while the file is written, or between its closing and its move, leaves it alone."""
    path = tmp_path / "results.json"
    removed = []
    replace = os.replace

    def write(handle):
        handle.write("{}")
        removed.extend(checkpoint.remove_orphan_temporaries(path))

    def replace_after_a_clean_up(source, target):
        removed.extend(checkpoint.remove_orphan_temporaries(target))
        replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", replace_after_a_clean_up)
    atomic_write(path, write)
    assert removed == [] and path.read_text() == "{}" and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_a_temporary_taken_for_an_orphan_before_its_lock_is_made_again(tmp_path, monkeypatch):
    """A clean-up may remove a temporary made a moment before, not yet locked: the write makes another."""
    import tempfile

    made = []
    mkstemp = tempfile.mkstemp

    def removed_at_once(**kwargs):
        fd, name = mkstemp(**kwargs)
        if not made:
            os.unlink(name)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", removed_at_once)
    path = atomic_write(tmp_path / "results.json", lambda handle: handle.write("{}"))
    assert len(made) == 2 and path.read_text() == "{}" and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locks")
def test_train_or_load_removes_the_temporaries_of_a_killed_save(tmp_path):
    """The temporary of a save killed by SIGKILL stayed beside the cached model; later runs loaded the model
    and left it there."""
    path = tmp_path / "model.pt"
    orphan = tmp_path / ".model.pt.k3x9_a1b.tmp"
    orphan.write_bytes(b"half")
    train_or_load(path, factory, blobs(), CONFIG)
    assert os.listdir(tmp_path) == ["model.pt"]
    orphan.write_bytes(b"half")
    assert train_or_load(path, factory, blobs(), CONFIG)[1] is None  # loaded
    assert os.listdir(tmp_path) == ["model.pt"]


def test_unserialisable_metadata_raises_before_writing(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "m.pt", factory(), {"data": torch.zeros(2)})
    assert os.listdir(tmp_path) == []


def test_corrupt_files_raise_a_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, factory(), {})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    empty = tmp_path / "empty.pt"  # torch.load's EOFError has no message: was an IndexError
    empty.write_bytes(b"")
    for path in (truncated, garbage, foreign, text, empty):
        with pytest.raises(CheckpointError, match=path.name) as raised:
            load_checkpoint(path, {})
        # torch's weights-only refusal advises weights_only=False: unsafe, and no help for a damaged file
        assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value)
    assert truncated.exists()  # left in place for inspection
    with pytest.raises(ValueError, match="cannot be used: File name too long"):
        load_checkpoint(tmp_path / ("x" * 300), {})


def test_damaged_weights_are_refused_by_their_checksum(tmp_path):
    """torch.load checks no checksum: a file whose weight bytes changed (a flipped exponent bit in every
    other weight of a layer took the cached original's test accuracy from 0.969 to 0.919) loaded without
    a word. A file written before the checksum (none stored) still loads."""
    path = tmp_path / "m.pt"
    model = factory()
    save_checkpoint(path, model, {"a": 1})
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name].view(torch.int32)[0] ^= 1 << 23  # the lowest exponent bit of one weight
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"m.pt is corrupt: its weights do not match the checksum"):
        load_checkpoint(path, {"a": 1})
    del payload["digest"]
    torch.save(payload, path)
    metadata, state = read_checkpoint(path)
    assert metadata == {"a": 1} and not torch.equal(state[name], model.state_dict()[name])


def test_the_signature_tells_vits_with_other_head_counts_apart():
    """The head count is no parameter: a ViT checkpoint of one count was reused for another."""
    one, two = (SmallViT(8, 4, 1, 3, dim=8, depth=1, heads=heads) for heads in (1, 2))
    assert model_signature(one) != model_signature(two)
    assert model_signature(two) == model_signature(SmallViT(8, 4, 1, 3, dim=8, depth=1, heads=2))


def test_train_or_load_reuses_only_on_matching_recipe_data_and_model(tmp_path):
    path = tmp_path / "orig.pt"
    data = blobs()
    first, stats = train_or_load(path, factory, data, CONFIG, model_info={"name": "mlp"})
    assert stats is not None and stats.steps > 0
    again, stats = train_or_load(path, factory, data, CONFIG, model_info={"name": "mlp"})
    assert stats is None and torch.equal(weights(first), weights(again))
    meta = read_checkpoint(path)[0]
    assert meta["data"] == data_fingerprint(data) and meta["recipe"] == json.loads(json.dumps(CONFIG.to_dict()))
    assert meta["versions"]["torch"] == torch.__version__

    changed = [
        dict(config=TrainConfig(**{**CONFIG.to_dict(), "lr": 0.05})),
        dict(data=blobs(seed=1)),
        dict(model_info={"name": "other"}),
        dict(factory=lambda: MLP(4, hidden=(9,), num_classes=3)),
        # the same parameters, another activation: an oracle of the other architecture must not be reused
        dict(factory=lambda: MLP(4, hidden=(8,), num_classes=3, activation="tanh")),
    ]
    for change in changed:
        _, stats = train_or_load(path, change.get("factory", factory), change.get("data", data),
                                 change.get("config", CONFIG), model_info=change.get("model_info", {"name": "mlp"}))
        assert stats is not None, change  # retrained, not reused


def _module_from_source(path, source: str):
    """Writes ``source`` to ``path`` and imports it as a fresh module (registered in sys.modules, as
    an import would, which is where ``inspect`` finds a class's file)."""
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


MODEL_SOURCE = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x){suffix}
"""


def test_changed_model_code_or_training_code_or_device_is_not_reused(tmp_path, monkeypatch):
    """The code that defines what training produces is part of the fingerprint: editing the model's
    source, or the training function's, retrains instead of loading a stale checkpoint."""
    path, data = tmp_path / "orig.pt", blobs()
    net_file = tmp_path / "net_module.py"
    net = _module_from_source(net_file, MODEL_SOURCE.format(suffix=""))
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is not None
    capability = torch.backends.cpu.get_cpu_capability()  # AVX2 and AVX-512 kernels round differently
    assert read_checkpoint(path)[0]["device"] == f"cpu ({capability}, {torch.get_num_threads()} threads)"
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is None  # same code: reused

    # the same class name and parameters, a different forward (the recipe in code changed)
    net = _module_from_source(net_file, MODEL_SOURCE.format(suffix=" * 2.0"))
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is not None

    # the training function's code changed
    train_file = tmp_path / "train_module.py"
    wrapper = "from unlearn_kernels.training import train as _train\n\ndef train(*args, **kwargs):{}\n    return _train(*args, **kwargs)\n"
    recipe = _module_from_source(train_file, wrapper.format(""))
    monkeypatch.setattr(checkpoint, "train", recipe.train)
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is not None
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is None
    recipe = _module_from_source(train_file, wrapper.format("  # edited"))
    monkeypatch.setattr(checkpoint, "train", recipe.train)
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is not None

    # a checkpoint written on another device
    metadata, state = read_checkpoint(path)
    model = net.Net()
    model.load_state_dict(state)
    save_checkpoint(path, model, {**metadata, "device": "cuda (NVIDIA H200)"})
    _, stats = train_or_load(path, net.Net, data, CONFIG)
    assert stats is not None


def test_code_fingerprint_covers_the_data_loader(tmp_path, monkeypatch):
    """The loader (labeled.py) decides the shuffle, and so the trained weights: editing it changes the
    fingerprint (a fingerprint without it passed every test)."""
    loader_file = tmp_path / "loader_module.py"
    source = "from unlearn_kernels.labeled import LabeledData as _Plain\n\nclass LabeledData(_Plain):\n    pass{}\n"
    monkeypatch.setattr(checkpoint, "LabeledData", _module_from_source(loader_file, source.format("")).LabeledData)
    before = checkpoint.code_fingerprint(factory())
    assert before == checkpoint.code_fingerprint(factory())
    edited = _module_from_source(loader_file, source.format("  # edited")).LabeledData
    monkeypatch.setattr(checkpoint, "LabeledData", edited)
    assert checkpoint.code_fingerprint(factory()) != before


def test_code_fingerprint_covers_every_model_class_outside_torch(tmp_path):
    net_file = tmp_path / "wrapped_module.py"
    first = _module_from_source(net_file, MODEL_SOURCE.format(suffix=""))
    outer = torch.nn.Sequential(first.Net(), torch.nn.ReLU())
    before = checkpoint.code_fingerprint(outer)
    assert before == checkpoint.code_fingerprint(torch.nn.Sequential(first.Net(), torch.nn.ReLU()))
    _module_from_source(net_file, MODEL_SOURCE.format(suffix=" + 1.0"))  # the file the inner class lives in
    assert checkpoint.code_fingerprint(outer) != before
    assert checkpoint.code_fingerprint(factory()) != before


def test_code_fingerprint_covers_the_base_classes_a_model_inherits_its_forward_from(tmp_path):
    """Only each module's own class file was hashed: a model whose forward comes from a base class in another file
    kept its fingerprint when that forward changed (ReLU -> tanh), and a cached model trained with the old one was
    reused (test accuracy 0.74 where retraining gives 0.93)."""
    base_file = tmp_path / "fingerprint_base.py"
    _module_from_source(base_file, "import torch\n\n\nclass Base(torch.nn.Module):\n"
                                   "    def forward(self, x):\n        return self.fc(torch.relu(x))\n")
    child = _module_from_source(tmp_path / "fingerprint_child.py",
                                "import torch\nfrom fingerprint_base import Base\n\n\nclass Net(Base):\n"
                                "    def __init__(self):\n        super().__init__()\n"
                                "        self.fc = torch.nn.Linear(4, 3)\n")
    model = child.Net()
    before = checkpoint.code_fingerprint(model)
    _module_from_source(base_file, "import torch\n\n\nclass Base(torch.nn.Module):\n"
                                   "    def forward(self, x):\n        return self.fc(torch.tanh(x))\n")
    assert checkpoint.code_fingerprint(model) != before


def test_train_or_load_refuses_a_path_it_cannot_save_to_before_training(tmp_path, monkeypatch):
    """A directory at the path, or a file where its folder should be: refused before the training
    (whose model would otherwise be lost when the save fails)."""
    monkeypatch.setattr(checkpoint, "train", lambda *a, **k: pytest.fail("trained before checking the path"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a file"):
        train_or_load(tmp_path / "taken", factory, blobs(), TrainConfig(epochs=1))
    (tmp_path / "afile").write_text("the user's file")
    with pytest.raises(ValueError, match="its folder cannot be made"):
        train_or_load(tmp_path / "afile" / "model.pt", factory, blobs(), TrainConfig(epochs=1))
    assert (tmp_path / "afile").read_text() == "the user's file"
    with pytest.raises(IsADirectoryError, match="is a directory, not a checkpoint file"):
        read_checkpoint(tmp_path / "taken")


def test_a_save_that_fails_after_the_training_returns_the_trained_model(tmp_path, monkeypatch):
    """A disk that filled during the training: the save failed and the trained model was lost with the
    error (a study ended there). Now it is returned with a warning, and nothing is left at the path."""
    def full_disk(path, model, metadata):
        raise OSError(28, "No space left on device")

    expected, _ = train_or_load(tmp_path / "other.pt", factory, blobs(), TrainConfig(epochs=1))
    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    path = tmp_path / "model.pt"
    with pytest.warns(RuntimeWarning, match=r"^train_or_load: the trained model could not be saved to '.*model.pt' "
                                            r"\(\[Errno 28\] No space left on device\); it is returned all the same"):
        model, stats = train_or_load(path, factory, blobs(), TrainConfig(epochs=1))
    assert stats is not None and not path.exists() and not list(tmp_path.glob(".model.pt*"))
    for (name, p), q in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_symbolic_link_to_nowhere_on_the_way_is_named(tmp_path, monkeypatch):
    """mkdir through a symbolic link whose target does not exist says only "File exists": the folder
    check and the checkpoint path name the link and its target."""
    monkeypatch.setattr(checkpoint, "train", lambda *a, **k: pytest.fail("trained before checking the path"))
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone" / "deeper")
    expect = rf"'{link}' is a symbolic link to '{tmp_path / 'gone' / 'deeper'}', which does not exist"
    for folder in (link, link / "sub"):
        with pytest.raises(ValueError, match=rf"^'{folder}' cannot be made: {expect}$"):
            checkpoint.check_writable_folder(folder)
    with pytest.raises(ValueError, match=f"its folder cannot be made \\({expect}\\)"):
        train_or_load(link / "model.pt", factory, blobs(), TrainConfig(epochs=1))
    assert not (tmp_path / "gone").exists()


def test_a_folder_checked_before_it_is_made_names_a_link_that_resolves_to_nothing(tmp_path):
    """check_writable_folder(make=False), the command line's check of each scenario's folder before the study,
    passed a symbolic link to nowhere or in a loop as a folder still to be made (Path.exists is False for
    both): the study ran, and then mkdir failed with "File exists" or "Too many levels of symbolic links"."""
    gone, loop = tmp_path / "gone", tmp_path / "loop"
    gone.symlink_to(tmp_path / "nowhere")
    loop.symlink_to("loop")
    to_nowhere = rf"'{gone}' is a symbolic link to '{tmp_path / 'nowhere'}', which does not exist"
    for folder, why in ((gone, to_nowhere), (gone / "sub", to_nowhere),
                        (loop, rf"'{loop}' is a symbolic link in a loop of links \('loop'\)")):
        for make in (False, True):
            with pytest.raises(ValueError, match=rf"^'{folder}' cannot be made: {why}$"):
                checkpoint.check_writable_folder(folder, make=make)
    assert checkpoint.check_writable_folder(tmp_path / "new" / "sub", make=False) == tmp_path / "new" / "sub"
    assert not (tmp_path / "new").exists()


def test_a_read_only_cache_serves_loads_and_refuses_to_train_into_it(tmp_path, monkeypatch):
    """A folder that takes no new file (read-only; mkstemp fails there even for root only on a
    read-only file system, so it is simulated) trained first and lost the model at the save."""
    path = tmp_path / "model.pt"
    config = TrainConfig(epochs=1)
    train_or_load(path, factory, blobs(), config)
    saved = path.read_bytes()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    never = lambda epoch, loss: pytest.fail("trained into a read-only folder")  # noqa: E731
    model, stats = train_or_load(path, factory, blobs(), config, progress=never)  # the cached model is served
    assert stats is None and isinstance(model, MLP)
    with pytest.raises(ValueError, match="its folder takes no new file.*Permission denied"):
        train_or_load(path, factory, blobs(), TrainConfig(epochs=2), progress=never)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["model.pt"]


def test_train_or_load_names_its_owner_and_saves_nothing_it_refuses(tmp_path):
    """train_or_load trained through train() under its default name: a refusal said "train: ...", a
    function its caller never called (the study, the retrain oracle's cache)."""
    path = tmp_path / "model.pt"
    one_row = TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match=r"^train_or_load: batch_size 1 makes every batch of the training set "
                                         r"\(17 rows\) one row, and the model's batch-norm layer '1' cannot train"):
        train_or_load(path, batch_norm_net, blobs(17), one_row)
    with pytest.raises(ValueError, match=r"^retrain: batch_size 1 makes every batch of the retain set \(17 rows\)"):
        train_or_load(path, batch_norm_net, blobs(17), one_row, owner="retrain", role="retain")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    """Path("") is the working folder: check_writable_folder("") checked (and passed) the working folder,
    train_or_load("") was refused as "checkpoint path '.' is a directory", and an empty cache_dir cached
    into the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoint, "train", lambda *a, **k: pytest.fail("trained before checking the path"))
    with pytest.raises(ValueError, match=r"^checkpoint path is an empty path: name a file$"):
        train_or_load("", factory, blobs(), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match=r'^the folder is an empty path, which would be the working folder: name a '
                                         r'folder \("\." for the working folder\)$'):
        checkpoint.check_writable_folder("")
    with pytest.raises(ValueError, match=r"^Owner: cache_dir is an empty path, which would cache the models in the "
                                         r'working folder; name a folder \("\." for the working folder\), or None '
                                         r"for no cache$"):
        checkpoint.check_cache_dir("Owner: cache_dir", "", "the models")
    with pytest.raises(TypeError, match=r"^Owner: cache_dir must be None or a folder as a str or os.PathLike "
                                        r"\(e.g. a pathlib.Path\), got bytes$"):
        checkpoint.check_cache_dir("Owner: cache_dir", b"cache", "the models")
    assert checkpoint.check_cache_dir("Owner: cache_dir", ".", "the models") == checkpoint.Path(".")
    assert checkpoint.check_cache_dir("Owner: cache_dir", None, "the models") is None
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_format_is_retrained_not_refused(tmp_path):
    """A cached file of another FORMAT_VERSION (another version of the package sharing the cache) stopped
    every run with "not an unlearn-kernels checkpoint of format 1" (delete it to retrain), where the
    format's own comment promises a retrain; anything else that is no checkpoint is still refused."""
    path = tmp_path / "orig.pt"
    data, config = blobs(), TrainConfig(epochs=2, batch_size=32, lr=0.1, seed=0)
    model, _ = train_or_load(path, factory, data, config)
    payload = torch.load(path, weights_only=True)
    payload["format"] = checkpoint.FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"orig.pt is an unlearn-kernels checkpoint of "
                                                                rf"format {checkpoint.FORMAT_VERSION + 1}, not"):
        read_checkpoint(path)
    again, stats = train_or_load(path, factory, data, config)
    assert stats is not None  # trained, and saved over the other format's file
    assert torch.load(path, weights_only=True)["format"] == checkpoint.FORMAT_VERSION
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    payload["format"] = "1"  # not a format number: no checkpoint of any version
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="is not an unlearn-kernels checkpoint of format"):
        train_or_load(path, factory, data, config)


def test_the_cache_file_names_the_training_device_and_threads(tmp_path):
    """The thread count is in the checkpoint's metadata (it changes the trained weights) but was not in the
    file's name: runs alternating --threads 1 and 2 retrained and overwrote one file in turn."""
    config, model = TrainConfig(epochs=1), factory()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = checkpoint.cache_path(tmp_path, "orig", model, config, device="cpu")
        torch.set_num_threads(2)
        two = checkpoint.cache_path(tmp_path, "orig", model, config, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert one != two and one.parent == two.parent == tmp_path and one.name.startswith("orig-")
    assert checkpoint.cache_path(tmp_path, "orig", model, config, device="meta") not in (one, two)


def test_a_factory_that_starts_elsewhere_or_freezes_a_layer_trains_its_own_model(tmp_path):
    """The checkpoint record covered the architecture, not the starting weights or the frozen flags: a factory
    starting from other weights (pretrained, a zero head) or with a frozen layer loaded the first factory's
    model (0.905 off its own training), in the study's cache and Retrain's alike."""
    data = blobs()

    def plain() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def zero_head() -> nn.Module:
        model = plain()
        nn.init.zeros_(model[2].weight)
        return model

    def frozen_first() -> nn.Module:
        model = plain()
        model[0].requires_grad_(False)
        return model

    trained = {}
    for factory in (plain, zero_head, frozen_first):
        fresh = init_model(factory, CONFIG.seed)
        path = cache_path(tmp_path, "orig", fresh, CONFIG)
        model, stats = train_or_load(path, factory, data, CONFIG)
        assert stats is not None, factory.__name__  # trained, not loaded from the others' files
        trained[factory.__name__] = model
        alone, _ = train_or_load(tmp_path / "alone" / f"{factory.__name__}.pt", factory, data, CONFIG)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), alone.state_dict().values()))
    assert len({cache_path(tmp_path, "orig", init_model(f, CONFIG.seed), CONFIG)
                for f in (plain, zero_head, frozen_first)}) == 3
    # one fixed path for two factories: the record's starting weights tell them apart (not only cache_path's key)
    first, _ = train_or_load(tmp_path / "one.pt", plain, data, CONFIG)
    second, stats = train_or_load(tmp_path / "one.pt", zero_head, data, CONFIG)
    assert stats is not None and not torch.equal(first[2].weight, second[2].weight)


def test_a_loaded_model_is_in_eval_mode_as_a_trained_one_is(tmp_path):
    """train_or_load returns its model in eval mode either way: a batch-norm model loaded in train mode
    normalised with the batch's statistics (outputs 1.6 off the trained model's)."""
    g = torch.Generator().manual_seed(0)
    data = LabeledData(torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 3)
    recipe = TrainConfig(epochs=1, batch_size=16, lr=0.05)

    def resnet() -> nn.Module:
        return ResNet18(num_classes=3, in_channels=1, width=2)

    trained, stats = train_or_load(tmp_path / "resnet.pt", resnet, data, recipe)
    loaded, again = train_or_load(tmp_path / "resnet.pt", resnet, data, recipe)
    assert stats is not None and again is None
    assert not trained.training and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(data.x[:4]), trained(data.x[:4]))


def test_tensors_digest_tells_dtypes_apart_where_the_bytes_agree():
    """Zeros of float32 and int32 have equal bytes: the digest (and so the data fingerprint) keeps the dtype."""
    assert checkpoint.tensors_digest({"w": torch.zeros(4)}) != checkpoint.tensors_digest(
        {"w": torch.zeros(4, dtype=torch.int32)})
    y = torch.arange(4)
    assert data_fingerprint(LabeledData(torch.zeros(4, 3), y)) != data_fingerprint(
        LabeledData(torch.zeros(4, 3, dtype=torch.int32), y))


def test_save_json_writes_non_finite_numbers_as_null_at_any_depth(tmp_path):
    """Strict JSON has no NaN or infinity: save_json writes them as null in dicts, lists and tuples alike."""
    path = checkpoint.save_json({"curve": (1.0, float("nan"), float("-inf")), "nested": [{"t": (float("inf"),)}]},
                                tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"curve": [1.0, None, None], "nested": [{"t": [None]}]}


def test_warm_up_leaves_an_optimizers_one_off_imports_done():
    """After warm_up, building an optimizer imports no module (torch imports torch._dynamo at a process's first
    optimizer, 0.8 s: a cost that belongs to no measured call). In a fresh process, where nothing ran before."""
    script = ("import sys, torch\n"
              "from unlearn_kernels.training import warm_up\n"
              "warm_up()\n"
              "before = set(sys.modules)\n"
              "torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=0.1)\n"
              "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_make_optimizer_takes_parameter_groups_and_checks_each_groups_options():
    """The check of lr and weight_decay against the parameters' dtype read every item as a tensor: parameter
    groups (dicts, as torch's optimizers take) failed with AttributeError; an int weight decay beyond float64 made
    the refusal's own message raise OverflowError."""
    layer = nn.Linear(3, 2)
    optimizer = make_optimizer([{"params": layer.parameters(), "lr": 0.2}], "sgd", 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2] and len(optimizer.param_groups[0]["params"]) == 2
    one = make_optimizer([{"params": layer.weight}], "sgd", 0.1)  # a tensor alone, as torch takes it
    assert one.param_groups[0]["params"] == [layer.weight]
    with pytest.raises(ValueError, match=r"^make_optimizer: lr = 1e\+39 does not fit the parameters' torch.float32"):
        make_optimizer([{"params": layer.parameters(), "lr": 1e39}], "sgd", 0.1)
    with pytest.raises(ValueError, match=r"^make_optimizer: weight_decay = 1.000e\+400 does not fit"):
        make_optimizer(layer.parameters(), "sgd", 0.1, weight_decay=10**400)
    with pytest.raises(ValueError, match="cannot train float16 parameters"):
        make_optimizer([{"params": nn.Linear(3, 2).half().parameters()}], "adam", 0.1)


# ------------------------------------------------------------------------- factories, arguments, cache files


@pytest.mark.parametrize("cached", [False, True])
def test_retrain_refuses_a_factory_that_hands_out_modules_of_the_model_to_unlearn(tmp_path, cached):
    """Retrain trained its factory's model in place: a factory returning the model to unlearn (``lambda: model``)
    or built around a backbone made outside it had the caller's model trained on the retain set (cached or not)."""
    data = blobs(48)
    forget, retain = LabeledData(data.x[:8], data.y[:8]), LabeledData(data.x[8:], data.y[8:])
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())

    def around_backbone() -> nn.Module:
        return nn.Sequential(backbone, nn.Linear(8, 3))

    model = init_model(around_backbone, 0)
    before = {key: t.clone() for key, t in model.state_dict().items()}
    cache = tmp_path / "cache" if cached else None
    methods = [Retrain(around_backbone, CONFIG, cache_dir=cache), Retrain(lambda: model, CONFIG, cache_dir=cache)]
    methods += [] if cached else [RetrainReseeded(around_backbone, CONFIG)]
    for method in methods:
        with pytest.raises(ValueError, match=rf"^{method.name}: model_factory must build a new model each call; two "
                                             r"calls returned models sharing the parameter '0\.0\.weight'"):
            method.unlearn(model, forget, retain)
    assert all(torch.equal(t, before[key]) for key, t in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_train_or_load_refuses_a_factory_sharing_a_tensor_before_loading_into_it(tmp_path):
    """train_or_load copied a cached model's weights into the modules its factory handed out (and trained them
    where nothing was cached): a model built once and returned by every call got the cached weights."""
    path = tmp_path / "model.pt"
    train_or_load(path, factory, blobs(), CONFIG)
    shared = init_model(factory, CONFIG.seed)  # the starting weights of the cached model: its record matches
    before = weights(shared)
    with pytest.raises(ValueError, match=r"^train_or_load: model_factory must build a new model each call; two calls "
                                         r"returned models sharing the parameter '1\.weight'"):
        train_or_load(path, lambda: shared, blobs(), CONFIG)
    norm = nn.BatchNorm1d(3, affine=False)  # buffers only: its running statistics would move in training

    def around_norm() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 3), norm)

    with pytest.raises(ValueError, match=r"sharing the buffer '1\.running_mean'"):
        train_or_load(tmp_path / "norm.pt", around_norm, blobs(), CONFIG)
    assert torch.equal(weights(shared), before) and [f.name for f in tmp_path.iterdir()] == ["model.pt"]


def test_a_factory_may_share_a_constant_buffer(tmp_path):
    """Only what training writes (parameters, normalisation statistics) must be new at each call: a constant held
    at module level (an input normalisation's mean) was refused as if training would change it in every model."""
    mean = torch.tensor([0.5, -0.2, 0.1, 0.0])

    class Centre(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - self.mean

    def centred() -> nn.Module:
        return nn.Sequential(Centre(), nn.Linear(4, 3))

    data = blobs(48)
    model, _ = train_or_load(tmp_path / "m.pt", centred, data, CONFIG)
    Retrain(centred, CONFIG).unlearn(model, LabeledData(data.x[:8], data.y[:8]), LabeledData(data.x[8:], data.y[8:]))
    assert torch.equal(mean, torch.tensor([0.5, -0.2, 0.1, 0.0]))


def test_a_cache_file_that_cannot_be_read_raises_its_oserror_not_a_damaged_file_error(tmp_path, monkeypatch):
    """A cache file without read permission (another user's, mode 000) was reported as "not a readable
    checkpoint (corrupt or truncated?)", and the command line advised deleting it. (As root, chmod 000 does not
    stop reading: the reads, torch's and the package's own, are made to fail.)"""
    path = tmp_path / "model.pt"
    save_checkpoint(path, factory(), {})

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(checkpoint.torch, "load", denied)
    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    for read in (lambda: read_checkpoint(path), lambda: load_checkpoint(path, {}),
                 lambda: train_or_load(path, factory, blobs(), CONFIG)):
        with pytest.raises(PermissionError, match="Permission denied: .*model.pt"):
            read()


def test_a_truncated_cache_file_is_a_damaged_file_not_a_bare_oserror(tmp_path):
    """torch's zip reader raises OSError "[Errno 22] Invalid argument" for most truncated checkpoints (241 of 352
    cut lengths), which was passed on as an unreadable file: no path named, and the command line's advice to
    delete it never shown. A file that reads to its end is a damaged one: CheckpointError naming it, at every
    length, from train_or_load too."""
    path = tmp_path / "model.pt"
    save_checkpoint(path, MLP(64, hidden=(32,), num_classes=10), {})  # 11.9 kB: cut past 4 kB, Errno 22
    whole = path.read_bytes()
    for length in range(0, len(whole), max(1, len(whole) // 40)):
        path.write_bytes(whole[:length])
        with pytest.raises(CheckpointError, match=r"model\.pt is not a readable checkpoint \(corrupt or truncated\?\)"):
            read_checkpoint(path)
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is not a readable checkpoint"):
        train_or_load(path, factory, blobs(), CONFIG)


class _Scaled(nn.Module):
    """Its input times a non-persistent buffer (left out of the state dict), then a linear layer."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale), persistent=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


def test_a_non_persistent_buffer_is_part_of_the_starting_state_a_cached_model_must_match(tmp_path):
    """The cache key and the metadata hashed the state dict, which leaves non-persistent buffers out: a model built
    with scale 0.01 reused the weights trained with 1.0 (test accuracy 0.10 where retraining gives 0.94). Its
    starting state counts them now: another file, and a file of the other model is not reused."""
    data = blobs()

    def build(scale):
        return lambda: init_model(lambda: _Scaled(scale), 0)

    first = cache_path(tmp_path, "m", build(1.0)(), CONFIG)
    assert first != cache_path(tmp_path, "m", build(0.01)(), CONFIG)
    assert train_or_load(first, build(1.0), data, CONFIG)[1] is not None  # trained
    assert train_or_load(first, build(1.0), data, CONFIG)[1] is None  # loaded
    assert train_or_load(first, build(0.01), data, CONFIG)[1] is not None  # the same file forced: not reused


def test_arguments_of_the_wrong_type_or_a_device_that_cannot_run_are_named_before_any_work(tmp_path):
    """A model given for its factory met "Sequential.forward() missing 1 required positional argument", a tuple for
    the data or a dict for the recipe an AttributeError, a device without CUDA torch's AssertionError ("Torch not
    compiled with CUDA enabled")."""
    data, path, model = blobs(), tmp_path / "model.pt", factory()
    before = weights(model)
    cases = [
        (lambda: train_or_load(path, model, data, CONFIG),
         TypeError, r"^train_or_load: model_factory must be a callable that builds a fresh model .* got MLP"),
        (lambda: train_or_load(path, factory, (data.x, data.y), CONFIG),
         TypeError, r"^train_or_load: data must be a LabeledData, got tuple"),
        (lambda: train_or_load(path, factory, data, {"epochs": 1}),
         TypeError, r"^train_or_load: config must be a TrainConfig, got dict"),
        (lambda: train_or_load(path, factory, data, CONFIG, device="cuda:99"),
         ValueError, r"^train_or_load: device 'cuda:99' cannot run here"),
        (lambda: cache_path(tmp_path, "model", model, {"epochs": 1}),
         TypeError, r"^cache_path: config must be a TrainConfig, got dict"),
        (lambda: cache_path(tmp_path, "model", factory, CONFIG),
         TypeError, r"^cache_path: model must be a torch.nn.Module, got function"),
        (lambda: train("notamodel", data, CONFIG), TypeError, r"^train: model must be a torch.nn.Module, got str"),
        (lambda: train(model, data, CONFIG, device="cuda:99"), ValueError, r"^train: device 'cuda:99' cannot run here"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert torch.equal(weights(model), before) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [nn.Identity, lambda: factory().requires_grad_(False)], ids=["none", "frozen"])
def test_train_refuses_a_model_with_nothing_to_train_before_any_change(make):
    """A model without a parameter that trains met torch's "optimizer got an empty parameter list" or "element 0 of
    tensors does not require grad", and was left in training mode."""
    model = make().eval()
    with pytest.raises(ValueError, match=r"^train: the model has no trainable parameters \(requires_grad=True\): "
                                         "nothing to train"):
        train(model, blobs(), CONFIG)
    assert not any(module.training for module in model.modules())


def test_a_failure_during_training_leaves_each_submodule_in_its_mode():
    """train put the model in training mode and left it there when a step failed: each submodule now gets its own
    mode back (eval mode is set only after a training that ends)."""
    model = init_model(factory, 0)
    model[1].eval()  # mixed modes: each comes back as it was
    modes = [module.training for module in model.modules()]

    def fail() -> None:
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train(model, blobs(), CONFIG, after_step=fail)
    assert [module.training for module in model.modules()] == modes


def test_a_checkpoint_that_does_not_fit_the_model_names_each_mismatch(tmp_path):
    """Only the first line of load_state_dict's error was kept: the message ended at its heading, "Error(s) in
    loading state_dict for MLP:", naming no tensor."""
    data, path = blobs(), tmp_path / "model.pt"
    metadata = training_metadata(init_model(factory, CONFIG.seed), data, CONFIG)
    save_checkpoint(path, MLP(4, hidden=(8,), num_classes=5), metadata)  # another head, under the factory's record
    with pytest.raises(CheckpointError, match=r"model.pt does not fit the model it was saved for \(damaged\?\): size "
                                              r"mismatch for 3\.weight: .*; size mismatch for 3\.bias: ") as raised:
        train_or_load(path, factory, data, CONFIG)
    assert "\n" not in str(raised.value) and ".;" not in str(raised.value)


def test_a_study_caches_a_model_whose_options_hold_numpy_values(tmp_path):
    """model_kwargs with numpy values ran without a cache and failed with one: "checkpoint metadata must be
    JSON-serialisable: Object of type int64", the options being stored raw (StudyConfig.to_dict converts them)."""
    recipe = TrainConfig(epochs=1, batch_size=64, lr=0.05)
    config = StudyConfig(methods=("original",), seeds=(0,), recipe=recipe, model_kwargs={"hidden": (np.int64(8),)},
                         cache_dir=str(tmp_path))
    run_study(config)
    (path,) = tmp_path.iterdir()
    assert read_checkpoint(path)[0]["model"]["info"]["kwargs"] == {"hidden": [8]}


@pytest.mark.parametrize("shipped", ["bytecode", "zip"])
def test_a_model_class_whose_source_file_is_not_there_is_fingerprinted_by_name(tmp_path, monkeypatch, shipped):
    # inspect names a source file for a class from a .pyc-only module or a zip archive that does not exist:
    # the fingerprint read it (FileNotFoundError / NotADirectoryError) where plain train() worked
    import py_compile
    import zipfile

    source = tmp_path / "shipped_net.py"
    source.write_text(MODEL_SOURCE.format(suffix=""))
    if shipped == "bytecode":
        py_compile.compile(str(source), cfile=str(tmp_path / "shipped_net.pyc"))
        folder = tmp_path
    else:
        folder = tmp_path / "models.zip"
        with zipfile.ZipFile(folder, "w") as archive:
            archive.write(source, "shipped_net.py")
    source.unlink()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "shipped_net", raising=False)
    module = importlib.import_module("shipped_net")
    assert not os.path.isfile(module.__file__ if shipped == "zip" else str(source))
    fingerprint = checkpoint.code_fingerprint(module.Net())
    assert fingerprint == checkpoint.code_fingerprint(module.Net())
    path = tmp_path / "cache" / "net.pt"
    _, stats = train_or_load(path, module.Net, blobs(), CONFIG)
    assert stats is not None and path.is_file()
    assert train_or_load(path, module.Net, blobs(), CONFIG)[1] is None  # reused


def test_a_model_whose_state_holds_a_non_tensor_is_refused_with_the_entry_named(tmp_path):
    class Tagged(nn.Linear):  # a module's extra state (get_extra_state) may be any object
        def get_extra_state(self):
            return {"tag": "v1"}

        def set_extra_state(self, state):
            pass

    def tagged():
        return nn.Sequential(Tagged(4, 8), nn.ReLU(), nn.Linear(8, 3))

    path = tmp_path / "tagged.pt"
    for call in (lambda: train_or_load(path, tagged, blobs(), CONFIG),
                 lambda: cache_path(tmp_path, "tagged", tagged(), CONFIG),
                 lambda: training_metadata(tagged(), blobs(), CONFIG)):
        with pytest.raises(ValueError, match=r"state entry '0\._extra_state' is a dict, not a tensor"):
            call()
    assert not path.exists()


def test_an_unreadable_checkpoint_names_the_error_not_a_bare_key(tmp_path):
    path = tmp_path / "hello.pt"
    path.write_bytes(b"hello world\n")  # torch.load raises KeyError(101): the message was "...: 101"
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint \(corrupt or truncated\?\): KeyError: 101$"):
        read_checkpoint(path)


def test_training_metadata_checks_its_arguments_as_train_or_load_does():
    for arguments, error, message in (
            (("model", blobs(), CONFIG), TypeError, "training_metadata: model must be a torch.nn.Module"),
            ((factory(), "data", CONFIG), TypeError, "training_metadata: data"),
            ((factory(), blobs(), {"epochs": 1}), TypeError, "training_metadata: config"),
    ):
        with pytest.raises(error, match=message):
            training_metadata(*arguments)
    with pytest.raises(ValueError, match="training_metadata: device"):
        training_metadata(factory(), blobs(), CONFIG, device="nonsense")


def test_a_checkpoint_path_with_a_nul_character_is_named(tmp_path):
    with pytest.raises(ValueError, match="cannot be used: it contains a NUL character"):
        train_or_load(str(tmp_path / "a\0b.pt"), factory, blobs(), CONFIG)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed, error, message", [
    (1.5, TypeError, "must be an int"), ("3", TypeError, "must be an int"), (True, TypeError, "must be an int"),
    (-1, ValueError, r"\[0, 2\*\*63\)"), (2**63, ValueError, r"\[0, 2\*\*63\)"),
])
def test_init_model_and_seeded_rng_refuse_a_bad_seed_by_name(seed, error, message):
    """torch's manual_seed raised "expected a long, but got float" naming nothing, and took -1 as 2**64 - 1."""
    with pytest.raises(error, match=rf"^init_model: seed .*{message}"):
        init_model(lambda: nn.Linear(2, 2), seed)
    with pytest.raises(error, match=rf"^seeded_rng: seed .*{message}"):
        with seeded_rng(seed):
            pass


def test_init_model_refuses_a_module_as_its_factory():
    """A module is callable too: it was called as its forward, with no input."""
    with pytest.raises(TypeError, match=r"^init_model: model_factory must be a callable that builds a fresh model"):
        init_model(nn.Linear(2, 2), 0)


@pytest.mark.parametrize("option", ["progress", "after_step"])
def test_train_refuses_a_callback_that_is_not_callable_before_any_step(option):
    """A bad callback failed with torch's TypeError after an epoch or a step: the model was trained already."""
    model = init_model(lambda: nn.Linear(4, 3), 0)
    before = [p.detach().clone() for p in model.parameters()]
    data = LabeledData(torch.randn(20, 4), torch.arange(20) % 3)
    with pytest.raises(TypeError, match=rf"^train: {option} must be a callable or None, got int$"):
        train(model, data, TrainConfig(epochs=1), **{option: 5})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
