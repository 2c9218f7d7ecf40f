"""Values the ATen rules track (parameter views, heads, chunks) and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.fx

from otfuse.discovery.layout import Layout
from otfuse.discovery.walker import Feature, SpaceBuilder, Unusable
from otfuse.errors import UnsupportedOpError

aten = torch.ops.aten


@dataclass(frozen=True)
class Cut:
    """Indices ``start:end`` of parameter axis ``axis`` (of ``length``), on the view's axis
    ``view_axis``: a part of a packed parameter (``in_proj_weight.split([E, 2 E])`` into the
    query's rows and the keys' and values' rows, as cross-attention computes them)."""

    view_axis: int
    axis: int
    start: int
    end: int
    length: int


@dataclass(frozen=True)
class ParamView:
    """A parameter ``name``; ``axes[j]`` is the parameter axis behind axis j (None: none, or sliced).

    ``cut``: the one sliced axis whose part of the parameter is known (:class:`Cut`); it can open
    a space as a layer's output (:func:`open_space`) and nothing else."""

    name: str
    axes: tuple[int | None, ...]
    cut: Cut | None = None

    def part(self, dim: int, start: int, end: int, size: int) -> ParamView:
        """This view sliced to ``start:end`` along its axis ``dim`` (of ``size``)."""
        axes = tuple(None if i == dim else a for i, a in enumerate(self.axes))
        cut = self.cut
        if cut is None and self.axes[dim] is not None:
            cut = Cut(dim, self.axes[dim], start, end, size)
        elif cut is not None and cut.view_axis == dim:  # a part of a part, on the same indices
            same = size == cut.end - cut.start  # (not after a broadcast or a tiling)
            cut = replace(cut, start=cut.start + start, end=cut.start + end) if same else None
        return ParamView(self.name, axes, cut)

    def held(self) -> set[int]:
        """The view's axes that index the parameter's units (whole or a part)."""
        held = {j for j, a in enumerate(self.axes) if a is not None}
        return held | ({self.cut.view_axis} if self.cut is not None else set())

    def moved(self, where: dict[int, int], ndim: int) -> ParamView:
        """This view after its axes move: axis ``a`` becomes ``where[a]`` (missing: dropped) in a
        tensor of ``ndim`` axes."""
        back = {dst: src for src, dst in where.items()}
        axes = tuple(self.axes[back[j]] if j in back else None for j in range(ndim))
        cut = self.cut
        if cut is not None:
            cut = replace(cut, view_axis=where[cut.view_axis]) if cut.view_axis in where else None
        return ParamView(self.name, axes, cut)


@dataclass(frozen=True)
class Heads:
    """Units ``h*d + i`` of ``space`` (``heads`` heads of d dims) on two axes: head h on
    ``head_axis`` and dim i on ``dim_axis`` (None once contracted away: attention logits).

    Along ``head_axis`` every head appears ``repeat`` times in a row (grouped-query attention) and
    the whole run ``outer`` times (heads merged with the batch). ``loose``: the dim axis holds part of
    the dims or reorders them (rotary), which is right only because the dims are fixed.
    ``expanded``: axes broadcast from size 1 (they may merge into the head axis as repeats).
    """

    space: int
    heads: int
    head_axis: int
    dim_axis: int | None
    repeat: int = 1
    outer: int = 1
    loose: bool = False
    expanded: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Chunks:
    """A tensor whose axis ``axis`` selects among ``parts`` (each described in the same axes)."""

    axis: int
    parts: tuple


Rule = Callable[[SpaceBuilder, torch.fx.Node], object]
TRACKED = (Feature, Heads, Chunks)


# -- helpers -------------------------------------------------------------------------------------
def label(node: torch.fx.Node) -> str:
    """``op 'view' at node 'view_3' in module 'blocks.0.attn' (Attention)``."""
    target = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    text = f"op '{target}' at node '{node.name}'"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", cls)
        text += f" in module '{path}' ({cls})" if path else f" in the model ({cls})"
    return text


def info_of(b: SpaceBuilder, arg: object) -> object:
    info = b.info.get(arg) if isinstance(arg, torch.fx.Node) else None
    if isinstance(info, Unusable):
        raise UnsupportedOpError(f"{label(arg)}: {info.reason}")
    return info


def arg(node: torch.fx.Node, i: int, name: str, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def tracked_axes(info: object) -> set[int]:
    if isinstance(info, Feature):
        return {info.axis}
    if isinstance(info, Heads):
        return {info.head_axis} | ({info.dim_axis} if info.dim_axis is not None else set())
    if isinstance(info, Chunks):
        return {info.axis}.union(*(tracked_axes(p) for p in info.parts))
    return set()


def move(info: object, where: dict[int, int], ndim: int) -> object:
    """``info`` after its axes move: axis ``a`` becomes ``where[a]`` in a tensor of ``ndim`` axes.

    A tracked axis missing from ``where`` is a bug of the calling rule (checked there)."""
    if isinstance(info, Feature):
        return Feature(where[info.axis], info.layout)
    if isinstance(info, Heads):
        dim = None if info.dim_axis is None else where[info.dim_axis]
        expanded = frozenset(where[a] for a in info.expanded if a in where)
        return replace(info, head_axis=where[info.head_axis], dim_axis=dim, expanded=expanded)
    if isinstance(info, Chunks):
        return Chunks(where[info.axis], tuple(move(p, where, ndim) for p in info.parts))
    if isinstance(info, ParamView):
        return info.moved(where, ndim)
    return info


def by_order(info: object, order: Sequence[int | None], node: torch.fx.Node, what: str) -> object:
    """``info`` after an op whose output axis j is input axis ``order[j]`` (None: a new axis)."""
    where = {src: dst for dst, src in enumerate(order) if src is not None}
    lost = tracked_axes(info) - set(where)
    if lost:
        raise UnsupportedOpError(f"{label(node)}: {what} removes the axis of the units")
    return move(info, where, len(order))


def open_space(
    b: SpaceBuilder,
    node: torch.fx.Node,
    size: int,
    axis: int,
    producers: Sequence[tuple[ParamView | None, int]],
    groups: int = 1,
) -> Feature:
    """A new space on ``axis``; ``producers``: (parameter, which of its view's axes) indexing it."""
    named = [p for p, _ in producers if p is not None]
    name = named[0].name.rsplit(".", 1)[0] if named else node.name
    layout = Layout.of(b.new_space(size, name))
    b.constrain_groups(layout, groups, label(node))
    for view, axis_of_view in producers:
        if view is None:
            continue
        cut = view.cut
        if cut is not None and cut.view_axis == axis_of_view:  # rows of a packed parameter
            b.add_part(view.name, cut.axis, (cut.start, cut.end, cut.length), layout, label(node))
        else:
            b.add_member(view.name, param_axis(node, view, axis_of_view), layout, "producer")
    out = Feature(axis, layout)
    b.tag(node, out, "pre")
    return out


def param_axis(node: torch.fx.Node, view: ParamView, j: int) -> int:
    axis = view.axes[j]
    if axis is None:
        raise UnsupportedOpError(f"{label(node)}: part of parameter '{view.name}' indexes units")
    return axis


def fix_read(b: SpaceBuilder, view: ParamView, axes: Iterable[int]) -> None:
    """The parameter axes behind the view's ``axes`` are read unit by unit, as they are (one
    unit picked or broadcast, rows looked up by token id): any space they join stays in place."""
    name = b.canonical.get(view.name, view.name)
    for j in axes:
        if view.axes[j] is not None:
            b.reads_fixed.add((name, view.axes[j]))
        elif view.cut is not None and view.cut.view_axis == j:
            b.reads_fixed.add((name, view.cut.axis))


def weight(b: SpaceBuilder, node: torch.fx.Node, i: int, name: str) -> ParamView | None:
    """The parameter argument ``i``; any tracked value there is an error."""
    info = info_of(b, arg(node, i, name))
    if isinstance(info, TRACKED):
        raise UnsupportedOpError(f"{label(node)}: weights computed from activations")
    return info if isinstance(info, ParamView) else None


def plain_space(node: torch.fx.Node, info: Feature, what: str) -> int:
    layout = info.layout
    if layout.outer != 1 or len(layout.segments) != 1 or layout.segments[0].inner != 1:
        raise UnsupportedOpError(f"{label(node)}: {what} an axis laid out as {layout.describe()}")
    return layout.segments[0].space


def unsupported_with(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """The rule for ops otfuse does not know: fine when no units and no weights flow in. A buffer
    that flows in (e.g. rotary frequencies) is remembered (:func:`opaque`): it must not be
    transported."""
    weights = getattr(b, "weights", set())
    for a in node.all_input_nodes:
        info = info_of(b, a)
        if isinstance(info, (*TRACKED, tuple)) or (
            isinstance(info, ParamView) and info.name in weights
        ):
            raise UnsupportedOpError(
                f"{label(node)} is not supported on tensors whose units are aligned"
            )
        if isinstance(info, ParamView):
            opaque(b).setdefault(info.name, label(node))
    return None


def opaque(b: SpaceBuilder) -> dict[str, str]:
    """Parameters read by ops otfuse does not know, with the first such op."""
    if not hasattr(b, "opaque"):
        b.opaque = {}
    return b.opaque
