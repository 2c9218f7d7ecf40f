"""Walk a ``torch.fx`` trace and build the neuron spaces of a model.

Every traced value gets an *info*: :class:`Feature` (the value has one axis whose units are tracked,
with its :class:`~otfuse.discovery.layout.Layout`), :class:`ParamRef` (the value is a parameter read with
``get_attr``) or ``None`` (nothing of it is transported: the model input, sizes, values whose units are
fixed). Op rules (:mod:`otfuse.discovery.rules`) compute the info of each node from its inputs and
record which parameter axes belong to which space; spaces joined by residual sums are merged with a
union-find.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_map

from otfuse.discovery.layout import (
    ActivationKind,
    HeadStructure,
    Layout,
    Member,
    NeuronSpace,
    Role,
    Segment,
    SpaceGraph,
)
from otfuse.errors import OtfuseError, UnsupportedOpError
from otfuse.modes import evaluating


@dataclass(frozen=True)
class Feature:
    """A traced tensor whose axis ``axis`` indexes units laid out as ``layout``."""

    axis: int
    layout: Layout


@dataclass(frozen=True)
class ParamRef:
    """A traced value that is the parameter or buffer ``name`` of the model."""

    name: str


@dataclass(frozen=True)
class Unusable:
    """A traced value whose units cannot be described (the final states of a multi-layer or
    bidirectional RNN hold several spaces' units on one axis): using it is refused."""

    reason: str


# a value's units; a module's tuple output (an RNN's output and final states) is a tuple of them
Info = Feature | ParamRef | Unusable | tuple | None


class SpaceBuilder:
    """Union-find over spaces plus the members and activation nodes found so far.

    Two further facts serve graphs with attention (:mod:`otfuse.discovery.aten`): a space may be
    *refined* into consecutive parts (a packed qkv projection split into q, k and v: every layout
    holding the space then holds its parts side by side), and a space may have *heads* (its units are
    H heads of d dims) linked to the heads of other spaces (:meth:`link_heads`).
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []
        self.fixed: list[bool] = []
        self.groups: list[int] = []
        self.members: list[Member] = []
        self._member_at: dict[tuple[str, int], Member] = {}  # (param, axis) -> its member
        self.tags: list[tuple[int, str, ActivationKind, int]] = []
        self.info: dict[torch.fx.Node, Info] = {}
        self.params_seen: set[str] = set()
        self.refined: dict[int, tuple[int, ...]] = {}  # space root -> the parts it was split into
        self.interleaved: dict[int, int] = {}  # space root -> blocks its parts alternate in (heads)
        self.head_facts: list[tuple[int, int]] = []  # (space, number of heads)
        self.module_spaces: dict[
            str, int
        ] = {}  # a module called in a loop (an RNN cell) -> its space
        self.head_links: list[tuple[int, int, int, int]] = []  # (a, ra, b, rb): see link_heads
        self.dims_fixed: set[int] = set()
        self.heads_fixed: set[int] = set()
        self.aliases: dict[str, tuple[str, ...]] = {}  # parameter -> its other state_dict names
        self.canonical: dict[str, str] = {}  # state_dict name -> the first name of its tensor
        # (param, axis) that read the model's input, whose units never move
        self.reads_fixed: set[tuple[str, int]] = set()
        # (param, axis, source param, source axis): an axis that reads a parameter's values
        self.param_reads: list[tuple[str, int, str, int | None]] = []

    def know_tied(self, model: nn.Module) -> None:
        """Learn ``model``'s tied tensors (one tensor under several ``state_dict`` names: a shared
        ``Parameter``, tied embeddings): each is recorded under its first name, and its other
        names are given the same members when the graph is built."""
        names: dict[int, list[str]] = {}
        for key, tensor in model.state_dict(keep_vars=True).items():
            names.setdefault(id(tensor), []).append(key)
        self.aliases = {
            k: tuple(n for n in group if n != k) for group in names.values() for k in group
        }
        self.canonical = {k: group[0] for group in names.values() for k in group}

    # -- spaces ---------------------------------------------------------------------------------
    def new_space(self, size: int, name: str, fixed: bool = False) -> int:
        """A new space of ``size`` units; returns its index."""
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.name.append(name)
        self.fixed.append(fixed)
        self.groups.append(1)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise UnsupportedOpError(
                f"{where}: joins units of different sizes ({self.size[ra]} and {self.size[rb]})"
            )
        parts_a, parts_b = self.refined.get(ra), self.refined.get(rb)
        if parts_a is not None or parts_b is not None:
            sizes = [self.size[self.find(p)] for p in (parts_a or parts_b)]
            blocks = self.interleaved.get(ra if parts_a is not None else rb, 1)
            parts_a = parts_a or self.refine(ra, sizes, where, blocks)
            parts_b = parts_b or self.refine(rb, sizes, where, blocks)
            same_blocks = self.interleaved.get(ra, 1) == self.interleaved.get(rb, 1)
            if [self.size[self.find(p)] for p in parts_b] != sizes or not same_blocks:
                raise UnsupportedOpError(f"{where}: joins units that are split differently")
        keep, drop = min(ra, rb), max(ra, rb)
        self.parent[drop] = keep
        self.fixed[keep] = self.fixed[keep] or self.fixed[drop]
        self.groups[keep] = math.lcm(self.groups[keep], self.groups[drop])
        if parts_a is not None:
            self.refined.pop(drop, None)
            self.refined[keep] = parts_a
            blocks = self.interleaved.pop(drop, 1)
            if blocks != 1:
                self.interleaved[keep] = blocks
            for x, y in zip(parts_a, parts_b):
                self.union(x, y, where)

    def refine(
        self, space: int, sizes: Iterable[int], where: str, blocks: int = 1
    ) -> tuple[int, ...]:
        """Split the units of ``space`` into consecutive parts of ``sizes`` (each a new space).

        Every layout holding ``space`` holds the parts side by side instead (:meth:`expand`). Splitting
        a space again the same way returns the same parts. With ``blocks`` > 1 the parts alternate
        instead: each of ``blocks`` equal blocks of the units (heads) holds the next ``n / blocks``
        units of every part, in order (:class:`~otfuse.discovery.layout.Layout` ``blocks``).
        """
        root, sizes = self.find(space), [int(n) for n in sizes]
        known = self.refined.get(root)
        if known is not None:
            if [self.size[self.find(p)] for p in known] != sizes or (
                self.interleaved.get(root, 1) != blocks
            ):
                raise UnsupportedOpError(
                    f"{where}: splits units that are already split differently"
                )
            return known
        if sum(sizes) != self.size[root] or any(n % blocks for n in sizes):
            raise UnsupportedOpError(f"{where}: splits {self.size[root]} units into {sizes}")
        if blocks == 1 and self._in_attention(root):
            # the parts would lose the heads (a head picked by index, a slice of merged heads)
            raise UnsupportedOpError(f"{where}: splits the units of attention heads")
        parts = tuple(
            self.new_space(n, f"{self.name[root]}[{i}]", self.fixed[root])
            for i, n in enumerate(sizes)
        )
        self.refined[root] = parts
        if blocks != 1:
            self.interleaved[root] = blocks
        return parts

    def carve(self, space: int, start: int, end: int, where: str) -> int:
        """The units ``start:end`` of ``space`` as a space of their own: the space (or the part of
        an earlier split that holds them) is split around them (:meth:`refine`)."""
        root = self.find(space)
        n = self.size[root]
        if start == 0 and end == n:
            return root
        parts = self.refined.get(root)
        if parts is None:
            sizes = [size for size in (start, end - start, n - end) if size > 0]
            return self.refine(root, sizes, where)[1 if start > 0 else 0]
        offset = 0
        for part in parts if self.interleaved.get(root, 1) == 1 else ():
            size = self.size[self.find(part)]
            if offset <= start and end <= offset + size:
                return self.carve(part, start - offset, end - offset, where)
            offset += size
        raise UnsupportedOpError(f"{where}: slices units across the parts of an earlier split")

    def _in_attention(self, root: int) -> bool:
        """Whether the heads of ``root`` are linked to another space's by an attention."""
        return any(root in (self.find(a), self.find(b)) for a, _, b, _ in self.head_links)

    def expand(self, layout: Layout) -> Layout:
        """``layout`` with every refined space replaced by its parts."""
        if not any(self.find(s.space) in self.refined for s in layout.segments):
            return layout
        segments: list[Segment] = []
        for seg in layout.segments:
            root = self.find(seg.space)
            parts = self.refined.get(root)
            if parts is None:
                segments.append(seg)
                continue
            inner = self.expand(Layout(tuple(Segment(p, seg.inner) for p in parts)))
            blocks = self.interleaved.get(root, 1)
            alone = len(layout.segments) == 1 and len(inner.segments) == len(parts)
            if blocks != 1 and alone and layout.blocks == 1:  # parts alternating head by head
                return Layout(inner.segments, layout.outer, blocks)
            if blocks != 1 or inner.blocks != 1 or layout.blocks != 1:
                raise UnsupportedOpError(
                    f"space of {self.name[root]}: units split head by head are combined with "
                    "other units on one axis"
                )
            segments.extend(inner.segments)
        return Layout(tuple(segments), layout.outer, layout.blocks)

    # -- heads (attention) ----------------------------------------------------------------------
    def set_heads(self, space: int, heads: int) -> None:
        """The units of ``space`` are ``heads`` heads of equal size (unit h*d + i)."""
        self.head_facts.append((space, int(heads)))

    def link_heads(self, a: int, ra: int, b: int, rb: int, *, dims: bool, where: str) -> None:
        """Head ``h`` of a tensor is head ``h // ra`` of space ``a`` and head ``h // rb`` of ``b``,
        so both move together; with ``dims`` their dims within a head move together too (q and k;
        v and the output projection's input). Equal repeats with ``dims`` make ``a`` and ``b`` one
        space; otherwise the space with more heads follows the other (grouped-query attention)."""
        if ra == rb and dims:
            self.union(a, b, where)
            return
        if dims and max(ra, rb) % min(ra, rb):
            raise UnsupportedOpError(f"{where}: heads repeated {ra} and {rb} times do not nest")
        self.head_links.append((a, ra, b, rb) if dims else (a, 0, b, 0))

    def fix_dims(self, space: int) -> None:
        """Dims within each head of ``space`` stay in place (e.g. rotary embeddings)."""
        self.dims_fixed.add(space)

    def fix_heads(self, space: int) -> None:
        """The heads of ``space`` stay in place."""
        self.heads_fixed.add(space)

    def fix(self, layout: Layout) -> None:
        for s in self.expand(layout).spaces():
            self.fixed[self.find(s)] = True

    def constrain_groups(self, layout: Layout, groups: int, where: str) -> None:
        """Units of ``layout`` must stay within ``groups`` contiguous groups (GroupNorm, grouped conv)."""
        if groups == 1:
            return
        if len(layout.segments) != 1 or layout.segments[0].inner != 1 or layout.outer != 1:
            raise UnsupportedOpError(f"{where}: groups over a concatenated or repeated axis")
        root = self.find(layout.segments[0].space)
        self.groups[root] = math.lcm(self.groups[root], groups)

    def merge_layouts(self, a: Layout, b: Layout, where: str) -> None:
        """Declare that layouts ``a`` and ``b`` index the same units (an elementwise op joins them)."""
        a, b = self.expand(a), self.expand(b)
        same_shape = (len(a.segments), a.outer, a.blocks) == (len(b.segments), b.outer, b.blocks)
        if not same_shape or any(x.inner != y.inner for x, y in zip(a.segments, b.segments)):
            raise UnsupportedOpError(
                f"{where}: combines axes laid out differently ({a.describe()} and {b.describe()})"
            )
        for x, y in zip(a.segments, b.segments):
            self.union(x.space, y.space, where)

    # -- members and activations ----------------------------------------------------------------
    def add_member(
        self, param: str, axis: int, layout: Layout, role: Role, groups: int = 1
    ) -> None:
        """Record that axis ``axis`` of ``param`` lies in ``layout``. A parameter used twice (a
        module called twice, a tied weight) indexes the same units each time: the layouts merge."""
        param = self.canonical.get(param, param)
        known = self._member_at.get((param, axis))
        if known is not None:
            where = f"parameter '{param}' used twice"
            if _plain(known.layout) and _plain(layout):  # one split already, or not: as it is
                self.union(known.layout.segments[0].space, layout.segments[0].space, where)
            else:
                self.merge_layouts(known.layout, layout, where)
            return
        self._member_at[(param, axis)] = member = Member(param, axis, layout, role, groups)
        self.members.append(member)
        self.params_seen.add(param)

    def add_part(
        self, param: str, axis: int, part: tuple[int, int, int], layout: Layout, where: str
    ) -> None:
        """Record that indices ``start:end`` of axis ``axis`` of ``param`` (of ``length``;
        ``part`` = (start, end, length)) lie in ``layout``, the plain layout of a layer's new
        output (the query's rows of a packed attention projection, used apart from the keys' and
        values' rows). The whole axis is one space, split around each part (:meth:`carve`); its
        other axes are the parameter's whole axes, so the parts' readers join."""
        start, end, length = part
        param = self.canonical.get(param, param)
        known = self._member_at.get((param, axis))
        if known is None:
            whole = self.new_space(length, param.rsplit(".", 1)[0])
            self.add_member(param, axis, Layout.of(whole), "producer")
        elif _plain(known.layout):
            whole = known.layout.segments[0].space
        else:
            raise UnsupportedOpError(
                f"{where}: part of parameter '{param}' on an axis laid out as "
                f"{known.layout.describe()}"
            )
        if not _plain(layout):
            raise UnsupportedOpError(f"{where}: part of parameter '{param}' indexes units")
        self.union(self.carve(whole, start, end, where), layout.segments[0].space, where)

    def add_reader(
        self,
        param: str,
        axis: int,
        reads: Info | Layout,
        role: Role = "consumer",
        groups: int = 1,
        *,
        source: object = None,
    ) -> None:
        """Record that axis ``axis`` of ``param`` reads the units ``reads`` (a weight's columns): a
        member of their space when they are tracked (a :class:`Feature`, or their
        :class:`Layout`). Otherwise, when the value read (``source``, the layer's input node) is
        the model's input, through ops of one tensor operand (:func:`reads_model_input`), this
        axis can never move: a space it joins through another use of the parameter (a weight
        used again, or transposed, along units) is fixed when the graph is built. Other untracked
        values (a recurrence's state of zeros, which any permutation leaves as it is) record
        nothing."""
        layout = reads.layout if isinstance(reads, Feature) else reads
        if isinstance(layout, Layout):
            self.add_member(param, axis, layout, role, groups)
        elif reads_model_input(source):
            self.reads_fixed.add((self.canonical.get(param, param), axis))

    def add_parameter_reader(
        self, param: str, axis: int, source: str, source_axis: int | None
    ) -> None:
        """Record that axis ``axis`` of ``param`` reads axis ``source_axis`` of parameter
        ``source``'s values (a layer applied to a learned query): when the graph is built it joins
        that axis's space, or, when the source axis moves with no space (None: a broadcast axis),
        it is fixed."""
        self.param_reads.append((param, axis, source, source_axis))

    def _link_parameter_readers(self) -> None:
        for param, axis, source, source_axis in self.param_reads:
            known = self._member_at.get((self.canonical.get(source, source), source_axis))
            if known is not None:
                self.add_member(param, axis, known.layout, "consumer")
            else:
                self.reads_fixed.add((self.canonical.get(param, param), axis))

    def add_module_members(
        self, prefix: str, names: Iterable[str], axis: int, layout: Layout, role: Role
    ) -> None:
        module = self.modules[prefix]
        for name in names:
            if getattr(module, name, None) is not None:
                self.add_member(f"{prefix}.{name}", axis, layout, role)

    def tag(self, node: torch.fx.Node, feature: Info, kind: ActivationKind) -> None:
        """Remember ``node`` as a source of activations for its space, when its axis is plain."""
        if not isinstance(feature, Feature):
            return
        layout = feature.layout
        if len(layout.segments) == 1 and layout.outer == 1 and layout.segments[0].inner == 1:
            self.tags.append((layout.segments[0].space, node.name, kind, feature.axis))

    # -- result ---------------------------------------------------------------------------------
    def build(self, capture: str = "fx") -> SpaceGraph:
        self._link_parameter_readers()
        for member in self.members:  # an axis that also reads unmoving values cannot move
            if (member.param, member.axis) in self.reads_fixed:
                self.fix(member.layout)
        members = [replace(m, layout=self.expand(m.layout)) for m in self.members]
        members += [replace(m, param=a) for m in members for a in self.aliases.get(m.param, ())]
        roots = sorted({self.find(m_space) for m in members for m_space in m.layout.spaces()})
        canonical = {root: i for i, root in enumerate(roots)}
        mapping = {
            s: canonical[self.find(s)] for s in range(len(self.parent)) if self.find(s) in canonical
        }
        spaces, seen = [], set()
        for root, index in canonical.items():
            name = self.name[root] if self.name[root] not in seen else f"{self.name[root]}#{index}"
            seen.add(name)
            if self.size[root] % self.groups[root]:
                raise UnsupportedOpError(
                    f"space of {self.name[root]}: {self.size[root]} units cannot form "
                    f"{self.groups[root]} equal groups"
                )
            spaces.append(
                NeuronSpace(index, name, self.size[root], self.fixed[root], self.groups[root])
            )
        for member in members:
            remapped = member.remap(mapping)
            for s in remapped.layout.spaces():
                if remapped not in spaces[s].members:
                    spaces[s].members.append(remapped)
        for raw, node_name, kind, axis in self.tags:
            if raw in mapping and self.find(raw) not in self.refined:
                spaces[mapping[raw]].nodes.append((node_name, kind, axis))
        for index, heads in self._head_structures(canonical).items():
            spaces[index].heads = heads
        params = set(self.params_seen) | {
            a for p in self.params_seen for a in self.aliases.get(p, ())
        }
        return SpaceGraph(spaces, self.gm, params, capture)

    def _head_structures(self, canonical: dict[int, int]) -> dict[int, HeadStructure]:
        """The :class:`HeadStructure` of every space with heads, by space index."""
        count: dict[int, int] = {}
        for space, heads in self.head_facts:
            root = self.find(space)
            if root in canonical and root not in self.refined:
                if count.setdefault(root, heads) != heads:
                    raise UnsupportedOpError(
                        f"space of {self.name[root]}: split into {heads} and {count[root]} heads"
                    )
        group = {r: r for r in count}

        def top(r: int) -> int:
            while group[r] != r:
                r = group[r]
            return r

        owner: dict[int, int] = {}
        for a, ra, b, rb in self.head_links:
            a, b = self.find(a), self.find(b)
            if a in self.refined or b in self.refined:
                raise UnsupportedOpError(
                    f"space of {self.name[a]}: the units of attention heads are split by position"
                )
            if a not in count or b not in count:
                continue
            ga, gb = top(a), top(b)
            group[max(ga, gb)] = min(ga, gb)
            if ra != rb:  # dims shared, the space with more heads follows the other
                dependent, base = (a, b) if ra < rb else (b, a)
                if owner.setdefault(dependent, base) != base:  # one plan cannot follow two
                    raise UnsupportedOpError(
                        f"space of {self.name[dependent]}: its heads attend to two sets of keys "
                        "or values with fewer heads"
                    )
        fixed_dims = {self.find(s) for s in self.dims_fixed}
        fixed_dims |= {owner[d] for d in owner if d in fixed_dims}
        fixed_heads = {top(self.find(s)) for s in self.heads_fixed if self.find(s) in count}
        out = {}
        for r, heads in count.items():
            members = [x for x in count if top(x) == top(r)]
            base = min(count[x] for x in members)
            if heads % base:
                raise UnsupportedOpError(
                    f"space of {self.name[r]}: {heads} heads in groups of {base}"
                )
            o = owner.get(r, r)
            if heads // base > 1 and o == r:  # repeated heads whose dims follow no other space
                raise UnsupportedOpError(
                    f"space of {self.name[r]}: {heads} heads meet {base} in one attention, but "
                    "their dims are not shared with those heads"
                )
            out[canonical[r]] = HeadStructure(
                count=heads,
                group=min(canonical[x] for x in members),
                repeat=heads // base,
                dims_of=canonical[o],
                fixed_dims=o in fixed_dims,
                fixed_heads=top(r) in fixed_heads,
            )
        return out


