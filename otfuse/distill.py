"""Distillation of the fused model into its parents' mixture on the unlabeled sample.

Refit (:mod:`otfuse.refit`) fits one layer at a time in closed form; what one layer cannot hold
(a mixture of two parents' predictions, which is not linear in the fused model's features) is
lost. ``distill`` then trains the whole fused model for a few steps, with no labels, towards the
distribution that refit's class scores aim at (Lin et al., "Ensemble Distillation for Robust Model
Fusion in Federated Learning", NeurIPS 2020, distil an ensemble into a fused model this way):

.. math::

    \\min_\\theta \\; \\frac{1}{|B|} \\sum_{x \\in B} \\mathrm{KL}\\big(q(x) \\,\\|\\,
        \\operatorname{softmax} f_\\theta(x)\\big),
    \\qquad q(x) = \\sum_k \\pi_k(x) \\operatorname{softmax}(z_k(x)),

with the mixture weights of ``targets`` (:func:`teacher_log_probs`): the weights themselves
(``ensemble``), or scaled per input by each parent's confidence (``confident``), or the coverage
mixture of the parents' class counts (``coverage``, :mod:`otfuse.coverage`). Class scores are
the last axis of the model's output (N, ..., C) when an ``nn.Linear`` computes it, e.g. a language
model's next-token logits per position. With ``targets="average"``, or an output that is not
class scores, the model is fitted instead to the parents' weighted average output
:math:`\\sum_k w_k z_k` by mean squared error (refit's own target; logit matching for a
classifier). Adam with a constant step size on batches of the sample drawn with the config's
seed, on float32 copies of half-precision parameters; every floating-point parameter of the fused
model is trained (frozen ones too, their flags restored afterwards); the model stays in eval mode
(BatchNorm keeps its statistics, no dropout).

It needs many more inputs than the layer-wise stages: on the skill-transfer experiment's MLPs,
300 steps on 5,000 unlabeled images gain 0.1-0.5 points over refit on the same images (w_A 0.5 to
0.9); on the data recipe's 400 they over-fit (up to 0.4 points lost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from otfuse.coverage import check_counts, mixture_of_parents
from otfuse.modes import evaluating
from otfuse.refit import (
    CONFIDENCE_SHARPNESS,
    ClassCounts,
    TargetRule,
    linear_scores,
    mixture_term,
)
from otfuse.synthesis import scores_of

# teachers' outputs over the whole sample are kept when they hold at most this many numbers; above
# it they are recomputed for each batch
CACHED_TARGET_NUMBERS = 1 << 24
# numbers of one output chunk when the whole sample is run without gradients
CHUNK_NUMBERS = 1 << 22
# a student this close to its goal on the whole sample (mean KL per row in nats, or squared error
# relative to the goal's mean square) is left as it is: Adam would turn the rounding noise of a
# zero gradient into steps of the full size (e.g. all the weight on one parent, or a model fused
# with itself)
MATCHED = 1e-6


def teacher_log_probs(
    scores: Sequence[torch.Tensor],
    weights: Sequence[float],
    targets: TargetRule,
    class_counts: ClassCounts | None = None,
) -> torch.Tensor:
    """The log of the distribution ``q`` (the module's docstring) from the parents' class scores
    ``scores[k]`` (..., C), in float32: log softmax of the weighted average logits (``average``),
    or the log of the mixture of their probabilities with the weights (``ensemble``), scaled per
    row by :math:`\\exp(-\\beta H(p_k))` and renormalised (``confident``), or the coverage
    mixture of ``class_counts`` (a row per parent; ``coverage``, :mod:`otfuse.coverage`). Parents
    with weight 0 take no part."""
    if targets == "coverage":
        return mixture_of_parents(scores, weights, class_counts, CONFIDENCE_SHARPNESS).float()
    used = [(z.float(), float(w)) for z, w in zip(scores, weights, strict=True) if w > 0]
    if targets == "average":
        return torch.log_softmax(sum(w * z for z, w in used), dim=-1)
    sharpness = CONFIDENCE_SHARPNESS if targets == "confident" else 0.0
    mixture = None
    for z, w in used:
        term = mixture_term(z, w, sharpness)
        mixture = term if mixture is None else torch.logaddexp(mixture, term)
    return mixture - torch.logsumexp(mixture, dim=-1, keepdim=True)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor of a model's output: its scores (:func:`otfuse.synthesis.scores_of`: itself, or
    its ``logits``), else the first tensor of a mapping or a sequence (a graph captured by
    ``torch.export`` may return its output in a tuple)."""
    scores = scores_of(output)
    if scores is not None:
        return scores
    values = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(values, (list, tuple)):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"the model's output holds no tensor ({type(output).__name__})")


