"""LoRA adapters: a fresh adapter changes nothing, the forward is the LoRA formula, merge/unmerge and
unload round trips, adapter parameter selection, PEFT interop both ways, and bad targets that raise
before anything changes."""
import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from devices import AUTOCAST_DTYPE
from tolerance import assert_within_rule
from torch import nn

from unlearn_kernels import lora
from unlearn_kernels.curvature import hessian_operator
from unlearn_kernels.data import LabeledData
from unlearn_kernels.methods import RFA, CureNewtonLoRA
from unlearn_kernels.models import MLP, SmallCNN
from unlearn_kernels.ops import lora_linear_ref


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


@pytest.mark.parametrize("adapter, base", [(lora.LoRALinear, lambda: nn.Linear(400, 3)),
                                           (lora.LoRAConv2d, lambda: nn.Conv2d(16, 4, 5))], ids=["linear", "conv"])
def test_a_is_initialised_uniformly_within_pefts_bound(adapter, base):
    """A ~ Kaiming-uniform with a = sqrt(5) (PEFT's init): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 400 for both
    layers; catches a = 1 (bound sqrt(3/fan_in), 1.7 times as wide), which no other test saw."""
    torch.manual_seed(0)
    adapter = adapter(base(), rank=32)
    bound = 1 / np.sqrt(400)
    largest = float(adapter.lora_a.detach().abs().max())  # of 12800 entries: the bound up to a few 1e-4 of it
    assert 0.99 * bound < largest <= bound
    adapter.reset_adapter()  # and again on a reset
    assert 0.99 * bound < float(adapter.lora_a.detach().abs().max()) <= bound


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


@pytest.mark.parametrize("alpha", [6.0, 0.5])
@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_merge_and_unload_apply_the_scale(build, x, alpha):
    """Rank 2 with alpha 6 (scale 3) and 0.5 (scale 0.25), Linear and Conv2d adapters: the merged base weight is
    W + (alpha / rank) B A, computed here, and merge, unmerge and unload(merge=True) keep the outputs. The tests
    above use alpha = rank (scale 1), where a delta_weight without the scale merged B A and passed them."""
    model = build()
    plain = copy.deepcopy(model)
    lora.add_adapters(model, "*", rank=2, alpha=alpha)
    randomize_b(model)
    expected = copy.deepcopy(plain)  # the plain layers with the scaled update written in by hand
    with torch.no_grad():
        for name, adapter in lora.adapter_modules(model).items():
            weight = expected.get_submodule(name).weight
            weight += alpha / 2 * (adapter.lora_b.flatten(1) @ adapter.lora_a.flatten(1)).reshape(weight.shape)
    adapted = model(x)
    torch.testing.assert_close(adapted, expected(x), rtol=1e-12, atol=1e-12)
    lora.merge(model)
    for name, adapter in lora.adapter_modules(model).items():
        torch.testing.assert_close(adapter.base.weight, expected.get_submodule(name).weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)
    lora.unmerge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)
    for name, adapter in lora.adapter_modules(model).items():
        torch.testing.assert_close(adapter.base.weight, plain.get_submodule(name).weight, rtol=0, atol=1e-13)
    unloaded = lora.unload(model, merge=True)
    assert not lora.adapter_modules(unloaded)
    torch.testing.assert_close(unloaded(x), adapted, rtol=1e-12, atol=1e-12)


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


def test_curvature_refuses_an_adapters_frozen_base_by_name():
    """The fused op gives a LoRALinear's base no derivatives: naming the base among the curvature's
    parameters is refused with the parameter and the adapter named (the op's own message, "weight
    requires grad", would point at a flag the caller never set); a merged adapter runs the plain base
    layer, whose weight the operators then differentiate."""
    model = mlp()
    lora.add_adapters(model, ["1"], rank=2)
    x, y = X, torch.arange(7) % 5
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"'1.base.weight' is the frozen base layer of the LoRA adapter '1'"):
        hessian_operator(model, loss, (x, y), params=list(model.parameters()))
    with pytest.raises(ValueError, match=r"'1.base.bias' is the frozen base layer"):
        hessian_operator(model, loss, (x, y), params=["1.lora_a", "1.base.bias"])
    lora.merge(model)
    op = hessian_operator(model, loss, (x, y), params=["1.base.weight"])
    assert op.shape[0] == model[1].base.weight.numel()


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


def _untouched(model, before, types_before):
    assert [type(m) for m in model.modules()] == types_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("targets, match", [
    ("*", "layer '0' is also the model's module '2'"),
    (["0", "2"], "layer '0' is also the model's module '2'"),
    ("2", "layer '2' is also the model's module '0'"),
])
def test_a_module_under_two_names_is_refused(targets, match):
    """One Linear at positions 0 and 2: an adapter on one name would leave the other use a plain, frozen
    layer (and '2' was not found at all)."""
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    before, types_before = state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        lora.add_adapters(model, targets, rank=2)
    _untouched(model, before, types_before)
    assert model[0] is layer and model[2] is layer


