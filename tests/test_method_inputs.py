"""Bad input to a method gets a clear ValueError/TypeError naming the problem and the set, before any
work, and leaves the caller's model and data exactly as they were: for a first-order method
(fine-tune) and a Newton method (CureNewton), on a small MLP over 300 digits."""
import contextlib
import copy
import inspect
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from unlearn_kernels.checks import all_finite
from unlearn_kernels.curvature import ggn_operator, hessian_operator
from unlearn_kernels.data import LabeledData
from unlearn_kernels.methods import METHODS, CureNewton, Finetune, Unlearner, UnlearnResult
from unlearn_kernels.models import MLP
from unlearn_kernels.training import TrainConfig, init_model, train

METHOD_FACTORIES = {"finetune": lambda: Finetune(epochs=1), "cure_newton": lambda: CureNewton(M=1.0)}


def _mlp() -> MLP:
    return MLP(64, hidden=(16,), num_classes=10)


def _make(name: str) -> Unlearner:
    """Any method, cheap: one epoch or one step where it has an option for it."""
    if name.startswith("retrain"):
        return METHODS[name](_mlp, TrainConfig(epochs=1))
    options = {"epochs": 1} if "epochs" in inspect.signature(METHODS[name]).parameters else {}
    if name == "lissa":  # the default damping leaves negative curvature on this barely trained model: it diverges
        options["damping"] = 1.0
    return METHODS[name](**options)


@pytest.fixture(scope="module")
def problem():
    digits = load_digits()
    x = torch.tensor(digits.data[:300], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:300], dtype=torch.long)
    model = init_model(_mlp, 0)
    train(model, LabeledData(x, y), TrainConfig(epochs=2, batch_size=64, seed=0))
    model.train()  # a mode the checks must give back untouched
    return model, LabeledData(x[:30], y[:30]), LabeledData(x[30:], y[30:])


def _with_x(data: LabeledData, row: int, value: float) -> LabeledData:
    x = data.x.clone()
    x[row, 5] = value
    return LabeledData(x, data.y)


def _with_label(data: LabeledData, row: int, label: int) -> LabeledData:
    y = data.y.clone()
    y[row] = label
    return LabeledData(data.x, y)


def _bad_cases(forget: LabeledData, retain: LabeledData) -> dict[str, tuple[LabeledData, LabeledData, str]]:
    """name -> (forget, retain, the regex the error must match)."""
    return {
        "nan_forget": (_with_x(forget, 3, float("nan")), retain,
                       r"forget set has inputs that are not finite \(NaN or Inf; first at row 3\)"),
        "inf_retain": (forget, _with_x(retain, 7, float("inf")),
                       r"retain set has inputs that are not finite \(NaN or Inf; first at row 7\)"),
        "forget_shape": (LabeledData(forget.x[:, :48], forget.y), retain,
                         r"retain samples have shape \(64,\) but the forget samples \(48,\)"),
        "both_shapes": (LabeledData(forget.x[:, :48], forget.y), LabeledData(retain.x[:, :48], retain.y),
                        r"forget samples \(torch.float32, shape \(48,\)\) do not fit the model"),
        "overlap": (forget, LabeledData(torch.cat([retain.x, forget.x[4:6]]), torch.cat([retain.y, forget.y[4:6]])),
                    r"2 forget samples are also in the retain set .*first at forget row 4"),
        "label_forget": (_with_label(forget, 2, 10), retain,
                         r"forget set has labels outside the model's 10 classes \(first at row 2: label 10\)"),
        "label_retain": (forget, _with_label(retain, 9, -1), r"retain set has labels outside .*row 9: label -1"),
        "empty_forget": (LabeledData(forget.x[:0], forget.y[:0]), retain, "forget set is empty"),
        "empty_retain": (forget, LabeledData(retain.x[:0], retain.y[:0]), "retain set is empty"),
        # else every row is the same empty sample, met as "30 forget samples are also in the retain set"
        "no_features": (LabeledData(forget.x[:, :0], forget.y), LabeledData(retain.x[:, :0], retain.y),
                        r"forget set has no input features per sample \(x of shape \(30, 0\)\)"),
        # -0.0 and 0.0 are the same input (other bytes)
        "overlap_negative_zero": (forget, LabeledData(torch.cat([retain.x, torch.where(forget.x[4:5] == 0, -0.0,
                                                                                       forget.x[4:5])]),
                                                      torch.cat([retain.y, forget.y[4:5]])),
                                  r"1 forget samples are also in the retain set .*first at forget row 4"),
    }


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
@pytest.mark.parametrize("case", ["nan_forget", "inf_retain", "forget_shape", "both_shapes", "overlap",
                                  "label_forget", "label_retain", "empty_forget", "empty_retain", "no_features",
                                  "overlap_negative_zero"])
