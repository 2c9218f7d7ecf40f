"""Magnitude pruning of whole hidden units of an MLPNet: the baseline of the compression experiment.

In every hidden layer, the units whose incoming weights have the largest l2 norm
:math:`\\lVert W_{i,:} \\rVert_2` are kept and a fraction ``fraction_removed`` of the units removed.
The result is a narrower zoo MLPNet (``hidden`` sizes) holding the kept rows of each layer's weight
(and bias) and, of the next layer's weight, the columns of the kept units. Kept units stay in their
original order, so pruning nothing gives back the same model.

>>> narrow = magnitude_prune(zoo.create("mlpnet"), 0.5)  # hidden sizes 400-200-100 -> 200-100-50
"""

from __future__ import annotations

import math

import torch
from torch import nn

from otfuse import zoo
from otfuse.errors import OtfuseError
from otfuse.zoo import MLPNet

__all__ = ["kept_count", "kept_units", "magnitude_prune"]


def kept_count(size: int, fraction_removed: float) -> int:
    """Units left of ``size`` after removing ``fraction_removed`` (rounded half up, at least 1)."""
    if not 0.0 <= fraction_removed < 1.0:
        raise OtfuseError(f"fraction_removed must be in [0, 1), got {fraction_removed}")
    kept = round(size * (1.0 - fraction_removed), 6)  # 25 * (1 - 0.9) is 2.4999999999999996
    return max(1, math.floor(kept + 0.5))


def _linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a zoo MLPNet in order: the hidden layers, then the classifier."""
    if not isinstance(model, MLPNet) or not hasattr(model, "otfuse_config"):
        raise OtfuseError(
            f"magnitude pruning needs a zoo MLPNet (otfuse.zoo.create('mlpnet')), "
            f"got {type(model).__name__}"
        )
    return [m for m in model.features if isinstance(m, nn.Linear)] + [model.classifier]


@torch.no_grad()
def kept_units(model: nn.Module, fraction_removed: float) -> list[torch.Tensor]:
    """Per hidden layer, the sorted indices (k,) of the units of largest incoming-weight norm."""
    kept = []
    for layer in _linears(model)[:-1]:
        norms = layer.weight.norm(dim=1)
        k = kept_count(len(norms), fraction_removed)
        kept.append(torch.topk(norms, k).indices.sort().values)
    return kept


@torch.no_grad()
def magnitude_prune(model: nn.Module, fraction_removed: float) -> MLPNet:
    """A narrower copy of the zoo MLPNet ``model`` with ``fraction_removed`` of every hidden layer's
    units removed (see the module docstring). ``model`` is unchanged; the copy is in eval mode."""
    kept = kept_units(model, fraction_removed)
    config = model.otfuse_config
    pruned = zoo.create(
        "mlpnet",
        in_shape=tuple(config["in_shape"]),
        num_classes=config["num_classes"],
        bias=config["bias"],
        hidden=tuple(len(k) for k in kept),
    )
    for i, (source, target) in enumerate(zip(_linears(model), _linears(pruned))):
        rows = kept[i] if i < len(kept) else torch.arange(source.out_features)
        cols = kept[i - 1] if i > 0 else torch.arange(source.in_features)
        target.weight.copy_(source.weight[rows][:, cols])
        if source.bias is not None:
            target.bias.copy_(source.bias[rows])
    return pruned.eval()
