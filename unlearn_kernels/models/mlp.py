"""A multi-layer perceptron built as a flat ``nn.Sequential``.

The fused HVP kernels recognise Linear + elementwise-activation chains by walking the children of
an ``nn.Sequential``; keeping the MLP flat (Flatten, Linear, activation, Linear, ...) lets them.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..checks import check_choice, check_int

#: activation name -> module class (elementwise activations the fused kernels understand)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> activation] * len(hidden) -> Linear``.

    Args:
        in_features: size of one flattened input.
        hidden: widths of the hidden layers (may be empty: a linear model).
        num_classes: number of output logits.
        activation: one of ``ACTIVATIONS`` ("relu", "gelu", "tanh", "sigmoid").
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (128,), num_classes: int = 10, activation: str = "relu"
    ) -> None:
        check_choice("MLP: activation", activation, sorted(ACTIVATIONS))
        widths = [check_int("MLP: in_features", in_features)]
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):  # an int: "not iterable"
            raise ValueError(f"MLP: hidden must be a sequence of layer widths, e.g. (128,), got {hidden!r}")
        widths += [check_int(f"MLP: hidden[{i}]", width) for i, width in enumerate(hidden)]
        num_classes = check_int("MLP: num_classes", num_classes)
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(*layers)
