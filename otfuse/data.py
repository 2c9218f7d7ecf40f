"""Datasets read from the standard files on disk: MNIST, Fashion-MNIST (IDX) and CIFAR-10 (pickles).

Nothing is ever downloaded. Where the files live, in order of precedence:

1. the ``data_dir`` argument (the command line's ``--data-dir``),
2. the environment variable ``OTFUSE_DATA_DIR``,
3. the dataset's default folder (only Fashion-MNIST has one: ``/usr/share/datasets/fashion-mnist``,
   where the Debian package ``dataset-fashion-mnist`` puts it).

The folder may hold the files itself, or a sub-folder named after the dataset (``fashion-mnist``,
``mnist``, ``cifar-10-batches-py``) that does; so one ``OTFUSE_DATA_DIR`` can serve every dataset.

Every file is checked (magic numbers, sizes, shapes, label range) and any problem raises
:class:`~otfuse.errors.DataError`: a dataset is loaded whole or not at all. CIFAR-10 pickles are
read with an unpickler that only rebuilds numpy arrays and plain builtins, so a file can never run
code.

>>> train = load_dataset("fashion-mnist", "train")
>>> train.images.shape, train.labels.shape
(torch.Size([60000, 1, 28, 28]), torch.Size([60000]))
>>> for images, labels in train.loader(batch_size=128, shuffle=True, seed=0): ...
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from otfuse import validation
from otfuse.errors import DataError

__all__ = [
    "DATA_DIR_ENV",
    "Dataset",
    "DatasetInfo",
    "dataset_names",
    "input_shape",
    "is_dataset_name",
    "load_dataset",
    "num_classes",
    "read_cifar_batch",
    "read_idx",
    "sample_inputs",
    "split_special_class",
]

DATA_DIR_ENV = "OTFUSE_DATA_DIR"

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, columns)
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What otfuse knows about a dataset: shape, classes, normalisation, where to look for it."""

    name: str
    shape: tuple[int, int, int]  # (C, H, W) of one image
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    subdir: str  # sub-folder name accepted under a data folder
    default_dir: str | None  # where the files are when nothing else is said
    install_hint: str  # what to do when the files are missing or bad


_FMNIST_HINT = (
    "reinstall the Debian package dataset-fashion-mnist (make data) or point data_dir (or "
    "OTFUSE_DATA_DIR) at a folder with the four IDX files"
)
_MNIST_HINT = "point data_dir (or OTFUSE_DATA_DIR) at a folder with the four MNIST IDX files"
_CIFAR_HINT = (
    "point data_dir (or OTFUSE_DATA_DIR) at the cifar-10-batches-py folder "
    "(data_batch_1..5, test_batch) of the python version of CIFAR-10"
)

_DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        shape=(1, 28, 28),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mean=(0.2860,),
        std=(0.3530,),
        subdir="fashion-mnist",
        default_dir="/usr/share/datasets/fashion-mnist",
        install_hint=_FMNIST_HINT,
    ),
    "mnist": DatasetInfo(
        name="mnist",
        shape=(1, 28, 28),
        classes=tuple(str(d) for d in range(10)),
        mean=(0.1307,),
        std=(0.3081,),
        subdir="mnist",
        default_dir=None,
        install_hint=_MNIST_HINT,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        shape=(3, 32, 32),
        classes=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        subdir="cifar-10-batches-py",
        default_dir=None,
        install_hint=_CIFAR_HINT,
    ),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}


# ----------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in memory.

    ``images`` has shape (N, C, H, W), dtype float32, normalised per channel with the dataset's
    mean and std; ``labels`` has shape (N,), dtype int64, values in ``range(len(classes))``.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int] | np.ndarray) -> Dataset:
        """The examples at ``indices`` (shape (M,)), in that order, as a new :class:`Dataset`."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        return Dataset(self.name, self.split, self.images[index], self.labels[index], self.classes)

    def loader(self, batch_size: int = 128, shuffle: bool = True, seed: int = 0) -> DataLoader:
        """A DataLoader of ``(images [B, C, H, W], labels [B])`` batches; the last may be smaller.

        With ``shuffle`` the order comes from a generator seeded with ``seed``: the same seed gives
        the same sequence of epochs. Whole batches are indexed at once, which is much faster than
        collating examples one by one.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        tensors = TensorDataset(self.images, self.labels)
        if shuffle:
            order = RandomSampler(tensors, generator=torch.Generator().manual_seed(seed))
        else:
            order = SequentialSampler(tensors)
        batches = BatchSampler(order, batch_size=batch_size, drop_last=False)
        return DataLoader(tensors, sampler=batches, batch_size=None)


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_DATASETS)


