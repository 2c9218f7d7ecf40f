"""Test helpers: plant a permutation in every hidden space of a model."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import otfuse
from otfuse.plans import transport_member
from otfuse.transport import TransportPlan


def permuted(
    model: nn.Module, example_input: torch.Tensor, seed: int = 0
) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with a random permutation planted in every transportable space.

    The permutation respects the space's groups. Returns the model and the permutation per space name.
    """
    graph = otfuse.spaces(model, example_input)
    rng = np.random.default_rng(seed)
    state = dict(model.state_dict())
    sizes = graph.sizes
    perms = {}
    for space in graph.transportable():
        n, g = space.size, space.groups
        perm = np.concatenate([rng.permutation(n // g) + j * (n // g) for j in range(g)])
        matrix = np.zeros((n, n))
        matrix[perm, np.arange(n)] = 1.0 / n
        plan = TransportPlan(matrix, np.zeros((n, n)), "planted", perm)
        for member in space.members:
            state[member.param] = transport_member(
                state[member.param], member, space.index, plan, sizes
            )
        perms[space.name] = perm
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out, perms


def max_state_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())


def fuse(models, **kwargs):
    """The paper's one-shot fusion unless a test asks for more."""
    return otfuse.fuse(models, **{"recipe": "paper-wts", **kwargs})