def test_a_module_in_a_shared_block_is_refused():
    block = nn.Sequential(nn.Linear(4, 4))
    model = nn.Sequential(block, nn.ReLU(), block)
    with pytest.raises(ValueError, match="layer '0.0' is also the model's module '2.0'"):
        lora.add_adapters(model, "0.0", rank=2)
    assert not lora.adapter_modules(model)


@pytest.mark.parametrize("target, match", [
    ("0", "layer '0' shares its parameter '0.weight' with '2.weight'"),
    ("2", "layer '2' shares its parameter '2.weight' with '0.weight'"),
    ("*", "layer '0' shares its parameter '0.weight' with '2.weight'"),
])
def test_tied_weights_are_refused(target, match):
    """b.weight = a.weight: an adapter on a would freeze b's weight and merge its delta into b too."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    before, types_before = state(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        lora.add_adapters(model, target, rank=2)
    _untouched(model, before, types_before)
    assert b.weight is a.weight
    # an untied layer of the same model still takes an adapter
    model.append(nn.Linear(4, 3).double())
    assert lora.add_adapters(model, "3", rank=2) == ("3",)


class _Rescaled(nn.Linear):
    """A Linear subclass with its own forward (the adapter computes nn.Linear's formula instead)."""

    def forward(self, x):
        return 2 * super().forward(x)


def _weight_normed():
    return nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))


def _hooked(layer: nn.Module, how: str) -> nn.Module:
    if how == "forward-hook":
        layer.register_forward_hook(lambda module, args, out: 0.5 * out)
    elif how == "pre-hook":
        layer.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    elif how == "backward-hook":
        layer.register_full_backward_hook(lambda module, grad_in, grad_out: tuple(0 * g for g in grad_in))
    else:  # a forward set on the instance (accelerate's hooks do this)
        plain = layer.forward
        layer.forward = lambda x: 0.5 * plain(x)
    return layer


@pytest.mark.parametrize("build, target, match", [
    (lambda: nn.Sequential(nn.Linear(4, 4), _Rescaled(4, 4)), "*",
     r"layer '1': its class _Rescaled overrides Linear's forward"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(4)), ["0", "1"],
     r"layer '1': it is a lazy layer whose weight is not initialised yet"),
    (lambda: nn.Sequential(nn.Linear(4, 4), _weight_normed()), "*",
     r"layer '1': its weight is not a parameter but computed \(a parametrization"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.TransformerEncoderLayer(4, 2, 8)), "*",
     r"layer '1.self_attn.out_proj': it is the out_proj of an nn.MultiheadAttention"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.TransformerEncoderLayer(4, 2, 8)), "1.linear1",
     r"layer '1.linear1': it is a feed-forward layer of an nn.TransformerEncoderLayer, whose fast path"),
    *[(lambda how=how, conv=conv: nn.Sequential(nn.Linear(4, 4), _hooked(nn.Conv2d(1, 2, 3) if conv else
                                                                       nn.Linear(4, 4), how)), "1",
       r"layer '1': it has module hooks \(forward or backward\) or a forward set on the instance")
      for how in ("forward-hook", "pre-hook", "backward-hook", "instance-forward") for conv in (False, True)],
], ids=["own-forward", "lazy", "parametrized", "attention-out-proj", "encoder-feed-forward",
        *[f"{how}-{kind}" for how in ("forward-hook", "pre-hook", "backward-hook", "instance-forward")
          for kind in ("linear", "conv")]])
def test_layers_an_adapter_cannot_stand_in_for_are_refused(build, target, match):
    """Each was wrapped: the subclass's forward and a parametrized weight silently lost (a merge into the
    recomputed weight did nothing), nn.MultiheadAttention's forward failed on the adapter's missing
    .weight (and nn.TransformerEncoderLayer's in eval mode without gradients, its fast path), and the lazy layer raised torch's error after the layer before it had been frozen.
    A layer's forward hooks and an instance forward were skipped by the fused op (a hook halving the outputs:
    logits 0.54 off at B = 0, and cure_newton_lora optimised another function than the model's) or, on a
    convolution, applied to the adapter's update once merged (0.25 off)."""
    torch.manual_seed(0)
    model = build()
    first, types_before = model[0].weight.clone(), [type(m) for m in model.modules()]  # (a lazy weight has no value)
    with pytest.raises(ValueError, match=r"^add_adapters: " + match):
        lora.add_adapters(model, target, rank=2)
    assert [type(m) for m in model.modules()] == types_before
    assert all(p.requires_grad for p in model.parameters()) and torch.equal(model[0].weight, first)


def test_the_adapter_classes_refuse_such_layers_too():
    with pytest.raises(ValueError, match=r"^LoRALinear: base layer: its class _Rescaled overrides Linear's forward"):
        lora.LoRALinear(_Rescaled(4, 4), rank=2)
    with pytest.raises(ValueError, match=r"^LoRALinear: base layer: its weight is not a parameter"):
        lora.LoRALinear(_weight_normed(), rank=2)


