"""Run models in eval mode (optionally with frozen parameters) and give them back as they were."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(models: Sequence[nn.Module], *, freeze: bool = False) -> Iterator[None]:
    """Put every module of ``models`` in eval mode (and, with ``freeze``, stop gradients to their
    parameters) inside the block; restore each module's mode and each parameter's ``requires_grad``
    afterwards. Modules and parameters shared between models, or a model passed twice, are saved
    once, so they come back as they were."""
    modules = {id(m): m for model in models for m in model.modules()}
    params = {id(p): p for model in models for p in model.parameters()}
    modes = {key: m.training for key, m in modules.items()}
    flags = {key: p.requires_grad for key, p in params.items()}
    try:
        for m in modules.values():
            m.training = False
        if freeze:
            for p in params.values():
                p.requires_grad_(False)
        yield
    finally:
        for key, m in modules.items():
            m.training = modes[key]
        for key, p in params.items():
            p.requires_grad_(flags[key])
