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

import types
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from otfuse.config import FusionConfig
from otfuse.cost import ground_cost, unit_masses
from otfuse.discovery import Member, NeuronSpace, SpaceGraph
from otfuse.errors import ArchitectureMismatchError, TransportError
from otfuse.heads import HeadPlanner
from otfuse.plans import is_plain, transport_space
from otfuse.transport import TransportPlan, solve, solver_pool

StateDict = dict[str, torch.Tensor]
_ASIDE = 256 * 256  # problems with at least this many costs may be solved on the solver pool


# -- features of units for the weight-based cost ------------------------------------------------
def unit_features(
    tensor: torch.Tensor, member: Member, space: int, sizes: Mapping[int, int]
) -> torch.Tensor:
    """Rows (n, d): every entry of ``tensor`` that belongs to each unit of ``space`` along the member axis."""
    layout = member.layout
    if is_plain(layout, space):
        return tensor.movedim(member.axis, 0).reshape(tensor.shape[member.axis], -1)
    x = tensor.movedim(member.axis, -1)
    x = x.reshape(
        -1, layout.outer, layout.blocks, layout.length(sizes) // layout.outer // layout.blocks
    )
    rows, offset = [], 0
    for seg in layout.segments:
        n = sizes[seg.space] // layout.blocks  # units of the space in each block
        if seg.space == space:  # (rows, outer, blocks * n, inner): the space's units in order
            piece = x[..., offset : offset + n * seg.inner].reshape(
                x.shape[0], layout.outer, layout.blocks * n, seg.inner
            )
            rows.append(piece.permute(2, 0, 1, 3).reshape(layout.blocks * n, -1))
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
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Features of B's and A's units of ``space`` (column blocks, one per member) from members
    whose other axes are resolved."""
    for role in ("producer", "norm", "consumer"):
        candidates = [m for m in space.members if m.role == role and m.groups == 1]
        ready = [m for m in candidates if _other_axes_resolved(m, space.index, resolved, by_param)]
        same_shape = [m for m in candidates if state_b[m.param].shape == state_a[m.param].shape]
        for chosen in (ready, same_shape):
            if chosen:
                # column blocks (otfuse.cost.Features): Euclidean costs never concatenate them
                fb = [unit_features(state_b[m.param], m, space.index, sizes_b) for m in chosen]
                fa = [unit_features(state_a[m.param], m, space.index, sizes_a) for m in chosen]
                return fb, fa
    raise TransportError(
        f"cannot build a weight cost for space '{space.name}' of models of different widths; "
        "use mode='acts'"
    )


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
    options: FusionConfig,
    acts_b: Mapping[int, torch.Tensor] | None = None,
    acts_a: Mapping[int, torch.Tensor] | None = None,
) -> tuple[StateDict, dict[str, TransportPlan]]:
    """Transport ``state_b`` into anchor A's widths and unit order; returns it and the plan per space.

    Spaces are visited in order; a large space's plan is solved on
    :func:`~otfuse.transport.solver_pool` while the next spaces' costs are formed, when they do not
    wait on it (see :class:`_Alignment`).
    """
    check_compatible(graph_b, graph_a)
    run = _Alignment(state_b, graph_b, state_a, graph_a, options, (acts_b, acts_a))
    heads = HeadPlanner(graph_b, graph_a, options, lambda sp: run.costs(sp)[0])  # attention spaces
    for space in graph_b.transportable():
        plan = heads.plan(space)
        run.visit(space, plan if plan is not None else run.solve(space))
    state, plans = run.finish()
    _check_shapes(state, state_a)
    return state, plans


class _Alignment:
    """Algorithm 1 on one pair (B to anchor A), with the solves of independent spaces in flight
    together.

    A visited space's plan is *pending* until it is applied to B's tensors. Before a space's cost
    reads B's tensors, every pending plan that touches one of the space's parameters is applied,
    together with the earlier pending plans that share a tensor with it, in visiting order. So each
    cost sees exactly the tensors the one-space-at-a-time order gives it, every tensor receives its
    plans in visiting order, and the plans and the aligned state are those of that order, bit for
    bit. A large problem is solved when the next cost is formed: in place when that cost needs its
    plan (a chain of layers), else on :func:`~otfuse.transport.solver_pool` while the cost is formed
    (the MLP spaces of a transformer, given the residual stream; every space with ``mode="acts"``).
    """

    def __init__(
        self,
        state_b: StateDict,
        graph_b: SpaceGraph,
        state_a: StateDict,
        graph_a: SpaceGraph,
        options: FusionConfig,
        acts: tuple[Mapping[int, torch.Tensor] | None, Mapping[int, torch.Tensor] | None],
    ) -> None:
        self.state, self.state_a, self.options, self.acts = dict(state_b), state_a, options, acts
        self.sizes, self.sizes_a = graph_b.sizes, graph_a.sizes
        self.resolved = {s.index for s in graph_b.spaces if s.fixed}
        self.by_param = _members_by_param(graph_b)
        self.pending: list[tuple[NeuronSpace, _Plan]] = []
        self.plans: dict[str, TransportPlan] = {}
        self.order: list[str] = []  # space names in visiting order

    def costs(self, sp: NeuronSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ground cost (n_b, n_a) of ``sp`` and the masses of B's and A's units."""
        options = self.options
        by_weights = None
        acts_b, acts_a = self.acts
        # acts: a space with no observable activation (an inner layer of a stacked RNN) falls back
        # to its weights
        use_acts = options.mode == "acts" and sp.index in acts_b and sp.index in acts_a
        reads = not use_acts or options.marginals != "uniform"
        self._before_cost({m.param for m in sp.members} if reads else set())
        if reads:
            by_weights = _weight_features(
                sp, self.state, self.sizes, self.state_a, self.sizes_a, self.resolved, self.by_param
            )
        fb, fa = (acts_b[sp.index], acts_a[sp.index]) if use_acts else by_weights
        mass_b, mass_a = by_weights if by_weights is not None else (fb, fa)
        cost = ground_cost(fb, fa, options.cost)
        return cost, unit_masses(mass_b, options.marginals), unit_masses(mass_a, options.marginals)

    def solve(self, sp: NeuronSpace) -> _Plan:
        """The plan of ``sp``, or for a large problem its solve, run later (:class:`_Deferred`)."""
        cost, mu, nu = self.costs(sp)
        options = self.options
        job = _Deferred(cost, mu, nu, options.solver, options.reg, sp.groups)
        return job if cost.size >= _ASIDE else job.run()

    def visit(self, sp: NeuronSpace, plan: _Plan) -> None:
        self.pending.append((sp, plan))
        self.resolved.add(sp.index)
        self.order.append(sp.name)

    def finish(self) -> tuple[StateDict, dict[str, TransportPlan]]:
        """Apply every pending plan (the solves not started yet: the last in place, the others on
        the pool meanwhile); returns the aligned state and the plan per space name."""
        deferred = [i for i, (_, p) in enumerate(self.pending) if isinstance(p, _Deferred)]
        self._start(set(deferred[:-1]))
        self._apply([True] * len(self.pending))
        return self.state, {name: self.plans[name] for name in self.order}

    def _before_cost(self, params: set[str]) -> None:
        """Before a cost that reads ``params``: apply the pending plans that touch them, and the
        earlier pending plans that share a tensor with those (latest first, the set of touched
        tensors grows), in visiting order; start the other solves on the pool."""
        touched, chosen = set(params), [False] * len(self.pending)
        for i in range(len(self.pending) - 1, -1, -1):
            members = {m.param for m in self.pending[i][0].members}
            if members & touched:
                chosen[i] = True
                touched |= members
        self._start({i for i, now in enumerate(chosen) if not now})
        self._apply(chosen)

    def _start(self, indices: set[int]) -> None:
        """Solve the deferred problems at ``indices`` on the pool."""
        for i in indices:
            sp, plan = self.pending[i]
            if isinstance(plan, _Deferred):
                self.pending[i] = (sp, solver_pool().submit(plan.run))

    def _apply(self, chosen: list[bool]) -> None:
        kept = []
        for (sp, plan), now in zip(self.pending, chosen):
            if not now:
                kept.append((sp, plan))
                continue
            plan = plan.result() if isinstance(plan, Future) else plan
            plan = plan.run() if isinstance(plan, _Deferred) else plan
            transport_space(self.state, sp, plan, self.sizes, self.options.outgoing)
            self.sizes[sp.index] = self.sizes_a[sp.index]
            self.plans[sp.name] = plan
        self.pending = kept


