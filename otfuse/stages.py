"""The stages of a fusion: small named units over one :class:`~otfuse.context.FusionContext`.

A fusion runs, in order::

    align -> [refine] -> [to_average] -> average -> config.stages (bn_reset, repair, refit, distill)

* ``align``: Algorithm 1, every model to the anchor, costs from weights or activations
  (:mod:`otfuse.alignment`).
* ``refine``: weight matching with OT plans until no plan changes (:mod:`otfuse.refinement`).
* ``to_average``: K > 2, re-align to the running average or the activations' consensus
  (:mod:`otfuse.consensus`).
* ``average``: the weighted average of the aligned states, a model of the anchor's class.
* ``bn_reset``, ``repair``, ``refit``: on the sample, recompute BatchNorm statistics, match every
  unit's mean and spread to the aligned parents' (REPAIR), re-solve every Linear/Conv layer by
  least squares (:mod:`otfuse.repair`, :mod:`otfuse.refit`); with ``targets="ensemble"`` refit
  fits the class scores to the log of the parents' prediction ensemble.
* ``distill``: train the whole fused model for a few Adam steps on the sample, without labels,
  towards the parents' mixture that ``targets`` names (:mod:`otfuse.distill`).

Each stage declares the config fields it reads (``reads``) and whether it needs data; the registry
``STAGES`` maps names to them, so the config lists stages by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from otfuse.alignment import StateDict, align_state
from otfuse.baselines import average_states, build_model
from otfuse.consensus import align_to_average, align_to_consensus
from otfuse.context import FusionContext, log
from otfuse.distill import distill
from otfuse.errors import DataError
from otfuse.refinement import refine_plans
from otfuse.refit import class_scores, fit_points, linear_scores, refit_layers
from otfuse.repair import (
    correction_points,
    norms_resettable_in_run,
    repair_statistics,
    reset_batchnorm,
)
from otfuse.synthesis import tracked_batchnorms
from otfuse.threads import lasting_pool

ALIGNMENT = ("mode", "solver", "cost", "marginals", "reg", "activations", "seed", "outgoing")


@dataclass(frozen=True)
class Stage:
    """A named step of the pipeline: ``run(context)`` updates the context in place."""

    name: str
    run: Callable[[FusionContext], None]
    reads: tuple[str, ...]
    needs_data: bool
    summary: str


STAGES: dict[str, Stage] = {}


def stage(name: str, *, reads: tuple[str, ...] = (), needs_data: bool = False):
    """Register the decorated function as the stage ``name``."""

    def register(run: Callable[[FusionContext], None]) -> Callable[[FusionContext], None]:
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else name
        STAGES[name] = Stage(name, run, reads, needs_data, summary)
        return run

    return register


def stage_names(context: FusionContext) -> list[str]:
    """The stages ``context.config`` runs, in order."""
    config, k = context.config, len(context.models)
    names = ["align"]
    if config.refine:
        names.append("refine")
    if config.to_average and k > 2:
        names.append("to_average")
    return [*names, "average", *config.stages]


@stage("align", reads=ALIGNMENT)
def align_to_anchor(context: FusionContext) -> None:
    """Align every model to the anchor, one neuron space at a time (greedy, Algorithm 1)."""
    anchor, graphs, states = context.anchor, context.graphs, context.states
    acts = context.activations()

    def align_one(i: int) -> tuple[StateDict, dict]:
        pair = (acts[i], acts[anchor]) if acts is not None else (None, None)
        return align_state(
            states[i], graphs[i], states[anchor], graphs[anchor], context.config, *pair
        )

    others = [i for i in range(len(states)) if i != anchor]
    bars = not context.clock.progress.bars
    results = {anchor: (states[anchor], {})}
    if min(MODEL_WORKERS, len(others)) > 1:
        pool = lasting_pool("align", MODEL_WORKERS)
        done = results_in_order([pool.submit(align_one, i) for i in others])
    else:
        done = map(align_one, others)
    bar = tqdm(done, total=len(others), desc="align", unit="model", disable=bars, leave=False)
    results.update(zip(others, bar))
    context.aligned = [results[i][0] for i in range(len(states))]
    context.plans = [results[i][1] for i in range(len(states))]


# Models are aligned to the anchor independently, three at a time: one model's exact assignment
# (compiled code without Python's lock, on one core) overlaps the others' cost products. Six VGG11
# on two cores, interleaved medians of 7: 0.58 s one at a time, 0.50 s two, 0.48 s three, 0.50 s
# four or five (eighteenth session, another CPU: 0.75 / 0.65 / 0.59 / 0.62 s for 1-4). The threads
# last for the process (:func:`otfuse.threads.lasting_pool`).
MODEL_WORKERS = 3


def results_in_order(futures: Sequence[Future]) -> Iterator:
    """Each future's result in turn. When one fails, those not started are cancelled and the
    running ones waited for before its error is raised: no work outlives the stage."""
    try:
        for future in futures:
            yield future.result()
    finally:
        for future in futures:
            future.cancel()
        wait(futures)


@stage("refine", reads=("marginals", "solver", "outgoing", "max_sweeps"))
def refine(context: FusionContext) -> None:
    """Re-solve every space of every model against all its weights (weight matching)."""
    anchor, graphs, states = context.anchor, context.graphs, context.states
    for i in range(len(states)):
        if i == anchor:
            continue
        args = (states[i], graphs[i], states[anchor], graphs[anchor])
        context.aligned[i], context.plans[i], context.logs[i] = refine_plans(
            *args, context.plans[i], context.config, max_sweeps=context.config.max_sweeps
        )


@stage("to_average", reads=(*ALIGNMENT, "max_sweeps"))
def to_average(context: FusionContext) -> None:
    """K > 2: re-align every model to the running average (weights) or consensus (activations)."""
    c = context
    common = (c.states, c.graphs, c.anchor, c.weights)
    acts = c.activations()
    if acts is not None:
        result = align_to_consensus(
            *common, acts, c.aligned, c.plans, c.config, max_rounds=c.config.max_sweeps
        )
    else:
        reference = c.states[c.anchor]
        result = align_to_average(
            *common,
            c.aligned,
            c.plans,
            c.config,
            max_rounds=c.config.max_sweeps,
            average=lambda states, ws: average_states(states, ws, reference),
        )
    c.aligned, c.plans, c.logs["average"] = result


@stage("average")
def average(context: FusionContext) -> None:
    """Average the aligned states into a model of the anchor's class."""
    reference = context.states[context.anchor]
    state = average_states(context.aligned, context.weights, reference)
    context.fused = build_model(context.models[context.anchor], state, adopt=True)