def test_bad_sets_raise_before_any_work(problem, method, case):
    model, forget, retain = problem
    bad_forget, bad_retain, message = _bad_cases(forget, retain)[case]
    state, modes = _snapshot(model)
    data = [t.clone() for t in (bad_forget.x, bad_forget.y, bad_retain.x, bad_retain.y)]
    unlearner: Unlearner = METHOD_FACTORIES[method]()
    with pytest.raises(ValueError, match=message) as error:
        unlearner.unlearn(model, bad_forget, bad_retain)
    assert str(error.value).startswith(f"{unlearner.name}: ")
    after, modes_after = _snapshot(model)
    assert modes_after == modes
    for name, tensor in state.items():
        assert torch.equal(after[name], tensor), name
    for before, now in zip(data, (bad_forget.x, bad_forget.y, bad_retain.x, bad_retain.y)):
        torch.testing.assert_close(now, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
def test_sets_on_different_devices_raise_before_any_work(problem, method):
    """A set on another device than the others ("meta" stands for it on a machine without a GPU) is
    named, not met as torch's "Tensor.item() cannot be called on meta tensors"."""
    model, forget, retain = problem
    state, modes = _snapshot(model)
    unseen = LabeledData(retain.x[:20] * 0.5, retain.y[:20].clone())
    for sets, message in (((forget.to("meta"), retain, None), "forget on meta, retain on cpu"),
                          ((forget, retain.to("meta"), None), "forget on cpu, retain on meta"),
                          ((forget, retain, unseen.to("meta")), "forget on cpu, retain on cpu, unseen on meta")):
        with pytest.raises(ValueError, match=f"^{method}: the sets are on different devices: {message}$"):
            METHOD_FACTORIES[method]().unlearn(model, sets[0], sets[1], unseen=sets[2])
    after, modes_after = _snapshot(model)
    assert modes_after == modes and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
def test_bad_unseen_set_raises(problem, method):
    model, forget, retain = problem
    unseen = LabeledData(retain.x[:20] * 0.5, retain.y[:20].clone())  # inputs the model never saw
    with pytest.raises(ValueError, match="unseen set has inputs that are not finite"):
        METHOD_FACTORIES[method]().unlearn(model, forget, retain, unseen=_with_x(unseen, 0, float("nan")))
    with pytest.raises(ValueError, match="unseen set has labels outside"):
        METHOD_FACTORIES[method]().unlearn(model, forget, retain, unseen=_with_label(unseen, 1, 12))
    with pytest.raises(ValueError, match="unseen set is empty"):
        METHOD_FACTORIES[method]().unlearn(model, forget, retain, unseen=LabeledData(unseen.x[:0], unseen.y[:0]))


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
def test_wrong_types_raise(problem, method):
    model, forget, retain = problem
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        METHOD_FACTORIES[method]().unlearn(lambda x: x, forget, retain)
    with pytest.raises(TypeError, match="forget set must be a LabeledData"):
        METHOD_FACTORIES[method]().unlearn(model, (forget.x, forget.y), retain)
    with pytest.raises(TypeError, match="seed must be an int"):
        METHOD_FACTORIES[method]().unlearn(model, forget, retain, seed=0.5)


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
def test_no_grad_and_inference_mode(problem, method):
    """Under the caller's no_grad() a method trains all the same (the result it gives outside), sets
    made in inference mode are taken, and a call inside inference mode is refused before any work."""
    model, forget, retain = problem
    expected = METHOD_FACTORIES[method]().unlearn(model, forget, retain).model.state_dict()
    with torch.no_grad():
        quiet = METHOD_FACTORIES[method]().unlearn(model, forget, retain).model.state_dict()
    with torch.inference_mode():
        inference_sets = [LabeledData(d.x.clone(), d.y.clone()) for d in (forget, retain)]
    from_inference = METHOD_FACTORIES[method]().unlearn(model, *inference_sets).model.state_dict()
    for key, value in expected.items():
        assert torch.equal(quiet[key], value) and torch.equal(from_inference[key], value), key
    state, modes = _snapshot(model)
    with torch.inference_mode(), pytest.raises(ValueError, match=rf"^{method}: cannot unlearn inside "
                                                                  r"torch.inference_mode\(\)"):
        METHOD_FACTORIES[method]().unlearn(model, forget, retain)
    after, modes_after = _snapshot(model)
    assert modes_after == modes and all(torch.equal(after[k], v) for k, v in state.items())


class _NanBuffer(Unlearner):
    """Returns its copy with a NaN in a floating buffer: a method that diverged."""

    name = "nan_buffer"

    def _unlearn(self, model, forget, retain, *, unseen, seed):
        model.register_buffer("scale", torch.tensor([1.0, float("nan")]))
        return UnlearnResult(model=model, seconds=0.0)


def test_a_non_finite_unlearned_model_is_refused(problem):
    """Checked after every method's work (parameters: tests/test_methods_first_order.py), and the
    caller's model is untouched."""
    model, forget, retain = problem
    state, _ = _snapshot(model)
    with pytest.raises(ValueError, match=r"^nan_buffer: the unlearned model has NaN in its buffer 'scale' "
                                         r"\(the method diverged: .*\); the caller's model is unchanged$"):
        _NanBuffer().unlearn(model, forget, retain)
    assert "scale" not in dict(model.named_buffers())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class _Instant(Unlearner):
    """Returns its copy at once: its time is what the base class measures around it."""

    name = "instant"

    def _unlearn(self, model, forget, retain, *, unseen, seed):
        return UnlearnResult(model=model, seconds=0.0)


def test_the_time_of_a_method_on_cuda_waits_for_its_queued_kernels(problem, monkeypatch):
    """On a GPU a method returns with kernels still queued: the device is synchronised before the clock starts
    (the copy's kernels are not the method's) and before it stops (the code before read it at once, 0 s here).
    The GPU is simulated: each synchronize takes 0.15 s, as queued kernels would."""
    import unlearn_kernels.methods.base as base

    model, forget, retain = problem
    waits = []

    def synchronize(device=None):
        waits.append(torch.device(device))
        time.sleep(0.15)

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(base, "model_device", lambda module: cuda)
    monkeypatch.setattr(base, "seeded_rng", lambda seed, device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    result = _Instant().unlearn(model, forget, retain)
    assert waits == [cuda, cuda] and 0.15 <= result.seconds < 0.3


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_model_or_sets_on_the_meta_device_are_refused_by_name(problem, name):
    """A model on the meta device (shapes without values, e.g. built under ``torch.device("meta")``) is
    refused before any work with the first tensor named, not met as torch's "Tensor.item() cannot be
    called on meta tensors"; so are sets that all live there."""
    model, forget, retain = problem
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=f"^{name}: the model's parameter '1.weight' is on the meta device"):
        _make(name).unlearn(meta, forget, retain)
    with pytest.raises(ValueError, match=f"^{name}: the sets are on the meta device"):
        _make(name).unlearn(model, forget.to("meta"), retain.to("meta"))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_model_with_one_logit_is_refused_by_name(problem, name):
    """A model with one output passes every label check when every label is 0, and cross-entropy over
    one class is then 0 for every sample: each method refuses it before any work, where it once ran
    and returned the model unchanged without a word."""
    _, forget, retain = problem
    model = MLP(64, hidden=(16,), num_classes=1)
    state, modes = _snapshot(model)
    forget, unseen, retain = (LabeledData(x, torch.zeros_like(y)) for x, y in
                              ((forget.x, forget.y), (retain.x[:20], retain.y[:20]), (retain.x[20:], retain.y[20:])))
    with pytest.raises(ValueError, match=rf"^{name}: the model maps forget samples to \(batch, 1\) logits; "
                                         r"cross-entropy needs two or more classes"):
        _make(name).unlearn(model, forget, retain, unseen=unseen)
    after, modes_after = _snapshot(model)
    assert modes_after == modes and all(torch.equal(after[k], v) for k, v in state.items())


def test_same_input_with_another_label_is_not_a_shared_sample(problem):
    """Only a sample (input and label) in both sets is refused: an input repeated with another label
    is a different sample, and the method runs."""
    model, forget, retain = problem
    relabelled = (forget.y[:2] + 1) % 10
    retain = LabeledData(torch.cat([retain.x, forget.x[:2]]), torch.cat([retain.y, relabelled]))
    result = Finetune(epochs=1).unlearn(model, forget, retain)
    assert result.gradients > 0


def test_shared_samples_are_found_across_dtypes():
    """The same samples held in two dtypes (int32 and int64 token ids; float16 and float32 inputs of a
    model that casts them) are shared samples: the check compares them in the promoted dtype, where it
    once skipped sets of different dtypes."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(10, 4), nn.Linear(12, 2)

        def forward(self, x):
            return self.out(self.embed(x.long()).flatten(1))

    torch.manual_seed(0)
    x, y = torch.randint(0, 10, (40, 3)), torch.randint(0, 2, (40,))
    forget = LabeledData(x[:5], y[:5])
    with pytest.raises(ValueError, match="5 forget samples are also in the retain set"):
        Finetune(epochs=1).unlearn(Tokens(), forget, LabeledData(x.int(), y))
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, x):
            return self.body(x.float())

    halves = torch.randn(40, 64).half()
    with pytest.raises(ValueError, match="3 forget samples are also in the retain set"):
        Finetune(epochs=1).unlearn(Casting(), LabeledData(halves[:3].float(), y[:3]), LabeledData(halves, y))


def test_a_model_that_draws_in_eval_mode_leaves_the_callers_rng_alone(problem):
    """The input check runs the model on a sample before the seeded work: a model that draws random
    numbers in eval mode (Monte-Carlo dropout) must not move the caller's RNG there either."""
    class MonteCarloDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, x):
            return self.body(F.dropout(x, 0.2, training=True))

    _, forget, retain = problem
    torch.manual_seed(0)
    model = MonteCarloDropout()
    for method in (METHODS["original"](), Finetune(epochs=1)):
        torch.manual_seed(123)
        expected_draw = torch.rand(3)
        torch.manual_seed(123)
        method.unlearn(model, forget, retain, seed=0)
        assert torch.equal(torch.rand(3), expected_draw), method.name
    # the Newton family refuses it, under its own name (the curvature layer's message named only the operator)
    for name in ("cure_newton", "stochastic_cure_newton"):
        with pytest.raises(ValueError, match=f"^{name}: .*two (gradient|loss) evaluations on the same batch differ"):
            _make(name).unlearn(model, forget, retain, seed=0)