def test_targets_are_named_as_given_in_the_error():
    with pytest.raises(TypeError, match=r"non-empty sequence of them, got ''$"):
        lora.add_adapters(mlp(), "", rank=2)


def test_parameter_names_of_a_model_that_is_an_adapter():
    adapter = lora.LoRALinear(nn.Linear(3, 2), rank=1)
    assert lora.adapter_parameter_names(adapter) == ("lora_a", "lora_b")
    assert set(lora.adapter_parameter_names(adapter)) <= dict(adapter.named_parameters()).keys()


def test_a_numpy_rank_is_stored_as_an_int():
    model = mlp()
    lora.add_adapters(model, "1", rank=np.int64(2))
    assert type(lora.adapter_modules(model)["1"].rank) is int


@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_merged_state_loads_merged(build, x, tmp_path):
    """A merged model's state dict loaded into a fresh adapted model of the same layout gives the same
    outputs (the merged flag travels with the state: the delta is not applied twice), and unmerges there."""
    model = build()
    lora.add_adapters(model, "*", rank=2)
    randomize_b(model)
    adapted = model(x)
    lora.merge(model)
    torch.save(model.state_dict(), tmp_path / "merged.pt")
    fresh = build(seed=1)
    lora.add_adapters(fresh, "*", rank=2)
    result = fresh.load_state_dict(torch.load(tmp_path / "merged.pt"))
    assert not result.missing_keys and not result.unexpected_keys
    assert all(a.merged for a in lora.adapter_modules(fresh).values())
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-12, atol=1e-12)
    lora.unmerge(fresh)
    assert not any(a.merged for a in lora.adapter_modules(fresh).values())
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-12, atol=1e-12)
    # and the other way: an unmerged state into a merged model leaves it unmerged
    lora.unmerge(model)
    other = build(seed=2)
    lora.add_adapters(other, "*", rank=2)
    lora.merge(other)
    other.load_state_dict(model.state_dict())
    assert not any(a.merged for a in lora.adapter_modules(other).values())
    torch.testing.assert_close(other(x), adapted, rtol=1e-12, atol=1e-12)


