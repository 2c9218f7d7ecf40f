r"""Inputs synthesised from the parents themselves, for data-free repair and refit.

A trained model carries two traces of its data that need no data to read: its BatchNorm layers'
running means :math:`\mu_\ell` and variances :math:`\sigma^2_\ell` describe what their inputs looked
like, and its classifier knows what each class looks like. Starting from Gaussian noise, a batch
:math:`x` (N, ...) with assigned classes :math:`y_i = i \bmod C` is optimised (Adam) so that every
parent :math:`k` sees batch statistics that match its running ones and recognises the classes:

.. math::

    \mathcal{L}(x) = \frac{1}{L}\sum_{k,\ell}\Big(
        \frac{\lVert \hat\mu_{k\ell}(x) - \mu_{k\ell} \rVert^2}{\sum \sigma^2_{k\ell}}
      + \frac{\lVert \hat\sigma^2_{k\ell}(x) - \sigma^2_{k\ell} \rVert^2}
             {\sum \sigma^4_{k\ell}}\Big)
      + \sum_k \mathrm{CE}(f_k(x), y)
      + \tau \, \mathrm{TV}(x) + \alpha \, \overline{x^2}.

The statistics term is used when the models have BatchNorm running statistics; otherwise, when they
output class scores (N, C), the class term (with BatchNorm statistics the class term made fused
ResNets worse here, 80.0% against 84.3%); TV, the mean squared difference of neighbouring pixels,
only for image batches (N, C, H, W). Its weight :math:`\tau` depends on the term: the statistics
pin down what the inputs look like and want little smoothing (``STATISTICS_SMOOTHNESS``), while
the class term alone has nothing else to keep the inputs image-like (``CLASS_SMOOTHNESS``; README,
Speed, for the measurements). No data is read: the batch stands in for an unlabeled sample when none
is given. This is the idea of DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020), without
its teacher-student term.

Causal language models (token ids (N, T) in, next-token logits (N, T, V) out, position t blind to
later tokens) need no optimisation: sequences are *sampled* from the parents' prediction ensemble,
one token at a time from a random first token,

.. math::

    x_{t+1} \sim \frac{1}{K} \sum_k \operatorname{softmax}\big(f_k(x_{1..t})_t\big),

text that the parents themselves consider likely (:func:`sample_sequences`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from otfuse.errors import OtfuseError
from otfuse.modes import channels_last, evaluating, runs_channels_last


def tracked_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_var is not None
    ]


def scores_of(output: object) -> torch.Tensor | None:
    """A model's scores: its output when that is one tensor, else the output's ``logits`` (a
    Hugging Face ``ModelOutput``, or a mapping with that key); None when it has neither."""
    if isinstance(output, torch.Tensor):
        return output
    logits = (
        output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    )
    return logits if isinstance(logits, torch.Tensor) else None


def class_count(model: nn.Module, example_input: torch.Tensor) -> int:
    """C when ``model`` maps ``example_input`` to class scores (N, C) with C >= 2, else 0."""
    try:
        with evaluating([model]), torch.no_grad():
            out = scores_of(model(example_input.clone()))  # the model may change it in place
    except Exception:  # noqa: BLE001 - any failure means: not a plain classifier on this input
        return 0
    shaped = isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] >= 2
    return int(out.shape[1]) if shaped else 0


def is_causal_lm(model: nn.Module, example_input: object) -> bool:
    """True when ``model`` maps token ids (N, T) to next-token logits (N, T, V), V >= 2, and the
    logits at positions before the last do not change when the last token does (causal)."""
    x = example_input
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.ndim != 2 or x.shape[1] < 2:
        return False
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % max(int(x.max()) + 1, 2)
    try:
        with evaluating([model]), torch.no_grad():
            out, other = scores_of(model(x.clone())), scores_of(model(changed))
    except Exception:  # noqa: BLE001 - any failure means: not a language model on this input
        return False
    if not (isinstance(out, torch.Tensor) and out.shape[:2] == x.shape and out.ndim == 3):
        return False
    return out.shape[2] >= 2 and torch.allclose(out[:, :-1], other[:, :-1], atol=1e-5, rtol=1e-4)


def can_synthesize(models: Sequence[nn.Module], example_input: object) -> bool:
    """True when inputs can be synthesised for ``models``: causal language models on token ids,
    or one floating-point input tensor and BatchNorm running statistics in every model or class
    scores from every model."""
    if all(is_causal_lm(m, example_input) for m in models):
        return True
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        return False
    with_stats = all(tracked_batchnorms(m) for m in models)
    classes = {class_count(m, example_input) for m in models}
    return with_stats or (len(classes) == 1 and 0 not in classes)


def statistics_loss(values: Sequence[tuple[_BatchNorm, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of the normalised squared gap between batch and running statistics."""
    total = torch.zeros(())
    for norm, z in values:
        run_mean, run_var = norm.running_mean, norm.running_var
        mean, var = channel_moments(_at_least_float32(z), run_mean)
        total = total + (mean - run_mean).pow(2).sum() / run_var.sum().clamp_min(1e-12)
        total = total + (var - run_var).pow(2).sum() / run_var.pow(2).sum().clamp_min(1e-12)
    return total / max(len(values), 1)