def test_model_that_does_not_return_logits(problem):
    _, forget, retain = problem
    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Flatten(0))
    with pytest.raises(ValueError, match=r"must map a batch of forget samples to \(batch, classes\) logits; "
                                         r"one sample gave \(10,\)"):
        Finetune(epochs=1).unlearn(model, forget, retain)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_non_finite_weights_raise_before_any_work(problem, name):
    """A NaN/Inf parameter or a NaN buffer is refused by name (else most methods return an all-NaN
    model); an Inf in a buffer that is not a normalisation statistic passes the check (see
    test_an_infinite_mask_buffer_is_accepted)."""
    model, forget, retain = problem
    for kind, key, value, what in (("parameter", "3.bias", math.nan, "NaN or Inf"),
                                   ("parameter", "1.weight", math.inf, "NaN or Inf"),
                                   ("buffer", "scale", math.nan, "NaN")):
        bad = copy.deepcopy(model)
        bad.register_buffer("scale", torch.ones(2))
        with torch.no_grad():
            dict([*bad.named_parameters(), *bad.named_buffers()])[key][1] = value
        state, modes = _snapshot(bad)
        with pytest.raises(ValueError,
                           match=rf"^{name}: the model's {kind} '{key}' has {what} values \(did an update diverge\?\)"):
            _make(name).unlearn(bad, forget, retain)
        after, modes_after = _snapshot(bad)
        assert modes_after == modes
        assert all(torch.equal(after[k].nan_to_num(), v.nan_to_num()) for k, v in state.items())
    masked = copy.deepcopy(model)
    masked.register_buffer("scale", torch.tensor([0.0, -math.inf]))
    _make(name).check_model(masked)


