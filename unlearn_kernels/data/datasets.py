"""Offline datasets as stratified, seeded train / validation / test splits.

Bundled (no files needed): "digits", "breast_cancer", "wine", "iris" (scikit-learn) and "lfw"
(scikit-image's ``lfw_subset``: 100 faces and 100 non-faces). From a local directory ``root`` in
the standard distribution formats (see :mod:`unlearn_kernels.data.local_files`): "mnist",
"fashion_mnist", "cifar10", "cifar100". Nothing is ever downloaded.

Every split is a :class:`LabeledData` with float32 inputs and int64 labels. Images are (N, C, H, W)
scaled to [0, 1]; then images are standardised per channel and tabular data per feature, with the
mean and (population) standard deviation of the train split only, so that no statistic leaks from
validation or test data.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import refuse_empty_path
from ..checks import check_number, check_sklearn_seed
from ..labeled import LabeledData
from .local_files import how_to_get_files, load_cifar_files, load_mnist_files


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset split three ways. ``input_shape`` is the shape of one sample (without N)."""

    name: str
    train: LabeledData
    val: LabeledData
    test: LabeledData
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class _Raw:
    """What one loader returns before splitting: all samples, or train plus the official test set."""

    x: torch.Tensor
    y: np.ndarray
    class_names: tuple[str, ...]
    x_test: torch.Tensor | None = None
    y_test: np.ndarray | None = None


_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# scikit-learn is imported inside the functions that use it: importing it takes seconds, and every
# user of LabeledData imports this package.
def load_digits_all() -> LabeledData:
    """All 1,797 samples of scikit-learn's 8x8 digits as they are bundled: not split, not standardised, repeats
    kept. ``x`` holds the images (N, 1, 8, 8) as float64 pixel values / 16 (the pixels are 0..16, so ``x`` lies
    in [0, 1]), ``y`` the labels 0-9. ``load_dataset("digits")`` splits and standardises these."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return LabeledData(torch.from_numpy(d.images / 16.0).unsqueeze(1), torch.as_tensor(d.target, dtype=torch.long))


def _digits(root: str | Path | None) -> _Raw:
    d = load_digits_all()
    return _Raw(d.x, d.y.numpy(), tuple(str(c) for c in range(10)))


def _tabular(name: str) -> Callable[[str | Path | None], _Raw]:
    def load(root: str | Path | None) -> _Raw:
        from sklearn import datasets

        d = getattr(datasets, f"load_{name}")()
        return _Raw(torch.from_numpy(d.data), d.target, tuple(str(c) for c in d.target_names))

    return load


def _lfw(root: str | Path | None) -> _Raw:
    try:
        from skimage.data import lfw_subset
    except ImportError as err:
        raise ImportError("dataset 'lfw' needs scikit-image (pip install scikit-image), which is not installed") from err
    images = lfw_subset()  # (200, 25, 25) in [0, 1]: the first 100 are faces, the rest are not
    y = np.repeat(np.arange(2), len(images) // 2)
    return _Raw(torch.from_numpy(np.asarray(images, dtype=np.float64)).unsqueeze(1), y, ("face", "non_face"))


def _mnist_like(name: str, class_names: tuple[str, ...]) -> Callable[[str | Path | None], _Raw]:
    def load(root: str | Path | None) -> _Raw:
        x_train, y_train, x_test, y_test = load_mnist_files(_need_root(name, root), name)
        return _Raw(_scaled(x_train).unsqueeze(1), y_train, class_names, _scaled(x_test).unsqueeze(1), y_test)

    return load


def _cifar(name: str, num_classes: int) -> Callable[[str | Path | None], _Raw]:
    def load(root: str | Path | None) -> _Raw:
        x_train, y_train, x_test, y_test, names = load_cifar_files(_need_root(name, root), name)
        if names is None:
            names = _CIFAR10_NAMES if name == "cifar10" else [str(c) for c in range(num_classes)]
        elif len(names) != num_classes:  # class_names must name every class, one each
            raise ValueError(f"{name}: the meta file names {len(names)} classes, not {num_classes}")
        return _Raw(_scaled(x_train), y_train, tuple(names), _scaled(x_test), y_test)

    return load


def _scaled(images: np.ndarray) -> torch.Tensor:
    """uint8 images as float32 in [0, 1] (float32 keeps CIFAR-sized sets affordable)."""
    return torch.from_numpy(images).to(torch.float32).div_(255.0)


def _need_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass root=<directory holding them> (--root on "
                         "the command line); nothing is downloaded")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{name}: root must be a folder path (str or os.PathLike), got {type(root).__name__}")
    path = refuse_empty_path(root, f"{name}: root '' names no folder")
    if not path.is_dir():  # said here: the list of files looked for would not tell
        raise FileNotFoundError(f"{name}: root {path} {'is not a folder' if path.exists() else 'does not exist'}. "
                                f"{how_to_get_files(name)}")
    return path


# name -> (loader, number of classes)
_DATASETS: dict[str, tuple[Callable[[str | Path | None], _Raw], int]] = {
    "digits": (_digits, 10),
    "breast_cancer": (_tabular("breast_cancer"), 2),
    "wine": (_tabular("wine"), 3),
    "iris": (_tabular("iris"), 3),
    "lfw": (_lfw, 2),
    "mnist": (_mnist_like("mnist", tuple(str(c) for c in range(10))), 10),
    "fashion_mnist": (_mnist_like("fashion_mnist", _FASHION_NAMES), 10),
    "cifar10": (_cifar("cifar10", 10), 10),
    "cifar100": (_cifar("cifar100", 100), 100),
}


#: the datasets read from files under ``root`` (the others are bundled and take no ``root``); each
#: ships an official test split, which is its test split
LOCAL_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# the test split's fraction of all samples where one is carved (the bundled datasets)
_DEFAULT_TEST_FRACTION = 0.2


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_DATASETS)


def _holdout(indices: np.ndarray, y: np.ndarray, count: int, seed: int, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` (labels ``y[indices]``; ``pool`` names them in a message) into (kept, ``count``
    held out), stratified, both sorted."""
    from sklearn.model_selection import train_test_split

    classes, sizes = np.unique(y[indices], return_counts=True)
    if (sizes < 2).any():  # said here: scikit-learn's message speaks of its own "groups"
        raise ValueError(f"class(es) {classes[sizes < 2].tolist()} have a single sample in {pool}: a stratified "
                         "split needs at least two of each")
    kept, held = train_test_split(indices, test_size=count, stratify=y[indices], random_state=seed)
    return np.sort(kept), np.sort(held)