def _at_least_float32(z: torch.Tensor) -> torch.Tensor:
    """``z`` in float32 when its precision is lower (bfloat16 under autocast), else as it is."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def channel_moments(z: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance per channel of ``z`` (N, C, ...), each (C,).

    Computed from the sums of :math:`d = z - s` and :math:`d^2` (``shift`` :math:`s` (C,), e.g. the
    running mean, keeps :math:`E[d^2] - E[d]^2` free of cancellation). Differentiable in ``z``
    by :class:`_ChannelMoments`, whose backward is one affine map per channel.
    """
    return _ChannelMoments.apply(z, shift)


def _channel_sums(d: torch.Tensor) -> torch.Tensor:
    """Sums per channel of ``d`` (N, C, ...), (C,): over the trailing dimensions first where they
    are contiguous (about twice as fast as one reduction over (0, 2, ...) on the CPU), else (a
    channels-last tensor) in one reduction."""
    inner = tuple(range(2, d.ndim))
    if not inner:
        return d.sum(0)
    if d.is_contiguous():
        return d.sum(inner).sum(0)
    return d.sum((0, *inner))


class _ChannelMoments(torch.autograd.Function):
    r"""Mean :math:`\mu` and variance :math:`v` per channel, with the gradient in closed form: for
    :math:`n` values per channel,

    .. math::

        \frac{\partial L}{\partial z} = \frac{1}{n}\frac{\partial L}{\partial \mu}
            + \frac{2}{n}\frac{\partial L}{\partial v}\,(z - \mu),

    one pass over ``z`` instead of autograd's chain of small operations through the shift, the
    square and the sums (README, speed)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, shift: torch.Tensor):
        with torch.no_grad():
            d = z - shift.view(-1, *([1] * (z.ndim - 2)))
            count = z.numel() // z.shape[1]
            centre = _channel_sums(d) / count
            var = _channel_sums(d.square_()) / count - centre.square()
        mean = shift + centre
        ctx.save_for_backward(z, mean)
        ctx.count = count
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor):
        z, mean = ctx.saved_tensors
        scale = 2.0 * grad_var / ctx.count
        offset = grad_mean / ctx.count - scale * mean
        shape = (-1, *([1] * (z.ndim - 2)))
        return torch.addcmul(offset.view(shape), z, scale.view(shape)), None


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and horizontally neighbouring pixels (N, C, H, W)."""
    if x.ndim != 4:
        return torch.zeros(())
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(
        2
    ).mean()


# weight of the TV term with BatchNorm statistics, and with the class term alone (README, Speed;
# means of three synthesis seeds: ViT pair 0.05 / 0.5 / 1 / 2 / 5 -> 71.4 / 75.7 / 77.9 / 79.9 /
# 77.0%, VGG11 x0.25 pair 0.05 / 1 / 2 -> 83.0 / 84.1 / 82.2%, MLPNet unchanged; with statistics,
# ResNet-18 x0.125 pairs lost up to 8 points at 1 or 2)
STATISTICS_SMOOTHNESS = 0.05
CLASS_SMOOTHNESS = 1.0


# The synthesis budget of ``"auto"`` (inputs, Adam steps) per objective, the inputs a ceiling that
# the cost rule below lowers. BatchNorm statistics need the steps to be matched (ResNet-18 x0.125,
# three pairs x two seeds: 64 x 60 -> 85.90 / 84.67 / 86.64%, 128 x 30 -> 85.53 / 82.81 /
# 84.11%); the class term is met in fewer, and the stages gain from more inputs (VGG11 x0.25,
# three pairs x three seeds: 64 x 60 -> 128 x 30 mean 82.79% -> 84.03%, worst 77.15% -> 82.18%;
# MLPNet 88.26 -> 88.63%; twentieth session, 128 -> 192 inputs: VGG11 x0.25 81.47 -> 82.31%
# (1.5 -> 2.1 s), MLPNet 88.75 -> 88.89%, a ViT pair 69.58 -> 69.88%; README, speed).
# With the cost rule below, cheap BatchNorm models take 128 inputs (ResNet-18 x0.125, three pairs x
# three seeds, nineteenth session: 64 -> 128 inputs 84.98 -> 85.79% mean, 5.0 -> 8.9 s, against the
# earliest default's 85.76%; the thirteenth session's parents 84.72 -> 85.12%).
AUTO_BUDGET: dict[str, tuple[int, int]] = {"statistics": (128, 60), "classes": (192, 30)}
AUTO_SEQUENCES = 64  # sequences sampled from causal language models (no steps)

