"""RFA on a tiny mislabeled digits problem: it moves the forget predictions away from the wrong labels
while the retain set keeps its accuracy, only the adapters change (the frozen weights stay
bit-identical without merging), every shift target runs, and bad input raises before any work.
Its parts (the scales, the distance, the shift targets, the margin loss) match the documented definitions.
CureNewton on adapter parameters only (directly and as cure_newton_lora) changes only the adapters."""
import copy

import pytest
import torch
from torch import nn
from sklearn.datasets import load_digits

from unlearn_kernels import lora
from unlearn_kernels.data import LabeledData
from unlearn_kernels.methods import METHODS, RFA, CureNewton, CureNewtonLoRA
from unlearn_kernels.methods.rfa import SHIFTS, _Features, hidden_layers
from unlearn_kernels.models import MLP, SmallCNN
from unlearn_kernels.training import TrainConfig, init_model, seeded_rng, train


@pytest.fixture(scope="module")
def problem():
    """An MLP fitted to 300 digits, 30 of them with a wrong label (D_f carries the wrong labels)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(data.target, dtype=torch.long)
    train_y = y[:300].clone()
    train_y[:30] = (train_y[:30] + 1 + torch.arange(30) % 9) % 10  # a different label, never the true one
    model = init_model(lambda: MLP(64, hidden=(32,), num_classes=10), 0)
    train(model, LabeledData(x[:300], train_y), TrainConfig(epochs=60, batch_size=32, lr=0.05, seed=0))
    forget, retain = LabeledData(x[:30], train_y[:30]), LabeledData(x[30:300], train_y[30:])
    return model, forget, retain, LabeledData(x[1000:1300], y[1000:1300])


def accuracy(model, data):
    with torch.no_grad():
        return int((model.eval()(data.x).argmax(1) == data.y).sum()) / len(data)


def test_registered_under_its_name():
    assert METHODS["rfa"] is RFA and RFA.name == "rfa"


def test_default_layers_are_the_hidden_ones():
    row, image = torch.zeros(1, 64), torch.zeros(1, 1, 8, 8)
    assert hidden_layers(MLP(64, hidden=(32, 16), num_classes=10), row) == ("1", "3")
    assert hidden_layers(SmallCNN(1, 10, channels=(4, 8)), image) == ("features.0", "features.3")
    assert hidden_layers(MLP(64, hidden=(), num_classes=10), row) == ()


class _HeadRegisteredFirst(torch.nn.Module):
    """A two-layer network whose output layer is registered before the hidden layer it runs after."""

    def __init__(self):
        super().__init__()
        self.head, self.body = torch.nn.Linear(16, 10), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))


class _CalledTwice(torch.nn.Module):
    """A hidden layer applied twice (a weight-shared block) before the output layer."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.head = torch.nn.Linear(64, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))


def test_a_layer_the_forward_calls_twice_is_not_aligned(problem):
    """A layer called twice in one forward was adapted by default, and its feature hook kept the last call's
    output: the first call's features were neither aligned nor shifted. By default it is left out; named in
    targets it is refused before training."""
    _, forget, retain, unseen = problem
    torch.manual_seed(0)
    model = _CalledTwice().eval()
    assert hidden_layers(model, forget.x[:1]) == ("inp",)
    result = RFA(epochs=1).unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert result.diagnostics["layers"] == ["inp"]
    with pytest.raises(ValueError, match=r"^rfa: layer 'shared' is called 2 times in one forward: RFA aligns the "
                                         r"features of one call per layer"):
        RFA(epochs=1, targets=["inp", "shared"]).unlearn(model, forget, retain, unseen=unseen, seed=0)


def test_the_output_layer_is_the_last_linear_the_forward_calls(problem):
    """A model that registers its head first had the head adapted by default (the last Linear registered
    was taken for the output layer) and its hidden layer left alone; the forward's order decides now."""
    _, forget, retain, unseen = problem
    torch.manual_seed(0)
    model = _HeadRegisteredFirst().eval()
    model.body.train()
    assert hidden_layers(model, forget.x[:1]) == ("body",)
    assert [m.training for m in model.modules()] == [False, False, True]
    result = RFA(epochs=1, merge=False).unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert result.diagnostics["layers"] == ["body"]
    assert type(result.model.head) is torch.nn.Linear


class _TwoTasks(torch.nn.Module):
    """A trunk and a head per task, of which the forward runs the first only; a cosine-style head (a Linear
    subclass with a forward of its own: no adapter can stand in for it) registered before the trunk."""

    def __init__(self):
        super().__init__()
        self.head = _ScaledLinear(16, 10)
        self.trunk = torch.nn.Linear(64, 16)
        self.other_heads = torch.nn.ModuleList([torch.nn.Linear(16, 10), torch.nn.Linear(16, 3)])

    def forward(self, x):
        return self.head(torch.relu(self.trunk(x.flatten(1))))


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_default_targets_are_the_hidden_layers_the_forward_calls(problem):
    """Review r15 of the first forward-order version: a Linear the forward never calls (another task's head)
    became a default target and RFA failed on its hooks ("the model ran without calling the forward hooks"),
    and the check before the copy took the output layer by registration, refusing a model whose only
    adaptable layer is hidden behind a head no adapter can stand in for."""
    _, forget, retain, unseen = problem
    torch.manual_seed(0)
    model = _TwoTasks().eval()
    assert lora.adaptable_layers(model) == ["trunk", "other_heads.0", "other_heads.1"]
    assert hidden_layers(model, forget.x[:1]) == ("trunk",)
    RFA().check_model(model)
    result = RFA(epochs=1, merge=False).unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert result.diagnostics["layers"] == ["trunk"]


def test_a_model_without_hidden_layers_needs_targets(problem):
    _, forget, retain, unseen = problem
    linear = MLP(64, hidden=(), num_classes=10)
    with pytest.raises(ValueError, match="no hidden Linear or Conv2d layer"):
        RFA().unlearn(linear, forget, retain, unseen=unseen, seed=0)
    result = RFA(epochs=1, targets="1").unlearn(linear, forget, retain, unseen=unseen, seed=0)
    assert result.diagnostics["layers"] == ["1"]


