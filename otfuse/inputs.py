"""Users' own inputs: a tensor file or a folder of images, read safely into memory.

Tensor files (nothing in them can run code):

* ``.pt`` / ``.pth``: ``torch.load(..., weights_only=True)`` of a tensor, a tuple/list
  ``(inputs,)`` or ``(inputs, labels)``, or a dict holding the inputs under one of
  :data:`INPUT_KEYS` (``inputs``, ``images``, ``x``, ...) and optionally the labels under one of
  :data:`LABEL_KEYS` (``labels``, ``targets``, ``y``, ...);
* ``.npy``: one array (the inputs), read with ``numpy.load(allow_pickle=False)``; ``.npz``: named
  arrays, keys as for ``.pt``;
* ``.safetensors``: named tensors, keys as for ``.pt`` (a file with a single tensor: the inputs).

Inputs have shape (N, ...) (images: (N, C, H, W)). Floating-point inputs are used as they are;
``uint8`` inputs are pixels and are scaled to [0, 1]. Labels are integers of shape (N,).

A folder of images (PNG or JPEG, read with Pillow, which matplotlib depends on): images directly in
the folder are unlabelled inputs; images in sub-folders are labelled by their sub-folder, as
torchvision's ``ImageFolder`` does: sub-folders named by integers (``0``, ``1``, ... ``9``) give
those integers as labels, otherwise the sorted sub-folder names are classes 0, 1, ... Every image
must have the same size (nothing is resized). Grey-scale images give one channel; if any image has
colour, every image gets three (RGB; an alpha channel is dropped). Pixels are scaled to [0, 1].

``normalize=(mean, std)`` (per channel, or one value for all) then subtracts and divides, as the
models were trained with; the named datasets of :mod:`otfuse.data` are normalised with their own
statistics, which :func:`otfuse.data.dataset_info` gives.

Every problem (missing, unknown or corrupt file, no inputs, NaN, labels of the wrong length) raises
a one-line :class:`~otfuse.errors.DataError`.

>>> data = load_inputs("my_images/")          # class sub-folders -> labels
>>> data.inputs.shape, data.labels.shape
(torch.Size([120, 3, 32, 32]), torch.Size([120]))
>>> otfuse.fuse(models, data=data.inputs)
>>> evaluate(model, data.dataset())
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from otfuse.data import Dataset
from otfuse.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "INPUT_KEYS",
    "LABEL_KEYS",
    "TENSOR_SUFFIXES",
    "UserData",
    "load_inputs",
    "read_labels",
]

INPUT_KEYS: tuple[str, ...] = ("inputs", "images", "x", "data", "features", "input", "image")
LABEL_KEYS: tuple[str, ...] = ("labels", "targets", "y", "label", "target")
TENSOR_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".npy", ".npz", ".safetensors")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_KINDS = "a .pt/.pth, .npy/.npz or .safetensors file, or a folder of PNG/JPEG images"


@dataclass(frozen=True, eq=False)
class UserData:
    """Inputs read from a user's file or folder.

    ``inputs``: float32, shape (N, ...); ``labels``: int64, shape (N,), or None;
    ``classes``: the class names (an image folder's sub-folders), or None.
    """

    name: str  # the path as given
    kind: str  # "tensor file" or "image folder"
    inputs: Tensor
    labels: Tensor | None = None
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. (C, H, W)."""
        return tuple(self.inputs.shape[1:])

    @property
    def num_classes(self) -> int | None:
        """Classes named by the folder, else the largest label + 1; None without labels."""
        if self.labels is None:
            return None
        found = int(self.labels.max()) + 1
        return max(found, len(self.classes)) if self.classes else found

    def dataset(self, split: str = "all") -> Dataset:
        """The labelled inputs as a :class:`~otfuse.data.Dataset` (for evaluation); DataError
        without labels."""
        if self.labels is None:
            raise DataError(
                f"{self.name} holds no labels; {_LABELS_HINT[self.kind]} to evaluate on it"
            )
        classes = self.classes or tuple(str(i) for i in range(self.num_classes or 0))
        if len(classes) < (self.num_classes or 0):
            classes = (*classes, *(str(i) for i in range(len(classes), self.num_classes or 0)))
        return Dataset(self.name, split, self.inputs, self.labels, classes)

    def describe(self) -> dict[str, Any]:
        """What a run's metadata records about these inputs."""
        return {
            "path": self.name,
            "kind": self.kind,
            "examples": len(self),
            "input_shape": list(self.input_shape),
            "labels": self.labels is not None,
        }


_LABELS_HINT = {
    "tensor file": "save the labels beside the inputs (e.g. a dict with 'inputs' and 'labels')",
    "image folder": "put the images in one sub-folder per class",
}


def load_inputs(
    path: str | Path,
    *,
    labels: str | Path | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> UserData:
    """Read the inputs (and labels, if the file has them) of a tensor file or an image folder.

    ``labels``: a tensor file holding the labels (a 1-D integer tensor or array, or a dict with one
    of :data:`LABEL_KEYS`); it replaces labels found in ``path``. ``normalize``: ``(mean, std)``
    applied per channel (dimension 1) after pixels are scaled to [0, 1].
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give {_KINDS}")
    if path.is_dir():
        inputs, found, classes = _read_image_folder(path)
        kind = "image folder"
    else:
        inputs, found = _split(_read_tensor_file(path), path)
        classes, kind = None, "tensor file"
    inputs = _check_inputs(inputs, path)
    if labels is not None:
        found, classes = read_labels(labels), None
    if found is not None:
        found = _check_labels(
            found, len(inputs), Path(labels) if labels is not None else path, inputs_in=path
        )
    if normalize is not None:
        inputs = _normalise(inputs, normalize, path)
    return UserData(str(path), kind, inputs, found, classes)


def read_labels(path: str | Path) -> Tensor:
    """The labels in a tensor file: a single 1-D tensor/array, or one under a :data:`LABEL_KEYS`
    key (or the second entry of a tuple)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist; give a .pt, .npy or .safetensors file")
    obj = _read_tensor_file(path)
    if isinstance(obj, Mapping):
        key = _first_key(obj, LABEL_KEYS)
        tensors = [v for v in obj.values() if isinstance(v, Tensor)]
        if key is None and len(tensors) != 1:
            raise DataError(f"{path} holds no labels under any of the keys {', '.join(LABEL_KEYS)}")
        return obj[key] if key is not None else tensors[0]
    if isinstance(obj, (tuple, list)):
        if len(obj) == 2 and all(isinstance(v, Tensor) for v in obj):
            return obj[1]
        raise DataError(f"{path} holds a {type(obj).__name__} of {len(obj)}; save the labels alone")
    return obj


# ----------------------------------------------------------------------------------------------
# Tensor files


def _read_tensor_file(path: Path) -> Any:
    """A tensor, a mapping of tensors, or a tuple of tensors, from a file of a known suffix."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return _read_torch(path)
    if suffix in (".npy", ".npz"):
        return _read_numpy(path)
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in IMAGE_SUFFIXES:
        raise DataError(f"{path} is one image; put the images in a folder and give the folder")
    raise DataError(f"{path}: unknown kind of input file '{suffix or path.name}'; give {_KINDS}")


def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, corrupt or code-running file: all mean a bad input
        raise DataError(
            f"{path} cannot be read as tensors ({_one_line(exc)}); save a tensor or a dict of "
            "tensors with torch.save"
        ) from exc
    return _as_tensors(obj, path)


def _read_numpy(path: Path) -> Any:
    try:
        loaded = np.load(path, allow_pickle=False)
        if hasattr(loaded, "files"):  # .npz: named arrays, read now and closed
            with loaded:
                loaded = {k: loaded[k] for k in loaded.files}
    except Exception as exc:  # a truncated or corrupt file, or one holding Python objects
        raise _numpy_error(path, exc) from exc
    return _as_tensors(loaded, path)


def _numpy_error(path: Path, exc: Exception) -> DataError:
    if "allow_pickle" in str(exc):
        return DataError(f"{path} holds Python objects, not plain arrays; save numeric arrays")
    return DataError(f"{path} is not a valid numpy file ({_one_line(exc)}); re-save it")


def _read_safetensors(path: Path) -> Any:
    import safetensors.torch

    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:
        raise DataError(
            f"{path} is not a valid safetensors file ({_one_line(exc)}); re-save it"
        ) from exc
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    return tensors


def _as_tensors(obj: Any, path: Path) -> Any:
    """numpy arrays -> tensors, in a tensor, a mapping or a tuple/list (one level)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise DataError(f"{path} holds an array of {obj.dtype}; save numbers")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        return {str(k): _as_tensors(v, path) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_tensors(v, path) for v in obj)
    return obj


def _split(obj: Any, path: Path) -> tuple[Tensor, Tensor | None]:
    """(inputs, labels or None) from what a tensor file holds."""
    if isinstance(obj, Tensor):
        return obj, None
    if isinstance(obj, Mapping):
        key = _first_key(obj, INPUT_KEYS)
        label_key = _first_key(obj, LABEL_KEYS)
        if key is None:
            others = [k for k, v in obj.items() if isinstance(v, Tensor) and k != label_key]
            if len(others) != 1:
                keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
                raise DataError(
                    f"{path} holds no inputs under any of the keys {', '.join(INPUT_KEYS)} "
                    f"(keys: {keys})"
                )
            key = others[0]
        return obj[key], obj[label_key] if label_key is not None else None
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        return obj[0], obj[1] if len(obj) == 2 else None
    raise DataError(
        f"{path} holds a {type(obj).__name__}; save a tensor of inputs, (inputs, labels), or a "
        "dict with 'inputs' and 'labels'"
    )


def _first_key(obj: Mapping, keys: Sequence[str]) -> str | None:
    lowered = {str(k).lower(): k for k in obj}
    for key in keys:
        if key in lowered and isinstance(obj[lowered[key]], Tensor):
            return lowered[key]
    return None


# ----------------------------------------------------------------------------------------------
# Checks


def _check_inputs(inputs: Any, path: Path) -> Tensor:
    """float32 (N, ...), N >= 1, finite; uint8 pixels scaled to [0, 1]."""
    if not isinstance(inputs, Tensor):
        raise DataError(f"{path}: the inputs are a {type(inputs).__name__}, not a tensor")
    if inputs.ndim < 2:
        raise DataError(
            f"{path}: the inputs have shape {tuple(inputs.shape)}; expected (N, ...) with one "
            "row per example, e.g. (N, C, H, W)"
        )
    if len(inputs) == 0:
        raise DataError(f"{path} holds no inputs (shape {tuple(inputs.shape)})")
    if inputs.dtype == torch.uint8:
        inputs = inputs.float() / 255.0
    elif inputs.is_floating_point():
        inputs = inputs.float()
    else:
        raise DataError(
            f"{path}: the inputs are {str(inputs.dtype).replace('torch.', '')}; give floating-"
            "point inputs or uint8 pixels"
        )
    if not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs)).sum())
        raise DataError(f"{path}: the inputs hold {bad} NaN or infinite values")
    return inputs.contiguous()