def is_dataset_name(name: str) -> bool:
    """Whether ``name`` (or an alias such as ``fmnist``, ``cifar-10``) names a dataset here."""
    return _ALIASES.get(name.lower(), name.lower()) in _DATASETS


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; an unknown name raises DataError."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _DATASETS:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(_DATASETS)}")
    return _DATASETS[key]


def input_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) of one image of dataset ``name``."""
    return dataset_info(name).shape


def num_classes(name: str) -> int:
    return len(dataset_info(name).classes)


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> Dataset:
    """Load one split of a dataset from its files (see the module docstring for where they are).

    Returns a :class:`Dataset` with ``images`` (N, C, H, W) float32, normalised, and ``labels`` (N,)
    int64. Fashion-MNIST and MNIST: N = 60000 (train) or 10000 (test), shape (1, 28, 28). CIFAR-10:
    N = 50000 or 10000, shape (3, 32, 32). Decoded files are cached in memory, so loading again is
    cheap. Missing, truncated or corrupt files raise :class:`DataError`.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': choose 'train' or 'test'")
    folder = _resolve_folder(info, data_dir)
    if info.name == "cifar10":
        paths = tuple(_find_file(folder, f, info) for f in CIFAR_FILES[split])
        pixels, labels = _read_cifar_cached(paths, _signature(paths))
    else:
        paths = tuple(_find_file(folder, f, info) for f in IDX_FILES[split])
        pixels, labels = _read_idx_pair_cached(paths, _signature(paths), info.install_hint)
    images, labels = _normalise(pixels, info), torch.from_numpy(labels.copy())
    return Dataset(info.name, split, images, labels, info.classes)


def sample_inputs(dataset: Dataset, n: int, seed: int) -> torch.Tensor:
    """A seeded random sample of ``min(n, len(dataset))`` images, shape (n, C, H, W): the sample
    :func:`otfuse.fuse` draws from ``dataset`` (:func:`otfuse.validation.sample_inputs`)."""
    return validation.sample_inputs(dataset.images, n, seed)


def split_special_class(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    special: int,
    frac_others_a: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices for the skill-transfer experiment (Singh & Jaggi, 2020, section 5.2).

    Model A's share ``idx_a`` holds every example of class ``special`` plus a random fraction
    ``frac_others_a`` of the examples of the other classes; model B's share ``idx_b`` holds the
    remaining examples of the other classes and none of ``special``. Both are sorted int64 tensors
    of shape (n_a,) and (n_b,); together they cover every index exactly once.
    """
    labels = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if not 0.0 <= frac_others_a <= 1.0:
        raise DataError(f"frac_others_a must be between 0 and 1, got {frac_others_a}")
    is_special = labels == special
    if not bool(is_special.any()):
        raise DataError(
            f"no example has the special label {special}: pick a label present in the data"
        )
    others = torch.nonzero(~is_special).flatten()
    generator = torch.Generator().manual_seed(seed)
    shuffled = others[torch.randperm(len(others), generator=generator)]
    n_a = round(frac_others_a * len(others))
    idx_a = torch.cat([torch.nonzero(is_special).flatten(), shuffled[:n_a]])
    return idx_a.sort().values, shuffled[n_a:].sort().values


# ----------------------------------------------------------------------------------------------
# Finding files


def _resolve_folder(info: DatasetInfo, data_dir: str | Path | None) -> Path:
    base = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or info.default_dir
    if base is None:
        raise DataError(f"{info.name} has no default folder: {info.install_hint}")
    base = Path(base).expanduser()
    if (base / info.subdir).is_dir():
        return base / info.subdir
    if not base.is_dir():
        raise DataError(f"{info.name} folder {base} does not exist: {info.install_hint}")
    return base


def _find_file(folder: Path, filename: str, info: DatasetInfo) -> Path:
    """``folder/filename``, or ``folder/filename.gz`` for IDX files."""
    for path in (folder / filename, folder / f"{filename}.gz"):
        if path.is_file():
            return path
    raise DataError(
        f"{info.name} file {filename} (or .gz) is missing in {folder}: {info.install_hint}"
    )


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int], ...]:
    """Size and modification time of each file, so the cache notices files that changed."""
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


def _normalise(pixels: np.ndarray, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, H, W) with the dataset's per-channel mean and std."""
    images = torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


def read_idx(path: str | Path, expected_magic: int, hint: str = "") -> np.ndarray:
    """Read one IDX file of unsigned bytes (plain or gzipped) into a uint8 array.

    Images (magic 2051) give shape (N, rows, columns); labels (magic 2049) give shape (N,).
    A wrong magic number, or a file shorter or longer than its header says, raises DataError.
    """
    path = Path(path)
    raw = _read_bytes(path, hint)
    ndim = expected_magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path} is truncated ({len(raw)} bytes, no full IDX header): {hint}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path} has IDX magic number {magic}, expected {expected_magic}: {hint}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(dims))
    if len(raw) != expected:
        problem = "is truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{path} {problem}: {len(raw)} bytes, expected {expected} for shape {dims}: {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _read_bytes(path: Path, hint: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): {hint}") from None


