"""The fusion options on the command line and in ``--config`` files, generated from
:class:`otfuse.config.FusionConfig`: nothing here names an option.

Every field of :func:`otfuse.config.option_fields` is a flag of the same name (``num_samples`` ->
``--num-samples``) whose help is the field's; its type comes from the field's annotation:

* a ``Literal`` (``mode``, ``solver``, ...): one of its values (``--recipe``: a recipe name);
* ``bool``: ``--refine`` / ``--no-refine``;
* ``int`` / ``float``: a number (or a word the field also takes: ``--synthesize auto``);
* a tuple (``stages``, ``weights``): a comma list, ``--stages bn_reset,repair``; ``none`` for an
  empty one (``--stages none``) or, where the field may be None, for None (``--weights none``);
* rows of numbers (``class_counts``): rows split by ``;``, ``--class-counts '6000,600;0,5400'`` (quoted for the shell), or
  ``@FILE.json``, a JSON file holding a list of rows.

A ``--config`` YAML file maps field names (``num_samples`` or ``num-samples``) to values, and may also
set the fields that are not flags (``candidates``). The options apply in this order: the recipe (the
flag's, else the file's, else ``data`` with data and ``data-free`` without), the file's options,
the flags. ``--print-config`` prints every field of the resulting config as such a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from otfuse import config as fusion_config
from otfuse.cli.common import ArgumentParser, UsageError, parse_float, parse_int
from otfuse.config import ConfigError, FusionConfig

ALIGNMENT_OPTIONS = (*fusion_config.ALIGNMENT_FIELDS, "num_samples", "seed")  # of otfuse.align


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Kind:
    """How a field's values are written on the command line."""

    base: Any  # bool, int, float, str, ROWS, or a tuple of allowed strings (a Literal)
    is_list: bool = False
    optional: bool = False
    words: tuple[str, ...] = ()  # words a number field also takes ("auto")

    def parse(self, text: str) -> Any:
        """Text (a flag's value, or a string in YAML) -> the field's value."""
        text = str(text).strip()
        if self.is_list or self.optional:
            if text.lower() in ("none", "null", ""):
                return None if self.optional else ()
        if self.is_list:
            items = [t for t in text.strip("[]()").split(",") if t.strip()]
            return tuple(self.parse_item(t) for t in items)
        return self.parse_item(text)

    def parse_item(self, text: str) -> Any:
        """One value (of a list, or of a scalar field)."""
        text = text.strip()
        if text in self.words:
            return text
        if self.base == ROWS:
            return parse_rows(text)
        if isinstance(self.base, tuple):
            if text not in self.base:
                raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(self.base)}")
            return text
        if self.base is bool:
            low = text.lower()
            if low not in ("true", "false", "yes", "no", "on", "off"):
                raise argparse.ArgumentTypeError(f"'{text}' is not true or false")
            return low in ("true", "yes", "on")
        if self.base is int:
            return parse_int(text)
        if self.base is float:
            return parse_float(text)
        return text

    def metavar(self) -> str | None:
        if self.base == ROWS:
            return "N,N,..;N,N,..|@FILE.json"
        one = "{" + ",".join(self.base) + "}" if isinstance(self.base, tuple) else None
        if self.is_list:
            return f"{'|'.join(self.base)},..." if isinstance(self.base, tuple) else "X,Y,..."
        number = {int: "N", float: "X"}.get(self.base)
        return one or ("|".join((number, *self.words)) if number and self.words else number)


ROWS = "rows"  # Kind.base of a field holding rows of numbers (a tuple of tuples)


def parse_rows(text: str) -> tuple[tuple[float, ...], ...]:
    """``"1,2;3,4"`` -> ((1.0, 2.0), (3.0, 4.0)); ``"@FILE.json"``: the list of rows in that file."""
    if text.startswith("@"):
        path = text[1:]
        if not path:
            raise argparse.ArgumentTypeError("give the JSON file's path after @ (@counts.json)")
        try:
            rows = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise argparse.ArgumentTypeError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise argparse.ArgumentTypeError(f"{path} must hold a list of rows of numbers")
        return tuple(tuple(_number_in(v, path) for v in row) for row in rows)
    rows = [r for r in text.split(";") if r.strip()]
    if not rows or any(not v.strip() for row in rows for v in row.split(",")):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not rows of numbers split by ';' (1,2;3,4), or @FILE.json"
        )
    return tuple(tuple(parse_float(v) for v in row.split(",")) for row in rows)


