"""Linear interpolation between two models' parameters, and the loss barrier along the path.

For models A and B of identical shapes, the path is

.. math::

    \\theta(t) = (1 - t)\\,\\theta_A + t\\,\\theta_B, \\qquad t \\in [0, 1],

evaluated at ``steps`` evenly spaced values of ``t``. The *loss barrier* is how far the loss along
the path rises above the straight line between the end losses,

.. math::

    B = \\max_t \\Big[ L(\\theta(t)) - \\big((1 - t)\\,L(\\theta_A) + t\\,L(\\theta_B)\\big) \\Big],

which is about 0 when A and B lie in one linearly connected basin (Frankle et al., 2020). Aligning B
to A first (:func:`otfuse.align`) removes the barrier that only comes from the units' order (Entezari
et al., 2022); comparing the two paths is the point of ``otfuse interpolate``.

BatchNorm running statistics are interpolated like every other floating-point entry; integer
buffers (``num_batches_tracked``) are taken from A.

>>> rows = interpolate(model_a, otfuse.align(model_b, model_a), test_set, steps=11)
>>> loss_barrier(rows)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from otfuse.data import Dataset
from otfuse.errors import OtfuseError
from otfuse.training import evaluate

__all__ = ["PathPoint", "accuracy_drop", "interpolate", "loss_barrier", "mix", "mix_states"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PathPoint:
    """One point of the path: the model :math:`(1 - t)\\,A + t\\,B` and how it does on the data."""

    t: float  # 0 is model A, 1 is model B
    accuracy: float  # percent, 0-100
    loss: float  # mean cross-entropy


def mix_states(a: StateDict, b: StateDict, t: float) -> StateDict:
    """``(1 - t) * a + t * b`` for floating-point entries; other entries are copied from ``a``.

    Raises :class:`OtfuseError` unless ``a`` and ``b`` have the same keys and shapes.
    """
    if a.keys() != b.keys():
        extra = sorted(set(a) ^ set(b))
        raise OtfuseError(
            f"the models have different parameters (e.g. '{extra[0]}'); interpolate models "
            "of one architecture"
        )
    out = {}
    for key, value_a in a.items():
        value_b = b[key]
        if value_a.shape != value_b.shape:
            raise OtfuseError(
                f"'{key}' has shape {tuple(value_a.shape)} in A but {tuple(value_b.shape)} in B; "
                "interpolation needs equal widths (align B to A first)"
            )
        if value_a.is_floating_point():
            out[key] = torch.lerp(value_a, value_b.to(value_a.dtype), t)
        else:
            out[key] = value_a.clone()
    return out


def mix(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """A copy of ``model_a`` holding the parameters :math:`(1 - t)\\,A + t\\,B`."""
    model = copy.deepcopy(model_a)
    model.load_state_dict(mix_states(model_a.state_dict(), model_b.state_dict(), t))
    return model


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    dataset: Dataset,
    steps: int = 11,
    *,
    batch_size: int = 1000,
    progress: bool = False,
) -> list[PathPoint]:
    """Accuracy and loss of :math:`(1 - t)\\,A + t\\,B` on ``dataset`` for ``steps`` values of t.

    Args:
        model_a, model_b: models of identical parameter shapes; neither is modified.
        dataset: labelled examples, images (N, C, H, W) the models accept.
        steps: number of points, at least 2: t = 0, 1/(steps-1), ..., 1.
        progress: show a progress bar over the points.

    Returns:
        ``steps`` :class:`PathPoint` rows in order of increasing t.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise OtfuseError(f"steps must be an integer of at least 2, got {steps}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    mix_states(state_a, state_b, 0.0)  # check the shapes before any work
    model = copy.deepcopy(model_a)
    rows = []
    for i in tqdm(
        range(steps), disable=not progress, desc="interpolate", unit="point", leave=False
    ):
        t = i / (steps - 1)
        model.load_state_dict(mix_states(state_a, state_b, t))
        result = evaluate(model, dataset, batch_size)
        rows.append(PathPoint(t=t, accuracy=result.accuracy, loss=result.loss))
    return rows


def loss_barrier(rows: Sequence[PathPoint]) -> float:
    """:math:`\\max_t [L(t) - ((1 - t) L(0) + t L(1))]` over the rows (0 when the path is convex).

    ``rows`` must start at t = 0 and end at t = 1, as :func:`interpolate` returns them.
    """
    start, end = _ends(rows)
    return max(r.loss - ((1 - r.t) * start.loss + r.t * end.loss) for r in rows)


def accuracy_drop(rows: Sequence[PathPoint]) -> float:
    """:math:`\\max_t [((1 - t) A(0) + t A(1)) - A(t)]`: the accuracy barrier, in percentage points."""
    start, end = _ends(rows)
    return max((1 - r.t) * start.accuracy + r.t * end.accuracy - r.accuracy for r in rows)


def _ends(rows: Sequence[PathPoint]) -> tuple[PathPoint, PathPoint]:
    if len(rows) < 2 or rows[0].t != 0.0 or rows[-1].t != 1.0:
        raise OtfuseError("a barrier needs a path of at least two points from t = 0 to t = 1")
    return rows[0], rows[-1]