@functools.lru_cache(maxsize=8)
def _read_idx_pair_cached(
    paths: tuple[Path, Path], signature: object, hint: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64, checked against each other."""
    images_path, labels_path = paths
    images = read_idx(images_path, IDX_IMAGES_MAGIC, hint)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, hint)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels: {hint}"
        )
    if images.shape[1:] != (28, 28):
        shape = images.shape[1:]
        raise DataError(f"{images_path} holds images of {shape}, expected (28, 28): {hint}")
    _check_labels(labels, labels_path, hint)
    images.flags.writeable = False
    return images[:, None], labels.astype(np.int64)


def _check_labels(labels: np.ndarray, path: Path, hint: str, num_classes: int = 10) -> None:
    if len(labels) == 0:
        raise DataError(f"{path} holds no examples: {hint}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{path} has labels from {low} to {high}, expected 0..{num_classes - 1}: {hint}"
        )


# ----------------------------------------------------------------------------------------------
# CIFAR-10 python pickles


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays, numpy dtypes and plain builtins (dict, list, bytes, ...).

    Any other global a pickle names (``os.system``, ``builtins.eval``, ...) is refused before it is
    looked up, so loading can never run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path, hint: str = _CIFAR_HINT) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch safely: images (N, 3, 32, 32) uint8 and labels (N,) int64.

    The file is a pickled dict with ``data`` (N, 3072) uint8 (channel-major rows: 1024 red, 1024
    green, 1024 blue) and ``labels`` (N,) in 0..9; the real batches have N = 10000.
    """
    path = Path(path)
    raw = _read_bytes(path, hint)
    try:
        batch = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can fail in many ways; none is a bug of ours
        raise DataError(f"{path} is not a valid CIFAR-10 batch ({e}): {hint}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict: {hint}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path} has no uint8 'data' array of shape (N, 3072): {hint}")
    if data.shape[1] != 3 * 32 * 32 or data.shape[0] == 0:
        raise DataError(f"{path} has 'data' of shape {data.shape}, expected (N, 3072): {hint}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path} has no list of integer 'labels': {hint}") from None
    if len(labels) != len(data):
        raise DataError(f"{path} holds {len(data)} images but {len(labels)} labels: {hint}")
    _check_labels(labels, path, hint)
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=4)
def _read_cifar_cached(paths: tuple[Path, ...], signature: object) -> tuple[np.ndarray, np.ndarray]:
    batches = [read_cifar_batch(p) for p in paths]
    images = np.concatenate([b[0] for b in batches])
    images.flags.writeable = False
    return images, np.concatenate([b[1] for b in batches])
