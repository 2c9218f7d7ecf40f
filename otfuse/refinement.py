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

*Alignment to the running average* (K > 2). Instead of one anchor, every model is aligned to the
current weighted average of all aligned models, the average recomputed, until the plans stop
changing; the objective :math:`\\sum_k w_k \\lVert \\theta_k' - \\bar\\theta \\rVert^2` is tracked and
the best round kept. With activations (``mode="acts"``), the models are re-aligned instead to the
average of all aligned models' activations, the *consensus* units (:func:`align_to_consensus`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from otfuse.alignment import AlignOptions, StateDict, align_state, transport_member, unit_features
from otfuse.cost import ground_cost, unit_masses
from otfuse.discovery import NeuronSpace, SpaceGraph
from otfuse.transport import TransportPlan, solve


@dataclass
class RefinementLog:
    """Objective after the greedy pass (first entry) and after each sweep or round."""

    objective: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)


def apply_plans(
    state_b: StateDict,
    graph_b: SpaceGraph,
    sizes_a: Mapping[int, int],
    plans: Mapping[int, TransportPlan],
    skip: int | None = None,
    outgoing: str = "average",
) -> tuple[StateDict, dict[int, int]]:
    """Transport ``state_b`` by the plan of every space except ``skip``; returns it and its space sizes."""
    state, sizes = dict(state_b), graph_b.sizes
    for space in graph_b.transportable():
        if space.index == skip:
            continue
        for member in space.members:
            state[member.param] = transport_member(
                state[member.param], member, space.index, plans[space.index], sizes, outgoing
            )
        sizes[space.index] = sizes_a[space.index]
    return state, sizes


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
) -> tuple[torch.Tensor, torch.Tensor]:
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
    return torch.cat(fb, dim=1), torch.cat(fa, dim=1)


def _same_plan(a: TransportPlan, b: TransportPlan) -> bool:
    if a.permutation is not None and b.permutation is not None:
        return bool(np.array_equal(a.permutation, b.permutation))
    return a.shape == b.shape and bool(np.allclose(a.matrix, b.matrix, atol=1e-9))