class _Masked(nn.Module):
    """Adds a mask buffer (-inf: a unit left out), then takes the softmax."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.zeros(width).index_fill_(0, torch.tensor([0]), -math.inf))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(h + self.mask, dim=1)


class _InfStatistic(Unlearner):
    """Returns its copy with an Inf BatchNorm running variance: a method that diverged."""

    name = "inf_statistic"

    def _unlearn(self, model, forget, retain, *, unseen, seed):
        with torch.no_grad():
            model[1].running_var[0] = math.inf
        return UnlearnResult(model=model, seconds=0.0)


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
def test_an_infinite_mask_buffer_is_accepted(problem, method):
    """The methods refused Inf in any buffer, where the curvature operators (which the Newton methods
    build on the same model) accept it outside a normalisation layer's running statistics: a model
    with an additive -inf mask was refused before any work. One rule now (checks.first_nonfinite_weight):
    the mask passes, before and after the work, and an Inf BatchNorm statistic is refused by both."""
    _, forget, retain = problem
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), _Masked(16), nn.Linear(16, 10)).eval()
    hessian_operator(model, F.cross_entropy, (retain.x, retain.y), path="generic")
    result = METHOD_FACTORIES[method]().unlearn(model, forget, retain)
    assert torch.equal(result.model[2].mask, model[2].mask) and all_finite(result.model[3].weight)
    with pytest.raises(ValueError, match=r"^inf_statistic: the unlearned model has NaN or Inf in its buffer "
                                         r"'1.running_var' \(the method diverged"):
        _InfStatistic().unlearn(model, forget, retain)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[1].running_var[3] = math.inf
    with pytest.raises(ValueError, match=rf"^{method}: the model's buffer '1.running_var' has NaN or Inf values"):
        METHOD_FACTORIES[method]().unlearn(bad, forget, retain)
    with pytest.raises(ValueError, match=r"^GenericHessian: buffer '1.running_var' has NaN or Inf values"):
        hessian_operator(bad, F.cross_entropy, (retain.x, retain.y), path="generic")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_model_without_trainable_parameters(problem, name):
    """Refused, with one message, by every method that trains the model's parameters; the others (the
    reference points, and the methods that train adapters they add) run on it."""
    model, forget, retain = problem
    frozen = copy.deepcopy(model).requires_grad_(False)
    method = _make(name)
    if method.trains_model_parameters:
        with pytest.raises(ValueError, match=f"^{name}: the model has no trainable parameters"):
            method.unlearn(frozen, forget, retain)
    else:
        assert name in ("original", "retrain", "retrain_reseeded", "rfa", "cure_newton_lora")
        method.unlearn(frozen, forget, retain)
    assert all(not p.requires_grad for p in frozen.parameters())


def test_newton_parameters_named_explicitly(problem):
    """A Newton method may update frozen parameters it names; an unknown name is refused before any
    work, with the method's name."""
    model, forget, retain = problem
    frozen = copy.deepcopy(model).requires_grad_(False)
    result = CureNewton(M=1.0, max_iterations=1, params="3.bias").unlearn(frozen, forget, retain)
    assert result.diagnostics["num_params"] == 10
    with pytest.raises(ValueError, match="^cure_newton: params: the model has no parameter named 'nope'"):
        CureNewton(params=["nope"]).unlearn(model, forget, retain)


def test_seed_range_and_numpy_integers(problem):
    model, forget, retain = problem
    one = Finetune(epochs=1).unlearn(model, forget, retain, seed=1).model
    numpy_one = Finetune(epochs=1).unlearn(model, forget, retain, seed=np.int64(1)).model
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), numpy_one.state_dict().values()))
    Finetune(epochs=1).unlearn(model, forget, retain, seed=2**63 - 1)
    # UNSIR's repair took seed + 1, refused by its TrainConfig after the noise and the impair epoch
    METHODS["unsir"](noise_steps=1).unlearn(model, forget, retain, seed=2**63 - 1)
    for seed in (-1, 2**63, 2**70):
        with pytest.raises(ValueError, match=r"^finetune: seed must be in \[0, 2\*\*63\)"):
            Finetune(epochs=1).unlearn(model, forget, retain, seed=seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        Finetune(epochs=1).unlearn(model, forget, retain, seed=True)


@pytest.mark.parametrize("method", sorted(METHOD_FACTORIES))
def test_unseen_data_that_the_model_was_trained_on(problem, method):
    model, forget, retain = problem
    unseen = LabeledData(retain.x[:20] * 0.5, retain.y[:20])
    for role, data, rows in (("forget", forget, [3, 4]), ("retain", retain, [0, 9])):
        mixed = LabeledData(torch.cat([unseen.x[:3], data.x[rows]]), torch.cat([unseen.y[:3], data.y[rows]]))
        with pytest.raises(ValueError, match=f"^{method}: 2 unseen samples are also in the {role} set "
                                             r"\(same input and label; first at unseen row 3\)"):
            METHOD_FACTORIES[method]().unlearn(model, forget, retain, unseen=mixed)
    METHOD_FACTORIES[method]().unlearn(model, forget, retain, unseen=unseen)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inputs_that_require_grad_and_the_callers_rng(problem, name):
    """Every method runs on inputs that require grad without writing their ``.grad`` (nor building a
    graph through them), gives the result it gives on plain inputs, and leaves the caller's global
    RNG state as it was."""
    model, forget, retain = problem
    unseen = LabeledData(retain.x[:20] * 0.5, retain.y[:20])
    plain = _make(name).unlearn(model, forget, retain, unseen=unseen, seed=3).model
    sets = [LabeledData(d.x.clone().requires_grad_(), d.y) for d in (forget, retain, unseen)]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    result = _make(name).unlearn(model, sets[0], sets[1], unseen=sets[2], seed=3).model
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG did not move
    assert all(d.x.grad is None for d in sets)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), result.state_dict().values()))
    # the first-order methods returned the last step's gradients, which a later optimizer.step() would apply
    assert all(p.grad is None for p in result.parameters())


