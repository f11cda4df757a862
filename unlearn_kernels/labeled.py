"""The one in-memory data type the library passes around: inputs and integer labels.

It belongs to the foundation layer (with the training recipe and checkpoints): curvature operators,
methods, the data layer and the evaluation all speak it, so it imports nothing from the package."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, TensorDataset


@dataclass(frozen=True)
class LabeledData:
    """Inputs ``x`` (N, ...) and int64 labels ``y`` (N,), on one device.

    Second-order methods need the whole set as tensors; first-order ones iterate
    :meth:`loader`. ``subset`` and ``to`` return new objects (never views that alias writes).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"LabeledData: {name} must be a torch.Tensor, got {type(value).__name__} "
                                f"(torch.as_tensor converts numpy arrays)")
        if self.x.dim() == 0:
            raise ValueError("LabeledData: x must have a batch dimension (N, ...), got a 0-d tensor")
        if self.y.dim() != 1 or self.y.dtype != torch.long:
            raise TypeError(f"LabeledData: y must be a 1-D int64 tensor, got {self.y.dtype} of shape "
                            f"{tuple(self.y.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"LabeledData: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")
        if self.x.device != self.y.device:
            raise ValueError(f"LabeledData: x is on {self.x.device} but y on {self.y.device}")

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of ``x`` and ``y``."""
        return self.x.device

    def subset(self, index: torch.Tensor) -> "LabeledData":
        """Rows ``index`` (int64 indices or a boolean mask), copied."""
        index = torch.as_tensor(index, device=self.x.device)
        return LabeledData(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> "LabeledData":
        """The set on ``device`` (this object itself is unchanged)."""
        return LabeledData(self.x.to(device), self.y.to(device))

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
               join_last_row: bool = False) -> DataLoader:
        """A DataLoader over (x, y) batches; shuffling is seeded (reproducible).

        With ``join_last_row`` a last batch of one row joins the batch before it (one batch of
        ``batch_size + 1`` rows; the rows and their order are the same): a batch-norm layer in
        training mode, or in eval mode without running statistics, refuses a batch of one row (see
        :func:`~unlearn_kernels.training.join_last_row`, which decides when). Without such a batch
        the loader is the plain one.
        """
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        dataset = TensorDataset(self.x, self.y)
        if join_last_row and not drop_last and len(self) > batch_size and len(self) % batch_size == 1:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            # the generator here too: the loader draws its base seed from it first, as the plain one does
            return DataLoader(dataset, batch_sampler=_JoinedLastRow(sampler, batch_size), generator=generator)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)


class _JoinedLastRow(Sampler[list[int]]):
    """The batches of ``BatchSampler(sampler, batch_size)`` with the last one, a single index, joined to
    the one before it."""

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)

    def __len__(self) -> int:
        return len(self.batches) - 1

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batches)
        yield from batches[:-2]
        yield batches[-2] + batches[-1]


def wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """For each label a different class, uniform over the other ``num_classes - 1``: a shift in
    1..C-1 modulo C, drawn from the CPU ``generator`` (one draw per label), on the labels' device.
    Random-label unlearning and the mislabeled protocol both draw their wrong labels here."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + shift) % num_classes
