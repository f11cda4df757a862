"""Readers for datasets kept on local disk in their standard distribution formats.

Nothing here downloads anything: MNIST and Fashion-MNIST are read from IDX files
(``train-images-idx3-ubyte`` etc., gzipped or not), CIFAR-10/100 from the python pickle batches
(``cifar-10-batches-py/data_batch_1..5``, ``test_batch``; ``cifar-100-python/train``, ``test``);
all the files of a dataset from one folder.
Every reader returns raw numpy arrays (uint8 images, int64 labels); scaling, standardisation and
splitting happen in :mod:`unlearn_kernels.data.datasets`.
"""
from __future__ import annotations

import gzip
import math
import pickle
import reprlib
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The first two bytes of every gzip stream (an IDX file starts with two zero bytes).
_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The only globals a CIFAR batch needs: numpy array reconstruction (old and new module paths)
# and the bytes helpers that protocol-2 pickles written by Python 3 use (bytes() for an empty value,
# such as an empty array's buffer). Anything else is refused, so a stray pickle cannot run code
# while being "loaded as data".
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("__builtin__", "bytes"),
}

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Folder that torchvision uses under its root, also searched so that an existing download works.
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

# What to get for each dataset: its standard distribution (nothing is downloaded here)
_DISTRIBUTIONS = {
    "mnist": "the four MNIST IDX files (gzipped or not)",
    "fashion_mnist": "the four Fashion-MNIST IDX files (gzipped or not)",
    "cifar10": "the CIFAR-10 python version (cifar-10-python.tar.gz, extracted)",
    "cifar100": "the CIFAR-100 python version (cifar-100-python.tar.gz, extracted)",
}

_CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
    },
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file, plain or gzipped, into a native-endian array.

    A file is read as gzip when its name ends in ``.gz`` (then it must be gzip) or when it starts
    with gzip's magic bytes (a download saved without its ``.gz``).

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32, then the values in C order, big-endian.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if path.suffix == ".gz" or raw[:2] == _GZIP_MAGIC:  # by content too: a gzipped copy may lack .gz
        try:
            raw = gzip.decompress(raw)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # not gzip, or cut short
            raise ValueError(f"{path}: not a readable gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize  # np.prod would wrap around in int64 on a forged header
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header promises shape {shape} ({expected} bytes) but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _RefusedGlobal(pickle.UnpicklingError, ValueError):
    """A pickle that names a global outside ``_SAFE_GLOBALS`` (a ValueError too: bad input, as every other
    file that is no CIFAR batch)."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise _RefusedGlobal(f"refusing to load {module}.{name}: "
                                 "a CIFAR batch only holds numpy arrays, lists and bytes")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> dict[bytes, Any]:
    """Load one CIFAR python batch (a pickled dict with bytes keys such as ``b"data"``).

    Only numpy arrays and plain Python values are accepted (see ``_SAFE_GLOBALS``; others raise
    ``pickle.UnpicklingError``, also a ValueError); a file that is no pickle at all raises ValueError.
    Both name the file.
    """
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except OSError:
            raise
        except _RefusedGlobal as err:
            raise _RefusedGlobal(f"{path}: {err}") from None
        except Exception as err:  # foreign or truncated bytes fail in many ways (UnpicklingError, EOFError, ...)
            raise ValueError(f"{path}: not a CIFAR python batch "
                             f"(unpickling failed: {type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def how_to_get_files(name: str) -> str:
    """What an error that did not find the files of dataset ``name`` ("mnist", "fashion_mnist", "cifar10" or
    "cifar100") tells the user to do: nothing is downloaded, so get the standard files and pass their folder."""
    return (f"Nothing is downloaded: get {_DISTRIBUTIONS[name]} and pass the folder holding them as root (--root); "
            "a root that torchvision downloaded the dataset to works too")


def _folder_with_all(name: str, root: Path, folders: list[Path], files: list[str],
                     extensions: tuple[str, ...] = ("",)) -> tuple[Path, list[Path]]:
    """The first of ``folders`` (under ``root``) that holds every one of ``files``, each as ``<file><ext>``
    for one of ``extensions`` (the first found), with the path of each file in the order of ``files``.

    All files come from one folder: a set pieced together from two (an old copy beside a new one)
    could pair one copy's images with another's labels. If no folder holds them all, FileNotFoundError
    in one line names ``root``, the files looked for, what each folder lacks, and how to get the files.
    """
    lacking = []
    for folder in folders:
        paths, missing = [], []
        for base in files:
            found = next((p for p in (folder / (base + ext) for ext in extensions) if p.is_file()), None)
            if found is None:
                missing.append(base)
            else:
                paths.append(found)
        if not missing:
            return folder, paths
        lacking.append(f"{folder} has none" if len(missing) == len(files) else f"{folder} lacks {', '.join(missing)}")
    forms = f" (each also with {' or '.join(e for e in extensions if e)})" if len(extensions) > 1 else ""
    raise FileNotFoundError(f"{name}: dataset files not found in root {root}: looked for {', '.join(files)}{forms}, "
                            f"all in one folder: {'; '.join(lacking)}. {how_to_get_files(name)}")


def load_mnist_files(root: str | Path, name: str = "mnist") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read MNIST or Fashion-MNIST (``name`` "mnist" or "fashion_mnist") from ``root``.

    The four files are read from the first of ``root`` and torchvision's ``root/MNIST/raw``
    (``root/FashionMNIST/raw``) that holds all of them, each as ``<file>`` or ``<file>.gz``.
    Returns ``(x_train, y_train, x_test, y_test)``: uint8 images (N, 28, 28) and int64 labels.
    """
    root = Path(root)
    _, paths = _folder_with_all(name, root, [root, root / _TORCHVISION_DIRS[name] / "raw"],
                                list(_MNIST_FILES.values()), ("", ".gz"))
    arrays = {key: read_idx(path) for key, path in zip(_MNIST_FILES, paths)}
    files = dict(zip(_MNIST_FILES, paths))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        # the files named: with root and torchvision's raw folder both present, which were read is not obvious
        read = f"({files[f'{split}_images']}, {files[f'{split}_labels']})"
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: {split} images {images.shape} and labels {labels.shape} do not match {read}")
        if not len(labels):
            raise ValueError(f"{name}: the {split} files hold no sample {read}")
        # a cast would silently truncate float labels, and only uint8 images are scaled right (by 1/255)
        if images.dtype != np.uint8 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: expected uint8 {split} images and integer labels, got {images.dtype} "
                             f"and {labels.dtype} {read}")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ValueError(f"{name}: train images are {arrays['train_images'].shape[1:]} but test images "
                         f"{arrays['test_images'].shape[1:]}")
    return (arrays["train_images"], arrays["train_labels"].astype(np.int64),
            arrays["test_images"], arrays["test_labels"].astype(np.int64))