def test_retrain_arguments():
    """The oracle needs a factory (a module instance is callable too, and failed deep inside
    training) and accepts a numpy integer seed offset."""
    with pytest.raises(TypeError, match="^Retrain: model_factory must be a callable that builds a fresh model"):
        METHODS["retrain"](_mlp(), TrainConfig(epochs=1))
    reseeded = METHODS["retrain_reseeded"](_mlp, TrainConfig(epochs=1, seed=5), seed_offset=np.int64(3))
    assert reseeded.config.seed == 8
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="seed_offset must be a non-zero int"):
            METHODS["retrain_reseeded"](_mlp, TrainConfig(epochs=1), seed_offset=bad)
    # the recipe is checked before it is read; an offset is named, not reported as the recipe's own seed
    with pytest.raises(TypeError, match="^RetrainReseeded: config must be a TrainConfig, got NoneType$"):
        METHODS["retrain_reseeded"](_mlp, None)
    assert METHODS["retrain_reseeded"](_mlp, TrainConfig(epochs=1, seed=5), seed_offset=-3).config.seed == 2
    for seed, offset, total in ((0, -5, -5), (2**63 - 1, 1000, 2**63 + 999)):
        with pytest.raises(ValueError, match=rf"^RetrainReseeded: config.seed \+ seed_offset \({seed} \+ {offset}\) "
                                             rf"must be in \[0, 2\*\*63\), got {total}$"):
            METHODS["retrain_reseeded"](_mlp, TrainConfig(epochs=1, seed=seed), seed_offset=offset)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_torchscript_model_is_refused_by_name(problem, name):
    """A scripted model's copies share its autograd graph: SSD returned it unchanged (every importance
    zero), SalUn and SSD wrote the caller's .grad, the others failed with torch's own errors."""
    model, forget, retain = problem
    scripted = torch.jit.script(copy.deepcopy(model).eval())
    with pytest.raises(TypeError, match=f"^{name}: the model is a TorchScript module.*pass the eager nn.Module"):
        _make(name).unlearn(scripted, forget, retain)
    assert all(p.grad is None for p in scripted.parameters())
    inner = copy.deepcopy(model).eval()
    inner[0] = torch.jit.script(inner[0])  # a scripted layer: SSD wrote its .grad
    with pytest.raises(TypeError, match=f"^{name}: the model's submodule '0' is a TorchScript module"):
        _make(name).unlearn(inner, forget, retain)
    assert all(p.grad is None for p in inner.parameters())


@pytest.mark.parametrize("name", ["cure_newton", "stochastic_cure_newton", "newton_pinv", "damped_newton",
                                  "damped_newton_cg", "influence", "lissa", "cure_newton_lora"])
def test_a_data_parallel_wrapper_is_refused_by_the_curvature_methods_up_front(problem, name):
    """torch.func's stateless calls refuse nn.DataParallel: the error came when the operator was built,
    without the method's name and saying the model "cannot run on the data" (StoCuReNU: a bare
    RuntimeError)."""
    model, forget, retain = problem
    wrapped = nn.DataParallel(model)
    state, modes = _snapshot(model)
    with pytest.raises(TypeError, match=f"^{name}: the model is wrapped in DataParallel.*pass the wrapped model"):
        _make(name).unlearn(wrapped, forget, retain)
    assert _snapshot(model)[1] == modes and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["cure_newton", "stochastic_cure_newton", "newton_pinv", "lissa"])
