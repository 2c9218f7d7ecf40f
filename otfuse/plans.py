"""Applying transport plans to tensors: every member axis of a neuron space, contracted with its plan.

For a plan :math:`T` (n_b, n_a) of space S, with masses :math:`\\mu = T\\mathbf 1` and
:math:`\\nu = T^\\top \\mathbf 1`, a member axis of S in model B (length n_b, or a layout in which S
is one segment) becomes an axis of length n_a:

.. math::

    x'_{\\dots a \\dots} = \\sum_b M_{ba}\\, x_{\\dots b \\dots}, \\qquad
    M = \\hat T = T\\,\\mathrm{diag}(1/\\nu) \\text{ or, for consumers with ``outgoing="sum"``, }
    \\mathrm{diag}(1/\\mu)\\,T .

A plan that is a scaled permutation is applied as a gather (exact, fast). Plans are applied on the
device of the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from otfuse.discovery import Member, NeuronSpace, Segment, SpaceGraph
from otfuse.transport import TransportPlan

Outgoing = Literal["average", "sum"]
StateDict = dict[str, torch.Tensor]


def transport_member(
    tensor: torch.Tensor,
    member: Member,
    space: int,
    plan: TransportPlan,
    sizes: Mapping[int, int],
    outgoing: Outgoing = "average",
) -> torch.Tensor:
    r"""Contract the parts of ``member``'s axis that hold ``space`` with the plan.

    Producer and norm axes use the corrected plan :math:`\hat T = T\,\mathrm{diag}(1/\nu)` (each
    anchor unit is a convex combination of B's units). Consumer axes use it too with
    ``outgoing="average"`` (the paper), or with ``outgoing="sum"`` the split plan
    :math:`\mathrm{diag}(1/\mu)\,T` (each unit of B hands its outgoing weights to the anchor units
    it is sent to, so merging two identical units keeps the next layer's input). The two agree for
    permutations. ``sizes`` gives the current size of every space in ``tensor`` (those already
    transported have the anchor's size). Returns a tensor whose axis has the anchor's size for
    ``space``.
    """
    perm = plan.permutation
    if member.groups > 1:
        return _transport_grouped(tensor, member, plan.shape, _matrix(plan, member, outgoing))
    # a permutation is gathered; the dense plan is only built for plans that are not one
    matrix = None if perm is not None else _matrix(plan, member, outgoing)
    layout = member.layout
    if is_plain(layout, space):
        return _contract_axis(tensor, member.axis, perm, matrix)
    x = tensor.movedim(member.axis, -1)
    lead = x.shape[:-1]
    x = x.reshape(
        -1, layout.outer, layout.blocks, layout.length(sizes) // layout.outer // layout.blocks
    )
    pieces, offset = [], 0
    for seg in layout.segments:
        n = sizes[seg.space] // layout.blocks  # units of the space in each block
        piece = x[..., offset : offset + n * seg.inner]
        offset += n * seg.inner
        if seg.space == space:  # (rows, outer, blocks * n, inner): the space's units in order
            units = piece.reshape(*piece.shape[:2], layout.blocks * n, seg.inner)
            piece = _contract_axis(units, 2, perm, matrix)
            piece = piece.reshape(*piece.shape[:2], layout.blocks, -1)
        pieces.append(piece)
    x = torch.cat(pieces, dim=-1)
    return x.reshape(*lead, -1).movedim(-1, member.axis)


def _matrix(plan: TransportPlan, member: Member, outgoing: Outgoing) -> np.ndarray:
    return plan.split if member.role == "consumer" and outgoing == "sum" else plan.corrected


def is_plain(layout, space: int) -> bool:
    return layout.outer == 1 and layout.blocks == 1 and layout.segments == (Segment(space),)


def _contract_axis(
    x: torch.Tensor, axis: int, perm: np.ndarray | None, matrix: np.ndarray | None
) -> torch.Tensor:
    """Contract axis ``axis`` (length n_b) of ``x`` with ``matrix`` (n_b, n_a), or gather ``perm``."""
    if perm is not None:
        return x.index_select(axis, torch.as_tensor(perm, device=x.device))
    t = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
    return torch.tensordot(x, t, dims=([axis], [0])).movedim(-1, axis)


def _transport_grouped(
    tensor: torch.Tensor, member: Member, shape: tuple[int, int], matrix: np.ndarray
) -> torch.Tensor:
    """Input axis of a grouped conv weight (out, in/g, ...): rows of group j use block j of the plan."""
    g = member.groups
    nb, na = shape[0] // g, shape[1] // g
    t = torch.as_tensor(matrix, dtype=tensor.dtype, device=tensor.device)
    blocks = torch.stack([t[j * nb : (j + 1) * nb, j * na : (j + 1) * na] for j in range(g)])
    x = tensor.movedim(member.axis, -1)
    out_shape = x.shape[:-1]
    x = x.reshape(g, out_shape[0] // g, -1, nb)
    x = torch.einsum("gorb,gba->gora", x, blocks)
    return x.reshape(*out_shape, na).movedim(-1, member.axis)


def transport_space(
    state: StateDict,
    space: NeuronSpace,
    plan: TransportPlan,
    sizes: Mapping[int, int],
    outgoing: Outgoing = "average",
) -> None:
    """Transport every member axis of ``space`` in ``state`` (updated in place) by ``plan``.

    Names of one tensor (tied weights, such as a language model's input embedding and output head)
    are transported once and keep sharing the result. Each transported tensor is kept alive with
    its result until the space is done: a tensor's identity is its address, and a freed tensor's
    address may be reused by a new one (a weight whose two axes lie in this space is transported
    twice, and its first result is a new tensor).
    """
    done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for member in space.members:
        tensor = state[member.param]
        key = (tensor_identity(tensor), member.axis, member.layout, member.role, member.groups)
        if key not in done:
            moved = transport_member(tensor, member, space.index, plan, sizes, outgoing)
            done[key] = (tensor, moved)
        state[member.param] = done[key][1]


def tensor_identity(t: torch.Tensor) -> tuple:
    """What makes two tensors the same values: memory, shape, strides, dtype and device (tensors
    without memory, on the ``meta`` device, only by object)."""
    address = t.data_ptr() or id(t)
    return (address, t.shape, t.stride(), t.dtype, t.device)


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
        transport_space(state, space, plans[space.index], sizes, outgoing)
        sizes[space.index] = sizes_a[space.index]
    return state, sizes
