"""Walk a ``torch.fx`` trace and build the neuron spaces of a model.

Every traced value gets an *info*: :class:`Feature` (the value has one axis whose units are tracked,
with its :class:`~otfuse.discovery.layout.Layout`), :class:`ParamRef` (the value is a parameter read with
``get_attr``) or ``None`` (nothing of it is transported: the model input, sizes, values whose units are
fixed). Op rules (:mod:`otfuse.discovery.rules`) compute the info of each node from its inputs and
record which parameter axes belong to which space; spaces joined by residual sums are merged with a
union-find.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from otfuse.discovery.layout import ActivationKind, Layout, Member, NeuronSpace, Role, SpaceGraph
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


Info = Feature | ParamRef | None


class SpaceBuilder:
    """Union-find over spaces plus the members and activation nodes found so far."""

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

    # -- spaces ---------------------------------------------------------------------------------
    def new_space(self, size: int, name: str, fixed: bool = False) -> int:
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
        keep, drop = min(ra, rb), max(ra, rb)
        self.parent[drop] = keep
        self.fixed[keep] = self.fixed[keep] or self.fixed[drop]
        self.groups[keep] = math.lcm(self.groups[keep], self.groups[drop])

    def fix(self, layout: Layout) -> None:
        for s in layout.spaces():
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
        same_shape = len(a.segments) == len(b.segments) and a.outer == b.outer
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
        known = self._member_at.get((param, axis))
        if known is not None:
            self.merge_layouts(known.layout, layout, f"parameter '{param}' used twice")
            return
        self._member_at[(param, axis)] = member = Member(param, axis, layout, role, groups)
        self.members.append(member)
        self.params_seen.add(param)

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
    def build(self) -> SpaceGraph:
        roots = sorted({self.find(m_space) for m in self.members for m_space in m.layout.spaces()})
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
        for member in self.members:
            remapped = member.remap(mapping)
            for s in remapped.layout.spaces():
                if remapped not in spaces[s].members:
                    spaces[s].members.append(remapped)
        for raw, node_name, kind, axis in self.tags:
            if raw in mapping:
                spaces[mapping[raw]].nodes.append((node_name, kind, axis))
        return SpaceGraph(spaces, self.gm, set(self.params_seen))


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
    restored afterwards.
    """
    tracer = LeafTracer(leaf_types, wrapped_functions)
    try:
        graph = tracer.trace(model)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise OtfuseError(_trace_failure(model, tracer, exc)) from None
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad(), evaluating([model]):
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001
        name = type(model).__name__
        raise OtfuseError(f"example input does not fit {name}: {_first_line(exc)}") from None
    return gm


def _trace_failure(model: nn.Module, tracer: LeafTracer, exc: Exception) -> str:
    inside, hint = "", ""
    if tracer.failed_in is not None:
        path, cls = tracer.failed_in
        inside = f"inside module '{path}' ({cls}): "
        hint = f", or a rule for {cls} (otfuse.register_rule makes it one op of the trace)"
    return (
        f"cannot trace {type(model).__name__} with torch.fx ({inside}{_first_line(exc)}); "
        f"otfuse needs a model without data-dependent Python control flow{hint}"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    """Shape of a traced tensor, or None when the node is not a single tensor."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None