def load_cifar_files(
    root: str | Path, name: str = "cifar10"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """Read CIFAR-10 or CIFAR-100 (``name`` "cifar10" or "cifar100", fine labels) from ``root``.

    The batches are looked up in ``root/cifar-10-batches-py`` (``root/cifar-100-python``) or in
    ``root`` itself. Returns ``(x_train, y_train, x_test, y_test, class_names)``: uint8 images
    (N, 3, 32, 32), int64 labels, and the class names from the meta file (``None`` without one).
    """
    layout = _CIFAR_LAYOUT[name]
    root = Path(root)
    folder, _ = _folder_with_all(name, root, [root / layout["folder"], root], layout["train"] + layout["test"])

    def read(batches: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for b in batches:
            batch = read_cifar_batch(folder / b)
            if b"data" not in batch or layout["label_key"] not in batch:  # (bytes and str keys do not compare)
                raise ValueError(f"{folder / b}: expected keys b'data' and {layout['label_key']!r}, "
                                 f"found {sorted(batch, key=repr)}")
            try:
                x, y = np.asarray(batch[b"data"]), np.asarray(batch[layout["label_key"]])
            except ValueError as err:  # ragged lists
                raise ValueError(f"{folder / b}: data and labels must be arrays ({err})") from None
            # a cast would silently wrap or truncate other values (floats in [0, 1] become 0); an empty
            # label list has no type of its own (numpy makes it float64)
            if x.dtype != np.uint8 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
                raise ValueError(f"{folder / b}: expected uint8 data and integer labels, got {x.dtype} and {y.dtype}")
            # uint64 only: the int64 cast would wrap these, and the range check report them negative
            if y.size and y.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{folder / b}: labels must be class ids, found {y.max()}, beyond the int64 range")
            y = y.astype(np.int64)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
                raise ValueError(f"{folder / b}: data {x.shape} and labels {y.shape} are not (N, 3072) and (N,)")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows hold the R, G, B planes one after another
            ys.append(y)
        if not sum(len(y) for y in ys):
            raise ValueError(f"{name}: the batches {batches} in {folder} hold no sample")
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = read(layout["train"])
    x_test, y_test = read(layout["test"])
    names = None
    meta = folder / layout["meta"]
    if meta.is_file():
        raw_names = read_cifar_batch(meta).get(layout["names_key"])
        if raw_names is not None:
            names = _class_names(meta, raw_names)
    return x_train, y_train, x_test, y_test, names


def _class_names(path: Path, raw: Any) -> list[str]:
    """The class names of a meta file: a sequence of bytes (UTF-8) or str, else ValueError naming it."""
    # a str is a sequence too: its characters are no class names
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence | np.ndarray) or not all(
            isinstance(n, (str, bytes)) for n in raw):
        raise ValueError(f"{path}: class names must be a list of strings, got {reprlib.repr(raw)}")
    try:
        return [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: class names must be UTF-8 text ({err})") from None
