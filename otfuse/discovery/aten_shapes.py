"""ATen rules for axes, reshapes and attention (heads)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from otfuse.discovery.aten_layers import (
    _conv,
    _dense,
    _norm,
    channel_norm,
    constant,
    join_param,
    unify,
)
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
    plain_space,
    tracked_axes,
    unsupported_with,
)
from otfuse.discovery.layout import Layout, Segment
from otfuse.discovery.walker import Feature, SpaceBuilder, shape_of
from otfuse.errors import UnsupportedOpError


# -- axes ------------------------------------------------------------------------------------------
def transpose(b: SpaceBuilder, node: torch.fx.Node) -> object:
    x, ndim = info_of(b, node.args[0]), len(shape_of(node))
    order = list(range(ndim))
    if node.target.overloadpacket in (aten.t, aten.numpy_T):  # every axis reversed (Falcon's .T)
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
    cut = x.cut if isinstance(x, ParamView) else None
    if cut is not None and dst[cut.view_axis] != src[cut.view_axis - new]:
        fix_read(b, x, (cut.view_axis,))  # a part of one unit broadcast: its indices are lost
        x = replace(x, cut=None)
    if isinstance(x, Heads):
        grown = {new + i for i, n in enumerate(src) if n == 1 and dst[new + i] != 1}
        x = replace(x, expanded=x.expanded | grown | set(range(new)))
    return x


def repeat(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``repeat(x, counts)``: tiling along axes of size one (a class token repeated over the
    batch) or along axes without units is :func:`expand`; tiling the units themselves is refused."""
    src, counts = shape_of(node.args[0]), list(node.args[1])
    x, new = info_of(b, node.args[0]), len(counts) - len(shape_of(node.args[0]))
    held = tracked_axes(x)
    if isinstance(x, ParamView):
        held = x.held()
    tiled = {i for i, c in enumerate(counts[new:]) if c != 1 and src[i] != 1}
    if held & tiled:
        raise UnsupportedOpError(f"{label(node)}: repeats the units")
    return expand(b, node)


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
    if dim in tracked_axes(x) and not node.users:  # read for its shape only (BART's encoder)
        return None
    if dim in tracked_axes(x):
        raise UnsupportedOpError(f"{label(node)}: indexing selects some of the units")
    if isinstance(x, ParamView):  # one unit picked: it must stay where it is
        fix_read(b, x, (dim,))
        return x.moved({src: dst for dst, src in enumerate(order)}, ndim - 1)
    return by_order(x, order, node, "select")


