"""Statistics repair of a fused model (BatchNorm reset, REPAIR-style rescaling).

Averaging aligned units shrinks the spread of their activations layer after layer, and averaged
BatchNorm statistics no longer describe the fused model. Two remedies, on a sample of inputs:

* :func:`reset_batchnorm` (stage ``bn_reset``): recompute the running statistics of every
  BatchNorm layer of the fused model.
* :func:`repair_statistics` (stage ``repair``): for every layer output whose units lie plainly on one axis (a Linear or Conv output, or
  the normalisation layer that directly follows it), make each fused unit's mean and standard
  deviation over the sample match the weighted average of the parents' aligned units,

  .. math::

      y' = a \\odot (y - m_f) + m_t, \\qquad a = s_t / s_f,

  and fold :math:`a` and the shift into that layer's own weight and bias (scale only where the layer
  has no bias). Layers are corrected in graph order, each on the statistics that the corrections
  before it produce. The architecture never changes. The model's output units (class scores) are
  fixed, so they are never corrected: what they should follow, the average logits or the
  prediction ensemble, is refit's ``targets`` (:mod:`otfuse.refit`).

REPAIR: Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair" (2022).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from otfuse.capture import run_with_hooks
from otfuse.discovery import SpaceGraph, module_calls, parameter_owners, shares_parameters
from otfuse.modes import evaluating

_NORMS = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def reset_batchnorm(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance of ``model`` on ``inputs`` (N, ...).

    The statistics are exact averages over the batches (momentum ``None``); other layers stay in eval
    mode (no dropout). Modifies ``model`` in place and returns it in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size].clone())  # it may change its input
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


@dataclass(frozen=True)
class CorrectionPoint:
    """A traced layer output that repair rescales, and the parameters that absorb the correction.

    Attributes:
        node: name of the traced node.
        axis: unit axis of the node's output.
        weight: parameter scaled per unit along its axis 0 (a layer's weight, a norm's scale).
        bias: parameter that takes the shift, or None (then only the scale is corrected).
    """

    node: str
    axis: int
    weight: str
    bias: str | None


def correction_points(graph: SpaceGraph) -> list[CorrectionPoint]:
    """Layer outputs of the transportable spaces of ``graph``, in graph order.

    A Linear or Conv output that feeds only a normalisation layer is corrected at that layer instead;
    modules called more than once, and modules that share a parameter with another (one correction
    would change every use), are left as they are.
    """
    gm = graph.graph_module
    modules = dict(gm.named_modules())
    axes = {name: axis for s in graph.spaces if not s.fixed for name, _, axis in s.nodes}
    points, calls, owners = [], module_calls(gm), parameter_owners(gm)
    for node in gm.graph.nodes:
        # a module called more than once cannot be corrected for each call separately
        if node.op != "call_module" or node.name not in axes or calls[node.target] > 1:
            continue
        module = modules[node.target]
        if shares_parameters(module, owners):
            continue
        if isinstance(module, _LAYERS) and _feeds_only_a_norm(node, modules):
            continue
        if isinstance(module, _LAYERS + _NORMS) and getattr(module, "weight", None) is not None:
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                continue
            bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
            points.append(
                CorrectionPoint(node.name, axes[node.name], f"{node.target}.weight", bias)
            )
    return points


def _feeds_only_a_norm(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    users = list(node.users)
    return (
        len(users) == 1
        and users[0].op == "call_module"
        and isinstance(modules[users[0].target], _NORMS)
    )


def unit_statistics(value: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (n,) of each unit of ``value`` over every other axis, in float64
    (computed in ``value``'s own precision, at least float32: :func:`unit_moments`)."""
    var, mean = unit_moments(value, axis)
    return mean.double(), var.double().sqrt()