def test_moves_the_forget_predictions_and_keeps_retain(problem):
    model, forget, retain, unseen = problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc_f, acc_r = accuracy(model, forget), accuracy(model, retain)
    assert acc_f >= 0.7  # the wrong labels are fitted: something to unlearn
    result = RFA().unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # caller's model untouched
    assert accuracy(result.model, forget) <= acc_f - 0.3
    assert accuracy(result.model, retain) >= acc_r - 0.02
    # merged (the default): the original architecture back, with new weights in the adapted layer only
    assert not lora.adapter_modules(result.model)
    after = result.model.state_dict()
    assert after.keys() == before.keys()
    assert not torch.equal(after["1.weight"], before["1.weight"])
    assert torch.equal(after["3.weight"], before["3.weight"]) and torch.equal(after["3.bias"], before["3.bias"])
    d = result.diagnostics
    assert d["layers"] == ["1"] and d["merged"]
    # one D_r and one D_f batch per step, as NegGrad+ counts them
    assert result.gradients == 2 * RFA().epochs * -(-len(retain) // RFA().batch_size)


def test_frozen_weights_bit_identical_without_merging(problem):
    model, forget, retain, unseen = problem
    result = RFA(epochs=3, merge=False).unlearn(model, forget, retain, unseen=unseen, seed=0)
    adapters = lora.adapter_modules(result.model)
    assert list(adapters) == ["1"]
    assert torch.count_nonzero(adapters["1"].lora_b) > 0  # the adapter trained
    frozen = {k.replace("1.base.", "1."): v for k, v in result.model.state_dict().items() if "lora_" not in k}
    original = model.state_dict()
    assert frozen.keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in frozen.items())
    # a further request trains the same adapters; the frozen weights still do not move
    again = RFA(epochs=1, merge=False).unlearn(result.model, forget, retain, unseen=unseen, seed=1)
    assert list(lora.adapter_modules(again.model)) == ["1"]
    assert torch.equal(again.model.get_submodule("1.base").weight, original["1.weight"])


def test_merged_adapters_are_trained(problem):
    """Merged adapters took no gradient: RFA failed mid-run with torch's "element 0 of tensors does not
    require grad"; now it unmerges them in its copy and trains them, and the caller's model stays merged."""
    model, forget, retain, unseen = problem
    adapted = RFA(epochs=1, merge=False).unlearn(model, forget, retain, unseen=unseen, seed=0).model
    lora.merge(adapted)
    before = copy.deepcopy(adapted.state_dict())
    result = RFA(epochs=1, merge=False).unlearn(adapted, forget, retain, unseen=unseen, seed=1)
    trained = lora.adapter_modules(result.model)["1"]
    assert not trained.merged and not torch.equal(trained.lora_b, before["1.lora_b"])  # it trained
    assert lora.adapter_modules(adapted)["1"].merged
    assert all(torch.equal(v, before[k]) for k, v in adapted.state_dict().items())


@pytest.mark.parametrize("shift", SHIFTS)
def test_every_shift_moves_forget_features(problem, shift):
    model, forget, retain, unseen = problem
    result = RFA(epochs=3, shift=shift, task_weight=0.0, merge=False).unlearn(model, forget, retain,
                                                                                unseen=unseen, seed=0)
    with torch.no_grad():
        moved = (result.model(forget.x) - model(forget.x)).norm(dim=1).mean()
        kept = (result.model(retain.x) - model(retain.x)).norm(dim=1).mean()
    assert moved > kept > 0  # the forget outputs move more than the retain outputs


def test_class_forgetting_with_the_default_target(problem):
    model, _, retain, unseen = problem  # the clean part of the training set: forget its class 3
    forget = retain.subset(retain.y == 3)
    rest = retain.subset(retain.y != 3)
    assert accuracy(model, forget) >= 0.9
    result = RFA().unlearn(model, forget, rest, unseen=unseen, seed=0)
    assert accuracy(result.model, forget) <= 0.2 and accuracy(result.model, rest) >= accuracy(model, rest) - 0.02


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rank": 0}, ValueError, "rank must be an int >= 1"),
    ({"shift": "toward"}, ValueError, r"^rfa: shift must be one of \["),
    ({"lam": 0.0}, ValueError, "lam must be"),
    ({"neighbors": 0}, ValueError, "neighbors must be"),
    ({"neighbors": 2.0}, ValueError, "^rfa: neighbors must be an int >= 1"),
    ({"weight_decay": float("nan")}, ValueError, "^rfa: weight_decay must be a finite number"),
    ({"margin": float("inf")}, ValueError, "^rfa: margin must be a finite number > 0"),
    ({"epochs": 1.5}, ValueError, "^rfa: epochs must be an int"),
    ({"targets": []}, TypeError, "targets must be"),
])
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        RFA(**kwargs)


@pytest.mark.parametrize("kwargs, unseen, error, match", [
    ({"targets": "nothing"}, True, ValueError, "names no module"),
    ({"targets": "2"}, True, TypeError, "is a ReLU"),
    ({"shift": "unseen_class"}, False, ValueError, "needs unseen data"),
])
def test_bad_input_raises_and_changes_nothing(problem, kwargs, unseen, error, match):
    model, forget, retain, unseen_data = problem
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        RFA(**kwargs).unlearn(model, forget, retain, unseen=unseen_data if unseen else None, seed=0)
    assert not lora.adapter_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cure_newton_on_adapters_changes_only_adapter_parameters(problem):
    model, forget, retain, _ = problem
    adapted = copy.deepcopy(model)
    lora.add_adapters(adapted, "*", rank=4)
    names = lora.adapter_parameter_names(adapted)
    result = CureNewton(params=names).unlearn(adapted, forget, retain, seed=0)
    before, after = dict(adapted.named_parameters()), dict(result.model.named_parameters())
    assert before.keys() == after.keys() and result.hvps > 0
    for name, value in after.items():
        if name in names:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    # B was 0: the step moved B (where the gradient is) and A (through the A-B coupling of the Hessian)
    assert all(torch.count_nonzero(a.lora_b) > 0 for a in lora.adapter_modules(result.model).values())


