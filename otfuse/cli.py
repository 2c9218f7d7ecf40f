"""The ``otfuse`` command line: fuse, evaluate, train, inspect and interpolate users' own models.

::

    otfuse train --arch mlpnet --data fashion-mnist -o a.safetensors --seed 1
    otfuse inspect a.safetensors
    otfuse fuse a.safetensors b.safetensors -o fused.safetensors --data fashion-mnist --eval
    otfuse eval fused.safetensors --data fashion-mnist
    otfuse interpolate a.safetensors b.safetensors --data fashion-mnist -o path/

``ARCH`` (``--arch``) is a zoo name with keyword arguments, ``vgg11:width=2,batch_norm=true,
in_shape=1x28x28``, or an import path to a callable returning an ``nn.Module``,
``mypkg.models:make_net`` or ``mypkg.models:make_net:width=2``. Checkpoints written by otfuse record
their zoo architecture, so ``--arch`` may be left out for them (a checkpoint never makes otfuse
import code). Where a dataset is given, ``in_shape`` and ``num_classes`` default to the dataset's.

Options of ``otfuse fuse`` that are not given (by a flag or in ``--config``) are not passed to
:func:`otfuse.fuse`, so the library's defaults apply.

Exit codes: 0 success; 1 a bad input (file, data, models) or an operation that cannot be done;
2 a wrong command line or config; 130 interrupted. Every error is one line on stderr,
``otfuse: error: ...``; every file is written atomically, so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import importlib
import inspect
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
import yaml
from torch import nn

import otfuse
from otfuse import zoo
from otfuse.activations import ActivationPoint
from otfuse.alignment import ALIGN_FIELDS, MODES
from otfuse.checkpoints import (
    FORMATS,
    TORCH_SUFFIXES,
    Checkpoint,
    atomic_write_bytes,
    atomic_write_text,
    check_finite,
    load_into,
    load_state_dict,
    save_model,
)
from otfuse.cost import CostName, MarginalName
from otfuse.data import Dataset, dataset_names, load_dataset
from otfuse.errors import ArchitectureMismatchError, OtfuseError
from otfuse.interpolation import PathPoint, accuracy_drop, interpolate, loss_barrier
from otfuse.recipes import recipe_names, resolve
from otfuse.repair import REPAIRS
from otfuse.training import TrainConfig, evaluate, seed_everything, train
from otfuse.transport import SolverName

PROG = "otfuse"
ALIGN_OPTIONS = ALIGN_FIELDS
RECIPE_OPTIONS = (*ALIGN_OPTIONS, "repair", "refine", "to_average", "max_sweeps", "synthesize")
FUSE_OPTIONS = ("recipe", *RECIPE_OPTIONS, "weights", "anchor")
NOT_IN_CONFIG = {"help", "config", "print_config", "force", "quiet", "json", "handler", "parser"}


class UsageError(OtfuseError):
    """A wrong command line or config file: exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake raises :class:`UsageError` (printed in one line by ``main``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass
class Report:
    """What a command found: ``text`` for people, ``payload`` for ``--json``."""

    text: str
    payload: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 user error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        with _one_line_warnings():
            args = parser.parse_args(argv)
            stdout = sys.stdout
            # in --json mode anything a library prints goes to stderr; stdout holds one JSON object
            redirect = contextlib.redirect_stdout(sys.stderr) if args.json else _no_redirect()
            with redirect:
                report = args.handler(args)
    except UsageError as exc:
        return _fail(exc, 2)
    except OtfuseError as exc:
        return _fail(exc, 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    if args.json:
        print(json.dumps(_jsonable(report.payload), indent=2), file=stdout)
    elif report.text:
        print(report.text, file=stdout)
    return 0


def _fail(error: BaseException | str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status


@contextlib.contextmanager
def _no_redirect() -> Iterator[None]:
    yield


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# --------------------------------------------------------------------------------------------------
# The parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Fuse trained PyTorch models by aligning their neurons with optimal transport.",
        epilog="Run 'otfuse COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {otfuse.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_fuse(commands)
    _add_eval(commands)
    _add_train(commands)
    _add_inspect(commands)
    _add_interpolate(commands)
    _add_demo(commands)
    _add_experiment(commands)
    return parser


def _command(commands, name: str, handler: Callable, help: str) -> ArgumentParser:
    p = commands.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler, parser=p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def _add_arch(p: ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--arch",
        required=required,
        default=None,
        help="zoo name with keyword arguments (vgg11:width=2,batch_norm=true,in_shape=1x28x28) "
        "or module:callable[:k=v,...]; "
        + ("required" if required else "default: the architecture recorded in the checkpoint"),
    )
    p.add_argument(
        "--in-shape",
        type=parse_shape,
        default=None,
        metavar="CxHxW",
        help="shape of one input, e.g. 1x28x28 (default: from ARCH or the data)",
    )


def _add_data(p: ArgumentParser, required: bool, split: str | None) -> None:
    names = ", ".join(dataset_names())
    p.add_argument("--data", required=required, default=None, metavar="NAME", help=names)
    p.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    if split is not None:
        p.add_argument(
            "--split",
            choices=("train", "test"),
            default=None,
            help=f"split to use (default {split})",
        )


def _add_output(p: ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", default=None, metavar="OUT", help=what)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def _add_align_options(p: ArgumentParser) -> None:
    """The alignment options of otfuse.align / otfuse.fuse; None means 'not given'."""
    g = p.add_argument_group("alignment (not given: otfuse decides)")
    g.add_argument("--mode", choices=MODES, default=None, help="wts (data-free) or acts (data)")
    g.add_argument("--solver", choices=get_args(SolverName), default=None)
    g.add_argument("--cost", choices=get_args(CostName), default=None, help="ground metric")
    g.add_argument("--marginals", choices=get_args(MarginalName), default=None)
    g.add_argument("--reg", type=parse_positive_float, default=None, help="Sinkhorn's entropy")
    g.add_argument("--activations", choices=get_args(ActivationPoint), default=None)
    g.add_argument("--num-samples", type=parse_positive_int, default=None, help="for acts/repair")
    g.add_argument("--seed", type=int, default=None, help="seed of the activation sample")
    g.add_argument(
        "--outgoing",
        choices=("average", "sum"),
        default=None,
        help="outgoing weights of units merged across widths: average (paper) or sum (keeps scale)",
    )


def _add_fuse(commands) -> None:
    p = _command(commands, "fuse", cmd_fuse, "fuse two or more checkpoints into one model")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="two or more checkpoints")
    _add_arch(p)
    _add_output(p, "the fused checkpoint (and OUT.json with the settings and results)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from OUT's suffix")
    _add_data(p, required=False, split="train")
    _add_align_options(p)
    g = p.add_argument_group("fusion (not given: otfuse decides)")
    g.add_argument(
        "--recipe",
        choices=recipe_names(),
        default=None,
        help="named defaults (otfuse's default: data with --data, else data-free)",
    )
    g.add_argument("--weights", type=parse_weights, default=None, help="e.g. 1,2: one per model")
    g.add_argument("--anchor", type=int, default=None, help="index of the anchor model")
    g.add_argument("--repair", choices=REPAIRS, default=None, help="statistics repair (needs data)")
    g.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-solve every plan against all its weights after the greedy pass",
    )
    g.add_argument(
        "--to-average",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="K > 2: align every model to the running average",
    )
    g.add_argument("--max-sweeps", type=parse_positive_int, default=None, help="for the two above")
    g.add_argument(
        "--synthesize",
        type=parse_count,
        default=None,
        metavar="N",
        help="without --data: synthesise N inputs from the models themselves (0: off)",
    )
    p.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate the parents, the baselines and the fused model on the test split",
    )
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="options; flags override")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")


