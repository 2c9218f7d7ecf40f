"""Speed target: fuse six VGG11 (CIFAR layout, ~9.2M parameters each) with the paper's wts method.

Targets (issue 12, 2 torch threads): median warm call <= 0.5 s; the first call in a fresh process
(cold) <= 1.0 s. Prints the torch thread count, the assignment backend, the median of ``--repeats``
warm calls with their split by stage, the median of ``--cold`` cold calls (each in a new Python
process, :data:`sys.executable`, timed from just before its first ``fuse`` call; the process's
imports and model construction are reported apart), and the peak memory the fusion adds.

    .venv/bin/python benchmarks/fuse_vgg11.py [--repeats 7] [--cold 3] [--models 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_start = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _common import rss_mib, summary, timed  # noqa: E402

import otfuse  # noqa: E402
from otfuse import transport, zoo  # noqa: E402

_imported = time.perf_counter()
# the solver of the assignment (versions before the choice was made used SciPy's)
ASSIGNMENT_BACKEND = getattr(transport, "ASSIGNMENT_BACKEND", "scipy")
WARM_TARGET, COLD_TARGET = 0.5, 1.0


def build(k: int) -> list[torch.nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(zoo.create("vgg11").eval())
    return models


def fuse(models: list[torch.nn.Module], solver: str) -> otfuse.FusionResult:
    example = torch.zeros(2, 3, 32, 32)
    return otfuse.fuse(models, "paper-wts", solver=solver, example_input=example)


def child(args: argparse.Namespace) -> None:
    """One cold call in this fresh process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    models = build(args.models)
    built = time.perf_counter()
    start = time.perf_counter()
    result = fuse(models, args.solver)
    first = time.perf_counter() - start
    print(
        json.dumps(
            {
                "first_call_s": first,
                "import_s": _imported - _start,
                "build_s": built - _imported,
                "timings": result.timings,
            }
        )
    )


def cold_runs(args: argparse.Namespace) -> list[dict]:
    command = [sys.executable, __file__, "--child", "--models", str(args.models)]
    command += ["--threads", str(args.threads), "--solver", args.solver]
    runs = []
    for _ in range(args.cold):
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="warm calls (median reported)")
    parser.add_argument("--cold", type=int, default=3, help="cold calls, each in a new process")
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    torch.set_num_threads(args.threads)
    models = build(args.models)
    params = sum(p.numel() for p in models[0].parameters())
    base = rss_mib()
    fuse(models, args.solver)  # warm-up: this process's first call
    stages: dict[str, list[float]] = {}

    def run() -> None:
        for name, seconds in fuse(models, args.solver).timings.items():
            stages.setdefault(name, []).append(seconds)

    times, peak = timed(run, args.repeats)
    cold = cold_runs(args) if args.cold > 0 else []
    median = statistics.median(times)
    cold_median = statistics.median(r["first_call_s"] for r in cold) if cold else None
    result = {
        "benchmark": "fuse_vgg11",
        "models": args.models,
        "params_per_model": params,
        "threads": torch.get_num_threads(),
        "assignment_backend": ASSIGNMENT_BACKEND,
        "solver": args.solver,
        "median_s": round(median, 3),
        "times_s": [round(t, 3) for t in times],
        "stages_median_s": {k: round(statistics.median(v), 4) for k, v in stages.items()},
        "cold_median_s": None if cold_median is None else round(cold_median, 3),
        "cold_s": [round(r["first_call_s"], 3) for r in cold],
        "cold_import_s": [round(r["import_s"], 3) for r in cold],
        "peak_extra_mib": round(peak, 1),
        "models_mib": round(base, 1),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"fuse {args.models} x VGG11 ({params / 1e6:.2f}M parameters each), paper-wts, "
        f"solver={args.solver} (assignment backend: {ASSIGNMENT_BACKEND}), "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(f"  warm: {summary(times)}")
    split = ", ".join(f"{k} {v:.3f}" for k, v in result["stages_median_s"].items())
    print(f"  warm split by stage (medians, s): {split}")
    if cold:
        imports = statistics.median(r["import_s"] for r in cold)
        print(
            f"  cold first call in a fresh process: {summary([r['first_call_s'] for r in cold])} "
            f"(after {imports:.2f} s of imports, not counted)"
        )
    print(f"  peak memory above the loaded models: {peak:.0f} MiB (process RSS {base:.0f} MiB)")
    verdict = "met" if median <= WARM_TARGET else "NOT met"
    print(f"  target warm <= {WARM_TARGET} s: {verdict}", end="")
    if cold_median is not None:
        verdict = "met" if cold_median <= COLD_TARGET else "NOT met"
        print(f"; cold <= {COLD_TARGET} s: {verdict}")
    else:
        print()


if __name__ == "__main__":
    main()