# On a CPU the ``"auto"`` inputs follow the models' cost: as many as fit AUTO_SYNTHESIS_FLOPS
# forward FLOPs over all models, inputs and steps (backward passes come on top, about twice as
# much), a multiple of 8 between the objective's AUTO_FEWEST_INPUTS and AUTO_BUDGET's count.
# ResNet-18 x0.125 (29 MFLOP per input for two models) gains from more (32 -> 64 -> 128 inputs:
# -0.9, 0, +0.8 points) and takes its 128. ResNet-18 x0.25 (114 MFLOP), three pairs x three seeds:
# 64 inputs 89.02% mean against 88.70% at 32 and the earliest default's 89.04%, in 7.1 s against
# 5.3 s (twentieth session, AVX-512 with bfloat16; README, speed); on the twelfth session's AVX2
# machine and parents 88.50% against 88.60%, in 13.7-16.4 s against 8.5-9.9 s. VGG11-BN x0.5
# (95 MFLOP) takes 72 (32 / 64 / 128 inputs: 89.83 / 89.91 / 90.35%), full width 32. The class
# term never goes below the 128 inputs it had before the rule (full-width VGG11, 379 MFLOP,
# keeps them); VGG11 x0.25 on 1 x 28 x 28 or 3 x 32 x 32 inputs (24 / 40 MFLOP) affords 192.
AUTO_SYNTHESIS_FLOPS = 4.5e11
AUTO_FEWEST_INPUTS: dict[str, int] = {"statistics": 32, "classes": 128}
# models whose cost is not counted (FLOPs that cannot be counted; an accelerator): the counts
# before the cost rule
AUTO_UNCOUNTED_INPUTS: dict[str, int] = {"statistics": 64, "classes": 128}


def objective(models: Sequence[nn.Module], example_input: torch.Tensor) -> str:
    """What :func:`synthesize_inputs` matches for ``models``: ``"sequences"`` (causal language
    models, sampled), ``"statistics"`` (BatchNorm running statistics in every model) or
    ``"classes"`` (the class term)."""
    if all(is_causal_lm(m, example_input) for m in models):
        return "sequences"
    return "statistics" if all(tracked_batchnorms(m) for m in models) else "classes"


def budget(
    models: Sequence[nn.Module],
    example_input: torch.Tensor,
    num_samples: int | str = "auto",
    steps: int | str = "auto",
    kind: str | None = None,
) -> tuple[int, int]:
    """The inputs and steps to synthesise: those given, ``"auto"`` by :data:`AUTO_BUDGET` for the
    models' :func:`objective` (``kind`` when the caller knows it); on a CPU the statistics and
    class objectives' inputs by :func:`affordable_inputs` as well, for the steps that will run
    (more steps given, fewer inputs); :data:`AUTO_UNCOUNTED_INPUTS` when their FLOPs cannot be
    counted, and on an accelerator (where the larger counts were not measured)."""
    kind = kind or objective(models, example_input)
    inputs, count = AUTO_BUDGET.get(kind, (AUTO_SEQUENCES, 0))
    count = count if steps == "auto" else int(steps)
    if num_samples != "auto":
        inputs = int(num_samples)
    elif kind in AUTO_FEWEST_INPUTS:
        uncounted = min(inputs, AUTO_UNCOUNTED_INPUTS[kind])
        flops = forward_flops(models, example_input) if example_input.device.type == "cpu" else None
        fewest = AUTO_FEWEST_INPUTS[kind]
        inputs = uncounted if flops is None else affordable_inputs(flops, count, inputs, fewest)
    return inputs, count


