"""Models used by the experiments: plain ``nn.Module`` classes and a factory by name."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..checks import check_choice, check_int
from .cnn import SmallCNN
from .mlp import ACTIVATIONS, MLP
from .resnet import ResNet18
from .vit import SmallViT


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"build_model: {name!r} needs an image input shape (C, H, W), got {input_shape}")
    return input_shape  # type: ignore[return-value]


def _mlp(input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes=num_classes, **kwargs)


def _cnn(input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    return SmallCNN(_image_shape("cnn", input_shape)[0], num_classes, **kwargs)


def _resnet18(input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    return ResNet18(num_classes, in_channels=_image_shape("resnet18", input_shape)[0], **kwargs)


def _vit(input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> nn.Module:
    channels, height, width = _image_shape("vit", input_shape)
    if height != width:
        raise ValueError(f"build_model: 'vit' needs square images, got {height}x{width}")
    # 4, else the first of 5, 3, 2, 1 that divides the side (LFW's 25: 5 x 5 patches of 5)
    kwargs.setdefault("patch_size", next(p for p in (4, 5, 3, 2, 1) if height % p == 0))
    return SmallViT(height, in_channels=channels, num_classes=num_classes, **kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn, "resnet18": _resnet18, "vit": _vit}

#: the names :func:`build_model` accepts
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` for inputs of shape ``input_shape`` (one sample, no batch dimension).

    Args:
        name: one of :data:`MODEL_NAMES` ("mlp", "cnn", "resnet18", "vit").
        input_shape: (features,) or (C, H, W) for "mlp"; (C, H, W) for the others.
        num_classes: number of output logits.
        **kwargs: the model's own hyper-parameters (e.g. ``hidden=(64,)`` for "mlp", ``width=8`` for
            "resnet18", ``dim``/``depth``/``heads``/``patch_size`` (default 4, else the first of 5,
            3, 2, 1 that divides the image side) for "vit").
    """
    check_choice("build_model: name", name, MODEL_NAMES)
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):  # an int: "not iterable"
        raise ValueError(f"build_model: input_shape must be a sequence of sizes, e.g. (64,) or (1, 28, 28), got "
                         f"{input_shape!r}")
    # an int each: int() truncated 8.7 features to 8 and read "8" as 8 (a model of another size, silently)
    shape = tuple(check_int(f"build_model: input_shape[{i}]", s, low=0) for i, s in enumerate(input_shape))
    if not shape or min(shape) < 1:
        raise ValueError(f"build_model: input_shape must be non-empty and positive, got {tuple(input_shape)}")
    return _BUILDERS[name](shape, num_classes, **kwargs)


__all__ = ["ACTIVATIONS", "MLP", "MODEL_NAMES", "ResNet18", "SmallCNN", "SmallViT", "build_model"]
