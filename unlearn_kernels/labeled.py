"""The one in-memory data type the library passes around: inputs and integer labels.

It belongs to the foundation layer (with the training recipe and checkpoints): curvature operators,
methods, the data layer and the evaluation all speak it, so it imports nothing from the package but
its argument checks."""
from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, TensorDataset

from .checks import check_bool, check_int, check_tensor, first_beyond_int64


@dataclass(frozen=True)
class LabeledData:
    """Inputs ``x`` (N, ...) and int64 labels ``y`` (N,), on one device.

    Second-order methods need the whole set as tensors; first-order ones iterate
    :meth:`loader`. ``subset`` returns copies (never views that alias writes); ``to`` follows
    torch's rule: on the device the set is on already, the new object holds the same tensors.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("x", "y"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"LabeledData: {name} must be a torch.Tensor, got {type(value).__name__} "
                                f"(torch.as_tensor converts numpy arrays)")
            # a sparse x met "reshape is not implemented for sparse tensors" deep in every method
            check_tensor(f"LabeledData: {name}", value)
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
        """Rows ``index`` (1-D integer indices, negative ones counting from the end, or a boolean mask of
        one entry per row; a tensor, array or list, ``[]`` for no rows), copied.

        Raises:
            TypeError: ``index`` holds neither integers nor bools (floats, a slice, None).
            ValueError: ``index`` is not 1-D, a mask of another length, or an index out of range.
        """
        try:
            index = torch.as_tensor(index, device=self.x.device)
        except (TypeError, RuntimeError, ValueError):  # a slice, None, a str: torch's "Could not infer dtype"
            raise TypeError(f"LabeledData.subset: index must be integer indices or a boolean mask, got "
                            f"{type(index).__name__}") from None
        if index.numel() == 0 and index.dtype != torch.bool:
            index = index.long()  # [] is float32 to torch: no rows, not a bad dtype
        if index.dtype != torch.bool and (index.is_floating_point() or index.is_complex()):
            raise TypeError(f"LabeledData.subset: index must be integer indices or a boolean mask, got {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"LabeledData.subset: index must be 1-D, got shape {tuple(index.shape)}")
        beyond = first_beyond_int64(index)  # would wrap to a negative in int64: named as given
        if beyond is not None:
            raise ValueError(f"LabeledData.subset: index {beyond} is out of range for {len(self)} rows")
        if index.dtype != torch.bool:
            # int64, as torch indexes with: it reads uint8 values as a mask, refuses int8/int16 and has no
            # min/max for uint16/32/64
            index = index.long()
        n = len(self)
        if index.dtype == torch.bool:
            if index.shape[0] != n:
                raise ValueError(f"LabeledData.subset: a boolean mask needs one entry per row ({n}), got "
                                 f"{index.shape[0]}")
        elif index.numel() and not (-n <= int(index.min()) and int(index.max()) < n):
            bad = int(index.min()) if int(index.min()) < -n else int(index.max())
            raise ValueError(f"LabeledData.subset: index {bad} is out of range for {n} rows")
        return LabeledData(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> "LabeledData":
        """The set on ``device`` (this object itself is unchanged; any device torch takes, the meta
        device too: the methods name a set there, and the devices the sets are on, themselves). As with
        ``Tensor.to``, on the device the set is on already the new object shares its tensors (the methods
        move their sets this way and never write into them): ``subset`` copies."""
        return LabeledData(self.x.to(device), self.y.to(device))

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
               join_last_row: bool = False) -> DataLoader:
        """A DataLoader over (x, y) batches; shuffling is seeded (reproducible).

        With ``join_last_row`` a last batch of one row joins the batch before it (one batch of
        ``batch_size + 1`` rows; the rows and their order are the same): a batch-norm layer in
        training mode, or in eval mode without running statistics, refuses a batch of one row (see
        :func:`~unlearn_kernels.training.join_last_row`, which decides when). Without such a batch
        the loader is the plain one.

        Raises:
            ValueError: ``batch_size`` is not an int >= 1.
            TypeError: ``seed`` is not an int, or a flag is not a bool.
        """
        owner = "LabeledData.loader"
        batch_size = check_int(f"{owner}: batch_size", batch_size)
        shuffle, drop_last, join_last_row = (check_bool(f"{owner}: {name}", value) for name, value in
                                             (("shuffle", shuffle), ("drop_last", drop_last),
                                              ("join_last_row", join_last_row)))
        # the type only: the range is torch's (seed + epoch may pass 2**63 - 1, which manual_seed takes)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{owner}: seed must be an int, got {type(seed).__name__}")
        generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
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