def _count(fraction: float, total: int, what: str, classes: int) -> int:
    count = round(fraction * total)
    if count < 1:
        raise ValueError(f"{what}={fraction} of {total} samples is less than one sample")
    if count < classes:  # said here: scikit-learn's message would name its own test_size
        raise ValueError(f"{what}={fraction} of {total} samples gives {count}, fewer than the {classes} classes "
                         "(a stratified split needs one sample of each)")
    return count


def _split_indices(
    y: np.ndarray, seed: int, val_fraction: float, test_fraction: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Stratified (train, val, test) row indices into ``y``; fractions are of ``len(y)``.

    ``test_fraction=None`` carves no test split (the dataset has an official one).
    """
    classes = len(np.unique(y))
    train, test = np.arange(len(y)), None
    val_count = _count(val_fraction, len(y), "val_fraction", classes)
    test_count = 0 if test_fraction is None else _count(test_fraction, len(y), "test_fraction", classes)
    if len(y) - val_count - test_count < classes:
        given = (f"val_fraction={val_fraction} leaves" if test_fraction is None
                 else f"val_fraction={val_fraction} and test_fraction={test_fraction} leave")
        raise ValueError(f"{given} {len(y) - val_count - test_count} of {len(y)} samples to train on, fewer than the "
                         f"{classes} classes")
    if test_fraction is not None:
        train, test = _holdout(train, y, test_count, seed, "the data")
    train, val = _holdout(train, y, val_count, seed, "the data" if test is None else "the rows the test split leaves")
    return train, val, test


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> None:
    """In place: per channel (dim 1 of images) or per feature (tabular), with train statistics."""
    channels = train.shape[1]
    flat = train.reshape(train.shape[0], channels, -1)
    mean = torch.empty(channels, dtype=torch.float64)
    std = torch.empty(channels, dtype=torch.float64)
    for c in range(channels):  # one channel at a time: a float64 copy of all of CIFAR would be 1.2 GB
        std[c], mean[c] = torch.var_mean(flat[:, c].double(), correction=0)
    std = std.sqrt()
    std[std == 0] = 1.0  # a constant feature stays constant (0) instead of dividing by zero
    shape = (1, channels) + (1,) * (train.dim() - 2)
    for t in (train, *others):
        t.sub_(mean.to(t.dtype).view(shape)).div_(std.to(t.dtype).view(shape))


def _row_key(row: np.ndarray, label: np.int64) -> bytes:
    return hashlib.blake2b(row.tobytes() + label.tobytes(), digest_size=16).digest()


def _without_duplicates(name: str, raw: _Raw) -> _Raw:
    """``raw`` with repeated (input, label) rows of its main file kept once (the first): a copy of a
    forgotten sample left in the retain set would keep teaching it (iris has one such pair). Rows of an
    official test file that repeat a row of the main file are dropped too: the model trains (or
    forgets) them, so as test rows they would count as unseen data in the test accuracy and the
    membership attacks' non-members."""
    # a digest per row, not np.unique over an (N, features + 1) float64 matrix: that copy and its sort
    # take 4.7 GB and 16 s on CIFAR-10; rows with the same digest are compared exactly
    x = raw.x.reshape(len(raw.y), -1).numpy()
    labels = np.asarray(raw.y, dtype=np.int64)
    first: dict[bytes, list[int]] = {}  # digest -> the kept rows with it

    def repeats(row: np.ndarray, label: np.int64, kept: list[int]) -> bool:
        return any(labels[j] == label and np.array_equal(x[j], row) for j in kept)

    keep = []
    for i in range(len(labels)):
        row = x[i] + 0  # + 0 turns -0.0 into 0.0: rows equal in value are one row
        earlier = first.setdefault(_row_key(row, labels[i]), [])
        if not repeats(row, labels[i], earlier):
            earlier.append(i)
            keep.append(i)
    if len(keep) < len(labels):
        keep_index = np.asarray(keep)
        raw = replace(raw, x=raw.x[torch.from_numpy(keep_index)], y=raw.y[keep_index])
    if raw.x_test is None:
        return raw
    x_test = raw.x_test.reshape(len(raw.y_test), -1).numpy()
    test_labels = np.asarray(raw.y_test, dtype=np.int64)
    unseen = []
    for i in range(len(test_labels)):
        row = x_test[i] + 0
        if not repeats(row, test_labels[i], first.get(_row_key(row, test_labels[i]), [])):
            unseen.append(i)
    if not unseen:
        raise ValueError(f"{name}: every row of the official test file is a copy of a training row: no test data left")
    if len(unseen) == len(test_labels):
        return raw
    unseen_index = np.asarray(unseen)
    return replace(raw, x_test=raw.x_test[torch.from_numpy(unseen_index)], y_test=raw.y_test[unseen_index])


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float | None = None,
) -> DatasetSplits:
    """Load dataset ``name`` (see :func:`available_datasets`) as stratified, seeded splits.

    Args:
        name: dataset name.
        root: directory holding the files of "mnist", "fashion_mnist", "cifar10", "cifar100"
            (unused by the bundled sets).
        seed: seed of the stratified splits; the same seed gives the same splits.
        val_fraction: size of the validation split as a fraction of all samples (for datasets with
            an official test file: of the official train file, which the validation split comes from).
        test_fraction: size of the test split as a fraction of all samples (None: 0.2), for the
            bundled datasets; ``val_fraction + test_fraction`` must be below 1. The local datasets
            (MNIST, Fashion-MNIST, CIFAR) have an official test file, which is the test split: for
            them test_fraction must be left None.

    Raises:
        ValueError: unknown name, bad fractions, a test_fraction for a dataset with an official test
            split, a seed outside [0, 2**32), ``root`` missing for a local dataset, files not in their
            standard format, or a class with a single sample.
        TypeError: a seed that is not an integer, or a ``root`` that is not a path.
        FileNotFoundError: ``root`` is not a folder, or no folder searched under it holds all of a
            local dataset's files (the message names each folder and the files it lacks).
        ImportError: "lfw" without scikit-image.
    """
    if not isinstance(name, str) or name not in _DATASETS:  # a list would fail as unhashable
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    seed = check_sklearn_seed("load_dataset: seed", seed)
    # the checked value, a float (a one-element tensor is taken, and rounding it failed after the data was read)
    val_fraction = check_number("val_fraction", val_fraction, 0.0, 1.0, strict=True, strict_high=True)
    official_test = name in LOCAL_DATASETS
    if official_test:  # no test split is carved: refused, not ignored, as the caller expects it to matter
        if test_fraction is not None:
            raise ValueError(f"test_fraction={test_fraction!r} does not apply to {name!r}: the dataset has an "
                             "official test split, which is the test split; leave test_fraction unset")
    else:
        test_fraction = _DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        test_fraction = check_number("test_fraction", test_fraction, 0.0, 1.0, strict=True, strict_high=True)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1 to leave train data, got {val_fraction} + "
                             f"{test_fraction}")

    loader, num_classes = _DATASETS[name]
    raw = loader(root)
    for split, labels in (("train", raw.y), ("test", raw.y_test)):
        if labels is not None and labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
            where = f" (files under {root})" if root is not None else ""
            raise ValueError(f"{name}: the {split} labels must lie in [0, {num_classes}), found [{labels.min()}, "
                             f"{labels.max()}]{where}")
    raw = _without_duplicates(name, raw)
    train_idx, val_idx, test_idx = _split_indices(raw.y, seed, val_fraction, test_fraction)
    if official_test:
        x_test, y_test = raw.x_test, raw.y_test
    else:
        x_test, y_test = raw.x[torch.from_numpy(test_idx)], raw.y[test_idx]
    x_train, x_val = raw.x[torch.from_numpy(train_idx)], raw.x[torch.from_numpy(val_idx)]
    _standardize(x_train, x_val, x_test)

    def labeled(x: torch.Tensor, y: np.ndarray) -> LabeledData:
        return LabeledData(x.to(torch.float32).contiguous(), torch.as_tensor(y, dtype=torch.long))

    return DatasetSplits(
        name=name,
        train=labeled(x_train, raw.y[train_idx]),
        val=labeled(x_val, raw.y[val_idx]),
        test=labeled(x_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        class_names=raw.class_names,
    )
