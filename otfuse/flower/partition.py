"""Splitting a labelled training set among federated clients: IID, Dirichlet over labels, skill.

* ``iid``: a seeded random permutation cut into ``k`` nearly equal parts.
* ``dirichlet``: each class divided among the clients in proportions
  :math:`q_c \\sim \\operatorname{Dir}(\\alpha \\mathbf{1}_k)`
  (:func:`otfuse.experiments.splits.dirichlet_split`); small ``alpha`` (0.1) gives each client a few
  classes, large ``alpha`` (100) is close to IID.
* ``skill``: the paper's skill-transfer split (Singh & Jaggi 2020, section 5.2) for two clients:
  client 0 holds every example of ``special`` and a fraction ``frac_others`` of the others, client 1
  the rest (:func:`otfuse.data.split_special_class`).

Nothing here needs Flower. :func:`client_dataset` is what a ``ClientApp`` calls with its
``partition-id`` and ``num-partitions``: the same seed gives every client the same split, so each
one can compute its own part without talking to the others.

>>> parts = partition(train.labels, 10, "dirichlet", alpha=0.5, seed=0)
>>> [len(p) for p in parts]  # sorted index tensors covering every example once
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from otfuse.data import Dataset, load_dataset, split_special_class
from otfuse.errors import OtfuseError
from otfuse.experiments.splits import dirichlet_split

__all__ = ["SCHEMES", "PartitionError", "Scheme", "client_dataset", "partition"]

Scheme = Literal["iid", "dirichlet", "skill"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "skill")


class PartitionError(OtfuseError):
    """A partition cannot be made as asked (unknown scheme, bad client count or alpha)."""


def partition(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    num_clients: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    special: int = 4,
    frac_others: float = 0.1,
) -> list[torch.Tensor]:
    """Split example indices among ``num_clients`` clients.

    Args:
        labels: class of every example, shape (N,).
        num_clients: number of clients k (at least 1; ``skill``: exactly 2).
        scheme: ``iid``, ``dirichlet`` or ``skill`` (see the module docstring).
        alpha: Dirichlet concentration (> 0), for ``dirichlet``.
        seed: seeds the permutation / proportions.
        special: the special class, for ``skill``.
        frac_others: share of the other classes client 0 gets, for ``skill``.

    Returns:
        ``num_clients`` sorted int64 tensors of indices, shapes (n_1,), ..., (n_k,), that together
        hold every index in ``range(N)`` exactly once.
    """
    labels = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if scheme not in SCHEMES:
        raise PartitionError(
            f"unknown partition scheme '{scheme}'; choose one of {', '.join(SCHEMES)}"
        )
    if not isinstance(num_clients, int) or num_clients < 1 or num_clients > len(labels):
        raise PartitionError(f"cannot split {len(labels)} examples among {num_clients} clients")
    if scheme == "iid":
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        return [part.sort().values for part in torch.tensor_split(order, num_clients)]
    if scheme == "dirichlet":
        if num_clients == 1:
            return [torch.arange(len(labels))]
        if not alpha > 0:
            raise PartitionError(f"the Dirichlet concentration alpha must be positive, not {alpha}")
        return dirichlet_split(labels, num_clients, alpha, seed)
    if num_clients != 2:
        raise PartitionError(f"the skill split has exactly 2 clients, not {num_clients}")
    return list(split_special_class(labels, special, frac_others, seed))


@functools.lru_cache(maxsize=8)
def _cached_parts(
    dataset: str, data_dir: str | None, num_clients: int, scheme: str, alpha: float, seed: int
) -> tuple[torch.Tensor, ...]:
    labels = load_dataset(dataset, "train", data_dir).labels
    return tuple(partition(labels, num_clients, scheme, alpha=alpha, seed=seed))


def client_dataset(
    partition_id: int,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    dataset: str = "fashion-mnist",
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> Dataset:
    """The training examples of client ``partition_id`` out of ``num_partitions``, read from the
    local IDX files (nothing is downloaded). ``limit`` keeps the first ``limit`` training examples
    before splitting (quick runs and tests)."""
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition-id {partition_id} is not in 0..{num_partitions - 1}")
    train = load_dataset(dataset, "train", data_dir)
    key = str(data_dir) if data_dir is not None else None
    if limit is not None and limit < len(train):
        train = train.subset(torch.arange(limit))
        parts = partition(train.labels, num_partitions, scheme, alpha=alpha, seed=seed)
    else:
        parts = _cached_parts(dataset, key, num_partitions, scheme, float(alpha), seed)
    return train.subset(parts[partition_id])
