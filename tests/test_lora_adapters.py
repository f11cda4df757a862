"""LoRA adapters: a fresh adapter changes nothing, the forward is the LoRA formula, merge/unmerge and
unload round trips, adapter parameter selection, PEFT interop both ways, and bad targets that raise
before anything changes."""
import copy
import sys

import pytest
import torch
from torch import nn

from unlearn_kernels import lora
from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.models import MLP, SmallCNN


@pytest.fixture(scope="module")
def peft():
    """PEFT is an optional dependency of the package (in its test extra): only its tests need it."""
    return pytest.importorskip("peft")


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP(12, hidden=(16, 8), num_classes=5).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, 5, channels=(4, 6)).double()


def randomize_b(model, seed=1):
    """Non-zero B everywhere, so the adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.adapter_modules(model).values():
            adapter.lora_b.copy_(torch.randn(adapter.lora_b.shape, generator=generator, dtype=torch.float64))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


X = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_fresh_adapters_leave_outputs_unchanged(build, x):
    model = build()
    before = model(x)
    names = lora.add_adapters(model, "*", rank=3, alpha=6)
    assert names and all(torch.count_nonzero(a.lora_b) == 0 for a in lora.adapter_modules(model).values())
    assert all(torch.count_nonzero(a.lora_a) > 0 for a in lora.adapter_modules(model).values())
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)


def test_linear_forward_is_the_lora_formula():
    layer = nn.Linear(12, 5).double()
    adapter = lora.LoRALinear(layer, rank=4, alpha=2.0)
    randomize_b(nn.Sequential(adapter))
    expected = X @ layer.weight.T + layer.bias + 0.5 * (X @ adapter.lora_a.T) @ adapter.lora_b.T
    torch.testing.assert_close(adapter(X), expected)
    # only A and B get gradients; the base layer is frozen
    adapter(X).square().sum().backward()
    assert adapter.lora_a.grad is not None and adapter.lora_b.grad is not None
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_conv_forward_equals_the_merged_convolution():
    conv = nn.Conv2d(1, 4, 3, padding=1).double()
    adapter = lora.LoRAConv2d(copy.deepcopy(conv), rank=2)
    randomize_b(nn.Sequential(adapter))
    merged = copy.deepcopy(conv)
    with torch.no_grad():
        merged.weight += adapter.delta_weight()
    torch.testing.assert_close(adapter(IMAGES), merged(IMAGES))


@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_merge_unmerge_and_unload_round_trip(build, x):
    model = build()
    plain = copy.deepcopy(model)
    lora.add_adapters(model, "*", rank=2)
    randomize_b(model)
    adapted = model(x)
    lora.merge(model)
    assert all(a.merged for a in lora.adapter_modules(model).values())
    torch.testing.assert_close(model(x), adapted)
    lora.unmerge(model)
    torch.testing.assert_close(model(x), adapted)
    # the base weights come back up to rounding
    for name, adapter in lora.adapter_modules(model).items():
        torch.testing.assert_close(adapter.base.weight, plain.get_submodule(name).weight, rtol=0, atol=1e-13)
    # unload with merge gives the plain architecture with the adapted outputs ...
    merged = lora.unload(copy.deepcopy(model), merge=True)
    assert not lora.adapter_modules(merged) and type(merged) is type(plain)
    assert dict(merged.named_parameters()).keys() == dict(plain.named_parameters()).keys()
    assert all(p.requires_grad for p in merged.parameters())  # the flags the base layers had
    torch.testing.assert_close(merged(x), adapted)
    # ... and without merge the original model
    dropped = lora.unload(model, merge=False)
    torch.testing.assert_close(dropped(x), plain(x), rtol=0, atol=1e-12)


def test_adapter_parameter_selection():
    model = mlp()
    assert lora.adapter_parameter_names(model) == ()
    assert lora.add_adapters(model, ["1", "3"], rank=2) == ("1", "3")
    names = lora.adapter_parameter_names(model)
    assert names == ("1.lora_a", "1.lora_b", "3.lora_a", "3.lora_b")
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in names)
    # the curvature operators take them as params=: d = the adapters' size
    x, y = X, torch.arange(7) % 5
    op = hessian_operator(model, torch.nn.functional.cross_entropy, (x, y), params=names)
    assert op.shape[0] == sum(params[n].numel() for n in names)


def test_patterns_select_only_adaptable_layers():
    model = cnn()
    assert lora.add_adapters(model, "features.*", rank=2) == ("features.0", "features.3")
    # layers inside an adapter are not targets again; an adapted layer cannot be adapted twice
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_adapters(model, "features.0", rank=2)
    assert lora.add_adapters(model, "*", rank=2) == ("head",)


@pytest.mark.parametrize("targets, rank, error, match", [
    ("nothing", 2, ValueError, "names no module"),
    ("2", 2, TypeError, "is a ReLU"),
    ("0", 2, TypeError, "is a Flatten"),
    (["1", "nothing"], 2, ValueError, "names no module"),  # the first target is valid: still nothing changes
    ("1", 0, ValueError, "rank must be an int >= 1"),
    ([], 2, TypeError, "non-empty sequence"),
])
def test_bad_targets_raise_and_change_nothing(targets, rank, error, match):
    model = mlp()
    before = state(model)
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        lora.add_adapters(model, targets, rank=rank)
    assert [type(m) for m in model.modules()] == modules_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unload_of_a_bare_adapter_is_refused():
    with pytest.raises(ValueError, match="itself an adapter"):
        lora.unload(lora.LoRALinear(nn.Linear(3, 2), rank=1))


def test_bad_conv_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match="groups=1"):
        lora.LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="layer '1'.*groups=1"):
        lora.add_adapters(model, "*", rank=2)
    assert not lora.adapter_modules(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("build, x, targets", [(mlp, X, ["1", "3"]), (cnn, IMAGES, ["features.0", "head"])])
def test_from_peft_gives_the_peft_models_outputs(peft, build, x, targets):
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(build(), config).eval()  # init_lora_weights=False: random B, adapters matter
    expected = peft_model(x)
    ours = lora.from_peft(peft_model)
    assert set(lora.adapter_modules(ours)) == set(targets)
    assert not any(type(m).__module__.startswith("peft") for m in ours.modules())
    torch.testing.assert_close(ours(x), expected)
    torch.testing.assert_close(peft_model(x), expected)  # the PEFT model is untouched
    # and back: to_peft carries the same adapters
    again = lora.to_peft(ours)
    assert isinstance(again, peft.PeftModel)
    torch.testing.assert_close(again(x), expected)


def test_to_peft_of_our_adapters(peft):
    model = mlp()
    lora.add_adapters(model, ["1", "5"], rank=2, alpha=4)
    randomize_b(model)
    peft_model = lora.to_peft(model)
    torch.testing.assert_close(peft_model(X), model(X))
    layer = peft_model.get_base_model().get_submodule("1")
    assert layer.r["default"] == 2 and layer.scaling["default"] == 2.0
    assert lora.adapter_modules(model)  # ours keeps its adapters


def test_peft_interop_errors(peft):
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lora.from_peft(mlp())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.to_peft(mlp())
    dora = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"], use_dora=True))
    with pytest.raises(ValueError, match="variant"):
        lora.from_peft(dora)
    mixed = mlp()
    lora.add_adapters(mixed, "1", rank=2)
    lora.add_adapters(mixed, "3", rank=4)
    with pytest.raises(ValueError, match="one rank and one scale"):
        lora.to_peft(mixed)


def test_missing_peft_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft looks like to import
    with pytest.raises(ImportError, match=r"unlearn-kernels\[peft\]"):
        lora.from_peft(mlp())
    with pytest.raises(ImportError, match=r"unlearn-kernels\[peft\]"):
        lora.to_peft(mlp())
