"""Speed target: fuse two GPT-2-small-sized models (124M parameters, random weights) with the paper's
wts method.

Target (issue 11): under 10 s on this machine. Two ``GPT2LMHeadModel(GPT2Config())`` (12 layers,
width 768, 12 heads, vocabulary 50257, random weights from seeds 0 and 1, eval mode,
``use_cache=False``) are fused by ``otfuse.fuse([a, b], "paper-wts", example_input=tokens)`` with
tokens of shape (2, ``--seq-len``). Prints the torch thread count, the capture time alone
(``otfuse.spaces``, the ``torch.export`` capture and discovery), the first (cold) fusion call, the
median of ``--repeats`` further calls with their split by stage, and the peak RSS of the process.
Needs ``transformers`` (nothing is downloaded: the models are built from a config). The models
run on ``--device`` (default ``auto``: CUDA when present, else the CPU), which the output names.

    .venv/bin/python benchmarks/fuse_gpt2.py [--seq-len 64] [--repeats 3] [--threads 2] [--json]
    .venv/bin/python benchmarks/fuse_gpt2.py --device cpu
    .venv/bin/python benchmarks/fuse_gpt2.py --profile fuse.prof   # cProfile of one warm call
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import rss_mib, summary, timed  # noqa: E402

import otfuse  # noqa: E402
from otfuse.cli.common import parse_device  # noqa: E402

TARGET = 10.0


def gpt2_small(seed: int) -> torch.nn.Module:
    """GPT-2 small's architecture (GPT2Config's defaults) with random weights from ``seed``."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per example input row")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls timed after the first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--profile", metavar="FILE", help="cProfile one warm call into FILE")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    args = parser.parse_args()
    device = parse_device(args.device)

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    models = [gpt2_small(seed).to(device) for seed in range(2)]
    build = time.perf_counter() - start
    params = sum(p.numel() for p in models[0].parameters())
    tokens = torch.randint(0, models[0].config.vocab_size, (2, args.seq_len),
                           generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip

    start = time.perf_counter()
    graph = otfuse.spaces(models[0], tokens)
    capture = time.perf_counter() - start

    stages: dict[str, list[float]] = {}

    def run() -> None:
        result = otfuse.fuse(models, "paper-wts", example_input=tokens)
        for name, seconds in result.timings.items():
            stages.setdefault(name, []).append(seconds)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    (cold,), cold_peak = timed(run, 1)
    stages.clear()
    times, peak = timed(run, args.repeats)
    median = statistics.median(times)
    result = {
        "benchmark": "fuse_gpt2",
        "parameters": params,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "build_seconds": round(build, 3),
        "capture_seconds": round(capture, 3),
        "spaces": len(graph.transportable()),
        "cold_seconds": round(cold, 3),
        "median_seconds": round(median, 3),
        "seconds": [round(t, 3) for t in times],
        "stages": {k: round(statistics.median(v), 3) for k, v in stages.items()},
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "call_peak_above_start_mib": round(max(peak, cold_peak), 1),
        "target_seconds": TARGET,
        "met": median <= TARGET,
    }
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    if args.json:
        print(json.dumps(result))
        return
    print(f"two GPT-2-small-sized models ({params / 1e6:.1f}M parameters each), tokens "
          f"(2, {args.seq_len}), paper-wts, {result['threads']} torch threads, on {device}")  # fmt: skip
    print(f"  build both models: {build:.2f} s")
    print(f"  capture (otfuse.spaces, torch.export + discovery): {capture:.2f} s, "
          f"{result['spaces']} spaces")  # fmt: skip
    print(f"  fusion, first call (cold): {cold:.2f} s")
    print(f"  fusion, warm: {summary(times)}")
    print(
        "  by stage (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in result["stages"].items())
    )
    print(f"  peak RSS: {result['peak_rss_mib']:.0f} MiB (a call adds at most "
          f"{result['call_peak_above_start_mib']:.0f} MiB)")  # fmt: skip
    verdict = "met" if result["met"] else "NOT met"
    print(f"  target: median <= {TARGET:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