def test_state_saved_without_the_merged_flag_still_loads():
    """A checkpoint from before the flag was saved (no ``lora_merged`` keys) loads strictly, unmerged."""
    model = mlp()
    lora.add_adapters(model, "*", rank=2)
    randomize_b(model)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("lora_merged")}
    assert len(old) < len(model.state_dict())
    fresh = mlp(seed=1)
    lora.add_adapters(fresh, "*", rank=2)
    fresh.load_state_dict(old)
    assert not any(a.merged for a in lora.adapter_modules(fresh).values())
    torch.testing.assert_close(fresh(X), model(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_a_merged_state_without_the_flag_loads_into_a_merged_model_merged(build, x):
    """An old-format state (no ``lora_merged``) of a merged model, base weights included, loaded into a merged model
    leaves the flag as it is (merged): the outputs are the source's. Catches unmerging the old adapter first
    whenever A or B come without the flag (meant for a state of the adapters alone): the loaded merged base
    weight then got the delta a second time in the forward."""
    source = build(seed=3)
    lora.add_adapters(source, "*", rank=2, alpha=4)
    randomize_b(source, seed=4)
    lora.merge(source)
    old = {k: v for k, v in state(source).items() if not k.endswith("lora_merged")}
    model = build()
    lora.add_adapters(model, "*", rank=2, alpha=4)
    randomize_b(model)
    lora.merge(model)
    model.load_state_dict(old)
    assert all(a.merged for a in lora.adapter_modules(model).values())
    for name, adapter in lora.adapter_modules(model).items():
        assert torch.equal(adapter.base.weight, old[name + ".base.weight"])
    torch.testing.assert_close(model(x), source(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("source_merged", [False, True])
@pytest.mark.parametrize("target_merged", [False, True])
def test_an_adapter_alone_loads_onto_the_layers_own_base_weight(source_merged, target_merged):
    """The adapter's keys alone (A, B and the flag, PEFT's way of saving an adapter) took the flag at its word
    as describing a base weight they do not hold: loaded into a merged model the old delta stayed in its base
    weight under an unmerged flag (outputs 1.36 off on a small MLP), and a merged source's state left a plain
    base weight under a merged flag (the loaded adapter ignored, 0.73 off). The loaded adapter now acts on the
    layer's own base weight, merged where the source's was."""
    source = mlp()  # the same base weights as the model below: the adapters differ
    lora.add_adapters(source, "*", rank=2)
    randomize_b(source, seed=4)
    expected = source(X)
    if source_merged:
        lora.merge(source)
    adapter_alone = {k: v for k, v in state(source).items() if "lora_" in k}
    plain = mlp()
    model = mlp()
    lora.add_adapters(model, "*", rank=2)
    randomize_b(model)
    if target_merged:
        lora.merge(model)
    result = model.load_state_dict(adapter_alone, strict=False)
    assert not result.unexpected_keys
    assert [a.merged for a in lora.adapter_modules(model).values()] == [source_merged] * 3
    torch.testing.assert_close(model(X), expected, rtol=1e-12, atol=1e-12)
    lora.unmerge(model)
    torch.testing.assert_close(model(X), expected, rtol=1e-12, atol=1e-12)
    for name, adapter in lora.adapter_modules(model).items():  # the model's own base weights, back as they were
        torch.testing.assert_close(adapter.base.weight, plain.get_submodule(name).weight, rtol=1e-12, atol=1e-12)


def test_an_adapter_alone_after_a_merge_that_followed_a_base_only_load_is_applied_to_the_base():
    """A base-only load marks the next adapter state as the rest of a state in parts; a merge (or unmerge) in
    between changes the base weight, so that mark must go: it stayed, and the adapter loaded after a merge was
    taken as describing the merged base, which kept the old delta (outputs 1.83 off)."""
    source = mlp()
    lora.add_adapters(source, "*", rank=2)
    randomize_b(source, seed=4)
    expected = source(X)
    adapter_alone = {k: v for k, v in state(source).items() if "lora_" in k}
    model = mlp()
    lora.add_adapters(model, "*", rank=2)
    randomize_b(model)
    model.load_state_dict({k: v for k, v in state(model).items() if ".base." in k}, strict=False)
    lora.merge(model)
    model.load_state_dict(adapter_alone, strict=False)
    assert not any(a.merged for a in lora.adapter_modules(model).values())
    torch.testing.assert_close(model(X), expected, rtol=1e-12, atol=1e-12)


def test_adapter_on_a_layer_without_inputs():
    """nn.Linear(0, 3): the output is the bias, as F.linear gives; merge and unmerge work too."""
    layer = nn.Linear(0, 3).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    adapter = lora.LoRALinear(layer, rank=1)
    x = torch.randn(2, 0, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=0)
    adapter.merge()
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=0)
    adapter.unmerge()


@pytest.mark.parametrize("call", [
    lambda: lora.add_adapters(None, "*"),
    lambda: lora.resolve_targets("model", "*"),
    lambda: lora.from_peft(None),
    lambda: lora.from_peft("x"),
    lambda: lora.merge(None),
    lambda: lora.unmerge(None),
    lambda: lora.unload(None),
    lambda: lora.to_peft(None),
    lambda: lora.adapter_modules(None),
], ids=["add_adapters", "resolve_targets", "from_peft-None", "from_peft-str", "merge", "unmerge", "unload",
        "to_peft", "adapter_modules"])
def test_a_model_that_is_not_a_module_is_a_type_error(call):
    with pytest.raises(TypeError, match=r"^\w+: (peft_)?model must be a torch.nn.Module, got (NoneType|str)$"):
        call()


@pytest.mark.parametrize("name, error, match", [
    (3, TypeError, "adapter_name must be a str, got int"),
    ("", ValueError, "adapter_name must be a non-empty name without '.', got ''"),
    ("a.b", ValueError, "adapter_name must be a non-empty name without '.', got 'a.b'"),
])
def test_to_peft_checks_the_adapter_name(name, error, match):
    model = mlp()
    lora.add_adapters(model, "1", rank=2)
    with pytest.raises(error, match=match):
        lora.to_peft(model, adapter_name=name)


@pytest.mark.parametrize("call, layer", [
    (lambda: lora.add_adapters(nn.Linear(3, 2), "*"), "Linear"),
    (lambda: lora.add_adapters(lora.LoRALinear(nn.Linear(3, 2), rank=1), "*"), "LoRALinear"),
    (lambda: lora.resolve_targets(nn.Conv2d(1, 2, 3), "*"), "Conv2d"),
    (lambda: lora.to_peft(lora.LoRALinear(nn.Linear(3, 2), rank=1)), "LoRALinear"),
], ids=["add_adapters", "add_adapters-adapter", "resolve_targets", "to_peft"])
def test_a_model_that_is_a_layer_alone_is_told_to_wrap_it(call, layer):
    """add_adapters said "target '*' names no module of the model (modules: [])", and to_peft gave unload's
    refusal, which advised taking the adapter's .base (dropping the adapter it was to convert)."""
    with pytest.raises(ValueError, match=rf"^\w+: the model is itself a {layer} layer; wrap it, e.g. "
                                         r"nn.Sequential\(model\)$"):
        call()


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


def test_to_peft_config_carries_the_adapters_alpha(peft, tmp_path):
    """The LoraConfig says lora_alpha = the adapters' alpha (6 at rank 2): a PEFT model saved and loaded again
    (which rebuilds its scaling from the config) gives our outputs. Catches lora_alpha = rank (scale 1 after
    loading, while the converted model itself, whose scaling to_peft sets directly, still agreed)."""
    model = mlp()
    lora.add_adapters(model, ["1", "3"], rank=2, alpha=6)
    randomize_b(model)
    peft_model = lora.to_peft(model)
    config = peft_model.peft_config["default"]
    assert config.r == 2 and config.lora_alpha == 6
    peft_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(lora.unload(copy.deepcopy(model), merge=False), tmp_path).eval()
    assert loaded.get_base_model().get_submodule("1").scaling["default"] == 3
    torch.testing.assert_close(loaded(X), model(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build, x, targets", [(mlp, X, ["1", "3"]), (cnn, IMAGES, ["features.0", "head"])])
def test_from_peft_of_a_merged_peft_model(peft, build, x, targets):
    """A PEFT model after merge_adapter() (its base weights hold the update): the converted model has the unmerged
    base weights and the PEFT model's outputs, and the PEFT model stays merged. Catches converting without
    unmerging the copy first (the update then counted twice)."""
    config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets, init_lora_weights=False)
    plain = build()
    peft_model = peft.get_peft_model(copy.deepcopy(plain), config).eval()
    expected = peft_model(x)
    peft_model.merge_adapter()
    ours = lora.from_peft(peft_model)
    assert all(peft_model.get_base_model().get_submodule(name).merged for name in targets)
    adapters = lora.adapter_modules(ours)
    assert set(adapters) == set(targets) and not any(a.merged for a in adapters.values())
    for name, adapter in adapters.items():
        torch.testing.assert_close(adapter.base.weight, plain.get_submodule(name).weight, rtol=0, atol=1e-13)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)


def test_peft_conversions_leave_the_callers_rng_alone(peft, device):
    """Both drew the adapters' random initialisation (then overwritten) from the caller's global RNG."""
    model = mlp().to(device)
    lora.add_adapters(model, ["1", "3"], rank=2)
    randomize_b(model)
    peft_model = lora.to_peft(model).eval()
    x = X.to(device)
    for convert, source in ((lora.to_peft, model), (lora.from_peft, peft_model)):
        torch.manual_seed(0)
        expected = torch.randn(3), torch.randn(3, device=device)
        torch.manual_seed(0)
        converted = convert(source)
        assert all(map(torch.equal, (torch.randn(3), torch.randn(3, device=device)), expected)), convert.__name__
        torch.testing.assert_close(converted(x), model(x))


def test_peft_interop_errors(peft):
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lora.from_peft(mlp())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.to_peft(mlp())
    dora = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"], use_dora=True))
    with pytest.raises(ValueError, match="variant"):
        lora.from_peft(dora)
    disabled = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"]))
    disabled.base_model.disable_adapter_layers()  # PEFT then outputs the base model
    with pytest.raises(ValueError, match=r"^from_peft: layer '1' has its adapters disabled"):
        lora.from_peft(disabled)
    mixed = mlp()
    lora.add_adapters(mixed, "1", rank=2)
    lora.add_adapters(mixed, "3", rank=4)
    with pytest.raises(ValueError, match="one rank and one scale"):
        lora.to_peft(mixed)


def test_from_peft_refuses_what_it_cannot_convert_by_name(peft):
    """LoRA on an Embedding was refused as having no active adapter; LoRA on nn.MultiheadAttention's
    out_proj (which PEFT wraps, and the attention never calls) gave a model whose forward failed."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 3)

        def forward(self, i):
            return self.head(self.embed(i))

    embedding = peft.get_peft_model(Tokens(), peft.LoraConfig(r=2, target_modules=["embed", "head"]))
    with pytest.raises(ValueError, match=r"^from_peft: layer 'embed' is a PEFT Embedding layer on Embedding; only "
                                         r"LoRA on nn.Linear and nn.Conv2d"):
        lora.from_peft(embedding)
    attention = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8), nn.Linear(4, 3))
    wrapped = peft.get_peft_model(attention, peft.LoraConfig(r=2, target_modules=["out_proj", "linear1"]))
    with pytest.raises(ValueError, match=r"^from_peft: layer '0.self_attn.out_proj': it is the out_proj of an "
                                         r"nn.MultiheadAttention"):
        lora.from_peft(wrapped)
    two = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"]))
    two.add_adapter("other", peft.LoraConfig(r=2, target_modules=["3"]))
    with pytest.raises(ValueError, match=r"^from_peft: layer '3' needs exactly one active LoRA adapter that it "
                                         r"holds, got active \['default'\], held \['other'\]"):
        lora.from_peft(two)


@pytest.mark.parametrize("build, target", [(mlp, "1"), (cnn, "features.0")])
@pytest.mark.parametrize("alpha", [-8, 0])
def test_from_peft_refuses_a_scaling_not_above_zero_by_layer(peft, build, target, alpha):
    """PEFT takes a zero or negative lora_alpha; the refusal came from the adapter's own check as "LoRAConv2d:
    alpha must be a finite number > 0.0, got -8.0", naming neither from_peft nor the layer (and, for rsLoRA,
    an alpha that was not the configured one)."""
    for rslora in (False, True):
        config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=[target], use_rslora=rslora)
        scaling = alpha / (2 if rslora else 4)
        with pytest.raises(ValueError, match=rf"^from_peft: layer '{target}' \(lora_alpha={alpha}, r=4\): its LoRA "
                                             rf"scaling must be a finite number > 0.0, got {scaling}$"):
            lora.from_peft(peft.get_peft_model(build(), config))


def test_missing_peft_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what an environment without peft looks like to import
    with pytest.raises(ImportError, match=r"unlearn-kernels\[peft\]"):
        lora.from_peft(mlp())
    with pytest.raises(ImportError, match=r"unlearn-kernels\[peft\]"):
        lora.to_peft(mlp())


def _as_reference(model):
    """A copy of ``model`` whose LoRALinear layers run the plain expression lora_linear_ref instead of
    the fused op (what PEFT's layer computes)."""
    model = copy.deepcopy(model)
    for adapter in lora.adapter_modules(model).values():
        adapter.forward = lambda x, a=adapter: lora_linear_ref(x, a.base.weight, a.base.bias, a.lora_a, a.lora_b,
                                                               a.scale)
    return model


def _run(model, x, dtype):
    """Output and adapter gradients of ``model``, under autocast to ``dtype`` on x's device (None: without)."""
    model.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    out.float().square().sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_adapters_under_autocast_run_in_the_autocast_dtype(device):
    """A float32 model with LoRA adapters under autocast (bfloat16 on the CPU, float16 on a GPU): the
    adapted layers compute in the autocast dtype like nn.Linear, the output matches the plain LoRA
    expression under the same autocast, and the float32 adapter parameters get float32 gradients
    (computed in the autocast dtype) that match it too; both against the model run in float32."""
    low = AUTOCAST_DTYPE[device.type]
    model = mlp().float().to(device)
    lora.add_adapters(model, "*", rank=3, alpha=6)
    randomize_b(model)
    x = X.float().to(device)
    out, grads = _run(model, x, low)
    plain, plain_grads = _run(_as_reference(model), x, low)
    exact, exact_grads = _run(model, x, None)
    assert out.dtype == plain.dtype == low
    assert_within_rule(out, plain, exact)
    assert set(grads) == set(plain_grads) == set(lora.adapter_parameter_names(model))
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.equal(g, g.to(low).float())
        assert_within_rule(g.to(low), plain_grads[name].to(low), exact_grads[name])


def test_float64_adapters_under_autocast_are_unchanged(device):
    """Autocast leaves float64 alone (nn.Linear stays float64): so does the adapter, bit for bit."""
    model = mlp().to(device)
    lora.add_adapters(model, "*", rank=3)
    randomize_b(model)
    x = X.to(device)
    out, grads = _run(model, x, AUTOCAST_DTYPE[device.type])
    out_off, grads_off = _run(model, x, None)
    assert out.dtype == torch.float64 and torch.equal(out, out_off)
    assert all(torch.equal(grads[n], grads_off[n]) for n in grads)


class _ReadsItsWeight(nn.Module):
    """The mixed-precision idiom: the forward casts its inputs to the first layer's weight dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.to(self.fc1.weight.dtype))))


class _ComputesWithWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)


def test_an_adapter_gives_its_effective_weight_and_bias():
    """A LoRALinear had no .weight: a model reading self.fc1.weight failed inside cure_newton_lora and rfa
    with a bare AttributeError. Its weight is the effective one (the base weight plus scale B A, or the
    base alone once merged): the base weight alone left a forward computing with it without the adapter."""
    linear, conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3)
    for base, adapter in ((linear, lora.LoRALinear(linear, 2)), (conv, lora.LoRAConv2d(conv, 2))):
        nn.init.normal_(adapter.lora_b)
        assert adapter.bias is base.bias
        torch.testing.assert_close(adapter.weight, base.weight + adapter.delta_weight())
        adapter.merge()
        assert adapter.weight is base.weight
    model = _ComputesWithWeight().double()
    adapter = lora.LoRALinear(model.fc, 2)
    nn.init.normal_(adapter.lora_b)
    model.fc = adapter
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), adapter(x))
    model(x).sum().backward()
    assert adapter.lora_a.grad is not None and adapter.lora_b.grad.abs().sum() > 0
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 16, generator=gen, dtype=torch.float64), torch.randint(0, 5, (90,), generator=gen)
    forget, retain, unseen = LabeledData(x[:10], y[:10]), LabeledData(x[10:70], y[10:70]), LabeledData(x[70:], y[70:])
    torch.manual_seed(0)
    model = _ReadsItsWeight().double().eval()
    for method in (CureNewtonLoRA(rank=2, max_iterations=1), RFA(epochs=1)):
        out = method.unlearn(model, forget, retain, unseen=unseen)
        assert isinstance(out.model.fc1, nn.Linear)


@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_adapter_weights_alone_load_into_a_merged_model(build, x):
    """A state with the adapters' parameters only (``adapter_parameter_names``, ``strict=False``) loaded into a
    merged model: the merged base weight kept the old delta and the forward ignored the loaded A and B (outputs
    1.2 from those of the loaded adapter), and unmerge then subtracted the new delta (the base weight 3.4 off).
    The old adapter is unmerged first now: the loaded one is in effect and the base weight comes back."""
    source = build(seed=3)
    lora.add_adapters(source, "*", rank=2)
    randomize_b(source, seed=4)
    saved = {k: v.clone() for k, v in source.state_dict().items() if k in set(lora.adapter_parameter_names(source))}
    model = build()
    lora.add_adapters(model, "*", rank=2)
    base = {name: a.base.weight.detach().clone() for name, a in lora.adapter_modules(model).items()}
    randomize_b(model)
    lora.merge(model)
    result = model.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    assert not any(a.merged for a in lora.adapter_modules(model).values())
    expected = build()  # the same base weights, with the loaded adapters
    lora.add_adapters(expected, "*", rank=2)
    expected.load_state_dict(saved, strict=False)
    torch.testing.assert_close(model(x), expected(x), rtol=1e-12, atol=1e-12)
    for name, adapter in lora.adapter_modules(model).items():
        torch.testing.assert_close(adapter.base.weight, base[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build, x", [(mlp, X), (cnn, IMAGES)])
def test_a_merged_state_loaded_in_parts_is_merged_once(build, x):
    """A merged model's state split by key (the base layers' entries, then the adapters' with their flag, as an
    alphabetical split of a sharded checkpoint gives) and loaded part by part with strict=False: the flag is
    taken at its word, so the delta the base weight already holds is not added a second time."""
    source = build(seed=3)
    lora.add_adapters(source, "*", rank=2)
    randomize_b(source, seed=4)
    lora.merge(source)
    saved = state(source)
    fresh = build()
    lora.add_adapters(fresh, "*", rank=2)
    base_keys = {k for k in saved if ".base." in k}
    fresh.load_state_dict({k: v for k, v in saved.items() if k in base_keys}, strict=False)
    fresh.load_state_dict({k: v for k, v in saved.items() if k not in base_keys}, strict=False)
    assert all(a.merged for a in lora.adapter_modules(fresh).values())
    torch.testing.assert_close(fresh(x), source(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", [lora.merge, lambda m: lora.unload(m, merge=True),
                                  lambda m: lora.adapter_modules(m)["3"].merge()])
@pytest.mark.parametrize("overflow", [False, True])
def test_merging_a_non_finite_adapter_is_refused_and_changes_nothing(call, overflow):
    """Inf in B: merge wrote it into the base weight (4 entries), and unmerge left NaN there for good. So did a
    finite delta whose sum with the base weight overflows (float16: 60000 + 10000)."""
    model = mlp().half() if overflow else mlp()
    lora.add_adapters(model, "*", rank=2)
    randomize_b(model)
    with torch.no_grad():
        adapter = lora.adapter_modules(model)["3"]
        if overflow:
            adapter.base.weight[0, 0] = 60000.0
            adapter.lora_a.zero_()
            adapter.lora_a[0, 0], adapter.lora_b[0, 0] = 100.0, 100.0  # scale 1: a delta of 10000 there
        else:
            adapter.lora_b[0, 0] = float("inf")
    before = state(model)
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="plus the adapter's scale \\* B A holds NaN or Inf"):
        call(model)
    assert [type(m) for m in model.modules()] == modules
    assert not any(a.merged for a in lora.adapter_modules(model).values())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_peft_model_is_refused_by_name_where_adapters_would_be_added(peft):
    """A PEFT model went through: its lora_A / lora_B Linears (and its base_layer) took adapters of their own, and
    naming the PEFT layer said it "is a Linear; adapters wrap Linear or Conv2d layers" (PEFT's class is Linear too)."""
    peft_model = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"]))
    before = [type(m) for m in peft_model.modules()]
    gen = torch.Generator().manual_seed(0)
    data = LabeledData(torch.randn(40, 12, generator=gen, dtype=torch.float64), torch.arange(40) % 5)
    forget, retain = data.subset(torch.arange(4)), data.subset(torch.arange(4, 40))
    for call in (lambda: lora.add_adapters(peft_model, "*"),
                 lambda: lora.add_adapters(peft_model, "base_model.model.1"),
                 lambda: CureNewtonLoRA().unlearn(peft_model, forget, retain)):
        with pytest.raises(ValueError, match="the model holds PEFT modules .* convert it with "
                                             "unlearn_kernels.lora.from_peft first"):
            call()
    assert [type(m) for m in peft_model.modules()] == before


@pytest.mark.parametrize("helper", ["merge", "unmerge", "unload", "adapter_modules", "adapter_parameter_names",
                                    "adaptable_layers", "to_peft"])
def test_the_model_level_helpers_refuse_a_peft_model_by_name(peft, helper):
    """They saw only this package's adapters: merge, unmerge and unload did nothing to a PEFT model (unload returned
    it with its LoRA layers), adapter_modules and adapter_parameter_names found none, adaptable_layers offered PEFT's
    inner base_layer / lora_A / lora_B Linears as targets."""
    peft_model = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    modules = [type(m) for m in peft_model.modules()]
    for model, where in ((peft_model, "'\\(the model\\)' is PEFT's PeftModel"),
                         (peft_model.get_base_model(), "'1' is PEFT's Linear")):
        with pytest.raises(ValueError, match=f"^{helper}: the model holds PEFT modules \\({where}\\): convert it with "
                                             "unlearn_kernels.lora.from_peft first"):
            getattr(lora, helper)(model)
    assert [type(m) for m in peft_model.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items())


def test_from_peft_keeps_the_adapters_requires_grad_flags(peft):
    peft_model = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"]))
    for p in peft_model.parameters():
        p.requires_grad_(False)  # as PeftModel.from_pretrained leaves an inference model
    ours = lora.from_peft(peft_model)
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = lora.from_peft(peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["1"])))
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {"1.lora_a", "1.lora_b"}


def test_an_unfrozen_base_gets_its_exact_gradient_or_is_refused():
    """A base given back to training: where a plain layer runs it (the conv adapter's two convolutions, a merged
    adapter's base alone) its gradient is the exact one of the same model written without adapters; the fused op
    of an unmerged LoRALinear, which gives it none, refuses it."""
    model = cnn()
    lora.add_adapters(model, ["features.0", "head"], rank=2)
    randomize_b(model)
    model.requires_grad_(True)
    with pytest.raises(ValueError, match=r"lora_linear: weight requires grad"):
        model(IMAGES)
    lora.adapter_modules(model)["head"].merge()
    model(IMAGES).square().sum().backward()
    plain = lora.unload(copy.deepcopy(model), merge=True)
    plain.zero_grad()
    plain(IMAGES).square().sum().backward()
    for name in ("features.0", "head"):
        base = lora.adapter_modules(model)[name].base
        torch.testing.assert_close(base.weight.grad, plain.get_submodule(name).weight.grad, rtol=1e-12, atol=1e-12)


def test_merge_and_unload_work_on_meta_models():
    """A model on the meta device (shapes only, e.g. to plan memory) merges and unloads as before the merge
    check, which reads values a meta tensor does not hold."""
    model = mlp().to("meta")
    lora.add_adapters(model, "*", rank=2)
    lora.merge(model)
    assert all(a.merged for a in lora.adapter_modules(model).values())
    lora.unload(model)
    assert not lora.adapter_modules(model) and model[1].weight.is_meta


def test_a_pattern_that_matches_only_adapted_layers_says_so():
    model = mlp()
    lora.add_adapters(model, "1", rank=2)
    with pytest.raises(ValueError, match=r"pattern '1\*' matches no layer without an adapter: \['1'\] already "):
        lora.add_adapters(model, "1*")


def test_an_adapter_reads_through_its_base_layers_settings():
    """A forward that reads a layer's settings (``self.fc.in_features``) ran on the model and failed with an
    AttributeError once the layer was adapted (cure_newton_lora got through its checks and failed mid-run);
    PEFT's layers read them through too."""
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(6, 8), nn.Conv2d(2, 3, (3, 2), stride=2, padding=1)

        def forward(self, x):
            h = self.conv(x.reshape(-1, self.conv.in_channels, 6, 6)).flatten(1)[:, :self.fc.in_features]
            return self.fc(h)

    torch.manual_seed(0)
    model, x = Reads().eval(), torch.randn(5, 72)
    expected = model(x)
    lora.add_adapters(model, ["fc", "conv"], rank=2)
    assert torch.equal(model(x), expected)
    fc, conv = model.fc, model.conv
    assert (fc.in_features, fc.out_features) == (6, 8)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (2, 3, (3, 2), (2, 2),
                                                                                                   (1, 1))
    with pytest.raises(AttributeError, match="no attribute 'weight_norm'"):
        fc.weight_norm
    restored = copy.deepcopy(model)
    assert restored.fc.in_features == 6 and torch.equal(restored(x), expected)


def test_a_numpy_rank_gives_a_python_scale():
    """alpha / rank used the rank as given: a numpy rank made the scale a numpy float (into diagnostics)."""
    adapter = lora.LoRALinear(nn.Linear(3, 2), np.int64(2), alpha=3.0)
    assert type(adapter.rank) is int and type(adapter.scale) is float and adapter.scale == 1.5