def _plain(layout: Layout) -> bool:
    """One space, each unit once, in order."""
    only = len(layout.segments) == 1 and layout.segments[0].inner == 1
    return only and layout.outer == 1 and layout.blocks == 1


class LeafTracer(torch.fx.Tracer):
    """The ``torch.fx`` tracer of discovery: modules of ``leaf_types`` stay single ``call_module``
    nodes (fx does not trace inside them) and ``wrapped_functions`` single ``call_function`` nodes,
    so an op rule can describe them as a whole. Other modules keep fx's default behaviour.

    ``failed_in`` names the innermost module (qualified name, class name) whose tracing failed.
    """

    def __init__(
        self, leaf_types: Iterable[type] = (), wrapped_functions: Iterable[Callable] = ()
    ) -> None:
        super().__init__(autowrap_functions=tuple(wrapped_functions))
        self.leaf_types = tuple(leaf_types)
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the first to see the error
                try:
                    self.failed_in = (self.path_of_module(m), type(m).__name__)
                except NameError:
                    pass
            raise


def trace(
    model: nn.Module,
    example_input: torch.Tensor | tuple,
    *,
    leaf_types: Iterable[type] = (),
    wrapped_functions: Iterable[Callable] = (),
) -> torch.fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` and annotate every node with its shape on ``example_input``.

    Modules of ``leaf_types`` and calls of ``wrapped_functions`` are kept whole (see
    :class:`LeafTracer`). The model is run in eval mode (so BatchNorm statistics are untouched) and
    restored afterwards. Arguments of ``forward`` that the example input leaves to their defaults
    (``mask=None``) are traced as those constants when the graph traced with them as inputs does
    not run (``if mask is not None`` takes the branch for a traced input).
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    gm = _traced(model, leaf_types, wrapped_functions)
    try:
        _record_shapes(gm, model, inputs)
    except Exception as exc:  # noqa: BLE001
        defaults = _left_to_defaults(model, len(inputs))
        if not defaults:
            raise _does_not_fit(model, exc) from None
        gm = _traced(model, leaf_types, wrapped_functions, defaults)
        try:
            _record_shapes(gm, model, inputs)
        except Exception:  # noqa: BLE001 - the first failure says more
            raise _does_not_fit(model, exc) from None
    return gm


def _traced(model, leaf_types, wrapped_functions, concrete_args=None) -> torch.fx.GraphModule:
    tracer = LeafTracer(leaf_types, wrapped_functions)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise OtfuseError(_trace_failure(model, tracer, exc)) from None


def _record_shapes(gm: torch.fx.GraphModule, model: nn.Module, inputs: tuple) -> None:
    with torch.no_grad(), evaluating([model]):
        ShapeRecorder(gm).run(*copies(inputs))


def _does_not_fit(model: nn.Module, exc: Exception) -> OtfuseError:
    return OtfuseError(f"example input does not fit {type(model).__name__}: {_first_line(exc)}")


def _left_to_defaults(model: nn.Module, given: int) -> dict[str, Any]:
    """The arguments of ``model.forward`` after the first ``given`` that have defaults, with them
    (empty when the signature takes ``*args`` or ``**kwargs`` or cannot be read)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return {}
    rest = parameters[given:]
    return {p.name: p.default for p in rest if p.default is not p.empty}


def copies(inputs: Any) -> Any:
    """``inputs`` (a tensor, or tuples, lists and dicts of them) with every tensor copied: a model
    that changes its input in place changes the copy, not the caller's tensor."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, inputs)


@dataclass(frozen=True)
class TensorShape:
    """What discovery reads of a traced tensor (``node.meta["tensor_meta"]``)."""

    shape: torch.Size
    dtype: torch.dtype


class ShapeRecorder(torch.fx.Interpreter):
    """Runs a traced graph once and records the shape and dtype of every tensor-valued node in
    ``node.meta["tensor_meta"]``: the part of ``torch.fx``'s ShapeProp that discovery uses, without
    its first-call import of the symbolic-shape machinery (about half a second)."""

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(out.shape, out.dtype)
        return out


def _trace_failure(model: nn.Module, tracer: LeafTracer, exc: Exception) -> str:
    clash = _graph_module_names(model)
    if clash:
        return (
            f"cannot trace {type(model).__name__}: its attribute '{clash[0]}' has the name of an "
            "attribute of torch.fx's GraphModule, which the traced graph holds it in; rename it"
        )
    inside, hint = "", ""
    if tracer.failed_in is not None:
        path, cls = tracer.failed_in
        inside = f"inside module '{path}' ({cls}): "
        hint = f", or a rule for {cls} (otfuse.register_rule makes it one op of the trace)"
    return (
        f"cannot trace {type(model).__name__} with torch.fx ({inside}{_first_line(exc)}); "
        f"otfuse needs a model without data-dependent Python control flow{hint}"
    )


#: names of ops that make a tensor of one value (filled), whatever the tensor they are shaped like
_FILLED = ("zeros", "ones", "full", "empty", "fill")


def reads_model_input(value: object) -> bool:
    """Whether traced ``value`` is the model's input, or made from it alone by ops of one tensor
    operand (a view, a slice, a scaling), so that its units are the input's own. Not a tensor of
    one value shaped like the input (``zeros_like``), nor a mix of several tensors."""
    while isinstance(value, torch.fx.Node):
        if value.op == "placeholder":
            return True
        name = getattr(value.target, "__name__", str(value.target))
        if value.op == "get_attr" or any(word in name for word in _FILLED):
            return False
        operands = value.all_input_nodes
        if len(operands) != 1:
            return False
        value = operands[0]
    return False


def _graph_module_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s own submodules, parameters and buffers that a traced graph
    (:class:`torch.fx.GraphModule`, which holds them as its attributes) already uses itself, such
    as ``meta``."""
    own = vars(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))
    names = [n for n, _ in model.named_children()]
    names += [n for n, _ in model.named_parameters(recurse=False)]
    names += [n for n, _ in model.named_buffers(recurse=False)]
    return [n for n in names if n in own or hasattr(torch.fx.GraphModule, n)]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    """Shape of a traced tensor, or None when the node is not a single tensor."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None
