"""Datasets: bundled sets, local-file readers (on files written here in the standard formats), splits."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from pathlike import EmptyPath
from sklearn import datasets as skdatasets

from unlearn_kernels.data import (
    LabeledData,
    available_datasets,
    load_dataset,
    load_digits_all,
    read_cifar_batch,
    read_idx,
)
from unlearn_kernels.data.datasets import LOCAL_DATASETS, _Raw, _split_indices, _without_duplicates
from unlearn_kernels.data.local_files import load_cifar_files, load_mnist_files


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Independent float64 copy of a bundled set: inputs (images in [0, 1]), labels, sample shape."""
    if name == "digits":
        d = skdatasets.load_digits()
        return d.images[:, None] / 16.0, d.target, (1, 8, 8)
    if name == "lfw":
        from skimage.data import lfw_subset

        return lfw_subset()[:, None].astype(np.float64), np.array([0] * 100 + [1] * 100), (1, 25, 25)
    d = getattr(skdatasets, f"load_{name}")()
    # a repeated (input, label) row is kept once, at its first position
    seen: set[tuple] = set()
    keep = [i for i, row in enumerate(zip(map(tuple, d.data), d.target)) if not (row in seen or seen.add(row))]
    return d.data[keep], d.target[keep], (d.data.shape[1],)


