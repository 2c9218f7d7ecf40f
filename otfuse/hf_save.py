"""Writing a fused Hugging Face model: ``save_pretrained``'s files and ``otfuse.json``, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otfuse.atomic import fsync_path
from otfuse.errors import OtfuseError
from otfuse.hf import (
    METADATA_FILE,
    _quiet_transformers,
    is_model_dir,
    require_transformers,
)
from otfuse.jsonsafe import jsonable

# --------------------------------------------------------------------------------------------------
# Writing


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    use_cache: bool | None = None,
) -> Path:
    """Write ``model`` with its ``save_pretrained`` (config.json and model.safetensors) into
    ``out_dir``, with ``metadata`` as ``otfuse.json`` beside them, atomically.

    Everything is written into a temporary directory beside ``out_dir``, then renamed to it; a
    failure leaves no ``out_dir`` (or the old one). ``overwrite`` replaces an existing ``out_dir``,
    but only one that is empty or a model directory (never another folder). ``dtype``: the dtype to
    store floating-point weights in (default: the model's); ``use_cache``: the config's value to
    write (default: as the model's config has it).

    Raises:
        OtfuseError: ``out_dir`` exists (without ``overwrite``) or cannot be written.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _write_error(out, exc) from None
    try:
        _write_model(model, tmp, dtype, use_cache)
        if metadata is not None:
            text = json.dumps(jsonable(dict(metadata)), indent=2) + "\n"
            (tmp / METADATA_FILE).write_text(text, encoding="utf-8")
        _sync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        _replace_dir(tmp, out, overwrite)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _write_error(out, exc) from None
        raise
    return out


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as an output directory: refused (one line) when it exists without ``overwrite``,
    when it is a file, or when it is a folder that is neither empty nor a model directory."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OtfuseError(f"{out} is a file; give -o a directory name")
        if not overwrite:
            raise OtfuseError(f"{out} exists; pass --force to replace it")
        if not is_model_dir(out) and any(out.iterdir()):
            raise OtfuseError(
                f"{out} is a folder that is not a Hugging Face model directory; otfuse replaces "
                "only those, give another name"
            )
    elif out.parent.exists() and not out.parent.is_dir():
        raise OtfuseError(f"cannot write {out}: {out.parent} is a file, not a folder")
    return out


def _write_model(
    model: nn.Module, folder: Path, dtype: torch.dtype | None, use_cache: bool | None
) -> None:
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    to_save = model
    if dtype is not None and any(p.is_floating_point() and p.dtype != dtype
                                 for p in model.parameters()):  # fmt: skip
        import copy

        to_save = copy.deepcopy(model).to(dtype)
    try:
        if use_cache is not None and config is not None and hasattr(config, "use_cache"):
            to_save.config.use_cache = use_cache
        transformers = require_transformers()
        with _quiet_transformers(transformers):
            to_save.save_pretrained(str(folder))
    finally:
        if before is not None:
            config.use_cache = before


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (``overwrite``) is moved aside first and
    removed after, or put back if the rename fails."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        _sync_dir(out.parent)
        return
    if not overwrite:  # appeared while we were writing
        raise OtfuseError(f"{out} exists; pass --force to replace it")
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _sync_dir(out.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _sync_dir(folder: Path) -> None:
    """fsync every file of ``folder`` and the folder itself (best effort where not allowed)."""
    for item in [*folder.iterdir(), folder] if folder.is_dir() else [folder]:
        if not (item.is_symlink() or (item.is_dir() and item != folder)):
            fsync_path(item)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(out: Path, exc: OSError) -> OtfuseError:
    return OtfuseError(
        f"cannot write {out}: {exc.strerror or exc}; choose a writable location with free space"
    )