def slice_(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``slice(x, dim, start, end)``: a whole axis, part of an untracked axis, or part of the dims
    of a head (rotary halves: the dims are then fixed)."""
    x, src = info_of(b, node.args[0]), shape_of(node.args[0])
    dim = arg(node, 1, "dim", 0) % len(src)
    full = shape_of(node)[dim] == src[dim]
    if full or dim not in tracked_axes(x) and not isinstance(x, ParamView):
        return x
    start, end, step = (arg(node, i, key, d) for i, key, d in ((2, "start", 0), (3, "end", None),
                                                                (4, "step", 1)))  # fmt: skip
    if isinstance(x, ParamView):
        bounds = (start, end, step)
        if step != 1 or not all(v is None or isinstance(v, int) for v in bounds):
            # strided, or sized by the input (a position table sliced to the length): no cut
            return ParamView(x.name, tuple(None if i == dim else a for i, a in enumerate(x.axes)))
        first, last, _ = slice(start, end).indices(src[dim])
        return x.part(dim, first, last, src[dim])
    if isinstance(x, Heads) and x.dim_axis == dim:
        b.fix_dims(x.space)
        return replace(x, loose=True)
    if isinstance(x, Feature) and step == 1:  # e.g. Phi-3's q, k and v sliced from one projection
        start, end, _ = slice(start, end).indices(src[dim])
        if end <= start:
            raise UnsupportedOpError(f"{label(node)}: an empty slice of the units")
        part = b.carve(plain_space(node, x, "slices"), start, end, label(node))
        out = Feature(dim, Layout.of(part))
        b.tag(node, out, "pre")
        return out
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
    if isinstance(x, ParamView) and len(sizes) > 1:  # each part is part of that axis (a bias
        # chunked into q, k and v): no longer the parameter's whole axis
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return tuple(x.part(dim, s, s + size, n) for s, size in zip(starts, sizes))
    if dim not in tracked_axes(x):
        return tuple(x for _ in sizes)
    if isinstance(x, Heads) and x.dim_axis == dim:
        return _split_heads(b, node, x, sizes)
    if not isinstance(x, Feature):
        raise UnsupportedOpError(f"{label(node)}: splits heads")
    parts = b.refine(plain_space(node, x, "splits"), sizes, label(node))
    return tuple(Feature(dim, Layout.of(p)) for p in parts)


def _split_heads(b: SpaceBuilder, node: torch.fx.Node, x: Heads, sizes: list[int]) -> tuple:
    """The dims of every head split alike (GPT-NeoX: ``view(B, T, H, 3 d)``, then ``chunk(3)``
    into q, k and v): the space becomes one space per part, each with the same heads, their units
    alternating head by head along the projection's axis."""
    if x.repeat != 1 or x.outer != 1 or x.loose or x.expanded:
        raise UnsupportedOpError(f"{label(node)}: splits the dims of repeated or sliced heads")
    parts = b.refine(x.space, [n * x.heads for n in sizes], label(node), blocks=x.heads)
    for p in parts:
        b.set_heads(p, x.heads)
    return tuple(replace(x, space=p) for p in parts)


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
    ndim = len(shape_of(node))
    dim = arg(node, 1, "dim", 0) % ndim
    # empty operands add nothing (a cache's empty start, which cat accepts in any shape)
    tensors = [t for t in node.args[0] if shape_of(t) is None or 0 not in shape_of(t)]
    infos = [info_of(b, t) for t in tensors]
    tracked = [i for i in infos if isinstance(i, TRACKED)]
    if not tracked:  # parameters combined into a constant: they are read as they are
        for info in infos:
            if isinstance(info, ParamView):
                opaque(b).setdefault(info.name, label(node))
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


def stack(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``stack(tensors, dim)``: the operands index the same units, side by side on a new axis
    (GPT-J's rotary ``stack((-x2, x1), -1)`` of the halves of each head's dims)."""
    tensors, ndim = node.args[0], len(shape_of(node))
    dim = arg(node, 1, "dim", 0) % ndim
    order: list[int | None] = list(range(ndim - 1))
    order.insert(dim, None)
    infos = [info_of(b, t) for t in tensors]
    if any(isinstance(i, ParamView) for i in infos):
        return unsupported_with(b, node)
    tracked = [by_order(i, order, node, "stack") for i in infos if isinstance(i, TRACKED)]
    if not tracked:
        return None
    for other in tracked[1:]:
        unify(b, node, tracked[0], other)
    for t, info in zip(tensors, infos):
        if info is None:
            shape = shape_of(t)
            constant(b, node, (*shape[:dim], 1, *shape[dim:]), tracked[0])
    return tracked[0]


def _cat_units(b, node, tensors, infos, dim: int) -> Feature:
    segments: list[Segment] = []
    for t, info in zip(tensors, infos):
        if info is None:
            segments.append(Segment(b.new_space(shape_of(t)[dim], f"{node.name}:fixed", True)))
        elif isinstance(info, Feature) and info.axis == dim and info.layout.outer == 1:
            expanded = b.expand(info.layout)
            if expanded.blocks != 1:
                raise UnsupportedOpError(f"{label(node)}: concatenates units split head by head")
            segments.extend(expanded.segments)
        else:
            raise UnsupportedOpError(f"{label(node)}: concatenates units along mismatched axes")
    return Feature(dim, Layout(tuple(segments)))


def index(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """``x[i0, i1, ...]`` with index tensors on leading axes only (e.g. the last token of each row)."""
    x, indices = info_of(b, node.args[0]), node.args[1]
    if not isinstance(x, (*TRACKED, ParamView)):
        return None
    if any(i is None for i in indices) or any(isinstance(info_of(b, i), TRACKED) for i in indices):
        raise UnsupportedOpError(f"{label(node)}: advanced indexing of a tensor with units")
    k = len(indices)
    if isinstance(x, ParamView):  # rows of a table (Swin's relative position biases, Whisper's
        # positions): its other axes stay; the indexed ones are gone, and stay in place
        lead = len(shape_of(node)) - (len(x.axes) - k)
        fix_read(b, x, range(k))
        return x.moved({j: lead + j - k for j in range(k, len(x.axes))}, lead + len(x.axes) - k)
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
    if s == [u] and d == [u + 1] and len(dst) == len(src) + 1 and dst[u] == 1:
        space = plain_space(node, x, "splits")  # (B, T, d) -> (B, T, 1, d): one head (multi-query)
        b.set_heads(space, 1)
        return Heads(space, 1, u, u + 1)
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
    if x.head_axis not in block:  # one head, its axis of size 1: it goes with the repeats after it
        after = block.get(x.head_axis + 1)
        if src[x.head_axis] != 1 or after is None or not set(after[0]) <= x.expanded:
            raise UnsupportedOpError(f"{label(node)}: reshape {src} -> {dst} drops the head axis")
        block = {**block, x.head_axis: ([x.head_axis, *after[0]], after[1])}
    hs, hd = block[x.head_axis]
    if x.dim_axis is not None and block[x.dim_axis][0] is hs:  # heads and dims merge: plain units
        if hs != [x.head_axis, x.dim_axis] or len(hd) != 1 or x.outer != 1 or x.loose:
            raise UnsupportedOpError(f"{label(node)}: reshape {src} -> {dst} mixes heads")
        return Feature(hd[0], Layout.of(_merged_space(b, node, x)))
    where = {}
    if x.dim_axis is not None:
        ds, dd = block[x.dim_axis]
        # dims merged with an axis after them (GPT-J's rotary: pairs of dims, flattened) keep
        # their place only when they are fixed (loose)
        merged = x.loose and ds[0] == x.dim_axis and x.head_axis not in ds
        if len(dd) != 1 or (len(ds) != 1 and not merged):
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
    if isinstance(q, Heads) and (isinstance(k, Feature) or isinstance(v, Feature)):
        k, v = (_one_head(b, node, i, shape_of(a), ndim) for i, a in zip((k, v), node.args[1:3]))
        b.fix_heads(q.space)  # k and v may differ along the head axis: the heads stay in place
    for info in (q, k, v):
        if not isinstance(info, Heads) or (info.head_axis, info.dim_axis) != (ndim - 3, ndim - 1):
            raise UnsupportedOpError(f"{label(node)}: q, k and v must be split into heads")
    mask = arg(node, 3, "attn_mask")
    _mask_from_weights(b, node, info_of(b, mask), shape_of(mask) if mask is not None else None, q)
    gqa = 1
    if arg(node, 7, "enable_gqa", False):
        gqa = (q.heads * q.repeat) // (k.heads * k.repeat)
    logits = _logits(b, node, q, k, gqa)
    if isinstance(mask, torch.fx.Node) and shape_of(mask) is not None:
        shape = shape_of(mask)
        if len(shape) >= 3 and shape[len(shape) - 3] != 1:
            b.fix_heads(q.space)
    return _weighted(b, node, logits, v, gqa, ndim)


def _one_head(b: SpaceBuilder, node: torch.fx.Node, info: object, shape, ndim: int) -> object:
    """Keys or values that were never split into heads (GPT-BigCode's multi-query attention:
    ``unsqueeze(1)``, then repeated along the head axis): one head, repeated for every query head."""
    if not isinstance(info, Feature) or info.axis != ndim - 1 or len(shape) != ndim:
        return info
    space = plain_space(node, info, "attends with")
    b.set_heads(space, 1)
    return Heads(space, 1, ndim - 3, ndim - 1, repeat=shape[ndim - 3])


def _mask_from_weights(b: SpaceBuilder, node, info: object, shape, q: Heads) -> None:
    """An attention mask made from parameters, one per head (T5's and Swin's relative position
    biases, a table or an embedding whose units are the heads): it is not transported, so the
    heads stay in place (their dims still move). A mask made from activations is refused."""
    if not isinstance(info, (*TRACKED, ParamView)):
        return
    heads_axis = len(shape) - 3 if shape is not None and len(shape) >= 3 else None
    if isinstance(info, Feature) and info.axis == heads_axis:
        b.fix(info.layout)  # the embedding's units are the heads: never moved
    elif isinstance(info, ParamView):  # read as it is: it must not be transported elsewhere
        opaque(b).setdefault(info.name, label(node))
    else:
        raise UnsupportedOpError(f"{label(node)}: an attention mask that varies along hidden units")
    if heads_axis is not None and shape[heads_axis] != 1:
        b.fix_heads(q.space)


def _logits(b: SpaceBuilder, node: torch.fx.Node, q: Heads, k: Heads, gqa: int) -> Heads:
    if q.outer != 1 or k.outer != 1:
        raise UnsupportedOpError(
            f"{label(node)}: attention over heads merged with the batch on one axis (as "
            "nn.MultiheadAttention computes it when it returns its weights: call it with "
            "need_weights=False)"
        )
    if q.heads * q.repeat != k.heads * k.repeat * gqa:
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
    """A model's ``nn.Linear``, ``nn.Conv1d/2d``, ``nn.LayerNorm`` or BatchNorm called as a module (see
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
    if isinstance(module, _BatchNorm):
        return _batch_norm_module(b, node)
    if views:
        raise UnsupportedOpError(f"module '{node.target}' of the exported graph holds weights")
    return None


def _batch_norm_module(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """A BatchNorm module: its weight, bias and running statistics join the channels' units."""
    names = ("weight", "bias", "running_mean", "running_var")
    return channel_norm(b, node, lambda: [(b.canonical[f"{node.target}.{n}"], 0) for n in names])


def no_units(b: SpaceBuilder, node: torch.fx.Node) -> object:
    """Ops whose result carries no units (sizes, assertions, tensors of the same shape)."""
    return None