def _add_eval(commands) -> None:
    p = _command(commands, "eval", cmd_eval, "accuracy and loss of a checkpoint on a dataset")
    p.add_argument("checkpoint", metavar="CKPT")
    _add_arch(p)
    _add_data(p, required=True, split="test")


def _add_train(commands) -> None:
    p = _command(commands, "train", cmd_train, "train a zoo model on a dataset")
    _add_arch(p, required=True)
    _add_data(p, required=True, split=None)
    _add_output(p, "the trained checkpoint (and OUT.json with its metadata)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from OUT's suffix")
    g = p.add_argument_group("training (defaults: otfuse.training.TrainConfig's)")
    g.add_argument("--epochs", type=parse_positive_int, default=None)
    g.add_argument("--lr", type=parse_positive_float, default=None)
    g.add_argument("--batch-size", type=parse_positive_int, default=None)
    g.add_argument("--seed", type=int, default=None, help="seeds the weights and the shuffling")
    g.add_argument("--subset", type=parse_positive_int, default=None, metavar="N",
                   help="train on a seeded random subset of N examples")  # fmt: skip


def _add_inspect(commands) -> None:
    p = _command(commands, "inspect", cmd_inspect, "list the neuron spaces otfuse finds")
    p.add_argument("checkpoint", metavar="CKPT")
    _add_arch(p)


def _add_interpolate(commands) -> None:
    p = _command(
        commands,
        "interpolate",
        cmd_interpolate,
        "loss and accuracy along (1-t)A + tB, plain and aligned",
    )
    p.add_argument("model_a", metavar="A")
    p.add_argument("model_b", metavar="B")
    _add_arch(p)
    _add_data(p, required=True, split="test")
    _add_output(p, "folder for interpolation.csv, .png and .json")
    p.add_argument("--steps", type=parse_positive_int, default=11, help="points on the path")
    _add_align_options(p)


