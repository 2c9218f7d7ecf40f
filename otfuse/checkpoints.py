"""Safe reading and atomic writing of model checkpoints.

Reading never runs code: PyTorch files go through ``torch.load(..., weights_only=True)`` and
safetensors files hold only tensors and string metadata. :func:`load_state_dict` accepts plain
state dicts, the usual wrappers (``{"state_dict": ...}``, ``{"model_state_dict": ...}``,
``{"model": ...}``) and ``module.`` / ``_orig_mod.`` prefixes, and returns a :class:`Checkpoint`;
every bad file raises a one-line :class:`~otfuse.errors.CheckpointError`.

Writing is atomic: the data goes to a temporary file in the target's directory, is flushed to disk
and renamed over the target, so an interrupted run leaves the old file (or none), never half of one.
:func:`atomic_path`, :func:`atomic_write_text` and :func:`atomic_write_bytes` (from
:mod:`otfuse.atomic`) do the same for any output (JSON, CSV, PNG).

A checkpoint's metadata may record its architecture (``metadata["arch"]``, written by
:func:`architecture_record`, from :mod:`otfuse.architectures`): a zoo model's ``otfuse_config``, or an import path ``module:callable``
with its keyword arguments, and the shape of one input. :func:`read_architecture` reads it back as an
:class:`Architecture`, :func:`recorded_in_shape` gives the input shape, and :func:`load_model` builds
the model and loads the weights. A checkpoint never makes otfuse import code: a recorded import path
is built only when the caller passes it (or ``allow_import=True``).

Example::

    save_model("fused.safetensors", model, {"epoch": 3})   # also writes fused.safetensors.json
    ckpt = load_state_dict("fused.safetensors")             # ckpt.metadata == {"epoch": 3}
    load_into(model, ckpt)

    save_model("a.safetensors", model, {"arch": architecture_record(model, in_shape=(1, 28, 28))})
    loaded = load_model("a.safetensors")                    # zoo models: no code imported
    loaded.model, loaded.architecture.in_shape
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from otfuse.architectures import (
    Architecture,
    ArchitectureUnknownError,
    architecture_record,
    read_architecture,
    recorded_in_shape,
)
from otfuse.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from otfuse.errors import CheckpointError

__all__ = [
    "FORMATS",
    "Architecture",
    "ArchitectureUnknownError",
    "Checkpoint",
    "LoadedModel",
    "architecture_record",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_finite",
    "check_fits",
    "load_into",
    "load_model",
    "load_state_dict",
    "read_architecture",
    "recorded_in_shape",
    "save_model",
    "sha256_file",
]

FORMATS: tuple[str, ...] = ("safetensors", "pt")
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")  # tried in this order
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
SIDECAR_SCHEMA = "otfuse-checkpoint-metadata"
_FIX_PICKLE = "re-save it as a plain state_dict or safetensors"
_NUMPY_SCALAR_TYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
_NUMPY_SCALAR_TYPES += ("uint64", "float16", "float32", "float64", "complex64", "complex128")


@dataclass
class Checkpoint:
    """Weights read from a checkpoint file, and everything non-tensor found beside them."""

    state_dict: dict[str, Tensor] = field(repr=False)  # CPU; prefixes stripped; safetensors: sorted
    metadata: dict[str, Any]  # e.g. epoch, test_accuracy, args; header metadata; sidecar JSON
    path: Path
    sha256: str  # hex digest of the file's bytes
    format: str  # "safetensors" or "pt"


# --------------------------------------------------------------------------------------------------
# Reading


def load_state_dict(path: str | Path) -> Checkpoint:
    """Read a checkpoint without running any code from it.

    The format is told by the file's first bytes (zip or pickle: PyTorch; an 8-byte little-endian
    header length then ``{``: safetensors), so the suffix does not matter. A sidecar
    ``<path>.json`` or ``<stem>.json`` written by :func:`save_model` for these exact bytes is merged
    into the metadata. Raises :class:`CheckpointError` (one line) for a missing, empty, truncated,
    corrupt or unsafe file.
    """
    path = Path(path)
    head = _read_head(path)
    digest = sha256_file(path)
    fmt = _sniff_format(path, head)
    if fmt == "safetensors":
        state_dict, metadata = _load_safetensors(path)
    elif fmt == "pt":
        state_dict, metadata = _split_checkpoint(_torch_load(path), path)
    else:
        raise CheckpointError(_not_a_checkpoint(path, head))
    metadata.update(_read_sidecar(path, digest))
    return Checkpoint(_strip_wrapper_prefixes(state_dict), metadata, path, digest, fmt)


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk_size):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check the path") from exc
    return digest.hexdigest()


def _read_head(path: Path, size: int = 64) -> bytes:
    """First bytes of the file, after checking it exists and is not empty."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; check the checkpoint path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(size)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check the path") from exc
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); the save was interrupted, re-save it")
    return head


