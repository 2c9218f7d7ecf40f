"""Pieces shared by the experiments: cached training of parents, evaluation rows, tables.

Trained parents are cached as safetensors (with a JSON sidecar) under ``runs/cache`` (or
``$OTFUSE_CACHE``), keyed by everything that determines them: architecture, data, subset, training
configuration and seed. A cached model is loaded safely (``otfuse.checkpoints``) instead of retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from otfuse import zoo
from otfuse.checkpoints import load_into, load_state_dict, save_model
from otfuse.data import Dataset
from otfuse.errors import OtfuseError
from otfuse.training import TrainConfig, evaluate, first_non_finite, train


def cache_dir() -> Path:
    return Path(os.environ.get("OTFUSE_CACHE", "runs/cache"))


@dataclass
class Row:
    """One line of a results table."""

    method: str
    accuracy: float  # percent, on the test split
    loss: float  # mean cross-entropy on the test split
    seconds: float  # training time (parents) or fusion time (fused models)
    params: int  # parameters needed at inference


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_row(method: str, model: nn.Module, test: Dataset, seconds: float) -> Row:
    result = evaluate(model, test)
    return Row(method, result.accuracy, result.loss, seconds, count_params(model))


def _key(arch: str, arch_kwargs: dict, data: Dataset, config: TrainConfig) -> str:
    digest = hashlib.sha256()
    settings = asdict(config)
    if settings.get("optimizer") == "sgd":  # the default: keys of parents cached before it existed
        del settings["optimizer"]
    if not settings.get("warmup"):  # no warmup: keys of parents cached before it existed
        settings.pop("warmup", None)
    digest.update(json.dumps([arch, arch_kwargs, settings], sort_keys=True, default=str).encode())
    digest.update(data.name.encode())
    digest.update(data.labels.numpy().tobytes())
    digest.update(data.images[:: max(1, len(data) // 64)].numpy().tobytes())
    return digest.hexdigest()[:16]


def train_or_load(
    arch: str,
    arch_kwargs: dict,
    data: Dataset,
    config: TrainConfig,
    *,
    progress: bool = True,
    label: str = "",
) -> tuple[nn.Module, float]:
    """A zoo model trained on ``data`` with ``config``, from the cache when it was trained before.

    Returns the model (eval mode) and the seconds its training took (0 when loaded from cache).
    """
    model = zoo.create(arch, **arch_kwargs)
    path = cache_dir() / f"{arch}-{_key(arch, arch_kwargs, data, config)}.safetensors"
    if path.exists():
        try:
            load_into(model, load_state_dict(path))
            if first_non_finite(model) is None:  # older versions could cache a NaN model
                return model.eval(), 0.0
        except OtfuseError:
            pass
        path.unlink(missing_ok=True)  # a damaged cache entry is retrained
    torch.manual_seed(config.seed)
    model = zoo.create(arch, **arch_kwargs)
    if progress and label:
        print(f"training {label} ...", flush=True)
    start = time.perf_counter()
    train(model, data, config, progress=progress)
    seconds = time.perf_counter() - start
    meta = {
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "data": data.name,
        "examples": len(data),
        "train_config": asdict(config),
        "seconds": seconds,
    }
    save_model(path, model, meta, overwrite=True)
    return model.eval(), seconds


def markdown_table(rows: Sequence[Row], *, extra: dict[str, Sequence[str]] | None = None) -> str:
    """Rows as a Markdown table: method, accuracy, loss, seconds, parameters (+ extra columns)."""
    extra = extra or {}
    head = ["method", "test acc (%)", "test loss", "time (s)", "params", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [
            r.method,
            f"{r.accuracy:.2f}",
            f"{r.loss:.4f}",
            f"{r.seconds:.2f}",
            f"{r.params:,}",
        ]
        cells += [values[i] for values in extra.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ParentSpec:
    """How the experiments' parents of one architecture are built and trained on Fashion-MNIST."""

    arch: str
    arch_kwargs: dict
    epochs: int
    lr: float = 0.05
    batch_size: int = 128

    def config(self, seed: int, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(
            epochs=epochs or self.epochs, lr=self.lr, batch_size=self.batch_size, seed=seed
        )


# Widths chosen so that training fits this 2-core CPU (seconds per epoch measured here, quiet machine):
# MLPNet ~1 s, VGG11 x0.25 ~18 s, ResNet-18 x0.125 ~44 s.
STANDARD_PARENTS = {
    "mlpnet": ParentSpec("mlpnet", {"in_shape": (1, 28, 28)}, epochs=10),
    "vgg11": ParentSpec("vgg11", {"width": 0.25, "in_shape": (1, 28, 28)}, epochs=6),
    "resnet18": ParentSpec(
        "resnet18", {"width": 0.125, "batch_norm": True, "in_shape": (1, 28, 28)}, epochs=5
    ),
}
# --quick: tiny settings so that every experiment runs in well under two minutes
QUICK_PARENTS = {
    "mlpnet": ParentSpec("mlpnet", {"in_shape": (1, 28, 28), "width": 0.25}, epochs=1),
    # VGG11 without BatchNorm needs small batches to leave chance level in so few steps
    "vgg11": ParentSpec(
        "vgg11", {"width": 0.0625, "in_shape": (1, 28, 28)}, epochs=2, batch_size=32
    ),
    "resnet18": ParentSpec(
        "resnet18", {"width": 0.0625, "batch_norm": True, "in_shape": (1, 28, 28)}, epochs=1
    ),
}
QUICK_TRAIN_EXAMPLES = 4000


def parent_specs(quick: bool) -> dict[str, ParentSpec]:
    return QUICK_PARENTS if quick else STANDARD_PARENTS


def train_parent(
    spec: ParentSpec, data: Dataset, seed: int, *, progress: bool = True, label: str = ""
) -> tuple[nn.Module, float]:
    """A parent of ``spec`` trained on ``data`` with ``seed`` (cached; see :func:`train_or_load`)."""
    return train_or_load(
        spec.arch,
        spec.arch_kwargs,
        data,
        spec.config(seed),
        progress=progress,
        label=label or f"{spec.arch} seed {seed}",
    )