def _standardized(raw: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """float64 reference: per channel (images) or per feature, with train mean and population std."""
    axes = (0, 2, 3) if raw.ndim == 4 else (0,)
    mean = raw[train_rows].mean(axis=axes, keepdims=True)
    std = raw[train_rows].std(axis=axes, keepdims=True)
    return (raw - mean) / np.where(std == 0, 1.0, std)


def _check_stratified(y: np.ndarray, splits: list[np.ndarray], bound: float) -> None:
    for idx in splits:
        for c in np.unique(y):
            expected = len(idx) * np.sum(y == c) / len(y)
            assert abs(np.sum(y[idx] == c) - expected) <= bound, (c, len(idx))


BUNDLED = ["digits", "breast_cancer", "wine", "iris", "lfw"]
CLASSES = {"digits": 10, "breast_cancer": 2, "wine": 3, "iris": 3, "lfw": 2}


def test_load_digits_all_is_every_digit_scaled_and_unsplit() -> None:
    """The whole digits set, as the benchmarks take it: every sample (repeats too), pixels / 16, float64, in
    scikit-learn's order; load_dataset("digits") splits and standardises these same images."""
    raw, y, shape = _raw("digits")
    digits = load_digits_all()
    assert isinstance(digits, LabeledData) and digits.x.dtype == torch.float64 and digits.y.dtype == torch.int64
    assert digits.x.shape == (1797, *shape)
    assert torch.equal(digits.x, torch.from_numpy(raw)) and torch.equal(digits.y, torch.from_numpy(y).long())
    assert 0.0 <= digits.x.min() and digits.x.max() == 1.0
    splits = load_dataset("digits", seed=3, val_fraction=0.15, test_fraction=0.25)
    train_idx, _, _ = _split_indices(y, 3, 0.15, 0.25)
    torch.testing.assert_close(splits.train.x.double(), torch.from_numpy(_standardized(raw, train_idx)[train_idx]),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_dataset_matches_float64_reference(name: str) -> None:
    if name == "lfw":
        pytest.importorskip("skimage")
    raw, y, shape = _raw(name)
    splits = load_dataset(name, seed=3, val_fraction=0.15, test_fraction=0.25)
    assert splits.name == name and splits.input_shape == shape
    assert splits.num_classes == CLASSES[name] == len(splits.class_names)
    n = len(y)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (n - round(0.15 * n) - round(0.25 * n), round(0.15 * n), round(0.25 * n))

    train_idx, val_idx, test_idx = _split_indices(y, 3, 0.15, 0.25)
    reference = _standardized(raw, train_idx)
    for part, idx in ((splits.train, train_idx), (splits.val, val_idx), (splits.test, test_idx)):
        assert isinstance(part, LabeledData)
        assert part.x.dtype == torch.float32 and part.y.dtype == torch.int64
        assert part.x.shape == (len(idx), *shape)
        torch.testing.assert_close(part.x.double(), torch.from_numpy(reference[idx]), atol=2e-5, rtol=1e-5)
        assert torch.equal(part.y, torch.from_numpy(y[idx]).long())
    # train statistics are exactly standard; val/test reuse them and so are only close to it
    axes = (0, 2, 3) if len(shape) == 3 else (0,)
    x = splits.train.x.double()
    torch.testing.assert_close(x.mean(dim=axes), torch.zeros(x.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
    std = x.std(dim=axes, correction=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine", "iris"])
def test_split_rows_are_disjoint_and_cover_the_dataset(name: str) -> None:
    raw, y, _ = _raw(name)
    n = len(y)
    train_idx, val_idx, test_idx = _split_indices(y, 0, 0.1, 0.2)
    together = np.concatenate([train_idx, val_idx, test_idx])
    assert len(together) == n and np.array_equal(np.sort(together), np.arange(n))
    # two stages, each within one sample of its own pool, so at most 1 + (val size)/(pool) overall
    _check_stratified(y, [train_idx, val_idx, test_idx], bound=1.5)
    if len(np.unique(raw.reshape(n, -1), axis=0)) == n:  # where all rows differ, the loaded splits share none
        splits = load_dataset(name)
        rows = [set(map(tuple, part.x.reshape(len(part), -1).numpy().round(4))) for part in (splits.train, splits.val, splits.test)]
        assert sum(map(len, rows)) == n and len(rows[0] | rows[1] | rows[2]) == n


def test_seed_reproduces_and_changes_splits() -> None:
    a, b, c = (load_dataset("digits", seed=s) for s in (7, 7, 8))
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x)
        assert torch.equal(getattr(a, part).y, getattr(b, part).y)
    assert not torch.equal(a.test.y, c.test.y)


def test_unknown_dataset_and_bad_fractions_are_rejected() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    assert "imagenet" in str(info.value) and all(n in str(info.value) for n in available_datasets())
    for kwargs in ({"val_fraction": 0.0}, {"test_fraction": 1.0}, {"val_fraction": 0.5, "test_fraction": 0.5}):
        with pytest.raises(ValueError, match="fraction"):
            load_dataset("iris", **kwargs)
    with pytest.raises(ValueError, match="less than one sample"):
        load_dataset("iris", val_fraction=0.001)


def test_fractions_given_as_one_element_tensors_split_as_the_floats() -> None:
    """The checks took a one-element tensor, but the tensor itself was kept: rounding its share of the rows
    failed ("type Tensor doesn't define __round__ method") after the data was read."""
    plain = load_dataset("iris", seed=0, val_fraction=0.2, test_fraction=0.3)
    tensors = load_dataset("iris", seed=0, val_fraction=torch.tensor(0.2, dtype=torch.float64),
                           test_fraction=torch.tensor([0.3], dtype=torch.float64))
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(plain, part).x, getattr(tensors, part).x)


def test_lfw_without_scikit_image_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # makes the import fail
    with pytest.raises(ImportError, match="scikit-image"):
        load_dataset("lfw")


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def _write_idx(path: str, array: np.ndarray) -> None:
    """The IDX format as specified: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    payload = struct.pack(">BBBB", 0, 0, _IDX_CODES[array.dtype.type], array.ndim)
    payload += struct.pack(f">{array.ndim}I", *array.shape) + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("dtype", list(_IDX_CODES))
@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_recovers_every_type(tmp_path, dtype, gzipped: bool) -> None:
    offset = 0 if dtype == np.uint8 else 100  # negative values for the signed and float types
    values = (np.arange(24).reshape(2, 3, 4) * 9 - offset).astype(dtype)
    path = str(tmp_path / ("a.idx.gz" if gzipped else "a.idx"))
    _write_idx(path, values)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and np.array_equal(out, values)


def test_read_idx_rejects_corrupt_files(tmp_path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 9)  # promises 10 bytes, holds 9
    with pytest.raises(ValueError, match="promises"):
        read_idx(short)
    not_gzip = tmp_path / "a.idx.gz"
    not_gzip.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05")  # a plain IDX file named .gz
    with pytest.raises(ValueError, match=r"a\.idx\.gz: not a readable gzip file"):
        read_idx(not_gzip)
    cut = tmp_path / "cut.idx.gz"
    cut.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 1000) + bytes(1000))[:30])
    with pytest.raises(ValueError, match=r"cut\.idx\.gz: not a readable gzip file"):
        read_idx(cut)


def _mnist_files(folder, rng: np.random.Generator, gzipped: bool, n_train: int = 200, n_test: int = 40) -> dict:
    os.makedirs(folder, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for base, array in data.items():
        _write_idx(os.path.join(folder, base + (".gz" if gzipped else "")), array)
    return data


@pytest.mark.parametrize("name,subdir,gzipped", [("mnist", "", False), ("mnist", "MNIST/raw", True), ("fashion_mnist", "", True)])
def test_mnist_from_local_idx_files(tmp_path, name: str, subdir: str, gzipped: bool) -> None:
    data = _mnist_files(tmp_path / subdir, np.random.default_rng(0), gzipped)
    splits = load_dataset(name, root=tmp_path, seed=1, val_fraction=0.1)
    x_train = data["train-images-idx3-ubyte"][:, None] / 255.0
    x_test = data["t10k-images-idx3-ubyte"][:, None] / 255.0
    y_train = data["train-labels-idx1-ubyte"].astype(np.int64)
    train_idx, val_idx, _ = _split_indices(y_train, 1, 0.1, None)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 40)
    _check_stratified(y_train, [train_idx, val_idx], bound=1.0)
    reference = _standardized(np.concatenate([x_train, x_test]), train_idx)
    torch.testing.assert_close(splits.train.x.double(), torch.from_numpy(reference[train_idx]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(splits.val.x.double(), torch.from_numpy(reference[val_idx]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(splits.test.x.double(), torch.from_numpy(reference[200:]), atol=1e-5, rtol=1e-5)
    assert torch.equal(splits.test.y, torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    assert torch.equal(splits.val.y, torch.from_numpy(y_train[val_idx]))
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.class_names[0] == ("T-shirt/top" if name == "fashion_mnist" else "0")


def test_mnist_missing_files_name_the_paths(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "Nothing is downloaded" in message and "train-images-idx3-ubyte, " in message and "also with .gz" in message
    assert "t10k-labels-idx1-ubyte" in message
    with pytest.raises(ValueError, match="root="):
        load_dataset("mnist")


@pytest.mark.parametrize("name, looked_for, folders, files", [
    ("mnist", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
              "(each also with .gz)", ["", "MNIST/raw"], "the four MNIST IDX files (gzipped or not)"),
    ("cifar10", "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch",
     ["cifar-10-batches-py", ""], "the CIFAR-10 python version (cifar-10-python.tar.gz, extracted)"),
])
def test_missing_dataset_files_are_one_line_naming_the_root_the_files_and_how_to_get_them(
        tmp_path, name, looked_for, folders, files) -> None:
    """A root without the files listed every path looked for, one per line (16 lines for MNIST), without
    saying what the files are or where to get them."""
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, root=tmp_path)
    searched = "; ".join(f"{tmp_path / folder if folder else tmp_path} has none" for folder in folders)
    assert str(info.value) == (
        f"{name}: dataset files not found in root {tmp_path}: looked for {looked_for}, all in one folder: {searched}. "
        f"Nothing is downloaded: get {files} and pass the folder holding them as root (--root); a root that "
        "torchvision downloaded the dataset to works too")


# the bound itself (two rows: one row of an eleventh class is refused by the stratified split first)
@pytest.mark.parametrize("bad, rows", [(12, 1), (10, 2)])
def test_labels_outside_the_classes_are_rejected(tmp_path, bad: int, rows: int) -> None:
    data = _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    labels = data["train-labels-idx1-ubyte"].copy()
    labels[:rows] = bad
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), labels)
    # the split and the folder named (with root and torchvision's raw folder both present, which files were read)
    with pytest.raises(ValueError, match=rf"the train labels must lie in \[0, 10\), found \[0, {bad}\] "
                                         rf"\(files under {tmp_path}\)"):
        load_dataset("mnist", root=tmp_path)


def test_images_and_labels_of_different_counts_name_the_files_read(tmp_path) -> None:
    """200 images and 199 labels said "mnist: train images (200, 28, 28) and labels (199,) do not match" without
    the files: with root and torchvision's MNIST/raw both holding files, which pair was read was not said."""
    data = _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), data["train-labels-idx1-ubyte"][:-1])
    with pytest.raises(ValueError, match=r"train images \(200, 28, 28\) and labels \(199,\) do not match \("
                                         + str(tmp_path / "train-images-idx3-ubyte") + ", "):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize("file, array, message", [
    ("train-labels-idx1-ubyte", np.arange(200, dtype=np.float32) % 10 + 0.5,
     "expected uint8 train images and integer labels, got uint8 and float32"),  # was truncated to int
    ("train-images-idx3-ubyte", np.full((200, 28, 28), 0.5, np.float32),
     "expected uint8 train images and integer labels, got float32"),  # was divided by 255 like bytes
    ("t10k-images-idx3-ubyte", np.zeros((40, 14, 14), np.uint8),
     r"train images are \(28, 28\) but test images \(14, 14\)"),
], ids=["float-labels", "float-images", "test-image-size"])
def test_mnist_files_of_another_type_or_shape_are_refused(tmp_path, file: str, array: np.ndarray, message: str) -> None:
    _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    _write_idx(str(tmp_path / file), array)
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist", root=tmp_path)


def test_mnist_files_without_a_sample_are_refused(tmp_path) -> None:
    _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), np.zeros((0, 28, 28), np.uint8))
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match="the test files hold no sample"):  # gave an empty test split
        load_dataset("mnist", root=tmp_path)