def _sniff_format(path: Path, head: bytes) -> str | None:
    """``"pt"`` for a zip or pickle, ``"safetensors"`` for a header length then ``{``, else None."""
    if head.startswith(b"PK\x03\x04"):
        return "pt"
    if head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pt"  # legacy (pre-zip) torch.save, or a bare pickle that torch.load will refuse
    if path.suffix.lower() == ".safetensors" and len(head) >= 8:
        return "safetensors"  # a broken header: let the reader say how
    return None


def _not_a_checkpoint(path: Path, head: bytes) -> str:
    if head.startswith(b"version https://git-lfs"):
        return f"{path} is a Git LFS pointer, not the weights; run `git lfs pull` to fetch them"
    return (
        f"{path} is not a checkpoint (it starts with {head[:16]!r}); "
        f"pass a PyTorch ({'/'.join(TORCH_SUFFIXES)}) or .safetensors file"
    )


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and header metadata of a safetensors file."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # SafetensorError and friends: all mean a bad file
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({_one_line(exc)}); "
            "it is truncated or corrupt, re-save or re-download it"
        ) from exc
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; save a model with at least one parameter")
    return tensors, metadata


def _torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain values (plus argparse/numpy scalars)."""
    if _read_head(path, 4) == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt; re-save or re-download it")
    try:
        with warnings.catch_warnings(), _safe_globals():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to unpickle means a bad or unsafe file
        raise CheckpointError(_torch_load_message(path, exc)) from exc


def _torch_load_message(path: Path, exc: Exception) -> str:
    """One line explaining why ``torch.load(weights_only=True)`` refused a file."""
    text = str(exc)
    unsafe = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", text)
    if unsafe:
        return (
            f"{path} contains Python objects that would run code on load ({unsafe.group(1) or unsafe.group(2)}); "
            f"{_FIX_PICKLE}"
        )
    if "Unsupported operand" in text or "magic number" in text:
        return f"{path} is a Python pickle, not a PyTorch checkpoint; {_FIX_PICKLE}"
    if "TorchScript" in text:
        return f"{path} is a TorchScript archive; save model.state_dict() with torch.save instead"
    if isinstance(exc, (EOFError, OSError)) or re.search(
        r"zip archive|StreamReader|truncated|EOF", text
    ):
        return f"{path} is truncated or corrupt; re-save or re-download it"
    detail = text.split("WeightsUnpickler error:")[-1].strip() or type(exc).__name__
    return f"{path} cannot be read as a PyTorch checkpoint ({_one_line(detail)}); {_FIX_PICKLE}"


@contextmanager
def _safe_globals() -> Iterator[None]:
    """Allow the harmless non-tensor types training scripts save: argparse args, numpy scalars."""
    allow = getattr(torch.serialization, "safe_globals", None)
    if allow is None:  # torch < 2.5: only the defaults
        yield
        return
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    dtypes = [type(np.dtype(name)) for name in _NUMPY_SCALAR_TYPES]
    names = [argparse.Namespace, np.dtype, scalar, *dtypes]
    names += [(scalar, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core")]
    with allow(names):
        yield


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Separate the weights of a loaded object from the plain values saved beside them."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state_dict; "
            "save model.state_dict() (a dict of tensors)"
        )
    key = _weights_key(obj)
    if key is None:
        weights = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        rest = {k: v for k, v in obj.items() if not isinstance(v, Tensor)}
    else:
        weights, rest = dict(obj[key]), {k: v for k, v in obj.items() if k != key}
    if not weights:
        raise CheckpointError(
            f"{path} holds no tensors (keys: {_few(obj) or 'none'}); "
            f"expected a state_dict or a dict with one of {', '.join(WRAPPER_KEYS)}"
        )
    for name, value in weights.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"{path}: entry {name!r} of the state_dict is a {type(value).__name__}, "
                f"not a named tensor; {_FIX_PICKLE}"
            )
    return weights, _plain_metadata(rest)


def _weights_key(obj: Mapping) -> Any:
    """Key of the nested state dict in a wrapped checkpoint, or None for a plain state dict."""
    for key in WRAPPER_KEYS:
        value = obj.get(key)
        if isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values()):
            return key
    if any(isinstance(v, Tensor) for v in obj.values()):
        return None
    nested = [
        k
        for k, v in obj.items()
        if isinstance(v, Mapping) and v and all(isinstance(t, Tensor) for t in v.values())
    ]
    return nested[0] if len(nested) == 1 else None


def _strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.`` / ``_orig_mod.`` while every key carries the same one."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def sidecar_path(path: str | Path) -> Path:
    """Where :func:`save_model` writes the metadata of the checkpoint ``path``: ``<path>.json``."""
    return Path(f"{path}.json")


def _read_sidecar(path: Path, digest: str) -> dict[str, Any]:
    """Metadata from a sidecar JSON that :func:`save_model` wrote for exactly these bytes."""
    for candidate in dict.fromkeys((sidecar_path(path), path.with_suffix(".json"))):
        if candidate == path or not candidate.is_file():
            continue
        try:
            doc = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("schema") != SIDECAR_SCHEMA:
            continue
        if doc.get("sha256") != digest:  # a sibling's sidecar, or written for older bytes
            if doc.get("file") == path.name:
                warnings.warn(f"{candidate} describes an older {path.name}; ignored", stacklevel=3)
            continue
        return dict(doc.get("metadata") or {})
    return {}


# --------------------------------------------------------------------------------------------------
# Checks


def check_finite(state_dict: Mapping[str, Tensor], name: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor that holds NaN or Inf."""
    for key, tensor in state_dict.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise CheckpointError(
                f"{name}: tensor '{key}' holds {n_nan} NaN and {n_inf} Inf values; "
                "training diverged or the file is corrupt, use another checkpoint"
            )


