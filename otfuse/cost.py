"""Ground costs between the units of two models, and the masses of units.

Units are rows of a feature matrix: their incoming weights (``wts``) or their responses over a sample
of inputs (``acts``). For features ``x`` of shape (n_b, d) and ``y`` of shape (n_a, d) the cost matrix
``C`` has shape (n_b, n_a):

.. math::

    C^{\\text{euclidean}}_{ij} = \\lVert x_i - y_j \\rVert_2, \\quad
    C^{\\text{sqeuclidean}}_{ij} = \\lVert x_i - y_j \\rVert_2^2, \\quad
    C^{\\text{cosine}}_{ij} = 1 - \\frac{\\langle x_i, y_j\\rangle}{\\lVert x_i\\rVert \\lVert y_j\\rVert},

and ``correlation`` is the cosine cost of the centred rows (one minus Pearson's correlation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from otfuse.errors import OtfuseError

CostName = Literal["euclidean", "sqeuclidean", "cosine", "correlation"]
MarginalName = Literal["uniform", "l1", "l2"]
COSTS: tuple[str, ...] = ("euclidean", "sqeuclidean", "cosine", "correlation")
MARGINALS: tuple[str, ...] = ("uniform", "l1", "l2")


Features = torch.Tensor | Sequence[torch.Tensor]  # rows (n, d), or column blocks (n, d_t) of them


def ground_cost(x: Features, y: Features, metric: CostName = "euclidean") -> np.ndarray:
    """Cost matrix between the rows of ``x`` (n_b, d) and ``y`` (n_a, d); returns (n_b, n_a) float32,
    the precision it is formed in (float32 products rank costs exactly enough and are several times
    faster than float64; the solvers that need float64 convert it, which is exact).

    ``x`` and ``y`` may each be given as blocks of columns (lists of (n, d_t), the block t of both
    with the same d_t): the rows are then their concatenation, which the Euclidean costs never form
    (:func:`_sq_distances` sums the blocks' products; the other costs concatenate). It is formed on
    the features' device and brought to the CPU, where the solvers run, as the last step.
    """
    if metric not in COSTS:
        raise OtfuseError(f"unknown cost '{metric}'; choose one of {', '.join(COSTS)}")
    if metric in ("euclidean", "sqeuclidean"):
        cost = _sq_distances(x, y)
        cost.clamp_min_(0.0)
        if metric == "euclidean":
            cost.sqrt_()
        return cost.cpu().numpy()
    # float32 matrix products are exact enough to rank costs and several times faster than float64
    x, y = joined(x).float(), joined(y).float()
    # The (n_b, n_a) intermediates are updated in place: fresh large tensors cost page faults that
    # rival the matrix product at widths in the thousands. The arithmetic (and so every bit of the
    # result) is that of the plain expressions in the comments.
    if metric in ("cosine", "correlation"):
        if metric == "correlation":
            x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        yn = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cost = (xn @ yn.T).neg_().add_(1.0)  # 1 - xn @ yn.T
    cost.clamp_min_(0.0)
    return cost.cpu().numpy()


def _blocks(features: Features) -> list[torch.Tensor]:
    blocks = [features] if isinstance(features, torch.Tensor) else list(features)
    return [b.float() for b in blocks]  # float32 products: exact enough to rank costs, fast


def joined(features: Features) -> torch.Tensor:
    """The rows (n, d) of ``features`` given whole or as column blocks."""
    if isinstance(features, torch.Tensor):
        return features
    return features[0] if len(features) == 1 else torch.cat(list(features), dim=1)


def _sq_distances(x: Features, y: Features) -> torch.Tensor:
    """``|x_i|^2 + |y_j|^2 - 2 x_i . y_j`` (n_b, n_a) for rows given as column blocks, with one
    (n_b, n_a) allocation: the products of the blocks are summed in place (no concatenated copy of
    the features; a block may be a strided view, such as a transposed weight), the norms' sum is
    formed a block of rows (about 4 MB) at a time. For one block it is
    ``|x|^2[:, None] + |y|^2[None, :] - 2.0 * (x @ y.T)`` bit for bit, with
    ``|x|^2 = torch.linalg.vector_norm(x, dim=1).square()`` (one pass, no (n, d) temporary)."""
    x, y = _blocks(x), _blocks(y)
    xx, yy = _sq_norms(x), _sq_norms(y)
    out = x[0] @ y[0].T
    for bx, by in zip(x[1:], y[1:], strict=True):
        out.addmm_(bx, by.T)
    out.mul_(2.0)
    rows = max(1, min(len(out), (1 << 20) // max(1, out.shape[1])))
    buffer = torch.empty(rows, out.shape[1], dtype=out.dtype, device=out.device)
    for start in range(0, len(out), rows):
        block = out[start : start + rows]
        norms = torch.add(xx[start : start + rows, None], yy[None, :], out=buffer[: len(block)])
        torch.sub(norms, block, out=block)
    return out


def _sq_norms(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Squared norms (n,) of the rows of the concatenated column blocks."""
    total = torch.linalg.vector_norm(blocks[0], dim=1).square()
    for block in blocks[1:]:
        total.add_(torch.linalg.vector_norm(block, dim=1).square())
    return total


def unit_masses(features: Features, kind: MarginalName = "uniform") -> np.ndarray:
    """Probability mass of each unit (row of ``features``, shape (n, d)); returns shape (n,).

    ``uniform`` gives 1/n; ``l1`` and ``l2`` make the mass proportional to the norm of the unit's
    features (its importance), with a floor so that no unit has zero mass.
    """
    if kind not in MARGINALS:
        raise OtfuseError(f"unknown marginals '{kind}'; choose one of {', '.join(MARGINALS)}")
    blocks = [features] if isinstance(features, torch.Tensor) else list(features)
    n = blocks[0].shape[0]
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    if kind == "l1":
        norms = sum(b.double().abs().sum(1) for b in blocks)
    else:
        norms = sum(b.double().square().sum(1) for b in blocks).sqrt()
    norms = norms.cpu().numpy()
    norms = np.maximum(norms, 1e-6 * max(norms.max(), 1e-12))
    return norms / norms.sum()
