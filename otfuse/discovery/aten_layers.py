"""ATen rules for layers that open spaces, normalisation, elementwise ops and reductions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.fx

from otfuse.discovery.aten_values import (
    TRACKED,
    Chunks,
    Heads,
    ParamView,
    arg,
    aten,
    by_order,
    fix_read,
    info_of,
    label,
    move,
    opaque,
    open_space,
    param_axis,
    tracked_axes,
    unsupported_with,
    weight,
)
from otfuse.discovery.layout import Layout
from otfuse.discovery.rules import pads_axis
from otfuse.discovery.walker import Feature, SpaceBuilder, Unusable, shape_of
from otfuse.errors import UnsupportedOpError


# -- layers that open a space ----------------------------------------------------------------------
def linear(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``linear(x, W, b)``: W (out, in) reads the units of x's last axis and writes new ones."""
    w, bias = weight(b, node, 1, "weight"), weight(b, node, 2, "bias")
    return _computed_bias(b, node, 2, _dense(b, node, 0, w, bias, reads=1, writes=0))


def _computed_bias(b: SpaceBuilder, node: torch.fx.Node, i: int, out: object) -> object:
    """A bias argument ``i`` that is not a parameter (computed, e.g. ``cat((q_bias, zeros,
    v_bias))`` as BEiT's qkv bias): a constant along the units written, which then stay."""
    given = arg(node, i, "bias")
    if isinstance(given, torch.fx.Node) and info_of(b, given) is None:
        shape = shape_of(given)
        if isinstance(out, Feature) and shape is not None and shape and shape[-1] != 1:
            b.fix(out.layout)
    return out


def addmm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``addmm(bias, x, W)`` = x W + bias with W (in, out), as GPT-2's Conv1D computes."""
    w, bias = weight(b, node, 2, "mat2"), weight(b, node, 0, "self")
    return _dense(b, node, 1, w, bias, reads=0, writes=1)


def _dense(b, node, x_arg: int, w, bias, *, reads: int, writes: int) -> object:
    """Argument ``x_arg`` times weight ``w`` (axis ``reads`` of its view: inputs, ``writes``: outputs)."""
    if w is None or len(w.axes) != 2:
        return unsupported_with(b, node)
    x, ndim = info_of(b, node.args[x_arg]), len(shape_of(node))
    if isinstance(x, Feature) and x.axis != len(shape_of(node.args[x_arg])) - 1:
        if len(shape_of(node.args[x_arg])) != ndim:
            raise UnsupportedOpError(f"{label(node)}: the units are not on the last axis")
        n_in, n_out = shape_of(node.args[x_arg])[-1], shape_of(node)[-1]
        axes = [(w, reads, n_in), (w, writes, n_out)]
        axes += [(bias, len(bias.axes) - 1, n_out)] if bias is not None else []
        for view, j, size in axes:  # fixed: a use of the same weight along units cannot move them
            fixed = Layout.of(b.new_space(size, label(node), fixed=True))
            b.add_member(view.name, param_axis(node, view, j), fixed, "norm")
        return x  # mixes positions (MLP-Mixer's token mixing): the units pass through
    if isinstance(x, TRACKED) and not isinstance(x, Feature):
        raise UnsupportedOpError(f"{label(node)}: a projection of split heads")
    if isinstance(x, ParamView):  # a learned query: the layer reads that parameter's units
        b.add_parameter_reader(w.name, param_axis(node, w, reads), x.name, x.axes[-1])
    else:
        b.add_reader(w.name, param_axis(node, w, reads), x, source=node.args[x_arg])
    producers = [(w, writes), (bias, len(bias.axes) - 1 if bias is not None else 0)]
    return open_space(b, node, shape_of(node)[-1], ndim - 1, producers)


