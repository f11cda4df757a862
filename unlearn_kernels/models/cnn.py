"""A small convolutional network for tiny images (8x8 digits up to 32x32 CIFAR)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from ..checks import check_int


class SmallCNN(nn.Sequential):
    """``[Conv3x3 -> ReLU -> MaxPool2] * len(channels) -> global average pool -> Linear``.

    No batch normalisation, so that the model is a smooth function of its weights in train and eval
    mode alike (what the second-order methods assume). Global average pooling makes the head
    independent of the image size; each block halves the resolution (floored at 1 pixel). A plain
    ``nn.Sequential`` (modules ``features``, ``pool``, ``flatten``, ``head``), so that
    ``hessian_operator(path="auto")`` takes its fused convolutional path.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        channels: output channels of each conv block (2-3 blocks is the intended size).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64)) -> None:
        in_channels = check_int("SmallCNN: in_channels", in_channels)
        num_classes = check_int("SmallCNN: num_classes", num_classes)
        if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__"):  # an int: "not iterable"
            raise ValueError(f"SmallCNN: channels must be a sequence of block widths, e.g. (16, 32), got {channels!r}")
        channels = [check_int(f"SmallCNN: channels[{i}]", width) for i, width in enumerate(channels)]
        if not channels:
            raise ValueError("SmallCNN: channels must name at least one block, got ()")
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip([in_channels, *channels[:-1]], channels):
            # ceil_mode keeps a 1-pixel map alive instead of shrinking it to zero
            blocks += [nn.Conv2d(fan_in, fan_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        super().__init__(OrderedDict(features=nn.Sequential(*blocks), pool=nn.AdaptiveAvgPool2d(1),
                                     flatten=nn.Flatten(), head=nn.Linear(channels[-1], num_classes)))
