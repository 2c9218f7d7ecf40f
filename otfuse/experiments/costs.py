"""The inference cost of a model: parameters and multiply-accumulates per example.

Compute is counted as multiply-accumulates (MACs) of the Linear and Conv layers, the convention of
the papers' "FLOPs" columns; normalisations, activations, pooling and additions are left out.

.. math::

    \\text{MACs}_{\\text{Linear}} = \\text{out} \\cdot \\text{in\\_features}, \\qquad
    \\text{MACs}_{\\text{Conv}} = |\\text{output}| \\cdot \\frac{c_{\\text{in}}}{\\text{groups}}
    \\prod_i k_i,

per example, where out counts the layer's outputs and ``|output|`` the conv's output elements
(C_out x H_out x W_out). Counts come from forward hooks on one example input, so any module layout
works and a prediction ensemble costs the sum of its members (K times one model).

>>> model_cost(zoo.create("mlpnet"), torch.zeros(1, 1, 28, 28))
ModelCost(params=414600, macs=414600)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from otfuse.modes import evaluating

__all__ = ["ModelCost", "count_params", "inference_macs", "model_cost"]


@dataclass(frozen=True)
class ModelCost:
    params: int  # parameters needed at inference (shared ones once)
    macs: int  # multiply-accumulates of Linear/Conv layers for one example

    @property
    def flops(self) -> int:
        """Floating-point operations, counting a multiply-accumulate as two."""
        return 2 * self.macs


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call of a Linear or Conv layer over its whole batch."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, _ConvNd) and not module.transposed:
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    raise TypeError(f"no MAC rule for {type(module).__name__}")


@torch.no_grad()
def inference_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of ``model``'s Linear and Conv layers per example.

    Args:
        model: any module; it runs once in eval mode (its mode is restored afterwards).
        example_input: a batch the model accepts, shape (B, ...); the count is divided by B.
    """
    counted = (nn.Linear, _ConvNd)
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, counted) and not getattr(m, "transposed", False)
    ]
    try:
        with evaluating([model]):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return total // max(1, len(example_input))


def model_cost(model: nn.Module, example_input: torch.Tensor) -> ModelCost:
    """Parameters and per-example MACs of ``model`` (see :func:`inference_macs`)."""
    return ModelCost(count_params(model), inference_macs(model, example_input))