def _check_labels(labels: Any, n: int, path: Path, inputs_in: str | Path | None = None) -> Tensor:
    """int64 (N,), values >= 0 (``inputs_in``: the file of the inputs, where not ``path``)."""
    if not isinstance(labels, Tensor):
        raise DataError(f"{path}: the labels are a {type(labels).__name__}, not a tensor")
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1:
        raise DataError(
            f"{path}: the labels have shape {tuple(labels.shape)}; expected (N,) class indices"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(
            f"{path}: the labels are {str(labels.dtype).replace('torch.', '')}; give integer "
            "class indices"
        )
    if len(labels) != n:
        where = (
            f"{path} holds {len(labels)} labels for the {n} inputs of {inputs_in}"
            if inputs_in is not None and Path(inputs_in) != path
            else f"{path} holds {n} inputs but {len(labels)} labels"
        )
        raise DataError(f"{where}; give one label each")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise DataError(f"{path}: the labels include {int(labels.min())}; class indices are >= 0")
    return labels


def _normalise(
    inputs: Tensor, normalize: tuple[Sequence[float], Sequence[float]], path: Path
) -> Tensor:
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in normalize)
    channels = inputs.shape[1]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise DataError(
                f"{path}: normalisation has {len(values)} {name} values for {channels} channels; "
                "give one per channel or one for all"
            )
    if not bool((std > 0).all()):
        raise DataError("normalisation std must be positive")
    shape = (1, -1) + (1,) * (inputs.ndim - 2)
    return (inputs - mean.view(shape)) / std.view(shape)