def check_fits(state_dict: Mapping[str, Tensor], model: nn.Module, name: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = [_few(missing, "missing "), _few(unexpected, "unexpected ")]
        detail = ", ".join(p for p in parts if p)
        raise CheckpointError(
            f"{name} does not fit the model ({detail}); check the architecture matches it"
        )
    for key, tensor in expected.items():
        got = state_dict[key]
        if got.shape != tensor.shape:
            raise CheckpointError(
                f"{name}: '{key}' has shape {tuple(got.shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model; check the architecture and width match"
            )


def load_into(model: nn.Module, checkpoint: Checkpoint | Mapping[str, Tensor]) -> nn.Module:
    """Check the weights fit ``model`` (:func:`check_fits`), then load them strictly."""
    if isinstance(checkpoint, Checkpoint):
        state_dict, name = checkpoint.state_dict, str(checkpoint.path)
    else:
        state_dict, name = checkpoint, "state_dict"
    check_fits(state_dict, model, name)
    model.load_state_dict(state_dict, strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# Building a checkpoint's model (its architecture: otfuse.architectures)


@dataclass
class LoadedModel:
    """A model built from a checkpoint, with the weights loaded (eval mode)."""

    model: nn.Module
    checkpoint: Checkpoint
    architecture: Architecture

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        """The recorded (or given) shape of one input, else the zoo model's."""
        config = getattr(self.model, "otfuse_config", None) or {}
        return (
            recorded_in_shape(self.checkpoint.metadata)
            or self.architecture.in_shape
            or recorded_in_shape({"arch": config})
        )


def load_model(
    path: str | Path,
    architecture: Architecture | None = None,
    defaults: Mapping[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> LoadedModel:
    """Read ``path`` safely, build its architecture and load the weights (checked to fit and to be
    finite).

    ``architecture``: the model to build (its import path is imported); the keyword arguments it
    leaves out are taken from the checkpoint's record when that names the same zoo model or
    callable. By default the recorded architecture, where an import path is imported only with
    ``allow_import``.
    ``defaults``: see :meth:`Architecture.build`. Raises :class:`ArchitectureUnknownError` when
    neither says how to build the model.
    """
    checkpoint = load_state_dict(path)
    given = architecture is not None
    recorded = read_architecture(checkpoint.metadata)
    if architecture is None:
        architecture = recorded
    elif recorded is not None and recorded.target == architecture.target:
        kwargs = {**recorded.kwargs, **architecture.kwargs}
        architecture = Architecture(
            architecture.target, kwargs, architecture.in_shape or recorded.in_shape
        )
    if architecture is None:
        raise ArchitectureUnknownError(
            f"{path} records no architecture; give the architecture that holds its weights",
            Path(path),
        )
    if not given and not architecture.is_zoo and not allow_import:
        raise ArchitectureUnknownError(
            f"{path} was built by {architecture.target}; otfuse never imports code named in a "
            "file: give that architecture (or allow_import=True) to build it",
            Path(path),
            architecture,
        )
    model = architecture.build(defaults, allow_import=True)
    load_into(model, checkpoint)
    check_finite(checkpoint.state_dict, str(path))
    model.eval()
    return LoadedModel(model, checkpoint, architecture)


# --------------------------------------------------------------------------------------------------
# Writing


def save_model(
    path: str | Path,
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    format: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the weights atomically, and a sidecar ``<path>.json`` holding ``metadata`` (neither
    when either cannot be written; neither over an existing one without ``overwrite``).

    ``format`` is ``"safetensors"`` or ``"pt"`` (a plain ``torch.save`` state dict); by default it
    follows the suffix (``.safetensors``; ``.pt``, ``.pth``, ``.bin``, ``.ckpt``), else safetensors.
    Tensors are detached, moved to the CPU and copied contiguously, so shared storage is no issue.
    ``metadata`` must be JSON-like; paths, tuples, numpy or one-element tensor scalars, argparse
    namespaces and dataclasses are converted. The sidecar also records the file's SHA-256, so a
    stale sidecar is never read back. Returns ``path``.
    """
    path = Path(path)
    fmt = _infer_format(path, format)
    for existing in (path, sidecar_path(path)):
        if existing.exists() and not overwrite:
            raise CheckpointError(f"{existing} exists; pass overwrite=True to replace it")
    tensors = _tensors_to_save(model_or_state_dict)
    sidecar = {"schema": SIDECAR_SCHEMA, "file": path.name, "sha256": ""}
    sidecar["metadata"] = _json_metadata(metadata or {})
    with atomic_path(path) as tmp:
        try:
            if fmt == "safetensors":
                safetensors.torch.save_file(tensors, str(tmp))
            else:
                torch.save(tensors, tmp)
        except OSError as exc:
            raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
        sidecar["sha256"] = sha256_file(tmp)
        # the sidecar first: when it cannot be written, the weights are not written either
        atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    return path


def _infer_format(path: Path, format: str | None) -> str:
    suffix = path.suffix.lower()
    by_suffix = "safetensors" if suffix == ".safetensors" else None
    by_suffix = "pt" if suffix in TORCH_SUFFIXES else by_suffix
    if format is None:
        return by_suffix or "safetensors"
    if format not in FORMATS:
        raise CheckpointError(
            f"unknown checkpoint format '{format}'; choose one of {', '.join(FORMATS)}"
        )
    if by_suffix is not None and by_suffix != format:
        raise CheckpointError(
            f"{path} has suffix {suffix} but format '{format}' was asked; make them agree"
        )
    return format


def _tensors_to_save(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies that share no storage."""
    if isinstance(model_or_state_dict, nn.Module):
        model_or_state_dict = model_or_state_dict.state_dict()
    tensors = {}
    for key, value in model_or_state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"cannot save entry {key!r} ({type(value).__name__}); "
                "a state_dict maps names to tensors"
            )
        tensors[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if not tensors:
        raise CheckpointError("nothing to save: the model has no parameters or buffers")
    return tensors


class _NotPlain(Exception):
    """A value that cannot be written as JSON."""


def _plain(value: Any) -> Any:
    """JSON-ready copy of ``value`` (str, int, float, bool, None, lists, dicts); else _NotPlain."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, Tensor)):
        if isinstance(value, Tensor) and value.numel() != 1:
            raise _NotPlain(f"a tensor of shape {tuple(value.shape)}")
        return _plain(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, (str, int)) for k in value):
            raise _NotPlain("a dict with non-string keys")
        return {str(k): _plain(v) for k, v in value.items()}
    raise _NotPlain(f"a {type(value).__name__}")


def _plain_metadata(values: Mapping[Any, Any]) -> dict[str, Any]:
    """The plain entries of a loaded checkpoint; others (optimizer state, models) are left out."""
    metadata = {}
    for key, value in values.items():
        try:
            metadata[str(key)] = _plain(value)
        except _NotPlain:
            continue
    return metadata


def _json_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata ready for ``json.dumps``; a one-line error names the first key that is not."""
    out = {}
    for key, value in metadata.items():
        try:
            out[str(key)] = _plain(value)
        except _NotPlain as exc:
            raise CheckpointError(
                f"metadata '{key}' holds {exc}, which cannot be written as JSON; "
                "pass str, int, float, bool, None, lists or dicts"
            ) from None
    return out


# --------------------------------------------------------------------------------------------------
# Small helpers


def _one_line(exc: BaseException | str, limit: int = 160) -> str:
    """An exception's message (or any text) squeezed onto one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _few(keys: Any, label: str = "", limit: int = 3) -> str:
    """``label`` plus the first few keys, quoted, and how many more there are."""
    keys = list(keys)
    if not keys:
        return ""
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{label}{shown}{more}"