@dataclass(frozen=True)
class _Deferred:
    """An OT problem to solve later: in place, or on the solver pool."""

    cost: np.ndarray
    mu: np.ndarray
    nu: np.ndarray
    solver: str
    reg: float
    groups: int

    def run(self) -> TransportPlan:
        return solve(
            self.cost, self.mu, self.nu, solver=self.solver, reg=self.reg, groups=self.groups
        )


_Plan = TransportPlan | Future | _Deferred


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
    if graph_b.graph_module.graph is not graph_a.graph_module.graph:
        _check_same_computation(graph_b, graph_a)


def _check_same_computation(graph_b: SpaceGraph, graph_a: SpaceGraph) -> None:
    """The two graphs run the same operations in the same order (their shapes may differ): models
    with the same parameters can still compute differently (``self.act = F.relu`` in one,
    ``torch.tanh`` in the other), and then one model's graph must not stand for the other. Where
    the widths agree, the operations' non-integer constants must agree too (a LeakyReLU's slope);
    integers may be sizes, and across widths so may floats (an attention's 1/sqrt(d))."""
    nodes_b, nodes_a = (
        list(graph_b.graph_module.graph.nodes),
        list(graph_a.graph_module.graph.nodes),
    )
    same_sizes = graph_b.sizes == graph_a.sizes
    for b, a in zip(nodes_b, nodes_a):
        same_step = (b.op, _target_key(b.target)) == (a.op, _target_key(a.target))
        if not same_step or (same_sizes and _constants(b) != _constants(a)):
            constants = _target_key(b.target) == _target_key(a.target)
            raise ArchitectureMismatchError(
                f"models compute differently with the same parameters: the anchor runs "
                f"{_step_name(a, constants)} where another model runs {_step_name(b, constants)}"
            )
    if len(nodes_b) != len(nodes_a):
        raise ArchitectureMismatchError(
            f"models compute differently with the same parameters ({len(nodes_a)} and "
            f"{len(nodes_b)} operations in their graphs)"
        )


def _target_key(target: object) -> object:
    return target if isinstance(target, str) else id(target)


def _constants(node: torch.fx.Node) -> tuple:
    leaves = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
    return tuple(v for v in leaves if isinstance(v, (bool, float, str)))


def _step_name(node: torch.fx.Node, constants: bool) -> str:
    target = node.target
    if isinstance(target, str):
        name = target
    else:
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
        if isinstance(target, types.BuiltinFunctionType):  # not torch._VariableFunctionsClass
            name = target.__name__
        name = f"{module}.{name}" if module else name
    values = _constants(node) if constants else ()
    return f"'{name}'" + (f" with {', '.join(map(repr, values))}" if values else "")


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
