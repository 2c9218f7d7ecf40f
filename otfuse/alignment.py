"""Align model B to anchor A, one neuron space at a time (Algorithm 1 of Singh & Jaggi, generalised).

For each transportable space S, in visiting order:

1. ground cost C (n_b, n_a) between B's and A's units, from their incoming weights (``wts``, with the
   input axes already transported: the "past correction") or their activations (``acts``);
2. masses mu (n_b,), nu (n_a,): uniform or proportional to the units' weight norms;
3. plan T = OT(mu, nu, C) and its correction :math:`\\hat T = T\\,\\mathrm{diag}(1/\\nu)`;
4. every member axis of S in B is contracted with :math:`\\hat T`:
   :math:`x'_{\\dots a \\dots} = \\sum_b \\hat T_{ba}\\, x_{\\dots b \\dots}`.

After the last space B has A's widths and unit order. With equal widths and hard plans the result
computes exactly what B computes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from otfuse.config import FusionConfig
from otfuse.cost import ground_cost, unit_masses
from otfuse.discovery import Member, NeuronSpace, SpaceGraph
from otfuse.errors import ArchitectureMismatchError, TransportError
from otfuse.heads import HeadPlanner
from otfuse.plans import is_plain, transport_member
from otfuse.transport import TransportPlan, solve

StateDict = dict[str, torch.Tensor]


# -- features of units for the weight-based cost ------------------------------------------------
def unit_features(
    tensor: torch.Tensor, member: Member, space: int, sizes: Mapping[int, int]
) -> torch.Tensor:
    """Rows (n, d): every entry of ``tensor`` that belongs to each unit of ``space`` along the member axis."""
    layout = member.layout
    if is_plain(layout, space):
        return tensor.movedim(member.axis, 0).reshape(tensor.shape[member.axis], -1)
    x = tensor.movedim(member.axis, -1)
    x = x.reshape(-1, layout.outer, layout.length(sizes) // layout.outer)
    rows, offset = [], 0
    for seg in layout.segments:
        n = sizes[seg.space]
        if seg.space == space:
            piece = x[..., offset : offset + n * seg.inner].reshape(
                x.shape[0], layout.outer, n, seg.inner
            )
            rows.append(piece.permute(2, 0, 1, 3).reshape(n, -1))
        offset += n * seg.inner
    return torch.cat(rows, dim=1)


def _members_by_param(graph: SpaceGraph) -> dict[str, list[tuple[Member, int]]]:
    table: dict[str, list[tuple[Member, int]]] = {}
    for s in graph.spaces:
        for m in s.members:
            if (m, s.index) not in table.setdefault(m.param, []):
                table[m.param].append((m, s.index))
    return table


def _weight_features(
    space: NeuronSpace,
    state_b: StateDict,
    sizes_b: Mapping[int, int],
    state_a: StateDict,
    sizes_a: Mapping[int, int],
    resolved: set[int],
    by_param: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of B's and A's units of ``space`` from members whose other axes are resolved."""
    for role in ("producer", "norm", "consumer"):
        candidates = [m for m in space.members if m.role == role and m.groups == 1]
        ready = [m for m in candidates if _other_axes_resolved(m, space.index, resolved, by_param)]
        same_shape = [m for m in candidates if state_b[m.param].shape == state_a[m.param].shape]
        for chosen in (ready, same_shape):
            if chosen:
                fb = _concat(
                    [unit_features(state_b[m.param], m, space.index, sizes_b) for m in chosen]
                )
                fa = _concat(
                    [unit_features(state_a[m.param], m, space.index, sizes_a) for m in chosen]
                )
                return fb, fa
    raise TransportError(
        f"cannot build a weight cost for space '{space.name}' of models of different widths; "
        "use mode='acts'"
    )


def _concat(features: list[torch.Tensor]) -> torch.Tensor:
    return features[0] if len(features) == 1 else torch.cat(features, dim=1)


def _other_axes_resolved(member: Member, space: int, resolved: set[int], by_param: dict) -> bool:
    for other, _ in by_param[member.param]:
        if other.axis != member.axis and not other.layout.spaces() <= resolved:
            return False
    return True


