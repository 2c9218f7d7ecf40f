"""The coverage mixture: each parent trusted on the classes it was trained on.

Parents trained on different data (skill transfer, federated clients with their own labels) do not
know the same classes. A parent that never saw class ``c`` still gives every input a distribution
over all classes: it is, in effect, the distribution *given that the class is one it knows*. The
prediction ensemble treats it as a full distribution, so a confident "not this class" from a parent
that cannot know the class outvotes the one parent that does. Given how many examples of each class
every parent was trained on, :math:`n_k(c)` (``class_counts``), the coverage mixture
(``targets="coverage"``) combines them as follows.

1. Each parent's probabilities are moved to the pooled label prior (the standard correction for
   label shift, Saerens, Latinne & Decaestecker, Neural Computation 2002):

   .. math::

       P_k(c \\mid x) \\propto \\operatorname{softmax}(z_k(x))_c \\,
           \\frac{\\pi(c)}{\\pi_k(c)}, \\qquad
       \\pi_k(c) = \\frac{n_k(c) + 1}{N_k + C}, \\qquad
       \\pi(c) = \\frac{\\sum_k n_k(c) + 1}{\\sum_k N_k + C},

   over the parents with a positive weight (one parent alone keeps its own probabilities), so a
   specialist trained mostly on one class stops calling everything that class.
2. Parent k knows class c to the degree :math:`r_k(c) = n_k(c) / (n_k(c) + m)`, ``m`` =
   :data:`PSEUDO_COUNT` examples (a class seen ``m`` times is half known, one never seen not at
   all; a class that none of the parents saw counts as known to all, :math:`r_k(c) = 1`), and weighs each input by its weight and its confidence, :math:`a_k(x) = w_k \\exp(-\\beta
   H(P_k(x)))` (:data:`otfuse.refit.CONFIDENCE_SHARPNESS`, as ``targets="confident"``).
3. The mixture :math:`p` is the fixed point of

   .. math::

       p(c \\mid x) \\propto
           \\frac{\\sum_k a_k(x)\\, r_k(c)\\, M_k(x)\\, P_k(c \\mid x)}{\\sum_k a_k(x)\\, r_k(c)},
       \\qquad M_k(x) = \\sum_{c'} r_k(c')\\, p(c' \\mid x),

   each parent's probability of a class scaled by the mass :math:`M_k` that the mixture puts on the
   classes the parent knows, and averaged over the parents that know the class. A class one parent
   alone knows takes that parent's probability; with equal counts for every parent it is the
   confident mixture exactly (the first step reaches the fixed point), and a parent alone (the
   others' weights 0) keeps its own probabilities.

Measured on the skill-transfer experiment's parents (accuracy of the mixture on the test set;
``otfuse experiment skill-transfer`` fuses towards it): coat at w_A 0.1 / 0.5 / 0.9, 88.22 /
87.73 / 86.78% (recall 83%) against the prediction ensemble's 82.60 / 87.76 / 83.88% and the
confident mixture's 85.34 / 87.91 / 86.71%; four Dirichlet(0.1) parents, 81.83% with equal weights
(ensemble 81.67%, confident 78.47%).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from otfuse.errors import OtfuseError

# examples of a class at which a parent counts as knowing it half (step 2 of the module's docstring)
PSEUDO_COUNT = 50.0
# fixed-point steps (3.); the mixture changes by less than 1e-6 after about ten on the
# skill-transfer and Dirichlet parents
ITERATIONS = 30
# the least probability of a class in the mixture (where float64 underflows to 0): a finite log
# for refit's regression and distill's KL targets
UNSEEN = 1e-300


class ClassCountsError(OtfuseError):
    """``class_counts`` do not fit the models or their class scores."""


def check_counts(
    counts: Sequence[Sequence[float]], models: int, classes: int | None = None
) -> None:
    """Raise :class:`ClassCountsError` unless ``counts`` has a row per model and, given
    ``classes``, a column per class score, with some examples of some class in every row."""
    if len(counts) != models:
        raise ClassCountsError(
            f"class_counts has {len(counts)} row(s), one per model is needed ({models} models)"
        )
    if classes is not None and any(len(row) != classes for row in counts):
        raise ClassCountsError(
            f"class_counts has {len(counts[0])} column(s) but the models give {classes} class "
            "scores"
        )
    for k, row in enumerate(counts):
        if sum(row) <= 0:
            raise ClassCountsError(f"class_counts: model {k} has no examples of any class")


def coverage_log_probs(
    scores: Sequence[torch.Tensor],
    weights: Sequence[float],
    counts: Sequence[Sequence[float]],
    sharpness: float,
    *,
    pseudo_count: float = PSEUDO_COUNT,
    iterations: int = ITERATIONS,
) -> torch.Tensor:
    """The log of the coverage mixture (..., C), float64, from the parents' class scores
    ``scores[k]`` (..., C), their ``weights`` (positive) and ``counts[k][c]``, the examples of class
    c that parent k was trained on (the module's docstring)."""
    n = torch.as_tensor(counts, dtype=torch.float64, device=scores[0].device)  # (K, C)
    prior_k = (n + 1) / (n + 1).sum(-1, keepdim=True)
    prior = (n.sum(0) + 1) / (n.sum() + n.shape[1])
    shape = (len(scores),) + (1,) * (scores[0].dim() - 1) + (n.shape[1],)
    log_shift = (prior.log() - prior_k.log()).reshape(shape)  # (K, 1.., C)
    probs = torch.softmax(torch.stack([z.double() for z in scores]) + log_shift, dim=-1)
    entropy = -torch.special.xlogy(probs, probs).sum(-1, keepdim=True)  # (K, ..., 1)
    w = torch.as_tensor(weights, dtype=torch.float64, device=n.device).reshape(shape[:-1] + (1,))
    trust = w * torch.exp(-sharpness * entropy)  # a_k(x), (K, ..., 1)
    knows = torch.where(n.sum(0) > 0, n / (n + pseudo_count), 1.0).reshape(shape)  # r_k(c)
    share = trust * knows
    norm = share.sum(0)
    share = share / torch.where(norm > 0, norm, torch.ones_like(norm))
    mixture = (trust * probs).sum(0) / trust.sum(0)
    for _ in range(iterations):
        mass = (mixture.unsqueeze(0) * knows).sum(-1, keepdim=True)  # M_k(x), (K, ..., 1)
        mixture = (share * mass * probs).sum(0)
        mixture = mixture / mixture.sum(-1, keepdim=True)
    return mixture.clamp_min(UNSEEN).log()