def test_read_idx_header_whose_size_overflows_int64_is_refused(tmp_path) -> None:
    forged = tmp_path / "forged"  # 65536**4 elements: numpy's product wrapped to 0 and matched the empty body
    forged.write_bytes(struct.pack(">BBBB4I", 0, 0, 8, 4, *[65536] * 4))
    with pytest.raises(ValueError, match="promises"):
        read_idx(forged)


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.001}, "val_fraction=0.001 of 1797 samples gives 2, fewer than the 10 classes"),
    ({"test_fraction": 0.004}, "test_fraction=0.004 of 1797 samples gives 7, fewer than the 10 classes"),
    ({"val_fraction": 0.5, "test_fraction": 0.499}, "leave 2 of 1797 samples to train on, fewer than the 10 classes"),
])
def test_split_smaller_than_the_class_count_names_the_fraction(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # scikit-learn's message named its own test_size
        load_dataset("digits", **kwargs)


# --------------------------------------------------------------------------- CIFAR python pickles
def _cifar_files(root, name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batches as the official archives hold them (protocol 2, bytes keys, (N, 3072) uint8 rows)."""
    if name == "cifar10":
        folder, train_files, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels"
        meta_name, meta = "batches.meta", {b"label_names": [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]}
    else:
        folder, train_files, label_key = root / "cifar-100-python", ["train"], b"fine_labels"
        meta_name, meta = "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}
    folder.mkdir()
    per_file = 100 // len(train_files)
    x_train = rng.integers(0, 256, (100, 3072), dtype=np.uint8)
    y_train = rng.permutation(np.arange(100) % 5)
    x_test = rng.integers(0, 256, (30, 3072), dtype=np.uint8)
    y_test = np.arange(30) % 5
    batches = [(f, slice(i * per_file, (i + 1) * per_file), x_train, y_train) for i, f in enumerate(train_files)]
    batches.append(("test_batch" if name == "cifar10" else "test", slice(None), x_test, y_test))
    for fname, rows, x, y in batches:
        batch = {b"batch_label": b"batch", b"data": x[rows], label_key: [int(v) for v in y[rows]], b"filenames": [b"f.png"] * len(y[rows])}
        if name == "cifar100":
            batch[b"coarse_labels"] = [0] * len(y[rows])
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_local_pickles(tmp_path, name: str) -> None:
    x_train, y_train, x_test, y_test = _cifar_files(tmp_path, name, np.random.default_rng(1))
    raw = load_cifar_files(tmp_path, name)
    assert np.array_equal(raw[0].reshape(100, 3072), x_train) and np.array_equal(raw[1], y_train)
    assert np.array_equal(raw[2].reshape(30, 3072), x_test) and np.array_equal(raw[3], y_test)
    assert raw[4][1] == ("car" if name == "cifar10" else "c1")

    splits = load_dataset(name, root=tmp_path, seed=2, val_fraction=0.2)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == (10 if name == "cifar10" else 100)
    assert len(splits.class_names) == splits.num_classes
    train_idx, val_idx, _ = _split_indices(y_train, 2, 0.2, None)
    images = np.concatenate([x_train, x_test]).reshape(-1, 3, 32, 32) / 255.0
    reference = _standardized(images, train_idx)
    torch.testing.assert_close(splits.train.x.double(), torch.from_numpy(reference[train_idx]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(splits.val.x.double(), torch.from_numpy(reference[val_idx]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(splits.test.x.double(), torch.from_numpy(reference[100:]), atol=1e-5, rtol=1e-5)
    assert torch.equal(splits.test.y, torch.from_numpy(y_test).long())


def test_cifar_rows_are_red_green_blue_planes(tmp_path) -> None:
    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    batch_path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch = read_cifar_batch(batch_path)
    batch[b"data"][0] = np.repeat(np.array([10, 20, 30], dtype=np.uint8), 1024)
    with open(batch_path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    x_train = load_cifar_files(tmp_path, "cifar10")[0]
    assert (x_train[0, 0] == 10).all() and (x_train[0, 1] == 20).all() and (x_train[0, 2] == 30).all()



def test_a_constant_channel_is_standardised_to_zero_not_nan(tmp_path) -> None:
    """A blank blue channel has standard deviation 0 over the train rows: it stays 0 (was 0 / 0 = NaN in every
    split without the guard)."""
    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    folder = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = read_cifar_batch(folder / name)
        batch[b"data"][:, 2048:] = 0  # the third of the red, green, blue planes
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    splits = load_dataset("cifar10", root=tmp_path, seed=0, val_fraction=0.2)
    for part in (splits.train, splits.val, splits.test):
        assert torch.isfinite(part.x).all() and (part.x[:, 2] == 0).all()


def test_cifar100_without_a_meta_file_names_each_of_its_100_classes(tmp_path) -> None:
    """Without its meta file CIFAR-100's classes are named by their numbers, all 100 (a fallback to CIFAR-10's
    names gave 10)."""
    _cifar_files(tmp_path, "cifar100", np.random.default_rng(0))
    (tmp_path / "cifar-100-python" / "meta").unlink()
    splits = load_dataset("cifar100", root=tmp_path, seed=0, val_fraction=0.2)
    assert splits.num_classes == 100 and splits.class_names == tuple(str(c) for c in range(100))

def test_cifar_missing_files_and_bad_pickles(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path)
    assert "Nothing is downloaded" in str(info.value)
    assert "data_batch_1, " in str(info.value) and f"{tmp_path / 'cifar-10-batches-py'} has none" in str(info.value)

    class Exploit:
        def __reduce__(self):
            return (os.getcwd, ())

    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_batch(evil)

    _cifar_files(tmp_path, "cifar100", np.random.default_rng(0))
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)  # CIFAR-10 key in CIFAR-100
    with pytest.raises(ValueError, match="fine_labels"):
        load_dataset("cifar100", root=tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:  # str and bytes keys: sorting them raised TypeError
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test: expected keys b'data' and b'fine_labels', found \['fine_labels', "
                                         r"b'data'\]"):
        load_dataset("cifar100", root=tmp_path)
    for data, labels, found in ((np.ones((2, 3072), np.float32), [0, 1], "float32 and int64"),
                                (np.zeros((2, 3072), np.uint8), [0.5, 1.0], "uint8 and float64")):
        with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels}, f)  # a cast would wrap or truncate these
        with pytest.raises(ValueError, match=f"expected uint8 data and integer labels, got {found}"):
            load_dataset("cifar100", root=tmp_path)


def test_cifar_meta_file_must_name_every_class(tmp_path) -> None:
    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"plane", b"car"]}, f, protocol=2)
    with pytest.raises(ValueError, match="the meta file names 2 classes, not 10"):  # gave 2 class_names for 10
        load_dataset("cifar10", root=tmp_path)


def test_cifar_batches_without_a_sample_are_refused(tmp_path) -> None:
    _cifar_files(tmp_path, "cifar100", np.random.default_rng(0))
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"cifar100: the batches \['test'\].*hold no sample"):
        load_cifar_files(tmp_path, "cifar100")


def test_repeated_samples_are_kept_once():
    # scikit-learn's iris holds one (input, label) pair twice: a forgotten copy would stay in D_r
    splits = load_dataset("iris", seed=0)
    rows = torch.cat([torch.cat([s.x.flatten(1), s.y[:, None].double()], dim=1)
                      for s in (splits.train, splits.val, splits.test)])
    assert len(rows) == 149 and len(torch.unique(rows, dim=0)) == 149


def test_repeated_rows_are_found_by_value_and_label_and_the_first_is_kept():
    # rows hashed one at a time (np.unique over a float64 copy of CIFAR-10 took 4.7 GB): -0.0 and 0.0 are one
    # value, the same input under another label is another sample, the order of the rows is kept
    x = torch.tensor([[2.0, 3.0], [0.0, 1.0], [-0.0, 1.0], [0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    raw = _Raw(x, np.array([0, 0, 0, 1, 0]), ("a", "b"))
    kept = _without_duplicates("toy", raw)
    assert torch.equal(kept.x, x[[0, 1, 3]]) and kept.y.tolist() == [0, 0, 1]
    assert _without_duplicates("toy", _Raw(x[:2], np.array([0, 0]), ("a", "b"))).x.shape == (2, 2)


def test_official_test_rows_that_repeat_a_training_row_are_dropped(tmp_path):
    """An official test file may hold copies of training rows: the model trains (or forgets) them, so as test
    rows they counted as unseen in the test accuracy and the attacks' non-members (50 of 80 in this file). The
    same input under another label is another sample (kept); a file of copies alone is refused."""
    data = _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False, n_test=30)
    train_x, train_y = data["train-images-idx3-ubyte"], data["train-labels-idx1-ubyte"]
    test_x = np.concatenate([train_x[:50], data["t10k-images-idx3-ubyte"]])
    test_y = np.concatenate([train_y[:50], data["t10k-labels-idx1-ubyte"]])
    test_y[0] = (test_y[0] + 1) % 10
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), test_x)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), test_y)
    splits = load_dataset("mnist", root=tmp_path)
    assert len(splits.test) == 31 and splits.test.y.tolist() == [int(test_y[0]), *data["t10k-labels-idx1-ubyte"]]
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), train_x[:5])
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), train_y[:5])
    with pytest.raises(ValueError, match="^mnist: every row of the official test file is a copy of a training row"):
        load_dataset("mnist", root=tmp_path)


def test_labeled_data_names_what_it_cannot_hold():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        LabeledData(x.numpy(), y)
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        LabeledData(x, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="x must have a batch dimension"):
        LabeledData(torch.tensor(1.0), y[:1])
    with pytest.raises(ValueError, match="x has 4 rows but y has 3"):
        LabeledData(x, y[:3])
    with pytest.raises(TypeError, match="y must be a 1-D int64 tensor"):
        LabeledData(x, y.float())
    with pytest.raises(TypeError, match=r"y must be a 1-D int64 tensor, got torch.int64 of shape \(\)"):
        LabeledData(x, torch.tensor(0))  # was torch's IndexError from the row count
    with pytest.raises(ValueError, match="x is on meta but y on cpu"):
        LabeledData(x.to("meta"), y)
    # sparse inputs met "reshape is not implemented for sparse tensors" inside every method and metric
    with pytest.raises(TypeError, match=r"LabeledData: x must be a dense tensor, got layout torch.sparse_coo"):
        LabeledData(x.to_sparse(), y)
    with pytest.raises(TypeError, match=r"LabeledData: y must be a dense tensor, got layout torch.sparse_coo"):
        LabeledData(x, y.to_sparse())



def test_subset_refuses_an_index_out_of_range_with_its_own_error():
    """The documented ValueError, also at the bound itself (index n reached torch's IndexError)."""
    data = LabeledData(torch.randn(5, 2), torch.arange(5))
    with pytest.raises(ValueError, match="index 5 is out of range for 5 rows"):
        data.subset(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="index -6 is out of range for 5 rows"):
        data.subset(torch.tensor([-6]))
    assert torch.equal(data.subset(torch.tensor([4, -5])).y, torch.tensor([4, 0]))
    # a uint64 index from 2**63 up wrapped to a negative number in the message (r60): named as given
    with pytest.raises(ValueError, match=f"index {2**63} is out of range for 5 rows"):
        data.subset(np.array([1, 2**63], dtype=np.uint64))
    assert torch.equal(data.subset(np.array([4, 1], dtype=np.uint64)).y, torch.tensor([4, 1]))


def test_drop_last_drops_the_single_row_that_join_last_row_would_join():
    """Nine rows in batches of 4: drop_last drops the ninth also with join_last_row, which joins it otherwise."""
    data = LabeledData(torch.randn(9, 2), torch.arange(9))
    assert [len(y) for _, y in data.loader(4, drop_last=True, join_last_row=True)] == [4, 4]
    assert [len(y) for _, y in data.loader(4, join_last_row=True)] == [4, 5]

def test_load_dataset_checks_the_seed() -> None:
    with pytest.raises(ValueError, match=r"load_dataset: seed must be in \[0, 2\*\*32\), got -1"):
        load_dataset("iris", seed=-1)
    with pytest.raises(TypeError, match="load_dataset: seed must be an int, got float"):
        load_dataset("iris", seed=0.5)
    with pytest.raises(ValueError, match=r"load_dataset: seed must be in \[0, 2\*\*32\)"):
        load_dataset("iris", seed=2**32)
    assert torch.equal(load_dataset("iris", seed=np.int64(3)).train.y, load_dataset("iris", seed=3).train.y)


@pytest.mark.parametrize("content", [b"", b"hello, not a pickle", pickle.dumps({b"data": [1, 2]})[:-5]],
                         ids=["empty", "text", "truncated"])
def test_read_cifar_batch_names_a_file_that_is_not_a_batch(tmp_path, content) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR python batch"):
        read_cifar_batch(path)


@pytest.mark.parametrize("name", LOCAL_DATASETS)
def test_the_local_datasets_are_the_ones_that_need_a_root(name):
    """The command line refuses --root for every other dataset (it would be ignored): the list must hold
    exactly the datasets that read it."""
    with pytest.raises(ValueError, match="read from local files"):
        load_dataset(name)


@pytest.mark.parametrize("root, error, message", [
    (3, TypeError, "mnist: root must be a folder path \\(str or os.PathLike\\), got int"),  # was pathlib's message
    ("", ValueError, "mnist: root '' names no folder"),  # was read as the working folder
    (EmptyPath(), ValueError, "mnist: root '' names no folder"),  # an os.PathLike of '' was too
], ids=["int", "empty", "empty-pathlike"])
def test_root_that_is_no_path_is_refused(root, error, message: str) -> None:
    with pytest.raises(error, match=message):
        load_dataset("mnist", root=root)


def test_root_that_is_no_folder_says_so(tmp_path) -> None:
    # the message listed the 16 files looked for under it, not that the folder itself is wrong
    with pytest.raises(FileNotFoundError, match="cifar10: root .*nowhere does not exist. Nothing is downloaded"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="mnist: root .*afile is not a folder"):
        load_dataset("mnist", root=str(tmp_path / "afile"))


def test_dataset_name_that_is_no_string_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset \['digits'\]"):  # was "unhashable type: 'list'"
        load_dataset(["digits"])


def test_class_with_a_single_sample_names_the_classes(tmp_path) -> None:
    # scikit-learn's message spoke of "the minimum number of groups"
    labels = np.r_[np.arange(10), np.ones(190)].astype(np.uint8)  # classes 0, 2..9 have one row each
    _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), labels)
    with pytest.raises(ValueError, match=r"class\(es\) \[0, 2, 3, 4, 5, 6, 7, 8, 9\] have a single sample in the data"):
        load_dataset("mnist", root=tmp_path)
    y = np.r_[np.repeat(np.arange(3), 10), 3, 3]  # class 3: two rows, one of which the test split takes
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have a single sample in the rows the test split leaves"):
        _split_indices(y, 0, 0.2, 0.3)