# -- aligning a state dict ----------------------------------------------------------------------
def align_state(
    state_b: StateDict,
    graph_b: SpaceGraph,
    state_a: StateDict,
    graph_a: SpaceGraph,
    options: FusionConfig,
    acts_b: Mapping[int, torch.Tensor] | None = None,
    acts_a: Mapping[int, torch.Tensor] | None = None,
) -> tuple[StateDict, dict[str, TransportPlan]]:
    """Transport ``state_b`` into anchor A's widths and unit order; returns it and the plan per space."""
    check_compatible(graph_b, graph_a)
    state = dict(state_b)
    sizes, sizes_a = graph_b.sizes, graph_a.sizes
    resolved = {s.index for s in graph_b.spaces if s.fixed}
    by_param = _members_by_param(graph_b)
    plans: dict[str, TransportPlan] = {}
    need_weights = options.mode == "wts" or options.marginals != "uniform"

    def costs(sp: NeuronSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        by_weights = None
        if need_weights:
            by_weights = _weight_features(sp, state, sizes, state_a, sizes_a, resolved, by_param)
        fb, fa = by_weights if options.mode == "wts" else (acts_b[sp.index], acts_a[sp.index])
        mass_b, mass_a = by_weights if by_weights is not None else (fb, fa)
        cost = ground_cost(fb, fa, options.cost)
        return cost, unit_masses(mass_b, options.marginals), unit_masses(mass_a, options.marginals)

    heads = HeadPlanner(graph_b, graph_a, options, lambda sp: costs(sp)[0])  # attention spaces
    for space in graph_b.transportable():
        plan = heads.plan(space)
        if plan is None:
            cost, mu, nu = costs(space)
            plan = solve(cost, mu, nu, solver=options.solver, reg=options.reg, groups=space.groups)
        for member in space.members:
            state[member.param] = transport_member(
                state[member.param], member, space.index, plan, sizes, options.outgoing
            )
        sizes[space.index] = sizes_a[space.index]
        resolved.add(space.index)
        plans[space.name] = plan
    _check_shapes(state, state_a)
    return state, plans


def check_compatible(graph_b: SpaceGraph, graph_a: SpaceGraph) -> None:
    """Models of one family have the same spaces with the same members (sizes may differ)."""
    if len(graph_b.spaces) != len(graph_a.spaces):
        raise ArchitectureMismatchError(
            f"models have different architectures ({len(graph_b.spaces)} and {len(graph_a.spaces)} "
            "neuron spaces)"
        )
    for sb, sa in zip(graph_b.spaces, graph_a.spaces):
        if sb.signature() != sa.signature():
            raise ArchitectureMismatchError(
                f"models have different architectures: {_difference(sb, sa)}"
            )


def _difference(sb: NeuronSpace, sa: NeuronSpace) -> str:
    """What differs between two spaces that should correspond, in words."""
    if sb.name != sa.name:
        return f"neuron space '{sa.name}' of the anchor corresponds to '{sb.name}'"
    params_b, params_a = {m.param for m in sb.members}, {m.param for m in sa.members}
    if params_b != params_a:
        odd = sorted(params_b ^ params_a)[:3]
        return f"neuron space '{sa.name}' has different parameters ({', '.join(odd)})"
    return f"neuron space '{sa.name}' is wired differently (fixed, groups or layout)"


def _check_shapes(state: StateDict, state_a: StateDict) -> None:
    if state.keys() != state_a.keys():
        missing = sorted(set(state_a) ^ set(state))[:3]
        raise ArchitectureMismatchError(f"models have different parameters: {', '.join(missing)}")
    for key, value in state.items():
        if value.shape != state_a[key].shape:
            raise ArchitectureMismatchError(
                f"parameter '{key}' has shape {tuple(value.shape)} against the anchor's "
                f"{tuple(state_a[key].shape)} after alignment; the models differ in a way otfuse "
                "cannot align"
            )
