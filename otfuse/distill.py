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
(``ensemble``), or scaled per input by each parent's confidence (``confident``); with ``average``,
:math:`q = \\operatorname{softmax}(\\sum_k w_k z_k)`. Class scores are the model's output along
its last axis (:func:`otfuse.refit.scores_node`), e.g. a language model's next-token logits per
position. A model whose output is not class scores is fitted to the parents' weighted average
output by mean squared error. Adam with a constant step size on batches of the sample drawn with
the config's seed; the model stays in eval mode (BatchNorm uses its statistics, no dropout).

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

from otfuse.modes import evaluating
from otfuse.refit import CONFIDENCE_SHARPNESS, TargetRule, scores_node

# teachers' outputs over the whole sample are kept when they hold at most this many numbers; above
# it they are recomputed for each batch
CACHED_TARGET_NUMBERS = 1 << 24
# a student this close to its goal on the whole sample (mean KL per row in nats, or squared error
# relative to the goal's mean square) is left as it is: Adam would turn the rounding noise of a
# zero gradient into steps of the full size (e.g. all the weight on one parent, or a model fused
# with itself)
MATCHED = 1e-6


def teacher_log_probs(
    scores: Sequence[torch.Tensor], weights: Sequence[float], targets: TargetRule
) -> torch.Tensor:
    """The log of the distribution ``q`` (the module's docstring) from the parents' class scores
    ``scores[k]`` (..., C), in float32: log softmax of the weighted average logits (``average``),
    or the log of the mixture of their probabilities with the weights (``ensemble``), scaled per
    row by :math:`\\exp(-\\beta H(p_k))` and renormalised (``confident``). Parents with weight 0
    take no part."""
    used = [(z.float(), float(w)) for z, w in zip(scores, weights, strict=True) if w > 0]
    if targets == "average":
        return torch.log_softmax(sum(w * z for z, w in used), dim=-1)
    terms = []
    for z, w in used:
        log_p = torch.log_softmax(z, dim=-1)
        log_w = torch.full_like(log_p[..., :1], torch.log(torch.tensor(w)).item())
        if targets == "confident":
            p = log_p.exp()
            log_w = log_w + CONFIDENCE_SHARPNESS * torch.special.xlogy(p, p).sum(-1, keepdim=True)
        terms.append(log_w + log_p)
    mixture = torch.logsumexp(torch.stack(terms), dim=0)
    return mixture - torch.logsumexp(mixture, dim=-1, keepdim=True)


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor of a model's output: itself, ``logits`` of a mapping (a Hugging Face output),
    else the first tensor of a mapping or a sequence."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"the model's output holds no tensor ({type(output).__name__})")


def distill(
    student: torch.fx.GraphModule,
    teachers: Sequence[torch.fx.GraphModule],
    weights: Sequence[float],
    sample: Any,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    targets: TargetRule = "average",
    seed: int = 0,
) -> list[float]:
    """Train ``student`` (the fused model's graph; its parameters are the fused model's) for
    ``steps`` Adam steps at ``lr`` on batches of ``batch_size`` inputs of ``sample`` (N, ...), a
    tensor or a tuple of tensors, towards its ``teachers``' mixture (the module's docstring).
    Returns the loss of each step (none when the student already matches, :data:`MATCHED`)."""
    count = _count(sample)
    scores = scores_node(student) is not None
    batch_size = min(batch_size, count)
    generator = torch.Generator().manual_seed(seed)
    with evaluating(list(teachers)):
        cached = _teacher_targets(teachers, weights, sample, targets, scores)
        if _mismatch(student, teachers, weights, sample, cached, targets, scores) <= MATCHED:
            return []
        return _train(student, teachers, weights, sample, cached, steps=steps, lr=lr,
                      batch_size=batch_size, targets=targets, scores=scores,
                      generator=generator)  # fmt: skip


def _train(student, teachers, weights, sample, cached, *, steps, lr, batch_size, targets, scores,
           generator) -> list[float]:  # fmt: skip
    count = _count(sample)
    params = [p for p in student.parameters() if p.requires_grad and p.is_floating_point()]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.enable_grad(), evaluating([student]):
        for _ in range(steps):
            index = torch.randperm(count, generator=generator)[:batch_size]
            batch = _rows(sample, index)
            goal = (
                cached[index]
                if cached is not None
                else _goal(teachers, weights, batch, targets, scores)
            )
            out = output_tensor(student(batch))
            loss = _loss(out, goal.to(out.device), scores)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    for p in params:
        p.grad = None
    return losses


@torch.no_grad()
def _mismatch(student, teachers, weights, sample, cached, targets, scores) -> float:
    """The student's loss on the whole sample (relative to the goal's mean square without class
    scores)."""
    total, size, count = 0.0, 0.0, _count(sample)
    with evaluating([student]):
        for index in torch.arange(count).split(256):
            batch = _rows(sample, index)
            goal = (
                cached[index]
                if cached is not None
                else _goal(teachers, weights, batch, targets, scores)
            )
            out = output_tensor(student(batch))
            total += float(_loss(out, goal.to(out.device), scores)) * len(index)
            size += float(goal.float().pow(2).mean()) * len(index) if not scores else len(index)
    return total / max(size, 1e-30)


def _loss(out: torch.Tensor, goal: torch.Tensor, scores: bool) -> torch.Tensor:
    if not scores:
        return F.mse_loss(out.float(), goal)
    log_q = torch.log_softmax(out.float(), dim=-1).reshape(-1, out.shape[-1])
    goal = goal.reshape(-1, out.shape[-1])
    return F.kl_div(log_q, goal, reduction="batchmean", log_target=True)


@torch.no_grad()
def _goal(teachers, weights, batch, targets: TargetRule, scores: bool) -> torch.Tensor:
    """What the student is fitted to on ``batch``: the teachers' log mixture, or their weighted
    average output."""
    outs = [output_tensor(t(batch)) for t in teachers]
    if scores:
        return teacher_log_probs(outs, weights, targets)
    return sum(float(w) * o.float() for o, w in zip(outs, weights, strict=True))


def _teacher_targets(teachers, weights, sample, targets, scores) -> torch.Tensor | None:
    """The goal on the whole sample, computed in chunks, when it is small enough to keep."""
    first = _goal(teachers, weights, _rows(sample, torch.arange(min(2, _count(sample)))), targets,
                  scores)  # fmt: skip
    per_row = first[0].numel()
    if per_row * _count(sample) > CACHED_TARGET_NUMBERS:
        return None
    chunks = torch.arange(_count(sample)).split(256)
    return torch.cat([_goal(teachers, weights, _rows(sample, c), targets, scores) for c in chunks])


def _count(sample: Any) -> int:
    return len(sample[0] if isinstance(sample, tuple) else sample)


def _rows(sample: Any, index: torch.Tensor) -> Any:
    if isinstance(sample, tuple):
        return tuple(s[index.to(s.device)] for s in sample)
    return sample[index.to(sample.device)]
