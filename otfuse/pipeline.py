"""Fusion of K models, and alignment of one model to another: the front door of the library.

.. math::

    \\theta_{\\text{fused}} = \\sum_k w_k \\, \\operatorname{align}(\\theta_k \\to \\theta_{\\text{anchor}}),
    \\qquad \\sum_k w_k = 1,

followed by the config's stages on a sample of inputs. One call validates its inputs once
(:mod:`otfuse.validation`), traces each architecture once (:class:`~otfuse.capture.GraphCache`),
builds one :class:`~otfuse.context.FusionContext` and runs the stages (:mod:`otfuse.stages`) over
it. Choosing among candidate alignments (the ``data`` recipe) runs the stages once per candidate
config over the same context and keeps the fused model closest to the parents' prediction ensemble.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from otfuse.alignment import align_state
from otfuse.baselines import build_model
from otfuse.capture import GraphCache
from otfuse.config import FusionConfig, resolve
from otfuse.context import Clock, FusionContext, Progress, ProgressCallback, log
from otfuse.coverage import check_counts
from otfuse.discovery import SpaceGraph, copies
from otfuse.errors import DataError, OtfuseError
from otfuse.modes import evaluating
from otfuse.refit import output_scores
from otfuse.stages import run_stages, stage_names
from otfuse.synthesis import budget, can_synthesize, scores_of, synthesize_inputs
from otfuse.transport import TransportPlan
from otfuse.validation import (
    check_anchor,
    check_fits,
    check_models,
    check_one_input,
    check_token_ids,
    data_does_not_fit,
    example_input_for,
    model_device,
    normalise_weights,
    sample_inputs,
    to_device,
    to_model_dtype,
)


@dataclass
class FusionResult:
    """What :func:`fuse` returns.

    Attributes:
        model: the fused model, a plain ``nn.Module`` of the anchor's architecture.
        config: the :class:`FusionConfig` that ran (after synthesis and candidate selection).
        plans: for each input model, its plan per space name (empty for the anchor).
        weights: the normalised weight of each model in the average.
        anchor: index of the anchor model.
        seconds: wall-clock time of the whole call.
        spaces: the anchor's neuron spaces.
        timings: seconds per stage (``prepare``, ``synthesize``, ``align``, ..., ``select``); they
            add up to ``seconds``.
        refinement: objective logs of refinement (per model index, and ``"average"``), when used.
        inputs: where the sample came from: ``"data"``, ``"synthesized"`` or ``"none"``.
        selection: each candidate alignment's KL divergence to the ensemble, when chosen among them.
        selected: the chosen candidate, when chosen among them.
        traces: how many models were traced (one per architecture).
    """

    model: nn.Module
    config: FusionConfig
    plans: list[dict[str, TransportPlan]]
    weights: list[float]
    anchor: int
    seconds: float
    spaces: SpaceGraph
    timings: dict[str, float] = field(default_factory=dict)
    refinement: dict = field(default_factory=dict)
    inputs: str = "none"
    selection: dict[str, float] = field(default_factory=dict)
    selected: str | None = None
    traces: int = 0

    def costs(self) -> list[dict[str, float]]:
        """Transport cost <T, C> per model and space."""
        return [{name: plan.value for name, plan in plans.items()} for plans in self.plans]


def fuse(
    models: Sequence[nn.Module],
    config: FusionConfig | str | None = None,
    *,
    data: object = None,
    example_input: torch.Tensor | tuple | None = None,
    progress: bool | ProgressCallback = False,
    **overrides: object,
) -> FusionResult:
    """Fuse K >= 2 models of one architecture family into one model of the anchor's architecture.

    Every model is aligned to ``models[config.anchor]``, the aligned parameters are averaged with
    ``config.weights`` (default equal; normalised to sum to 1), then ``config.stages`` run on the
    sample.

    Args:
        models: K >= 2 models of one architecture family (widths may differ).
        config: a :class:`FusionConfig`, or a recipe name; default: the ``data`` recipe when ``data``
            is given, else ``data-free`` (:mod:`otfuse.config`).
        data: unlabeled inputs: a tensor (N, ...), a dataset (with ``.images``, or a map-style
            torch ``Dataset`` such as ``TensorDataset``) or batches; a seeded sample of
            ``num_samples`` of them is used.
        example_input: an input the models accept, for tracing (default: from ``data`` or the
            models' recorded input shape).
        progress: ``True`` for a line per stage on stderr (and bars on a terminal), or a callback
            ``f(stage, seconds)``.
        **overrides: :class:`FusionConfig` fields (``mode="acts"``, ``stages=("bn_reset",)``, ...);
            None values are ignored.

    Returns:
        A :class:`FusionResult`; ``result.model`` is a plain ``nn.Module`` whose ``state_dict`` loads
        into the anchor's class without otfuse; ``result.config`` is what ran.

    Raises:
        OtfuseError: bad input (models, data, options), in one line that names the cause.
    """
    clock = Clock(Progress(progress))
    config = resolve(config, data is not None, overrides)
    models = check_models(models)
    check_anchor(config.anchor, len(models))
    weights = normalise_weights(config.weights, len(models))
    _warn_unused_counts(config)
    sample = sample_inputs(data, config.num_samples, config.seed) if data is not None else None
    example = example_input_for(models[config.anchor], example_input, sample)
    anchor = models[config.anchor]
    device = model_device(anchor)  # everything runs where the models are, in their precision
    sample, example = to_device(sample, device), to_device(example, device)
    sample, example = to_model_dtype(sample, anchor), to_model_dtype(example, anchor)
    check_token_ids(sample, example, anchor)
    if sample is not None:
        acts = any(c.get("mode") == "acts" for c in config.candidates)
        check_one_input(example, config.needs_data or acts)
        check_fits(sample, example, anchor)
    cache = GraphCache(example)
    try:
        cache.graph(anchor)  # the anchor traced first: a bad example input fails here
    except OtfuseError as error:
        from_data = example_input is None and sample is not None
        if from_data and str(error).startswith("example input does not fit"):
            raise data_does_not_fit(error, sample, anchor) from None
        raise
    if config.targets == "coverage" or config.class_counts is not None:  # before any work
        scores = output_scores(cache.graph(anchor).graph_module)
        classes = scores.meta["tensor_meta"].shape[-1] if scores is not None else None
        check_counts(config.class_counts, len(models), classes)
    clock.lap("prepare")
    inputs = "data" if sample is not None else "none"
    if sample is None:
        sample, config = _without_data(models, example, config, overrides, clock)
        inputs = "synthesized" if sample is not None else "none"
    _check_needs_data(config, sample)
    context = FusionContext(config, models, weights, cache, sample, clock)
    if config.candidates and sample is not None:
        return _select(context, inputs)
    if sample is not None and {"repair", "refit"} & set(config.stages):
        if context.observe_parents([config]) is not None:  # one run of each parent for all stages
            clock.lap("observe")
    run_stages(context)
    return _result(context, inputs)


def _check_needs_data(config: FusionConfig, sample: torch.Tensor | None) -> None:
    if sample is not None:
        return
    if config.mode == "acts":
        raise DataError("mode='acts' needs data: pass data=<inputs> (a tensor or a dataset)")
    if config.stages:
        raise DataError(
            f"stage '{config.stages[0]}' needs data: pass data=<inputs> (a tensor or a dataset)"
        )


def _without_data(
    models: list[nn.Module],
    example: torch.Tensor | tuple,
    config: FusionConfig,
    overrides: Mapping[str, object],
    clock: Clock,
) -> tuple[torch.Tensor | None, FusionConfig]:
    """Without data: inputs synthesised from the models (:mod:`otfuse.synthesis`) when the config
    asks for them and the models allow it, and the config to fuse on them.

    Otherwise (``synthesize=0``, or models with neither BatchNorm statistics nor class outputs) the
    ``data-free`` recipe falls back to weight matching (``refine``, ``to_average``, no stages) with
    the caller's overrides; any other config runs as it is.
    """
    if not config.synthesize or not can_synthesize(models, example):
        if config.recipe != "data-free":
            return None, config
        given = {k: v for k, v in overrides.items() if v is not None and k != "recipe"}
        fallback = config.replace(
            mode="wts", cost="euclidean", activations="pre", refine=True, to_average=True,
            stages=(), candidates=(),
        )  # fmt: skip
        return None, fallback.replace(**given) if given else fallback
    count, steps = budget(models, example, config.synthesize, config.synthesis_steps)
    config = config.replace(synthesize=count, synthesis_steps=steps or config.synthesis_steps)
    inputs = synthesized_inputs(models, example, config, progress=clock.progress.bars)
    clock.lap("synthesize")
    return inputs, config.replace(num_samples=len(inputs))


def synthesized_inputs(
    models: Sequence[nn.Module],
    example: torch.Tensor,
    config: FusionConfig,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """The inputs that :func:`fuse` synthesises from ``models`` without data under ``config``
    (``synthesize`` inputs, ``synthesis_steps`` steps at ``synthesis_lr`` in
    ``synthesis_precision``, drawn with ``seed``)."""
    return synthesize_inputs(
        list(models),
        example,
        num_samples=config.synthesize,
        steps=config.synthesis_steps,
        lr=config.synthesis_lr,
        precision=config.synthesis_precision,
        seed=config.seed,
        progress=progress,
    )


# Synthesised inputs are classified confidently by construction (they are optimised towards
# classes), so the ensemble's probabilities on them are near one-hot and a KL divergence at
# temperature 1 measures little but confidence: candidates are compared at this temperature there.
SYNTHESIZED_TEMPERATURE = 4.0


def _select(context: FusionContext, inputs: str) -> FusionResult:
    """Run the stages once per candidate alignment and keep the fused model closest to the
    parents' prediction ensemble on the unlabeled sample (smallest mean KL divergence, of the
    probabilities at temperature :math:`\\tau` = 1 on data and :data:`SYNTHESIZED_TEMPERATURE` on
    synthesised inputs):

    .. math::

        \\mathrm{KL}(\\bar p \\,\\Vert\\, p_{\\text{fused}}), \\qquad \\bar p = \\sum_k w_k\\, p_k,
        \\quad p = \\operatorname{softmax}(z / \\tau).

    The candidates are compared before ``refit`` or ``distill`` (the costly stages: a
    least-squares solve per layer, Adam steps), which then run on the chosen one only
    (:data:`SELECT_BEFORE`).
    """
    sample = context.sample
    tau = SYNTHESIZED_TEMPERATURE if inputs == "synthesized" else 1.0
    candidates = context.config.candidates
    trials = [context.config.replace(**c) for c in candidates]
    records = context.observe_parents(trials, outputs=True)  # each parent runs once, for all
    context.clock.lap("observe")
    probs = [_log_probs(m, sample, tau, output=r.output) for m, r in zip(context.models, records)]
    for record in records:
        record.output = None  # the outputs are not needed any more
    if any(p is None for p in probs):  # outputs that are not one logits tensor: no teacher
        run_stages(context)
        return _result(context, inputs)
    target = torch.log(sum(w * p.exp() for w, p in zip(context.weights, probs)).clamp_min(1e-30))
    context.clock.lap("select")
    best, scores = None, {}
    for i, candidate in enumerate(candidates, start=1):
        context.clock.label = f"candidate {i}/{len(candidates)} ({_label(candidate)}): "
        trial = context.with_config(context.config.replace(**candidate, candidates=()))
        names = stage_names(trial)
        run_stages(trial, names[: _cut(names)])
        fused = _log_probs(trial.fused, sample, tau, output=trial.sample_output)
        score = float((target.exp() * (target - fused)).sum(-1).mean())
        scores[_label(candidate)] = score
        context.clock.lap("select")
        if best is None or score < best[0]:
            best = (score, trial, candidate)
    _, chosen, candidate = best
    context.clock.label = f"chosen ({_label(candidate)}): "
    names = stage_names(chosen)
    run_stages(chosen, names[_cut(names) :])
    context.clock.label = ""
    result = _result(chosen, inputs)
    result.selection, result.selected = scores, _label(candidate)
    return result


# candidates are compared before the first of these stages (the costly ones), else after every stage
SELECT_BEFORE = ("refit", "distill")


def _cut(names: Sequence[str]) -> int:
    """How many of ``names`` run per candidate: those before the first of :data:`SELECT_BEFORE`."""
    return next((i for i, name in enumerate(names) if name in SELECT_BEFORE), len(names))


def _log_probs(
    model: nn.Module, x: torch.Tensor, tau: float = 1.0, *, output: object = None
) -> torch.Tensor | None:
    """Log-softmax of ``model``'s scores on ``x`` (eval mode; ``output`` when the caller has it as
    one tensor; :func:`otfuse.synthesis.scores_of`) divided by ``tau``, or None when it has none."""
    out = output
    if not isinstance(out, torch.Tensor):  # a graph's output may be flattened: run the model
        with torch.no_grad(), evaluating([model]):
            out = scores_of(model(copies(x)))  # a model may change its input in place
    return torch.log_softmax(out / tau, dim=-1) if isinstance(out, torch.Tensor) else None


def _label(candidate: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in candidate.items())


def _result(context: FusionContext, inputs: str) -> FusionResult:
    clock = context.clock
    _modes_of(context.models[context.anchor], context.fused)
    return FusionResult(
        model=context.fused,
        config=context.config,
        plans=context.plans,
        weights=context.weights,
        anchor=context.anchor,
        seconds=clock.total,
        spaces=context.graphs[context.anchor],
        timings=dict(clock.timings),
        refinement=context.logs,
        inputs=inputs,
        traces=context.cache.traces,
    )


def _modes_of(anchor: nn.Module, fused: nn.Module) -> None:
    """Give the fused model the anchor's train/eval mode, module by module (the stages run it in
    eval mode)."""
    mine, theirs = list(fused.modules()), list(anchor.modules())
    if len(mine) == len(theirs):
        for fused_module, anchor_module in zip(mine, theirs):
            fused_module.training = anchor_module.training


def align(
    model: nn.Module,
    anchor: nn.Module,
    config: FusionConfig | str | None = None,
    *,
    data: object = None,
    example_input: torch.Tensor | tuple | None = None,
    **overrides: object,
) -> nn.Module:
    """A copy of ``model`` transported into ``anchor``'s widths and unit order.

    Args:
        model: the model B to align; not modified.
        anchor: the model A to align to; the result has its architecture and widths.
        config: the alignment options (:class:`FusionConfig`; default: the paper's ``wts``); only
            the alignment fields (``mode``, ``solver``, ``cost``, ``marginals``, ``reg``,
            ``activations``, ``num_samples``, ``seed``, ``outgoing``) apply.
        data: inputs (N, ...) for ``mode="acts"``; also give the example input when that is None.
        example_input: an input the models accept, e.g. shape (2, 3, 32, 32), for tracing.
        **overrides: :class:`FusionConfig` fields.

    Returns:
        A new module of the anchor's architecture holding B's aligned parameters. With equal widths
        and hard plans it computes exactly what ``model`` computes; with soft plans (Sinkhorn,
        non-uniform marginals) only approximately, and a WARNING on the ``otfuse`` logger says so.
    """
    config = resolve(config or FusionConfig(), data is not None, overrides)
    anchor, model = check_models([anchor, model])
    sample = sample_inputs(data, config.num_samples, config.seed) if data is not None else None
    example = example_input_for(anchor, example_input, sample)
    device = model_device(anchor)
    sample, example = to_device(sample, device), to_device(example, device)
    sample, example = to_model_dtype(sample, anchor), to_model_dtype(example, anchor)
    check_token_ids(sample, example, anchor)
    if sample is not None:
        check_one_input(example, config.mode == "acts")
        check_fits(sample, example, anchor)
    if config.mode == "acts" and sample is None:
        raise DataError("mode='acts' needs data: pass data=<inputs> (a tensor or a dataset)")
    context = FusionContext(
        config.replace(anchor=0, weights=None), [anchor, model], [0.5, 0.5],
        GraphCache(example), sample, Clock(Progress(False)),
    )  # fmt: skip
    acts = context.activations()
    pair = (acts[1], acts[0]) if acts is not None else (None, None)
    graphs, states = context.graphs, context.states
    state, plans = align_state(states[1], graphs[1], states[0], graphs[0], config, *pair)
    names = {space.index: space.name for space in graphs[0].spaces}
    soft = [str(names.get(key, key)) for key, plan in plans.items() if plan.permutation is None]
    if soft and graphs[0].sizes == graphs[1].sizes:
        log.warning(
            "the plans of %d space(s) (%s) are not permutations (solver=%s, marginals=%s): the "
            "aligned model computes what the model computes only approximately",
            len(soft), ", ".join(soft[:3]) + (", ..." if len(soft) > 3 else ""),
            config.solver, config.marginals,
        )  # fmt: skip
    return build_model(anchor, state)


def _warn_unused_counts(config: FusionConfig) -> None:
    """Say (a WARNING on the ``otfuse`` logger) when ``class_counts`` are given but nothing reads
    them: they serve only ``targets="coverage"``."""
    if config.class_counts is not None and config.targets != "coverage":
        log.warning("class_counts are read only with targets=coverage (targets=%r)", config.targets)
