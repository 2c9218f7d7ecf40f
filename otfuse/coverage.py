"""The coverage mixture: each parent trusted on the classes it was trained on.

Parents trained on different data (skill transfer, federated clients with their own labels) do not
know the same classes. A parent that never saw class ``c`` still gives every input a distribution
over all classes: it is, in effect, the distribution *given that the class is one it knows*. The
prediction ensemble treats it as a full distribution, so a confident "not this class" from a parent
that cannot know the class outvotes the one parent that does. Given how many examples of each class
every parent was trained on, :math:`n_k(c)` (``class_counts``), the coverage mixture
(``targets="coverage"``) combines them as follows.

1. Each parent's probabilities are restricted to the classes it saw and moved to the pooled label
   prior (the standard correction for label shift, Saerens, Latinne & Decaestecker, Neural
   Computation 2002):

   .. math::

       P_k(c \\mid x) \\propto \\operatorname{softmax}(z_k(x))_c \\,
           \\frac{\\pi(c)}{\\pi_k(c)} \\, [n_k(c) > 0], \\qquad
       \\pi_k(c) = \\frac{n_k(c) + 1}{N_k + C}, \\qquad
       \\pi(c) = \\frac{\\sum_k (n_k(c) + 1)}{\\sum_k (N_k + C)},

   with the counts of the parents with a positive weight (the label distribution of the union of
   their training sets; the weights say whom to trust, not what the data hold, and a parent alone
   keeps its own probabilities), so a specialist trained mostly on one class stops calling
   everything that class, and what a parent says of a class it never saw (noise, which the
   correction would multiply) is dropped. A class none of the parents saw is kept for all of
   them.
2. Parent k knows class c to the degree :math:`r_k(c) = n_k(c) / (n_k(c) + m)`, ``m`` =
   :data:`PSEUDO_COUNT` examples (a class seen ``m`` times is half known; a class none of the
   parents saw counts as known to all, :math:`r_k(c) = 1`), and each input is weighed by the
   parent's weight and its confidence, :math:`a_k(x) = w_k \\exp(-\\beta H(P_k(x)))`
   (:data:`otfuse.refit.CONFIDENCE_SHARPNESS`, as ``targets="confident"``).
3. The mixture :math:`p` is the fixed point of

   .. math::

       p(c \\mid x) \\propto
           \\frac{\\sum_k a_k(x)\\, r_k(c)\\, M_k(x)\\, P_k(c \\mid x)}{\\sum_k a_k(x)\\, r_k(c)},
       \\qquad M_k(x) = \\sum_{c': n_k(c') > 0} p(c' \\mid x),

   reached from the confident mixture :math:`p_0 = \\sum_k a_k P_k / \\sum_k a_k` in
   :data:`ITERATIONS` steps: each parent's probability of a class (given that the class is one
   it saw) is scaled by the mass :math:`M_k` that the mixture puts on the classes the parent saw,
   and averaged over the parents that know the class. A class one parent alone knows takes that
   parent's probability; with equal counts for every parent it is the confident mixture exactly
   (the first step reaches the fixed point), and a parent alone (the others' weights 0) keeps its
   own probabilities. Parents whose classes do not overlap (0-4 and 5-9) keep the split of
   :math:`p_0` between their groups (the step leaves the mass of each group unchanged), so the
   weights and the confidences decide it.

Measured on the skill-transfer experiment's parents (accuracy % of the mixture on the test set /
recall of the special class; ``otfuse experiment skill-transfer`` fuses towards it): coat at w_A
0.1 / 0.5 / 0.8, 88.57 / 88.16 / 87.60 (recall 82-83) against the prediction ensemble's 82.60 /
87.76 / 84.76 and the confident mixture's 85.34 / 87.91 / 87.38; shirt 88.09 / 87.85 / 87.44
(recall 67-68) against 83.97 / 87.14 / 82.91 and 85.32 / 87.33 / 86.89; four Dirichlet(0.1)
parents 80.94 / 79.49 (equal weights / by examples) against 81.67 / 57.98 and 78.47 / 68.74.
Without the restriction of step 1 the recall was higher (shirt 69-71) and the accuracy 0.2-0.5
points lower, and parents of disjoint classes drifted with the number of steps (0-4 / 5-9 at
w_A 0.8: 73.1% after 30 steps, 70.8% after 300; 76.0% with it, either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from otfuse.config import ConfigError

# examples of a class at which a parent counts as knowing it half (step 2 of the module's docstring)
PSEUDO_COUNT = 50.0
# fixed-point steps (3. of the module's docstring)
ITERATIONS = 30
# the least probability of a class in the mixture (where float64 underflows to 0): a finite log
# for refit's regression and distill's KL targets
UNSEEN = 1e-300
# rows (times parents and classes) computed at once: a language model's logits (32k classes,
# thousands of positions) in a few hundred MB
CHUNK_NUMBERS = 1 << 22


class ClassCountsError(ConfigError):
    """``class_counts`` are missing, or do not fit the models or their class scores."""


def check_counts(
    counts: Sequence[Sequence[float]], models: int, classes: int | None = None
) -> None:
    """Raise :class:`ClassCountsError` unless ``counts`` has a row per model and, given
    ``classes``, a column per class score, with some examples of some class in every row."""
    if counts is None:
        raise ClassCountsError(
            "targets=coverage needs class_counts: how many examples of each class each model saw"
        )
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


def mixture_of_parents(
    scores: Sequence[torch.Tensor],
    weights: Sequence[float],
    counts: Sequence[Sequence[float]] | None,
    sharpness: float,
) -> torch.Tensor:
    """:func:`coverage_log_probs` of the parents with a positive weight, after checking that
    ``counts`` has a row per parent and a column per class score."""
    check_counts(counts, len(scores), scores[0].shape[-1])
    used = [(z, float(w), n) for z, w, n in zip(scores, weights, counts, strict=True) if w > 0]
    kept_scores, kept_weights, kept_counts = zip(*used, strict=True)
    return coverage_log_probs(kept_scores, kept_weights, kept_counts, sharpness)


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
    c that parent k was trained on (the module's docstring). Rows are independent: they are
    computed :data:`CHUNK_NUMBERS` numbers at a time."""
    n = torch.as_tensor(counts, dtype=torch.float64, device=scores[0].device)  # (K, C)
    classes = n.shape[1]
    prior_k = (n + 1) / (n + 1).sum(-1, keepdim=True)
    prior = (n + 1).sum(0) / (n + 1).sum()  # one pseudo-example per class and parent
    unseen = n.sum(0) == 0  # by every parent: kept for all
    seen = ((n > 0) | unseen).double()  # (K, C)
    rule = _Rule(
        log_shift=prior.log() - prior_k.log(),
        seen=seen,
        knows=torch.where(unseen, 1.0, n / (n + pseudo_count)),
        weights=torch.as_tensor(weights, dtype=torch.float64, device=n.device),
        sharpness=sharpness,
        iterations=iterations,
    )
    rows = [z.reshape(-1, classes) for z in scores]
    step = max(1, CHUNK_NUMBERS // (len(rows) * classes))
    parts = [
        rule(torch.stack([z[i : i + step] for z in rows])) for i in range(0, len(rows[0]), step)
    ]
    return torch.cat(parts).reshape(scores[0].shape)


@dataclass(frozen=True)
class _Rule:
    """The coverage mixture of the module's docstring for a chunk of rows, tensors (K, C)."""

    log_shift: torch.Tensor  # log pi - log pi_k
    seen: torch.Tensor  # [n_k(c) > 0] (1 for a class no parent saw)
    knows: torch.Tensor  # r_k(c)
    weights: torch.Tensor  # w_k, (K,)
    sharpness: float
    iterations: int

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """log p (rows, C) from the parents' scores (K, rows, C)."""
        probs = (
            torch.softmax(scores.double() + self.log_shift[:, None], dim=-1) * self.seen[:, None]
        )
        probs = probs / probs.sum(-1, keepdim=True)  # P_k, restricted to the classes k saw
        entropy = -torch.special.xlogy(probs, probs).sum(-1, keepdim=True)  # (K, rows, 1)
        trust = self.weights[:, None, None] * torch.exp(-self.sharpness * entropy)  # a_k(x)
        share = trust * self.knows[:, None]  # (K, rows, C)
        norm = share.sum(0)
        weighted = share * probs / torch.where(norm > 0, norm, torch.ones_like(norm))
        mixture = (trust * probs).sum(0) / trust.sum(0)  # p_0, the confident mixture
        for _ in range(self.iterations):
            mass = torch.einsum("rc,kc->kr", mixture, self.seen).unsqueeze(-1)  # M_k(x)
            mixture = (weighted * mass).sum(0)
            mixture = mixture / mixture.sum(-1, keepdim=True)
        return mixture.clamp_min(UNSEEN).log()
