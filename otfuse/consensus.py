"""Alignment to the running average of all aligned models (K > 2), instead of one anchor.

*Alignment to the running average* (K > 2). Instead of one anchor, every model is aligned to the
current weighted average of all aligned models, the average recomputed, until the plans stop
changing; the objective :math:`\\sum_k w_k \\lVert \\theta_k' - \\bar\\theta \\rVert^2` is tracked and
the best round kept. With activations (``mode="acts"``), the models are re-aligned instead to the
average of all aligned models' activations, the *consensus* units (:func:`align_to_consensus`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from otfuse.alignment import StateDict, align_state
from otfuse.config import FusionConfig
from otfuse.cost import ground_cost
from otfuse.discovery import SpaceGraph
from otfuse.refinement import RefinementLog, distance, same_plan
from otfuse.transport import TransportPlan


def align_to_average(
    states: Sequence[StateDict],
    graphs: Sequence[SpaceGraph],
    anchor: int,
    weights: Sequence[float],
    aligned: Sequence[StateDict],
    plans: Sequence[dict[str, TransportPlan]],
    options: FusionConfig,
    *,
    max_rounds: int = 5,
    average: Callable[[Sequence[StateDict], Sequence[float]], StateDict],
) -> tuple[list[StateDict], list[dict[str, TransportPlan]], RefinementLog]:
    """Re-align every model to the weighted average of the aligned models until the plans settle.

    ``aligned`` and ``plans`` are the greedy start (every model aligned to the anchor); ``average`` computes the
    weighted average of a list of states. Returns the best round's aligned states and plans.
    """
    graph_anchor = graphs[anchor]
    options = options.replace(mode="wts")  # the average has no activations of its own
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
            same_plan(p[k], q[k]) for p, q in zip(round_plans, previous) for k in p
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
    options: FusionConfig,
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
                    plan = torch.from_numpy(round_plans[k][name].corrected)
                    x = plan.to(x.device, x.dtype).T @ x
                total = total + w * x
            mean[index] = total
        return mean

    def objective(round_plans, mean) -> float:
        value = 0.0
        for k, (features, w) in enumerate(zip(acts, weights)):
            for name, index in names.items():
                cost = ground_cost(features[index], mean[index], options.cost)
                if k == anchor:
                    value += w * float(np.diag(cost).mean(dtype=np.float64))
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
            same_plan(p[name], q[name])
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