def _number_in(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise argparse.ArgumentTypeError(f"{path}: {value!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{path}: a number is too large") from None


def _holds_rows(hint: Any) -> bool:
    """Whether a field's annotation is a tuple of tuples (or that or None)."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is tuple and typing.get_origin(typing.get_args(h)[0]) is tuple:
            return True
    return False


def kind_of(name: str) -> Kind:
    """The :class:`Kind` of field ``name``, from its annotation."""
    hint = typing.get_type_hints(FusionConfig)[name]
    if _holds_rows(hint):
        return Kind(ROWS, optional=True)
    optional, words = False, ()
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
        literals = [a for a in args[1:] if typing.get_origin(a) is Literal]
        words = tuple(w for a in literals for w in typing.get_args(a))
    is_list = typing.get_origin(hint) is tuple
    if is_list:
        hint = typing.get_args(hint)[0]
    if name == "recipe":
        return Kind(tuple(fusion_config.recipe_names()))
    if typing.get_origin(hint) is Literal:
        return Kind(tuple(typing.get_args(hint)), is_list, optional)
    if hint in (bool, int, float, str):
        return Kind(hint, is_list, optional, words)
    return Kind(str, is_list, optional)


def option_names() -> list[str]:
    return [f.name for f in fusion_config.option_fields()]


def add_fusion_options(
    p: ArgumentParser, names: Iterable[str] | None = None, title: str = ""
) -> None:
    """One flag per option field (or per field in ``names``); None means 'not given'."""
    wanted = set(names) if names is not None else None
    group = p.add_argument_group(title or "fusion options (otfuse.FusionConfig's fields)")
    for f in fusion_config.option_fields():
        if wanted is not None and f.name not in wanted:
            continue
        kind = kind_of(f.name)
        help = f.metadata.get("help", "")
        if kind.is_list:
            help += "; a comma list" + (", or none" if kind.optional else ", none for no entries")
        common = {"dest": f.name, "default": None, "help": help}
        if kind.base is bool and not kind.is_list:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(
                flag(f.name),
                type=kind.parse,
                metavar=kind.metavar(),
                **common,
            )


def given_options(args: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The fusion options given as flags (those not given are None)."""
    names = option_names() if names is None else names
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# --------------------------------------------------------------------------------------------------
# The config of a run: recipe, file, flags


def resolve_config(args: argparse.Namespace, has_data: bool) -> tuple[FusionConfig, dict[str, Any]]:
    """The FusionConfig a ``fuse`` run uses, and the options that were given (file, then flags)."""
    from_file = read_config(args.config) if getattr(args, "config", None) else {}
    flags = given_options(args)
    recipe = flags.pop("recipe", None) or from_file.pop("recipe", None)
    from_file.pop("recipe", None)
    where = f"config {args.config}" if getattr(args, "config", None) else "invalid fusion option"
    try:
        config = fusion_config.resolve(recipe, has_data, from_file)
        if flags:
            config = config.replace(**flags)
    except ConfigError as exc:
        raise UsageError(f"{where}: {exc}") from None
    given = {**from_file, **flags}
    if recipe is not None:
        given = {"recipe": recipe, **given}
    return config, given


def read_config(path: str) -> dict[str, Any]:
    """A YAML mapping of field names (``num_samples`` or ``num-samples``) to values."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"config {path} is not valid YAML ({' '.join(str(exc).split())})") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(
            f"config {path} must be a mapping of option: value, not a {type(doc).__name__}"
        )
    names = fusion_config.field_names()
    values = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UsageError(
                f"config {path}: unknown option '{key}'; the options are {', '.join(names)}"
            )
        values[name] = _file_value(name, value, path)
    return values


def _file_value(name: str, value: Any, path: str) -> Any:
    """A YAML value, with strings read as on the command line (``1e-3``, ``bn_reset,repair``)."""
    if name == "candidates" or value is None:
        return value
    kind = kind_of(name)
    try:
        if isinstance(value, str) and kind.base is not str:
            return kind.parse(value)
        if isinstance(value, list) and kind.is_list:
            return tuple(kind.parse_item(v) if isinstance(v, str) else v for v in value)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"config {path}: '{name}': {exc}") from None
    return value


def config_yaml(config: FusionConfig, given: Mapping[str, Any]) -> str:
    """Every field of ``config`` as YAML that ``--config`` reads back, with each field's help."""
    recipe = f"recipe '{config.recipe}'"
    lines = [
        f"# otfuse fuse options: {recipe}"
        + (
            f" with {', '.join(n for n in given if n != 'recipe')} given"
            if set(given) - {"recipe"}
            else ""
        )
        + "; read back with --config FILE"
    ]
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config)}
    for name, value in config.to_dict().items():
        lines.append(f"{name}: {_flow(value)}  # {helps[name]}")
    return "\n".join(lines)


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text
