"""Data model of neuron spaces: which tensor axes index which hidden units.

A *neuron space* is a set of tensor axes that index the same hidden units. A single axis may hold
several spaces side by side (after ``torch.cat``) or one space repeated (after flattening ``(C, H, W)``
into ``C*H*W``); a :class:`Layout` describes such an axis:

.. math::

    \\text{index} = o \\cdot L + \\text{offset}_k + c \\cdot r_k + j,
    \\quad 0 \\le o < \\text{outer},\\ 0 \\le c < n_{s_k},\\ 0 \\le j < r_k

where segment :math:`k` belongs to space :math:`s_k` of size :math:`n_{s_k}` with every unit repeated
:math:`r_k` (``inner``) times, and :math:`L = \\sum_k n_{s_k} r_k`.

With ``blocks`` = B > 1 the segments are interleaved B times: every block holds the next
:math:`n_{s_k} / B` units of each segment (a qkv projection laid out head by head, GPT-NeoX's
``view(B, T, H, 3 d)`` then ``chunk(3)``):

.. math::

    \\text{index} = o \\cdot L + \\beta \\cdot L / B + \\text{offset}_k / B + c' \\cdot r_k + j,
    \\quad c = \\beta\\, n_{s_k} / B + c'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import torch.fx

Role = Literal["producer", "consumer", "norm"]
ActivationKind = Literal["pre", "post", "norm"]


@dataclass(frozen=True)
class Segment:
    """A run of an axis that holds the units of one space, each repeated ``inner`` times."""

    space: int
    inner: int = 1


@dataclass(frozen=True)
class Layout:
    """How the units of one or more spaces lie along one tensor axis (see module docstring)."""

    segments: tuple[Segment, ...]
    outer: int = 1
    blocks: int = 1

    @staticmethod
    def of(space: int) -> Layout:
        """The plain layout of one space: index i is unit i."""
        return Layout((Segment(space),))

    def spaces(self) -> set[int]:
        return {seg.space for seg in self.segments}

    def repeated(self, inner: int = 1, outer: int = 1) -> Layout:
        """The layout after every index is repeated ``inner`` times and the whole axis ``outer`` times."""
        segs = tuple(replace(s, inner=s.inner * inner) for s in self.segments)
        return Layout(segs, self.outer * outer, self.blocks)

    def remap(self, mapping: Mapping[int, int]) -> Layout:
        segments = tuple(replace(s, space=mapping[s.space]) for s in self.segments)
        return Layout(segments, self.outer, self.blocks)

    def length(self, sizes: Mapping[int, int]) -> int:
        """Length of the axis given the size of every space."""
        return self.outer * sum(sizes[s.space] * s.inner for s in self.segments)

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        parts = []
        for s in self.segments:
            label = names[s.space] if names else f"S{s.space}"
            parts.append(label if s.inner == 1 else f"{label}x{s.inner}")
        body = " + ".join(parts)
        if self.blocks != 1:
            body = f"({body}) in {self.blocks} blocks"
        return body if self.outer == 1 else f"({body})*{self.outer}"


@dataclass(frozen=True)
class Member:
    """One parameter axis that belongs to a space.

    ``role`` says how the axis relates to the space: ``producer`` (output axis of a weight or a bias:
    the unit's incoming weights), ``consumer`` (input axis of a weight) or ``norm`` (per-unit parameters
    and buffers of normalisation layers, depthwise filters, added parameters). Transport is the same
    operation on every member: contract the axis with the corrected plan. ``groups`` > 1 marks the input
    axis of a grouped convolution: rows of group j use diagonal block j of the plan.
    """

    param: str
    axis: int
    layout: Layout
    role: Role
    groups: int = 1

    def remap(self, mapping: Mapping[int, int]) -> Member:
        return replace(self, layout=self.layout.remap(mapping))


@dataclass(frozen=True)
class HeadStructure:
    """The units of an attention space are ``count`` heads of ``size / count`` dims (unit h*d + i).

    A plan for such a space moves whole heads and permutes dims within each head; spaces of one
    attention layer share the plan over heads (``group``). With grouped-query attention a space may
    hold every head of the group ``repeat`` times (query heads of one KV head; the output
    projection's input blocks of those query heads): its plan is the plan of space ``dims_of``
    (the KV head's keys or values) with every head repeated, so it is never solved on its own.

    Attributes:
        count: number of heads of this space.
        group: index of the first space of the attention group (all share the plan over heads).
        repeat: heads of this space per head of the group.
        dims_of: index of the space whose within-head plans this one uses (its own index if none).
        fixed_dims: dims within a head never move (rotary embeddings, a slice of the head).
        fixed_heads: heads never move (e.g. a per-head bias that is not a parameter).
    """

    count: int
    group: int
    repeat: int = 1
    dims_of: int = -1
    fixed_dims: bool = False
    fixed_heads: bool = False

    def signature(self) -> tuple:
        """Everything but the number of heads (a width)."""
        return (self.group, self.repeat, self.dims_of, self.fixed_dims, self.fixed_heads)


@dataclass
class NeuronSpace:
    """A set of axes indexing the same hidden units.

    Attributes:
        index: position in visiting order (the order spaces first appear in the traced graph).
        name: readable name, from the module that first produces the space.
        size: number of units in this model.
        fixed: model input or output: never transported.
        groups: a plan for this space must be block-diagonal with this many blocks (GroupNorm,
            grouped convolutions), so units never leave their group.
        members: every parameter axis in the space.
        nodes: traced nodes whose feature axis holds exactly this space: (node name, activation kind,
            feature axis). Kind ``pre`` marks outputs of layers and residual sums, ``post`` of
            nonlinearities, ``norm`` of normalisation layers.
        heads: the head structure of an attention space (:class:`HeadStructure`), else None.
    """

    index: int
    name: str
    size: int
    fixed: bool = False
    groups: int = 1
    members: list[Member] = field(default_factory=list)
    nodes: list[tuple[str, ActivationKind, int]] = field(default_factory=list)
    heads: HeadStructure | None = None

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    def signature(self) -> tuple:
        """Everything but the size: two models of one family have equal signatures."""
        members = tuple((m.param, m.axis, m.role, m.groups, m.layout) for m in self.members)
        heads = self.heads.signature() if self.heads is not None else None
        return (self.name, self.fixed, self.groups, members, heads)


@dataclass
class SpaceGraph:
    """The neuron spaces of one traced model.

    Attributes:
        spaces: all spaces in visiting order, fixed ones included.
        graph_module: the traced graph (shares parameters with the model): a ``torch.fx`` trace, or
            the ATen graph of ``torch.export`` (``capture == "export"``).
        param_names: names of every parameter and buffer seen by the trace.
        capture: how the graph was captured: ``"fx"`` or ``"export"``.
    """

    spaces: list[NeuronSpace]
    graph_module: torch.fx.GraphModule
    param_names: set[str] = field(default_factory=set)
    capture: str = "fx"

    @property
    def sizes(self) -> dict[int, int]:
        return {s.index: s.size for s in self.spaces}

    def transportable(self) -> list[NeuronSpace]:
        return [s for s in self.spaces if not s.fixed]

    def names(self) -> dict[int, str]:
        return {s.index: s.name for s in self.spaces}

    def signature(self) -> tuple:
        return tuple(s.signature() for s in self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    def __iter__(self):
        return iter(self.spaces)

    def __str__(self) -> str:
        names = self.names()
        lines = [f"{len(self.transportable())} neuron spaces ({len(self.spaces)} with fixed ones):"]
        for s in self.spaces:
            flags = "fixed" if s.fixed else f"{s.size} units"
            if s.groups > 1:
                flags += f", {s.groups} groups"
            if s.heads is not None:
                flags += f", {s.heads.count} heads"
                if s.heads.repeat > 1:
                    flags += f" (x{s.heads.repeat} of [{s.heads.dims_of}])"
                if s.heads.fixed_dims:
                    flags += ", dims fixed"
            members = ", ".join(_member_text(m, s.index, names) for m in s.members)
            lines.append(f"  [{s.index}] {s.name}: {flags}; {members or 'no parameters'}")
        return "\n".join(lines)


def _member_text(member: Member, space: int, names: Mapping[int, str]) -> str:
    text = f"{member.param}[{member.axis}]" + (f"/g{member.groups}" if member.groups > 1 else "")
    plain = member.layout == Layout.of(space)
    return text if plain else f"{text}<{member.layout.describe(names)}>"
