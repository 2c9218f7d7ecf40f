"""The demo (``make demo`` / ``otfuse demo``): fuse two MLPNets trained on Fashion-MNIST.

Two MLPNets (784-400-200-100-10, no biases, as in the paper) are trained from different seeds; the
table compares each parent, their prediction ensemble, vanilla averaging and OT fusion (``wts`` and
``acts``), each on the whole Fashion-MNIST test set, with the time each took.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

import otfuse
from otfuse.checkpoints import atomic_write_text
from otfuse.data import load_dataset, sample_inputs
from otfuse.experiments.common import Row, evaluate_row, markdown_table, train_or_load
from otfuse.training import TrainConfig


def fusion_rows(parents, train, test, *, num_samples: int = 400, seed: int = 0) -> list[Row]:
    """Baselines and OT fusion of ``parents`` evaluated on ``test``."""
    sample = sample_inputs(train, num_samples, seed)
    rows = [otfuse_row("prediction ensemble", lambda: otfuse.ensemble(parents), test)]
    rows.append(otfuse_row("vanilla average", lambda: otfuse.vanilla_average(parents), test))
    for label, kwargs in [
        ("OT fusion, wts (paper)", {"mode": "wts"}),
        ("OT fusion, acts (paper)", {"mode": "acts", "data": sample}),
    ]:
        rows.append(otfuse_row(label, lambda kw=kwargs: otfuse.fuse(parents, **kw).model, test))
    return rows


def otfuse_row(label: str, make, test) -> Row:
    import time

    start = time.perf_counter()
    model = make()
    seconds = time.perf_counter() - start
    return evaluate_row(label, model, test, seconds)


def main(
    data_dir: str | Path | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
    out: str | Path = "runs/demo",
    epochs: int = 5,
) -> dict:
    """Train two MLPNets (cached), fuse them, print the table and write ``out/results.json``."""
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    if quick:
        train, epochs = train.subset(torch.arange(6000)), 1
    parents, rows = [], []
    for seed, name in [(0, "A"), (1, "B")]:
        config = TrainConfig(epochs=epochs, lr=0.05, seed=seed)
        model, seconds = train_or_load(
            "mlpnet",
            {"in_shape": (1, 28, 28)},
            train,
            config,
            progress=progress,
            label=f"MLPNet {name} (seed {seed})",
        )
        parents.append(model)
        rows.append(evaluate_row(f"parent {name} (seed {seed})", model, test, seconds))
    rows += fusion_rows(parents, train, test)
    table = markdown_table(rows)
    print(
        f"\nFashion-MNIST, two MLPNets ({epochs} epochs each on {len(train)} images), test set of "
        f"{len(test)} images. Time: training (0 = cached) or fusion.\n"
    )
    print(table)
    results = {
        "experiment": "demo",
        "epochs": epochs,
        "train_examples": len(train),
        "rows": [asdict(r) for r in rows],
    }
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "report.md", f"# otfuse demo\n\n{table}\n")
    return results