def test_an_embedding_with_a_padding_row_is_refused_by_the_newton_family_up_front(name):
    """The dense solvers refused it deep inside ("the operator's products must be symmetric"), without
    the method's name or the cause; CureNewton, StoCuReNU, LiSSA and CG ran on the non-symmetric operator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 6, padding_idx=0), nn.Flatten(), nn.Linear(30, 3))
    x, y = torch.randint(0, 12, (60, 5)), torch.randint(0, 3, (60,))
    with pytest.raises(ValueError, match=f"^{name}: params: '0.weight' is the weight of Embedding '0' with padding"):
        _make(name).unlearn(model, LabeledData(x[:10], y[:10]), LabeledData(x[10:], y[10:]))
    result = METHODS[name](params=["2.weight", "2.bias"]).unlearn(model, LabeledData(x[:10], y[:10]),
                                                                  LabeledData(x[10:], y[10:]))
    assert torch.equal(result.model[0].weight, model[0].weight)


def test_gradient_hooks_on_the_parameters_stay_with_the_copy(problem):
    """A hook that masks rows of a weight (Tensor.register_hook) was dropped by the private copy (deepcopy leaves
    a parameter's hooks out): fine-tune moved the masked rows by 3.3e-3 and returned a model without hooks."""
    model = copy.deepcopy(problem[0])
    mask = torch.zeros_like(model[1].weight)
    mask[:8] = 1
    model[1].weight.register_hook(lambda grad: grad * mask)
    seen = []
    model[3].weight.register_post_accumulate_grad_hook(lambda p: seen.append(1))
    out = Finetune(epochs=1, weight_decay=0.0).unlearn(model, problem[1], problem[2], seed=0).model
    assert torch.equal(out[1].weight[8:], model[1].weight[8:])
    assert not torch.equal(out[1].weight[:8], model[1].weight[:8])
    assert seen and len(out[1].weight._backward_hooks) == 1


def test_a_hooked_weight_that_was_then_frozen_keeps_its_hook_on_the_copy(problem):
    """torch registers no hook on a frozen tensor, and the copy re-registered the caller's hooks: a weight hooked
    and then frozen (as RFA(merge=False) returns a model whose base weights are) made every method fail with
    torch's bare "cannot register a hook on a tensor that doesn't require gradient"."""
    model = copy.deepcopy(problem[0])
    model[1].weight.register_hook(lambda grad: grad)
    model[1].weight.register_post_accumulate_grad_hook(lambda p: None)
    model[1].weight.requires_grad_(False)
    out = Finetune(epochs=1, weight_decay=0.0).unlearn(model, problem[1], problem[2], seed=0).model
    assert not out[1].weight.requires_grad and torch.equal(out[1].weight, model[1].weight)
    assert len(out[1].weight._backward_hooks) == 1 and len(out[1].weight._post_accumulate_grad_hooks) == 1
    assert not torch.equal(out[3].weight, model[3].weight)


def test_the_dense_newton_baselines_take_a_confident_models_float32_hessian():
    """A well-fitted model's Hessian is a small difference of far larger terms, so its float32 products are
    asymmetric well above sqrt(eps) of max |H| (1.7e-3 here): damped_newton, newton_pinv and influence refused it
    as "not symmetric", and float64 on 10 retain rows too (5e-8). Taken now. On 10 rows torch's float32 double
    backward (the generic path) is all rounding (its error 1.0 of max |H|, asymmetry 0.22): the refusal says so and
    points at float64, which runs. The fused path's float32 Hessian there was 0.6 of max |H| off too, until its loss
    R-rows were taken relative to each row's top class: now within 1e-5 of float64, and taken; the GGN's through
    ops.softmax_ce_hvp too."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=gen)
    x = 3 * (3 * torch.randn(3, 8, generator=gen)[y] + torch.randn(300, 8, generator=gen))  # separated blobs
    model = init_model(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), 0)
    train(model, LabeledData(x, y), TrainConfig(epochs=50, lr=0.05, batch_size=32, seed=0))
    forget = LabeledData(x[:20], y[:20])
    for name in ("damped_newton", "newton_pinv", "influence"):
        step = METHODS[name]().unlearn(model, forget, LabeledData(x[20:70], y[20:70]), seed=0)
        assert all_finite(step.model[2].weight) and step.diagnostics["solver"].endswith("-eigh")
    few = LabeledData(x[20:30], y[20:30])
    with pytest.raises(ValueError, match=r"products must be symmetric: .* \(more than 0.01 of it\): the matrix is "
                                         r"not symmetric, or its entries are mostly rounding .* compute it in float64"):
        METHODS["damped_newton"](path="generic").unlearn(model, forget, few, seed=0)
    METHODS["damped_newton"](path="generic", dtype=torch.float64).unlearn(model, forget, few, seed=0)
    fused = hessian_operator(model, nn.CrossEntropyLoss(), (few.x, few.y))
    exact = hessian_operator(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), (few.x.double(), few.y)).to_dense()
    assert fused.path == "fused"
    assert float((fused.to_dense().double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    METHODS["damped_newton"]().unlearn(model, forget, few, seed=0)
    # the GGN's loss Hessian (ops.softmax_ce_hvp) likewise: 0.36 of max |G| off before, 4.6e-7 since
    ggn = ggn_operator(model, nn.CrossEntropyLoss(), (few.x, few.y)).to_dense().double()
    exact = ggn_operator(copy.deepcopy(model).double(), nn.CrossEntropyLoss(), (few.x.double(), few.y)).to_dense()
    assert float((ggn - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("name", ["cure_newton", "stochastic_cure_newton", "damped_newton", "lissa"])
def test_the_newton_family_refuses_a_gradient_hook_it_cannot_run(problem, name):
    """The curvature operators never run a parameter's gradient hook, so a hook that masks rows of a weight left
    the Newton methods moving those rows (CureNewton 0.48, as much as the free rows). Refused by name before any
    work, the caller's model as it was; with the hooked weight left out of ``params`` the method runs."""
    model = copy.deepcopy(problem[0])
    mask = torch.zeros_like(model[1].weight)
    mask[:8] = 1
    model[1].weight.register_hook(lambda grad: grad * mask)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"^{name}: .*parameter '1.weight' has a gradient hook"):
        METHODS[name]().unlearn(model, problem[1], problem[2], seed=0)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    out = METHODS[name](params=["3.weight", "3.bias"]).unlearn(model, problem[1], problem[2], seed=0).model
    assert torch.equal(out[1].weight, model[1].weight) and not torch.equal(out[3].weight, model[3].weight)


@pytest.mark.parametrize("name", ["finetune", "damped_newton", "cure_newton", "rfa", "unsir"])
def test_a_model_that_writes_its_input_in_place_leaves_the_callers_data_alone(problem, name):
    """The methods' probes ran the model on views of the caller's rows: with ReLU(inplace=True) first every method
    wrote row 0 of each set, and the Newton methods' parameter probe 256 retain rows, on which they then built their
    objective (damped_newton's step 0.83 off the step on the given data); the metrics wrote every row. UNSIR gave
    the model its noise leaf itself: torch's "a leaf Variable that requires grad is being used in an in-place
    operation"."""
    from unlearn_kernels.eval.metrics import gradient_norm, predict_logits

    torch.manual_seed(0)
    model = nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    _, forget, retain = problem
    sets = [LabeledData(d.x * 2 - 1, d.y) for d in (forget, retain)]  # negative entries to write
    sets.append(LabeledData(-sets[0].x, sets[0].y))  # unseen
    before = [d.x.clone() for d in sets]
    _make(name).unlearn(model, *sets[:2], unseen=sets[2], seed=0)
    predict_logits(model, sets[1])
    gradient_norm(model, F.cross_entropy, sets[1])
    assert all(torch.equal(d.x, x) for d, x in zip(sets, before))


