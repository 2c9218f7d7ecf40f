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
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from otfuse.activations import ActivationPoint
from otfuse.cost import CostName, MarginalName, ground_cost, unit_masses
from otfuse.discovery import Member, NeuronSpace, Segment, SpaceGraph
from otfuse.errors import ArchitectureMismatchError, OtfuseError, TransportError
from otfuse.transport import SolverName, TransportPlan, solve

Mode = Literal["wts", "acts"]
Outgoing = Literal["average", "sum"]
MODES = ("wts", "acts")
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AlignOptions:
    """How to align. Every field is documented in :func:`otfuse.align`."""

    mode: Mode = "wts"
    solver: SolverName = "auto"
    cost: CostName = "euclidean"
    marginals: MarginalName = "uniform"
    reg: float = 0.01
    activations: ActivationPoint = "pre"
    num_samples: int = 200
    seed: int = 0
    outgoing: Outgoing = "average"

    def check(self) -> None:
        if self.mode not in MODES:
            raise OtfuseError(f"unknown mode '{self.mode}'; choose 'wts' or 'acts'")
        if self.activations not in ("pre", "post"):
            raise OtfuseError(f"activations must be 'pre' or 'post', not '{self.activations}'")
        if self.outgoing not in ("average", "sum"):
            raise OtfuseError(f"outgoing must be 'average' or 'sum', not '{self.outgoing}'")
        if not self.reg > 0:
            raise OtfuseError(f"reg must be positive, not {self.reg}")


ALIGN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AlignOptions))


# -- transporting one member axis ---------------------------------------------------------------
def transport_member(
    tensor: torch.Tensor,
    member: Member,
    space: int,
    plan: TransportPlan,
    sizes: Mapping[int, int],
    outgoing: Outgoing = "average",
) -> torch.Tensor:
    """Contract the parts of ``member``'s axis that hold ``space`` with the plan.

    Producer and norm axes use the corrected plan :math:`\hat T = T\,\mathrm{diag}(1/\nu)` (each
    anchor unit is a convex combination of B's units). Consumer axes use it too with
    ``outgoing="average"`` (the paper), or with ``outgoing="sum"`` the split plan
    :math:`\mathrm{diag}(1/\mu)\,T` (each unit of B hands its outgoing weights to the anchor units
    it is sent to, so merging two identical units keeps the next layer's input). The two agree for
    permutations. ``sizes`` gives the current size of every space in ``tensor`` (those already
    transported have the anchor's size). Returns a tensor whose axis has the anchor's size for
    ``space``.
    """
    matrix = plan.split if member.role == "consumer" and outgoing == "sum" else plan.corrected
    perm = plan.permutation
    if member.groups > 1:
        return _transport_grouped(tensor, member, plan.shape, matrix)
    layout = member.layout
    if _is_plain(layout, space):
        return _contract_axis(tensor, member.axis, perm, matrix)
    x = tensor.movedim(member.axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(-1, layout.outer, layout.length(sizes) // layout.outer)
    pieces, offset = [], 0
    for seg in layout.segments:
        n = sizes[seg.space]
        piece = x[..., offset : offset + n * seg.inner]
        offset += n * seg.inner
        if seg.space == space:
            piece = _contract_axis(piece.reshape(*piece.shape[:2], n, seg.inner), 2, perm, matrix)
            piece = piece.reshape(*piece.shape[:2], -1)
        pieces.append(piece)
    x = torch.cat(pieces, dim=-1)
    return x.reshape(*lead, -1).movedim(-1, member.axis)


def _is_plain(layout, space: int) -> bool:
    return layout.outer == 1 and layout.segments == (Segment(space),)


def _contract_axis(
    x: torch.Tensor, axis: int, perm: np.ndarray | None, matrix: np.ndarray
) -> torch.Tensor:
    """Contract axis ``axis`` (length n_b) of ``x`` with ``matrix`` (n_b, n_a), or gather ``perm``."""
    if perm is not None:
        return x.index_select(axis, torch.as_tensor(perm))
    t = torch.as_tensor(matrix, dtype=x.dtype)
    return torch.tensordot(x, t, dims=([axis], [0])).movedim(-1, axis)


def _transport_grouped(
    tensor: torch.Tensor, member: Member, shape: tuple[int, int], matrix: np.ndarray
) -> torch.Tensor:
    """Input axis of a grouped conv weight (out, in/g, ...): rows of group j use block j of the plan."""
    g = member.groups
    nb, na = shape[0] // g, shape[1] // g
    t = torch.as_tensor(matrix, dtype=tensor.dtype)
    blocks = torch.stack([t[j * nb : (j + 1) * nb, j * na : (j + 1) * na] for j in range(g)])
    x = tensor.movedim(member.axis, -1)
    out_shape = x.shape[:-1]
    x = x.reshape(g, out_shape[0] // g, -1, nb)
    x = torch.einsum("gorb,gba->gora", x, blocks)
    return x.reshape(*out_shape, na).movedim(-1, member.axis)


# -- features of units for the weight-based cost ------------------------------------------------
def unit_features(
    tensor: torch.Tensor, member: Member, space: int, sizes: Mapping[int, int]
) -> torch.Tensor:
    """Rows (n, d): every entry of ``tensor`` that belongs to each unit of ``space`` along the member axis."""
    layout = member.layout
    if _is_plain(layout, space):
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
    options: AlignOptions,
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
    for space in graph_b.transportable():
        by_weights = None
        if need_weights:
            by_weights = _weight_features(space, state, sizes, state_a, sizes_a, resolved, by_param)
        fb, fa = by_weights if options.mode == "wts" else (acts_b[space.index], acts_a[space.index])
        mass_b, mass_a = by_weights if by_weights is not None else (fb, fa)
        cost = ground_cost(fb, fa, options.cost)
        mu, nu = unit_masses(mass_b, options.marginals), unit_masses(mass_a, options.marginals)
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
