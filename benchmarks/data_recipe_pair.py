"""The data recipe on a VGG11 x0.25 pair (Fashion-MNIST layout): wall time and graph traces per call.

The data recipe chooses among three candidate alignments, then resets BatchNorm, repairs and refits.
This prints how many times ``torch.fx`` traced a model during one call (the pipeline traces each
architecture once), the median wall time of several calls after a warm-up, and the fused model's
checksum, so two versions of otfuse can be compared on identical inputs.

    .venv/bin/python benchmarks/data_recipe_pair.py [--repeats 3] [--threads 2] [--before REV]

``--before REV`` also runs this script on otfuse as it was at git revision REV (a temporary
worktree), so both versions are measured in one run on the same inputs (d1003e2: before the
pipeline traced each architecture once).

The parents are initialised from seeds 0 and 1 and their BatchNorm statistics set on the sample
(training them changes the numbers of the alignment, not the work done).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.fx

import otfuse
from otfuse import zoo
from otfuse.data import load_dataset


def count_traces() -> list[int]:
    """Patch ``torch.fx.Tracer.trace`` to count calls; returns the counter (a one-item list)."""
    counter = [0]
    original = torch.fx.Tracer.trace

    def counting(self, *args, **kwargs):
        counter[0] += 1
        return original(self, *args, **kwargs)

    torch.fx.Tracer.trace = counting
    return counter


def parents(sample: torch.Tensor) -> list[torch.nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = zoo.create("vgg11", width=0.25, in_shape=(1, 28, 28), batch_norm=True)
        model.train()
        with torch.no_grad():
            model(sample)  # BatchNorm statistics of the sample
        models.append(model.eval())
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", metavar="REV", help="also measure otfuse at git revision REV")
    args = parser.parse_args()
    if args.before:
        run_at_revision(args.before, args.repeats, args.threads)
    torch.set_num_threads(args.threads)
    train = load_dataset("fashion-mnist", "train")
    gen = torch.Generator().manual_seed(0)
    sample = train.images[torch.randperm(len(train.images), generator=gen)[:1000]]
    models = parents(sample)
    counter = count_traces()
    times, traces = [], []
    for i in range(args.repeats + 1):
        counter[0] = 0
        start = time.perf_counter()
        result = otfuse.fuse(models, data=sample, example_input=sample[:2])
        elapsed = time.perf_counter() - start
        if i > 0:  # the first call warms up
            times.append(elapsed)
        traces.append(counter[0])
    checksum = sum(float(v.double().abs().sum()) for v in result.model.state_dict().values())
    print(f"otfuse {otfuse.__file__}")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"data recipe, VGG11 x0.25 pair, 400 of 1000 inputs: traces per call {traces[-1]}")
    print(
        f"wall time: median {statistics.median(times):.2f} s "
        f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)})"
    )
    print(f"fused model checksum: {checksum:.6f}")
    sys.stdout.flush()


def run_at_revision(rev: str, repeats: int, threads: int) -> None:
    """Run this script on otfuse at ``rev`` (a temporary git worktree) and print its output."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "otfuse"
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "-q", "--detach", str(tree), rev],
            check=True,
        )
        try:
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
            command = [
                sys.executable,
                __file__,
                "--repeats",
                str(repeats),
                "--threads",
                str(threads),
            ]
            print(f"-- otfuse at {rev} --", flush=True)
            subprocess.run(command, env=env, cwd=tree, check=True)
        finally:
            subprocess.run(
                ["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=True
            )
    print("-- otfuse in this tree --", flush=True)


if __name__ == "__main__":
    main()
