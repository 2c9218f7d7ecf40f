"""The state one fusion works on: :class:`FusionContext`, shared by every stage.

It holds the models with their graphs (traced once per architecture, :class:`GraphCache`), their
state dicts, the sample and its activations (collected once per activation point and reused by
every candidate alignment), and what the stages produce: the aligned states, the plans, the fused
model. Stages read and write it; nothing is recomputed between them.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from otfuse.activations import collect_activations_at
from otfuse.alignment import check_compatible
from otfuse.baselines import build_model
from otfuse.capture import GraphCache, run_with_hooks
from otfuse.config import FusionConfig
from otfuse.discovery import SpaceGraph, copies
from otfuse.modes import channels_last, evaluating, runs_channels_last
from otfuse.observation import Observation, Wanted, observe
from otfuse.plans import apply_plans
from otfuse.refit import LayerTargets, fit_points, row_budget, targets_from_rows
from otfuse.repair import (
    CorrectionPoint,
    Statistics,
    correction_points,
    point_statistics,
    weighted_targets,
)
from otfuse.transport import TransportPlan

StateDict = dict[str, torch.Tensor]
ProgressCallback = Callable[[str, float], None]
log = logging.getLogger("otfuse")


class Progress:
    """What a fusion reports while it runs.

    ``progress=False``: nothing. ``True``: a line per stage on stderr (``otfuse: refit 0.84 s``) and,
    on a terminal only, progress bars within long stages. A callable: called as ``callback(stage,
    seconds)`` after each stage. Every stage is also logged to the ``otfuse`` logger.
    """

    def __init__(self, progress: bool | ProgressCallback = False) -> None:
        self.callback = progress if callable(progress) else None
        self.lines = progress is True
        self.bars = progress is True and sys.stderr.isatty()

    def done(self, stage: str, seconds: float) -> None:
        log.info("%s %.3f s", stage, seconds)
        if self.callback is not None:
            self.callback(stage, seconds)
        elif self.lines:
            print(f"otfuse: {stage} {seconds:.2f} s", file=sys.stderr, flush=True)


@dataclass
class ParentRecords:
    """What one run of each parent over the sample recorded (:func:`otfuse.observation.observe`),
    shared by every candidate alignment: per model, in the models' order, and refit's rows."""

    wanted: Wanted | None = None
    observations: list[Observation] | None = None
    chosen: LayerTargets | None = None
    channels_last: bool | None = None  # whether the parents run channels-last (probed once)


# Refit's rows of every parent are kept for the stages only within this many bytes (beyond it,
# refit runs the aligned parents and adds their rows up as it goes).
RECORDED_ROWS_BYTES = 1 << 30


class Clock:
    """Wall time split into named parts that add up to the total: ``lap(name)`` books the time
    since the previous lap to ``name``."""

    def __init__(self, progress: Progress) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.progress = progress
        self.label = ""  # said before each stage's name in progress lines (e.g. the candidate)

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.progress.done(self.label + name, seconds)
        return seconds

    @property
    def total(self) -> float:
        return self.last - self.start


@dataclass
class FusionContext:
    """Models, graphs, sample and stage results of one fusion with one config.

    Attributes:
        config: the options this context runs.
        models: the K input models.
        weights: their normalised weights in the average.
        cache: the graphs of every architecture (shared with candidate contexts).
        sample: unlabeled inputs (N, ...), or None without data.
        clock: timing and progress.
        acts_cache: activations per activation point, one dict per model (shared with candidates).
        stats_cache: each model's unit statistics at REPAIR's points (shared with candidates).
        records: what one run of each parent recorded (:meth:`observe_parents`; shared).
        graphs, states: each model's neuron spaces and state dict.
        aligned, plans, logs: every model aligned to the anchor, its plan per space name, and the
            refinement logs.
        fused: the fused model once averaged.
        sample_output: the fused model's output on the sample (eval mode) when the last stage
            computed it (``repair``), else None.
        next_stage: the stage that runs after the current one (set by ``run_stages``).
        pending_norm_reset: ``bn_reset`` left its work to the ``repair`` that follows it.
    """

    config: FusionConfig
    models: list[nn.Module]
    weights: list[float]
    cache: GraphCache
    sample: torch.Tensor | None
    clock: Clock
    acts_cache: dict[str, list[dict[int, torch.Tensor]]] = field(default_factory=dict)
    stats_cache: dict[tuple, list[Statistics]] = field(default_factory=dict)
    records: ParentRecords = field(default_factory=ParentRecords)
    graphs: list[SpaceGraph] = field(init=False)
    states: list[StateDict] = field(init=False)
    aligned: list[StateDict] = field(default_factory=list)
    plans: list[dict[str, TransportPlan]] = field(default_factory=list)
    logs: dict = field(default_factory=dict)
    fused: nn.Module | None = None
    sample_output: Any = None
    next_stage: str | None = None
    pending_norm_reset: bool = False
    _targets: list[SpaceGraph] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.graphs = [self.cache.graph(m) for m in self.models]
        for graph in self.graphs:
            check_compatible(graph, self.graphs[self.anchor])
        self.states = [m.state_dict() for m in self.models]

    @property
    def anchor(self) -> int:
        return self.config.anchor

    def with_config(self, config: FusionConfig) -> FusionContext:
        """A fresh context over the same models, graphs, sample and activations."""
        return FusionContext(
            config, self.models, self.weights, self.cache, self.sample, self.clock,
            self.acts_cache, self.stats_cache, self.records,
        )  # fmt: skip

    def observe_parents(
        self, configs: Sequence[FusionConfig], *, outputs: bool = False
    ) -> list[Observation] | None:
        """Run every model once over the sample and record what the stages of ``configs`` (the
        configs that will run: this context's, or its candidates') read from them: the
        activations of every activation point of an ``acts`` config, REPAIR's statistics and
        refit's rows (equal widths; the rows when they fit :data:`RECORDED_ROWS_BYTES`), and with
        ``outputs`` the outputs. Fills :attr:`acts_cache`, :attr:`stats_cache` and
        :attr:`records`; returns the records, or None when nothing is wanted (no run)."""
        anchor = self.graphs[self.anchor]
        points = tuple(dict.fromkeys(c.activations for c in configs if c.mode == "acts"))
        stages = {name for c in configs for name in c.stages}
        if any(g.sizes != anchor.sizes for g in self.graphs):
            stages = set()  # across widths the stages run the aligned parents themselves
        corrections = tuple(correction_points(anchor)) if "repair" in stages else ()
        fits = tuple(fit_points(anchor.graph_module)) if "refit" in stages else ()
        if fits and self._rows_bytes(fits) > RECORDED_ROWS_BYTES:
            fits = ()
        if not (points or corrections or fits or outputs):
            return None
        wanted = Wanted(points, corrections, fits, outputs, seed=self.config.seed)
        with self.fast_layout([g.graph_module for g in self.graphs]):
            records, chosen = observe(self.graphs, self.sample, wanted)
        for p in points:
            self.acts_cache[p] = [r.activations[p] for r in records]
        if corrections:
            key = tuple((c.node, c.axis) for c in corrections)
            self.stats_cache[key] = [r.statistics for r in records]
        self.records.wanted, self.records.observations = wanted, records
        self.records.chosen = chosen if fits else None
        return records

    def fast_layout(
        self, models: Sequence[nn.Module], *, keep_writes: bool = False
    ) -> AbstractContextManager:
        """:func:`otfuse.modes.channels_last` over ``models`` when the parents run so (probed once
        per fusion on two rows of the sample, :func:`otfuse.modes.runs_channels_last`), else a
        block that changes nothing."""
        if self.records.channels_last is None:
            rows = tree_map(lambda v: v[:2] if isinstance(v, torch.Tensor) else v, self.sample)
            parents = [g.graph_module for g in self.graphs]
            with torch.no_grad(), evaluating(parents):
                self.records.channels_last = runs_channels_last(
                    parents, lambda gm: run_with_hooks(gm, copies(rows))
                )
        layout = self.records.channels_last
        return channels_last(models, keep_writes=keep_writes) if layout else nullcontext()

    def stage_layout(self) -> AbstractContextManager:
        """:meth:`fast_layout` over what the data stages run and write: the fused model and the
        aligned parents built so far."""
        models = [self.fused, *(g.graph_module for g in self._targets or ())]
        return self.fast_layout(models, keep_writes=True)

    def _rows_bytes(self, fits) -> int:
        """An upper bound of the bytes of every model's refit rows at ``fits``."""
        parameter = next(self.models[self.anchor].parameters(), None)
        size = parameter.element_size() if parameter is not None else 4  # the rows' precision
        modules = dict(self.graphs[self.anchor].graph_module.named_modules())
        units = sum(
            row_budget(f.features, Wanted.max_rows) * modules[f.module].weight.shape[0]
            for f in fits
        )
        return units * size * len(self.models)

    def activations(self) -> list[dict[int, torch.Tensor]] | None:
        """Every model's activations per space at the config's point (collected once), or None
        when the mode does not use them."""
        if self.config.mode != "acts":
            return None
        point = self.config.activations
        if point not in self.acts_cache:
            runs = [
                collect_activations_at(g, self.sample, (point,), seed=self.config.seed)
                for g in self.graphs
            ]
            self.acts_cache[point] = [run[point] for run in runs]
        return self.acts_cache[point]

    def repair_targets(self, points: Sequence[CorrectionPoint]) -> Statistics | None:
        """REPAIR's targets at ``points`` from each parent's *own* unit statistics, reordered by its
        plans: with equal widths and permutation plans, aligned unit j of model k is its unit
        ``permutation[j]``, so its statistics are the parent's, reordered. The parents run once
        over the sample for every candidate alignment (``stats_cache``, shared with candidates).
        None when some plan is not a permutation (or not its space's own), the widths differ, or a
        point lies in no single space.
        """
        orders = self._unit_orders({p.node: p.node for p in points})
        if orders is None:
            return None
        key = tuple((p.node, p.axis) for p in points)
        if key not in self.stats_cache:
            self.stats_cache[key] = [point_statistics(g, points, self.sample) for g in self.graphs]
        return weighted_targets(self.stats_cache[key], self.weights, orders)

    def refit_targets(self, gm: torch.fx.GraphModule) -> LayerTargets | None:
        """Refit's targets for the fused graph ``gm`` from each parent's recorded rows, reordered by
        its plans (as :meth:`repair_targets`; :func:`otfuse.refit.targets_from_rows`), or None
        when nothing was recorded for them or the reordering does not give the aligned parents'
        values (then refit runs the aligned parents)."""
        records = self.records
        if records.chosen is None or records.wanted.seed != self.config.seed:
            return None
        points = fit_points(gm)
        rows = [r.rows for r in records.observations]
        if any(p.node not in rows[0] for p in points):
            return None
        orders = self._unit_orders({p.node: p.target for p in points}, single=True)
        if orders is None:
            return None
        for order, parent_rows in zip(orders, rows):
            if any(
                perm is not None and len(perm) != parent_rows[node].shape[1]
                for node, perm in order.items()
            ):
                return None
        return targets_from_rows(
            gm, records.chosen, rows, self.weights, orders, targets=self.config.targets,
            class_counts=self.config.class_counts,
        )  # fmt: skip

    def _unit_orders(
        self, nodes: dict[str, str], *, single: bool = False
    ) -> list[dict[str, torch.Tensor | None]] | None:
        """Per model, the order of its units at each node of ``nodes`` (key -> node) once aligned:
        its plan's permutation of the node's space (None: unmoved). None when some plan is not a
        permutation (or the node's units are moved by another space), the widths differ, or a
        node lies in no space (with ``single``: not in exactly one)."""
        spaces = self.graphs[self.anchor].spaces
        space_of: dict[str, str] = {}
        count: dict[str, set[str]] = {}
        for s in spaces:
            for node, _, _ in s.nodes:
                space_of[node] = s.name
                count.setdefault(node, set()).add(s.name)
        fixed = {s.name for s in spaces if s.fixed}
        sizes = self.graphs[self.anchor].sizes
        if any(n not in space_of or (single and len(count[n]) > 1) for n in nodes.values()):
            return None
        if any(g.sizes != sizes for g in self.graphs):
            return None
        orders: list[dict[str, torch.Tensor | None]] = []
        for i, plans in enumerate(self.plans):
            order: dict[str, torch.Tensor | None] = {}
            for key, node in nodes.items():
                name = space_of[node]
                plan = plans.get(name) if i != self.anchor else None
                moved = i != self.anchor and name not in fixed
                if moved and (plan is None or plan.permutation is None):
                    return None  # a soft plan, or units moved by another space's plan
                order[key] = None if plan is None else torch.as_tensor(plan.permutation)
            orders.append(order)
        return orders

    def fused_graph(self) -> SpaceGraph:
        return self.cache.graph(self.fused)

    def target_graphs(self) -> list[SpaceGraph]:
        """The aligned parents as models that compute what the parents compute, traced (the
        stages' targets; built once per context).

        Across widths the paper's rule for outgoing weights scales a split or merged unit's
        contribution to the next layer, so an aligned state no longer computes its parent's
        function; transporting with ``outgoing="sum"`` by the same plans does (exactly for
        duplicated units). With equal widths (permutations) the two rules agree.
        """
        if self._targets is None:
            template = self.models[self.anchor]
            states = self._function_preserving_states()
            self._targets = [self.cache.graph(build_model(template, s)) for s in states]
        return self._targets

    def _function_preserving_states(self) -> list[StateDict]:
        sizes_a = self.graphs[self.anchor].sizes
        if self.config.outgoing == "sum" or all(g.sizes == sizes_a for g in self.graphs):
            return self.aligned
        targets = []
        for i, (state, graph) in enumerate(zip(self.states, self.graphs)):
            if i == self.anchor:
                targets.append(self.aligned[i])
                continue
            by_index = {s.index: self.plans[i][s.name] for s in graph.transportable()}
            targets.append(apply_plans(state, graph, sizes_a, by_index, outgoing="sum")[0])
        return targets