def test_cifar_pickle_refused_as_unsafe_names_the_file(tmp_path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.getcwd, ())

    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit()}))
    # a ValueError too, as every other bad file (the command line reports those): it was a bare
    # UnpicklingError that named no file
    with pytest.raises(ValueError, match="data_batch_2: refusing to load posix.getcwd") as info:
        load_dataset("cifar10", root=tmp_path)
    assert isinstance(info.value, pickle.UnpicklingError)


def test_cifar_ragged_labels_name_the_file(tmp_path) -> None:
    _cifar_files(tmp_path, "cifar100", np.random.default_rng(0))
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, [1]]}, f, protocol=2)
    with pytest.raises(ValueError, match="test: data and labels must be arrays"):  # was numpy's "inhomogeneous shape"
        load_dataset("cifar100", root=tmp_path)


@pytest.mark.parametrize("names, message", [
    (5, "class names must be a list of strings, got 5"),  # was "'int' object is not iterable"
    ("abcdefghij", "class names must be a list of strings, got 'abcdefghij'"),  # was read as 10 names 'a'..'j'
    ([b"\xff"] * 10, "class names must be UTF-8 text"),  # was a bare UnicodeDecodeError
], ids=["int", "str", "not-utf8"])
def test_cifar_meta_class_names_are_checked(tmp_path, names, message: str) -> None:
    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    with pytest.raises(ValueError, match=f"batches.meta: {message}"):
        load_dataset("cifar10", root=tmp_path)