@stage("bn_reset", needs_data=True)
def bn_reset(context: FusionContext) -> None:
    """Recompute the fused model's BatchNorm statistics on the sample.

    When ``repair`` runs next and every BatchNorm is a module of the traced graph, the statistics
    are set in repair's own run over the sample instead (one forward pass for both stages)."""
    if tracked_batchnorms(context.fused):
        _check_varied(context.sample)
    if context.next_stage == "repair" and norms_resettable_in_run(
        context.fused_graph().graph_module, context.fused
    ):
        context.pending_norm_reset = True
        return
    reset_batchnorm(context.fused, context.sample)


def _check_varied(sample: torch.Tensor | tuple) -> None:
    """BatchNorm statistics need inputs that differ: from one input (or copies of one) a
    BatchNorm1d would be given zero variance and divide by sqrt(eps)."""
    first = sample[0] if isinstance(sample, tuple) else sample
    if isinstance(first, torch.Tensor) and first.ndim > 0 and bool((first == first[:1]).all()):
        count = "1 input" if len(first) == 1 else f"{len(first)} copies of one input"
        raise DataError(
            f"the sample holds {count}: recomputing BatchNorm statistics (bn_reset) needs "
            "different inputs (a few hundred for a good fusion)"
        )


@stage("repair", needs_data=True)
def repair(context: FusionContext) -> None:
    """Match each fused unit's mean and spread to the aligned parents' average (REPAIR)."""
    fused = context.fused_graph()
    targets = context.repair_targets(correction_points(fused))
    parents = context.target_graphs() if targets is None else None
    reset, context.pending_norm_reset = context.pending_norm_reset, False
    context.sample_output = repair_statistics(
        fused, parents, context.weights, context.sample, targets=targets, reset_norms=reset
    )


@stage("refit", reads=("seed", "targets", "class_counts"), needs_data=True)
def refit(context: FusionContext) -> None:
    """Re-solve every Linear/Conv layer to the aligned parents' average outputs (least squares)."""
    fused = context.fused_graph()
    targets = context.config.targets
    if (
        targets != "average"
        and class_scores(fused.graph_module, fit_points(fused.graph_module)) is None
    ):
        log.warning(
            "targets=%r: the model's output is not class scores of a layer refit can fit "
            "(an nn.Linear of its own, output (N, ..., C)); refit aims at the weighted average",
            targets,
        )
    goal = context.refit_targets(fused.graph_module)  # from the parents' recorded rows
    refit_layers(
        fused,
        context.target_graphs() if goal is None else None,
        context.weights,
        context.sample,
        seed=context.config.seed,
        targets=context.config.targets,
        goal=goal,
        class_counts=context.config.class_counts,
    )
    context.fused.eval()


@stage(
    "distill",
    reads=("seed", "targets", "class_counts", "distill_steps", "distill_lr", "distill_batch"),
    needs_data=True,
)
def distill_stage(context: FusionContext) -> None:
    """Train the fused model towards the parents' mixture on the sample (no labels)."""
    config = context.config
    student = context.fused_graph().graph_module
    if config.targets != "average" and linear_scores(student) is None:
        log.warning(
            "targets=%r: the model's output is not class scores (an nn.Linear's, (N, ..., C)); "
            "distill fits the weighted average output by squared error",
            config.targets,
        )
    distill(
        student,
        list(context.fused.parameters()),
        [g.graph_module for g in context.graphs],
        context.weights,
        context.sample,
        steps=config.distill_steps,
        lr=config.distill_lr,
        batch_size=config.distill_batch,
        targets=config.targets,
        class_counts=config.class_counts,
        seed=config.seed,
    )
    context.fused.eval()


# the stages whose convolutions run channels-last (:meth:`FusionContext.stage_layout`): forward
# passes and closed-form solves. ``distill`` trains in the models' own layout: Adam turns the
# layouts' different roundings of near-zero gradients into full steps (not wrong, but another
# model than the plain layout's).
FAST_LAYOUT_STAGES = ("bn_reset", "repair", "refit")


def run_stages(context: FusionContext, names: Sequence[str] | None = None) -> FusionContext:
    """Run ``names`` (default: every stage of ``context.config``, :func:`stage_names`) on
    ``context`` in order, timing each."""
    names = stage_names(context) if names is None else list(names)
    for i, name in enumerate(names):
        context.next_stage = names[i + 1] if i + 1 < len(names) else None
        context.sample_output = None  # the stage changes the fused model
        with context.stage_layout() if name in FAST_LAYOUT_STAGES else nullcontext():
            STAGES[name].run(context)
        context.clock.lap(name)
    context.next_stage = None
    return context
