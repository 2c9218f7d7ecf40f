"""The demo (``make demo`` / ``otfuse demo``): fuse two MLPNets trained on Fashion-MNIST.

Two MLPNets (784-400-200-100-10, no biases, as in the paper) are trained from different seeds; the
table compares each parent, their prediction ensemble, vanilla averaging and OT fusion (``wts`` and
``acts``), each on the whole Fashion-MNIST test set, with the time each took.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

import otfuse
from otfuse.checkpoints import atomic_write_text
from otfuse.data import load_dataset, sample_inputs
from otfuse.experiments.common import (
    STANDARD_PARENTS,
    Row,
    evaluate_row,
    markdown_table,
    train_parent,
)
from otfuse.experiments.report import timed

FUSIONS = [
    ("OT fusion, wts (paper)", {"recipe": "paper-wts"}),
    ("OT fusion, acts (paper)", {"recipe": "paper-acts"}),
    ("OT fusion, data-free recipe", {"recipe": "data-free"}),
    ("OT fusion, data recipe", {"recipe": "data"}),
]


def fusion_rows(parents, train, test, *, num_samples: int = 400, seed: int = 0) -> list[Row]:
    """Baselines and OT fusion of ``parents`` evaluated on ``test``; ``acts`` and the data recipe use
    a seeded sample of ``num_samples`` unlabeled training images."""
    sample = sample_inputs(train, num_samples, seed)
    rows = [timed_row("prediction ensemble", lambda: otfuse.ensemble(parents), test)]
    rows.append(timed_row("vanilla average", lambda: otfuse.vanilla_average(parents), test))
    for label, options in FUSIONS:
        data = sample if options["recipe"] in ("paper-acts", "data") else None
        make = partial(otfuse.fuse, parents, data=data, example_input=sample[:2], **options)
        rows.append(timed_row(label, lambda make=make: make().model, test))
    return rows


def timed_row(label: str, make, test) -> Row:
    model, seconds = timed(make)
    return evaluate_row(label, model, test, seconds)


def main(
    data_dir: str | Path | None = None,
    *,
    quick: bool = False,
    progress: bool = True,
    out: str | Path = "runs/demo",
) -> dict:
    """Train two MLPNets (cached), fuse them, print the table and write ``out/results.json``."""
    train = load_dataset("fashion-mnist", "train", data_dir)
    test = load_dataset("fashion-mnist", "test", data_dir)
    spec = STANDARD_PARENTS["mlpnet"]
    if quick:
        train, spec = train.subset(torch.arange(6000)), replace(spec, epochs=1)
    epochs = spec.epochs
    parents, rows = [], []
    for seed, name in [(0, "A"), (1, "B")]:
        label = f"MLPNet {name} (seed {seed})"
        model, seconds = train_parent(spec, train, seed, progress=progress, label=label)
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
