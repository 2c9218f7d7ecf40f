"""Transport plans for attention spaces: a plan over heads, and within matched heads, plans over dims.

An attention layer with H heads of d dims computes, per head h, logits :math:`q_h \\cdot k_h` and an
output :math:`\\sum_h W_O[:, h]\\, v_h`. Its spaces (discovery's
:class:`~otfuse.discovery.HeadStructure`) are the q/k space (one space: q and k move alike) and the
v space (v and the output projection's input block), each of H*d units ``h*d + i``. A plan for them:

1. for every *owner* space S of the group (the q/k and the v space) and every pair of heads
   :math:`(g, g')` of B and A, the best plan :math:`W^S_{gg'}` between their dims (an OT problem
   d_b x d_a on the block :math:`C^S_{gg'}` of S's ground cost), or the identity when S's dims are
   fixed (rotary embeddings);
2. the head plan :math:`P = \\mathrm{OT}(\\mathbf 1/G_b, \\mathbf 1/G_a, H)` with the head cost
   :math:`H_{gg'} = \\sum_S \\langle W^S_{gg'}, C^S_{gg'} \\rangle`, shared by every space of the layer;
3. the composed plan of S, shape (G_b d_b, G_a d_a), block :math:`(g, g')` equal to
   :math:`P_{gg'} W^S_{gg'}`; with permutations it is the permutation
   ``(g', i) <- (perm_P[g'], perm_W[i])``, which :func:`otfuse.plans.transport_member` applies as a
   gather.

Spaces that repeat every head of the group (grouped-query attention: the query heads of one KV head
and the output projection's input blocks of those query heads) take their owner's plan with each
head block repeated, and add their cost to the owner's (summed over the repeats). Hard plans keep
the function exactly; soft plans average within matched blocks. Masses are uniform.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from otfuse.config import FusionConfig
from otfuse.discovery import NeuronSpace, SpaceGraph
from otfuse.errors import TransportError
from otfuse.transport import TransportPlan, solve

CostOf = Callable[[NeuronSpace], np.ndarray]


class HeadPlanner:
    """Plans for the head-structured spaces of model B against anchor A, one attention group at a
    time (solved when the first space of a group is visited).

    Args:
        graph_b, graph_a: the spaces of B and of the anchor A (same architecture family).
        options: the fusion config (``solver`` and ``reg`` apply to both levels).
        cost_of: ground cost (n_b, n_a) between B's and A's units of a space, in B's current
            state (called for the spaces of a group when the group is solved).
    """

    def __init__(
        self, graph_b: SpaceGraph, graph_a: SpaceGraph, options: FusionConfig, cost_of: CostOf
    ) -> None:
        self.spaces_a = {s.index: s for s in graph_a.spaces}
        self.options, self.cost_of = options, cost_of
        self.groups: dict[int, list[NeuronSpace]] = defaultdict(list)
        for s in graph_b.spaces:
            if s.heads is not None:
                self.groups[s.heads.group].append(s)
        self.plans: dict[int, TransportPlan] = {}

    def plan(self, space: NeuronSpace) -> TransportPlan | None:
        """The plan of ``space``, or None when it has no heads (an ordinary space)."""
        if space.heads is None:
            return None
        if space.index not in self.plans:
            self.plans.update(self._solve_group(self.groups[space.heads.group]))
        return self.plans[space.index]

    def _solve_group(self, spaces: list[NeuronSpace]) -> dict[int, TransportPlan]:
        g_b, g_a = _group_heads(spaces[0]), _group_heads(self.spaces_a[spaces[0].index])
        if any(s.fixed for s in spaces):
            return {s.index: identity_plan(s.size) for s in spaces if not s.fixed}
        owners = [s for s in spaces if s.heads.dims_of == s.index]
        within, head_cost, costs = {}, np.zeros((g_b, g_a)), {}
        for owner in owners:
            block_cost = self._owner_cost(owner, spaces, g_b, g_a, costs)
            within[owner.index], values = self._within(block_cost, owner.heads.fixed_dims)
            head_cost += values
        if spaces[0].heads.fixed_heads:
            if g_b != g_a:
                raise TransportError("heads that cannot move need equal numbers of heads")
            heads = identity_plan(g_b)
        else:
            uniform_b, uniform_a = np.full(g_b, 1.0 / g_b), np.full(g_a, 1.0 / g_a)
            heads = solve(head_cost, uniform_b, uniform_a, **self._solver())
        out = {}
        for s in spaces:
            cost = costs.get(s.index, np.zeros((s.size, self.spaces_a[s.index].size)))
            out[s.index] = compose(heads, within[s.heads.dims_of], s.heads.repeat, cost)
        return out

    def _solver(self) -> dict:
        return {"solver": self.options.solver, "reg": self.options.reg}

    def _owner_cost(
        self, owner: NeuronSpace, spaces: list[NeuronSpace], g_b: int, g_a: int, costs: dict
    ) -> np.ndarray:
        """Cost (G_b, d_b, G_a, d_a) between B's and A's dims of every pair of heads: the owner's
        cost plus its followers', summed over their repeats."""
        d_b, d_a = owner.size // g_b, self.spaces_a[owner.index].size // g_a
        total = np.zeros((g_b, d_b, g_a, d_a))
        for s in spaces:
            if s.heads.dims_of != owner.index or not s.producers():
                continue  # the output projection's input blocks add no incoming weights
            costs[s.index] = cost = np.asarray(self.cost_of(s))
            r = s.heads.repeat // owner.heads.repeat
            blocks = cost.reshape(g_b, r, d_b, g_a, r, d_a)
            total += np.einsum("gjihjk->gihk", blocks, dtype=np.float64)  # sums the repeats
        return total

    def _within(self, cost: np.ndarray, fixed: bool) -> tuple[np.ndarray, np.ndarray]:
        """Plans between the dims of every pair of heads, and their costs <W, C>."""
        g_b, d_b, g_a, d_a = cost.shape
        plans = np.empty((g_b, g_a), dtype=object)
        values = np.zeros((g_b, g_a))
        uniform_b, uniform_a = np.full(d_b, 1.0 / d_b), np.full(d_a, 1.0 / d_a)
        for gb in range(g_b):
            for ga in range(g_a):
                block = np.ascontiguousarray(cost[gb, :, ga, :])
                if fixed:
                    if d_b != d_a:
                        raise TransportError(
                            "the dims within a head are fixed (rotary embeddings or a slice of "
                            f"the head), so the models need equal head sizes, not {d_b} and {d_a}"
                        )
                    plans[gb, ga] = identity_plan(d_b, block)
                else:
                    plans[gb, ga] = solve(block, uniform_b, uniform_a, **self._solver())
                values[gb, ga] = plans[gb, ga].value
        return plans, values


