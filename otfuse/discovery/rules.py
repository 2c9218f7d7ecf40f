"""What each traced op does to neuron spaces (the table of DESIGN.md, as code).

A rule takes the :class:`~otfuse.discovery.walker.SpaceBuilder` and a node and returns the node's info.
Rules for modules are looked up by module type, rules for functions and methods by target, through
:func:`otfuse.discovery.registry.rule_for`: rules users register first, then the built-in tables
:data:`MODULE_RULES` and :data:`FUNCTION_RULES` below. An op with no rule is accepted only when none of
its inputs carries tracked units; otherwise it is an :class:`~otfuse.errors.UnsupportedOpError` that
names the op and the node.

Building blocks for custom rules: :func:`tracked_input` (the units of the node's input),
:func:`open_space` (new units on the output), :func:`join` (a parameter axis indexes some units).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx
from torch import nn

from otfuse.discovery.layout import Layout, Role, Segment
from otfuse.discovery.walker import Feature, Info, ParamRef, SpaceBuilder, Unusable, shape_of
from otfuse.errors import UnsupportedOpError

Rule = Callable[[SpaceBuilder, torch.fx.Node], Info]


def where(node: torch.fx.Node) -> str:
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", node.target)
    )
    return f"op '{target}' at node '{node.name}'"


def describe(b: SpaceBuilder, node: torch.fx.Node) -> str:
    """The node as error messages name it: ``module 'path' (Class)`` or ``op 'name' at node 'n'``."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(b.modules[node.target]).__name__})"
    return where(node)


def info_of(b: SpaceBuilder, arg: object) -> Info:
    info = b.info.get(arg) if isinstance(arg, torch.fx.Node) else None
    if isinstance(info, Unusable):
        raise UnsupportedOpError(f"{where(arg)}: {info.reason}")
    return info