class _Centred(nn.Module):
    """x - 0.25, then an MLP: in place (``x.sub_``) or not, the same function."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.sub_(0.25) if self.in_place else x - 0.25)


@pytest.mark.parametrize("name", ["scrub", "bad_teacher", "lotus", "rfa"])
def test_a_teacher_that_writes_its_input_in_place_leaves_the_students_batch_alone(problem, name):
    """The distillation methods run their teacher, then the student, on one batch: with a model that centres its
    input in place the student saw the batch centred twice (weights 0.01-0.13 off the same model written out of
    place). The teacher now runs on a copy, and the two models give the same weights."""
    _, forget, retain = problem
    plain = init_model(lambda: _Centred(in_place=False), 0)
    train(plain, LabeledData(torch.cat([forget.x, retain.x]), torch.cat([forget.y, retain.y])),
          TrainConfig(epochs=2, batch_size=64, seed=0))
    in_place = _Centred(in_place=True)
    in_place.load_state_dict(plain.state_dict())
    results = [_make(name).unlearn(m, LabeledData(forget.x.clone(), forget.y), LabeledData(retain.x.clone(), retain.y),
                                   unseen=LabeledData(retain.x[:30] + 0.1, retain.y[:30]), seed=0).model
               for m in (plain, in_place)]
    for (key, a), b in zip(results[0].state_dict().items(), results[1].state_dict().values()):
        assert torch.equal(a, b), key


class _RenormalisedTokens(nn.Module):
    """Digits' pixel values (0-16) as tokens through an embedding with ``max_norm``, whose forward renormalises the
    rows it looks up in place (in eval mode too)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(17, 4, max_norm=1.0), nn.Linear(4 * 64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(tokens).flatten(1))


def test_the_input_probe_does_not_change_the_weights_a_method_starts_from():
    """The check that one sample of each set fits the model runs it on the private copy: an embedding with max_norm
    renormalised the probed rows there, and ``original`` returned them changed (up to 9.5 off the caller's)."""
    digits = load_digits()
    tokens, y = torch.tensor(digits.data[:120], dtype=torch.long), torch.tensor(digits.target[:120])
    torch.manual_seed(0)
    model = _RenormalisedTokens().eval()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)  # rows of norm above max_norm, as after an optimizer step
    given = copy.deepcopy(model.state_dict())
    result = METHODS["original"]().unlearn(model, LabeledData(tokens[:20], y[:20]), LabeledData(tokens[20:], y[20:]),
                                           seed=0)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, given[key]), key
        assert torch.equal(model.state_dict()[key], given[key]), key


class _SparseTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 4, sparse=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize("name", ["finetune", "bad_teacher", "stochastic_cure_newton"])
def test_a_sparse_embedding_is_refused_up_front(name):
    """nn.Embedding(sparse=True) failed mid-method with torch's bare errors ("add(sparse, dense) is not
    supported", "Adam does not support sparse gradients", "reshape is not implemented for sparse tensors");
    frozen, it gives no gradient and is accepted."""
    torch.manual_seed(0)
    model = _SparseTokens()
    x, y = torch.randint(0, 20, (40, 5)), torch.arange(40) % 3
    sets = LabeledData(x[:8], y[:8]), LabeledData(x[8:], y[8:])
    with pytest.raises(ValueError, match=rf"^{name}: the model's embedding 'emb' has sparse=True, .* set its "
                                         r"\.sparse = False"):
        _make(name).unlearn(model, *sets, seed=0)
    model.emb.requires_grad_(False)
    _make("finetune").unlearn(model, *sets, seed=0)


def test_a_sparse_embedding_the_method_does_not_train_is_accepted():
    """The refusal of a trainable sparse embedding covered every method: the Newton methods on other
    parameters (params=), the adapter methods and the original, which train none of it, refused a model they
    ran on before. Now each runs, and the Newton step over the head equals the step on the same model with a
    dense embedding; naming the embedding in params is refused, as training it is (also by train())."""
    torch.manual_seed(0)
    model = _SparseTokens().double()
    x, y = torch.randint(0, 20, (40, 5)), torch.arange(40) % 3
    sets = LabeledData(x[:8], y[:8]), LabeledData(x[8:], y[8:])
    dense = copy.deepcopy(model)
    dense.emb.sparse = False
    head = ["fc.weight", "fc.bias"]
    for name in ("damped_newton", "cure_newton"):
        got = METHODS[name](params=head).unlearn(model, *sets, seed=0).model
        expected = METHODS[name](params=head).unlearn(dense, *sets, seed=0).model
        assert torch.allclose(got.fc.weight, expected.fc.weight, rtol=1e-10, atol=1e-12), name
        assert torch.equal(got.emb.weight, model.emb.weight), name
    for name in ("original", "cure_newton_lora"):
        _make(name).unlearn(model, *sets, seed=0)
    with pytest.raises(ValueError, match=r"^damped_newton: params: 'emb.weight' is the weight of Embedding 'emb' "
                                         r"with sparse=True"):
        METHODS["damped_newton"](params=["emb.weight"]).unlearn(model, *sets, seed=0)
    with pytest.raises(ValueError, match=r"^train: the model's embedding 'emb' has sparse=True"):
        train(model, sets[1], TrainConfig(epochs=1))


