"""What each ATen op of a ``torch.export`` graph does to neuron spaces, heads included.

The exported graph is a small, stable vocabulary (``linear``, ``addmm``, ``conv2d``, ``embedding``,
``layer_norm``, ``scaled_dot_product_attention``, ``matmul``, ``view``, ``split`` ...) whose parameters
are ``get_attr`` nodes named as in the model's ``state_dict``. Besides :class:`~otfuse.discovery.walker.
Feature` (one axis of units) and ``None`` (nothing tracked), a value here may be:

* :class:`ParamView`: a parameter, possibly sliced, transposed or expanded, with the parameter axis
  behind each of its axes;
* :class:`Heads`: the units of one space laid out as ``(heads, dims)`` over two axes, after a view
  such as ``(B, T, H*d) -> (B, T, H, d)``; attention ops link the heads of q, k and v
  (:meth:`~otfuse.discovery.walker.SpaceBuilder.link_heads`);
* :class:`Chunks`: a packed projection viewed as ``(3, H, d)``: one part per chunk;
* a tuple of these (``split``, ``unbind``).

Every op not described here is accepted only when no tracked value or parameter flows into it;
otherwise it is an :class:`~otfuse.errors.UnsupportedOpError` naming the op, the node and the module.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.fx
from torch import nn

from otfuse.discovery.layout import Layout, Segment
from otfuse.discovery.walker import Feature, SpaceBuilder, shape_of
from otfuse.errors import UnsupportedOpError

aten = torch.ops.aten


@dataclass(frozen=True)
class ParamView:
    """A parameter ``name``; ``axes[j]`` is the parameter axis behind axis j (None: none, or sliced)."""

    name: str
    axes: tuple[int | None, ...]


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
    return b.info.get(arg) if isinstance(arg, torch.fx.Node) else None


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
        back = {dst: src for src, dst in where.items()}
        return ParamView(
            info.name, tuple(info.axes[back[j]] if j in back else None for j in range(ndim))
        )
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
        if view is not None:
            b.add_member(view.name, param_axis(node, view, axis_of_view), layout, "producer")
    out = Feature(axis, layout)
    b.tag(node, out, "pre")
    return out


def param_axis(node: torch.fx.Node, view: ParamView, j: int) -> int:
    axis = view.axes[j]
    if axis is None:
        raise UnsupportedOpError(f"{label(node)}: part of parameter '{view.name}' indexes units")
    return axis


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


# -- layers that open a space ----------------------------------------------------------------------
def linear(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``linear(x, W, b)``: W (out, in) reads the units of x's last axis and writes new ones."""
    w, bias = weight(b, node, 1, "weight"), weight(b, node, 2, "bias")
    return _dense(b, node, 0, w, bias, reads=1, writes=0)


def addmm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``addmm(bias, x, W)`` = x W + bias with W (in, out), as GPT-2's Conv1D computes."""
    w, bias = weight(b, node, 2, "mat2"), weight(b, node, 0, "self")
    return _dense(b, node, 1, w, bias, reads=0, writes=1)


def _dense(b, node, x_arg: int, w, bias, *, reads: int, writes: int) -> object:
    """Argument ``x_arg`` times weight ``w`` (axis ``reads`` of its view: inputs, ``writes``: outputs)."""
    if w is None or len(w.axes) != 2:
        return unsupported_with(b, node)
    x, ndim = info_of(b, node.args[x_arg]), len(shape_of(node))
    if isinstance(x, Feature):
        if x.axis != len(shape_of(node.args[x_arg])) - 1:
            raise UnsupportedOpError(f"{label(node)}: the units are not on the last axis")
        b.add_member(w.name, param_axis(node, w, reads), x.layout, "consumer")
    elif isinstance(x, TRACKED):
        raise UnsupportedOpError(f"{label(node)}: a projection of split heads")
    producers = [(w, writes), (bias, len(bias.axes) - 1 if bias is not None else 0)]
    return open_space(b, node, shape_of(node)[-1], ndim - 1, producers)


