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

from typing import Literal

import numpy as np
import torch

from otfuse.errors import OtfuseError

CostName = Literal["euclidean", "sqeuclidean", "cosine", "correlation"]
MarginalName = Literal["uniform", "l1", "l2"]
COSTS: tuple[str, ...] = ("euclidean", "sqeuclidean", "cosine", "correlation")
MARGINALS: tuple[str, ...] = ("uniform", "l1", "l2")


def ground_cost(x: torch.Tensor, y: torch.Tensor, metric: CostName = "euclidean") -> np.ndarray:
    """Cost matrix between the rows of ``x`` (n_b, d) and ``y`` (n_a, d); returns (n_b, n_a) float64.

    It is formed on the features' device (one matrix product) and brought to the CPU, where the
    solvers run, as the last step.
    """
    if metric not in COSTS:
        raise OtfuseError(f"unknown cost '{metric}'; choose one of {', '.join(COSTS)}")
    # float32 matrix products are exact enough to rank costs and several times faster than float64
    x, y = x.float(), y.float()
    # The (n_b, n_a) intermediates are updated in place: fresh large tensors cost page faults that
    # rival the matrix product at widths in the thousands. The arithmetic (and so every bit of the
    # result) is that of the plain expressions in the comments.
    if metric in ("cosine", "correlation"):
        if metric == "correlation":
            x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        yn = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cost = (xn @ yn.T).neg_().add_(1.0)  # 1 - xn @ yn.T
    else:
        cost = _sq_distances(x, y)  # |x|^2 + |y|^2 - 2 x.y
    cost.clamp_min_(0.0)
    if metric == "euclidean":
        cost.sqrt_()
    return cost.cpu().double().numpy()


def _sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)``, bit for bit, with one
    (n_b, n_a) allocation: the norms' sum is formed a block of rows (about 4 MB) at a time."""
    xx, yy = (x * x).sum(1), (y * y).sum(1)
    out = (x @ y.T).mul_(2.0)
    rows = max(1, min(len(out), (1 << 20) // max(1, out.shape[1])))
    buffer = torch.empty(rows, out.shape[1], dtype=out.dtype, device=out.device)
    for start in range(0, len(out), rows):
        block = out[start : start + rows]
        norms = torch.add(xx[start : start + rows, None], yy[None, :], out=buffer[: len(block)])
        torch.sub(norms, block, out=block)
    return out


def unit_masses(features: torch.Tensor, kind: MarginalName = "uniform") -> np.ndarray:
    """Probability mass of each unit (row of ``features``, shape (n, d)); returns shape (n,).

    ``uniform`` gives 1/n; ``l1`` and ``l2`` make the mass proportional to the norm of the unit's
    features (its importance), with a floor so that no unit has zero mass.
    """
    if kind not in MARGINALS:
        raise OtfuseError(f"unknown marginals '{kind}'; choose one of {', '.join(MARGINALS)}")
    n = features.shape[0]
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    norms = features.double().norm(p=1 if kind == "l1" else 2, dim=1).cpu().numpy()
    norms = np.maximum(norms, 1e-6 * max(norms.max(), 1e-12))
    return norms / norms.sum()
