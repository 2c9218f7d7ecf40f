"""Every option of a fusion in one frozen dataclass, :class:`FusionConfig`, and the named recipes.

A config is validated once, when it is made; everything downstream (the pipeline, its stages, the
command line's flags, YAML files, ``FusionResult.config``) reads the same fields, so no option is
declared twice. Recipes are named configs:

* ``paper-wts`` / ``paper-acts``: Singh & Jaggi's one-shot OT fusion, data-free or from activations.
* ``data``: the best recipe measured here given a few hundred unlabeled inputs: the candidate
  alignment (weights, correlation of pre-activations, or post-activations) whose fused model is
  closest to the parents' prediction ensemble on those inputs (no labels), then the stages
  ``bn_reset``, ``repair`` and ``refit``.
* ``data-free``: without data, inputs synthesised from the parents (up to 128 in 60 Adam steps at
  0.3 from their BatchNorm statistics, fewer for costly models on a CPU, 64 on an accelerator, or
  up to 192 in 30 steps from the classes they recognise, 128-184 for costly models, 128 on an
  accelerator; the models in bfloat16 where the device computes it natively), then the ``data``
  recipe on them with its two activation-based candidate alignments; for models where neither
  applies, weight-matching refinement and (K > 2) alignment to the average.

>>> config = FusionConfig.from_recipe("data").replace(num_samples=800)
>>> result = otfuse.fuse(models, config, data=inputs)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from otfuse.activations import ActivationPoint
from otfuse.cost import CostName, MarginalName
from otfuse.errors import OtfuseError
from otfuse.transport import SolverName

Mode = Literal["wts", "acts"]
Outgoing = Literal["average", "sum"]
StageName = Literal["bn_reset", "repair", "refit", "distill"]
Targets = Literal["average", "ensemble", "confident", "coverage"]
SynthesisPrecision = Literal["auto", "float32", "bfloat16"]
Auto = Literal["auto"]
RecipeName = Literal["paper-wts", "paper-acts", "data", "data-free", "custom"]

ALIGNMENT_FIELDS = ("mode", "solver", "cost", "marginals", "reg", "activations", "outgoing")


class ConfigError(OtfuseError):
    """A fusion option has a value it cannot take."""


def _option(default: Any, help: str, *, cli: bool = True, **metadata: Any) -> Any:
    """A config field with its one-line help (shown by ``--help`` and ``--print-config``)."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kwargs, metadata={"help": help, "cli": cli, **metadata})


