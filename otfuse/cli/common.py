"""What every command shares: the usage error, the parser class, reports, and values of options."""

from __future__ import annotations

import argparse
import ast
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from otfuse.errors import OtfuseError
from otfuse.jsonsafe import jsonable  # noqa: F401 - re-exported for the commands

PROG = "otfuse"


class UsageError(OtfuseError):
    """A wrong command line or config file: exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake raises :class:`UsageError` (printed in one line by ``main``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass
class Report:
    """What a command found: ``text`` (results, for people), ``payload`` (for ``--json``) and
    ``notes`` (what was written; left out by ``--quiet``)."""

    text: str
    payload: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Stopwatch:
    """Wall time per step of a command; the steps and ``other`` add up to ``total``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.steps[step] = self.steps.get(step, 0.0) + time.perf_counter() - begin

    def seconds(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = dict(self.steps)
        out["other"] = max(0.0, total - sum(self.steps.values()))
        out["total"] = total
        return out


def command(commands, name: str, handler: Callable, help: str) -> ArgumentParser:
    """A sub-command with the options every command has (-q, --json)."""
    p = commands.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler, parser=p)
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print the results only: no progress, no notes"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def add_device(p: ArgumentParser) -> None:
    """``--device``: where the models, the data and the fusion run (a run option, not a recipe)."""
    p.add_argument(
        "--device", default="cpu", metavar="DEVICE",
        help=f"where to run: {DEVICES} (auto: cuda if present, else mps, else cpu; default cpu)",
    )  # fmt: skip


def parse_device(text: str) -> torch.device:
    """The device ``text`` names, checked to be present here; a one-line :class:`UsageError` if not.

    ``auto`` is the first of cuda, mps and cpu that is present.
    """
    text = text.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a device; use {DEVICES}") from None
    problem = _unavailable(device)
    if problem is not None:
        raise UsageError(f"--device {text}: {problem}; use --device cpu (or auto)")
    return device


def _unavailable(device: torch.device) -> str | None:
    """Why ``device`` cannot be used here, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), numbered 0..{count - 1}"
        return None
    if device.type == "mps":
        return None if _mps_available() else "MPS is not available on this machine"
    return f"otfuse runs on {DEVICES}, not {device.type}"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def add_output(p: ArgumentParser, what: str, metavar: str = "OUT", force: bool = True) -> None:
    p.add_argument("-o", "--output", default=None, metavar=metavar, help=what)
    if force:
        p.add_argument("--force", action="store_true", help=f"overwrite {metavar} if it exists")


# --------------------------------------------------------------------------------------------------
# Values of options


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x28x28`` or ``1,28,28`` -> (1, 28, 28)."""
    inner = str(text).strip()
    if inner[:1] in "([" and inner[-1:] in ")]":
        inner = inner[1:-1].strip()
    inner = inner.removesuffix(",").strip()  # Python's one-element tuple: (784,)
    parts = re.split(r"\s*[x,]\s*|\s+", inner)  # an empty part: a separator too many
    if not inner or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1x28x28")
    return tuple(int(p) for p in parts)


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def parse_int(text: str, minimum: int | None = None) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def parse_positive_int(text: str) -> int:
    return parse_int(text, 1)


def parse_float(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def parse_positive_float(text: str) -> float:
    value = parse_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_value(text: str) -> object:
    """A keyword argument's value: true/false, none, 1x28x28, numbers, (16,8) or [16,8], else text."""
    word = text.strip()
    low = word.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"\d+(x\d+)+", low):
        return tuple(int(p) for p in low.split("x"))
    try:
        value = ast.literal_eval(word)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return word
    return tuple(value) if isinstance(value, list) else value


def parse_kwargs(text: str, where: str) -> dict[str, object]:
    """``width=2,hidden=(16,8)`` -> {"width": 2, "hidden": (16, 8)} (commas in brackets kept)."""
    kwargs: dict[str, object] = {}
    for item in split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"{where}: '{item}' is not a keyword argument like width=2")
        kwargs[key] = parse_value(value)
    return kwargs


def split_top_level(text: str) -> list[str]:
    """``a,(b,c),d`` -> ["a", "(b,c)", "d"]."""
    items, depth, current = [], 0, []
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item for item in items if item.strip()]


# --------------------------------------------------------------------------------------------------
# JSON