def test_cure_newton_lora_returns_the_plain_architecture(problem):
    model, forget, retain, _ = problem
    assert METHODS["cure_newton_lora"] is CureNewtonLoRA
    result = CureNewtonLoRA(rank=4).unlearn(model, forget, retain, seed=0)
    assert not lora.adapter_modules(result.model)
    assert result.model.state_dict().keys() == model.state_dict().keys()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in result.model.state_dict().items())
    assert result.diagnostics["layers"] == ["1", "3"] and result.hvps > 0
    with pytest.raises(TypeError, match="params is set"):
        CureNewtonLoRA(params=["1.weight"])


def test_cure_newton_lora_names_itself_and_the_options_it_takes():
    """A misspelt or bad CureNewton option is refused at construction under this method's name, with
    what it accepts (not Python's "CureNewton.__init__() got an unexpected keyword argument")."""
    with pytest.raises(TypeError, match=r"^cure_newton_lora: unknown option\(s\) \['N'\]; accepted: \['M', 'M_min', "):
        CureNewtonLoRA(N=1)
    with pytest.raises(TypeError, match=r"^cure_newton_lora: solver_options: unknown option\(s\) \['bogus'\]; "
                                         r"accepted: \['guard', 'k_max', "):
        CureNewtonLoRA(solver_options={"bogus": 1})
    with pytest.raises(ValueError, match=r"^cure_newton_lora: M must be a finite number > 0"):
        CureNewtonLoRA(M=-1)


def test_cure_newton_lora_refuses_a_narrower_dtype_under_its_name_before_any_adapter(problem):
    """dtype=float32 on a float64 model was refused under CureNewton's name, after the adapters were added to
    the private copy; refused under this method's name, before any work now."""
    model, forget, retain, _ = problem
    wide = copy.deepcopy(model).double()
    sets = [LabeledData(d.x.double(), d.y) for d in (forget, retain)]
    state = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"^cure_newton_lora: dtype=torch.float32 is narrower than the torch.float64 "
                                         r"of layer '1'"):
        CureNewtonLoRA(dtype=torch.float32).unlearn(wide, *sets, seed=0)
    assert not lora.adapter_modules(wide) and all(torch.equal(v, state[k]) for k, v in wide.state_dict().items())


def test_cure_newton_lora_trains_the_adapters_a_model_has(problem):
    model, forget, retain, unseen = problem
    adapted = RFA(epochs=1, merge=False).unlearn(model, forget, retain, unseen=unseen, seed=0).model  # RFA's adapters
    assert list(lora.adapter_modules(adapted)) == ["1"]
    result = CureNewtonLoRA(rank=4, max_iterations=1).unlearn(adapted, forget, retain, seed=0)
    assert result.diagnostics["layers"] == ["1"] and not lora.adapter_modules(result.model)
    assert result.model.state_dict().keys() == model.state_dict().keys()


def test_cure_newton_lora_is_cure_newton_on_fresh_adapters_merged_by_hand(problem):
    """The values, not only that something moved: CureNewton on the parameters of adapters drawn from
    the seed (as unlearn seeds the method), then W + scale B A written out here."""
    model, forget, retain, _ = problem
    options = {"M": 1.0, "max_iterations": 2}
    got = CureNewtonLoRA(rank=4, **options).unlearn(model, forget, retain, seed=0)
    adapted = copy.deepcopy(model)
    with seeded_rng(0):
        lora.add_adapters(adapted, ["1", "3"], rank=4)
    step = CureNewton(params=lora.adapter_parameter_names(adapted), **options).unlearn(adapted, forget, retain, seed=0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name, adapter in lora.adapter_modules(step.model).items():
            expected[f"{name}.weight"] = adapter.base.weight + adapter.scale * adapter.lora_b @ adapter.lora_a
            expected[f"{name}.bias"] = adapter.base.bias.clone()
    after = got.model.state_dict()
    assert after.keys() == expected.keys() and got.hvps == step.hvps > 0
    for key, value in expected.items():
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # the merged model computes what the adapted one does
        torch.testing.assert_close(got.model(forget.x), step.model.eval()(forget.x), rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_of_the_frozen_model_do_not_move(problem):
    _, forget, retain, unseen = problem
    model = init_model(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32),
                                                   torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                                   torch.nn.Linear(32, 10)), 0)
    train(model, LabeledData(torch.cat([forget.x, retain.x]), torch.cat([forget.y, retain.y])),
          TrainConfig(epochs=5, batch_size=32, lr=0.05, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    result = RFA(epochs=2, merge=False).unlearn(model, forget, retain, unseen=unseen, seed=0)
    after = {k.replace(".base.", "."): v for k, v in result.model.state_dict().items() if "running" in k}
    assert before.keys() == after.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_batch_norm_layer_without_running_statistics_is_refused_up_front(problem):
    """Such a layer normalises with each batch's statistics in eval mode too: the frozen model's features
    of a sample, computed in other batches, were no target the adapters could match (and a last batch
    of one row raised torch's "Expected more than 1 value per channel" mid-method)."""
    _, forget, retain, unseen = problem
    model = init_model(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32),
                                                   torch.nn.BatchNorm1d(32, track_running_stats=False),
                                                   torch.nn.ReLU(), torch.nn.Linear(32, 10)), 0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^rfa: the model's batch-norm layer '2' has no running statistics "
                                         r"\(track_running_stats=False\) and normalises with each batch's own"):
        RFA(epochs=1).check_model(model)
    with pytest.raises(ValueError, match=r"^rfa: the model's batch-norm layer '2' has no running statistics"):
        RFA(epochs=1).unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert not lora.adapter_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def own_parameters(model: torch.nn.Module) -> dict[str, tuple]:
    """Each parameter's requires_grad flag, dtype and device, by name."""
    return {name: (p.requires_grad, p.dtype, p.device) for name, p in model.named_parameters()}


