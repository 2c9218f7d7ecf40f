"""One run of each parent over the sample, recording everything the later stages read from it.

The data recipe reads the parents four times over: their activations (the alignment's costs), their
unit statistics (REPAIR's targets), their outputs (the prediction ensemble that the candidate
alignments are compared with) and their layers' outputs on a few rows (refit's targets). Each is a
function of the parent's own values at a few nodes. Once the plans are known, an aligned parent's
values are its own with the units reordered by its plans (hard plans, equal widths): aligned unit
j of model k is its unit :math:`\\pi_k(j)`, so with :math:`v_k` the parent's value at a node,

.. math::

    \\text{REPAIR: } \\sum_k w_k\\, (\\mu_k, \\sigma_k)[\\pi_k], \\qquad
    \\text{refit: } \\sum_k w_k\\, V_k[:, \\pi_k] \\quad (V_k: \\text{rows of } v_k).

So every parent runs once, before any alignment (:func:`observe`), and the stages reorder what it
recorded (:meth:`otfuse.context.FusionContext.repair_targets`,
:meth:`~otfuse.context.FusionContext.refit_targets`). Where a plan is soft or the widths differ,
the stages run the aligned parents as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from otfuse.activations import ActivationPoint, activation_nodes, changed_in_place, unit_rows
from otfuse.capture import run_with_hooks
from otfuse.discovery import SpaceGraph
from otfuse.modes import evaluating
from otfuse.refit import FitPoint, LayerTargets, output_rows, target_collector
from otfuse.repair import CorrectionPoint, Statistics, unit_statistics


@dataclass(frozen=True)
class Wanted:
    """What :func:`observe` records of each parent.

    Attributes:
        activation_points: activation points (``pre``, ``post``) of the alignment's costs.
        corrections: REPAIR's points (their unit statistics).
        fits: refit's points (their target rows).
        outputs: keep the graph's output on the sample (for the candidate comparison).
        max_rows, seed: refit's row budget and the seed that draws its rows (and the columns of
            the activations).
    """

    activation_points: tuple[ActivationPoint, ...] = ()
    corrections: tuple[CorrectionPoint, ...] = ()
    fits: tuple[FitPoint, ...] = ()
    outputs: bool = False
    max_rows: int = 32768
    seed: int = 0


@dataclass
class Observation:
    """One parent's record (see :class:`Wanted`), in the parent's own unit order.

    Attributes:
        activations: point -> space index -> activation matrix (units, columns).
        statistics: REPAIR point -> unit (mean, std).
        rows: refit point (layer node) -> target rows (rows, units), the rows of ``chosen``.
        output: the graph's output on the sample when it is one tensor and was wanted, else None.
    """

    activations: dict[ActivationPoint, dict[int, torch.Tensor]] = field(default_factory=dict)
    statistics: Statistics = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    output: torch.Tensor | None = None


def observe(
    graphs: Sequence[SpaceGraph], inputs: torch.Tensor, wanted: Wanted
) -> tuple[list[Observation], LayerTargets]:
    """Run every graph once on ``inputs`` (N, ...) (eval mode, no gradients) and record ``wanted``,
    from each node's value as it is computed (no inner node's value on the whole sample is kept;
    the output is, when wanted). Returns the records, in the order of ``graphs``, and refit's rows
    (``rows`` and ``samples`` per fit point, drawn on the first graph's values as
    :func:`otfuse.refit.layer_targets` draws them; ``values`` empty). The graphs share one
    architecture (node names)."""
    first = graphs[0].graph_module
    rows = target_collector(
        first, wanted.fits, len(inputs), max_rows=wanted.max_rows, seed=wanted.seed
    )
    records = []
    with torch.no_grad(), evaluating([g.graph_module for g in graphs]):
        for graph in graphs:
            record = Observation()
            hooks = _recorders(graph, wanted, rows, record)
            output = run_with_hooks(graph.graph_module, inputs, after=hooks)
            tensor = wanted.outputs and isinstance(output, torch.Tensor)
            record.output = output if tensor else None
            record.activations = {
                p: {
                    i: torch.cat([r for r in parts if r is not None], dim=1)
                    for i, parts in by_space.items()
                    if any(r is not None for r in parts)
                }
                for p, by_space in record.activations.items()
            }
            records.append(record)
    return records, rows.out


def _recorders(graph: SpaceGraph, wanted: Wanted, rows, record: Observation) -> dict:
    """The hooks that record ``wanted`` into ``record`` after each node runs (node name -> hook).
    ``record.activations`` receives, per point and space, the list of its nodes' rows."""
    tasks: dict[str, list[Callable[[torch.Tensor], None]]] = {}
    copy = bool(changed_in_place(graph.graph_module))  # an in-place op may change a kept view
    modules = dict(graph.graph_module.named_modules())

    def activations(parts: list, i: int, axis: int) -> Callable:
        def task(value: torch.Tensor) -> None:
            columns = unit_rows(value, axis, seed=wanted.seed + i)
            shared = columns.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
            parts[i] = columns.clone() if copy and shared else columns

        return task

    def statistics(point: CorrectionPoint) -> Callable:
        def task(value: torch.Tensor) -> None:
            record.statistics[point.node] = unit_statistics(value, point.axis)

        return task

    def target_rows(fit: FitPoint) -> Callable:
        def task(value: torch.Tensor) -> None:
            every = output_rows(modules[fit.module], value)
            record.rows[fit.node] = every[rows.pick(fit, len(every))]

        return task

    for p in wanted.activation_points:
        record.activations[p] = {}
        for space in graph.spaces:
            nodes = [] if space.fixed else activation_nodes(space, p)
            if nodes:
                parts = record.activations[p][space.index] = [None] * len(nodes)
            for i, (name, axis) in enumerate(nodes):
                tasks.setdefault(name, []).append(activations(parts, i, axis))
    for c in wanted.corrections:
        tasks.setdefault(c.node, []).append(statistics(c))
    for f in wanted.fits:
        tasks.setdefault(f.target, []).append(target_rows(f))

    def hook(node: torch.fx.Node, value: torch.Tensor) -> None:
        for task in tasks[node.name]:
            task(value.detach())

    return dict.fromkeys(tasks, hook)