# ----------------------------------------------------------------------------------------------
# Folders of images


def _read_image_folder(folder: Path) -> tuple[Tensor, Tensor | None, tuple[str, ...] | None]:
    """(inputs (N, C, H, W) in [0, 1], labels or None, class names or None)."""
    top = _images_in(folder, recursive=False)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_class = {d.name: _images_in(d, recursive=True) for d in subdirs}
    by_class = {name: files for name, files in by_class.items() if files}
    if top and by_class:
        raise DataError(
            f"{folder} holds images both at its top and in sub-folders ({', '.join(by_class)}); "
            "put every image in a class sub-folder, or all at the top for unlabelled inputs"
        )
    if not top and not by_class:
        raise DataError(f"{folder} holds no PNG or JPEG images")
    if top:
        return _stack([_read_image(p) for p in top], top), None, None
    names = list(by_class)
    if all(n.isdigit() for n in names):
        names.sort(key=int)
        label_of = {n: int(n) for n in names}
        classes = tuple(str(i) for i in range(max(label_of.values()) + 1))
    else:
        label_of = {n: i for i, n in enumerate(names)}
        classes = tuple(names)
    files = [p for n in names for p in by_class[n]]
    labels = torch.tensor([label_of[n] for n in names for _ in by_class[n]], dtype=torch.long)
    return _stack([_read_image(p) for p in files], files), labels, classes


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    if recursive:
        found = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(root) / n for n in sorted(names) if _is_image(n)]
        return found
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _read_image(path: Path) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB, float32 in [0, 1]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - matplotlib depends on Pillow
        raise DataError("reading images needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(image, dtype=np.float32) / 65535.0
            grey = mode in ("1", "L", "LA") or (mode == "P" and _grey_palette(image))
            pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as an image ({_one_line(exc)})") from exc
    return pixels / 255.0


def _grey_palette(image: Any) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _stack(images: list[np.ndarray], files: list[Path]) -> Tensor:
    size = images[0].shape[:2]
    for image, path in zip(images, files):
        if image.shape[:2] != size:
            raise DataError(
                f"{path} is {image.shape[1]}x{image.shape[0]} pixels but {files[0]} is "
                f"{size[1]}x{size[0]}; images in a folder must share one size (resize them first)"
            )
    if all(image.ndim == 2 for image in images):
        return torch.from_numpy(np.stack(images)[:, None].copy())
    rgb = [image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2) for image in images]
    return torch.from_numpy(np.stack(rgb).transpose(0, 3, 1, 2).copy())


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
