"""Accuracy target of the core: Fashion-MNIST MLPNet pairs, one-shot OT fusion vs vanilla averaging.

Target: OT fusion one-shot far above vanilla averaging and within 3 points of the better parent.
Uses the experiments' standard MLPNets (trained and cached on first use: about 20 s each here) for
several seed pairs and prints each pair's figures and whether the target holds.

    .venv/bin/python benchmarks/mlpnet_pair.py [--pairs 3]
"""

from __future__ import annotations

import argparse

import otfuse
from otfuse.data import load_dataset, sample_inputs
from otfuse.experiments.common import STANDARD_PARENTS, train_parent
from otfuse.training import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    sample = sample_inputs(train, 400, seed=0)
    print("| pair | parent A | parent B | vanilla | OT wts | OT acts | target |")
    print("|---|---|---|---|---|---|---|")
    for pair in range(args.pairs):
        seeds = (2 * pair, 2 * pair + 1)
        parents = [
            train_parent(STANDARD_PARENTS["mlpnet"], train, s, progress=False)[0] for s in seeds
        ]
        acc = [evaluate(p, test).accuracy for p in parents]
        vanilla = evaluate(otfuse.vanilla_average(parents), test).accuracy
        wts = evaluate(otfuse.fuse(parents, recipe="paper-wts").model, test).accuracy
        acts = evaluate(otfuse.fuse(parents, recipe="paper-acts", data=sample).model, test).accuracy
        met = all(ot >= max(acc) - 3 and ot > vanilla + 3 for ot in (wts, acts))
        print(
            f"| seeds {seeds} | {acc[0]:.2f} | {acc[1]:.2f} | {vanilla:.2f} | {wts:.2f} | {acts:.2f} | "
            f"{'met' if met else 'NOT met'} |"
        )


if __name__ == "__main__":
    main()
