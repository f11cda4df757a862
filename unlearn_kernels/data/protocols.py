"""Forget protocols: which rows of the train split a deletion request removes.

A :class:`ForgetRequest` holds two sorted, disjoint int64 index tensors into the train split: the
forget set D_f and the retain set D_r. The constructors cover the field's standard protocols:

* :func:`random_forget`: a random fraction of the train split, stratified by class by default
  (every class loses its share, within one sample);
* :func:`class_forget`: every sample of one or several classes (evaluate test accuracy on
  :func:`remove_classes` of the test split, since the forgotten classes can no longer be predicted);
* :func:`index_forget`: a user's own list of rows;
* :func:`sequential_forget`: disjoint requests applied one after another, each retain set excluding
  every forget set so far, so the remaining data shrinks;
* :func:`mislabel` and :func:`split_forget`: the mislabeled protocol. A seeded, stratified fraction of
  the train split gets a uniformly drawn *different* label (:class:`LabelCorruption`); the original
  model trains on the corrupted split, and the corrupted rows, with their corrupted labels, are
  forgotten in one request or split into several;
* :func:`sequential_class_forget`: one class per request, in sequence;
* :func:`make_request`: user-given forget and retain sets, validated.

Indices live on the CPU; :meth:`ForgetRequest.apply` moves them to the data's device.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..checks import as_int64, check_bool, check_has_values, check_int, check_number, check_seed
from ..labeled import LabeledData, wrong_labels

IndexLike = torch.Tensor | Sequence[int]


@dataclass(frozen=True, eq=False)
class ForgetRequest:
    """One deletion request: sorted, disjoint, non-empty int64 indices into the train split.

    The forget and retain sets need not cover the whole split: in a sequence of requests the rows
    forgotten earlier belong to neither.
    """

    forget_idx: torch.Tensor
    retain_idx: torch.Tensor
    description: str = ""

    def __post_init__(self) -> None:
        for name in ("forget_idx", "retain_idx"):
            idx = getattr(self, name)
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 1:
                raise TypeError(f"ForgetRequest: {name} must be a 1-D int64 tensor (use make_request to build one from a list)")
            if idx.numel() == 0:
                raise ValueError(f"ForgetRequest: {name} is empty")
            check_has_values(f"ForgetRequest: {name}", idx)
            if idx[0] < 0 or not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"ForgetRequest: {name} must be non-negative, sorted and free of duplicates")
        overlap = self.forget_idx[torch.isin(self.forget_idx, self.retain_idx)]
        if overlap.numel():
            raise ValueError(f"ForgetRequest: forget and retain sets overlap in {overlap.numel()} indices, e.g. {overlap[:5].tolist()}")

    def apply(self, train: LabeledData) -> tuple[LabeledData, LabeledData]:
        """The (forget, retain) subsets of ``train``, the split these indices point into."""
        largest = int(max(self.forget_idx[-1], self.retain_idx[-1]))
        if largest >= len(train):
            raise ValueError(f"ForgetRequest: index {largest} is out of range for a train split of {len(train)} samples")
        return train.subset(self.forget_idx), train.subset(self.retain_idx)


# --------------------------------------------------------------------------- validation helpers
def _as_tensor(values: object, name: str) -> torch.Tensor:
    """``values`` as a CPU tensor, or TypeError naming ``name`` (torch's own message names no argument)."""
    # torch takes no numpy uint64 scalar ("an integer is required") and, in a list, promotes no numpy
    # uint16/32/64 with a Python int: numpy integers of every width and sign go in as the ints they hold
    if isinstance(values, np.integer):
        values = int(values)
    elif isinstance(values, (list, tuple)):
        values = [int(v) if isinstance(v, np.integer) else v for v in values]
    try:
        tensor = torch.as_tensor(values).cpu()
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a str, a LabeledData, an int beyond int64
        if "Overflow" in str(err):  # an integer all the same: say what is wrong with it
            raise ValueError(f"{name} must lie in the int64 range, got {reprlib.repr(values)}") from None
        raise TypeError(f"{name} must be integers, got {reprlib.repr(values)} ({err})") from None
    # uint64 values from 2**63 would wrap to negative ids at the int64 cast every caller makes
    return as_int64(name, tensor) if tensor.dtype == torch.uint64 else tensor


def _labels(labels: IndexLike) -> torch.Tensor:
    labels = _as_tensor(labels, "labels")
    if (labels.dim() != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    labels = labels.long()  # first: torch compares no uint64 tensor
    if bool((labels < 0).any()):
        raise ValueError(f"labels must be non-negative class ids, got {int(labels.min())}")
    return labels


def _seed(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` (an int in [0, 2**63), numpy integers too)."""
    return torch.Generator().manual_seed(check_seed("seed", seed))


def _indices(values: IndexLike, name: str, num_samples: int) -> torch.Tensor:
    """``values`` as sorted int64 indices, rejecting non-integers, empty, out-of-range and duplicates."""
    idx = _as_tensor(values, name)
    if idx.numel() == 0:  # checked first: an empty list converts to a float tensor
        raise ValueError(f"{name} is empty")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"{name} must hold integer indices, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    idx = idx.long()
    bad = idx[(idx < 0) | (idx >= num_samples)]
    if bad.numel():
        raise ValueError(f"{name} has indices out of range [0, {num_samples}): {bad[:5].tolist()}")
    idx = idx.sort().values
    duplicates = idx[1:][idx[1:] == idx[:-1]].unique()
    if duplicates.numel():
        raise ValueError(f"{name} has duplicate indices: {duplicates[:5].tolist()}")
    return idx


def _num_samples(num_samples: int) -> int:
    return check_int("num_samples", num_samples, low=2)  # one row to forget, one to retain


def forget_count(fraction: float, num_samples: int) -> int:
    """The rows a ``fraction`` of ``num_samples`` forgets, ``round(fraction * num_samples)`` (the random and
    mislabeled protocols' count); ValueError where that is no row or every row."""
    fraction = check_number("fraction", fraction, 0.0, 1.0, strict=True, strict_high=True)
    count = round(fraction * num_samples)
    if count == 0:
        raise ValueError(f"fraction={fraction} of {num_samples} samples forgets no sample")
    if count == num_samples:
        raise ValueError(f"fraction={fraction} of {num_samples} samples forgets every sample and retains none")
    return count


def _classes(classes: int | Iterable[int], present: torch.Tensor) -> torch.Tensor:
    """Sorted unique class ids, each of which must occur in ``present``."""
    if classes is None or isinstance(classes, (str, bytes)):  # a str is iterable: "3" would be read as ["3"]
        raise TypeError(f"classes must be integers, got {classes!r}")
    # sets and generators too; an array goes in whole (a 0-d one, np.array(2), cannot be iterated)
    if isinstance(classes, Iterable) and not isinstance(classes, (torch.Tensor, np.ndarray)):
        classes = list(classes)
    asked = _as_tensor(classes, "classes")
    if asked.dim() > 1:  # flattened, [[1, 2]] read as [1, 2]; sequential_class_forget refuses it
        raise TypeError(f"classes must be a class id or a flat sequence of them, got shape {tuple(asked.shape)}")
    asked = asked.reshape(-1)
    if asked.numel() == 0:
        raise ValueError("no class given to forget")
    if asked.is_floating_point() or asked.dtype == torch.bool:
        raise TypeError(f"classes must be integers, got {asked.dtype}")
    asked = asked.long().unique()
    missing = asked[~torch.isin(asked, present)]
    if missing.numel():
        raise ValueError(f"class(es) {missing.tolist()} do not occur in the labels (present: {present.tolist()})")
    return asked


def _complement(forget: torch.Tensor, num_samples: int) -> torch.Tensor:
    keep = torch.ones(num_samples, dtype=torch.bool)
    keep[forget] = False
    return keep.nonzero().squeeze(1)


def _pick(labels: torch.Tensor, pool: torch.Tensor, count: int, generator: torch.Generator, stratified: bool) -> torch.Tensor:
    """``count`` random rows of ``pool`` (sorted), stratified by class if asked.

    Stratified: class c, with n_c of the pool's n rows, gives floor or ceil of count * n_c / n
    (largest remainders first, ties in random order), so every class is within one sample of its share.
    """
    if not stratified:
        return pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
    pool_labels = labels[pool]
    classes, sizes = pool_labels.unique(return_counts=True)
    share = sizes * count  # exact integer arithmetic: quota = share / len(pool)
    take = share // len(pool)
    remainder = share % len(pool)
    shuffled = torch.randperm(len(classes), generator=generator)
    by_remainder = shuffled[torch.argsort(remainder[shuffled], descending=True, stable=True)]
    take[by_remainder[: count - int(take.sum())]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = pool[pool_labels == c]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def _in_sequence(num_samples: int, parts: Sequence[torch.Tensor], descriptions: Sequence[str]) -> list[ForgetRequest]:
    """Requests applied one after another: request k forgets ``parts[k]`` and retains every row that no
    request up to k forgets (rows of later parts included)."""
    remaining = torch.ones(num_samples, dtype=torch.bool)
    requests = []
    for part, description in zip(parts, descriptions):
        remaining[part] = False
        requests.append(ForgetRequest(part, remaining.nonzero().squeeze(1), description))
    return requests


def _describe_fraction(fraction: float, seed: int, stratified: bool) -> str:
    return f"random {fraction:.4g} of train ({'stratified' if stratified else 'not stratified'}, seed {seed})"


# --------------------------------------------------------------------------- protocols
def random_forget(labels: IndexLike, fraction: float, seed: int = 0, stratified: bool = True) -> ForgetRequest:
    """Forget ``round(fraction * N)`` random train rows; stratified keeps each class's share within one sample."""
    labels = _labels(labels)
    count = forget_count(fraction, len(labels))
    stratified = check_bool("stratified", stratified)
    generator = _seed(seed)
    forget = _pick(labels, torch.arange(len(labels)), count, generator, stratified)
    return ForgetRequest(forget, _complement(forget, len(labels)), _describe_fraction(fraction, seed, stratified))


def class_forget(labels: IndexLike, classes: int | Iterable[int]) -> ForgetRequest:
    """Forget every train row of the given class (or classes)."""
    labels = _labels(labels)
    forgotten = _classes(classes, labels.unique())
    mask = torch.isin(labels, forgotten)
    if bool(mask.all()):
        raise ValueError(f"forgetting class(es) {forgotten.tolist()} would leave no sample to retain")
    return ForgetRequest(mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1), f"class(es) {forgotten.tolist()}")


def index_forget(num_samples: int, indices: IndexLike) -> ForgetRequest:
    """Forget the user's train rows ``indices``; every other row is retained."""
    num_samples = _num_samples(num_samples)
    forget = _indices(indices, "indices", num_samples)
    if len(forget) == num_samples:
        raise ValueError(f"indices name all {num_samples} samples: nothing would be retained")
    return ForgetRequest(forget, _complement(forget, num_samples), f"{len(forget)} user-given indices")


def sequential_forget(
    labels: IndexLike, num_requests: int, fraction: float, seed: int = 0, stratified: bool = True
) -> list[ForgetRequest]:
    """``num_requests`` disjoint requests, each forgetting ``round(fraction * N)`` rows of the original N.

    Request k draws from the rows no earlier request forgot (stratified by the classes of those
    remaining rows), and its retain set is what remains after it: the retain sets shrink. With one
    request this is :func:`random_forget` with the same seed.
    """
    labels = _labels(labels)
    num_requests = check_int("num_requests", num_requests)
    count = forget_count(fraction, len(labels))
    if num_requests * count >= len(labels):
        raise ValueError(
            f"{num_requests} requests of {count} samples (fraction={fraction}) would forget {num_requests * count} "
            f"samples, which leaves none of the {len(labels)} to retain"
        )
    stratified = check_bool("stratified", stratified)
    generator = _seed(seed)
    remaining = torch.arange(len(labels))
    parts = []
    for _ in range(num_requests):
        parts.append(_pick(labels, remaining, count, generator, stratified))
        remaining = remaining[~torch.isin(remaining, parts[-1])]
    description = _describe_fraction(fraction, seed, stratified)
    descriptions = [f"request {k + 1}/{num_requests}: {description}" for k in range(num_requests)]
    return _in_sequence(len(labels), parts, descriptions)


def sequential_class_forget(labels: IndexLike, classes: Sequence[int]) -> list[ForgetRequest]:
    """One request per class, in the given order: request k forgets every row of ``classes[k]`` and
    retains the rows of the classes not forgotten yet (and of all other classes)."""
    labels = _labels(labels)
    if not isinstance(classes, Iterable) or isinstance(classes, (str, bytes)):
        raise TypeError(f"classes must be a sequence of class ids, one per request, got {classes!r}")
    order = _as_tensor(classes if isinstance(classes, torch.Tensor) else list(classes), "classes")
    if order.dim() != 1:
        raise TypeError(f"classes must be a flat sequence of class ids, one per request, got shape "
                        f"{tuple(order.shape)}")
    present = labels.unique()
    _classes(order, present)  # integers, each of which occurs
    order = order.tolist()
    if len(set(order)) != len(order):
        raise ValueError(f"sequential class requests need distinct classes, got {order}")
    if len(order) == len(present):
        raise ValueError(f"forgetting every class {order} would leave no sample to retain")
    parts = [(labels == c).nonzero().squeeze(1) for c in order]
    return _in_sequence(len(labels), parts, [f"request {k + 1}/{len(order)}: class {c}" for k, c in enumerate(order)])


@dataclass(frozen=True, eq=False)
class LabelCorruption:
    """The train labels after the mislabeled protocol's corruption (see :func:`mislabel`).

    Attributes:
        labels: the corrupted int64 labels of the whole train split (N,).
        corrupted_idx: the sorted rows whose label was replaced; ``labels`` differs from the true
            label at each of them and nowhere else.
        description: how the corruption was drawn (fraction, seed).
    """

    labels: torch.Tensor
    corrupted_idx: torch.Tensor
    description: str = ""

    def apply(self, train: LabeledData) -> LabeledData:
        """``train`` with the corrupted labels: the split the original model is trained on.

        Raises ValueError if ``train`` is not the split the corruption was drawn from (another size,
        or true labels that disagree with the corruption).
        """
        if len(train) != len(self.labels):
            raise ValueError(f"LabelCorruption: drawn for a train split of {len(self.labels)} samples, "
                             f"got {len(train)}")
        labels = self.labels.to(train.device)
        differs = (train.y != labels).nonzero().squeeze(1).cpu()
        if not torch.equal(differs, self.corrupted_idx):
            raise ValueError("LabelCorruption: the split's labels are not the ones this corruption was drawn from")
        return LabeledData(train.x, labels.clone())


def mislabel(labels: IndexLike, fraction: float, seed: int = 0, stratified: bool = True,
             num_classes: int | None = None) -> LabelCorruption:
    """Give ``round(fraction * N)`` seeded train rows a uniformly drawn different label.

    The rows are picked like :func:`random_forget`'s (stratified by the true class by default); each
    picked row's new label is drawn uniformly from the ``num_classes - 1`` classes other than its
    own. ``num_classes`` defaults to ``max(labels) + 1``. Forget the corrupted rows with
    :func:`split_forget` on ``corrupted_idx`` and the corrupted split (:meth:`LabelCorruption.apply`).
    """
    labels = _labels(labels)
    count = forget_count(fraction, len(labels))
    stratified = check_bool("stratified", stratified)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
        if num_classes == 1:  # said here: check_int would refuse a num_classes=1 the caller never passed
            raise ValueError("the labels hold one class (0), so no different label exists to draw; if the data "
                             "has more classes, pass num_classes (it defaults to max(labels) + 1)")
    num_classes = check_int("num_classes", num_classes, low=2)  # a wrong label needs a second class
    if int(labels.max()) >= num_classes:
        raise ValueError(f"labels hold class {int(labels.max())}, outside num_classes={num_classes}")
    generator = _seed(seed)
    rows = _pick(labels, torch.arange(len(labels)), count, generator, stratified)
    corrupted = labels.clone()
    corrupted[rows] = wrong_labels(labels[rows], num_classes, generator)
    description = (f"mislabeled {fraction:.4g} of train ({'stratified' if stratified else 'not stratified'}, "
                   f"seed {seed}): a uniformly drawn different label")
    return LabelCorruption(corrupted, rows, description)


def split_forget(num_samples: int, indices: IndexLike, num_requests: int = 1, seed: int = 0,
                 description: str = "") -> list[ForgetRequest]:
    """Forget the rows ``indices`` in ``num_requests`` requests applied one after another.

    The rows are shuffled with ``seed`` and cut into ``num_requests`` disjoint parts whose sizes
    differ by at most one. Request k forgets part k; its retain set is every row of the split except
    the parts forgotten so far (the later parts included). With one request this is
    :func:`index_forget`.
    """
    num_samples = _num_samples(num_samples)
    rows = _indices(indices, "indices", num_samples)
    num_requests = check_int("num_requests", num_requests)
    if num_requests > len(rows):
        raise ValueError(f"cannot split {len(rows)} rows into {num_requests} non-empty requests")
    if len(rows) == num_samples:
        raise ValueError(f"indices name all {num_samples} samples: nothing would be retained")
    shuffled = rows[torch.randperm(len(rows), generator=_seed(seed))]
    parts = [part.sort().values for part in torch.tensor_split(shuffled, num_requests)]
    label = description or f"{len(rows)} given rows"
    return _in_sequence(num_samples, parts, [f"request {k + 1}/{num_requests}: part of {label}" if num_requests > 1
                                             else label for k in range(num_requests)])


def make_request(forget_idx: IndexLike, retain_idx: IndexLike, num_samples: int, description: str = "user-given") -> ForgetRequest:
    """Validate user-given forget and retain sets for a train split of ``num_samples`` rows.

    Rejects empty sets, duplicates, indices outside [0, num_samples) and overlap between the sets.
    """
    num_samples = _num_samples(num_samples)
    return ForgetRequest(_indices(forget_idx, "forget_idx", num_samples), _indices(retain_idx, "retain_idx", num_samples), description)


def remove_classes(data: LabeledData, classes: int | Iterable[int]) -> LabeledData:
    """``data`` without the rows of the given classes (test accuracy after class forgetting)."""
    forgotten = _classes(classes, data.y.unique().cpu())
    keep = ~torch.isin(data.y, forgotten.to(data.device))
    if not bool(keep.any()):
        raise ValueError(f"removing class(es) {forgotten.tolist()} leaves no sample")
    return data.subset(keep)
