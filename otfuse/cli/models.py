"""Checkpoints on the command line: ``--arch`` (once, or once per checkpoint), ``--in-shape``, loading
and checking that the models take the inputs they will be given.

``ARCH`` is a zoo name with keyword arguments, ``vgg11:width=2,batch_norm=true,in_shape=1x28x28``,
or an import path to a callable returning an ``nn.Module``, ``mypkg.models:make_net`` or
``mypkg.models:make_net:width=2``. Checkpoints written by otfuse record their architecture and input
shape (:mod:`otfuse.checkpoints`), so ``--arch`` and ``--in-shape`` may be left out for them; an
import path given for a checkpoint that records the same one takes the recorded keyword arguments
it does not set.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from otfuse import zoo
from otfuse.checkpoints import (
    TORCH_SUFFIXES,
    Architecture,
    ArchitectureUnknownError,
    LoadedModel,
    load_model,
    sidecar_path,
)
from otfuse.cli.common import ArgumentParser, UsageError, format_shape, parse_kwargs, parse_shape
from otfuse.errors import ArchitectureMismatchError, OtfuseError

ARCH_HELP = (
    "zoo name with keyword arguments (vgg11:width=2,batch_norm=true,in_shape=1x28x28) "
    "or module:callable[:k=v,...]"
)


def add_arch(p: ArgumentParser, *, required: bool = False, per_checkpoint: bool = False) -> None:
    if per_checkpoint:
        help = (
            f"{ARCH_HELP}; once for every checkpoint, or once per checkpoint in their order "
            "(default: the architecture each checkpoint records)"
        )
        p.add_argument("--arch", action="append", default=None, metavar="ARCH", help=help)
    else:
        default = "required" if required else "default: the architecture the checkpoint records"
        p.add_argument("--arch", required=required, default=None, help=f"{ARCH_HELP}; {default}")
    if not required:
        p.add_argument(
            "--in-shape",
            type=parse_shape,
            default=None,
            metavar="CxHxW",
            help="shape of one input, e.g. 1x28x28 (default: the checkpoint's record, or the data)",
        )


def parse_arch(text: str) -> Architecture:
    """``ARCH`` -> :class:`~otfuse.checkpoints.Architecture`."""
    parts = text.strip().split(":", 2)
    if len(parts) == 1 or (len(parts) == 2 and (parts[0] in zoo.names() or "=" in parts[1])):
        name = parts[0]
        if name not in zoo.names():
            raise UsageError(
                f"unknown model '{name}' in --arch: choose one of {', '.join(zoo.names())}, "
                "or give module:callable"
            )
        kwargs = parse_kwargs(parts[1], f"--arch {text}") if len(parts) == 2 else {}
        shape = kwargs.get("in_shape")
        return Architecture(name, kwargs, tuple(shape) if isinstance(shape, tuple) else None)
    module, func = parts[0], parts[1]
    if not module or not func.isidentifier():
        raise UsageError(f"--arch {text}: expected a zoo name or module:callable[:k=v,...]")
    kwargs = parse_kwargs(parts[2], f"--arch {text}") if len(parts) == 3 else {}
    return Architecture(f"{module}:{func}", kwargs)


def archs_for(texts: Sequence[str] | str | None, n: int) -> list[Architecture | None]:
    """One architecture (or None: the recorded one) per checkpoint."""
    if texts is None:
        return [None] * n
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) not in (1, n):
        raise UsageError(
            f"--arch is given {len(texts)} times for {n} checkpoints; give it once (for every "
            "checkpoint) or once per checkpoint"
        )
    archs = [parse_arch(t) for t in texts]
    if any(not a.is_zoo for a in archs) and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` would: the user's package in this folder
    return archs * n if len(archs) == 1 else archs


def load_models(
    paths: Sequence[str],
    archs: Sequence[Architecture | None],
    defaults: Mapping[str, object] | None = None,
) -> list[LoadedModel]:
    """Read, build and check every checkpoint (one-line errors that say which flag to pass)."""
    loaded = []
    for path, arch in zip(paths, archs):
        try:
            loaded.append(load_model(path, arch, defaults))
        except zoo.ModelConfigError as exc:
            if arch is None:  # the checkpoint's own record is at fault, not the command line
                raise
            raise UsageError(f"--arch {arch}: {exc}") from exc
        except ArchitectureUnknownError as exc:
            if exc.recorded is None:
                raise UsageError(
                    f"{path} records no architecture; pass --arch ARCH (a zoo name like "
                    "mlpnet:width=0.5, or module:callable)"
                ) from exc
            raise UsageError(
                f"{path} was built by {exc.recorded.target}; pass --arch {exc.recorded} to import "
                "it (otfuse never imports code named in a file)"
            ) from exc
    return loaded


def name(item: LoadedModel) -> str:
    return str(item.checkpoint.path)


def in_shape_of(
    items: Sequence[LoadedModel], given: Sequence[int] | None
) -> tuple[int, ...] | None:
    """``--in-shape``, else the shape every checkpoint records (they must agree), else None."""
    if given is not None:
        return tuple(given)
    first: tuple[str, tuple[int, ...]] | None = None
    for item in items:
        shape = item.in_shape
        if shape is None:
            continue
        if first is None:
            first = (name(item), tuple(shape))
        elif tuple(shape) != first[1]:
            raise OtfuseError(
                f"{first[0]} takes inputs of shape {format_shape(first[1])} but {name(item)} "
                f"{format_shape(shape)}; use models of one input shape"
            )
    return first[1] if first is not None else None


def need_in_shape(shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is None:
        raise UsageError(
            "the checkpoints record no input shape; pass --in-shape CxHxW (e.g. 1x28x28) so otfuse "
            "can trace the models"
        )
    return shape


def check_accepts(
    items: Sequence[LoadedModel] | Sequence[tuple[str, nn.Module]],
    inputs: torch.Tensor,
    what: str,
    *,
    hint: str = "check --arch and --in-shape",
    num_classes: int | None = None,
    min_classes: int | None = None,
) -> None:
    """A trial forward pass of two inputs through every model: a model that cannot take them, or
    gives no (2, classes) logits, is a one-line error naming the model and the inputs."""
    x = inputs[:2]
    for item in items:
        label, model = (name(item), item.model) if isinstance(item, LoadedModel) else item
        recorded = item.in_shape if isinstance(item, LoadedModel) else None
        try:
            with torch.no_grad(), _eval_mode(model):
                out = model(x.clone())  # a model may change its input in place
        except Exception as exc:  # a model that cannot take these inputs: a mismatch, not our bug
            shape = format_shape(x.shape[1:])
            known = ""
            if recorded is not None and tuple(recorded) != tuple(x.shape[1:]):
                known = f"; it records inputs of shape {format_shape(recorded)}"
            raise OtfuseError(
                f"{label} does not accept {what} of shape {shape} ({type(exc).__name__}: "
                f"{_first_line(exc)}){known}; {hint}"
            ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(x):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise OtfuseError(
                f"{label} gives outputs of shape {shape} for {len(x)} inputs; expected "
                f"({len(x)}, classes) logits"
            )
        if num_classes is not None and out.shape[1] != num_classes:
            raise OtfuseError(
                f"{label} gives {out.shape[1]} outputs per input but {what} have {num_classes} "
                "classes: check num_classes in --arch"
            )
        if min_classes is not None and out.shape[1] < min_classes:
            raise OtfuseError(
                f"{label} gives {out.shape[1]} outputs per input but the labels of {what} go up "
                f"to {min_classes - 1}"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def check_same_parameters(items: Sequence[LoadedModel]) -> None:
    """Raise a one-line error naming two checkpoints whose parameter names differ."""
    first = items[0]
    keys = set(first.checkpoint.state_dict)
    for item in items[1:]:
        differ = sorted(keys ^ set(item.checkpoint.state_dict))
        if differ:
            shown = ", ".join(repr(k) for k in differ[:3]) + (" ..." if len(differ) > 3 else "")
            raise ArchitectureMismatchError(
                f"{name(item)} and {name(first)} have different parameters ({shown}); "
                "use checkpoints of one architecture family"
            )


@contextlib.contextmanager
def naming(items: Sequence[LoadedModel]) -> Iterator[None]:
    """Say which checkpoints a mismatch found by the library is about."""
    try:
        yield
    except ArchitectureMismatchError as exc:
        names = ", ".join(name(item) for item in items)
        raise ArchitectureMismatchError(f"{names} do not share one architecture: {exc}") from exc


def check_output(path: str | None, force: bool, fmt: str | None = None) -> Path:
    """The output path, refused before any work if it or its sidecar ``OUT.json`` exists (without
    --force) or it contradicts --format."""
    if path is None:
        raise UsageError("the output is missing: pass -o OUT")
    out = Path(path)
    if out.is_dir():
        raise OtfuseError(f"{out} is a folder; pass a file name to -o")
    if out.parent.exists() and not out.parent.is_dir():
        raise OtfuseError(f"cannot write {out}: {out.parent} is a file, not a folder")
    for existing in (out, sidecar_path(out)):
        if existing.exists() and not force:
            raise OtfuseError(f"{existing} exists; pass --force to overwrite it")
    suffix = out.suffix.lower()
    by_suffix = (
        "pt" if suffix in TORCH_SUFFIXES else "safetensors" if suffix == ".safetensors" else None
    )
    if fmt is not None and by_suffix is not None and fmt != by_suffix:
        raise UsageError(f"-o {out} has suffix {suffix} but --format is {fmt}; make them agree")
    return out