def conv(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``conv1d/conv2d(x, W, b, stride, padding, dilation, groups)`` on channels (axis 1)."""
    w, bias = weight(b, node, 1, "weight"), weight(b, node, 2, "bias")
    if w is None:
        return unsupported_with(b, node)
    return _computed_bias(b, node, 2, _conv(b, node, w, bias, int(arg(node, 6, "groups", 1))))


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
    if isinstance(x, Feature) and groups > 1:
        b.constrain_groups(x.layout, groups, label(node))
    b.add_reader(w.name, param_axis(node, w, 1), x, groups=groups, source=node.args[0])
    return open_space(b, node, c_out, 1, [(w, 0), (bias, 0)], groups=groups)


def conv_transpose(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``conv_transpose1d/2d/3d(x, W, b, stride, padding, output_padding, groups, dilation)``,
    W (in, out, k...): W's axis 1 and b write the output channels, W's axis 0 reads x's."""
    w, bias = weight(b, node, 1, "weight"), weight(b, node, 2, "bias")
    if w is None:
        return unsupported_with(b, node)
    if int(arg(node, 6, "groups", 1)) != 1:
        raise UnsupportedOpError(f"{label(node)}: grouped transposed convolution is not supported")
    x = info_of(b, node.args[0])
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
    b.add_reader(w.name, param_axis(node, w, 0), x, source=node.args[0])
    return open_space(b, node, shape_of(node)[1], 1, [(w, 1), (bias, 0)])


def embedding(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``embedding(W, ids)``: W (vocabulary, dim) writes units on the output's last axis."""
    w = weight(b, node, 0, "weight")
    if w is None or isinstance(info_of(b, node.args[1]), TRACKED):
        return unsupported_with(b, node)
    fix_read(b, w, (0,))  # rows looked up by token id: a head tied to them keeps them in place
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


def channel_norm(
    b: SpaceBuilder, node: torch.fx.Node, tensors: Callable[[], list[tuple[str, int]]]
) -> object:
    """A normalisation per channel (axis 1) of the node's input: its per-channel ``tensors()``
    (parameter or buffer, axis; read only when the channels are units) join the channels' units.
    Returns the input's info."""
    x = info_of(b, node.args[0])
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
    if isinstance(x, Feature):
        for name, axis in tensors():
            b.add_member(name, axis, x.layout, "norm")
        b.tag(node, x, "norm")
    return x


def batch_norm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``batch_norm`` / ``_native_batch_norm_legit_no_training`` / ``instance_norm`` (the same
    arguments): weight, bias and statistics on axis 1."""

    def tensors() -> list[tuple[str, int]]:
        views = [weight(b, node, i, "") for i in range(1, 5)]
        return [(v.name, param_axis(node, v, 0)) for v in views if v is not None]

    x = channel_norm(b, node, tensors)
    if node.target.overloadpacket in (aten.batch_norm, aten.instance_norm):
        return x
    return (x, None, None)


def prelu(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``prelu(x, W)``: one slope per channel (axis 1) joins the units, or one for all."""
    x, slope = info_of(b, node.args[0]), weight(b, node, 1, "weight")
    if isinstance(x, Feature) and slope is not None and shape_of(node.args[1])[0] > 1:
        if x.axis != 1:
            raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
        b.add_member(slope.name, param_axis(node, slope, 0), x.layout, "norm")
    elif isinstance(x, TRACKED) and not isinstance(x, Feature):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the channel axis")
    b.tag(node, x, "post")
    return x


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


def pooling_with_indices(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``max_pool*_with_indices`` / ``adaptive_max_pool*``: (pooled, indices), both with the
    input's channels (axis 1)."""
    x = pooling(b, node)
    return (x, x) if x is not None else None


def unpooling(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``max_unpool2d/3d(x, indices, ...)``: the channels keep their units, the indices' own."""
    x, indices = pooling(b, node), info_of(b, node.args[1])
    if isinstance(x, Feature) and isinstance(indices, Feature):
        b.merge_layouts(x.layout, indices.layout, label(node))
    elif isinstance(x, Feature) != isinstance(indices, Feature):
        raise UnsupportedOpError(f"{label(node)}: unpools with indices of other units")
    return x


def padding(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``constant_pad_nd`` / ``reflection_pad*`` / ``replication_pad*``: pads the last
    ``len(pad) // 2`` axes; the units' axis only by zero (:func:`rules.pads_axis`)."""
    x, ndim = info_of(b, node.args[0]), len(shape_of(node))
    if isinstance(x, TRACKED) and (
        not isinstance(x, Feature) or pads_axis(node.args[1], ndim, x.axis)
    ):
        raise UnsupportedOpError(f"{label(node)}: pads the axis of the units")
    return x if isinstance(x, Feature) else None


def nonlinearity(b: SpaceBuilder, node: torch.fx.Node) -> object:
    x = unary(b, node)
    b.tag(node, x, "post")
    return x


def elementwise(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``a + b``, ``a * b``, ``where(c, a, b)`` ...: broadcast operands index the same units.

    A parameter broadcast along the units joins their space (``norm``); a tensor that is neither
    (a constant, a mask) but varies along the units fixes them: the space, or for heads the dims
    (rotary ``cos``/``sin``) or the heads. An operand with a single unit broadcast along another's
    units (an attention weight per token, a spatial gate) does not join them: its unit stays fixed.
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
    for i, (info, shape) in enumerate(operands):
        if isinstance(info, Feature) and shape[info.axis] == 1 < out_shape[info.axis]:
            b.fix(info.layout)  # one unit broadcast along the others' units: a gate, a weight
            operands[i] = (None, (1,) * ndim)  # varies along none of the output's units
    tracked = [info for info, _ in operands if isinstance(info, TRACKED)]
    if not tracked:
        views = [info for info, _ in operands if isinstance(info, ParamView)]
        varying = any(info is None and any(n != 1 for n in shape) for info, shape in operands)
        if len(set(views)) == 1 and not varying:  # scaled or shifted by scalars, or by itself
            return views[0]
        for view in views:  # parameters combined into a constant: read as they are
            opaque(b).setdefault(view.name, label(node))
        return None
    # heads with their dims before values per head (a q/k-norm: x * rsqrt(mean(x^2)))
    tracked.sort(key=lambda info: isinstance(info, Heads) and info.dim_axis is None)
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
    elif _per_head(x, y) or _per_head(y, x):  # a value per head (a q/k-norm's scale) and heads
        b.link_heads(x.space, x.repeat, y.space, y.repeat, dims=False, where=label(node))
    elif isinstance(x, Chunks) and isinstance(y, Chunks) and x.axis == y.axis:
        for p, q in zip(x.parts, y.parts):
            unify(b, node, p, q)
    else:
        raise UnsupportedOpError(f"{label(node)}: combines units laid out differently")


def _per_head(x: object, y: object) -> bool:
    """``x`` holds one value per head of ``y``'s heads (its dims reduced away, ``y``'s kept)."""
    return (
        isinstance(x, Heads)
        and isinstance(y, Heads)
        and x.dim_axis is None
        and y.dim_axis is not None
        and (x.head_axis, x.outer) == (y.head_axis, y.outer)
        and x.heads * x.repeat == y.heads * y.repeat
    )


def join_param(
    b: SpaceBuilder, node: torch.fx.Node, view: ParamView, shape: tuple, out: object
) -> None:
    if isinstance(out, Feature):
        if shape[out.axis] != 1:
            b.add_member(view.name, param_axis(node, view, out.axis), out.layout, "norm")
        else:  # one value broadcast along the units: whatever unit it is must stay
            fix_read(b, view, range(len(shape)))
    elif isinstance(out, (Heads, Chunks)):
        # values per dim shared by every head (a q/k-norm's weight) or per head (a relative
        # position bias): the parameter is not transported, so what it varies along stays in place
        # (and it must not be a member of a transported space elsewhere: opaque)
        opaque(b).setdefault(view.name, label(node))
        constant(b, node, shape, out)


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
    return _reduce(b, node, 1)


def vector_norm(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``linalg_vector_norm(x, ord, dims, keepdim)`` (``F.normalize``): a reduction."""
    return _reduce(b, node, 2)


def _reduce(b: SpaceBuilder, node: torch.fx.Node, dim_arg: int) -> object:
    """A reduction whose dims are argument ``dim_arg`` and keepdim the next one."""
    x = info_of(b, node.args[0])
    if not isinstance(x, TRACKED):
        return None
    ndim = len(shape_of(node.args[0]))
    dims = arg(node, dim_arg, "dim")
    dims = range(ndim) if dims is None else (dims if isinstance(dims, (list, tuple)) else [dims])
    dims = {d % ndim for d in dims}
    keep = bool(arg(node, dim_arg + 1, "keepdim", False))
    if isinstance(x, Feature) and x.axis in dims:
        return None
    if isinstance(x, Heads) and x.dim_axis is not None and dims & tracked_axes(x) == {x.dim_axis}:
        x = replace(x, dim_axis=None, loose=False)  # over each head's dims: a value per head
    if dims & tracked_axes(x):
        raise UnsupportedOpError(f"{label(node)}: reduces over heads or their dims")
    order = [i for i in range(ndim) if keep or i not in dims]
    return by_order(x, order, node, "reduction")


# -- recurrent cells -------------------------------------------------------------------------------
def recurrent_cell(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``rnn_tanh_cell`` / ``rnn_relu_cell`` / ``gru_cell`` / ``lstm_cell(x, hx, w_ih, w_hh,
    b_ih, b_hh)``, as :func:`otfuse.discovery.rules.recurrent_cell` describes: one space per cell
    (keyed by its ``w_ih``) over all its calls, the gates as repeats of the weights' rows, the
    state zeros or the cell's own units."""
    w_ih, w_hh = weight(b, node, 2, "w_ih"), weight(b, node, 3, "w_hh")
    if w_ih is None or w_hh is None:
        return unsupported_with(b, node)
    x, ndim = info_of(b, node.args[0]), len(shape_of(node.args[0]))
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != ndim - 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the last axis")
    name = node.target.overloadpacket.__name__
    first = w_ih.name not in b.module_spaces
    if first:
        b.module_spaces[w_ih.name] = b.new_space(shape_of(node.args[3])[1], w_ih.name)
    own = Layout.of(b.module_spaces[w_ih.name])
    if first:
        gated = own.repeated(outer={"lstm_cell": 4, "gru_cell": 3}.get(name, 1))
        for i, key in ((2, "w_ih"), (3, "w_hh"), (4, "b_ih"), (5, "b_hh")):
            view = weight(b, node, i, key)
            if view is not None:
                b.add_member(view.name, param_axis(node, view, 0), gated, "producer")
        b.add_member(w_hh.name, param_axis(node, w_hh, 1), own, "consumer")
    b.add_reader(w_ih.name, param_axis(node, w_ih, 1), x, source=node.args[0])
    states = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    for state in states:
        info = info_of(b, state)
        if isinstance(info, Feature) and info.axis == len(shape_of(state)) - 1:
            b.merge_layouts(info.layout, own, label(node))
        elif info is not None or not _zeros(state):
            raise UnsupportedOpError(
                f"{label(node)}: a recurrent cell given a state that is neither zeros nor a "
                "cell's output"
            )
    out = Feature(ndim - 1, own)
    if name == "lstm_cell":
        return (out, out)
    b.tag(node, out, "post")
    return out


def recurrent(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu(x, hx, params, has_biases, num_layers,
    dropout, train, bidirectional, batch_first)``: the spaces of
    :func:`otfuse.discovery.rules.recurrent` (one per layer and direction, the gates as repeats of
    the rows), from the flat parameter list (w_ih, w_hh[, b_ih, b_hh] per layer and direction)."""
    name = node.target.overloadpacket.__name__
    x, ndim = info_of(b, node.args[0]), len(shape_of(node.args[0]))
    if isinstance(x, TRACKED) and (not isinstance(x, Feature) or x.axis != ndim - 1):
        raise UnsupportedOpError(f"{label(node)}: the units are not on the last axis")
    states = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    if any(info_of(b, s) is not None or not _zeros(s) for s in states):
        raise UnsupportedOpError(f"{label(node)}: initial states other than zeros")
    params, has_biases, layers, bidirectional = (
        node.args[2],
        node.args[3],
        node.args[4],
        node.args[7],
    )
    views = [info_of(b, p) for p in params]
    if not all(isinstance(v, ParamView) for v in views):
        return unsupported_with(b, node)
    per, dirs = (4 if has_biases else 2), (2 if bidirectional else 1)
    if len(params) != layers * dirs * per:  # e.g. an LSTM with proj_size: weight_hr as well
        raise UnsupportedOpError(f"{label(node)}: a recurrent layer with projections (proj_size)")
    gates = {"lstm": 4, "gru": 3}.get(name, 1)
    reads = x.layout if isinstance(x, Feature) else None
    for layer in range(layers):
        layouts = []
        for d in range(dirs):
            group = views[(layer * dirs + d) * per : (layer * dirs + d + 1) * per]
            hidden = shape_of(params[(layer * dirs + d) * per + 1])[1]
            own = Layout.of(b.new_space(hidden, group[0].name))
            for view in group:
                b.add_member(
                    view.name, param_axis(node, view, 0), own.repeated(outer=gates), "producer"
                )
            b.add_member(group[1].name, param_axis(node, group[1], 1), own, "consumer")
            b.add_reader(group[0].name, param_axis(node, group[0], 1), reads)
            layouts.append(own)
        reads = Layout(tuple(seg for layout in layouts for seg in layout.segments))
    out = Feature(ndim - 1, reads)
    state = (
        out
        if layers == 1 and dirs == 1
        else Unusable(
            f"the final states of a {layers}-layer{' bidirectional' if dirs == 2 else ''} recurrent "
            "layer hold several layers' units on one axis; use its output instead"
        )
    )
    return (out, state, state) if name == "lstm" else (out, state)


def _zeros(value: object) -> bool:
    """Whether a recurrent state is made by a zeros op (``zeros``, ``new_zeros``, ``zeros_like``)."""
    return "zeros" in str(getattr(value, "target", ""))