FROZEN = {  # which of the MLP's parameters the caller froze (layer "1" hidden, "3" the output layer)
    "all but the head": ("1.weight", "1.bias"),
    "an adapted layer's weight": ("1.weight",),
    "everything": ("1.weight", "1.bias", "3.weight", "3.bias"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("make", [lambda: RFA(epochs=2), lambda: RFA(epochs=2, targets="*"),
                                  lambda: CureNewtonLoRA(rank=4, max_iterations=2),
                                  lambda: CureNewtonLoRA(rank=4, max_iterations=2, targets="1")],
                         ids=["rfa", "rfa-every-layer", "cure_newton_lora", "cure_newton_lora-hidden-layer"])
def test_merged_model_keeps_the_given_flags_and_carries_no_gradient(problem, make, frozen, dtype):
    """RFA's backward also reached the model's own trainable parameters, which no optimizer held: the
    returned model carried the sum of their gradients over every step in .grad. Both methods return
    the flags, dtypes and devices given (a frozen layer that had an adapter comes back frozen, a
    trainable one trainable) and leave the caller's model as it was."""
    model, forget, retain, unseen = problem
    given = copy.deepcopy(model).to(dtype)
    for name, p in given.named_parameters():
        p.requires_grad_(name not in FROZEN[frozen])
    if dtype == torch.float64:
        forget, retain, unseen = (LabeledData(d.x.double(), d.y) for d in (forget, retain, unseen))
    state, flags = copy.deepcopy(given.state_dict()), own_parameters(given)
    result = make().unlearn(given, forget, retain, unseen=unseen, seed=0)
    assert own_parameters(result.model) == flags
    assert all(p.grad is None for p in result.model.parameters())
    assert own_parameters(given) == flags and all(p.grad is None for p in given.parameters())
    assert all(torch.equal(v, state[k]) for k, v in given.state_dict().items())
    assert not torch.equal(result.model.state_dict()["1.weight"], state["1.weight"])  # it did unlearn


def test_unmerged_rfa_keeps_the_flags_and_trains_adapters_the_caller_froze(problem):
    """Without merging, the model's own parameters keep their flags (an adapted layer's base is frozen
    while it is wrapped and gets its flags back when unloaded) and no gradient is left anywhere. The
    adapters of an earlier request train again even if the caller froze them (they were silently left
    as they were), and come back frozen."""
    model, forget, retain, unseen = problem
    given = copy.deepcopy(model)
    given[3].requires_grad_(False)
    first = RFA(epochs=1, merge=False).unlearn(given, forget, retain, unseen=unseen, seed=0).model
    assert {name: flag for name, (flag, _, _) in own_parameters(first).items()} == {
        "1.lora_a": True, "1.lora_b": True, "1.base.weight": False, "1.base.bias": False, "3.weight": False,
        "3.bias": False}
    assert all(p.grad is None for p in first.parameters())
    adapter = lora.adapter_modules(first)["1"]
    adapter.requires_grad_(False)
    flags = own_parameters(first)
    second = RFA(epochs=1, merge=False).unlearn(first, forget, retain, unseen=unseen, seed=1).model
    assert own_parameters(second) == flags and all(p.grad is None for p in second.parameters())
    moved = lora.adapter_modules(second)["1"]
    assert not torch.equal(moved.lora_b, adapter.lora_b) and not torch.equal(moved.lora_a, adapter.lora_a)
    assert torch.equal(moved.base.weight, adapter.base.weight)
    # merged, the layer gets back the flags it had before its first adapter
    merged = RFA(epochs=1).unlearn(first, forget, retain, unseen=unseen, seed=1).model
    assert own_parameters(merged) == own_parameters(given)


def _small_sets():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=generator), torch.arange(40) % 3
    return LabeledData(x[:5], y[:5]), LabeledData(x[5:], y[5:])


def _small_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _tied(head: bool = True):
    """Two tied Linear layers (the second's weight is the first's), then an untied head unless ``head`` is False."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6))
    model[2].weight = model[0].weight
    if head:
        model.extend([torch.nn.ReLU(), torch.nn.Linear(6, 3)])
    return model


class _NoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("build, match", [
    (lambda: torch.nn.Linear(6, 3), r"the model is itself a Linear layer; wrap it"),
    (lambda: lora.LoRALinear(torch.nn.Linear(6, 3), rank=2), r"the model is itself a LoRALinear layer; wrap it"),
    (_NoLayer, r"the model has no Linear or Conv2d layer that can take an adapter"),
    (lambda: _tied(head=False), r"the model has no Linear or Conv2d layer that can take an adapter"),
], ids=["a-linear-layer", "an-adapter", "no-layer", "only-tied-layers"])
def test_cure_newton_lora_refuses_a_model_without_layers_it_can_adapt_up_front(build, match):
    """The default targets were resolved mid-method: add_adapters' messages about targets the caller never
    gave (got [''], got []), and check_model let tied weights through."""
    forget, retain = _small_sets()
    model = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^cure_newton_lora: " + match):
        CureNewtonLoRA().check_model(model)
    with pytest.raises(ValueError, match=r"^cure_newton_lora: " + match):
        CureNewtonLoRA(max_iterations=1).unlearn(model, forget, retain, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_default_targets_leave_out_tied_layers_and_named_ones_are_refused():
    """The defaults refused a model with tied layers outright (the tie's error), where the docs leave out of
    the default every layer an adapter cannot stand in for; named, a tied layer is still refused."""
    forget, retain = _small_sets()
    assert lora.adaptable_layers(_tied()) == ["4"]
    assert hidden_layers(_tied(), torch.zeros(1, 6)) == ()
    result = CureNewtonLoRA(max_iterations=1).unlearn(_tied(), forget, retain, seed=0)
    assert result.diagnostics["layers"] == ["4"]
    with pytest.raises(ValueError, match=r"^cure_newton_lora: layer '0' shares its parameter '0.weight' with"):
        CureNewtonLoRA(targets="0").check_model(_tied())


def test_cure_newton_lora_trains_merged_adapters_and_names_every_adapter_it_trained():
    """Merged adapters took no gradient: the method returned the model unchanged (zero gradient, stop at
    the tolerance), or failed with torch's "element 0 of tensors does not require grad" when every
    layer's adapter was merged. Adapters the model had trained alongside new targets, but the
    diagnostics named only the new layers and the method's rank."""
    forget, retain = _small_sets()
    model = _small_mlp()
    lora.add_adapters(model, "0", rank=2)
    lora.merge(model)
    before = copy.deepcopy(model.state_dict())
    result = CureNewtonLoRA(max_iterations=1).unlearn(model, forget, retain, seed=0)
    assert not torch.equal(result.model[0].weight, before["0.base.weight"])  # it moved
    assert result.diagnostics["layers"] == ["0"] and result.diagnostics["ranks"] == [2] and result.hvps > 0
    assert not lora.adapter_modules(result.model)
    assert lora.adapter_modules(model)["0"].merged  # the caller's model is as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lora.unmerge(model)
    result = CureNewtonLoRA(rank=4, max_iterations=1, targets="2").unlearn(model, forget, retain, seed=0)
    assert result.diagnostics["layers"] == ["0", "2"] and result.diagnostics["ranks"] == [2, 4]


def _attention_model() -> torch.nn.Module:
    """A digits classifier with a torch Transformer layer: no adapter can stand in for its Linear
    layers (nn.MultiheadAttention reads its out_proj's weight directly, the layer's fast path those of
    linear1 and linear2)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Unflatten(1, (2, 8)),
        torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


def test_default_targets_leave_out_layers_an_adapter_cannot_stand_in_for():
    model = _attention_model()
    assert lora.adaptable_layers(model) == ["1", "5"]
    assert hidden_layers(model, torch.zeros(1, 64)) == ("1",)
    lora.add_adapters(model, "1", rank=2)
    assert lora.adaptable_layers(model) == ["5"]  # not the adapter's own base layer
    with pytest.raises(ValueError, match=r"^rfa: layer '3.self_attn.out_proj': it is the out_proj"):
        RFA(targets="3.*").unlearn(_attention_model(), *_attention_data(), seed=0)  # named: still refused


def _attention_data():
    data = load_digits()
    x = torch.tensor(data.images[:120], dtype=torch.float32) / 16
    y = torch.tensor(data.target[:120], dtype=torch.long)
    return LabeledData(x[:20], y[:20]), LabeledData(x[20:], y[20:])


def test_the_adapter_methods_take_their_defaults_on_a_transformer_layer():
    """Both refused any model holding a torch Transformer layer with their default targets (RFA from
    inside its run, on its copy): the defaults took layers that cannot take an adapter."""
    model = _attention_model()
    before = copy.deepcopy(model.state_dict())
    CureNewtonLoRA().check_model(model)  # its run then needs second derivatives, which torch's CPU attention lacks
    result = RFA(epochs=1).unlearn(model, *_attention_data(), seed=0)
    assert result.diagnostics["layers"] == ["1"]
    assert result.model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched


def test_a_spectral_norm_layer_of_the_callers_model_is_not_run_while_checking_it():
    """Checking whether a layer can take an adapter read its weight, which for a spectral-norm layer in
    training mode runs a power iteration that wrote its state (_u, _v) into the caller's model: rfa
    refused the model and still changed it, cure_newton_lora changed it and returned a result."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 10, generator=g), torch.randint(0, 3, (96,), generator=g)
    forget, retain = LabeledData(x[:16], y[:16]), LabeledData(x[16:], y[16:])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(10, 16)),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3)).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no hidden Linear or Conv2d layer that can take an adapter"):
        RFA(epochs=1).unlearn(model, forget, retain, seed=0)
    CureNewtonLoRA(max_iterations=1).unlearn(model, forget, retain, seed=0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_compiled_model_that_another_method_ran_on_first():
    """Dynamo replayed the graph it had compiled for an earlier private copy, without RFA's forward hooks:
    a bare KeyError: '_orig_mod.0'. The hooks now run on the eager module, with the same result."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 10, generator=g), torch.randint(0, 3, (128,), generator=g)
    forget, retain = LabeledData(x[:16], y[:16]), LabeledData(x[16:96], y[16:96])
    unseen = LabeledData(x[96:], y[96:])
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    compiled = torch.compile(copy.deepcopy(eager), backend="eager")
    METHODS["lotus"](epochs=1).unlearn(compiled, forget, retain, unseen=unseen, seed=0)
    result = RFA(epochs=1).unlearn(compiled, forget, retain, unseen=unseen, seed=0)
    reference = RFA(epochs=1).unlearn(eager, forget, retain, unseen=unseen, seed=0)
    torch.testing.assert_close(result.model(x), reference.model(x))


def test_features_are_the_adapted_layers_outputs_when_the_next_module_works_in_place():
    # ReLU(inplace=True) after an adapted layer wrote its output into the kept features: the same function gave
    # another model (max weight difference 0.099), with the distance scales of the post-ReLU features
    forget, retain = _small_sets()
    plain = _small_mlp()
    in_place = copy.deepcopy(plain)
    in_place[1] = torch.nn.ReLU(inplace=True)
    results = [RFA(epochs=2, batch_size=8).unlearn(m, forget, retain, seed=0).model for m in (plain, in_place)]
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        assert torch.equal(a, b)


def test_other_class_without_another_class_in_the_retain_set_is_refused():
    # argmax over classes all masked to -inf picked class 0, absent from D_r: the target was a mean of no rows (0)
    forget, retain = _small_sets()
    only_one = LabeledData(retain.x, torch.ones_like(retain.y))
    with pytest.raises(ValueError, match=r"shift='other_class' needs a class of D_r other than .* only class\(es\) "
                                         r"\[1\]"):
        RFA(shift="other_class").unlearn(_small_mlp(), LabeledData(forget.x, torch.ones_like(forget.y)), only_one,
                                         seed=0)


def test_dropout_does_not_move_adapters_that_only_align_the_retain_features():
    # the student trained in train mode (dropout on) against the frozen eval-mode features: with the alignment
    # alone (no task loss, a negligible shift) the weights moved by 0.131 (Adam) or 0.058 (SGD), where B = 0 is
    # the exact minimiser. SGD here: the student's rows run in a batch twice the teacher's, whose matmul rounds
    # them differently on some CPUs (Intel AVX-512: gradients of rounding size), and Adam's normalised steps
    # turn those into lr-sized moves (8.7e-3); SGD's stay at rounding size (9e-10)
    forget, retain = _small_sets()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    rfa = RFA(epochs=3, batch_size=8, task_weight=0.0, lam=1e-30, optimizer="sgd")
    out = rfa.unlearn(model, forget, retain, seed=0).model
    for a, b in zip(model.parameters(), out.parameters()):
        assert float((a - b).abs().max()) <= 1e-6


def test_adapters_of_an_earlier_request_stay_in_the_loss():
    # a second request with other targets trained the first request's adapter too, but only the new layer was in
    # L_align and L_shift
    forget, retain = _small_sets()
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    first = RFA(targets="0", merge=False, epochs=1, batch_size=8).unlearn(model, forget, retain, seed=0).model
    second = RFA(targets="2", merge=False, epochs=1, batch_size=8).unlearn(first, forget, retain, seed=0)
    assert second.diagnostics["layers"] == ["0", "2"]


def test_one_configured_method_applies_to_its_own_output():
    """RFA(targets=X, merge=False) refused its own output ("module 'X' already has an adapter"), although an
    earlier request's adapters train on: a named layer with an adapter keeps it, a pattern that selects only
    such layers selects none, and add_adapters itself still refuses the layer."""
    forget, retain = _small_sets()
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    for targets in ("0", "[0]"):
        rfa = RFA(targets=targets, merge=False, epochs=1, batch_size=8)
        first = rfa.unlearn(model, forget, retain, seed=0).model
        second = rfa.unlearn(first, forget, retain, seed=1)
        assert second.diagnostics["layers"] == ["0"]
        assert not torch.equal(second.model[0].lora_a, first[0].lora_a)
    with pytest.raises(ValueError, match="module '0' already has an adapter"):
        lora.add_adapters(first, "0", rank=2)


class _Scalars(torch.nn.Module):
    """A model of one scalar input per sample (x of shape (N,)), which every other method takes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(1, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.unsqueeze(1))))