def conv(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``conv1d/conv2d(x, W, b, stride, padding, dilation, groups)`` on channels (axis 1)."""
    w, bias = weight(b, node, 1, "weight"), weight(b, node, 2, "bias")
    if w is None:
        return unsupported_with(b, node)
    return _conv(b, node, w, bias, int(arg(node, 6, "groups", 1)))


def _conv(b: SpaceBuilder, node: torch.fx.Node, w: ParamView, bias, groups: int) -> object:
    x = info_of(b, node.args[0])
    c_out, c_in = shape_of(node)[1], shape_of(node.args[0])[1]
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
    if groups > 1 and groups == c_in and isinstance(x, Feature):  # depthwise: units pass through
        layout = x.layout.repeated(inner=c_out // c_in)
        for view in (w, bias):
            if view is not None:
                b.add_member(view.name, param_axis(node, view, 0), layout, "norm")
        return Feature(1, layout)
    if isinstance(x, Feature):
        if groups > 1:
            b.constrain_groups(x.layout, groups, label(node))
        b.add_member(w.name, param_axis(node, w, 1), x.layout, "consumer", groups=groups)
    return open_space(b, node, c_out, 1, [(w, 0), (bias, 0)], groups=groups)


def embedding(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``embedding(W, ids)``: W (vocabulary, dim) writes units on the output's last axis."""
    w = weight(b, node, 0, "weight")
    if w is None or isinstance(info_of(b, node.args[1]), TRACKED):
        return unsupported_with(b, node)
    return open_space(b, node, shape_of(node)[-1], len(shape_of(node)) - 1, [(w, 1)])


# -- normalisation ---------------------------------------------------------------------------------
def layer_norm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``layer_norm(x, shape, W, b)`` / ``rms_norm(x, shape, W)``: per-unit parameters join x's units."""
    params = [weight(b, node, 2, "weight")]
    if node.target.overloadpacket is aten.layer_norm:
        params.append(weight(b, node, 3, "bias"))
    return _norm(b, node, len(node.args[1]), params)


def _norm(b: SpaceBuilder, node: torch.fx.Node, normalized: int, params: list) -> object:
    x = info_of(b, node.args[0])
    ndim = len(shape_of(node))
    first = ndim - normalized
    if isinstance(x, Feature) and x.axis >= first:
        for view in params:
            if view is not None:
                b.add_member(view.name, param_axis(node, view, x.axis - first), x.layout, "norm")
        b.tag(node, x, "norm")
    elif isinstance(x, (Heads, Chunks)) and max(tracked_axes(x)) >= first:
        raise UnsupportedOpError(f"{label(node)}: normalises over the dims of heads")
    return x


def batch_norm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``batch_norm`` / ``_native_batch_norm_legit_no_training``: weight, bias and statistics on axis 1."""
    x = info_of(b, node.args[0])
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
    if isinstance(x, Feature):
        for i in range(1, 5):
            view = weight(b, node, i, "")
            if view is not None:
                b.add_member(view.name, param_axis(node, view, 0), x.layout, "norm")
        b.tag(node, x, "norm")
    if node.target.overloadpacket is aten.batch_norm:
        return x
    return (x, None, None)


def group_norm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``group_norm(x, groups, W, b)``: units stay within their group."""
    x = info_of(b, node.args[0])
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
    if isinstance(x, Feature):
        groups, channels = int(node.args[1]), shape_of(node)[1]
        if 1 < groups < channels:
            b.constrain_groups(x.layout, groups, label(node))
        for i in (2, 3):
            view = weight(b, node, i, "")
            if view is not None:
                b.add_member(view.name, param_axis(node, view, 0), x.layout, "norm")
        b.tag(node, x, "norm")
    return x


# -- elementwise -----------------------------------------------------------------------------------
def unary(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """Ops that keep every axis (dropout, casts, copies, softmax along any axis, neg, exp ...)."""
    x = info_of(b, node.args[0]) if node.args else None
    return x if isinstance(x, (*TRACKED, ParamView)) else None


def pooling(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """Pooling over the positions of (B, C, ...): the channels (axis 1) keep their units."""
    x = info_of(b, node.args[0])
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != 1):
        raise UnsupportedOpError(f"{label(node)}: pools over the axis of the units")
    return x if isinstance(x, Feature) else None


def nonlinearity(b: SpaceBuilder, node: torch.fx.Node) -> object:
    x = unary(b, node)
    b.tag(node, x, "post")
    return x


def elementwise(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``a + b``, ``a * b``, ``where(c, a, b)`` ...: broadcast operands index the same units.

    A parameter broadcast along the units joins their space (``norm``); a tensor that is neither
    (a constant, a mask) but varies along the units fixes them: the space, or for heads the dims
    (rotary ``cos``/``sin``) or the heads.
    """
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    ndim = len(out_shape)
    operands = []
    for a in [*node.args, *node.kwargs.values()]:
        if isinstance(a, torch.fx.Node) and shape_of(a) is not None:
            shift = ndim - len(shape_of(a))
            where = {i: i + shift for i in range(len(shape_of(a)))}
            operands.append((move(info_of(b, a), where, ndim), (1,) * shift + shape_of(a)))
    tracked = [info for info, _ in operands if isinstance(info, TRACKED)]
    if not tracked:
        views = [info for info, _ in operands if isinstance(info, ParamView)]
        return views[0] if len(views) == 1 else None
    out = tracked[0]
    for other in tracked[1:]:
        unify(b, node, out, other)
    for info, shape in operands:
        if isinstance(info, ParamView):
            join_param(b, node, info, shape, out)
        elif info is None:
            constant(b, node, shape, out)
    if node.target.overloadpacket is aten.add and isinstance(out, Feature):
        b.tag(node, out, "pre")
    return out


def unify(b: SpaceBuilder, node: torch.fx.Node, x: object, y: object) -> None:
    """Two operands of an elementwise op index the same units."""
    if isinstance(x, Feature) and isinstance(y, Feature) and x.axis == y.axis:
        b.merge_layouts(x.layout, y.layout, label(node))
    elif (
        isinstance(x, Heads)
        and isinstance(y, Heads)
        and (x.head_axis, x.dim_axis, x.outer) == (y.head_axis, y.dim_axis, y.outer)
        and x.heads * x.repeat == y.heads * y.repeat
    ):
        b.link_heads(x.space, x.repeat, y.space, y.repeat, dims=True, where=label(node))
    elif isinstance(x, Chunks) and isinstance(y, Chunks) and x.axis == y.axis:
        for p, q in zip(x.parts, y.parts):
            unify(b, node, p, q)
    else:
        raise UnsupportedOpError(f"{label(node)}: combines units laid out differently")


def join_param(
    b: SpaceBuilder, node: torch.fx.Node, view: ParamView, shape: tuple, out: object
) -> None:
    if isinstance(out, Feature):
        if shape[out.axis] != 1:
            b.add_member(view.name, param_axis(node, view, out.axis), out.layout, "norm")
    elif any(shape[a] != 1 for a in tracked_axes(out)):
        raise UnsupportedOpError(
            f"{label(node)}: parameter '{view.name}' varies along heads or their dims"
        )


def constant(b: SpaceBuilder, node: torch.fx.Node, shape: tuple, out: object) -> None:
    if isinstance(out, Feature):
        if shape[out.axis] != 1:
            b.fix(out.layout)
    elif isinstance(out, Heads):
        if out.dim_axis is not None and shape[out.dim_axis] != 1:
            b.fix_dims(out.space)
        if shape[out.head_axis] != 1:
            b.fix_heads(out.space)
    elif isinstance(out, Chunks):
        for part in out.parts:
            constant(b, node, shape, part)


# -- reductions ------------------------------------------------------------------------------------
def reduction(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``mean/sum/amax(x, dims, keepdim)``: over the units it is permutation-invariant (None)."""
    x = info_of(b, node.args[0])
    if not isinstance(x, TRACKED):
        return None
    ndim = len(shape_of(node.args[0]))
    dims = arg(node, 1, "dim")
    dims = range(ndim) if dims is None else (dims if isinstance(dims, (list, tuple)) else [dims])
    dims = {d % ndim for d in dims}
    keep = bool(arg(node, 2, "keepdim", False))
    if isinstance(x, Feature) and x.axis in dims:
        return None
    if dims & tracked_axes(x):
        raise UnsupportedOpError(f"{label(node)}: reduces over heads or their dims")
    order = [i for i in range(ndim) if keep or i not in dims]
    return by_order(x, order, node, "reduction")


# -- axes ------------------------------------------------------------------------------------------
def transpose(b: SpaceBuilder, node: torch.fx.Node) -> object:
    x, ndim = info_of(b, node.args[0]), len(shape_of(node))
    order = list(range(ndim))
    if node.target.overloadpacket is aten.t:
        order = order[::-1]
    else:
        d0, d1 = node.args[1] % ndim, node.args[2] % ndim
        order[d0], order[d1] = order[d1], order[d0]
    return by_order(x, order, node, "transpose")


def permute(b: SpaceBuilder, node: torch.fx.Node) -> object:
    ndim = len(shape_of(node))
    return by_order(info_of(b, node.args[0]), [d % ndim for d in node.args[1]], node, "permute")


def unsqueeze(b: SpaceBuilder, node: torch.fx.Node) -> object:
    ndim = len(shape_of(node))
    d = node.args[1] % ndim
    order = [i for i in range(ndim - 1)]
    order.insert(d, None)
    return by_order(info_of(b, node.args[0]), order, node, "unsqueeze")


def squeeze(b: SpaceBuilder, node: torch.fx.Node) -> object:
    src = shape_of(node.args[0])
    dims = arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, n in enumerate(src) if n == 1]
    dims = {d % len(src) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    order = [i for i in range(len(src)) if not (i in dims and src[i] == 1)]
    return by_order(info_of(b, node.args[0]), order, node, "squeeze")


def expand(b: SpaceBuilder, node: torch.fx.Node) -> object:
    src, dst = shape_of(node.args[0]), shape_of(node)
    new = len(dst) - len(src)
    x = by_order(info_of(b, node.args[0]), [None] * new + list(range(len(src))), node, "expand")
    if isinstance(x, Heads):
        grown = {new + i for i, n in enumerate(src) if n == 1 and dst[new + i] != 1}
        x = replace(x, expanded=x.expanded | grown | set(range(new)))
    return x


def select(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``select(x, dim, i)``: picks one chunk of a packed projection, or drops an untracked axis."""
    ndim = len(shape_of(node.args[0]))
    return _select(b, node, info_of(b, node.args[0]), node.args[1] % ndim, node.args[2], ndim)


def unbind(b: SpaceBuilder, node: torch.fx.Node) -> object:
    ndim = len(shape_of(node.args[0]))
    dim = arg(node, 1, "dim", 0) % ndim
    x = info_of(b, node.args[0])
    return tuple(_select(b, node, x, dim, i, ndim) for i in range(shape_of(node.args[0])[dim]))


def _select(b: SpaceBuilder, node: torch.fx.Node, x: object, dim: int, index: int, ndim: int):
    order = [i for i in range(ndim) if i != dim]
    if isinstance(x, Chunks) and x.axis == dim:
        return by_order(x.parts[index], order, node, "select")
    if isinstance(x, Heads) and x.head_axis == dim and x.dim_axis is not None:
        if x.repeat != 1 or x.outer != 1 or x.loose:
            raise UnsupportedOpError(f"{label(node)}: selects one of repeated heads")
        size = b.size[b.find(x.space)] // x.heads
        part = b.refine(x.space, [size] * x.heads, label(node))[index % x.heads]
        out = by_order(Feature(x.dim_axis, Layout.of(part)), order, node, "select")
        if node.target.overloadpacket is aten.select:
            b.tag(node, out, "pre")
        return out
    if dim in tracked_axes(x):
        raise UnsupportedOpError(f"{label(node)}: indexing selects some of the units")
    if isinstance(x, ParamView):
        return ParamView(x.name, tuple(a for i, a in enumerate(x.axes) if i != dim))
    return by_order(x, order, node, "select")


def slice_(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``slice(x, dim, start, end)``: a whole axis, part of an untracked axis, or part of the dims
    of a head (rotary halves: the dims are then fixed)."""
    x, src = info_of(b, node.args[0]), shape_of(node.args[0])
    dim = arg(node, 1, "dim", 0) % len(src)
    full = shape_of(node)[dim] == src[dim]
    if full or dim not in tracked_axes(x) and not isinstance(x, ParamView):
        return x
    if isinstance(x, ParamView):
        return ParamView(x.name, tuple(None if i == dim else a for i, a in enumerate(x.axes)))
    if isinstance(x, Heads) and x.dim_axis == dim:
        b.fix_dims(x.space)
        return replace(x, loose=True)
    raise UnsupportedOpError(f"{label(node)}: indexing selects some of the units")


def split(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``split(x, size, dim)`` / ``split_with_sizes`` / ``chunk``: along the units, the space is
    refined into one space per part (a packed qkv projection becomes q, k and v)."""
    x, src = info_of(b, node.args[0]), shape_of(node.args[0])
    dim = arg(node, 2, "dim", 0) % len(src)
    n = src[dim]
    packet = node.target.overloadpacket
    if packet is aten.split_with_sizes:
        sizes = list(node.args[1])
    elif packet is aten.chunk:
        step = -(-n // node.args[1])
        sizes = [min(step, n - i) for i in range(0, n, step)]
    else:
        sizes = [min(node.args[1], n - i) for i in range(0, n, node.args[1])]
    if dim not in tracked_axes(x):
        return tuple(x for _ in sizes)
    if not isinstance(x, Feature):
        raise UnsupportedOpError(f"{label(node)}: splits heads")
    parts = b.refine(plain_space(node, x, "splits"), sizes, label(node))
    return tuple(Feature(dim, Layout.of(p)) for p in parts)


def getitem(b: SpaceBuilder, node: torch.fx.Node) -> object:
    items = info_of(b, node.args[0])
    if not isinstance(items, tuple):
        return unsupported_with(b, node)
    out = items[node.args[1]]
    b.tag(node, out, "pre")
    return out


def concatenate(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``cat(tensors, dim)``: along the units their layouts follow each other; along the dims of
    heads (rotary) the dims are fixed; along any other axis the operands index the same units."""
    tensors = node.args[0]
    ndim = len(shape_of(node))
    dim = arg(node, 1, "dim", 0) % ndim
    infos = [info_of(b, t) for t in tensors]
    tracked = [i for i in infos if isinstance(i, TRACKED)]
    if not tracked:
        return None
    first = tracked[0]
    if isinstance(first, Heads) and first.dim_axis == dim:
        for other in tracked[1:]:
            unify(b, node, replace(first, loose=False), replace(other, loose=False))
        if len(tracked) != len(infos):
            raise UnsupportedOpError(f"{label(node)}: concatenates heads with other tensors")
        b.fix_dims(first.space)
        return replace(first, loose=True)
    if dim in tracked_axes(first):
        return _cat_units(b, node, tensors, infos, dim)
    for other in tracked[1:]:
        unify(b, node, first, other)
    for t, info in zip(tensors, infos):
        if isinstance(info, ParamView):
            join_param(b, node, info, shape_of(t), first)
        elif info is None:
            constant(b, node, shape_of(t), first)
    return first


def _cat_units(b, node, tensors, infos, dim: int) -> Feature:
    segments: list[Segment] = []
    for t, info in zip(tensors, infos):
        if info is None:
            segments.append(Segment(b.new_space(shape_of(t)[dim], f"{node.name}:fixed", True)))
        elif isinstance(info, Feature) and info.axis == dim and info.layout.outer == 1:
            segments.extend(b.expand(info.layout).segments)
        else:
            raise UnsupportedOpError(f"{label(node)}: concatenates units along mismatched axes")
    return Feature(dim, Layout(tuple(segments)))


def index(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``x[i0, i1, ...]`` with index tensors on leading axes only (e.g. the last token of each row)."""
    x, indices = info_of(b, node.args[0]), node.args[1]
    if not isinstance(x, TRACKED):
        return unsupported_with(b, node) if isinstance(x, ParamView) else None
    if any(i is None for i in indices) or any(isinstance(info_of(b, i), TRACKED) for i in indices):
        raise UnsupportedOpError(f"{label(node)}: advanced indexing of a tensor with units")
    k = len(indices)
    if min(tracked_axes(x)) < k:
        raise UnsupportedOpError(f"{label(node)}: indexing selects some of the units")
    shift = len(shape_of(node)) - (len(shape_of(node.args[0])) - k) - k
    src = len(shape_of(node.args[0]))
    order = [None] * (k + shift) + list(range(k, src))
    return by_order(x, order, node, "index")


# -- reshapes --------------------------------------------------------------------------------------
def blocks(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pairs (source axes, destination axes) of equal product, axes of size 1 left out."""
    s = [i for i, n in enumerate(src) if n != 1]
    d = [j for j, n in enumerate(dst) if n != 1]
    out, i, j = [], 0, 0
    while i < len(s) and j < len(d):
        a, c = [s[i]], [d[j]]
        pa, pc = src[s[i]], dst[d[j]]
        i, j = i + 1, j + 1
        while pa != pc:
            if pa < pc:
                a.append(s[i])
                pa *= src[s[i]]
                i += 1
            else:
                c.append(d[j])
                pc *= dst[d[j]]
                j += 1
        out.append((a, c))
    return out


def reshape(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """view / reshape / flatten / unflatten, read off the shapes before and after.

    Units merged with other axes repeat (as for the fx rules); a unit axis split in two gives
    :class:`Heads` (``(B, T, H*d) -> (B, T, H, d)``), in three :class:`Chunks` of heads
    (``(B, T, 3*H*d) -> (B, T, 3, H, d)``); heads merged back give the plain units again.
    """
    x = info_of(b, node.args[0])
    src, dst = shape_of(node.args[0]), shape_of(node)
    pairs = blocks(src, dst)
    if isinstance(x, ParamView):
        where = {a[0]: c[0] for a, c in pairs if len(a) == 1 and len(c) == 1}
        return move(x, where, len(dst))
    if not isinstance(x, TRACKED):
        return None
    block = {a: (s, d) for s, d in pairs for a in s}
    if isinstance(x, Feature):
        return _reshape_feature(b, node, x, src, dst, *block[x.axis])
    if isinstance(x, Heads):
        return _reshape_heads(b, node, x, src, dst, block)
    where = {}
    for axis in tracked_axes(x):
        s, d = block[axis]
        if len(s) != 1 or len(d) != 1:
            raise UnsupportedOpError(f"{label(node)}: reshapes packed heads")
        where[axis] = d[0]
    return move(x, where, len(dst))


def _reshape_feature(b, node, x: Feature, src, dst, s: list[int], d: list[int]) -> object:
    u = x.axis
    if len(d) == 1:  # the units keep an axis of their own, maybe merged with others
        outer = math.prod(src[a] for a in s if a < u)
        inner = math.prod(src[a] for a in s if a > u)
        return Feature(d[0], x.layout.repeated(inner=inner, outer=outer))
    if s == [u] and len(d) == 2:
        space = plain_space(node, x, "splits")
        b.set_heads(space, dst[d[0]])
        return Heads(space, dst[d[0]], d[0], d[1])
    if len(s) == 2 and s[1] == u and len(d) == 2 and dst[d[0]] % src[s[0]] == 0:
        space = plain_space(node, x, "splits")  # (B, E) -> (B*H, d): heads merged with the batch
        heads = dst[d[0]] // src[s[0]]
        b.set_heads(space, heads)
        return Heads(space, heads, d[0], d[1], outer=src[s[0]])
    if s == [u] and len(d) == 3:
        space = plain_space(node, x, "splits")
        chunk = src[u] // dst[d[0]]
        parts = b.refine(space, [chunk] * dst[d[0]], label(node))
        for p in parts:
            b.set_heads(p, dst[d[1]])
        return Chunks(d[0], tuple(Heads(p, dst[d[1]], d[1], d[2]) for p in parts))
    raise UnsupportedOpError(f"{label(node)}: reshape {src} -> {dst} splits the axis of the units")


def _reshape_heads(b, node, x: Heads, src, dst, block: dict) -> object:
    hs, hd = block[x.head_axis]
    if x.dim_axis is not None and block[x.dim_axis][0] is hs:  # heads and dims merge: plain units
        if hs != [x.head_axis, x.dim_axis] or len(hd) != 1 or x.outer != 1 or x.loose:
            raise UnsupportedOpError(f"{label(node)}: reshape {src} -> {dst} mixes heads")
        return Feature(hd[0], Layout.of(_merged_space(b, node, x)))
    where = {}
    if x.dim_axis is not None:
        ds, dd = block[x.dim_axis]
        if len(ds) != 1 or len(dd) != 1:
            raise UnsupportedOpError(f"{label(node)}: reshape {src} -> {dst} splits head dims")
        where[x.dim_axis] = dd[0]
    repeat, outer = x.repeat, x.outer
    if len(hs) == 1 and len(hd) == 1:
        head = hd[0]
    elif len(hd) == 1 and hs[0] == x.head_axis and set(hs[1:]) <= x.expanded:
        head, repeat = hd[0], repeat * math.prod(src[a] for a in hs[1:])  # repeat_kv
    elif len(hs) == 1 and len(hd) == 2 and dst[hd[0]] == x.outer:
        head, outer = hd[1], 1  # (B*H, ...) -> (B, H, ...)
    else:
        raise UnsupportedOpError(f"{label(node)}: reshape {src} -> {dst} mixes heads")
    where[x.head_axis] = head
    return replace(move(x, where, len(dst)), repeat=repeat, outer=outer)


def _merged_space(b: SpaceBuilder, node: torch.fx.Node, x: Heads) -> int:
    """The space of heads merged back into one axis; with repeated heads (grouped-query attention)
    a new space whose plan is that of ``x.space`` with every head repeated."""
    if x.repeat == 1:
        return x.space
    size = b.size[b.find(x.space)] * x.repeat
    space = b.new_space(size, f"{b.name[b.find(x.space)]}:heads")
    b.set_heads(space, x.heads * x.repeat)
    b.link_heads(space, 1, x.space, x.repeat, dims=True, where=label(node))
    return space


# -- attention -------------------------------------------------------------------------------------
def attention(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``scaled_dot_product_attention(q, k, v, mask, dropout, is_causal, scale, enable_gqa)``.

    q and k share heads and the dims within a head (every logit ``q_h . k_h`` is kept), v shares
    the heads; the output holds v's dims on q's heads.
    """
    q, k, v = (info_of(b, a) for a in node.args[:3])
    if not any(isinstance(i, TRACKED) for i in (q, k, v)):
        return None
    ndim = len(shape_of(node))
    for info in (q, k, v):
        if not isinstance(info, Heads) or (info.head_axis, info.dim_axis) != (ndim - 3, ndim - 1):
            raise UnsupportedOpError(f"{label(node)}: q, k and v must be split into heads")
    mask = arg(node, 3, "attn_mask")
    if isinstance(info_of(b, mask), (*TRACKED, ParamView)):
        raise UnsupportedOpError(f"{label(node)}: an attention mask computed from the weights")
    gqa = 1
    if arg(node, 7, "enable_gqa", False):
        gqa = (q.heads * q.repeat) // (k.heads * k.repeat)
    logits = _logits(b, node, q, k, gqa)
    if isinstance(mask, torch.fx.Node) and shape_of(mask) is not None:
        shape = shape_of(mask)
        if len(shape) >= 3 and shape[len(shape) - 3] != 1:
            b.fix_heads(q.space)
    return _weighted(b, node, logits, v, gqa, ndim)


def _logits(b: SpaceBuilder, node: torch.fx.Node, q: Heads, k: Heads, gqa: int) -> Heads:
    if q.outer != 1 or k.outer != 1 or q.heads * q.repeat != k.heads * k.repeat * gqa:
        raise UnsupportedOpError(f"{label(node)}: q and k have different heads")
    b.link_heads(q.space, q.repeat, k.space, k.repeat * gqa, dims=True, where=label(node))
    return replace(q, dim_axis=None, loose=False)


def _weighted(b, node, logits: Heads, v: Heads, gqa: int, ndim: int) -> Heads:
    if v.outer != 1 or logits.heads * logits.repeat != v.heads * v.repeat * gqa or v.loose:
        raise UnsupportedOpError(f"{label(node)}: attention and v have different heads")
    b.link_heads(logits.space, logits.repeat, v.space, v.repeat * gqa, dims=False, where="")
    return Heads(v.space, v.heads, ndim - 3, ndim - 1, repeat=v.repeat * gqa)


def matmul(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``a @ b``: activations times a weight (W of shape (in, out)), or attention written out:
    ``q @ k^T`` (logits) and ``softmax(logits) @ v``."""
    x, y = info_of(b, node.args[0]), info_of(b, node.args[1])
    if isinstance(y, ParamView) and not isinstance(x, ParamView):
        return _dense(b, node, 0, y, None, reads=0, writes=1)
    if not isinstance(x, Heads) or not isinstance(y, Heads):
        return unsupported_with(b, node)
    nx, ny, ndim = len(shape_of(node.args[0])), len(shape_of(node.args[1])), len(shape_of(node))
    if x.dim_axis == nx - 1 and y.dim_axis == ny - 2 and x.head_axis == y.head_axis:
        return _logits(b, node, x, y, 1)
    if x.dim_axis is None and y.dim_axis == ny - 1 and x.head_axis == y.head_axis == ndim - 3:
        return _weighted(b, node, x, y, 1, ndim)
    raise UnsupportedOpError(f"{label(node)}: a product of heads that is not attention")


def module_call(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """A model's ``nn.Linear``, ``nn.Conv1d/2d`` or ``nn.LayerNorm`` called as a module (see
    :func:`otfuse.discovery.export.modularize`); any other module is not understood."""
    module = b.modules[node.target]
    views = {
        name: ParamView(b.canonical[f"{node.target}.{name}"], tuple(range(t.dim())))
        for name, t in module.named_parameters(recurse=False)
    }
    b.params_seen.update(v.name for v in views.values())
    w, bias = views.get("weight"), views.get("bias")
    if isinstance(module, nn.Linear):
        return _dense(b, node, 0, w, bias, reads=1, writes=0)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv(b, node, w, bias, module.groups)
    if isinstance(module, nn.LayerNorm):
        return _norm(b, node, len(module.normalized_shape), [w, bias])
    if views:
        raise UnsupportedOpError(f"module '{node.target}' of the exported graph holds weights")
    return None


def no_units(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """Ops whose result carries no units (sizes, assertions, tensors of the same shape)."""
    return None


def _packets(names: str) -> list:
    """The ATen overload packets named (space-separated) that this torch has."""
    return [getattr(aten, n) for n in names.split() if hasattr(aten, n)]


ATEN_RULES: dict[object, Rule] = {
    **{p: linear for p in _packets("linear")},
    **{p: addmm for p in _packets("addmm")},
    **{p: matmul for p in _packets("matmul mm bmm")},
    **{p: conv for p in _packets("conv1d conv2d conv3d")},
    **{p: embedding for p in _packets("embedding")},
    **{p: layer_norm for p in _packets("layer_norm rms_norm")},
    **{p: batch_norm for p in _packets("batch_norm _native_batch_norm_legit_no_training")},
    **{p: group_norm for p in _packets("group_norm")},
    **{p: attention for p in _packets("scaled_dot_product_attention")},
    **{
        p: nonlinearity
        for p in _packets(
            "relu relu_ gelu silu tanh sigmoid elu leaky_relu hardswish mish softplus hardtanh "
            "relu6"
        )
    },
    **{
        p: unary
        for p in _packets(
            "dropout alias clone contiguous detach to _to_copy type_as lift_fresh_copy neg exp "
            "rsqrt sqrt abs cos sin erf log reciprocal square softmax _softmax log_softmax "
            "_log_softmax clamp clamp_min clamp_max"
        )
    },
    **{
        p: pooling
        for p in _packets(
            "max_pool1d max_pool2d avg_pool1d avg_pool2d adaptive_avg_pool1d adaptive_avg_pool2d"
        )
    },
    **{
        p: elementwise
        for p in _packets(
            "add sub rsub mul div pow where masked_fill maximum minimum eq ne lt le gt ge "
            "logical_and logical_or bitwise_and __and__ __or__"
        )
    },
    **{p: reduction for p in _packets("mean sum amax amin var std logsumexp")},
    **{p: transpose for p in _packets("transpose t swapaxes")},
    **{p: permute for p in _packets("permute")},
    **{p: unsqueeze for p in _packets("unsqueeze")},
    **{p: squeeze for p in _packets("squeeze")},
    **{p: expand for p in _packets("expand")},
    **{p: select for p in _packets("select")},
    **{p: unbind for p in _packets("unbind")},
    **{p: slice_ for p in _packets("slice")},
    **{p: split for p in _packets("split split_with_sizes chunk")},
    **{p: concatenate for p in _packets("cat concat")},
    **{p: index for p in _packets("index")},
    **{p: reshape for p in _packets("view reshape _unsafe_view flatten unflatten")},
    **{
        p: no_units
        for p in _packets(
            "sym_size sym_numel sym_stride _assert_scalar sym_constrain_range_for_size "
            "_assert_tensor_metadata new_ones new_zeros new_full new_empty ones_like zeros_like "
            "empty_like full_like size"
        )
    },
    operator.getitem: getitem,
}


def aten_rule(node: torch.fx.Node) -> Rule | None:
    """The rule of an ATen op (by its overload packet), or of ``getitem``; None if unknown."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    try:
        return ATEN_RULES.get(packet) if packet is not None else ATEN_RULES.get(target)
    except TypeError:
        return None
