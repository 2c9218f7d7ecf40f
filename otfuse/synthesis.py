"""Inputs synthesised from the parents' BatchNorm statistics, for data-free repair and refit.

A BatchNorm layer's running mean :math:`\\mu_\\ell` and variance :math:`\\sigma^2_\\ell` record what its
inputs looked like on the training data. Starting from Gaussian noise, a batch :math:`x` (N, ...) is
optimised (Adam) so that, in every parent, each BatchNorm layer sees batch statistics that match
its running ones:

.. math::

    \\mathcal{L}(x) = \\frac{1}{L}\\sum_{k,\\ell}
        \\frac{\\lVert \\hat\\mu_{k\\ell}(x) - \\mu_{k\\ell} \\rVert^2}{\\sum \\sigma^2_{k\\ell}}
      + \\frac{\\lVert \\hat\\sigma^2_{k\\ell}(x) - \\sigma^2_{k\\ell} \\rVert^2}
             {\\sum \\sigma^4_{k\\ell}}
      + \\tau \\, \\mathrm{TV}(x),

where TV, the mean squared difference of neighbouring pixels, is used for image batches
(N, C, H, W) only. No data is read: the batch stands in for an unlabeled sample when none is given.
The idea is that of DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020), without its
teacher-student and class terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from otfuse.errors import OtfuseError


def tracked_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_var is not None
    ]


def can_synthesize(models: Sequence[nn.Module]) -> bool:
    """True when every model has BatchNorm running statistics to synthesise inputs from."""
    return all(tracked_batchnorms(m) for m in models)


def statistics_loss(values: Sequence[tuple[_BatchNorm, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of the normalised squared gap between batch and running statistics."""
    total = torch.zeros(())
    for norm, z in values:
        dims = [0, *range(2, z.ndim)]
        mean, var = z.mean(dims), z.var(dims, unbiased=False)
        run_mean, run_var = norm.running_mean, norm.running_var
        total = total + (mean - run_mean).pow(2).sum() / run_var.sum().clamp_min(1e-12)
        total = total + (var - run_var).pow(2).sum() / run_var.pow(2).sum().clamp_min(1e-12)
    return total / max(len(values), 1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally neighbouring pixels (N, C, H, W)."""
    if x.ndim != 4:
        return torch.zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(
        2
    ).mean()


def synthesize_inputs(
    models: Sequence[nn.Module],
    example_input: torch.Tensor,
    *,
    num_samples: int = 256,
    steps: int = 200,
    lr: float = 0.1,
    smoothness: float = 0.05,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """A batch (num_samples, ...) shaped like ``example_input``'s rows whose BatchNorm statistics in
    every model match the running statistics (see the module's docstring).

    The models are run in eval mode and are not modified (parameters, modes and gradient flags are
    restored). Raises :class:`OtfuseError` when a model has no BatchNorm running statistics.
    """
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise OtfuseError("input synthesis needs models that take one floating-point tensor")
    if not can_synthesize(models):
        raise OtfuseError("input synthesis needs BatchNorm running statistics in every model")
    generator = torch.Generator().manual_seed(seed)
    shape = (num_samples, *example_input.shape[1:])
    x = torch.randn(shape, generator=generator, dtype=example_input.dtype).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    seen: list[tuple[_BatchNorm, torch.Tensor]] = []
    hooks = [
        norm.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
        for model in models
        for norm in tracked_batchnorms(model)
    ]
    saved = _freeze(models)
    try:
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc="synthesise", disable=not progress, leave=False):
                seen.clear()
                optimizer.zero_grad()
                for model in models:
                    model(x)
                loss = statistics_loss(seen) + smoothness * total_variation(x)
                loss.backward()
                optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
        _restore(models, saved)
    return x.detach()


def _freeze(models: Sequence[nn.Module]) -> list[tuple[bool, list[bool]]]:
    saved = []
    for model in models:
        params = list(model.parameters())
        saved.append((model.training, [p.requires_grad for p in params]))
        for p in params:
            p.requires_grad_(False)
        model.eval()
    return saved


def _restore(models: Sequence[nn.Module], saved: list[tuple[bool, list[bool]]]) -> None:
    for model, (training, flags) in zip(models, saved):
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)