def test_one_dimensional_samples_find_their_neighbours():
    """x of shape (N,) raised a bare IndexError from the neighbours' distances (flatten(1))."""
    torch.manual_seed(0)
    x, y = torch.randn(40), torch.arange(40) % 3
    model = _Scalars()
    out = RFA(epochs=1, batch_size=8).unlearn(model, LabeledData(x[:5], y[:5]), LabeledData(x[5:], y[5:]), seed=0)
    columns = RFA(epochs=1, batch_size=8).unlearn(_Columns(model), LabeledData(x[:5, None], y[:5]),
                                                  LabeledData(x[5:, None], y[5:]), seed=0)
    assert out.diagnostics["layers"] == columns.diagnostics["layers"]  # the same neighbours as for (N, 1) data
    for p, q in zip(out.model.parameters(), columns.model.parameters()):
        assert torch.equal(p, q)


class _Columns(torch.nn.Module):
    """``model`` on (N, 1) inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.a, self.b = copy.deepcopy(model.a), copy.deepcopy(model.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _Tokens(torch.nn.Module):
    """A text classifier over (N, 5) token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.hid, self.fc = torch.nn.Embedding(20, 4), torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hid(self.emb(x).mean(1))))


def test_the_margin_shift_on_token_inputs():
    """The margin shift took the layers' outputs onto a graph through the input's gradient, which integer token
    ids cannot take: torch's bare "only Tensors of floating point dtype can require gradients" mid-method. The
    directions now come through the frozen copy's parameters, whose flags are given back."""
    torch.manual_seed(0)
    x = torch.stack([torch.arange(i, i + 5) % 20 for i in range(40)])
    y = torch.arange(40) % 3
    model = _Tokens().eval()
    model.emb.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    result = RFA(epochs=2, shift="margin", merge=True).unlearn(model, LabeledData(x[:6], y[:6]),
                                                               LabeledData(x[6:], y[6:]), seed=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(result.model.hid.weight, model.hid.weight)
    assert [p.requires_grad for p in result.model.parameters()] == [p.requires_grad for p in model.parameters()]


# RFA's parts against their documented definitions (docs/methods.md), on a small frozen model whose features are
# computed here from its weights: two adapted layers of different widths ("0": 8 features, "2": 5)

def _frozen_tanh_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 4)).eval().requires_grad_(False)


