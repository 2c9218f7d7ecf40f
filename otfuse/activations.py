"""Activations of every neuron space on a sample of inputs (for ``mode="acts"``).

For a space with n units, its activation matrix has shape (n, m): one row per unit, one column per
(sample, position) pair, gathered from every traced node whose unit axis is exactly that space. Columns
are subsampled with a fixed seed, identically for every model, so rows of two models are comparable.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Literal

import torch
import torch.fx

from otfuse.capture import run_with_hooks
from otfuse.discovery import NeuronSpace, SpaceGraph
from otfuse.modes import evaluating

ActivationPoint = Literal["pre", "post"]
MAX_COLUMNS = 50_000  # columns (samples x positions) per node
PREFERENCE = {"pre": ("pre", "norm", "post"), "post": ("post", "norm", "pre")}


def activation_nodes(space: NeuronSpace, point: ActivationPoint) -> list[tuple[str, int]]:
    """The nodes (name, unit axis) whose values describe ``space``: the first kind found in order of
    preference (``pre``: layer outputs and residual sums; ``post``: outputs of nonlinearities)."""
    for kind in PREFERENCE[point]:
        nodes = [(name, axis) for name, k, axis in space.nodes if k == kind]
        if nodes:
            return nodes
    return []


def collect_activations(
    graph: SpaceGraph,
    inputs: torch.Tensor,
    *,
    point: ActivationPoint = "pre",
    max_columns: int = MAX_COLUMNS,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[int, torch.Tensor]:
    """Activation matrix (n_units, m) of every transportable space, on ``inputs`` (N, ...).

    The model runs in eval mode under ``torch.no_grad``. Each node contributes at most
    ``max_columns`` columns, chosen by ``seed`` alone so that all models use the same ones.
    """
    return collect_activations_at(
        graph, inputs, (point,), max_columns=max_columns, seed=seed, batch_size=batch_size
    )[point]


def collect_activations_at(
    graph: SpaceGraph,
    inputs: torch.Tensor,
    points: Sequence[ActivationPoint],
    *,
    max_columns: int = MAX_COLUMNS,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[ActivationPoint, dict[int, torch.Tensor]]:
    """:func:`collect_activations` at each of ``points``, from one run of the model."""
    spaces = [s for s in graph.spaces if not s.fixed]
    chosen = {(p, s.index): activation_nodes(s, p) for p in points for s in spaces}
    wanted = {name for nodes in chosen.values() for name, _ in nodes}
    values = _run(graph.graph_module, inputs, wanted, batch_size)
    result: dict[ActivationPoint, dict[int, torch.Tensor]] = {p: {} for p in points}
    for (p, index), nodes in chosen.items():
        parts = [
            unit_rows(values[name], axis, max_columns, seed + i)
            for i, (name, axis) in enumerate(nodes)
        ]
        if parts:
            result[p][index] = torch.cat(parts, dim=1)
    return result


def _run(
    gm: torch.fx.GraphModule, inputs: torch.Tensor, wanted: set[str], batch_size: int
) -> dict[str, torch.Tensor]:
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    copy = bool(changed_in_place(gm))  # a later in-place op may change a kept value (or an alias)

    def keep(node: torch.fx.Node, out: torch.Tensor) -> None:
        chunks[node.name].append(out.detach().clone() if copy else out.detach())

    hooks = dict.fromkeys(wanted, keep)
    with torch.no_grad(), evaluating([gm]):
        for start in range(0, len(inputs), batch_size):
            run_with_hooks(gm, inputs[start : start + batch_size], after=hooks)
    return {name: torch.cat(parts, dim=0) for name, parts in chunks.items() if parts}


_IN_PLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
                 "iand", "ior", "ixor", "ilshift", "irshift")
)  # fmt: skip


def changed_in_place(gm: torch.fx.GraphModule) -> set[str]:
    """The nodes whose value a later node changes in place (``ReLU(inplace=True)``,
    ``F.relu(x, inplace=True)``, ``x.relu_()``, ``x += y`` traced as ``iadd``). The change also
    reaches every value that shares its memory (an ``nn.Identity`` or eval-mode ``nn.Dropout``
    before it returns its input, a view), so a graph with any of these has its recorded values
    copied."""
    modules = dict(gm.named_modules())
    changed = set()
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        if not isinstance(first, torch.fx.Node):
            continue
        if node.op == "call_module":
            in_place = bool(getattr(modules.get(node.target), "inplace", False))
        elif node.op == "call_method":
            in_place = node.target.endswith("_") and not node.target.endswith("__")
        elif node.op == "call_function":
            base = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            in_place = (
                node.target in _IN_PLACE_OPERATORS
                or node.kwargs.get("inplace") is True
                or (base.endswith("_") and not base.startswith("_"))  # torch.relu_, aten.add_
            )
        else:
            in_place = False
        if in_place:
            changed.add(first.name)
    return changed


def unit_rows(
    value: torch.Tensor, axis: int, max_columns: int = MAX_COLUMNS, seed: int = 0
) -> torch.Tensor:
    """The units' rows (n, m) of ``value`` (unit axis ``axis``): one column per position of the
    other axes (in their order), at most ``max_columns`` of them, drawn with ``seed`` alone (so
    every model gets the same columns). The chosen columns are gathered from ``value`` directly
    (no copy of every column)."""
    axis = axis % value.ndim
    units = value.shape[axis]
    columns = value.numel() // max(units, 1)
    if columns <= max_columns:
        return value.movedim(axis, 0).reshape(units, -1).float()
    keep = _column_choice(columns, max_columns, seed).to(value.device)
    after = math.prod(value.shape[axis + 1 :])
    grid = value.reshape(-1, units, after)  # (before, units, after)
    return grid[keep // after, :, keep % after].T.float()  # a transposed view


@functools.lru_cache(maxsize=64)
def _column_choice(columns: int, max_columns: int, seed: int) -> torch.Tensor:
    """``max_columns`` of ``columns`` drawn with ``seed``, sorted (the same for every model: drawn
    once)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(columns, generator=gen)[:max_columns].sort().values