@dataclass(frozen=True)
class FusionConfig:
    """All options of :func:`otfuse.fuse`; frozen, validated when made.

    Make one from a recipe (``FusionConfig.from_recipe("data")``) or field by field, and change it with
    :meth:`replace`. The command line's ``fuse`` flags and ``--config`` YAML keys are these fields.
    """

    recipe: RecipeName = _option("custom", "the named recipe these values came from")
    # -- alignment of every model to the anchor (Algorithm 1) --
    mode: Mode = _option("wts", "costs from incoming weights (wts) or activations on data (acts)")
    solver: SolverName = _option("auto", "OT solver: auto, exact, sinkhorn or assignment")
    cost: CostName = _option("euclidean", "ground metric between units")
    marginals: MarginalName = _option("uniform", "unit masses: uniform, or by weight norm (l1, l2)")
    reg: float = _option(0.01, "Sinkhorn's entropic regularisation, relative to the largest cost")
    activations: ActivationPoint = _option(
        "pre", "acts: layer outputs (pre) or after the nonlinearity"
    )
    num_samples: int = _option(200, "inputs in the sample for activations and the stages")
    seed: int = _option(0, "seed of the sample, its columns and the refit's rows")
    outgoing: Outgoing = _option("average", "outgoing weights of merged units: average or sum")
    # -- beyond the greedy pass --
    refine: bool = _option(False, "re-solve every plan against all its weights (weight matching)")
    to_average: bool = _option(False, "K > 2: align every model to the running average")
    max_sweeps: int = _option(10, "refinement sweeps / averaging rounds at most")
    candidates: tuple[Mapping[str, Any], ...] = _option(
        tuple, "alignments to choose from, by closeness to the ensemble on the data", cli=False
    )
    # -- after averaging --
    stages: tuple[StageName, ...] = _option(tuple, "stages after averaging, in order (need data)")
    targets: Targets = _option(
        "average",
        "refit's target for class scores: the parents' average logits, the log of their "
        "prediction ensemble (ensemble), or of that ensemble with each parent weighted per input "
        "by its confidence, refit fitting the layers before the class scores to every parent's "
        "features alike (confident), or that mixture with each parent trusted on the classes it "
        "was trained on (coverage: needs class_counts); distill aims at the same mixture",
    )
    class_counts: tuple[tuple[float, ...], ...] | None = _option(
        None,
        "targets=coverage: examples of each class that each model was trained on, a row per "
        "model in class-index order (on the command line: rows split by ';', quoted, e.g. "
        "'600,6000;5400,0', or @FILE.json holding the list of rows)",
    )
    distill_steps: int = _option(300, "distill stage: Adam steps towards the parents' mixture")
    distill_lr: float = _option(3e-4, "distill stage: Adam's step size")
    distill_batch: int = _option(128, "distill stage: inputs per step")
    synthesize: int | Auto = _option(
        0,
        "without data: synthesise this many inputs from the models (0: off; auto: for models "
        "with BatchNorm statistics 128 on a CPU, 32-120 for costly ones, 64 on an accelerator; "
        "192 for classifiers without, 128-184 for costly ones and 128 on an accelerator; 64 "
        "sequences for language models)",
    )
    synthesis_steps: int | Auto = _option(
        "auto",
        "optimisation steps of the synthesised inputs (auto: 60 with BatchNorm statistics, 30 for "
        "classifiers without)",
    )
    synthesis_lr: float = _option(0.3, "Adam's step size for the synthesised inputs")
    synthesis_precision: SynthesisPrecision = _option(
        "auto",
        "models' arithmetic while synthesising: bfloat16 autocast (auto: where the device "
        "computes it natively) or float32",
    )
    # -- the average --
    weights: tuple[float, ...] | None = _option(None, "weight of each model (default: equal)")
    anchor: int = _option(0, "index of the model whose architecture and unit order the result has")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), _hints()[f.name])
            object.__setattr__(self, f.name, value)
        _check_ranges(self)

    # -- making and changing configs --
    @classmethod
    def from_recipe(cls, name: str) -> FusionConfig:
        """The named recipe (see the module's docstring)."""
        if name not in RECIPES:
            raise ConfigError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
        return RECIPES[name]

    def replace(self, **changes: Any) -> FusionConfig:
        """A copy with ``changes`` (unknown names are an error). Setting an alignment option clears
        ``candidates``: the caller chose the alignment."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown fusion option(s): {', '.join(unknown)}")
        if "candidates" not in changes and set(changes) & set(ALIGNMENT_FIELDS):
            changes["candidates"] = ()
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML values: tuples as lists, candidates as dicts."""
        out = {}
        for name in field_names():
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = [dict(v) if isinstance(v, Mapping) else v for v in value]
            out[name] = value
        return out

    @property
    def needs_data(self) -> bool:
        return self.mode == "acts" or bool(self.stages)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(FusionConfig))


def option_fields() -> list[dataclasses.Field]:
    """The fields a user sets by name (command-line flags, YAML keys)."""
    return [f for f in dataclasses.fields(FusionConfig) if f.metadata.get("cli", True)]


def choices(name: str) -> tuple[str, ...] | None:
    """The allowed values of a field whose type is a ``Literal`` (or a tuple of one), else None."""
    hint = _hints()[name]
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def resolve(
    config: FusionConfig | str | None, has_data: bool, overrides: Mapping[str, Any]
) -> FusionConfig:
    """The config a call runs: ``config`` (a config, a recipe name, or None for ``data`` with data
    and ``data-free`` without), then every override that is not None."""
    given = {k: v for k, v in overrides.items() if v is not None}
    recipe = given.pop("recipe", None)
    if isinstance(config, str) and recipe is not None and recipe != config:
        raise ConfigError(f"two recipes given, '{config}' and recipe='{recipe}'; pass one")
    if config is None or isinstance(config, str):
        name = config or recipe or ("data" if has_data else "data-free")
        config = FusionConfig.from_recipe(name)
    elif not isinstance(config, FusionConfig):
        raise ConfigError(
            f"config must be a FusionConfig or a recipe name, not {type(config).__name__}"
        )
    elif recipe is not None:
        config = FusionConfig.from_recipe(recipe)
    return config.replace(**given) if given else config


# -- validation ---------------------------------------------------------------------------------
_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(FusionConfig))
    return _HINTS