def _add_demo(commands) -> None:
    p = _command(commands, "demo", cmd_demo, "fuse models on real data and show what it gains")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--out", default=None, metavar="DIR", help="default: the demo's")


def _add_experiment(commands) -> None:
    p = _command(commands, "experiment", cmd_experiment, "run one of the paper's experiments")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--out", default=None, metavar="DIR", help="default: the experiment's")
    p.add_argument("--data-dir", default=None)


# --------------------------------------------------------------------------------------------------
# Values of options


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x28x28`` or ``1,28,28`` -> (1, 28, 28)."""
    parts = [p for p in re.split(r"[x,\s]+", str(text).strip().strip("()[]")) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like 1x28x28")
    return tuple(int(p) for p in parts)


def parse_weights(text: str) -> list[float]:
    """``1,2`` -> [1.0, 2.0]."""
    try:
        weights = [float(w) for w in str(text).strip("[]() ").split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of numbers like 1,2") from None
    if not weights or not all(math.isfinite(w) for w in weights):
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of finite numbers like 1,2")
    return weights


def _parse_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def parse_positive_int(text: str) -> int:
    return _parse_int(text, 1)


def parse_count(text: str) -> int:
    return _parse_int(text, 0)


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (value > 0 and math.isfinite(value)):
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
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"{where}: '{item}' is not a keyword argument like width=2")
        kwargs[key] = parse_value(value)
    return kwargs


def _split_top_level(text: str) -> list[str]:
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
# Architectures


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: a zoo name or an import path ``module:callable``, with keyword arguments."""

    target: str
    kwargs: dict[str, object]
    is_zoo: bool

    @classmethod
    def parse(cls, text: str) -> ArchSpec:
        parts = text.strip().split(":", 2)
        if len(parts) == 1 or (len(parts) == 2 and (parts[0] in zoo.names() or "=" in parts[1])):
            name = parts[0]
            if name not in zoo.names():
                raise UsageError(
                    f"unknown model '{name}' in --arch: choose one of {', '.join(zoo.names())}, "
                    "or give module:callable"
                )
            kwargs = parse_kwargs(parts[1], f"--arch {text}") if len(parts) == 2 else {}
            return cls(name, kwargs, True)
        module, func = parts[0], parts[1]
        if not module or not func.isidentifier():
            raise UsageError(f"--arch {text}: expected a zoo name or module:callable[:k=v,...]")
        kwargs = parse_kwargs(parts[2], f"--arch {text}") if len(parts) == 3 else {}
        return cls(f"{module}:{func}", kwargs, False)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], path: Path) -> ArchSpec:
        """The zoo architecture a checkpoint records; never imports code named in a file."""
        arch = metadata.get("arch")
        if isinstance(arch, Mapping) and arch.get("name") in zoo.names():
            kwargs = {k: _tuples(v) for k, v in arch.items() if k != "name"}
            return cls(str(arch["name"]), kwargs, True)
        if isinstance(arch, Mapping) and isinstance(arch.get("callable"), str):
            raise UsageError(
                f"{path} was built by {arch['callable']}; pass --arch {arch['callable']}[:k=v,...] "
                "to import it (otfuse never imports code named in a file)"
            )
        raise UsageError(
            f"{path} records no architecture; pass --arch ARCH (a zoo name like mlpnet:width=0.5, "
            "or module:callable)"
        )

    def __str__(self) -> str:
        args = ",".join(f"{k}={_format_value(v)}" for k, v in self.kwargs.items())
        return f"{self.target}:{args}" if args else self.target

    def build(self, defaults: Mapping[str, object] | None = None) -> nn.Module:
        """The model; ``defaults`` (in_shape, num_classes) fill arguments ARCH does not set."""
        defaults = {k: v for k, v in (defaults or {}).items() if k not in self.kwargs}
        if self.is_zoo:
            model = zoo.create(self.target, **self.kwargs)
            config = model.otfuse_config
            extra = {k: v for k, v in defaults.items() if k in config and config[k] != _lists(v)}
            return zoo.create(self.target, **self.kwargs, **extra) if extra else model
        builder = self._import()
        extra = {k: v for k, v in defaults.items() if k in _parameters(builder)}
        try:
            model = builder(**self.kwargs, **extra)
        except Exception as exc:  # the user's own code: report it, do not crash
            raise OtfuseError(
                f"--arch {self}: {self.target}(...) raised {type(exc).__name__}: {exc}; "
                "call it in Python to see the traceback"
            ) from exc
        if not isinstance(model, nn.Module):
            raise OtfuseError(f"--arch {self}: {self.target} returned a {type(model).__name__}, "
                              "not an nn.Module")  # fmt: skip
        return model

    def _import(self) -> Callable[..., object]:
        module_name, func = self.target.split(":")
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())  # as `python -m` would: the user's package in this folder
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, SyntaxError, or anything the module raises
            raise OtfuseError(
                f"--arch {self}: cannot import {module_name} ({type(exc).__name__}: {exc})"
            ) from exc
        builder = getattr(module, func, None)
        if not callable(builder):
            raise OtfuseError(f"--arch {self}: {module_name} has no callable '{func}'")
        return builder

    def record(self, model: nn.Module) -> dict[str, object]:
        """What a checkpoint's metadata says about its architecture."""
        if self.is_zoo and hasattr(model, "otfuse_config"):
            return dict(model.otfuse_config)
        return {"callable": self.target, "kwargs": _lists(self.kwargs)}


