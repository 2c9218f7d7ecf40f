"""What a checkpoint records about the model that holds its weights: its architecture.

``metadata["arch"]`` is a zoo model's ``otfuse_config`` (``{"name": "mlpnet", ..., "in_shape": [1, 28,
28]}``), or ``{"callable": "module:func", "kwargs": {...}, "in_shape": [...]}`` for a model built by
an import path, or ``{"class": ...}`` (for people; it cannot be rebuilt). :func:`architecture_record`
writes it, :func:`read_architecture` reads it back as an :class:`Architecture`,
:func:`recorded_in_shape` gives the shape of one input. :func:`otfuse.checkpoints.load_model` builds
the model of a checkpoint from it; everything here is also importable from :mod:`otfuse.checkpoints`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from otfuse.errors import CheckpointError, OtfuseError

__all__ = [
    "Architecture",
    "ArchitectureUnknownError",
    "architecture_record",
    "read_architecture",
    "recorded_in_shape",
]


class ArchitectureUnknownError(CheckpointError):
    """A checkpoint records no architecture otfuse may build by itself.

    ``recorded`` is the import path it names (which otfuse never imports unasked), or None when the
    file records no architecture at all.
    """

    def __init__(self, message: str, path: Path, recorded: Architecture | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.recorded = recorded


@dataclass(frozen=True)
class Architecture:
    """How to build a model: a zoo name (``mlpnet``) or an import path (``mypkg.models:make_net``),
    its keyword arguments, and the shape of one input (C, H, W) when known."""

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    in_shape: tuple[int, ...] | None = None

    @property
    def is_zoo(self) -> bool:
        return ":" not in self.target

    def __str__(self) -> str:
        args = ",".join(f"{k}={_format_value(v)}" for k, v in self.kwargs.items())
        return f"{self.target}:{args}" if args else self.target

    def build(
        self, defaults: Mapping[str, Any] | None = None, *, allow_import: bool = True
    ) -> nn.Module:
        """The model. ``defaults`` (e.g. ``in_shape``, ``num_classes``) fill the arguments that
        ``kwargs`` leaves out and the builder takes. An import path is imported only with
        ``allow_import``; the builder's own exceptions become one-line :class:`OtfuseError`."""
        from otfuse import zoo

        defaults = {k: v for k, v in (defaults or {}).items() if k not in self.kwargs}
        if self.is_zoo:
            model = zoo.create(self.target, **self.kwargs)
            config = model.otfuse_config
            extra = {k: v for k, v in defaults.items() if k in config and config[k] != _lists(v)}
            return zoo.create(self.target, **self.kwargs, **extra) if extra else model
        if not allow_import:
            raise OtfuseError(f"building {self.target} needs importing it (allow_import=True)")
        builder = self._import()
        extra = {k: v for k, v in defaults.items() if k in _parameters(builder)}
        try:
            model = builder(**self.kwargs, **extra)
        except Exception as exc:  # the user's own code: report it, do not crash
            raise OtfuseError(
                f"{self}: {self.target}(...) raised {type(exc).__name__}: {_one_line(exc)}; "
                "call it in Python to see the traceback"
            ) from exc
        if not isinstance(model, nn.Module):
            raise OtfuseError(
                f"{self}: {self.target} returned a {type(model).__name__}, not an nn.Module"
            )
        return model

    def _import(self) -> Callable[..., object]:
        module_name, _, func = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, SyntaxError, or anything the module raises
            raise OtfuseError(
                f"{self}: cannot import {module_name} ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc
        builder = getattr(module, func, None)
        if not callable(builder):
            raise OtfuseError(f"{self}: {module_name} has no callable '{func}'")
        return builder


def architecture_record(
    model: nn.Module,
    architecture: Architecture | None = None,
    *,
    in_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """What ``metadata["arch"]`` says about ``model``: a zoo model's ``otfuse_config`` (which holds
    its ``in_shape``), else ``{"callable": "module:func", "kwargs": {...}, "in_shape": [...]}`` for
    a model built by ``architecture``, else the model's class (for people; it cannot be rebuilt)."""
    config = getattr(model, "otfuse_config", None)
    if isinstance(config, Mapping) and (architecture is None or architecture.is_zoo):
        return _lists(dict(config))
    shape = in_shape if in_shape is not None else getattr(architecture, "in_shape", None)
    if architecture is not None:
        record: dict[str, Any] = {"callable": architecture.target}
        record["kwargs"] = _lists(dict(architecture.kwargs))
    else:
        record = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    if shape is not None:
        record["in_shape"] = [int(s) for s in shape]
    return record


def read_architecture(metadata: Mapping[str, Any]) -> Architecture | None:
    """The :class:`Architecture` a checkpoint's metadata records, or None."""
    from otfuse import zoo

    arch = metadata.get("arch")
    if not isinstance(arch, Mapping):
        return None
    if arch.get("name") in zoo.names():
        kwargs = {str(k): _tuples(v) for k, v in arch.items() if k != "name"}
        return Architecture(str(arch["name"]), kwargs, _shape(kwargs.get("in_shape")))
    if isinstance(arch.get("callable"), str) and ":" in arch["callable"]:
        kwargs = arch.get("kwargs") if isinstance(arch.get("kwargs"), Mapping) else {}
        kwargs = {str(k): _tuples(v) for k, v in kwargs.items()}
        return Architecture(arch["callable"], kwargs, _shape(arch.get("in_shape")))
    return None


def recorded_in_shape(metadata: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The shape of one input a checkpoint records (in its architecture), or None."""
    arch = metadata.get("arch")
    if not isinstance(arch, Mapping):
        return None
    return _shape(arch.get("in_shape"))


def _parameters(builder: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}


def _shape(value: Any) -> tuple[int, ...] | None:
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return tuple(value)
    return None


def _format_value(value: object) -> str:
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        return "x".join(str(v) for v in value) if len(value) > 1 else f"({value[0]},)"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_format_value(v) for v in value) + ")"
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _lists(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    return [_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _one_line(exc: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