def _by_hand(model, x):
    """The outputs of layers "0" and "2" and the logits, from the weights."""
    h1 = x @ model[0].weight.T + model[0].bias
    h2 = torch.tanh(h1) @ model[2].weight.T + model[2].bias
    return [h1, h2], torch.tanh(h2) @ model[4].weight.T + model[4].bias


def _definition_sets():
    """D_f (labels 0-2, not a palindrome), D_r (classes 0-2) and unseen data that also holds class 3."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=generator)
    forget = LabeledData(x[:6], torch.tensor([0, 1, 2, 2, 0, 1]))
    return forget, LabeledData(x[6:46], torch.arange(40) % 3), LabeledData(x[46:], torch.arange(54) % 4)


def _parts(call):
    """``call(teacher, features)`` on the frozen model with RFA's feature hooks on the layers "0" and "2"."""
    model = _frozen_tanh_mlp()
    features = _Features(model, ("0", "2"))
    try:
        return model, call(model, features)
    finally:
        features.remove()


def test_feature_scales_are_the_mean_square_of_the_frozen_retain_features():
    """s_l^2 = mean over D_r and the layer's features of h^2 (catches a mean of |h|)."""
    _, retain, _ = _definition_sets()
    rfa = RFA()
    model, scales = _parts(lambda m, f: rfa._feature_scales(m, f, retain))
    expected = [float(h.square().mean()) for h in _by_hand(model, retain.x)[0]]
    assert scales == pytest.approx(expected, rel=1e-5)


