"""Averaging states, and the baselines OT fusion is measured against.

* :func:`average_states`: the weighted average of aligned parameters,
  :math:`\\theta = \\sum_k w_k \\theta_k` with :math:`\\sum_k w_k = 1` (integer buffers, such as
  BatchNorm's batch counter, come from the reference).
* :func:`vanilla_average`: the same average without alignment (unit i of one model averaged with
  unit i of another), the baseline that fails.
* :class:`PredictionEnsemble`: the average of the models' softmax outputs, K times the cost.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.validation import check_models, normalise_weights

StateDict = dict[str, torch.Tensor]


def average_states(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict
) -> StateDict:
    """Weighted average of floating-point entries; other entries (counters) come from ``reference``."""
    out = {}
    for key, ref in reference.items():
        if ref.is_floating_point():
            out[key] = sum(w * s[key].to(ref.dtype) for w, s in zip(weights, states))
        else:
            out[key] = ref.clone()
    return out


def build_model(template: nn.Module, state: StateDict) -> nn.Module:
    """A copy of ``template`` holding ``state``."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def vanilla_average(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None
) -> nn.Module:
    """Parameter-wise weighted average with no alignment (the baseline that OT fusion improves on)."""
    models = check_models(models)
    states = [m.state_dict() for m in models]
    for i, s in enumerate(states[1:], start=1):
        if s.keys() != states[0].keys() or any(s[k].shape != v.shape for k, v in states[0].items()):
            raise OtfuseError(
                f"vanilla averaging needs identical shapes; model {i} differs from model 0"
            )
    return build_model(
        models[0], average_states(states, normalise_weights(weights, len(models)), states[0])
    )


class PredictionEnsemble(nn.Module):
    """Weighted average of the members' softmax outputs; ``forward`` returns its logarithm, so
    ``argmax`` gives the ensemble's prediction and ``cross_entropy`` its loss."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(check_models(models))
        self.register_buffer("weights", torch.tensor(normalise_weights(weights, len(self.members))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(w * torch.softmax(m(x), dim=-1) for w, m in zip(self.weights, self.members))
        return torch.log(probs.clamp_min(1e-30))


def ensemble(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None
) -> PredictionEnsemble:
    """The prediction ensemble of ``models`` (K times the parameters and inference cost)."""
    return PredictionEnsemble(models, weights)
