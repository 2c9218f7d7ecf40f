"""Plain training, fine-tuning and evaluation of classifiers on a :class:`~otfuse.data.Dataset`.

SGD with momentum and weight decay, cross-entropy loss, a learning rate that follows ``schedule``.
On CPU, training is deterministic given ``TrainConfig.seed`` (and the number of threads).

A run that diverges raises :class:`TrainingDivergedError`: the loss becomes NaN or infinite, rises
above :data:`DIVERGENCE_FACTOR` times its first value (at least 1), or the last epoch's mean loss
ends above ``10 x`` the first step's; so does a run whose weights end holding NaN or Inf.
``progress=True`` shows a progress bar when stderr is a terminal, and one line per epoch otherwise
(log files get no ``\\r`` frames).

>>> history = train(model, load_dataset("fashion-mnist"), TrainConfig(epochs=5))
>>> evaluate(model, load_dataset("fashion-mnist", "test")).accuracy
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from otfuse.data import Dataset
from otfuse.errors import OtfuseError
from otfuse.modes import evaluating
from otfuse.validation import first_non_finite as first_non_finite_entry

__all__ = [
    "EpochStats",
    "Evaluation",
    "FinetuneResult",
    "TrainConfig",
    "TrainConfigError",
    "TrainHistory",
    "TrainingDivergedError",
    "evaluate",
    "finetune",
    "learning_rate",
    "predict_logits",
    "seed_everything",
    "train",
]

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
DIVERGENCE_FACTOR = 1000.0  # a step's loss this many times the first one's (at least 1): diverged
FINAL_LOSS_FACTOR = 10.0  # the last epoch's mean loss this many times the first step's: diverged


class TrainConfigError(OtfuseError):
    """A training option is out of range."""


class TrainingDivergedError(OtfuseError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # examples per SGD step; the last batch of an epoch may be smaller
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, applied to every parameter
    schedule: str = "cosine"  # "cosine" (to 0), "step" (x0.1 at 50% and 75%) or "constant"
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw" (betas 0.9, 0.95; decoupled decay)
    warmup: float = (
        0.0  # share of the steps over which the lr rises linearly from 0 to the schedule's
    )
    seed: int = 0  # seeds the weights' RNG use, the shuffling and dropout
    num_threads: int | None = None  # torch CPU threads while training; None leaves torch's setting

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainConfigError(
                f"epochs and batch_size must be at least 1, got {self.epochs} and {self.batch_size}"
            )
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise TrainConfigError("lr must be positive and momentum, weight_decay not negative")
        if not 0.0 <= self.warmup < 1.0:
            raise TrainConfigError(
                f"warmup must be a share of the steps in [0, 1), got {self.warmup}"
            )
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(
                f"unknown schedule '{self.schedule}': choose one of {', '.join(SCHEDULES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise TrainConfigError(
                f"unknown optimizer '{self.optimizer}': choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise TrainConfigError(f"num_threads must be at least 1, got {self.num_threads}")


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # counted from 1
    loss: float  # mean training cross-entropy over the epoch (while the weights moved)
    accuracy: float  # training accuracy over the epoch, in percent
    lr: float  # learning rate at the last step of the epoch
    seconds: float  # wall time of the epoch, evaluation included
    eval_loss: float | None = None  # on eval_dataset after the epoch, if one was given
    eval_accuracy: float | None = None


@dataclass
class TrainHistory:
    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [e.loss for e in self.epochs]

    @property
    def accuracies(self) -> list[float]:
        return [e.accuracy for e in self.epochs]

    @property
    def final(self) -> EpochStats:
        return self.epochs[-1]


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # percent of predictions (examples, or positions) whose arg-max is the label
    loss: float  # mean cross-entropy


@dataclass(frozen=True)
class FinetuneResult:
    model: nn.Module  # the fine-tuned copy; the model passed in is untouched
    history: TrainHistory


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate for SGD step ``step`` (0-based) out of ``total_steps``: the schedule's,
    times ``(step + 1) / warmup_steps`` during the first ``config.warmup`` share of the steps."""
    warmup_steps = config.warmup * total_steps
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return ramp * _scheduled(config, step, total_steps)


