"""The no-data default (``otfuse.fuse(models, example_input=x)``, the data-free recipe): time and accuracy.

Target of the speed issue: <= 10 s per pair of the experiments (VGG11 x0.25; ResNet-18 x0.125 and
x0.25 with BatchNorm), accuracy no lower than the earlier data-free recipe's. Prints, per seed pair,
the test accuracy and the share of the mean parent it keeps, and the median wall time of
``--repeats`` calls (each call synthesises its inputs anew; the first call of the process is
counted too, as users meet it), then the medians over pairs. ``--before`` also runs the earlier
default (256 inputs, 200 Adam steps at 0.1, three candidate alignments compared) on the same parents.

    .venv/bin/python benchmarks/no_data_default.py [--archs vgg11,resnet18,resnet18x0.25]
        [--pairs "0,1;2,3;0,2"] [--repeats 3] [--threads 2] [--before] [--recipe data]

``--recipe data`` times the data recipe on the experiments' fusion sample (400 training images)
instead (target: <= 3 s per pair, accuracy no lower than before).

Parents are the experiments' (Fashion-MNIST), trained and cached on first use (minutes each; the
ResNet-18 x0.25 pair is not trained by any experiment, so its first run trains it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

import otfuse
from otfuse.experiments.common import STANDARD_PARENTS
from otfuse.experiments.two_models import FULL, load_data, train_parents
from otfuse.training import evaluate

PARENTS = {
    **STANDARD_PARENTS,  # mlpnet, vgg11, resnet18 (x0.125)
    "resnet18x0.25": replace(
        STANDARD_PARENTS["resnet18"],
        arch_kwargs={**STANDARD_PARENTS["resnet18"].arch_kwargs, "width": 0.25},
    ),
    # a second BatchNorm architecture, costly enough that a CPU synthesises fewer inputs for it
    "vgg11bnx0.5": replace(
        STANDARD_PARENTS["vgg11"],
        arch_kwargs={**STANDARD_PARENTS["vgg11"].arch_kwargs, "width": 0.5, "batch_norm": True},
    ),
}
EARLIER_DEFAULT = dict(  # the data-free recipe before the speed work (commit 775f5b2)
    synthesize=256,
    synthesis_steps=200,
    synthesis_lr=0.1,
    candidates=(
        {"mode": "wts", "cost": "euclidean"},
        {"mode": "acts", "cost": "correlation", "activations": "pre"},
        {"mode": "acts", "cost": "euclidean", "activations": "post"},
    ),
)


def measure(parents, example, test, repeats: int, options: dict) -> tuple[float, float]:
    """Median seconds of ``repeats`` calls and the last fused model's test accuracy (%)."""
    seconds, accuracy = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fused = otfuse.fuse(parents, example_input=example[:2], **options).model
        seconds.append(time.perf_counter() - start)
        accuracy = evaluate(fused, test).accuracy
    return statistics.median(seconds), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vgg11,resnet18,resnet18x0.25")
    parser.add_argument("--pairs", default="0,1;2,3;0,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", action="store_true", help="also run the earlier default")
    parser.add_argument("--recipe", choices=("data-free", "data"), default="data-free")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; repeats per pair: {args.repeats}")
    data = load_data(FULL, None)
    example = data.sample
    settings = {"default": {}, **({"earlier default": EARLIER_DEFAULT} if args.before else {})}
    if args.recipe == "data":
        settings = {"data recipe": {"recipe": "data", "data": data.sample}}
    print("| arch | seeds | parents | setting | accuracy (kept) | median time (s) |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        summary: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
        for pair in args.pairs.split(";"):
            seeds = [int(s) for s in pair.split(",")]
            parents, _ = train_parents(PARENTS[arch], data, seeds, progress=False)
            mean = statistics.mean(evaluate(p, data.test).accuracy for p in parents)
            for name, options in settings.items():
                seconds, accuracy = measure(parents, example, data.test, args.repeats, options)
                summary[name].append((accuracy, seconds))
                print(f"| {arch} | {pair} | {mean:.2f} | {name} | {accuracy:.2f} "
                      f"({100 * accuracy / mean:.1f}%) | {seconds:.1f} |", flush=True)  # fmt: skip
        for name, rows in summary.items():
            accuracy = statistics.median(a for a, _ in rows)
            seconds = statistics.median(s for _, s in rows)
            print(f"| {arch} | median of {len(rows)} pairs | | {name} | {accuracy:.2f} | "
                  f"{seconds:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