def test_distance_is_the_squared_error_over_size_and_scale_summed_over_layers():
    """sum_l mean_i ||h - t||^2 / (n_l s_l^2) (catches a distance that leaves out the scales s_l^2)."""
    generator = torch.Generator().manual_seed(2)
    hs = [torch.randn(7, 8, generator=generator, dtype=torch.float64), torch.randn(7, 5, generator=generator,
                                                                                  dtype=torch.float64)]
    targets = [torch.randn(7, 8, generator=generator, dtype=torch.float64), torch.randn(7, 5, generator=generator,
                                                                                       dtype=torch.float64)]
    scales = [0.25, 4.0]
    expected = sum(float(((h - t) ** 2).sum(1).mean()) / (h.shape[1] * s) for h, t, s in zip(hs, targets, scales))
    assert float(RFA()._distance(hs, targets, scales)) == pytest.approx(expected, rel=1e-12)


def _nearest_mean(forget, pool, pool_features, k):
    """Per layer, per D_f sample: the mean of the pool's features of its k nearest pool samples (Euclidean)."""
    nearest = torch.cdist(forget.x.double(), pool.x.double()).argsort(1)[:, :k]
    return [h[nearest].mean(1) for h in pool_features]


def test_neighbors_target_is_the_mean_feature_of_the_nearest_unseen_samples_of_the_retain_classes():
    """The mean frozen feature of the k = 3 nearest unseen samples, class 3 (not in D_r) left out (catches the k
    farthest, the nearest one alone, and D_r as the pool although unseen data is given)."""
    forget, retain, unseen = _definition_sets()
    rfa = RFA(neighbors=3)
    model, targets = _parts(lambda m, f: rfa._shift_targets(m, f, forget, retain, unseen))
    nearest_of_all = torch.cdist(forget.x, unseen.x).argsort(1)[:, :3]
    assert bool((unseen.y[nearest_of_all] == 3).any())  # the restriction to D_r's classes matters here
    pool = unseen.subset(unseen.y != 3)
    expected = _nearest_mean(forget, pool, _by_hand(model, pool.x)[0], 3)
    assert len(targets) == 2
    for target, want in zip(targets, expected):
        torch.testing.assert_close(target, want)


def test_neighbors_target_without_unseen_data_is_the_mean_feature_of_the_nearest_retain_samples():
    """No unseen data: the pool is D_r (catches the k farthest and the nearest one alone)."""
    forget, retain, _ = _definition_sets()
    rfa = RFA(neighbors=4)
    model, targets = _parts(lambda m, f: rfa._shift_targets(m, f, forget, retain, None))
    expected = _nearest_mean(forget, retain, _by_hand(model, retain.x)[0], 4)
    for target, want in zip(targets, expected, strict=True):  # every layer (a plain zip passed with one missing)
        torch.testing.assert_close(target, want)


def test_unseen_class_target_is_the_mean_unseen_feature_of_the_samples_own_label():
    """Row i: the mean frozen feature of the unseen samples labelled forget.y[i] (catches the labels of other
    rows)."""
    forget, retain, unseen = _definition_sets()
    rfa = RFA(shift="unseen_class")
    model, targets = _parts(lambda m, f: rfa._shift_targets(m, f, forget, retain, unseen))
    for target, h in zip(targets, _by_hand(model, unseen.x)[0], strict=True):
        torch.testing.assert_close(target, torch.stack([h[unseen.y == c].mean(0) for c in forget.y.tolist()]))


def test_other_class_target_is_the_mean_retain_feature_of_the_likeliest_other_class_of_d_r():
    """Row i: the mean frozen D_r feature of the class the frozen model ranks highest among D_r's classes other than
    forget.y[i] (catches the sample's own class, a class D_r lacks, and the least likely class)."""
    forget, retain, unseen = _definition_sets()
    logits = _by_hand(_frozen_tanh_mlp(), forget.x)[1]

    def likeliest_other(classes):
        return [next(c for c in sorted(range(len(row)), key=lambda c: -row[c]) if c != label and c in classes)
                for row, label in zip(logits.tolist(), forget.y.tolist())]

    # D_r without the class most often ranked first among the others: the restriction to D_r's classes matters
    lacking = max((0, 1, 2, 3), key=likeliest_other((0, 1, 2, 3)).count)
    retain = retain.subset(retain.y != lacking)
    classes = set(retain.y.tolist())
    rfa = RFA(shift="other_class")
    model, targets = _parts(lambda m, f: rfa._shift_targets(m, f, forget, retain, unseen))
    other = likeliest_other(classes)
    assert lacking in likeliest_other((0, 1, 2, 3)) and len(set(other)) > 1  # the rows' targets differ
    for target, h in zip(targets, _by_hand(model, retain.x)[0], strict=True):
        torch.testing.assert_close(target, torch.stack([h[retain.y == c].mean(0) for c in other]))


def test_margin_target_is_the_frozen_feature_and_the_unit_direction_down_the_own_logit():
    """Per layer (N, 2, n_l): h0 and u = -g / ||g||, g the gradient of the logit of the frozen model's own
    prediction (argmax) with respect to the layer's output (catches +g and the least likely class's logit)."""
    forget, retain, unseen = _definition_sets()
    rfa = RFA(shift="margin")
    model, targets = _parts(lambda m, f: rfa._shift_targets(m, f, forget, retain, unseen))
    (h1, h2), logits = _by_hand(model, forget.x)
    own = logits.argmax(1)
    # d z_c / d h2 = W4[c] * tanh'(h2), d z_c / d h1 = (d z_c / d h2) W2 * tanh'(h1)
    g2 = model[4].weight[own] * (1 - torch.tanh(h2) ** 2)
    g1 = (g2 @ model[2].weight) * (1 - torch.tanh(h1) ** 2)
    for target, h, g in zip(targets, (h1, h2), (g1, g2), strict=True):
        assert target.shape == (len(forget), 2, h.shape[1])
        torch.testing.assert_close(target[:, 0], h)
        torch.testing.assert_close(target[:, 1], -g / g.norm(dim=1, keepdim=True))