# --------------------------------------------------------------------------- audit: test_fraction, files
@pytest.mark.parametrize("name", LOCAL_DATASETS)
@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_test_fraction_is_refused_where_the_test_split_is_official(tmp_path, name: str, fraction: float) -> None:
    # it was silently ignored: the official test file is the test split whatever the value
    with pytest.raises(ValueError, match=rf"test_fraction={fraction} does not apply to '{name}': the dataset has an "
                                         "official test split, which is the test split; leave test_fraction unset"):
        load_dataset(name, root=tmp_path, test_fraction=fraction)


def test_val_fraction_of_an_official_split_is_not_bounded_by_an_unused_test_fraction(tmp_path) -> None:
    # val_fraction=0.9 was refused as "val_fraction + test_fraction must be < 1 ..., got 0.9 + 0.2"
    data = _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    splits = load_dataset("mnist", root=tmp_path, val_fraction=0.9)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 180, 40)
    assert torch.equal(splits.test.y, torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    # what is left too small is said of val_fraction alone (the message named a test_fraction=None)
    with pytest.raises(ValueError, match=r"^val_fraction=0.99 leaves 2 of 200 samples to train on, fewer than the 10 "
                                         r"classes$"):
        load_dataset("mnist", root=tmp_path, val_fraction=0.99)


def test_test_fraction_unset_is_the_old_default_where_a_test_split_is_carved() -> None:
    unset, explicit = load_dataset("wine", seed=4), load_dataset("wine", seed=4, test_fraction=0.2)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(unset, part).x, getattr(explicit, part).x)
        assert torch.equal(getattr(unset, part).y, getattr(explicit, part).y)
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction must be < 1 to leave train data, got "
                                         r"0.85 \+ 0.2"):
        load_dataset("wine", val_fraction=0.85)


