"""Models: shapes, structure, the factory's errors, that each one trains, and that each one supports
the forward-over-reverse Hessian-vector products the curvature layer uses."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from unlearn_kernels.models import ACTIVATIONS, MLP, MODEL_NAMES, ResNet18, SmallCNN, SmallViT, build_model

SMALL_KWARGS = {
    "mlp": {"hidden": (16, 8)},
    "cnn": {"channels": (4, 8)},
    "resnet18": {"width": 2},
    "vit": {"dim": 8, "depth": 1, "heads": 2},
}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_forward_shape(name, shape, rng):
    model = build_model(name, shape, 7, **SMALL_KWARGS[name])
    out = model(torch.randn(5, *shape, generator=rng))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_mlp_accepts_flat_features(rng):
    model = build_model("mlp", (20,), 3, hidden=(6,))
    assert model(torch.randn(4, 20, generator=rng)).shape == (4, 3)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_is_a_flat_sequential_of_linear_and_activation(activation):
    model = MLP(12, hidden=(5, 4), num_classes=3, activation=activation)
    assert type(model).__mro__[1] is nn.Sequential
    kinds = [type(m) for m in model]
    act = ACTIVATIONS[activation]
    assert kinds == [nn.Flatten, nn.Linear, act, nn.Linear, act, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [(12, 5), (5, 4), (4, 3)]


def test_mlp_without_hidden_layers_is_linear():
    assert [type(m) for m in MLP(6, hidden=(), num_classes=2)] == [nn.Flatten, nn.Linear]


def test_resnet18_has_cifar_stem_and_width():
    model = ResNet18(num_classes=10, in_channels=3, width=4)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules()) == 17
    assert model.fc.in_features == 32


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("transformer", (1, 8, 8), 10), "mlp"),
    (lambda: build_model("cnn", (64,), 10), "(C, H, W)"),
    (lambda: build_model("vit", (1, 8, 6), 10), "square"),
    (lambda: build_model("mlp", (0, 4), 10), "positive"),
    (lambda: MLP(0), "MLP: in_features must be an int >= 1, got 0"),
    (lambda: MLP(4, hidden=(8, 2.5)), "MLP: hidden[1] must be an int >= 1, got 2.5"),
    (lambda: MLP(4, hidden=8), "MLP: hidden must be a sequence of layer widths, e.g. (128,), got 8"),
    (lambda: SmallCNN((1, 2), 10), "SmallCNN: in_channels must be an int >= 1, got (1, 2)"),
    (lambda: SmallCNN(1, True), "SmallCNN: num_classes must be an int >= 1, got True"),
    (lambda: SmallCNN(1, 10, channels=(4, "a")), "SmallCNN: channels[1] must be an int >= 1, got 'a'"),
    (lambda: SmallViT(8, 4, 1.5, 10), "SmallViT: in_channels must be an int >= 1, got 1.5"),
    (lambda: MLP(4, activation="swish"), "activation"),
    (lambda: SmallViT(8, 3, 1, 10), "divide"),
    (lambda: SmallViT(8, 4, 1, 10, dim=10, heads=4), "divisible"),
    (lambda: SmallCNN(1, 10, channels=()), "block"),
    (lambda: ResNet18(width=0), "ResNet18: width must be an int >= 1, got 0"),
    # int() read 8.7 features as 8 and "8" as 8 (a model of another size); a bare int: "'int' object is not iterable"
    (lambda: build_model("mlp", (8.7,), 3), "build_model: input_shape[0] must be an int >= 0, got 8.7"),
    (lambda: build_model("cnn", ("1", 8, 8), 3), "build_model: input_shape[0] must be an int >= 0, got '1'"),
    (lambda: build_model("mlp", 64, 3), "build_model: input_shape must be a sequence of sizes"),
    # "'int' object is not iterable", as MLP's hidden gave before it was checked
    (lambda: SmallCNN(1, 3, channels=16), "SmallCNN: channels must be a sequence of block widths, e.g. (16, 32), "
                                          "got 16"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError) as info:
        build_model("nope", (1, 8, 8), 10)
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_vit_reset_parameters_reinitialises_its_tokens():
    torch.manual_seed(0)
    model = SmallViT(8, 4, 1, 10, dim=8, depth=1, heads=2)
    before = model.cls_token.detach().clone(), model.pos_embed.detach().clone()
    model.reset_parameters()
    assert not torch.equal(before[0], model.cls_token) and not torch.equal(before[1], model.pos_embed)
    assert model.pos_embed.shape == (1, 5, 8)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains(name, rng):
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 3, **SMALL_KWARGS[name])
    x = torch.randn(24, 1, 8, 8, generator=rng)
    y = torch.arange(24) % 3
    x[torch.arange(24), 0, y] += 2.0  # a learnable signal: row y of the image lit up
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_over_reverse_hvp_matches_double_backward(name, rng):
    """The curvature layer takes HVPs by torch.func jvp-of-grad: every model must support it (eval mode)."""
    torch.manual_seed(0)
    model = build_model(name, (1, 8, 8), 3, **SMALL_KWARGS[name]).double().eval()
    x = torch.randn(6, 1, 8, 8, generator=rng, dtype=torch.float64)
    y = torch.arange(6) % 3
    params = {k: p.detach() for k, p in model.named_parameters()}
    vector = {k: torch.randn(p.shape, generator=rng, dtype=torch.float64) for k, p in params.items()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    _, hvp = jvp(grad(loss), (params,), (vector,))
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    dot = sum((g * vector[k]).sum() for g, k in zip(grads, leaves))
    expected = torch.autograd.grad(dot, list(leaves.values()))
    for k, e in zip(leaves, expected):
        torch.testing.assert_close(hvp[k], e, rtol=1e-9, atol=1e-10)


def test_the_vit_takes_every_square_image_of_the_datasets():
    """Its default patch of 4 does not divide LFW's 25 pixels: `--dataset lfw --model vit` could not run from the
    command line ("patch_size 4 does not divide image_size 25"), which has no option to set it."""
    for side, patch in ((32, 4), (28, 4), (8, 4), (20, 4), (40, 4), (25, 5), (9, 3), (7, 1)):  # 4 before 5
        model = build_model("vit", (1, side, side), 3)
        assert model.patch_embed.kernel_size == (patch, patch)
        assert model(torch.zeros(2, 1, side, side)).shape == (2, 3)
        assert build_model("vit", (1, side, side), 3, patch_size=1).patch_embed.kernel_size == (1, 1)  # kept


# independent float64 forwards of the architectures the docstrings describe
def _layer_norm(module, t):
    return F.layer_norm(t, module.normalized_shape, module.weight, module.bias, module.eps)


def _attention(module, t, heads):
    batch, tokens, dim = t.shape
    head_dim = dim // heads
    q, k, v = F.linear(t, module.qkv.weight, module.qkv.bias).split(dim, dim=-1)
    q, k, v = (z.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for z in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(batch, tokens, dim), module.proj.weight, module.proj.bias)


def test_vit_forward_is_the_documented_architecture():
    """Patch embedding, class token and positions, pre-norm blocks of multi-head attention (scaled by the head
    width) and a GELU MLP, the class token's logits: written out in float64. Shapes alone let through a scale by
    the model width, a mean over the tokens, post-norm blocks and heads split the wrong way."""
    torch.manual_seed(0)
    model = SmallViT(8, 4, 1, 3, dim=8, depth=2, heads=2).double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = F.conv2d(x, model.patch_embed.weight, model.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(3, -1, -1), t], 1) + model.pos_embed
    for block in model.blocks:
        t = t + _attention(block.attn, _layer_norm(block.norm1, t), 2)
        hidden = F.gelu(F.linear(_layer_norm(block.norm2, t), block.mlp[0].weight, block.mlp[0].bias))
        t = t + F.linear(hidden, block.mlp[2].weight, block.mlp[2].bias)
    expected = F.linear(_layer_norm(model.norm, t)[:, 0], model.head.weight, model.head.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected.detach(), rtol=1e-12, atol=1e-12)


def test_resnet18_forward_is_the_documented_architecture():
    """The CIFAR stem, four stages of two basic blocks (strides 1, 2, 2, 2; projection shortcuts), global average
    pooling: written out in float64 in eval mode, with running statistics and scales that are not the defaults."""
    torch.manual_seed(0)
    model = ResNet18(num_classes=3, in_channels=1, width=2).double()
    for module in model.modules():  # non-trivial running statistics and scales
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    model.eval()

    def bn(b, t):
        return F.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    def block(b, t, stride):
        out = F.relu(bn(b.bn1, F.conv2d(t, b.conv1.weight, stride=stride, padding=1)))
        out = bn(b.bn2, F.conv2d(out, b.conv2.weight, padding=1))
        short = (t if isinstance(b.shortcut, nn.Identity)
                 else bn(b.shortcut[1], F.conv2d(t, b.shortcut[0].weight, stride=stride)))
        return F.relu(out + short)

    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    t = F.relu(bn(model.bn1, F.conv2d(x, model.conv1.weight, padding=1)))
    for stage, stride in zip(model.layers, (1, 2, 2, 2)):
        t = block(stage[1], block(stage[0], t, stride), 1)
    assert t.shape[-2:] == (2, 2)
    expected = F.linear(t.mean(dim=(2, 3)), model.fc.weight, model.fc.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_cnn_blocks_halve_the_resolution_floored_at_one_pixel():
    """Each block halves the resolution, rounding up (ceil-mode pooling): four blocks run on 8x8 digits, and a
    25-pixel LFW image is 13 pixels wide after the first block (floor-mode pooling: 12, and 8x8 fails)."""
    model = build_model("cnn", (1, 8, 8), 10, channels=(4, 4, 4, 4))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    sizes = []
    model = build_model("cnn", (1, 25, 25), 2, channels=(4, 4))
    model.features[2].register_forward_hook(lambda module, inputs, out: sizes.append(tuple(out.shape[-2:])))
    model(torch.zeros(1, 1, 25, 25))
    assert sizes == [(13, 13)]


def test_the_vit_refuses_images_of_another_size():
    """An 11 x 11 image gave exactly the logits of its top-left 8 x 8 crop (the patch convolution leaves out what
    is beyond the grid), a 4 x 16 one was read as another grid, a 16 x 16 one met a bare broadcast error: so a
    method's check of a sample's fit let the first two through. Refused by name now."""
    vit = build_model("vit", (1, 8, 8), 10).eval()
    for shape in ((1, 1, 11, 11), (1, 1, 4, 16), (1, 1, 16, 16), (1, 3, 8, 8), (1, 8, 8)):
        with pytest.raises(ValueError, match=re.escape(f"SmallViT: inputs must be (N, 1, 8, 8) images, the size it "
                                                       f"was built for (its position embedding has one entry per "
                                                       f"patch), got {shape}")):
            vit(torch.randn(shape))
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 10)