def test_margin_loss_is_the_hinge_on_the_move_along_u_relative_to_the_frozen_norm():
    """sum_l mean_i max(0, margin - <h - h0, u> / ||h0||)^2 (catches a move not divided by ||h0||)."""
    generator = torch.Generator().manual_seed(3)
    hs, targets, expected = [], [], 0.0
    for n in (8, 5):
        h0 = 3 * torch.randn(6, n, generator=generator, dtype=torch.float64)  # ||h0|| well above 1
        u = torch.randn(6, n, generator=generator, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True)
        h = h0 + torch.randn(6, n, generator=generator, dtype=torch.float64)
        moves = [float((h[i] - h0[i]) @ u[i]) / float(h0[i].norm()) for i in range(6)]
        expected += sum(max(0.0, 0.1 - m) ** 2 for m in moves) / 6  # some moves past the margin: 0 there
        hs.append(h)
        targets.append(torch.stack([h0, u], 1))
    assert float(RFA(shift="margin", margin=0.1)._margin_loss(hs, targets)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("merge", [True, False])
def test_a_diverged_training_is_said_as_such_whether_or_not_it_merges(merge):
    """With merge=True (the default) a diverged adapter reached the merge first, whose refusal spoke of merging
    ("the base weight plus the adapter's scale * B A holds NaN or Inf ... nothing was merged"), naming neither
    the method nor the cause; merge=False gave the divergence message every method gives."""
    gen = torch.Generator().manual_seed(0)

    def data(rows: int) -> LabeledData:
        return LabeledData(torch.randn(rows, 4, generator=gen), torch.randint(0, 3, (rows,), generator=gen))

    retain, forget, unseen = data(30), data(6), data(12)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"^rfa: the unlearned model has NaN or Inf in its parameter '0.lora_a' "
                                         r"\(the method diverged: lower its learning rate or step size\)"):
        RFA(epochs=3, lr=1e38, optimizer="sgd", merge=merge).unlearn(model, forget, retain, unseen=unseen, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _AuxHead(nn.Module):
    """fc1 feeds the head and an auxiliary head whose output never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.aux, self.head = nn.Linear(16, 32), nn.Linear(32, 3), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.aux_out = self.aux(h)
        return self.head(torch.relu(h))


class _TwoHeads(nn.Module):
    """A second task's head that this forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head, self.other = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def test_layers_whose_features_do_not_reach_the_logits_or_are_never_computed():
    """margin's directions through a layer whose output never reaches the logits raised torch's "appears to not have
    been used in the graph" (now direction 0); a named layer the forward never calls failed mid-method with advice
    about F.linear and torch.compile (now a ValueError before training), and an earlier request's adapter on such a
    layer made RFA fail on the model whatever the targets (now left as it is)."""
    torch.manual_seed(0)
    x, y = torch.randn(120, 16), torch.randint(0, 4, (120,))
    forget, retain = LabeledData(x[:20], y[:20]), LabeledData(x[20:], y[20:])
    out = METHODS["rfa"](epochs=1, shift="margin").unlearn(_AuxHead(), forget, retain)
    assert out.diagnostics["layers"] == ["fc1", "aux"]
    assert all(torch.isfinite(p).all() for p in out.model.parameters())
    with pytest.raises(ValueError, match=r"^rfa: layer 'other' is not called by a forward of the model"):
        METHODS["rfa"](epochs=1, targets=["fc", "other"]).unlearn(_TwoHeads(), forget, retain)
    adapted = _TwoHeads()
    lora.add_adapters(adapted, "*", rank=2)
    before = copy.deepcopy(adapted.state_dict())
    for targets in (None, "fc"):
        out = METHODS["rfa"](epochs=1, targets=targets, merge=False).unlearn(adapted, forget, retain)
        assert out.diagnostics["layers"] == ["fc", "head"]
        other = {k: v for k, v in out.model.state_dict().items() if k.startswith("other.")}
        assert all(torch.equal(v, before[k]) for k, v in other.items())  # left as it is
    assert all(torch.equal(v, before[k]) for k, v in adapted.state_dict().items())


@pytest.mark.parametrize("shift", ["neighbors", "margin"])
def test_float16_features_above_256_train_the_adapters_as_in_float32(shift):
    """The scales s_l^2 and the distances were squared in the model's dtype: float16 features of ~300 gave
    s_l^2 = Inf, every distance term a zero gradient, B stayed 0 and the model came back unchanged."""
    gen = torch.Generator().manual_seed(0)
    model = init_model(lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), 0)
    with torch.no_grad():
        model[0].weight.mul_(300.0)  # hidden features up to ~400, well inside float16's range
    x, y = torch.randn(36, 4, generator=gen), torch.randint(0, 3, (36,), generator=gen)
    runs = {}
    for dtype in (torch.float32, torch.float16):
        forget, retain = LabeledData(x[:6].to(dtype), y[:6]), LabeledData(x[6:].to(dtype), y[6:])
        result = RFA(epochs=2, optimizer="sgd", lr=1e-2, merge=False, task_weight=0.0, shift=shift, targets=["0"]
                     ).unlearn(copy.deepcopy(model).to(dtype), forget, retain)
        assert all(torch.isfinite(torch.tensor(v)) for v in (result.diagnostics["align_loss"],
                                                               result.diagnostics["shift_loss"]))
        runs[dtype] = next(iter(lora.adapter_modules(result.model).values())).lora_b.double()
    assert runs[torch.float32].norm() > 0
    torch.testing.assert_close(runs[torch.float16], runs[torch.float32], rtol=0.05, atol=1e-6)