def test_cifar_labels_beyond_int64_are_reported_with_their_value(tmp_path) -> None:
    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    labels = np.arange(30, dtype=np.uint64) % 5
    labels[3] = 2**64 - 1
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((30, 3072), np.uint8), b"labels": labels}, f, protocol=2)
    # was "labels must lie in [0, 10), found [-1, 4]": the int64 cast had wrapped the value
    with pytest.raises(ValueError, match=r"test_batch: labels must be class ids, found 18446744073709551615, beyond "
                                         r"the int64 range"):
        load_dataset("cifar10", root=tmp_path)


def test_read_idx_reads_a_gzipped_file_named_without_gz(tmp_path) -> None:
    values = np.arange(24, dtype=np.int16).reshape(2, 3, 4) * 9 - 100
    _write_idx(str(tmp_path / "a.idx.gz"), values)
    saved_plain = tmp_path / "a.idx"  # a download saved without its .gz
    saved_plain.write_bytes((tmp_path / "a.idx.gz").read_bytes())
    out = read_idx(saved_plain)  # was "not an IDX file (magic bytes b'\x1f\x8b\x08\x00')"
    assert out.dtype == np.int16 and np.array_equal(out, values)
    cut = tmp_path / "cut.idx"
    cut.write_bytes(saved_plain.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"cut\.idx: not a readable gzip file"):
        read_idx(cut)