def affordable_inputs(
    flops_per_input: float, steps: int, most: int, fewest: int | None = None
) -> int:
    r"""The synthesised inputs that fit the CPU's budget: :math:`n = 8\lfloor
    B / (8 \, s \, F) \rfloor` for :data:`AUTO_SYNTHESIS_FLOPS` :math:`B`, ``steps`` :math:`s` and
    the models' summed forward FLOPs per input :math:`F`, clipped to [``fewest``, ``most``]
    (``fewest`` None: the statistics objective's, ``AUTO_FEWEST_INPUTS["statistics"]``)."""
    fewest = AUTO_FEWEST_INPUTS["statistics"] if fewest is None else fewest
    work = max(steps, 1) * max(flops_per_input, 1.0)
    fitting = 8 * int(AUTO_SYNTHESIS_FLOPS // (8 * work))
    return max(min(fewest, most), min(fitting, most))


def forward_flops(models: Sequence[nn.Module], example_input: torch.Tensor) -> int | None:
    """Floating-point operations per input row of one forward pass of every model, summed (matrix
    products and convolutions, :class:`FlopCounterMode`), counted on a copy of two rows of
    ``example_input`` (one if it has one: a model may squeeze a batch of one away); the models run
    in eval mode and come back as they were. None when a model cannot run on those rows (one that
    needs a batch of four, say): then nothing is known of the cost."""
    rows = example_input[:2].clone()
    try:
        with torch.no_grad(), evaluating(models), FlopCounterMode(display=False) as counter:
            for model in models:
                model(rows.clone())
    except Exception:  # noqa: BLE001 - a probe: the synthesis's own run reports real failures
        return None
    return counter.get_total_flops() // max(len(rows), 1)


def synthesize_inputs(
    models: Sequence[nn.Module],
    example_input: torch.Tensor,
    *,
    num_samples: int | str = "auto",
    steps: int | str = "auto",
    lr: float = 0.3,
    smoothness: float | None = None,
    prior: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    precision: str = "auto",
) -> torch.Tensor:
    """A batch (num_samples, ...) shaped like ``example_input``'s rows, optimised as the module's
    docstring says (statistics term with BatchNorm, class term for classifiers) in ``steps``
    steps; ``"auto"``: :func:`budget`.

    ``smoothness``: the weight of the TV term; None takes ``STATISTICS_SMOOTHNESS`` with the
    statistics term and ``CLASS_SMOOTHNESS`` with the class term.

    ``precision``: the models run under bfloat16 autocast (``"bfloat16"``; ``"auto"``: where the
    device computes bfloat16 natively, :func:`native_bfloat16`) or in their own float32
    (``"float32"``); the inputs, the losses and Adam's steps stay in float32.
    bfloat16 takes the steps' time down by about a third on this project's CPUs at the same fused
    accuracy (README, speed).

    The models are run in eval mode and are not modified (parameters, modes and gradient flags are
    restored). Raises :class:`OtfuseError` when neither term applies.
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise OtfuseError(f"unknown precision '{precision}'; choose auto, float32 or bfloat16")
    if not can_synthesize(models, example_input):
        raise OtfuseError(
            "input synthesis needs causal language models, or models that take one floating-point "
            "tensor and have BatchNorm running statistics or output class scores (N, C)"
        )
    kind = objective(models, example_input)
    num_samples, steps = budget(models, example_input, num_samples, steps, kind)
    if kind == "sequences":
        return sample_sequences(
            models, example_input.shape[1], num_samples=num_samples, seed=seed, progress=progress
        )
    use_stats = kind == "statistics"
    classes = 0 if use_stats else class_count(models[0], example_input)
    if smoothness is None:
        smoothness = STATISTICS_SMOOTHNESS if use_stats else CLASS_SMOOTHNESS
    generator = torch.Generator().manual_seed(seed)
    shape = (num_samples, *example_input.shape[1:])
    x = torch.randn(shape, generator=generator, dtype=example_input.dtype)
    x = x.to(example_input.device).requires_grad_(True)  # drawn on the CPU: the same on any device
    labels = torch.arange(num_samples, device=x.device) % classes if classes else None
    optimizer = torch.optim.Adam([x], lr=lr)
    seen: list[tuple[_BatchNorm, torch.Tensor]] = []
    hooks = [
        norm.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
        for model in (models if use_stats else [])
        for norm in tracked_batchnorms(model)
    ]
    try:
        with evaluating(models, freeze=True), torch.enable_grad(), contextlib.ExitStack() as stack:
            needs_copy = [changes_its_input(model, x) for model in models]
            if _takes_channels_last(models, x):
                stack.enter_context(channels_last(models))
            for _ in tqdm(range(steps), desc="synthesise", disable=not progress, leave=False):
                seen.clear()
                optimizer.zero_grad()
                with _autocast(x, precision):
                    outputs = [
                        scores_of(m(x.clone() if copy else x))
                        for m, copy in zip(models, needs_copy, strict=True)
                    ]
                loss = statistics_loss(seen) + smoothness * total_variation(x)
                loss = loss + prior * x.pow(2).mean()
                if labels is not None:
                    loss = loss + sum(
                        F.cross_entropy(_at_least_float32(o), labels) for o in outputs
                    )
                loss.backward()
                optimizer.step()
    finally:
        for hook in hooks:
            hook.remove()
    return x.detach()


def _takes_channels_last(models: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether every model runs with its convolutions channels-last, forward and backward to the
    input, as the steps do (:func:`runs_channels_last`, on two of the inputs)."""

    def step(model: nn.Module) -> None:
        rows = x[:2].detach().clone().requires_grad_(True)
        outputs = [t for t in tree_leaves(model(rows.clone())) if isinstance(t, torch.Tensor)]
        total = sum(t.float().sum() for t in outputs if t.requires_grad and t.is_floating_point())
        if isinstance(total, torch.Tensor):
            torch.autograd.grad(total, rows, allow_unused=True)

    return runs_channels_last(models, step)


def changes_its_input(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` changes its input in place (``x.mul_(2)``, an in-place activation on it):
    then it is given a copy (the batch being optimised is a leaf of autograd, which refuses
    in-place changes; the others are given the batch itself, as before)."""
    probe = x.detach().clone()
    with torch.no_grad():
        model(probe)
    return probe._version > 0


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that supports it, or a CPU
    with AVX-512 BF16 or AMX instructions (elsewhere autocast emulates it, slower than float32)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


@contextlib.contextmanager
def _autocast(x: torch.Tensor, precision: str) -> Iterator[None]:
    """bfloat16 autocast on ``x``'s device for ``precision`` (see :func:`synthesize_inputs`); on
    the CPU, attention stays in float32 (:class:`Float32Attention`)."""
    lower = precision == "bfloat16" or (precision == "auto" and native_bfloat16(x.device))
    if x.dtype != torch.float32 or not lower:
        yield
        return
    attention = Float32Attention() if x.device.type == "cpu" else contextlib.nullcontext()
    with torch.autocast(x.device.type, dtype=torch.bfloat16), attention:
        yield


class Float32Attention(TorchFunctionMode):
    """Runs attention in float32 inside a bfloat16 autocast region: ``F.scaled_dot_product_attention``
    and ``nn.MultiheadAttention``'s ``F.multi_head_attention_forward`` (whole, projections too).

    On the CPUs of this project (AMX), autocast sends attention to the bfloat16 flash-attention
    kernel, whose backward took 18 ms per call for a small ViT (64 images, 17 tokens, 4 heads of
    16), 80% of a synthesis step: 109 ms a step against 22 ms in float32, and 24 ms with attention
    alone in float32 (README, Speed). Lower-precision tensors are computed in float32, and the
    result is cast back to the query's dtype.
    """

    FUNCTIONS = (F.scaled_dot_product_attention, F.multi_head_attention_forward)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.FUNCTIONS:
            return func(*args, **kwargs)
        query = args[0] if args else kwargs.get("query")
        with torch.autocast("cpu", enabled=False):
            out = func(*map(_float32, args), **{k: _float32(v) for k, v in kwargs.items()})
        if not isinstance(query, torch.Tensor):
            return out
        cast = lambda t: t.to(query.dtype) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return tuple(map(cast, out)) if isinstance(out, tuple) else cast(out)


def _float32(value: object) -> object:
    """A floating-point tensor at least in float32 (:func:`_at_least_float32`); anything else
    (masks of booleans, flags) as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return _at_least_float32(value)
    return value


@torch.no_grad()
def sample_sequences(
    models: Sequence[nn.Module],
    length: int,
    *,
    num_samples: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Token ids (num_samples, length) sampled from the prediction ensemble of causal language
    models: the first token uniform over the vocabulary, each next one from the average of the
    models' next-token probabilities on the tokens so far (temperature 1). Eval mode; the models
    are not modified."""
    generator = torch.Generator().manual_seed(seed)
    with evaluating(models):
        vocab = scores_of(models[0](torch.zeros(1, 1, dtype=torch.long))).shape[-1]
        x = torch.randint(0, vocab, (num_samples, 1), generator=generator)
        for _ in tqdm(range(length - 1), desc="sample", disable=not progress, leave=False):
            probs = sum(
                torch.softmax(scores_of(m(x))[:, -1].double(), dim=-1) for m in models
            ) / len(models)
            x = torch.cat([x, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return x