def tracked_input(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """Info of the node's first argument; parameters cannot flow where this is used."""
    info = info_of(b, node.args[0]) if node.args else None
    if isinstance(info, ParamRef):
        raise UnsupportedOpError(
            f"{where(node)}: parameter '{info.name}' used in an unsupported way"
        )
    return info


def require_axis(node: torch.fx.Node, info: Info, axis: int, ndim: int, what: str) -> None:
    if isinstance(info, Feature) and info.axis != axis % ndim:
        raise UnsupportedOpError(
            f"{where(node)}: {what} acts on axis {axis % ndim} but the units lie on axis {info.axis}"
        )


# -- layers that open a new space ----------------------------------------------------------------
def linear(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``nn.Linear`` on the units (last axis) opens a space of ``out_features`` units; on another
    axis (MLP-Mixer's token mixing) it mixes positions and the units pass through, its own outputs
    (hidden tokens) matched by position, not aligned."""
    mod: nn.Linear = b.modules[node.target]
    x = tracked_input(b, node)
    ndim = len(shape_of(node))
    if isinstance(x, Feature) and x.axis != ndim - 1:  # mixes positions (MLP-Mixer's token mixing)
        for name, axis in (("weight", 0), ("weight", 1), ("bias", 0)):
            tensor = getattr(mod, name, None)
            if tensor is not None:  # fixed: a use of the same weight along units cannot move them
                fixed = Layout.of(b.new_space(tensor.shape[axis], str(node.target), fixed=True))
                b.add_member(f"{node.target}.{name}", axis, fixed, "norm")
        return x  # the units pass through
    b.add_reader(f"{node.target}.weight", 1, x, source=node.args[0])
    return open_space(b, node, mod.out_features, ndim - 1)


def open_space(
    b: SpaceBuilder,
    node: torch.fx.Node,
    size: int,
    axis: int,
    groups: int = 1,
    *,
    producers: Mapping[str, int] | None = None,
) -> Feature:
    """A new space of ``size`` units on axis ``axis`` of the node's output, whose units the node
    produces (its *pre*-activations).

    ``producers`` maps each parameter of the node's module whose axis indexes the new units (the rows
    of a weight, a bias, a per-output scale) to that axis; by default the module's ``weight`` (dim 0)
    and ``bias``, those present. ``groups`` > 1 keeps units within that many contiguous groups.

    Returns:
        ``Feature(axis, layout)`` of the output, for the rule to return.
    """
    space = b.new_space(size, str(node.target))
    layout = Layout.of(space)
    b.constrain_groups(layout, groups, where(node))
    out = Feature(axis, layout)
    if producers is None:
        b.add_module_members(str(node.target), ("weight", "bias"), 0, layout, "producer")
    else:
        for param, param_axis in producers.items():
            join(b, node, param, param_axis, out, role="producer")
    b.tag(node, out, "pre")
    return out


def join(
    b: SpaceBuilder,
    node: torch.fx.Node,
    param: str,
    axis: int,
    info: Info,
    *,
    role: Role = "norm",
) -> None:
    """Record that axis ``axis`` of parameter (or buffer) ``param`` of the node's module indexes the
    units described by ``info``, so transporting those units transports this axis too.

    With a permutation :math:`\\pi` of the units, the parameter is re-indexed as
    :math:`\\theta'[\\ldots, i, \\ldots] = \\theta[\\ldots, \\pi(i), \\ldots]` along ``axis``; a soft
    plan contracts that axis with the corrected plan instead. ``role`` says what the axis is:
    ``producer`` (the units' incoming weights: weight rows, bias, output scale), ``consumer`` (an
    input axis: weight columns) or ``norm`` (per-unit parameters of an op that keeps the units).

    Args:
        param: name relative to the module, e.g. ``"weight"`` or ``"inner.bias"``. A parameter
            registered as ``None`` (``bias=False``) is skipped.
        axis: the parameter's axis; its length must equal the number of units of ``info``.
        info: the units, usually the node's input (``tracked_input(b, node)``) or output (from
            :func:`open_space`). Nothing is recorded when it is not a :class:`Feature` (e.g. the
            model's input, which is never transported).

    Raises:
        UnsupportedOpError: the node is not a module call, the module has no such tensor, or the
            axis does not fit the units; the message names the module and the parameter.
    """
    if not isinstance(info, Feature):
        return
    label = describe(b, node)
    if node.op != "call_module":
        raise UnsupportedOpError(f"{label}: join() needs a module call to name parameters of")
    tensor = _module_tensor(b.modules[node.target], param, label)
    if tensor is None:
        return
    if not -tensor.dim() <= axis < tensor.dim():
        raise UnsupportedOpError(
            f"{label}: '{param}' has no axis {axis} (shape {tuple(tensor.shape)})"
        )
    n = info.layout.length({s: b.size[b.find(s)] for s in info.layout.spaces()})
    if tensor.shape[axis] != n:
        raise UnsupportedOpError(
            f"{label}: axis {axis} of '{param}' has length {tensor.shape[axis]}, "
            f"but the units it would index are {n}"
        )
    b.add_member(f"{node.target}.{param}", axis % tensor.dim(), info.layout, role)


def _module_tensor(module: nn.Module, name: str, label: str) -> torch.Tensor | None:
    """Parameter or buffer ``name`` (dotted) of ``module``, None when registered as None (e.g.
    ``bias=False``); an :class:`UnsupportedOpError` naming ``label`` when there is none."""
    owner, _, leaf = name.rpartition(".")
    try:
        holder = module.get_submodule(owner) if owner else module
    except AttributeError:
        holder = None
    if leaf in getattr(holder, "_parameters", {}) or leaf in getattr(holder, "_buffers", {}):
        return getattr(holder, leaf)
    raise UnsupportedOpError(f"{label}: has no parameter or buffer '{name}'")


def conv(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """Conv with groups=1 opens a space; depthwise passes it through; grouped keeps units in groups."""
    mod: nn.Conv2d = b.modules[node.target]
    x = tracked_input(b, node)
    require_axis(node, x, 1, len(shape_of(node)), type(mod).__name__)
    g, c_in, c_out = mod.groups, mod.in_channels, mod.out_channels
    if g == 1:
        b.add_reader(f"{node.target}.weight", 1, x, source=node.args[0])
        return open_space(b, node, c_out, 1)
    if g == c_in:  # depthwise: output channel o reads input channel o // (c_out // c_in)
        if not isinstance(x, Feature):
            return None
        layout = x.layout.repeated(inner=c_out // c_in)
        b.add_module_members(str(node.target), ("weight", "bias"), 0, layout, "norm")
        return Feature(1, layout)
    if isinstance(x, Feature):
        b.constrain_groups(x.layout, g, where(node))
    b.add_reader(f"{node.target}.weight", 1, x, groups=g, source=node.args[0])
    return open_space(b, node, c_out, 1, groups=g)


def recurrent(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` on units of the input's last axis.

    Every layer and direction opens a space of ``hidden_size`` units: the rows of its
    ``weight_ih`` and ``weight_hh`` and its biases hold them once per gate (LSTM: i, f, g, o; GRU:
    r, z, n), the columns of ``weight_hh`` read them back, and the next layer's ``weight_ih`` reads
    the previous layer's (both directions, concatenated). Permuting a layer's hidden units this way
    leaves the recurrence's function unchanged. The output (..., directions x hidden) holds the last
    layer's units. The final states hold one tensor per layer and direction: with one layer and one
    direction they are that layer's units, otherwise using them is refused. Initial states other than
    zeros are refused (they would have to be permuted too).
    """
    mod: nn.RNNBase = b.modules[node.target]
    kind = type(mod).__name__
    if getattr(mod, "proj_size", 0):
        raise UnsupportedOpError(f"{where(node)}: {kind} with proj_size is not supported")
    _require_zero_states(b, node, kind)
    x = tracked_input(b, node)
    require_axis(node, x, -1, len(shape_of(node.args[0])), kind)
    reads = x.layout if isinstance(x, Feature) else None
    for layer in range(mod.num_layers):
        layouts = []
        for suffix in [f"_l{layer}", f"_l{layer}_reverse"][: 2 if mod.bidirectional else 1]:
            own = Layout.of(b.new_space(mod.hidden_size, f"{node.target}{suffix}"))
            _recurrent_members(b, mod, str(node.target), suffix, own, reads)
            layouts.append(own)
        reads = Layout(tuple(seg for layout in layouts for seg in layout.segments))
    out = Feature(len(shape_of(node.args[0])) - 1, reads)
    if mod.num_layers == 1 and not mod.bidirectional:
        state: Info = out  # (1, ..., hidden): the units on the last axis too
    else:
        state = Unusable(
            f"the final states of a {mod.num_layers}-layer{' bidirectional' if mod.bidirectional else ''} "
            f"{kind} hold several layers' units on one axis; use its output instead"
        )
    return (out, (state, state)) if isinstance(mod, nn.LSTM) else (out, state)


def recurrent_cell(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell``, usually called once per time step in a
    loop: one space of ``hidden_size`` units for the module (every call), held by the rows of its
    ``weight_ih``, ``weight_hh`` and biases once per gate and read by ``weight_hh``'s columns. The
    state passed in must be zeros or the cell's own earlier output (the same units); the new state
    (h, and c for an LSTM cell) holds the cell's units."""
    mod: nn.RNNCellBase = b.modules[node.target]
    kind, prefix = type(mod).__name__, str(node.target)
    x = tracked_input(b, node)
    require_axis(node, x, -1, len(shape_of(node.args[0])), kind)
    if prefix not in b.module_spaces:  # its first call
        b.module_spaces[prefix] = b.new_space(mod.hidden_size, prefix)
    own = Layout.of(b.module_spaces[prefix])
    _recurrent_members(b, mod, prefix, "", own, x.layout if isinstance(x, Feature) else None)
    states: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args[1:], node.kwargs), states.append)
    for state in states:
        info = info_of(b, state)
        for part in info if isinstance(info, tuple) else (info,):  # (h, c) of an LSTM cell
            if isinstance(part, Feature) and part.axis == len(shape_of(node.args[0])) - 1:
                b.merge_layouts(part.layout, own, where(node))
            elif part is not None or state.target not in ZEROS:
                raise UnsupportedOpError(
                    f"{where(node)}: {kind} given a state that is neither zeros nor a cell's output"
                )
    out = Feature(len(shape_of(node.args[0])) - 1, own)
    if isinstance(mod, nn.LSTMCell):
        return (out, out)
    b.tag(node, out, "post")
    return out


def _recurrent_members(
    b: SpaceBuilder, mod: nn.Module, prefix: str, suffix: str, own: Layout, reads: Layout | None
) -> None:
    """The members of one recurrent layer (or cell) whose hidden units are ``own``: the rows of
    ``weight_ih``, ``weight_hh`` and the biases hold them once per gate (LSTM: i, f, g, o; GRU: r,
    z, n), ``weight_hh``'s columns read them back, ``weight_ih``'s columns read ``reads``. A
    parameter axis already recorded (a cell's later calls) merges with itself."""
    gates = (
        4
        if isinstance(mod, (nn.LSTM, nn.LSTMCell))
        else 3
        if isinstance(mod, (nn.GRU, nn.GRUCell))
        else 1
    )
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if getattr(mod, f"{name}{suffix}", None) is not None:
            b.add_member(f"{prefix}.{name}{suffix}", 0, own.repeated(outer=gates), "producer")
    b.add_member(f"{prefix}.weight_hh{suffix}", 1, own, "consumer")
    b.add_reader(f"{prefix}.weight_ih{suffix}", 1, reads)


#: how a traced state of zeros is made (an RNN's initial state that need not be permuted)
ZEROS = (torch.zeros, torch.zeros_like, "new_zeros")


def _require_zero_states(b: SpaceBuilder, node: torch.fx.Node, kind: str) -> None:
    """An RNN's initial states, when given, must be zeros (``torch.zeros``, ``zeros_like``,
    ``new_zeros``): any other value would have to be permuted with the hidden units."""
    flat: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args[1:], node.kwargs), flat.append)
    for value in flat:
        if value.target not in ZEROS:
            raise UnsupportedOpError(
                f"{where(node)}: {kind} given initial states other than zeros (they would have "
                "to be permuted with its hidden units)"
            )