# whole-number fields that also take "auto" (a value chosen where it is used)
AUTO_NUMBERS = ("synthesize", "synthesis_steps")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; sequences become tuples."""
    allowed = choices(name)
    if name == "class_counts":
        return None if value is None else _counts(value)
    if typing.get_origin(hint) is tuple or name == "weights":
        if value is None and name == "weights":
            return None
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, not {value!r}")
        value = tuple(value)
        if allowed:
            for v in value:
                if v not in allowed:
                    raise ConfigError(
                        f"unknown {name[:-1]} '{v}'; choose from {', '.join(allowed)}"
                    )
        if name == "weights":
            value = tuple(_number(name, v) for v in value)
        return value
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"unknown {name} '{value}'; choose one of {', '.join(allowed)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        return value
    if name in AUTO_NUMBERS and value == "auto":
        return value
    if hint is int or name in AUTO_NUMBERS:
        if isinstance(value, bool) or not isinstance(value, int):
            auto = " or auto" if name in AUTO_NUMBERS else ""
            raise ConfigError(f"{name} must be a whole number{auto}, not {value!r}")
        return value
    if hint is float:
        return _number(name, value)
    return value


def _counts(value: Any) -> tuple[tuple[float, ...], ...]:
    """``class_counts`` as a tuple of rows of non-negative numbers, every row as long (a NumPy
    array or a tensor is read as its nested list)."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    rows = value if isinstance(value, (list, tuple)) else None
    if not rows or any(isinstance(r, str) or not isinstance(r, (list, tuple)) for r in rows):
        raise ConfigError(
            f"class_counts must be a list of rows of numbers (one per model), not {_short(value)}"
        )
    counts = tuple(tuple(_count(v) for v in row) for row in rows)
    if len({len(row) for row in counts}) != 1 or len(counts[0]) < 2:
        raise ConfigError(
            "class_counts: every row must have one count per class, 2 or more, all rows as long"
        )
    if any(v < 0 for row in counts for v in row):
        raise ConfigError("class_counts must not be negative")
    return counts


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _count(value: Any) -> float:
    """One class count: a finite number (NumPy scalars too)."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float)):
        value = value.item()
    return _number("class_counts", value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _check_ranges(c: FusionConfig) -> None:
    if not c.reg > 0:
        raise ConfigError(f"reg must be positive, not {c.reg}")
    if not c.synthesis_lr > 0:
        raise ConfigError(f"synthesis_lr must be positive, not {c.synthesis_lr}")
    if not c.distill_lr > 0:
        raise ConfigError(f"distill_lr must be positive, not {c.distill_lr}")
    for name in ("num_samples", "max_sweeps", "synthesis_steps", "distill_steps", "distill_batch"):
        if getattr(c, name) != "auto" and getattr(c, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(c, name)}")
    if c.synthesize != "auto" and c.synthesize < 0:
        raise ConfigError(f"synthesize must be a number of inputs (0 or more), not {c.synthesize}")
    if c.anchor < 0:
        raise ConfigError(f"anchor must be an index (0 or more), not {c.anchor}")
    if c.weights is not None and (any(w < 0 for w in c.weights) or sum(c.weights) <= 0):
        raise ConfigError("weights must be non-negative and sum to a positive number")
    if (
        c.class_counts is not None
        and c.weights is not None
        and len(c.weights) != len(c.class_counts)
    ):
        raise ConfigError(
            f"class_counts has {len(c.class_counts)} row(s) but weights has {len(c.weights)}"
        )
    if len(set(c.stages)) != len(c.stages):
        raise ConfigError(f"stages must not repeat: {', '.join(c.stages)}")
    for candidate in c.candidates:
        unknown = set(candidate) - set(ALIGNMENT_FIELDS)
        if unknown:
            raise ConfigError(
                f"a candidate sets non-alignment option(s) {', '.join(sorted(unknown))}"
            )


# -- the recipes --------------------------------------------------------------------------------
_DATA_STAGES = ("bn_reset", "repair", "refit")

RECIPES: dict[str, FusionConfig] = {
    "paper-wts": FusionConfig(recipe="paper-wts"),
    "paper-acts": FusionConfig(recipe="paper-acts", mode="acts"),
    "data": FusionConfig(
        recipe="data",
        mode="acts",
        cost="correlation",
        num_samples=400,
        stages=_DATA_STAGES,
        # fuse once per candidate, keep the one closest to the parents' ensemble on the sample
        candidates=(
            {"mode": "wts", "cost": "euclidean"},
            {"mode": "acts", "cost": "correlation", "activations": "pre"},
            {"mode": "acts", "cost": "euclidean", "activations": "post"},
        ),
    ),
}
# without data: synthesise inputs, then the data recipe on them (see otfuse.pipeline for the
# fallback when the models allow no synthesis)
# (the two activation-based candidates: on synthesised inputs the weight-based one was never the
# best of 12 VGG11 / ResNet-18 fusions measured, yet was chosen in 2 of them, 5-9 points worse)
RECIPES["data-free"] = RECIPES["data"].replace(
    recipe="data-free",
    synthesize="auto",
    candidates=tuple(c for c in RECIPES["data"].candidates if c["mode"] == "acts"),
)


def recipe_names() -> list[str]:
    return list(RECIPES)
