"""Targets of the recipes on one more seed pair: share of the mean parent kept, one-shot.

Targets: the data recipe keeps >= 95% of the mean parent accuracy, the data-free recipe >= 85%.
Uses the experiments' standard parents (VGG11 x0.25, ResNet-18 x0.125 with BatchNorm; trained and
cached on first use: minutes each here) and the experiments' fusion sample (400 training images).

    .venv/bin/python benchmarks/recipes_pair.py [--seeds 2,3] [--archs vgg11,resnet18]
"""

from __future__ import annotations

import argparse
import time

import otfuse
from otfuse.experiments.common import STANDARD_PARENTS
from otfuse.experiments.two_models import FULL, load_data, train_parents
from otfuse.training import evaluate

TARGETS = {"data": 95.0, "data-free": 85.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="2,3")
    parser.add_argument("--archs", default="vgg11,resnet18")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_data(FULL, None)
    print("| arch | parents | vanilla | paper wts | data recipe (kept, s) | data-free (kept, s) |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        parents, _ = train_parents(STANDARD_PARENTS[arch], data, seeds, progress=False)
        accuracies = [evaluate(p, data.test).accuracy for p in parents]
        mean = sum(accuracies) / len(accuracies)
        cells = [arch, " / ".join(f"{a:.2f}" for a in accuracies)]
        cells.append(f"{evaluate(otfuse.vanilla_average(parents), data.test).accuracy:.2f}")
        paper = otfuse.fuse(parents, recipe="paper-wts", example_input=data.sample[:2]).model
        cells.append(f"{evaluate(paper, data.test).accuracy:.2f}")
        for recipe, inputs in (("data", data.sample), ("data-free", None)):
            start = time.perf_counter()
            fused = otfuse.fuse(parents, data=inputs, example_input=data.sample[:2]).model
            seconds = time.perf_counter() - start
            kept = 100 * evaluate(fused, data.test).accuracy / mean
            met = "met" if kept >= TARGETS[recipe] else "NOT met"
            cells.append(f"{kept * mean / 100:.2f} ({kept:.1f}%, {seconds:.0f} s, {met})")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
