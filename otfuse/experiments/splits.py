"""Non-i.i.d. splits of a labelled training set among K parents, for the skill-transfer experiment.

* :func:`dirichlet_split`: each class's examples divided among K parents in proportions drawn from
  a symmetric Dirichlet distribution (Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019). A small concentration (0.1) gives each
  parent most of the examples of a few classes and almost none of the others.

(The two-parent split of the paper, one special class against the rest, is
:func:`otfuse.data.split_special_class`.)

>>> parts = dirichlet_split(train.labels, k=4, alpha=0.1, seed=0)
>>> [len(p) for p in parts]  # sorted index tensors that together cover every example once
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from otfuse.errors import OtfuseError


def dirichlet_split(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    k: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[torch.Tensor]:
    """Split example indices among ``k`` parents, class by class, in Dirichlet proportions.

    For every class :math:`c`, proportions :math:`q_c \\sim \\operatorname{Dir}(\\alpha \\mathbf{1}_k)`
    are drawn and the class's examples (shuffled) are cut into ``k`` consecutive pieces of sizes
    :math:`\\approx q_c \\, n_c`. Draws are repeated (at most ``max_tries`` times, same seed stream)
    until every parent has at least ``min_size`` examples.

    Args:
        labels: class of every example, shape (N,).
        k: number of parents (at least 2).
        alpha: concentration (> 0); small values give skewed splits.
        seed: seeds the proportions and the shuffling.

    Returns:
        ``k`` sorted int64 tensors of indices, shapes (n_1,), ..., (n_k,), that together hold every
        index in ``range(N)`` exactly once.
    """
    if k < 2 or not alpha > 0:
        raise OtfuseError(f"a Dirichlet split needs k >= 2 parents and alpha > 0, not {k}, {alpha}")
    labels = np.asarray(labels).reshape(-1)
    if len(labels) < k * min_size:
        raise OtfuseError(f"{len(labels)} examples cannot give {k} parents {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(members)).round()
            for i, piece in enumerate(np.split(members, cuts[:-1].astype(int))):
                parts[i].append(piece)
        split = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in split) >= min_size:
            return [torch.from_numpy(p).long() for p in split]
    raise OtfuseError(
        f"no Dirichlet({alpha}) split in {max_tries} draws gave each of {k} parents "
        f"{min_size} examples; raise alpha or lower min_size"
    )


def class_counts(
    labels: torch.Tensor, parts: Sequence[torch.Tensor], classes: int
) -> list[list[int]]:
    """How many examples of each class each part holds: ``k`` lists of ``classes`` counts."""
    return [torch.bincount(labels[p], minlength=classes).tolist() for p in parts]