def unit_moments(value: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean (n,) of each unit along ``axis`` of ``value``, over every other
    axis, in two passes (the mean, then the mean square about it, so no cancellation), each summing
    the axes after ``axis`` first and those before it next: no copy that moves the unit axis
    (several times faster than ``var_mean`` of the moved rows on the CPU)."""
    axis = axis % value.ndim
    value = value.to(torch.promote_types(value.dtype, torch.float32))
    inner, outer = tuple(range(axis + 1, value.ndim)), tuple(range(axis))

    def total(t: torch.Tensor) -> torch.Tensor:
        t = t.sum(inner) if inner else t
        return t.sum(outer) if outer else t

    count = max(1, value.numel() // max(1, value.shape[axis]))
    mean = total(value) / count
    shape = [1] * value.ndim
    shape[axis] = -1
    var = total((value - mean.view(shape)).square_()) / count
    return var, mean


#: a fused unit whose std over the sample is at most this share of its RMS value does not vary
#: (float32 rounding of a constant unit's std is about 1e-7 of its value)
FLAT = 1e-5


def _corrected(point: CorrectionPoint, out: torch.Tensor, target, params) -> torch.Tensor:
    """Fold the affine correction of ``point`` into its parameters; returns the corrected output."""
    mean_f, std_f = unit_statistics(out, point.axis)
    mean_t, std_t = target
    scale = std_t / std_f.clamp_min(1e-8)
    # a unit that does not vary over the sample (one input, identical inputs) has no scale to
    # match: 0/0 would set it arbitrarily; it keeps its scale and only its mean moves
    flat = std_f <= FLAT * torch.sqrt(mean_f.square() + std_f.square())
    scale = torch.where(flat, torch.ones_like(scale), scale)
    shift = mean_t - scale * mean_f if point.bias is not None else torch.zeros_like(mean_t)
    weight = params[point.weight]
    weight.mul_(scale.to(weight.dtype).reshape(-1, *([1] * (weight.ndim - 1))))
    if point.bias is not None:
        bias = params[point.bias]
        bias.mul_(scale.to(bias.dtype)).add_(shift.to(bias.dtype))
    shape = [1] * out.ndim
    shape[point.axis] = -1
    # in place: the output of a layer or norm module is its own fresh tensor
    return out.mul_(scale.to(out.dtype).reshape(shape)).add_(shift.to(out.dtype).reshape(shape))


Statistics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # node name -> (mean, std), each (n,)


def point_statistics(
    graph: SpaceGraph, points: Sequence[CorrectionPoint], inputs: torch.Tensor
) -> Statistics:
    """Each point's unit statistics (:func:`unit_statistics`) in ``graph``'s model on ``inputs``
    (one run, eval mode, no gradients)."""
    axes, stats = {p.node: p.axis for p in points}, {}

    def record(node: torch.fx.Node, out: torch.Tensor) -> None:
        stats[node.name] = unit_statistics(out, axes[node.name])

    with torch.no_grad(), evaluating([graph.graph_module]):
        run_with_hooks(graph.graph_module, inputs, after=dict.fromkeys(axes, record))
    return stats


def weighted_targets(
    stats: Sequence[Statistics],
    weights: Sequence[float],
    orders: Sequence[Mapping[str, torch.Tensor | None]] | None = None,
) -> Statistics:
    """The weighted average :math:`\\sum_k w_k (\\mu_k, \\sigma_k)` of each node's statistics;
    with ``orders``, model k's units are first reordered by ``orders[k][node]`` (aligned unit j is
    unit ``order[j]``; None keeps the order)."""
    targets: Statistics = {}
    for k, (model_stats, weight) in enumerate(zip(stats, weights, strict=True)):
        for node, (mean, std) in model_stats.items():
            order = orders[k].get(node) if orders is not None else None
            if order is not None:
                order = order.to(mean.device)
                mean, std = mean[order], std[order]
            m, s = targets.get(node, (0.0, 0.0))
            targets[node] = (m + weight * mean, s + weight * std)
    return targets


def repair_statistics(
    fused: SpaceGraph,
    parents: Sequence[SpaceGraph] | None,
    weights: Sequence[float],
    inputs: torch.Tensor,
    *,
    targets: Statistics | None = None,
    reset_norms: bool = False,
) -> Any:
    """REPAIR: match the fused units' mean and std to the weighted average of the aligned parents'.

    ``fused`` and ``parents`` are traced graphs of the fused model and of the parents aligned to its
    widths and unit order (:class:`otfuse.capture.GraphCache`). ``targets``: the aligned parents'
    weighted statistics per correction point when the caller has them (then ``parents`` is not
    run; see :meth:`otfuse.context.FusionContext.repair_targets`). ``reset_norms``: in the same
    run, first set every BatchNorm's running statistics to those of its input on ``inputs``
    (as :func:`reset_batchnorm` does with the sample as one batch; requires
    :func:`norms_resettable_in_run`). Modifies the fused
    model's parameters in place.

    Returns:
        The repaired model's output on ``inputs`` (eval mode), or None when there is nothing to
        correct.
    """
    points = {p.node: p for p in correction_points(fused)}
    if not points and not reset_norms:
        return None
    if targets is None and points:
        stats = [point_statistics(p, list(points.values()), inputs) for p in parents or ()]
        targets = weighted_targets(stats, weights)
    gm = fused.graph_module
    with torch.no_grad(), evaluating([gm]):
        params = dict(gm.named_parameters())
        correct = lambda n, out: _corrected(points[n.name], out, targets[n.name], params)  # noqa: E731
        before = _norm_resets(gm) if reset_norms else {}
        return run_with_hooks(gm, inputs, before=before, after=dict.fromkeys(points, correct))


def _tracked_norms(gm: torch.fx.GraphModule) -> dict[str, _BatchNorm]:
    return {
        name: m
        for name, m in gm.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }


def norms_resettable_in_run(gm: torch.fx.GraphModule, model: nn.Module) -> bool:
    """Whether every BatchNorm with running statistics of ``model`` is called once in ``gm`` (its
    traced graph) as that very module, so that :func:`repair_statistics` can reset it in its own
    run (``reset_norms``). Not so when the capture inlined a BatchNorm into ATen ops
    (``torch.export``) or traced through a subclass: then the separate reset must run."""
    norms = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
    }
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in norms]
    if sorted(calls) != sorted(norms):
        return False
    return all(gm.get_submodule(name) is module for name, module in norms.items())


def _norm_resets(gm: torch.fx.GraphModule) -> dict[str, Callable]:
    """Hooks that, before each BatchNorm node runs, set its running mean and variance to its
    input's over the whole run: per channel (axis 1), the variance unbiased as BatchNorm keeps it.
    Like :func:`reset_batchnorm` with the sample as one batch, except that each BatchNorm sees the
    eval-mode, already repaired outputs of the layers before it (the statistics of what it will
    normalise in eval mode; they differ from a train-mode reset's, the eval outputs agree)."""
    norms = _tracked_norms(gm)

    def reset(node: torch.fx.Node, args: tuple) -> None:
        norm, x = norms[node.target], args[0]
        var, mean = unit_moments(x, 1)
        count = x.numel() // x.shape[1]
        var = var * (count / (count - 1)) if count > 1 else var
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.to(norm.running_var.dtype))
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.fill_(1)

    return {n.name: reset for n in gm.graph.nodes if n.op == "call_module" and n.target in norms}