def test_mnist_gzipped_files_named_without_gz_load(tmp_path) -> None:
    data = _mnist_files(tmp_path / "gz", np.random.default_rng(0), gzipped=True)
    for base in data:
        (tmp_path / base).write_bytes((tmp_path / "gz" / (base + ".gz")).read_bytes())
    splits = load_dataset("mnist", root=tmp_path, seed=1)
    assert torch.equal(splits.test.y, torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())


def test_mnist_files_all_come_from_one_folder(tmp_path) -> None:
    raw = _mnist_files(tmp_path / "MNIST" / "raw", np.random.default_rng(0), gzipped=True)
    stray = np.zeros((200, 28, 28), np.uint8)  # a lone file in root, beside the full set under MNIST/raw
    _write_idx(str(tmp_path / "train-images-idx3-ubyte"), stray)
    x_train = load_mnist_files(tmp_path)[0]  # took the stray images with MNIST/raw's labels
    assert np.array_equal(x_train, raw["train-images-idx3-ubyte"])
    # a complete root is still read first
    in_root = _mnist_files(tmp_path, np.random.default_rng(1), gzipped=False)
    assert np.array_equal(load_mnist_files(tmp_path)[0], in_root["train-images-idx3-ubyte"])


def test_mnist_files_split_between_folders_name_what_each_lacks(tmp_path) -> None:
    data = _mnist_files(tmp_path, np.random.default_rng(0), gzipped=False)
    raw = tmp_path / "MNIST" / "raw"
    for base in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # the test files under MNIST/raw only
        raw.mkdir(parents=True, exist_ok=True)
        _write_idx(str(raw / (base + ".gz")), data[base])
        (tmp_path / base).unlink()
    with pytest.raises(FileNotFoundError) as info:  # was loaded, train from one folder and test from the other
        load_dataset("mnist", root=tmp_path)
    assert (f": {tmp_path} lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; "
            f"{raw} lacks train-images-idx3-ubyte, train-labels-idx1-ubyte. Nothing is downloaded") in str(info.value)