def _scheduled(config: TrainConfig, step: int, total_steps: int) -> float:
    progress = step / max(1, total_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.lr * 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return config.lr


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    progress: bool = True,
    eval_dataset: Dataset | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``dataset`` and return the per-epoch statistics.

    ``dataset.images`` (N, C, H, W) are fed as they are; ``model`` must map them to logits (B, K),
    or, for sequences (labels (B, T), e.g. :func:`otfuse.text.windows`), to logits (B, T, K): the
    loss and accuracy are then per position. With ``eval_dataset``, the model is evaluated on it
    after every epoch.
    """
    seed_everything(config.seed)
    optimizer = _optimizer(model, config)
    loader = dataset.loader(config.batch_size, shuffle=True, seed=config.seed)
    total_steps = config.epochs * len(loader)
    history = TrainHistory()
    on_terminal = progress and sys.stderr.isatty()
    bar = tqdm(total=total_steps, disable=not on_terminal, desc="train", unit="step", leave=False)
    watch = _DivergenceWatch(config.lr)
    with _num_threads(config.num_threads), bar:
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            loss, accuracy, lr = _train_epoch(model, loader, optimizer, config, epoch, bar, watch)
            evaluation = evaluate(model, eval_dataset) if eval_dataset is not None else None
            stats = EpochStats(
                epoch=epoch,
                loss=loss,
                accuracy=accuracy,
                lr=lr,
                seconds=time.perf_counter() - start,
                eval_loss=evaluation.loss if evaluation else None,
                eval_accuracy=evaluation.accuracy if evaluation else None,
            )
            history.epochs.append(stats)
            if progress and not on_terminal:
                print(_epoch_line(stats, config.epochs), file=sys.stderr, flush=True)
    watch.check_final(history.final.loss)
    broken = first_non_finite(model)  # the last step may have broken the weights
    if broken is not None:
        raise TrainingDivergedError(
            f"training diverged: '{broken}' holds NaN or Inf values; lower the learning rate "
            f"(lr={config.lr:g})"
        )
    return history


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def flat_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) and labels (B,), or per-position logits (B, ..., K) and labels (B, ...)
    flattened to (B * ..., K) and (B * ...,): one row per prediction."""
    if logits.dim() == labels.dim() + 1 and labels.dim() > 1:
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    return logits, labels


def _epoch_line(stats: EpochStats, epochs: int) -> str:
    """One log line per epoch, for stderr that is not a terminal."""
    line = (
        f"train: epoch {stats.epoch}/{epochs}: loss {stats.loss:.4f}, accuracy "
        f"{stats.accuracy:.2f}%, lr {stats.lr:.4g} ({stats.seconds:.1f} s)"
    )
    if stats.eval_accuracy is not None:
        line += f"; eval accuracy {stats.eval_accuracy:.2f}%, loss {stats.eval_loss:.4f}"
    return line


class _DivergenceWatch:
    """Raises :class:`TrainingDivergedError` when the loss runs away from its first value."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.first: float | None = None

    def step(self, loss: float, epoch: int, step: int) -> None:
        if self.first is None and math.isfinite(loss):
            self.first = loss
        limit = DIVERGENCE_FACTOR * max(self.first or 1.0, 1.0)
        if not math.isfinite(loss) or loss > limit:
            start = f", from {self.first:.3g} at the first step" if self.first is not None else ""
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch}, step {step}: loss {loss:.3g}{start}; "
                f"lower the learning rate (lr={self.lr:g})"
            )

    def check_final(self, loss: float) -> None:
        if self.first is not None and loss > FINAL_LOSS_FACTOR * max(self.first, 1.0):
            raise TrainingDivergedError(
                f"training diverged: the last epoch's mean loss is {loss:.3g}, up from "
                f"{self.first:.3g} at the first step; lower the learning rate (lr={self.lr:g})"
            )


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first floating-point entry of ``model``'s state holding NaN or Inf, or None."""
    return first_non_finite_entry(model.state_dict())


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    epoch: int,
    bar: tqdm,
    watch: _DivergenceWatch,
) -> tuple[float, float, float]:
    """One pass over ``loader``; returns mean loss, accuracy (percent) and the last lr."""
    model.train()
    device = _device(model)
    steps, total_steps = (epoch - 1) * len(loader), config.epochs * len(loader)
    loss_sum, correct, seen, lr = 0.0, 0, 0, config.lr
    for i, (images, labels) in enumerate(loader):
        lr = learning_rate(config, steps + i, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = images.to(device), labels.to(device)
        logits, labels = flat_targets(model(images), labels)
        loss = F.cross_entropy(logits, labels)
        watch.step(loss.item(), epoch, i + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        bar.update()
        bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.4f}", refresh=False)
    return loss_sum / seen, 100.0 * correct / seen, lr


def finetune(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    eval_dataset: Dataset | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` (e.g. a fused one) with the training loop of :func:`train`.

    The model passed in is left untouched; the result holds the trained copy and its history.
    The default budget is short: one epoch, cosine schedule from lr 0.01.
    """
    config = config if config is not None else TrainConfig(epochs=1, lr=0.01)
    tuned = copy.deepcopy(model)
    history = train(tuned, dataset, config, progress=progress, eval_dataset=eval_dataset)
    return FinetuneResult(model=tuned, history=history)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, K) of ``model`` for ``images`` (N, C, H, W), in eval mode, without gradients.

    The model's train/eval mode is restored afterwards.
    """
    device = _device(model)
    with evaluating([model]):
        # copies: a model may change its input in place
        chunks = [model(batch.to(device, copy=True)).cpu() for batch in images.split(batch_size)]
    return torch.cat(chunks)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> Evaluation:
    """Accuracy (percent) and mean cross-entropy of ``model`` on ``dataset``, in eval mode."""
    if len(dataset) == 0:
        raise TrainConfigError("cannot evaluate on an empty dataset")
    logits, labels = flat_targets(predict_logits(model, dataset.images, batch_size), dataset.labels)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    return Evaluation(accuracy=accuracy, loss=loss)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` torch CPU threads inside the block (no change when ``n`` is None)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
