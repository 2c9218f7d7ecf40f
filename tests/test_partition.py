"""otfuse.flower.partition: IID, Dirichlet and skill splits among federated clients (no Flower)."""

from __future__ import annotations

import pytest
import torch

from otfuse.flower.partition import PartitionError, partition

LABELS = torch.arange(1000) % 10


def covers_once(parts: list[torch.Tensor], n: int) -> bool:
    return torch.equal(torch.cat(parts).sort().values, torch.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_every_example_goes_to_exactly_one_client(scheme: str) -> None:
    parts = partition(LABELS, 7, scheme, alpha=0.5, seed=3)
    assert len(parts) == 7 and covers_once(parts, len(LABELS))
    assert all(torch.equal(p, p.sort().values) for p in parts)
    assert parts[0].tolist() == partition(LABELS, 7, scheme, alpha=0.5, seed=3)[0].tolist()


def test_iid_parts_are_balanced_and_small_alpha_is_skewed() -> None:
    iid = partition(LABELS, 4, "iid")
    assert {len(p) for p in iid} == {250}
    skewed = partition(LABELS, 4, "dirichlet", alpha=0.1, seed=0)
    flat = partition(LABELS, 4, "dirichlet", alpha=100.0, seed=0)

    def top_share(parts: list[torch.Tensor]) -> float:  # mean share of a client's top class
        return sum(torch.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts) / len(
            parts
        )

    assert top_share(skewed) > 0.3 > 0.15 > top_share(flat)


def test_skill_split_gives_client_0_the_special_class() -> None:
    a, b = partition(LABELS, 2, "skill", special=4, frac_others=0.1)
    assert covers_once([a, b], len(LABELS))
    assert (LABELS[a] == 4).sum() == 100 and (LABELS[b] == 4).sum() == 0
    assert len(a) == 100 + 90


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((3, "skill"), "exactly 2 clients"),
        ((3, "shards"), "unknown partition scheme"),
        ((0, "iid"), "among 0 clients"),
    ],
)
def test_bad_partitions_are_one_line_errors(args: tuple, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition(LABELS, *args)


def test_dirichlet_needs_a_positive_alpha() -> None:
    with pytest.raises(Exception, match="alpha"):
        partition(LABELS, 3, "dirichlet", alpha=0.0)