def test_cifar_missing_batches_are_named_per_folder(tmp_path) -> None:
    _cifar_files(tmp_path, "cifar10", np.random.default_rng(0))
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError) as info:  # listed all 12 batch paths, present ones too
        load_cifar_files(tmp_path, "cifar10")
    message = str(info.value)
    assert f": {folder} lacks data_batch_5; {tmp_path} has none. Nothing is downloaded" in message


def test_a_class_study_on_a_test_split_without_that_class(tmp_path) -> None:
    """A local MNIST whose test file holds no row of the forgotten class ran the original's training and then
    failed with "class(es) [3] do not occur in the labels", naming no split; a test split of only forgotten
    classes is refused before any training."""
    from unlearn_kernels.study import StudyConfig, check_scenario, run_study
    from unlearn_kernels.training import TrainConfig

    rng = np.random.default_rng(0)
    data = _mnist_files(tmp_path, rng, gzipped=False, n_train=300)
    labels = np.array([c for c in range(10) if c != 3] * 4, dtype=np.uint8)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), labels)
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), data["t10k-images-idx3-ubyte"][:len(labels)])
    config = StudyConfig(dataset="mnist", root=str(tmp_path), protocol="class", forget_classes=(3,),
                         methods=("retrain", "original"), seeds=(0,), cache_dir=None,
                         recipe=TrainConfig(epochs=1, batch_size=64, lr=0.05))
    check_scenario(config)
    record = next(r for r in run_study(config)["records"] if r["method"] == "original")
    assert 0 <= record["metrics"]["acc_test"] <= 1
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.full(len(labels), 3, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"the test split holds only the forgotten class\(es\) \[3\]"):
        check_scenario(config)
