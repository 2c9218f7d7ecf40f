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
from otfuse.plans import tensor_identity
from otfuse.validation import check_models, normalise_weights

StateDict = dict[str, torch.Tensor]


def average_states(
    states: Sequence[StateDict], weights: Sequence[float], reference: StateDict
) -> StateDict:
    """Weighted average :math:`\\sum_k w_k \\theta_k` of floating-point entries; other entries
    (counters) are copies of ``reference``'s.

    Each average is one new tensor: :math:`w_0 \\theta_0`, then :math:`w_k \\theta_k` formed in one
    reused buffer and added in place (the same arithmetic as ``sum(w * s for ...)``, without a new
    tensor per term). Names whose tensors are the same in every state (tied weights) are averaged
    once and share the result.
    """
    out: StateDict = {}
    done: dict[tuple, torch.Tensor] = {}
    buffer = _Buffer()
    for key, ref in reference.items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        tensors = [s[key] for s in states]
        same = tuple(tensor_identity(t) for t in tensors)
        if same not in done:
            done[same] = _weighted_sum(tensors, weights, ref.dtype, buffer)
        out[key] = done[same]
    return out


class _Buffer:
    """Scratch memory for one term of an average, grown to the largest tensor met."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None

    def like(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        data = self.data
        if (
            data is None
            or data.numel() < t.numel()
            or data.dtype != dtype
            or data.device != t.device
        ):
            data = self.data = torch.empty(t.numel(), dtype=dtype, device=t.device)
        return data[: t.numel()].view(t.shape)


def _weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], dtype: torch.dtype, buffer: _Buffer
) -> torch.Tensor:
    """:math:`\\sum_k w_k t_k` in ``dtype``, a new tensor; each product rounded before it is added."""
    total = torch.mul(tensors[0].to(dtype), weights[0])
    for w, t in zip(weights[1:], tensors[1:]):
        term = torch.mul(t.to(dtype), w, out=buffer.like(t, dtype))
        total.add_(term)
    return total


def build_model(template: nn.Module, state: StateDict, *, adopt: bool = False) -> nn.Module:
    """A copy of ``template`` holding ``state`` (shapes and names as ``template.state_dict()``).

    The copy is made without copying the template's parameters and buffers first: they are swapped
    for ``state``'s tensors during the deep copy (copies of them, or with ``adopt=True`` the tensors
    themselves, which the caller hands over). Modules whose state dict is not made of their own
    parameters and buffers are copied and loaded with ``load_state_dict``.
    """
    entries = template.state_dict(keep_vars=True)
    if not _plain_state(template, entries):
        model = copy.deepcopy(template)
        model.load_state_dict(state)
        return model
    _check_state(entries, state)
    memo: dict[int, object] = {}
    for key, old in entries.items():
        if id(old) not in memo:
            memo[id(old)] = _replacement(old, state[key], adopt)
    return copy.deepcopy(template, memo)


def _plain_state(template: nn.Module, entries: StateDict) -> bool:
    """Whether every state-dict entry is one of the module's own parameters or buffers."""
    own = {id(t) for _, t in template.named_parameters(remove_duplicate=False)}
    own |= {id(t) for _, t in template.named_buffers(remove_duplicate=False)}
    return all(isinstance(t, torch.Tensor) and id(t) in own for t in entries.values())


def _check_state(entries: StateDict, state: StateDict) -> None:
    """The checks of a strict ``load_state_dict``: the same names and shapes."""
    if entries.keys() != state.keys():
        odd = sorted(set(entries) ^ set(state))[:3]
        raise OtfuseError(f"the state does not fit the model: {', '.join(odd)}")
    for key, old in entries.items():
        if tuple(state[key].shape) != tuple(old.shape):
            raise OtfuseError(
                f"the state does not fit the model: '{key}' has shape "
                f"{tuple(state[key].shape)}, the model {tuple(old.shape)}"
            )


def _replacement(old: torch.Tensor, value: torch.Tensor, adopt: bool) -> torch.Tensor:
    """``value`` as ``old`` is held: its dtype and device, a Parameter when ``old`` is one."""
    new = value.detach().to(device=old.device, dtype=old.dtype, copy=not adopt)
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new, requires_grad=old.requires_grad)
    return new


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
    state = average_states(states, normalise_weights(weights, len(models)), states[0])
    return build_model(models[0], state, adopt=True)


class PredictionEnsemble(nn.Module):
    """Weighted average of the members' softmax outputs; ``forward`` returns its logarithm, so
    ``argmax`` gives the ensemble's prediction and ``cross_entropy`` its loss."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(check_models(models))
        self.register_buffer("weights", torch.tensor(normalise_weights(weights, len(self.members))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each member reads its own copy: a member may change its input in place
        probs = sum(
            w * torch.softmax(m(x.clone()), dim=-1) for w, m in zip(self.weights, self.members)
        )
        return torch.log(probs.clamp_min(1e-30))


def ensemble(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None
) -> PredictionEnsemble:
    """The prediction ensemble of ``models`` (K times the parameters and inference cost)."""
    return PredictionEnsemble(models, weights)
