"""Fusion of K models: align every model to an anchor, then take the weighted average.

.. math::

    \\theta_{\\text{fused}} = \\sum_k w_k \\, \\operatorname{align}(\\theta_k \\to \\theta_{\\text{anchor}}),
    \\qquad \\sum_k w_k = 1.

Baselines in the same API: :func:`vanilla_average` (no alignment) and :class:`PredictionEnsemble`
(average of the models' softmax outputs).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from otfuse.activations import ActivationPoint, collect_activations
from otfuse.alignment import ALIGN_FIELDS, AlignOptions, Mode, align_state, check_compatible
from otfuse.cost import CostName, MarginalName
from otfuse.discovery import SpaceGraph, discover
from otfuse.errors import DataError, OtfuseError
from otfuse.config import FusionConfig
from otfuse.config import resolve as resolve_config
from otfuse.recipes import resolve
from otfuse.refinement import (
    RefinementLog,
    align_to_average,
    align_to_consensus,
    apply_plans,
    refine_plans,
)
from otfuse.repair import REPAIRS, RepairName, apply_repair
from otfuse.synthesis import can_synthesize, synthesize_inputs
from otfuse.transport import SolverName, TransportPlan

StateDict = dict[str, torch.Tensor]


@dataclass
class FusionResult:
    """What :func:`fuse` returns.

    Attributes:
        model: the fused model, a plain ``nn.Module`` of the anchor's architecture.
        plans: for each input model, its plan per space name (empty for the anchor).
        weights: the normalised weight of each model in the average.
        anchor: index of the anchor model.
        seconds: wall-clock time of the whole fusion.
        spaces: the anchor's neuron spaces.
        options: the alignment settings used.
        timings: seconds per stage.
        refinement: objective logs of refinement (per model index, and ``"average"``), when used.
        settings: every fusion option used, with the recipe they came from.
    """

    model: nn.Module
    plans: list[dict[str, TransportPlan]]
    weights: list[float]
    anchor: int
    seconds: float
    spaces: SpaceGraph
    options: AlignOptions
    timings: dict[str, float] = field(default_factory=dict)
    refinement: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    config: FusionConfig | None = None
    inputs: str = "none"  # where the sample came from: "data", "synthesized" or "none"
    selection: dict[str, float] = field(default_factory=dict)  # candidate label -> KL to ensemble
    selected: str | None = None  # the chosen candidate's label

    def costs(self) -> list[dict[str, float]]:
        """Transport cost <T, C> per model and space."""
        return [{name: plan.value for name, plan in plans.items()} for plans in self.plans]


@dataclass
class Prepared:
    """Models checked, traced, and (for ``acts``) their activations on a shared sample."""

    models: list[nn.Module]
    graphs: list[SpaceGraph]
    states: list[StateDict]
    activations: list[dict[int, torch.Tensor]] | None
    sample: torch.Tensor | None
    example_input: torch.Tensor | tuple

    def activation_pair(self, b: int, a: int) -> tuple:
        if self.activations is None:
            return None, None
        return self.activations[b], self.activations[a]


def prepare(
    models: Sequence[nn.Module],
    options: AlignOptions,
    *,
    data: object = None,
    example_input: torch.Tensor | tuple | None = None,
) -> Prepared:
    """Check the inputs, trace every model and collect activations when the mode needs them."""
    options.check()
    models = check_models(models)
    sample = sample_inputs(data, options.num_samples, options.seed) if data is not None else None
    if options.mode == "acts" and sample is None:
        raise DataError("mode='acts' needs data: pass data=<inputs> (a tensor or a dataset)")
    example = resolve_example_input(models[0], example_input, sample)
    graphs = [discover(m, example) for m in models]
    for g in graphs[1:]:
        check_compatible(g, graphs[0])
    states = [m.state_dict() for m in models]
    acts = None
    if options.mode == "acts":
        acts = [
            collect_activations(g, sample, point=options.activations, seed=options.seed)
            for g in graphs
        ]
    return Prepared(models, graphs, states, acts, sample, example)


def check_models(models: Sequence[nn.Module]) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):
        raise OtfuseError("models must be a list of nn.Module")
    models = list(models)
    if len(models) < 2:
        raise OtfuseError(f"fusion needs at least two models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise OtfuseError(f"model {i} is a {type(m).__name__}, not an nn.Module")
        for name, value in m.state_dict().items():
            # a sum is finite iff every entry is (barring overflow, which the exact check rules out)
            if value.is_floating_point() and not torch.isfinite(value.sum()):
                if not torch.isfinite(value).all():
                    raise OtfuseError(f"model {i} has NaN or Inf values in '{name}'")
    return models


def sample_inputs(data: object, n: int, seed: int) -> torch.Tensor:
    """A seeded sample of at most ``n`` inputs from a tensor, a dataset with ``.images``, or batches."""
    if hasattr(data, "images"):
        data = data.images
    if not isinstance(data, torch.Tensor):
        data = _take_batches(data, n)
    if data.ndim == 0 or len(data) == 0:
        raise DataError("data holds no inputs")
    if len(data) > n:
        gen = torch.Generator().manual_seed(seed)
        data = data[torch.randperm(len(data), generator=gen)[:n]]
    return data


def _take_batches(data: object, n: int) -> torch.Tensor:
    if not isinstance(data, Iterable):
        raise DataError(
            f"data must be a tensor, a dataset or batches of inputs, not {type(data).__name__}"
        )
    parts, total = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise DataError(f"data batches must hold tensors, not {type(x).__name__}")
        parts.append(x)
        total += len(x)
        if total >= n:
            break
    if not parts:
        raise DataError("data holds no inputs")
    return torch.cat(parts)


def resolve_example_input(
    model: nn.Module, example_input: torch.Tensor | tuple | None, sample: torch.Tensor | None
) -> torch.Tensor | tuple:
    if example_input is not None:
        return example_input
    if sample is not None:
        return sample[:2]
    in_shape = getattr(model, "otfuse_config", {}).get("in_shape")
    if in_shape is not None:
        return torch.zeros(2, *in_shape)
    raise OtfuseError(
        "pass example_input=<a tensor the models accept> (or data) so otfuse can trace them"
    )


def normalise_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    weights = [float(w) for w in weights]
    if len(weights) != k:
        raise OtfuseError(f"got {len(weights)} weights for {k} models")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise OtfuseError("weights must be non-negative and sum to a positive number")
    total = sum(weights)
    return [w / total for w in weights]


def average_states(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict
) -> StateDict:
    """Weighted average of floating-point entries; other entries (counters) come from ``reference``."""
    out = {}
    for key, ref in reference.items():
        if ref.is_floating_point():
            out[key] = sum(w * s[key].to(ref.dtype) for w, s in zip(weights, states))
        else:
            out[key] = ref.clone()
    return out


def build_model(template: nn.Module, state: StateDict) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def fuse(
    models: Sequence[nn.Module],
    config: FusionConfig | str | None = None,
    *,
    data: object = None,
    example_input: torch.Tensor | tuple | None = None,
    progress: bool = False,
    **overrides: object,
) -> FusionResult:
    """Fuse K >= 2 models of one architecture family into one model of the anchor's architecture.

    ``config`` (a :class:`~otfuse.config.FusionConfig` or a recipe name; default: the ``data``
    recipe when ``data`` is given, else ``data-free``) with ``overrides`` (its field names) applied.
    """
    start = time.perf_counter()
    cfg = resolve_config(config, data is not None, overrides)
    settings = _legacy_settings(cfg)
    over = {k: v for k, v in overrides.items() if v is not None and k != "recipe"}
    if "stages" in over:
        over["repair"] = settings["repair"]
        del over["stages"]
    over = {k: v for k, v in over.items() if k not in ("weights", "anchor", "candidates")}
    weights, anchor = cfg.weights, cfg.anchor
    if data is None and settings["synthesize"]:
        data, settings = _synthetic_data(models, example_input, settings, over, progress)
    request = _Request(models, weights, anchor, data, example_input, progress, start)
    if settings.get("select") and data is not None:
        result = _fuse_selected(request, settings)
    else:
        result = _fuse_with(request, settings)
    result.config = cfg
    result.inputs = "synthesized" if settings.get("data") == "synthesized" else ("data" if data is not None else "none")
    result.selection = dict(result.settings.get("selection_kl", {}))
    result.selected = result.settings.get("selected")
    return result


def _legacy_settings(cfg: FusionConfig) -> dict:
    stages = tuple(cfg.stages)
    repair = {(): "none", ("bn_reset",): "bn", ("bn_reset", "repair"): "repair"}.get(stages, "refit")
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("stages", "candidates", "weights", "anchor")}
    d.update(repair=repair, select=tuple(cfg.candidates) or None)
    return d


def _synthetic_data(
    models: Sequence[nn.Module],
    example_input: torch.Tensor | tuple | None,
    settings: dict,
    overrides: dict,
    progress: bool,
) -> tuple[torch.Tensor | None, dict]:
    """Inputs synthesised from the models (:mod:`otfuse.synthesis`) and the ``data`` recipe's
    options, with the caller's overrides, to fuse on them (the recipe's name is kept); or None and
    ``settings`` unchanged when the models allow no synthesis."""
    models = check_models(models)
    try:
        example = resolve_example_input(models[0], example_input, None)
    except OtfuseError:
        return None, settings  # prepare() reports the missing example input
    if not can_synthesize(models, example):
        return None, settings
    n = settings["synthesize"]
    inputs = synthesize_inputs(
        models, example, num_samples=n, seed=settings["seed"], progress=progress
    )
    data_settings = resolve("data", True, **overrides)
    data_settings.update(recipe=settings["recipe"], synthesize=n, num_samples=n, data="synthesized")
    return inputs, data_settings


@dataclass
class _Request:
    """The inputs of one :func:`fuse` call, apart from the fusion options."""

    models: Sequence[nn.Module]
    weights: Sequence[float] | None
    anchor: int
    data: object
    example_input: torch.Tensor | tuple | None
    progress: bool
    start: float


def _fuse_with(request: _Request, settings: dict) -> FusionResult:
    """Fuse with one fully resolved set of options (the body of :func:`fuse`)."""
    models, weights, anchor, data = request.models, request.weights, request.anchor, request.data
    options = AlignOptions(*(settings[f] for f in ALIGN_FIELDS))
    if settings["repair"] not in REPAIRS:
        raise OtfuseError(
            f"unknown repair '{settings['repair']}'; choose one of {', '.join(REPAIRS)}"
        )
    prepared = prepare(models, options, data=data, example_input=request.example_input)
    k = len(prepared.models)
    if not 0 <= anchor < k:
        raise OtfuseError(f"anchor must be an index in 0..{k - 1}, got {anchor}")
    if settings["repair"] != "none" and prepared.sample is None:
        raise DataError(
            f"repair='{settings['repair']}' needs data: pass data=<inputs> (a tensor or a dataset)"
        )
    w = normalise_weights(weights, k)
    sweeps = settings["max_sweeps"]
    aligned, plans, logs = _align_all(
        prepared, anchor, options, settings["refine"], sweeps, request.progress
    )
    if settings["to_average"] and k > 2:
        aligned, plans, logs["average"] = _realign_to_average(
            prepared, anchor, w, aligned, plans, options, sweeps
        )
    fused = build_model(
        prepared.models[anchor], average_states(aligned, w, prepared.states[anchor])
    )
    aligned_at = time.perf_counter()
    if settings["repair"] != "none":
        targets = _function_preserving(prepared, anchor, aligned, plans, settings["outgoing"])
        parents = [build_model(prepared.models[anchor], s) for s in targets]
        apply_repair(settings["repair"], fused, parents, w, prepared.sample, prepared.example_input)
    end = time.perf_counter()
    timings = {"align_and_average": aligned_at - request.start, "repair": end - aligned_at}
    return FusionResult(
        fused,
        plans,
        w,
        anchor,
        end - request.start,
        prepared.graphs[anchor],
        options,
        timings,
        logs,
        dict(settings),
    )


def _realign_to_average(
    prepared: Prepared,
    anchor: int,
    weights: list[float],
    aligned: list[StateDict],
    plans: list[dict[str, TransportPlan]],
    options: AlignOptions,
    max_rounds: int,
) -> tuple[list[StateDict], list[dict[str, TransportPlan]], RefinementLog]:
    """K > 2: re-align every model to the running average of the aligned models, by their
    activations when the mode collected them (the consensus), else by their weights."""
    if prepared.activations is not None:
        return align_to_consensus(
            prepared.states,
            prepared.graphs,
            anchor,
            weights,
            prepared.activations,
            aligned,
            plans,
            options,
            max_rounds=max_rounds,
        )
    return align_to_average(
        prepared.states,
        prepared.graphs,
        anchor,
        weights,
        aligned,
        plans,
        options,
        max_rounds=max_rounds,
        average=lambda states, ws: average_states(states, ws, prepared.states[anchor]),
    )


def _function_preserving(
    prepared: Prepared,
    anchor: int,
    aligned: list[StateDict],
    plans: list[dict[str, TransportPlan]],
    outgoing: str,
) -> list[StateDict]:
    """The aligned models as repair and refit targets: models that compute what the parents compute.

    Across widths, the paper's averaging rule for outgoing weights scales a split or merged unit's
    contribution to the next layer, so the aligned state no longer computes its model's function;
    transporting with ``outgoing="sum"`` by the same plans does (exactly for duplicated units).
    With equal widths (permutations) the two rules agree and ``aligned`` is returned as it is.
    """
    sizes_a = prepared.graphs[anchor].sizes
    if outgoing == "sum" or all(g.sizes == sizes_a for g in prepared.graphs):
        return aligned
    targets = []
    for i, (state, graph) in enumerate(zip(prepared.states, prepared.graphs)):
        if i == anchor:
            targets.append(aligned[i])
            continue
        by_index = {s.index: plans[i][s.name] for s in graph.transportable()}
        targets.append(apply_plans(state, graph, sizes_a, by_index, outgoing="sum")[0])
    return targets


def _fuse_selected(request: _Request, settings: dict) -> FusionResult:
    """Fuse once per candidate of ``settings["select"]`` and keep the fused model closest to the
    parents' prediction ensemble on the unlabeled sample (smallest mean KL divergence):

    .. math::

        \mathrm{KL}(\bar p \,\Vert\, p_{\text{fused}}), \qquad \bar p = \sum_k w_k\, p_k .

    Only unlabeled inputs are used: the ensemble is the teacher.
    """
    models = check_models(request.models)
    sample = sample_inputs(request.data, settings["num_samples"], settings["seed"])
    base = {k: v for k, v in settings.items() if k not in ("select", "recipe")}
    probs = [_log_probs(m, sample) for m in models]
    if any(p is None for p in probs):  # outputs that are not one logits tensor: no teacher
        return _fuse_with(request, {**settings, "select": None})
    w = normalise_weights(request.weights, len(models))
    target = torch.log(sum(wk * p.exp() for wk, p in zip(w, probs)).clamp_min(1e-30))
    best, scores = None, {}
    for candidate in settings["select"]:
        options = {**base, **candidate}
        result = _fuse_with(replace(request, start=time.perf_counter()), options)
        fused = _log_probs(result.model, sample)
        score = float((target.exp() * (target - fused)).sum(-1).mean())
        scores[_label(candidate)] = score
        if best is None or score < best[0]:
            best = (score, result, candidate)
    _, result, chosen = best
    result.settings = {**settings, **chosen, "selected": _label(chosen), "selection_kl": scores}
    result.seconds = time.perf_counter() - request.start
    return result


def _log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Log-softmax of ``model``'s output in eval mode (its mode is restored), or None when the
    output is not a single tensor."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    return torch.log_softmax(out, dim=-1) if isinstance(out, torch.Tensor) else None


def _label(candidate: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in candidate.items())


def _align_all(
    prepared: Prepared,
    anchor: int,
    options: AlignOptions,
    refine: bool,
    max_sweeps: int,
    progress: bool = False,
) -> tuple[list[StateDict], list[dict[str, TransportPlan]], dict]:
    """Align every model to the anchor (greedy pass, then optional weight-matching refinement)."""
    aligned, plans, logs = [], [], {}
    states = tqdm(prepared.states, desc="align", unit="model", disable=not progress, leave=False)
    for i, state in enumerate(states):
        if i == anchor:
            aligned.append(state)
            plans.append({})
            continue
        args = (state, prepared.graphs[i], prepared.states[anchor], prepared.graphs[anchor])
        aligned_state, space_plans = align_state(
            *args, options, *prepared.activation_pair(i, anchor)
        )
        if refine:
            aligned_state, space_plans, logs[i] = refine_plans(
                *args, space_plans, options, max_sweeps=max_sweeps
            )
        aligned.append(aligned_state)
        plans.append(space_plans)
    return aligned, plans, logs


def align(
    model: nn.Module,
    anchor: nn.Module,
    *,
    mode: Mode = "wts",
    solver: SolverName = "auto",
    cost: CostName = "euclidean",
    marginals: MarginalName = "uniform",
    data: object = None,
    example_input: torch.Tensor | tuple | None = None,
    reg: float = 0.01,
    activations: ActivationPoint = "pre",
    num_samples: int = 200,
    seed: int = 0,
    outgoing: str = "average",
) -> nn.Module:
    """A copy of ``model`` transported into ``anchor``'s widths and unit order.

    Args:
        model: the model B to align; not modified.
        anchor: the model A to align to; the result has its architecture and widths.
        mode: ``wts`` (data-free: costs from incoming weights, with the past correction) or ``acts``
            (costs from activations on a seeded sample of ``num_samples`` rows of ``data``).
        solver: ``auto`` (assignment when widths are equal and marginals uniform, else exact),
            ``exact`` (network simplex), ``sinkhorn`` (entropic, with ``reg``) or ``assignment``.
        cost: ground metric: ``euclidean``, ``sqeuclidean``, ``cosine`` or ``correlation``.
        marginals: ``uniform``, ``l1`` or ``l2`` (mass proportional to each unit's weight norm).
        data: inputs (N, ...) for ``acts`` (a tensor, a dataset with ``.images`` or batches); also
            gives the example input when that is None.
        example_input: an input the models accept, e.g. shape (2, 3, 32, 32), for tracing.
        reg: Sinkhorn's entropic regularisation, relative to the largest cost.
        activations: ``pre`` (layer outputs) or ``post`` (after the nonlinearity), for ``acts``.
        num_samples, seed: size and seed of the activation sample.
        outgoing: ``average`` (the paper: a merged unit's outgoing weights are averaged) or ``sum``
            (they are split, which keeps the next layer's input scale across widths).

    Returns:
        A new module of the anchor's architecture holding B's aligned parameters. With equal widths and
        hard plans it computes exactly what ``model`` computes.
    """
    options = AlignOptions(
        mode, solver, cost, marginals, reg, activations, num_samples, seed, outgoing
    )
    prepared = prepare([anchor, model], options, data=data, example_input=example_input)
    state, _ = align_state(
        prepared.states[1],
        prepared.graphs[1],
        prepared.states[0],
        prepared.graphs[0],
        options,
        *prepared.activation_pair(1, 0),
    )
    return build_model(anchor, state)


def vanilla_average(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None
) -> nn.Module:
    """Parameter-wise weighted average with no alignment (the baseline that OT fusion improves on)."""
    models = check_models(models)
    states = [m.state_dict() for m in models]
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != states[0].keys() or any(s[k].shape != v.shape for k, v in states[0].items()):
            raise OtfuseError(
                f"vanilla averaging needs identical shapes; model {i} differs from model 0"
            )
    return build_model(
        models[0], average_states(states, normalise_weights(weights, len(models)), states[0])
    )


class PredictionEnsemble(nn.Module):
    """Weighted average of the members' softmax outputs; ``forward`` returns its logarithm, so
    ``argmax`` gives the ensemble's prediction and ``cross_entropy`` its loss."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(check_models(models))
        self.register_buffer("weights", torch.tensor(normalise_weights(weights, len(self.members))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(w * torch.softmax(m(x), dim=-1) for w, m in zip(self.weights, self.members))
        return torch.log(probs.clamp_min(1e-30))


def ensemble(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None
) -> PredictionEnsemble:
    """The prediction ensemble of ``models`` (K times the parameters and inference cost)."""
    return PredictionEnsemble(models, weights)
