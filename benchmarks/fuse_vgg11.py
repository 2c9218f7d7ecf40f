"""Speed target: fuse six VGG11 (CIFAR layout, ~9.2M parameters each) in wts mode, end to end.

Target: under 1.5 s on the 2-core CPU (the paper: 15 s on a V100 GPU). Prints the median of several
runs after one cold run, and the peak memory the fusion adds above the six input models.

    .venv/bin/python benchmarks/fuse_vgg11.py [--repeats 7] [--models 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _common import rss_mib, summary, timed  # noqa: E402

import otfuse  # noqa: E402
from otfuse import zoo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    models = []
    for seed in range(args.models):
        torch.manual_seed(seed)
        models.append(zoo.create("vgg11").eval())
    params = sum(p.numel() for p in models[0].parameters())
    example = torch.zeros(2, 3, 32, 32)
    base = rss_mib()

    def run():
        return otfuse.fuse(models, recipe="paper-wts", solver=args.solver, example_input=example)

    start = time.perf_counter()
    run()
    cold = time.perf_counter() - start
    times, peak = timed(run, args.repeats)
    result = {
        "models": args.models,
        "params_per_model": params,
        "threads": torch.get_num_threads(),
        "cold_s": round(cold, 3),
        "median_s": round(sorted(times)[len(times) // 2], 3),
        "times_s": [round(t, 3) for t in times],
        "peak_extra_mib": round(peak, 1),
        "models_mib": round(base, 1),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"fuse {args.models} x VGG11 ({params / 1e6:.2f}M parameters each), paper-wts recipe, solver={args.solver}"
    )
    print(f"  cold run: {cold:.3f} s; warm: {summary(times)}")
    print(
        f"  peak memory above the loaded models: {peak:.0f} MiB (process RSS with models: {base:.0f} MiB)"
    )
    print(f"  target < 1.5 s: {'met' if result['median_s'] < 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