def _parameters(builder: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}


def _format_value(value: object) -> str:
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value) and value:
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


# --------------------------------------------------------------------------------------------------
# Loading models and data


@dataclass
class Loaded:
    model: nn.Module
    checkpoint: Checkpoint
    arch: ArchSpec

    @property
    def name(self) -> str:
        return str(self.checkpoint.path)


def load_model(
    path: str, arch: ArchSpec | None, defaults: Mapping[str, object] | None = None
) -> Loaded:
    """Read ``path`` safely, build its architecture and load the weights (checked to fit and be finite)."""
    checkpoint = load_state_dict(path)
    arch = arch or ArchSpec.from_metadata(checkpoint.metadata, Path(path))
    model = arch.build(defaults)
    load_into(model, checkpoint)
    check_finite(checkpoint.state_dict, str(path))
    model.eval()
    return Loaded(model, checkpoint, arch)


def data_defaults(dataset: Dataset | None) -> dict[str, object]:
    if dataset is None:
        return {}
    return {"in_shape": dataset.input_shape, "num_classes": dataset.num_classes}


def check_accepts(model: nn.Module, dataset: Dataset, name: str) -> None:
    """Raise a one-line error unless ``model`` maps the dataset's images to one logit per class."""
    try:
        with torch.no_grad():
            logits = model.eval()(dataset.images[:2])
    except Exception as exc:  # a model that cannot take these inputs: a mismatch, not our bug
        raise OtfuseError(
            f"{name} does not accept {dataset.name} images of shape {dataset.input_shape} "
            f"({type(exc).__name__}: {exc}); check --arch and --in-shape"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.shape != (2, dataset.num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise OtfuseError(
            f"{name} gives outputs of shape {shape} for 2 {dataset.name} images; expected "
            f"(2, {dataset.num_classes}) logits: check num_classes in --arch"
        )


def example_input(model: nn.Module, in_shape: Sequence[int] | None) -> torch.Tensor:
    shape = in_shape or getattr(model, "otfuse_config", {}).get("in_shape")
    if not shape:
        raise UsageError("pass --in-shape CxHxW (e.g. 1x28x28) so otfuse can trace the model")
    return torch.zeros(2, *shape)


def check_output(path: str | None, force: bool, fmt: str | None = None) -> Path:
    """The output path, refused before any work if it exists (without --force) or contradicts --format."""
    if path is None:
        raise UsageError("the output is missing: pass -o OUT")
    out = Path(path)
    if out.is_dir():
        raise OtfuseError(f"{out} is a folder; pass a file name to -o")
    if out.parent.exists() and not out.parent.is_dir():
        raise OtfuseError(f"cannot write {out}: {out.parent} is a file, not a folder")
    if out.exists() and not force:
        raise OtfuseError(f"{out} exists; pass --force to overwrite it")
    suffix = out.suffix.lower()
    by_suffix = (
        "pt" if suffix in TORCH_SUFFIXES else "safetensors" if suffix == ".safetensors" else None
    )
    if fmt is not None and by_suffix is not None and fmt != by_suffix:
        raise UsageError(f"-o {out} has suffix {suffix} but --format is {fmt}; make them agree")
    return out


def check_same_parameters(loaded: Sequence[Loaded]) -> None:
    """Raise a one-line error naming two checkpoints whose parameter names differ."""
    first = loaded[0]
    keys = set(first.checkpoint.state_dict)
    for item in loaded[1:]:
        differ = sorted(keys ^ set(item.checkpoint.state_dict))
        if differ:
            shown = ", ".join(repr(k) for k in differ[:3]) + (" ..." if len(differ) > 3 else "")
            raise ArchitectureMismatchError(
                f"{item.name} and {first.name} have different parameters ({shown}); "
                "use checkpoints of one architecture family"
            )


@contextlib.contextmanager
def _naming(loaded: Sequence[Loaded]) -> Iterator[None]:
    """Say which checkpoints a mismatch found by the library is about."""
    try:
        yield
    except ArchitectureMismatchError as exc:
        names = ", ".join(item.name for item in loaded)
        raise ArchitectureMismatchError(f"{names} do not share one architecture: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# otfuse fuse


def cmd_fuse(args: argparse.Namespace) -> Report:
    config = resolve_fuse_config(args)
    if args.print_config:
        return Report(config_yaml(config), {"config": config})
    check_fuse_usage(config)
    out = check_output(config.get("output"), args.force, config.get("format"))
    arch = ArchSpec.parse(config["arch"]) if "arch" in config else None
    data = _load_data(config, config.get("split", "train"))
    loaded = [load_model(p, arch, data_defaults(data)) for p in config["checkpoints"]]
    test_set = _load_data(config, "test") if config.get("eval") else None
    for item in loaded:
        for dataset in (data, test_set):
            if dataset is not None:
                check_accepts(item.model, dataset, item.name)
    if data is None and "in_shape" not in config:
        example_input(loaded[0].model, None)  # a clear message when nothing tells the input shape
    check_same_parameters(loaded)
    with _naming(loaded):
        kwargs = fuse_kwargs(config, data)
        result = otfuse.fuse([item.model for item in loaded], progress=not args.quiet, **kwargs)
    evaluation = evaluate_fusion(loaded, result, test_set) if test_set is not None else None
    metadata = fuse_metadata(config, loaded, result, data, evaluation)
    save_model(out, result.model, metadata, format=config.get("format"), overwrite=args.force)
    payload = {"output": str(out), "metadata_file": f"{out}.json", **metadata}
    return Report(fuse_text(loaded, result, metadata, out), payload)


def resolve_fuse_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options given in --config, overridden by those given as flags; nothing else."""
    actions = {a.dest: a for a in args.parser._actions if a.dest not in NOT_IN_CONFIG}
    config = read_config(args.config, actions) if args.config else {}
    for dest in actions:
        value = getattr(args, dest)
        if value is not None and value != []:
            config[dest] = value
    return {dest: config[dest] for dest in actions if dest in config}  # a stable order


def read_config(path: str, actions: Mapping[str, argparse.Action]) -> dict[str, Any]:
    """A YAML mapping of option names (``num_samples`` or ``num-samples``) to values."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise OtfuseError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OtfuseError(
            f"config {path} is not valid YAML ({' '.join(str(exc).split())})"
        ) from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(
            f"config {path} must be a mapping of option: value, not a {type(doc).__name__}"
        )
    config = {}
    for key, value in doc.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UsageError(
                f"config {path}: unknown option '{key}'; valid options are {', '.join(actions)}"
            )
        config[dest] = config_value(actions[dest], str(key), value, path)
    return config


def config_value(action: argparse.Action, key: str, value: object, path: str) -> object:
    """Check and convert a config value with the same rules as the flag ``action``."""
    where = f"config {path}: '{key}'"
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, not {value!r}")
        return value
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise UsageError(f"{where} must be a list of file names")
        return items
    if value is None or isinstance(value, (bool, dict)):
        raise UsageError(f"{where} has the invalid value {value!r}")
    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    try:
        converted = (action.type or str)(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{where} must be one of {', '.join(map(str, action.choices))}")
    return converted


def config_yaml(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML that ``--config`` reads back; what the recipe fills in, as comments."""
    text = yaml.safe_dump(_lists(dict(config)), sort_keys=False, default_flow_style=None)
    settings = recipe_settings(config)
    left = [name for name in RECIPE_OPTIONS if name not in config]
    if left:
        text += f"# not given, so otfuse.fuse takes them from recipe '{settings['recipe']}':\n"
        text += "".join(f"#   {name}: {json.dumps(settings[name])}\n" for name in left)
    if settings["synthesize"] and "data" not in config:
        text += (
            f"# without data, models with BatchNorm or class outputs get {settings['synthesize']} "
            "synthesised inputs and the data recipe's options\n"
        )
    return text.rstrip("\n")


def recipe_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every option otfuse.fuse will use: the recipe's values, overridden by the given ones."""
    given = {name: config[name] for name in RECIPE_OPTIONS if name in config}
    return resolve(config.get("recipe"), "data" in config, **given)


def check_fuse_usage(config: Mapping[str, Any]) -> None:
    k = len(config.get("checkpoints", []))
    if k < 2:
        raise UsageError(f"fusion needs at least two checkpoints, got {k}")
    weights = config.get("weights")
    if weights is not None and len(weights) != k:
        raise UsageError(f"--weights has {len(weights)} numbers for {k} checkpoints; give one each")
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise UsageError("--weights must be non-negative and sum to a positive number")
    if not 0 <= config.get("anchor", 0) < k:
        raise UsageError(f"--anchor must be an index in 0..{k - 1}, got {config['anchor']}")
    if "data" in config:
        return
    settings = recipe_settings(config)
    needs_data = {
        "mode acts": settings["mode"] == "acts",
        f"repair {settings['repair']}": settings["repair"] != "none",
        "--eval": bool(config.get("eval")),
    }
    for option, needed in needs_data.items():
        if needed:
            source = f" (from recipe '{settings['recipe']}')" if "recipe" in config else ""
            raise UsageError(f"{option}{source} needs data: pass --data NAME (e.g. fashion-mnist)")


def _load_data(config: Mapping[str, Any], split: str) -> Dataset | None:
    if "data" not in config:
        return None
    return load_dataset(config["data"], split, config.get("data_dir"))


def fuse_kwargs(config: Mapping[str, Any], data: Dataset | None) -> dict[str, Any]:
    """Keyword arguments for otfuse.fuse: only the options given, so the library decides the rest."""
    kwargs = {name: config[name] for name in FUSE_OPTIONS if name in config}
    if data is not None:
        kwargs["data"] = data
    if "in_shape" in config:
        kwargs["example_input"] = torch.zeros(2, *config["in_shape"])
    return kwargs


def evaluate_fusion(loaded: Sequence[Loaded], result, test_set: Dataset) -> list[dict[str, Any]]:
    """Accuracy and loss of each parent, the prediction ensemble, vanilla averaging and the fusion."""
    models = [item.model for item in loaded]
    rows = [(item.name, item.model) for item in loaded]
    rows.append(("ensemble", otfuse.ensemble(models, result.weights)))
    try:
        rows.append(("vanilla average", otfuse.vanilla_average(models, result.weights)))
    except OtfuseError:
        pass  # different widths: no one-to-one average
    rows.append(("OT fusion", result.model))
    out = []
    for name, model in rows:
        scores = evaluate(model, test_set)
        out.append({"model": name, "accuracy": scores.accuracy, "loss": scores.loss})
    return out


def fuse_metadata(
    config: Mapping[str, Any],
    loaded: Sequence[Loaded],
    result,
    data: Dataset | None,
    evaluation: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    anchor = loaded[result.anchor]
    settings = {**result.settings, "weights": result.weights, "anchor": result.anchor}
    metadata = {
        "otfuse_version": otfuse.__version__,
        "command": "fuse",
        "arch": anchor.arch.record(anchor.model),
        "inputs": [{"path": item.name, "sha256": item.checkpoint.sha256} for item in loaded],
        "data": None if data is None else {"name": data.name, "split": data.split},
        "requested": _lists({k: v for k, v in config.items() if k != "output"}),
        "settings": settings,
        "costs": result.costs(),
        "seconds": result.seconds,
        "timings": result.timings,
    }
    if evaluation is not None:
        metadata["evaluation"] = {"split": "test", "rows": evaluation}
    return metadata


def fuse_text(loaded: Sequence[Loaded], result, metadata: Mapping, out: Path) -> str:
    s = metadata["settings"]
    weights = ", ".join(f"{w:.3g}" for w in s["weights"])
    options = ", ".join(f"{k} {s[k]}" for k in RECIPE_OPTIONS if k in s)
    on = f" on {s['synthesize']} synthesised inputs" if s.get("data") == "synthesized" else ""
    lines = [
        f"fused {len(loaded)} models in {result.seconds:.2f} s with recipe {s.get('recipe')}{on}: "
        f"{options}",
        f"anchor {loaded[result.anchor].name}, weights {weights}",
        "transport cost per neuron space (model -> anchor):",
    ]
    for item, costs in zip(loaded, metadata["costs"]):
        if costs:
            lines.append(f"  {item.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in costs.items()))
    if "evaluation" in metadata:
        lines.append(score_table(metadata["evaluation"]["rows"], "test split"))
    lines.append(f"wrote {out} and {out}.json")
    return "\n".join(lines)


def score_table(rows: Sequence[Mapping[str, Any]], where: str) -> str:
    width = max(len("model"), *(len(r["model"]) for r in rows))
    lines = [f"{'model':<{width}}  accuracy    loss   ({where})"]
    for r in rows:
        lines.append(f"{r['model']:<{width}}  {r['accuracy']:7.2f}%  {r['loss']:6.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# otfuse eval, train, inspect


def cmd_eval(args: argparse.Namespace) -> Report:
    dataset = load_dataset(args.data, args.split or "test", args.data_dir)
    arch = ArchSpec.parse(args.arch) if args.arch else None
    item = load_model(args.checkpoint, arch, data_defaults(dataset))
    check_accepts(item.model, dataset, item.name)
    scores = evaluate(item.model, dataset)
    payload = {
        "checkpoint": item.name,
        "data": {"name": dataset.name, "split": dataset.split, "examples": len(dataset)},
        "accuracy": scores.accuracy,
        "loss": scores.loss,
    }
    text = (
        f"{item.name} on {dataset.name} {dataset.split} ({len(dataset)} examples): "
        f"accuracy {scores.accuracy:.2f}%, loss {scores.loss:.4f}"
    )
    return Report(text, payload)


def cmd_train(args: argparse.Namespace) -> Report:
    out = check_output(args.output, args.force, args.format)
    arch = ArchSpec.parse(args.arch)
    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    train_set = load_dataset(args.data, "train", args.data_dir)
    test_set = load_dataset(args.data, "test", args.data_dir)
    if args.subset is not None and args.subset < len(train_set):
        generator = torch.Generator().manual_seed(config.seed)
        train_set = train_set.subset(
            torch.randperm(len(train_set), generator=generator)[: args.subset]
        )
    seed_everything(config.seed)  # the initial weights too
    model = arch.build(data_defaults(train_set))
    check_accepts(model, train_set, f"--arch {arch}")
    start = time.perf_counter()
    history = train(model, train_set, config, progress=not args.quiet)
    seconds = time.perf_counter() - start
    scores = evaluate(model, test_set)
    metadata = {
        "otfuse_version": otfuse.__version__,
        "command": "train",
        "arch": arch.record(model),
        "data": {"name": train_set.name, "examples": len(train_set), "subset": args.subset},
        "train": dataclasses.asdict(config),
        "history": [dataclasses.asdict(e) for e in history.epochs],
        "seconds": seconds,
        "test_accuracy": scores.accuracy,
        "test_loss": scores.loss,
    }
    save_model(out, model, metadata, format=args.format, overwrite=args.force)
    text = (
        f"trained {arch} on {len(train_set)} {train_set.name} examples for {config.epochs} "
        f"epoch(s) in {seconds:.1f} s: test accuracy {scores.accuracy:.2f}%, "
        f"loss {scores.loss:.4f}\nwrote {out} and {out}.json"
    )
    return Report(text, {"output": str(out), "metadata_file": f"{out}.json", **metadata})


def cmd_inspect(args: argparse.Namespace) -> Report:
    arch = ArchSpec.parse(args.arch) if args.arch else None
    item = load_model(args.checkpoint, arch)
    graph = otfuse.spaces(item.model, example_input(item.model, args.in_shape))
    names = graph.names()
    spaces = [
        {
            "index": s.index,
            "name": s.name,
            "size": s.size,
            "fixed": s.fixed,
            "groups": s.groups,
            "members": [
                {
                    "param": m.param,
                    "axis": m.axis,
                    "role": m.role,
                    "layout": m.layout.describe(names),
                }
                for m in s.members
            ],
        }
        for s in graph.spaces
    ]
    payload = {"checkpoint": item.name, "arch": item.arch.record(item.model), "spaces": spaces}
    return Report(f"{item.name} ({item.arch}): {graph}", payload)


# --------------------------------------------------------------------------------------------------
# otfuse interpolate

CSV_COLUMNS = ("t", "plain_accuracy", "plain_loss", "aligned_accuracy", "aligned_loss")


def cmd_interpolate(args: argparse.Namespace) -> Report:
    if args.output is None:
        raise UsageError("the output folder is missing: pass -o DIR")
    folder = Path(args.output)
    files = {ext: folder / f"interpolation.{ext}" for ext in ("csv", "png", "json")}
    for path in files.values():
        check_output(str(path), args.force)
    if args.steps < 2:
        raise UsageError("--steps must be at least 2")
    eval_set = load_dataset(args.data, args.split or "test", args.data_dir)
    align_data = load_dataset(args.data, "train", args.data_dir)
    arch = ArchSpec.parse(args.arch) if args.arch else None
    a, b = (load_model(p, arch, data_defaults(eval_set)) for p in (args.model_a, args.model_b))
    for item in (a, b):
        check_accepts(item.model, eval_set, item.name)
    kwargs = {
        name: getattr(args, name) for name in ALIGN_OPTIONS if getattr(args, name) is not None
    }
    if args.in_shape:
        kwargs["example_input"] = torch.zeros(2, *args.in_shape)
    check_same_parameters([a, b])
    with _naming([a, b]):
        aligned = otfuse.align(b.model, a.model, data=align_data, **kwargs)
    plain = _plain_path(a.model, b.model, eval_set, args)
    rows = interpolate(a.model, aligned, eval_set, args.steps, progress=not args.quiet)
    summary = interpolation_summary(a, b, eval_set, plain, rows, kwargs)
    png = plot_paths(plain, rows, f"{Path(a.name).name} -> {Path(b.name).name}", eval_set.split)
    atomic_write_text(files["csv"], paths_csv(plain, rows))
    atomic_write_bytes(files["png"], png)
    atomic_write_text(files["json"], json.dumps(_jsonable(summary), indent=2) + "\n")
    payload = {**summary, "files": {k: str(v) for k, v in files.items()}}
    return Report(interpolation_text(plain, rows, summary, files), payload)


def _plain_path(a: nn.Module, b: nn.Module, dataset: Dataset, args) -> list[PathPoint] | None:
    """The path to B as it is, or None when A and B have different shapes (different widths)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return None
    return interpolate(a, b, dataset, args.steps, progress=not args.quiet)


def interpolation_summary(a, b, dataset, plain, rows, kwargs) -> dict[str, Any]:
    def path(points):
        if points is None:
            return None
        return {
            "loss_barrier": loss_barrier(points),
            "accuracy_drop": accuracy_drop(points),
            "points": [dataclasses.asdict(p) for p in points],
        }

    return {
        "otfuse_version": otfuse.__version__,
        "command": "interpolate",
        "inputs": [{"path": m.name, "sha256": m.checkpoint.sha256} for m in (a, b)],
        "data": {"name": dataset.name, "split": dataset.split, "examples": len(dataset)},
        "alignment": {k: v for k, v in kwargs.items() if k != "example_input"},
        "plain": path(plain),
        "aligned": path(rows),
    }


def paths_csv(plain: list[PathPoint] | None, rows: list[PathPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, point in enumerate(rows):
        p = plain[i] if plain is not None else None
        cells = [p.accuracy, p.loss] if p else ["", ""]
        writer.writerow([f"{point.t:.6g}", *cells, point.accuracy, point.loss])
    return buffer.getvalue()


def plot_paths(
    plain: list[PathPoint] | None, rows: list[PathPoint], title: str, split: str
) -> bytes:
    """A PNG of loss and accuracy against t for both paths (matplotlib's Agg, no display)."""
    from matplotlib.figure import Figure  # a plain Figure draws with Agg and touches no GUI

    figure = Figure(figsize=(9, 3.4), layout="constrained")
    ax_loss, ax_acc = figure.subplots(1, 2)
    for points, label, style in ((plain, "plain B", "o--"), (rows, "OT-aligned B", "o-")):
        if points is None:
            continue
        ts = [p.t for p in points]
        ax_loss.plot(ts, [p.loss for p in points], style, label=label, markersize=3)
        ax_acc.plot(ts, [p.accuracy for p in points], style, label=label, markersize=3)
    ax_loss.set(xlabel="t  ((1-t)A + tB)", ylabel=f"{split} loss", title=title)
    ax_acc.set(xlabel="t  ((1-t)A + tB)", ylabel=f"{split} accuracy (%)")
    ax_loss.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def interpolation_text(plain, rows, summary, files) -> str:
    lines = ["   t   plain acc  plain loss   aligned acc  aligned loss"]
    for i, point in enumerate(rows):
        p = plain[i] if plain is not None else None
        left = f"{p.accuracy:8.2f}%  {p.loss:10.4f}" if p else f"{'-':>9}  {'-':>10}"
        lines.append(f"{point.t:4.2f}  {left}  {point.accuracy:11.2f}%  {point.loss:12.4f}")
    aligned = summary["aligned"]
    plain_text = "n/a (different widths)"
    if summary["plain"] is not None:
        plain_text = f"{summary['plain']['loss_barrier']:.4f}"
    lines.append(f"loss barrier: plain {plain_text}, aligned {aligned['loss_barrier']:.4f}")
    lines.append(f"wrote {', '.join(str(p) for p in files.values())}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# otfuse demo, experiment (otfuse.experiments)


def _experiments(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in ("otfuse", "otfuse.experiments", module):
            raise OtfuseError(f"{module} is not part of this installation of otfuse") from exc
        raise


def cmd_demo(args: argparse.Namespace) -> Report:
    demo = _experiments("otfuse.experiments.demo")
    out = {"out": Path(args.out)} if args.out is not None else {}
    result = demo.main(data_dir=args.data_dir, quick=args.quick, progress=not args.quiet, **out)
    return Report("", {"command": "demo", "result": result})


def cmd_experiment(args: argparse.Namespace) -> Report:
    experiments = _experiments("otfuse.experiments")
    names = list(experiments.names())
    if args.name not in names:
        raise UsageError(f"unknown experiment '{args.name}': choose one of {', '.join(names)}")
    out = {"out": Path(args.out)} if args.out is not None else {}
    result = experiments.run_experiment(
        args.name, quick=args.quick, data_dir=args.data_dir, progress=not args.quiet, **out
    )
    return Report("", {"command": "experiment", "name": args.name, "result": result})


# --------------------------------------------------------------------------------------------------
# Small helpers


def _jsonable(value: Any) -> Any:
    """A copy of ``value`` that json.dumps writes as strict JSON (non-finite floats become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