def _group_heads(space: NeuronSpace) -> int:
    return space.heads.count // space.heads.repeat


def identity_plan(n: int, cost: np.ndarray | None = None) -> TransportPlan:
    """The plan that keeps every one of ``n`` units in place."""
    cost = np.zeros((n, n)) if cost is None else cost
    return TransportPlan(np.eye(n) / n, cost, "identity", np.arange(n))


def compose(
    heads: TransportPlan, within: np.ndarray, repeat: int, cost: np.ndarray | None
) -> TransportPlan:
    """One plan over ``G * repeat * d`` units from the head plan (G_b, G_a) and the plans between the
    dims of every pair of heads (``within[g, g']``); each head block is repeated ``repeat`` times."""
    g_b, g_a = heads.shape
    pairs = list(zip(*np.nonzero(heads.matrix > 0)))
    d_b, d_a = within[pairs[0]].shape
    matrix = np.zeros((g_b * repeat * d_b, g_a * repeat * d_a))
    for gb, ga in pairs:
        block = heads.matrix[gb, ga] / repeat * within[gb, ga].matrix
        for j in range(repeat):
            rows = (gb * repeat + j) * d_b
            cols = (ga * repeat + j) * d_a
            matrix[rows : rows + d_b, cols : cols + d_a] = block
    cost = np.zeros(matrix.shape) if cost is None else cost
    return TransportPlan(matrix, cost, "heads", _composed_permutation(heads, within, repeat))


def _composed_permutation(
    heads: TransportPlan, within: np.ndarray, repeat: int
) -> np.ndarray | None:
    """Unit ``(g', j, i)`` of A receives unit ``(perm[g'], j, perm_W[i])`` of B, when all are hard."""
    if heads.permutation is None:
        return None
    perm = []
    for ga, gb in enumerate(heads.permutation):
        inner = within[gb, ga].permutation
        if inner is None:
            return None
        d = len(inner)
        for j in range(repeat):
            perm.append((gb * repeat + j) * d + inner)
    return np.concatenate(perm)


def random_plans(graph: SpaceGraph, seed: int = 0) -> dict[int, TransportPlan]:
    """A random permutation of every transportable space that keeps the model's function: heads and
    their dims permuted as one plan per attention group, other spaces freely within their groups
    (for tests: plant it, then recover it)."""
    rng = np.random.default_rng(seed)
    plans: dict[int, TransportPlan] = {}
    groups: dict[int, list[NeuronSpace]] = defaultdict(list)
    for s in graph.transportable():
        if s.heads is not None:
            groups[s.heads.group].append(s)
            continue
        n, g = s.size, s.groups
        perm = np.concatenate([rng.permutation(n // g) + j * (n // g) for j in range(g)])
        plans[s.index] = _hard(perm)
    for spaces in groups.values():
        count = _group_heads(spaces[0])
        head_perm = np.arange(count) if spaces[0].heads.fixed_heads else rng.permutation(count)
        heads = _hard(head_perm)
        within = {}
        for s in spaces:
            if s.heads.dims_of == s.index:
                d = s.size // count
                table = np.empty((count, count), dtype=object)
                for ga in range(count):
                    inner = np.arange(d) if s.heads.fixed_dims else rng.permutation(d)
                    table[head_perm[ga], ga] = _hard(inner)
                within[s.index] = table
        for s in spaces:
            plans[s.index] = compose(heads, within[s.heads.dims_of], s.heads.repeat, None)
    return plans


def _hard(perm: np.ndarray) -> TransportPlan:
    n = len(perm)
    matrix = np.zeros((n, n))
    matrix[perm, np.arange(n)] = 1.0 / n
    return TransportPlan(matrix, np.zeros((n, n)), "planted", perm)