def distill(
    student: torch.fx.GraphModule,
    parameters: Sequence[torch.nn.Parameter],
    teachers: Sequence[torch.fx.GraphModule],
    weights: Sequence[float],
    sample: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    targets: TargetRule = "average",
    class_counts: ClassCounts | None = None,
    seed: int = 0,
) -> list[float]:
    """Train ``parameters`` (the fused model's, which its graph ``student`` computes with) for
    ``steps`` Adam steps at ``lr`` on batches of ``batch_size`` inputs of ``sample`` (N, ...),
    towards the ``teachers``' mixture (the module's docstring; ``class_counts``, a row per
    teacher, for ``targets="coverage"``). Returns the loss of each step
    (none when the student already matches, :data:`MATCHED`)."""
    if class_counts is not None:
        check_counts(class_counts, len(teachers))
    kept = [k for k, w in enumerate(weights) if w > 0]
    teachers, weights = [teachers[k] for k in kept], [float(weights[k]) for k in kept]
    counts = [class_counts[k] for k in kept] if class_counts is not None else None
    goal = _Goal(teachers, weights, targets, linear_scores(student) is not None, counts)
    with evaluating([student, *teachers]):
        cached = goal.on_sample(sample)
        if _mismatch(student, goal, sample, cached) <= MATCHED:
            return []
        generator = torch.Generator().manual_seed(seed)
        return _train(student, parameters, goal, sample, cached, steps, lr,
                      min(batch_size, len(sample)), generator)  # fmt: skip


class _Goal:
    """What the student is fitted to: the teachers' log mixture on class scores, or their weighted
    average output (``log_probs`` False)."""

    def __init__(self, teachers, weights, targets: TargetRule, scores: bool, counts=None) -> None:
        self.teachers, self.weights, self.targets, self.counts = teachers, weights, targets, counts
        self.log_probs = scores and targets != "average"

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        outs = [output_tensor(t(batch)) for t in self.teachers]
        if self.log_probs:
            return teacher_log_probs(outs, self.weights, self.targets, self.counts)
        return sum(w * o.float() for o, w in zip(outs, self.weights, strict=True))

    def loss(self, out: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """Mean KL(q || softmax(out)) per row, ``goal`` being log q, or the mean squared error."""
        goal = goal.to(out.device)
        if not self.log_probs:
            return F.mse_loss(out.float(), goal)
        log_q = torch.log_softmax(out.float(), dim=-1).reshape(-1, out.shape[-1])
        return F.kl_div(log_q, goal.reshape(-1, out.shape[-1]), reduction="batchmean",
                        log_target=True)  # fmt: skip

    def on_sample(self, sample: torch.Tensor) -> torch.Tensor | None:
        """The goal on the whole sample, computed in chunks, when it is small enough to keep."""
        per_row = self(sample[:1])[0].numel()
        if per_row * len(sample) > CACHED_TARGET_NUMBERS:
            return None
        return torch.cat([self(_pick(sample, i)) for i in _chunks(len(sample), per_row)])


def _chunks(count: int, per_row: int) -> tuple[torch.Tensor, ...]:
    return torch.arange(count).split(max(1, CHUNK_NUMBERS // max(1, per_row)))


@torch.no_grad()
def _mismatch(student, goal: _Goal, sample: torch.Tensor, cached) -> float:
    """The student's loss on the whole sample (relative to the goal's mean square for squared
    error)."""
    total = size = 0.0
    for index in _chunks(len(sample), output_tensor(student(sample[:1]))[0].numel()):
        wanted = _pick(cached, index) if cached is not None else goal(_pick(sample, index))
        out = output_tensor(student(_pick(sample, index)))
        total += float(goal.loss(out, wanted)) * len(index)
        size += len(index) * (1.0 if goal.log_probs else float(wanted.float().pow(2).mean()))
    return total / max(size, 1e-30)


def _pick(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return rows[index.to(rows.device)]


def _train(student, parameters, goal: _Goal, sample, cached, steps, lr, batch_size, generator):
    """Adam on float32 masters of ``parameters`` (the parameters themselves when float32 or
    float64), every parameter's gradient switched on for the loop."""
    params = [p for p in dict.fromkeys(parameters) if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    masters = [
        p if p.dtype in (torch.float32, torch.float64) else p.detach().float() for p in params
    ]
    optimizer = torch.optim.Adam(masters, lr=lr)
    losses = []
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(steps):
                index = torch.randperm(len(sample), generator=generator)[:batch_size]
                batch = _pick(sample, index)
                wanted = _pick(cached, index) if cached is not None else goal(batch)
                loss = goal.loss(output_tensor(student(batch)), wanted)
                for p in params:  # the masters of half-precision ones take theirs in _step
                    p.grad = None
                loss.backward()
                _step(optimizer, params, masters)
                losses.append(loss.detach())
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return [float(v) for v in losses]


@torch.no_grad()
def _step(optimizer: torch.optim.Optimizer, params, masters) -> None:
    """One Adam step on the masters; half-precision parameters take their master's new value."""
    for p, m in zip(params, masters, strict=True):
        if m is not p:
            m.grad = None if p.grad is None else p.grad.float()
    optimizer.step()
    for p, m in zip(params, masters, strict=True):
        if m is not p:
            p.copy_(m)
