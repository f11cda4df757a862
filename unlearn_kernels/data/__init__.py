"""Offline datasets, splits and forget protocols."""
from ..labeled import LabeledData
from .datasets import DatasetSplits, available_datasets, load_dataset, load_digits_all
from .local_files import read_cifar_batch, read_idx
from .protocols import (
    ForgetRequest,
    LabelCorruption,
    class_forget,
    forget_count,
    index_forget,
    make_request,
    mislabel,
    random_forget,
    remove_classes,
    sequential_class_forget,
    sequential_forget,
    split_forget,
)

__all__ = [
    "DatasetSplits",
    "ForgetRequest",
    "LabelCorruption",
    "LabeledData",
    "available_datasets",
    "class_forget",
    "forget_count",
    "index_forget",
    "load_dataset",
    "load_digits_all",
    "make_request",
    "mislabel",
    "random_forget",
    "read_cifar_batch",
    "read_idx",
    "remove_classes",
    "sequential_class_forget",
    "sequential_forget",
    "split_forget",
]