def refine_plans(
    state_b: StateDict,
    graph_b: SpaceGraph,
    state_a: StateDict,
    graph_a: SpaceGraph,
    plans: dict[str, TransportPlan],
    options: AlignOptions,
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
            partial, sizes = apply_plans(
                state_b, graph_b, sizes_a, by_index, skip=space.index, outgoing=options.outgoing
            )
            fb, fa = _full_features(space, partial, sizes, state_a, sizes_a)
            cost = ground_cost(fb, fa, "sqeuclidean")
            mu, nu = unit_masses(fb, options.marginals), unit_masses(fa, options.marginals)
            solver = "exact" if options.solver == "sinkhorn" else options.solver
            candidate = solve(cost, mu, nu, solver=solver, groups=space.groups)
            if _same_plan(candidate, by_index[space.index]):
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


def align_to_average(
    states: Sequence[StateDict],
    graphs: Sequence[SpaceGraph],
    anchor: int,
    weights: Sequence[float],
    aligned: Sequence[StateDict],
    plans: Sequence[dict[str, TransportPlan]],
    options: AlignOptions,
    *,
    max_rounds: int = 5,
    average=None,
) -> tuple[list[StateDict], list[dict[str, TransportPlan]], RefinementLog]:
    """Re-align every model to the weighted average of the aligned models until the plans settle.

    ``aligned`` and ``plans`` are the greedy start (every model aligned to the anchor); ``average`` computes the
    weighted average of a list of states. Returns the best round's aligned states and plans.
    """
    graph_anchor = graphs[anchor]
    options = replace(options, mode="wts")  # the average has no activations of its own
    best_states, best_plans = list(aligned), list(plans)
    mean = average(best_states, weights)
    log = RefinementLog([_spread(best_states, mean, weights)], [])
    previous: list[dict[str, TransportPlan]] | None = None
    for _ in range(max_rounds):
        round_states, round_plans = [], []
        for state, graph in zip(states, graphs):
            s, p = align_state(state, graph, mean, graph_anchor, options)
            round_states.append(s)
            round_plans.append(p)
        new_mean = average(round_states, weights)
        spread = _spread(round_states, new_mean, weights)
        settled = previous is not None and all(
            _same_plan(p[k], q[k]) for p, q in zip(round_plans, previous) for k in p
        )
        log.changed.append(0 if settled else 1)
        if spread >= log.objective[-1]:
            break
        log.objective.append(spread)
        best_states, best_plans, mean, previous = round_states, round_plans, new_mean, round_plans
        if settled:
            break
    return best_states, best_plans, log


def _spread(states: Sequence[StateDict], mean: StateDict, weights: Sequence[float]) -> float:
    return sum(w * distance(s, mean) for s, w in zip(states, weights))


def align_to_consensus(
    states: Sequence[StateDict],
    graphs: Sequence[SpaceGraph],
    anchor: int,
    weights: Sequence[float],
    acts: Sequence[Mapping[int, torch.Tensor]],
    aligned: Sequence[StateDict],
    plans: Sequence[dict[str, TransportPlan]],
    options: AlignOptions,
    *,
    max_rounds: int = 5,
) -> tuple[list[StateDict], list[dict[str, TransportPlan]], RefinementLog]:
    """Alignment to the running average for activations (K > 2): every model but the anchor is
    re-aligned to the *consensus* units, the weighted average of all models' aligned activations

    .. math::

        \\bar F_s = \\sum_k w_k \\, \\hat T_{k,s}^\\top F_{k,s} \\qquad (n_s \\times N),

    (:math:`F_{k,s}`: model k's activations at space s, one row per unit; :math:`\\hat T`: its
    column-normalised plan), the consensus recomputed, until the plans settle. The objective
    :math:`\\sum_k w_k \\sum_s \\langle T_{k,s}, C(F_{k,s}, \\bar F_s) \\rangle` is tracked and the best
    round kept. The anchor keeps its unit order, so the result stays in the anchor's frame.
    """
    names = {s.name: s.index for s in graphs[anchor].transportable()}

    def consensus(round_plans):
        mean = {}
        for name, index in names.items():
            total = 0.0
            for k, (features, w) in enumerate(zip(acts, weights)):
                x = features[index]
                if k != anchor:
                    x = torch.from_numpy(round_plans[k][name].corrected).to(x.dtype).T @ x
                total = total + w * x
            mean[index] = total
        return mean

    def objective(round_plans, mean) -> float:
        value = 0.0
        for k, (features, w) in enumerate(zip(acts, weights)):
            for name, index in names.items():
                cost = ground_cost(features[index], mean[index], options.cost)
                if k == anchor:
                    value += w * float(np.diag(cost).mean())
                else:
                    value += w * float((round_plans[k][name].matrix * cost).sum())
        return value

    best_states, best_plans = list(aligned), list(plans)
    mean = consensus(best_plans)
    log = RefinementLog([objective(best_plans, mean)], [])
    for _ in range(max_rounds):
        round_states, round_plans = [], []
        for k, (state, graph) in enumerate(zip(states, graphs)):
            if k == anchor:
                round_states.append(best_states[k])
                round_plans.append({})
                continue
            s, p = align_state(state, graph, states[anchor], graphs[anchor], options, acts[k], mean)
            round_states.append(s)
            round_plans.append(p)
        settled = all(
            _same_plan(p[name], q[name])
            for k, (p, q) in enumerate(zip(round_plans, best_plans))
            if k != anchor
            for name in p
        )
        new_mean = consensus(round_plans)
        value = objective(round_plans, new_mean)
        log.changed.append(0 if settled else 1)
        if value >= log.objective[-1]:
            break
        log.objective.append(value)
        best_states, best_plans, mean = round_states, round_plans, new_mean
        if settled:
            break
    return best_states, best_plans, log
