"""Datasets for the experiments: MNIST-like IDX files, their download, and minibatching."""

from .batches import epoch_permutation, iterate_batches, num_batches
from .datasets import (
    DATASETS,
    ENV_VAR,
    MEAN,
    SPLITS,
    STD,
    DataRoot,
    cache_dir,
    clear_cache,
    decode_split,
    find_split_files,
    load_mnist_like,
    normalize,
    resolve_root,
)
from .download import MIRRORS, SHA256, download_file
from .errors import DataError
from .idx import parse_idx, read_idx

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "MEAN",
    "MIRRORS",
    "SHA256",
    "SPLITS",
    "STD",
    "DataError",
    "DataRoot",
    "cache_dir",
    "clear_cache",
    "decode_split",
    "download_file",
    "epoch_permutation",
    "find_split_files",
    "iterate_batches",
    "load_mnist_like",
    "normalize",
    "num_batches",
    "parse_idx",
    "read_idx",
    "resolve_root",
]
