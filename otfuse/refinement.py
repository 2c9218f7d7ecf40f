"""Refinement beyond the greedy layer-by-layer pass.

*Weight matching with OT plans.* The greedy pass fixes each space's plan from its incoming weights only.
Refinement re-solves every space S against all its member axes (incoming and outgoing weights, norm
parameters), with every other space transported by its current plan, and repeats until no plan
changes. It descends the weight-matching objective

.. math::

    J(T_1, \\dots, T_L) = \\sum_p \\lVert \\operatorname{align}(\\theta_B; T)_p - \\theta_{A,p} \\rVert_2^2 ,

whose restriction to one space with the others fixed is, for hard plans, the linear assignment problem
:math:`\\sum_a C_{\\pi(a) a}` with the squared-euclidean cost between the units' member entries. A new
plan is kept only if J does not increase, so J never gets worse from one sweep to the next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from otfuse.alignment import StateDict, unit_features
from otfuse.config import FusionConfig
from otfuse.cost import ground_cost, unit_masses
from otfuse.discovery import NeuronSpace, SpaceGraph
from otfuse.plans import apply_plans
from otfuse.transport import TransportPlan, solve


@dataclass
class RefinementLog:
    """Objective after the greedy pass (first entry) and after each sweep or round."""

    objective: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)


def distance(state: StateDict, state_a: StateDict) -> float:
    """Squared euclidean distance between two state dicts (floating-point entries)."""
    return float(
        sum(
            ((v.double() - state_a[k].double()) ** 2).sum()
            for k, v in state.items()
            if v.is_floating_point()
        )
    )


def _full_features(
    space: NeuronSpace,
    state_b: StateDict,
    sizes_b: Mapping[int, int],
    state_a: StateDict,
    sizes_a: Mapping[int, int],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Features of B's and A's units of ``space`` from every member whose other axes already agree
    (a weight with both axes in ``space`` is left out: its other axis is not transported yet)."""
    fb, fa = [], []
    for m in space.members:
        if m.groups > 1 or not state_b[m.param].is_floating_point():
            continue
        if sum(1 for o in space.members if o.param == m.param) > 1:
            continue
        b = unit_features(state_b[m.param], m, space.index, sizes_b)
        a = unit_features(state_a[m.param], m, space.index, sizes_a)
        if b.shape[1] == a.shape[1]:
            fb.append(b)
            fa.append(a)
    return fb, fa  # column blocks: the cost sums their products (otfuse.cost.Features)


def same_plan(a: TransportPlan, b: TransportPlan) -> bool:
    if a.permutation is not None and b.permutation is not None:
        return bool(np.array_equal(a.permutation, b.permutation))
    return a.shape == b.shape and bool(np.allclose(a.matrix, b.matrix, atol=1e-9))


def refine_plans(
    state_b: StateDict,
    graph_b: SpaceGraph,
    state_a: StateDict,
    graph_a: SpaceGraph,
    plans: dict[str, TransportPlan],
    options: FusionConfig,
    *,
    max_sweeps: int = 10,
) -> tuple[StateDict, dict[str, TransportPlan], RefinementLog]:
    """Coordinate descent on the weight-matching objective J, starting from ``plans`` (per space name).

    Returns the aligned state, the refined plans and the objective after every sweep.
    """
    by_index = {s.index: plans[s.name] for s in graph_b.transportable()}
    sizes_a = graph_a.sizes
    current, _ = apply_plans(state_b, graph_b, sizes_a, by_index, outgoing=options.outgoing)
    log = RefinementLog([distance(current, state_a)], [])
    for _ in range(max_sweeps):
        changed = 0
        for space in graph_b.transportable():
            if (
                space.heads is not None
            ):  # attention spaces keep their plan over heads (otfuse.heads)
                continue
            partial, sizes = apply_plans(
                state_b, graph_b, sizes_a, by_index, skip=space.index, outgoing=options.outgoing
            )
            fb, fa = _full_features(space, partial, sizes, state_a, sizes_a)
            cost = ground_cost(fb, fa, "sqeuclidean")
            mu, nu = unit_masses(fb, options.marginals), unit_masses(fa, options.marginals)
            solver = "exact" if options.solver == "sinkhorn" else options.solver
            candidate = solve(cost, mu, nu, solver=solver, groups=space.groups)
            if same_plan(candidate, by_index[space.index]):
                continue
            trial = dict(by_index)
            trial[space.index] = candidate
            trial_state, _ = apply_plans(
                state_b, graph_b, sizes_a, trial, outgoing=options.outgoing
            )
            value = distance(trial_state, state_a)
            if value < log.objective[-1] - 1e-9 * max(1.0, log.objective[-1]):
                by_index, current = trial, trial_state
                log.objective.append(value)
                changed += 1
        log.changed.append(changed)
        if changed == 0:
            break
    named = {s.name: by_index[s.index] for s in graph_b.transportable()}
    return current, named, log
