"""The fusion methods that the experiments compare side by side.

A :class:`Method` is a label and the options of :func:`otfuse.fuse` (a recipe plus overrides);
``sample`` is a seeded batch of unlabeled training inputs, passed as ``data`` only to methods that use
data (activation-based alignment, statistics repair).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import otfuse
from otfuse.validation import normalise_weights


@dataclass(frozen=True)
class Method:
    label: str
    options: dict = field(default_factory=dict)  # keyword arguments of otfuse.fuse
    uses_data: bool = False  # passes the unlabeled sample as ``data``
    batchnorm_only: bool = False  # only meaningful for models with BatchNorm
    many_only: bool = False  # only meaningful for K > 2 models

    def applies(self, parents: Sequence[nn.Module]) -> bool:
        if self.batchnorm_only and not has_batchnorm(parents[0]):
            return False
        return not (self.many_only and len(parents) < 3)

    def build(
        self, parents: Sequence[nn.Module], sample: torch.Tensor, *, quick: bool = False
    ) -> nn.Module:
        data = sample if self.uses_data else None
        options = run_options(self.options, quick)
        return otfuse.fuse(parents, data=data, example_input=sample[:2], **options).model


QUICK_SYNTHESIZE = (
    32  # --quick: inputs that fusion without data synthesises (full runs: the recipe's)
)


def run_options(options: Mapping[str, object], quick: bool) -> dict:
    """``options`` of :func:`otfuse.fuse` in a run: quick runs synthesise fewer inputs for the
    data-free recipe (the full runs use the recipe's own number)."""
    options = dict(options)
    if quick and options.get("recipe") == "data-free":
        options.setdefault("synthesize", QUICK_SYNTHESIZE)
    return options


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


METHODS = [
    Method("OT wts (paper)", {"recipe": "paper-wts"}),
    Method("OT acts (paper)", {"recipe": "paper-acts"}, uses_data=True),
    Method("+ refine (wts)", {"recipe": "paper-wts", "refine": True}),
    Method("+ align to average (wts)", {"recipe": "paper-wts", "to_average": True}, many_only=True),
    Method(
        "+ align to average (acts)",
        {"recipe": "paper-acts", "to_average": True},
        uses_data=True,
        many_only=True,
    ),
    Method(
        "+ correlation cost (acts)", {"recipe": "paper-acts", "cost": "correlation"}, uses_data=True
    ),
    Method(
        "+ post-activation (acts)", {"recipe": "paper-acts", "activations": "post"}, uses_data=True
    ),
    Method(
        "+ BN reset (wts)",
        {"recipe": "paper-wts", "stages": ("bn_reset",)},
        uses_data=True,
        batchnorm_only=True,
    ),
    Method(
        "+ BN reset (acts)",
        {"recipe": "paper-acts", "stages": ("bn_reset",)},
        uses_data=True,
        batchnorm_only=True,
    ),
    Method(
        "+ REPAIR (wts)", {"recipe": "paper-wts", "stages": ("bn_reset", "repair")}, uses_data=True
    ),
    Method(
        "+ REPAIR (acts)",
        {"recipe": "paper-acts", "stages": ("bn_reset", "repair")},
        uses_data=True,
    ),
    Method(
        "+ refit (wts)",
        {"recipe": "paper-wts", "stages": ("bn_reset", "repair", "refit")},
        uses_data=True,
    ),
    Method(
        "+ refit (acts)",
        {"recipe": "paper-acts", "stages": ("bn_reset", "repair", "refit")},
        uses_data=True,
    ),
    Method("recipe: data-free", {"recipe": "data-free"}),
    Method("recipe: data", {"recipe": "data"}, uses_data=True),
]


class LogitAverage(nn.Module):
    r"""The weighted average of the members' logits, :math:`\sum_k w_k z_k` (K times the cost): its
    softmax is the normalised weighted geometric mean of their probabilities, what refit with
    ``targets="average"`` fits at the class scores."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = normalise_weights(weights, len(models))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * m(x.clone()) for w, m in zip(self.weights, self.members))  # see ensemble


def baselines(parents: Sequence[nn.Module]) -> dict[str, nn.Module]:
    """The prediction ensemble (K times the parameters) and vanilla averaging."""
    return {
        "prediction ensemble": otfuse.ensemble(parents),
        "vanilla average": otfuse.vanilla_average(parents),
    }