def test_a_data_parallel_model_trains_as_its_module(problem):
    """The training-mode probe ran torch.func on the nn.DataParallel wrapper, which torch.func refuses: every method
    that trains in training mode refused a model that runs ("the model fails in training mode ... The stateless API
    can't be used with nn.DataParallel module"). On the CPU the wrapper calls its module: the same result."""
    model, forget, retain = problem
    wrapped = Finetune(epochs=1).unlearn(nn.DataParallel(copy.deepcopy(model)), forget, retain, seed=0).model
    bare = Finetune(epochs=1).unlearn(model, forget, retain, seed=0).model
    assert all(torch.equal(a, b) for a, b in zip(wrapped.module.parameters(), bare.parameters()))


def test_a_model_that_cannot_be_copied_is_refused_by_name(problem):
    import threading

    model = copy.deepcopy(problem[0])
    model.lock = threading.Lock()
    with pytest.raises(TypeError, match=r"^finetune: the model cannot be copied, and every method works on a copy "
                                        r"\(the given model stays as it is\): cannot pickle"):
        Finetune(epochs=1).unlearn(model, problem[1], problem[2])


class _AuxInTraining(nn.Module):
    """(logits, aux) in training mode, logits in eval mode, as torchvision's Inception3 and GoogLeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.norm, self.aux = nn.Linear(64, 10), nn.BatchNorm1d(10), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor):
        out = self.norm(self.body(x))
        return (out, self.aux(x)) if self.training else out


def test_a_model_whose_training_mode_output_is_no_logits_is_refused_by_the_methods_that_train_in_it(problem):
    """The fit check ran in eval mode only: fine-tune and the others failed mid-work in torch's cross entropy
    ("argument 'input' must be Tensor, not tuple"), SCRUB and Bad Teacher in a division, naming no method."""
    from unlearn_kernels.training import check_fits

    _, forget, retain = problem
    torch.manual_seed(0)
    model = _AuxInTraining().eval()
    with pytest.raises(ValueError, match=r"^finetune: in training mode, which finetune trains it in, the model must "
                                         r"map a batch of forget samples to \(batch, classes\) logits as in eval mode "
                                         r"\(10 classes\); two samples gave tuple"):
        Finetune(epochs=1).unlearn(model, forget, retain)
    assert CureNewton(M=1.0).unlearn(model, forget, retain).model is not None  # works in eval mode: accepted
    plain = nn.Sequential(nn.Linear(64, 10), nn.BatchNorm1d(10)).train()
    before = {name: b.clone() for name, b in plain.named_buffers()}
    check_fits("probe", plain, forget, in_training_mode=True)  # on copies of the buffers: statistics untouched
    assert all(torch.equal(before[name], b) for name, b in plain.named_buffers()) and plain.training


class _CountsGradients(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 10)
        self.register_buffer("squares", torch.zeros(8, 64))

    def accumulate(self, grad: torch.Tensor) -> torch.Tensor:  # a bound method: acts on its model's buffer
        self.squares.add_(grad.detach() ** 2)
        return grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_hook_bound_to_the_model_acts_on_the_copy_and_copying_out_of_memory_is_no_copy_error(problem,
                                                                                                monkeypatch):
    """The copied hooks were the given model's own objects: a bound method hook wrote the given model's buffer
    (0.0295) during fine-tune. Out of memory while copying read as "the model cannot be copied"."""
    torch.manual_seed(0)
    model = _CountsGradients()
    model.fc1.weight.register_hook(model.accumulate)
    out = Finetune(epochs=1).unlearn(model, problem[1], problem[2], seed=0).model
    assert float(model.squares.abs().max()) == 0 and float(out.squares.abs().max()) > 0

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 40000000000 bytes.")

    monkeypatch.setattr(copy, "deepcopy", no_memory)
    with pytest.raises(RuntimeError, match="^DefaultCPUAllocator: not enough memory"):
        Finetune(epochs=1).unlearn(model, problem[1], problem[2])


def test_a_fused_path_no_fused_kernel_takes_is_refused_before_any_work():
    """path='fused' on a model neither fused path takes was accepted up front and refused at the first product:
    in a study, after the original and the oracle had trained (hours on ResNet-18). Refused by check_model now,
    so also by a study's checks before any training; LoRA adapters are never fused: refused at construction."""
    from unlearn_kernels.methods import CureNewtonLoRA
    from unlearn_kernels.models import build_model
    from unlearn_kernels.study import StudyConfig, check_scenario

    for name in ("cure_newton", "newton_pinv", "damped_newton"):
        method = METHODS[name](path="fused")
        with pytest.raises(ValueError, match=rf"^{name}: path='fused' cannot be used: not a fused MLP \(the model is "
                                             r"SmallViT"):
            method.check_model(build_model("vit", (1, 8, 8), 10))
        for ok in ("mlp", "cnn"):
            method.check_model(build_model(ok, (1, 8, 8), 10))
    # the parameters the loss uses are chosen from the data: one registered beside the layers is not refused here
    extra = build_model("mlp", (1, 8, 8), 10)
    extra.register_parameter("unused", nn.Parameter(torch.zeros(3)))
    CureNewton(path="fused").check_model(extra)
    with pytest.raises(ValueError, match=r"parameter 'unused' is in none of the Linear layers"):
        CureNewton(path="fused", params=["1.weight", "unused"]).check_model(extra)
    CureNewton(path="fused").check_model(build_model("vit", (1, 8, 8), 10).half())  # converted to float32 first
    with pytest.raises(ValueError, match=r"^cure_newton_lora: path='fused' cannot be used: the fused paths take"):
        CureNewtonLoRA(path="fused")
    config = StudyConfig(model="vit", methods=("cure_newton",), method_options={"cure_newton": {"path": "fused"}},
                         seeds=(0,), cache_dir=None)
    with pytest.raises(ValueError, match=r"cure_newton: path='fused' cannot be used"):
        check_scenario(config)