def conv_transpose(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """ConvTranspose (groups=1), weight (in, out, k...): opens a space of ``out`` units on axis 1,
    produced by the weight's axis 1 and the bias; the weight's axis 0 reads the input's units."""
    mod: nn.ConvTranspose2d = b.modules[node.target]
    x = tracked_input(b, node)
    require_axis(node, x, 1, len(shape_of(node)), type(mod).__name__)
    if mod.groups != 1:
        raise UnsupportedOpError(f"{where(node)}: grouped {type(mod).__name__} is not supported")
    b.add_reader(f"{node.target}.weight", 0, x, source=node.args[0])
    producers = {"weight": 1, **({"bias": 0} if mod.bias is not None else {})}
    return open_space(b, node, mod.out_channels, 1, producers=producers)


def embedding(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    mod: nn.Embedding = b.modules[node.target]
    space = b.new_space(mod.embedding_dim, str(node.target))
    b.add_member(f"{node.target}.weight", 1, Layout.of(space), "producer")
    out = Feature(len(shape_of(node)) - 1, Layout.of(space))
    b.tag(node, out, "pre")
    return out


# -- normalisation layers: per-unit parameters join the incoming space --------------------------
def batch_norm(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """BatchNorm and InstanceNorm: weight, bias and running statistics per channel (axis 1)."""
    x = tracked_input(b, node)
    require_axis(node, x, 1, len(shape_of(node)), "BatchNorm")
    if isinstance(x, Feature):
        names = ("weight", "bias", "running_mean", "running_var")
        b.add_module_members(str(node.target), names, 0, x.layout, "norm")
        b.tag(node, x, "norm")
    return x


def prelu(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``nn.PReLU``: one slope per channel (axis 1) joins the units; a single slope is shared."""
    x = tracked_input(b, node)
    if b.modules[node.target].num_parameters > 1:
        require_axis(node, x, 1, len(shape_of(node)), "PReLU")
        if isinstance(x, Feature):
            b.add_member(f"{node.target}.weight", 0, x.layout, "norm")
    b.tag(node, x, "post")
    return x


def layer_norm(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    mod: nn.LayerNorm = b.modules[node.target]
    x = tracked_input(b, node)
    ndim = len(shape_of(node))
    first = ndim - len(mod.normalized_shape)
    if isinstance(x, Feature) and x.axis >= first:
        b.add_module_members(str(node.target), ("weight", "bias"), x.axis - first, x.layout, "norm")
        b.tag(node, x, "norm")
    return x


def group_norm(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    mod: nn.GroupNorm = b.modules[node.target]
    x = tracked_input(b, node)
    require_axis(node, x, 1, len(shape_of(node)), "GroupNorm")
    if isinstance(x, Feature):
        if 1 < mod.num_groups < mod.num_channels:
            b.constrain_groups(x.layout, mod.num_groups, where(node))
        b.add_module_members(str(node.target), ("weight", "bias"), 0, x.layout, "norm")
        b.tag(node, x, "norm")
    return x


# -- ops that keep the units where they are --------------------------------------------------------
def passthrough(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    return tracked_input(b, node)


def nonlinearity(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    x = tracked_input(b, node)
    b.tag(node, x, "post")
    return x


def pooling(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """Pooling over the positions: the channels (axis 1) keep their units; max pooling that returns
    its indices as well gives (pooled, indices), both with the input's units on axis 1."""
    x = tracked_input(b, node)
    shape = shape_of(node) or shape_of(node.args[0])
    require_axis(node, x, 1, len(shape), "pooling")
    return (x, x) if shape_of(node) is None and isinstance(x, Feature) else x


def unpooling(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``MaxUnpool(x, indices)``: scatters each channel's values back to the positions its indices
    name; the channels keep their units, which must be those of the indices'."""
    x, indices = tracked_input(b, node), info_of(b, node.args[1]) if len(node.args) > 1 else None
    require_axis(node, x, 1, len(shape_of(node)), "unpooling")
    if isinstance(x, Feature) and isinstance(indices, Feature):
        b.merge_layouts(x.layout, indices.layout, where(node))
    elif isinstance(x, Feature) != isinstance(indices, Feature):
        raise UnsupportedOpError(f"{where(node)}: unpools with indices of other units")
    return x


def padding(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``F.pad(x, pad)`` and the padding modules (``nn.ZeroPad2d``, ``nn.ReflectionPad1d`` ...): pad
    the last ``len(pad) // 2`` axes; the units' axis may be among them only with zero padding
    (padding it would add units). The ATen ops have their own rule (``aten_layers.padding``)."""
    x = tracked_input(b, node)
    if node.op == "call_module":  # nn.ZeroPad2d, nn.ReflectionPad1d, ...: (left, right, top, ...)
        pad = b.modules[node.target].padding
    else:
        pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else ())
    if isinstance(x, Feature) and pads_axis(pad, len(shape_of(node)), x.axis):
        raise UnsupportedOpError(
            f"{where(node)}: padding axis {x.axis} would add units to the aligned axis"
        )
    return x


def pads_axis(pad: Sequence[object], ndim: int, axis: int) -> bool:
    """Whether ``pad`` (``F.pad``'s: before and after the last axis, then the one before, ...)
    pads ``axis`` of an ``ndim``-dimensional tensor by anything but a literal zero on both sides."""
    k = ndim - 1 - axis
    return 2 * k < len(pad) and any(
        not (isinstance(p, int) and p == 0) for p in pad[2 * k : 2 * k + 2]
    )


# -- elementwise binary ops and residual sums ----------------------------------------------------
def elementwise(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``a + b``, ``a * b`` ...: broadcast operands index the same units, so their spaces merge.

    An operand with a single unit broadcast along another's units (an attention weight per token,
    a spatial gate (N, 1, H, W)) does not join them: its one unit stays fixed."""
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    ndim = len(out_shape)
    operands = [
        a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)
    ]
    features = []
    for a in operands:
        info = info_of(b, a)
        if isinstance(info, Feature):
            feature = Feature(info.axis + ndim - len(shape_of(a)), info.layout)
            if shape_of(a)[info.axis] == 1 < out_shape[feature.axis]:
                b.fix(info.layout)  # one unit broadcast along the others' units: a gate, a weight
                continue
            features.append(feature)
    if not features:
        return None
    out = merge_operands(b, node, operands, features)
    if node.target in (operator.add, torch.add, "add", operator.iadd, "add_"):
        b.tag(node, out, "pre")
    return out


def join_broadcast_operand(
    b: SpaceBuilder, node: torch.fx.Node, arg, out: Feature, ndim: int
) -> None:
    """A parameter broadcast along the units joins their space; a fixed tensor fixes them."""
    info, shape = info_of(b, arg), shape_of(arg)
    if isinstance(info, Feature) or shape is None:
        return
    axis = out.axis - (ndim - len(shape))
    if axis < 0 or shape[axis] == 1:
        return
    if isinstance(info, ParamRef):
        b.add_member(info.name, axis, out.layout, "norm")
    else:
        b.fix(out.layout)


# -- shape changes -----------------------------------------------------------------------------
def reshape(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """view / reshape / flatten / squeeze / unsqueeze, read off the shapes before and after.

    Merging the unit axis with trailing axes repeats every unit (``inner``), merging it with leading
    axes repeats the whole axis (``outer``); splitting the unit axis is not supported.
    """
    x = tracked_input(b, node)
    if not isinstance(x, Feature):
        return x
    src, dst = shape_of(node.args[0]), shape_of(node)
    n = src[x.axis]
    outer, inner = math.prod(src[: x.axis]), math.prod(src[x.axis + 1 :])
    for k, size in enumerate(dst):
        before = math.prod(dst[:k])
        if outer % before or size % ((outer // before) * n):
            continue
        q = outer // before
        r = size // (q * n)
        if r and inner % r == 0 and math.prod(dst[k + 1 :]) == inner // r:
            return Feature(k, x.layout.repeated(inner=r, outer=q))
    raise UnsupportedOpError(f"{where(node)}: reshape {src} -> {dst} splits the axis of the units")


def permute(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    x = tracked_input(b, node)
    if not isinstance(x, Feature):
        return x
    ndim = len(shape_of(node))
    args, kw = node.args[1:], node.kwargs
    if node.target in (torch.transpose, "transpose", "swapaxes", torch.swapaxes):
        d0, d1 = (args[0] if args else kw["dim0"]), (args[1] if len(args) > 1 else kw["dim1"])
        order = list(range(ndim))
        order[d0 % ndim], order[d1 % ndim] = order[d1 % ndim], order[d0 % ndim]
    elif node.target == "t" or (node.target is getattr and args[0] == "T"):
        order = list(range(ndim))[::-1]  # .t() is .T for 2-D tensors, a no-op below
    elif node.target is getattr:  # .mT swaps the last two axes
        order = list(range(ndim))
        order[-1], order[-2] = order[-2], order[-1]
    else:
        dims = args if node.target == "permute" else (args[0] if args else ())
        dims = kw.get("dims", dims)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        order = [d % ndim for d in dims]
    return Feature(order.index(x.axis), x.layout)


def reduction(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """mean / sum / amax ... over some axes. Reducing over the units is permutation-invariant."""
    x = tracked_input(b, node)
    if not isinstance(x, Feature):
        return None
    ndim = len(shape_of(node.args[0]))
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dim is None:
        return None
    dims = {d % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    if x.axis in dims:
        return None
    return Feature(x.axis if keepdim else x.axis - sum(d < x.axis for d in dims), x.layout)


def extremum(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``torch.max`` / ``torch.min``: of two tensors, elementwise; of one over all axes, a number;
    along ``dim``, (values, indices) as :func:`reduction` gives, where the indices of an extremum
    over the units name a unit and so depend on their order (using them is refused)."""
    other = node.kwargs.get("other", node.args[1] if len(node.args) > 1 else None)
    if isinstance(other, torch.fx.Node):
        return elementwise(b, node)
    values = reduction(b, node)
    if "dim" not in node.kwargs and len(node.args) < 2:
        return values
    x = tracked_input(b, node)
    over_units = isinstance(x, Feature) and values is None
    indices = Unusable("the indices of an extremum over the units") if over_units else values
    return (values, indices)


def concatenate(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``torch.cat``: along the unit axis the layouts are concatenated, elsewhere they merge."""
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % len(shape_of(node))
    infos = [info_of(b, t) for t in tensors]
    if any(isinstance(i, ParamRef) for i in infos):
        raise UnsupportedOpError(f"{where(node)}: concatenates a parameter")
    features = [i for i in infos if isinstance(i, Feature)]
    if not features:
        return None
    if all(f.axis != dim for f in features):
        return merge_operands(b, node, tensors, features)
    segments: list[Segment] = []
    for t, info in zip(tensors, infos):
        if info is None:
            segments.append(
                Segment(b.new_space(shape_of(t)[dim], f"{node.name}:fixed", fixed=True))
            )
        elif info.axis != dim or info.layout.outer != 1:
            raise UnsupportedOpError(f"{where(node)}: concatenates units along mismatched axes")
        else:
            segments.extend(info.layout.segments)
    return Feature(dim, Layout(tuple(segments)))


def merge_operands(
    b: SpaceBuilder, node: torch.fx.Node, tensors, features: list[Feature]
) -> Feature:
    """Operands combined elementwise index the same units: merge their layouts, join broadcast ones."""
    out = features[0]
    for f in features[1:]:
        if f.axis != out.axis:
            raise UnsupportedOpError(f"{where(node)}: combines units lying on different axes")
        b.merge_layouts(out.layout, f.layout, where(node))
    for t in tensors:
        join_broadcast_operand(b, node, t, out, len(shape_of(node)))
    return out


def stack(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    tensors = node.args[0]
    ndim = len(shape_of(node))
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % ndim
    infos = [info_of(b, t) for t in tensors]
    features = [i for i in infos if isinstance(i, Feature)]
    if not features:
        return None
    shifted = [Feature(f.axis + (f.axis >= dim), f.layout) for f in features]
    return merge_operands(b, node, tensors, shifted)


def getitem(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """Basic indexing (ints, slices, None, ...) that leaves the unit axis whole."""
    x = info_of(b, node.args[0])
    if isinstance(x, ParamRef):
        raise UnsupportedOpError(f"{where(node)}: indexes parameter '{x.name}'")
    if isinstance(x, tuple):  # an item of a module's tuple output
        if not isinstance(node.args[1], int):
            raise UnsupportedOpError(f"{where(node)}: slices a tuple of values with units")
        return x[node.args[1]]
    if not isinstance(x, Feature):
        return None
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    ndim = len(shape_of(node.args[0]))
    named = sum(1 for i in index if i is not None and i is not Ellipsis)
    src = dst = 0
    for item in index:
        if item is None:
            dst += 1
        elif item is Ellipsis:
            span = ndim - named
            if src <= x.axis < src + span:
                return Feature(dst + x.axis - src, x.layout)
            src, dst = src + span, dst + span
        elif isinstance(item, slice) or isinstance(item, int):
            full = isinstance(item, slice) and item == slice(None)
            if src == x.axis:
                if not full:
                    raise UnsupportedOpError(f"{where(node)}: indexing selects some of the units")
                return Feature(dst, x.layout)
            src, dst = src + 1, dst + (0 if isinstance(item, int) else 1)
        else:
            raise UnsupportedOpError(f"{where(node)}: advanced indexing of a tensor with units")
    return Feature(dst + x.axis - src, x.layout)


def non_tensor(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    return None


def attribute(b: SpaceBuilder, node: torch.fx.Node) -> Info:
    """``x.shape``, ``x.dtype`` ... carry no units; ``x.T`` and ``x.mT`` permute axes; any other
    attribute of a tensor with units is not understood."""
    name = node.args[1]
    if name in ("shape", "dtype", "device", "ndim", "is_cuda"):
        return None
    if name in ("T", "mT"):
        return permute(b, node)
    x = info_of(b, node.args[0])
    if isinstance(x, tuple) and name in ("values", "indices") and len(x) == 2:
        return x[0] if name == "values" else x[1]  # torch.max(x, dim)'s named fields
    if isinstance(x, (Feature, ParamRef, tuple)):
        raise UnsupportedOpError(f"{where(node)}: attribute '{name}' of a tensor with units")
    return None
